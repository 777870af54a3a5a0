"""The lean upstream client against real sockets: framing, keep-alive, stale connections."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp import ServerDisconnectedError, web

from gateway.accesslog import AccessLog
from gateway.http1 import ConnectError, ConnectionPool
from tests.support import refused_url


class RawServer:
    """A TCP server answering each request with scripted bytes; counts connections."""

    def __init__(self, answers: list[bytes], close_after_each: bool = False) -> None:
        self.answers = answers
        self.close_after_each = close_after_each
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                writer.write(self.answers.pop(0))
                await writer.drain()
                if self.close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_keep_alive_reuses_one_connection():
    pool = ConnectionPool()
    srv = RawServer([OK, OK, OK])
    async with srv as url:
        for _ in range(3):
            r = await pool.request(
                url, "GET", "/a?b=1", {"X-A": "1"}, None, connect_timeout=1, read_timeout=2
            )
            assert r.status == 200 and await r.read() == b"ok"
    assert srv.connections == 1
    head = srv.requests[0].decode()
    assert head.startswith("GET /a?b=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{url.rsplit(':', 1)[1]}\r\n" in head
    assert "X-A: 1\r\n" in head and "Content-Length" not in head
    await pool.close()


async def test_body_framing_and_post_without_body():
    pool = ConnectionPool()
    srv = RawServer([OK, OK])
    async with srv as url:
        r = await pool.request(url, "POST", "/p", {}, b"hello", connect_timeout=1, read_timeout=2)
        await r.read()
        r = await pool.request(url, "POST", "/p", {}, None, connect_timeout=1, read_timeout=2)
        await r.read()
    assert srv.requests[0].endswith(b"Content-Length: 5\r\n\r\nhello")
    assert srv.requests[1].endswith(b"Content-Length: 0\r\n\r\n")
    await pool.close()


async def test_chunked_answer_and_connection_close():
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nz"
    pool = ConnectionPool()
    srv = RawServer([chunked, closing, OK])
    async with srv as url:
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"abcde"
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"z"
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"ok"
    assert srv.connections == 2  # the upstream's Connection: close was honoured
    await pool.close()


async def test_an_unread_body_closes_the_connection():
    pool = ConnectionPool()
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"x" * 4000000
    srv = RawServer([big, OK])
    async with srv as url:
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        r.release()  # never read: the connection cannot be reused
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"ok"
    assert srv.connections == 2
    await pool.close()


async def test_idle_connection_closed_by_the_upstream_is_not_reused():
    pool = ConnectionPool()
    srv = RawServer([OK, OK], close_after_each=True)
    async with srv as url:
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        await r.read()  # back in the pool; the server then hangs up
        await asyncio.sleep(0.05)
        r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"ok"
    assert srv.connections == 2
    await pool.close()


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("DELETE", True), ("POST", False)])
async def test_a_kept_alive_connection_dropped_under_a_request(method, replayed):
    """The upstream closes a pooled connection as our request arrives (the idle-close
    race): idempotent requests are replayed on a new connection, a POST is not."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        if count == 1:
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        writer.close()  # ...is dropped without an answer

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = ConnectionPool()
    r = await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=2)
    await r.read()
    if replayed:
        r = await pool.request(url, method, "/", {}, None, connect_timeout=1, read_timeout=2)
        assert await r.read() == b"ok"
        assert count == 2
    else:
        with pytest.raises(ServerDisconnectedError):
            await pool.request(url, method, "/", {}, b"{}", connect_timeout=1, read_timeout=2)
        assert count == 1
    server.close()
    await pool.close()


async def test_connect_errors_and_read_timeout():
    pool = ConnectionPool()
    with pytest.raises(ConnectError):
        await pool.request(
            refused_url(),
            "GET",
            "/",
            {},
            None,
            connect_timeout=1,
            read_timeout=1,
        )

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with pytest.raises(TimeoutError):
        await pool.request(url, "GET", "/", {}, None, connect_timeout=1, read_timeout=0.2)
    server.close()
    await pool.close()


async def test_head_and_streamed_request_body(aiohttp_server):
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body, headers={"X-TE": request.headers.get("Transfer-Encoding", "")}
        )

    app = web.Application()
    app.router.add_route("*", "/", echo)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    pool = ConnectionPool()

    async def chunks():
        for part in (b"a" * 70000, b"b" * 5, b"c"):
            yield part

    r = await pool.request(url, "POST", "/", {}, chunks(), connect_timeout=1, read_timeout=2)
    assert r.headers["X-TE"] == "chunked"
    assert await r.read() == b"a" * 70000 + b"bbbbbc"
    r = await pool.request(url, "HEAD", "/", {}, None, connect_timeout=1, read_timeout=2)
    assert r.status == 200 and await r.read() == b""
    await pool.close()


def test_access_log_lines_are_json_with_escaped_client_values():
    out = io.StringIO()
    log = AccessLog(out)
    log.request("rid", "127.0.0.1", "GET", '/a"b\\c\n', "r", "s", None, 2, 503, 0.0125)
    log.flush()
    entry = json.loads(out.getvalue())
    assert entry["path"] == '/a"b\\c\n'
    assert entry["upstream"] is None
    assert (entry["attempts"], entry["status"], entry["duration_ms"]) == (2, 503, 12.5)
    assert entry["ts"] > 0
