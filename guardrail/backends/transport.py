"""The wire under the remote backend's ``httpx`` client: an httpx transport on aiohttp.

The remote backend speaks to upstreams through :class:`httpx.AsyncClient` (its API,
its exceptions, its ``ASGITransport`` for tests). What carries the bytes is swappable,
and the default one, httpcore over anyio, is the largest single cost of a proxied
request: about 1.1 ms of CPU per call against a local upstream, of the 2 ms the gateway
spends per request with no filters. aiohttp's client (a C HTTP parser, asyncio
transports, no anyio layer) does the same exchange in about a quarter of that, and
under httpx the whole call costs about half (README, "Measurements: proxy overhead").

:class:`AiohttpTransport` keeps httpx's behaviour where the backend relies on it:

- httpx decides everything above the wire: headers, redirects (off), cookies (the
  backend's client keeps none), content decoding (aiohttp hands the body over as it
  came, so ``Content-Encoding`` is decoded once, by httpx), proxies from the
  environment (httpx routes those requests to its own proxy transports, not here).
- Per-request timeouts come from the request's ``timeout`` extension: ``connect`` bounds
  the TCP and TLS handshake, ``pool`` the wait for a free connection, ``read`` each
  read of the answer (a stream that stalls), as httpcore applies them.
- aiohttp's errors come out as the httpx errors httpcore raises for the same event, so
  the backend's mapping of failures to answers (retry, failover, 502/503/504) is
  unchanged: refused or failed connections are :class:`httpx.ConnectError` (nothing was
  sent), a handshake past its time :class:`httpx.ConnectTimeout`, a stalled read
  :class:`httpx.ReadTimeout`, an answer cut short or not HTTP
  :class:`httpx.RemoteProtocolError`, a reset :class:`httpx.ReadError`, a request
  aiohttp will not write (a line break in a header value)
  :class:`httpx.LocalProtocolError`.
- Credentials in the URL (``http://user:pw@host/v1``) travel as httpx's Basic
  ``Authorization`` header only; aiohttp is given the URL without them.
- Connections are pooled per host up to ``max_connections`` in all; idle ones close
  after ``keepalive_expiry`` seconds. A response closed before its end closes its
  connection instead of returning it to the pool.
- TLS uses the context given, by default httpx's own (``httpx.create_ssl_context()``:
  the same CA bundle and ``SSL_CERT_FILE`` handling as a plain httpx client).
- Host names are resolved by aiohttp, which keeps an answer for 10 seconds: an
  upstream whose DNS name moves (a rolling replacement) is reached at its new address
  within that time. httpcore resolved on every new connection.

The aiohttp session belongs to the event loop of the first request; it is created
then, not at construction (gateways are built before their loop runs).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx

# Headers aiohttp computes from the body it is given; httpx's own values are dropped.
_BODY_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An :class:`httpx.AsyncBaseTransport` that sends each request with aiohttp.

    Example::

        client = httpx.AsyncClient(transport=AiohttpTransport(max_connections=512))
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        # Under the 5 s after which uvicorn-served upstreams (vLLM, ...) close an idle
        # connection, so a request is not sent down one the server is closing.
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    limit_per_host=0,
                    keepalive_timeout=self._keepalive_expiry,
                    ssl=self._ssl_context,
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # httpx decodes, by the headers it is given
                trust_env=False,  # httpx applies the environment's proxies itself
                # httpx sets these (or chose not to); aiohttp must not add its own.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            if name.lower() not in _BODY_FRAMING
        ]
        limits = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=limits.get("pool"),
            sock_connect=limits.get("connect"),
            sock_read=limits.get("read"),
        )
        url = request.url
        if url.userinfo:
            # httpx turned the URL's credentials into an Authorization header already;
            # aiohttp refuses a request that carries both.
            url = url.copy_with(userinfo=b"")
        try:
            response = await self._session_now().request(
                request.method,
                str(url),
                data=body or None,
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            )
        except aiohttp.ConnectionTimeoutError as e:
            raise httpx.ConnectTimeout(_reason(e), request=request) from e
        except aiohttp.ClientConnectorError as e:
            raise httpx.ConnectError(_reason(e), request=request) from e
        except aiohttp.ClientError as e:
            raise _exchange_error(e, request) from e
        except ValueError as e:
            # aiohttp refuses what it will not write (a line break in a header value):
            # httpcore raises LocalProtocolError for the same request.
            raise httpx.LocalProtocolError(_reason(e), request=request) from e
        version = response.version
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            extensions={
                "http_version": f"HTTP/{version.major}.{version.minor}".encode()
                if version
                else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp reads it; closing it hands the connection back."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as e:
            raise _exchange_error(e, self._request) from e

    async def aclose(self) -> None:
        # Back to the pool only when the body was read to its end; aiohttp closes a
        # connection whose answer is unfinished rather than reuse it mid-message.
        self._response.release()


def _exchange_error(error: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The httpx error httpcore raises for what went wrong once connected."""
    if isinstance(error, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(_reason(error), request=request)
    if isinstance(error, aiohttp.ClientOSError):
        return httpx.ReadError(_reason(error), request=request)
    # The peer hung up, or its answer was not HTTP, or ended before its length.
    return httpx.RemoteProtocolError(_reason(error), request=request)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
