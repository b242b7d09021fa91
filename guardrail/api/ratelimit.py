"""Rate limits per API key: requests per minute and tokens per minute, as token buckets.

Each key has two buckets, one for requests and one for tokens. A bucket holds up to a
minute's allowance and refills continuously (``limit / 60`` per second), so a client
may burst up to its per-minute limit and then goes at the steady rate. A request
takes from both buckets, or from neither: a request refused for tokens does not use
up a request.

Tokens are counted *before* the call, as an estimate: the prompt's characters / 4
(rounded up) plus the request's ``max_tokens`` (or ``default_max_tokens``). When the
backend reports the real usage, the difference is given back (or taken) with
:meth:`RateLimiter.adjust`; the bucket may go below zero, and the next request waits.
Without usage (a stream cut short never reads it) the estimate stands, or the text the
backend sent (characters / 4) if that counts more; a request that produced no output
(refused by the gateway or the backend) gets its tokens back, not its request (see
``Serving._correct_tokens``). A request larger than a whole minute's tokens is refused
outright (it could never pass: 429 with ``x-should-retry: false``, no Retry-After).

Buckets are keyed by the caller's :attr:`~guardrail.api.auth.Principal.bucket`: an API
key's whole sha256, never its 8-digit key id (two keys may share one).

Two implementations behind one protocol:

- :class:`MemoryRateLimiter`: in this process (the default; each replica counts alone).
- :class:`RedisRateLimiter`: in Redis (``rate_limit_redis_url``), so every replica
  shares one budget per key. Each check is one Lua script (atomic; the time is
  Redis's own ``TIME``, so replica clocks do not matter); keys expire when full.

If Redis cannot be reached, requests are let through (fail open) and the failure
is logged and counted: a rate limiter is abuse control, and an outage of it should
not become an outage of the gateway.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from guardrail.errors import MissingDependencyError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("guardrail.ratelimit")

CHARS_PER_TOKEN = 4


def estimate_tokens(prompt_chars: int, max_tokens: int) -> int:
    """Tokens charged up front: prompt characters / 4, rounded up, plus max_tokens."""
    return math.ceil(prompt_chars / CHARS_PER_TOKEN) + max_tokens


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute limits of one key; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def unlimited(self) -> bool:
        return not self.requests_per_minute and not self.tokens_per_minute


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Whether a request may go; if not, which limit refused it and when to retry."""

    allowed: bool
    limit: str = ""  # "requests" or "tokens" when refused
    retry_after_s: float = 0.0


ALLOWED = RateDecision(True)


class RateLimiter(Protocol):
    """Token buckets per key. Example::

    decision = await limiter.acquire("3fa9c2e1", Limits(60, 40_000), tokens=700)
    if not decision.allowed:
        ...  # 429, Retry-After: ceil(decision.retry_after_s)
    await limiter.adjust("3fa9c2e1", Limits(60, 40_000), tokens=-200)  # real usage was less
    """

    async def acquire(self, key: str, limits: Limits, *, tokens: int) -> RateDecision: ...

    async def adjust(self, key: str, limits: Limits, *, tokens: int) -> None: ...

    async def aclose(self) -> None: ...


# --- in memory ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    level: float
    stamp: float
    limit: float  # per minute, as last applied


