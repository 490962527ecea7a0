"""The swarm end to end: a real seeder and real `distd run` daemons on loopback.

Issue 4's "Done when" list, one test (or two) per line. Processes come from the
bench's `Cluster` (the same code the fan-out bench and the demo run), data dirs live
on /dev/shm when there is one (the shared VM disk is slow), every rate is capped so
that a transfer lasts long enough to observe, and no test asserts a duration: the
bench measures speed, these tests check outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from treeutil import GENEROUS, rmtree_force, scratch, snapshot, wait_for

from bench.cluster import (
    MIB,
    Cluster,
    ImageTree,
    Node,
    NodeSpec,
    PushResult,
    child_env,
    make_random_tree,
)
from distd.swarm import bitfield
from manifests import wire
from manifests.client import SeederClient
from manifests.model import Encoding, Manifest
from manifests.validate import decode_manifest

pytestmark = pytest.mark.timeout(180)

FAST = ("--announce-interval", "1")


# -- helpers --------------------------------------------------------------------------------


def get_manifest(cluster: Cluster, digest: str) -> Manifest:
    async def go() -> bytes:
        async with SeederClient(cluster.seeder_url, token=cluster.token) as client:
            return await client.get_manifest(digest)

    return decode_manifest(asyncio.run(go()))


def unassign(cluster: Cluster, name: str, selector: str) -> None:
    async def go() -> None:
        async with SeederClient(cluster.seeder_url, token=cluster.token) as client:
            await client.unassign(name, selector=selector)

    asyncio.run(go())


def stored(node: Node) -> dict[str, int]:
    """{chunk digest: stored size} of the whole chunks in the node's store right now."""
    out: dict[str, int] = {}
    root = node.data_dir / "chunks"
    if not root.is_dir():
        return out
    for sub in root.iterdir():
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for f in sub.iterdir():
                if ".tmp-" in f.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out[f.name.partition(".")[0]] = f.stat().st_size
    return out


def row(cluster: Cluster, node: Node, name: str) -> dict[str, object] | None:
    return cluster.image_row(cluster.status(node), name)


def assert_identical(cluster: Cluster, nodes: list[Node], name: str, tree: ImageTree) -> None:
    want = snapshot(tree.root)
    for node in nodes:
        r = row(cluster, node, name)
        assert r is not None and r["state"] == "ready", (node.node_id, r)
        assert snapshot(str(r["path"])) == want, f"{node.node_id}: tree differs"


def push(cluster: Cluster, tree: Path, name: str, chunk_size: int) -> tuple[PushResult, Manifest]:
    pushed = cluster.push(tree, name, chunk_size=chunk_size)
    return pushed, get_manifest(cluster, pushed.digest)


# -- a, e, g: one fleet of six capped daemons, and one that the selector leaves out ----------

FLEET = "swarm/fleet:v1"
RATE = 8 * MIB


@dataclass
class Fleet:
    cluster: Cluster
    workers: list[Node]
    outsider: Node
    tree: ImageTree
    manifest: Manifest
    seeder_sent: float


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with (
        scratch("fleet") as work,
        Cluster(
            work / "cluster", nodes=6, rate=RATE, labels={"role": "worker"}, daemon_args=FAST
        ) as cluster,
    ):
        cluster.labels = {"role": "batch"}  # the next node started does not match the selector
        (outsider,) = cluster.start_nodes(1)
        workers = cluster.nodes[:6]
        tree = make_random_tree(work / "tree", 48 * MIB, files=4, seed=4)
        pushed, manifest = push(cluster, tree.root, FLEET, 4 * MIB)
        t0 = cluster.assign(FLEET, selector="role=worker")
        cluster.wait_ready(FLEET, since=t0, timeout=GENEROUS, nodes=workers, digest=pushed.digest)
        sent, _ = cluster.seeder_sent_bytes()
        yield Fleet(cluster, workers, outsider, tree, manifest, sent)


