"""The operator CLI: `manifests push | inspect | list | assign | unassign | assignments |
nodes`.

Exit codes are a contract scripts rely on: 0 success, 1 a runtime failure reported
as ONE line `manifests: <what is wrong>` (never a traceback), 2 a usage error.
Arguments are validated up front (names, selectors, sizes) so a typo is a usage
error before anything is sent to the seeder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from manifests.chunking import DEFAULT_CHUNK_SIZE, ChunkError
from manifests.client import SeederClient, SeederError, client_ssl_context
from manifests.model import Kind, Manifest, ManifestError, manifest_digest
from manifests.push import DEFAULT_PARALLEL_UPLOADS, PushError, push_tree
from manifests.units import format_size, parse_size
from manifests.validate import MAX_CHUNK_SIZE, decode_manifest
from manifests.wire import check_name, check_token, format_labels, is_digest, parse_labels

DEFAULT_SEEDER = "http://127.0.0.1:7700"
PROG = "manifests"
# The seeder's rule for node ids, checked here too so a typo is a usage error.
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}$")


class CliError(Exception):
    """A runtime failure to report as one line, exit status 1."""


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (manifests must not import distd for its helper)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# -- argument types: raising ArgumentTypeError makes a bad value a usage error (exit 2) --


def _arg(fn: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = what
    return convert


def _chunk_size(text: str) -> int:
    n = parse_size(text)
    if not 1 <= n <= MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk size {text!r} must be between 1 byte and {format_size(MAX_CHUNK_SIZE)}"
        )
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= 256:
        raise ValueError(f"must be between 1 and 256: {text!r}")
    return n


def _selector(text: str) -> str:
    labels = parse_labels(text)
    if not labels:
        raise ValueError("a selector needs at least one k=v")
    return format_labels(labels)


def _labels(text: str) -> str:
    return format_labels(parse_labels(text))


def _node(text: str) -> str:
    if not _NODE_ID.match(text):
        raise ValueError(f"not a node id (letters, digits and ._:@-, at most 255): {text!r}")
    return text


def _cluster_token(text: str) -> str:
    # check_token's message never quotes the value, so argparse cannot echo a secret.
    return check_token(text)


def _name_or_digest(text: str) -> str:
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    if is_digest(text):
        return text
    return check_name(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Push images to a seeder and assign them to nodes.",
    )
    p.add_argument(
        "--seeder",
        metavar="URL",
        default=os.environ.get("SEEDER_URL", DEFAULT_SEEDER),
        help="seeder base URL (env SEEDER_URL, default %(default)s)",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("DIST_PUSH_TOKEN"),
        help="operator push token for writes (env DIST_PUSH_TOKEN)",
    )
    p.add_argument(
        "--cluster-token",
        metavar="TOKEN",
        type=_arg(_cluster_token, "token"),
        default=os.environ.get("DIST_CLUSTER_TOKEN") or None,
        help="the fleet's cluster token, sent with every request; needed for reads from a "
        "seeder that requires it when no --token is given (env DIST_CLUSTER_TOKEN)",
    )
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=os.environ.get("DIST_TLS_CA") or None,
        help="verify an https seeder against this CA alone (default: the system's trust "
        "store) (env DIST_TLS_CA)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    push = sub.add_parser("push", help="push a directory tree as NAME")
    push.add_argument("path", metavar="PATH", help="directory to push")
    push.add_argument("--name", required=True, type=_arg(check_name, "name"), help="team/app:tag")
    push.add_argument(
        "--chunk-size",
        type=_arg(_chunk_size, "size"),
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="chunk size, e.g. 4MiB (default)",
    )
    push.add_argument(
        "--parallel",
        type=_arg(_positive, "count"),
        default=DEFAULT_PARALLEL_UPLOADS,
        metavar="N",
        help="uploads in flight (default %(default)s)",
    )
    push.add_argument("--no-progress", action="store_true", help="no progress bar")

    inspect = sub.add_parser("inspect", help="print a manifest as JSON")
    inspect.add_argument("ref", metavar="NAME|DIGEST", type=_arg(_name_or_digest, "reference"))

    lst = sub.add_parser("list", help="list names and the digests they point at")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")

    for cmd, verb in (("assign", "assign NAME to"), ("unassign", "remove an assignment of")):
        a = sub.add_parser(cmd, help=f"{verb} a node or a label selector")
        a.add_argument("name", metavar="NAME", type=_arg(check_name, "name"), help="team/app:tag")
        target = a.add_mutually_exclusive_group(required=True)
        target.add_argument("--node", metavar="ID", type=_arg(_node, "node"), help="one node id")
        target.add_argument(
            "--selector",
            metavar="SEL",
            type=_arg(_selector, "selector"),
            help="k=v[,k=v...]: every label must match",
        )

    asg = sub.add_parser(
        "assignments",
        help="list assignment rules, or with --node what that node must hold",
    )
    asg.add_argument(
        "--node", metavar="ID", type=_arg(_node, "node"), help="resolve what this node must hold"
    )
    asg.add_argument(
        "--labels",
        metavar="SEL",
        type=_arg(_labels, "labels"),
        help="the node's labels k=v[,k=v...] (with --node)",
    )
    asg.add_argument("--json", action="store_true", help="JSON instead of a table")

    nodes = sub.add_parser("nodes", help="list the nodes that registered and when last seen")
    nodes.add_argument("--json", action="store_true", help="JSON instead of a table")
    return p


# -- rendering --


def _when(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return "" if value is None else str(value)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain left-aligned table (no borders) that `column`-style tools and eyes both read."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def manifest_json(m: Manifest, digest: str, ref: str) -> dict[str, Any]:
    """Manifest as a person reads it: octal modes, hex digests, sizes raw and human."""
    entries: list[dict[str, Any]] = []
    for e in m.entries:
        row: dict[str, Any] = {"path": e.path, "type": e.kind.value, "mode": f"{e.mode:04o}"}
        if e.kind is Kind.FILE:
            row.update(size=e.size, sha256=e.sha256, chunks=list(e.chunks))
        elif e.kind is Kind.SYMLINK:
            row["target"] = e.target
        entries.append(row)
    doc: dict[str, Any] = {}
    if ref != digest:
        doc["name"] = ref
    doc.update(
        digest=digest,
        chunk_size=m.chunk_size,
        chunk_size_human=format_size(m.chunk_size),
        total_size=m.total_size,
        total_size_human=format_size(m.total_size),
        stored_size=m.stored_size,
        stored_size_human=format_size(m.stored_size),
        files=sum(1 for e in m.entries if e.kind is Kind.FILE),
        entry_count=len(m.entries),
        chunk_count=len(m.chunks),
        entries=entries,
        chunks=[
            {
                "digest": c.digest,
                "size": c.size,
                "stored_size": c.stored_size,
                "encoding": c.encoding.value,
            }
            for c in m.chunks
        ],
    )
    return doc


# -- commands --


async def cmd_push(client: SeederClient, args: argparse.Namespace) -> int:
    if not os.path.isdir(args.path):
        what = "does not exist" if not os.path.lexists(args.path) else "is not a directory"
        raise CliError(f"{args.path!r} {what}")
    summary = await push_tree(
        client,
        args.path,
        args.name,
        args.chunk_size,
        parallel_uploads=args.parallel,
        progress=not args.no_progress,
    )
    print(summary.line(), flush=True)
    return 0


async def cmd_inspect(client: SeederClient, args: argparse.Namespace) -> int:
    digest = await client.resolve_name(args.ref)
    data = await client.get_manifest(digest)
    if manifest_digest(data) != digest:
        raise CliError(f"seeder sent a manifest whose digest is not {digest}")
    try:
        m = decode_manifest(data)
    except ManifestError as e:
        raise CliError(f"manifest {digest} is invalid: {e}") from None
    json.dump(manifest_json(m, digest, args.ref), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


async def cmd_list(client: SeederClient, args: argparse.Namespace) -> int:
    names = sorted(await client.list_names(), key=lambda r: str(r.get("name", "")))
    if args.json:
        json.dump(names, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif names:
        rows = [
            [str(r.get("name", "")), str(r.get("digest", "")), _when(r.get("updated"))]
            for r in names
        ]
        print(table(rows, ["NAME", "DIGEST", "UPDATED"]))
    return 0


def _target(args: argparse.Namespace) -> str:
    return f"node {args.node}" if args.node else f"selector {args.selector}"


async def cmd_assign(client: SeederClient, args: argparse.Namespace) -> int:
    new = await client.assign(args.name, node=args.node, selector=args.selector)
    already = "" if new else " (already was)"
    print(f"assigned {args.name} to {_target(args)}{already}")
    return 0


async def cmd_unassign(client: SeederClient, args: argparse.Namespace) -> int:
    await client.unassign(args.name, node=args.node, selector=args.selector)
    print(f"unassigned {args.name} from {_target(args)}")
    return 0


async def cmd_assignments(client: SeederClient, args: argparse.Namespace) -> int:
    rows = await client.assignments(node=args.node, labels=args.labels)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        return 0
    if args.node:
        print(table([[str(r["name"]), str(r["digest"])] for r in rows], ["NAME", "DIGEST"]))
    else:
        cells = [
            [str(r.get("name", "")), str(r.get("node") or ""), str(r.get("selector") or "")]
            for r in rows
        ]
        print(table(cells, ["NAME", "NODE", "SELECTOR"]))
    return 0


async def cmd_nodes(client: SeederClient, args: argparse.Namespace) -> int:
    rows = await client.nodes()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif rows:
        cells = [
            [str(r.get(k, "")) for k in ("id", "labels", "address")] + [_when(r.get("last_seen"))]
            for r in rows
        ]
        print(table(cells, ["NODE", "LABELS", "ADDRESS", "LAST SEEN"]))
    return 0


COMMANDS: dict[str, Callable[[SeederClient, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "push": cmd_push,
    "inspect": cmd_inspect,
    "list": cmd_list,
    "assign": cmd_assign,
    "unassign": cmd_unassign,
    "assignments": cmd_assignments,
    "nodes": cmd_nodes,
}


async def run(args: argparse.Namespace) -> int:
    try:
        trust = client_ssl_context(args.tls_ca)
    except (OSError, ssl.SSLError) as e:
        raise CliError(f"cannot load --tls-ca {args.tls_ca!r}: {e}") from None
    async with SeederClient(
        args.seeder, token=args.token, cluster_token=args.cluster_token, ssl_context=trust
    ) as client:
        return await COMMANDS[args.command](client, args)


def _fail(message: str) -> NoReturn:
    text = " ".join(message.split()) or "failed"
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "assignments" and args.labels is not None and not args.node:
        parser.error("--labels needs --node (labels are those of the node to resolve)")
    try:
        return _run(run(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except (CliError, SeederError, PushError, ManifestError, ChunkError) as e:
        _fail(str(e))
    except BrokenPipeError:
        # `manifests list | head`: the reader left; say nothing, like other Unix tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f"{e.filename!r}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")
    except Exception as e:  # no traceback for an operator; the type says where to look
        _fail(f"unexpected {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
