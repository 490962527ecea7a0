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

Scenarios (bench/workload.py plans them; each has a floor per node and for the fleet,
`fleet_bound` in bench/cluster.py, and its own files):

    python -m bench.fanout --repave --nodes 16 --images 5 --size 64MiB --base 32MiB
    python -m bench.fanout --nodes 16 --slow-fraction 0.25 --late-fraction 0.25 --late-at 20

Every run writes bench/results/<stem>.md, .json and .png (the completion-time CDF of
each mode with the bound as a vertical line; needs the `bench` extra, matplotlib).
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
from typing import Any, TextIO

from bench.cdf import write_cdf
from bench.cluster import (
    DEFAULT_RATE,
    GIB,
    Cluster,
    ClusterError,
    ImageTree,
    NodeMetrics,
    Samples,
    add_fleet_arguments,
    arg_type,
    filesystem,
    install_signal_handlers,
    make_random_tree,
    quantile,
    sample,
    size_label,
    t_min,
)
from bench.workload import Workload, build, image_index, write_trees
from manifests.units import format_size, parse_size

MODES = ("p2p", "central")
IMAGE = "bench/fanout:v1"
# The central baseline is a plain distributor: it serves every request (no super-seeding,
# which would defer nodes that have no peers to turn to) with a slot for each of them.
CENTRAL_SEEDER_ARGS = ("--no-superseed",)
CENTRAL_SLOTS_PER_NODE = 4
SLOW_EXIT = 2.0
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"bench.fanout: {msg}", file=sys.stderr, flush=True)


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
        f"One seeder and {n} daemons on 127.0.0.1, {os.cpu_count()} cores, node data on "
        f"{filesystem(args.workdir)}; every daemon's "
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
            "data_fs": filesystem(args.workdir),
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


# -- workloads: a mixed fleet (slow and late nodes) and the repave ------------------------------