def test_six_capped_nodes_get_identical_trees_mostly_from_peers(fleet: Fleet) -> None:
    c = fleet.cluster
    assert_identical(c, fleet.workers, FLEET, fleet.tree)
    metrics = c.scrape(fleet.workers)
    from_peers = sum(m.from_peers for m in metrics.values())
    received = sum(m.received for m in metrics.values())
    size = fleet.manifest.stored_size
    # Every node received at least the image (nothing skipped) ...
    for node_id, m in metrics.items():
        assert m.received >= size, (node_id, m)
        assert m.chunks_rejected == 0, (node_id, m)
    # ... mostly from its neighbours, and the seeder sent few copies of it.
    detail = {k: (m.from_peers, m.from_seeder) for k, m in metrics.items()}
    assert from_peers >= 0.7 * received, detail
    assert fleet.seeder_sent <= 2 * size, (fleet.seeder_sent / size, detail)


def test_node_outside_the_selector_gets_nothing(fleet: Fleet) -> None:
    c = fleet.cluster

    async def registered() -> dict[str, str]:
        async with SeederClient(c.seeder_url, token=c.token) as client:
            return {n["id"]: n["labels"] for n in await client.nodes()}

    # It did register, with its labels: it got nothing because they do not match.
    assert asyncio.run(registered())[fleet.outsider.node_id] == "role=batch"
    assert c.status(fleet.outsider)["images"] == []
    assert stored(fleet.outsider) == {}
    assert list((fleet.outsider.data_dir / "images").iterdir()) == []
    assert c.metrics(fleet.outsider).received == 0


def test_distd_pull_takes_most_bytes_from_the_fleet(fleet: Fleet) -> None:
    with scratch("pull") as work:
        dest = work / "image"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "distd.cli",
                "pull",
                FLEET,
                "--seeder",
                fleet.cluster.seeder_url,
                "--dest",
                str(dest),
                "--data-dir",
                str(work / "data"),
                "--max-download-rate",
                str(2 * RATE),
                *FAST,
            ],
            capture_output=True,
            text=True,
            timeout=GENEROUS,
            env=child_env(),
        )
        assert r.returncode == 0, r.stderr
        assert snapshot(dest) == snapshot(fleet.tree.root)
    n = len(fleet.manifest.chunks)
    assert f" {n} chunks fetched " in r.stdout, r.stdout
    m = re.search(r" from peers \((\d+)%\)", r.stdout)
    assert m is not None and int(m.group(1)) > 50, r.stdout


# -- b: a node killed half way keeps what it stored ----------------------------------------


def test_node_killed_half_way_resumes_without_refetching() -> None:
    name = "swarm/crash:v1"
    with (
        scratch("crash") as work,
        Cluster(work / "cluster", nodes=2, rate=4 * MIB, daemon_args=FAST) as cluster,
    ):
        tree = make_random_tree(work / "tree", 16 * MIB, files=3, seed=2)
        pushed, manifest = push(cluster, tree.root, name, MIB)
        victim, other = cluster.nodes
        t0 = cluster.assign(name)

        def half_way() -> bool:
            r = row(cluster, victim, name)
            return r is not None and int(str(r["bytes_done"])) >= int(str(r["bytes_total"])) // 2

        wait_for("the victim to be half way", half_way)
        cluster.stop_node(victim, signal.SIGKILL)
        table = manifest.chunk_map()
        held = {d: n for d, n in stored(victim).items() if d in table}
        held_bytes = sum(held.values())
        assert 0 < held_bytes < manifest.stored_size, "killed too late to show anything"

        cluster.restart_node(victim)
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        assert_identical(cluster, [victim, other], name, tree)
        after = cluster.metrics(victim)
        one_chunk = max(c.stored_size for c in manifest.chunks)
        assert after.received <= manifest.stored_size - held_bytes + one_chunk, (
            after.received,
            manifest.stored_size,
            held_bytes,
        )
        # Nothing it held was thrown away.
        assert set(held) <= set(stored(victim))

        # A node restarted with its image ready keeps it ready and fetches nothing:
        # every answer lists it ready, through the first assignment after the restart.
        cluster.stop_node(other)
        cluster.restart_node(other)
        answers = 0
        deadline = time.monotonic() + 2.5  # > 2 announce intervals: the assignment is in

        def settled() -> bool:
            nonlocal answers
            rows = cluster.status(other)["images"]
            answers += 1
            assert [(r["digest"], r["state"]) for r in rows] == [(pushed.digest, "ready")], rows
            return time.monotonic() > deadline and rows[0]["name"] == name

        wait_for("the restarted node to list its image by name", settled)
        assert answers > 1
        assert cluster.metrics(other).received == 0
        assert_identical(cluster, [other], name, tree)


