"""Issue 6, faults 1, 2, 3, 6, 7 and 8: real `seeder run` and `distd run` processes on
loopback, with the fault put in between by a proxy (tests/faultproxy.py) or by a
signal, and the behaviour the issue asks for measured rather than assumed:

1. lossy links: 5% of chunk transfers between peers reset or stall mid-way; the fleet
   still converges byte-identical within 2x the clean run's time (same fleet, same
   test; one second of slack for scheduling noise on a loaded machine); and a node
   whose first requests to peers all stall turns to other sources well before the
   request deadline;
2. a lying peer: claims every chunk, serves wrong, short, long or cut bytes, or (a
   bogus bitfield) answers that it does not hold the chunks it claimed; it is
   detected, banned (asked a bounded number of times), and the fleet is not slowed
   by much more than the clean run;
3. the seeder dies mid-repave: nodes finish what the swarm holds, wait without a
   busy loop (connection attempts and CPU are counted while it is gone), and
   finish once it is back on the same port and data;
6. the tracker is unreachable (only POST /v1/announce fails): nodes that met keep
   swapping chunks, most bytes still coming from peers;
7. an overloaded seeder (one upload slot, twelve nodes): busy answers per second
   stay bounded (backoff), and so does the seeder's memory;
8. a seeder restart: names, manifests and assignments survive, and the tracker is
   whole again within an announce interval.

Every figure a test measures is printed (`pytest -s` shows them), so the closing
note of the issue can quote them: one `[fault N ...]` line per test (treeutil.
fault_figures) with seconds to converge against the same fleet's clean run, bytes
refetched (chunk bytes received beyond one copy of the image per node) and the VmHWM
peaks of the daemons and the seeder. Data dirs live on /dev/shm when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client as http_client
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from faultproxy import Faults, HttpProxy, ProxyLoop, ProxyStats, TcpProxy
from test_swarm import assert_identical, push, row, stored
from treeutil import (
    Peaks,
    fault_figures,
    hwm_bytes,
    received_total,
    reset_hwm,
    scratch,
    wait_for,
)

from bench.cluster import (
    HOST,
    MIB,
    Cluster,
    ClusterError,
    Http,
    ImageTree,
    Node,
    Proc,
    make_random_tree,
    parse_prometheus,
    sample,
    t_min,
)
from distd.swarm import bitfield
from distd.swarm.scheduler import SchedulerConfig
from manifests import wire
from manifests.client import SeederClient
from manifests.model import Encoding, Manifest

pytestmark = pytest.mark.timeout(120)

INTERVAL = 1.0  # --announce-interval of every daemon here
FAST = ("--announce-interval", f"{INTERVAL:g}", "--gc-grace", "1")
WAIT = 60.0  # the longest any single wait may take before the test fails


def report(what: str, **figures: object) -> None:
    """One line of measured figures (shown with `pytest -s`)."""
    print(f"\n[{what}] " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def slowest(times: dict[str, float]) -> float:
    return max(times.values())


# -- clusters whose nodes are reached through proxies ----------------------------------------


class ProxiedCluster(Cluster):
    """A `Cluster` whose daemons advertise another address to the fleet: `advertise` maps
    a node id (node-01, ...) to its proxy's host:port, so peers reach it through that."""

    def __init__(self, workdir: Path, nodes: int, rate: int, advertise: dict[str, str]) -> None:
        super().__init__(workdir, nodes, rate, daemon_args=FAST)
        self.advertise = advertise

    def _daemon_command(
        self,
        node_id: str,
        zone: str,
        labels: Mapping[str, str],
        upload_rate: int | None,
        download_rate: int | None,
    ) -> Callable[[int], list[str]]:
        base = super()._daemon_command(node_id, zone, labels, upload_rate, download_rate)

        def command(port: int) -> list[str]:
            cmd = base(port)
            address = self.advertise.get(node_id)
            return [*cmd, "--advertise", address] if address else cmd

        return command


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def seeder_proc(cluster: Cluster) -> Proc:
    assert cluster.seeder is not None
    return cluster.seeder


def restart_seeder(cluster: Cluster) -> float:
    """Start the (stopped) seeder again: same command, port and data dir. Returns the
    `time.monotonic()` at which it answered /healthz."""
    old = seeder_proc(cluster)
    assert not old.alive(), "the seeder is still running"
    proc = Proc(old.name, old.cmd, old.log_path)
    proc.url = old.url
    cluster.seeder = proc
    if cluster.seeder_http is not None:
        cluster.seeder_http.close()
    cluster.seeder_http = Http(proc.url, timeout=2.0)
    deadline = time.monotonic() + 30
    while not cluster.seeder_http.healthy():
        if not proc.alive() or time.monotonic() > deadline:
            raise ClusterError(f"the seeder did not come back:\n{proc.log_tail()}")
        time.sleep(0.02)
    return time.monotonic()


