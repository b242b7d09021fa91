"""The remote backend: any server that speaks the OpenAI HTTP API (vLLM, TGI, Ollama, ...).

Large models are served by an existing engine, not by the gateway; this module is
the thin, careful client in between. Why it looks the way it does:

- It takes an :class:`httpx.AsyncClient` (one per process, shared by every request,
  with a bounded connection pool), so tests plug a fake upstream in through
  :class:`httpx.ASGITransport` instead of mocking.
- ``backend_urls`` are replicas tried in order. A non-streaming call retries one URL
  on connection errors, dropped connections and 5xx answers (exponential backoff),
  then fails over to the next URL. A timeout is not retried on the same URL (it
  already cost the whole budget) but fails over, and so does a 429 (that replica is
  busy; another may not be). Any other 4xx is the request's own fault:
  it is answered at once, with no failover, since every replica would answer the same.
  A 200 whose body is not a completion (a load balancer's page, an error object) fails
  over without a retry on the same URL, as a stream that has sent nothing yet does.
- A stream fails over only before its first chunk reached the caller; after that
  the text is already on its way to the client, so a broken or stalled stream raises
  (:class:`BackendBadResponse` / :class:`BackendTimeout`) and the gateway ends the
  stream with an error frame. The wait for each frame that moves the answer on (text,
  tool-call data, a finish, the usage) is bounded by ``timeout_s``; keepalives and
  frames that carry nothing do not restart it, so a stream never hangs, and the HTTP
  response is closed however the generator ends.
- Timeouts are enforced with :func:`asyncio.timeout` as well as by httpx, so they
  hold for every transport (ASGI transports ignore httpx timeouts).
- Each URL has a circuit breaker (:mod:`guardrail.backends.breaker`): after
  ``breaker_failures`` consecutive failed attempts its circuit opens and the URL is
  skipped for ``breaker_reset_s``, then one trial request decides. When every URL's
  circuit is open, the call fails at once with :class:`BackendUnavailable` (503,
  ``Retry-After``) instead of waiting on replicas known to be down.
- The client it builds keeps no cookies: it is shared by every tenant, so a cookie an
  upstream sets on one call must not be sent on another tenant's.
- Upstream JSON is decoded into lenient ``msgspec`` structs: unknown fields are
  ignored, wrong types become a 502.
- Nothing here logs prompt or completion text, nor upstream error bodies (they may
  echo the prompt): logs carry the URL (without credentials), the attempt and the reason.
  An upstream's error message (cut to 300 characters) travels apart from the error's
  own text, as ``BackendError.upstream_message``: the gateway shows it to the client
  only if the policy's output filters pass it, as for any text from the model side.

Mapping of failures to the gateway's answer:

==========================================  ==========================================
upstream                                    raised
==========================================  ==========================================
400, 413, 422                               BackendBadResponse, status 400, upstream message
                                            (and its code ``context_length_exceeded``,
                                            or that code for vLLM's message of a
                                            request over the model's context)
429                                         BackendBadResponse, status 429, upstream message
401, 403                                    BackendBadResponse, status 502, names the status
404, other 4xx                              BackendBadResponse, status 502, upstream message
every URL refused the connection            BackendUnavailable (503)
every URL's circuit is open                 BackendUnavailable (503)
every URL failed, the last by a timeout     BackendTimeout (504)
every URL failed, the last by a 429         BackendBadResponse, status 429, upstream message,
                                            the shortest Retry-After of the 429s
every URL failed, the last by a 503         BackendUnavailable (503), the shortest Retry-After
                                            of the 503s
every URL failed, the last by 5xx/drop      BackendBadResponse (502)
every URL answered 200 with garbage         BackendBadResponse (502)
finish_reason ``abort`` or ``error``          BackendBadResponse (502)
``{"error": ...}`` frame in a stream,       BackendBadResponse (502), upstream message
an ``error:`` line or ``event: error``
stream broken or ended early after output   BackendBadResponse (502) / BackendTimeout (504)
tool-call text past the token budget        BackendBadResponse (502)
(see ``TOOL_CALL_CHARS_PER_TOKEN``)
==========================================  ==========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import re
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
import msgspec
import structlog

from guardrail.backends.base import (
    BackendSpec,
    Chunk,
    Completion,
    FinishReason,
    GenerationRequest,
)
from guardrail.backends.breaker import CircuitBreaker, CircuitState
from guardrail.backends.transport import AiohttpTransport
from guardrail.chat import Message, ToolCall
from guardrail.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    BackendBadResponse,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)

if TYPE_CHECKING:
    from guardrail.settings import Settings

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[object]]

# Long generations hold a connection each; a pool of 100 (httpx's and aiohttp's default)
# would queue concurrent streams behind each other on a busy gateway replica.
MAX_CONNECTIONS = 512
# Upstream error text passed on to the client is cut to this many characters.
MAX_UPSTREAM_MESSAGE = 300

# --- Upstream wire format (lenient: unknown fields are ignored) -----------------------


class _Message(msgspec.Struct):
    content: str | None = None
    # OpenAI's answer to a structured-output request it declines: content is null then.
    refusal: str | None = None
    # Read by _tool_calls (a shape it cannot read is a 502 there, where the request
    # asked for tools); also a sign that a stream is moving (see _moves_on).
    tool_calls: Any = None
    # Not passed on; read only as signs that a stream is moving. Any shape is taken: the
    # gateway does not depend on them, so they must not be a 502.
    function_call: Any = None
    audio: Any = None
    # A reasoning model's thinking (vLLM's reasoning parsers and DeepSeek write
    # ``reasoning_content``, OpenRouter ``reasoning``): minutes of frames with no content.
    reasoning_content: Any = None
    reasoning: Any = None


def _message_text(message: _Message | None) -> tuple[str, bool]:
    """A chat message's (or delta's) text and whether it is a refusal. A refusal is
    model text like the content: read, never dropped, so the filters see all of it (both
    fields set, which OpenAI never sends, are read as one refusal)."""
    if message is None:
        return "", False
    return (message.content or "") + (message.refusal or ""), bool(message.refusal)


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None  # chat, whole answer
    delta: _Message | None = None  # chat, stream chunk
    text: str | None = None  # completions
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _ErrorInfo(msgspec.Struct):
    message: str | None = None


class _Answer(msgspec.Struct):
    """A whole answer or one stream frame; an error frame carries ``error`` instead."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: _ErrorInfo | str | None = None


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


