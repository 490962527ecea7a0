"""The swarm download of one image: real sockets driving the sans-IO `Scheduler`.

For each neighbour the engine follows its have-stream (bitfield, then each new
chunk) and feeds it to the scheduler; it sends the requests the scheduler asks
for, reports every answer back, and sleeps exactly until the next event or the
scheduler's next wake-up. Every chunk is verified by the store before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from distd.catalog import Image
from distd.chunk_client import ChunkClient
from distd.directio import aligned_buffer
from distd.metrics import Metrics
from distd.peer_server import H_DEFERRED, H_RETRY_MS, MAX_BUSY_MS, MAX_NEIGHBOURS
from distd.ratelimit import TokenBucket
from distd.store import ChunkStore
from distd.swarm import bitfield
from distd.swarm.peers import Failure
from distd.swarm.scheduler import Request, Scheduler, SchedulerConfig
from manifests import wire
from manifests.chunking import ChunkError
from manifests.model import Encoding

log = logging.getLogger(__name__)

# Response headers as the chunk client gives them (names in lower case).
_H_DEFERRED = H_DEFERRED.lower()
_H_RETRY_MS = H_RETRY_MS.lower()
_H_ENCODING = wire.H_ENCODING.lower()

SEEDER_ID = "seeder"
# How long a follower waits before reconnecting to a neighbour whose stream broke.
REFOLLOW_SECONDS = 2.0


def peer_session(client_ssl: ssl.SSLContext | bool) -> aiohttp.ClientSession:
    """The connection pool a node (daemon or `distd pull`) reaches the seeder's API and
    its neighbours' have-streams through (chunks: `ChunkClient`); call it with the event
    loop running."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=16, ttl_dns_cache=300, ssl=client_ssl)
    return aiohttp.ClientSession(connector=connector)


@dataclass(eq=False)
class PeerLink:
    peer_id: str
    url: str
    zone: str = ""
    is_seeder: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class EngineContext:
    """What every image download of one node shares."""

    node_id: str
    address: str  # advertised host:port of this node's peer server
    zone: str
    seeder_url: str
    store: ChunkStore
    session: aiohttp.ClientSession
    ingress: TokenBucket
    metrics: Metrics
    config: SchedulerConfig
    headers: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"  # of peer URLs: "https" in a fleet that serves TLS
    p2p: bool = True
    rng: random.Random = field(default_factory=random.Random)
    chunks: ChunkClient = field(default_factory=ChunkClient)  # chunk GETs, to any peer


def have_stream_decoder(n: int) -> msgpack.Unpacker:
    """A msgpack decoder for a have-stream of an image of `n` chunks, bounded by what one
    needs: a bitfield of n bits, or a batch of at most n indexes (5 bytes each at most),
    so a hostile neighbour cannot make a node hold more than that per link."""
    return msgpack.Unpacker(
        raw=False,
        max_buffer_size=max(1 << 20, 8 * n + (64 << 10)),
        max_array_len=max(2, n),
        max_map_len=0,
        max_str_len=64,
        max_bin_len=(n + 7) // 8,
        max_ext_len=0,
    )


