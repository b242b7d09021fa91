"""The remote backend against a fake OpenAI-compatible upstream (in-process and over TCP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from guardrail.backends.base import Backend, Chunk, GenerationRequest, SamplingParams
from guardrail.backends.breaker import CircuitState
from guardrail.backends.remote import (
    SPEC,
    TOOL_CALL_CHARS_PER_TOKEN,
    RemoteBackend,
    from_settings,
)
from guardrail.chat import Message, ToolCall
from guardrail.errors import (
    BackendBadResponse,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from guardrail.settings import Settings
from tests.fakes.upstream import (
    REFUSAL,
    UPSTREAM_ERROR,
    FakeUpstream,
    fake_client,
    refused_url,
    serve_upstream,
)

REPLY = "The capital of France is Paris."


class SleepRecorder:
    """Stands in for asyncio.sleep: records the backoff delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def chat_request(**params: Any) -> GenerationRequest:
    return GenerationRequest(
        model="fake-model",
        request_id="req-42",
        messages=(Message("system", "Be brief."), Message("user", "Capital of France?")),
        params=SamplingParams(**params),
    )


def prompt_request() -> GenerationRequest:
    return GenerationRequest(model="fake-model", request_id="req-43", prompt="Once upon a time")


@pytest.fixture
def up_a() -> FakeUpstream:
    return FakeUpstream(reply=REPLY, host="a.test")


@pytest.fixture
def up_b() -> FakeUpstream:
    return FakeUpstream(reply="Answer from b.", host="b.test")


