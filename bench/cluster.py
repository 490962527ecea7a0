"""A real cluster on loopback: one `seeder run` and N `distd run` subprocesses.

The fan-out bench, the demo and the integration tests all drive the system the
way an operator does: real processes, real sockets on 127.0.0.1, the `manifests`
CLI for pushes. This module owns those processes, so that none is ever left
behind: each runs in its own session (Ctrl-C reaches the driver, which stops them
in order), dies with its parent (PR_SET_PDEATHSIG, even when the driver is
SIGKILLed), and is killed by an atexit hook if the driver forgot to stop it.

    with Cluster(workdir, nodes=8, rate=10 * MIB) as cluster:
        tree = make_random_tree(workdir / "tree", 256 * MIB)
        pushed = cluster.push(tree.root, "bench/image:v1", chunk_size=4 * MIB)
        t0 = cluster.assign(pushed.name, selector="bench=1")
        times = cluster.wait_ready(pushed.name, since=t0, timeout=300)
        cluster.verify(pushed.name, tree)          # raises TreeMismatch
        received = cluster.scrape()                # {node_id: NodeMetrics}

Everything here is synchronous (plain `subprocess` and `http.client`), so a test
or a script uses it without an event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

from manifests.client import SeederClient
from manifests.units import parse_rate, parse_size

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
HOST = "127.0.0.1"
DEFAULT_LABELS: Mapping[str, str] = {"bench": "1"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Environment variables that would change how a child behaves behind our back.
_FOREIGN_ENV = ("DISTD_", "SEEDER_", "DIST_PUSH_TOKEN")


class ClusterError(RuntimeError):
    """A process would not start, a node failed or timed out; the message says which and why."""


class TreeMismatch(ClusterError):
    """A node's materialized tree differs from the pushed one."""


# -- processes ------------------------------------------------------------------------------


_LIVE: set[Proc] = set()


