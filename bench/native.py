"""The simulator and the scheduling code it drives, compiled to C extensions with mypyc.

At fleet scale the simulator's cost is Python's own: millions of scheduler decisions,
each a few dozen attribute reads, dict lookups and heap operations. mypyc (part of
mypy, already our type checker) compiles the same annotated source to C: the same
result event for event, in about half the time. `python -m bench.sim --native`
builds once per version of the source, into `build/native/<key>/` beside a copy of
the packages, and reruns itself from there; the daemon and the tests run the plain
source (one test checks that both give the same result). A build takes about a
minute and needs a C compiler; only the latest is kept, and `make clean` removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bench

ROOT = Path(bench.__file__).resolve().parent.parent
PACKAGES = ("bench", "distd", "manifests", "seeder")
# What the simulator runs per event; the rest of the packages stay interpreted.
COMPILED = (
    "bench/sim.py",
    "seeder/tracker.py",
    "distd/swarm/bitfield.py",
    "distd/swarm/holds.py",
    "distd/swarm/peers.py",
    "distd/swarm/picker.py",
    "distd/swarm/scheduler.py",
    "distd/swarm/superseed.py",
)


class BuildError(RuntimeError):
    pass


def is_compiled() -> bool:
    """True when this process runs the compiled simulator."""
    from bench import sim

    return not sim.__file__.endswith(".py")


def _sources(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def build_key(root: Path = ROOT) -> str:
    """Changes with any source file, the Python version or mypyc's: a stale build is
    never run."""
    from mypy.version import __version__ as mypy_version

    h = hashlib.sha256(f"{sys.version}\0{mypy_version}\0".encode())
    for path in _sources(root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(root: Path = ROOT, quiet: bool = False) -> Path:
    """The directory to put first on `sys.path` for the compiled simulator; built if
    missing (a copy of the packages, the modules of `COMPILED` compiled in place)."""
    out = root / "build" / "native" / build_key(root)
    if (out / ".built").exists():
        return out
    if not quiet:
        print("building the native simulator (mypyc, about a minute)...", file=sys.stderr)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        for pkg in PACKAGES:
            shutil.copytree(root / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        run = subprocess.run(
            [sys.executable, "-m", "mypyc", *COMPILED],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if run.returncode != 0:
            log = out.parent / "failed.log"
            log.write_text(run.stdout)
            raise BuildError(f"mypyc failed (exit {run.returncode}); its output is in {log}")
        (tmp / ".built").touch()
        with contextlib.suppress(OSError):  # built meanwhile by another run: as good
            tmp.rename(out)
    finally:  # nothing half-built stays behind, interrupted or not
        shutil.rmtree(tmp, ignore_errors=True)
    # Builds of older sources (17 MB each) are never run again; one is left per edit
    # otherwise. A run still going from one has loaded its modules already.
    for old in out.parent.iterdir():
        if old.is_dir() and old != out and ".tmp" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return out


def command(path: Path, argv: list[str]) -> list[str]:
    """The command line that runs the simulator's `main(argv)` from the build at `path`."""
    # First on sys.path, ahead of the working directory and the editable install.
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from bench.sim import main; "
    code += "sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, str(path), *argv]


def reexec(argv: list[str]) -> None:
    """Replace this process with the simulator's `main(argv)` run from the native build."""
    cmd = command(build(), argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
