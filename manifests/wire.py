"""The HTTP contract between the seeder, the daemons and the operator CLI.

Seeder API (all under /v1/; msgpack when the client sends `Accept: application/x-msgpack`,
JSON otherwise, so `curl` works; writes need `Authorization: Bearer <push token>`):

    GET    /healthz                         -> "ok"
    POST   /v1/chunks/missing   {"digests": [hex...]}
                                -> {"missing": [hex...], "present": {hex: [stored_size, encoding]}}
    PUT    /v1/chunks/{digest}  body = stored bytes; headers X-Chunk-Encoding, X-Chunk-Size
                                -> 201 stored / 200 already present / 422 content mismatch
    GET    /v1/chunks/{digest}  -> stored bytes with X-Chunk-Encoding, X-Chunk-Size; 404
    PUT    /v1/manifests/{digest}  body = canonical manifest bytes
                                -> 201 / 200; 422 invalid; 409 {"missing": [hex...]} chunks absent
    GET    /v1/manifests/{digest}  -> canonical manifest bytes (application/x-msgpack)
    GET    /v1/names                -> [{"name", "digest", "updated"}]
    GET    /v1/names/{name}         -> {"name", "digest", "updated", "history": [{"digest", "at"}]}
    PUT    /v1/names/{name}   {"digest": hex} -> 200 (the manifest must be published first)
    GET    /v1/assignments[?node=ID&labels=k=v,...]
                                -> rules [{"name", "node", "selector"}] or, with node,
                                   resolved [{"name", "digest"}] (a preview: records nothing)
    POST   /v1/assignments    {"name", "node" | "selector"}  -> 201 / 200
    DELETE /v1/assignments    {"name", "node" | "selector"}  -> 200 / 404
    GET    /v1/nodes          -> [{"id", "labels": "k=v,...", "address", "last_seen": unix s}]
    POST   /v1/nodes/{id}     {"labels": {k: v}, "address", "zone", "known": etag, "wait": s}
                                -> {"assignments": [{"name", "digest"}], "etag"}; a long poll:
                                   answered at once if etag != known, else on change or timeout;
                                   the only request that records a node as seen
    POST   /v1/announce       {"image", "node_id", "address", "zone", "have", "total"}
                                -> {"peers": [{"node_id", "address", "zone", "have", "total",
                                   "seeder"}], "interval": seconds}   (the tracker)

Peer API (every distd, and the seeder for chunks):

    GET    /v1/chunks/{digest}  -> as above; 503 {"error", "busy": true} when no upload slot
                                   is free (ask another peer), 404 when not held
    GET    /v1/swarm/{image}/haves?node=&address=&zone=
                                -> a stream of msgpack messages: ["bitfield", bytes], then
                                   ["have", [index...]] as chunks land, ["busy", ms] when
                                   an upload takes the last free slot (for about how long),
                                   ["ping"] when idle

Errors: non-2xx with {"error": "one line"}.

Auth (checked before any lookup, so a refusal says nothing about what exists):

    - Writes (PUT chunks/manifests/names, POST/DELETE assignments) need
      `Authorization: Bearer <push token>`, always.
    - With a cluster token configured on a listener (seeder or distd), every other
      request but `GET /healthz` needs `X-Cluster-Token: <cluster token>`: chunks,
      haves, manifests, names, assignments, nodes, announce, status and metrics.
      On the seeder a valid push token stands in for it (the operator may read what
      it may write), so the CLI needs only the push token for a push.
    - Otherwise: 401 {"error": "missing or wrong token"}. Tokens are compared in
      constant time, travel only in headers (never in URLs) and are never logged.
    - TLS is optional on every listener; a node serving TLS reaches its peers over
      https, verifying them (and the seeder) against the cluster CA when one is given.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

MSGPACK = "application/x-msgpack"
JSON = "application/json"
H_ENCODING = "X-Chunk-Encoding"
H_SIZE = "X-Chunk-Size"
# Apart from `Authorization` (the push token), so one request can carry both.
H_CLUSTER_TOKEN = "X-Cluster-Token"


def cluster_headers(token: str | None) -> dict[str, str]:
    """The header that carries the cluster token on every fleet request (none without one)."""
    return {H_CLUSTER_TOKEN: token} if token else {}


MIN_TOKEN_LENGTH = 16

MAX_REQUEST_BODY = 64 << 20

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# team/app:tag -- lowercase path segments like OCI repositories, a tag after ':'.
_NAME = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*:[\w][\w.-]{0,127}$"
)
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


def check_digest(text: str) -> str:
    if not is_digest(text):
        raise ValueError(f"not a SHA-256 digest (64 lowercase hex digits): {text!r}")
    return text


def check_name(text: str) -> str:
    if len(text) > 255 or not _NAME.match(text):
        raise ValueError(f"not an image name (team/app:tag, lowercase): {text!r}")
    return text


def check_token(text: str, what: str = "cluster token") -> str:
    """A token fit for an HTTP header and hard to guess; the error never quotes it."""
    if len(text) < MIN_TOKEN_LENGTH or not all("!" <= c <= "~" for c in text):
        raise ValueError(
            f"{what} must be at least {MIN_TOKEN_LENGTH} visible ASCII characters,"
            " no spaces (e.g. `openssl rand -hex 16`)"
        )
    return text


def parse_labels(text: str) -> dict[str, str]:
    """`k=v[,k=v...]` into a dict; used for node labels and for selectors alike."""
    labels: dict[str, str] = {}
    if not text.strip():
        return labels
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ValueError(f"not a label k=v: {part.strip()!r} in {text!r}")
        if key in labels:
            raise ValueError(f"label {key!r} given twice in {text!r}")
        labels[key] = value
    return labels


def format_labels(labels: dict[str, str]) -> str:
    """Canonical `k=v,...` (sorted), so equal selectors compare equal as strings."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpack(data: bytes, max_len: int = MAX_REQUEST_BODY) -> Any:
    """msgpack from the network: bounded, and any malformation becomes ValueError."""
    if len(data) > max_len:
        raise ValueError(f"body of {len(data)} bytes is over {max_len}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        # Some msgpack errors (a reserved byte) carry no message: name the error then.
        raise ValueError(f"malformed msgpack body: {str(e) or type(e).__name__}") from None
