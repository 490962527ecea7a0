"""The seeder's HTTP API: chunk origin, manifest and name registry, assignments.

Implements the contract in `manifests.wire`. Chunks live in a `distd.store.ChunkStore`
(verified before they are stored); everything else in the SQLite `Registry`, which
is only ever touched from one dedicated thread so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from distd.httpserver import (
    ApiError,
    middlewares,
    read_body,
    read_obj,
    require_bearer,
    respond,
)
from distd.peer_server import ChunkServer
from distd.ratelimit import TokenBucket
from distd.store import ChunkStore
from distd.swarm.superseed import SuperSeeder
from manifests import wire
from manifests.chunking import ChunkError, sha256_hex
from manifests.model import Encoding
from manifests.validate import MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, decode_manifest
from seeder.registry import Registry, UnknownManifest
from seeder.tracker import Tracker

log = logging.getLogger(__name__)

T = TypeVar("T")

# A node id is an opaque token chosen by the fleet (hostname, UUID, serial number...).
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}$")
MAX_DIGESTS_PER_QUERY = 1_000_000
ANNOUNCE_INTERVAL = 5.0
# Few slots, so each chunk crosses at a good share of the cap and is passed on sooner;
# nodes told "busy" turn to their peers.
DEFAULT_UPLOAD_SLOTS = 2
MAX_POLL_WAIT = 60.0


@dataclass
class Counters:
    """Running totals, read later by the metrics endpoint."""

    bytes_sent: int = 0
    bytes_received: int = 0
    chunks_stored: int = 0
    chunks_served: int = 0
    chunks_rejected: int = 0
    manifests_published: int = 0
    manifests_served: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class Seeder:
    """The state behind the routes; one per application."""

    def __init__(
        self,
        data_dir: Path,
        push_token: str,
        max_upload_rate: int | None,
        store: ChunkStore | None,
        upload_slots: int = DEFAULT_UPLOAD_SLOTS,
        superseed: bool = True,
    ) -> None:
        if not push_token:
            raise ValueError("a push token is required")
        self.push_token = push_token
        self.store = store if store is not None else ChunkStore(data_dir)
        self.registry = Registry(data_dir)
        self.bucket = TokenBucket(max_upload_rate)
        self.counters = Counters()
        self.chunks = ChunkServer(
            self.store,
            slots=upload_slots,
            bucket=self.bucket,
            on_sent=self._sent,
            policy=SuperSeeder() if superseed else None,
        )
        self.tracker = Tracker()
        self.announce_interval = ANNOUNCE_INTERVAL
        self.changed = asyncio.Event()  # replaced on every change; long polls wait on it
        self.closing = False
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seeder-db")

    def close_polls(self) -> None:
        """Answer every long poll now: the server is stopping."""
        self.closing = True
        self.assignments_changed()

    def assignments_changed(self) -> None:
        """Wake every node waiting in a long poll: names or assignments moved."""
        self.changed.set()
        self.changed = asyncio.Event()

    def _sent(self, n: int) -> None:
        self.counters.bytes_sent += n

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a registry method on the registry's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def close(self) -> None:
        await self.db(self.registry.close)
        self._db.shutdown(wait=True)

    def authorize(self, request: web.Request) -> None:
        require_bearer(request, self.push_token)


SEEDER = web.AppKey("seeder", Seeder)


def _seeder(request: web.Request) -> Seeder:
    return request.app[SEEDER]


def _digest_param(request: web.Request) -> str:
    digest = request.match_info["digest"]
    if not wire.is_digest(digest):
        raise ApiError(400, f"not a SHA-256 digest (64 lowercase hex digits): {digest[:80]!r}")
    return digest


def _name_param(request: web.Request) -> str:
    return wire.check_name(request.match_info["name"])


def _node_id(value: object) -> str:
    if not isinstance(value, str) or not _NODE_ID.match(value):
        raise ApiError(400, f"not a node id: {str(value)[:80]!r}")
    return value


def _rule(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(name, node, canonical selector) of an assignment rule; exactly one of node/selector."""
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError(400, "assignment needs a 'name'")
    wire.check_name(name)
    node, selector = body.get("node"), body.get("selector")
    if (node is None) == (selector is None):
        raise ApiError(400, "assignment needs exactly one of 'node' or 'selector'")
    if node is not None:
        return name, _node_id(node), None
    if not isinstance(selector, str):
        raise ApiError(400, "selector must be a string k=v[,k=v...]")
    labels = wire.parse_labels(selector)
    if not labels:
        # An empty selector would match the whole fleet: too easy to do by accident.
        raise ApiError(400, "selector must have at least one k=v")
    return name, None, wire.format_labels(labels)


