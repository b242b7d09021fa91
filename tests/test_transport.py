"""The aiohttp transport under the remote backend's httpx client, over real sockets.

The upstream here is a raw asyncio server that writes exactly the bytes a test asks
for, so the wire cases httpcore handles (keep-alive reuse, chunked streams, gzip, an
answer cut short, a stall, garbage) are each pinned to the httpx error or result the
backend's failure mapping expects.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from guardrail.backends.remote import RemoteBackend, from_settings
from guardrail.backends.transport import AiohttpTransport
from guardrail.settings import Settings
from tests.fakes.upstream import FakeUpstream, refused_url
from tests.servers import serve_asgi

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

JSON = b'{"ok": true}'


class Upstream:
    """A TCP server on 127.0.0.1 that runs ``handler`` for every connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0  # connections the peer ended
        self.ended = asyncio.Event()
        self.tasks: set[asyncio.Task[None] | None] = set()
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            self.closed += 1
            self.ended.set()
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request's head (its body is read and kept too); b"" when the peer is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.requests.append((head, await reader.readexactly(length)))
        return head


@asynccontextmanager
async def upstream(make: Callable[[Upstream], Handler]) -> AsyncIterator[Upstream]:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.handler = make(up)
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    up.url = f"http://127.0.0.1:{port}"
    async with server:
        try:
            yield up
        finally:
            for task in up.tasks:
                if task is not None:
                    task.cancel()


