"""Async client for the seeder API (`manifests.wire`), used by the CLI and by distd.

Every failure, whatever its cause (refused connection, timeout, bad token, an
error body from the seeder), becomes one `SeederError` with a one-line message an
operator can act on. Chunk payloads are returned as stored and not verified here:
the caller decodes and checks the SHA-256, as everywhere in the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from manifests import wire
from manifests.model import Encoding
from manifests.validate import MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES

# Small requests must answer quickly; bulk transfers may be slow (rate caps) but must flow.
SMALL_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
BULK_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
CONNECTION_LIMIT = 32
MISSING_BATCH = 50_000


class SeederError(Exception):
    """A seeder request failed; `str()` is one line saying what and why.

    `status` is the HTTP status when the seeder answered, `missing` the chunk digests
    it reported absent when a manifest was refused for that reason (409).
    """

    def __init__(
        self, message: str, status: int | None = None, missing: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.missing = list(missing)


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """How clients check TLS servers: against `ca_file` alone (the cluster's CA) when
    given, else the system's trust store. Hostnames are always checked."""
    if not ca_file:
        return True
    ctx = ssl.create_default_context(cafile=ca_file)  # OSError/SSLError now if unreadable
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tls_error(where: str, e: BaseException) -> str | None:
    """One line for a TLS failure (`e` from aiohttp), or None if `e` is not one."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert = e.certificate_error
        reason = getattr(cert, "verify_message", "") or getattr(cert, "reason", "") or str(cert)
        return (
            f"{where}: TLS certificate verify failed ({reason}); "
            "is --tls-ca the cluster's CA and the host name in the certificate?"
        )
    if isinstance(e, aiohttp.ClientSSLError):
        reason = getattr(e.os_error, "reason", None) or str(e.os_error)
        return f"{where}: TLS handshake failed ({reason}); is it serving TLS?"
    return None


def _decode(body: bytes, content_type: str) -> Any:
    if content_type == wire.MSGPACK:
        return wire.unpack(body)
    if content_type == wire.JSON:
        return json.loads(body)
    return body.decode("utf-8", "replace")


def _check_digest(digest: str) -> str:
    if not wire.is_digest(digest):
        raise SeederError(f"not a SHA-256 digest (64 lowercase hex digits): {digest!r}")
    return digest


def _selector(labels: str | Mapping[str, str]) -> str:
    if isinstance(labels, str):
        labels = wire.parse_labels(labels)
    return wire.format_labels(dict(labels))


class SeederClient:
    """`async with SeederClient(url, token) as c: ...`; pass `session` to share connections.

    `token` is the push token (sent on writes only); `cluster_token` goes with every
    request. `ssl_context` is for the client's own session (see `client_ssl_context`); a
    shared `session` brings its own.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        limit: int = CONNECTION_LIMIT,
        cluster_token: str | None = None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.cluster_token = cluster_token
        self._session = session
        self._owns_session = session is None
        self._limit = limit
        self._ssl = ssl_context

    async def __aenter__(self) -> SeederClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl),
                timeout=SMALL_TIMEOUT,
            )
        return self._session

    # -- plumbing ----------------------------------------------------------

    def _headers(self, write: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": wire.MSGPACK}
        if self.cluster_token:
            headers[wire.H_CLUSTER_TOKEN] = self.cluster_token
        # Reads carry the push token only in place of a missing cluster token (the
        # seeder accepts it there), so the operator needs just the one to push.
        if self.token and (write or not self.cluster_token):
            headers["Authorization"] = f"Bearer {self.token}"
        if extra:
            headers.update(extra)
        return headers

    def _transport_error(self, e: BaseException) -> SeederError:
        where = f"seeder at {self.base_url}"
        tls = tls_error(where, e)
        if tls is not None:
            return SeederError(tls)
        if isinstance(e, aiohttp.ClientConnectorDNSError):
            return SeederError(f"{where} is unreachable (cannot resolve its host name)")
        if isinstance(e, aiohttp.ClientConnectorError):
            err = e.os_error
            reason = os.strerror(err.errno) if err.errno else (err.strerror or str(err))
            reason = reason.lower()
            return SeederError(f"{where} is unreachable ({reason})")
        if isinstance(e, (TimeoutError, aiohttp.ServerTimeoutError)):
            return SeederError(f"{where} did not answer in time")
        if isinstance(e, aiohttp.ServerDisconnectedError) and self.base_url.startswith("http:"):
            # What plain HTTP to a TLS listener looks like; a restart looks the same.
            return SeederError(
                f"{where} closed the connection (if it serves TLS, use an https:// URL)"
            )
        if isinstance(e, aiohttp.InvalidURL):
            return SeederError(f"not a seeder URL: {self.base_url!r}")
        return SeederError(f"connection to {where} failed ({type(e).__name__}: {e})")

    def _status_error(self, status: int, body: Any, context: str, write: bool) -> SeederError:
        message = body.get("error") if isinstance(body, dict) else None
        if not isinstance(message, str):
            message = str(body).strip().splitlines()[0][:200] if body else f"HTTP {status}"
        if status == 401:
            if write and not self.token:
                return SeederError("seeder needs a token for this (401) and none was given", 401)
            if not write and not self.token and not self.cluster_token:
                return SeederError(
                    "seeder needs the cluster token for this (401) and none was given", 401
                )
            return SeederError("seeder refused the token (401)", 401)
        missing = body.get("missing", []) if isinstance(body, dict) else []
        if not isinstance(missing, list):
            missing = []
        return SeederError(f"{context}: {message}", status, [str(d) for d in missing])

    async def _call(
        self,
        method: str,
        path: str,
        *,
        context: str,
        ok: Sequence[int] = (200,),
        obj: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        write: bool = False,
        raw: bool = False,
        timeout: aiohttp.ClientTimeout = SMALL_TIMEOUT,
        limit: int = wire.MAX_REQUEST_BODY,
    ) -> tuple[int, Any, Mapping[str, str]]:
        """One request; returns (status, body, headers) or raises SeederError.

        The body is decoded (msgpack or JSON) unless `raw`, when a success gives its bytes.
        """
        hdrs = self._headers(write, headers)
        if obj is not None:
            data = wire.pack(obj)
            hdrs["Content-Type"] = wire.MSGPACK
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                data=data,
                params=params,
                headers=hdrs,
                timeout=timeout,
            ) as resp:
                body_bytes = await self._read(resp, limit)
                ctype = resp.content_type
                status, resp_headers = resp.status, resp.headers
        except SeederError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise self._transport_error(e) from None
        if raw and status in ok:
            return status, body_bytes, resp_headers
        try:
            body = _decode(body_bytes, ctype)
        except ValueError as e:
            raise SeederError(f"{context}: unreadable answer from the seeder ({e})") from None
        if status not in ok:
            raise self._status_error(status, body, context, write)
        return status, body, resp_headers

    async def _read(self, resp: aiohttp.ClientResponse, limit: int) -> bytes:
        """The response body, refusing one larger than `limit` before it is all buffered."""
        length = resp.content_length
        if length is not None and length > limit:
            raise SeederError(f"seeder sent a {length}-byte answer, over the {limit}-byte limit")
        buf = bytearray()
        async for piece in resp.content.iter_chunked(64 << 10):
            buf += piece
            if len(buf) > limit:
                raise SeederError(f"seeder sent an answer over the {limit}-byte limit")
        return bytes(buf)

    # -- API ---------------------------------------------------------------

    async def healthz(self) -> None:
        """Raise SeederError unless the seeder answers its health check."""
        await self._call("GET", "/healthz", context="seeder health check")

    async def missing(
        self, digests: Sequence[str]
    ) -> tuple[list[str], dict[str, tuple[int, Encoding]]]:
        """Which chunks the seeder lacks, and (stored size, encoding) of those it has."""
        missing: list[str] = []
        present: dict[str, tuple[int, Encoding]] = {}
        for off in range(0, len(digests), MISSING_BATCH):
            batch = list(digests[off : off + MISSING_BATCH])
            _, body, _ = await self._call(
                "POST",
                "/v1/chunks/missing",
                obj={"digests": batch},
                context="asking the seeder which chunks it lacks",
            )
            try:
                missing.extend(str(d) for d in body["missing"])
                for d, (size, enc) in body["present"].items():
                    present[str(d)] = (int(size), Encoding(enc))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise SeederError(
                    "seeder sent a malformed answer to a missing-chunks query"
                ) from None
        return missing, present

    async def put_chunk(self, digest: str, payload: bytes, encoding: Encoding, size: int) -> bool:
        """Upload one chunk in its stored encoding; True if the seeder had not held it yet."""
        status, _, _ = await self._call(
            "PUT",
            f"/v1/chunks/{_check_digest(digest)}",
            data=payload,
            headers={
                wire.H_ENCODING: Encoding(encoding).value,
                wire.H_SIZE: str(size),
                "Content-Type": "application/octet-stream",
            },
            ok=(200, 201),
            write=True,
            timeout=BULK_TIMEOUT,
            context=f"chunk {digest[:16]} rejected",
        )
        return status == 201

    async def get_chunk(self, digest: str, *, direct: bool = False) -> tuple[Encoding, int, bytes]:
        """(encoding, raw size, stored payload) of a chunk; NOT verified, the caller does that.

        `direct`: the caller has no peers to turn to, so the seeder must not defer it to
        them (super-seeding); it may still answer 503 busy when every upload slot is taken.
        """
        try:
            _, body, headers = await self._call(
                "GET",
                f"/v1/chunks/{_check_digest(digest)}",
                params={"direct": "1"} if direct else None,
                raw=True,
                timeout=BULK_TIMEOUT,
                limit=MAX_CHUNK_SIZE,
                context=f"cannot fetch chunk {digest}",
            )
        except SeederError as e:
            if e.status == 404:
                raise SeederError(f"seeder has no chunk {digest}", 404) from None
            raise
        try:
            encoding = Encoding(headers.get(wire.H_ENCODING, ""))
            size = int(headers.get(wire.H_SIZE, ""))
        except ValueError:
            raise SeederError(
                f"seeder sent chunk {digest[:16]} without valid chunk headers"
            ) from None
        return encoding, size, bytes(body)

    async def put_manifest(self, data: bytes) -> str:
        """Publish canonical manifest bytes; returns their digest.

        A 409 carries the digests of the chunks the seeder lacks in `SeederError.missing`.
        """
        digest = hashlib.sha256(data).hexdigest()
        await self._call(
            "PUT",
            f"/v1/manifests/{digest}",
            data=data,
            headers={"Content-Type": wire.MSGPACK},
            ok=(200, 201),
            write=True,
            timeout=BULK_TIMEOUT,
            context="manifest rejected",
        )
        return digest

    async def get_manifest(self, digest: str) -> bytes:
        """Canonical manifest bytes, checked against `digest` (a seeder can be wrong too)."""
        try:
            _, body, _ = await self._call(
                "GET",
                f"/v1/manifests/{_check_digest(digest)}",
                raw=True,
                timeout=BULK_TIMEOUT,
                limit=MAX_MANIFEST_BYTES,
                context=f"cannot fetch manifest {digest}",
            )
        except SeederError as e:
            if e.status == 404:
                raise SeederError(f"no such manifest {digest}", 404) from None
            raise
        if hashlib.sha256(body).hexdigest() != digest:
            raise SeederError(f"seeder sent manifest bytes that do not match digest {digest}")
        return bytes(body)

    async def name_info(self, name: str) -> dict[str, Any]:
        """`{"name", "digest", "updated", "history"}`; SeederError "no such name" if unknown."""
        try:
            _, body, _ = await self._call(
                "GET", f"/v1/names/{quote(name, safe='/:')}", context=f"name {name!r}"
            )
        except SeederError as e:
            if e.status == 404:
                raise SeederError(f"no such name {name!r}", 404) from None
            raise
        return dict(body)

    async def resolve_name(self, name_or_digest: str) -> str:
        """The manifest digest a name points at; a digest is returned as it is."""
        if wire.is_digest(name_or_digest):
            return name_or_digest
        digest = (await self.name_info(name_or_digest)).get("digest")
        if not isinstance(digest, str) or not wire.is_digest(digest):
            raise SeederError(f"seeder sent no valid digest for name {name_or_digest!r}")
        return digest

    async def set_name(self, name: str, digest: str) -> dict[str, Any]:
        """Move `name` to a published manifest; returns the name's new record."""
        _, body, _ = await self._call(
            "PUT",
            f"/v1/names/{quote(name, safe='/:')}",
            obj={"digest": digest},
            write=True,
            context=f"cannot move name {name!r}",
        )
        return dict(body)

    async def list_names(self) -> list[dict[str, Any]]:
        _, body, _ = await self._call("GET", "/v1/names", context="cannot list names")
        return list(body)

    async def nodes(self) -> list[dict[str, Any]]:
        """The nodes that registered: `[{"id", "labels", "address", "last_seen"}]`."""
        _, body, _ = await self._call("GET", "/v1/nodes", context="cannot list nodes")
        return list(body)

    @staticmethod
    def _rule(name: str, node: str | None, selector: str | Mapping[str, str] | None) -> Any:
        if (node is None) == (selector is None):
            raise SeederError("give exactly one of a node id or a selector")
        if node is not None:
            return {"name": name, "node": node}
        assert selector is not None
        return {"name": name, "selector": _selector(selector)}

    async def assign(
        self,
        name: str,
        node: str | None = None,
        selector: str | Mapping[str, str] | None = None,
    ) -> bool:
        """Assign `name` to a node id or a label selector; True if the rule is new."""
        status, _, _ = await self._call(
            "POST",
            "/v1/assignments",
            obj=self._rule(name, node, selector),
            ok=(200, 201),
            write=True,
            context=f"cannot assign {name!r}",
        )
        return status == 201

    async def unassign(
        self,
        name: str,
        node: str | None = None,
        selector: str | Mapping[str, str] | None = None,
    ) -> None:
        """Remove an assignment rule; SeederError if there is no such rule."""
        await self._call(
            "DELETE",
            "/v1/assignments",
            obj=self._rule(name, node, selector),
            write=True,
            context=f"cannot unassign {name!r}",
        )

    async def assignments(
        self, node: str | None = None, labels: str | Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """All rules `[{"name", "node", "selector"}]`, or with `node` its resolved set
        `[{"name", "digest"}]`."""
        params: dict[str, str] = {}
        if node is not None:
            params["node"] = node
            if labels:
                params["labels"] = _selector(labels)
        elif labels:
            raise SeederError("labels only make sense together with a node id")
        _, body, _ = await self._call(
            "GET", "/v1/assignments", params=params, context="cannot list assignments"
        )
        return list(body)

    async def register(
        self,
        node_id: str,
        *,
        labels: Mapping[str, str],
        address: str,
        zone: str = "",
        known: str = "",
        wait: float = 0.0,
    ) -> dict[str, Any]:
        """Heartbeat and long-poll the node's assignment: `{"assignments", "etag"}`."""
        obj = {
            "labels": dict(labels),
            "address": address,
            "zone": zone,
            "known": known,
            "wait": wait,
        }
        timeout = aiohttp.ClientTimeout(total=wait + 30, sock_connect=10)
        _, body, _ = await self._call(
            "POST",
            f"/v1/nodes/{quote(node_id, safe='')}",
            obj=obj,
            timeout=timeout,
            context="cannot watch the assignment",
        )
        if not isinstance(body, dict) or not isinstance(body.get("assignments"), list):
            raise SeederError("cannot watch the assignment: malformed answer")
        return body

    async def announce(
        self,
        image: str,
        node_id: str,
        *,
        address: str,
        zone: str = "",
        have: int = 0,
        total: int = 0,
    ) -> list[dict[str, Any]]:
        """Tell the tracker we are in `image`'s swarm; returns a sample of other members."""
        obj = {
            "image": image,
            "node_id": node_id,
            "address": address,
            "zone": zone,
            "have": have,
            "total": total,
        }
        _, body, _ = await self._call("POST", "/v1/announce", obj=obj, context="announce failed")
        if not isinstance(body, dict) or not isinstance(body.get("peers"), list):
            raise SeederError("announce failed: malformed answer")
        return [p for p in body["peers"] if isinstance(p, dict)]