def seeder_value(cluster: Cluster, name: str) -> float:
    samples = cluster.seeder_metrics()
    assert samples is not None, "the seeder serves no /metrics"
    return sample(samples, name)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def union_stored(nodes: Sequence[Node], wanted: set[str]) -> set[str]:
    out: set[str] = set()
    for node in nodes:
        out |= stored(node).keys() & wanted
    return out


def image_tree(work: Path, name: str, size: int, seed: int) -> ImageTree:
    return make_random_tree(work / name, size, files=3, seed=seed)


# -- 1. lossy links --------------------------------------------------------------------------

LOSSY_NODES = 5
LOSSY_RATE = 8 * MIB
LOSS_CHUNK = MIB
# 5% of chunk transfers between peers (each MiB a connection carries) reset or stall.
LOSS = Faults(rate=0.05, stall_share=0.6, unit=LOSS_CHUNK, seed=2024)
# How long a stalled chunk request could hold its slot: the scheduler's request deadline.
DEADLINE = SchedulerConfig().timeout_base + LOSS_CHUNK / SchedulerConfig().timeout_min_rate
# The bound is twice the clean time, plus this for scheduling noise: on a two-core machine
# shared with other test runs, one 3-4 s pull of five daemons varies by some tenths of a
# second from run to run. Not a stall: waiting out one deadline (7 s) would break it.
JITTER = 1.0
# A node whose last requests stalled used to sleep to their deadline (~4.5 s idle in 5 of 6
# runs, 8.3-9.8 s against a 3.4 s clean run): Scheduler.next_wakeup counted stalled
# requests as holding their slots and left out backoff ends, deferrals and hedge times.


def test_lossy_links_converge_within_twice_the_clean_time() -> None:
    """Every node is reached through its own proxy (`--advertise`). The same fleet pulls one
    image with the proxies clean, then another of the same size with 5% of the chunk
    transfers through the proxies reset or stalled mid-way."""
    with scratch("lossy") as work, ProxyLoop() as loop:
        proxies = [loop.tcp_proxy() for _ in range(LOSSY_NODES)]
        advertise = {f"node-{i:02d}": p.address for i, p in enumerate(proxies, start=1)}
        cluster = ProxiedCluster(work / "cluster", LOSSY_NODES, LOSSY_RATE, advertise)
        with cluster:
            for node, proxy in zip(cluster.nodes, proxies, strict=True):
                proxy.target = (HOST, port_of(node.url))
            clean_tree = image_tree(work, "clean", 24 * MIB, seed=11)
            lossy_tree = image_tree(work, "lossy", 24 * MIB, seed=12)
            clean, _ = push(cluster, clean_tree.root, "faults/clean:v1", LOSS_CHUNK)
            lossy, lossy_manifest = push(cluster, lossy_tree.root, "faults/lossy:v1", LOSS_CHUNK)

            t0 = cluster.assign(clean.name)
            clean_times = cluster.wait_ready(clean.name, since=t0, timeout=WAIT)
            clean_peer_bytes = sum(p.stats.bytes_down for p in proxies)
            assert clean_peer_bytes > 0, "no peer traffic went through the proxies"

            for i, proxy in enumerate(proxies):
                # Fresh connections from here on, each with its fault plan.
                proxy.set_faults(dataclasses.replace(LOSS, seed=LOSS.seed + i))
                loop.run(proxy.drop_all())
                proxy.stats = ProxyStats()
            before = {n.node_id: cluster.metrics(n) for n in cluster.nodes}
            t0 = cluster.assign(lossy.name)
            lossy_times = cluster.wait_ready(lossy.name, since=t0, timeout=WAIT)
            peaks = Peaks()
            peaks.see(cluster)

            assert_identical(cluster, cluster.nodes, clean.name, clean_tree)
            assert_identical(cluster, cluster.nodes, lossy.name, lossy_tree)
            broken = sum(p.stats.broken for p in proxies)
            stalled = sum(p.stats.stalled for p in proxies)
            connections = sum(p.stats.connections for p in proxies)
            after = cluster.scrape()
            from_peers = sum(after[k].from_peers - before[k].from_peers for k in after)
            # Bytes the proxies passed on that no node kept: transfers cut or frozen midway
            # (plus the have-streams and HTTP headers, a few KiB).
            wasted = sum(p.stats.bytes_down for p in proxies) - from_peers
            fault_figures(
                "1 lossy links",
                converge_s=slowest(lossy_times),
                clean_s=slowest(clean_times),
                received=sum(after[k].received - before[k].received for k in after),
                nodes=LOSSY_NODES,
                stored_size=lossy_manifest.stored_size,
                peaks=peaks,
                connections=connections,
                broken=broken,
                stalled=stalled,
                from_peers_mib=round(from_peers / MIB, 1),
                cut_mib=round(wasted / MIB, 2),
            )
            assert broken + stalled >= 1, "the proxies injected no fault: the test shows nothing"
            bound = 2 * slowest(clean_times) + JITTER
            assert slowest(lossy_times) <= bound, (lossy_times, clean_times)


STALL_NODES = 2  # hold the image, reached through proxies that stall
STALL_SLACK = 3.0  # what stalled peers may cost a joining node, over the clean join


