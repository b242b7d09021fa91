"""From a validated wire request to a moderated answer (the "serving" layer, as in vLLM).

One request is one :class:`~guardrail.exchange.Exchange`. The order never changes:
input filters on every message, then the backend (only if nothing blocked), then the
output filters on the whole completion, or window by window for a stream (see
:mod:`guardrail.guard.stream`). When the exchange is finished, whatever happened, it
is handed to :meth:`Gateway.record` exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec
import structlog
from litestar import Response
from litestar.response import Stream
from litestar.types import Receive

from guardrail.api.auth import OPEN_PRINCIPAL, Principal, TenantRules, Tenants, principal_of
from guardrail.api.consistency import ConsistencyChecker
from guardrail.api.errors import CLIENT_DISCONNECTED, APIError, from_backend_error
from guardrail.api.json_reading import (
    SEPARATOR,
    JsonPiece,
    Reading,
    json_pieces,
    redacted_values,
    rewritten_json,
)
from guardrail.api.ratelimit import (
    CHARS_PER_TOKEN,
    Limits,
    MemoryRateLimiter,
    RateLimiter,
    estimate_tokens,
)
from guardrail.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionTool,
    ModerationRequest,
    document_texts,
)
from guardrail.backends.base import (
    Backend,
    Chunk,
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)
from guardrail.chat import Message, ToolCall
from guardrail.errors import BackendError, BackendUnavailable, where
from guardrail.exchange import OVERLOADED, Exchange, Outcome, Route
from guardrail.filters.pii import with_placeholders
from guardrail.guard.filter import Grounder, Grounds, text_pass
from guardrail.guard.guard import Guard
from guardrail.guard.shadow import ShadowPolicy
from guardrail.guard.store import GuardStore, ReloadResult
from guardrail.guard.stream import StreamGuard, check_continuation, ends_inside_override
from guardrail.guard.types import (
    FILTER_ERROR_CATEGORY,
    Action,
    Decision,
    FilterContext,
    Finding,
    Stage,
    apply_redactions,
    redacted_span,
)
from guardrail.observability.audit import AuditLog, redacted_text
from guardrail.observability.metrics import GatewayMetrics
from guardrail.observability.monitoring import Monitor
from guardrail.policy.openai_categories import OPENAI_CATEGORIES, OpenAICategory
from guardrail.settings import Settings

log = structlog.get_logger("guardrail.serving")

_encode = msgspec.json.Encoder().encode
MODELS_REFRESH_S = 5.0
API_ROUTES: dict[str, Route] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/moderations": "moderations",
}


class Slots:
    """Bounded concurrency: ``limit`` requests at once, at most ``queue`` waiting.

    A request past the queue, or one that waited ``timeout_s`` for a slot, gets 503
    ``overloaded`` with ``Retry-After``: a saturated gateway sheds load at once instead
    of letting latency grow without bound.
    """

    def __init__(self, limit: int, queue: int, timeout_s: float) -> None:
        self.limit = limit
        self.queue = queue
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(limit)
        self.active = 0
        self.waiting = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def acquire(self) -> None:
        if self._sem.locked():
            if self.waiting >= self.queue:
                raise _overloaded(f"{self.limit} requests are being served and {self.waiting} wait")
            self.waiting += 1
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._sem.acquire()
            except TimeoutError:
                raise _overloaded(f"no slot freed within {self.timeout_s:g}s") from None
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()
        self.active += 1
        self._idle.clear()

    def release(self) -> None:
        self.active -= 1
        self._sem.release()
        if not self.active:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request holds a slot (for graceful shutdown)."""
        await self._idle.wait()


# Refusals before any backend saw the request, for the gateway's own reasons.
_NOT_SERVED = frozenset({OVERLOADED, "model_not_found", "backend_unavailable"})


_ID_SEPARATORS = re.compile(r"[_.:-]+")
# Where a word starts inside a CamelCase id: before a capital that follows a small letter
# or a digit, and before the last capital of a run that a small letter follows
# ("HTTPServer" is "HTTP Server").
_CAMEL_JOINTS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _id_readings(tool_call_id: str) -> tuple[str, str, str]:
    """An id as written (a key's pattern holds its dashes), with its separators as
    spaces (``how-to-build-a-bomb``), and with its CamelCase words apart too
    (``HowToBuildABomb``): in each, its words are words to the filters."""
    spaced = _ID_SEPARATORS.sub(" ", tool_call_id)
    return tool_call_id, spaced, _CAMEL_JOINTS.sub(" ", spaced)


@dataclass(frozen=True, slots=True)
class Readings:
    """A text of ids and other parts the filters read, one per line, and ``written``:
    the same with every line that is an id read with its words apart blanked, which the
    pii filter reads instead (see :meth:`Guard.check`); ``identifiers``: the spans of
    the id lines that are not words, which no model reads (see :func:`_id_lines`)."""

    text: str
    written: str
    identifiers: tuple[tuple[int, int], ...] = ()

    def context(self, ctx: FilterContext) -> FilterContext:
        """``ctx`` for this text: its identifiers marked."""
        return dataclasses.replace(ctx, identifiers=self.identifiers)


class _Line(NamedTuple):
    """One line of a :class:`Readings`: its text, what the pii filter reads of it, and
    whether it is an id's (or a function name's) reading that is not words."""

    text: str
    written: str
    identifier: bool = False


def _id_lines(*ids: str) -> list[_Line]:
    """The lines ``ids`` are read on (:func:`_id_readings`, each once), each with what
    the pii filter reads of it: an id as written, blanks for another reading.

    Those readings are there to find words. Read for personal data, they made it up out
    of valid random ids, which cannot be rewritten, so that refused them: about one in a
    hundred of "toolu_01..." ("01 Hwus AVE3", a street address) and of UUIDs ("... 0076
    4007 9121 ...", a phone number). An id that is one as written is still refused."""
    lines = dict.fromkeys(line for i in ids for line in _id_readings(i))
    return [
        _Line(line, line if line in ids else " " * len(line), not _words(line)) for line in lines
    ]


# A word: small letters with a vowel among them, the first perhaps a capital ("build",
# "Pipe", "by"), or "a" or "I". A random id's letters are mixed ("GClbaNFDp").
_WORD = re.compile(r"[A-Za-z]?[a-z]*[aeiouy][a-z]*|[AaIi]")


def _words(line: str) -> bool:
    """Whether an id's reading is words alone (``how to build a bomb``, ``get weather``).

    Only those are read by the models (a rules classifier, semantic examples): a random
    id read by them was noise they scored, and under the default policy one tool message
    in three was refused as a prompt injection ("call_Bd0Kh8oO...", "toolu_01Cryn687...").
    Random ids hold digits or letters no word has (``Bd0``, ``Kh8o``); keywords and
    regexes still read every reading."""
    tokens = line.split()
    return bool(tokens) and all(_WORD.fullmatch(t) for t in tokens)


