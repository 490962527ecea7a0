"""The `distd` command: `distd pull` (one image, through the swarm) and `distd run` (the daemon).

Flags that describe the node rather than one invocation (seeder, data dir,
parallelism) also come from `DISTD_<FLAG>` environment variables. Exit codes:
0 success, 1 a one-line `distd: ...` error, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distd.daemon import Daemon, DaemonConfig
from distd.httpserver import install_uvloop, server_ssl_context
from distd.materialize import DestExistsError, MaterializeError
from distd.pull import DEFAULT_PARALLEL, PullError, PullResult, pull_image
from distd.store import ChunkStore
from distd.swarm.scheduler import SchedulerConfig
from distd.swarm_pull import (
    DEFAULT_ANNOUNCE_INTERVAL,
    DEFAULT_STALL_TIMEOUT,
    SwarmPull,
    SwarmPullConfig,
    default_node_id,
)
from manifests import wire
from manifests.chunking import ChunkError
from manifests.client import SeederClient, SeederError, client_ssl_context
from manifests.model import Kind, ManifestError
from manifests.progress import Progress
from manifests.units import EnvError, env_bool, format_size, parse_rate, parse_size

Command = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "p2pdist"


def _grace_seconds(text: str) -> float:
    """--gc-grace: a NaN would never compare due, a negative one is a typo."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not seconds: {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- distd pull ---------------------------------------------------------------


def _summary(name: str, r: PullResult, p2p: bool = True) -> str:
    secs = max(r.seconds, 1e-9)
    files = sum(1 for e in r.manifest.entries if e.kind is Kind.FILE)
    peers = ""
    if p2p:
        share = r.fetch.bytes_from_peers / r.fetch.bytes_fetched if r.fetch.bytes_fetched else 0
        peers = f"{format_size(r.fetch.bytes_from_peers)} from peers ({share:.0%}), "
    return (
        f"pulled {name} ({r.digest[:12]}) into {r.dest}: "
        f"{format_size(r.bytes_total)} in {files} files, "
        f"{r.fetch.chunks_fetched} chunks fetched ({format_size(r.fetch.bytes_fetched)}), "
        f"{r.fetch.chunks_held} already held, {peers}"
        f"{r.seconds:.1f} s, {r.bytes_total / secs / 1e6:.1f} MB/s"
    )


async def _pull(args: argparse.Namespace, tls: Tls) -> PullResult:
    store = await asyncio.to_thread(ChunkStore, args.data_dir)
    progress = Progress if sys.stderr.isatty() else None
    server_ssl, client_ssl = tls
    if args.no_p2p:
        async with SeederClient(
            args.seeder, cluster_token=args.cluster_token, ssl_context=client_ssl
        ) as seeder:
            return await pull_image(
                seeder,
                args.name,
                store,
                args.dest,
                args.replace,
                progress,
                parallel=args.parallel or DEFAULT_PARALLEL,
            )
    scheduler = SchedulerConfig(my_zone=args.zone)
    if args.parallel:
        scheduler = SchedulerConfig(my_zone=args.zone, max_inflight=args.parallel)
    config = SwarmPullConfig(
        seeder=args.seeder,
        node_id=args.node_id,
        listen=args.listen,
        advertise=args.advertise,
        zone=args.zone,
        max_upload_rate=args.max_upload_rate,
        max_download_rate=args.max_download_rate,
        announce_interval=args.announce_interval,
        stall_timeout=args.stall_timeout,
        scheduler=scheduler,
        cluster_token=args.cluster_token,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
    )
    async with SwarmPull(config, store, args.data_dir) as swarm:
        return await pull_image(
            swarm.client, args.name, store, args.dest, args.replace, progress, fill=swarm.fill
        )


