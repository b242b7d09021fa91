"""From a validated wire request to a moderated answer (the "serving" layer, as in vLLM).

One request is one :class:`~guardrail.exchange.Exchange`. The order never changes:
input filters on every message, then the backend (only if nothing blocked), then the
output filters on the whole completion, or window by window for a stream (see
:mod:`guardrail.guard.stream`). When the exchange is finished, whatever happened, it
is handed to :meth:`Gateway.record` exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import structlog
from litestar import Response
from litestar.response import Stream

from guardrail.api.errors import APIError, from_backend_error, where
from guardrail.api.schemas import ChatCompletionRequest, CompletionRequest, ModerationRequest
from guardrail.backends.base import Backend, Chunk, Completion, GenerationRequest, SamplingParams
from guardrail.chat import Message
from guardrail.errors import BackendError, BackendUnavailable
from guardrail.exchange import Exchange, Route
from guardrail.guard.guard import Guard
from guardrail.guard.store import GuardStore, ReloadResult
from guardrail.guard.stream import StreamGuard
from guardrail.guard.types import Action, Decision, FilterContext, Finding, Stage
from guardrail.observability.metrics import GatewayMetrics
from guardrail.settings import Settings

log = structlog.get_logger("guardrail.serving")

_encode = msgspec.json.Encoder().encode
MODELS_REFRESH_S = 5.0
API_ROUTES: dict[str, Route] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/moderations": "moderations",
}


@dataclass
class Gateway:
    """The running gateway's parts, wired by :func:`guardrail.app.create_app`."""

    settings: Settings
    store: GuardStore
    metrics: GatewayMetrics
    backend: Backend | None = None
    backend_error: str | None = None
    models: list[str] = field(default_factory=list)
    _models_checked: float = 0.0

    async def served_models(self) -> list[str]:
        """Configured names, else the backend's (asked again at most every few seconds)."""
        if self.settings.models:
            return list(self.settings.models)
        now = time.monotonic()
        if (
            not self.models
            and self.backend is not None
            and now - self._models_checked > (MODELS_REFRESH_S if self._models_checked else 0)
        ):
            self._models_checked = now
            try:
                self.models = await self.backend.models()
            except BackendError as e:
                log.warning("models_unavailable", error=type(e).__name__)
        return list(self.models)

    async def reload_policy(self, trigger: str) -> ReloadResult:
        """Reload the policy file; a bad file keeps the running policy (and is reported)."""
        result = await self.store.reload()
        self.metrics.policy_reload(result.ok)
        if result.ok:
            log.info("policy_reloaded", trigger=trigger, name=result.name, version=result.version)
        else:
            log.error(
                "policy_reload_failed",
                trigger=trigger,
                kept_version=result.version,
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

    def on_rejected(self, path: str, request_id: str, status: int, code: str) -> None:
        """Count a request the framework refused before a handler ran (bad JSON, schema).

        Only the gateway's own API routes count: a path label must stay a bounded set.
        """
        route = API_ROUTES.get(path)
        if route is None:
            return
        exchange = Exchange(request_id=request_id, route=route)
        exchange.finish("invalid_request" if status < 500 else "error", status, code)
        self.record(exchange)

    def record(self, exchange: Exchange) -> None:
        """Record a finished exchange in metrics and in one log line (never its text)."""
        self.metrics.record(exchange)
        categories = sorted({f.category for d in exchange.decisions for f in d.findings})
        log.info(
            "exchange",
            request_id=exchange.request_id,
            route=exchange.route,
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
    out = []
    for index, decision in decisions:
        for f in decision.findings:
            item = f.to_dict()
            item["stage"] = decision.stage.value
            if index is not None:
                item["message_index"] = index
            if not spans:
                item.pop("span", None)
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


Kind = Literal["chat", "completions"]
# What a route's prepare step yields: texts to check, the conversation, and how to
# build the backend request from the (possibly redacted) texts.
_Prepared = tuple[list[str], tuple[Message, ...], Callable[[list[str]], GenerationRequest]]


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
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        return f"{prefix}-{self.exchange.request_id}"

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

    async def chat(self, body: ChatCompletionRequest, request_id: str) -> Response[Any]:
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
            messages = tuple(Message(m.role, m.text(i)) for i, m in enumerate(body.messages))
            params = _sampling(body, body.max_completion_tokens or body.max_tokens)

            def build(texts: list[str]) -> GenerationRequest:
                sent = tuple(Message(m.role, t) for m, t in zip(messages, texts, strict=True))
                return GenerationRequest(body.model, request_id, messages=sent, params=params)

            return [m.content for m in messages], messages, build

        return await self._serve("chat", body, request_id, prepare)

    async def completions(self, body: CompletionRequest, request_id: str) -> Response[Any]:
        def prepare() -> _Prepared:
            body.refuse_unmoderated()
            prompt = body.prompt_text()
            params = _sampling(body, body.max_tokens)

            def build(texts: list[str]) -> GenerationRequest:
                return GenerationRequest(body.model, request_id, prompt=texts[0], params=params)

            return [prompt], (Message("user", prompt),), build

        return await self._serve("completions", body, request_id, prepare)

    async def moderations(self, body: ModerationRequest, request_id: str) -> dict[str, Any]:
        guard = self.gw.store.current
        stage = Stage(body.stage)
        exchange = self._exchange("moderations", request_id, guard, model=body.model)
        ctx = FilterContext(request_id, stage=stage, route="moderations")
        try:
            decisions = await asyncio.gather(
                *(
                    guard.check(stage, text, ctx.at(stage, i))
                    for i, text in enumerate(body.inputs())
                )
            )
            exchange.decisions.extend(decisions)
            action = exchange.action
            if action is Action.BLOCK:
                exchange.finish("blocked_input" if stage is Stage.INPUT else "blocked_output")
            else:
                exchange.finish(exchange.passed_outcome())
        finally:
            self._close(exchange)
        return {
            "id": f"modr-{request_id}",
            "model": f"guardrail/{guard.policy.name}",
            "results": [_moderation_result(d) for d in decisions],
            "guardrail": guardrail_object(exchange, guard, [(None, d) for d in decisions]),
        }

    # -- the shared path ------------------------------------------------------------------

    async def _serve(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        prepare: Callable[[], _Prepared],
    ) -> Response[Any]:
        guard = self.gw.store.current
        exchange = self._exchange(kind, request_id, guard, model=body.model, stream=body.stream)
        streaming = False
        try:
            texts, messages, build = prepare()
            backend = self.gw.require_backend()
            exchange.backend = backend.name
            await self._check_model(body.model)
            ctx = FilterContext(
                request_id, stage=Stage.INPUT, route=kind, model=body.model, messages=messages
            )
            input_decisions = await guard.check_messages(Stage.INPUT, messages, ctx)
            exchange.decisions.extend(d for _, d in input_decisions)
            if any(d.blocked for _, d in input_decisions):
                raise self._input_blocked(exchange, guard, input_decisions)
            rewritten = list(texts)
            for i, d in input_decisions:
                if i is not None:
                    rewritten[i] = d.text
            call = _Call(
                kind=kind,
                exchange=exchange,
                guard=guard,
                ctx=ctx,
                backend=backend,
                request=build(rewritten),
                input_decisions=input_decisions,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            )
            if body.stream:
                response = await self._start_stream(call)
                streaming = True
                return response
            return await self._complete(call)
        except BackendError as e:
            exchange.finish("backend_error", e.status, e.code)
            raise from_backend_error(e) from e
        except APIError as e:
            if e.code == "content_filter":
                exchange.finish("blocked_input", e.status, e.code)
            else:
                # 5xx here means no usable backend (still loading, lists no models).
                outcome = "backend_error" if e.status >= 500 else "invalid_request"
                exchange.finish(outcome, e.status, e.code)
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
                self._close(exchange)

    def _input_blocked(
        self, exchange: Exchange, guard: Guard, decisions: list[tuple[int | None, Decision]]
    ) -> APIError:
        blocking = _blocking(decisions)
        message = next((f.message for f in blocking if f.message), None)
        message = message or guard.policy.messages.input_blocked
        return APIError(
            400,
            message,
            code="content_filter",
            param="messages",
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
        completion = await call.backend.generate(call.request)
        exchange.backend_duration_s = time.perf_counter() - started
        exchange.prompt_tokens = completion.prompt_tokens
        exchange.completion_tokens = completion.completion_tokens
        decision = await call.guard.check(Stage.OUTPUT, completion.text, call.ctx.at(Stage.OUTPUT))
        exchange.decisions.append(decision)
        if decision.blocked:
            text, finish = call.guard.policy.messages.output_blocked, "content_filter"
            exchange.finish("blocked_output")
        else:
            text, finish = decision.text, completion.finish_reason
            exchange.finish(exchange.passed_outcome())
        body = self._completion_body(call, text, finish, completion)
        return Response(body, headers=call.headers())

    def _completion_body(
        self, call: _Call, text: str, finish: str, completion: Completion
    ) -> dict[str, Any]:
        if call.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
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
            first = await anext(chunks)
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
        window = StreamGuard(guard, call.ctx, guard.policy.stream)
        finish: str = "stop"
        prompt_tokens = completion_tokens = None
        recorded = False  # whether window.decisions are in the exchange yet
        try:
            yield self._frame(call, role=True)
            pending: list[Chunk] = [first]
            async for chunk in _prepend(pending, chunks):
                if chunk.prompt_tokens is not None:
                    prompt_tokens = chunk.prompt_tokens
                if chunk.completion_tokens is not None:
                    completion_tokens = chunk.completion_tokens
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if not chunk.text:
                    continue
                released = await window.feed(chunk.text)
                if released.text:
                    if exchange.time_to_first_token_s is None:
                        exchange.time_to_first_token_s = time.perf_counter() - exchange.started
                    yield self._frame(call, content=released.text)
                if released.blocked:
                    break
            exchange.backend_duration_s = time.perf_counter() - started
            if not window.blocked:
                released = await window.finish()
                if released.text:
                    if exchange.time_to_first_token_s is None:
                        exchange.time_to_first_token_s = time.perf_counter() - exchange.started
                    yield self._frame(call, content=released.text)
            exchange.decisions.extend(window.decisions)
            recorded = True
            exchange.prompt_tokens, exchange.completion_tokens = prompt_tokens, completion_tokens
            if window.blocked:
                refusal = guard.policy.messages.output_blocked
                sep = "\n\n" if window.released_text else ""
                yield self._frame(call, content=sep + refusal)
                finish = "content_filter"
                exchange.finish("blocked_output")
            else:
                exchange.finish(exchange.passed_outcome())
            yield self._frame(call, finish=finish, guardrail=call.guardrail(spans=False))
            if call.include_usage:
                yield self._frame(call, usage=_usage(prompt_tokens, completion_tokens))
            yield b"data: [DONE]\n\n"
        except BackendError as e:
            exchange.finish("backend_error", e.status, e.code)
            yield b"data: " + _encode(from_backend_error(e).body()) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            exchange.finish("cancelled", 499, "client_disconnected")
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
        finally:
            if not recorded:
                exchange.decisions.extend(window.decisions)
            await _aclose(chunks)
            self._close(exchange)

    def _frame(
        self,
        call: _Call,
        *,
        role: bool = False,
        content: str | None = None,
        finish: str | None = None,
        guardrail: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> bytes:
        choices: list[dict[str, Any]] = []
        if usage is None:
            if call.kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
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
        if usage is not None:
            body["usage"] = usage
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

    def _close(self, exchange: Exchange) -> None:
        exchange.finish("error", 500, "unfinished")  # no-op when already finished
        self.gw.metrics.request_ended(exchange.route)
        self.gw.record(exchange)

    async def _check_model(self, model: str) -> None:
        served = await self.gw.served_models()
        if model in served:
            return
        if not served:
            raise from_backend_error(BackendUnavailable("The backend lists no models right now."))
        raise APIError(
            404,
            f"The model '{model}' does not exist here. Available: {', '.join(served)}.",
            param="model",
            code="model_not_found",
        )


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
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        extra=body.extra(),
    )


def _usage(prompt: int | None, completion: int | None) -> dict[str, Any]:
    p, c = prompt or 0, completion or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _moderation_result(decision: Decision) -> dict[str, Any]:
    scores: dict[str, float] = {}
    for f in decision.findings:
        scores[f.category] = max(scores.get(f.category, 0.0), round(f.score, 6))
    result: dict[str, Any] = {
        "flagged": decision.action is not Action.ALLOW,
        "categories": {c: True for c in scores},
        "category_scores": scores,
        "action": decision.action.value,
        "findings": [f.to_dict() for f in decision.findings],
    }
    if decision.action is Action.REDACT:
        result["text"] = decision.text
    return result
