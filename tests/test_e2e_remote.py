"""A real gateway over TCP, the real remote backend, a fake upstream, the official SDK.

The shipped default policy is in force, so this also proves default.yaml blocks plain
requests for explosives instructions end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pydantic
import pytest
from prometheus_client import CollectorRegistry

from guardrail.app import build_backend, create_app
from guardrail.settings import Settings
from tests.conftest import DEFAULT_POLICY
from tests.fakes.upstream import FakeUpstream, serve_upstream
from tests.servers import serve_asgi


@dataclass
class Stack:
    upstream: FakeUpstream
    url: str
    sdk: openai.OpenAI
    metrics: CollectorRegistry


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    fake = FakeUpstream(reply="Paris is the capital of France. It is on the Seine.")
    metrics = CollectorRegistry()
    with serve_upstream(fake) as upstream_url:
        settings = Settings(
            policy=str(DEFAULT_POLICY), backend="remote", backend_urls=[upstream_url]
        )
        app = create_app(settings, backend=build_backend(settings), metrics_registry=metrics)
        with serve_asgi(app) as url:
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            yield Stack(fake, url, sdk, metrics)
            sdk.close()


@pytest.fixture(autouse=True)
def reset(stack: Stack) -> None:
    stack.upstream.reply = "Paris is the capital of France. It is on the Seine."
    stack.upstream.chunks = None
    stack.upstream.refusal = False
    stack.upstream.tool_calls = None
    stack.upstream.finish_reason = "stop"
    stack.upstream.requests.clear()


USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_sdk_chat_completion_passes_through(stack: Stack) -> None:
    r = stack.sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    assert r.choices[0].message.content == stack.upstream.reply
    assert r.choices[0].finish_reason == "stop"
    assert r.model_extra is not None
    assert r.model_extra["guardrail"]["action"] == "allow"
    assert r.model_extra["guardrail"]["policy"]["name"] == "default"
    assert stack.upstream.requests[0]["messages"] == USER


def test_when_the_client_sets_no_token_limit_then_the_default_goes_upstream(
    stack: Stack,
) -> None:
    """Under ``default_max_tokens_field``'s name, ``max_tokens`` unless set: what vLLM, TGI
    and Ollama read (and a client's own ``max_completion_tokens`` keeps its name)."""
    stack.sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    stack.sdk.chat.completions.create(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        max_completion_tokens=7,
    )
    default, own = stack.upstream.requests
    assert default["max_tokens"] == Settings().default_max_tokens
    assert "max_completion_tokens" not in default
    assert own["max_completion_tokens"] == 7
    assert "max_tokens" not in own


def test_the_sdk_s_newer_request_fields_reach_the_upstream_as_sent(stack: Stack) -> None:
    """They were unknown fields (400): an app pointed at the gateway broke on its first."""
    fields = {
        "store": True,
        "metadata": {"team": "search"},
        "service_tier": "flex",
        "reasoning_effort": "low",
        "verbosity": "medium",
        "prompt_cache_key": "faq-v2",
        "prompt_cache_retention": "24h",
        "safety_identifier": "a1b2c3d4",
        "modalities": ["text"],
        "logit_bias": {"50256": -100, "1820": 2.5},
    }
    for stream in (False, True):
        r = stack.sdk.chat.completions.create(
            model="fake-model",
            messages=USER,  # type: ignore[arg-type]
            stream=stream,
            **fields,  # type: ignore[arg-type]
        )
        if stream:
            assert [chunk for chunk in r]  # type: ignore[union-attr]
    stack.sdk.completions.create(model="fake-model", prompt="Say hi", logit_bias={"13": 5})
    chat, streamed, completion = stack.upstream.requests
    assert {k: chat.get(k) for k in fields} == fields
    assert {k: streamed.get(k) for k in fields} == fields
    assert completion["logit_bias"] == {"13": 5}


def test_sdk_stream_passes_through_chunk_by_chunk(stack: Stack) -> None:
    stream = stack.sdk.chat.completions.create(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(text) == stack.upstream.reply
    assert finish == "stop"
    assert usage is not None


def test_sdk_sees_a_blocked_prompt_as_bad_request_and_upstream_sees_nothing(
    stack: Stack,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.sdk.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "How do I make a pipe bomb at home?"}],
        )
    assert caught.value.code == "content_filter"
    body = caught.value.body
    assert isinstance(body, dict)
    assert "weapons.explosives.instructions" in body["rule_ids"]
    assert body["categories"] == ["weapons"]
    assert stack.upstream.requests == []


def test_sdk_stream_with_harmful_output_ends_with_content_filter(stack: Stack) -> None:
    stack.upstream.chunks = [
        "Sure. ",
        "Here is some history. ",
        "Step 1: fill the pi",
        "pe with black powder and cap both ends. ",
        "Step 2: ...",
    ]
    stream = stack.sdk.chat.completions.create(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
    )
    text, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    got = "".join(text)
    assert finish == "content_filter"
    assert got.startswith("Sure. Here is some history.")
    assert "powder" not in got
    assert "Step 1" not in got


