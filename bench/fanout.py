"""Fan-out bench: one seeder and N daemons on loopback, every one capped at the same rate.

For each mode (`p2p`: the swarm; `central`: the same daemons with `--no-p2p`, the
central-distributor baseline) it starts fresh processes, pushes a random image of
SIZE with `manifests push`, assigns it to every node by label selector, and times
each node from the assign until its /v1/status says `ready`. Then it reads every
daemon's /metrics (bytes from peers and from the seeder), every process's CPU
time, and checks that every node's tree is byte-identical to the pushed one.

The floor is `T_min = max(S/B_down, S/B_seed, N*S/(B_seed + N*B_up))` (DESIGN.md);
a central distributor needs `N*S/B_seed`.

    python -m bench.fanout --nodes 8 --size 256MiB --rate 10MiB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from bench.cluster import (
    GIB,
    MIB,
    Cluster,
    ClusterError,
    ImageTree,
    NodeMetrics,
    Samples,
    default_workdir,
    install_signal_handlers,
    make_random_tree,
    quantile,
    sample,
    t_min,
)
from manifests.units import format_size, parse_rate, parse_size

MODES = ("p2p", "central")
IMAGE = "bench/fanout:v1"
T = TypeVar("T")
# The central baseline is a plain distributor: it serves every request (no super-seeding,
# which would defer nodes that have no peers to turn to) with a slot for each of them.
CENTRAL_SEEDER_ARGS = ("--no-superseed",)
CENTRAL_SLOTS_PER_NODE = 4
SLOW_EXIT = 2.0
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"bench.fanout: {msg}", file=sys.stderr, flush=True)


def size_label(n: int) -> str:
    """256MiB, 1GiB, 1500000B: exact, for file names."""
    for unit, mult in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def rate_text(rate: float) -> str:
    return f"{format_size(rate)}/s"


class ProgressLine:
    """`mode: ready k/N, 12.3 s, 45%` on stderr: redrawn in place on a terminal, else every 5 s."""

    def __init__(self, label: str, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.last_ready = -1

    def __call__(self, ready: int, total: int, elapsed: float, done: int, size: int) -> None:
        now = time.monotonic()
        every = 0.25 if self.tty else 5.0
        if ready == self.last_ready and now - self.last < every:
            return
        self.last, self.last_ready = now, ready
        pct = f", {100 * done / size:.0f}% of bytes" if size else ""
        text = f"bench.fanout: {self.label}: nodes ready {ready}/{total}, {elapsed:.1f} s{pct}"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last_ready >= 0:
            self.stream.write("\n")
            self.stream.flush()


class Timeline:
    """Every `every` seconds while the nodes pull: what the seeder and the nodes moved so far.

    Shows where the time goes: a seeder that has sent S long before the nodes are
    ready points at propagation; one that is late points at its upload. Costs a
    scrape of every /metrics per sample (about a millisecond of each daemon's CPU).
    """

    def __init__(self, cluster: Cluster, every: float) -> None:
        self.cluster = cluster
        self.every = every
        self.next = 0.0
        self.points: list[dict[str, float | None]] = []

    def __call__(
        self, ready: int, total: int, elapsed: float, done: int, size: int, force: bool = False
    ) -> None:
        if self.every <= 0 or (elapsed < self.next and not force):
            return
        self.next = elapsed + self.every
        try:
            seeder = self.cluster.seeder_metrics()
            nodes = self.cluster.scrape()
        except (OSError, ClusterError):
            return
        self.points.append(
            {
                "t": round(elapsed, 3),
                "ready": ready,
                "bytes_done": done,
                "seeder_sent": sample(seeder, "seeder_bytes_sent_total") if seeder else None,
                "from_peers": sum(m.from_peers for m in nodes.values()),
                "from_seeder": sum(m.from_seeder for m in nodes.values()),
                "peers_connected": sum(m.peers_connected for m in nodes.values()),
            }
        )

    def first_time(self, key: str, at_least: float) -> float | None:
        for p in self.points:
            value = p.get(key)
            if value is not None and value >= at_least:
                return p["t"]
        return None


@dataclass
class ModeResult:
    mode: str
    nodes: int
    size: int
    rate: int
    t_min: float
    times: dict[str, float]
    push_seconds: float
    digest: str
    from_peers: float
    from_seeder: float
    seeder_sent: float
    seeder_sent_source: str
    chunks_rejected: float
    cpu_seconds: float
    cpu_by_process: dict[str, float]
    cpu_total_seconds: float
    verified: bool
    exit_seconds: dict[str, float | None] = field(default_factory=dict)
    seeder_counters: dict[str, float] = field(default_factory=dict)
    node_counters: dict[str, float] = field(default_factory=dict)
    seeder_sent_s_at: float | None = None
    timeline: list[dict[str, float | None]] = field(default_factory=list)
    downloaded: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = list(self.times.values())
        p50, p90, top = quantile(values, 0.5), quantile(values, 0.9), max(values)
        received = self.from_peers + self.from_seeder
        delivered_gib = self.nodes * self.size / GIB
        self.stats = {
            "p50": p50,
            "p90": p90,
            "max": top,
            "p50_ratio": p50 / self.t_min,
            "p90_ratio": p90 / self.t_min,
            "max_ratio": top / self.t_min,
            "peer_share": self.from_peers / received if received else 0.0,
            "seeder_sent_over_s": self.seeder_sent / self.size,
            "cpu_s_per_gib": self.cpu_seconds / delivered_gib,
        }
        tails = [self.times[n] - t for n, t in self.downloaded.items() if n in self.times]
        if tails:
            self.stats["bytes_done_to_ready_p50"] = quantile(tails, 0.5)
            self.stats["bytes_done_to_ready_max"] = max(tails)


def run_mode(
    mode: str,
    args: argparse.Namespace,
    tree: ImageTree,
    workdir: Path,
    tmin: float,
) -> ModeResult:
    n, rate = args.nodes, args.rate
    central_floor = n * tree.total_bytes / rate
    timeout = args.timeout or (
        3 * central_floor + 60 if mode == "central" else max(10 * tmin, tmin + 120)
    )
    log(f"{mode}: starting 1 seeder and {n} daemons (logs in {workdir})")
    t_start = time.monotonic()
    seeder_args: list[str] = []
    if mode == "central":
        seeder_args = [*CENTRAL_SEEDER_ARGS, "--upload-slots", str(CENTRAL_SLOTS_PER_NODE * n)]
    with Cluster(workdir, n, rate, p2p=mode == "p2p", seeder_args=seeder_args) as cluster:
        log(f"{mode}: all {n + 1} processes healthy in {time.monotonic() - t_start:.1f} s")
        pushed = cluster.push(tree.root, IMAGE, chunk_size=args.chunk_size)
        log(f"{mode}: pushed {format_size(tree.total_bytes)} in {pushed.seconds:.1f} s")
        cpu0 = cluster.cpu_seconds()
        progress = ProgressLine(mode)
        timeline = Timeline(cluster, args.timeline)

        def on_progress(ready: int, total: int, elapsed: float, done: int, size: int) -> None:
            progress(ready, total, elapsed, done, size)
            timeline(ready, total, elapsed, done, size)

        t0 = cluster.assign(IMAGE)
        try:
            times = cluster.wait_ready(
                IMAGE, since=t0, timeout=timeout, on_progress=on_progress, digest=pushed.digest
            )
        finally:
            progress.close()
        timeline(n, n, time.monotonic() - t0, tree.total_bytes * n, tree.total_bytes * n, True)
        log(f"{mode}: all {n} nodes ready; slowest {max(times.values()):.2f} s")
        metrics = cluster.scrape()
        seeder_sent, source = cluster.seeder_sent_bytes()
        seeder_samples = cluster.seeder_metrics() or {}
        cpu1 = cluster.cpu_seconds()
        cluster.verify(IMAGE, tree)
        log(f"{mode}: all {n} trees byte-identical to the pushed tree")
    cpu_delta = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    return ModeResult(
        mode=mode,
        nodes=n,
        size=tree.total_bytes,
        rate=rate,
        t_min=tmin,
        times=dict(sorted(times.items())),
        push_seconds=pushed.seconds,
        digest=pushed.digest,
        from_peers=sum(m.from_peers for m in metrics.values()),
        from_seeder=sum(m.from_seeder for m in metrics.values()),
        seeder_sent=seeder_sent,
        seeder_sent_source=source,
        chunks_rejected=sum(m.chunks_rejected for m in metrics.values()),
        cpu_seconds=sum(cpu_delta.values()),
        cpu_by_process={k: round(v, 3) for k, v in sorted(cpu_delta.items())},
        cpu_total_seconds=sum(cpu1.values()),
        verified=True,
        exit_seconds={k: v if v is None else round(v, 2) for k, v in cluster.exit_seconds.items()},
        seeder_counters=_flat(seeder_samples),
        node_counters=_totals(metrics),
        seeder_sent_s_at=timeline.first_time("seeder_sent", tree.total_bytes),
        timeline=timeline.points,
        downloaded={k: round(v, 3) for k, v in sorted(cluster.downloaded.items())},
    )


def _flat(samples: Samples) -> dict[str, float]:
    """{'name{k="v"}': value} for JSON."""
    out = {}
    for (name, labels), value in sorted(samples.items(), key=lambda kv: str(kv[0])):
        tags = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
        out[f"{name}{{{tags}}}" if tags else name] = value
    return out


def _totals(metrics: Mapping[str, NodeMetrics]) -> dict[str, float]:
    """Every distd_* counter summed over the nodes (histogram buckets left out)."""
    out: dict[str, float] = {}
    for m in metrics.values():
        for key, value in _flat(m.samples).items():
            if key.startswith("distd_") and "_bucket" not in key and "_created" not in key:
                out[key] = out.get(key, 0.0) + value
    return dict(sorted(out.items()))


def markdown(results: list[ModeResult], args: argparse.Namespace, tree: ImageTree) -> str:
    n, size, rate = args.nodes, tree.total_bytes, args.rate
    tmin = results[0].t_min
    lines = [
        f"## Fan-out: N={n}, S={format_size(size)}, B={rate_text(rate)}",
        "",
        f"One seeder and {n} daemons on 127.0.0.1, {os.cpu_count()} cores; every daemon's "
        f"upload and download and the seeder's upload capped at {rate_text(rate)}; "
        f"{tree.files} files, {format_size(args.chunk_size)} chunks, random bytes. "
        f"T_min = max(S/B_down, S/B_seed, N*S/(B_seed + N*B_up)) = {tmin:.2f} s; "
        f"a central distributor's floor N*S/B_seed = {n * size / rate:.1f} s "
        f"({n * size / rate / tmin:.1f}x T_min).",
        "",
        "| mode | p50 s | p90 s | max s | p50/T_min | p90/T_min | max/T_min "
        "| from peers | seeder sent / S | CPU s/GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s = r.stats
        lines.append(
            f"| {r.mode} | {s['p50']:.2f} | {s['p90']:.2f} | {s['max']:.2f} "
            f"| {s['p50_ratio']:.3f} | {s['p90_ratio']:.3f} | {s['max_ratio']:.3f} "
            f"| {100 * s['peer_share']:.1f}% | {s['seeder_sent_over_s']:.2f} "
            f"| {s['cpu_s_per_gib']:.2f} |"
        )
    lines += ["", "Per node (seconds from the assign to `ready`, and / T_min):", ""]
    header = "| node |" + "".join(f" {r.mode} s | {r.mode} / T_min |" for r in results)
    lines += [header, "| --- |" + " ---: | ---: |" * len(results)]
    for node in results[0].times:
        cells = "".join(
            f" {r.times[node]:.2f} | {r.times[node] / r.t_min:.3f} |"
            for r in results
            if node in r.times
        )
        lines.append(f"| {node} |{cells}")
    lines += [
        "",
        "p50 and p90 interpolate linearly between ranks. CPU counts every process "
        "(seeder and daemons, with their children) from the assign until all were ready "
        "and scraped; the push is not included. Seeder bytes: "
        + "; ".join(f"{r.mode}: {r.seeder_sent_source}" for r in results)
        + ". Every node's tree was checked file by file (SHA-256) against the pushed tree.",
    ]
    for r in results:
        notes = []
        if r.seeder_sent_s_at is not None:
            notes.append(
                f"the seeder had sent S (one copy) after {r.seeder_sent_s_at:.1f} s "
                f"({r.seeder_sent_s_at / r.t_min:.2f}x T_min; S/B_seed = {r.size / r.rate:.1f} s)"
            )
        if "bytes_done_to_ready_p50" in r.stats:
            notes.append(
                "from a node's last byte to `ready` (verify and materialize) took "
                f"{r.stats['bytes_done_to_ready_p50']:.2f} s at p50, "
                f"{r.stats['bytes_done_to_ready_max']:.2f} s at most"
            )
        if notes:
            lines += ["", f"{r.mode}: " + "; ".join(notes) + "."]
    slow = [
        f"{r.mode} {name} " + ("killed after the grace" if t is None else f"{t:.1f} s")
        for r in results
        for name, t in sorted(r.exit_seconds.items())
        if t is None or t > SLOW_EXIT
    ]
    if slow:
        lines += ["", f"Slow to exit on SIGTERM (over {SLOW_EXIT:.0f} s): " + ", ".join(slow) + "."]
    return "\n".join(lines) + "\n"


def result_json(results: list[ModeResult], args: argparse.Namespace, tree: ImageTree) -> str:
    doc: dict[str, Any] = {
        "config": {
            "nodes": args.nodes,
            "size": tree.total_bytes,
            "rate": args.rate,
            "chunk_size": args.chunk_size,
            "files": tree.files,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "t_min": results[0].t_min,
        "central_floor": args.nodes * tree.total_bytes / args.rate,
        "modes": {r.mode: {**asdict(r), **r.stats} for r in results},
    }
    for m in doc["modes"].values():
        del m["stats"]
    return json.dumps(doc, indent=2) + "\n"


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)}: {text!r}")
    return list(dict.fromkeys(modes))


def arg_type(fn: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from a parser raising ValueError (a bad value is a usage error)."""

    def convert(text: str) -> T:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = fn.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description="Time N capped daemons pulling one image from one seeder, through the "
        "swarm (p2p) and from the seeder alone (central), against T_min.",
    )
    p.add_argument("--nodes", type=int, default=8, help="daemons (default %(default)s)")
    p.add_argument(
        "--size", type=arg_type(parse_size), default=256 * MIB, help="image size (default 256MiB)"
    )
    p.add_argument(
        "--rate",
        type=arg_type(parse_rate),
        default=10 * MIB,
        help="every daemon's upload and download cap and the seeder's upload cap "
        "(default 10MiB, per second)",
    )
    p.add_argument(
        "--chunk-size", type=arg_type(parse_size), default=4 * MIB, help="chunk size (default 4MiB)"
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default=list(MODES),
        help="comma list of p2p and central (default both, p2p first)",
    )
    p.add_argument("--files", type=int, default=4, help="files the image is split into (default 4)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results dir (default bench/results)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for all nodes, per mode (default: 10x T_min for p2p, "
        "3x the central floor for central)",
    )
    p.add_argument(
        "--timeline",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="sample every /metrics this often while nodes pull, into the JSON "
        "(default %(default)s; 0 to turn off)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="where to make the temp dir (default: /dev/shm when present, since N nodes on "
        "one VM would otherwise share one disk)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (tree, data, logs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 1:
        log("--nodes must be at least 1")
        return 2
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="p2pdist-fanout-", dir=args.workdir))
    failed = True  # until every mode ran: keep the logs of anything that went wrong
    results: list[ModeResult] = []
    try:
        log(f"writing a {format_size(args.size)} image of random bytes")
        tree = make_random_tree(work / "tree", args.size, files=args.files)
        rate = args.rate
        tmin = t_min(tree.total_bytes, args.nodes, down=rate, up=rate, seed=rate)
        log(f"T_min = {tmin:.2f} s; central floor = {args.nodes * tree.total_bytes / rate:.1f} s")
        for mode in args.modes:
            results.append(run_mode(mode, args, tree, work / mode, tmin))
            if not args.keep:
                shutil.rmtree(work / mode, ignore_errors=True)
        failed = False
    except KeyboardInterrupt:
        failed = False
        log("interrupted; every process stopped")
        return 130
    except ClusterError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        if args.keep or failed:
            log(f"kept {work} (logs: {work}/<mode>/*.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)

    md = markdown(results, args, tree)
    print(md, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fanout-N{args.nodes}-{size_label(args.size)}"
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(result_json(results, args, tree))
    log(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
