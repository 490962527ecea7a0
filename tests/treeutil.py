"""Helpers for comparing and building directory trees in tests.

`snapshot` is the notion of "byte-identical tree" every test uses: kind, permission
bits, and content SHA-256 or symlink target for every path below the root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.cluster import MIB, Cluster, Node, make_random_tree
from manifests.chunking import encode_chunk
from manifests.model import Chunk, Manifest
from manifests.scan import scan_tree

Snapshot = dict[str, tuple[str, int, str]]


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(root: str | Path) -> Snapshot:
    """{relative POSIX path: (kind, mode & 0o7777, content sha256 | link target | "")}.

    Never follows symlinks; the root itself is not included. Raises on anything
    that is not a file, directory or symlink.
    """
    root = str(root)
    out: Snapshot = {}
    stack = [root]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            children = list(it)
        for de in children:
            rel = os.path.relpath(de.path, root).replace(os.sep, "/")
            st = de.stat(follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", mode, os.readlink(de.path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
                stack.append(de.path)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, _file_sha(de.path))
            else:
                raise AssertionError(f"{de.path}: unexpected file type {st.st_mode:o}")
    return dict(sorted(out.items()))


def build_manifest(root: str | Path, chunk_size: int) -> tuple[Manifest, dict[str, bytes]]:
    """Scan `root` into a manifest plus {digest: raw bytes} for a fake chunk source."""
    scan = scan_tree(root, chunk_size, workers=2)
    raw: dict[str, bytes] = {}
    table: dict[str, Chunk] = {}
    for digest, src in scan.sources.items():
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            data = f.read(src.size)
        raw[digest] = data
        enc, payload = encode_chunk(data)
        table[digest] = Chunk(digest, len(data), len(payload), enc)
    return Manifest.build(scan.entries, table, chunk_size), raw


def rmtree_force(path: str | Path) -> None:
    """Remove a tree even when it holds read-only directories (tests run as any user)."""
    path = str(path)
    if not os.path.lexists(path):
        return
    if not os.path.islink(path) and os.path.isdir(path):
        os.chmod(path, 0o700)
        for top, dirs, _files in os.walk(path):
            for d in dirs:
                full = os.path.join(top, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
        shutil.rmtree(path)
    else:
        os.unlink(path)


GENEROUS = 90.0  # seconds any single wait in a multi-process test may take


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh directory on /dev/shm (tmpfs) when available, removed afterwards unless
    P2PDIST_KEEP=1 (then the logs stay for a post-mortem)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=f"p2pdist-{name}-", dir=base))
    try:
        yield path
    finally:
        if os.environ.get("P2PDIST_KEEP") == "1":
            print(f"kept {path}")
        else:
            rmtree_force(path)


def wait_for(what: str, check: Callable[[], bool], timeout: float = GENEROUS) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Fleet:
    """One seeder and one daemon holding a small pushed image."""

    cluster: Cluster
    node: Node
    chunk: str  # a chunk digest the node and the seeder hold


@contextlib.contextmanager
def one_node_fleet(name: str, image: str, seed: int) -> Iterator[Fleet]:
    """A running seeder and daemon that already hold `image` (2 MiB, 256 KiB chunks)."""
    with scratch(name) as work, Cluster(work / "cluster", nodes=1) as cluster:
        tree = make_random_tree(work / "tree", 2 * MIB, files=2, seed=seed)
        pushed = cluster.push(tree.root, image, chunk_size=256 << 10)
        t0 = cluster.assign(image)
        cluster.wait_ready(image, since=t0, timeout=60, digest=pushed.digest)
        (node,) = cluster.nodes
        held = next((node.data_dir / "chunks").glob("*/*.*"))
        yield Fleet(cluster, node, held.name.partition(".")[0])


@contextlib.contextmanager
def mounted(path: Path, *options: str) -> Iterator[Path]:
    """`mount OPTIONS path` for the test's duration (unmounted after, lazily if busy);
    skips the test when this machine will not mount it (needs root or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", *options, str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {' '.join(options)} here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- figures the fault tests print (issue 6: time against the clean run, bytes refetched,
# memory peak), one uniform line per fault ----------------------------------------------------


def hwm_bytes(pid: int) -> int:
    """VmHWM (the peak resident set since start, or since `reset_hwm`) of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "VmHWM":
                return int(rest.split()[0]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def reset_hwm(pid: int) -> bool:
    """Start VmHWM afresh at the current RSS (`echo 5 > /proc/PID/clear_refs`, Linux 4.0+);
    False where the kernel or permissions refuse."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Peaks:
    """The highest VmHWM seen per process name (seeder, node-01, ...) over all of its
    incarnations: call `see` before a process is killed or stopped, and at the end."""

    def __init__(self) -> None:
        self.hwm: dict[str, int] = {}

    def see(self, cluster: Cluster) -> None:
        for proc in cluster.procs:
            if proc.alive():
                with contextlib.suppress(OSError):
                    peak = hwm_bytes(proc.pid)
                    self.hwm[proc.name] = max(self.hwm.get(proc.name, 0), peak)

    def daemons(self) -> int:
        return max((v for k, v in self.hwm.items() if k != "seeder"), default=0)

    def seeder(self) -> int:
        return self.hwm.get("seeder", 0)


def received_total(cluster: Cluster, nodes: list[Node] | None = None) -> float:
    """Sum of `distd_received_bytes_total` (peer and seeder) over the nodes, now: chunk
    bytes verified and stored (a transfer cut or thrown away is not counted)."""
    return sum(m.received for m in cluster.scrape(nodes).values())


def fault_figures(
    fault: str,
    *,
    converge_s: float,
    clean_s: float | None,
    received: float,
    nodes: int,
    stored_size: int,
    peaks: Peaks,
    **extra: object,
) -> str:
    """Print (and return) the one line of figures of a fault test (`pytest -s` shows it):
    seconds to converge and the same fleet's clean run (None: no clean run applies),
    bytes refetched (chunk bytes received over the faulted pull beyond one copy of the
    image per node) and the VmHWM peaks of the daemons (the highest) and the seeder."""
    figures: dict[str, object] = {"converge_s": round(converge_s, 2)}
    if clean_s is not None:
        figures["clean_s"] = round(clean_s, 2)
        figures["ratio"] = round(converge_s / clean_s, 2)
    figures["refetched_mib"] = round((received - nodes * stored_size) / MIB, 2)
    figures["daemon_hwm_mib"] = round(peaks.daemons() / MIB, 1)
    figures["seeder_hwm_mib"] = round(peaks.seeder() / MIB, 1)
    figures.update(extra)
    line = f"[fault {fault}] " + ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n{line}", flush=True)
    return line
