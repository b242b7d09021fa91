"""Every error the gateway answers with, in the OpenAI error shape.

``{"error": {"message", "type", "param", "code"}}``, plus our own fields where they
help (``findings`` for content-filter blocks). Client mistakes are 4xx with a message
that says what to fix; nothing a client sends produces a 500.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    InternalServerException,
    SerializationException,
    ValidationException,
)

from guardrail.errors import BackendError, where

log = structlog.get_logger("guardrail.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    """An error answered to the client as-is (message, status, code)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        body_extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        self.body_extra = dict(body_extra or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": error_type(self.status),
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error, **self.body_extra}

    def response(self, headers: Mapping[str, str] | None = None) -> Response[Any]:
        return Response(
            self.body(), status_code=self.status, headers={**self.headers, **(headers or {})}
        )


def from_backend_error(e: BackendError, upstream_message: str | None = None) -> APIError:
    """The client's answer to a backend failure: the gateway's own message, and after it
    ``upstream_message`` when the caller moderated the upstream's words and they passed.
    ``e.upstream_message`` itself is never used here: unmoderated, it stays out."""
    headers = None
    if e.status in (429, 503):
        # Whole seconds, rounded up: a client that waits that long finds the circuit's
        # trial open (1 when the backend gave no time).
        wait = e.retry_after_s if e.retry_after_s is not None else 1
        headers = {"retry-after": str(max(1, math.ceil(wait)))}
    message = f"{e}: {upstream_message}" if upstream_message else str(e)
    return APIError(e.status, message, code=e.code, param=e.param, headers=headers)


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    details = exc.extra if isinstance(exc.extra, list) else []
    if not details:
        return "Invalid request body.", None
    first = details[0] if isinstance(details[0], dict) else {}
    message = str(first.get("message", "invalid value"))
    key = first.get("key")
    if message == "'data'":  # litestar's text for a missing body
        return "The request body is empty: send a JSON object.", None
    param = str(key) if key and key != "data" else None
    where = f" (at '{param}')" if param else ""
    return f"Invalid request body: {message}{where}.", param


_HTTP_MESSAGES = {
    404: "Unknown route {method} {path}. See the README for the HTTP surface.",
    405: "Method {method} is not allowed on {path}.",
    413: "The request body is too large (limit {limit} bytes).",
    415: "Send the request body as JSON (content-type: application/json).",
}


# Errors raised before a handler ran (the framework's parsing and validation) are
# counted through this callback: (path, request id, status, code, the scope, whose
# state holds the authenticated principal when the key was checked first).
OnRejected = Callable[[str, str, int, str, Any], None]


def make_exception_handler(max_body_bytes: int, on_rejected: OnRejected | None = None) -> Any:
    """One handler for every exception, so every error is in the OpenAI shape."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        err = to_api_error(request, exc, max_body_bytes)
        # The router answers 404 and 405 before the request-id middleware runs: those
        # responses get an id here, so every response carries one.
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
        if (
            on_rejected is not None
            and err.status != 405  # a wrong method is no exchange (nor an audit row)
            # the framework's refusals, and a body it could not decode (mapped to a 400)
            and (
                isinstance(exc, HTTPException)
                or (isinstance(exc, UnicodeDecodeError | RecursionError) and err.status == 400)
            )
        ):
            on_rejected(request.url.path, rid, err.status, err.code or "", request.scope)
        return err.response({"x-request-id": rid})

    return handle


_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def declared_non_json(request: Request[Any, Any, Any]) -> str | None:
    """The media type a request declared its body as, if it is not JSON (a body with no
    declared type is read as JSON)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        return media_type
    return None


def not_json(media_type: str) -> APIError:
    """The 415 for a body declared as something other than JSON."""
    return APIError(
        415,
        f"Send the request body as JSON (content-type: application/json), not {media_type}.",
        code="unsupported_media_type",
    )


def to_api_error(request: Request[Any, Any, Any], exc: Exception, max_body_bytes: int) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackendError):
        return from_backend_error(exc)
    media_type = declared_non_json(request) if request.method in _WITH_BODY else None
    if media_type is not None and (
        isinstance(exc, ValidationException)
        or (isinstance(exc, HTTPException) and exc.status_code == 400)
        or _body_decode_error(exc) is not None
    ):
        # A form or text/plain body that did not parse as JSON: the framework's parse
        # failed before the route could say why (its 415 came only for bodies that
        # happened to be JSON).
        return not_json(media_type)
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_request")
    if (decode_error := _body_decode_error(exc)) is not None:
        return decode_error
    if _client_left(exc):
        # Not a gateway bug: the client went away mid-upload (no one reads this answer).
        return APIError(499, "The client closed the connection before its request was read.",
                        code=CLIENT_DISCONNECTED)  # fmt: skip
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        template = _HTTP_MESSAGES.get(exc.status_code)
        if template:
            message = template.format(
                method=request.method, path=request.url.path, limit=max_body_bytes
            )
        elif isinstance(exc.__cause__, SerializationException) or (
            exc.detail and "JSON" in exc.detail
        ):
            # msgspec's words ("Number out of range", "Input data was truncated") say
            # nothing of JSON alone, and its "- at `$[...]`" locates nothing.
            detail = (exc.detail or "malformed").partition(" - at `")[0]
            message = f"The request body is not valid JSON: {detail}."
        else:
            message = exc.detail or "Bad request."
        headers = {"allow": exc.headers["allow"]} if exc.headers and "allow" in exc.headers else {}
        return APIError(exc.status_code, message, code=_code(exc.status_code), headers=headers)
    # The exception's message may quote user text: log its type and where it came from.
    log.error("unhandled_error", error=type(exc).__name__, where=where(exc), path=request.url.path)
    return APIError(
        500,
        "Internal error in the gateway; the request id is in x-request-id.",
        code="internal_error",
    )


CLIENT_DISCONNECTED = "client_disconnected"


def _client_left(exc: Exception) -> bool:
    """Litestar's answer to an ``http.disconnect`` while it reads the request body: a
    500 ``InternalServerException`` that only its words tell apart."""
    return type(exc) is InternalServerException and "disconnected" in (exc.detail or "")


# Frames of the framework's request body decoding: msgspec raises these two errors
# itself (not as a DecodeError), so they arrive unwrapped.
_BODY_DECODERS = frozenset({"decode_json", "decode_msgpack"})


def _body_decode_error(exc: Exception) -> APIError | None:
    """A 400 for a body that is not UTF-8 or is nested too deeply to decode, else None."""
    if not isinstance(exc, UnicodeDecodeError | RecursionError):
        return None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _BODY_DECODERS:
            break
        tb = tb.tb_next
    else:
        return None
    message = (
        "The request body is not valid UTF-8 text."
        if isinstance(exc, UnicodeDecodeError)
        else "The request body's JSON is nested too deeply."
    )
    return APIError(400, message, code="invalid_request")


def _code(status: int) -> str:
    return {
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
        415: "unsupported_media_type",
    }.get(status, "invalid_request")