@pytest.fixture
async def client(up_a: FakeUpstream, up_b: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with fake_client(up_a, up_b) as c:
        yield c


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


def backend(
    client: httpx.AsyncClient, *urls: str, sleeps: SleepRecorder | None = None, **kwargs: Any
) -> RemoteBackend:
    return RemoteBackend(list(urls), client, sleep=sleeps or SleepRecorder(), **kwargs)


async def collect(
    stream: AsyncIterator[Chunk], into: list[Chunk] | None = None, limit_s: float = 5.0
) -> list[Chunk]:
    """Every chunk of a stream (also appended to ``into``), failing the test instead of hanging."""
    chunks: list[Chunk] = [] if into is None else into
    async with asyncio.timeout(limit_s):
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


# --- non-streaming ---------------------------------------------------------------------


def test_remote_backend_satisfies_the_backend_protocol(client: httpx.AsyncClient) -> None:
    assert isinstance(RemoteBackend(["http://a.test/v1"], client), Backend)
    assert RemoteBackend.name == "remote"


@pytest.mark.parametrize(
    ("request_", "path_key", "reply"),
    [
        (chat_request(), "messages", REPLY),
        (prompt_request(), "prompt", REPLY),
    ],
    ids=["chat", "completions"],
)
async def test_generate_returns_text_finish_reason_and_usage(
    client: httpx.AsyncClient,
    up_a: FakeUpstream,
    request_: GenerationRequest,
    path_key: str,
    reply: str,
) -> None:
    completion = await backend(client, up_a.base_url).generate(request_)

    assert completion.text == reply
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == len(up_a.pieces())
    assert completion.prompt_tokens is not None
    assert completion.prompt_tokens > 0
    assert path_key in up_a.requests[0]


async def test_generate_sends_model_messages_sampling_params_and_bearer_token(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    request = chat_request(
        max_tokens=32,
        temperature=0.0,
        top_p=0.9,
        stop=("\n\n", "END"),
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        extra={"top_k": 40, "stream": True, "model": "sneaky"},
    )

    await backend(client, up_a.base_url + "/", api_key="sk-test").generate(request)

    assert up_a.requests == [
        {
            "model": "fake-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "stream": False,
            "max_tokens": 32,
            "temperature": 0.0,
            "top_p": 0.9,
            "stop": ["\n\n", "END"],
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "top_k": 40,
        }
    ]
    assert up_a.headers[0]["authorization"] == "Bearer sk-test"
    assert up_a.headers[0]["x-request-id"] == "req-42"


async def test_generate_omits_unset_params_and_sends_no_auth_without_a_key(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    await backend(client, up_a.base_url).generate(prompt_request())

    assert up_a.requests == [{"model": "fake-model", "prompt": "Once upon a time", "stream": False}]
    assert "authorization" not in up_a.headers[0]


async def test_when_upstream_fails_with_500_then_retries_with_backoff_until_it_answers(
    client: httpx.AsyncClient, up_a: FakeUpstream, sleeps: SleepRecorder
) -> None:
    up_a.mode, up_a.times = "500", 2

    completion = await backend(client, up_a.base_url, sleeps=sleeps, backoff_s=0.2).generate(
        chat_request()
    )

    assert completion.text == REPLY
    assert len(up_a.requests) == 3
    assert sleeps.delays == [0.2, 0.4]


async def test_a_failed_attempt_logs_the_status_the_upstream_answered(
    client: httpx.AsyncClient, up_a: FakeUpstream, sleeps: SleepRecorder
) -> None:
    up_a.mode, up_a.times = "500", 1
    with capture_logs() as logs:
        await backend(client, up_a.base_url, sleeps=sleeps).generate(chat_request())
    (failed,) = [e for e in logs if e["event"] == "backend_attempt_failed"]
    assert (failed["upstream_status"], failed["status"]) == (500, 502)


async def test_when_first_url_keeps_failing_with_500_then_second_url_answers(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream, sleeps: SleepRecorder
) -> None:
    up_a.mode = "500"

    completion = await backend(
        client, up_a.base_url, up_b.base_url, sleeps=sleeps, retries=1
    ).generate(chat_request())

    assert completion.text == "Answer from b."
    assert (len(up_a.requests), len(up_b.requests)) == (2, 1)


async def test_when_first_url_refuses_connection_then_second_url_answers(
    client: httpx.AsyncClient, up_a: FakeUpstream, sleeps: SleepRecorder
) -> None:
    completion = await backend(client, refused_url(), up_a.base_url, sleeps=sleeps).generate(
        chat_request()
    )

    assert completion.text == REPLY
    assert len(sleeps.delays) == 2  # the refused URL was retried before failing over


@pytest.mark.parametrize(
    ("modes", "error_type"),
    [
        (("refused", "refused"), BackendUnavailable),  # 503
        (("500", "500"), BackendBadResponse),  # 502
        (("refused", "500"), BackendBadResponse),
        (("slow", "slow"), BackendTimeout),  # 504
        (("500", "slow"), BackendTimeout),
        (("slow", "refused"), BackendTimeout),
    ],
)
async def test_when_every_url_fails_then_the_error_says_why(
    client: httpx.AsyncClient,
    up_a: FakeUpstream,
    up_b: FakeUpstream,
    modes: tuple[str, str],
    error_type: type[BackendError],
) -> None:
    urls = []
    for fake, mode in zip((up_a, up_b), modes, strict=True):
        if mode == "refused":
            urls.append(refused_url())
        else:
            fake.mode = mode  # type: ignore[assignment]
            urls.append(fake.base_url)

    with pytest.raises(error_type) as caught:
        await backend(client, *urls, timeout_s=0.05).generate(chat_request())

    assert type(caught.value) is error_type
    assert caught.value.status == {BackendUnavailable: 503, BackendBadResponse: 502}.get(
        error_type, 504
    )


async def test_when_upstream_is_too_slow_then_504_without_retrying_that_url(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream, sleeps: SleepRecorder
) -> None:
    up_a.mode = "slow"

    completion = await backend(
        client, up_a.base_url, up_b.base_url, sleeps=sleeps, timeout_s=0.5
    ).generate(chat_request())

    assert completion.text == "Answer from b."
    assert len(up_a.requests) == 1
    assert sleeps.delays == []


@pytest.mark.parametrize(
    ("upstream_status", "expected", "upstream_message"),
    [
        (400, (400, "backend rejected the request (HTTP 400)"), REFUSAL),
        (413, (400, "backend rejected the request (HTTP 413)"), REFUSAL),
        (422, (400, "backend rejected the request (HTTP 422)"), REFUSAL),
        (401, (502, "HTTP 401"), None),  # some servers quote part of the key they refused
        (403, (502, "HTTP 403"), None),
        (404, (502, "HTTP 404"), REFUSAL),
        (418, (502, "HTTP 418"), REFUSAL),
    ],
)
async def test_upstream_4xx_is_answered_at_once_with_a_mapped_status(
    client: httpx.AsyncClient,
    up_a: FakeUpstream,
    up_b: FakeUpstream,
    upstream_status: int,
    expected: tuple[int, str],
    upstream_message: str | None,
) -> None:
    up_a.mode, up_a.status = "http_error", upstream_status
    status, message = expected

    with pytest.raises(BackendBadResponse) as caught:
        await backend(client, up_a.base_url, up_b.base_url).generate(chat_request())

    assert caught.value.status == status
    assert message in str(caught.value)
    # The upstream's words travel apart, for the gateway to moderate before showing them.
    assert REFUSAL not in str(caught.value)
    assert caught.value.upstream_message == upstream_message
    assert (len(up_a.requests), len(up_b.requests)) == (1, 0)


async def test_refuse_400_mode_keeps_the_upstream_message_apart(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    up_a.mode = "refuse_400"

    with pytest.raises(BackendBadResponse) as caught:
        await backend(client, up_a.base_url).generate(chat_request())

    assert caught.value.status == 400
    assert str(caught.value) == "backend rejected the request (HTTP 400)"
    assert caught.value.upstream_message == REFUSAL


@pytest.mark.parametrize(
    ("error", "code", "param"),
    [
        # OpenAI's answer to a prompt over the context: a client trims its history on it.
        (
            {"code": "context_length_exceeded", "param": "messages"},
            "context_length_exceeded",
            "messages",
        ),
        ({"code": "context_length_exceeded", "param": "x" * 50}, "context_length_exceeded", None),
        ({"code": "invalid_value", "param": "messages"}, "backend_bad_response", None),
        ({"code": 400, "param": None}, "backend_bad_response", None),  # vLLM's, not context
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_context_length_exceeded_keeps_its_code(
    error: dict[str, Any], code: str, param: str | None, stream: bool
) -> None:
    """It became ``backend_bad_response``, which no client acts on; other upstream codes
    (and params) stay the gateway's own."""
    body = json.dumps({"error": {"message": REFUSAL, "type": "invalid", **error}}).encode()

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=body)

    async def ask(remote: RemoteBackend) -> object:
        if stream:
            return await collect(remote.stream(chat_request()))
        return await remote.generate(chat_request())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendBadResponse) as caught:
            await ask(backend(client, "http://up.test/v1"))

    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)
    assert caught.value.upstream_message == REFUSAL


VLLM_CONTEXT = (
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
    "(4000 in the messages, 1000 in the completion). Please reduce the length of the "
    "messages or completion."
)
VLLM_MAX_TOKENS = (
    "'max_tokens' or 'max_completion_tokens' is too large: 1000. This model's maximum "
    "context length is 4096 tokens and your request has 4000 input tokens (1000 > 4096 - "
    "4000)."
)
VLLM_V1_PROMPT = (
    "The decoder prompt (length 5000) is longer than the maximum model length of 4096. "
    "Make sure that `max_model_len` is no smaller than the number of text tokens."
)


def vllm_error(message: str, *, nested: bool) -> bytes:
    """vLLM's error body: at the top level (older servers) or nested as OpenAI's."""
    error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    return json.dumps({"error": error} if nested else {"object": "error", **error}).encode()


async def refusal(body: bytes, status: int = 400, *, stream: bool = False) -> BackendError:
    """The error a remote backend raises when its upstream answers ``status`` with ``body``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body)

    async def ask(remote: RemoteBackend) -> object:
        if stream:
            return await collect(remote.stream(chat_request()))
        return await remote.generate(chat_request())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendError) as caught:
            await ask(backend(client, "http://up.test/v1"))
    return caught.value


@pytest.mark.parametrize(
    "body",
    [
        vllm_error(VLLM_CONTEXT, nested=False),
        vllm_error(VLLM_CONTEXT, nested=True),
        vllm_error(VLLM_MAX_TOKENS, nested=True),
        vllm_error(VLLM_V1_PROMPT, nested=False),
        # Lists where the code and param should be: unhashable, they were a TypeError.
        json.dumps({"error": {"message": VLLM_CONTEXT, "code": [400], "param": [1]}}).encode(),
    ],
    ids=["top-level", "nested", "max-tokens", "v1-prompt", "lists"],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_vllms_context_length_error_gets_openais_code(body: bytes, stream: bool) -> None:
    """vLLM sends no such code (its code is the HTTP status): the client got
    ``backend_bad_response``, which no SDK trims a conversation on, where the local
    engine answers ``context_length_exceeded``. The message is the gateway's own words
    and vLLM's number; vLLM's text stays apart, to be moderated before it is shown."""
    error = await refusal(body, stream=stream)
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", None)
    assert str(error) == (
        "backend rejected the request (HTTP 400) as longer than the model's context of 4096 tokens"
    )
    assert error.upstream_message is not None
    assert "4096" in error.upstream_message


class ContextOf100:
    """A vLLM with a context of 100 tokens asked a 90-token prompt: it refuses a limit
    the prompt leaves no room for, and with none writes until the context is full."""

    def __init__(self) -> None:
        self.limits: list[object] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        self.limits.append(limit)
        if limit is not None and 90 + limit > 100:
            message = (
                "This model's maximum context length is 100 tokens. However, you requested "
                f"{90 + limit} tokens (90 in the messages, {limit} in the completion)."
            )
            return httpx.Response(400, content=vllm_error(message, nested=False))
        if body["stream"]:
            return httpx.Response(
                200, content=_sse(*REPLY_FRAMES), headers={"content-type": "text/event-stream"}
            )
        answer = {"choices": [{"index": 0, "message": {"content": "Hello there. More."}}]}
        return httpx.Response(200, json={**answer, "finish_reason": "stop"})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_default_limit_the_prompt_leaves_no_room_for_is_dropped_not_refused(
    stream: bool, field: str
) -> None:
    """The client set no limit: the upstream answers as it would asked directly."""
    upstream = ContextOf100()
    request = chat_request(max_tokens=512, max_tokens_is_default=True, max_tokens_field=field)
    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        remote = backend(client, "http://up.test/v1")
        if stream:
            text = "".join(c.text for c in await collect(remote.stream(request)))
        else:
            text = (await remote.generate(request)).text
    assert text == "Hello there. More."
    assert upstream.limits == [512, None]


async def test_once_the_default_limit_is_refused_no_later_attempt_sends_it() -> None:
    """The body without the default limit meets a failing upstream (500): each retry and
    each URL gets that body, not the refused one first (12 requests for 6 attempts)."""
    limits: list[object] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        limits.append(body.get("max_tokens"))
        if body.get("max_tokens") is not None:
            message = "This model's maximum context length is 100 tokens. However, ..."
            return httpx.Response(400, content=vllm_error(message, nested=False))
        return httpx.Response(500, text="down")

    request = chat_request(max_tokens=512, max_tokens_is_default=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://a.test/v1", "http://b.test/v1", retries=2)
        with pytest.raises(BackendError):
            await remote.generate(request)
    assert limits == [512] + [None] * 6


@pytest.mark.parametrize("stream", [False, True])
async def test_a_limit_the_client_set_that_does_not_fit_is_refused(stream: bool) -> None:
    upstream = ContextOf100()
    request = chat_request(max_tokens=512)

    async def ask(remote: RemoteBackend) -> object:
        if stream:
            return await collect(remote.stream(request))
        return await remote.generate(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        with pytest.raises(BackendError) as caught:
            await ask(backend(client, "http://up.test/v1"))
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")
    assert upstream.limits == [512]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        # Another status keeps its mapping, whatever the message says.
        (vllm_error(VLLM_CONTEXT, nested=True), 404, "backend_bad_response"),
        (vllm_error(VLLM_CONTEXT, nested=False), 429, "backend_bad_response"),
        # An upstream's own code is believed over its message.
        (
            json.dumps({"error": {"message": VLLM_CONTEXT, "code": "invalid_value"}}).encode(),
            400,
            "backend_bad_response",
        ),
        # vLLM's other refusals.
        (vllm_error(REFUSAL, nested=False), 400, "backend_bad_response"),
    ],
)
async def test_other_upstream_refusals_keep_their_mapping(
    body: bytes, status: int, code: str
) -> None:
    error = await refusal(body, status)
    assert (error.code, error.param) == (code, None)
    assert "context" not in str(error)


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "' + b"x" * 1000 + b'"}}',
        b"x" * 1000,
        b'{"detail": "' + b"y" * 1000 + b'"}',
    ],
    ids=["openai", "plain", "fastapi"],
)
async def test_a_long_upstream_error_message_is_cut_to_300_characters(body: bytes) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, content=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendBadResponse) as caught:
            await backend(client, "http://up.test/v1").generate(chat_request())

    message = caught.value.upstream_message
    assert message is not None
    assert len(message) == 300


@pytest.mark.parametrize(
    "garbage",
    [
        b"<html>502 Bad Gateway</html>",
        b"",
        b"[1, 2, 3]",
        b"{}",
        b'{"choices": []}',
        b'{"choices": "many"}',
        b'{"choices": [{"index": 0}]}',
        b'{"choices": [{"message": {"content": 5}}]}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "n"}}',
    ],
)
async def test_when_upstream_answers_garbage_then_502_without_retry(
    client: httpx.AsyncClient, up_a: FakeUpstream, garbage: bytes
) -> None:
    up_a.mode, up_a.garbage = "garbage", garbage

    with pytest.raises(BackendBadResponse) as caught:
        await backend(client, up_a.base_url).generate(chat_request())

    assert caught.value.status == 502
    assert len(up_a.requests) == 1


@pytest.mark.parametrize("mode", ["garbage", "error_frame"])
async def test_a_200_that_is_not_a_completion_fails_over_to_the_next_url(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream, mode: str
) -> None:
    # As a stream that has sent nothing does: a broken replica must not fail every call
    # until its circuit opens while the next one answers.
    up_a.mode = mode  # type: ignore[assignment]
    remote = backend(client, up_a.base_url, up_b.base_url)

    completion = await remote.generate(chat_request())

    assert completion.text == "Answer from b."
    assert (len(up_a.requests), len(up_b.requests)) == (1, 1)  # no retry of a


async def test_when_upstream_answers_an_error_object_then_502_naming_it(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    up_a.mode = "error_frame"

    with pytest.raises(BackendBadResponse, match="backend reported an error") as caught:
        await backend(client, up_a.base_url).generate(chat_request())

    assert caught.value.status == 502
    assert caught.value.upstream_message == UPSTREAM_ERROR


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("tool_calls", "tool_calls"),
        ("eos", "stop"),
    ],
)
async def test_finish_reasons_are_mapped_to_the_gateways_four(
    client: httpx.AsyncClient, up_a: FakeUpstream, upstream: str, expected: str
) -> None:
    up_a.finish_reason = upstream
    b = backend(client, up_a.base_url)

    completion = await b.generate(chat_request())
    chunks = await collect(b.stream(chat_request()))

    assert completion.finish_reason == expected
    assert chunks[-1].finish_reason == expected


@pytest.mark.parametrize("upstream", ["abort", "error"])
async def test_a_finish_reason_of_abort_or_error_is_a_backend_failure(
    client: httpx.AsyncClient, up_a: FakeUpstream, upstream: str
) -> None:
    """vLLM ends an aborted request this way, its text cut short: read as "stop", the
    client, the audit and self-consistency took it for a whole answer."""
    up_a.finish_reason = upstream
    b = backend(client, up_a.base_url)
    received: list[Chunk] = []

    with pytest.raises(BackendBadResponse) as whole:
        await b.generate(chat_request())
    with pytest.raises(BackendBadResponse) as streamed:
        await collect(b.stream(chat_request()), received)

    assert (whole.value.status, streamed.value.status) == (502, 502)
    assert received  # the text before the finish went out: the stream ends in an error
    assert all(c.finish_reason is None for c in received)


async def test_an_upstream_refusal_is_read_as_the_answer_text_and_marked_a_refusal(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    """OpenAI declines a structured-output request with content null and its text in
    ``refusal``: read as content alone, that was an empty, successful answer."""
    up_a.refusal = True
    b = backend(client, up_a.base_url)

    completion = await b.generate(chat_request())
    chunks = await collect(b.stream(chat_request()))

    assert (completion.text, completion.refusal) == (REPLY, True)
    assert "".join(c.text for c in chunks) == REPLY
    assert all(c.refusal for c in chunks if c.text)


# --- streaming -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_", [chat_request(), prompt_request()], ids=["chat", "completions"]
)
async def test_stream_yields_the_reply_and_ends_with_finish_reason_and_usage(
    client: httpx.AsyncClient, up_a: FakeUpstream, request_: GenerationRequest
) -> None:
    chunks = await collect(backend(client, up_a.base_url).stream(request_))

    assert "".join(c.text for c in chunks) == REPLY
    assert len(chunks) > 2
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.completion_tokens == len(up_a.pieces())
    assert last.prompt_tokens is not None


async def test_the_upstream_gets_the_token_limit_by_the_name_the_client_used_and_tool_ids(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    request = GenerationRequest(
        model="fake-model",
        request_id="req-44",
        messages=(Message("user", "Weather?"), Message("tool", "sunny", "call_1")),
        params=SamplingParams(max_tokens=5, max_tokens_field="max_completion_tokens"),
    )
    await backend(client, up_a.base_url).generate(request)
    sent = up_a.requests[0]
    # OpenAI's newer models refuse max_tokens; the client chose the name.
    assert sent["max_completion_tokens"] == 5
    assert "max_tokens" not in sent
    assert sent["messages"] == [
        {"role": "user", "content": "Weather?"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]


async def test_stream_asks_for_usage_in_the_stream(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    await collect(backend(client, up_a.base_url).stream(chat_request(max_tokens=5)))

    sent = up_a.requests[0]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 5
    assert up_a.headers[0]["accept"] == "text/event-stream"


@pytest.mark.parametrize("first", ["500", "refused", "slow"])
async def test_stream_fails_over_when_first_url_fails_before_the_first_chunk(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream, first: str
) -> None:
    if first == "refused":
        first_url = refused_url()
    else:
        up_a.mode = first  # type: ignore[assignment]
        first_url = up_a.base_url

    chunks = await collect(
        backend(client, first_url, up_b.base_url, timeout_s=0.5).stream(chat_request())
    )

    assert "".join(c.text for c in chunks) == "Answer from b."
    assert len(up_b.requests) == 1


@pytest.mark.parametrize(
    ("mode", "error_type"),
    [("500", BackendBadResponse), ("slow", BackendTimeout)],
)
async def test_stream_raises_when_every_url_fails_before_the_first_chunk(
    client: httpx.AsyncClient, up_a: FakeUpstream, mode: str, error_type: type[BackendError]
) -> None:
    up_a.mode = mode  # type: ignore[assignment]

    with pytest.raises(error_type):
        await collect(backend(client, up_a.base_url, timeout_s=0.05).stream(chat_request()))

    assert len(up_a.requests) == 1  # streams are not retried on the same URL


async def test_when_stream_ends_early_then_error_after_the_chunks_and_no_failover(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream
) -> None:
    up_a.mode = "die_mid_stream"
    received: list[Chunk] = []

    stream = backend(client, up_a.base_url, up_b.base_url).stream(chat_request())

    with pytest.raises(BackendBadResponse, match="ended before"):
        await collect(stream, into=received)

    assert received
    assert REPLY.startswith("".join(c.text for c in received))
    assert up_b.requests == []


@pytest.mark.parametrize(
    ("mode", "error_type", "match"),
    [
        ("error_frame", BackendBadResponse, "backend reported an error mid-stream"),
        ("garbage", BackendBadResponse, "not valid"),
    ],
)
async def test_stream_error_frames_and_broken_frames_raise(
    client: httpx.AsyncClient,
    up_a: FakeUpstream,
    mode: str,
    error_type: type[BackendError],
    match: str,
) -> None:
    up_a.mode = mode  # type: ignore[assignment]

    with pytest.raises(error_type, match=match):
        await collect(backend(client, up_a.base_url).stream(chat_request()))


async def test_an_error_event_after_a_frame_without_a_blank_line_is_its_own() -> None:
    """With no blank line between them, ``event: error`` after a whole frame was taken
    as that frame's type: the error raised quoting the text frame, not the failure."""
    body = (
        f"data: {REPLY_FRAMES[0]}\n"
        'event: error\ndata: {"message": "llama_decode failed"}\n\n'
        "data: [DONE]\n\n"
    ).encode()

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    received: list[Chunk] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendBadResponse) as caught:
            await collect(backend(client, "http://up.test/v1").stream(chat_request()), received)
    assert caught.value.upstream_message == "llama_decode failed"
    assert "".join(c.text for c in received) == "Hello there. "


@pytest.mark.parametrize("after_text", [False, True], ids=["before-text", "after-text"])
@pytest.mark.parametrize(
    "error",
    [
        # Older llama.cpp servers: the failure as its own field, then [DONE].
        b'error: {"code": 500, "message": "llama_decode failed", "type": "server_error"}\n\n',
        # The error object itself as the event's data (no "error" key to read it by).
        b'event: error\ndata: {"message": "llama_decode failed", "type": "server_error"}\n\n',
    ],
    ids=["error-field", "error-event"],
)
async def test_an_error_reported_outside_a_data_frame_raises_as_an_error_frame(
    error: bytes, after_text: bool
) -> None:
    """Skipped as unknown SSE fields, they were followed by ``[DONE]``: a cut (or empty)
    answer passed for a finished one."""
    text = _sse(REPLY_FRAMES[0]) if after_text else b""
    body = text + error + _sse("[DONE]")

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    received: list[Chunk] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendBadResponse) as caught:
            await collect(backend(client, "http://up.test/v1").stream(chat_request()), received)

    assert caught.value.status == 502
    assert caught.value.upstream_message == "llama_decode failed"
    assert "".join(c.text for c in received) == ("Hello there. " if after_text else "")


async def test_a_stream_without_blank_lines_releases_each_frame_as_it_comes() -> None:
    """A server that writes one ``data:`` line per frame and no blank line between them:
    each frame is read once the next line shows it whole, not held until the stream
    ends (its text held back, the stall clock never restarted). The upstream here writes
    its second frame only after the gateway has passed the first one on."""
    first_out = asyncio.Event()

    async def lines() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n'
        yield b'data: {"choices": [{"index": 0, "delta": {"content": " there"}}]}\n'
        await first_out.wait()
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n'
        yield b"data: [DONE]\n\n"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=lines(), headers={"content-type": "text/event-stream"})

    texts = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        async with asyncio.timeout(5):
            async for chunk in backend(client, "http://up.test/v1").stream(chat_request()):
                texts.append(chunk.text)
                first_out.set()
    assert "".join(texts) == "Hi there"