def test_chunk_rotted_in_the_store_is_fetched_again() -> None:
    """A stored chunk whose file no longer matches its digest (bit rot, a stray write)
    is caught when the image is rebuilt from the store: that chunk alone is deleted
    and fetched again, and the tree comes out byte-identical."""
    name = "swarm/rot:v1"
    with (
        scratch("rot") as work,
        Cluster(work / "cluster", nodes=1, rate=8 * MIB, daemon_args=FAST) as cluster,
    ):
        tree = make_random_tree(work / "tree", 8 * MIB, files=2, seed=5)
        pushed, manifest = push(cluster, tree.root, name, MIB)
        (node,) = cluster.nodes
        t0 = cluster.assign(name)
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        r = row(cluster, node, name)
        assert r is not None
        cluster.stop_node(node)

        victim = manifest.chunks[len(manifest.chunks) // 2]
        (path,) = (node.data_dir / "chunks" / victim.digest[:2]).glob(victim.digest + ".*")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)
        rmtree_force(str(r["path"]))  # so the restart rebuilds the image from the store

        cluster.restart_node(node)
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        assert_identical(cluster, [node], name, tree)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == victim.digest
        assert cluster.metrics(node).received == victim.stored_size  # that chunk alone


# -- c: the seeder dies once the fleet holds every chunk -----------------------------------


def test_fleet_finishes_after_the_seeder_dies() -> None:
    """The seeder is killed as soon as the fleet holds every chunk between them, while
    one node (its download capped at a quarter of the others') is far from done."""
    name = "swarm/orphan:v1"
    slow = NodeSpec(download_rate=2 * MIB)  # 24 MiB take it >= 12 s; the fleet covers in ~3
    with (
        scratch("orphan") as work,
        Cluster(
            work / "cluster",
            nodes=4,
            rate=8 * MIB,
            specs=[NodeSpec()] * 3 + [slow],
            daemon_args=FAST,
        ) as cluster,
    ):
        tree = make_random_tree(work / "tree", 24 * MIB, files=3, seed=3)
        pushed, manifest = push(cluster, tree.root, name, 2 * MIB)
        wanted = {c.digest for c in manifest.chunks}
        t0 = cluster.assign(name)

        def covered() -> bool:
            union: set[str] = set()
            for node in cluster.nodes:
                union |= stored(node).keys()
            return wanted <= union

        wait_for("the fleet to hold every chunk between them", covered)
        assert cluster.seeder is not None
        cluster.seeder.kill()
        lacking = [n.node_id for n in cluster.nodes if not wanted <= stored(n).keys()]
        assert lacking, "killed too late: every node already held every chunk"
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        assert_identical(cluster, cluster.nodes, name, tree)


# -- d: a name that moves, then goes away ----------------------------------------------------

GRACE = 4.0  # --gc-grace of the moving-name test: shorter than its new version's pull


