"""Proxies for fault tests: a TCP proxy that breaks or stalls connections, and an HTTP
proxy that fails chosen routes. Both run on one background event loop, so a test
stays synchronous:

    with ProxyLoop() as loop:
        p = loop.tcp_proxy(faults=Faults(rate=0.05, seed=1))   # listening now, no target
        p.target = ("127.0.0.1", node_port)                    # set before first use
        ... daemons reach the node at 127.0.0.1:p.port ...
        p.stats.broken, p.stats.stalled, p.stats.connections

`TcpProxy`: each accepted connection is, with probability `Faults.rate` (from a
seeded RNG, so a run is repeatable), a faulty one: after a random number of bytes
have flowed from the target to the client (mid-transfer, by default within the
first two chunks' worth) it is either reset (RST on both sides) or stalled (no
more bytes either way, the sockets left open until the client gives up). With
`Faults.unit` set, the rate applies to the proxy's traffic instead: about one fault
per `unit / rate` bytes sent to clients, wherever those bytes flow, so a run that
carries enough traffic is sure to see faults however it splits into connections. With
`refuse=True` every connection is reset at once, like a listener that is gone,
but still counted with its time, so a test can see how often clients retry.

`HttpProxy`: forwards every request to one upstream URL, except that requests a
`fail` predicate picks get a 503 at once (e.g. only `POST /v1/announce`: a
tracker that is down while the seeder's other routes work).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")
HOST = "127.0.0.1"
PIPE_READ = 64 << 10
# Headers that belong to one hop and must not be forwarded (RFC 9110 7.6.1), plus the
# ones aiohttp sets itself from the body.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)


@dataclass(frozen=True)
class Faults:
    """Which connections fail, and how. `rate` 0 passes everything through untouched."""

    rate: float = 0.0  # share of connections (or of `unit`s of traffic) that break or stall
    stall_share: float = 0.5  # of the faulty ones, the share that stall instead of reset
    after_min: int = 16 << 10  # per connection: the fault fires once this many bytes went
    after_max: int = 2 << 20  # to the client, and no later than this many
    # When set, `rate` applies to every `unit` bytes the proxy sends to clients instead
    # of to every connection: with `unit` = the chunk size, about `rate` of chunk
    # transfers fail, however the traffic splits into connections.
    unit: int | None = None
    limit: int | None = None  # at most this many faults in all (None: no limit)
    seed: int = 0


@dataclass
class ProxyStats:
    connections: int = 0
    broken: int = 0  # reset mid-transfer
    stalled: int = 0  # frozen mid-transfer
    refused: int = 0  # reset at once (refuse mode, or the target would not connect)
    bytes_down: int = 0  # target -> client
    bytes_up: int = 0  # client -> target
    accepted_at: list[float] = field(default_factory=list)  # time.monotonic() of each accept
    # (time.monotonic(), first line the client sent) of each refused connection
    refused_log: list[tuple[float, str]] = field(default_factory=list)

    def accepted_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.accepted_at if t0 <= t < t1)

    def refused_between(self, t0: float, t1: float, prefix: str = "") -> int:
        """Refused connections in [t0, t1) whose first line starts with `prefix`."""
        return sum(1 for t, line in self.refused_log if t0 <= t < t1 and line.startswith(prefix))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: the peer sees 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """One listening port forwarding to `target`; see the module docstring."""

    def __init__(self, faults: Faults, target: tuple[str, int] | None = None) -> None:
        self.faults = faults
        self.target = target
        self.refuse = False
        self.stats = ProxyStats()
        self.port = 0
        self._rng = random.Random(faults.seed)
        self._clock = 0  # bytes sent to clients, for `Faults.unit`
        self._next_fault = self._first_mark()
        self._kinds = 0  # faults drawn so far in `unit` mode
        self._phase = self._rng.random()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def set_faults(self, faults: Faults) -> None:
        """New fault settings for connections accepted from now on (RNG reseeded)."""
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._next_fault = self._clock + self._first_mark()
        self._kinds = 0
        self._phase = self._rng.random()

    def _first_mark(self) -> int:
        """Bytes until the first fault in `unit` mode: uniform over one mean gap, so
        even a proxy that carries a single gap's worth sees a fault."""
        f = self.faults
        if f.unit is None or f.rate <= 0:
            return 0
        return 1 + int(self._rng.random() * f.unit / f.rate)

    def _next_kind(self) -> str:
        """'stall' or 'break' in `unit` mode: an even spread with `stall_share` stalls
        (from a seeded phase), so even a proxy with two faults sees both kinds."""
        share, k = self.faults.stall_share, self._kinds
        self._kinds += 1
        stall = int((k + 1) * share + self._phase) > int(k * share + self._phase)
        return "stall" if stall else "break"

    def _gap(self) -> int:
        """Bytes between two faults in `unit` mode: the mean gap, jittered by half."""
        f = self.faults
        assert f.unit is not None
        return 1 + int(self._rng.uniform(0.5, 1.5) * f.unit / f.rate)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def drop_all(self) -> int:
        """Reset every open connection (a link flap); how many there were."""
        writers = list(self._open)
        for w in writers:
            _reset(w)
        return len(writers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._open):
            w.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _plan(self) -> tuple[str, int]:
        """('pass' | 'break' | 'stall', bytes to the client before the fault fires)."""
        f = self.faults
        if f.rate <= 0:
            return "pass", 0
        if f.unit is not None:
            return "clock", 0  # the proxy-wide byte clock decides, in `_pipe`
        if self._rng.random() >= f.rate:
            return "pass", 0
        kind = "stall" if self._rng.random() < f.stall_share else "break"
        return kind, self._rng.randint(f.after_min, f.after_max)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.accepted_at.append(time.monotonic())
        self._open.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.refuse or self.target is None:
                await self._refuse(reader, writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                await self._refuse(reader, writer)
                return
            self._open.add(up_writer)
            kind, after = self._plan()
            frozen = asyncio.Event()
            down = asyncio.create_task(
                self._pipe(up_reader, writer, kind, after, frozen, up_writer)
            )
            up = asyncio.create_task(self._pipe(reader, up_writer, "pass", 0, frozen, None))
            # A stalled connection ends when the client hangs up (`up` returns).
            await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            for t in (down, up):
                t.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._open.discard(w)
                    w.transport.abort()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reset the connection; first note what the client came for (its first line)."""
        self.stats.refused += 1
        at = time.monotonic()
        line = b""
        with contextlib.suppress(TimeoutError, OSError, ValueError):
            line = await asyncio.wait_for(reader.readline(), 0.5)
        self.stats.refused_log.append((at, line.decode("latin-1").strip()))
        _reset(writer)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        kind: str,
        after: int,
        frozen: asyncio.Event,
        upstream: asyncio.StreamWriter | None,
    ) -> None:
        """Copy src to dst; on the downstream pipe of a faulty connection, fail at `after`."""
        sent = 0
        downstream = upstream is not None
        try:
            while True:
                data = await src.read(PIPE_READ)
                if not data:
                    return
                if frozen.is_set():
                    continue  # stalled: what the client sends goes nowhere
                if kind == "clock":
                    after = sent + self._next_fault - self._clock
                    if len(data) >= after - sent:
                        self._clock = self._next_fault
                        self._next_fault += self._gap()
                        kind = self._next_kind()
                    else:
                        self._clock += len(data)
                if kind != "pass" and sent + len(data) >= after and self._spent():
                    kind = "pass"  # the proxy's fault budget is used up
                if kind != "pass" and sent + len(data) >= after:
                    head = data[: max(0, after - sent)]
                    if head:
                        dst.write(head)
                        await dst.drain()
                        self.stats.bytes_down += len(head)
                    self._fault(kind, dst, upstream, frozen)
                    if kind == "stall":
                        await asyncio.Event().wait()
                    return
                dst.write(data)
                await dst.drain()
                sent += len(data)
                if downstream:
                    self.stats.bytes_down += len(data)
                else:
                    self.stats.bytes_up += len(data)
        except (ConnectionError, OSError):
            return

    def _spent(self) -> bool:
        limit = self.faults.limit
        return limit is not None and self.stats.broken + self.stats.stalled >= limit

    def _fault(
        self,
        kind: str,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter | None,
        frozen: asyncio.Event,
    ) -> None:
        if kind == "stall":
            self.stats.stalled += 1
            frozen.set()
            return
        self.stats.broken += 1
        _reset(client)
        if upstream is not None:
            _reset(upstream)


@dataclass
class HttpStats:
    forwarded: int = 0
    failed: int = 0
    upstream_errors: int = 0


Predicate = Callable[[web.Request], bool]


class HttpProxy:
    """A reverse proxy to `upstream` (http://host:port) that answers 503 to what `fail` picks."""

    def __init__(self, upstream: str, fail: Predicate | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail: Predicate = fail or (lambda _r: False)
        self.failing = False  # `fail` applies only while this is set
        self.stats = HttpStats()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.failing and self.fail(request):
            self.stats.failed += 1
            return web.json_response({"error": "proxy: failing this route"}, status=503)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        try:
            async with self._session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
            ) as up:
                data = await up.read()
                out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
                self.stats.forwarded += 1
                return web.Response(status=up.status, body=data, headers=out)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.stats.upstream_errors += 1
            return web.json_response({"error": "proxy: upstream unreachable"}, status=502)


class ProxyLoop:
    """A daemon thread running the event loop every proxy of a test lives on."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxies", daemon=True)
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def __enter__(self) -> ProxyLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the proxies' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def tcp_proxy(
        self, faults: Faults | None = None, target: tuple[str, int] | None = None, port: int = 0
    ) -> TcpProxy:
        proxy = TcpProxy(faults or Faults(), target)
        self.run(proxy.start(port))
        self._closers.append(proxy.close)
        return proxy

    def http_proxy(self, upstream: str, fail: Predicate | None = None) -> HttpProxy:
        proxy = HttpProxy(upstream, fail)
        self.run(proxy.start())
        self._closers.append(proxy.close)
        return proxy

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                self.run(closer())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        with contextlib.suppress(RuntimeError):
            self._loop.close()