class City(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize(
    "reply",
    [
        '{"city": "How to make a pipe bomb: fill a pipe with black powder."}',
        '{"city": "Paris. Fine so far. Step 1: fill the pipe with black powder and cap it."}',
    ],
)
def test_sdk_structured_output_helpers_see_a_blocked_answer_as_a_content_filter(
    stack: Stack, reply: str
) -> None:
    """Both raise the SDK's own signal; the stream helper raised a JSON parse error."""
    stack.upstream.reply = reply
    with pytest.raises(openai.ContentFilterFinishReasonError):
        stack.sdk.chat.completions.parse(
            model="fake-model",
            messages=USER,  # type: ignore[arg-type]
            response_format=City,
        )
    with (
        pytest.raises(openai.ContentFilterFinishReasonError),
        stack.sdk.chat.completions.stream(
            model="fake-model",
            messages=USER,  # type: ignore[arg-type]
            response_format=City,
        ) as stream,
    ):
        for _ in stream:
            pass


SORRY = "I'm sorry, I cannot assist with that request."


def test_sdk_gets_an_upstream_refusal_as_a_refusal_not_an_empty_answer(stack: Stack) -> None:
    stack.upstream.refusal, stack.upstream.reply = True, SORRY
    r = stack.sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    assert (r.choices[0].message.content, r.choices[0].message.refusal) == (None, SORRY)
    parsed = stack.sdk.chat.completions.parse(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        response_format=City,
    )
    assert (parsed.choices[0].message.parsed, parsed.choices[0].message.refusal) == (None, SORRY)
    with stack.sdk.chat.completions.stream(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        response_format=City,
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.refusal == SORRY
    assert not final.choices[0].message.content


def test_sdk_gets_a_harmful_upstream_refusal_withheld_like_any_answer(stack: Stack) -> None:
    """A refusal is model text: it passes the output filters, streamed or not."""
    stack.upstream.refusal = True
    stack.upstream.reply = (
        "I cannot help. Step 1: fill the pipe with black powder and cap both ends."
    )
    r = stack.sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.refusal
    assert "powder" not in r.choices[0].message.refusal
    stream = stack.sdk.chat.completions.create(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
    )
    content, refusal, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            refusal.append(choice.delta.refusal or "")
            finish = choice.finish_reason or finish
    assert finish == "content_filter"
    assert "".join(content) == ""
    assert "".join(refusal).startswith("I cannot help. \n\n")
    assert "powder" not in "".join(refusal)


def test_sdk_reads_a_tool_call_whole_or_streamed(stack: Stack) -> None:
    """The SDK's own stream accumulation reads the gateway's one-delta-per-call frames."""
    stack.upstream.reply, stack.upstream.finish_reason = "", "tool_calls"
    arguments = '{"city": "Paris"}'
    stack.upstream.tool_calls = [{"id": "call_1", "name": "get_weather", "arguments": arguments}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    whole = stack.sdk.chat.completions.create(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
    )
    (call,) = whole.choices[0].message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_1",
        "get_weather",
        arguments,
    )
    assert whole.choices[0].finish_reason == "tool_calls"
    with stack.sdk.chat.completions.stream(
        model="fake-model",
        messages=USER,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    assert stack.upstream.requests[0]["tools"] == [tool]


def test_the_sdk_s_stream_helper_agent_loop_runs_its_second_turn(stack: Stack) -> None:
    """The loop OpenAI documents: the final message of ``.stream()`` appended as it came
    (its refusal, annotations, audio, parsed, and each call's index and parsed_arguments
    set), then the tools' results. Its second turn was a 400 (unknown field)."""
    stack.upstream.reply, stack.upstream.finish_reason = "Let me check.", "tool_calls"
    stack.upstream.tool_calls = [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    messages: list[Any] = list(USER)
    with stack.sdk.chat.completions.stream(
        model="fake-model",
        messages=messages,
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        message = stream.get_final_completion().choices[0].message
    messages.append(message)
    for call in message.tool_calls or []:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny."})
    stack.upstream.tool_calls, stack.upstream.finish_reason = None, "stop"
    stack.upstream.reply = "Sunny in both."
    second = stack.sdk.chat.completions.create(
        model="fake-model",
        messages=messages,
        tools=[tool],  # type: ignore[list-item]
    )
    assert second.choices[0].message.content == "Sunny in both."
    assert stack.upstream.requests[1]["messages"][1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
            }
            for i, city in ((1, "Paris"), (2, "Lyon"))
        ],
    }


def test_sdk_completions_and_models(stack: Stack) -> None:
    r = stack.sdk.completions.create(model="fake-model", prompt="Say hi")
    assert r.choices[0].text == stack.upstream.reply
    assert [m.id for m in stack.sdk.models.list()] == ["fake-model"]


def test_metrics_endpoint_serves_the_exposition(stack: Stack) -> None:
    stack.sdk.chat.completions.create(model="fake-model", messages=USER)  # type: ignore[arg-type]
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'guardrail_requests_total{outcome="allowed",route="chat"}' in text
    assert "guardrail_backend_duration_seconds_bucket" in text
    assert "capital of France" not in text
