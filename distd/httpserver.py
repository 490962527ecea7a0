"""Small aiohttp helpers shared by the seeder and the distd peer server.

They make every listener speak the same way: msgpack to machines and JSON to
people, one-line `{"error": ...}` bodies for every failure, constant-time token
checks, bounded request bodies, rate-paced downloads and a clean stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import hmac
import ipaddress
import json
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from distd.ratelimit import TokenBucket
from manifests import wire
from manifests.chunking import ChunkBytes, ChunkError
from manifests.model import ManifestError

log = logging.getLogger(__name__)

# What a capped upload writes per token-bucket payment: `SLICE_SECONDS` of the upload's
# share of the cap, within [MIN_SLICE, SLICE_SIZE] (see `slice_for`). Each slice wakes
# the receiving process once; in the N=16 fan-out on 2 cores, 64 KiB slices cost 14 CPU
# s per GiB delivered and 1 MiB slices under 10. Tied to time rather than fixed, so an
# upload sharing a cap with many others still shows progress several times a second,
# well inside the scheduler's stall allowance (1 s without progress).
SLICE_SIZE = 1 << 20
MIN_SLICE = 64 << 10
SLICE_SECONDS = 0.1
CUT_SHORT = "cut_short"
# A connection that has not sent a whole request head this long after it opened (or after
# its last response) is closed: idle keep-alive connections and slow-loris clients alike.
# aiohttp's own default is an hour. Longer than aiohttp clients keep an idle connection
# (15 s), so a client never sends on one the server is about to close.
IDLE_TIMEOUT = 30.0
# A request body must arrive within BODY_GRACE seconds plus one per BODY_MIN_RATE bytes.
BODY_GRACE = 30.0
BODY_MIN_RATE = 16 << 10
# Pending connections the kernel queues for accept(): a burst of a thousand peers at
# once is then served, not dropped and retried by TCP a second later.
BACKLOG = 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNAUTHORIZED = "missing or wrong token"
# Open to anyone even with a cluster token: load balancers and supervisors probe it.
OPEN_PATHS = frozenset({"/healthz"})


class ApiError(Exception):
    """An expected failure with its HTTP status; `extra` joins the `{"error": ...}` body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def wants_msgpack(request: web.Request) -> bool:
    return wire.MSGPACK in request.headers.get("Accept", "")