def cmd_pull(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.seeder:
        parser.error("the following arguments are required: --seeder (or set DISTD_SEEDER)")
    if not wire.is_digest(args.name):
        try:
            wire.check_name(args.name)
        except ValueError as e:
            parser.error(str(e))
    try:
        tls = _tls(args)
    except TlsError as e:
        return _fail(str(e))
    install_uvloop()
    try:
        result = asyncio.run(_pull(args, tls))
    except DestExistsError as e:
        return _fail(f"{e} (pass --replace to swap it)")
    except ManifestError as e:
        return _fail(f"manifest rejected: {e}")
    except (SeederError, MaterializeError, PullError, ChunkError) as e:
        return _fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    print(_summary(args.name, result, p2p=not args.no_p2p), flush=True)
    return 0


def add_pull_swarm_arguments(p: argparse.ArgumentParser) -> None:
    """How `distd pull` takes part in the swarm while it pulls."""
    env = os.environ
    p.add_argument(
        "--no-p2p",
        action="store_true",
        default=env_bool("DISTD_NO_P2P"),
        help="pull from the seeder only, serving nobody (env DISTD_NO_P2P)",
    )
    p.add_argument(
        "--listen",
        type=_typed(_host_port, "HOST:PORT"),
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to serve held chunks to peers while pulling (default 127.0.0.1:0, "
        "any free port)",
    )
    p.add_argument(
        "--advertise",
        default="",
        metavar="HOST:PORT",
        help="host:port peers reach this pull on (default: the bound --listen address)",
    )
    p.add_argument(
        "--node-id",
        default=default_node_id(),
        metavar="ID",
        help="id in the image's swarm (default: HOST-pull-PID, apart from a daemon's)",
    )
    p.add_argument(
        "--zone",
        default=env.get("DISTD_ZONE", ""),
        metavar="Z",
        help="this node's zone; same-zone peers are preferred (env DISTD_ZONE)",
    )
    for flag, what in (("upload", "chunks served to peers"), ("download", "chunks fetched")):
        p.add_argument(
            f"--max-{flag}-rate",
            type=_typed(parse_rate, "a rate"),
            default=env.get(f"DISTD_MAX_{flag.upper()}_RATE"),
            metavar="RATE",
            help=f"cap on {what}, e.g. 20MiB or 160Mbit (env DISTD_MAX_{flag.upper()}_RATE)",
        )
    p.add_argument(
        "--announce-interval",
        type=_typed(float, "seconds"),
        default=str(DEFAULT_ANNOUNCE_INTERVAL),
        metavar="SECONDS",
        help=f"seconds between tracker announces (default {DEFAULT_ANNOUNCE_INTERVAL:g})",
    )
    p.add_argument(
        "--stall-timeout",
        type=_typed(float, "seconds"),
        default=str(DEFAULT_STALL_TIMEOUT),
        metavar="SECONDS",
        help=f"give up when no chunk arrives for this long (default {DEFAULT_STALL_TIMEOUT:g})",
    )


# -- security: cluster token and TLS (both commands) ---------------------------------

Tls = tuple[ssl.SSLContext | None, ssl.SSLContext | bool]


class TlsError(Exception):
    """A TLS file that cannot be used; one line."""


def _token(text: str) -> str:
    """argparse type: its error names the rule, never the value (argparse would echo it)."""
    try:
        return wire.check_token(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_security_arguments(p: argparse.ArgumentParser, daemon: bool) -> None:
    """--cluster-token and --tls-*; all from DISTD_* too (env keeps the token out of `ps`)."""
    env = os.environ.get
    routes = (
        "every route except /healthz, so /v1/status and /metrics too "
        "(curl -H 'X-Cluster-Token: ...')"
        if daemon
        else "every chunk and have-stream request"
    )
    p.add_argument(
        "--cluster-token",
        type=_token,
        default=env("DISTD_CLUSTER_TOKEN") or None,
        metavar="TOKEN",
        help="the fleet's shared secret: sent to the seeder and peers, and required by this "
        f"node's listener on {routes}; prefer env DISTD_CLUSTER_TOKEN, which `ps` "
        "does not show",
    )
    p.add_argument(
        "--tls-cert",
        default=env("DISTD_TLS_CERT") or None,
        metavar="PEM",
        help="serve peers over HTTPS with this certificate chain (its names must match "
        "--advertise), and reach peers over https"
        + ("" if daemon else "; needed to swap chunks with daemons that serve TLS")
        + " (env DISTD_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        default=env("DISTD_TLS_KEY") or None,
        metavar="PEM",
        help="private key of --tls-cert (env DISTD_TLS_KEY)",
    )
    p.add_argument(
        "--tls-ca",
        default=env("DISTD_TLS_CA") or None,
        metavar="PEM",
        help="verify the seeder and peers against this CA alone (default: the system's "
        "trust store) (env DISTD_TLS_CA)",
    )


def _tls(args: argparse.Namespace) -> Tls:
    """(server context or None, client trust) from --tls-*; TlsError if a file is unusable."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise TlsError("--tls-cert and --tls-key go together")
    server: ssl.SSLContext | None = None
    try:
        if args.tls_cert:
            server = server_ssl_context(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load --tls-cert/--tls-key: {e}") from None
    try:
        client = client_ssl_context(args.tls_ca)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load --tls-ca: {e}") from None
    return server, client


# -- distd run -------------------------------------------------------------------


def _env_default(flag: str, fallback: str | None = None) -> str | None:
    return os.environ.get("DISTD_" + flag.upper().replace("-", "_"), fallback)


def _typed(parse: Callable[[str], object], what: str) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) or f"not {what}: {text!r}") from None

    return convert


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    def opt(flag: str, help: str, default: str | None = None, **kw: Any) -> None:
        env = "DISTD_" + flag.upper().replace("-", "_")
        p.add_argument(
            "--" + flag, default=_env_default(flag, default), help=f"{help} (env {env})", **kw
        )

    opt("seeder", "seeder base URL", metavar="URL")
    opt(
        "listen",
        "address the peer server and status API listen on",
        "0.0.0.0:7701",
        type=_typed(_host_port, "HOST:PORT"),
        metavar="HOST:PORT",
    )
    opt(
        "data-dir",
        "chunk store, manifests and images",
        str(default_data_dir()),
        type=Path,
        metavar="DIR",
    )
    opt(
        "node-id",
        "this node's id in the fleet (default: the host name)",
        os.uname().nodename,
        metavar="ID",
    )
    opt(
        "advertise",
        "host:port other nodes reach this one on (default: the listen address)",
        "",
        metavar="HOST:PORT",
    )
    opt(
        "labels",
        "this node's labels, matched by assignment selectors",
        "",
        type=_typed(wire.parse_labels, "labels"),
        metavar="k=v,...",
    )
    opt("zone", "this node's zone; same-zone neighbours are preferred", "", metavar="Z")
    opt(
        "max-upload-rate",
        "egress cap for chunks served (e.g. 20MiB, 160Mbit)",
        None,
        type=_typed(parse_rate, "a rate"),
        metavar="RATE",
    )
    opt(
        "max-download-rate",
        "ingress cap for chunks fetched",
        None,
        type=_typed(parse_rate, "a rate"),
        metavar="RATE",
    )
    opt(
        "upload-slots",
        "chunk uploads served at once before answering busy",
        str(DaemonConfig.upload_slots),
        type=_positive_int,
        metavar="N",
    )
    opt(
        "cache-max-bytes",
        "keep up to this many bytes of chunks no image on this node uses (0: delete "
        "them as soon as unused); chunks in use never count",
        "0",
        type=_typed(parse_size, "a size"),
        metavar="SIZE",
    )
    opt(
        "gc-grace",
        "seconds an image no longer assigned is kept before removal (a version replaced "
        "by a new one: counted from the switch)",
        "60",
        type=_grace_seconds,
        metavar="SECONDS",
    )
    opt(
        "max-inflight",
        "chunk requests in flight for one image, over all peers",
        str(SchedulerConfig().max_inflight),
        type=_positive_int,
        metavar="N",
    )
    opt(
        "per-peer-inflight",
        "chunk requests in flight to one peer",
        str(SchedulerConfig().per_peer_inflight),
        type=_positive_int,
        metavar="N",
    )
    opt(
        "announce-interval",
        "seconds between tracker announces",
        "5",
        type=_typed(float, "seconds"),
        metavar="SECONDS",
    )
    p.add_argument(
        "--no-p2p",
        action="store_true",
        default=env_bool("DISTD_NO_P2P"),
        help="pull from the seeder only: the central-distributor baseline (env DISTD_NO_P2P)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=env_bool("DISTD_VERBOSE"),
        help="debug logging (env DISTD_VERBOSE)",
    )


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.seeder:
        parser.error("--seeder URL is required (or set DISTD_SEEDER)")
    try:
        server_ssl, client_ssl = _tls(args)
    except TlsError as e:
        return _fail(str(e))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    host, port = args.listen
    config = DaemonConfig(
        seeder=args.seeder,
        listen=(host, port),
        data_dir=args.data_dir,
        node_id=args.node_id,
        advertise=args.advertise,
        labels=args.labels,
        zone=args.zone,
        max_upload_rate=args.max_upload_rate,
        max_download_rate=args.max_download_rate,
        upload_slots=args.upload_slots,
        cache_max_bytes=args.cache_max_bytes,
        gc_grace=args.gc_grace,
        p2p=not args.no_p2p,
        announce_interval=args.announce_interval,
        scheduler=SchedulerConfig(
            per_peer_inflight=args.per_peer_inflight,
            per_seeder_inflight=args.per_peer_inflight,
            max_inflight=args.max_inflight,
            my_zone=args.zone,
        ),
        cluster_token=args.cluster_token,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
    )
    install_uvloop()
    try:
        asyncio.run(Daemon(config).run())
    except OSError as e:
        return _fail(f"cannot serve on {host}:{port} or use {args.data_dir}: {e.strerror or e}")
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
        help="fetch an image through the swarm and materialize it atomically",
        description="Fetch NAME's manifest and every chunk the local store lacks, from the "
        "peers the tracker names (the seeder as a fallback; only the seeder with --no-p2p) "
        "while serving what it holds to them, verify every chunk, and build the tree at "
        "--dest (in a temp dir beside it, renamed into place).",
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
        default=env.get("DISTD_PARALLEL"),  # argparse applies `type`
        metavar="N",
        help="chunk downloads in flight (env DISTD_PARALLEL; default "
        f"{DEFAULT_PARALLEL} from the seeder alone, {SchedulerConfig().max_inflight} "
        "through the swarm)",
    )
    add_pull_swarm_arguments(pull)
    add_security_arguments(pull, daemon=False)
    pull.set_defaults(func=cmd_pull, parser=pull)

    run = sub.add_parser(
        "run",
        help="run the node daemon: pull assigned images through the swarm and serve peers",
        description="Watch this node's assignment on the seeder, pull every assigned image "
        "mostly from neighbours, materialize it atomically, and serve held chunks to others. "
        "Every flag can also be set as DISTD_<FLAG> in the environment.",
    )
    add_run_arguments(run)
    add_security_arguments(run, daemon=True)
    run.set_defaults(func=cmd_run, parser=run)

    return parser


def _fail(message: str) -> int:
    print(f"distd: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except EnvError as e:
        print(f"distd: {e}", file=sys.stderr, flush=True)
        return 2
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args, args.parser)
    except KeyboardInterrupt:
        print("distd: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