def _describe(node: str | None, selector: str | None) -> str:
    return f"node {node!r}" if node is not None else f"selector {selector!r}"


# -- routes ----------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def chunks_missing(request: web.Request) -> web.Response:
    s = _seeder(request)
    body = await read_obj(request)
    digests = body.get("digests")
    if not isinstance(digests, list) or len(digests) > MAX_DIGESTS_PER_QUERY:
        raise ApiError(400, f"'digests' must be a list of at most {MAX_DIGESTS_PER_QUERY}")
    missing: list[str] = []
    present: dict[str, list[Any]] = {}
    seen: set[str] = set()
    for d in digests:
        if not isinstance(d, str) or not wire.is_digest(d):
            raise ApiError(400, f"not a SHA-256 digest: {str(d)[:80]!r}")
        if d in seen:
            continue
        seen.add(d)
        info = s.store.info(d)
        if info is None:
            missing.append(d)
        else:
            present[d] = [info.stored_size, info.encoding.value]
    return respond(request, {"missing": missing, "present": present})


def _chunk_headers(request: web.Request) -> tuple[Encoding, int]:
    enc_text = request.headers.get(wire.H_ENCODING, "")
    try:
        encoding = Encoding(enc_text)
    except ValueError:
        raise ApiError(
            400, f"{wire.H_ENCODING} must be raw or zstd, got {enc_text[:40]!r}"
        ) from None
    size_text = request.headers.get(wire.H_SIZE, "")
    if not size_text.isdigit() or not 1 <= int(size_text) <= MAX_CHUNK_SIZE:
        raise ApiError(400, f"{wire.H_SIZE} must be an integer in [1, {MAX_CHUNK_SIZE}]")
    return encoding, int(size_text)


