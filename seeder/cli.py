"""`seeder run`: the seeder service's command line; every flag also comes from the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from distd.httpserver import install_uvloop, open_listener_warning, serve, server_ssl_context
from manifests import wire
from manifests.units import EnvError, env_bool, parse_rate
from seeder.app import DEFAULT_UPLOAD_SLOTS, make_app

log = logging.getLogger("seeder")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` into (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _token(text: str) -> str:
    """argparse type: its error names the rule, never the value (argparse would echo it)."""
    try:
        return wire.check_token(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seeder", description="Origin of chunks, registry of manifests, names and assignments."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the seeder API")
    env = os.environ.get
    run.add_argument(
        "--listen",
        type=parse_listen,
        default=env("SEEDER_LISTEN"),
        metavar="HOST:PORT",
        help="address to serve on (env SEEDER_LISTEN)",
    )
    run.add_argument(
        "--data-dir",
        default=env("SEEDER_DATA_DIR"),
        metavar="DIR",
        help="chunks and seeder.db live here (env SEEDER_DATA_DIR)",
    )
    run.add_argument(
        "--push-token",
        default=env("SEEDER_PUSH_TOKEN"),
        metavar="TOKEN",
        help="bearer token required for every write (env SEEDER_PUSH_TOKEN)",
    )
    run.add_argument(
        "--cluster-token",
        type=_token,
        default=env("SEEDER_CLUSTER_TOKEN") or None,
        metavar="TOKEN",
        help="shared secret of the fleet: when set, every request but /healthz needs it in"
        " X-Cluster-Token (or the push token); prefer the env var SEEDER_CLUSTER_TOKEN,"
        " which `ps` does not show",
    )
    run.add_argument(
        "--tls-cert",
        default=env("SEEDER_TLS_CERT") or None,
        metavar="PEM",
        help="serve HTTPS with this certificate chain; its names must match the seeder URL"
        " nodes use (env SEEDER_TLS_CERT)",
    )
    run.add_argument(
        "--tls-key",
        default=env("SEEDER_TLS_KEY") or None,
        metavar="PEM",
        help="private key of --tls-cert (env SEEDER_TLS_KEY)",
    )
    run.add_argument(
        "--max-upload-rate",
        type=_rate,
        default=env("SEEDER_MAX_UPLOAD_RATE"),
        metavar="RATE",
        help="cap on chunk bytes served per second, e.g. 100MiB or 800Mbit"
        " (env SEEDER_MAX_UPLOAD_RATE; default unlimited)",
    )
    run.add_argument(
        "--upload-slots",
        type=_slots,
        default=env("SEEDER_UPLOAD_SLOTS") or str(DEFAULT_UPLOAD_SLOTS),
        metavar="N",
        help="chunk uploads served at once before answering busy"
        f" (env SEEDER_UPLOAD_SLOTS; default {DEFAULT_UPLOAD_SLOTS})",
    )
    run.add_argument(
        "--no-superseed",
        action="store_true",
        default=env_bool("SEEDER_NO_SUPERSEED"),
        help="serve every chunk request, even for chunks just handed out to another node"
        " (env SEEDER_NO_SUPERSEED)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="debug logs and access log")
    return parser


def _slots(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def _run(args: argparse.Namespace) -> int:
    host, port = args.listen
    data_dir = Path(args.data_dir)
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        try:
            tls = server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            print(f"seeder: cannot load --tls-cert/--tls-key: {e}", file=sys.stderr)
            return 1
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise PermissionError(f"{data_dir} is not writable")
        app = make_app(
            data_dir,
            args.push_token,
            max_upload_rate=args.max_upload_rate or None,
            upload_slots=args.upload_slots,
            superseed=not args.no_superseed,
            cluster_token=args.cluster_token,
        )
    except Exception as e:
        print(f"seeder: cannot use data dir {str(data_dir)!r}: {e}", file=sys.stderr)
        return 1

    def ready(bound_host: str, bound_port: int) -> None:
        url = _url(bound_host, bound_port, "https" if tls else "http")
        rate = args.max_upload_rate
        log.info(
            "serving %s from %s (upload cap %s, cluster token %s)",
            url,
            data_dir,
            f"{rate} B/s" if rate else "none",
            "required" if args.cluster_token else "off",
        )
        if warning := open_listener_warning(host, args.cluster_token):
            log.warning("%s", warning)
        print(f"seeder listening on {url}", flush=True)

    install_uvloop()
    try:
        asyncio.run(
            serve(app, host, port, access_log=args.verbose, on_ready=ready, ssl_context=tls)
        )
    except OSError as e:
        print(f"seeder: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except EnvError as e:
        print(f"seeder: {e}", file=sys.stderr, flush=True)
        return 2
    # argparse runs `type` on string defaults too, so values from the environment are checked.
    args = parser.parse_args(argv)
    if args.listen is None:
        parser.error("--listen HOST:PORT is required (or set SEEDER_LISTEN)")
    if not args.data_dir:
        parser.error("--data-dir DIR is required (or set SEEDER_DATA_DIR)")
    if not args.push_token:
        parser.error("--push-token TOKEN is required (or set SEEDER_PUSH_TOKEN)")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together (or SEEDER_TLS_CERT/SEEDER_TLS_KEY)")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
