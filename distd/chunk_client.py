"""Chunk GETs over HTTP/1.1 that land the body straight in the receiver's buffer.

aiohttp reads a socket into its own buffer, copies each read into a bytes object and
its parser copies the body into another, to be copied a third time into the chunk's
buffer: three copies of every received byte on top of the kernel's, and a Python
wake-up for each 64-256 KiB read. A chunk GET is the simplest exchange HTTP has (one
request, a head, Content-Length bytes), so this client parses the head itself and then
lets the kernel write the body into the chunk's own buffer (`asyncio.BufferedProtocol`),
reading paused while the caller pays for what came (the ingress cap). Connections are
kept alive per peer, as aiohttp's pool did. Everything else a node says over HTTP
(have-streams, the seeder's API) stays on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

MAX_HEAD = 16 << 10  # a response head larger than this is not from one of ours
MAX_SMALL_BODY = 64 << 10  # a refusal's body (read and dropped, to keep the connection)
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # without a byte this long, the peer is gone
# An idle connection is reused only this long: peers close idle ones after 30 s
# (httpserver.IDLE_TIMEOUT), and a request must not race that close.
KEEP_IDLE = 15.0
KEEP_PER_PEER = 4  # idle connections kept per peer: more than a node asks of one at once


class ProtocolError(ValueError):
    """A response this client cannot take: malformed head, unsupported framing."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: Mapping[str, str]  # names in lower case
    length: int | None  # Content-Length, if given
    keep: bool  # the connection may serve again once the body is read


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection. Bytes go into `target` (a body) while one is set and
    not yet full, else into `pending`: a head (reading pauses the moment it is whole),
    a refusal's small body, or bytes nobody asked for, which retire the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._scratch = memoryview(bytearray(MAX_HEAD))
        self.pending = bytearray()
        self.head_end = -1  # where the head in `pending` ends, once it has
        self.limit = MAX_HEAD  # bytes `pending` may hold once the head is in
        self.target: memoryview | None = None
        self.got = 0  # bytes of `target` filled
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0

    # -- protocol callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.target is not None and self.got < len(self.target):
            return self.target[self.got :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        target = self.target
        if target is not None and self.got < len(target):
            self.got += nbytes
            if self.got == len(target):
                self.transport.pause_reading()
        else:
            start = max(0, len(self.pending) - 3)
            self.pending += self._scratch[:nbytes]
            if self.head_end < 0:
                self.head_end = self.pending.find(b"\r\n\r\n", start)
                if self.head_end >= 0:
                    self.transport.pause_reading()
                elif len(self.pending) > MAX_HEAD:
                    self._fail(ProtocolError(f"response head over {MAX_HEAD} bytes"))
            elif len(self.pending) > self.limit:
                self._fail(ProtocolError("peer sent bytes nobody asked for"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection lost"))

    # -- helpers --

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        """Until bytes arrive or the connection ends, READ_TIMEOUT at most. Callers wait
        while what they need has not come: a connection that ended raises then, not
        when it ends just after the last byte they needed (a peer closing after it)."""
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                await self._waiter
        finally:
            self._waiter = None

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        return self.error is None and not self.pending and self.transport is not None

    def reusable_at(self, now: float) -> bool:
        """Fit to send on: alive, nothing stray read, idle less than KEEP_IDLE."""
        return self.usable and now - self.idle_since < KEEP_IDLE

    def close(self) -> None:
        self._fail(ConnectionAbortedError("connection closed by this node"))


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"malformed status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"malformed header line {line[:60]!r}")
        key = name.lower()
        value = value.strip()
        if key in headers and headers[key] != value:
            if key == "content-length":
                raise ProtocolError("conflicting Content-Length headers")
            value = f"{headers[key]}, {value}"
        headers[key] = value
    length: int | None = None
    if "transfer-encoding" in headers:
        pass  # not a chunk as peers send them: no length, and the connection goes after
    elif "content-length" in headers:
        text = headers["content-length"]
        if not text.isdigit() or len(text) > 18:
            raise ProtocolError(f"malformed Content-Length {text[:30]!r}")
        length = int(text)
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    return Head(int(code), headers, length, keep and length is not None)


class Response:
    """One answer on a connection held for it; `ChunkClient.get` yields it."""

    def __init__(self, conn: _Connection, head: Head) -> None:
        self._conn = conn
        self.status = head.status
        self.headers = head.headers
        self.content_length = head.length
        self.reusable = head.keep
        self.done = False  # the whole body was read: the connection may go back

    async def read_into(self, body: memoryview) -> AsyncGenerator[int, None]:
        """Fill `body` (exactly Content-Length bytes) straight from the socket, yielding
        how many bytes came at each wake-up; reading pauses until the next iteration, so
        a caller that waits there (a rate cap) holds the rest in the kernel's buffers."""
        conn = self._conn
        if len(body) != self.content_length:
            raise ValueError("body buffer is not Content-Length bytes")
        # What came with the head; anything past the body stays in `pending`, which
        # retires the connection (the body itself is checked by its digest, as always).
        early = min(len(conn.pending), len(body))
        body[:early] = conn.pending[:early]
        del conn.pending[:early]
        conn.target, conn.got = body, early
        try:
            seen = 0
            while True:
                if conn.got > seen:
                    new, seen = conn.got - seen, conn.got
                    yield new
                if seen == len(body):
                    break
                conn.resume()
                try:
                    await conn.wait()
                finally:
                    conn.pause()
        finally:
            conn.target = None
        self.done = True

    async def _drain(self) -> None:
        """Read a small body to its end and drop it, so the connection can serve again."""
        conn = self._conn
        length = self.content_length
        if length is None or length > MAX_SMALL_BODY:
            return
        conn.limit = length
        conn.resume()
        while len(conn.pending) < length:
            await conn.wait()
        conn.pause()
        del conn.pending[:length]
        self.done = True


class ChunkClient:
    """Keep-alive connections to peers for chunk GETs; `ssl` as for aiohttp: a context,
    True for the default one, False to skip certificate checks (https URLs only)."""

    def __init__(self, client_ssl: ssl.SSLContext | bool = True) -> None:
        self._ssl = client_ssl
        self._context: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    def _ssl_for(self, scheme: str) -> ssl.SSLContext | None:
        if scheme != "https":
            return None
        if isinstance(self._ssl, ssl.SSLContext):
            return self._ssl
        if self._context is None:  # made once: loading the CA store is not cheap
            self._context = ssl.create_default_context()
            if not self._ssl:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        return self._context

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        context = self._ssl_for(scheme)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(
                _Connection, host, port, ssl=context, server_hostname=host if context else None
            )
        return conn

    def _pooled(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable_at(now):
                return conn
            conn.close()
        return None

    def _release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        if self._closed or not conn.usable:
            conn.close()
            return
        conn.limit = 0  # any byte while idle retires it
        conn.resume()  # so a close by the peer is seen while idle
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        idle.append(conn)
        # Those that died or aged since they came back go, and the oldest past the cap.
        keep = [c for c in idle if c.reusable_at(now)][-KEEP_PER_PEER:]
        for c in idle:
            if c not in keep:
                c.close()
        idle[:] = keep

    @contextlib.asynccontextmanager
    async def get(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[Response]:
        """GET `url`; yields the response once its head is in (a refusal's small body
        already read). The caller reads a 200's body with `read_into`; a connection whose
        answer was not read to its end is closed, not reused."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn = self._pooled(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(parts.scheme, host, port)
            try:
                head = await self._exchange(conn, request)
                break
            except ConnectionError:
                conn.close()
                # A kept connection the peer closed as we sent: once more, on a new one.
                if not reused or conn.pending:
                    raise
                conn, reused = None, False
            except BaseException:
                conn.close()
                raise
        resp = Response(conn, head)
        try:
            if head.status != 200:
                await resp._drain()
            yield resp
        finally:
            if resp.done and resp.reusable:
                self._release(key, conn)
            else:
                conn.close()

    @staticmethod
    async def _exchange(conn: _Connection, request: bytes) -> Head:
        assert conn.transport is not None
        conn.head_end, conn.limit = -1, MAX_HEAD
        conn.transport.write(request)
        conn.resume()
        while conn.head_end < 0:
            await conn.wait()
        conn.pause()  # already, by the protocol: until the caller reads the body
        raw = bytes(conn.pending[: conn.head_end])
        del conn.pending[: conn.head_end + 4]
        return _parse_head(raw)

    def close(self) -> None:
        """Close every idle connection; connections in use close when their answer ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