async def put_chunk(request: web.Request) -> web.Response:
    s = _seeder(request)
    s.authorize(request)
    digest = _digest_param(request)
    encoding, size = _chunk_headers(request)
    if s.store.has(digest):
        # Verified when it was stored; no need to take the bytes again.
        return respond(request, {"digest": digest, "stored": False}, 200)
    declared = request.content_length
    if declared is not None and declared > size:
        # Raw, a chunk is exactly its size; compressed, smaller: refuse before reading it.
        raise ApiError(413, f"chunk body of {declared} bytes is larger than its {size}-byte chunk")
    payload = await read_body(request, size)
    s.counters.bytes_received += len(payload)
    try:
        stored = await s.store.put(digest, payload, encoding, size)
    except ChunkError as e:
        s.counters.chunks_rejected += 1
        detail = str(e)
        message = f"chunk {digest} content mismatch"
        if "content mismatch" not in detail:
            message += f": {detail}"
        raise ApiError(422, message) from None
    if stored:
        s.counters.chunks_stored += 1
    return respond(request, {"digest": digest, "stored": stored}, 201 if stored else 200)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: the seeder's counters and its chunk server's."""
    s = _seeder(request)
    values = s.counters.snapshot()
    values["chunks_served"] = s.chunks.chunks_sent
    values["busy_answers"] = s.chunks.busy_answers
    values["deferred_answers"] = s.chunks.policy.deferred if s.chunks.policy else 0
    lines = []
    for key, value in sorted(values.items()):
        lines += [f"# TYPE seeder_{key}_total counter", f"seeder_{key}_total {value}"]
    s.tracker.expire(asyncio.get_running_loop().time())  # count live members only
    lines += ["# TYPE seeder_tracker_members gauge", f"seeder_tracker_members {len(s.tracker)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def put_manifest(request: web.Request) -> web.Response:
    s = _seeder(request)
    s.authorize(request)
    digest = _digest_param(request)
    data = await read_body(request, MAX_MANIFEST_BYTES)
    s.counters.bytes_received += len(data)
    actual = await asyncio.to_thread(sha256_hex, data)  # up to 256 MiB: not on the loop
    if actual != digest:
        raise ApiError(422, f"manifest body has SHA-256 {actual}, not the {digest} in the URL")
    if await s.db(s.registry.has_manifest, digest):
        return respond(request, {"digest": digest, "published": False}, 200)
    manifest = await asyncio.to_thread(decode_manifest, data)  # ManifestError -> 422
    missing = [c.digest for c in manifest.chunks if not s.store.has(c.digest)]
    if missing:
        raise ApiError(
            409,
            f"{len(missing)} of the manifest's {len(manifest.chunks)} chunks are not on the seeder",
            missing=missing,
        )
    new = await s.db(s.registry.put_manifest, digest, data)
    if new:
        s.counters.manifests_published += 1
        log.info("published manifest %s (%d entries)", digest, len(manifest.entries))
    return respond(request, {"digest": digest, "published": new}, 201 if new else 200)


async def get_manifest(request: web.Request) -> web.Response:
    s = _seeder(request)
    digest = _digest_param(request)
    data = await s.db(s.registry.get_manifest, digest)
    if data is None:
        raise ApiError(404, f"no manifest {digest}")
    s.counters.bytes_sent += len(data)
    s.counters.manifests_served += 1
    return web.Response(body=data, content_type=wire.MSGPACK)


async def list_names(request: web.Request) -> web.Response:
    s = _seeder(request)
    return respond(request, await s.db(s.registry.list_names))


async def get_name(request: web.Request) -> web.Response:
    s = _seeder(request)
    name = _name_param(request)
    info = await s.db(s.registry.get_name, name)
    if info is None:
        raise ApiError(404, f"no such name {name!r}")
    return respond(request, info)


async def put_name(request: web.Request) -> web.Response:
    s = _seeder(request)
    s.authorize(request)
    name = _name_param(request)
    body = await read_obj(request)
    digest = body.get("digest")
    if not isinstance(digest, str) or not wire.is_digest(digest):
        raise ApiError(400, "body needs 'digest': 64 lowercase hex digits")
    try:
        previous = await s.db(s.registry.set_name, name, digest)
    except UnknownManifest:
        raise ApiError(409, f"manifest {digest} is not published; publish it first") from None
    if previous != digest:
        s.assignments_changed()
        log.info("name %s -> %s (was %s)", name, digest, previous or "unset")
    info = await s.db(s.registry.get_name, name)
    assert info is not None
    info["previous"] = previous
    return respond(request, info)


async def get_assignments(request: web.Request) -> web.Response:
    s = _seeder(request)
    node = request.query.get("node")
    labels_text = request.query.get("labels", "")
    if node is None:
        if labels_text:
            raise ApiError(400, "'labels' only makes sense with 'node'")
        return respond(request, await s.db(s.registry.list_assignments))
    # A preview for the operator (`manifests assignments --node`): it does not record
    # the node; only a daemon's registration (`register_node`) does.
    labels = wire.parse_labels(labels_text)
    return respond(request, await s.db(s.registry.resolve, _node_id(node), labels))


async def list_nodes(request: web.Request) -> web.Response:
    """The nodes that registered (id, labels, address, last seen), kept across restarts."""
    s = _seeder(request)
    return respond(request, await s.db(s.registry.nodes))


async def add_assignment(request: web.Request) -> web.Response:
    s = _seeder(request)
    s.authorize(request)
    name, node, selector = _rule(await read_obj(request))
    created = await s.db(s.registry.add_assignment, name, node, selector)
    if created:
        s.assignments_changed()
        log.info("assigned %s to %s", name, _describe(node, selector))
    rule = {"name": name, "node": node, "selector": selector}
    return respond(request, rule, 201 if created else 200)


async def remove_assignment(request: web.Request) -> web.Response:
    s = _seeder(request)
    s.authorize(request)
    name, node, selector = _rule(await read_obj(request))
    if not await s.db(s.registry.remove_assignment, name, node, selector):
        raise ApiError(404, f"no assignment of {name!r} to {_describe(node, selector)}")
    s.assignments_changed()
    log.info("unassigned %s from %s", name, _describe(node, selector))
    return respond(request, {"name": name, "node": node, "selector": selector})


def _str_field(body: dict[str, Any], key: str, limit: int = 255) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, f"'{key}' must be a string of at most {limit} characters")
    return value


def _labels_field(body: dict[str, Any]) -> dict[str, str]:
    labels = body.get("labels", {})
    if not isinstance(labels, dict):
        raise ApiError(400, "'labels' must be a map")
    return wire.parse_labels(wire.format_labels({str(k): str(v) for k, v in labels.items()}))


async def register_node(request: web.Request) -> web.Response:
    """A daemon's heartbeat and assignment watch in one: a long poll on its resolved set.

    The answer carries an etag of the set; a node that sends back the etag it holds
    is answered only when the set changes or `wait` seconds pass, so a change
    reaches every node within a moment while idle nodes cost one request a minute.
    """
    s = _seeder(request)
    node = _node_id(request.match_info["node"])
    body = await read_obj(request, 64 << 10)
    labels = _labels_field(body)
    address = _str_field(body, "address")
    known = _str_field(body, "known")
    wait = body.get("wait", 0)
    if not isinstance(wait, int | float) or not 0 <= wait <= MAX_POLL_WAIT:
        raise ApiError(400, f"'wait' must be a number of seconds in [0, {MAX_POLL_WAIT:.0f}]")
    await s.db(s.registry.node_seen, node, labels, address or request.remote or "")
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        changed = s.changed
        resolved = await s.db(s.registry.resolve, node, labels)
        etag = hashlib.sha256(wire.pack(resolved)).hexdigest()[:32]
        left = deadline - asyncio.get_running_loop().time()
        if etag != known or left <= 0 or s.closing:
            return respond(request, {"assignments": resolved, "etag": etag})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), left)


async def announce(request: web.Request) -> web.Response:
    """Tracker: record the node in the image's swarm, answer with a sample of the others."""
    s = _seeder(request)
    body = await read_obj(request, 64 << 10)
    image = _str_field(body, "image", 64)
    if not wire.is_digest(image):
        raise ApiError(400, "'image' must be a manifest digest")
    node = _node_id(body.get("node_id"))
    address = _str_field(body, "address")
    if not address:
        raise ApiError(400, "'address' (host:port the node serves chunks on) is required")
    counts = [body.get("have", 0), body.get("total", 0)]
    if not all(isinstance(c, int) and 0 <= c <= 1 << 32 for c in counts):
        raise ApiError(400, "'have' and 'total' must be chunk counts")
    now = asyncio.get_running_loop().time()
    peers = s.tracker.announce(
        image,
        node,
        address,
        zone=_str_field(body, "zone", 63),
        have=counts[0],
        total=counts[1],
        now=now,
    )
    out = {"peers": [m.public() for m in peers], "interval": s.announce_interval}
    return respond(request, out)