_ANSWER = msgspec.json.Decoder(_Answer)
_MODELS = msgspec.json.Decoder(_ModelList)
_ANY = msgspec.json.Decoder()


# --- Failure bookkeeping ---------------------------------------------------------------

_Kind = Literal["connect", "timeout", "status", "dropped", "rate_limited"]


class _AttemptFailed(Exception):
    """One URL, one attempt, failed in a way that another attempt or URL may fix."""

    def __init__(
        self, kind: _Kind, error: BackendError, upstream_status: int | None = None
    ) -> None:
        super().__init__(str(error))
        self.kind = kind
        self.error = error
        # What the upstream answered (for the log), when it answered with a status.
        self.upstream_status = upstream_status

    @property
    def retryable(self) -> bool:
        # A timeout already used the whole budget; retrying the same URL doubles it. A
        # replica that is rate limiting answers the same again after a backoff this short.
        return self.kind not in ("timeout", "rate_limited")

    @property
    def breaks(self) -> bool:
        """Whether it counts against the URL's circuit: a 429 is a busy replica, not a
        broken one (nor a success: a half-open trial it ends reached no verdict)."""
        return self.kind != "rate_limited"


@dataclass(slots=True)
class _Failures:
    """What went wrong on each URL, turned into one error once every URL failed."""

    attempts: list[_AttemptFailed] = field(default_factory=list)

    def add(self, failure: _AttemptFailed, url: str, attempt: int) -> None:
        self.attempts.append(failure)
        log.warning(
            "backend_attempt_failed",
            url=_display_url(url),
            attempt=attempt,
            reason=failure.kind,
            status=failure.error.status,  # what the gateway answers with
            upstream_status=failure.upstream_status,
        )

    def error(self, urls: int) -> BackendError:
        if not self.attempts or all(f.kind == "connect" for f in self.attempts):
            error: BackendError = BackendUnavailable(
                f"backend unavailable: could not connect to any of {urls} backend URL(s)"
            )
            cause: BaseException | None = self.attempts[-1] if self.attempts else None
        else:
            last = next(f for f in reversed(self.attempts) if f.kind != "connect")
            error, cause = last.error, last.error.__cause__
            if last.upstream_status in (429, 503):
                # The soonest any replica that answered so said it could take the call.
                waits = [
                    f.error.retry_after_s
                    for f in self.attempts
                    if f.upstream_status == last.upstream_status
                    and f.error.retry_after_s is not None
                ]
                error.retry_after_s = min(waits, default=None)
        error.__cause__ = cause
        return error


def _wire_message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_call_id is not None:
        wire["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        wire["name"] = message.name
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in message.tool_calls
        ]
        # What clients send for a turn that only called tools (vLLM's templates and
        # OpenAI take null there).
        wire["content"] = message.content or None
    return wire


# A tool call's text held until the stream ends, per token of the completion's budget:
# a backend that keeps to max_tokens cannot send more (tokens average 3 to 4 characters;
# no common tokenizer has many tokens this long), so one that does is broken, and the
# gateway stops holding its text rather than grow without bound.
TOOL_CALL_CHARS_PER_TOKEN = 32
# The budget of a request that set no limit (only a caller other than the gateway, which
# always sets one): the gateway's own max_tokens_limit default.
_UNSET_TOKEN_BUDGET = 32_768


def _tool_call_budget(request: GenerationRequest) -> int:
    tokens = request.params.max_tokens or _UNSET_TOKEN_BUDGET
    return tokens * TOOL_CALL_CHARS_PER_TOKEN


_CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")


