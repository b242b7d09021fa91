"""A fake OpenAI-compatible upstream, scripted per test, for backend and gateway tests.

Why a fake server and not mocks: the remote backend and the gateway are tested
through the same HTTP wire format a real vLLM speaks, in-process (fast) or over a
real socket (for the openai SDK and a real gateway), with one implementation.

API::

    fake = FakeUpstream(reply="Hi there.")            # scripted behaviour, see fields
    async with fake_client(fake) as client:            # in-process, via httpx.ASGITransport
        backend = RemoteBackend([fake.base_url], client)
        ...
    assert fake.requests[0]["messages"][-1]["content"] == "hello"

    with serve_upstream(fake) as base_url:             # a real uvicorn on 127.0.0.1:<free port>
        ...                                            # base_url ends in /v1

    refused_url()                                      # a /v1 URL whose port refuses connections

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream`` true
or false, OpenAI wire format, usage included; a streamed usage frame only when
``stream_options.include_usage`` is set), ``GET /v1/models``.

Modes (``FakeUpstream.mode``; with ``times=N`` only the first N requests, of any
route, get it, later ones are ``"ok"``):

- ``"ok"``: answer ``reply``, streamed as ``chunks`` (default: ``reply`` split into words).
  With ``refusal`` true, a chat answers as OpenAI declines a structured-output request:
  ``content`` null and ``reply`` in ``refusal`` (streamed as ``delta.refusal`` pieces).
  With ``tool_calls`` (``{"id", "name", "arguments"}`` each), a chat's answer calls those
  functions after ``reply`` (``content`` null when it is empty); a stream sends each
  call's id and name, then its arguments ``tool_call_piece`` characters a frame, as vLLM
  does.
- ``"500"``: HTTP 500 with an OpenAI error body.
- ``"garbage"``: HTTP 200 with ``garbage`` as the body (default: HTML); a stream
  gets a frame that is not JSON.
- ``"die_mid_stream"``: send half of the chunks, then drop the connection (over
  ``fake_client`` the body just ends there: no finish_reason, no ``[DONE]``).
- ``"stall_mid_stream"``: send half of the chunks, then go quiet for ``delay_s``
  (over ``fake_client``, which hands a body over only once the app is done, this
  looks like ``"slow"``: use ``serve_upstream`` to see a stall after the first chunk).
- ``"slow"``: wait ``delay_s`` (or until the client hangs up) before answering normally.
- ``"refuse_400"``: HTTP 400 with an OpenAI error body whose message is ``REFUSAL``.
- ``"http_error"``: HTTP ``status`` with an OpenAI error body (``REFUSAL`` as message).
- ``"error_frame"``: a stream sends one chunk, then ``data: {"error": {...}}`` and ends;
  a non-stream call gets HTTP 200 with ``{"error": {...}}`` (``UPSTREAM_ERROR`` as message).

``error_message``, when set, is the message of those three modes' errors instead.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import msgspec

from tests.servers import free_socket, serve_asgi

Mode = Literal[
    "ok",
    "500",
    "garbage",
    "die_mid_stream",
    "stall_mid_stream",
    "slow",
    "refuse_400",
    "http_error",
    "error_frame",
]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REFUSAL = "temperature must be non-negative, got -1.0."
UPSTREAM_ERROR = "the fake upstream had an internal error"


class UpstreamDied(Exception):
    """Raised inside the app to drop the connection mid-answer (``die_mid_stream``)."""


@dataclass
class FakeUpstream:
    """One scripted upstream. Mutate fields between calls; read what it received.

    ``requests`` holds the JSON body of every POST (generation) request, in order, and
    ``headers`` the matching request headers (lower-case names); ``models_calls``
    counts ``GET /v1/models``. So "the backend was never called" is ``requests == []``.
    """

    reply: str = "Hello from the fake upstream."
    chunks: list[str] | None = None
    mode: Mode = "ok"
    times: int | None = None
    delay_s: float = 5.0
    status: int = 400
    garbage: bytes = b"<html>502 Bad Gateway</html>"
    finish_reason: str = "stop"
    model_ids: list[str] = field(default_factory=lambda: ["fake-model"])
    host: str = "upstream.test"
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    models_calls: int = 0
    # A ``Set-Cookie`` value sent with every answer (as load balancers and hosted APIs do).
    set_cookie: str | None = None
    # The message of refuse_400, http_error and error_frame answers (else their default).
    error_message: str | None = None
    # A chat's ``reply`` comes as the model's refusal (OpenAI's ``refusal`` field).
    refusal: bool = False
    tool_calls: list[dict[str, str]] | None = None
    tool_call_piece: int = 5

    @property
    def base_url(self) -> str:
        """The URL to give a backend that reaches this fake through :func:`fake_client`."""
        return f"http://{self.host}/v1"

    def pieces(self) -> list[str]:
        """What a stream sends, chunk by chunk."""
        if self.chunks is not None:
            return list(self.chunks)
        return re.findall(r"\s*\S+", self.reply) or [self.reply]

    def _take_mode(self) -> Mode:
        if self.times is None:
            return self.mode
        if self.times <= 0:
            return "ok"
        self.times -= 1
        return self.mode

    # -- the ASGI app

    async def app(self, scope: Message, receive: Receive, send: Send) -> None:
        """The ASGI application (also usable with any ASGI server or transport)."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.set_cookie is not None:
            send = _with_cookie(send, self.set_cookie)
        method, path = scope["method"], scope["path"]
        raw = await _read_body(receive)
        mode = self._take_mode()
        generation = method == "POST" and path in ("/v1/chat/completions", "/v1/completions")
        body: dict[str, Any] = {}
        if generation:
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                await _json(send, 400, _error_body("body is not JSON", "invalid_request_error"))
                return
            self.requests.append(body)
            self.headers.append(
                {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            )
        if mode == "slow":
            await _wait_or_hang_up(receive, self.delay_s)
            mode = "ok"
        if method == "GET" and path == "/v1/models":
            self.models_calls += 1
            await self._models(mode, send)
            return
        if not generation:
            await _json(send, 404, _error_body(f"no route {method} {path}", "not_found"))
            return
        chat = path == "/v1/chat/completions"
        if mode == "500":
            await _json(send, 500, _error_body(UPSTREAM_ERROR, "server_error"))
        elif mode == "refuse_400":
            await _json(
                send, 400, _error_body(self.error_message or REFUSAL, "invalid_request_error")
            )
        elif mode == "http_error":
            refusal = _error_body(self.error_message or REFUSAL, "invalid_request_error")
            await _json(send, self.status, refusal)
        elif body.get("stream"):
            await self._stream(body, chat, mode, receive, send)
        else:
            await self._whole(body, chat, mode, send)

    async def _models(self, mode: Mode, send: Send) -> None:
        if mode in ("500", "die_mid_stream"):
            await _json(send, 500, _error_body(UPSTREAM_ERROR, "server_error"))
        elif mode == "garbage":
            await _raw(send, 200, b"<html>not an API</html>", "text/html")
        else:
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.model_ids]
            await _json(send, 200, {"object": "list", "data": data})

    def _usage(self, body: dict[str, Any]) -> dict[str, int]:
        if "messages" in body:
            prompt = " ".join(str(m.get("content", "")) for m in body["messages"])
        else:
            prompt = str(body.get("prompt", ""))
        prompt_tokens, completion_tokens = len(prompt.split()), len(self.pieces())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _whole(self, body: dict[str, Any], chat: bool, mode: Mode, send: Send) -> None:
        if mode == "garbage":
            await _raw(send, 200, self.garbage, "text/html")
            return
        if mode == "error_frame":
            await _json(
                send, 200, _error_body(self.error_message or UPSTREAM_ERROR, "server_error")
            )
            return
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if chat and self.refusal:
            choice["message"] = {"role": "assistant", "content": None, "refusal": self.reply}
        elif chat and self.tool_calls:
            choice["message"] = {
                "role": "assistant",
                "content": self.reply or None,
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in self.tool_calls
                ],
            }
        elif chat:
            choice["message"] = {"role": "assistant", "content": self.reply}
        else:
            choice["text"] = self.reply
            choice["logprobs"] = None
        answer = {
            "id": "fake-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [choice],
            "usage": self._usage(body),
        }
        if mode == "die_mid_stream":
            encoded = msgspec.json.encode(answer)
            await _start(send, 200, "application/json")
            await send(
                {
                    "type": "http.response.body",
                    "body": encoded[: len(encoded) // 2],
                    "more_body": True,
                }
            )
            raise UpstreamDied
        await _json(send, 200, answer)

    @staticmethod
    def _tool_frame(
        frame: Callable[[str | None, str | None], dict[str, Any]], piece: dict[str, Any]
    ) -> dict[str, Any]:
        out = frame(None, None)
        out["choices"][0]["delta"] = {"tool_calls": [piece]}
        return out

    async def _stream(
        self, body: dict[str, Any], chat: bool, mode: Mode, receive: Receive, send: Send
    ) -> None:
        await _start(send, 200, "text/event-stream")
        if mode == "garbage":
            await _body_part(send, b'data: {"choices": [{"delta": \n\n', more=False)
            return
        created, model = int(time.time()), body.get("model", "")

        def frame(text: str | None, finish: str | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                field = "refusal" if self.refusal else "content"
                choice["delta"] = {} if text is None else {field: text}
            else:
                choice["text"] = text or ""
                choice["logprobs"] = None
            return {
                "id": "fake-1",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }

        pieces = self.pieces()
        if chat:
            first = frame("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await _event(send, first)
        if mode in ("die_mid_stream", "stall_mid_stream"):
            for piece in pieces[: max(1, len(pieces) // 2)]:
                await _event(send, frame(piece, None))
            if mode == "stall_mid_stream":
                await _wait_or_hang_up(receive, self.delay_s)
            raise UpstreamDied
        if mode == "error_frame":
            await _event(send, frame(pieces[0], None))
            await _event(send, _error_body(self.error_message or UPSTREAM_ERROR, "server_error"))
            await _body_part(send, b"", more=False)
            return
        await _body_part(send, b": keepalive\r\n\r\n")
        for piece in pieces:
            await _event(send, frame(piece, None))
        for index, call in enumerate(self.tool_calls or () if chat else ()):
            head = {"index": index, "id": call["id"], "type": "function"}
            head["function"] = {"name": call["name"], "arguments": ""}
            await _event(send, self._tool_frame(frame, head))
            arguments, n = call["arguments"], self.tool_call_piece
            for at in range(0, len(arguments), n):
                piece = {"index": index, "function": {"arguments": arguments[at : at + n]}}
                await _event(send, self._tool_frame(frame, piece))
        await _event(send, frame(None, self.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_frame = frame(None, None)
            usage_frame["choices"] = []
            usage_frame["usage"] = self._usage(body)
            await _event(send, usage_frame)
        await _body_part(send, b"data: [DONE]\n\n", more=False)


# --- ASGI plumbing ----------------------------------------------------------------------


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _wait_or_hang_up(receive: Receive, delay_s: float) -> None:
    """Sleep ``delay_s``, cut short when the client disconnects (so servers stop fast)."""
    try:
        async with asyncio.timeout(delay_s):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        pass


def _with_cookie(send: Send, cookie: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]
            message = {**message, "headers": headers}
        await send(message)

    return sending


async def _start(send: Send, status: int, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _body_part(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _raw(send: Send, status: int, data: bytes, content_type: str) -> None:
    await _start(send, status, content_type)
    await _body_part(send, data, more=False)


async def _json(send: Send, status: int, payload: Any) -> None:
    await _raw(send, status, msgspec.json.encode(payload), "application/json")


async def _event(send: Send, payload: Any) -> None:
    await _body_part(send, b"data: " + msgspec.json.encode(payload) + b"\n\n")


# --- Ways to reach it -------------------------------------------------------------------


def fake_client(*fakes: FakeUpstream, **client_kwargs: Any) -> httpx.AsyncClient:
    """An ``AsyncClient`` that reaches each fake at its ``base_url`` in-process.

    Other hosts go over the real network (so :func:`refused_url` still refuses).
    The caller closes it (``async with``). Note that ASGITransport hands over a body
    only once the app has finished, so a stream arrives all at once.
    """
    mounts: dict[str, httpx.AsyncBaseTransport] = {
        f"all://{fake.host}": httpx.ASGITransport(app=fake.app, raise_app_exceptions=False)
        for fake in fakes
    }
    client_kwargs.setdefault("transport", httpx.AsyncHTTPTransport(verify=_ssl_context()))
    return httpx.AsyncClient(mounts=mounts, **client_kwargs)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading CA certificates takes tens of milliseconds; tests build many clients.
    return ssl.create_default_context()


def refused_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens: connecting to it is refused."""
    with free_socket() as sock:
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextmanager
def serve_upstream(fake: FakeUpstream, *, startup_timeout_s: float = 10.0) -> Iterator[str]:
    """Run ``fake`` under uvicorn on 127.0.0.1 (free port) in a thread; yield its ``/v1`` URL."""
    # A bound method fools uvicorn's ASGI 2 vs 3 detection, hence the explicit interface.
    with serve_asgi(
        fake.app, lifespan="off", interface="asgi3", startup_timeout_s=startup_timeout_s
    ) as url:
        yield f"{url}/v1"


__all__ = [
    "REFUSAL",
    "UPSTREAM_ERROR",
    "FakeUpstream",
    "Mode",
    "UpstreamDied",
    "fake_client",
    "refused_url",
    "serve_upstream",
]
