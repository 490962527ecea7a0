"""`distd run`: the node daemon.

It watches the node's assignment on the seeder (a long poll, so a change arrives
within a moment), pulls every assigned image through the swarm, materializes it
atomically, serves every chunk it holds to its neighbours, announces itself to the
tracker, and removes images that are no longer assigned once their grace ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from distd import materialize
from distd.catalog import Catalog, Image, State
from distd.chunk_client import ChunkClient
from distd.engine import EngineContext, SwarmDownload, peer_session
from distd.httpserver import (
    advertised_address,
    middlewares,
    open_listener_warning,
    respond,
    serve,
)
from distd.metrics import CONTENT_TYPE, Metrics
from distd.peer_server import ChunkServer, HaveHub, add_peer_routes
from distd.ratelimit import TokenBucket
from distd.staging import StageFeeder
from distd.store import ChunkStore
from distd.swarm.scheduler import SchedulerConfig
from manifests import wire
from manifests.client import SeederClient, SeederError
from manifests.validate import decode_manifest

log = logging.getLogger(__name__)

RETRY_MIN = 1.0
RETRY_MAX = 30.0


@dataclass
class DaemonConfig:
    seeder: str
    listen: tuple[str, int]
    data_dir: Path
    node_id: str
    advertise: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    zone: str = ""
    max_upload_rate: int | None = None
    max_download_rate: int | None = None
    upload_slots: int = 1
    cache_max_bytes: int = 0
    gc_grace: float = 60.0
    p2p: bool = True
    announce_interval: float = 5.0
    poll_wait: float = 20.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Security (see manifests.wire): every listener of the fleet shares the cluster token;
    # with `server_ssl` this node serves TLS and so expects its peers to (https).
    cluster_token: str | None = None
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | bool = True


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.cfg = config
        self.store = ChunkStore(config.data_dir)
        self.catalog = Catalog(config.data_dir, self.store)
        self.metrics = Metrics()
        self.egress = TokenBucket(config.max_upload_rate)
        self.ingress = TokenBucket(config.max_download_rate)
        self.chunks = ChunkServer(
            self.store,
            slots=config.upload_slots,
            bucket=self.egress,
            on_sent=self.metrics.bytes_sent.inc,
        )
        self.downloads: dict[str, SwarmDownload] = {}
        self.hub = HaveHub(self.catalog, swarms=self.downloads)
        self.catalog.on_have.append(self._on_have)
        self.feeders: dict[str, StageFeeder] = {}  # images being materialized as they arrive
        self.workers: dict[str, asyncio.Task[None]] = {}
        # name -> digest, as the seeder last said; None until it has said anything
        self.assigned: dict[str, str] | None = None
        self.address = config.advertise
        self.stop = asyncio.Event()
        self.announce_now = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.chunk_client = ChunkClient(config.client_ssl)
        self.client: SeederClient | None = None
        self.rng = random.Random()

    # --- HTTP ------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=middlewares(self.cfg.cluster_token))
        r = app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        r.add_get("/v1/status", self._status)
        add_peer_routes(app, self.chunks, self.hub)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render(self._refresh_gauges)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _refresh_gauges(self) -> None:
        states = {s.value: 0 for s in State}
        for image in self.catalog.images.values():
            states[image.state.value] += 1
        peers = sum(d.peer_count for d in self.downloads.values())
        self.metrics.set_gauges(peers, states)
        self.metrics.busy_answers.inc(self.chunks.busy_answers - self._busy_seen)
        self._busy_seen = self.chunks.busy_answers

    _busy_seen = 0

    def status(self) -> dict[str, Any]:
        rows = []
        for image in self.catalog.images.values():
            if image.remove_at is not None:
                continue
            ready = image.state is State.READY
            for name in sorted(image.names) or [""]:
                rows.append(
                    {
                        "name": name,
                        "digest": image.digest,
                        "state": image.state.value,
                        "bytes_done": image.bytes_done,
                        "bytes_total": image.bytes_total,
                        "path": str(self.catalog.path(image.digest)) if ready else None,
                        "error": image.error or None,
                    }
                )
        # A name's ready copy first: during a switch the old version is listed (ready)
        # beside the new one (pulling), and a reader taking the first row gets a tree.
        rows.sort(key=lambda r: (r["name"], r["state"] != State.READY.value, r["digest"]))
        return {"node_id": self.cfg.node_id, "images": rows}

    async def _status(self, request: web.Request) -> web.Response:
        return respond(request, self.status())

    # --- events ----------------------------------------------------------------------------

    def _on_have(self, image: Image, index: int) -> None:
        feeder = self.feeders.get(image.digest)
        if feeder is not None:
            feeder.feed(image.manifest.chunks[index].digest)
        dl = self.downloads.get(image.digest)
        if dl is not None:
            dl.on_have(index)

    # --- lifecycle -----------------------------------------------------------------------

    async def restore(self) -> None:
        """Re-learn the images of a previous run, then drop the chunks none of them uses
        beyond the cache budget (left by a crash during a removal, or a smaller
        --cache-max-bytes than last time)."""
        restored = self.catalog.load()
        deleted = await self._collect_garbage()
        if restored or deleted:
            log.info(
                "restored %d images and %d chunks from %s (%d unused chunks deleted)",
                restored,
                len(self.store),
                self.cfg.data_dir,
                deleted,
            )

    async def run(self) -> None:
        await self.restore()
        host, port = self.cfg.listen
        ready = asyncio.Event()

        def on_ready(bound_host: str, bound_port: int) -> None:
            if not self.address:
                self.address = advertised_address(bound_host, bound_port)
            log.info(
                "distd %s listening on %s://%s:%d (cluster token %s)",
                self.cfg.node_id,
                self.scheme,
                bound_host,
                bound_port,
                "required" if self.cfg.cluster_token else "off",
            )
            if warning := open_listener_warning(host, self.cfg.cluster_token):
                log.warning("%s", warning)
            ready.set()

        async with peer_session(self.cfg.client_ssl) as session:
            self.session = session
            self.client = SeederClient(
                self.cfg.seeder, session=session, cluster_token=self.cfg.cluster_token
            )
            server = asyncio.create_task(
                serve(
                    self.make_app(),
                    host,
                    port,
                    on_ready=on_ready,
                    stop=self.stop,
                    ssl_context=self.cfg.server_ssl,
                )
            )
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if server.done():
                waiter.cancel()
                await server  # raises the bind error
                return
            for image in self.catalog.images.values():
                self._start(image)
            loops = [
                asyncio.create_task(self._watch_assignments()),
                asyncio.create_task(self._announce_loop()),
                asyncio.create_task(self._gc_loop()),
            ]
            try:
                await server
            finally:
                for t in [*loops, *self.workers.values()]:
                    t.cancel()
                await asyncio.gather(*loops, *self.workers.values(), return_exceptions=True)
                self.chunk_client.close()

    # --- assignments -----------------------------------------------------------------------

    async def _watch_assignments(self) -> None:
        assert self.client is not None
        etag = ""
        backoff = retry = RETRY_MIN
        while True:
            try:
                answer = await self.client.register(
                    self.cfg.node_id,
                    labels=self.cfg.labels,
                    address=self.address,
                    zone=self.cfg.zone,
                    known=etag,
                    wait=self.cfg.poll_wait,
                )
                backoff = RETRY_MIN
            except SeederError as e:
                log.warning("assignment watch: %s; retrying in %.0fs", e, backoff)
                await asyncio.sleep(backoff * (1 + self.rng.random()))
                backoff = min(RETRY_MAX, backoff * 2)
                continue
            if answer["etag"] != etag:
                etag = answer["etag"]
                if await self._reconcile(answer["assignments"]):
                    retry = RETRY_MIN
                else:
                    # An image could not be taken in (seeder hiccup, disk full): take the
                    # whole set again after a pause, even if it does not change.
                    etag = ""
                    await asyncio.sleep(retry * (1 + self.rng.random()))
                    retry = min(RETRY_MAX, retry * 2)

    async def _reconcile(self, assignments: list[dict[str, str]]) -> bool:
        """Pull what is assigned, schedule the removal of the rest; False if an image
        could not be taken in (its manifest not fetched or not saved)."""
        assert self.client is not None
        complete = True
        self.assigned = {a["name"]: a["digest"] for a in assignments}
        wanted: dict[str, set[str]] = {}
        for a in assignments:
            wanted.setdefault(a["digest"], set()).add(a["name"])
        for digest, names in wanted.items():
            image = self.catalog.images.get(digest)
            if image is None:
                what = f"image {', '.join(sorted(names))} ({digest[:16]})"
                try:
                    data = await self.client.get_manifest(digest)
                    manifest = decode_manifest(data)
                    image = self.catalog.add(digest, manifest)
                except (SeederError, ValueError) as e:
                    log.error("%s: %s", what, e)
                    complete = False
                    continue
                except OSError as e:
                    why = e.strerror or e
                    log.error(
                        "%s: cannot save its manifest in %s: %s",
                        what,
                        self.catalog.manifest_dir,
                        why,
                    )
                    complete = False
                    continue
            self._start(image)
        self._settle()
        self.announce_now.set()
        return complete

    def _settle(self) -> None:
        """Give every image its names and start the grace of those no name needs.

        A name that moved to a version not ready yet stays on the ready copy it had,
        so the node never lacks a ready copy of it: the old version's grace starts
        at the switch (called again whenever an image becomes ready). An image whose
        names were unassigned outright starts its grace at once.
        """
        if self.assigned is None:
            return  # restored images wait for the first assignment
        now = time.monotonic()
        changed = False
        for image in self.catalog.images.values():
            names = {n for n, d in self.assigned.items() if d == image.digest}
            if image.state is State.READY and image.remove_at is None:
                names |= {n for n in image.names if self._switch_pending(n)}
            changed |= names != image.names
            image.names = names
            if names:
                image.remove_at = None
            elif image.remove_at is None:
                image.remove_at = now + self.cfg.gc_grace
                log.info(
                    "image %s no longer needed; removing in %.0fs",
                    image.digest[:16],
                    self.cfg.gc_grace,
                )
        if changed:
            try:
                self.catalog.save_names()
            except OSError as e:
                log.warning("cannot save image names in %s: %s", self.catalog.names_file, e)

    def _switch_pending(self, name: str) -> bool:
        """True if `name` is assigned to a version this node does not hold ready yet."""
        digest = (self.assigned or {}).get(name)
        if digest is None:
            return False
        new = self.catalog.images.get(digest)
        return new is None or new.state is not State.READY

    # --- pulling ---------------------------------------------------------------------------

    def _start(self, image: Image) -> None:
        if image.state is State.READY or image.digest in self.workers:
            return
        task = asyncio.create_task(self._pull(image), name=f"pull-{image.digest[:12]}")
        self.workers[image.digest] = task
        task.add_done_callback(lambda _t: self.workers.pop(image.digest, None))

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.server_ssl is not None else "http"

    def _context(self) -> EngineContext:
        assert self.session is not None
        return EngineContext(
            node_id=self.cfg.node_id,
            address=self.address,
            zone=self.cfg.zone,
            seeder_url=self.cfg.seeder,
            store=self.store,
            session=self.session,
            ingress=self.ingress,
            metrics=self.metrics,
            config=self.cfg.scheduler,
            p2p=self.cfg.p2p,
            rng=self.rng,
            headers=wire.cluster_headers(self.cfg.cluster_token),
            scheme=self.scheme,
            chunks=self.chunk_client,
        )

    async def _pull(self, image: Image) -> None:
        """Pull and materialize one image, retrying with backoff until it is ready."""
        backoff = RETRY_MIN
        image.started = time.monotonic()
        while True:
            image.state = State.PULLING
            try:
                # The tree is built as chunks are stored, so once the last one lands
                # only the check, the sync and the rename are left.
                feeder = await StageFeeder.open(
                    image.manifest, self.store, self.catalog.path(image.digest)
                )
                self.feeders[image.digest] = feeder
                try:
                    if not image.complete:
                        dl = SwarmDownload(image, self._context())
                        self.downloads[image.digest] = dl
                        self.announce_now.set()
                        try:
                            await dl.run()
                        finally:
                            self.downloads.pop(image.digest, None)
                    await feeder.finish()
                finally:
                    self.feeders.pop(image.digest, None)
                    await feeder.close()
                    for d in feeder.bad:  # rotted on disk since stored: fetch them again
                        await self.store.delete(d)
                        self.catalog.lost(d)
            except (OSError, materialize.MaterializeError, ValueError) as e:  # ChunkError too
                image.state = State.FAILED
                image.error = str(e)
                log.error("image %s failed: %s; retrying in %.0fs", image.digest[:16], e, backoff)
                await asyncio.sleep(backoff * (1 + self.rng.random()))
                backoff = min(RETRY_MAX, backoff * 2)
                continue
            image.state = State.READY
            image.error = ""
            image.finished = time.monotonic()
            self.metrics.pull_seconds.observe(image.finished - image.started)
            log.info("image %s ready in %.2fs", image.digest[:16], image.finished - image.started)
            self._settle()  # the versions it replaces start their grace now
            self.announce_now.set()
            return

    # --- tracker ---------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.gather(
                *(self._announce(i) for i in list(self.catalog.images.values())),
                return_exceptions=True,
            )
            self.announce_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.announce_now.wait(), self.cfg.announce_interval)

    async def _announce(self, image: Image) -> None:
        assert self.client is not None
        if image.remove_at is not None or not self.cfg.p2p:
            return
        try:
            peers = await self.client.announce(
                image.digest,
                self.cfg.node_id,
                address=self.address,
                zone=self.cfg.zone,
                have=image.have.bit_count(),
                total=len(image.manifest.chunks),
            )
        except SeederError as e:
            log.debug("announce of %s failed: %s", image.digest[:16], e)
            return
        dl = self.downloads.get(image.digest)
        if dl is not None:
            for p in peers:
                if not p.get("seeder"):
                    dl.add_peer(str(p["node_id"]), str(p["address"]), str(p.get("zone", "")))

    # --- garbage collection ----------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, max(0.1, self.cfg.gc_grace / 4)))
            now = time.monotonic()
            for image in list(self.catalog.images.values()):
                if image.remove_at is not None and image.remove_at <= now:
                    await self._remove(image)

    async def _remove(self, image: Image) -> None:
        worker = self.workers.pop(image.digest, None)
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        await asyncio.to_thread(self.catalog.remove, image.digest)
        deleted = await self._collect_garbage()
        log.info("image %s removed (%d chunks deleted)", image.digest[:16], deleted)

    async def _collect_garbage(self) -> int:
        """Delete the chunks no known image uses, beyond --cache-max-bytes of them.

        The budget covers unused chunks only: counting the ones in use too would
        wipe the whole cache whenever the assigned images alone exceed it."""
        kept = deleted = 0
        for d in self.store.digests():
            info = self.store.info(d)
            if info is None or d in self.catalog.users:
                continue
            if kept + info.stored_size <= self.cfg.cache_max_bytes:
                kept += info.stored_size
                continue
            await self.store.delete(d)
            deleted += 1
        return deleted