def respond(
    request: web.Request,
    obj: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """msgpack if the client asked for it (machines), JSON otherwise (people and curl)."""
    if wants_msgpack(request):
        body, ctype = wire.pack(obj), wire.MSGPACK
    else:
        body, ctype = json.dumps(obj, ensure_ascii=False).encode(), wire.JSON
    return web.Response(body=body, status=status, content_type=ctype, headers=headers)


async def read_body(request: web.Request, limit: int = wire.MAX_REQUEST_BODY) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed `limit`,
    and with 408 when it trickles in slower than BODY_GRACE + BODY_MIN_RATE allow."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    seconds = BODY_GRACE + (declared if declared is not None else limit) / BODY_MIN_RATE
    try:
        async with asyncio.timeout(seconds):
            return await _read_body(request, declared, limit)
    except TimeoutError:
        raise ApiError(408, f"request body did not arrive within {seconds:.0f} s") from None


async def _read_body(request: web.Request, declared: int | None, limit: int) -> bytes:
    if declared is not None:
        # One read of the declared length: slicing a 4 MiB chunk into 64 KiB pieces kept
        # the event loop (and the GIL) busy enough to slow the store's write threads.
        try:
            return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError as e:
            got = len(e.partial)
            raise ApiError(400, f"request body ended after {got} of {declared} bytes") from None
    buf = bytearray()
    async for piece in request.content.iter_chunked(SLICE_SIZE):
        buf += piece
        if len(buf) > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit")
    return bytes(buf)


async def read_obj(request: web.Request, limit: int = wire.MAX_REQUEST_BODY) -> dict[str, Any]:
    """A msgpack or JSON map from the body (by Content-Type); anything malformed is a 400."""
    data = await read_body(request, limit)
    if request.content_type == wire.MSGPACK:
        obj = wire.unpack(data, limit)
    else:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a map")
    return obj


def token_equal(given: str, token: str) -> bool:
    """Constant time, length included: both sides are hashed before they are compared."""
    a = hashlib.sha256(given.encode("utf-8", "replace")).digest()
    b = hashlib.sha256(token.encode("utf-8", "replace")).digest()
    return bool(token) and hmac.compare_digest(a, b)


def bearer_ok(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token_equal(given.strip(), token)


def require_bearer(request: web.Request, token: str) -> None:
    """401 unless the request carries `Authorization: Bearer <token>`, compared in constant time."""
    if not bearer_ok(request, token):
        raise ApiError(401, UNAUTHORIZED)


def cluster_auth(cluster_token: str, *, push_token: str | None = None) -> Middleware:
    """401 for every request but `OPEN_PATHS` without the cluster token (`X-Cluster-Token`).

    As a middleware it runs before any handler, so a refusal is the same whether or
    not the chunk, image or route exists. A valid push token (the seeder's operator
    credential) is accepted in its place.
    """

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            given = request.headers.get(wire.H_CLUSTER_TOKEN, "")
            ok = token_equal(given, cluster_token) or (
                push_token is not None and bearer_ok(request, push_token)
            )
            if not ok:
                raise ApiError(401, UNAUTHORIZED)
        return await handler(request)

    return check


def middlewares(cluster_token: str | None, *, push_token: str | None = None) -> list[Middleware]:
    """Every listener's middlewares: one-line errors outermost, then the cluster token."""
    chain: list[Middleware] = [error_middleware]
    if cluster_token:
        chain.append(cluster_auth(cluster_token, push_token=push_token))
    return chain


def open_listener_warning(host: str, cluster_token: str | None) -> str | None:
    """What to warn when a listener that others can reach takes no cluster token: without
    one, anyone who reaches it reads every chunk (and on a seeder every manifest). A
    loopback listener (tests, the demo, a node behind a local proxy) is left quiet."""
    if cluster_token:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may well be reachable
    return (
        f"no cluster token: anyone who can reach {host} can read every chunk and manifest;"
        " set --cluster-token (or its environment variable) on every member of the fleet"
    )


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS for a listener; raises OSError/ssl.SSLError now if the files are wrong."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def send_bytes(
    request: web.Request,
    data: ChunkBytes,
    *,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/octet-stream",
    bucket: TokenBucket | None = None,
    slice_size: int = SLICE_SIZE,
) -> web.StreamResponse:
    """Stream `data`, each slice paying `bucket` first so the listener's egress cap holds.

    A client that hangs up midway (an endgame loser cancelling) is normal, not an
    error: the response comes back marked `resp[CUT_SHORT] = True` instead of raising.
    """
    resp = web.StreamResponse(headers=headers)
    resp.content_type = content_type
    resp.content_length = len(data)
    await resp.prepare(request)
    try:
        if bucket is None or bucket.unlimited:
            await resp.write(data)
        else:
            view = memoryview(data)
            for off in range(0, len(data), slice_size):
                piece = view[off : off + slice_size]
                await bucket.consume(len(piece))
                await resp.write(piece)
        await resp.write_eof()
    except ConnectionError:
        resp[CUT_SHORT] = True
    return resp


def slice_for(bucket: TokenBucket, uploads: int) -> int:
    """Bytes per write for one of `uploads` transfers sharing `bucket` (see SLICE_SIZE)."""
    rate = bucket.rate
    if rate is None:
        return SLICE_SIZE
    share = rate / max(1, uploads)
    return int(min(SLICE_SIZE, max(MIN_SLICE, share * SLICE_SECONDS)))


def _error(
    request: web.Request,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    line = message.strip().splitlines()[0] if message.strip() else f"HTTP {status}"
    return respond(request, {"error": line, **extra}, status, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes `{"error": "one line"}`; only the unexpected ones are logged."""
    try:
        return await handler(request)
    except ApiError as e:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(request, e.status, e.message, headers, **e.extra)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        text = e.text or ""
        if not text or text == f"{e.status}: {e.reason}":
            text = f"{e.reason.lower()}: {request.method} {request.path}"
        resp = _error(request, e.status, text)
        for key in ("Allow", "WWW-Authenticate", "Retry-After"):
            if key in e.headers:
                resp.headers[key] = e.headers[key]
        return resp
    except (ManifestError, ChunkError) as e:
        return _error(request, 422, str(e))
    except ValueError as e:
        return _error(request, 400, str(e))
    except ConnectionError:
        raise  # the client went away mid-response; nothing to tell it
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(request, 500, "internal server error (see the server log)")


def install_uvloop() -> bool:
    """Use uvloop for the next event loop when it is installed, and keep the allocator's
    freed memory for reuse (see `_reuse_freed_memory`); True if uvloop is in use."""
    _reuse_freed_memory()
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_FREED = 64 << 20  # per arena: a few chunks' worth of buffers, far below a node's RSS
_MMAP_ABOVE = 32 << 20  # glibc's upper bound; no chunk buffer comes near it


def _reuse_freed_memory() -> None:
    """Chunk-sized buffers (4 MiB by default) are allocated and freed tens of times a
    second. glibc hands such blocks back to the kernel on free (mmap, or trimming the
    heap), so every new buffer page-faults and is zeroed again: in the N=16 fan-out
    profile that was 13% of all CPU. Keeping up to `_KEEP_FREED` per arena for reuse
    removes it. Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = False,
    on_ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
    shutdown_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
) -> None:
    """Run `app` until SIGTERM/SIGINT (or `stop`), then let requests in flight finish.

    `on_ready` hears the bound host and port (useful with port 0). Binding errors
    (port in use, bad address) propagate as OSError before anything is served.
    With `ssl_context` the listener speaks only TLS. A connection without a whole
    request head for `idle_timeout` seconds is closed (see IDLE_TIMEOUT).
    """
    stop = stop or asyncio.Event()
    kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=idle_timeout,
        **kwargs,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=BACKLOG)
        await site.start()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0]
        if on_ready is not None:
            on_ready(str(bound[0]), int(bound[1]))
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def advertised_address(bound_host: str, bound_port: int) -> str:
    """host:port others can reach a listener on: a wildcard bind is no address, so it
    is replaced by this machine's host name."""
    wildcard = bound_host in ("0.0.0.0", "::", "")
    return f"{socket.getfqdn() if wildcard else bound_host}:{bound_port}"
