"""Issue 6, faults 4 and 5, on real processes: daemons killed at random moments, and a
data dir that fills up.

4. SIGKILL, tens of times (a seeded loop over three capped daemons pulling one image
   in small chunks): right after each kill, before the restart, every chunk file in
   the store verifies and every image directory is absent or byte-identical; after
   the restart the temp files and temp trees the kill left are gone, nothing verified
   was thrown away, and in the end every node is ready with the pushed tree.
5. Disk full (the daemon's data dir on a 16 MiB tmpfs): no room for the manifest, then
   for the chunks, then for the chunks and the tree. Each time the error names the
   full disk (status and log), the store holds only verified chunks, no partial
   tree or temp file is left; freeing space (shrinking then deleting a filler file,
   then growing the tmpfs) lets the daemon finish on its own.

Each test prints one `[fault N ...]` line of figures (treeutil.fault_figures; `pytest -s`
shows it): the time the fault took against its reference, bytes refetched, memory peaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zstandard
from treeutil import (
    GENEROUS,
    Peaks,
    fault_figures,
    mounted,
    received_total,
    scratch,
    snapshot,
    wait_for,
)

from bench.cluster import MIB, Cluster, Node, make_random_tree, t_min
from manifests.client import SeederClient
from manifests.model import Manifest
from manifests.validate import decode_manifest

pytestmark = pytest.mark.timeout(240)

FAST = ("--announce-interval", "1")
KILLS = 24
KILL_RATE = 3 * MIB // 2
SEED = 20240606
DISK_FULL = re.compile(r"no space left|disk full|ENOSPC|errno 28", re.IGNORECASE)


# -- helpers --------------------------------------------------------------------------------


def check_store(data_dir: Path) -> tuple[set[str], set[Path]]:
    """Verify every whole chunk file (SHA-256 of the decoded bytes == its name).

    Returns (verified digests, temp files present). Raises AssertionError on a chunk
    file that does not verify or a name the store would not write.
    """
    verified: set[str] = set()
    temps: set[Path] = set()
    root = data_dir / "chunks"
    if not root.is_dir():
        return verified, temps
    dctx = zstandard.ZstdDecompressor()
    for sub in root.iterdir():
        for f in sub.iterdir():
            if ".tmp-" in f.name:
                temps.add(f)
                continue
            digest, _, suffix = f.name.partition(".")
            data = f.read_bytes()
            if suffix == "zst":
                data = dctx.decompress(data)
            else:
                assert suffix == "raw", f"unexpected file in the store: {f}"
            actual = hashlib.sha256(data).hexdigest()
            assert actual == digest, f"{f} holds bytes with SHA-256 {actual}"
            verified.add(digest)
    return verified, temps


def store_names(data_dir: Path) -> set[str]:
    """The digests of the whole chunk files in the store now (no verifying: quick)."""
    root = data_dir / "chunks"
    if not root.is_dir():
        return set()
    return {
        f.name.partition(".")[0]
        for sub in root.iterdir()
        for f in sub.iterdir()
        if ".tmp-" not in f.name
    }


def check_images(data_dir: Path, digest: str, want: dict[str, tuple[str, int, str]]) -> set[Path]:
    """Every image directory is the whole image; returns the temp trees (dot-names) present."""
    temps: set[Path] = set()
    images = data_dir / "images"
    if not images.is_dir():
        return temps
    for entry in images.iterdir():
        if entry.name.startswith("."):
            temps.add(entry)  # a build or a removal in progress: never an image path
            continue
        assert entry.name == digest, f"unexpected image directory {entry}"
        assert snapshot(entry) == want, f"{entry} is partial or differs from the pushed tree"
    return temps


def check_manifests(data_dir: Path) -> set[Path]:
    """Every kept manifest decodes; returns the temp files present."""
    temps: set[Path] = set()
    mdir = data_dir / "manifests"
    if not mdir.is_dir():
        return temps
    for f in mdir.iterdir():
        if ".tmp" in f.name:
            temps.add(f)
        else:
            decode_manifest(f.read_bytes())
    return temps


def image_row(cluster: Cluster, node: Node, name: str) -> dict[str, object] | None:
    return cluster.image_row(cluster.status(node), name)


def get_manifest(cluster: Cluster, digest: str) -> Manifest:
    async def go() -> bytes:
        async with SeederClient(cluster.seeder_url, token=cluster.token) as client:
            return await client.get_manifest(digest)

    return decode_manifest(asyncio.run(go()))


# -- 4: SIGKILL at random moments --------------------------------------------------------------


def test_daemons_killed_at_random_moments_never_leave_anything_half_written() -> None:
    name = "faults/kill:v1"
    rng = random.Random(SEED)
    with (
        scratch("kill") as work,
        Cluster(work / "cluster", nodes=3, rate=KILL_RATE, daemon_args=FAST) as cluster,
    ):
        tree = make_random_tree(work / "tree", 24 * MIB, files=4, seed=SEED)
        want = snapshot(tree.root)
        pushed = cluster.push(tree.root, name, chunk_size=256 << 10)
        manifest = get_manifest(cluster, pushed.digest)
        chunks = len(manifest.chunks)
        t0 = cluster.assign(name)
        kills: list[str] = []
        held_at_kill: list[int] = []
        peaks = Peaks()
        # Chunk bytes each incarnation received: its counter read just before the kill, plus
        # the chunks that landed between that read and the kill (in the store at the kill,
        # not in it right after the read). To a chunk (256 KiB) either way: a chunk is in
        # the store a moment before its counter moves.
        sizes = {c.digest: c.stored_size for c in manifest.chunks}
        received = 0.0
        # When each node was first seen ready (status read before each kill: to a second).
        first_ready: dict[str, float] = {}

        def note_ready() -> None:
            for n in cluster.nodes:
                r = image_row(cluster, n, name) if n.node_id not in first_ready else None
                if r is not None and r["state"] == "ready":
                    first_ready[n.node_id] = time.monotonic() - t0

        while len(kills) < KILLS:
            node = rng.choice(cluster.nodes)
            time.sleep(rng.uniform(0.0, 1.5))
            note_ready()
            peaks.see(cluster)
            received += cluster.metrics(node).received
            read = store_names(node.data_dir)
            cluster.stop_node(node, signal.SIGKILL)
            kills.append(node.node_id)
            # Right after the kill, before anything could tidy up.
            held, chunk_temps = check_store(node.data_dir)
            received += sum(sizes[d] for d in held - read)
            tree_temps = check_images(node.data_dir, pushed.digest, want)
            manifest_temps = check_manifests(node.data_dir)
            held_at_kill.append(len(held))
            print(f"{time.monotonic() - t0:6.2f}s kill {node.node_id}: {len(held)} chunks held")

            cluster.restart_node(node)
            # The restart swept what the kill left, and kept everything verified.
            after, _ = check_store(node.data_dir)
            assert held <= after, f"{node.node_id}: verified chunks were thrown away"
            leftovers = [p for p in (*chunk_temps, *tree_temps, *manifest_temps) if p.exists()]
            assert not leftovers, f"{node.node_id}: the restart left {leftovers}"
            check_images(node.data_dir, pushed.digest, want)

        loop_s = time.monotonic() - t0
        times = cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        converge = max(first_ready.get(k, v) for k, v in times.items())
        peaks.see(cluster)
        received += received_total(cluster)
        for node in cluster.nodes:
            r = image_row(cluster, node, name)
            assert r is not None and r["state"] == "ready", (node.node_id, r)
            assert snapshot(str(r["path"])) == want, node.node_id
            held, temps = check_store(node.data_dir)
            assert not temps
        per_node = ", ".join(f"{n}: {kills.count(n)}" for n in sorted(set(kills)))
        print(f"{len(kills)} kills survived ({per_node}); chunks of {chunks} held: {held_at_kill}")
        # No clean pull here (one takes some 16 s at these caps): the reference is T_min,
        # the floor for any pull of this image to this fleet.
        floor = t_min(manifest.stored_size, 3, KILL_RATE, KILL_RATE, KILL_RATE)
        fault_figures(
            "4 SIGKILL",
            converge_s=converge,
            clean_s=None,
            received=received,
            nodes=3,
            stored_size=manifest.stored_size,
            peaks=peaks,
            t_min_s=round(floor, 2),
            ratio_to_t_min=round(converge / floor, 2),
            kill_loop_s=round(loop_s, 2),
            kills=len(kills),
            kills_mid_pull=sum(0 < h < chunks for h in held_at_kill),
        )
        # Many kills landed while the pull was going on, not after it.
        assert sum(0 < h < chunks for h in held_at_kill) >= KILLS // 3, held_at_kill


# -- 5: disk full ---------------------------------------------------------------------------


def tmpfs(path: Path, size: str) -> contextlib.AbstractContextManager[Path]:
    """`path` as a tmpfs of `size`; skips the test when this machine will not mount one."""
    return mounted(path, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs")


def fill(path: Path) -> None:
    """Write `path` until the filesystem is full."""
    block = os.urandom(MIB)
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(block)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def test_disk_full_fails_clearly_leaves_nothing_corrupt_and_resumes_when_space_is_freed() -> None:
    name = "faults/full:v1"
    with (
        scratch("full") as work,
        tmpfs(work / "cluster" / "node-01" / "data", "16m") as data,
        Cluster(work / "cluster", nodes=0, rate=16 * MIB, daemon_args=FAST) as cluster,
    ):
        (node,) = cluster.start_nodes(1)
        assert node.data_dir == data
        tree = make_random_tree(work / "tree", 12 * MIB, files=3, seed=5)
        want = snapshot(tree.root)
        pushed = cluster.push(tree.root, name, chunk_size=512 << 10)
        manifest = get_manifest(cluster, pushed.digest)
        chunks = len(manifest.chunks)
        peaks = Peaks()

        # 0. Not even room for the manifest: the daemon says so and tries again.
        filler = data / "filler"
        fill(filler)
        t0 = cluster.assign(name)
        wait_for("the manifest write to fail", lambda: bool(DISK_FULL.search(node.proc.log())))
        assert cluster.status(node)["images"] == []
        assert check_manifests(data) == set()
        errors = [line for line in node.proc.log().splitlines() if DISK_FULL.search(line)]
        os.truncate(filler, 8 * MIB)

        def failed() -> dict[str, object] | None:
            r = image_row(cluster, node, name)
            return r if r is not None and r["state"] == "failed" else None

        def failures() -> int:
            return node.proc.log().count(" failed: ")

        def clean() -> bool:
            _, temps = check_store(data)
            return not temps and not check_images(data, pushed.digest, want)

        # 1. The store fills up while chunks arrive.
        wait_for("the image to fail with the store full", lambda: failed() is not None)
        r = failed()
        assert r is not None and DISK_FULL.search(str(r["error"])), r
        assert DISK_FULL.search(node.proc.log()), node.proc.log_tail()
        errors.append(str(r["error"]))
        wait_for("no temp file or partial tree", clean, timeout=10)
        held, _ = check_store(data)
        assert 0 < len(held) < chunks
        assert not (data / "images" / pushed.digest).exists()

        # 2. Room for the chunks, not for the chunks and the tree (built as they arrive).
        before = failures()
        filler.unlink()
        wait_for("another failure", lambda: failures() > before and failed() is not None)
        r = failed()
        assert r is not None and DISK_FULL.search(str(r["error"])), r
        errors.append(str(r["error"]))
        wait_for("no temp file or partial tree", clean, timeout=10)

        # 3. Room for both: it finishes by itself.
        resize(data, "64m")
        freed = time.monotonic()
        cluster.wait_ready(name, since=t0, timeout=GENEROUS, digest=pushed.digest)
        resumed = time.monotonic() - freed
        total = time.monotonic() - t0
        peaks.see(cluster)
        r = image_row(cluster, node, name)
        assert r is not None and r["error"] is None, r
        assert snapshot(str(r["path"])) == want
        _, temps = check_store(data)
        assert not temps
        print(f"disk full errors: {errors}")
        # The time that counts is from the disk growing to ready: it includes the wait of
        # the daemon's backoff after its last failure. No clean pull fits this disk beside
        # the test's; the reference is T_min (12 MiB at 16 MiB/s).
        rate = 16 * MIB
        floor = t_min(manifest.stored_size, 1, rate, rate, rate)
        fault_figures(
            "5 disk full",
            converge_s=resumed,
            clean_s=None,
            received=received_total(cluster),
            nodes=1,
            stored_size=manifest.stored_size,
            peaks=peaks,
            t_min_s=round(floor, 2),
            total_s=round(total, 2),
            failures=failures(),
            held_before_growth=len(held),
            chunks=chunks,
        )
