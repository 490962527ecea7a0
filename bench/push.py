"""Push benchmark: first push, re-push and `distd pull` of a ~1 GiB tree through a real seeder.

Why these three: the first push is bounded by hashing, compression and the
seeder's verify+fsync; a re-push must be bounded by hashing alone (nothing is
compressed or sent); a pull shows the other direction. CPU seconds per GiB count
every process involved (this one, the seeder, the pull), since on a 2-core
machine CPU is what limits throughput.

    python -m bench.push [--size 1GiB] [--keep] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from manifests.chunking import DEFAULT_CHUNK_SIZE
from manifests.client import SeederClient, SeederError
from manifests.progress import Progress
from manifests.push import DEFAULT_PARALLEL_UPLOADS, PushError, PushSummary, push_tree
from manifests.units import format_size, parse_size

FIRST_PUSH_FLOOR_MBPS = 200.0
REPUSH_FLOOR_MBPS = 800.0
RESULTS = Path(__file__).resolve().parent / "results" / "push.json"
NAME = "bench/push:v1"
BLOCK = 1 << 20
GIB = 1 << 30


def log(msg: str) -> None:
    print(f"bench.push: {msg}", file=sys.stderr, flush=True)


def _run(coro: Coroutine[Any, Any, PushSummary]) -> PushSummary:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# -- the tree --


def _log_pool(rng: random.Random, n: int = 40_000) -> list[bytes]:
    """Log-like lines: a few templates, varied ids, times and numbers (compresses ~3-5x)."""
    levels = [b"INFO", b"INFO", b"INFO", b"DEBUG", b"WARN", b"ERROR"]
    comps = [b"api.http", b"db.pool", b"cache", b"scheduler", b"worker.jobs", b"auth"]
    msgs = [
        b"request completed method=GET path=/v1/items/%d status=200",
        b"request completed method=POST path=/v1/orders status=201 bytes=%d",
        b"connection acquired from pool size=%d",
        b"cache miss key=user:%d:profile",
        b"job finished queue=default attempts=1 run_ms=%d",
        b"token refreshed for session %d",
        b"slow query detected table=events rows=%d",
    ]
    out = []
    for _ in range(n):
        msg = rng.choice(msgs) % rng.randrange(1, 10**6)
        out.append(
            b"2026-11-%02d %02d:%02d:%02d.%03d %s [%s] %s trace=%016x latency_ms=%d\n"
            % (
                rng.randrange(1, 29),
                rng.randrange(24),
                rng.randrange(60),
                rng.randrange(60),
                rng.randrange(1000),
                rng.choice(levels),
                rng.choice(comps),
                msg,
                rng.getrandbits(64),
                rng.randrange(1, 5000),
            )
        )
    return out


class _Gen:
    """Fresh (never repeating) blocks of random or log-like bytes, so chunks do not dedupe."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = _log_pool(self.rng)

    def random_block(self, n: int) -> bytes:
        return os.urandom(n)

    def text_block(self, n: int) -> bytes:
        lines = self.rng.choices(self.pool, k=n // 90 + 64)
        data = b"".join(lines)
        while len(data) < n:
            data += b"".join(self.rng.choices(self.pool, k=1024))
        return data[:n]


def _write(path: Path, size: int, kinds: Iterator[str], gen: _Gen, bar: Progress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(gen.random_block(n) if next(kinds) == "r" else gen.text_block(n))
            left -= n
            bar.advance(n)


def _spread(total: int, count: int, rng: random.Random) -> list[int]:
    """`count` varied sizes (log-normal, from KiBs to tens of MiBs) that sum to `total`."""
    weights = [rng.lognormvariate(0, 1.3) for _ in range(count)]
    scale = total / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


def build_tree(root: Path, size: int, seed: int = 7) -> tuple[int, int]:
    """Half random, half log-like bytes: one big mixed file (a disk image) plus a few dozen.

    Returns (files, bytes).
    """
    rng = random.Random(seed)
    gen = _Gen(seed)
    big = size // 4
    random_rest = size // 2 - big // 2
    text_rest = size - big - random_rest
    files: list[tuple[Path, int, str]] = [(root / "images" / "disk.img", big, "mixed")]
    for i, n in enumerate(_spread(random_rest, 14, rng)):
        files.append((root / "blobs" / "sha256" / f"{i:02d}-{rng.getrandbits(48):012x}", n, "r"))
    for i, n in enumerate(_spread(text_rest, 22, rng)):
        files.append((root / "var" / "log" / f"app-{i:02d}" / f"service-{i}.log", n, "t"))
    with Progress(sum(n for _, n, _ in files), "building ") as bar:
        for path, n, kind in files:
            if kind == "mixed":
                kinds: Iterator[str] = iter(("r", "t") * (n // BLOCK + 1))
            else:
                kinds = iter([kind] * (n // BLOCK + 1))
            _write(path, n, kinds, gen, bar)
    small = root / "etc" / "conf.d"
    small.mkdir(parents=True)
    for i in range(8):
        (small / f"{i:02d}.conf").write_bytes(gen.text_block(rng.randrange(100, 4000)))
    (root / "empty").mkdir()
    (root / "etc" / "motd").write_bytes(b"")
    os.symlink("conf.d/00.conf", root / "etc" / "default.conf")
    total = sum(n for _, n, _ in files) + sum(p.stat().st_size for p in small.iterdir())
    return len(files) + 9, total


# -- processes --


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _command(name: str, via_module: bool = False) -> list[str]:
    """The project's console script beside this interpreter, or its module.

    `via_module` gives a command line without "<name> run" in it, so that cleanup by
    name pattern elsewhere on a shared machine (pkill -f "seeder run") spares us.
    """
    script = Path(sys.executable).parent / name
    if script.exists() and not via_module:
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {name}.cli import main; sys.exit(main())"]


def _die_with_parent() -> None:
    # Linux: the seeder gets SIGKILL if this bench dies without cleaning up (kill -9).
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _proc_cpu(pid: int) -> float:
    """utime + stime of a live process in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Seeder:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_seeder(data_dir: Path, log_path: Path) -> Seeder:
    port = _free_port()
    token = secrets.token_hex(16)
    cmd = [
        *_command("seeder", via_module=True),
        "run",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        "--push-token",
        token,
        # One puller, and no swarm to protect: let it fetch as fast as it can.
        "--upload-slots",
        "64",
        "--no-superseed",
    ]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            preexec_fn=_die_with_parent,
        )
    seeder = Seeder(proc, f"http://127.0.0.1:{port}", token, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seeder exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{seeder.url}/healthz", timeout=1) as r:
                if r.status == 200:
                    return seeder
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    seeder.stop()
    raise RuntimeError(f"seeder did not become healthy in 30 s; see {log_path}")


# -- measurements --


@dataclass
class Step:
    name: str
    seconds: float
    mb_per_s: float
    cpu_seconds: float
    cpu_s_per_gib: float
    sent_bytes: int | None = None
    floor_mb_per_s: float | None = None
    detail: dict[str, Any] | None = None

    @property
    def ok(self) -> bool | None:
        return None if self.floor_mb_per_s is None else self.mb_per_s >= self.floor_mb_per_s


def measure_push(seeder: Seeder, root: Path, label: str, floor: float, parallel: int) -> Step:
    async def go() -> PushSummary:
        async with SeederClient(seeder.url, token=seeder.token) as client:
            return await push_tree(
                client, root, NAME, DEFAULT_CHUNK_SIZE, parallel_uploads=parallel
            )

    self0, seeder0 = _self_cpu(), seeder.cpu()
    s = _run(go())
    client_cpu, seeder_cpu = _self_cpu() - self0, seeder.cpu() - seeder0
    cpu = client_cpu + seeder_cpu
    log(s.line())
    return Step(
        name=label,
        seconds=s.seconds,
        mb_per_s=s.mb_per_s,
        cpu_seconds=cpu,
        cpu_s_per_gib=cpu / (s.total_bytes / GIB),
        sent_bytes=s.uploaded_bytes,
        floor_mb_per_s=floor,
        detail={
            "client_cpu_seconds": round(client_cpu, 3),
            "seeder_cpu_seconds": round(seeder_cpu, 3),
            "scan_seconds": round(s.scan_seconds, 3),
            "upload_seconds": round(s.upload_seconds, 3),
            "uploaded_chunks": s.uploaded_chunks,
            "unique_chunks": s.unique_chunks,
            "digest": s.digest,
        },
    )


def measure_pull(seeder: Seeder, work: Path, total: int) -> Step | str:
    try:
        import distd.cli  # noqa: F401
    except ImportError:
        return "distd pull is not available (distd/cli.py missing): skipped"
    dest = work / "pulled"
    cmd = [
        *_command("distd"),
        "pull",
        NAME,
        "--seeder",
        seeder.url,
        "--dest",
        str(dest),
        "--data-dir",
        str(work / "distd-data"),
    ]
    cpu0 = _children_cpu() + seeder.cpu()
    t0 = time.monotonic()
    # stderr goes to a file, not the terminal: pull draws its own bar, and on failure
    # its last line is the reason to report.
    err_path = work / "pull.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    cpu = _children_cpu() + seeder.cpu() - cpu0
    if proc.returncode != 0:
        lines = err_path.read_text(errors="replace").strip().splitlines()
        return f"distd pull exited {proc.returncode} ({lines[-1] if lines else 'no message'})"
    out = proc.stdout.decode(errors="replace").strip().splitlines()
    if out:
        log(out[-1])
    return Step(
        name="distd pull",
        seconds=seconds,
        mb_per_s=total / seconds / 1e6,
        cpu_seconds=cpu,
        cpu_s_per_gib=cpu / (total / GIB),
    )


def markdown(steps: list[Step], notes: list[str], files: int, total: int, load: list[float]) -> str:
    lines = [
        f"Tree: {files} files, {format_size(total)} (half random, half log-like), "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} before the run.",
        "",
        "| step | seconds | MB/s | CPU s/GiB | sent | floor MB/s | ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in steps:
        sent = "" if s.sent_bytes is None else format_size(s.sent_bytes)
        floor = "" if s.floor_mb_per_s is None else f"{s.floor_mb_per_s:.0f}"
        ok = {None: "", True: "yes", False: "**NO**"}[s.ok]
        lines.append(
            f"| {s.name} | {s.seconds:.2f} | {s.mb_per_s:.0f} | {s.cpu_s_per_gib:.2f} "
            f"| {sent} | {floor} | {ok} |"
        )
    lines.extend(f"\n{n}" for n in notes)
    return "\n".join(lines)


def median_steps(runs: list[list[Step]]) -> list[Step]:
    """Per step name, the run with the median throughput (a loaded machine is noisy)."""
    names = list(dict.fromkeys(s.name for run in runs for s in run))
    out = []
    for name in names:
        same = sorted((s for run in runs for s in run if s.name == name), key=lambda s: s.mb_per_s)
        out.append(same[len(same) // 2])
    return out


def step_json(s: Step) -> dict[str, Any]:
    return {
        "name": s.name,
        "seconds": round(s.seconds, 3),
        "mb_per_s": round(s.mb_per_s, 1),
        "cpu_seconds": round(s.cpu_seconds, 3),
        "cpu_s_per_gib": round(s.cpu_s_per_gib, 3),
        "sent_bytes": s.sent_bytes,
        "floor_mb_per_s": s.floor_mb_per_s,
        "ok": s.ok,
        **(s.detail or {}),
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.push",
        description="Measure manifests push (first and repeat) and distd pull "
        "through a real local seeder.",
    )
    p.add_argument("--size", type=parse_size, default=GIB, help="tree size (default 1GiB)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (tree, seeder data)")
    p.add_argument(
        "--repeat", type=int, default=3, help="push runs, each into a fresh seeder (default 3)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL_UPLOADS,
        help=f"uploads in flight (default {DEFAULT_PARALLEL_UPLOADS})",
    )
    p.add_argument("--workdir", default=None, help="where to make the temp dir")
    p.add_argument("--check", action="store_true", help="exit 1 when a floor is missed")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON output path")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    # Other work on the machine skews every figure: record how busy it was.
    load = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="p2pdist-bench-push-", dir=args.workdir))
    seeder: Seeder | None = None
    runs: list[list[Step]] = []
    notes = ["The tree was just written and synced: it is in the page cache (as after a build)."]
    try:
        log(f"building a {format_size(args.size)} tree in {work}/tree")
        files, total = build_tree(work / "tree", args.size)
        # Flush the new tree to disk now, or its writeback competes with the seeder's
        # fsyncs during the first push (a real tree was written long before its push).
        os.sync()
        for i in range(args.repeat):
            # A fresh, empty seeder each time, so every "first push" really is one.
            data = work / f"seeder-data-{i}"
            seeder = start_seeder(data, work / f"seeder-{i}.log")
            log(f"run {i + 1}/{args.repeat}: seeder pid {seeder.proc.pid} at {seeder.url}")
            tree = work / "tree"
            run = [
                measure_push(seeder, tree, "first push", FIRST_PUSH_FLOOR_MBPS, args.parallel),
                measure_push(seeder, tree, "re-push", REPUSH_FLOOR_MBPS, args.parallel),
            ]
            if i == args.repeat - 1:
                pulled = measure_pull(seeder, work, total)
                if isinstance(pulled, str):
                    notes.append(pulled)
                else:
                    run.append(pulled)
            runs.append(run)
            seeder.stop()
            seeder = None
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (SeederError, PushError, RuntimeError) as e:
        log(f"failed: {e}")
        if seeder is not None:
            code = seeder.proc.poll()
            state = "running" if code is None else f"exited with {code}"
            tail = seeder.log_path.read_text(errors="replace").splitlines()[-5:]
            log(f"seeder {state}; its log ends:\n" + "\n".join(tail))
        return 1
    finally:
        if seeder is not None:
            seeder.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    steps = median_steps(runs)
    if args.repeat > 1:
        notes.append(f"Each figure is the median of {args.repeat} runs (all runs in the JSON).")
    print(markdown(steps, notes, files, total, load))
    doc = {
        "tree": {"files": files, "bytes": total, "cpus": os.cpu_count()},
        "load_average_at_start": load,
        "parallel_uploads": args.parallel,
        "steps": [step_json(s) for s in steps],
        "runs": [[step_json(s) for s in run] for run in runs],
        "notes": notes,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {args.results}")
    missed = [s.name for s in steps if s.ok is False]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
