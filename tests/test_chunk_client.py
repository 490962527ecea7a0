"""The chunk client against a real socket server on loopback that says exactly the bytes
each test wants: bodies land whole and byte-identical, connections are kept only when
the answer was read to its end and nothing else came, a kept connection the peer closed
is replaced without the caller seeing it, and every way a peer can break the exchange
(malformed or endless head, short body, silence, cancellation) ends in an error and a
closed connection, never in a stall or a reused broken one."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distd import chunk_client
from distd.chunk_client import MAX_HEAD, ChunkClient, ProtocolError, _parse_head
from distd.directio import aligned_buffer

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawServer:
    """Answers each request head with `handler(path, reader, writer)`; the connection
    stays open while it returns True. Counts connections, to tell reuse from not."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""
        self.tasks: set[asyncio.Task[None] | None] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if not await self.handler(path, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # a cancelled handler ends quietly: the test is over
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[RawServer, ChunkClient]]:
    """The server, and a client that is closed (its idle connections) at the end."""
    rs = RawServer(handler)
    server = await asyncio.start_server(rs._serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    rs.url = f"http://{host}:{port}"
    client = ChunkClient()
    try:
        yield rs, client
    finally:
        client.close()
        server.close()
        for task in rs.tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in rs.tasks if t is not None))


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def fetch(client: ChunkClient, url: str) -> tuple[int, bytes]:
    async with client.get(url, {"Authorization": "Bearer t"}) as resp:
        if resp.status != 200:
            return resp.status, b""
        assert resp.content_length is not None
        body = aligned_buffer(resp.content_length)
        async for _ in resp.read_into(body):
            pass
        return resp.status, body.tobytes()


@pytest.mark.parametrize("size", [0, 1, MAX_HEAD - 1, MAX_HEAD + 1, (4 << 20) + 3])
async def test_bodies_arrive_whole_and_the_connection_is_kept(size: int) -> None:
    data = os.urandom(size)

    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(ok(data, "X-Chunk-Encoding: raw\r\n"))
        await w.drain()
        return True

    async with serving(handler) as (srv, client):
        for _ in range(3):
            assert await fetch(client, srv.url + "/v1/chunks/x") == (200, data)
        assert srv.connections == 1


async def test_a_refusal_is_drained_and_the_connection_serves_again() -> None:
    answers = iter([503, 404, 200])

    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        status = next(answers)
        if status == 200:
            w.write(ok(b"chunk"))
        else:
            body = b'{"error": "busy: every upload slot is taken", "busy": true}'
            w.write(
                f"HTTP/1.1 {status} No\r\nX-Retry-Ms: 250\r\nContent-Length: {len(body)}\r\n"
                "\r\n".encode()
                + body
            )
        await w.drain()
        return True

    async with serving(handler) as (srv, client):
        async with client.get(srv.url + "/c", {}) as resp:
            assert resp.status == 503 and resp.headers["x-retry-ms"] == "250"
        assert await fetch(client, srv.url + "/c") == (404, b"")
        assert await fetch(client, srv.url + "/c") == (200, b"chunk")
        assert srv.connections == 1


async def test_bytes_past_the_body_retire_the_connection() -> None:
    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"chunk") + b"GARBAGE")
        await w.drain()
        return True

    async with serving(handler) as (srv, client):
        assert await fetch(client, srv.url + "/c") == (200, b"chunk")
        await asyncio.sleep(0.05)
        assert await fetch(client, srv.url + "/c") == (200, b"chunk")
        assert srv.connections == 2


async def test_a_kept_connection_the_peer_closed_is_replaced() -> None:
    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"chunk"))  # says keep-alive (HTTP/1.1), then hangs up anyway
        await w.drain()
        return False

    async with serving(handler) as (srv, client):
        for _ in range(3):
            assert await fetch(client, srv.url + "/c") == (200, b"chunk")
        assert srv.connections == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"SPDY/9 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * MAX_HEAD,  # a head that never ends
    ],
    ids=["version", "status", "header", "two-lengths", "negative-length", "endless-head"],
)
async def test_malformed_heads_are_refused(answer: bytes) -> None:
    await _fails_and_keeps_nothing(replying(answer, hold=5), ProtocolError)


async def test_a_short_body_is_an_error_not_a_stall() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000
    await _fails_and_keeps_nothing(replying(answer, hold=0), ConnectionError)


async def test_a_silent_peer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_client, "READ_TIMEOUT", 0.3)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"
    await _fails_and_keeps_nothing(replying(answer, hold=10), TimeoutError)


def replying(answer: bytes, hold: float) -> Handler:
    """A peer that sends `answer`, says nothing more for `hold` seconds, and hangs up."""

    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(answer)
        await w.drain()
        await asyncio.sleep(hold)
        return False

    return handler


async def _fails_and_keeps_nothing(handler: Handler, error: type[BaseException]) -> None:
    async with serving(handler) as (srv, client):
        with pytest.raises(error):
            await fetch(client, srv.url + "/c")
        assert client._idle == {}


async def test_a_cancelled_read_closes_its_connection() -> None:
    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        if path == "/slow":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc")
            await w.drain()
            await asyncio.sleep(10)
            return False
        w.write(ok(b"chunk"))
        await w.drain()
        return True

    async with serving(handler) as (srv, client):
        task = asyncio.create_task(fetch(client, srv.url + "/slow"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client._idle == {}
        assert await fetch(client, srv.url + "/fast") == (200, b"chunk")
        assert srv.connections == 2


async def test_idle_connections_are_kept_up_to_the_cap() -> None:
    async def handler(path: str, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)  # so the six requests overlap
        w.write(ok(b"chunk"))
        await w.drain()
        return True

    async with serving(handler) as (srv, client):
        for _ in range(2):
            got = await asyncio.gather(*(fetch(client, srv.url + "/c") for _ in range(6)))
            assert got == [(200, b"chunk")] * 6
            assert [len(v) for v in client._idle.values()] == [chunk_client.KEEP_PER_PEER]
        assert srv.connections == 6 + 6 - chunk_client.KEEP_PER_PEER


# -- the head parser, on its own ------------------------------------------------------------

_token = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789"), min_size=1)
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


@given(raw=st.binary(max_size=300))
def test_any_head_parses_or_is_refused_as_a_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        assert 0 <= _parse_head(raw).status <= 999


@given(
    status=st.integers(100, 599),
    fields=st.dictionaries(_token, _value, max_size=6),
    length=st.none() | st.integers(0, 1 << 40),
    close=st.booleans(),
)
def test_heads_we_could_be_sent_parse_back(
    status: int, fields: dict[str, str], length: int | None, close: bool
) -> None:
    fields = {
        k: v
        for k, v in fields.items()
        if k.lower() not in ("content-length", "connection", "transfer-encoding")
    }
    lines = [f"HTTP/1.1 {status} Whatever"] + [f"{k}: {v}" for k, v in fields.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    head = _parse_head("\r\n".join(lines).encode())
    assert head.status == status and head.length == length
    assert head.keep == (length is not None and not close)
    for k, v in fields.items():
        assert v in head.headers[k.lower()]