def test_stalled_peers_do_not_hold_up_a_node_for_a_whole_deadline() -> None:
    """Two nodes hold the image behind proxies. A third joins with clean proxies (the
    reference), then a fourth once each proxy stalls its first chunk connection for good:
    the fourth's first requests to peers all stall. It should turn to the other sources
    well before the deadline, as endgame does for a late last chunk."""
    name = "faults/stalled:v1"
    with scratch("stall") as work, ProxyLoop() as loop:
        total = STALL_NODES + 2
        proxies = [loop.tcp_proxy() for _ in range(total)]
        advertise = {f"node-{i:02d}": p.address for i, p in enumerate(proxies, start=1)}
        cluster = ProxiedCluster(work / "cluster", STALL_NODES, LOSSY_RATE, advertise)
        with cluster:
            for node, proxy in zip(cluster.nodes, proxies, strict=False):
                proxy.target = (HOST, port_of(node.url))
            tree = image_tree(work, "tree", 12 * MIB, seed=13)
            _, manifest = push(cluster, tree.root, name, LOSS_CHUNK)
            t0 = cluster.assign(name)
            cluster.wait_ready(name, since=t0, timeout=WAIT)
            joined: list[Node] = []

            def join(proxy: TcpProxy) -> float:
                t = time.monotonic()
                (node,) = cluster.start_nodes(1)
                joined.append(node)
                proxy.target = (HOST, port_of(node.url))
                return cluster.wait_ready(name, since=t, timeout=WAIT, nodes=[node])[node.node_id]

            clean = join(proxies[STALL_NODES])
            # Each proxy stalls the first connection that carries 256 KiB, and only that one.
            stall = Faults(
                rate=1.0, stall_share=1.0, after_min=256 << 10, after_max=256 << 10, limit=1
            )
            for proxy in proxies[: STALL_NODES + 1]:
                loop.run(proxy.drop_all())
                proxy.stats = ProxyStats()
                proxy.set_faults(stall)
            stalled = join(proxies[STALL_NODES + 1])
            assert_identical(cluster, cluster.nodes, name, tree)
            peaks = Peaks()
            peaks.see(cluster)
            fault_figures(
                "1 stalled peers",
                converge_s=stalled,
                clean_s=clean,
                received=received_total(cluster, joined[-1:]),
                nodes=1,
                stored_size=manifest.stored_size,
                peaks=peaks,
                stalls=sum(p.stats.stalled for p in proxies),
                deadline_s=DEADLINE,
            )
            assert stalled <= clean + STALL_SLACK, (stalled, clean)


# -- 2. a lying peer -------------------------------------------------------------------------

LIAR_MODES = ("wrong", "short", "long", "cut")
BOGUS_MODES = ("missing",)  # a bogus bitfield: claims every chunk, holds none