def _call_id(value: object) -> str:
    """The upstream's call id where it is an id (the pattern the gateway takes from
    clients), else one of the gateway's own: a client answers the call by it, and free
    text there would be completion text that no filter read as an id."""
    if isinstance(value, str) and _CALL_ID.fullmatch(value):
        return value
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(value: object) -> str | None:
    """A call's arguments as JSON text (an upstream that sends an object gets it encoded,
    as Ollama's native answers hold one); ``None`` for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return msgspec.json.encode(value).decode()
    return None


def _tool_call(item: object) -> ToolCall:
    function = item.get("function") if isinstance(item, dict) else None
    if isinstance(item, dict) and isinstance(function, dict):
        name, arguments = function.get("name"), _arguments(function.get("arguments", ""))
        if isinstance(name, str) and arguments is not None:
            return ToolCall(_call_id(item.get("id")), name, arguments)
    raise BackendBadResponse(
        "backend answer is not a valid completion: a tool call without a function name "
        "and arguments"
    )


def _tool_calls(raw: object) -> tuple[ToolCall, ...]:
    """A whole answer's ``message.tool_calls``; a shape that is not OpenAI's is a 502."""
    if raw is None:
        return ()
    return tuple(map(_tool_call, raw if isinstance(raw, list) else [raw]))


@dataclass(slots=True)
class _CallPieces:
    id: str | None = None
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _StreamedCalls:
    """A stream's tool calls, assembled from their pieces (OpenAI's ``delta.tool_calls``:
    ``index``, then ``id`` and ``function.name`` once, ``function.arguments`` in pieces;
    without ``index``, a new ``id`` starts the next call)."""

    budget: int
    calls: dict[int, _CallPieces] = field(default_factory=dict)
    chars: int = 0

    def add(self, raw: object) -> None:
        if raw is None:
            return
        for item in raw if isinstance(raw, list) else [None]:
            if not isinstance(item, dict):
                raise BackendBadResponse("backend sent a tool-call piece that is not an object")
            index = item.get("index")
            if index is None:
                # Gemini's OpenAI-compatible stream sends each call whole, with no index:
                # a piece that names an id other than the last call's starts the next
                # call (merged, two calls were one with both names and both arguments).
                index = max(self.calls, default=0)
                last = self.calls.get(index)
                named = item.get("id")
                if last is not None and last.id is not None and named not in (None, last.id):
                    index += 1
            if not isinstance(index, int) or not 0 <= index < 1024:
                raise BackendBadResponse("backend sent a tool-call piece with a bad index")
            call = self.calls.setdefault(index, _CallPieces())
            if call.id is None and isinstance(item.get("id"), str):
                call.id = item["id"]
            function = item.get("function") or {}
            if not isinstance(function, dict):
                raise BackendBadResponse("backend sent a tool-call piece that is not an object")
            for key, pieces in (("name", call.name), ("arguments", call.arguments)):
                piece = function.get(key)
                if piece is None:
                    continue
                text = _arguments(piece) if key == "arguments" else piece
                if not isinstance(text, str):
                    raise BackendBadResponse(f"backend sent a tool call whose {key} is not text")
                if key == "name" and pieces and text == "".join(pieces):
                    continue  # some servers repeat the whole name in every piece
                self.chars += len(text)
                pieces.append(text)
            if self.chars > self.budget:
                raise BackendBadResponse(
                    f"backend sent more tool-call text ({self.chars} characters) than the "
                    "completion's token budget allows"
                )

    def whole(self) -> tuple[ToolCall, ...]:
        calls = []
        for _, call in sorted(self.calls.items()):
            name = "".join(call.name)
            if not name:
                raise BackendBadResponse("backend streamed a tool call without a function name")
            calls.append(ToolCall(_call_id(call.id), name, "".join(call.arguments)))
        return tuple(calls)


def _display_url(url: str) -> str:
    """The URL without credentials or query, fit for logs."""
    u = httpx.URL(url)
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"


def _upstream_message(content: bytes) -> str | None:
    """The upstream's error message (OpenAI, FastAPI or plain text shape), truncated;
    ``None`` when it said nothing."""
    message: Any = None
    try:
        body = _ANY.decode(content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    if message is None:
        message = content.decode("utf-8", errors="replace")
    text = " ".join(str(message).split())
    if len(text) > MAX_UPSTREAM_MESSAGE:
        text = text[: MAX_UPSTREAM_MESSAGE - 1] + "…"
    return text or None


# Upstream error codes a client acts on, passed on with the upstream's 400 (any other
# code becomes the gateway's own): a client trims its history on this one.
_KEPT_CODES = frozenset({CONTEXT_LENGTH_EXCEEDED})
# The request fields a kept code may point at; anything else is left out (null).
_KEPT_PARAMS = frozenset({"messages", "prompt"})


# A request over the model's context, in the words of vLLM, which sends its HTTP status
# as the code (400) or no code: "This model's maximum context length is 4096 tokens.
# However, you requested 5000 tokens (...)", "'max_tokens' ... is too large: 1000. This
# model's maximum context length is 4096 tokens and your request has ...", and its v1
# engine's "The decoder prompt (length 5000) is longer than the maximum model length of
# 4096." OpenAI's own message says it too, beside its code.
_CONTEXT_LENGTH = re.compile(
    r"maximum context length is (\d{1,9}) tokens|longer than the maximum model length of (\d{1,9})",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class _UpstreamCode:
    """An upstream error's code and param where the gateway passes them on, and the
    model's context in tokens where the error's message gives it."""

    code: str | None = None
    param: str | None = None
    context_tokens: int | None = None


def _upstream_code(content: bytes) -> _UpstreamCode:
    """The upstream's error ``code`` and ``param`` where the code is one the gateway passes
    on (:data:`_KEPT_CODES`), or where the error names no code of its own (a number, or
    none, as vLLM sends) and its message says the request is over the model's context."""
    try:
        body = _ANY.decode(content)
    except msgspec.DecodeError:
        return _UpstreamCode()
    # OpenAI's error is nested; vLLM's older servers put its fields at the top level
    # ({"object": "error", "message": ..., "code": 400}).
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return _UpstreamCode()
    code, message = error.get("code"), error.get("message")
    m = _CONTEXT_LENGTH.search(message) if isinstance(message, str) else None
    if isinstance(code, str):
        if code not in _KEPT_CODES:
            return _UpstreamCode()
    elif m is not None:
        code = CONTEXT_LENGTH_EXCEEDED
    else:
        return _UpstreamCode()
    param = error.get("param")
    return _UpstreamCode(
        code,
        param if isinstance(param, str) and param in _KEPT_PARAMS else None,
        int(m.group(1) or m.group(2)) if m is not None else None,
    )


