"""The `distd` command: `distd pull` now, `distd run` (the node daemon) next.

Flags that describe the node rather than one invocation (seeder, data dir,
parallelism) also come from `DISTD_<FLAG>` environment variables. Exit codes:
0 success, 1 a one-line `distd: ...` error, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from distd.httpserver import install_uvloop
from distd.materialize import DestExistsError, MaterializeError
from distd.pull import DEFAULT_PARALLEL, PullError, PullResult, pull_image
from distd.store import ChunkStore
from manifests import wire
from manifests.chunking import ChunkError
from manifests.client import SeederClient, SeederError
from manifests.model import Kind, ManifestError
from manifests.progress import Progress
from manifests.units import format_size

Command = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "p2pdist"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- distd pull ---------------------------------------------------------------


def _summary(name: str, r: PullResult) -> str:
    secs = max(r.seconds, 1e-9)
    files = sum(1 for e in r.manifest.entries if e.kind is Kind.FILE)
    return (
        f"pulled {name} ({r.digest[:12]}) into {r.dest}: "
        f"{format_size(r.bytes_total)} in {files} files, "
        f"{r.fetch.chunks_fetched} chunks fetched ({format_size(r.fetch.bytes_fetched)}), "
        f"{r.fetch.chunks_held} already held, "
        f"{r.seconds:.1f} s, {r.bytes_total / secs / 1e6:.1f} MB/s"
    )


async def _pull(args: argparse.Namespace) -> PullResult:
    store = await asyncio.to_thread(ChunkStore, args.data_dir)
    progress = Progress if sys.stderr.isatty() else None
    async with SeederClient(args.seeder) as seeder:
        return await pull_image(
            seeder,
            args.name,
            store,
            args.dest,
            args.replace,
            progress,
            parallel=args.parallel,
        )


def cmd_pull(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.seeder:
        parser.error("the following arguments are required: --seeder (or set DISTD_SEEDER)")
    if not wire.is_digest(args.name):
        try:
            wire.check_name(args.name)
        except ValueError as e:
            parser.error(str(e))
    install_uvloop()
    try:
        result = asyncio.run(_pull(args))
    except DestExistsError as e:
        return _fail(f"{e} (pass --replace to swap it)")
    except ManifestError as e:
        return _fail(f"manifest rejected: {e}")
    except (SeederError, MaterializeError, PullError, ChunkError) as e:
        return _fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    print(_summary(args.name, result), flush=True)
    return 0


# -- the parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="distd",
        description="p2pdist node: pull images and (soon) serve them to peers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pull = sub.add_parser(
        "pull",
        help="fetch an image from the seeder and materialize it atomically",
        description="Fetch NAME's manifest and every chunk the local store lacks, verify "
        "them, and build the tree at --dest (in a temp dir beside it, renamed into place).",
    )
    pull.add_argument("name", metavar="NAME", help="image name (team/app:tag) or manifest digest")
    pull.add_argument(
        "--seeder",
        default=env.get("DISTD_SEEDER"),
        metavar="URL",
        help="seeder base URL (env DISTD_SEEDER)",
    )
    pull.add_argument("--dest", required=True, type=Path, metavar="DIR", help="where the tree goes")
    pull.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env["DISTD_DATA_DIR"]) if env.get("DISTD_DATA_DIR") else default_data_dir(),
        metavar="DIR",
        help="chunk store location (env DISTD_DATA_DIR; default ~/.cache/p2pdist)",
    )
    pull.add_argument(
        "--replace", action="store_true", help="atomically swap an existing --dest for the image"
    )
    pull.add_argument(
        "--parallel",
        type=_positive_int,
        default=env.get("DISTD_PARALLEL", str(DEFAULT_PARALLEL)),  # argparse applies `type`
        metavar="N",
        help=f"chunk downloads in flight (env DISTD_PARALLEL; default {DEFAULT_PARALLEL})",
    )
    pull.set_defaults(func=cmd_pull, parser=pull)

    # `distd run` (the node daemon: assignments, swarm, peer server, status API) is
    # added here as its own subparser with `set_defaults(func=cmd_run, parser=run)`.

    return parser


def _fail(message: str) -> int:
    print(f"distd: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args, args.parser)
    except KeyboardInterrupt:
        print("distd: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
