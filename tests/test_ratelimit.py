"""Rate limits per key: token buckets in memory and in a real Redis server (shared)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from guardrail.api.ratelimit import (
    Limits,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    estimate_tokens,
)
from guardrail.app import create_app
from guardrail.backends.remote import RemoteBackend
from guardrail.errors import BackendError, BackendTimeout
from guardrail.settings import ApiKeyEntry, Settings, TenantConfig
from tests.fakes.backend import FakeBackend
from tests.fakes.upstream import FakeUpstream, Mode, fake_client

KEY = "sk-rate-limited-key"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- in memory ------------------------------------------------------------------------------


async def test_requests_per_minute_burst_then_refill() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    limits = Limits(requests_per_minute=3)
    for _ in range(3):
        assert (await limiter.acquire("k", limits, tokens=0)).allowed
    refused = await limiter.acquire("k", limits, tokens=0)
    assert not refused.allowed
    assert refused.limit == "requests"
    assert refused.retry_after_s == pytest.approx(20.0)
    clock.now += 20.0
    assert (await limiter.acquire("k", limits, tokens=0)).allowed


async def test_forgetting_idle_buckets_keeps_an_overdrawn_one() -> None:
    """Past 100,000 buckets the idle full ones are forgotten (a new bucket starts full).
    A token bucket that ``adjust`` overdrew (the backend used more than the estimate)
    is not full after a minute: forgetting it would hand the key a full minute early."""
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    limits = Limits(tokens_per_minute=100)
    assert (await limiter.acquire("heavy", limits, tokens=100)).allowed
    await limiter.adjust("heavy", limits, tokens=200)  # level -200: three minutes to full
    assert (await limiter.acquire("light", limits, tokens=1)).allowed
    clock.now += 61.0
    limiter._evict(clock.now)  # what acquire does past 100,000 buckets
    refused = await limiter.acquire("heavy", limits, tokens=50)
    assert (refused.allowed, refused.limit) == (False, "tokens")
    assert refused.retry_after_s == pytest.approx(89.0)  # from -98.3 to 50 at 100 a minute
    assert ("light", "tokens") not in limiter._buckets  # full again: forgotten


async def test_keys_have_separate_buckets() -> None:
    limiter = MemoryRateLimiter(Clock())
    limits = Limits(requests_per_minute=1)
    assert (await limiter.acquire("a", limits, tokens=0)).allowed
    assert (await limiter.acquire("b", limits, tokens=0)).allowed
    assert not (await limiter.acquire("a", limits, tokens=0)).allowed


async def test_a_request_refused_for_tokens_does_not_use_a_request() -> None:
    limiter = MemoryRateLimiter(Clock())
    limits = Limits(requests_per_minute=2, tokens_per_minute=100)
    assert (await limiter.acquire("k", limits, tokens=90)).allowed
    refused = await limiter.acquire("k", limits, tokens=50)
    assert (refused.allowed, refused.limit) == (False, "tokens")
    assert (await limiter.acquire("k", limits, tokens=10)).allowed


async def test_retry_after_is_the_longest_wait_of_the_refusing_buckets() -> None:
    # Waiting out only the first refusing bucket got another 429 from the second.
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    limits = Limits(requests_per_minute=2, tokens_per_minute=1000)
    assert (await limiter.acquire("k", limits, tokens=500)).allowed
    assert (await limiter.acquire("k", limits, tokens=500)).allowed
    refused = await limiter.acquire("k", limits, tokens=900)
    assert (refused.allowed, refused.limit) == (False, "tokens")
    assert refused.retry_after_s == pytest.approx(54.0)  # 900 tokens at 1000 a minute
    clock.now += refused.retry_after_s
    assert (await limiter.acquire("k", limits, tokens=900)).allowed


async def test_a_cost_no_minute_can_hold_is_named_whatever_the_other_bucket() -> None:
    limiter = MemoryRateLimiter(Clock())
    limits = Limits(requests_per_minute=1, tokens_per_minute=100)
    assert (await limiter.acquire("k", limits, tokens=10)).allowed  # requests now empty
    never = await limiter.acquire("k", limits, tokens=101)
    assert (never.allowed, never.limit, never.retry_after_s) == (False, "tokens", 60.0)


async def test_adjust_gives_back_unused_tokens() -> None:
    limiter = MemoryRateLimiter(Clock())
    limits = Limits(tokens_per_minute=100)
    assert (await limiter.acquire("k", limits, tokens=100)).allowed
    assert not (await limiter.acquire("k", limits, tokens=50)).allowed
    await limiter.adjust("k", limits, tokens=-60)
    assert (await limiter.acquire("k", limits, tokens=50)).allowed


def test_token_estimate_is_prompt_chars_over_four_plus_max_tokens() -> None:
    assert estimate_tokens(0, 16) == 16
    assert estimate_tokens(9, 16) == 19


# -- Redis: a real server, started for this module ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail("redis-server is not installed, and CI must test the Redis rate limiter")
        pytest.skip("redis-server is not installed (Debian package redis-server; CI installs it)")
    port = _free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def redis_limiters(redis_url: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    """Two limiters on one server, as two gateway replicas would have; the db is emptied."""
    flush = Redis.from_url(redis_url)
    await flush.flushdb()
    await flush.aclose()
    first, second = RedisRateLimiter.from_url(redis_url), RedisRateLimiter.from_url(redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_redis_replicas_share_one_budget_per_key(
    redis_limiters: tuple[RateLimiter, RateLimiter],
) -> None:
    a, b = redis_limiters
    limits = Limits(requests_per_minute=4)
    results = [await (a if i % 2 else b).acquire("k", limits, tokens=0) for i in range(4)]
    assert all(r.allowed for r in results)
    refused = await a.acquire("k", limits, tokens=0)
    assert (refused.allowed, refused.limit) == (False, "requests")
    assert 0 < refused.retry_after_s <= 15.0
    assert (await b.acquire("other", limits, tokens=0)).allowed


async def test_redis_concurrent_acquires_never_overspend(
    redis_limiters: tuple[RateLimiter, RateLimiter],
) -> None:
    a, b = redis_limiters
    limits = Limits(requests_per_minute=10)
    results = await asyncio.gather(
        *((a if i % 2 else b).acquire("k", limits, tokens=0) for i in range(40))
    )
    assert sum(r.allowed for r in results) == 10


async def test_redis_tokens_refused_without_using_a_request_and_adjusted(
    redis_limiters: tuple[RateLimiter, RateLimiter],
) -> None:
    a, b = redis_limiters
    limits = Limits(requests_per_minute=5, tokens_per_minute=100)
    assert (await a.acquire("k", limits, tokens=100)).allowed
    refused = await b.acquire("k", limits, tokens=40)
    assert (refused.allowed, refused.limit) == (False, "tokens")
    await b.adjust("k", limits, tokens=-50)
    assert (await a.acquire("k", limits, tokens=40)).allowed
    too_big = await a.acquire("k", limits, tokens=101)
    assert (too_big.allowed, too_big.limit) == (False, "tokens")


async def test_redis_retry_after_is_the_longest_wait_of_the_refusing_buckets(
    redis_limiters: tuple[RateLimiter, RateLimiter],
) -> None:
    a, b = redis_limiters
    limits = Limits(requests_per_minute=2, tokens_per_minute=1000)
    assert (await a.acquire("k", limits, tokens=500)).allowed
    assert (await b.acquire("k", limits, tokens=500)).allowed
    refused = await a.acquire("k", limits, tokens=900)
    assert (refused.allowed, refused.limit) == (False, "tokens")
    assert refused.retry_after_s == pytest.approx(54.0, abs=0.5)
    never = await b.acquire("k", limits, tokens=1001)
    assert (never.allowed, never.limit, never.retry_after_s) == (False, "tokens", 60.0)


async def test_redis_unreachable_lets_requests_through_and_counts_it() -> None:
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{_free_port()}/0")
    try:
        assert (await limiter.acquire("k", Limits(1), tokens=0)).allowed
        assert limiter.failures == 1
    finally:
        await limiter.aclose()


# -- through the gateway ----------------------------------------------------------------------


def _app(
    test_policy: Path,
    backend: FakeBackend,
    registry: CollectorRegistry,
    rate_limiter: RateLimiter | None = None,
    **overrides: object,
) -> Litestar:
    overrides.setdefault(
        "api_keys",
        [ApiKeyEntry(tenant="t", key_sha256=hashlib.sha256(KEY.encode()).hexdigest())],
    )
    settings = Settings(policy=str(test_policy), **overrides)  # type: ignore[arg-type]
    return create_app(
        settings, backend=backend, metrics_registry=registry, rate_limiter=rate_limiter
    )


def _limited_app(
    test_policy: Path,
    backend: FakeBackend,
    registry: CollectorRegistry,
    limits: TenantConfig,
    **overrides: object,
) -> Litestar:
    """A gateway whose key's tenant ``t`` has ``limits``, on a limiter whose clock never
    moves (no refill while the test runs)."""
    return _app(
        test_policy,
        backend,
        registry,
        rate_limiter=MemoryRateLimiter(Clock()),
        tenants={"t": limits},
        **overrides,
    )


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
AUTH = {"authorization": f"Bearer {KEY}"}


def test_checks_the_shared_store_let_through_are_exported_for_an_alert(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """The limiter fails open when Redis is down: only a metric shows that every limit is
    off (the count was kept, but in the limiter alone)."""
    app = _app(
        test_policy,
        backend,
        metrics_registry,
        rate_limit_redis_url=f"redis://127.0.0.1:{_free_port()}/0",
        rate_limit_requests_per_minute=1,
        rate_limit_tokens_per_minute=100_000,
    )
    with TestClient(app=app) as c:
        answers = [c.post("/v1/chat/completions", json=CHAT, headers=AUTH) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]
    # One per request let through: the token correction after each answer fails too, but
    # lets nothing through (it had counted each request twice).
    failed = metrics_registry.get_sample_value("guardrail_rate_limit_store_failures_total")
    assert failed == 2


def test_over_the_request_limit_is_429_with_retry_after(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    app = _app(test_policy, backend, metrics_registry, rate_limit_requests_per_minute=2)
    with TestClient(app=app) as c:
        codes = [c.post("/v1/chat/completions", json=CHAT, headers=AUTH) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    refused = codes[2]
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert "requests per minute (2)" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert len(backend.requests) == 2
    assert (
        metrics_registry.get_sample_value("guardrail_rate_limited_total", {"limit": "requests"})
        == 1.0
    )


def test_a_browser_client_can_read_retry_after_on_a_429(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    # Retry-After is not a CORS-safelisted response header: unless it is exposed, a
    # browser client (cors_origins) sees the 429 but cannot read when to retry.
    app = _app(
        test_policy,
        backend,
        metrics_registry,
        rate_limit_requests_per_minute=1,
        cors_origins=["https://app.example"],
    )
    headers = {**AUTH, "origin": "https://app.example"}
    with TestClient(app=app) as c:
        codes = [c.post("/v1/chat/completions", json=CHAT, headers=headers) for _ in range(2)]
    refused = codes[1]
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    exposed = refused.headers["access-control-expose-headers"].lower().split(",")
    assert "retry-after" in {h.strip() for h in exposed}


def test_tenant_token_limit_counts_max_tokens_up_front(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    app = _app(
        test_policy,
        backend,
        metrics_registry,
        tenants={"t": TenantConfig(tokens_per_minute=1000)},
    )
    with TestClient(app=app) as c:
        big = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2000}, headers=AUTH)
        ok = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100}, headers=AUTH)
    assert big.status_code == 429
    assert "larger than a minute's allowance" in big.json()["error"]["message"]
    assert ok.status_code == 200


def test_a_request_over_a_minutes_tokens_tells_the_client_not_to_retry(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """A request over a whole minute's tokens can never pass: it had Retry-After: 60,
    and the openai SDK slept a minute, twice, before giving up. Still a 429 (as OpenAI
    answers), with the header the OpenAI SDKs read as "do not retry"."""
    backend.reports_usage = False  # the estimate stands: the third request must wait
    app = _limited_app(
        test_policy,
        backend,
        metrics_registry,
        TenantConfig(tokens_per_minute=1000),
        cors_origins=["https://app.example"],
    )
    headers = {**AUTH, "origin": "https://app.example"}
    with TestClient(app=app) as c:
        never = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2000}, headers=headers)
        spent = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 900}, headers=headers)
        later = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 900}, headers=headers)
    assert never.status_code == 429
    assert never.json()["error"]["code"] == "rate_limit_exceeded"
    assert never.headers["x-should-retry"] == "false"
    assert "retry-after" not in never.headers
    exposed = {h.strip() for h in never.headers["access-control-expose-headers"].split(",")}
    assert "x-should-retry" in exposed  # a browser client reads it too
    # One that waiting lets through keeps its Retry-After, and no such header.
    assert spent.status_code == 200
    assert later.status_code == 429
    assert int(later.headers["retry-after"]) >= 1
    assert "x-should-retry" not in later.headers


def test_a_request_no_backend_saw_gives_its_tokens_back(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """Refused by the gateway itself (here: no such model; also at capacity or with the
    backend down), a request is retried by its client: its estimated tokens come back."""
    app = _app(
        test_policy,
        backend,
        metrics_registry,
        tenants={"t": TenantConfig(tokens_per_minute=1000)},
    )
    with TestClient(app=app) as c:
        missing = [
            c.post(
                "/v1/chat/completions",
                json={**CHAT, "model": "no-such-model", "max_tokens": 600},
                headers=AUTH,
            )
            for _ in range(3)
        ]
        ok = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 600}, headers=AUTH)
    assert [r.status_code for r in missing] == [404, 404, 404]
    assert ok.status_code == 200  # was 429: the 404s had spent the minute's tokens
    assert backend.requests
    assert all(r.model == "fake-model" for r in backend.requests)


@pytest.mark.parametrize(
    ("error", "stream"),
    [
        # The local engine's refusal when its queue is full (Retry-After: 1).
        (BackendError("the local engine is at capacity; retry shortly", status=429), False),
        (BackendError("the local engine is at capacity; retry shortly", status=429), True),
        (BackendTimeout("the backend took too long"), False),
        (BackendError("upstream failed before the first token", status=502), True),
    ],
    ids=["engine-429", "engine-429-stream", "timeout", "502-before-the-first-chunk-stream"],
)
def test_a_backend_refusal_that_generated_nothing_gives_its_tokens_back(
    test_policy: Path,
    backend: FakeBackend,
    metrics_registry: CollectorRegistry,
    error: BackendError,
    stream: bool,
) -> None:
    """A backend that refused (its own 429) or failed before producing any output used no
    tokens: the client that retries, as told, must not spend its minute on refusals. The
    request itself stays counted in requests per minute."""
    backend.error = error
    app = _limited_app(
        test_policy,
        backend,
        metrics_registry,
        TenantConfig(tokens_per_minute=1000, requests_per_minute=4),
    )
    body = {**CHAT, "max_tokens": 400, "stream": stream}
    with TestClient(app=app) as c:
        refused = [c.post("/v1/chat/completions", json=body, headers=AUTH) for _ in range(3)]
        backend.error = None
        ok = c.post("/v1/chat/completions", json=body, headers=AUTH)
        over = c.post("/v1/chat/completions", json=body, headers=AUTH)
    # A stream that fails before its first chunk is a plain HTTP error too.
    assert [r.status_code for r in refused] == [error.status] * 3
    assert all(r.json()["error"]["code"] != "rate_limit_exceeded" for r in refused)
    assert ok.status_code == 200  # was 429: the refusals had spent 3 x 401 tokens
    assert over.status_code == 429
    assert "requests per minute (4)" in over.json()["error"]["message"]


def test_moderation_is_charged_every_text_the_filters_read(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """The prompt and the context of /v1/moderations are read by the filters and the
    groundedness scorer as the input is: they are charged as it is (only the input was,
    so any amount of context cost a few tokens)."""
    app = _limited_app(test_policy, backend, metrics_registry, TenantConfig(tokens_per_minute=100))
    with TestClient(app=app) as c:
        # 1 + 75 tokens: the input and the prompt.
        first = c.post("/v1/moderations", json={"input": "hi", "prompt": "p" * 300}, headers=AUTH)
        # 1 + 25 tokens: the input and the context, with 24 left.
        context = {"input": "hi", "context": ["c" * 100]}
        second = c.post("/v1/moderations", json=context, headers=AUTH)
        huge = c.post("/v1/moderations", json={"input": "hi", "context": "c " * 2000}, headers=AUTH)
    assert first.status_code == 200
    assert second.status_code == 429  # was 200: each had cost 1 token
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert huge.status_code == 429
    assert huge.headers["x-should-retry"] == "false"  # 1001 tokens: never


def test_chat_documents_are_charged_and_stay_charged_after_usage(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """A chat's documents are read by the filters, never by the backend, so the backend's
    usage does not count them: they are charged up front and stay charged."""
    app = _limited_app(test_policy, backend, metrics_registry, TenantConfig(tokens_per_minute=1000))
    body = {**CHAT, "max_tokens": 10, "documents": ["The weather is mild today. " * 74]}
    with TestClient(app=app) as c:  # 1998 characters: 500 tokens each
        first = c.post("/v1/chat/completions", json=body, headers=AUTH)
        second = c.post("/v1/chat/completions", json=body, headers=AUTH)
    assert first.status_code == 200
    assert first.json()["usage"]["prompt_tokens"] == 5  # the backend's count, no documents
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"


def test_stop_sequences_are_charged_as_the_filters_read_them(
    test_policy: Path, backend: FakeBackend, metrics_registry: CollectorRegistry
) -> None:
    """The input filters read the stop sequences (four of 256 characters: 256 tokens of
    work), so they are charged with the prompt, as tool call ids are (they were free)."""
    app = _limited_app(test_policy, backend, metrics_registry, TenantConfig(tokens_per_minute=100))
    stops = ["abcd" * 63 + "abc" + str(i) for i in range(4)]  # 256 characters each
    with TestClient(app=app) as c:
        r = c.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stop": stops}, headers=AUTH
        )
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["x-should-retry"] == "false"  # over a whole minute's tokens: never
    assert backend.requests == []


# Two keys whose sha256 begin with the same 8 hex digits (their key id, 50b2b380).
SAME_ID = ("sk-00001156", "sk-00033219")


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_two_keys_with_one_key_id_have_two_budgets(
    test_policy: Path, backend: FakeBackend, request: pytest.FixtureRequest, store: str
) -> None:
    """Buckets were keyed by the 8-digit key id (32 bits): among many keys some pairs
    share one, and one tenant's traffic spent another's budget."""
    a, b = SAME_ID
    assert hashlib.sha256(a.encode()).hexdigest()[:8] == hashlib.sha256(b.encode()).hexdigest()[:8]
    extra: dict[str, object] = {}
    if store == "redis":
        redis_url = request.getfixturevalue("redis_url")
        subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=False, capture_output=True)
        extra["rate_limit_redis_url"] = redis_url
    app = _app(
        test_policy,
        backend,
        CollectorRegistry(),
        api_keys=[
            ApiKeyEntry(tenant="acme", key_sha256=hashlib.sha256(a.encode()).hexdigest()),
            ApiKeyEntry(tenant="beta", key_sha256=hashlib.sha256(b.encode()).hexdigest()),
        ],
        rate_limit_requests_per_minute=2,
        **extra,
    )
    with TestClient(app=app) as c:
        acme = [
            c.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {a}"})
            for _ in range(3)
        ]
        beta = c.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {b}"})
    assert [r.status_code for r in acme] == [200, 200, 429]
    assert beta.status_code == 200  # was 429: acme's two requests had spent its budget


# About 4,000 characters the test policy lets through, a sentence it blocks, then more.
MILD = "The weather is mild today. "
LONG_REPLY = MILD * 150 + "Here is how to build a bomb at home. " + MILD * 50


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ("ok", "the output filters block it mid-way"),
        ("die_mid_stream", "the upstream dies after half of it"),
    ],
)
def test_a_stream_cut_short_is_charged_the_tokens_the_backend_generated(
    test_policy: Path, metrics_registry: CollectorRegistry, mode: Mode, how: str
) -> None:
    """A stream cut short never reads the backend's usage: it is charged at least what
    the backend sent before the cut (characters / 4), not just its up-front estimate."""
    upstream = FakeUpstream(reply=LONG_REPLY, mode=mode, times=1)
    settings = Settings(
        policy=str(test_policy),
        api_keys=[ApiKeyEntry(tenant="t", key_sha256=hashlib.sha256(KEY.encode()).hexdigest())],
        tenants={"t": TenantConfig(tokens_per_minute=1000)},
        backend="remote",
        models=["fake-model"],
        # The estimate of a request without max_tokens (no max_tokens goes upstream).
        default_max_tokens=16,
    )
    backend = RemoteBackend([upstream.base_url], fake_client(upstream), owns_client=True)
    app = create_app(
        settings,
        backend=backend,
        metrics_registry=metrics_registry,
        rate_limiter=MemoryRateLimiter(Clock()),  # no refill while the test runs
    )
    with TestClient(app=app) as c:
        cut = c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        # 1 + 500 tokens up front: refused only if the cut stream cost over 499.
        after = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=AUTH)
    assert cut.status_code == 200, how
    assert "build a bomb" not in cut.text
    assert after.status_code == 429, how
    assert after.json()["error"]["code"] == "rate_limit_exceeded"


def test_max_tokens_over_the_gateway_limit_is_400(
    make_app: Callable[..., Litestar], backend: FakeBackend
) -> None:
    with TestClient(app=make_app(max_tokens_limit=1000)) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1001})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "max_tokens_too_large"
    assert r.json()["error"]["param"] == "max_tokens"
    assert backend.requests == []


def test_gateway_uses_redis_when_configured(
    redis_url: str, test_policy: Path, backend: FakeBackend
) -> None:
    subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=False, capture_output=True)
    replicas = [
        _app(
            test_policy,
            backend,
            CollectorRegistry(),
            rate_limit_requests_per_minute=3,
            rate_limit_redis_url=redis_url,
        )
        for _ in range(2)
    ]
    with TestClient(app=replicas[0]) as a, TestClient(app=replicas[1]) as b:
        codes = [
            (a if i % 2 else b).post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code
            for i in range(4)
        ]
    assert codes == [200, 200, 200, 429]
