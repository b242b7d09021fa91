"""HTTP routes: the OpenAI-compatible surface, moderation, health, metrics, admin.

Handlers only translate between HTTP and :class:`~guardrail.api.serving.Serving`;
the request id comes from :class:`RequestIdMiddleware`.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import msgspec
import structlog
from litestar import HttpMethod, Request, Response, post, route
from litestar.datastructures import State
from litestar.enums import MediaType, ScopeType
from litestar.exceptions import ValidationException
from litestar.params import FromPath, JSONBody
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from guardrail.api.auth import principal_of
from guardrail.api.errors import APIError, declared_non_json, not_json
from guardrail.api.schemas import ChatCompletionRequest, CompletionRequest, ModerationRequest
from guardrail.api.serving import Gateway, Serving

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: Request[Any, Any, Any]) -> str:
    return str(request.scope["state"]["request_id"])


class RequestIdMiddleware:
    """Gives every request an id (the client's ``x-request-id`` if well formed), binds it
    to the log context, and returns it in the ``x-request-id`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            await self.app(scope, receive, send_with_id)


# What answers GET answers HEAD too (RFC 9110 9.1): load balancers and uptime checks
# probe with HEAD, and a 405 there marks a healthy gateway down. The server sends
# the headers alone.
_GET_HEAD = [HttpMethod.GET, HttpMethod.HEAD]


def _serving(state: State) -> Serving:
    serving: Serving = state.serving
    return serving


def _gateway(state: State) -> Gateway:
    gateway: Gateway = state.gateway
    return gateway


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return out


async def strictly(request: Request[Any, Any, Any], kind: type[Any]) -> None:
    """Refuse a body that only parsed by coercion ("max_tokens": "5", "stream": "true").

    The framework converts bodies leniently (as it must for query strings); a JSON body
    with a mistyped field gets a 400 naming it instead of a silently converted value.

    A body declared as something other than JSON is refused (415) though it parsed: the
    framework reads any body as JSON, and a form or ``text/plain`` post is what a web page
    may send from a browser without a CORS preflight, so in open mode any site its user
    visits could spend the gateway's model. A body with no declared type is read as JSON.
    """
    media_type = declared_non_json(request)
    if media_type is not None:
        raise not_json(media_type)
    body = await request.body()
    try:
        # The framework, like msgspec, keeps the last of two equal keys; a filter or WAF
        # in front may read the first, so a key given twice is refused, not resolved.
        json.loads(body, object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as e:
        message = f"the key '{e.key}' is given twice in one object"
        raise ValidationException(
            detail=message, extra=[{"message": message, "key": e.key}]
        ) from None
    except RecursionError:
        # Nested past the standard parser's stack, which ends a few levels before msgspec's:
        # passed on, a key given twice deeper down went unchecked.
        raise APIError(
            400, "The request body's JSON is nested too deeply.", code="invalid_request"
        ) from None
    except ValueError:
        # What msgspec took but the standard parser does not (an integer of thousands of
        # digits): the type check below still runs.
        pass
    try:
        msgspec.json.decode(body, type=kind, strict=True)
    except msgspec.ValidationError as e:
        # The same error (and count) as the framework's own validation failures.
        message, _, where = str(e).partition(" - at `$.")
        detail = {"message": message, "key": where.rstrip("`") or "data"}
        raise ValidationException(detail=message, extra=[detail]) from None


@post("/v1/chat/completions", status_code=200, summary="Chat completion, moderated")
async def chat_completions(
    data: JSONBody[ChatCompletionRequest], request: Request[Any, Any, Any], state: State
) -> Response[Any]:
    await strictly(request, ChatCompletionRequest)
    return await _serving(state).chat(
        data, request_id_of(request), principal_of(request.scope), request.receive
    )


@post("/v1/completions", status_code=200, summary="Text completion, moderated")
async def completions(
    data: JSONBody[CompletionRequest], request: Request[Any, Any, Any], state: State
) -> Response[Any]:
    await strictly(request, CompletionRequest)
    return await _serving(state).completions(
        data, request_id_of(request), principal_of(request.scope), request.receive
    )


@post("/v1/moderations", status_code=200, summary="Run the policy's filters only")
async def moderations(
    data: JSONBody[ModerationRequest], request: Request[Any, Any, Any], state: State
) -> Response[Any]:
    await strictly(request, ModerationRequest)
    body = await _serving(state).moderations(
        data, request_id_of(request), principal_of(request.scope)
    )
    decision = body["guardrail"]
    return Response(
        body,
        headers={
            "x-guardrail-action": decision["action"],
            "x-guardrail-policy-version": decision["policy"]["version"],
        },
    )


@route("/v1/models", http_method=_GET_HEAD, summary="Models served through the gateway")
async def list_models(state: State, request: Request[Any, Any, Any]) -> dict[str, Any]:
    gateway = _gateway(state)
    rules = gateway.rules(principal_of(request.scope))
    models = [m for m in await gateway.served_models() if rules.allows_model(m)]
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "guardrail"} for m in models
        ],
    }


