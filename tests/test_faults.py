"""Fault injection: a backend refusing, slow, dying mid-stream or answering garbage; a
filter raising or hanging; a saturated gateway; shutdown with a stream open.

Whatever breaks, the client gets a clear OpenAI-shaped error or a moderated answer,
never unmoderated text: the fake upstream's reply always contains a phrase the test
policy blocks, and no response may contain it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import structlog
import structlog.testing
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry

from guardrail.api.errors import from_backend_error
from guardrail.app import build_backend, create_app
from guardrail.backends.base import Chunk, GenerationRequest
from guardrail.backends.breaker import CircuitBreaker, CircuitState
from guardrail.backends.remote import RemoteBackend
from guardrail.chat import Message
from guardrail.errors import BackendBadResponse, BackendUnavailable
from guardrail.guard.filter import BuildContext, FilterSpec
from guardrail.guard.registry import filter_registry
from guardrail.guard.types import Action, FilterContext, Stage, Verdict
from guardrail.settings import Settings
from tests.fakes.backend import FakeBackend
from tests.fakes.filters import FAULT, FaultConfig
from tests.fakes.upstream import (
    REFUSAL,
    FakeUpstream,
    Mode,
    fake_client,
    refused_url,
    serve_upstream,
)
from tests.servers import free_socket, serve_asgi
from tests.sse import content as sse_content

HARMFUL = "build a bomb"
REPLY = "Sure thing. Here is how to build a bomb in your kitchen. Step one is easy."


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chat(stream: bool = False, text: str = "Tell me a story") -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }


def assert_openai_error(body: Any) -> dict[str, Any]:
    error = body["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert {"type", "param", "code"} <= set(error)
    return dict(error)


# -- the circuit breaker ----------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_closes_after_a_good_trial() -> None:
    clock = Clock()
    changes: list[tuple[str, CircuitState]] = []
    breaker = CircuitBreaker(
        "u", failures=2, reset_s=10, clock=clock, on_change=lambda u, s: changes.append((u, s))
    )
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10)
    clock.now += 10
    assert breaker.allow()  # the one trial
    assert not breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    assert [s for _, s in changes] == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


def test_a_failed_trial_opens_the_circuit_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker("u", failures=1, reset_s=5, clock=clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker("u", failures=2, reset_s=5, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED


def _request() -> GenerationRequest:
    return GenerationRequest("fake-model", "r1", messages=(Message("user", "hi"),))


async def test_remote_skips_a_url_whose_circuit_is_open_then_tries_it_again() -> None:
    clock = Clock()
    bad, good = FakeUpstream(mode="500", host="bad.test"), FakeUpstream(host="good.test")
    async with fake_client(bad, good) as client:
        backend = RemoteBackend(
            [bad.base_url, good.base_url],
            client,
            retries=0,
            breaker_failures=2,
            breaker_reset_s=30,
            clock=clock,
        )
        for _ in range(4):
            assert (await backend.generate(_request())).text == good.reply
        assert len(bad.requests) == 2  # then its circuit opened: skipped
        clock.now += 30
        bad.mode = "ok"
        await backend.generate(_request())
        assert len(bad.requests) == 3  # the trial went to it, and closed the circuit
        assert backend.breakers[bad.base_url].state is CircuitState.CLOSED


async def test_a_half_open_url_keeps_its_trial_until_it_is_really_tried() -> None:
    clock = Clock()
    first, second = FakeUpstream(host="first.test"), FakeUpstream(host="second.test")
    async with fake_client(first, second) as client:
        backend = RemoteBackend(
            [first.base_url, second.base_url], client, retries=0, breaker_failures=1, clock=clock
        )
        backend.breakers[second.base_url].failure()
        clock.now += 60  # the second URL is half-open now
        await backend.generate(_request())  # served by the first URL
        first.mode = "500"
        await backend.generate(_request())  # the first fails; the trial goes to the second
        assert len(second.requests) == 1
        assert backend.breakers[second.base_url].state is CircuitState.CLOSED


async def test_a_call_that_was_not_the_trial_does_not_free_the_trial_of_another() -> None:
    # A stream opened while the circuit was closed is cut short (the policy blocked it)
    # after the circuit opened and went half-open: its end must not hand the running
    # trial's place to a second request.
    clock = Clock()
    up = FakeUpstream(host="one.test")
    async with fake_client(up) as client:
        backend = RemoteBackend([up.base_url], client, retries=0, breaker_failures=1, clock=clock)
        breaker = backend.breakers[up.base_url]
        old = backend.stream(_request())
        await anext(old)  # opened while closed
        breaker.failure()  # another call failed: open
        clock.now += 60  # half-open
        trial = backend.stream(_request())
        await anext(trial)  # the one trial, still running
        assert not breaker.allow()
        await old.aclose()  # type: ignore[attr-defined]
        assert not breaker.allow(), "a second trial was let through"
        await trial.aclose()  # type: ignore[attr-defined]
        assert breaker.allow()  # the trial reached no verdict: the next call may try


async def test_when_every_circuit_is_open_the_call_fails_fast_with_503() -> None:
    bad = FakeUpstream(mode="500", host="bad.test")
    async with fake_client(bad) as client:
        backend = RemoteBackend(
            [bad.base_url], client, retries=0, breaker_failures=1, clock=Clock()
        )
        with pytest.raises(BackendBadResponse):
            await backend.generate(_request())
        with pytest.raises(BackendUnavailable, match="circuit of every backend URL is open") as e:
            await backend.generate(_request())
        assert len(bad.requests) == 1
    # Clients are told to come back when the circuit's trial opens, not in a second.
    assert e.value.retry_after_s == pytest.approx(30.0)
    assert from_backend_error(e.value).headers["retry-after"] == "30"


async def test_a_4xx_does_not_count_against_the_circuit() -> None:
    up = FakeUpstream(mode="refuse_400")
    async with fake_client(up) as client:
        backend = RemoteBackend([up.base_url], client, retries=0, breaker_failures=1)
        for _ in range(3):
            with pytest.raises(BackendBadResponse):
                await backend.generate(_request())
        assert backend.breakers[up.base_url].state is CircuitState.CLOSED


def test_circuit_states_are_a_metric(test_policy: Path) -> None:
    registry = CollectorRegistry()
    url = refused_url()
    settings = Settings(
        policy=str(test_policy),
        backend="remote",
        backend_urls=[url],
        backend_retries=0,
        breaker_failures=1,
        models=["fake-model"],
    )
    app = create_app(settings, backend=build_backend(settings), metrics_registry=registry)
    labels = {"url": url}
    assert registry.get_sample_value("guardrail_backend_circuit_state", labels) == 0.0
    with TestClient(app=app) as c:
        first = c.post("/v1/chat/completions", json=chat())
        second = c.post("/v1/chat/completions", json=chat())
    assert first.status_code == 503
    assert second.status_code == 503
    assert "circuit" in second.json()["error"]["message"]
    assert registry.get_sample_value("guardrail_backend_circuit_state", labels) == 2.0


async def test_an_open_circuit_reads_half_open_once_its_reset_passes_with_no_request_to_it(
    test_policy: Path,
) -> None:
    """Failover stops at the first URL that serves, so nothing asked the second URL's
    breaker again: its gauge stayed 2 (open) for good, and the alert on 2 never cleared."""
    clock = Clock()
    first, second = FakeUpstream(host="first.test"), FakeUpstream(host="second.test")
    registry = CollectorRegistry()
    async with fake_client(first, second) as client:
        backend = RemoteBackend(
            [first.base_url, second.base_url],
            client,
            retries=0,
            breaker_failures=1,
            breaker_reset_s=30,
            clock=clock,
        )
        settings = Settings(policy=str(test_policy), models=["fake-model"], audit_dsn="off")
        create_app(settings, backend=backend, metrics_registry=registry)

        def gauge(url: str) -> float | None:
            return registry.get_sample_value("guardrail_backend_circuit_state", {"url": url})

        backend.breakers[second.base_url].failure()
        assert gauge(second.base_url) == 2.0
        clock.now += 30
        await backend.generate(_request())
        assert second.requests == []
        assert (gauge(first.base_url), gauge(second.base_url)) == (0.0, 1.0)


# -- backend faults, end to end over real sockets ----------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(reply=REPLY)
    with serve_upstream(fake) as url:
        yield fake, url


def _gateway(test_policy: Path, urls: list[str], **overrides: Any) -> Litestar:
    settings = Settings(
        policy=str(test_policy),
        backend="remote",
        backend_urls=urls,
        backend_retries=0,
        backend_retry_backoff_s=0,
        backend_timeout_s=overrides.pop("backend_timeout_s", 2.0),
        breaker_failures=0,
        models=["fake-model"],
        **overrides,
    )
    return create_app(
        settings, backend=build_backend(settings), metrics_registry=CollectorRegistry()
    )


def _sse_text(body: str) -> tuple[str, list[dict[str, Any]]]:
    """The streamed text and any error frames of an SSE body."""
    text, errors = [], []
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        frame = msgspec.json.decode(line[6:])
        if "error" in frame:
            errors.append(assert_openai_error(frame))
            continue
        for choice in frame["choices"]:
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), errors


FAULTS: list[tuple[Mode, bool, int]] = [
    ("ok", False, 200),
    ("ok", True, 200),
    ("500", False, 502),
    ("500", True, 502),
    ("garbage", False, 502),
    ("garbage", True, 502),  # before the first chunk: still an HTTP error
    ("die_mid_stream", False, 502),
    ("die_mid_stream", True, 200),
    ("stall_mid_stream", True, 200),
    ("slow", False, 504),
    ("slow", True, 504),
    ("error_frame", True, 200),
]


@pytest.mark.parametrize(("mode", "stream", "status"), FAULTS)
def test_a_failing_backend_gives_an_error_or_a_moderated_answer_never_unmoderated_text(
    upstream: tuple[FakeUpstream, str], test_policy: Path, mode: Mode, stream: bool, status: int
) -> None:
    fake, url = upstream
    fake.mode, fake.delay_s, fake.times = mode, 5.0, None
    try:
        with TestClient(app=_gateway(test_policy, [url], backend_timeout_s=1.5)) as c:
            r = c.post("/v1/chat/completions", json=chat(stream))
    finally:
        fake.mode = "ok"
    assert r.status_code == status, r.text
    assert HARMFUL not in r.text.lower()
    if status != 200:
        assert_openai_error(r.json())
    elif stream:
        text, errors = _sse_text(r.text)
        assert HARMFUL not in text.lower()
        assert errors or "Withheld by test policy." in text
    else:
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "content_filter"


def test_when_an_upstream_streams_only_empty_frames_then_the_client_gets_504_and_the_slot_back(
    test_policy: Path,
) -> None:
    # Every `data: {"choices":[]}` restarted the stall clock: the client waited with no
    # headers and no error while its slot was held, and nothing was counted. The first
    # call's frames stop after 5 s (a 502 then), so the old code fails instead of hanging.
    calls = {"n": 0}

    async def empty_frames() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b'data: {"choices":[]}\n\n'
            await asyncio.sleep(0.05)

    async def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            body: Any = empty_frames()
        else:
            frame = {
                "choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}]
            }
            body = b"data: " + msgspec.json.encode(frame) + b"\n\ndata: [DONE]\n\n"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    settings = Settings(
        policy=str(test_policy), models=["fake-model"], max_concurrency=1, queue_timeout_s=0.5
    )
    registry = CollectorRegistry()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend = RemoteBackend(["http://up.test/v1"], client, retries=0, timeout_s=0.5)
    app = create_app(settings, backend=backend, metrics_registry=registry)
    with TestClient(app=app) as c:
        stuck = c.post("/v1/chat/completions", json=chat(True))
        after = c.post("/v1/chat/completions", json=chat(True))
        slots = app.state.gateway.slots.active
    asyncio.run(client.aclose())
    assert stuck.status_code == 504, stuck.text
    assert assert_openai_error(stuck.json())["code"] == "backend_timeout"
    timeouts = {"backend": "remote", "code": "backend_timeout"}
    assert registry.get_sample_value("guardrail_backend_errors_total", timeouts) == 1
    assert after.status_code == 200
    assert _sse_text(after.text) == ("Hi.", [])
    assert slots == 0


def test_a_refusing_backend_is_503_with_retry_after(test_policy: Path) -> None:
    with TestClient(app=_gateway(test_policy, [refused_url()])) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503
    assert assert_openai_error(r.json())["code"] == "backend_unavailable"
    assert r.headers["retry-after"]


def test_failover_to_the_next_url_serves_a_moderated_answer(
    upstream: tuple[FakeUpstream, str], test_policy: Path
) -> None:
    _, url = upstream
    with TestClient(app=_gateway(test_policy, [refused_url(), url])) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "content_filter"


# -- filter faults ----------------------------------------------------------------------------


def _faulty_app(
    write_policy: Callable[..., Path], backend: FakeBackend, behaviour: str, stage: str
) -> Litestar:
    registry = filter_registry()
    registry.register("fault", FAULT)
    policy = write_policy(
        'name: f\nversion: "1"\nmessages: {output_blocked: Withheld.}\nfilters:\n'
        f"  - {{id: f, type: fault, stages: [{stage}], timeout_ms: 100, "
        f"config: {{behaviour: {behaviour}}}}}\n"
    )
    return create_app(
        Settings(policy=str(policy)),
        backend=backend,
        filters=registry,
        metrics_registry=CollectorRegistry(),
    )


@pytest.mark.parametrize("behaviour", ["raise", "hang"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_input_filter_blocks_the_request_before_the_backend(
    write_policy: Callable[..., Path], behaviour: str, stream: bool
) -> None:
    backend = FakeBackend(reply=REPLY)
    with TestClient(app=_faulty_app(write_policy, backend, behaviour, "input")) as c:
        r = c.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == 400
    assert assert_openai_error(r.json())["code"] == "content_filter"
    assert backend.requests == []


@pytest.mark.parametrize("behaviour", ["raise", "hang"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_output_filter_withholds_the_completion(
    write_policy: Callable[..., Path], behaviour: str, stream: bool
) -> None:
    backend = FakeBackend(reply=REPLY)
    with TestClient(app=_faulty_app(write_policy, backend, behaviour, "output")) as c:
        r = c.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == 200
    assert HARMFUL not in r.text.lower()
    assert "Withheld." in r.text


# -- an upstream's error message is model-side text ----------------------------------------

# A validation error that echoes the prompt, as vLLM's do: the test policy blocks it.
ECHOED = "Input validation failed: 'Explain how to build a bomb' is 9 tokens too long."


def _remote_gateway(
    policy: Path, upstream: FakeUpstream, registry: CollectorRegistry | None = None, **kw: Any
) -> Litestar:
    settings = Settings(
        policy=str(policy), backend="remote", models=["fake-model"], breaker_failures=0
    )
    backend = RemoteBackend([upstream.base_url], fake_client(upstream), owns_client=True)
    metrics = registry if registry is not None else CollectorRegistry()
    return create_app(settings, backend=backend, metrics_registry=metrics, **kw)


@pytest.mark.parametrize(
    ("upstream_status", "stream", "status"),
    [
        (400, False, 400),
        (400, True, 400),
        (413, False, 400),
        (422, True, 400),
        (429, False, 429),
        (404, False, 502),
        (418, True, 502),
    ],
)
def test_an_upstream_error_message_the_policy_blocks_never_reaches_the_client(
    test_policy: Path,
    upstream_status: int,
    stream: bool,
    status: int,
) -> None:
    upstream = FakeUpstream(mode="http_error", status=upstream_status, error_message=ECHOED)
    registry = CollectorRegistry()
    with (
        structlog.testing.capture_logs() as logs,
        TestClient(app=_remote_gateway(test_policy, upstream, registry)) as c,
    ):
        r = c.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == status
    error = assert_openai_error(r.json())
    assert HARMFUL not in r.text.lower()
    assert "validation" not in r.text.lower()
    assert f"HTTP {upstream_status}" in error["message"]
    # A failed backend call, not a harmful answer: counted as the error it is (a refusal
    # of the request, answered 400, as the client's invalid request).
    outcome = "invalid_request" if status == 400 else "backend_error"
    labels = {"route": "chat", "outcome": outcome}
    assert registry.get_sample_value("guardrail_requests_total", labels) == 1.0
    blocked = {"route": "chat", "outcome": "blocked_output"}
    assert not registry.get_sample_value("guardrail_requests_total", blocked)
    output = {"stage": "output", "action": "block"}
    assert not registry.get_sample_value("guardrail_decisions_total", output)
    assert "upstream_message_withheld" in [e["event"] for e in logs]
    assert "validation" not in repr(logs).lower()  # nor is it logged


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_backend_api_key_is_named_in_the_503_readyz_and_logs(
    test_policy: Path, stream: bool
) -> None:
    """vLLM with ``--api-key`` answers 401 on every route, ``/v1/models`` too: the operator
    saw only "The backend lists no models right now" and ``upstream_status=None``."""

    async def refuse(request: httpx.Request) -> httpx.Response:
        # Some servers quote part of the key they refused: it must not travel on.
        return httpx.Response(401, json={"error": "Incorrect API key provided: sk-wro***"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    backend = RemoteBackend(["http://up.test/v1"], client, api_key="sk-wrong", owns_client=True)
    settings = Settings(policy=str(test_policy), backend="remote", breaker_failures=0)
    app = create_app(settings, backend=backend, metrics_registry=CollectorRegistry())
    with structlog.testing.capture_logs() as logs, TestClient(app=app) as c:
        r = c.post("/v1/chat/completions", json=chat(stream))
        ready = c.get("/readyz")

    refused = "backend refused the gateway's credentials (HTTP 401); check backend_api_key"
    assert r.status_code == 503
    assert refused in assert_openai_error(r.json())["message"]
    assert ready.status_code == 503
    assert refused in assert_openai_error(ready.json())["message"]
    failed = [e for e in logs if e["event"] == "backend_attempt_failed"]
    assert failed
    assert {e["upstream_status"] for e in failed} == {401}
    assert "sk-wro" not in r.text + ready.text + repr(logs)


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_message_the_policy_passes_reaches_the_client(
    test_policy: Path, stream: bool
) -> None:
    upstream = FakeUpstream(mode="http_error", status=422)
    with TestClient(app=_remote_gateway(test_policy, upstream)) as c:
        r = c.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == 400
    message = assert_openai_error(r.json())["message"]
    assert message == f"backend rejected the request (HTTP 422): {REFUSAL}"


@pytest.mark.parametrize("stream", [False, True])
def test_vllms_context_length_refusal_reaches_the_client_as_openais(
    test_policy: Path, stream: bool
) -> None:
    """As the local engine answers: 400 ``context_length_exceeded``, the client's invalid
    request. It came as ``backend_bad_response``, which no SDK trims a history on."""
    vllm = (
        "This model's maximum context length is 4096 tokens. However, you requested 5000 "
        "tokens (4000 in the messages, 1000 in the completion). Please reduce the length of "
        "the messages or completion."
    )
    upstream = FakeUpstream(mode="refuse_400", error_message=vllm)
    registry = CollectorRegistry()
    with TestClient(app=_remote_gateway(test_policy, upstream, registry)) as c:
        r = c.post("/v1/chat/completions", json=chat(stream))
    assert r.status_code == 400
    error = assert_openai_error(r.json())
    assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded")
    assert error["message"] == (
        "backend rejected the request (HTTP 400) as longer than the model's context of 4096 "
        f"tokens: {vllm}"
    )
    labels = {"route": "chat", "outcome": "invalid_request"}
    assert registry.get_sample_value("guardrail_requests_total", labels) == 1.0


def test_an_upstream_error_message_is_redacted_as_a_completion_would_be(
    test_policy: Path,
) -> None:
    upstream = FakeUpstream(mode="refuse_400", error_message="Unknown key sk-abcd1234 in body.")
    with TestClient(app=_remote_gateway(test_policy, upstream)) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    assert "sk-abcd1234" not in r.text
    assert assert_openai_error(r.json())["message"].endswith("Unknown key [SECRET] in body.")


@pytest.mark.parametrize(("message", "shown"), [(ECHOED, False), ("engine restarted", True)])
def test_an_error_frame_mid_stream_carries_the_upstream_message_only_if_it_passes(
    test_policy: Path, message: str, shown: bool
) -> None:
    upstream = FakeUpstream(mode="error_frame", error_message=message)
    with TestClient(app=_remote_gateway(test_policy, upstream)) as c:
        r = c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    _, errors = _sse_text(r.text)
    assert len(errors) == 1
    assert HARMFUL not in r.text.lower()
    assert (message in errors[0]["message"]) is shown
    assert errors[0]["message"].startswith("backend reported an error mid-stream")


@pytest.mark.parametrize("on_error", ["block", "allow"])
@pytest.mark.parametrize("behaviour", ["raise", "hang"])
def test_an_output_filter_that_fails_withholds_the_upstream_error_message(
    write_policy: Callable[..., Path], behaviour: str, on_error: str
) -> None:
    """Even under ``on_error: allow``: an error message is no answer the policy chose to
    let through unchecked, and the client loses only a hint."""
    registry = filter_registry()
    registry.register("fault", FAULT)
    policy = write_policy(
        f'name: f\nversion: "1"\non_error: {on_error}\nfilters:\n'
        f"  - {{id: f, type: fault, stages: [output], timeout_ms: 100, "
        f"config: {{behaviour: {behaviour}}}}}\n"
    )
    upstream = FakeUpstream(mode="refuse_400")
    with TestClient(app=_remote_gateway(policy, upstream, filters=registry)) as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    assert assert_openai_error(r.json())["message"] == "backend rejected the request (HTTP 400)"


# -- saturation ----------------------------------------------------------------------------


async def _concurrently(app: Litestar, n: int) -> list[httpx.Response]:
    """``n`` chat requests at once to ``app`` served on a real socket."""
    with serve_asgi(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=chat()) for _ in range(n))
                )
            )


async def test_a_saturated_gateway_sheds_load_with_503_and_retry_after(
    test_policy: Path,
) -> None:
    backend = FakeBackend(delay_s=0.3)
    settings = Settings(policy=str(test_policy), max_concurrency=2, max_queue=1)
    registry = CollectorRegistry()
    app = create_app(settings, backend=backend, metrics_registry=registry)
    answers = await _concurrently(app, 5)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 503, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert assert_openai_error(refused.json())["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1"
    assert registry.get_sample_value("guardrail_overloaded_total", {"route": "chat"}) == 2
    backend_errors = registry.get_sample_value(
        "guardrail_backend_errors_total", {"backend": "unknown", "code": "overloaded"}
    )
    assert backend_errors is None


async def test_a_request_that_waits_too_long_for_a_slot_gets_503(test_policy: Path) -> None:
    backend = FakeBackend(delay_s=0.5)
    settings = Settings(
        policy=str(test_policy), max_concurrency=1, max_queue=5, queue_timeout_s=0.1
    )
    app = create_app(settings, backend=backend, metrics_registry=CollectorRegistry())
    answers = await _concurrently(app, 2)
    assert sorted(r.status_code for r in answers) == [200, 503]


# -- graceful shutdown ------------------------------------------------------------------------


def test_shutdown_finishes_open_streams_then_runs_the_shutdown_hooks(test_policy: Path) -> None:
    pieces = [f"Word{i} " for i in range(15)] + ["end."]
    backend = FakeBackend(chunks=pieces, delay_s=0.1)
    app = create_app(
        Settings(policy=str(test_policy)), backend=backend, metrics_registry=CollectorRegistry()
    )
    events: list[tuple[str, float]] = []

    async def flush() -> None:
        events.append(("hook", time.monotonic()))

    app.state.gateway.on_shutdown.append(flush)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        body: list[str] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                lines = r.iter_lines()
                for line in lines:
                    body.append(line)
                    if "Word" in line:
                        server.should_exit = True  # SIGTERM, as uvicorn handles it
                        break
                body.extend(lines)
            events.append(("stream_done", time.monotonic()))
        thread.join(timeout=15)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    text, errors = _sse_text("\n".join(body))
    assert errors == []
    assert text == "".join(pieces)
    assert [line for line in body if line][-1] == "data: [DONE]"
    assert [name for name, _ in sorted(events, key=lambda e: e[1])] == ["stream_done", "hook"]
    assert backend.closed


class _Watched(FakeBackend):
    """A slow backend that says whether its call was cancelled."""

    cancelled = threading.Event()

    async def generate(self, request: GenerationRequest) -> Any:
        try:
            return await super().generate(request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def _wait_for_sample(
    registry: CollectorRegistry, name: str, labels: dict[str, str], value: float, timeout_s: float
) -> None:
    """Until the metric has ``value`` (recorded after the response, off the test's thread)."""
    deadline = time.monotonic() + timeout_s
    while registry.get_sample_value(name, labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.05)


def test_a_client_that_leaves_a_non_streamed_call_cancels_it_and_it_is_counted(
    test_policy: Path,
) -> None:
    backend = _Watched(delay_s=5.0)
    registry = CollectorRegistry()
    settings = Settings(policy=str(test_policy), models=["fake-model"])
    app = create_app(settings, backend=backend, metrics_registry=registry)
    with serve_asgi(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=0.5)
        # The backend call is cancelled at once, not after its 5 s.
        assert backend.cancelled.wait(3.0)
        cancelled = {"route": "chat", "outcome": "cancelled"}
        _wait_for_sample(registry, "guardrail_requests_total", cancelled, 1.0, 3.0)
        # A client that stays gets its answer as before.
        backend.delay_s = 0.0
        r = httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=5.0)
        assert r.status_code == 200
        assert registry.get_sample_value("guardrail_requests_total", cancelled) == 1.0