async def _sweep_tracker(tracker: Tracker) -> None:
    """Drop expired members every ttl/2: otherwise the swarms of images nobody announces
    any more stay in memory, since the tracker sweeps a swarm only when asked for it."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(tracker.ttl / 2)
        tracker.expire(loop.time())


def make_app(
    data_dir: str | Path,
    push_token: str,
    *,
    max_upload_rate: int | None = None,
    store: ChunkStore | None = None,
    upload_slots: int = DEFAULT_UPLOAD_SLOTS,
    superseed: bool = True,
    cluster_token: str | None = None,
) -> web.Application:
    """The seeder application. Opens the store and the registry now, so errors surface early.

    With `cluster_token`, every route but /healthz needs it (or the push token): see
    `manifests.wire` for the rules.
    """
    seeder = Seeder(Path(data_dir), push_token, max_upload_rate, store, upload_slots, superseed)
    app = web.Application(
        middlewares=middlewares(cluster_token, push_token=push_token),
        client_max_size=wire.MAX_REQUEST_BODY,
    )
    app[SEEDER] = seeder

    async def _close(_: web.Application) -> None:
        await seeder.close()

    async def _shutdown(_: web.Application) -> None:
        seeder.close_polls()

    async def _sweeping(_: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_tracker(seeder.tracker))
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper

    app.cleanup_ctx.append(_sweeping)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_close)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_post("/v1/chunks/missing", chunks_missing)
    r.add_put("/v1/chunks/{digest}", put_chunk)
    r.add_get("/v1/chunks/{digest}", seeder.chunks.handle, allow_head=False)
    r.add_get("/metrics", metrics)
    r.add_put("/v1/manifests/{digest}", put_manifest)
    r.add_get("/v1/manifests/{digest}", get_manifest)
    r.add_get("/v1/names", list_names)
    r.add_get("/v1/names/{name:.+}", get_name)
    r.add_put("/v1/names/{name:.+}", put_name)
    r.add_get("/v1/assignments", get_assignments)
    r.add_post("/v1/assignments", add_assignment)
    r.add_delete("/v1/assignments", remove_assignment)
    r.add_get("/v1/nodes", list_nodes)
    r.add_post("/v1/nodes/{node}", register_node)
    r.add_post("/v1/announce", announce)
    return app