class Liar:
    """A fake node in the image's swarm: announces itself with every chunk, hands every
    follower a full bitfield, and answers chunk requests with, in turn, random bytes of
    the right length, half the bytes (declared so), more bytes than the chunk holds, and
    the right length declared but the connection cut half way. With `modes=BOGUS_MODES`
    it answers every request 404 instead: the bitfield it handed out was bogus.

    Its have-stream ends after `stream_seconds`, as a flaky link or a cunning liar would
    have it: a ban must outlive the stream it was earned on, or the liar is asked again
    at every reconnection. Runs on a `ProxyLoop`.
    """

    def __init__(
        self,
        seeder_url: str,
        token: str,
        manifest: Manifest,
        stream_seconds: float = 0.5,
        node_id: str = "liar",
        modes: Sequence[str] = LIAR_MODES,
    ) -> None:
        self.node_id = node_id
        self.modes = tuple(modes)
        self.seeder_url = seeder_url
        self.token = token
        self.manifest = manifest
        self.stream_seconds = stream_seconds
        self.sizes = {c.digest: c.stored_size for c in manifest.chunks}
        self.requests = 0
        self.by_mode = dict.fromkeys(self.modes, 0)
        self.follows: dict[str, int] = {}  # follower node id -> have-streams opened
        self.announces = 0
        self.address = ""
        self._runner: web.AppRunner | None = None
        self._announcer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/swarm/{image}/haves", self._haves)
        app.router.add_get("/v1/chunks/{digest}", self._chunk)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.address = f"{HOST}:{self._runner.addresses[0][1]}"
        self._announcer = asyncio.create_task(self._announce_loop())

    async def close(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        if self._runner is not None:
            await self._runner.cleanup()

    async def _announce_loop(self) -> None:
        n = len(self.manifest.chunks)
        async with SeederClient(self.seeder_url, token=self.token) as client:
            while True:
                with contextlib.suppress(Exception):
                    await client.announce(
                        self.manifest.digest, self.node_id, address=self.address, have=n, total=n
                    )
                    self.announces += 1
                await asyncio.sleep(0.3)

    async def _haves(self, request: web.Request) -> web.StreamResponse:
        node = request.query.get("node", "?")
        self.follows[node] = self.follows.get(node, 0) + 1
        n = len(self.manifest.chunks)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-msgpack-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(wire.pack(["bitfield", bitfield.to_bytes(bitfield.full(n), n)]))
            await asyncio.sleep(self.stream_seconds)
            await resp.write_eof()
        return resp

    async def _chunk(self, request: web.Request) -> web.StreamResponse:
        size = self.sizes.get(request.match_info["digest"])
        if size is None:
            return web.Response(status=404)
        mode = self.modes[self.requests % len(self.modes)]
        self.requests += 1
        self.by_mode[mode] += 1
        if mode == "missing":
            return web.Response(status=404)
        headers = {wire.H_ENCODING: Encoding.RAW.value, wire.H_SIZE: str(size)}
        if mode == "wrong":
            return web.Response(body=os.urandom(size), headers=headers)
        if mode == "short":
            return web.Response(body=os.urandom(size // 2), headers=headers)
        if mode == "long":
            return web.Response(body=os.urandom(size + (64 << 10)), headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = size
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(os.urandom(size // 2))
        if request.transport is not None:
            request.transport.abort()
        return resp


LIAR_NODES = 4
LIAR_RATE = 4 * MIB
# A node may ask the liar a few times before the ban: a cut connection is a network
# error, not proof of a lie, and only backs the peer off. The first wrong, short or long
# chunk bans it for a minute, far longer than this test: so at most one rejected chunk
# per node, and a handful of requests, whatever the liar does with its have-streams.
LIAR_MAX_REQUESTS_PER_NODE = 3
# A bogus bitfield: "I do not hold it" for a chunk the peer claimed is no lie a digest can
# prove, and the first one only backs the peer off (it may be a race); the second bans it
# like a liar, however often it re-sends its bitfield (Penalties.missing_strikes). So two
# requests per node (one at a time per peer). Without the ban each node asked it again
# after every backoff and every reconnection: 11 requests in a 7 s pull, and counting.
BOGUS_MAX_REQUESTS_PER_NODE = 2


def test_lying_peer_is_banned_and_does_not_slow_the_fleet() -> None:
    """The same fleet pulls one image with no liar (the clean run), one with a liar that
    serves bad bytes, then one with a peer whose bitfield is bogus (every chunk 404)."""
    with scratch("liar") as work, ProxyLoop() as loop:
        cluster = Cluster(work / "cluster", nodes=LIAR_NODES, rate=LIAR_RATE, daemon_args=FAST)
        with cluster:
            trees = {
                k: image_tree(work, k, 24 * MIB, seed=21 + i)
                for i, k in enumerate(("clean", "lied", "bogus"))
            }
            clean, _ = push(cluster, trees["clean"].root, "faults/honest:v1", MIB)
            lied, manifest = push(cluster, trees["lied"].root, "faults/lied:v1", MIB)
            bogus_image, bogus_manifest = push(cluster, trees["bogus"].root, "faults/bogus:v1", MIB)

            t0 = cluster.assign(clean.name)
            clean_times = cluster.wait_ready(clean.name, since=t0, timeout=WAIT)
            received0 = received_total(cluster)

            def pull_beside(liar: Liar, name: str) -> dict[str, float]:
                loop.run(liar.start())
                try:
                    wait_for(f"{liar.node_id} to announce", lambda: liar.announces > 0, 10)
                    t0 = cluster.assign(name)
                    times = cluster.wait_ready(name, since=t0, timeout=WAIT)
                    # A little longer in the swarm: it must not be asked again meanwhile.
                    time.sleep(2 * INTERVAL)
                finally:
                    loop.run(liar.close())
                return times

            liar = Liar(cluster.seeder_url, cluster.token, manifest)
            liar_times = pull_beside(liar, lied.name)
            bogus = Liar(
                cluster.seeder_url,
                cluster.token,
                bogus_manifest,
                node_id="bogus",
                modes=BOGUS_MODES,
            )
            bogus_times = pull_beside(bogus, bogus_image.name)

            peaks = Peaks()
            peaks.see(cluster)
            for image, tree in zip((clean, lied, bogus_image), trees.values(), strict=True):
                assert_identical(cluster, cluster.nodes, image.name, tree)
            scraped = cluster.scrape()
            rejected = {k: m.chunks_rejected for k, m in scraped.items()}
            clean_s = slowest(clean_times)
            fault_figures(
                "2 lying peer",
                converge_s=slowest(liar_times),
                clean_s=clean_s,
                received=sum(m.received for m in scraped.values()) - received0,
                nodes=LIAR_NODES,
                stored_size=manifest.stored_size + bogus_manifest.stored_size,
                peaks=peaks,
                requests_to_liar=liar.requests,
                rejected=int(sum(rejected.values())),
                bogus_s=round(slowest(bogus_times), 2),
                bogus_ratio=round(slowest(bogus_times) / clean_s, 2),
                requests_to_bogus=bogus.requests,
                follows=sum(liar.follows.values()) + sum(bogus.follows.values()),
            )
            assert liar.requests > 0, "no node ever asked the liar: the test shows nothing"
            # Detected: every node that asked it threw its bytes away and counted them.
            assert sum(rejected.values()) > 0, rejected
            # Banned: one lie per node, and a bounded number of requests per honest node,
            # not one more at every reconnection of the liar's have-stream.
            assert max(rejected.values()) <= 1, rejected
            assert liar.requests <= LIAR_MAX_REQUESTS_PER_NODE * LIAR_NODES, liar.by_mode
            assert bogus.requests > 0, "no node ever asked the bogus peer: it shows nothing"
            assert bogus.requests <= BOGUS_MAX_REQUESTS_PER_NODE * LIAR_NODES, bogus.follows
            # Not slowed by much more than its share (one peer in five).
            for times in (liar_times, bogus_times):
                assert slowest(times) <= 1.5 * clean_s + 2.0, (times, clean_times)


# -- 3. the seeder dies mid-repave and comes back --------------------------------------------

GONE_NODES = 4
# Connection attempts per daemon while the seeder is gone: an announce per interval, and
# the assignment watch and the chunk requests backing off exponentially, a few seconds in
# about one every two seconds between them -- each counts twice, as aiohttp retries a GET
# once on a fresh connection when the first is reset. A retry loop without backoff makes
# hundreds a second; a fixed half-second backoff, four or more.
MAX_ANNOUNCES_PER_INTERVAL = 1.5
MAX_OTHER_ATTEMPTS_PER_NODE_PER_SECOND = 2.5
MAX_CPU_SHARE_WHILE_WAITING = 0.15  # of one core, per daemon


def test_seeder_death_mid_repave_waits_with_backoff_and_finishes_after_return() -> None:
    name = "faults/orphan:v1"
    with scratch("gone") as work, ProxyLoop() as loop:
        # Daemons reach the seeder through a counting proxy; the seeder itself is slow, so
        # the fleet is still injecting when it dies.
        cluster = Cluster(
            work / "cluster", nodes=0, rate=16 * MIB, seeder_rate=4 * MIB, daemon_args=FAST
        )
        with cluster:
            front = loop.tcp_proxy(target=(HOST, port_of(cluster.seeder_url)))
            cluster.daemon_args = [*FAST, "--seeder", f"http://{front.address}"]
            cluster.start_nodes(GONE_NODES)
            clean_tree = image_tree(work, "clean", 24 * MIB, seed=32)
            tree = image_tree(work, "tree", 24 * MIB, seed=31)
            clean, _ = push(cluster, clean_tree.root, "faults/kept:v1", 2 * MIB)
            pushed, manifest = push(cluster, tree.root, name, 2 * MIB)
            wanted = {c.digest for c in manifest.chunks}
            peaks = Peaks()
            t0 = cluster.assign(name)

            wait_for(
                "a third of the chunks in the fleet",
                lambda: len(union_stored(cluster.nodes, wanted)) >= len(wanted) // 3,
                WAIT,
            )
            peaks.see(cluster)
            seeder_proc(cluster).kill()
            killed_at = time.monotonic()
            time.sleep(0.3)  # transfers cut by the kill are thrown away, not stored
            held = union_stored(cluster.nodes, wanted)
            assert len(held) < len(wanted), "the fleet got everything before the kill"

            # Nodes pass around what the swarm holds ...
            for node in cluster.nodes:
                wait_for(
                    f"{node.node_id} to get every chunk the swarm holds",
                    lambda: held <= stored(node).keys(),  # noqa: B023
                    WAIT,
                )
            # ... and then wait for the rest without hammering the seeder's address.
            time.sleep(1.0)
            window = 4.0
            cpu0 = cluster.cpu_seconds()
            w0 = time.monotonic()
            time.sleep(window)
            w1 = time.monotonic()
            cpu1 = cluster.cpu_seconds()
            attempts = front.stats.accepted_between(w0, w1)
            per_node_s = (w1 - w0) * GONE_NODES
            rate = attempts / per_node_s
            announces = front.stats.refused_between(w0, w1, "POST /v1/announce") / per_node_s
            others = rate - announces  # chunk requests and the assignment watch
            cpu = {k: round((cpu1[k] - cpu0[k]) / (w1 - w0), 3) for k in cpu1 if k in cpu0}
            states = {n.node_id: (row(cluster, n, name) or {}).get("state") for n in cluster.nodes}
            assert all(s != "ready" for s in states.values()), states

            restarted = restart_seeder(cluster)
            times = cluster.wait_ready(name, since=t0, timeout=WAIT, digest=pushed.digest)
            after = time.monotonic() - restarted
            received = received_total(cluster)
            # The clean run: the same fleet, the seeder up throughout. After the fault, not
            # before, so that while the seeder is gone each node announces one image only.
            t1 = cluster.assign(clean.name)
            clean_s = slowest(cluster.wait_ready(clean.name, since=t1, timeout=WAIT))
            peaks.see(cluster)
            assert_identical(cluster, cluster.nodes, clean.name, clean_tree)
            assert_identical(cluster, cluster.nodes, name, tree)
            gone = restarted - killed_at
            fault_figures(
                "3 seeder gone",
                converge_s=slowest(times),
                clean_s=clean_s,
                received=received,
                nodes=GONE_NODES,
                stored_size=manifest.stored_size,
                peaks=peaks,
                gone_s=round(gone, 1),
                converge_less_gone_s=round(slowest(times) - gone, 2),
                ready_after_return_s=round(after, 2),
                chunks=len(wanted),
                held_at_kill=len(held),
                attempts_per_node_per_s=round(rate, 2),
                announces_per_node_per_s=round(announces, 2),
                other_attempts_per_node_per_s=round(others, 2),
                max_cpu_share=max(v for k, v in cpu.items() if k != "seeder"),
            )
            assert announces <= MAX_ANNOUNCES_PER_INTERVAL / INTERVAL, front.stats.refused_log
            assert others <= MAX_OTHER_ATTEMPTS_PER_NODE_PER_SECOND, front.stats.refused_log
            for node_id, share in cpu.items():
                if node_id != "seeder":
                    assert share <= MAX_CPU_SHARE_WHILE_WAITING, cpu


# -- 6. the tracker is unreachable -----------------------------------------------------------

TRACKER_NODES = 4


def is_announce(request: web.Request) -> bool:
    return request.method == "POST" and request.path == "/v1/announce"


def test_nodes_that_met_keep_swapping_chunks_while_the_tracker_is_down() -> None:
    """Daemons reach the seeder through an HTTP proxy; once every node follows every other,
    the proxy answers 503 to every announce (the other routes still work). The seeder is
    slow: a node that lost its neighbours could only get the image from it, a copy per node.
    Then, the tracker back, the same fleet pulls an image of the same size: the clean run.
    (After, not before: a node counts the neighbours it follows for any image, so a fleet
    that pulled one already would seem to have met before the outage.)"""
    name = "faults/trackerless:v1"
    with scratch("tracker") as work, ProxyLoop() as loop:
        cluster = Cluster(
            work / "cluster", nodes=0, rate=8 * MIB, seeder_rate=4 * MIB, daemon_args=FAST
        )
        with cluster:
            front: HttpProxy = loop.http_proxy(cluster.seeder_url, fail=is_announce)
            cluster.daemon_args = [*FAST, "--seeder", front.url]
            cluster.start_nodes(TRACKER_NODES)
            tree = image_tree(work, "tree", 24 * MIB, seed=61)
            clean_tree = image_tree(work, "clean", 24 * MIB, seed=62)
            pushed, manifest = push(cluster, tree.root, name, MIB)
            clean, _ = push(cluster, clean_tree.root, "faults/tracked:v1", MIB)
            t0 = cluster.assign(name)

            def met() -> bool:
                return all(
                    cluster.metrics(n).peers_connected >= TRACKER_NODES - 1 for n in cluster.nodes
                )

            wait_for("every node to follow every other", met, WAIT)
            front.failing = True
            down_at = time.monotonic() - t0
            before = cluster.scrape()
            refused_before = front.stats.failed
            times = cluster.wait_ready(name, since=t0, timeout=WAIT, digest=pushed.digest)
            after = cluster.scrape()
            refused = front.stats.failed - refused_before
            seeder_sent = seeder_value(cluster, "seeder_bytes_sent_total")
            front.failing = False
            t1 = cluster.assign(clean.name)
            clean_s = slowest(cluster.wait_ready(clean.name, since=t1, timeout=WAIT))
            peaks = Peaks()
            peaks.see(cluster)
            assert_identical(cluster, cluster.nodes, name, tree)
            assert_identical(cluster, cluster.nodes, clean.name, clean_tree)

            got = {k: after[k].received - before[k].received for k in after}
            peers = {k: after[k].from_peers - before[k].from_peers for k in after}
            share = sum(peers.values()) / max(1.0, sum(got.values()))
            fault_figures(
                "6 tracker down",
                converge_s=slowest(times),
                clean_s=clean_s,
                received=sum(m.received for m in after.values()),
                nodes=TRACKER_NODES,
                stored_size=manifest.stored_size,
                peaks=peaks,
                tracker_down_after_s=round(down_at, 2),
                announces_refused=refused,
                mib_after_outage=round(sum(got.values()) / MIB, 1),
                from_peers_share=round(share, 2),
                seeder_sent_mib=round(seeder_sent / MIB, 1),
            )
            assert refused >= TRACKER_NODES, "the tracker was not asked while it was down"
            # Most of the image was still to come when the tracker went, and most of that came
            # from the neighbours met before; every node got some of it from them.
            assert sum(got.values()) >= 0.5 * TRACKER_NODES * manifest.stored_size, got
            assert share >= 0.6, (peers, got)
            assert all(v > 0 for v in peers.values()), peers


# -- 7. an overloaded seeder -----------------------------------------------------------------

CROWD = 12
CROWD_CHUNK = 4 * MIB
# Refusals (busy + deferred answers) the seeder sends, per asking node and second: a few
# over the pull, a handful in its worst second (the start, when every node asks at once).
# Without backoff a node comes back at the speed of the round trip: hundreds a second.
MAX_BUSY_PER_NODE_S = 2.0
MAX_BUSY_PEAK_PER_NODE_S = 8.0
MAX_REFUSALS_PER_NODE_S = 4.0
MAX_REFUSALS_PEAK_PER_NODE_S = 15.0
# The seeder's peak RSS (VmHWM) over the pull may exceed its RSS before it by a few chunks
# (the one being uploaded, buffers), never by a chunk per asker (12 x 4 MiB).
MAX_SEEDER_GROWTH = 8 * CROWD_CHUNK


@dataclass
class SeederSampler:
    """Samples the seeder's refusals (busy, deferred answers) on a thread: `samples` holds
    (time.monotonic(), busy so far, deferred so far)."""

    url: str
    pid: int
    period: float = 0.25
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _one(self, http: Http) -> None:
        status, body = http.get("/metrics")
        assert status == 200, status
        s = parse_prometheus(body.decode())
        busy = sample(s, "seeder_busy_answers_total")
        deferred = sample(s, "seeder_deferred_answers_total")
        self.samples.append((time.monotonic(), busy, deferred))

    def _run(self) -> None:
        http = Http(self.url)
        try:
            while not self._stop.wait(self.period):
                with contextlib.suppress(OSError, http_client.HTTPException):
                    self._one(http)
        finally:
            http.close()

    def __enter__(self) -> SeederSampler:
        http = Http(self.url)
        self._one(http)
        http.close()
        self._thread = threading.Thread(target=self._run, name="seeder-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        http = Http(self.url)
        self._one(http)
        http.close()

    def total(self, column: int) -> float:
        return self.samples[-1][column] - self.samples[0][column]

    @property
    def span(self) -> float:
        return self.samples[-1][0] - self.samples[0][0]

    def peak_rate(self, columns: Sequence[int], window: float = 1.0) -> float:
        """The highest increase of the sum of counter `columns` over `window` s, per second."""
        best = 0.0
        for i, t0 in enumerate(self.samples):
            for t1 in self.samples[i + 1 :]:
                if t1[0] - t0[0] >= window:
                    grew = sum(t1[c] - t0[c] for c in columns)
                    best = max(best, grew / (t1[0] - t0[0]))
                    break
        return best


def test_overloaded_seeder_sees_bounded_refusals_and_memory() -> None:
    """Twelve daemons ask a seeder with one upload slot for an image of three big chunks at
    once. Busy answers are met with jittered, doubling backoff and deferred chunks are left
    alone for a while: the seeder's refusals per second stay a few per node, and its memory
    does not grow with the crowd (one chunk per upload slot, not one per asker): its peak
    RSS is read from VmHWM, reset after the push, so no moment between samples is missed.
    There is no clean run of this fault (the crowd is the fault): the time to compare with
    is T_min, the floor any distribution of this image to this fleet needs."""
    name = "faults/crowd:v1"
    with scratch("crowd") as work:
        cluster = Cluster(
            work / "cluster",
            nodes=CROWD,
            rate=3 * MIB,
            seeder_rate=8 * MIB,
            daemon_args=FAST,
            seeder_args=("--upload-slots", "1"),
        )
        with cluster:
            tree = image_tree(work, "tree", 3 * CROWD_CHUNK, seed=71)
            pushed, manifest = push(cluster, tree.root, name, CROWD_CHUNK)
            pid = seeder_proc(cluster).pid
            # The push raised the seeder's peak: start it afresh (else the peak is the push's,
            # which only makes the bound harder to meet).
            hwm_reset = reset_hwm(pid)
            rss0, _ = rss_bytes(pid)
            with SeederSampler(cluster.seeder_url, pid) as sampler:
                t0 = cluster.assign(name)
                times = cluster.wait_ready(name, since=t0, timeout=WAIT, digest=pushed.digest)
            peaks = Peaks()
            peaks.see(cluster)
            growth = hwm_bytes(pid) - rss0
            assert_identical(cluster, cluster.nodes, name, tree)
            busy, deferred = sampler.total(1), sampler.total(2)
            per_node_s = sampler.span * CROWD
            busy_peak = sampler.peak_rate([1]) / CROWD
            refusals_peak = sampler.peak_rate([1, 2]) / CROWD
            floor = t_min(manifest.stored_size, CROWD, 3 * MIB, 3 * MIB, 8 * MIB)
            fault_figures(
                "7 overloaded seeder",
                converge_s=slowest(times),
                clean_s=None,
                received=received_total(cluster),
                nodes=CROWD,
                stored_size=manifest.stored_size,
                peaks=peaks,
                t_min_s=round(floor, 2),
                ratio_to_t_min=round(slowest(times) / floor, 2),
                seeder_rss0_mib=round(rss0 / MIB, 1),
                seeder_hwm_growth_mib=round(growth / MIB, 1),
                hwm_reset=hwm_reset,
                busy_answers=int(busy),
                deferred_answers=int(deferred),
                busy_per_node_s=round(busy / per_node_s, 2),
                busy_peak_per_node_s=round(busy_peak, 2),
                refusals_per_node_s=round((busy + deferred) / per_node_s, 2),
                refusals_peak_per_node_s=round(refusals_peak, 2),
                seeder_sent_mib=round(seeder_value(cluster, "seeder_bytes_sent_total") / MIB, 1),
            )
            assert busy > 0, "the seeder was never busy: the test shows nothing"
            assert busy / per_node_s <= MAX_BUSY_PER_NODE_S, sampler.samples
            assert busy_peak <= MAX_BUSY_PEAK_PER_NODE_S, sampler.samples
            assert (busy + deferred) / per_node_s <= MAX_REFUSALS_PER_NODE_S, sampler.samples
            assert refusals_peak <= MAX_REFUSALS_PEAK_PER_NODE_S, sampler.samples
            assert growth <= MAX_SEEDER_GROWTH, (rss0, growth)


# -- 8. the seeder restarts ------------------------------------------------------------------

RESTART_NODES = 4
# A longer announce interval than the other tests', so that "within one interval" is told
# apart from "within two" with room for noise. Each daemon announces every interval,
# failed attempt or not (a refused connection fails at once on loopback), so every one
# announces within an interval of the seeder listening, and the test starts its clock
# later, when /healthz answers. On top of the interval the bound allows only the work
# of the last announce and of the test's /metrics poll (20 ms apart) on a loaded machine.
RESTART_INTERVAL = 2.0
RESTART_ARGS = ("--announce-interval", f"{RESTART_INTERVAL:g}", "--gc-grace", "1")
TRACKER_SLACK = 0.3


def registry_view(cluster: Cluster, digest: str) -> tuple[object, object, bytes]:
    """(names, assignments, manifest bytes) as the seeder answers them now."""

    async def go() -> tuple[object, object, bytes]:
        async with SeederClient(cluster.seeder_url, token=cluster.token) as client:
            names = await client.list_names()
            assignments = await client.assignments()
            manifest = await client.get_manifest(digest)
            return names, assignments, manifest

    return asyncio.run(go())


def test_seeder_restart_keeps_the_registry_and_rebuilds_the_tracker() -> None:
    name = "faults/durable:v1"
    with scratch("restart") as work:
        cluster = Cluster(
            work / "cluster", nodes=RESTART_NODES, rate=16 * MIB, daemon_args=RESTART_ARGS
        )
        with cluster:
            tree = image_tree(work, "tree", 8 * MIB, seed=81)
            pushed, manifest = push(cluster, tree.root, name, MIB)
            t0 = cluster.assign(name)
            pull_s = slowest(cluster.wait_ready(name, since=t0, timeout=WAIT, digest=pushed.digest))
            wait_for(
                "every node in the tracker",
                lambda: seeder_value(cluster, "seeder_tracker_members") == RESTART_NODES,
                10,
            )
            before = registry_view(cluster, pushed.digest)

            peaks = Peaks()
            peaks.see(cluster)
            seeder_proc(cluster).kill()  # SIGKILL: what SQLite committed is all there is
            time.sleep(RESTART_INTERVAL + 0.5)  # every node notices: its announces fail
            up = restart_seeder(cluster)
            members: list[tuple[float, float]] = []
            while time.monotonic() - up < RESTART_INTERVAL + TRACKER_SLACK + 5:
                count = seeder_value(cluster, "seeder_tracker_members")
                members.append((time.monotonic() - up, count))
                if count >= RESTART_NODES:
                    break
                time.sleep(0.02)
            rebuilt = members[-1][0]
            after = registry_view(cluster, pushed.digest)

            # Assignments still hold: nobody drops the image (--gc-grace is 1 s), and a node
            # that joins now is given it.
            time.sleep(RESTART_INTERVAL)
            for node in cluster.nodes:
                r = row(cluster, node, name)
                assert r is not None and r["state"] == "ready", (node.node_id, r)
                assert (node.data_dir / "images" / pushed.digest).is_dir(), node.node_id
            (late,) = cluster.start_nodes(1)
            t1 = time.monotonic()
            joined = cluster.wait_ready(name, since=t1, timeout=WAIT, nodes=[late])
            peaks.see(cluster)
            assert_identical(cluster, cluster.nodes, name, tree)
            fault_figures(
                "8 seeder restart",
                converge_s=rebuilt,
                clean_s=None,
                received=received_total(cluster),
                nodes=RESTART_NODES + 1,
                stored_size=manifest.stored_size,
                peaks=peaks,
                announce_interval_s=RESTART_INTERVAL,
                members_seen=int(members[-1][1]),
                first_pull_s=round(pull_s, 2),
                late_node_ready_s=round(joined[late.node_id], 2),
            )
            assert after == before, "names, assignments or the manifest changed"
            assert members[-1][1] >= RESTART_NODES, members
            assert rebuilt <= RESTART_INTERVAL + TRACKER_SLACK, members