def _kill_leftovers() -> None:
    """atexit: SIGKILL every process group this module started and nobody stopped."""
    for proc in list(_LIVE):
        proc.kill()


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """For a driver script: SIGINT, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so every
    `finally` and `with Cluster` stops its processes before the script exits. (SIGINT too:
    a shell starts background jobs with it ignored, and Python keeps that.)"""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def child_env() -> dict[str, str]:
    """This process's environment without the DISTD_*/SEEDER_* settings a child would read."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}


def module_command(package: str) -> list[str]:
    """`python -m PACKAGE.cli` with this interpreter: works in and outside the venv."""
    return [sys.executable, "-m", f"{package}.cli"]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children_map() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every live process (one scan of /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_cpu(pid: int, kids: Mapping[int, list[int]] | None = None) -> float:
    """CPU seconds (user + system) of `pid`, its reaped children and every live descendant."""
    kids = _children_map() if kids is None else kids
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        fields = _stat_fields(p)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] is field 3.
        total += sum(int(x) for x in fields[11:15]) / _CLK_TCK
        stack.extend(kids.get(p, ()))
    return total


class Proc:
    """One subprocess in its own session, its stdout and stderr in `log_path`."""

    def __init__(
        self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.url = ""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            out.write(f"$ {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else child_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """Running. Never reaps: an exited leader stays a zombie until `kill` or `reap`, so
        its pid, which is its process group's id, cannot be reused by an unrelated process."""
        if self.popen.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    @property
    def returncode(self) -> int | None:
        """The exit status once exited (reaping it), else None."""
        return None if self.alive() else self.reap()

    def reap(self) -> int | None:
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None

    def cpu_seconds(self, kids: Mapping[int, list[int]] | None = None) -> float:
        return process_cpu(self.pid, kids) if self.alive() else 0.0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the daemon and anything it started)."""
        if self.popen.returncode is not None:
            return  # reaped: the group id may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the process to exit, without reaping it; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self) -> None:
        """SIGKILL the group (whatever is left of it), then reap the leader."""
        self.signal(signal.SIGKILL)
        self.reap()
        _LIVE.discard(self)

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, url={self.url!r})"


def stop_all(procs: Iterable[Proc], timeout: float = STOP_TIMEOUT) -> dict[str, float | None]:
    """SIGTERM every group at once, wait up to `timeout` in total, then SIGKILL the rest.

    Returns {name: seconds it took to exit after SIGTERM, or None if it had to be killed}
    for the processes that were running.
    """
    procs = [p for p in procs if p.alive()]
    t0 = time.monotonic()
    for p in procs:
        p.signal(signal.SIGTERM)
    took: dict[str, float | None] = {}
    pending = list(procs)
    while pending and time.monotonic() - t0 < timeout:
        for p in list(pending):
            if not p.alive():
                took[p.name] = time.monotonic() - t0
                pending.remove(p)
        time.sleep(0.02)
    for p in procs:
        took.setdefault(p.name, None)
        p.kill()  # also reaps: no zombies, and anything the process left in its group dies
    return took


# -- HTTP ----------------------------------------------------------------------------------


class Http:
    """A keep-alive HTTP/1.1 connection to one local listener (cheap enough to poll at 20 Hz)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        m = re.match(r"^http://([^/:]+):(\d+)$", url)
        if m is None:
            raise ValueError(f"not http://HOST:PORT: {url!r}")
        self.url = url
        self.host, self.port = m.group(1), int(m.group(2))
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body); one retry on a fresh connection if the kept one went stale."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                resp = self._conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def get_json(self, path: str) -> Any:
        status, data = self.get(path)
        if status != 200:
            raise ClusterError(f"GET {self.url}{path}: HTTP {status}: {data[:200]!r}")
        return json.loads(data)

    def healthy(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- Prometheus text -----------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Samples:
    """{(metric name, frozenset of (label, value)): value} from Prometheus text format."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclass
class NodeMetrics:
    """The counters the bench reads from one daemon's /metrics."""

    from_peers: float
    from_seeder: float
    sent: float
    chunks_verified: float
    chunks_rejected: float
    peers_connected: float
    samples: Samples = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> NodeMetrics:
        s = parse_prometheus(text)
        return cls(
            from_peers=sample(s, "distd_received_bytes_total", source="peer"),
            from_seeder=sample(s, "distd_received_bytes_total", source="seeder"),
            sent=sample(s, "distd_sent_bytes_total"),
            chunks_verified=sample(s, "distd_chunks_verified_total"),
            chunks_rejected=sample(s, "distd_chunks_rejected_total"),
            peers_connected=sample(s, "distd_peers_connected"),
            samples=s,
        )

    @property
    def received(self) -> float:
        return self.from_peers + self.from_seeder


# -- trees ---------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path, workers: int = 4) -> dict[str, str]:
    """{relative POSIX path: "file:<sha256>" | "dir" | "link:<target>"} for everything below.

    Never follows symlinks. Files are hashed on a few threads (hashlib drops the GIL).
    """
    kinds: dict[str, str] = {}
    files: dict[str, Path] = {}
    for top, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            full = Path(top) / name
            rel = full.relative_to(root).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                kinds[rel] = f"link:{os.readlink(full)}"
            elif stat.S_ISDIR(mode):
                kinds[rel] = "dir"
            elif stat.S_ISREG(mode):
                files[rel] = full
            else:
                kinds[rel] = f"other:{mode:o}"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rel, digest in zip(files, pool.map(_file_sha256, files.values()), strict=True):
            kinds[rel] = f"file:{digest}"
    return dict(sorted(kinds.items()))


@dataclass
class ImageTree:
    """A tree on disk and what it must look like wherever it is materialized."""

    root: Path
    digests: dict[str, str]
    total_bytes: int

    @property
    def files(self) -> int:
        return sum(1 for v in self.digests.values() if v.startswith("file:"))

    @classmethod
    def scan(cls, root: Path) -> ImageTree:
        digests = tree_digests(root)
        total = sum(
            (root / rel).lstat().st_size for rel, v in digests.items() if v.startswith("file:")
        )
        return cls(root, digests, total)


def split_sizes(total: int, files: int) -> list[int]:
    """Uneven file sizes that sum to `total`: halves (1/2, 1/4, ...), the rest in the last."""
    sizes = []
    left = total
    for _ in range(files - 1):
        n = left // 2
        sizes.append(n)
        left -= n
    sizes.append(left)
    return sizes


def filesystem(path: Path | None) -> str:
    """The type of the filesystem holding `path` (default: the system temp dir), from
    /proc/mounts: where node data lived says what its writes cost (see --workdir)."""
    target = os.path.realpath(path or tempfile.gettempdir())
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mnt = fields[1]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def write_random_file(path: Path, size: int, rng: random.Random, block: int = 4 * MIB) -> None:
    """`size` random bytes at `path` (parents made), written a block at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            k = min(block, left)
            f.write(rng.randbytes(k))
            left -= k


def make_random_tree(
    root: Path, size: int, files: int = 4, seed: int | None = None, block: int = 4 * MIB
) -> ImageTree:
    """`size` bytes of incompressible random data in `files` files below `root`.

    A fast PRNG (`random.randbytes`), fresh per run unless `seed` is given, so chunks
    neither compress nor dedupe. Layout: `disk.img` (half), `layers/NN.bin`, and a
    small `etc/motd`, like a VM image with a few layers beside it.
    """
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    root.mkdir(parents=True, exist_ok=False)
    paths = [Path("disk.img")] + [Path("layers") / f"{i:02d}.bin" for i in range(1, files)]
    for rel, n in zip(paths, split_sizes(size, files), strict=True):
        write_random_file(root / rel, n, rng, block)
    (root / "etc").mkdir()
    motd = root / "etc" / "motd"
    motd.write_bytes(b"")  # an empty file: no chunks at all
    return ImageTree.scan(root)


# -- command lines -------------------------------------------------------------------------

T = TypeVar("T")


def size_label(n: int) -> str:
    """256MiB, 1GiB, 1500000B: exact, for file names and defaults in --help."""
    for unit, mult in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def arg_type(fn: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from a parser raising ValueError (a bad value is a usage error)."""

    def convert(text: str) -> T:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = fn.__name__
    return convert


DEFAULT_RATE = 10 * MIB  # every cap in the benches and the demo unless --rate says


def add_fleet_arguments(
    p: argparse.ArgumentParser,
    nodes: int = 8,
    size: int = 256 * MIB,
    rate: int = DEFAULT_RATE,
    chunk_size: int = 4 * MIB,
) -> None:
    """--nodes, --size, --rate, --chunk-size and --keep: one spelling for every fleet script."""
    p.add_argument("--nodes", type=int, default=nodes, help="daemons (default %(default)s)")
    p.add_argument(
        "--size",
        type=arg_type(parse_size),
        default=size,
        help=f"image size (default {size_label(size)})",
    )
    p.add_argument(
        "--rate",
        type=arg_type(parse_rate),
        default=rate,
        help="every daemon's upload and download cap and the seeder's upload cap "
        f"(default {size_label(rate)}, per second)",
    )
    p.add_argument(
        "--chunk-size",
        type=arg_type(parse_size),
        default=chunk_size,
        help=f"chunk size (default {size_label(chunk_size)})",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (image, data dirs, logs)")


# -- the bound -------------------------------------------------------------------------------


def t_min(size: float, nodes: int, down: float, up: float, seed: float) -> float:
    """Kumar & Ross: `max(S/B_down, S/B_seed, N*S/(B_seed + N*B_up))` in seconds."""
    return max(size / down, size / seed, nodes * size / (seed + nodes * up))


@dataclass
class Bound:
    """A floor on the time to fleet ready and the terms it is the max of (seconds each)."""

    seconds: float
    terms: dict[str, float]
    binding: str


def fleet_bound(
    needs: Mapping[str, float],
    down: Mapping[str, float],
    up: Mapping[str, float],
    seed: float,
    unique: float,
    starts: Mapping[str, float] | None = None,
) -> Bound:
    """Kumar & Ross generalised to nodes that need different bytes, at different caps, from
    different instants (Cluster runs where not every node is alike).

    - node: the slowest `start_i + need_i / down_i` (no node can receive faster);
    - seeder: `unique / seed` (every distinct byte leaves the seeder at least once);
    - fleet: the first T at which `seed * T + sum_i up_i * (T - start_i)+` reaches
      `sum_i need_i` (every byte a node receives is sent by the seeder or a node that
      is up; a node's upload counts only from its start).

    With N equal nodes needing S from t=0 this is `t_min(S, N, ...)`.
    """
    starts = starts or {}
    total = sum(needs.values())
    node_terms = {n: starts.get(n, 0.0) + needs[n] / down[n] for n in needs}

    def capacity(t: float) -> float:
        return seed * t + sum(up[n] * max(0.0, t - starts.get(n, 0.0)) for n in needs)

    hi = 1.0
    while capacity(hi) < total:
        hi *= 2
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if capacity(mid) < total else (lo, mid)
    terms = {
        "node": max(node_terms.values(), default=0.0),
        "seeder": unique / seed,
        "fleet": hi if total else 0.0,
    }
    binding = max(terms, key=lambda k: terms[k])
    return Bound(terms[binding], terms, binding)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- the cluster ---------------------------------------------------------------------------


def free_port(taken: set[int] | None = None) -> int:
    """A port the OS just gave out on 127.0.0.1 and that is not in `taken` (which it joins)."""
    taken = set() if taken is None else taken
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


@dataclass(frozen=True)
class NodeSpec:
    """How one daemon differs from the cluster's defaults: a bench needs fleets where nodes
    hold different label sets (selectors pick different images) and run at different caps.

    `labels` are added to (and override) the cluster's labels; `zone` replaces the
    round-robin zone; a rate of None keeps the cluster's rate.
    """

    labels: Mapping[str, str] = field(default_factory=dict)
    zone: str | None = None
    upload_rate: int | None = None
    download_rate: int | None = None


@dataclass
class Node:
    node_id: str
    data_dir: Path
    proc: Proc
    http: Http
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    upload_rate: int | None = None
    download_rate: int | None = None

    @property
    def url(self) -> str:
        return self.proc.url


@dataclass
class PushResult:
    name: str
    digest: str
    seconds: float
    output: str


ReadyCallback = Callable[[str, float], None]
ProgressCallback = Callable[[int, int, float, int, int], None]


class Cluster:
    """One seeder and `nodes` daemons on 127.0.0.1, each with a fresh data dir under `workdir`.

    `rate` (bytes/s) caps every daemon's upload and download and the seeder's
    upload, unless `upload_rate`, `download_rate` or `seeder_rate` say otherwise
    (None: no cap). `specs[i]` (a NodeSpec), when given, adjusts the i-th daemon
    (0-based, counting the ones `start_nodes` adds later too). `p2p=False` starts
    the daemons with `--no-p2p` (the central distributor baseline).
    Logs: `workdir/seeder.log`, `workdir/<node id>.log`.
    `distd_command` / `seeder_command` replace `python -m distd.cli` / `python -m
    seeder.cli` (e.g. `["py-spy", "record", "-o", "p.svg", "--", sys.executable, "-m",
    "distd.cli"]` to profile); `run` and the flags follow them.
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        rate: int | None = None,
        *,
        upload_rate: int | None = None,
        download_rate: int | None = None,
        seeder_rate: int | None = None,
        p2p: bool = True,
        labels: Mapping[str, str] = DEFAULT_LABELS,
        zones: Sequence[str] = (),
        specs: Sequence[NodeSpec] = (),
        token: str | None = None,
        node_prefix: str = "node-",
        daemon_args: Sequence[str] = (),
        seeder_args: Sequence[str] = (),
        distd_command: Sequence[str] | None = None,
        seeder_command: Sequence[str] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        if nodes < 0:
            raise ValueError("nodes must be >= 0")
        self.workdir = Path(workdir)
        self.node_count = nodes
        self.upload_rate = upload_rate if upload_rate is not None else rate
        self.download_rate = download_rate if download_rate is not None else rate
        self.seeder_rate = seeder_rate if seeder_rate is not None else rate
        self.p2p = p2p
        self.labels = dict(labels)
        self.zones = list(zones)
        self.specs = list(specs)
        self.token = token or secrets.token_hex(16)
        self.node_prefix = node_prefix
        self.daemon_args = list(daemon_args)
        self.seeder_args = list(seeder_args)
        self.distd_command = list(distd_command or module_command("distd"))
        self.seeder_command = list(seeder_command or module_command("seeder"))
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.exit_seconds: dict[str, float | None] = {}
        self.downloaded: dict[str, float] = {}
        self.image_times: dict[str, dict[str, float]] = {}
        self.seeder: Proc | None = None
        self.seeder_http: Http | None = None
        self.nodes: list[Node] = []
        self.cpu_at_stop: dict[str, float] = {}
        self._ports: set[int] = set()

    # -- lifecycle --

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def seeder_url(self) -> str:
        if self.seeder is None:
            raise ClusterError("the seeder is not running")
        return self.seeder.url

    @property
    def procs(self) -> list[Proc]:
        return ([self.seeder] if self.seeder else []) + [n.proc for n in self.nodes]

    def start(self) -> None:
        """Start the seeder, then every daemon at once; return when all answer /healthz."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_seeder()
        self.start_nodes(self.node_count)

    def _start_seeder(self) -> None:
        def command(port: int) -> list[str]:
            cmd = [
                *self.seeder_command,
                "run",
                "--listen",
                f"{HOST}:{port}",
                "--data-dir",
                str(self.workdir / "seeder-data"),
                "--push-token",
                self.token,
                *self.seeder_args,
            ]
            if self.seeder_rate is not None:
                cmd += ["--max-upload-rate", str(self.seeder_rate)]
            return cmd

        (self.seeder,) = self._launch([("seeder", command)])
        self.seeder_http = Http(self.seeder.url)

    def start_nodes(self, count: int) -> list[Node]:
        """Start `count` more daemons (ids continue the numbering); wait until all are healthy."""
        first = len(self.nodes) + 1
        ids = [f"{self.node_prefix}{i:02d}" for i in range(first, first + count)]
        launch = []
        settings: list[tuple[str, dict[str, str], int | None, int | None]] = []
        for i, node_id in enumerate(ids, start=first - 1):
            spec = self.specs[i] if i < len(self.specs) else NodeSpec()
            zone = self.zones[i % len(self.zones)] if self.zones else ""
            zone = zone if spec.zone is None else spec.zone
            labels = {**self.labels, **spec.labels}
            up = self.upload_rate if spec.upload_rate is None else spec.upload_rate
            down = self.download_rate if spec.download_rate is None else spec.download_rate
            settings.append((zone, labels, up, down))
            launch.append((node_id, self._daemon_command(node_id, zone, labels, up, down)))
        procs = self._launch(launch)
        new = [
            Node(node_id, self.workdir / node_id / "data", proc, Http(proc.url), *setting)
            for node_id, proc, setting in zip(ids, procs, settings, strict=True)
        ]
        self.nodes.extend(new)
        return new

    def _daemon_command(
        self,
        node_id: str,
        zone: str,
        labels: Mapping[str, str],
        upload_rate: int | None,
        download_rate: int | None,
    ) -> Callable[[int], list[str]]:
        def command(port: int) -> list[str]:
            cmd = [
                *self.distd_command,
                "run",
                "--seeder",
                self.seeder_url,
                "--listen",
                f"{HOST}:{port}",
                "--data-dir",
                str(self.workdir / node_id / "data"),
                "--node-id",
                node_id,
            ]
            if labels:
                cmd += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))]
            if zone:
                cmd += ["--zone", zone]
            if upload_rate is not None:
                cmd += ["--max-upload-rate", str(upload_rate)]
            if download_rate is not None:
                cmd += ["--max-download-rate", str(download_rate)]
            if not self.p2p:
                cmd.append("--no-p2p")
            return cmd + self.daemon_args

        return command

    def _launch(self, specs: Sequence[tuple[str, Callable[[int], list[str]]]]) -> list[Proc]:
        """Start every spec on a fresh port; retry a few times one that lost its port in a race."""
        procs: dict[str, Proc] = {}
        attempts = dict.fromkeys((name for name, _ in specs), 0)
        commands = dict(specs)
        deadline = time.monotonic() + self.start_timeout

        def spawn(name: str) -> None:
            port = free_port(self._ports)
            proc = Proc(name, commands[name](port), self.workdir / f"{name}.log")
            proc.url = f"http://{HOST}:{port}"
            procs[name] = proc
            attempts[name] += 1

        for name, _ in specs:
            spawn(name)
        pending = set(procs)
        checkers = {name: Http(procs[name].url, timeout=1.0) for name in procs}
        try:
            while pending:
                for name in sorted(pending):
                    proc = procs[name]
                    if not proc.alive():
                        text = proc.log_tail()
                        lost_port = re.search(
                            r"address already in use|cannot listen", text, re.IGNORECASE
                        )
                        if lost_port and attempts[name] < 3:
                            proc.kill()
                            spawn(name)
                            checkers[name] = Http(procs[name].url, timeout=1.0)
                            continue
                        proc.kill()
                        raise ClusterError(
                            f"{name} exited with status {proc.popen.returncode} at start "
                            f"({proc.log_path}):\n{text}"
                        )
                    if checkers[name].healthy():
                        pending.discard(name)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    names = ", ".join(sorted(pending))
                    tails = "\n".join(
                        f"--- {n} ({procs[n].log_path}):\n{procs[n].log_tail(10)}"
                        for n in sorted(pending)
                    )
                    raise ClusterError(
                        f"not healthy after {self.start_timeout:.0f} s: {names}\n{tails}"
                    )
                time.sleep(0.05)
        except BaseException:
            stop_all(procs.values())
            raise
        finally:
            for c in checkers.values():
                c.close()
        return [procs[name] for name, _ in specs]

    def stop(self) -> None:
        """Record every process's CPU time (`cpu_at_stop`), then stop them all. Idempotent.

        All get SIGTERM at once and `stop_timeout` seconds to exit before SIGKILL;
        `exit_seconds` says how long each took (None: it had to be killed).
        """
        procs = [p for p in self.procs if p.alive()]
        if procs:
            with contextlib.suppress(Exception):
                self.cpu_at_stop = self.cpu_seconds()
        self.exit_seconds.update(stop_all(self.procs, self.stop_timeout))
        for node in self.nodes:
            node.http.close()
        if self.seeder_http is not None:
            self.seeder_http.close()

    def stop_node(self, node: Node, sig: int = signal.SIGTERM) -> int | None:
        """Stop one daemon (SIGKILL for a crash); its exit status."""
        node.proc.signal(sig)
        node.proc.wait(self.stop_timeout)
        node.proc.kill()
        node.http.close()
        return node.proc.popen.returncode

    def restart_node(self, node: Node) -> Node:
        """Start a stopped daemon again with the same command, port and data dir."""
        if node.proc.alive():
            raise ClusterError(f"{node.node_id} is still running")
        proc = Proc(node.node_id, node.proc.cmd, node.proc.log_path)
        proc.url = node.proc.url
        node.proc = proc
        deadline = time.monotonic() + self.start_timeout
        while not node.http.healthy():
            if not proc.alive() or time.monotonic() > deadline:
                raise ClusterError(
                    f"{node.node_id} did not come back ({proc.log_path}):\n{proc.log_tail()}"
                )
            time.sleep(0.05)
        return node

    # -- operator actions --

    def manifests_cli(self, *args: str, timeout: float = 600.0) -> str:
        """Run the `manifests` CLI against this seeder with the push token; its stdout."""
        cmd = [*module_command("manifests"), "--seeder", self.seeder_url, "--token", self.token]
        cmd += args
        proc = subprocess.run(
            cmd,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            timeout=timeout,
            preexec_fn=_die_with_parent,
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"manifests {' '.join(args)} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout.decode(errors="replace")

    def push(self, path: Path, name: str, chunk_size: int | None = None) -> PushResult:
        """`manifests push PATH --name NAME` as a subprocess; the digest it published."""
        args = ["push", str(path), "--name", name, "--no-progress"]
        if chunk_size is not None:
            args += ["--chunk-size", str(chunk_size)]
        t0 = time.monotonic()
        out = self.manifests_cli(*args)
        seconds = time.monotonic() - t0
        m = re.search(r"digest ([0-9a-f]{64})", out)
        if m is None:
            raise ClusterError(f"manifests push printed no digest: {out.strip()!r}")
        return PushResult(name, m.group(1), seconds, out.strip())

    def assign(
        self,
        name: str,
        selector: str | Mapping[str, str] | None = None,
        node: str | None = None,
        via_cli: bool = False,
    ) -> float:
        """Assign `name` (default selector: this cluster's labels); `time.monotonic()` at the send.

        In-process by default (the same `SeederClient.assign` the CLI calls), so the
        returned instant is within a millisecond of the seeder's change. `via_cli`
        runs `manifests assign` instead and returns the instant it was launched
        (which counts the CLI's start-up, ~0.3 s, against the nodes).
        """
        if selector is None and node is None:
            selector = dict(self.labels)
        if isinstance(selector, Mapping):
            selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        if via_cli:
            target = ["--node", node] if node is not None else ["--selector", str(selector)]
            t0 = time.monotonic()
            self.manifests_cli("assign", name, *target)
            return t0

        async def go() -> float:
            async with SeederClient(self.seeder_url, token=self.token) as client:
                await client.healthz()  # connect first: the clock covers only the change
                t0 = time.monotonic()
                await client.assign(name, node=node, selector=selector)
                return t0

        return asyncio.run(go())

    def assign_all(self, rules: Sequence[tuple[str, str]]) -> float:
        """Assign each (name, selector) over one connection; `time.monotonic()` at the first
        send. For workloads of several images that must land on the fleet at one instant."""

        async def go() -> float:
            async with SeederClient(self.seeder_url, token=self.token) as client:
                await client.healthz()
                t0 = time.monotonic()
                for name, selector in rules:
                    await client.assign(name, selector=selector)
                return t0

        return asyncio.run(go())

    # -- observation --

    def status(self, node: Node) -> dict[str, Any]:
        out: dict[str, Any] = node.http.get_json("/v1/status")
        return out

    @staticmethod
    def image_row(status: Mapping[str, Any], name: str) -> dict[str, Any] | None:
        for row in status.get("images", []):
            if row.get("name") == name:
                return dict(row)
        return None

    def wait_ready(
        self,
        name: str,
        since: float,
        timeout: float,
        nodes: Sequence[Node] | None = None,
        poll: float = 0.05,
        max_poll: float = 1.0,
        on_ready: ReadyCallback | None = None,
        on_progress: ProgressCallback | None = None,
        digest: str | None = None,
    ) -> dict[str, float]:
        """Poll /v1/status of every node until `name` is `ready` on all; {node id: seconds}.

        Seconds count from `since` (a `time.monotonic()` instant, e.g. from `assign`) to
        the answer that said `ready`, so a time is late by at most one poll interval.
        Each node is polled every `poll` seconds once its transfer is about to end
        (estimated from its progress so far) and less often before, up to `max_poll`:
        a status request costs the daemon CPU, which the bench counts.
        `on_ready(node_id, seconds)` fires as each node gets there;
        `on_progress(ready, total, elapsed, bytes_done, bytes_total)` after every round.
        With `digest`, only that version counts as ready. `self.downloaded` gets, per
        node, the first answer with every byte done (what is left is verifying and
        materializing), when one was seen before `ready`.
        A daemon that exits, or `timeout` passing, raises ClusterError with the state of
        every unfinished node and the end of its log. A node that reports `failed` is
        waited for (the daemon retries), and its error is in that message.
        """
        targets = self.nodes if nodes is None else nodes
        return self.wait_sets(
            {n.node_id: {name: digest} for n in targets},
            since,
            timeout,
            poll=poll,
            max_poll=max_poll,
            on_ready=on_ready,
            on_progress=on_progress,
        )

    def wait_sets(
        self,
        wants: Mapping[str, Mapping[str, str | None]],
        since: float,
        timeout: float,
        *,
        not_before: Mapping[str, float] | None = None,
        poll: float = 0.05,
        max_poll: float = 1.0,
        on_ready: ReadyCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        """`wait_ready` for a fleet whose nodes each need their own set of images.

        `wants` is {node id: {name: digest or None}}; a node is ready when every name in
        its set is (one status request per poll covers them all, so a node that finishes
        one image while the bench waits on another is still timed to the poll).
        `not_before` is {node id: seconds after `since`} before which a node is not
        polled (it has nothing assigned yet). Per node and name, the time each image got
        ready lands in `self.image_times`; `self.downloaded` and the errors are as in
        `wait_ready`, over the whole set.
        """
        by_id = {n.node_id: n for n in self.nodes}
        unknown = sorted(set(wants) - set(by_id))
        if unknown:
            raise ClusterError(f"no such node: {', '.join(unknown)}")
        targets = [by_id[nid] for nid in wants]
        done: dict[str, float] = {}
        rows: dict[str, dict[str, dict[str, Any]]] = {n.node_id: {} for n in targets}
        self.downloaded = {}
        self.image_times = {n.node_id: {} for n in targets}
        due = {nid: since + (not_before or {}).get(nid, 0.0) for nid in rows}
        first: dict[str, tuple[float, int]] = {}  # first (time, bytes_done > 0) seen
        deadline = since + timeout
        while True:
            for node in targets:
                nid = node.node_id
                if nid in done or time.monotonic() < due[nid]:
                    continue
                if not node.proc.alive():
                    raise ClusterError(self._unfinished(targets, done, rows, "a daemon exited"))
                want = wants[nid]
                try:
                    status = self.status(node)
                    fresh = {n: self.image_row(status, n) for n in want}
                    rows[nid] = {n: r for n, r in fresh.items() if r is not None}
                except (OSError, http.client.HTTPException, ClusterError, ValueError):
                    pass  # busy or restarting: keep the last answer
                t = time.monotonic()
                have = rows[nid]
                for n, row in have.items():
                    if row.get("state") == "ready" and want[n] in (None, row.get("digest")):
                        self.image_times[nid].setdefault(n, t - since)
                got = sum(int(r.get("bytes_done") or 0) for r in have.values())
                total = sum(int(r.get("bytes_total") or 0) for r in have.values())
                if len(have) == len(want) and nid not in self.downloaded and total and got >= total:
                    self.downloaded[nid] = t - since
                if len(self.image_times[nid]) == len(want):
                    done[nid] = t - since
                    if on_ready is not None:
                        on_ready(nid, t - since)
                    continue
                summary = {"bytes_done": got, "bytes_total": total} if have else None
                due[nid] = t + self._poll_interval(summary, first, nid, t, poll, max_poll)
            if on_progress is not None:
                every = [r for node_rows in rows.values() for r in node_rows.values()]
                on_progress(
                    len(done),
                    len(targets),
                    time.monotonic() - since,
                    sum(int(r.get("bytes_done") or 0) for r in every),
                    sum(int(r.get("bytes_total") or 0) for r in every),
                )
            if len(done) == len(targets):
                return done
            now = time.monotonic()
            if now > deadline:
                raise ClusterError(
                    self._unfinished(targets, done, rows, f"not ready after {timeout:.0f} s")
                )
            wake = min(due[n.node_id] for n in targets if n.node_id not in done)
            time.sleep(min(max(0.0, wake - now), 0.25))

    @staticmethod
    def _poll_interval(
        row: Mapping[str, Any] | None,
        first: dict[str, tuple[float, int]],
        node_id: str,
        now: float,
        poll: float,
        max_poll: float,
    ) -> float:
        """A quarter of the node's estimated time left, within [poll, max_poll]."""
        if row is None:
            return poll
        got, total = int(row.get("bytes_done") or 0), int(row.get("bytes_total") or 0)
        if total and got >= total:
            return poll  # verifying or materializing: ready any moment
        if got <= 0 or not total:
            return min(4 * poll, max_poll)
        t0, got0 = first.setdefault(node_id, (now, got))
        if now - t0 < 0.5 or got <= got0:
            return min(4 * poll, max_poll)
        eta = (total - got) / ((got - got0) / (now - t0))
        return min(max_poll, max(poll, eta / 4))

    def _unfinished(
        self,
        targets: Sequence[Node],
        done: Mapping[str, float],
        rows: Mapping[str, Mapping[str, Mapping[str, Any]]],
        why: str,
    ) -> str:
        lines = [f"{why}: {len(done)}/{len(targets)} nodes ready"]
        for node in targets:
            if node.node_id in done:
                continue
            have = rows.get(node.node_id) or {}
            state = "exited" if not node.proc.alive() else "no image row"
            if have:
                state = "; ".join(
                    f"{'' if len(have) == 1 else name + ': '}{row.get('state')} "
                    f"{row.get('bytes_done')}/{row.get('bytes_total')} bytes"
                    + (f", error: {row['error']}" if row.get("error") else "")
                    for name, row in sorted(have.items())
                )
            lines.append(f"--- {node.node_id} ({state}; log {node.proc.log_path}):")
            lines.append(node.proc.log_tail(15))
        return "\n".join(lines)

    def metrics(self, node: Node) -> NodeMetrics:
        status, body = node.http.get("/metrics")
        if status != 200:
            raise ClusterError(f"{node.node_id}: GET /metrics: HTTP {status}")
        return NodeMetrics.parse(body.decode(errors="replace"))

    def scrape(self, nodes: Sequence[Node] | None = None) -> dict[str, NodeMetrics]:
        return {n.node_id: self.metrics(n) for n in (self.nodes if nodes is None else nodes)}

    def seeder_metrics(self) -> Samples | None:
        """The seeder's /metrics, or None when it does not serve them."""
        if self.seeder_http is None:
            return None
        try:
            status, body = self.seeder_http.get("/metrics")
        except (OSError, http.client.HTTPException):
            return None
        return parse_prometheus(body.decode(errors="replace")) if status == 200 else None

    def seeder_sent_bytes(self) -> tuple[float, str]:
        """(chunk bytes the seeder sent, where the figure came from).

        From the seeder's own /metrics (`seeder_bytes_sent_total`, or another counter
        named for bytes sent) when it serves them; otherwise the sum of every node's
        `distd_received_bytes_total{source="seeder"}`.
        """
        samples = self.seeder_metrics()
        if samples:
            names = {n for n, _ in samples if n.endswith("_total")}
            preferred = [
                n for n in ("seeder_bytes_sent_total", "seeder_sent_bytes_total") if n in names
            ]
            guessed = sorted(n for n in names if "bytes" in n and "sent" in n)
            for name in preferred or guessed[:1]:
                return sample(samples, name), f"seeder /metrics {name}"
        total = sum(m.from_seeder for m in self.scrape().values())
        return total, 'sum of the nodes\' distd_received_bytes_total{source="seeder"}'

    def cpu_seconds(self) -> dict[str, float]:
        """{process name: CPU seconds so far} for the seeder and every live daemon."""
        kids = _children_map()
        return {p.name: p.cpu_seconds(kids) for p in self.procs if p.alive()}

    def verify(self, name: str, expected: ImageTree, nodes: Sequence[Node] | None = None) -> None:
        """Every node's materialized `name` holds exactly `expected`; raises TreeMismatch."""
        problems = []
        for node in self.nodes if nodes is None else nodes:
            row = self.image_row(self.status(node), name)
            if row is None or row.get("state") != "ready" or not row.get("path"):
                problems.append(f"{node.node_id}: {name} is not ready ({row})")
                continue
            got = tree_digests(Path(row["path"]))
            if got != expected.digests:
                problems.append(
                    f"{node.node_id}: {row['path']}: {_tree_diff(expected.digests, got)}"
                )
        if problems:
            raise TreeMismatch("trees differ from the pushed one:\n" + "\n".join(problems))


def _tree_diff(want: Mapping[str, str], got: Mapping[str, str], limit: int = 5) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("different", changed)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{what}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)