@dataclass
class WorkloadResult:
    """One mode's run of a Workload: per-node times from the first assign, and what moved."""

    mode: str
    bound: float
    times: dict[str, float]
    starts: dict[str, float]
    own: dict[str, float]
    image_times: dict[str, dict[str, float]]
    received: dict[str, float]
    from_peers: float
    from_seeder: float
    seeder_sent: float
    seeder_sent_source: str
    chunks_rejected: float
    cpu_seconds: float
    cpu_by_process: dict[str, float]
    push_seconds: float
    verified: bool
    exit_seconds: dict[str, float | None] = field(default_factory=dict)
    seeder_counters: dict[str, float] = field(default_factory=dict)
    node_counters: dict[str, float] = field(default_factory=dict)
    timeline: list[dict[str, float | None]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


def workload_stats(r: WorkloadResult, wl: Workload) -> dict[str, float]:
    """Fleet ready and p50 over the fleet bound; each node's own time over its own bound."""
    values = list(r.times.values())
    received = r.from_peers + r.from_seeder
    plans = {n.node_id: n for n in wl.nodes}
    own_ratios = [r.own[n] / plans[n].own_bound for n in r.own if plans[n].need]
    return {
        "ready": max(values),
        "p50": quantile(values, 0.5),
        "p90": quantile(values, 0.9),
        "ready_ratio": max(values) / r.bound,
        "p50_ratio": quantile(values, 0.5) / r.bound,
        "p90_ratio": quantile(values, 0.9) / r.bound,
        "own_ratio_p50": quantile(own_ratios, 0.5),
        "own_ratio_max": max(own_ratios),
        "peer_share": r.from_peers / received if received else 0.0,
        "seeder_sent_over_unique": r.seeder_sent / wl.unique_bytes,
        "received_over_needed": received / wl.needed_bytes,
        "cpu_s_per_gib": r.cpu_seconds / (wl.needed_bytes / GIB),
    }


def run_workload(
    mode: str, args: argparse.Namespace, wl: Workload, workdir: Path
) -> WorkloadResult:
    """Start a fresh fleet as `wl` plans it, push every image, assign on time and late,
    wait until every node holds its whole set, then scrape and check every tree."""
    n = len(wl.nodes)
    bound = wl.bound().seconds
    timeout = args.timeout or (
        3 * wl.central_floor() + 60 if mode == "central" else max(10 * bound, bound + 120)
    )
    seeder_args: list[str] = []
    if mode == "central":
        seeder_args = [*CENTRAL_SEEDER_ARGS, "--upload-slots", str(CENTRAL_SLOTS_PER_NODE * n)]
    log(f"{mode}: starting 1 seeder and {n} daemons (logs in {workdir})")
    specs = [p.spec() for p in wl.nodes]
    with Cluster(
        workdir,
        n,
        wl.rate,
        seeder_rate=wl.seed_rate,
        p2p=mode == "p2p",
        seeder_args=seeder_args,
        specs=specs,
    ) as cluster:
        push_seconds = 0.0
        for name, tree in wl.trees.items():
            pushed = cluster.push(tree.root, name, chunk_size=args.chunk_size)
            push_seconds += pushed.seconds
        log(
            f"{mode}: pushed {len(wl.trees)} image(s), {format_size(wl.unique_bytes)} distinct, "
            f"in {push_seconds:.1f} s"
        )
        cpu0 = cluster.cpu_seconds()
        progress = ProgressLine(mode)
        timeline = Timeline(cluster, args.timeline)
        late_rules = wl.rules(late=True)
        late_sent: list[float] = []
        t0 = cluster.assign_all(wl.rules(late=False))

        def on_progress(ready: int, total: int, elapsed: float, done: int, size: int) -> None:
            if late_rules and not late_sent and elapsed >= wl.late_at:
                late_sent.append(cluster.assign_all(late_rules) - t0)
                log(f"{mode}: late nodes assigned at {late_sent[0]:.2f} s")
            progress(ready, total, elapsed, done, size)
            timeline(ready, total, elapsed, done, size)

        not_before = {p.node_id: p.start for p in wl.nodes if p.late}
        try:
            times = cluster.wait_sets(
                wl.wants(), t0, timeout, not_before=not_before, on_progress=on_progress
            )
        finally:
            progress.close()
        total = wl.needed_bytes
        timeline(n, n, time.monotonic() - t0, total, total, True)
        log(f"{mode}: all {n} nodes ready; slowest {max(times.values()):.2f} s")
        metrics = cluster.scrape()
        seeder_sent, source = cluster.seeder_sent_bytes()
        seeder_samples = cluster.seeder_metrics() or {}
        cpu1 = cluster.cpu_seconds()
        image_times = {k: dict(v) for k, v in cluster.image_times.items()}
        by_id = {node.node_id: node for node in cluster.nodes}
        for name, tree in wl.trees.items():
            cluster.verify(name, tree, nodes=[by_id[p.node_id] for p in wl.holders(name)])
        log(f"{mode}: every node's trees byte-identical to the pushed trees")
    starts = {p.node_id: (late_sent[0] if p.late and late_sent else 0.0) for p in wl.nodes}
    cpu_delta = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    result = WorkloadResult(
        mode=mode,
        bound=bound,
        times=dict(sorted(times.items())),
        starts=starts,
        own={k: v - starts[k] for k, v in sorted(times.items())},
        image_times=image_times,
        received={k: m.received for k, m in sorted(metrics.items())},
        from_peers=sum(m.from_peers for m in metrics.values()),
        from_seeder=sum(m.from_seeder for m in metrics.values()),
        seeder_sent=seeder_sent,
        seeder_sent_source=source,
        chunks_rejected=sum(m.chunks_rejected for m in metrics.values()),
        cpu_seconds=sum(cpu_delta.values()),
        cpu_by_process={k: round(v, 3) for k, v in sorted(cpu_delta.items())},
        push_seconds=push_seconds,
        verified=True,
        exit_seconds={k: v if v is None else round(v, 2) for k, v in cluster.exit_seconds.items()},
        seeder_counters=_flat(seeder_samples),
        node_counters=_totals(metrics),
        timeline=timeline.points,
    )
    result.stats = workload_stats(result, wl)
    return result


def workload_title(wl: Workload, args: argparse.Namespace) -> str:
    n = len(wl.nodes)
    slow = sum(p.slow for p in wl.nodes)
    late = sum(p.late for p in wl.nodes)
    extra = []
    if slow:
        extra.append(f"{slow} at B/2")
    if late:
        extra.append(f"{late} assigned at +{wl.late_at:.1f} s")
    tail = f" ({', '.join(extra)})" if extra else ""
    if wl.kind == "repave":
        size = wl.base + next(iter(wl.layers.values()))
        return (
            f"Repave: N={n} in 2 zones{tail}, {len(wl.layers)} images of S={format_size(size)} "
            f"(shared base {format_size(wl.base)}), B={rate_text(wl.rate)}"
        )
    total = format_size(wl.unique_bytes)
    return f"Fan-out, mixed fleet: N={n}{tail}, S={total}, B={rate_text(wl.rate)}"


def workload_markdown(results: list[WorkloadResult], wl: Workload, args: argparse.Namespace) -> str:
    b = wl.bound()
    n = len(wl.nodes)
    terms = b.terms
    slowest = max(wl.nodes, key=lambda p: p.start + p.own_bound)
    lines = [f"## {workload_title(wl, args)}", ""]
    if wl.kind == "repave":
        counts = [len(wl.holders(name)) for name in wl.images]
        lines.append(
            f"One seeder and {n} daemons on 127.0.0.1 ({os.cpu_count()} cores, node data on "
            f"{filesystem(args.workdir)}), zones a and b "
            f"alternating. {len(wl.images)} images, each a {format_size(wl.base)} base shared by "
            f"all (same bytes, so the same chunks) plus "
            f"{format_size(next(iter(wl.layers.values())))} of its own; image i goes to "
            f"round(N/(i+1)^{wl.zipf:g}) nodes, picked at random "
            f"({', '.join(map(str, counts))} nodes), through label selectors `img<i>=1`. "
            f"Every node starts empty and every image is assigned at once. Distinct bytes "
            f"{format_size(wl.unique_bytes)}; bytes the nodes need in all (a node needs the "
            f"base once) {format_size(wl.needed_bytes)}."
        )
    else:
        lines.append(
            f"One seeder and {n} daemons on 127.0.0.1 ({os.cpu_count()} cores, node data on "
            f"{filesystem(args.workdir)}), one image of "
            f"{format_size(wl.unique_bytes)} for every node, random bytes."
        )
    lines.append("")
    caps = (
        f"Every cap (up and down, and the seeder's upload) is {rate_text(wl.rate)}"
        + (", a slow node's half of it" if any(p.slow for p in wl.nodes) else "")
        + (
            f"; a late node's daemon runs from the start but gets its assignment "
            f"{wl.late_at:.1f} s after the others (its clock starts then)"
            if any(p.late for p in wl.nodes)
            else ""
        )
        + "."
    )
    lines += [
        caps,
        "",
        f"Bound: T_bound = max(node, seeder, fleet) = **{b.seconds:.2f} s** ({b.binding}), where "
        f"node = the slowest node's start + need / its download cap = {terms['node']:.2f} s "
        f"({slowest.node_id}: {format_size(slowest.need)} from {slowest.start:.1f} s at "
        f"{rate_text(slowest.down)}); seeder = distinct bytes / seeder cap = "
        f"{terms['seeder']:.2f} s; fleet = the instant the seeder's and the started nodes' "
        f"upload caps together could have carried every byte the nodes need = "
        f"{terms['fleet']:.2f} s. A central distributor's floor is "
        f"{wl.central_floor():.1f} s (needed bytes / seeder cap, or the slowest node). "
        "Per node, `own` is its time from its own assignment over need / its download cap.",
        "",
        "| mode | fleet ready s | / T_bound | p50 s | p50 / T_bound | own p50 | own max "
        "| from peers | seeder sent / distinct | received / needed | CPU s/GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s = r.stats
        lines.append(
            f"| {r.mode} | {s['ready']:.2f} | {s['ready_ratio']:.3f} | {s['p50']:.2f} "
            f"| {s['p50_ratio']:.3f} | {s['own_ratio_p50']:.3f} | {s['own_ratio_max']:.3f} "
            f"| {100 * s['peer_share']:.1f}% | {s['seeder_sent_over_unique']:.2f} "
            f"| {s['received_over_needed']:.3f} | {s['cpu_s_per_gib']:.2f} |"
        )
    lines += ["", "Per node (seconds from the first assign to `ready` with its whole set):", ""]
    head = "| node | zone | kind | images | needs | start s | own bound s |"
    head += "".join(f" {r.mode} s | {r.mode} own |" for r in results)
    lines += [
        head,
        "| --- | --- | --- | --- | ---: | ---: | ---: |" + " ---: | ---: |" * len(results),
    ]
    for p in wl.nodes:
        imgs = ",".join(str(image_index(i)) for i in p.images)
        cells = "".join(
            f" {r.times[p.node_id]:.2f} | {r.own[p.node_id] / p.own_bound:.3f} |" for r in results
        )
        lines.append(
            f"| {p.node_id} | {p.zone or '-'} | {p.kind()} | {imgs} | {format_size(p.need)} "
            f"| {p.start:.1f} | {p.own_bound:.2f} |{cells}"
        )
    lines += [
        "",
        "p50 and p90 interpolate between ranks. CPU counts every process from the first "
        "assign until all were ready and scraped, per GiB the nodes needed. "
        "`received / needed` over 1 means bytes fetched twice (a chunk shared by two images, "
        "or endgame duplicates). Every node's every image was checked file by file (SHA-256) "
        "against the pushed tree.",
    ]
    for r in results:
        rate = r.seeder_sent / r.stats["ready"]
        floor = (
            f"; fleet ready is {r.stats['ready'] / wl.central_floor():.2f}x the central floor"
            if r.mode == "central"
            else ""
        )
        lines += [
            "",
            f"{r.mode}: the seeder sent {format_size(r.seeder_sent)} ({r.seeder_sent_source}), "
            f"{rate_text(rate)} on average until fleet ready, {100 * rate / wl.seed_rate:.0f}% "
            f"of its cap{floor}.",
        ]
    late = [p.node_id for p in wl.nodes if p.late]
    if late and results:
        sent = "; ".join(f"{r.mode} at {r.starts[late[0]]:.2f} s" for r in results)
        lines += [
            "",
            f"The late nodes were assigned ({sent}) at the planned {wl.late_at:.1f} s "
            "or just after: `own` counts from that instant.",
        ]
    return "\n".join(lines) + "\n"


def workload_json(results: list[WorkloadResult], wl: Workload, args: argparse.Namespace) -> str:
    b = wl.bound()
    doc: dict[str, Any] = {
        "config": {
            "nodes": len(wl.nodes),
            "rate": wl.rate,
            "chunk_size": args.chunk_size,
            "cpus": os.cpu_count(),
            "data_fs": filesystem(args.workdir),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "title": workload_title(wl, args),
        "plan": wl.plan_json(),
        "bound": {"seconds": b.seconds, "binding": b.binding, "terms": b.terms},
        "central_floor": wl.central_floor(),
        "modes": {r.mode: {**asdict(r), **r.stats} for r in results},
    }
    for m in doc["modes"].values():
        del m["stats"]
    return json.dumps(doc, indent=2) + "\n"


def workload_stem(wl: Workload, args: argparse.Namespace) -> str:
    n = len(wl.nodes)
    if wl.kind == "repave":
        own = next(iter(wl.layers.values()))
        stem = f"repave-N{n}-K{len(wl.layers)}-{size_label(wl.base)}+{size_label(own)}"
    else:
        stem = f"fanout-N{n}-{size_label(wl.unique_bytes)}"
    if args.slow_fraction:
        stem += f"-slow{round(100 * args.slow_fraction)}"
    if args.late_fraction:
        stem += f"-late{round(100 * args.late_fraction)}"
    return stem + rate_suffix(args)


def rate_suffix(args: argparse.Namespace) -> str:
    """`-20MiBps` unless --rate is the default: runs at two rates do not overwrite."""
    return "" if args.rate == DEFAULT_RATE else f"-{size_label(args.rate)}ps"


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)}: {text!r}")
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description="Time N capped daemons pulling one image from one seeder, through the "
        "swarm (p2p) and from the seeder alone (central), against T_min.",
    )
    add_fleet_arguments(p)
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
    g = p.add_argument_group(
        "scenarios",
        "Any of these turns the run into a planned workload: its own Markdown/JSON/PNG "
        "(fanout-...-slowF-lateF or repave-...), a bound per node and for the fleet.",
    )
    g.add_argument(
        "--repave",
        action="store_true",
        help="a mass repave: N nodes in zones a and b, --images images of --size each sharing "
        "a --base, popularity Zipf-like, assigned by label selectors, all nodes empty at once",
    )
    g.add_argument("--images", type=int, default=5, help="repave: images (default 5)")
    g.add_argument(
        "--base",
        type=arg_type(parse_size),
        default=None,
        help="repave: bytes of each image that are the shared base (default half of --size)",
    )
    g.add_argument(
        "--zipf",
        type=float,
        default=1.0,
        help="repave: image i goes to round(N/(i+1)^s) nodes (default s=%(default)s)",
    )
    g.add_argument(
        "--slow-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of nodes capped at half --rate, up and down (default 0)",
    )
    g.add_argument(
        "--late-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of nodes that get their assignment --late-at seconds after the rest",
    )
    g.add_argument(
        "--late-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="when late nodes are assigned (default: half the bound of the on-time fleet)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=1,
        help="which nodes are slow, late, hold which image (default 1)",
    )
    g.add_argument(
        "--plan", action="store_true", help="print the workload and its bound, start nothing"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to make the temp dir (default: the system's, $TMPDIR). Put it on a disk, "
        "as a node's data dir would be: the daemons write chunks with direct I/O, which a "
        "shared disk here takes in its stride, while tmpfs charges them for fresh RAM pages",
    )
    return p


def write_png(
    path: Path,
    curves: Mapping[str, list[float]],
    bound: float,
    title: str,
    bound_label: str,
    marks: Mapping[str, float],
) -> None:
    """The CDF beside the .md/.json; without matplotlib, say how to get it and go on."""
    try:
        write_cdf(path, curves, bound, title, bound_label, marks)
    except ImportError:
        log(f"no {path.name}: matplotlib is missing (pip install -e '.[bench]')")
        return
    log(f"wrote {path}")


def run_guarded(args: argparse.Namespace, work: Path, body: Callable[[], None]) -> int | None:
    """Run `body`; an interrupt or a ClusterError becomes an exit status, and the temp dir
    is removed unless --keep or something failed (its logs are what one reads next)."""
    failed = True  # until every mode ran: keep the logs of anything that went wrong
    try:
        body()
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
    return None


def is_workload(args: argparse.Namespace) -> bool:
    return bool(args.repave or args.slow_fraction or args.late_fraction)


def plan_workload(args: argparse.Namespace) -> Workload:
    """The Workload the options describe; --late-at defaults to half the on-time bound."""
    common: dict[str, Any] = {
        "nodes": args.nodes,
        "rate": args.rate,
        "size": args.size,
        "repave": args.repave,
        "images": args.images,
        "base": args.base,
        "zipf": args.zipf,
        "slow_fraction": args.slow_fraction,
        "seed": args.seed,
    }
    late_at = args.late_at
    if late_at is None:
        late_at = build(**common).bound().seconds / 2 if args.late_fraction else 0.0
    return build(**common, late_fraction=args.late_fraction, late_at=late_at)


def main_workload(args: argparse.Namespace) -> int:
    wl = plan_workload(args)
    b = wl.bound()
    log(
        f"{wl.kind}: T_bound = {b.seconds:.2f} s ({b.binding}; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in b.terms.items())
        + f"); central floor = {wl.central_floor():.1f} s"
    )
    if args.plan:
        print(workload_markdown([], wl, args), end="")
        return 0
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix=f"p2pdist-{wl.kind}-", dir=args.workdir))
    results: list[WorkloadResult] = []

    def body() -> None:
        log(f"writing {len(wl.layers)} image(s), {format_size(wl.unique_bytes)} distinct")
        write_trees(wl, work / "trees", files=args.files)
        for mode in args.modes:
            results.append(run_workload(mode, args, wl, work / mode))
            if not args.keep:
                shutil.rmtree(work / mode, ignore_errors=True)

    status = run_guarded(args, work, body)
    if status is not None:
        return status
    md = workload_markdown(results, wl, args)
    print(md, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = workload_stem(wl, args)
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(workload_json(results, wl, args))
    log(f"wrote {args.out / stem}.md and .json")
    curves = {r.mode: list(r.times.values()) for r in results}
    marks = {"central floor": wl.central_floor()} if "central" in curves else {}
    png = args.out / f"{stem}.png"
    write_png(png, curves, b.seconds, workload_title(wl, args), "T_bound", marks)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 1:
        log("--nodes must be at least 1")
        return 2
    if not (0 <= args.slow_fraction <= 1 and 0 <= args.late_fraction <= 1) or args.images < 1:
        log("--slow-fraction and --late-fraction are within [0, 1]; --images at least 1")
        return 2
    if is_workload(args):
        return main_workload(args)
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="p2pdist-fanout-", dir=args.workdir))
    results: list[ModeResult] = []
    trees: list[ImageTree] = []

    def body() -> None:
        log(f"writing a {format_size(args.size)} image of random bytes")
        tree = make_random_tree(work / "tree", args.size, files=args.files)
        trees.append(tree)
        rate = args.rate
        tmin = t_min(tree.total_bytes, args.nodes, down=rate, up=rate, seed=rate)
        log(f"T_min = {tmin:.2f} s; central floor = {args.nodes * tree.total_bytes / rate:.1f} s")
        for mode in args.modes:
            results.append(run_mode(mode, args, tree, work / mode, tmin))
            if not args.keep:
                shutil.rmtree(work / mode, ignore_errors=True)

    status = run_guarded(args, work, body)
    if status is not None:
        return status
    (tree,) = trees
    md = markdown(results, args, tree)
    print(md, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fanout-N{args.nodes}-{size_label(args.size)}{rate_suffix(args)}"
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(result_json(results, args, tree))
    log(f"wrote {args.out / stem}.md and .json")
    title = f"Fan-out: N={args.nodes}, S={format_size(tree.total_bytes)}, B={rate_text(args.rate)}"
    curves = {r.mode: list(r.times.values()) for r in results}
    floor = args.nodes * tree.total_bytes / args.rate
    marks = {"central floor": floor} if "central" in curves else {}
    write_png(args.out / f"{stem}.png", curves, results[0].t_min, title, "T_min", marks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