@pytest.mark.parametrize(
    "body",
    [
        # CRLF line ends, comments, event/id fields, a role-only delta, usage frame, no space.
        b": hello\r\n\r\nevent: message\r\nid: 1\r\n"
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\r\n\r\n'
        b'data:{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\r\n\r\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]}'
        b"\r\n\r\n"
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n",
        # No [DONE] after the finish (some servers), no usage frame.
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]}'
        b"\n\n",
        # [DONE] without any finish_reason.
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi!"}}]}\n\ndata: [DONE]\n\n',
        # One frame's JSON over several data: lines (joined with a line break, per SSE).
        b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "Hi"}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "!"},\r\n'
        b'data: "finish_reason": "stop"}]}\r\n\r\ndata: [DONE]',
        # No blank line between events: each data line is a whole frame of its own.
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n'
        b'data: {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]}\n'
        b"data: [DONE]\n\n",
    ],
    ids=["crlf-and-comments", "no-done", "no-finish-reason", "multi-line-data", "no-blank-lines"],
)
async def test_stream_parses_the_sse_variants_servers_send(body: bytes) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        chunks = await collect(backend(client, "http://up.test/v1").stream(chat_request()))

    assert "".join(c.text for c in chunks) == "Hi!"
    assert chunks[-1].finish_reason in ("length", "stop")
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stream_lines_end_only_at_cr_lf_or_crlf_however_the_bytes_arrive() -> None:
    """JSON strings may hold U+2028, U+2029, U+0085 or U+001C raw; they are not line ends.

    The body also arrives in awkward reads: a CRLF cut between CR and LF, a UTF-8
    character cut in the middle.
    """
    texts = ["one\u2028two", "\u2029three\u0085", "four\x1cfive ", "Ünïcode"]
    frames = [
        json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}, ensure_ascii=False)
        for t in texts
    ]
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    body = (
        "".join(f"data: {f}\r\n\r\n" for f in frames)
        + f"data: {json.dumps(finish)}\r\r"
        + "data: [DONE]\n\n"
    ).encode()
    cuts = sorted({body.index(b"\r\n") + 1, body.index("Ü".encode()) + 1, 7, len(body) - 3})

    async def pieces() -> AsyncIterator[bytes]:
        start = 0
        for cut in [*cuts, len(body)]:
            yield body[start:cut]
            start = cut

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=pieces(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        chunks = await collect(backend(client, "http://up.test/v1").stream(chat_request()))

    assert "".join(c.text for c in chunks) == "".join(texts)
    assert chunks[-1].finish_reason == "stop"


async def test_stream_lines_are_the_same_however_the_text_is_cut() -> None:
    """Every way of reading the body in equal pieces gives the lines it holds, with
    CR, LF and CRLF ends, a CRLF cut in two, and a long line across many reads (held
    as pieces and joined once, so a 1 MB frame costs linear time, not quadratic)."""
    from guardrail.backends.remote import _sse_lines

    long = "data: " + "x" * 5000
    body = f"data: a\r\n\r\ndata: b\rdata: c\n\n{long}\r\n\r\n: note\rtail"
    expected = ["data: a", "", "data: b", "data: c", "", long, "", ": note", "tail"]

    async def read(size: int) -> list[str]:
        async def pieces() -> AsyncIterator[str]:
            for i in range(0, len(body), size):
                yield body[i : i + size]

        return [line async for line in _sse_lines(pieces())]

    for size in (*range(1, 40), 97, 4096, len(body)):
        assert await read(size) == expected, size


class ClosingWatch(httpx.AsyncBaseTransport):
    """Wraps a transport and counts response bodies opened and closed."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.opened = 0
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.opened += 1
        watch = self

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for part in response.stream:  # type: ignore[union-attr]
                    yield part

            async def aclose(self) -> None:
                watch.closed += 1
                await response.aclose()

        return httpx.Response(response.status_code, headers=response.headers, stream=Body())

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_when_the_consumer_stops_early_then_the_upstream_response_is_closed(
    up_a: FakeUpstream,
) -> None:
    watch = ClosingWatch(httpx.ASGITransport(app=up_a.app))
    async with httpx.AsyncClient(transport=watch) as client:
        stream = backend(client, up_a.base_url).stream(chat_request())
        assert isinstance(stream, AsyncIterator)
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]

    assert first.text
    assert (watch.opened, watch.closed) == (1, 1)


# --- over a real socket ----------------------------------------------------------------


async def test_over_tcp_generate_and_stream_work() -> None:
    fake = FakeUpstream(reply=REPLY)
    with serve_upstream(fake) as url:
        async with httpx.AsyncClient() as client:
            b = backend(client, url)
            completion = await b.generate(chat_request())
            chunks = await collect(b.stream(chat_request()))

    assert completion.text == REPLY
    assert "".join(c.text for c in chunks) == REPLY
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("mode", "error_type", "match"),
    [
        ("die_mid_stream", BackendBadResponse, "broke mid-stream"),
        ("stall_mid_stream", BackendTimeout, "stalled"),
    ],
)
async def test_over_tcp_death_or_stall_after_the_first_chunk_raises_instead_of_hanging(
    mode: str, error_type: type[BackendError], match: str
) -> None:
    fake = FakeUpstream(reply=REPLY, mode=mode, delay_s=10)  # type: ignore[arg-type]
    spare = FakeUpstream(reply="spare", host="spare.test")
    received: list[Chunk] = []
    with serve_upstream(fake) as url:
        async with fake_client(spare) as client:
            # Generous: the first chunk must come within it even on a loaded CI machine
            # (0.3 s once timed out there and failed over to the spare).
            b = backend(client, url, spare.base_url, timeout_s=1.5)
            with pytest.raises(error_type, match=match):
                await collect(b.stream(chat_request()), into=received)

    assert received
    assert spare.requests == []


async def test_over_tcp_a_dropped_connection_is_retried_for_generate() -> None:
    fake = FakeUpstream(reply=REPLY, mode="die_mid_stream", times=1)
    with serve_upstream(fake) as url:
        async with httpx.AsyncClient() as client:
            completion = await backend(client, url).generate(chat_request())

    assert completion.text == REPLY
    assert len(fake.requests) == 2


# --- models, health, settings ----------------------------------------------------------


async def test_models_lists_ids_from_the_first_url_that_answers(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream
) -> None:
    up_a.mode = "500"
    up_b.model_ids = ["llama-2-7b-chat", "llama-2-13b-chat"]

    models = await backend(client, refused_url(), up_a.base_url, up_b.base_url).models()

    assert models == ["llama-2-7b-chat", "llama-2-13b-chat"]
    assert (up_a.models_calls, up_b.models_calls) == (1, 1)


async def test_models_raises_when_no_url_lists_models(client: httpx.AsyncClient) -> None:
    with pytest.raises(BackendUnavailable):
        await backend(client, refused_url()).models()


@pytest.mark.parametrize(
    ("mode", "healthy"),
    [("ok", True), ("500", False), ("garbage", True), ("slow", False), ("refused", False)],
)
async def test_health_is_true_when_a_url_answers_models_with_200(
    client: httpx.AsyncClient, up_a: FakeUpstream, mode: str, healthy: bool
) -> None:
    if mode == "refused":
        url = refused_url()
    else:
        up_a.mode = mode  # type: ignore[assignment]
        url = up_a.base_url

    assert await backend(client, url, probe_timeout_s=0.05).health() is healthy


async def test_health_is_true_when_only_a_later_url_answers(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    assert await backend(client, refused_url(), up_a.base_url).health() is True


@pytest.mark.parametrize(
    "urls",
    [[], ["ftp://x/v1"], ["not a url"], ["http:///v1"]],
)
def test_bad_backend_urls_are_a_config_error(urls: list[str]) -> None:
    with pytest.raises(ConfigError):
        from_settings(Settings(backend="remote", backend_urls=urls))


async def test_from_settings_builds_a_backend_that_owns_and_closes_its_client(
    up_a: FakeUpstream,
) -> None:
    settings = Settings(
        backend="remote",
        backend_urls=["http://a.test/v1/"],
        backend_api_key="sk-x",
        backend_timeout_s=30,
        backend_connect_timeout_s=2,
    )

    built = SPEC.build(settings)
    assert isinstance(built, RemoteBackend)
    assert SPEC.type == "remote"
    assert built.urls == ("http://a.test/v1",)
    client = built._client
    assert client.timeout == httpx.Timeout(30, connect=2)
    await built.aclose()

    assert client.is_closed


async def test_the_built_client_keeps_no_cookies_between_requests() -> None:
    """One client serves every tenant: a cookie an upstream sets on one tenant's call must
    not ride along on the next (httpx clients keep cookies by default)."""
    fake = FakeUpstream(reply=REPLY, set_cookie="session=tenant-a; Path=/")
    with serve_upstream(fake) as url:
        backend = from_settings(Settings(backend="remote", backend_urls=[url]))
        try:
            await backend.generate(chat_request())
            await backend.generate(chat_request())
            async for _ in backend.stream(chat_request()):
                pass
        finally:
            await backend.aclose()

    assert len(fake.headers) == 3
    assert [h.get("cookie") for h in fake.headers] == [None, None, None]


async def test_aclose_leaves_a_callers_client_open(client: httpx.AsyncClient) -> None:
    await RemoteBackend(["http://a.test/v1"], client).aclose()

    assert not client.is_closed


async def test_the_fake_upstream_speaks_the_wire_format_the_openai_sdk_reads() -> None:
    """Gateway tests trust the fake; the official client is the judge of its format."""
    openai = pytest.importorskip("openai")
    fake = FakeUpstream(reply=REPLY, model_ids=["m1", "m2"])
    messages = [{"role": "user", "content": "hi"}]
    with serve_upstream(fake) as url:
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as sdk:
            whole = await sdk.chat.completions.create(model="m1", messages=messages)
            stream = await sdk.chat.completions.create(
                model="m1", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            parts = [chunk async for chunk in stream]
            text = await sdk.completions.create(model="m1", prompt="Once upon")
            models = await sdk.models.list()

    assert whole.choices[0].message.content == REPLY
    assert whole.usage.completion_tokens == len(fake.pieces())
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == REPLY
    assert parts[-1].usage.prompt_tokens == 1
    assert text.choices[0].text == REPLY
    assert [m.id for m in models.data] == ["m1", "m2"]
    assert fake.headers[0]["authorization"] == "Bearer sk-test"


# -- from a bug hunt: half-open trials, keepalives, 4xx in streams, failover, Retry-After --


class Tick:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sse(*frames: str) -> bytes:
    return "".join(f"data: {f}\n\n" for f in frames).encode()


REPLY_FRAMES = (
    json.dumps({"choices": [{"index": 0, "delta": {"content": "Hello there. "}}]}),
    json.dumps({"choices": [{"index": 0, "delta": {"content": "More."}, "finish_reason": "stop"}]}),
    "[DONE]",
)


@pytest.mark.parametrize("ending", ["stream-abandoned", "unexpected-error"])
async def test_a_half_open_trial_that_reaches_no_verdict_gives_its_place_back(
    ending: str,
) -> None:
    # A stream closed early (the policy cut it), or a call that raised anything but a
    # backend error or a cancel, held the trial: every later call got 503 for good.
    calls = {"n": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if calls["n"] == 2 and ending == "unexpected-error":
            raise RuntimeError("a transport bug")
        return httpx.Response(
            200, content=_sse(*REPLY_FRAMES), headers={"content-type": "text/event-stream"}
        )

    clock = Tick()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(
            client, "http://up.test/v1", breaker_failures=1, breaker_reset_s=1.0, clock=clock
        )
        with pytest.raises(BackendError):
            await remote.generate(chat_request())
        assert remote.breakers["http://up.test/v1"].state is CircuitState.OPEN
        clock.now += 1.5  # half-open: one trial
        if ending == "stream-abandoned":
            stream = remote.stream(chat_request())
            await anext(stream)
            await stream.aclose()  # the caller leaves before the end: no verdict
        else:
            with pytest.raises(RuntimeError):
                await remote.generate(chat_request())
        chunks = await collect(remote.stream(chat_request()))  # not a 503
    assert "".join(c.text for c in chunks) == "Hello there. More."
    assert remote.breakers["http://up.test/v1"].state is CircuitState.CLOSED


async def test_keepalive_comments_do_not_hold_a_stream_past_the_timeout() -> None:
    async def pings() -> AsyncIterator[bytes]:
        while True:
            yield b": ping\n\n"
            await asyncio.sleep(0.05)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=pings(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1", timeout_s=0.3)
        with pytest.raises(BackendTimeout):
            await collect(remote.stream(chat_request()), limit_s=3.0)


EMPTY_FRAMES = {
    "no choices": {"choices": []},
    "role-only delta": {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
    "empty content": {"choices": [{"index": 0, "delta": {"content": ""}}], "usage": None},
    "null finish": {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]},
}


@pytest.mark.parametrize("after_text", [False, True], ids=["before-text", "after-text"])
@pytest.mark.parametrize("empty", list(EMPTY_FRAMES.values()), ids=list(EMPTY_FRAMES))
async def test_when_an_upstream_sends_only_frames_without_content_then_the_stream_times_out(
    empty: dict[str, Any], after_text: bool
) -> None:
    # Each such frame restarted the stall clock: a stuck server sending them every
    # 0.3 s held the request, and its concurrency slot, for ever.
    async def frames() -> AsyncIterator[bytes]:
        if after_text:
            yield _sse(REPLY_FRAMES[0])
        while True:
            yield _sse(json.dumps(empty))
            await asyncio.sleep(0.05)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=frames(), headers={"content-type": "text/event-stream"})

    received: list[Chunk] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1", timeout_s=0.3)
        with pytest.raises(BackendTimeout, match="stalled"):
            await collect(remote.stream(chat_request()), into=received, limit_s=3.0)
    assert "".join(c.text for c in received) == ("Hello there. " if after_text else "")


PROGRESS_FRAMES = {
    "text": {"choices": [{"index": 0, "delta": {"content": "word "}}]},
    "refusal": {"choices": [{"index": 0, "delta": {"refusal": "no "}}]},
    "tool-call arguments": {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]
                },
            }
        ]
    },
    "another choice's text": {"choices": [{"index": 1, "delta": {"content": "word "}}]},
    # A reasoning model thinks for minutes with content empty (vLLM, DeepSeek, OpenRouter).
    "reasoning_content": {
        "choices": [{"index": 0, "delta": {"content": None, "reasoning_content": "so "}}]
    },
    "reasoning": {"choices": [{"index": 0, "delta": {"content": "", "reasoning": "so "}}]},
    "legacy function call": {
        "choices": [{"index": 0, "delta": {"function_call": {"arguments": "{"}}}]
    },
}


@pytest.mark.parametrize("step", list(PROGRESS_FRAMES.values()), ids=list(PROGRESS_FRAMES))
async def test_a_slow_stream_that_keeps_making_progress_is_not_cut(step: dict[str, Any]) -> None:
    """Frames with content well within the timeout of each other, each after an empty
    one, over a stream that lasts several timeouts in all: it ends normally."""

    async def frames() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield _sse(json.dumps(EMPTY_FRAMES["role-only delta"]))
            await asyncio.sleep(0.1)
            yield _sse(json.dumps(step))
        yield _sse(REPLY_FRAMES[1], "[DONE]")

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=frames(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1", timeout_s=0.6)
        chunks = await collect(remote.stream(chat_request()), limit_s=10.0)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].text == "More."


async def test_a_4xx_on_a_stream_is_the_request_s_fault_and_never_opens_the_circuit() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "model does not exist"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1", breaker_failures=2)
        for _ in range(3):
            with pytest.raises(BackendError) as refused:
                await collect(remote.stream(chat_request()))
            assert refused.value.status == 502  # not 503: the circuit stays closed
    assert remote.breakers["http://up.test/v1"].state is CircuitState.CLOSED


async def test_a_stream_that_ends_before_any_text_fails_over_to_the_next_url() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test":
            return httpx.Response(200, content=b"", headers={"content-type": "text/event-stream"})
        return httpx.Response(
            200, content=_sse(*REPLY_FRAMES), headers={"content-type": "text/event-stream"}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://a.test/v1", "http://b.test/v1")
        chunks = await collect(remote.stream(chat_request()))
    assert "".join(c.text for c in chunks) == "Hello there. More."


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_429_fails_over_to_the_next_url_without_a_retry(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream, stream: bool
) -> None:
    """A replica whose queue is full answers 429; the idle one behind it was never asked."""
    up_a.mode, up_a.status = "http_error", 429
    remote = backend(client, up_a.base_url, up_b.base_url, breaker_failures=1)

    if stream:
        text = "".join(c.text for c in await collect(remote.stream(chat_request())))
    else:
        text = (await remote.generate(chat_request())).text

    assert text == "Answer from b."
    assert (len(up_a.requests), len(up_b.requests)) == (1, 1)
    assert remote.breakers[up_a.base_url].state is CircuitState.CLOSED  # busy, not broken


async def test_a_429_on_a_half_open_trial_neither_closes_nor_opens_the_circuit(
    client: httpx.AsyncClient, up_a: FakeUpstream, up_b: FakeUpstream
) -> None:
    up_a.mode, up_a.status = "500", 500
    clock = Tick()
    remote = backend(
        client, up_a.base_url, up_b.base_url, breaker_failures=1, breaker_reset_s=1.0, clock=clock
    )
    await remote.generate(chat_request())  # a's 500 opens its circuit
    clock.now = 2.0
    up_a.mode, up_a.status = "http_error", 429

    await remote.generate(chat_request())  # a's trial: a 429

    assert remote.breakers[up_a.base_url].state is CircuitState.HALF_OPEN
    assert len(up_a.requests) == 2  # the next call may try a again


@pytest.mark.parametrize("stream", [False, True])
async def test_when_every_url_answers_429_then_429_with_the_shortest_retry_after(
    stream: bool,
) -> None:
    waits = {"a.test": "30", "b.test": "7", "c.test": None}
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        wait = waits[request.url.host]
        headers = {"retry-after": wait} if wait is not None else {}
        return httpx.Response(429, json={"error": {"message": "overloaded"}}, headers=headers)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://a.test/v1", "http://b.test/v1", "http://c.test/v1")

        async def call() -> object:
            if stream:
                return await collect(remote.stream(chat_request()))
            return await remote.generate(chat_request())

        with pytest.raises(BackendBadResponse) as limited:
            await call()

    assert (limited.value.status, limited.value.retry_after_s) == (429, 7.0)
    assert limited.value.upstream_message == "overloaded"
    assert asked == ["a.test", "b.test", "c.test"]  # each once: no retry of a busy replica


@pytest.mark.parametrize("stream", [False, True])
async def test_when_every_url_answers_503_then_503_with_the_upstream_s_retry_after(
    stream: bool,
) -> None:
    """llama.cpp answers 503 "Loading model" while it loads: that is 503
    ``backend_unavailable`` with a time to come back, not a 502 with none."""
    waits = {"a.test": "45", "b.test": "20"}
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        return httpx.Response(
            503,
            json={"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
            headers={"retry-after": waits[request.url.host]},
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://a.test/v1", "http://b.test/v1", retries=1)

        async def call() -> object:
            if stream:
                return await collect(remote.stream(chat_request()))
            return await remote.generate(chat_request())

        with pytest.raises(BackendError) as unavailable:
            await call()

    assert type(unavailable.value) is BackendUnavailable
    assert (unavailable.value.status, unavailable.value.retry_after_s) == (503, 20.0)
    assert asked == (["a.test", "b.test"] if stream else ["a.test", "a.test", "b.test", "b.test"])


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_s_retry_after_reaches_the_client(stream: bool) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, json={"error": {"message": "slow down"}}, headers={"retry-after": "42"}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1")

        async def call() -> object:
            if stream:
                return await collect(remote.stream(chat_request()))
            return await remote.generate(chat_request())

        with pytest.raises(BackendError) as limited:
            await call()
    assert (limited.value.status, limited.value.retry_after_s) == (429, 42.0)


# --- tool calls ----------------------------------------------------------------------------


async def test_tool_calls_go_upstream_and_come_back_whole_streamed_or_not(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    """An earlier turn's calls are sent in OpenAI's shape (content null), and the
    upstream's calls come back whole: a stream's pieces assembled, on its last chunk."""
    up_a.reply, up_a.finish_reason = "", "tool_calls"
    arguments = '{"city": "Paris", "unit": "celsius"}'
    up_a.tool_calls = [
        {"id": "call_a", "name": "get_weather", "arguments": arguments},
        {"id": "call_b", "name": "get_time", "arguments": "{}"},
    ]
    earlier = ToolCall("call_0", "get_weather", '{"city": "Rome"}')
    request = GenerationRequest(
        model="fake-model",
        request_id="req-44",
        messages=(
            Message("user", "Weather?"),
            Message("assistant", "", tool_calls=(earlier,)),
            Message("tool", "Sunny.", tool_call_id="call_0"),
        ),
        params=SamplingParams(extra={"tools": [{"type": "function"}], "tool_choice": "auto"}),
    )
    b = backend(client, up_a.base_url)
    completion = await b.generate(request)
    chunks = await collect(b.stream(request))
    expected = (ToolCall("call_a", "get_weather", arguments), ToolCall("call_b", "get_time", "{}"))
    assert completion.tool_calls == chunks[-1].tool_calls == expected
    assert completion.finish_reason == chunks[-1].finish_reason == "tool_calls"
    assert all(not c.tool_calls for c in chunks[:-1])
    sent = up_a.requests[0]
    assert (sent["tools"], sent["tool_choice"]) == ([{"type": "function"}], "auto")
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            }
        ],
    }


async def test_a_stream_of_endless_tool_call_arguments_is_cut_at_the_token_budget() -> None:
    """Held until the stream ends, a call's text would grow for as long as the upstream
    sends it: past what the completion's token budget can hold, the stream fails."""
    sent = 0

    async def frames() -> AsyncIterator[bytes]:
        nonlocal sent
        head = {"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}
        yield _sse(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]}))
        piece = {"index": 0, "function": {"arguments": "x" * 100}}
        while True:
            sent += 1
            yield _sse(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=frames(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        remote = backend(client, "http://up.test/v1")
        with pytest.raises(BackendBadResponse, match="tool-call text"):
            await collect(remote.stream(chat_request(max_tokens=10)))
    assert sent * 100 <= 10 * TOOL_CALL_CHARS_PER_TOKEN + 100


def _piece(call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    """A tool-call piece with no ``index``, as Gemini's OpenAI-compatible stream sends."""
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"type": "function", "function": function} | ({} if call_id is None else {"id": call_id})


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (
            [
                [_piece("call_a", "get_weather", '{"city":"Paris"}')],
                [_piece("call_b", "get_time", "{}")],
            ],
            [("call_a", "get_weather", '{"city":"Paris"}'), ("call_b", "get_time", "{}")],
        ),
        (
            [[_piece("call_a", "get_weather", "{}"), _piece("call_b", "get_weather", "{}")]],
            [("call_a", "get_weather", "{}"), ("call_b", "get_weather", "{}")],
        ),
        (
            [[_piece("call_a", "get_weather", '{"city":')], [_piece(None, None, '"Paris"}')]],
            [("call_a", "get_weather", '{"city":"Paris"}')],
        ),
        (
            [[_piece("call_a", "get_weather", '{"city":')], [_piece("call_a", None, '"Paris"}')]],
            [("call_a", "get_weather", '{"city":"Paris"}')],
        ),
    ],
    ids=["a call a delta", "two calls in one delta", "pieces of one call", "its id again"],
)
async def test_streamed_tool_calls_without_an_index_are_told_apart_by_their_ids(
    deltas: list[list[dict[str, Any]]], expected: list[tuple[str, str, str]]
) -> None:
    """Gemini's OpenAI-compatible stream sends each parallel call whole, with no index:
    the two were merged into one call with both names and both arguments."""
    body = _sse(
        *(json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": d}}]}) for d in deltas),
        json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        chunks = await collect(backend(client, "http://up.test/v1").stream(chat_request()))
    assert chunks[-1].tool_calls == tuple(ToolCall(*c) for c in expected)


async def test_a_tool_call_the_upstream_sent_in_another_shape_is_a_bad_response(
    client: httpx.AsyncClient, up_a: FakeUpstream
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        message = {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": message}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises(BackendBadResponse, match="tool call"):
            await backend(mock, "http://up.test/v1").generate(chat_request())