def answer(body: bytes = JSON, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [b"HTTP/1.1 " + status, b"content-type: application/json", *headers]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def keep_answering(reply: bytes) -> Callable[[Upstream], Handler]:
    """Answer every request on a connection with ``reply`` (keep-alive)."""

    def make(up: Upstream) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await up.read_request(reader):
                writer.write(reply)
                await writer.drain()

        return handle

    return make


def once(reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Callable[[Upstream], Handler]:
    """Read one request, then run ``reply`` on the connection."""

    def make(up: Upstream) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await up.read_request(reader):
                await reply(writer)

        return handle

    return make


async def first_chunk_then_stall(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await writer.drain()
    await asyncio.sleep(5)  # the rest never comes


@asynccontextmanager
async def client(**transport_kwargs: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = AiohttpTransport(**transport_kwargs)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, timeout=2.0) as c:
        yield c


# -- exchanges that work -------------------------------------------------------------


async def test_a_post_goes_out_as_httpx_built_it_and_the_answer_comes_back() -> None:
    async with upstream(keep_answering(answer(JSON, b"x-upstream: 1"))) as up, client() as c:
        r = await c.post(up.url + "/v1/chat/completions?a=1", json={"q": "hi"})

    assert r.status_code == 200
    assert r.json() == {"ok": True}
    assert r.headers["x-upstream"] == "1"
    assert r.http_version == "HTTP/1.1"
    assert r.reason_phrase == "OK"
    head, body = up.requests[0]
    assert head.startswith(b"POST /v1/chat/completions?a=1 HTTP/1.1\r\n")
    assert body == b'{"q":"hi"}'
    lines = [line.lower() for line in head.split(b"\r\n")[1:] if line]
    names = [line.split(b":")[0] for line in lines]
    # One of each: httpx's own headers, aiohttp's body framing, nothing added twice.
    assert sorted(names) == sorted(set(names))
    assert b"content-length: 10" in lines
    assert b"content-type: application/json" in lines
    assert any(line.startswith(b"user-agent: python-httpx/") for line in lines)
    assert b"host: " + up.url.removeprefix("http://").encode() in lines


async def test_a_streamed_request_body_goes_out_whole_with_one_framing() -> None:
    """httpx frames a body it streams as chunked; the transport sends it read, so its
    Content-Length must be aiohttp's alone, with no Transfer-Encoding left beside it."""

    async def parts() -> AsyncIterator[bytes]:
        yield b'{"q": '
        yield b'"hi"}'

    async with upstream(keep_answering(answer())) as up, client() as c:
        r = await c.post(up.url + "/x", content=parts())

    assert r.status_code == 200
    head, body = up.requests[0]
    lines = [line.lower() for line in head.split(b"\r\n")[1:] if line]
    assert b"content-length: 11" in lines
    assert not any(line.startswith(b"transfer-encoding") for line in lines)
    assert body == b'{"q": "hi"}'


async def test_credentials_in_the_url_go_out_as_httpx_s_basic_authorization_alone() -> None:
    async with upstream(keep_answering(answer())) as up, client() as c:
        url = up.url.replace("http://", "http://user:pw@") + "/v1/models"
        r = await c.get(url)

    assert r.status_code == 200
    head, _ = up.requests[0]
    assert head.startswith(b"GET /v1/models HTTP/1.1\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")[1:] if line]
    # base64("user:pw"); aiohttp had refused a URL with credentials beside the header.
    assert [line for line in lines if line.startswith(b"authorization")] == [
        b"authorization: basic dxnlcjpwdw=="
    ]


async def test_requests_reuse_one_kept_alive_connection() -> None:
    async with upstream(keep_answering(answer())) as up, client() as c:
        for _ in range(5):
            assert (await c.post(up.url + "/x", json={})).status_code == 200
        assert (await c.get(up.url + "/models")).status_code == 200

    assert up.connections == 1
    assert len(up.requests) == 6
    assert up.requests[-1][0].startswith(b"GET /models HTTP/1.1")


async def test_an_error_status_is_an_answer_not_an_exception() -> None:
    reply = answer(
        b'{"error": {"message": "slow down"}}', b"retry-after: 7", status=b"429 Too Many"
    )
    async with upstream(keep_answering(reply)) as up, client() as c:
        r = await c.post(up.url + "/x", json={})

    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["message"] == "slow down"


async def test_a_gzip_answer_is_decoded_once_by_httpx() -> None:
    packed = gzip.compress(JSON)
    gzipped = keep_answering(answer(packed, b"content-encoding: gzip"))
    async with upstream(gzipped) as up, client() as c:
        r = await c.post(up.url + "/x", json={})

    assert r.content == JSON
    assert b"accept-encoding: gzip" in up.requests[0][0].lower()


async def test_a_chunked_stream_arrives_piece_by_piece() -> None:
    go_on = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()

    async with (
        upstream(once(reply)) as up,
        client() as c,
        c.stream("POST", up.url + "/x", json={}) as r,
    ):
        pieces = r.aiter_bytes()
        first = await asyncio.wait_for(anext(pieces), 2)  # before the rest is sent
        go_on.set()
        rest = b"".join([chunk async for chunk in pieces])

    assert first == b"data: 1"
    assert rest == b"data: 2"


async def test_a_stream_closed_early_does_not_hand_its_connection_to_the_next_request() -> None:
    def make(up: Upstream) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if up.connections == 1:
                await once(first_chunk_then_stall)(up)(reader, writer)
            else:
                await keep_answering(answer())(up)(reader, writer)

        return handle

    async with upstream(make) as up, client() as c:
        async with c.stream("POST", up.url + "/x", json={}) as r:
            assert await anext(r.aiter_bytes()) == b"abc"
        after = await c.post(up.url + "/x", json={})

    assert after.json() == {"ok": True}
    assert up.connections == 2


# -- failures, as the httpx errors the backend maps -------------------------------------


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.post(refused_url() + "/x", json={})


async def test_waiting_past_the_pool_timeout_for_a_connection_is_a_connect_timeout() -> None:
    async with (
        upstream(once(first_chunk_then_stall)) as up,
        client(max_connections=1) as c,
        c.stream("POST", up.url + "/x", json={}) as r,
    ):
        await anext(r.aiter_bytes())  # holds the pool's only connection
        with pytest.raises(httpx.ConnectTimeout):
            await c.post(up.url + "/x", json={}, timeout=httpx.Timeout(2.0, pool=0.2))


async def test_an_upstream_that_never_answers_is_a_read_timeout() -> None:
    async with upstream(once(lambda w: asyncio.sleep(5))) as up, client() as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(up.url + "/x", json={}, timeout=httpx.Timeout(2.0, read=0.2))


async def test_a_stream_that_stalls_is_a_read_timeout() -> None:
    async with (
        upstream(once(first_chunk_then_stall)) as up,
        client() as c,
        c.stream("POST", up.url + "/x", json={}, timeout=httpx.Timeout(2.0, read=0.2)) as r,
    ):
        pieces = r.aiter_bytes()
        assert await anext(pieces) == b"abc"
        with pytest.raises(httpx.ReadTimeout):
            await anext(pieces)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()


async def cut_short(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + JSON)
    await writer.drain()


async def cut_mid_chunk(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc")
    await writer.drain()


async def not_http(writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize("reply", [hang_up, cut_short, cut_mid_chunk, not_http])
async def test_an_answer_cut_short_or_not_http_is_a_protocol_error(
    reply: Callable[[asyncio.StreamWriter], Awaitable[None]],
) -> None:
    async with upstream(once(reply)) as up, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(up.url + "/x", json={})


async def test_a_header_aiohttp_will_not_write_is_a_local_protocol_error() -> None:
    async with upstream(keep_answering(answer())) as up, client() as c:
        with pytest.raises(httpx.LocalProtocolError, match="ValueError"):
            await c.post(up.url + "/x", json={}, headers={"authorization": "Bearer sk\n1"})

    assert up.requests == []


async def test_closing_the_client_ends_its_kept_alive_connections() -> None:
    async with upstream(keep_answering(answer())) as up:
        c = httpx.AsyncClient(transport=AiohttpTransport())
        await c.post(up.url + "/x", json={})
        await asyncio.sleep(0.05)
        assert up.closed == 0  # kept alive
        await c.aclose()
        await asyncio.wait_for(up.ended.wait(), 2)

    assert up.connections == 1


# -- TLS ---------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_is_verified_against_the_context_given(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)

    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.handler = keep_answering(answer())(up)
    tls = await asyncio.start_server(up.serve, "127.0.0.1", 0, ssl=server)
    url = f"https://127.0.0.1:{tls.sockets[0].getsockname()[1]}/x"
    async with tls:
        trusting = ssl.create_default_context(cafile=str(cert_file))
        async with client(ssl_context=trusting) as c:
            assert (await c.post(url, json={})).json() == {"ok": True}
        # httpx's default context does not know this certificate: no connection.
        async with client() as c:
            with pytest.raises(httpx.ConnectError, match=r"(?i)certificate"):
                await c.post(url, json={})


# -- in the backend ----------------------------------------------------------------------


async def test_the_backend_built_from_settings_sends_through_aiohttp() -> None:
    fake = FakeUpstream(reply="Paris.")
    with serve_asgi(fake.app, lifespan="off", interface="asgi3") as url:
        backend = from_settings(Settings(backend="remote", backend_urls=[url + "/v1"]))
        assert isinstance(backend, RemoteBackend)
        assert isinstance(backend._client._transport, AiohttpTransport)
        try:
            assert await backend.models() == fake.model_ids
            assert await backend.health() is True
        finally:
            await backend.aclose()
