"""`make demo`: watch eight capped nodes fill from one seeder through the swarm.

One seeder and N daemons on 127.0.0.1, every one capped at the same rate B;
a random image of S bytes is pushed and assigned to all of them at once. A
central distributor would need N*S/B; the swarm aims at T_min (about S/B),
whatever N is. Each step is printed as it happens.

    python -m bench.demo [--nodes 8] [--size 256MiB] [--rate 10MiB]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster import (
    Cluster,
    ClusterError,
    add_fleet_arguments,
    install_signal_handlers,
    make_random_tree,
    quantile,
    t_min,
)
from manifests.units import format_size

IMAGE = "demo/image:v1"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="One seeder and N capped daemons on loopback: push an image, assign it "
        "to all, and watch every node get ready in about the time one node needs.",
    )
    add_fleet_arguments(p)
    return p


def run(args: argparse.Namespace, work: Path) -> None:
    n, size, rate = args.nodes, args.size, args.rate
    tmin = t_min(size, n, down=rate, up=rate, seed=rate)
    say(
        f"Starting 1 seeder and {n} nodes on 127.0.0.1; every node's upload and download "
        f"and the seeder's upload are capped at {format_size(rate)}/s."
    )
    t = time.monotonic()
    with Cluster(work / "cluster", n, rate) as cluster:
        say(
            f"  seeder at {cluster.seeder_url}, {n} nodes up in {time.monotonic() - t:.1f} s "
            f"(logs in {work / 'cluster'})"
        )
        say(f"Writing a {format_size(size)} image of random bytes...")
        tree = make_random_tree(work / "image", size)
        pushed = cluster.push(tree.root, IMAGE, chunk_size=args.chunk_size)
        say(
            f"Pushed {IMAGE}: {format_size(tree.total_bytes)} in {tree.files} files, "
            f"in {pushed.seconds:.1f} s (digest {pushed.digest[:16]})."
        )
        say(
            f"Assigning it to every node (selector bench=1). The floor is T_min = {tmin:.1f} s; "
            f"one central distributor would need {n * size / rate:.1f} s."
        )
        t0 = cluster.assign(IMAGE)

        def ready(node: str, seconds: float) -> None:
            say(f"  {seconds:7.2f} s  {node} ready  ({seconds / tmin:.2f}x T_min)")

        next_note = [5.0]

        def progress(ready: int, total: int, elapsed: float, done: int, size: int) -> None:
            if elapsed >= next_note[0] and ready < total:
                next_note[0] += 5.0
                share = f"{100 * done / size:.0f}%" if size else "0%"
                say(
                    f"  {elapsed:7.2f} s  ... {share} of all bytes delivered, {ready}/{total} ready"
                )

        times = cluster.wait_ready(
            IMAGE,
            since=t0,
            timeout=max(10 * tmin, tmin + 120),
            on_ready=ready,
            on_progress=progress,
        )
        metrics = cluster.scrape()
        seeder_sent, _ = cluster.seeder_sent_bytes()
        cluster.verify(IMAGE, tree)

    values = list(times.values())
    say()
    say("| node | seconds | / T_min |")
    say("| --- | ---: | ---: |")
    for node, secs in sorted(times.items()):
        say(f"| {node} | {secs:.2f} | {secs / tmin:.2f} |")
    for label, v in (
        ("p50", quantile(values, 0.5)),
        ("p90", quantile(values, 0.9)),
        ("max", max(values)),
    ):
        say(f"| **{label}** | {v:.2f} | {v / tmin:.2f} |")
    say()
    peers = sum(m.from_peers for m in metrics.values())
    seeder = sum(m.from_seeder for m in metrics.values())
    share = peers / (peers + seeder) if peers + seeder else 0.0
    say(
        f"Bytes the nodes received: {100 * share:.1f}% from peers, {100 * (1 - share):.1f}% "
        f"from the seeder; the seeder sent {seeder_sent / tree.total_bytes:.2f}x the image."
    )
    say(
        f"All {n} trees are byte-identical to the pushed tree "
        f"({tree.files} files, SHA-256 of every file checked)."
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 1:
        print("demo: --nodes must be at least 1", file=sys.stderr)
        return 2
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="p2pdist-demo-"))
    keep = args.keep
    try:
        run(args, work)
    except KeyboardInterrupt:
        say("Interrupted; every process stopped.")
        return 130
    except ClusterError as e:
        keep = True
        say(f"FAILED: {e}")
        return 1
    finally:
        if keep:
            say(f"Kept {work}.")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