@route("/v1/models/{model_id:path}", http_method=_GET_HEAD, summary="One model, if served")
async def retrieve_model(
    model_id: FromPath[Path], state: State, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    """OpenAI's ``models.retrieve``; an id may hold slashes (``meta-llama/Llama-2-7b``)."""
    gateway = _gateway(state)
    rules = gateway.rules(principal_of(request.scope))
    name = str(model_id).lstrip("/")
    if name not in await gateway.served_models() or not rules.allows_model(name):
        # One answer for "not served" and "not yours": a tenant learns nothing of others.
        raise APIError(
            404, f"The model '{name}' does not exist here.", param="model", code="model_not_found"
        )
    return {"id": name, "object": "model", "created": 0, "owned_by": "guardrail"}


@route("/healthz", http_method=_GET_HEAD, summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@route("/readyz", http_method=_GET_HEAD, summary="Readiness: policy and backend loaded and healthy")
async def readyz(state: State) -> Response[Any]:
    gw = _gateway(state)
    checks = {
        "policy": gw.store.loaded,
        "backend": gw.backend is not None and await gw.backend.health(),
    }
    if all(checks.values()):
        return Response({"status": "ready", "checks": checks})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    # Why the backend fails, where the gateway knows: it failed to load, or the last read
    # of its model list failed (a refused backend_api_key reads as nothing else here).
    why = gw.backend_error or (
        f"reading its model list failed: {gw.models_error}"
        if gw.models_error and not checks["backend"]
        else None
    )
    detail = f" ({why})" if why else ""
    return APIError(
        503, f"Not ready: {failing}{detail}.", code="not_ready", extra={"checks": checks}
    ).response({"retry-after": "5"})


@route("/metrics", http_method=_GET_HEAD, summary="Prometheus metrics", media_type=MediaType.TEXT)
async def metrics(state: State) -> Response[bytes]:
    # Off the loop: the collectors read the process's caches and stores, and whatever
    # one of them waits for must not hold every request, /healthz too.
    data, content_type = await asyncio.to_thread(_gateway(state).metrics.exposition)
    return Response(data, media_type=content_type)


@post("/admin/reload", status_code=200, summary="Reload the policy file")
async def admin_reload(state: State) -> Response[Any]:
    result = await _gateway(state).reload_policy(trigger="admin")
    if not result.ok:
        said = (
            f"Policy {result.name} reloaded (version {result.version}), but not every policy"
            if result.partial
            else f"Policy {result.name} not reloaded; still running its version {result.version}"
        )
        raise APIError(422, f"{said}: {result.error}", code="policy_invalid")
    return Response(
        {
            "reloaded": True,
            "policy": {
                "name": result.name,
                "version": result.version,
                "digest": result.digest[:12],
            },
            # What loads but likely does not do what its author means (policy_warning).
            "warnings": list(result.warnings),
        }
    )


ROUTES = [
    chat_completions,
    completions,
    moderations,
    list_models,
    retrieve_model,
    healthz,
    readyz,
    metrics,
    admin_reload,
]