def test_a_client_that_leaves_while_sending_its_body_is_counted_as_cancelled(
    test_policy: Path,
) -> None:
    """Litestar reports the disconnect as a 500: it had been counted as a gateway bug
    (outcome error, an unhandled_error log line) and fired the 5xx alert."""
    backend = FakeBackend()
    registry = CollectorRegistry()
    settings = Settings(policy=str(test_policy), models=["fake-model"])
    app = create_app(settings, backend=backend, metrics_registry=registry)
    with structlog.testing.capture_logs() as logs, serve_asgi(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
                b'{"model": "fake-model", "messages": [{"role": "user", "con'
            )
            time.sleep(0.2)  # the body is being read when the client goes
        cancelled = {"route": "chat", "outcome": "cancelled"}
        _wait_for_sample(registry, "guardrail_requests_total", cancelled, 1.0, 5.0)
    error = {"route": "chat", "outcome": "error"}
    assert registry.get_sample_value("guardrail_requests_total", error) is None
    assert not [e for e in logs if e["event"] == "unhandled_error"]
    assert backend.requests == []


class _SlowToStart(FakeBackend):
    """A stream whose first chunk is long in coming (a queued engine, a slow prefill);
    says whether it was cancelled while the client waited for it."""

    cancelled = threading.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        async for chunk in super().stream(request):
            yield chunk