class MemoryRateLimiter:
    """Token buckets in this process. ``clock`` is injectable for tests (seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key: str, kind: str, limit: int, now: float) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = _Bucket(float(limit), now, float(limit))
        else:
            rate = limit / 60.0
            bucket.level = min(float(limit), bucket.level + (now - bucket.stamp) * rate)
            bucket.stamp = now
            bucket.limit = float(limit)
        return bucket

    async def acquire(self, key: str, limits: Limits, *, tokens: int) -> RateDecision:
        if limits.unlimited:
            return ALLOWED
        now = self._clock()
        with self._lock:
            wanted = [
                (kind, limit, cost)
                for kind, limit, cost in (
                    ("requests", limits.requests_per_minute, 1),
                    ("tokens", limits.tokens_per_minute, tokens),
                )
                if limit
            ]
            buckets = [
                (kind, limit, cost, self._bucket(key, kind, limit, now))
                for kind, limit, cost in wanted
            ]
            # A cost over a whole minute's limit never passes, whatever the other bucket
            # says; otherwise the wait is the longest of the buckets that refuse, so a
            # client that waits Retry-After is not refused again by the other one.
            for kind, limit, cost, _ in buckets:
                if cost > limit:
                    return RateDecision(False, kind, 60.0)
            waits = [
                (kind, (cost - bucket.level) * 60.0 / limit)
                for kind, limit, cost, bucket in buckets
                if bucket.level < cost
            ]
            if waits:
                kind, wait = max(waits, key=lambda w: w[1])
                return RateDecision(False, kind, wait)
            for _, _, cost, bucket in buckets:
                bucket.level -= cost
            if len(self._buckets) > 100_000:
                self._evict(now)
        return ALLOWED

    async def adjust(self, key: str, limits: Limits, *, tokens: int) -> None:
        if not limits.tokens_per_minute or not tokens:
            return
        now = self._clock()
        with self._lock:
            bucket = self._bucket(key, "tokens", limits.tokens_per_minute, now)
            bucket.level = min(float(limits.tokens_per_minute), bucket.level - tokens)

    def _evict(self, now: float) -> None:
        # Forgetting a full bucket changes nothing (a new one starts full). One that
        # ``adjust`` took below zero needs more than a minute to be full again.
        full = [
            k
            for k, b in self._buckets.items()
            if b.level + (now - b.stamp) * b.limit / 60.0 >= b.limit
        ]
        for k in full:
            del self._buckets[k]

    async def aclose(self) -> None:
        return None


# --- Redis ---------------------------------------------------------------------------------

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm, token cost, mode (1 acquire, 0 adjust).
# Returns {allowed (1/0), refused limit (1 requests, 2 tokens), retry after in ms}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local costs = {1, tonumber(ARGV[3])}
local acquire = ARGV[4] == '1'
local levels = {}
local never = 0
local worst, worst_wait = 0, 0
for i = 1, 2 do
  local limit = limits[i]
  if limit > 0 then
    local b = redis.call('HMGET', KEYS[i], 'level', 'stamp')
    local level = tonumber(b[1])
    local stamp = tonumber(b[2])
    if level == nil then
      level = limit
    else
      level = math.min(limit, level + (now - stamp) * limit / 60000)
    end
    levels[i] = level
    if acquire then
      if costs[i] > limit then
        if never == 0 then never = i end
      elseif level < costs[i] then
        local wait = math.ceil((costs[i] - level) * 60000 / limit)
        if wait > worst_wait then worst, worst_wait = i, wait end
      end
    end
  end
end
if never > 0 then
  return {0, never, 60000}
end
if worst > 0 then
  return {0, worst, worst_wait}
end
for i = 1, 2 do
  local limit = limits[i]
  if limit > 0 and (acquire or i == 2) then
    local level = math.min(limit, levels[i] - costs[i])
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'stamp', now)
    local refill_ms = math.ceil((limit - level) * 60000 / limit) + 1000
    redis.call('PEXPIRE', KEYS[i], refill_ms)
  end
end
return {1, 0, 0}
"""

_LIMIT_NAMES = {1: "requests", 2: "tokens"}


class RedisRateLimiter:
    """Token buckets in Redis, shared by every replica that uses the same server.

    Example::

        limiter = RedisRateLimiter.from_url("redis://redis:6379/0")
    """

    def __init__(self, client: Redis, *, prefix: str = "guardrail:rl:") -> None:
        self._client = client
        self._prefix = prefix
        self._script: Any = client.register_script(_SCRIPT)
        self._failures = 0

    @classmethod
    def from_url(cls, url: str) -> RedisRateLimiter:
        try:
            from redis.asyncio import Redis
        except ImportError as e:
            raise MissingDependencyError("redis", "redis") from e
        client = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client)

    def _keys(self, key: str) -> list[str]:
        # A hash tag keeps both buckets of a key in one Redis Cluster slot.
        return [f"{self._prefix}{{{key}}}:requests", f"{self._prefix}{{{key}}}:tokens"]

    async def _run(self, key: str, limits: Limits, tokens: int, mode: int) -> list[int] | None:
        try:
            result = await self._script(
                keys=self._keys(key),
                args=[limits.requests_per_minute, limits.tokens_per_minute, tokens, mode],
            )
        except Exception as e:  # redis.RedisError, OSError, timeouts: fail open
            # Only a failed check lets a request through unlimited; a failed correction
            # after the answer (mode 0) lets nothing through, so it is logged, not counted
            # (counted, every request let through showed twice on the dashboard).
            if mode:
                self._failures += 1
            log.warning(
                "rate_limit_store_failed",
                op="check" if mode else "adjust",
                error=type(e).__name__,
                failures=self._failures,
            )
            return None
        return [int(x) for x in result]

    @property
    def failures(self) -> int:
        """How many checks could not reach Redis (and were let through)."""
        return self._failures

    async def acquire(self, key: str, limits: Limits, *, tokens: int) -> RateDecision:
        if limits.unlimited:
            return ALLOWED
        result = await self._run(key, limits, tokens, 1)
        if result is None or result[0] == 1:
            return ALLOWED
        return RateDecision(False, _LIMIT_NAMES.get(result[1], "requests"), result[2] / 1000.0)

    async def adjust(self, key: str, limits: Limits, *, tokens: int) -> None:
        if not limits.tokens_per_minute or not tokens:
            return
        await self._run(key, Limits(0, limits.tokens_per_minute), tokens, 0)

    async def aclose(self) -> None:
        await self._client.aclose()


def build_rate_limiter(redis_url: str | None) -> RateLimiter:
    """Redis when a URL is configured, else in memory."""
    if redis_url:
        return RedisRateLimiter.from_url(redis_url)
    return MemoryRateLimiter()


__all__ = [
    "ALLOWED",
    "Limits",
    "MemoryRateLimiter",
    "RateDecision",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "estimate_tokens",
]