def test_new_version_fetches_changed_chunks_and_unassign_removes_everything() -> None:
    """A name moved to a new version keeps its ready old copy, listed and intact, until
    the new one is ready (the switch), even though the pull outlasts --gc-grace and a
    node restarts during it; the old copy goes a grace after the switch. Unassigned,
    the image stays on disk during the grace and is then removed with every chunk."""
    name = "swarm/moving:v1"
    with (
        scratch("moving") as work,
        Cluster(
            work / "cluster",
            nodes=2,
            rate=MIB,  # v2's 7 new MiB take >= 7 s to leave the seeder: > GRACE
            daemon_args=[*FAST, "--gc-grace", str(GRACE)],
        ) as cluster,
    ):
        tree = make_random_tree(work / "tree", 4 * MIB, files=3, seed=5)
        v1_tree = snapshot(tree.root)
        v1, m1 = push(cluster, tree.root, name, MIB)
        t0 = cluster.assign(name, selector="bench=1")
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=v1.digest)
        before = {n.node_id: cluster.metrics(n).received for n in cluster.nodes}

        # Rewrite the first MiB of the big file and add a layer: 7 chunks change.
        big = tree.root / "disk.img"
        with big.open("r+b") as f:
            f.write(os.urandom(MIB))
        (tree.root / "layers" / "new.bin").write_bytes(os.urandom(6 * MIB))
        tree = ImageTree.scan(tree.root)
        v2, m2 = push(cluster, tree.root, name, MIB)  # moves the name: the nodes follow
        assert v2.digest != v1.digest
        old = {c.digest for c in m1.chunks}
        changed = [c for c in m2.chunks if c.digest not in old]
        assert len(changed) == 7, "the test means to change 7 chunks"
        changed_bytes = sum(c.stored_size for c in changed)
        one_chunk = max(c.stored_size for c in m2.chunks)

        # A node restarted mid-switch still knows v1 stands in for the name (v2 is not
        # ready): it keeps listing and keeping it, like the node that was not restarted.
        restarted = cluster.nodes[0]

        def knows_v2() -> bool:
            rows = cluster.status(restarted)["images"]
            return any(r["digest"] == v2.digest and r["state"] == "pulling" for r in rows)

        wait_for("the node to start pulling v2", knows_v2)
        cluster.stop_node(restarted)
        cluster.restart_node(restarted)

        # Every answer until the switch names v1, ready, its tree whole at its path.
        v1_path = {str(n.data_dir / "images" / v1.digest) for n in cluster.nodes}
        overlap = dict.fromkeys((n.node_id for n in cluster.nodes), 0)
        last_v1: dict[str, float] = {}  # when the last answer naming v1 was asked for
        pending = list(cluster.nodes)
        deadline = time.monotonic() + GENEROUS
        while pending:
            assert time.monotonic() < deadline, "v2 never got ready"
            for node in list(pending):
                asked = time.monotonic()
                rows = [r for r in cluster.status(node)["images"] if r["name"] == name]
                first = rows[0]
                if first["digest"] == v2.digest and first["state"] == "ready":
                    # The switch came after `asked` of the last v1 answer: inside the grace.
                    v1_there = os.path.isdir(first["path"].replace(v2.digest, v1.digest))
                    if time.monotonic() - last_v1[node.node_id] < GRACE:
                        assert v1_there, f"{node.node_id}: v1 removed before its grace"
                    assert len(rows) == 1, rows  # v1 is no longer listed
                    pending.remove(node)
                    continue
                assert first["digest"] == v1.digest and first["state"] == "ready", rows
                assert first["path"] in v1_path, first
                assert snapshot(first["path"]) == v1_tree, f"{node.node_id}: v1 tree changed"
                last_v1[node.node_id] = asked
                if any(r["digest"] == v2.digest for r in rows[1:]):
                    overlap[node.node_id] += 1  # v2 known and not ready; v1 still stands
            time.sleep(0.1)
        # Each node was seen pulling v2 while v1 stood in (v2 takes seconds): not vacuous.
        assert all(n >= 3 for n in overlap.values()), overlap

        assert_identical(cluster, cluster.nodes, name, tree)
        # The restarted node's counters began again (test_node_killed_half_way... covers
        # what a restart fetches); the other one fetched the changed chunks alone.
        for node in cluster.nodes[1:]:
            delta = cluster.metrics(node).received - before[node.node_id]
            assert changed_bytes <= delta <= changed_bytes + one_chunk, (node.node_id, delta)

        # The old version goes after its grace; chunks only it used go with it.
        new = {c.digest for c in m2.chunks}

        def dropped_v1(node: Node) -> bool:
            return (
                not (node.data_dir / "images" / v1.digest).exists() and stored(node).keys() == new
            )

        for node in cluster.nodes:
            wait_for(f"{node.node_id} to drop v1", lambda: dropped_v1(node))  # noqa: B023

        t_unassign = time.monotonic()
        unassign(cluster, name, "bench=1")
        for node in cluster.nodes:
            wait_for(
                f"{node.node_id} to stop listing the image",
                lambda: cluster.status(node)["images"] == [],  # noqa: B023
            )
        # The daemons learnt of it after t_unassign: within GRACE of it, the tree is there.
        present = [(n.data_dir / "images" / v2.digest).is_dir() for n in cluster.nodes]
        seen = time.monotonic() - t_unassign
        assert seen < GRACE, f"took {seen:.1f} s to see the unassign: cannot check the grace"
        assert all(present), "removed before the grace elapsed"

        def removed(node: Node) -> bool:
            images = node.data_dir / "images"
            status = cluster.status(node)
            return status["images"] == [] and not any(images.iterdir()) and stored(node) == {}

        for node in cluster.nodes:
            wait_for(f"{node.node_id} to remove the image", lambda: removed(node))  # noqa: B023


