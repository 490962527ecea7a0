"""`distd pull` through the swarm: a one-shot member that fetches from peers and serves back.

For as long as it pulls, the command is a small node: it announces itself to the
image's tracker, follows the neighbours the tracker names (and those that follow
it), lets `distd.engine.SwarmDownload` pick chunks from them with the seeder as the
fallback, and serves every chunk it holds on its own little peer server, so that
the machines pulling beside it benefit too. It stops serving when the pull ends.

    async with SwarmPull(config, store, data_dir) as swarm:
        result = await pull_image(swarm.client, name, store, dest, fill=swarm.fill)

The pieces are the daemon's (engine, catalogue, chunk server, have-hub, metrics);
only the wiring is here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
from aiohttp import web

from distd.catalog import Catalog, Image
from distd.chunk_client import ChunkClient
from distd.engine import EngineContext, SwarmDownload, peer_session
from distd.httpserver import BACKLOG, IDLE_TIMEOUT, advertised_address, middlewares
from distd.metrics import Metrics
from distd.peer_server import ChunkServer, HaveHub, add_peer_routes
from distd.pull import FetchStats, PullError
from distd.ratelimit import TokenBucket
from distd.store import ChunkStore
from distd.swarm.scheduler import SchedulerConfig
from manifests import wire
from manifests.client import SeederClient, SeederError
from manifests.model import Manifest

log = logging.getLogger(__name__)

DEFAULT_LISTEN = ("127.0.0.1", 0)
DEFAULT_ANNOUNCE_INTERVAL = 5.0
DEFAULT_STALL_TIMEOUT = 60.0
DEFAULT_UPLOAD_SLOTS = 4
# Followers and uploads in flight when the pull ends get this long to finish.
SHUTDOWN_SECONDS = 1.0
WATCH_SECONDS = 1.0


def default_node_id() -> str:
    """Unique per invocation: a daemon on the same host keeps its own tracker entry."""
    return f"{socket.gethostname() or 'localhost'}-pull-{os.getpid()}"


@dataclass
class SwarmPullConfig:
    seeder: str
    node_id: str = field(default_factory=default_node_id)
    listen: tuple[str, int] = DEFAULT_LISTEN
    advertise: str = ""  # host:port others reach us on; default: the bound address
    zone: str = ""
    max_upload_rate: int | None = None
    max_download_rate: int | None = None
    upload_slots: int = DEFAULT_UPLOAD_SLOTS
    announce_interval: float = DEFAULT_ANNOUNCE_INTERVAL
    # No chunk for this long (seeder gone, no peer holding what we lack): give up.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # As for the daemon: the fleet's cluster token, and TLS (with `server_ssl`, peers are
    # reached over https).
    cluster_token: str | None = None
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | bool = True


class SwarmPull:
    """A temporary swarm member for one `distd pull`: serve while pulling, stop when done."""

    def __init__(self, config: SwarmPullConfig, store: ChunkStore, data_dir: Path) -> None:
        self.cfg = config
        self.store = store
        # persist=False below: the pull leaves no manifest behind for a daemon to adopt.
        self.catalog = Catalog(data_dir, store)
        self.metrics = Metrics()
        self.egress = TokenBucket(config.max_upload_rate)
        self.ingress = TokenBucket(config.max_download_rate)
        self.chunks = ChunkServer(
            store,
            slots=config.upload_slots,
            bucket=self.egress,
            on_sent=self.metrics.bytes_sent.inc,
        )
        self.downloads: dict[str, SwarmDownload] = {}
        self.hub = HaveHub(self.catalog, swarms=self.downloads)
        self.catalog.on_have.append(self._on_have)
        self.progress: dict[str, Callable[[int], None]] = {}
        self.address = config.advertise
        self.rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._chunk_client = ChunkClient(config.client_ssl)
        self._client: SeederClient | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SwarmPull is not started (use `async with`)")
        return self._session

    @property
    def client(self) -> SeederClient:
        """A seeder client on the pull's own connection pool."""
        if self._client is None:
            raise RuntimeError("SwarmPull is not started (use `async with`)")
        return self._client

    def make_app(self) -> web.Application:
        """The peer half of the daemon's API: chunks and have-streams."""
        app = web.Application(middlewares=middlewares(self.cfg.cluster_token))
        add_peer_routes(app, self.chunks, self.hub)
        return app

    async def start(self) -> None:
        self._session = peer_session(self.cfg.client_ssl)
        self._client = SeederClient(
            self.cfg.seeder, session=self._session, cluster_token=self.cfg.cluster_token
        )
        # No signal handlers: Ctrl-C must interrupt the pull, not just stop the server.
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_SECONDS,
            keepalive_timeout=IDLE_TIMEOUT,
        )
        await runner.setup()
        self._runner = runner
        host, port = self.cfg.listen
        site = web.TCPSite(runner, host, port, ssl_context=self.cfg.server_ssl, backlog=BACKLOG)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        if not self.address:
            self.address = advertised_address(bound_host, bound_port)
        log.info("pull %s serving peers on %s", self.cfg.node_id, self.address)

    async def close(self) -> None:
        for dl in list(self.downloads.values()):
            await dl.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self._chunk_client.close()
        if self._session is not None:
            session, self._session = self._session, None
            self._client = None
            await session.close()

    async def __aenter__(self) -> SwarmPull:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- events ----------------------------------------------------------------------------

    def _on_have(self, image: Image, index: int) -> None:
        dl = self.downloads.get(image.digest)
        if dl is not None:
            dl.on_have(index)
        on_bytes = self.progress.get(image.digest)
        if on_bytes is not None:
            on_bytes(image.manifest.chunks[index].stored_size)

    def _context(self) -> EngineContext:
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
            p2p=True,
            rng=self.rng,
            headers=wire.cluster_headers(self.cfg.cluster_token),
            scheme="https" if self.cfg.server_ssl is not None else "http",
            chunks=self._chunk_client,
        )

    # --- the pull --------------------------------------------------------------------------

    def _counts(self) -> tuple[float, float, float]:
        """(bytes from peers, bytes from the seeder, chunks rejected) so far."""
        get = self.metrics.registry.get_sample_value
        return (
            get("distd_received_bytes_total", {"source": "peer"}) or 0.0,
            get("distd_received_bytes_total", {"source": "seeder"}) or 0.0,
            get("distd_chunks_rejected_total") or 0.0,
        )

    async def fill(
        self, manifest: Manifest, digest: str, on_bytes: Callable[[int], None] | None = None
    ) -> FetchStats:
        """Fetch every chunk of `manifest` the store lacks through the swarm (`pull_image`'s
        `fill`). Raises PullError when no chunk arrives for `stall_timeout` seconds."""
        image = self.catalog.images.get(digest)
        if image is None:
            image = self.catalog.add(digest, manifest, persist=False)
        else:
            # Called again after a scrub deleted rotten chunks: learn the store afresh.
            self._resync(image)
        held = image.have.bit_count()
        before = self._counts()
        if not image.complete:
            dl = SwarmDownload(image, self._context())
            self.downloads[digest] = dl
            if on_bytes is not None:
                self.progress[digest] = on_bytes
            try:
                await self._run(image, dl)
            finally:
                self.downloads.pop(digest, None)
                self.progress.pop(digest, None)
        after = self._counts()
        peers, seeder, rejected = (int(a - b) for a, b in zip(after, before, strict=True))
        return FetchStats(
            chunks_fetched=image.have.bit_count() - held,
            chunks_held=held,
            bytes_fetched=peers + seeder,
            rejected=rejected,
            bytes_from_peers=peers,
        )

    def _resync(self, image: Image) -> None:
        image.have = image.bytes_done = 0
        for i, c in enumerate(image.manifest.chunks):
            if self.store.has(c.digest):
                image.have |= 1 << i
                image.bytes_done += c.stored_size

    async def _run(self, image: Image, dl: SwarmDownload) -> None:
        loop = asyncio.get_running_loop()
        run = asyncio.create_task(dl.run(), name=f"pull-{image.digest[:12]}")
        announcer = asyncio.create_task(self._announce_loop(image, dl))
        try:
            have, since = image.have, loop.time()
            while True:
                done, _ = await asyncio.wait({run}, timeout=WATCH_SECONDS)
                if done:
                    run.result()
                    return
                if image.have != have:
                    have, since = image.have, loop.time()
                elif loop.time() - since >= self.cfg.stall_timeout:
                    missing = len(image.manifest.chunks) - image.have.bit_count()
                    raise PullError(
                        f"no chunk arrived for {self.cfg.stall_timeout:.0f} s with "
                        f"{missing} still missing (seeder {self.cfg.seeder}, "
                        f"{dl.peer_count} peers)"
                    )
        finally:
            for t in (run, announcer):
                t.cancel()
            await asyncio.gather(run, announcer, return_exceptions=True)

    async def _announce_loop(self, image: Image, dl: SwarmDownload) -> None:
        """Join the image's swarm now and every `announce_interval`; follow who it names."""
        while not image.complete:
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
                peers = []
            for p in peers:
                if not p.get("seeder"):
                    dl.add_peer(str(p["node_id"]), str(p["address"]), str(p.get("zone", "")))
            await asyncio.sleep(self.cfg.announce_interval)
