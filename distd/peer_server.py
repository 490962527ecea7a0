"""What a node serves to its neighbours: chunks, and a live stream of what it holds.

`ChunkServer` answers `GET /v1/chunks/{digest}` from the store with a fixed number of
upload slots: when they are all taken it answers 503 "busy" at once rather than
queueing, so the asker tries another peer. The seeder and every daemon serve
chunks through it. `HaveHub` answers
`GET /v1/swarm/{image}/haves` with a long-lived msgpack stream: the image's
bitfield, then every newly stored chunk index the moment it lands, and, each time
an upload takes the last free slot, how long the slots should stay taken: followers
then skip this node until then instead of each asking and hearing "busy".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from distd.catalog import Catalog, Image
from distd.httpserver import CUT_SHORT, ApiError, respond, send_bytes, slice_for
from distd.ratelimit import TokenBucket
from distd.store import ChunkStore, raw_size_of
from distd.swarm import bitfield
from distd.swarm.superseed import SuperSeeder
from manifests import wire

log = logging.getLogger(__name__)

HAVE_STREAM = "application/x-msgpack-stream"
KEEPALIVE_SECONDS = 10.0
H_BUSY = "X-Busy"
H_DEFERRED = "X-Deferred"
H_RETRY_MS = "X-Retry-After-Ms"  # with busy: when the earliest upload should end
_END = -1  # queued to a follower's stream to end it
MAX_BUSY_MS = 60_000  # a longer busy announcement is malformed
# Neighbours per image, each way: a node follows at most this many (the tracker's sample
# plus those who follow it back) and lets at most this many follow it, so the news of
# every chunk it stores costs a bounded number of writes however large the fleet. The
# follower bound costs no speed (bench.sim, N=1,000, 4 MiB chunks, seeds 1-4: mean max
# 1.387 x T_min against 1.383 at twice the bound).
MAX_NEIGHBOURS = 80


@dataclass(frozen=True, slots=True)
class _Busy:
    """Queued to every follower's stream: the upload slots are taken until `until`
    (loop time), turned into milliseconds from now when it is written."""

    until: float


def _digest(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if not wire.is_digest(value):
        raise ApiError(400, f"not a SHA-256 digest: {value[:80]!r}")
    return value


class ChunkServer:
    """Serves chunks from the store; the seeder adds a `SuperSeeder` policy."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        slots: int,
        bucket: TokenBucket,
        on_sent: Callable[[int], None] | None = None,
        policy: SuperSeeder | None = None,
    ) -> None:
        self.store = store
        self.slots = slots
        self.bucket = bucket
        self.on_sent = on_sent
        # Called with the loop time the earliest upload should end, whenever an upload
        # takes the last free slot (`add_peer_routes` points it at the HaveHub).
        self.on_full: Callable[[float], None] | None = None
        self.policy = policy
        self.active = 0
        self.finishes: list[float] = []  # expected end of each upload in progress
        self.busy_answers = 0
        self.chunks_sent = 0
        self.bytes_sent = 0

    def store_size(self, digest: str) -> int:
        info = self.store.info(digest)
        return info.stored_size if info is not None else 0

    def _next_free_ms(self) -> int:
        """When the earliest upload in progress should end, at this server's egress rate."""
        if not self.finishes:
            return 0
        left = max(0.0, min(self.finishes) - asyncio.get_running_loop().time())
        return int(left * 1000)

    @staticmethod
    def _refuse(request: web.Request, header: str, message: str) -> web.Response:
        body = {"error": message, header.removeprefix("X-").lower(): True}
        return respond(request, body, 503, headers={header: "1", "Retry-After": "1"})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = _digest(request, "digest")
        if not self.store.has(digest):
            raise ApiError(404, f"no chunk {digest}")
        if self.active >= self.slots:
            self.busy_answers += 1
            busy = self._refuse(request, H_BUSY, "busy: every upload slot is taken")
            busy.headers[H_RETRY_MS] = str(self._next_free_ms())
            return busy
        now = asyncio.get_running_loop().time()
        # `direct=1`: the asker has no peers to turn to (the central-distributor baseline).
        direct = request.query.get("direct") == "1"
        image = request.query.get("image", "")
        total = request.query.get("chunks", "")
        hint = (image, int(total)) if wire.is_digest(image) and total.isdigit() else ("", 0)
        if self.policy is not None and not direct and not self.policy.admit(digest, now, *hint):
            return self._refuse(request, H_DEFERRED, "handed out recently: get it from peers")
        self.active += 1
        rate = self.bucket.rate
        # Each upload gets about a slot's share of the cap: its expected end, for busy hints.
        finish = now + (self.store_size(digest) * self.slots / rate if rate else 0.0)
        self.finishes.append(finish)
        if self.active >= self.slots and self.on_full is not None and rate:
            self.on_full(min(self.finishes))
        try:
            info, payload = await self.store.get(digest)
            headers = {
                wire.H_ENCODING: info.encoding.value,
                wire.H_SIZE: str(raw_size_of(payload, info.encoding)),
            }
            slice_size = slice_for(self.bucket, self.active)
            resp = await send_bytes(
                request, payload, headers=headers, bucket=self.bucket, slice_size=slice_size
            )
            if resp.get(CUT_SHORT):
                log.debug("upload of %s cut short by the asker", digest[:16])
                if self.policy is not None:
                    self.policy.abandoned(digest)
                return resp
        except BaseException:
            if self.policy is not None:
                self.policy.abandoned(digest)
            raise
        finally:
            self.active -= 1
            self.finishes.remove(finish)
        self.chunks_sent += 1
        self.bytes_sent += len(payload)
        if self.on_sent is not None:
            self.on_sent(len(payload))
        return resp