class SwarmDownload:
    def __init__(self, image: Image, ctx: EngineContext) -> None:
        self.image = image
        self.ctx = ctx
        chunks = image.manifest.chunks
        self.digests = [c.digest for c in chunks]
        self.sched = Scheduler(
            [c.stored_size for c in chunks],
            bitfield.iter_set(image.have),
            config=ctx.config,
            rng=ctx.rng,
        )
        self.links: dict[str, PeerLink] = {}
        self.tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.landing: set[int] = set()
        self.store_error: OSError | None = None  # the store refused a verified chunk
        self.wake = asyncio.Event()
        seeder = PeerLink(SEEDER_ID, ctx.seeder_url.rstrip("/"), is_seeder=True)
        self.links[SEEDER_ID] = seeder
        self.sched.add_peer(SEEDER_ID, is_seeder=True, have=bitfield.full(len(chunks)))

    # --- neighbours ---------------------------------------------------------------------

    def add_peer(self, node_id: str, address: str, zone: str) -> None:
        """A neighbour named by the tracker or by its own follow request: follow its haves."""
        if not self.ctx.p2p or node_id == self.ctx.node_id or node_id in self.links:
            return
        if self.sched.complete or len(self.links) > MAX_NEIGHBOURS:
            return  # enough neighbours: more only adds have-traffic and busy answers
        link = PeerLink(node_id, f"{self.ctx.scheme}://{address}", zone)
        self.links[node_id] = link
        link.task = asyncio.create_task(self._follow(link), name=f"follow-{node_id}")

    async def _follow(self, link: PeerLink) -> None:
        n = len(self.digests)
        url = f"{link.url}/v1/swarm/{self.image.digest}/haves"
        params = {"node": self.ctx.node_id, "address": self.ctx.address, "zone": self.ctx.zone}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
        try:
            async with self.ctx.session.get(
                url, params=params, headers=self.ctx.headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    return
                unpacker = have_stream_decoder(n)
                async for data in resp.content.iter_any():
                    if self._on_data(link, unpacker, data, n):
                        self.wake.set()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            log.debug("following %s failed: %s", link.peer_id, e)
        finally:
            self._cancel(self.sched.remove_peer(link.peer_id))
            if self.links.get(link.peer_id) is link:
                # Forget it after a pause, so the tracker or a follow-back can bring it back.
                asyncio.get_running_loop().call_later(
                    REFOLLOW_SECONDS, self.links.pop, link.peer_id, None
                )
            self.wake.set()

    def _on_data(self, link: PeerLink, unpacker: msgpack.Unpacker, data: bytes, n: int) -> bool:
        """Feed bytes of a neighbour's have-stream; act on every whole message. True when
        the news could change the next decision (see `Scheduler.peer_has`): the rest
        (haves of chunks we hold or cannot ask for yet, busy news, pings) does not wake
        the download loop, which is most of a node's have-stream traffic.

        Raises ValueError, and only that, on anything malformed or oversized.
        """
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            raise ValueError("have-stream message larger than the image needs") from None
        now = asyncio.get_running_loop().time()
        actionable = False
        for msg in unpacker:
            actionable |= self._on_message(link, msg, n, now)
        return actionable

    def _on_message(self, link: PeerLink, msg: Any, n: int, now: float) -> bool:
        if not isinstance(msg, list) or not msg:
            raise ValueError("malformed have-stream message")
        kind = msg[0]
        if kind == "bitfield" and len(msg) == 2 and isinstance(msg[1], bytes):
            have = bitfield.from_bytes(msg[1], n)
            self.sched.add_peer(link.peer_id, zone=link.zone, have=have)
            return True
        if kind == "have" and len(msg) == 2 and isinstance(msg[1], list):
            wanted = False
            for i in msg[1]:
                if isinstance(i, int) and 0 <= i < n:
                    wanted |= self.sched.peer_has(link.peer_id, i, now)
            return wanted
        if kind == "busy" and len(msg) == 2 and isinstance(msg[1], int):
            if not 0 <= msg[1] <= MAX_BUSY_MS:
                raise ValueError(f"busy for {msg[1]} ms on a have-stream")
            self.sched.peer_busy(link.peer_id, msg[1] / 1000, now)
            return False
        if kind != "ping":
            what = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
            raise ValueError(f"unknown have-stream message {what}")
        return False

    def known_have(self, node_id: str) -> int | None:
        """What neighbour `node_id` told us it holds (its bitfield); None if not followed."""
        peer = self.sched.peers.get(node_id)
        return None if peer is None else peer.have

    @property
    def peer_count(self) -> int:
        return sum(1 for p in self.sched.peers.values() if not p.is_seeder)

    # --- chunks ----------------------------------------------------------------------------

    def on_have(self, index: int) -> None:
        """A chunk of this image was stored (by this download, or another sharing it)."""
        if index in self.landing:
            return  # our own fetch reports it, with its timing
        self._cancel(self.sched.mark_have(index))
        self.wake.set()

    def _cancel(self, requests: list[Request]) -> None:
        for r in requests:
            task = self.tasks.pop((r.peer_id, r.index), None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def _fetch(self, req: Request) -> None:
        key = (req.peer_id, req.index)
        link = self.links.get(req.peer_id)
        chunk = self.image.manifest.chunks[req.index]
        failure: Failure | None = None
        retry_after: float | None = None
        loop = asyncio.get_running_loop()
        try:
            if link is None:
                failure = Failure.ERROR
                return
            payload, encoding = await self._download(link, req, chunk.digest, chunk.size)
            self.landing.add(req.index)
            try:
                await self.ctx.store.put(chunk.digest, payload, encoding, chunk.size)
            except OSError as e:
                # Our disk, not the peer (full, read-only, quota): no use fetching more.
                # `run` ends with this error, so the caller reports and backs off.
                self.store_error = OSError(
                    e.errno,
                    f"cannot store chunk {chunk.digest[:16]} in {self.ctx.store.root}: "
                    f"{e.strerror or e}",
                )
                failure = Failure.ERROR
                return
            finally:
                self.landing.discard(req.index)
            self.ctx.metrics.received(link.is_seeder, len(payload))
            log.debug(
                "chunk %d from %s: %d bytes in %.3fs",
                req.index,
                req.peer_id,
                len(payload),
                loop.time() - req.sent,
            )
            self.tasks.pop(key, None)
            self._cancel(self.sched.on_received(req.peer_id, req.index, loop.time()))
        except _Refused as e:
            failure, retry_after = e.failure, e.retry_after
        except ChunkError as e:
            log.warning("chunk %s from %s rejected: %s", chunk.digest[:16], req.peer_id, e)
            self.ctx.metrics.chunks_rejected.inc()
            failure = Failure.CORRUPT
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            log.debug("fetch %s from %s failed: %s", chunk.digest[:16], req.peer_id, e)
            failure = Failure.ERROR
        finally:
            if failure is not None:
                self.tasks.pop(key, None)
                self.sched.on_failed(req.peer_id, req.index, failure, loop.time(), retry_after)
            self.wake.set()

    async def _download(
        self, link: PeerLink, req: Request, digest: str, size: int
    ) -> tuple[memoryview, Encoding]:
        chunk_limit = max(size, self.image.manifest.chunk_map()[digest].stored_size)
        url = f"{link.url}/v1/chunks/{digest}"
        if not self.ctx.p2p:
            url += "?direct=1"
        elif link.is_seeder:
            # For super-seeding: which image this chunk is for, and how many it has.
            url += f"?image={self.image.digest}&chunks={len(self.digests)}"
        async with self.ctx.chunks.get(url, self.ctx.headers) as resp:
            if resp.status == 503:
                if resp.headers.get(_H_DEFERRED) == "1":
                    raise _Refused(Failure.DEFERRED)
                hint = resp.headers.get(_H_RETRY_MS, "")
                raise _Refused(Failure.BUSY, int(hint) / 1000 if hint.isdigit() else None)
            if resp.status == 404:
                raise _Refused(Failure.MISSING)
            if resp.status != 200:
                raise _Refused(Failure.ERROR)
            try:
                encoding = Encoding(resp.headers.get(_H_ENCODING, ""))
            except ValueError:
                raise ChunkError("peer sent an unknown chunk encoding") from None
            length = resp.content_length
            if length is None:
                raise ChunkError("peer sent a chunk without a Content-Length")
            if length > chunk_limit:
                raise ChunkError(f"peer offers {length} bytes for a smaller chunk")
            # One buffer of the announced size, which the socket fills itself (see
            # chunk_client): the store keeps this very object, and it is aligned so that
            # the store and the image write it to disk from where it is.
            body = aligned_buffer(length)
            loop = asyncio.get_running_loop()
            async with contextlib.aclosing(resp.read_into(body)) as arrivals:
                async for n in arrivals:
                    self.sched.on_progress(req.peer_id, req.index, loop.time())
                    await self.ctx.ingress.consume(n, self.sched.read_order(req.index))
        return body, encoding

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the scheduler until every chunk of the image is stored and verified."""
        loop = asyncio.get_running_loop()
        try:
            while not self.sched.complete:
                self.wake.clear()
                now = loop.time()
                self._cancel(self.sched.expire(now))
                for req in self.sched.next_requests(now):
                    task = asyncio.create_task(self._fetch(req))
                    self.tasks[(req.peer_id, req.index)] = task
                wake_at = self.sched.next_wakeup(now)
                # asyncio.timeout_at, not wait_for: no task per wait, and this loop waits
                # once per decision.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(wake_at):
                        await self.wake.wait()
                if self.store_error is not None:
                    raise self.store_error
        finally:
            await self.close()

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        tasks += [link.task for link in self.links.values() if link.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()


class _Refused(Exception):
    def __init__(self, failure: Failure, retry_after: float | None = None) -> None:
        super().__init__(failure.value)
        self.failure = failure
        self.retry_after = retry_after