def _retry_after(value: str | None) -> float | None:
    """An upstream Retry-After (429, 503) in seconds (a date form is ignored), capped at an
    hour."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds < float("inf"):
        return None
    return min(seconds, 3600.0)


def _status_error(
    status: int, content: bytes, retry_after: str | None = None
) -> BackendError | _AttemptFailed:
    """An upstream error status: a final error (4xx) or a failed attempt (5xx, 429)."""
    if status >= 500:
        error: BackendError = BackendBadResponse(f"backend failed with HTTP {status}", status=502)
        if status == 503:
            # Not there yet ("Loading model"), and it says when to ask again: so does the
            # gateway's 503, should every URL end so.
            error = BackendUnavailable(
                "backend unavailable (HTTP 503)", retry_after_s=_retry_after(retry_after)
            )
        return _AttemptFailed("status", error, upstream_status=status)
    if status in (400, 413, 422):
        kept = _upstream_code(content)
        message = f"backend rejected the request (HTTP {status})"
        if kept.code == CONTEXT_LENGTH_EXCEEDED:
            # The gateway's words and the upstream's number only: the upstream's text (an
            # arbitrary server's may echo the prompt) stays in upstream_message, shown
            # only once the output filters pass it.
            size = f" of {kept.context_tokens} tokens" if kept.context_tokens else ""
            message += f" as longer than the model's context{size}"
        return BackendBadResponse(
            message,
            status=400,
            upstream_message=_upstream_message(content),
            code=kept.code,
            param=kept.param,
        )
    if status == 429:
        # The replica's capacity, not the request's fault: another replica may be idle.
        return _AttemptFailed(
            "rate_limited",
            BackendBadResponse(
                "backend is rate limiting requests (HTTP 429)",
                status=429,
                retry_after_s=_retry_after(retry_after),
                upstream_message=_upstream_message(content),
            ),
            upstream_status=status,
        )
    if status in (401, 403):
        # Not echoed: some servers quote part of the key they refused.
        return BackendBadResponse(
            f"backend refused the gateway's credentials (HTTP {status}); check backend_api_key",
            status=502,
        )
    hint = "; check backend_urls and the model name" if status == 404 else ""
    return BackendBadResponse(
        f"backend answered HTTP {status}{hint}",
        status=502,
        upstream_message=_upstream_message(content),
    )


def _finish_reason(raw: str | None) -> FinishReason:
    if raw in ("abort", "error"):
        # vLLM ends a request it aborted (shutdown, preemption) or failed on this way, its
        # text cut short: passed on as "stop", it read as a whole answer.
        raise BackendBadResponse(f'backend ended the completion with finish_reason "{raw}"')
    # eos, None...: the gateway only knows these four.
    if raw == "length":
        return "length"
    if raw == "content_filter":
        return "content_filter"
    if raw == "tool_calls":
        return "tool_calls"
    return "stop"


def _first_choice(choices: list[_Choice]) -> _Choice:
    return next((c for c in choices if c.index == 0), choices[0])


def _error_text(error: _ErrorInfo | str) -> str | None:
    message = error if isinstance(error, str) else error.message
    return _upstream_message(msgspec.json.encode({"message": message})) if message else None


_SSE_EOL = re.compile(r"\r\n|\r|\n")


async def _sse_lines(chunks: AsyncIterator[str]) -> AsyncGenerator[str]:
    """Lines of an SSE body, split where the SSE format says: CR, LF or CRLF only.

    Not ``httpx.Response.aiter_lines``: that splits like ``str.splitlines``, also at
    U+2028, U+2029, U+0085 and other separators that are legal inside a JSON string,
    cutting a valid frame in two.
    """
    pending = ""
    held: list[str] = []  # pieces of a long line, joined once its end arrives
    async with contextlib.aclosing(cast(AsyncGenerator[str], chunks)):
        async for text in chunks:
            if not _SSE_EOL.search(text) and not pending.endswith("\r"):
                # No line ends here: keep the piece, without rescanning (or recopying) the
                # line so far, so a 1 MB frame in 4 KB reads costs linear time.
                held.append(text)
                continue
            if held:
                pending += "".join(held)
                held = []
            pending += text
            start = 0
            for eol in _SSE_EOL.finditer(pending):
                if eol.group() == "\r" and eol.end() == len(pending):
                    break  # perhaps the first half of a CRLF split across reads
                yield pending[start : eol.start()]
                start = eol.end()
            pending = pending[start:]
    pending += "".join(held)
    if pending:
        yield pending.removesuffix("\r")


def _moves_on(frame: _Answer) -> bool:
    """Whether a stream frame is progress: text, a refusal, tool-call or audio data, a
    reasoning model's thinking, a finish or the usage. A frame with none of them
    (``{"choices":[]}``, a role-only delta, empty content) is no more progress than a
    keepalive comment, so it must not restart the
    stall clock: an upstream sending such frames forever would hold the request, and its
    concurrency slot, for ever. Any choice counts, not only the first: with ``n`` above 1
    the upstream is working while it writes the others."""
    if frame.usage is not None:
        return True
    for choice in frame.choices or ():
        if choice.finish_reason is not None or choice.text:
            return True
        delta = choice.delta
        if delta is not None and (
            delta.content
            or delta.refusal
            or delta.tool_calls
            or delta.function_call
            or delta.audio
            or delta.reasoning_content
            or delta.reasoning
        ):
            return True
    return False


def _decode_frame(data: str) -> _Answer:
    try:
        frame = _ANSWER.decode(data)
    except msgspec.DecodeError as e:
        raise BackendBadResponse(f"backend sent a stream frame that is not valid: {e}") from e
    if frame.error is not None:
        raise BackendBadResponse(
            "backend reported an error mid-stream", upstream_message=_error_text(frame.error)
        )
    return frame


@dataclass(slots=True)
class _Body:
    """A request's body, and the field that holds the gateway's default limit while the
    body still has it: once an upstream refuses it as over the model's context, it is
    dropped for every later attempt and URL of the request (each retry would otherwise
    send the refused body first, doubling the requests a struggling backend gets)."""

    value: dict[str, Any]
    default_limit: str | None

    def fit(self, error: BackendError) -> bool:
        """Drop the default limit if ``error`` refused it; whether it did."""
        fitted = _without_default_limit(self.value, self.default_limit, error)
        if fitted is None:
            return False
        self.value, self.default_limit = fitted, None
        return True


def _whole_frame(payload: str) -> bool:
    """Whether an event's data so far is a whole frame (``[DONE]`` or a JSON value): a
    further ``data:`` line cannot belong to it."""
    if payload == "[DONE]":
        return True
    try:
        msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return False
    return True


def _default_limit(request: GenerationRequest) -> str | None:
    """The body field that holds the gateway's default ``max_tokens`` (the client set no
    limit), or ``None``."""
    params = request.params
    if params.max_tokens_is_default and params.max_tokens is not None:
        return params.max_tokens_field
    return None


def _without_default_limit(
    body: dict[str, Any], field: str | None, error: BackendError
) -> dict[str, Any] | None:
    """``body`` without the gateway's default limit ``field`` when ``error`` refused the
    request as over the model's context, else ``None``.

    vLLM and OpenAI refuse a limit the prompt leaves no room for but, asked for none,
    write until the context is full. That room is less than the refused default
    (prompt + default > context), so the answer is still no longer than the default
    allows. A limit the client set itself is never dropped: its 400 stands.
    """
    if field is None or field not in body or error.code != CONTEXT_LENGTH_EXCEEDED:
        return None
    return {k: v for k, v in body.items() if k != field}


def _stream_error(payload: str) -> BackendBadResponse:
    """A stream's error reported outside an error frame, raised as one is."""
    return BackendBadResponse(
        "backend reported an error mid-stream",
        upstream_message=_upstream_message(payload.strip().encode()),
    )