def _blanked(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with ``spans`` written as spaces (the same length)."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


def _joined(lines: list[_Line]) -> Readings:
    """``lines`` as one text, one per line."""
    identifiers = []
    at = 0
    for line in lines:
        if line.identifier:
            identifiers.append((at, at + len(line.text)))
        at += len(line.text) + 1
    return Readings(
        "\n".join(line.text for line in lines),
        "\n".join(line.written for line in lines),
        tuple(identifiers),
    )


def _strings(value: object, parts: list[str]) -> None:
    """Every string and object key in a JSON value (a schema), in order, onto ``parts``."""
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            parts.append(str(key))
            _strings(item, parts)
    elif isinstance(value, list):
        for item in value:
            _strings(item, parts)


def format_text(response_format: object) -> str:
    """The text a ``response_format`` puts before the model: every string and object key
    in it but the top-level ``type`` (``json_object`` itself says nothing), one per line."""
    if not isinstance(response_format, dict):
        return ""
    parts: list[str] = []
    for key, value in response_format.items():
        if key != "type":
            parts.append(str(key))
            _strings(value, parts)
    return "\n".join(p for p in parts if p.strip())


def tools_text(tools: list[FunctionTool]) -> Readings:
    """The text tool definitions put before the model, one piece per line: each function's
    name read as an id is (its words apart: ``build_a_bomb``), its description, and its
    parameters' schema as :func:`format_text` reads a schema."""
    lines: list[_Line] = []
    for tool in tools:
        function = tool.function
        lines += _id_lines(function.name)
        parts = [function.description] if function.description else []
        _strings(function.parameters, parts)
        lines += [_Line(p, p) for p in parts]
    return _joined([line for line in lines if line.text.strip()])


@dataclass(frozen=True, slots=True)
class _JsonResult:
    """A tool message's content that is a JSON object or array: its ``pieces`` and the
    ``reading`` the filters get, each key and value decoded, apart (``SEPARATOR``)."""

    content: str
    pieces: tuple[JsonPiece, ...]
    reading: Reading

    def written(self, decision: Decision) -> str:
        """The content with ``decision``'s redactions (of the reading) applied inside its
        strings: still JSON."""
        placed = self.reading.place(decision.redactions) or {}
        values = redacted_values({k: p.value for k, p in enumerate(self.pieces)}, placed)
        return rewritten_json(self.content, self.pieces, values)


def _json_results(messages: tuple[Message, ...]) -> dict[int, _JsonResult]:
    """The tool messages whose content is a JSON object or array, by index.

    A tool's result goes to the model, which reads its strings decoded (a line break,
    not ``\\n``; ``@``, not ``\\u0040``): so do the filters. Plain text, or a lone JSON
    number or string, is read as written.
    """
    out = {}
    for i, m in enumerate(messages):
        if m.role != "tool" or m.content.lstrip()[:1] not in ("{", "["):
            continue
        pieces = json_pieces(m.content)
        if pieces is None:
            continue
        reading = Reading()
        for k, piece in enumerate(pieces):
            if k:
                reading.add(SEPARATOR)
            reading.add(piece.value, piece=k)
        out[i] = _JsonResult(m.content, pieces, reading)
    return out


@dataclass(frozen=True, slots=True)
class _CheckedCalls:
    """Tool calls through the filters: the ``decision`` on their text, and the ``calls``
    with its redactions applied to their arguments."""

    decision: Decision
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class _CallsReading:
    """Tool calls as :func:`_check_calls` reads them: the ``reading``, each call's JSON
    ``pieces`` (``None``: its arguments are not JSON, read as written), and for each
    value the reading holds, by its number there, its ``owners`` (call, piece) and its
    ``values``."""

    reading: Reading
    pieces: tuple[tuple[JsonPiece, ...] | None, ...]
    owners: tuple[tuple[int, int], ...]
    values: tuple[str, ...]
    text: str
    written: str
    """``text`` with the id readings the pii filter does not read blanked (see _id_lines)."""
    identifiers: tuple[tuple[int, int], ...]
    """The id readings no model reads (see FilterContext.identifiers)."""

    @classmethod
    def of(cls, calls: tuple[ToolCall, ...]) -> _CallsReading:
        reading = Reading()
        pieces = tuple(json_pieces(c.arguments) for c in calls)
        owners: list[tuple[int, int]] = []
        values: list[str] = []
        unread: list[tuple[int, int]] = []
        identifiers: list[tuple[int, int]] = []
        for n, (c, parsed) in enumerate(zip(calls, pieces, strict=True)):
            if n:
                reading.add(SEPARATOR)
            for j, line in enumerate(_id_lines(c.id, c.name)):
                if j:
                    reading.add("\n", fixed=True)
                start = reading.length
                reading.add(line.text, fixed=True)
                if line.identifier:
                    identifiers.append((start, reading.length))
                if line.written != line.text:
                    unread.append((start, reading.length))
            read = [p.value for p in parsed] if parsed is not None else [c.arguments]
            for k, value in enumerate(read):
                reading.add(SEPARATOR)
                reading.add(value, piece=len(values))
                owners.append((n, k))
                values.append(value)
            said = " ".join(v for k, v in enumerate(read) if parsed is None or not parsed[k].key)
            if said.strip():
                name = _id_readings(c.name)[-1]
                reading.add(f"{SEPARATOR}{name} {said[:_NAME_READING_CHARS]}")
        text = reading.text
        return cls(
            reading,
            pieces,
            tuple(owners),
            tuple(values),
            text,
            _blanked(text, unread),
            tuple(identifiers),
        )


# How much of a call's argument values are read after its name (see _check_calls): a
# phrase split between the two lies at the start, and every value is read whole apart.
_NAME_READING_CHARS = 1_000


async def _check_calls(
    guard: Guard, stage: Stage, calls: tuple[ToolCall, ...], ctx: FilterContext
) -> _CheckedCalls:
    """Pass tool calls through ``stage``'s filters, as one text: each call's id and name
    (read as a tool message's id is: as written, with separators as spaces, CamelCase
    apart) on lines of their own, then its arguments, then its name's words followed by
    its argument values (not keys) joined by spaces, so a phrase split between a name and
    its arguments (``build_a`` + ``{"thing": "bomb"}``: "build a bomb") or between two
    values is seen whole. That last reading is read for what it blocks or flags: every
    value in it is read apart before, where its redactions land (read side by side, two
    fields of an address were one to the detector, and a redaction of both would empty
    the second); it holds the values' first ``_NAME_READING_CHARS`` characters, so the
    arguments are read at most once more than that.

    Arguments that are JSON are read as their readers read them (see
    :mod:`guardrail.api.json_reading`): each key, string and number apart (``SEPARATOR``),
    decoded. A redaction or a restored value is applied to the value it lies in and
    written back as a JSON string, so the arguments stay JSON (restored inside the JSON
    as written, a user's address with a line break broke it, and the call was withheld).
    Arguments that are not JSON are read, and redacted, as written. A redaction in an id
    or a name, which a client matches, refuses the calls: the decision is a block, as
    :func:`_refused` makes one.
    """
    # A long call is read off the loop: 80,000 strings of 1.7 MB took 0.3 s.
    read = await text_pass(None, sum(c.chars for c in calls), _CallsReading.of, calls)
    reading, pieces, owners, values = read.reading, read.pieces, read.owners, read.values
    calls_ctx = dataclasses.replace(ctx.at(stage), tool_calls=True, identifiers=read.identifiers)
    decision = await guard.check(stage, read.text, calls_ctx, written=read.written)
    if decision.action is not Action.REDACT:
        return _CheckedCalls(decision, calls)
    placed = reading.place(decision.redactions)
    if placed is None:
        return _CheckedCalls(_refused(decision), calls)
    changed: list[dict[int, str]] = [{} for _ in calls]
    for i, value in redacted_values(dict(enumerate(values)), placed).items():
        n, k = owners[i]
        changed[n][k] = value
    out = []
    for c, parsed, own in zip(calls, pieces, changed, strict=True):
        if not own:
            out.append(c)
            continue
        arguments = own[0] if parsed is None else rewritten_json(c.arguments, parsed, own)
        out.append(dataclasses.replace(c, arguments=arguments))
    return _CheckedCalls(decision, tuple(out))


def _overloaded(why: str) -> APIError:
    return APIError(
        503,
        f"The gateway is at capacity ({why}); retry shortly.",
        code=OVERLOADED,
        headers={"retry-after": "1"},
    )


@dataclass
class Gateway:
    """The running gateway's parts, wired by :func:`guardrail.app.create_app`.

    ``stores`` maps each tenant policy file (other than ``settings.policy``, which is
    ``store``) to its own :class:`GuardStore`. ``on_shutdown`` holds async callables
    the app awaits once open requests have finished (the audit log's flush goes here).
    """

    settings: Settings
    store: GuardStore
    metrics: GatewayMetrics
    backend: Backend | None = None
    backend_error: str | None = None
    models: list[str] = field(default_factory=list)
    # Why the last read of the backend's model list failed (the gateway's own words, e.g.
    # a refused backend_api_key), for the 503 with no names and /readyz; None once one read.
    models_error: str | None = None
    _models_checked: float = 0.0
    # The backend's model list being fetched: every request that finds no names waits on
    # this one fetch rather than answering "lists no models" while it runs.
    _models_fetch: asyncio.Task[None] | None = field(default=None, repr=False)
    tenants: Tenants | None = None
    stores: dict[str, GuardStore] = field(default_factory=dict)
    limiter: RateLimiter = field(default_factory=MemoryRateLimiter)
    slots: Slots | None = None
    on_shutdown: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    audit: AuditLog | None = None
    shadow: ShadowPolicy | None = None
    monitor: Monitor | None = None
    # Scores a text against sources for /v1/moderations when the policy has no
    # grounding filter: (text, sources, question) -> the groundedness report.
    grounding: Grounder | None = None
    consistency: ConsistencyChecker | None = None

    def __post_init__(self) -> None:
        if self.tenants is None:
            self.tenants = Tenants(self.settings)
        if self.slots is None:
            s = self.settings
            self.slots = Slots(s.max_concurrency, s.max_queue, s.queue_timeout_s)

    def rules(self, principal: Principal) -> TenantRules:
        assert self.tenants is not None
        return self.tenants.get(principal.tenant)

    def guard_for(self, rules: TenantRules) -> Guard:
        """The guard of the tenant's policy (the default policy's unless it names one)."""
        store = self.stores.get(rules.policy)
        return (store or self.store).current

    async def admit(self, principal: Principal, rules: TenantRules, tokens: int) -> Limits:
        """Rate-limit one request (429 with Retry-After); returns the limits it ran under."""
        limits = Limits(rules.requests_per_minute, rules.tokens_per_minute)
        if limits.unlimited:
            return limits
        # Buckets are keyed by the key's whole digest: two keys whose 8-digit ids (what
        # logs show) are the same must never share a budget.
        decision = await self.limiter.acquire(principal.bucket, limits, tokens=tokens)
        if not decision.allowed:
            per_minute = (
                limits.requests_per_minute
                if decision.limit == "requests"
                else limits.tokens_per_minute
            )
            self.metrics.rate_limited(decision.limit)
            log.info("rate_limited", key_id=principal.key_id, limit=decision.limit)
            if decision.limit == "tokens" and tokens > per_minute:
                # No wait makes it pass: a Retry-After had the openai SDK sleep a minute,
                # twice, before giving up. Still 429 (as OpenAI answers a request over the
                # limit), with the header the OpenAI SDKs read as "do not retry".
                raise APIError(
                    429,
                    f"Rate limit reached for tokens per minute ({per_minute}) on this API key: "
                    f"this request alone ({tokens} tokens) is larger than a minute's "
                    "allowance, so it can never pass; send less text or a smaller "
                    "max_tokens.",
                    code="rate_limit_exceeded",
                    headers={"x-should-retry": "false"},
                )
            retry = max(1, math.ceil(decision.retry_after_s))
            raise APIError(
                429,
                f"Rate limit reached for {decision.limit} per minute ({per_minute}) on this "
                f"API key; retry after {retry}s.",
                code="rate_limit_exceeded",
                headers={"retry-after": str(retry)},
            )
        return limits

    async def served_models(self) -> list[str]:
        """Configured names, else the backend's, asked again at most every
        ``MODELS_REFRESH_S`` (a vLLM adapter loaded at run time, a redeploy).

        One fetch at a time. With no names yet, callers wait for it; with names, they
        get the last good list while it runs, and a failed fetch keeps that list. A
        caller that gives up (cancelled) leaves the fetch running for the others.
        """
        if self.settings.models:
            return list(self.settings.models)
        fetch = self._models_fetch
        if fetch is None and self.backend is not None and self.models_due_in() == 0:
            self._models_checked = time.monotonic()
            fetch = self._models_fetch = asyncio.create_task(self._fetch_models(self.backend))
        if fetch is not None and not self.models:
            await asyncio.shield(fetch)
        return list(self.models)

    def models_due_in(self) -> float:
        """Seconds until the backend's model list may be asked for again (0: now)."""
        if not self._models_checked:
            return 0.0
        return max(0.0, self._models_checked + MODELS_REFRESH_S - time.monotonic())

    async def _fetch_models(self, backend: Backend) -> None:
        try:
            # An empty list after a good one is an upstream between states (restarting,
            # loading): its last names answer better than 503s until it lists again.
            self.models = await backend.models() or self.models
            self.models_error = None
        except BackendError as e:
            self.models_error = str(e)
            log.warning("models_unavailable", error=type(e).__name__, reason=self.models_error)
        except Exception as e:
            # A refresh nobody awaits: an unexpected error must not be left unretrieved
            # in the task; the last good list stays.
            log.error("models_refresh_failed", error=type(e).__name__)
        finally:
            # Done either way: a failed fetch is tried again after MODELS_REFRESH_S.
            self._models_fetch = None

    async def stop_fetching_models(self) -> None:
        """Cancel a model-list fetch still running (shutdown: its backend is closing)."""
        fetch = self._models_fetch
        if fetch is not None:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch

    async def reload_policy(self, trigger: str) -> ReloadResult:
        """Reload the policy file(s); a bad file keeps its running policy (and is reported).

        Tenant and shadow policies reload too, each on its own: one that fails keeps its
        running version, the others take their new one. The answer is the default
        policy's result; it fails if any policy failed, and its error names every one
        that did by its file (and says which version of the default policy is in force).
        """
        result = await self.store.reload()
        shadow = [(self.shadow.store, "shadow")] if self.shadow is not None else []
        tenants = [(store, "tenant") for store in self.stores.values()]
        failures = [] if result.ok else [result.error or "the default policy failed"]
        warnings = list(result.warnings)
        for store, role in [*tenants, *shadow]:
            other = await store.reload()
            warnings += other.warnings
            if not other.ok:
                # By its file: with several tenant policies, "the tenant policy" alone
                # leaves the operator to guess, and not every error names its file.
                failures.append(f"the {role} policy {store.path} failed: {other.error}")
        if failures and result.ok:
            # The default policy did reload: say so before the others' problems.
            in_force = f"the default policy {result.name} {result.version} is in force"
            first, *rest = failures
            failures = [first.replace(" failed: ", f" failed ({in_force}): ", 1), *rest]
        result = dataclasses.replace(result, warnings=tuple(dict.fromkeys(warnings)))
        if failures:
            result = dataclasses.replace(
                result, ok=False, error="\n".join(failures), partial=result.ok
            )
        self.metrics.policy_reload(result.ok)
        if result.ok:
            log.info("policy_reloaded", trigger=trigger, name=result.name, version=result.version)
        else:
            log.error(
                "policy_reload_failed",
                trigger=trigger,
                # Of the default policy: the one it kept, or the new one it took.
                **{"version" if result.partial else "kept_version": result.version},
                problems=result.error,
            )
        return result

    def require_backend(self) -> Backend:
        if self.backend is None:
            message = (
                f"The backend failed to load: {self.backend_error}"
                if self.backend_error
                else "The backend is still loading; retry shortly."
            )
            raise APIError(503, message, code="backend_unavailable", headers={"retry-after": "5"})
        return self.backend

    def on_rejected(
        self, path: str, request_id: str, status: int, code: str, scope: Any = None
    ) -> None:
        """Count a request the framework refused before a handler ran (bad JSON, schema).

        Only the gateway's own API routes count: a path label must stay a bounded set.
        A request whose key was already checked is recorded under its tenant and the
        tenant's policy, so the tenant's numbers and feedback on it find the row.
        """
        route = API_ROUTES.get(path)
        if route is None:
            return
        exchange = Exchange(request_id=request_id, route=route)
        principal = principal_of(scope) if scope is not None else None
        if principal is not None and not principal.admin and self.tenants is not None:
            exchange.tenant = principal.tenant
            policy = self.guard_for(self.rules(principal)).policy
            exchange.policy_name, exchange.policy_version = policy.name, policy.version
        if code == CLIENT_DISCONNECTED:  # gone mid-upload: the client left, no bug
            exchange.finish("cancelled", status, code)
        else:
            exchange.finish("invalid_request" if status < 500 else "error", status, code)
        self.record(exchange)

    def record(self, exchange: Exchange) -> None:
        """Record a finished exchange in metrics and in one log line (never its text)."""
        if self.monitor is not None:  # first: it sets exchange.groups for the audit row
            self.monitor.record(exchange)
        self.metrics.record(exchange)
        if self.audit is not None:
            keep = self.audit.config.text == "redacted"
            self.audit.record(exchange, text=redacted_text(exchange) if keep else None)
        categories = sorted(
            {
                f.category
                for d in exchange.decisions
                for f in d.findings
                if f.action is not Action.ALLOW
            }
        )
        log.info(
            "exchange",
            request_id=exchange.request_id,
            route=exchange.route,
            tenant=exchange.tenant,
            model=exchange.model,
            stream=exchange.stream,
            outcome=exchange.outcome,
            status=exchange.status_code,
            action=exchange.action.value,
            categories=categories,
            policy_version=exchange.policy_version,
            duration_ms=round((exchange.duration_s or 0) * 1000, 2),
            backend_ms=_ms(exchange.backend_duration_s),
            ttft_ms=_ms(exchange.time_to_first_token_s),
            error_code=exchange.error_code,
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def findings_json(
    decisions: list[tuple[int | None, Decision]], *, spans: bool = True
) -> list[dict[str, Any]]:
    """Findings that acted (flag, redact, block). Scores below every threshold (allow
    findings) are in the moderation endpoint and the ``finding_score`` metric, not here."""
    out = []
    for index, decision in decisions:
        for f in decision.findings:
            if f.action is Action.ALLOW:
                continue
            item = f.to_dict()
            item["stage"] = decision.stage.value
            if index is not None:
                item["message_index"] = index
            if not spans:
                item.pop("span", None)
            elif f.span is not None and decision.stage is Stage.OUTPUT and decision.redactions:
                # A span of the completion the client got, which has the decision's
                # redactions and restores applied: a restored "<EMAIL_ADDRESS_1>" made
                # every later span select other characters.
                item["span"] = list(redacted_span(f.span, decision.redactions))
            out.append(item)
    return out


def guardrail_object(
    exchange: Exchange,
    guard: Guard,
    decisions: list[tuple[int | None, Decision]],
    *,
    spans: bool = True,
) -> dict[str, Any]:
    """The ``guardrail`` object every response carries."""
    policy = guard.policy
    return {
        "request_id": exchange.request_id,
        "action": exchange.action.value,
        "policy": {"name": policy.name, "version": policy.version, "digest": policy.digest[:12]},
        "findings": findings_json(decisions, spans=spans),
    }


def _blocking(decisions: list[tuple[int | None, Decision]]) -> list[Finding]:
    return [f for _, d in decisions if d.blocked for f in d.findings if f.action is Action.BLOCK]


def _refused(decision: Decision) -> Decision:
    """The decision on a part sent as written (a schema, an id, a stop sequence): it
    cannot be rewritten, so what would redact it blocks the request, and is reported
    so. Kept a redaction, it refused with no rule or category named (only blocks are)
    and ``guardrail.action`` "redact" under ``x-guardrail-action: block``."""
    if decision.action is not Action.REDACT:
        return decision
    findings = tuple(
        dataclasses.replace(f, action=Action.BLOCK) if f.action is Action.REDACT else f
        for f in decision.findings
    )
    return dataclasses.replace(decision, action=Action.BLOCK, findings=findings, redactions=())


Kind = Literal["chat", "completions"]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What a route's prepare step yields."""

    texts: list[str]
    """The texts to check."""
    messages: tuple[Message, ...]
    """The conversation."""
    build: Callable[[list[str], tuple[Message, ...]], GenerationRequest]
    """Builds the backend request from the (possibly redacted) texts and the messages
    (whose tool calls' arguments may be redacted)."""
    max_tokens: int
    """The completion's token budget, checked against the limit once, when prepared."""


@dataclass
class _Admission:
    """What a request took on admission (a rate-limit charge, a slot), to undo at close,
    and what it used, to correct the charge with."""

    bucket: str = ""  # the rate-limit key (Principal.bucket)
    tokens: int = 0
    limits: Limits | None = None
    slot: bool = False
    prompt_tokens: int = 0  # the charge's estimate of the prompt (characters / 4)
    # Text only the filters read, never the backend (a chat's documents): its estimate
    # is no part of the backend's usage, and stays charged when usage corrects the rest.
    filter_tokens: int = 0
    generated_chars: int = 0  # text the backend sent, whatever became of it
    backend_failed: bool = False  # the backend raised (before or after some output)


_background: set[asyncio.Task[None]] = set()


async def _as_sent(ctx: FilterContext, texts: list[str]) -> FilterContext:
    """The request's context for its output checks: the messages as the backend got them
    (``texts``, redacted), and the documents, which never reach it, with the request's own
    values as the placeholders the model saw them as.

    The model answers in that form ("Send it to <EMAIL_ADDRESS_1>", restored for the client
    after the checks): against the raw system message, documents and question the
    hallucination filter scored a right answer ungrounded (0.24 support), and so blocked
    it under ``action: block``. Compared in the placeholder form, no raw value the input
    redacted reaches the grounding scorer's models and caches either.
    """
    messages = tuple(
        dataclasses.replace(m, content=t) for m, t in zip(ctx.messages, texts, strict=True)
    )
    documents = ctx.context_documents
    if documents:
        chars = sum(map(len, documents))
        documents = tuple(await text_pass(None, chars, with_placeholders, documents, ctx.state))
    return dataclasses.replace(ctx, messages=messages, context_documents=documents)


def _backend_outcome(e: BackendError) -> Outcome:
    """A backend's refusal of the request itself (a context too long, a parameter it
    does not take: answered 400) is the client's invalid request, not a failing backend:
    counted as one, it fired the backend-errors alert on a client's mistakes. A 429 is
    the backend's capacity, and stays a backend error."""
    return "invalid_request" if e.status == 400 else "backend_error"


def _rejected_outcome(e: APIError) -> Outcome:
    # 5xx here means no usable backend or no capacity (still loading, overloaded).
    return "backend_error" if e.status >= 500 else "invalid_request"


@dataclass
class _Call:
    """One chat or completion call on its way through the gateway."""

    kind: Kind
    exchange: Exchange
    guard: Guard
    ctx: FilterContext
    backend: Backend
    request: GenerationRequest
    input_decisions: list[tuple[int | None, Decision]]
    include_usage: bool
    admission: _Admission | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # The client connection's ASGI receive: tells a non-streamed call the client left.
    receive: Receive | None = None
    # The client asked for JSON: the policy's refusal goes in ``refusal``, not in the
    # content, which the openai SDK's structured-output helpers parse as JSON.
    wants_json: bool = False

    @property
    def response_id(self) -> str:
        # One source for the id format: the audit log stores the same id for feedback.
        return self.exchange.response_id or f"{self.kind}-{self.exchange.request_id}"

    @property
    def lead(self) -> str:
        """The text the completion continues, the output filters' context for its start:
        the prompt of /v1/completions, or a chat's trailing assistant message. Upstreams
        that take that as a prefill (llama.cpp server, Ollama, several hosted APIs)
        continue it; the local engine's chat template opens a new turn after it, where
        the context only reads the answer after the message it follows, so it is used
        whatever the backend."""
        request = self.request
        if request.prompt is not None:
            return request.prompt
        last = request.messages[-1] if request.messages else None
        return last.content if last is not None and last.role == "assistant" else ""

    def output_decisions(self) -> list[tuple[int | None, Decision]]:
        return [(None, d) for d in self.exchange.decisions_at(Stage.OUTPUT)]

    def guardrail(self, *, spans: bool = True) -> dict[str, Any]:
        return guardrail_object(
            self.exchange, self.guard, self.input_decisions + self.output_decisions(), spans=spans
        )

    def headers(self) -> dict[str, str]:
        return {
            "x-request-id": self.exchange.request_id,
            "x-guardrail-action": self.exchange.action.value,
            "x-guardrail-policy-version": self.guard.policy.version,
        }


class Serving:
    """Chat, completion and moderation handling, independent of the HTTP framework."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    # -- entry points -------------------------------------------------------------------

    async def chat(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        principal: Principal = OPEN_PRINCIPAL,
        receive: Receive | None = None,
    ) -> Response[Any]:
        def prepare() -> _Prepared:
            body.refuse_unmoderated()
            limit = self.gw.settings.max_messages
            if len(body.messages) > limit:
                raise APIError(
                    400,
                    f"Too many messages: {len(body.messages)} (limit {limit}).",
                    param="messages",
                    code="too_many_messages",
                )
            messages = tuple(
                Message(
                    m.role,
                    m.text(i),
                    m.tool_call_id,
                    tuple(
                        ToolCall(c.id, c.function.name, c.function.arguments)
                        for c in m.tool_calls or ()
                    ),
                    m.name,  # a tool message's only (refuse_unmoderated)
                )
                for i, m in enumerate(body.messages)
            )
            max_tokens = self._max_tokens(body)
            params = _sampling(body, max_tokens)
            # A client's own limit goes by the name it used; the gateway's default by the
            # one the upstream takes (OpenAI's reasoning models refuse max_tokens; TGI
            # 3.0 read max_completion_tokens differently, huggingface/tgi#2925).
            if body.max_completion_tokens is not None:
                params = dataclasses.replace(params, max_tokens_field="max_completion_tokens")
            elif body.max_tokens is None:
                field_name = self.gw.settings.default_max_tokens_field
                params = dataclasses.replace(params, max_tokens_field=field_name)

            def build(texts: list[str], checked: tuple[Message, ...]) -> GenerationRequest:
                sent = tuple(
                    dataclasses.replace(m, content=t) for m, t in zip(checked, texts, strict=True)
                )
                return GenerationRequest(
                    body.model,
                    request_id,
                    messages=sent,
                    params=params,
                    cache_scope=principal.tenant,
                )

            return _Prepared([m.content for m in messages], messages, build, max_tokens)

        return await self._serve("chat", body, request_id, prepare, principal, receive=receive)

    async def completions(
        self,
        body: CompletionRequest,
        request_id: str,
        principal: Principal = OPEN_PRINCIPAL,
        receive: Receive | None = None,
    ) -> Response[Any]:
        def prepare() -> _Prepared:
            body.refuse_unmoderated()
            prompt = body.prompt_text()
            max_tokens = self._max_tokens(body)
            params = _sampling(body, max_tokens)

            def build(texts: list[str], checked: tuple[Message, ...]) -> GenerationRequest:
                return GenerationRequest(
                    body.model,
                    request_id,
                    prompt=texts[0],
                    params=params,
                    cache_scope=principal.tenant,
                )

            return _Prepared([prompt], (Message("user", prompt),), build, max_tokens)

        return await self._serve(
            "completions", body, request_id, prepare, principal, receive=receive
        )

    async def moderations(
        self,
        body: ModerationRequest,
        request_id: str,
        principal: Principal = OPEN_PRINCIPAL,
    ) -> dict[str, Any]:
        rules = self.gw.rules(principal)
        guard = self.gw.guard_for(rules)
        stage = Stage(body.stage)
        # The model is recorded (logs, audit) only when it is one this gateway serves: a
        # client's made-up name is client text.
        served = body.model is not None and body.model in await self.gw.served_models()
        exchange = self._exchange(
            "moderations", request_id, guard, model=body.model if served else None
        )
        exchange.tenant = principal.tenant
        sources = body.sources()
        ctx = FilterContext(
            request_id,
            stage=stage,
            route="moderations",
            tenant=principal.tenant,
            model=body.model,
            messages=(Message("user", body.prompt),) if body.prompt else (),
            context_documents=sources,
        )
        admission = _Admission()
        try:
            # Every text the filters and the groundedness scorer read: the inputs, the
            # prompt and the sources (read once: their evidence is kept for the others).
            chars = (
                sum(len(t) for t in body.inputs())
                + len(body.prompt or "")
                + sum(len(s) for s in sources)
            )
            await self._admit(admission, principal, rules, estimate_tokens(chars, 0))
            # No message index: the inputs are the texts to judge, not messages of the
            # conversation (that is the prompt alone, if given). Each has its own request
            # state: with one shared, the PII placeholders were numbered in the order the
            # analyses finished, so an input's result depended on the others in the list.
            # A filter's time limit runs from the moment its check starts: with every
            # input started at once, the last of a long batch waited for the CPU behind
            # the others and timed out (a harmless text flagged filter_error). As many
            # at a time as the filter pool has threads, each input's limit is its own.
            running = asyncio.Semaphore(self.gw.settings.filter_workers)

            async def check(text: str) -> Decision:
                async with running:
                    return await guard.check(stage, text, dataclasses.replace(ctx, state={}))

            decisions = await asyncio.gather(*(check(text) for text in body.inputs()))
            exchange.decisions.extend(decisions)
            grounding = None
            if any(source.strip() for source in sources):  # without sources nothing is scored
                grounding = await asyncio.gather(
                    *(
                        self._groundedness(guard, t, sources, body.prompt, principal.tenant)
                        for t in body.inputs()
                    )
                )
            action = exchange.action
            if action is Action.BLOCK:
                exchange.finish("blocked_input" if stage is Stage.INPUT else "blocked_output")
            else:
                exchange.finish(exchange.passed_outcome())
        except APIError as e:
            exchange.finish(_rejected_outcome(e), e.status, e.code)
            raise
        finally:
            self._close(exchange, admission)
        results = [_moderation_result(d, guard.policy.openai_categories) for d in decisions]
        for result, report in zip(results, grounding or (), strict=False):
            result["groundedness"] = report
        return {
            "id": exchange.response_id,
            "model": f"guardrail/{guard.policy.name}",
            "results": results,
            "guardrail": guardrail_object(exchange, guard, [(None, d) for d in decisions]),
        }

    async def _groundedness(
        self, guard: Guard, text: str, sources: tuple[str, ...], prompt: str | None, tenant: str
    ) -> dict[str, Any]:
        """``text`` scored against ``sources``: by the policy's grounding filter if it has
        one (its weights, judge and threshold), else by the gateway's default scorer."""
        for _, filt in guard.filters:
            if isinstance(filt, Grounds):
                return await filt.groundedness(text, sources, prompt, scope=tenant)
        if self.gw.grounding is None:
            raise APIError(
                400,
                "This gateway has no groundedness scorer; 'context' is not supported.",
                param="context",
                code="unsupported_parameter",
            )
        return await self.gw.grounding(text, sources, prompt, tenant)

    # -- the shared path ------------------------------------------------------------------

    async def _serve(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        prepare: Callable[[], _Prepared],
        principal: Principal = OPEN_PRINCIPAL,
        *,
        receive: Receive | None = None,
    ) -> Response[Any]:
        rules = self.gw.rules(principal)
        guard = self.gw.guard_for(rules)
        # The model is recorded once it is known to be one this gateway serves (below).
        exchange = self._exchange(kind, request_id, guard, stream=body.stream)
        exchange.tenant = principal.tenant
        admission = _Admission()
        streaming = False
        ctx: FilterContext | None = None
        try:
            prepared = prepare()
            texts, messages, build = prepared.texts, prepared.messages, prepared.build
            if not rules.allows_model(body.model):
                raise APIError(
                    403,
                    f"This API key's tenant may not use the model '{body.model}'. "
                    f"Allowed: {', '.join(sorted(rules.models))}.",
                    param="model",
                    code="model_not_allowed",
                )
            # Charged: every text the filters read. The messages, a response_format's
            # text, tool definitions, earlier turns' tool calls, tool call ids and stop
            # sequences reach the backend too (its usage corrects them); documents are
            # read by the filters only, and stay charged.
            schema_text = format_text(getattr(body, "response_format", None))
            tool_text = tools_text(
                body.function_tools() if isinstance(body, ChatCompletionRequest) else []
            )
            ids = sum(len(m.tool_call_id or "") + len(m.name or "") for m in messages)
            calls = sum(c.chars for m in messages for c in m.tool_calls)
            stops = body.stop_list()
            documents = document_texts(body.documents)
            admission.prompt_tokens = estimate_tokens(
                sum(len(t) for t in texts)
                + len(schema_text)
                + len(tool_text.text)
                + ids
                + calls
                + sum(map(len, stops)),
                0,
            )
            admission.filter_tokens = estimate_tokens(sum(len(d) for d in documents), 0)
            await self._admit(
                admission,
                principal,
                rules,
                admission.prompt_tokens + admission.filter_tokens + prepared.max_tokens,
            )
            backend = self.gw.require_backend()
            exchange.backend = backend.name
            await self._check_model(body.model, rules)
            exchange.model = body.model
            ctx = FilterContext(
                request_id,
                stage=Stage.INPUT,
                tenant=principal.tenant,
                route=kind,
                model=body.model,
                messages=messages,
                context_documents=documents,
            )
            # A tool's JSON result is read decoded, as the model reads it (its redactions
            # written back into the JSON when it is sent, below).
            results = await text_pass(
                None,
                sum(len(m.content) for m in messages if m.role == "tool"),
                _json_results,
                messages,
            )
            read = messages
            if results:
                read = tuple(
                    dataclasses.replace(m, content=results[i].reading.text) if i in results else m
                    for i, m in enumerate(messages)
                )
                ctx = dataclasses.replace(ctx, messages=read)
            fmt: Decision | None = None
            if schema_text:
                # A JSON schema's names, descriptions and enum values reach the model as
                # instructions: they pass the input filters like a message. Checked
                # first: a placeholder written in it ("<EMAIL_ADDRESS_1>") is then held
                # back before the messages' values are numbered, so the model's echo of
                # it is never "restored" to the user's data.
                fmt = _refused(
                    await guard.check(
                        Stage.INPUT, schema_text, dataclasses.replace(ctx, verbatim=True)
                    )
                )
            tools: Decision | None = None
            if tool_text.text:
                # The same for tool definitions: instructions the model reads, which cannot
                # be rewritten (the model would call a function nobody defined).
                tools = _refused(
                    await guard.check(
                        Stage.INPUT,
                        tool_text.text,
                        tool_text.context(dataclasses.replace(ctx, verbatim=True)),
                        written=tool_text.written,
                    )
                )
            input_decisions = await guard.check_messages(Stage.INPUT, read, ctx)
            exchange.decisions.extend(d for _, d in input_decisions)
            if self.gw.shadow is not None:
                active = Action.strictest(d.action for _, d in input_decisions)
                self.gw.shadow.observe_messages(read, ctx, active)
            if self.gw.monitor is not None:
                self.gw.monitor.probe(guard, ctx, read, input_decisions)
            if any(d.blocked for _, d in input_decisions):
                field = "prompt" if kind == "completions" else "messages"
                raise self._input_blocked(exchange, guard, input_decisions, param=field)
            # Every input decision, the messages' and those of the parts sent as written
            # (schema, tool call ids, stop sequences): the client's ``guardrail`` object
            # and a 400's findings list each one that acted, whichever part it came from.
            checked = list(input_decisions)
            for part, param in ((fmt, "response_format"), (tools, "tools")):
                if part is None:
                    continue
                exchange.decisions.append(part)
                checked.append((None, part))
                # A schema cannot be rewritten: what the policy would redact refuses it.
                if part.blocked:
                    raise self._input_blocked(exchange, guard, checked, param=param)
            await self._check_tool_call_ids(exchange, guard, messages, ctx, checked)
            messages = await self._check_history_calls(exchange, guard, messages, ctx, checked)
            # Stop sequences reach the backend (a hosted provider reads them): checked as
            # written, and refused on what would be redacted, as an id is.
            if stops:
                await self._check_verbatim(
                    exchange, guard, ctx, "\n".join(stops), "stop", checked=checked
                )
            rewritten = list(texts)
            for i, d in input_decisions:
                if i is not None:
                    rewritten[i] = results[i].written(d) if i in results else d.text
            call = _Call(
                kind=kind,
                exchange=exchange,
                guard=guard,
                ctx=await _as_sent(dataclasses.replace(ctx, messages=messages), rewritten),
                backend=backend,
                request=build(rewritten, messages),
                input_decisions=checked,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                admission=admission,
                receive=receive,
                wants_json=isinstance(body, ChatCompletionRequest) and body.wants_json(),
            )
            if ends_inside_override(call.lead):
                # Its completion reads forward where the two are shown as one text and
                # backwards where it is shown alone: checked in one order, the other
                # passed (either way round). No real text ends inside an override.
                raise APIError(
                    400,
                    "The text the completion continues ends inside a right-to-left override "
                    "(U+202E); close it (U+202C) or end the line.",
                    param="prompt"
                    if kind == "completions"
                    else f"messages[{len(messages) - 1}].content",
                    code="invalid_request",
                )
            if body.stream:
                response = await self._start_stream(call)
                streaming = True
                return response
            return await self._complete(call)
        except BackendError as e:
            admission.backend_failed = True
            exchange.finish(_backend_outcome(e), e.status, e.code)
            raise await self._backend_error(e, guard, ctx, exchange) from e
        except ClientDisconnected:
            # Nobody is left to answer; the backend call was cancelled, freeing its slot.
            exchange.finish("cancelled", 499, CLIENT_DISCONNECTED)
            return Response(b"", status_code=499)
        except APIError as e:
            if e.code == "content_filter":
                exchange.finish("blocked_input", e.status, e.code)
            else:
                exchange.finish(_rejected_outcome(e), e.status, e.code)
            raise
        except BaseException as e:
            exchange.finish(
                "cancelled" if isinstance(e, asyncio.CancelledError) else "error",
                499 if isinstance(e, asyncio.CancelledError) else 500,
                type(e).__name__,
            )
            if not isinstance(e, asyncio.CancelledError):
                log.error(
                    "serve_failed", request_id=request_id, error=type(e).__name__, where=where(e)
                )
            raise
        finally:
            if not streaming:  # a stream closes its exchange when it ends
                self._close(exchange, admission)

    async def _backend_error(
        self, e: BackendError, guard: Guard, ctx: FilterContext | None, exchange: Exchange
    ) -> APIError:
        """The client's answer to a backend failure.

        The upstream's own message is text from the model side (a validation error may
        echo the prompt): it is added only if the policy's output filters pass it, as
        they would a completion (redacted where they redact). A block, or any filter
        that failed, withholds it whatever the policy's ``on_error``: the client still
        gets the status and the gateway's message, which names the upstream's status.
        The check is not one of the exchange's decisions: the exchange stays the backend
        error it is, not a blocked or harmful output.
        """
        upstream = e.upstream_message
        if upstream is None:
            return from_backend_error(e)
        decision: Decision | None = None
        if ctx is not None:
            try:
                decision = await guard.check(Stage.OUTPUT, upstream, ctx.at(Stage.OUTPUT))
            except Exception as failure:  # Guard.check does not raise; if it did: closed
                log.error(
                    "upstream_message_check_failed",
                    request_id=exchange.request_id,
                    error=type(failure).__name__,
                    where=where(failure),
                )
        if (
            decision is not None
            and not decision.blocked
            and all(o.status == "ok" for o in decision.outcomes)
        ):
            return from_backend_error(e, decision.text)
        findings = decision.findings if decision is not None else ()
        log.info(
            "upstream_message_withheld",
            request_id=exchange.request_id,
            status=e.status,
            code=e.code,
            categories=sorted({f.category for f in findings if f.action is not Action.ALLOW}),
        )
        return from_backend_error(e)

    async def _check_tool_call_ids(
        self,
        exchange: Exchange,
        guard: Guard,
        messages: tuple[Message, ...],
        ctx: FilterContext,
        checked: list[tuple[int | None, Decision]],
    ) -> None:
        """Tool call ids, and the function names tool messages give, pass the input
        filters: some chat templates write them into the prompt, and their patterns still
        let words through (``how-to-build-a-bomb``).

        Each is read as written (a key's pattern holds its dashes) and with its separators
        as spaces (so its words are words to the filters); personal data is searched in
        it as written only (:func:`_id_lines`). An id cannot be rewritten, so what the
        policy would redact refuses it, as a schema.
        """
        fields = [
            (f"messages[{i}].{key}", value)
            for i, m in enumerate(messages)
            for key, value in (("tool_call_id", m.tool_call_id), ("name", m.name))
            if value
        ]
        if not fields:
            return
        text = _joined([line for _, v in fields for line in _id_lines(v)])
        param = fields[0][0] if len(fields) == 1 else "messages"
        await self._check_verbatim(
            exchange,
            guard,
            text.context(ctx),
            text.text,
            param,
            checked=checked,
            written=text.written,
        )

    async def _check_history_calls(
        self,
        exchange: Exchange,
        guard: Guard,
        messages: tuple[Message, ...],
        ctx: FilterContext,
        checked: list[tuple[int | None, Decision]],
    ) -> tuple[Message, ...]:
        """Earlier turns' tool calls pass the input filters (the model reads their names
        and arguments); ``messages`` with the calls as they go to the backend.

        Unlike a schema or an id, arguments are redacted, not refused: an agent loop sends
        back the calls it was answered with, the user's data restored into them, and
        refused, that broke the policy's redact-and-restore cycle. The request's filter
        state is shared, so a value gets the placeholder it has in the messages, and the
        model's next use of it is restored. Checked after the messages, so theirs is the
        numbering a request without tool calls gets. See :func:`_check_calls` for what
        refuses; one check per assistant message, in order (placeholders are numbered in
        the order the checks end).
        """
        out = list(messages)
        for i, message in enumerate(messages):
            if not message.tool_calls:
                continue
            result = await _check_calls(guard, Stage.INPUT, message.tool_calls, ctx)
            exchange.decisions.append(result.decision)
            checked.append((None, result.decision))
            if result.decision.blocked:
                raise self._input_blocked(
                    exchange, guard, checked, param=f"messages[{i}].tool_calls"
                )
            out[i] = dataclasses.replace(message, tool_calls=result.calls)
        return tuple(out)

    async def _check_verbatim(
        self,
        exchange: Exchange,
        guard: Guard,
        ctx: FilterContext,
        text: str,
        param: str,
        *,
        checked: list[tuple[int | None, Decision]],
        written: str | None = None,
    ) -> None:
        """Pass ``text``, a part of the request the backend gets as written (ids, stop
        sequences), through the input filters: it cannot be rewritten, so what the
        policy would redact refuses the request, as what it would block does. The
        decision joins ``checked``, the request's input decisions so far; ``written`` is
        what the pii filter reads of ``text`` (see :class:`Readings`)."""
        verbatim = dataclasses.replace(ctx, verbatim=True)
        decision = _refused(await guard.check(Stage.INPUT, text, verbatim, written=written))
        exchange.decisions.append(decision)
        checked.append((None, decision))
        if decision.blocked:
            raise self._input_blocked(exchange, guard, checked, param=param)

    def _input_blocked(
        self,
        exchange: Exchange,
        guard: Guard,
        decisions: list[tuple[int | None, Decision]],
        param: str = "messages",
    ) -> APIError:
        blocking = _blocking(decisions)
        message = next((f.message for f in blocking if f.message), None)
        message = message or guard.policy.messages.input_blocked
        return APIError(
            400,
            message,
            code="content_filter",
            param=param,
            headers={
                "x-guardrail-action": "block",
                "x-guardrail-policy-version": guard.policy.version,
            },
            extra={
                "rule_ids": sorted({f.rule_id for f in blocking if f.rule_id}),
                "categories": sorted({f.category for f in blocking}),
                "findings": findings_json(decisions),
            },
            body_extra={"guardrail": guardrail_object(exchange, guard, decisions)},
        )

    async def _complete(self, call: _Call) -> Response[Any]:
        exchange = call.exchange
        started = time.perf_counter()
        completion = await _unless_disconnected(call.backend.generate(call.request), call.receive)
        exchange.backend_duration_s = time.perf_counter() - started
        if call.admission is not None:
            call.admission.generated_chars = len(completion.text) + sum(
                c.chars for c in completion.tool_calls
            )
        exchange.prompt_tokens = completion.prompt_tokens
        exchange.completion_tokens = completion.completion_tokens
        # Checked after the text it continues, as a stream's window after the text before
        # it: the prompt's "The pipe" and the completion's " bomb is simple: ..." each
        # passed alone.
        context_chars = call.guard.policy.stream.context_chars
        decision = await check_continuation(
            call.guard, call.ctx, completion.text, call.lead, context_chars
        )
        exchange.decisions.append(decision)
        calls = await self._checked_calls(call, completion.tool_calls)
        if self.gw.shadow is not None:
            self.gw.shadow.observe_text(
                Stage.OUTPUT, completion.text, call.ctx, decision.action, lead=call.lead
            )
        # A refusal from the backend stays one (moderated as any answer, above).
        refusal = completion.refusal
        if decision.blocked or calls is None:
            text, finish = call.guard.policy.messages.output_blocked, "content_filter"
            refusal = refusal or call.wants_json
            exchange.finish("blocked_output")
            calls = ()
        else:
            text, finish = decision.text, _finish(completion.finish_reason, calls)
            # The released text, as for a stream: what the client got is what is checked,
            # but with the request's own values left as the placeholders the model wrote.
            # The samples and the question hold them too: a restored "Jane Doe" against a
            # sample's "<PERSON_1>" read as a disagreement (0.82 where 0.87 was due).
            unrestored = [r for r in decision.redactions if not r.restore]
            compared = apply_redactions(completion.text, unrestored)
            released = Completion(compared, completion.finish_reason, refusal=refusal)
            if not calls:  # a call is an action, not a claim that samples can agree on
                await self._consistency(call, released, decision)
            exchange.finish(exchange.passed_outcome())
        body = self._completion_body(
            call, text, finish, completion, refusal=refusal, tool_calls=calls
        )
        return Response(body, headers=call.headers())

    async def _checked_calls(
        self, call: _Call, calls: tuple[ToolCall, ...]
    ) -> tuple[ToolCall, ...] | None:
        """The model's tool calls through the output filters (their decision joins the
        exchange's), as the client may get them; ``None`` if they are blocked.

        Checked as a text of their own, not after the content as its continuation: a
        call's arguments are a program's input, redacted and restored inside the JSON
        (see :func:`_check_calls`), and spans and redactions must land in them.
        """
        if not calls:
            return ()
        result = await _check_calls(call.guard, Stage.OUTPUT, calls, call.ctx)
        call.exchange.decisions.append(result.decision)
        return None if result.decision.blocked else result.calls

    async def _consistency(self, call: _Call, answer: Completion, decision: Decision) -> None:
        """Self-consistency for a sampled share of answers that passed (see consistency.py)."""
        checker = self.gw.consistency
        if checker is None or not checker.wanted(answer):
            return
        cut = answer.finish_reason == "length"
        if checker.mode == "inline" and not call.exchange.stream:
            flagged = await checker.inline(
                call.backend, call.request, answer.text, decision, answer_cut=cut
            )
            if flagged is not None:
                call.exchange.decisions.append(flagged)
        else:
            checker.background(call.backend, call.request, answer.text, answer_cut=cut)

    def _completion_body(
        self,
        call: _Call,
        text: str,
        finish: str,
        completion: Completion,
        *,
        refusal: bool,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> dict[str, Any]:
        """``refusal``: ``text`` is a refusal, sent as the message's ``refusal`` (OpenAI's
        field for one) with ``content`` null, so no client parses it as the answer.
        ``tool_calls``: checked calls, with ``content`` null when the model wrote none."""
        if call.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if refusal:
                message = {"role": "assistant", "content": None, "refusal": text}
            elif tool_calls:
                message = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [_tool_call_json(c) for c in tool_calls],
                }
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {
            "id": call.response_id,
            "object": obj,
            "created": call.created,
            "model": call.request.model,
            "choices": [choice],
            "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
            "guardrail": call.guardrail(),
        }

    # -- streaming ---------------------------------------------------------------------------

    async def _start_stream(self, call: _Call) -> Response[Any]:
        """Open the backend stream before answering, so a dead backend is a plain HTTP error."""
        started = time.perf_counter()
        chunks = call.backend.stream(call.request)
        try:
            # A client that leaves before the first chunk (a queued engine, a slow
            # prefill) frees the backend call then, not when the chunk comes.
            first = await _unless_disconnected(anext(chunks), call.receive)
        except StopAsyncIteration:
            first = Chunk("", finish_reason="stop")
        except BaseException:
            await _aclose(chunks)
            raise
        return Stream(
            self._sse(call, first, chunks, started),
            media_type="text/event-stream",
            headers={**call.headers(), "cache-control": "no-cache"},
        )

    async def _sse(
        self, call: _Call, first: Chunk, chunks: AsyncIterator[Chunk], started: float
    ) -> AsyncIterator[bytes]:
        exchange, guard = call.exchange, call.guard
        window = StreamGuard(guard, call.ctx, guard.policy.stream, lead=call.lead)
        finish: FinishReason = "stop"
        prompt_tokens = completion_tokens = None
        recorded = False  # whether window.decisions are in the exchange yet
        refusing = False  # the backend streams a refusal: released text goes in ``refusal``
        # The model's tool calls: whole on the backend's last chunk (it holds their pieces),
        # checked once the text is done, and sent only then.
        calls: tuple[ToolCall, ...] = ()
        try:
            yield self._frame(call, role=True)
            pending: list[Chunk] = [first]
            generated: list[str] = []  # the backend's text, before redaction or restoring
            async for chunk in _prepend(pending, chunks):
                generated.append(chunk.text)
                if call.admission is not None:
                    call.admission.generated_chars += len(chunk.text)
                if chunk.prompt_tokens is not None:
                    prompt_tokens = chunk.prompt_tokens
                if chunk.completion_tokens is not None:
                    completion_tokens = chunk.completion_tokens
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if chunk.tool_calls:
                    calls = chunk.tool_calls
                    if call.admission is not None:
                        call.admission.generated_chars += sum(c.chars for c in calls)
                if not chunk.text:
                    continue
                refusing = refusing or chunk.refusal
                # Each window is sent as soon as it passed: a huge chunk's first window
                # does not wait for the checks of all the others.
                async for released in window.releases(chunk.text):
                    if released.text:
                        if exchange.time_to_first_token_s is None:
                            exchange.time_to_first_token_s = time.perf_counter() - exchange.started
                        yield self._text_frame(call, released.text, refusing)
                if window.blocked:
                    break
            exchange.backend_duration_s = time.perf_counter() - started
            if not window.blocked:
                released = await window.finish()
                if released.text:
                    if exchange.time_to_first_token_s is None:
                        exchange.time_to_first_token_s = time.perf_counter() - exchange.started
                    yield self._text_frame(call, released.text, refusing)
            checked: _CheckedCalls | None = None
            if calls and not window.blocked:
                checked = await _check_calls(guard, Stage.OUTPUT, calls, call.ctx)
            exchange.decisions.extend(window.decisions)
            if checked is not None:
                exchange.decisions.append(checked.decision)
            exchange.stream_window_chars.extend(window.window_chars)
            exchange.stream_holdback_failures.extend(window.holdback_failures)
            exchange.stream_text = window.read_text
            recorded = True
            blocked = window.blocked or (checked is not None and checked.decision.blocked)
            if self.gw.shadow is not None and not blocked:
                # A blocked stream's text was cut short: only whole completions compare.
                active = Action.strictest(d.action for d in window.decisions)
                # The candidate sees what the backend wrote, as for a whole completion,
                # not the active policy's redacted release.
                self.gw.shadow.observe_text(
                    Stage.OUTPUT, "".join(generated), call.ctx, active, lead=call.lead
                )
            exchange.prompt_tokens, exchange.completion_tokens = prompt_tokens, completion_tokens
            if blocked:
                refusal = guard.policy.messages.output_blocked
                # When JSON was asked for, in the content the openai SDK's stream helper
                # parsed it as the JSON's next piece: a parse error, not a content filter.
                # After released text of the same field, a blank line sets it apart.
                same_field = refusing or not call.wants_json
                sep = "\n\n" if window.released_text and same_field else ""
                yield self._text_frame(call, sep + refusal, refusing or call.wants_json)
                finish = "content_filter"
                exchange.finish("blocked_output")
            else:
                # Each call whole, in one delta, before the finish: no piece of one went
                # out before all of them passed.
                for index, made in enumerate(checked.calls if checked is not None else ()):
                    if exchange.time_to_first_token_s is None:
                        exchange.time_to_first_token_s = time.perf_counter() - exchange.started
                    yield self._frame(call, tool_call=_tool_call_json(made, index))
                finish = _finish(finish, calls)
                # Streams are always checked in the background: their text is already sent.
                checker = self.gw.consistency
                answer = Completion(window.unrestored_text, finish, refusal=refusing)
                if checker is not None and not calls and checker.wanted(answer):
                    cut = finish == "length"
                    checker.background(call.backend, call.request, answer.text, answer_cut=cut)
                exchange.finish(exchange.passed_outcome())
            yield self._frame(call, finish=finish, guardrail=call.guardrail(spans=False))
            if call.include_usage:
                # A stream cut short by the policy never read the backend's usage: null,
                # not zeros, so nobody bills or counts a call as free.
                usage = _usage(prompt_tokens, completion_tokens)
                yield self._frame(call, usage=usage, usage_frame=True)
            yield b"data: [DONE]\n\n"
        except BackendError as e:
            if call.admission is not None:
                call.admission.backend_failed = True
            exchange.finish(_backend_outcome(e), e.status, e.code)
            err = await self._backend_error(e, guard, call.ctx, exchange)
            yield b"data: " + _encode(err.body()) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            exchange.finish("cancelled", 499, CLIENT_DISCONNECTED)
            raise
        except Exception as e:
            exchange.finish("error", 500, type(e).__name__)
            log.error(
                "stream_failed",
                request_id=exchange.request_id,
                error=type(e).__name__,
                where=where(e),
            )
            err = APIError(
                500, "Internal error in the gateway while streaming.", code="internal_error"
            )
            yield b"data: " + _encode(err.body()) + b"\n\n"
            yield b"data: [DONE]\n\n"  # every stream ends with it, as clients wait for it
        finally:
            if not recorded:
                exchange.decisions.extend(window.decisions)
                exchange.stream_window_chars.extend(window.window_chars)
                exchange.stream_holdback_failures.extend(window.holdback_failures)
                exchange.stream_text = window.read_text
            try:
                await _aclose(chunks)
            finally:
                # Closing the backend stream may be cancelled too (a client that left is
                # cancelled again at every await): the slot and the record must not leak.
                self._close(exchange, call.admission)

    def _text_frame(self, call: _Call, text: str, refusal: bool) -> bytes:
        """A frame of released text: a chat's ``refusal`` delta when ``refusal``."""
        if refusal and call.kind == "chat":
            return self._frame(call, refusal=text)
        return self._frame(call, content=text)

    def _frame(
        self,
        call: _Call,
        *,
        role: bool = False,
        content: str | None = None,
        refusal: str | None = None,
        tool_call: dict[str, Any] | None = None,
        finish: str | None = None,
        guardrail: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
        usage_frame: bool = False,
    ) -> bytes:
        """One SSE frame. ``refusal``: a chat delta's ``refusal`` text instead of content.
        ``tool_call``: a chat delta of one whole tool call (with its ``index``).
        ``usage_frame``: the last frame of ``include_usage``, no choices, its ``usage`` the
        given counts or null when they are not known."""
        choices: list[dict[str, Any]] = []
        if not usage_frame:
            if call.kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
                elif refusal is not None:
                    delta = {"refusal": refusal}
                elif tool_call is not None:
                    delta = {"tool_calls": [tool_call]}
                elif content is not None:
                    delta = {"content": content}
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            else:
                choices = [
                    {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}
                ]
        body: dict[str, Any] = {
            "id": call.response_id,
            "object": "chat.completion.chunk" if call.kind == "chat" else "text_completion",
            "created": call.created,
            "model": call.request.model,
            "choices": choices,
        }
        if usage_frame or call.include_usage:
            # OpenAI: with include_usage every other chunk carries ``usage: null`` too.
            body["usage"] = usage if usage_frame else None
        if guardrail is not None:
            body["guardrail"] = guardrail
        return b"data: " + _encode(body) + b"\n\n"

    # -- helpers -----------------------------------------------------------------------------

    def _exchange(
        self,
        route: Route,
        request_id: str,
        guard: Guard,
        *,
        model: str | None = None,
        stream: bool = False,
    ) -> Exchange:
        self.gw.metrics.request_started(route)
        return Exchange(
            request_id=request_id,
            route=route,
            model=model,
            stream=stream,
            policy_name=guard.policy.name,
            policy_version=guard.policy.version,
        )

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest) -> int:
        newer = getattr(body, "max_completion_tokens", None)
        asked = newer or body.max_tokens
        name = "max_completion_tokens" if newer else "max_tokens"
        limit = self.gw.settings.max_tokens_limit
        if asked is not None and asked > limit:
            raise APIError(
                400,
                f"{name} is {asked}; this gateway allows at most {limit}.",
                param=name,
                code="max_tokens_too_large",
            )
        return asked or self.gw.settings.default_max_tokens

    async def _admit(
        self, admission: _Admission, principal: Principal, rules: TenantRules, tokens: int
    ) -> None:
        """Rate limit, then take a concurrency slot; ``admission`` remembers what to undo."""
        admission.limits = await self.gw.admit(principal, rules, tokens)
        admission.bucket, admission.tokens = principal.bucket, tokens
        assert self.gw.slots is not None
        await self.gw.slots.acquire()
        admission.slot = True

    def _close(self, exchange: Exchange, admission: _Admission | None = None) -> None:
        exchange.finish("error", 500, "unfinished")  # no-op when already finished
        self.gw.metrics.request_ended(exchange.route)
        if admission is not None:
            if admission.slot:
                assert self.gw.slots is not None
                self.gw.slots.release()
                admission.slot = False
            self._correct_tokens(exchange, admission)
        self.gw.record(exchange)

    def _correct_tokens(self, exchange: Exchange, admission: _Admission) -> None:
        """Give back (or take) the difference between the estimate and the tokens used.

        Used: the backend's reported usage, a count it left out filled in by the gateway's
        own (the prompt's estimate; the text the backend sent, characters / 4), plus the
        text only the filters read (a chat's documents). With no usage at all (a backend
        that reports none, a stream cut short before its usage came: blocked, client
        gone, broken), the estimate stands unless the text the backend sent counts more:
        what the backend generated is always paid for. A request that produced nothing,
        refused by the gateway (at capacity, no such model, backend down) or by the
        backend (its own 429, a 400, a timeout, a failure before the first token), gets
        its whole estimate back: clients retry those, and must not burn their tokens
        doing so. Its request stays counted in requests per minute.
        """
        limits = admission.limits
        if limits is None or not limits.tokens_per_minute:
            return
        generated = math.ceil(admission.generated_chars / CHARS_PER_TOKEN)
        prompt, completion = exchange.prompt_tokens, exchange.completion_tokens
        if prompt is None and completion is None:
            refused = exchange.error_code in _NOT_SERVED or admission.backend_failed
            if refused and not admission.generated_chars:
                used = 0
            else:
                # A blocked prompt, a backend that failed after some output or never
                # reported: keep the estimate, or more if the backend sent more text than
                # it allowed for.
                used = max(
                    admission.tokens,
                    admission.prompt_tokens + admission.filter_tokens + generated,
                )
        else:
            used = (
                (admission.prompt_tokens if prompt is None else prompt)
                + (generated if completion is None else completion)
                + admission.filter_tokens
            )
        delta = used - admission.tokens
        if delta:
            task = asyncio.get_running_loop().create_task(
                self.gw.limiter.adjust(admission.bucket, limits, tokens=delta)
            )
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _check_model(self, model: str, rules: TenantRules) -> None:
        served = await self.gw.served_models()
        if model in served:
            return
        if not served:
            # Retry-After says when the list is asked for again: sooner, a retry finds
            # the same empty list.
            why = (
                f" (reading its list failed: {self.gw.models_error})"
                if self.gw.models_error
                else ""
            )
            raise from_backend_error(
                BackendUnavailable(
                    f"The backend lists no models right now{why}.",
                    retry_after_s=max(1.0, self.gw.models_due_in()),
                )
            )
        # Only what this key's tenant may use, as /v1/models lists: the others' names are
        # none of its business.
        allowed = [m for m in served if rules.allows_model(m)]
        available = (
            f"Available: {', '.join(allowed)}."
            if allowed
            else "None of the models served here is open to this API key."
        )
        raise APIError(
            404,
            f"The model '{model}' does not exist here. {available}",
            param="model",
            code="model_not_found",
        )


T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed its connection before its non-streamed answer was ready."""


async def _client_left(receive: Receive) -> bool:
    """True once the client disconnects; False if the connection cannot say."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
    except Exception:  # a server that cannot be asked: never a reason to stop the call
        return False


async def _unless_disconnected(work: Awaitable[T], receive: Receive | None) -> T:
    """``await work``, cancelled if the client disconnects first (its backend slot freed).

    After the body is read, the ASGI ``receive`` only answers ``http.disconnect``: when
    the client goes away, or once the response is sent.
    """
    if receive is None:
        return await work
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_left(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watch.result():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected
        return await task
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()


async def _aclose(chunks: AsyncIterator[Chunk]) -> None:
    """Close a backend stream (an async generator frees its connection or worker slot)."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


async def _prepend(first: list[Chunk], rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        max_tokens_is_default=(
            body.max_tokens is None and getattr(body, "max_completion_tokens", None) is None
        ),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        extra=body.extra(),
    )


def _finish(reason: FinishReason, calls: tuple[ToolCall, ...]) -> FinishReason:
    """``tool_calls`` for an answer that calls tools and otherwise stopped as the model
    chose (a named ``tool_choice`` ends with ``stop`` on vLLM): clients run the calls
    on that reason. A cut answer stays ``length``: its calls may be cut too."""
    return "tool_calls" if calls and reason == "stop" else reason


def _tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI sends it; ``index``: in a stream's delta."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out |= {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return out


def _usage(prompt: int | None, completion: int | None) -> dict[str, Any] | None:
    """The usage object, or ``None`` (sent as ``null``) unless both counts are known: a
    count made up as 0 has a call billed or counted as free, and OpenAI's usage object
    has no place for a count that is not known."""
    if prompt is None or completion is None:
        return None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _flagged(decision: Decision) -> bool:
    """OpenAI's ``flagged``: the text was blocked or redacted, or a harm finding (or a
    failed filter's) acted. A flag on accuracy alone (a knowledge-cutoff question) is no
    harm: clients such as LangChain's moderation chain read ``flagged`` alone and refused
    "What is the weather today?"; it stays in ``action`` and ``findings``."""
    if decision.action in (Action.BLOCK, Action.REDACT):
        return True
    return any(
        f.action is not Action.ALLOW
        and (f.concern == "harm" or f.category == FILTER_ERROR_CATEGORY)
        for f in decision.findings
    )


def _moderation_result(
    decision: Decision, mapping: Mapping[str, tuple[OpenAICategory, ...]]
) -> dict[str, Any]:
    scores: dict[str, float] = {}
    for f in decision.findings:
        scores[f.category] = max(scores.get(f.category, 0.0), round(f.score, 6))
    acted = {f.category for f in decision.findings if f.action is not Action.ALLOW}
    categories = {c: c in acted for c in scores}
    applied = {c: ["text"] for c in scores}
    # OpenAI's keys, always all of them (clients read `categories.hate`): each the highest
    # score of the categories mapped onto it, true when one of them acted. A category
    # named like an OpenAI key counts toward it whatever its row says, so the key's value
    # never hides the category's own.
    openai_scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
    openai_acted: set[str] = set()
    openai_applied: set[str] = set()
    for c, score in scores.items():
        keys = set(mapping.get(c, ()))
        if c in openai_scores:
            keys.add(c)
        for key in keys:
            openai_scores[key] = max(openai_scores[key], score)
            openai_applied.add(key)
            if c in acted:
                openai_acted.add(key)
    result: dict[str, Any] = {
        "flagged": _flagged(decision),
        "categories": categories | {k: k in openai_acted for k in OPENAI_CATEGORIES},
        "category_scores": scores | openai_scores,
        # OpenAI's omni models say what each score was computed from: ["text"] for text
        # input. Here the text where a score was computed, [] where nothing was scored
        # (a 0.0 placeholder); the openai SDK's Moderation requires every key.
        "category_applied_input_types": applied
        | {k: ["text"] if k in openai_applied else [] for k in OPENAI_CATEGORIES},
        "action": decision.action.value,
        "findings": [f.to_dict() for f in decision.findings],
    }
    if decision.action is Action.REDACT:
        result["text"] = decision.text
    return result
