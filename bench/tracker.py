"""Tracker bench: announces per second that a real `seeder run` answers on loopback.

It starts a seeder process (the bench's `Cluster` with no daemons), fills the
tracker with a swarm of SWARM members per image (so each announce samples a
realistic swarm), then drives POST /v1/announce from CLIENTS keep-alive
connections spread over PROCS client processes for SECONDS, each client cycling
through the swarm's members as a daemon would. Requests are pre-encoded and sent
over raw asyncio streams, so the client costs far less CPU than the seeder and the
figure is the seeder's. Reports announces/s, latency percentiles and the seeder's
CPU seconds per 1,000 announces. Issue 6's target on the 2-core dev machine:
at least 2,000 announces/s.

    python -m bench.tracker [--swarm 1000] [--clients 64] [--seconds 10] [--procs 1]
    python -m bench.tracker --profile tracker.svg   # py-spy on the seeder while measured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.cluster import Cluster, ClusterError, install_signal_handlers, quantile
from manifests import wire

TARGET = 2000.0
ZONES = ("a", "b", "c")


@dataclass
class ClientResult:
    announces: int
    errors: int
    latencies: list[float]  # a sample, seconds


@dataclass
class Report:
    announces_per_s: float
    announces: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    seeder_cpu_s_per_1000: float
    swarm: int
    images: int
    clients: int
    procs: int
    peers_per_answer: int
    cpus: int
    loadavg_before: float
    python: str


def request_bytes(host: str, port: int, image: str, member: int) -> bytes:
    """One announce, exactly as a daemon's SeederClient sends it (msgpack both ways)."""
    body = wire.pack(
        {
            "image": image,
            "node_id": f"bench-node-{member:05d}",
            "address": f"10.{member >> 8 & 255}.{member & 255}.1:7701",
            "zone": ZONES[member % len(ZONES)],
            "have": member % 100,
            "total": 100,
        }
    )
    head = (
        f"POST /v1/announce HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Accept: {wire.MSGPACK}\r\nContent-Type: {wire.MSGPACK}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    host: str, port: int, requests: list[bytes], offset: int, until: float, out: ClientResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while time.monotonic() < until:
            t0 = time.monotonic()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == b"200":
                out.announces += 1
            else:
                out.errors += 1
            if out.announces % 16 == 0:
                out.latencies.append(time.monotonic() - t0)
    finally:
        writer.close()


def drive(
    host: str, port: int, requests: list[bytes], clients: int, start: float, seconds: float
) -> ClientResult:
    """One client process: `clients` connections from `start` (monotonic) for `seconds`."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> ClientResult:
        out = ClientResult(0, 0, [])
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        until = time.monotonic() + seconds
        step = max(1, len(requests) // max(1, clients))
        await asyncio.gather(
            *(_client(host, port, requests, c * step, until, out) for c in range(clients))
        )
        return out

    return asyncio.run(run())


def bench(args: argparse.Namespace, work: Path) -> Report:
    spy = None
    if args.profile:
        spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if spy is None:
            raise ClusterError("--profile needs py-spy (pip install py-spy)")
    load = os.getloadavg()[0]
    with Cluster(work, nodes=0) as cluster:
        assert cluster.seeder is not None
        host, _, port_text = cluster.seeder_url.removeprefix("http://").partition(":")
        port = int(port_text)
        images = [f"{i:064x}" for i in range(1, args.images + 1)]
        requests = [
            request_bytes(host, port, image, m) for image in images for m in range(args.swarm)
        ]
        _prefill(host, port, requests)
        peers = _peers_per_answer(host, port, requests[0])
        cpu0 = cluster.cpu_seconds()["seeder"]
        start = time.monotonic() + 0.5
        per_proc = [
            args.clients // args.procs + (p < args.clients % args.procs) for p in range(args.procs)
        ]
        profiler = None
        if spy is not None:
            # Attached for the measured window only: no start-up or prefill in the flame graph.
            duration = str(max(1, int(args.seconds)))
            pid = str(cluster.seeder.pid)
            cmd = [spy, "record", "--nonblocking", "--pid", pid, "--duration", duration]
            profiler = subprocess.Popen([*cmd, "-o", args.profile], stdout=subprocess.DEVNULL)
        with ProcessPoolExecutor(args.procs) as pool:
            futures = [
                pool.submit(drive, host, port, requests, n, start, args.seconds) for n in per_proc
            ]
            results = [f.result() for f in futures]
        if profiler is not None:
            profiler.wait(60)
        cpu = cluster.cpu_seconds()["seeder"] - cpu0
    announces = sum(r.announces for r in results)
    latencies = [x for r in results for x in r.latencies] or [0.0]
    return Report(
        announces_per_s=announces / args.seconds,
        announces=announces,
        errors=sum(r.errors for r in results),
        seconds=args.seconds,
        p50_ms=1000 * quantile(latencies, 0.5),
        p99_ms=1000 * quantile(latencies, 0.99),
        seeder_cpu_s_per_1000=1000 * cpu / max(1, announces),
        swarm=args.swarm,
        images=args.images,
        clients=args.clients,
        procs=args.procs,
        peers_per_answer=peers,
        cpus=os.cpu_count() or 0,
        loadavg_before=load,
        python=platform.python_version(),
    )


def _prefill(host: str, port: int, requests: list[bytes]) -> None:
    """Announce every member once (in order), so each swarm is full before the clock starts."""

    async def run() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        for req in requests:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    asyncio.run(run())


def _peers_per_answer(host: str, port: int, req: bytes) -> int:
    async def run() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = wire.unpack(await reader.readexactly(length))
        writer.close()
        return len(body["peers"])

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.tracker",
        description="Announces per second a real seeder's tracker answers on loopback, with "
        "many concurrent keep-alive clients cycling through full swarms.",
    )
    p.add_argument(
        "--swarm", type=int, default=1000, help="members per image (default %(default)s)"
    )
    p.add_argument("--images", type=int, default=1, help="images (swarms) (default %(default)s)")
    p.add_argument(
        "--clients", type=int, default=64, help="concurrent connections (default %(default)s)"
    )
    p.add_argument(
        "--procs", type=int, default=1, help="client processes sharing them (default %(default)s)"
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="measured duration (default %(default)s)"
    )
    p.add_argument(
        "--profile", metavar="SVG", help="py-spy record the seeder into SVG while measuring"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.swarm, args.images, args.clients, args.procs) < 1 or args.seconds <= 0:
        print("bench.tracker: every count must be at least 1", file=sys.stderr)
        return 2
    install_signal_handlers()
    work = Path(tempfile.mkdtemp(prefix="p2pdist-tracker-"))
    try:
        report = bench(args, work)
    except ClusterError as e:
        print(f"bench.tracker: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "meets" if report.announces_per_s >= TARGET else "is BELOW"
    print(
        f"{report.announces_per_s:,.0f} announces/s ({report.announces:,} in {report.seconds:g} s, "
        f"{report.errors} errors) with {report.clients} clients in {report.procs} process(es), "
        f"swarm of {report.swarm} x {report.images} image(s), {report.peers_per_answer} peers "
        f"per answer; latency p50 {report.p50_ms:.1f} ms, p99 {report.p99_ms:.1f} ms; seeder "
        f"{report.seeder_cpu_s_per_1000:.3f} CPU s per 1,000 announces; "
        f"{verdict} the {TARGET:,.0f}/s target (load average before: {report.loadavg_before:.1f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