def test_a_client_that_leaves_before_the_first_chunk_frees_the_stream_at_once(
    test_policy: Path,
) -> None:
    backend = _SlowToStart(delay_s=30.0)
    registry = CollectorRegistry()
    app = create_app(
        Settings(policy=str(test_policy), models=["fake-model"]),
        backend=backend,
        metrics_registry=registry,
    )
    with serve_asgi(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat(True), timeout=0.5)
        # Cancelled when the client leaves, not 30 s later when the first chunk comes.
        assert backend.cancelled.wait(10.0)
        cancelled = {"route": "chat", "outcome": "cancelled"}
        _wait_for_sample(registry, "guardrail_requests_total", cancelled, 1.0, 10.0)
        assert app.state.gateway.slots.active == 0
        assert registry.get_sample_value("guardrail_in_flight_requests", {"route": "chat"}) == 0


class _BrokenHoldback:
    """Passes every window, but its stream hold-back raises (a plugin's bug)."""

    def __init__(self, name: str, config: FaultConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        return Verdict(Action.ALLOW, ())

    def holdback(self, text: str) -> int:
        raise RuntimeError("the filter's hold-back crashed")


def test_a_failing_stream_holdback_is_counted_as_the_filters_error(
    write_policy: Callable[..., Path],
) -> None:
    """It was only logged (filter_holdback_failed): no dashboard saw it."""
    registry = filter_registry()
    registry.register(
        "held", FilterSpec(type="held", config_type=FaultConfig, build=_BrokenHoldback)
    )
    policy = write_policy(
        'name: h\nversion: "1"\nfilters:\n  - {id: h, type: held, stages: [output]}\n'
    )
    metrics = CollectorRegistry()
    reply = "One. Two three. Four five six. Seven eight nine ten."
    app = create_app(
        Settings(policy=str(policy)),
        backend=FakeBackend(reply=reply, chunk_size=5),
        filters=registry,
        metrics_registry=metrics,
    )
    with TestClient(app=app) as c:
        r = c.post("/v1/chat/completions", json=chat(True))
    assert sse_content(r.text) == reply  # all held, checked whole at the end
    labels = {"filter": "h", "stage": "output", "kind": "error"}
    assert metrics.get_sample_value("guardrail_filter_errors_total", labels) == 1.0


class _SlowOutputFilter:
    """Takes a while on every output window, so a client can leave during a check."""

    def __init__(self, name: str, config: FaultConfig, env: BuildContext) -> None:
        self.name, self.stages = name, frozenset({Stage.OUTPUT})

    async def check(self, text: str, ctx: FilterContext) -> Verdict:
        await asyncio.sleep(0.3)
        return Verdict(Action.ALLOW, ())


class _TidyBackend(FakeBackend):
    """A backend whose stream awaits its cleanup, as closing an HTTP response does."""

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        try:
            async for chunk in super().stream(request):
                yield chunk
        finally:
            await asyncio.sleep(0.01)


def test_a_client_that_leaves_a_stream_during_a_check_gives_its_slot_back(
    write_policy: Callable[..., Path],
) -> None:
    registry = filter_registry()
    registry.register(
        "slow", FilterSpec(type="slow", config_type=FaultConfig, build=_SlowOutputFilter)
    )
    policy = write_policy(
        'name: s\nversion: "1"\nfilters:\n'
        "  - {id: s, type: slow, stages: [output], timeout_ms: 5000}\n"
    )
    metrics = CollectorRegistry()
    backend = _TidyBackend(chunks=[f"Word{i}. " for i in range(20)])
    app = create_app(
        Settings(policy=str(policy), models=["fake-model"]),
        backend=backend,
        filters=registry,
        metrics_registry=metrics,
    )
    slots = app.state.gateway.slots
    with serve_asgi(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat(True), timeout=5) as r:
            next(r.iter_lines())  # the role frame; the first window is being checked
        cancelled = {"route": "chat", "outcome": "cancelled"}
        deadline = time.monotonic() + 3.0
        while metrics.get_sample_value("guardrail_requests_total", cancelled) != 1.0:
            assert time.monotonic() < deadline, "the stream's exchange was never closed"
            time.sleep(0.05)
        assert slots.active == 0
        assert metrics.get_sample_value("guardrail_in_flight_requests", {"route": "chat"}) == 0
        # Closing the backend's stream is cancelled with the client too (its cleanup awaits):
        # it is closed once the generator is finalised, which a busy machine may delay.
        while backend.stream_closed != 1:
            assert time.monotonic() < deadline + 3.0, "the backend's stream was never closed"
            time.sleep(0.05)