def _parse_completion(content: bytes, *, chat: bool) -> Completion:
    try:
        answer = _ANSWER.decode(content)
    except msgspec.DecodeError as e:
        raise BackendBadResponse(f"backend answer is not a valid completion: {e}") from e
    if answer.error is not None and not answer.choices:
        raise BackendBadResponse(
            "backend reported an error", upstream_message=_error_text(answer.error)
        )
    if not answer.choices:
        raise BackendBadResponse("backend answer is not a valid completion: no choices")
    choice = _first_choice(answer.choices)
    if chat:
        if choice.message is None:
            raise BackendBadResponse("backend answer is not a valid completion: no message")
        text, refusal = _message_text(choice.message)
    else:
        if choice.text is None:
            raise BackendBadResponse("backend answer is not a valid completion: no text")
        text, refusal = choice.text, False
    usage = answer.usage or _Usage()
    return Completion(
        text=text,
        finish_reason=_finish_reason(choice.finish_reason),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        refusal=refusal,
        tool_calls=_tool_calls(choice.message.tool_calls) if chat and choice.message else (),
    )


class _NoCookies(http.cookiejar.CookiePolicy):
    """Keep no cookie and send none. The one pooled client serves every tenant, and
    httpx clients keep the cookies upstreams set (load balancers' affinity cookies,
    hosted APIs' session cookies): one tenant's cookie would ride on the next tenant's
    call. The gateway is stateless towards its upstreams."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = False

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: Any) -> bool:
        return False

    def path_return_ok(self, path: str, request: Any) -> bool:
        return False


# --- The backend ---------------------------------------------------------------------


class RemoteBackend:
    """A backend that forwards to OpenAI-compatible servers at ``urls``, in order.

    Example::

        async with httpx.AsyncClient() as client:
            backend = RemoteBackend(["http://vllm:8000/v1"], client, api_key="sk-...")
            completion = await backend.generate(request)

    ``client`` belongs to the caller unless ``owns_client`` is true (as when built by
    :meth:`from_settings`); :meth:`aclose` closes it only then. ``sleep`` waits
    between retries (tests pass a recorder instead of waiting).
    """

    name: str = "remote"

    def __init__(
        self,
        urls: Sequence[str],
        client: httpx.AsyncClient,
        *,
        api_key: str | None = None,
        retries: int = 2,
        backoff_s: float = 0.2,
        timeout_s: float = 120.0,
        probe_timeout_s: float = 2.0,
        sleep: Sleep = asyncio.sleep,
        owns_client: bool = False,
        breaker_failures: int = 0,
        breaker_reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_urls(urls)
        if retries < 0:
            raise ConfigError("backend retries must be 0 or more")
        self.urls: tuple[str, ...] = tuple(url.rstrip("/") for url in urls)
        self._client = client
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._probe_timeout_s = min(probe_timeout_s, timeout_s)
        self._sleep = sleep
        self._owns_client = owns_client
        self.breakers: dict[str, CircuitBreaker] = {
            url: CircuitBreaker(
                _display_url(url), failures=breaker_failures, reset_s=breaker_reset_s, clock=clock
            )
            for url in self.urls
        }
        self._headers: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteBackend:
        """Build from ``backend_*`` settings, with one shared, pooled client."""
        _check_urls(settings.backend_urls)  # before a client exists that would need closing
        client = httpx.AsyncClient(
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
            timeout=httpx.Timeout(
                settings.backend_timeout_s, connect=settings.backend_connect_timeout_s
            ),
            transport=AiohttpTransport(max_connections=MAX_CONNECTIONS),
        )
        return cls(
            settings.backend_urls,
            client,
            api_key=settings.backend_api_key,
            retries=settings.backend_retries,
            backoff_s=settings.backend_retry_backoff_s,
            timeout_s=settings.backend_timeout_s,
            owns_client=True,
            breaker_failures=settings.breaker_failures,
            breaker_reset_s=settings.breaker_reset_s,
        )

    def circuit_states(self) -> list[tuple[str, CircuitState]]:
        """Each URL (as logs show it) with its circuit's state now: an open circuit whose
        reset time has passed reads half-open, though no request has asked it yet."""
        return [(breaker.name, breaker.state) for breaker in self.breakers.values()]

    def _usable(self) -> Iterator[str]:
        """The URLs whose circuit lets a request through, in failover order.

        Lazy: a half-open circuit hands out its one trial only when its URL is really
        about to be tried. Raises :class:`BackendUnavailable` when every circuit is open.
        """
        tried = False
        for url in self.urls:
            if self.breakers[url].allow():
                tried = True
                yield url
        if not tried:
            wait = min(b.retry_in() for b in self.breakers.values())
            raise BackendUnavailable(
                f"backend unavailable: the circuit of every backend URL is open "
                f"(recent failures); next trial in {wait:.0f}s",
                retry_after_s=wait,
            )

    # -- requests

    def _path(self, request: GenerationRequest) -> str:
        return "/chat/completions" if request.is_chat else "/completions"

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        params = request.params
        # The gateway's own fields are set last: an extra knob cannot change the call's shape.
        body: dict[str, Any] = {
            k: v for k, v in params.extra.items() if k not in ("messages", "prompt")
        }
        sampling = {
            params.max_tokens_field: params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        body.update({k: v for k, v in sampling.items() if v is not None})
        if params.stop:
            body["stop"] = list(params.stop)
        body["model"] = request.model
        if request.messages is not None:
            body["messages"] = [_wire_message(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt or ""
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        return body

    def _request_headers(self, request: GenerationRequest, *, stream: bool) -> dict[str, str]:
        headers = dict(self._headers)
        # vLLM and most proxies log this id: it ties their logs to the gateway's.
        headers["X-Request-Id"] = request.request_id
        headers["Accept"] = "text/event-stream" if stream else "application/json"
        return headers

    # -- non-streaming

    async def generate(self, request: GenerationRequest) -> Completion:
        """One whole completion, retried and failed over as the module docstring says."""
        body = _Body(self._body(request, stream=False), _default_limit(request))
        headers = self._request_headers(request, stream=False)
        failures = _Failures()
        for base in self._usable():
            url = base + self._path(request)
            breaker = self.breakers[base]
            trial = _holds_trial(breaker)
            try:
                for attempt in range(self._retries + 1):
                    if attempt:
                        await self._sleep(self._backoff_s * 2 ** (attempt - 1))
                    try:
                        content = await self._post(url, body, headers)
                    except _AttemptFailed as failure:
                        if failure.breaks:
                            breaker.failure()
                        failures.add(failure, url, attempt)
                        if failure.retryable and breaker.state is CircuitState.CLOSED:
                            continue
                        break
                    except BackendError:
                        breaker.success()  # a 4xx: the replica is up, the request was wrong
                        raise
                    try:
                        completion = _parse_completion(content, chat=request.is_chat)
                    except BackendError as e:
                        # 200 with garbage or an error body: this replica is broken, and
                        # asking it again gets the same; the next URL may still answer.
                        breaker.failure()
                        failures.add(_AttemptFailed("status", e), url, attempt)
                        break
                    breaker.success()
                    return completion
            finally:
                # A trial that reached no verdict (the client left, or something no
                # branch above expected was raised) gives its place back: kept, it would
                # hold the URL out of use for good. Only the trial itself does: a call
                # let through while the circuit was closed must not free another call's
                # running trial. After success() or failure() this does nothing.
                if trial:
                    breaker.release()
        raise failures.error(len(self.urls))

    async def _post(self, url: str, body: _Body, headers: dict[str, str]) -> bytes:
        """The body of a 200 answer; raises a final error or :class:`_AttemptFailed`.

        A request refused as over the model's context only because of the gateway's own
        default limit is sent once more without it, and so is every later attempt
        (see :meth:`_Body.fit`).
        """
        try:
            return await self._post_once(url, body.value, headers)
        except BackendError as e:
            if not body.fit(e):
                raise
            return await self._post_once(url, body.value, headers)

    async def _post_once(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
        response = await self._send("POST", url, self._timeout_s, json=body, headers=headers)
        if response.status_code != 200:
            raise _status_error(
                response.status_code, response.content, response.headers.get("retry-after")
            )
        return response.content

    async def _send(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange, its transport failures mapped to :class:`_AttemptFailed`."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            # Nothing was sent: safe to retry, and the answer is "unavailable".
            raise _connect_failed(e) from e
        except (TimeoutError, httpx.TimeoutException) as e:
            raise self._timed_out(e, timeout_s) from e
        except httpx.RequestError as e:  # dropped connection, broken encoding, ...
            raise _dropped(e) from e

    def _timed_out(self, cause: BaseException, timeout_s: float | None = None) -> _AttemptFailed:
        limit = self._timeout_s if timeout_s is None else timeout_s
        error = BackendTimeout(f"backend did not answer within {limit:g}s")
        error.__cause__ = cause
        return _AttemptFailed("timeout", error)

    # -- streaming

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Chunks as they arrive; the last one carries ``finish_reason`` and the usage."""
        body = _Body(self._body(request, stream=True), _default_limit(request))
        headers = self._request_headers(request, stream=True)
        failures = _Failures()
        for base in self._usable():
            url = base + self._path(request)
            breaker = self.breakers[base]
            trial = _holds_trial(breaker)
            started = False
            response: httpx.Response | None = None
            try:
                try:
                    response = await self._open_stream(url, body, headers)
                except BackendError:
                    breaker.success()  # a 4xx: the replica is up, the request was wrong
                    raise
                chunks = self._chunks(
                    response, chat=request.is_chat, tool_budget=_tool_call_budget(request)
                )
                async with contextlib.aclosing(chunks) as it:
                    async for chunk in it:
                        started = True
                        yield chunk
                breaker.success()
                return
            except _AttemptFailed as failure:
                if failure.breaks:
                    breaker.failure()
                if started:
                    raise failure.error from failure.error.__cause__
                failures.add(failure, url, 0)
            except BackendError as e:
                if response is not None:  # garbage or an error frame from a 200
                    breaker.failure()
                if not started and response is not None and e.status == 502:
                    # Nothing reached the caller yet: the next URL may still answer.
                    failures.add(_AttemptFailed("status", e), url, 0)
                    continue
                raise
            finally:
                # A stream closed early (the policy cut it, the client left) reached no
                # verdict on the replica: a half-open trial gives its place back (only
                # the trial: a stream opened while the circuit was closed holds none).
                if trial:
                    breaker.release()
                if response is not None:
                    await response.aclose()
        raise failures.error(len(self.urls))

    async def _open_stream(self, url: str, body: _Body, headers: dict[str, str]) -> httpx.Response:
        """A 200 response whose body is still to be read; the caller closes it. Sent once
        more without the gateway's default limit as :meth:`_post` is."""
        try:
            return await self._open_stream_once(url, body.value, headers)
        except BackendError as e:
            if not body.fit(e):
                raise
            return await self._open_stream_once(url, body.value, headers)

    async def _open_stream_once(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        http_request = self._client.build_request("POST", url, json=body, headers=headers)
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.send(http_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _connect_failed(e) from e
        except (TimeoutError, httpx.TimeoutException) as e:
            raise self._timed_out(e) from e
        except httpx.RequestError as e:  # dropped connection, broken encoding, ...
            raise _dropped(e) from e
        if response.status_code == 200:
            return response
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                content = await response.aread()
        except (TimeoutError, httpx.HTTPError):
            content = b""
        finally:
            await response.aclose()
        raise _status_error(response.status_code, content, response.headers.get("retry-after"))

    async def _chunks(
        self, response: httpx.Response, *, chat: bool, tool_budget: int
    ) -> AsyncGenerator[Chunk]:
        """Turn SSE frames into chunks; transport trouble comes out as :class:`_AttemptFailed`.

        Text is passed on as it comes. The frame that carries ``finish_reason`` is held
        back until the usage frame (``stream_options.include_usage``) or ``[DONE]``,
        so one last chunk carries both. A frame with no text and no finish is skipped:
        the caller only sees chunks that matter, and failover stays possible until one.
        Tool calls are assembled here and come whole on that last chunk, their text held
        up to ``tool_budget`` characters.
        """
        finish: FinishReason | None = None
        usage = _Usage()
        tail = ""
        tail_refusal = False
        done = False
        calls = _StreamedCalls(tool_budget)
        try:
            async with contextlib.aclosing(self._sse_frames(response)) as frames:
                async for frame in frames:
                    if frame is None:  # [DONE]
                        done = True
                        break
                    if frame.usage is not None:
                        usage = frame.usage
                    if not frame.choices:
                        continue
                    choice = _first_choice(frame.choices)
                    if choice.index != 0:
                        continue
                    if chat:
                        text, refusal = _message_text(choice.delta)
                        if choice.delta is not None:
                            calls.add(choice.delta.tool_calls)
                    else:
                        text, refusal = choice.text or "", False
                    if choice.finish_reason is not None:
                        finish = _finish_reason(choice.finish_reason)
                    if finish is not None:
                        tail += text
                        tail_refusal = tail_refusal or refusal
                    elif text:
                        yield Chunk(text=text, refusal=refusal)
        except _AttemptFailed:
            if finish is None:
                raise
            # The answer was complete; only the usage or [DONE] after it was lost.
        if finish is None and not done:
            raise BackendBadResponse("backend stream ended before the completion finished")
        yield Chunk(
            text=tail,
            finish_reason=finish or "stop",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            refusal=tail_refusal,
            tool_calls=calls.whole(),
        )

    async def _sse_frames(self, response: httpx.Response) -> AsyncGenerator[_Answer | None]:
        """The frames of an SSE body (``None`` for ``[DONE]``), each read bounded by
        ``timeout_s`` from the last frame that moved the answer on.

        An event's ``data:`` lines are joined with a line break, as the SSE format says
        (a frame's JSON may span several), and the event is one frame once its blank line
        (or the body's end) comes, or, from a server that leaves out the blank lines,
        once a further ``data:`` line follows a whole frame; comments (keepalives) and
        ``id:`` fields are skipped.
        A failure the upstream
        reports outside a ``data: {"error": ...}`` frame, as an ``error:`` line (older
        llama.cpp servers) or as the data of an ``event: error``, raises as that frame does.
        """
        lines = _sse_lines(response.aiter_text())
        loop = asyncio.get_running_loop()
        event = ""  # the ``event:`` field of the event being read, until its blank line
        data: list[str] = []  # its ``data:`` lines
        # Only progress (see _moves_on) restarts the clock: keepalive comments, blank
        # lines and frames that carry nothing do not, or a server sending them forever
        # would hang the request. A slow stream that keeps writing text is never cut.
        deadline = loop.time() + self._timeout_s
        async with contextlib.aclosing(lines):
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        line: str | None = await anext(lines)
                except StopAsyncIteration:
                    line = None  # ends the last event, blank line or not (lenient)
                except (TimeoutError, httpx.TimeoutException) as e:
                    error = BackendTimeout(
                        f"backend stream stalled: nothing new for {self._timeout_s:g}s"
                    )
                    error.__cause__ = e
                    raise _AttemptFailed("timeout", error) from e
                except httpx.RequestError as e:
                    raise _dropped(e, streaming=True) from e
                if line:
                    if line.startswith("event:") and not (data and _whole_frame("\n".join(data))):
                        event = line[6:].strip()
                        continue
                    if line.startswith("error:"):
                        # Skipped as an unknown field, it was followed by llama.cpp's
                        # ``data: [DONE]``: a cut answer passed for a finished one.
                        raise _stream_error(line[6:])
                    if line.startswith("event:"):
                        # A server that leaves out the blank lines: the field starts the
                        # next event, and what is held, a whole frame, ends this one.
                        payload, kind = "\n".join(data), event
                        data, event = [], line[6:].strip()
                    else:
                        if not line.startswith("data:") or not line[5:].strip():
                            continue
                        part = line[5:].strip()
                        if not data or not _whole_frame("\n".join(data)):
                            data.append(part)
                            continue
                        # A server that leaves out the blank line between events: what is
                        # held is a whole frame already, read now, not when the stream
                        # ends (its text held back, the stall clock never restarted).
                        payload, kind = "\n".join(data), event
                        data, event = [part], ""
                else:
                    payload, kind = "\n".join(data), event
                    data, event = [], ""
                if kind == "error" and payload:
                    raise _stream_error(payload)
                if payload == "[DONE]":
                    yield None
                elif payload:
                    frame = _decode_frame(payload)
                    yield frame
                    # Restarted once the caller asks for more, so the time it spent on
                    # the chunk (the policy's checks) is not counted against the upstream.
                    if _moves_on(frame):
                        deadline = loop.time() + self._timeout_s
                if line is None:
                    return

    # -- discovery

    async def models(self) -> list[str]:
        """Model ids from ``GET {url}/models`` of the first URL that answers."""
        failures = _Failures()
        for base in self.urls:
            url = base + "/models"
            try:
                return await self._list_models(url)
            except _AttemptFailed as failure:
                failures.add(failure, url, 0)
        raise failures.error(len(self.urls))

    async def _list_models(self, url: str) -> list[str]:
        response = await self._send("GET", url, self._probe_timeout_s, headers=self._headers)
        if response.status_code != 200:
            error = _status_error(response.status_code, response.content)
            if isinstance(error, _AttemptFailed):
                raise error
            raise _AttemptFailed("status", error, upstream_status=response.status_code)
        try:
            listing = _MODELS.decode(response.content)
        except msgspec.DecodeError as e:
            raise _AttemptFailed(
                "status", BackendBadResponse(f"backend model list is not valid: {e}")
            ) from e
        return [m.id for m in listing.data]

    async def health(self) -> bool:
        """Whether any URL answers ``GET /models`` with 200, within the probe timeout."""
        for base in self.urls:
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    response = await self._client.get(base + "/models", headers=self._headers)
            except (TimeoutError, httpx.HTTPError):
                continue
            if response.status_code == 200:
                return True
        return False

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _holds_trial(breaker: CircuitBreaker) -> bool:
    """Whether the call that ``breaker.allow()`` just let through is its half-open trial
    (a half-open circuit lets nothing else through)."""
    return breaker.state is CircuitState.HALF_OPEN


def _check_urls(urls: Sequence[str]) -> None:
    if not urls:
        raise ConfigError(
            "backend 'remote' needs backend_urls "
            "(e.g. GUARDRAIL_BACKEND_URLS=http://localhost:8000/v1)"
        )
    for url in urls:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise ConfigError(f"backend URL {url!r} is not a valid URL: {e}") from e
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"backend URL {url!r} must be http(s)://host[:port]/v1")


def _connect_failed(cause: BaseException) -> _AttemptFailed:
    error = BackendUnavailable("backend unavailable: connection failed")
    error.__cause__ = cause
    return _AttemptFailed("connect", error)


def _dropped(cause: BaseException, *, streaming: bool = False) -> _AttemptFailed:
    where = "mid-stream" if streaming else "before answering"
    error = BackendBadResponse(f"backend connection broke {where}")
    error.__cause__ = cause
    return _AttemptFailed("dropped", error)


def from_settings(settings: Settings) -> RemoteBackend:
    """The ``remote`` backend type's builder (see :meth:`RemoteBackend.from_settings`)."""
    return RemoteBackend.from_settings(settings)


SPEC = BackendSpec(
    type="remote",
    build=from_settings,
    description=(
        "Any OpenAI-compatible HTTP server (vLLM, TGI, Ollama, llama.cpp, hosted "
        "endpoints) at backend_urls, tried in order with retries and failover."
    ),
)

__all__ = ["SPEC", "RemoteBackend", "from_settings"]