# -- --no-p2p: the central-distributor baseline ---------------------------------------------


# An assignment reaches a node within seconds: the seeder wakes the long poll (which would
# otherwise end only after its 20 s wait). Generous for a loaded machine; ms in practice.
NOTICE_WITHIN = 5.0


def test_no_p2p_fleet_takes_every_byte_from_the_seeder() -> None:
    """`--no-p2p` (the bench's baseline) pulls from the seeder alone and serves nobody; and
    an assignment reaches the nodes within seconds."""
    name = "swarm/central:v1"
    with (
        scratch("central") as work,
        Cluster(work / "cluster", nodes=2, rate=8 * MIB, p2p=False, daemon_args=FAST) as cluster,
    ):
        tree = make_random_tree(work / "tree", 8 * MIB, files=2, seed=8)
        pushed, manifest = push(cluster, tree.root, name, MIB)
        time.sleep(0.5)  # both daemons are now parked in their assignment long poll
        t0 = cluster.assign(name)
        wait_for(
            "every node to see its new assignment",
            lambda: all(row(cluster, n, name) for n in cluster.nodes),
            timeout=NOTICE_WITHIN,
        )
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        assert_identical(cluster, cluster.nodes, name, tree)
        for node_id, m in cluster.scrape().items():
            assert m.from_peers == 0 and m.sent == 0, (node_id, m)
            assert m.from_seeder >= manifest.stored_size, (node_id, m)
        sent, where = cluster.seeder_sent_bytes()
        assert sent >= 2 * manifest.stored_size, (sent, where)


# -- f: a peer that lies -------------------------------------------------------------------


class LyingPeer:
    """Claims every chunk of an image to the tracker and its followers; serves garbage.

    An aiohttp server on its own thread and event loop, so the test stays synchronous.
    """

    def __init__(self, seeder_url: str, token: str, manifest: Manifest) -> None:
        self.seeder_url = seeder_url
        self.token = token
        self.manifest = manifest
        self.sizes = {c.digest: c.stored_size for c in manifest.chunks}
        self.served = 0
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lying-peer", daemon=True)

    def __enter__(self) -> LyingPeer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the lying peer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _haves(self, request: web.Request) -> web.StreamResponse:
        n = len(self.manifest.chunks)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-msgpack-stream"})
        await resp.prepare(request)
        await resp.write(wire.pack(["bitfield", bitfield.to_bytes(bitfield.full(n), n)]))
        assert self._stop is not None
        with contextlib.suppress(ConnectionError):
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                await resp.write(wire.pack(["ping"]))
        return resp

    async def _chunk(self, request: web.Request) -> web.Response:
        size = self.sizes.get(request.match_info["digest"])
        if size is None:
            return web.Response(status=404)
        self.served += 1
        headers = {wire.H_ENCODING: Encoding.RAW.value, wire.H_SIZE: str(size)}
        return web.Response(body=os.urandom(size), headers=headers)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/swarm/{image}/haves", self._haves)
        app.router.add_get("/v1/chunks/{digest}", self._chunk)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        self.address = f"{host}:{port}"
        n = len(self.manifest.chunks)
        try:
            async with SeederClient(self.seeder_url, token=self.token) as client:
                announced = False
                while not self._stop.is_set():
                    await client.announce(
                        self.manifest.digest, "liar", address=self.address, have=n, total=n
                    )
                    if not announced:
                        announced = True
                        self._ready.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.5)
        finally:
            self._ready.set()
            await runner.cleanup()


def test_lying_peer_cannot_corrupt_the_fleet() -> None:
    name = "swarm/liar:v1"
    with (
        scratch("liar") as work,
        Cluster(work / "cluster", nodes=3, rate=8 * MIB, daemon_args=FAST) as cluster,
    ):
        tree = make_random_tree(work / "tree", 16 * MIB, files=3, seed=6)
        pushed, manifest = push(cluster, tree.root, name, MIB)
        with LyingPeer(cluster.seeder_url, cluster.token, manifest) as liar:
            t0 = cluster.assign(name)
            cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
            assert liar.served > 0
        assert_identical(cluster, cluster.nodes, name, tree)
        for node_id, m in cluster.scrape().items():
            assert m.chunks_rejected > 0, (node_id, m)