class Swarm(Protocol):
    """A node's download of one image, as the have-stream server sees it (SwarmDownload)."""

    def add_peer(self, node_id: str, address: str, zone: str) -> None:
        """A neighbour began following us: follow it back."""

    def known_have(self, node_id: str) -> int | None:
        """What neighbour `node_id` told us it holds (its bitfield); None if not followed."""


class HaveHub:
    """Fans newly stored chunks out to every neighbour following an image."""

    def __init__(
        self,
        catalog: Catalog,
        swarms: Mapping[str, Swarm] | None = None,
    ) -> None:
        self.catalog = catalog
        # The node's downloads by image digest: a follower of an image being pulled is
        # followed back, and what it told us it holds is known. News it cannot use is
        # not sent: each is a small write and a wake-up at both ends, per chunk or
        # upload and per follower (bench.fanout N=16, 1 MiB chunks: 7.94-8.87 CPU s/GiB
        # against 9.05-9.54 in three paired runs).
        self.swarms: Mapping[str, Swarm] = swarms if swarms is not None else {}
        self.followers: dict[str, dict[asyncio.Queue[int | _Busy], str]] = {}
        self.closing = False
        catalog.on_have.append(self._have)

    def close(self) -> None:
        """End every have-stream, so a stopping server is not held open by followers."""
        self.closing = True
        for queues in self.followers.values():
            for q in queues:
                q.put_nowait(_END)

    def _known(self, digest: str, node: str) -> int | None:
        swarm = self.swarms.get(digest)
        return None if swarm is None else swarm.known_have(node)

    def _have(self, image: Image, index: int) -> None:
        for q, node in self.followers.get(image.digest, {}).items():
            held = self._known(image.digest, node)
            if held is None or not held >> index & 1:
                q.put_nowait(index)

    def busy(self, until: float) -> None:
        """Tell every follower, of every image, that the upload slots are taken until
        `until` (loop time): they are this node's slots, whatever the image. Not those
        known to hold all this node has of the image: they ask it for nothing."""
        news = _Busy(until)
        for digest, queues in self.followers.items():
            image = self.catalog.images.get(digest)
            ours = image.have if image is not None else -1  # unknown: as if it had all
            for q, node in queues.items():
                held = self._known(digest, node)
                if held is None or ours & ~held:
                    q.put_nowait(news)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.followers.values())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = _digest(request, "image")
        image = self.catalog.images.get(digest)
        if image is None:
            raise ApiError(404, f"not in the swarm of image {digest}")
        node = request.query.get("node", "")
        address = request.query.get("address", "")
        subs = self.followers.setdefault(digest, {})
        if len(subs) >= MAX_NEIGHBOURS:
            # Refused before it is followed back: the asker forgets us for a while and
            # follows others the tracker names.
            raise ApiError(503, f"already {len(subs)} followers of image {digest}")
        swarm = self.swarms.get(digest)
        if node and address and swarm is not None:
            swarm.add_peer(node, address, request.query.get("zone", ""))
        queue: asyncio.Queue[int | _Busy] = asyncio.Queue()
        subs[queue] = node  # before the bitfield is sent, so no chunk falls in between
        resp = web.StreamResponse(headers={"Content-Type": HAVE_STREAM})
        try:
            await resp.prepare(request)
            n = len(image.manifest.chunks)
            await resp.write(wire.pack(["bitfield", bitfield.to_bytes(image.have, n)]))
            while digest in self.catalog.images and not self.closing:
                try:
                    # asyncio.timeout, not wait_for: no task per message on every stream.
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        first = await queue.get()
                except TimeoutError:
                    await resp.write(wire.pack(["ping"]))
                    continue
                if first == _END:
                    break
                batch = [first]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if _END in batch:
                    break
                haves = [i for i in batch if isinstance(i, int)]
                if haves:
                    await resp.write(wire.pack(["have", haves]))
                busy = [b.until for b in batch if isinstance(b, _Busy)]
                if busy:
                    left = busy[-1] - asyncio.get_running_loop().time()
                    ms = min(MAX_BUSY_MS, int(left * 1000))
                    if ms > 0:
                        await resp.write(wire.pack(["busy", ms]))
        except ConnectionError:
            return resp  # the follower went away
        finally:
            subs.pop(queue, None)
            if not subs:
                self.followers.pop(digest, None)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


def add_peer_routes(app: web.Application, chunks: ChunkServer, hub: HaveHub) -> None:
    """The peer API every node serves (daemon and `distd pull` alike): chunks and
    have-streams, with the streams ended at shutdown so followers cannot hold it open."""
    chunks.on_full = hub.busy
    app.router.add_get("/v1/chunks/{digest}", chunks.handle, allow_head=False)
    app.router.add_get("/v1/swarm/{image}/haves", hub.handle)

    async def end_streams(_: web.Application) -> None:
        hub.close()

    app.on_shutdown.append(end_streams)
