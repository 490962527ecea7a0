"""Issue 6, "Hostile input": refused with a clear error, and no harm done.

Against real processes (a `seeder run` and a `distd run` on loopback): malformed
msgpack, oversized bodies and headers, manifests with escaping paths or absurd
counts, a chunk larger than declared, a decompression bomb, slow-loris clients.
In-process, with hypothesis: the have-stream decoder, `bitfield.from_bytes` and
`wire.unpack` only ever raise ValueError on garbage, and the materializer, handed
hostile manifests built by hand (no validation), never writes outside its temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treeutil import Fleet, one_node_fleet, rmtree_force, snapshot

from bench.cluster import MIB
from distd import httpserver
from distd.catalog import Image
from distd.engine import EngineContext, PeerLink, SwarmDownload, have_stream_decoder
from distd.httpserver import read_body, serve
from distd.materialize import MaterializeError, StagedImage, materialize
from distd.peer_server import MAX_BUSY_MS
from distd.ratelimit import TokenBucket
from distd.swarm import bitfield
from distd.swarm.scheduler import Request, SchedulerConfig
from manifests import wire
from manifests.chunking import ChunkError
from manifests.model import FORMAT_TAG, FORMAT_VERSION, Chunk, Encoding, Entry, Kind, Manifest

pytestmark = pytest.mark.timeout(120)

IMAGE = "hostile/image:v1"

# -- in-process: the have-stream decoder ---------------------------------------------------


def _download(n: int, *given: Chunk) -> tuple[SwarmDownload, PeerLink]:
    """A SwarmDownload of an image of `n` chunks (`given`, or one-byte ones), nothing behind."""
    chunks = given or tuple(Chunk(f"{i:064x}", 1, 1, Encoding.RAW) for i in range(n))
    image = Image("f" * 64, Manifest((), chunks, 1))
    ctx = EngineContext(
        node_id="me",
        address="127.0.0.1:9",
        zone="",
        seeder_url="http://127.0.0.1:9",
        store=None,  # type: ignore[arg-type]
        session=None,  # type: ignore[arg-type]
        ingress=TokenBucket(None),
        metrics=None,  # type: ignore[arg-type]
        config=SchedulerConfig(),
    )
    return SwarmDownload(image, ctx), PeerLink("peer", "http://127.0.0.1:9")


def _feed(n: int, data: bytes, cuts: list[int]) -> SwarmDownload:
    """Feed `data` to the have-stream decoder in pieces cut at `cuts`; returns the download.

    On an event loop, as in the daemon: a "busy" message reads the loop's clock."""
    dl, link = _download(n)
    unpacker = have_stream_decoder(n)
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})

    async def feed() -> None:
        for a, b in itertools.pairwise(edges):
            dl._on_data(link, unpacker, data[a:b], n)

    asyncio.run(feed())
    return dl


def _check_peer(dl: SwarmDownload, n: int) -> None:
    peer = dl.sched.peers.get("peer")
    if peer is not None:
        assert peer.have >> n == 0, "a neighbour was credited with chunks beyond the image"


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=25,
)
_messages = st.one_of(
    _values,
    st.tuples(st.sampled_from(["bitfield", "have", "ping", "busy", "haves", ""]), _values).map(
        list
    ),
    st.tuples(st.just("busy"), st.integers(-(2**40), 2**40)).map(list),
    st.tuples(st.just("have"), st.lists(_scalars | st.integers(-5, 300), max_size=20)).map(list),
    st.tuples(st.just("bitfield"), st.binary(max_size=20)).map(list),
)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 130), data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600)))
def test_have_stream_garbage_bytes_only_raise_value_error(
    n: int, data: bytes, cuts: list[int]
) -> None:
    try:
        dl = _feed(n, data, cuts)
    except ValueError:
        return
    _check_peer(dl, n)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 130), msgs=st.lists(_messages, max_size=5), cuts=st.lists(st.integers()))
def test_have_stream_hostile_messages_only_raise_value_error(
    n: int, msgs: list[Any], cuts: list[int]
) -> None:
    data = b"".join(msgpack.packb(m, use_bin_type=True) for m in msgs)
    try:
        dl = _feed(n, data, cuts)
    except ValueError:
        return
    _check_peer(dl, n)


@pytest.mark.parametrize(
    "data",
    [
        b"\xdb\xff\xff\xff\xff" + b"x" * (2 * MIB),  # a 4 GiB string, never finished
        b"\xdd\x00\xff\xff\xff" + b"\xc0" * 1000,  # an array of 16 million nils
        b"\x92\xa4have\xdd\x00\x10\x00\x00" + b"\x00" * 5000,  # a have batch of 1M indexes
        b"\xde\x00\x01\xa1k\xa1v",  # a map
        b"\x92\xa8bitfield\xc6\x00\x10\x00\x00" + b"\xff" * MIB,  # a 1 MiB bitfield
        b"\xdc\x00\x01" * 200_000,  # arrays nested 200,000 deep
    ],
    ids=["huge-str", "huge-array", "huge-have", "map", "huge-bitfield", "deep"],
)
def test_have_stream_oversized_messages_are_refused_without_allocating(data: bytes) -> None:
    with pytest.raises(ValueError):
        _feed(100, data, [])


def test_have_stream_valid_messages_still_work() -> None:
    n = 20
    stream = [["bitfield", bitfield.to_bytes(0b101, n)], ["ping"], ["have", [3, 19, 25, -1]]]
    stream.append(["busy", 250])
    started = time.monotonic()
    dl = _feed(n, b"".join(wire.pack(m) for m in stream), [1, 7, 9])
    peer = dl.sched.peers["peer"]
    assert peer.have == 0b101 | 1 << 3 | 1 << 19
    # not asked for the next 250 ms (the loop's clock is the monotonic one, to a few ms)
    assert peer.blocked_until >= started + 0.24


@pytest.mark.parametrize("ms", [-1, MAX_BUSY_MS + 1])
def test_have_stream_busy_out_of_range_is_refused(ms: int) -> None:
    with pytest.raises(ValueError, match="busy for"):
        _feed(20, wire.pack(["busy", ms]), [])


@given(data=st.binary(max_size=300), n=st.integers(0, 2000))
def test_bitfield_from_bytes_only_raises_value_error(data: bytes, n: int) -> None:
    try:
        bits = bitfield.from_bytes(data, n)
    except ValueError:
        return
    assert 0 <= bits < 1 << n


@given(data=st.one_of(st.binary(max_size=500), _values.map(wire.pack)), cut=st.integers(0, 500))
def test_wire_unpack_only_raises_value_error(data: bytes, cut: int) -> None:
    for blob in (data, data[:cut], data + data[:cut]):
        with contextlib.suppress(ValueError):
            wire.unpack(blob)


def test_wire_unpack_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"malformed msgpack body: \w"):
        wire.unpack(b"\xc1")
    with pytest.raises(ValueError, match="over"):
        wire.unpack(b"\x90" * 100, max_len=10)


# -- in-process: the materializer against hostile manifests ---------------------------------

_POOL = [b"pwned", b"x" * 100, bytes(range(64))]
_POOL_DIGESTS = [hashlib.sha256(d).hexdigest() for d in _POOL]
_COMPONENTS = st.sampled_from(
    ["a", "b", "link", "evil", "..", ".", "", "{outside}", "x" * 300, "a\0b", "\udcff"]
)
_TARGETS = st.sampled_from(
    ["{outside}", "{outside}/marker", "../outside", "../../outside", "/", ".", "..", "a", ""]
)


@st.composite
def _hostile_entries(draw: st.DrawFn) -> list[Entry]:
    entries = []
    for _ in range(draw(st.integers(1, 8))):
        parts = draw(st.lists(_COMPONENTS, min_size=1, max_size=4))
        path = "/".join(parts)  # a leading "{outside}" makes it absolute, below
        kind = draw(st.sampled_from(list(Kind)))
        mode = draw(st.sampled_from([0o755, 0o644, 0o777, 0, 0o4755, 0o1777, 0o7777]))
        if kind is Kind.SYMLINK:
            entries.append(Entry(path, kind, mode, target=draw(_TARGETS)))
        elif kind is Kind.DIR:
            entries.append(Entry(path, kind, mode))
        else:
            picks = draw(st.lists(st.integers(0, len(_POOL)), max_size=3))
            chunks = tuple(_POOL_DIGESTS[i] if i < len(_POOL) else "0" * 64 for i in picks)
            content = b"".join(_POOL[i] for i in picks if i < len(_POOL))
            size = len(content) + draw(st.sampled_from([0, 0, 1, -1, 1 << 40]))
            sha = hashlib.sha256(content).hexdigest() if draw(st.booleans()) else "0" * 64
            entries.append(Entry(path, kind, mode, size=size, sha256=sha, chunks=chunks))
    return entries


def _table() -> tuple[Chunk, ...]:
    return tuple(
        sorted(
            (
                Chunk(d, len(b), len(b), Encoding.RAW)
                for d, b in zip(_POOL_DIGESTS, _POOL, strict=True)
            ),
            key=lambda c: c.digest,
        )
    )


def _read(digest: str, size: int) -> bytes:
    return _POOL[_POOL_DIGESTS.index(digest)]


def _build_whole(manifest: Manifest, dest: Path) -> None:
    materialize(manifest, _read, dest)


def _build_staged(manifest: Manifest, dest: Path) -> None:
    """The daemon's way: a StagedImage fed chunk by chunk (in reverse order), then finished."""
    stage = StagedImage(manifest, dest)
    try:
        for d in reversed(stage.digests()):
            stage.write_chunk(d, _read(d, stage.chunk_size(d)))
        stage.finish()
    finally:
        stage.close()


def _never_escapes(entries: list[Entry], build: Callable[[Manifest, Path], None]) -> None:
    """Build a hand-made manifest with `build`: only MaterializeError, nothing outside."""
    with tempfile.TemporaryDirectory() as base_name:
        base = Path(base_name)
        outside = base / "outside"
        outside.mkdir()
        (outside / "marker").write_text("untouched")
        before = snapshot(outside)

        def fill(text: str) -> str:
            return text.replace("{outside}", str(outside))

        entries = [
            dataclasses.replace(e, path=fill(e.path), target=fill(e.target)) for e in entries
        ]
        manifest = Manifest(tuple(entries), _table(), 1 << 20)
        work = base / "work"
        work.mkdir()
        dest = work / "image"
        try:
            try:
                build(manifest, dest)
                built = True
            except MaterializeError:
                built = False
            except UnicodeEncodeError:
                # A path that is not UTF-8 (a lone surrogate) fails to encode before anything
                # is written; decode_manifest refuses such a manifest in the first place.
                assert any("\udcff" in e.path for e in entries)
                built = False
            assert snapshot(outside) == before
            assert sorted(os.listdir(base)) == ["outside", "work"]
            assert os.listdir(work) == (["image"] if built else [])
        finally:
            rmtree_force(work)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_hostile_entries())
def test_materializer_never_writes_outside_its_temp_dir(entries: list[Entry]) -> None:
    _never_escapes(entries, _build_whole)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_hostile_entries())
def test_staged_image_never_writes_outside_its_temp_dir(entries: list[Entry]) -> None:
    _never_escapes(entries, _build_staged)


# -- in-process: a peer that sends more than the chunk holds ---------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_peer_sending_more_than_the_chunk_is_refused_early(declared: bool) -> None:
    size = 4096
    digest = hashlib.sha256(b"c" * size).hexdigest()
    sent = 0

    async def chunk(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={wire.H_ENCODING: "raw", wire.H_SIZE: str(size)})
        if declared:
            resp.content_length = 64 * MIB
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):
                await resp.write(b"c" * (64 << 10))
                sent += 64 << 10
        return resp

    app = web.Application()
    app.router.add_get("/v1/chunks/{digest}", chunk)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    dl, _ = _download(1, Chunk(digest, size, size, Encoding.RAW))
    try:
        link = PeerLink("liar", f"http://{host}:{port}")
        req = Request("liar", 0, sent=0.0, deadline=1e9)
        with pytest.raises(ChunkError):
            await dl._download(link, req, digest, size)
    finally:
        await runner.cleanup()
    assert sent < 8 * MIB, f"the node read {sent} bytes of a {size}-byte chunk"


# -- real processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with one_node_fleet("hostile", IMAGE, seed=7) as f:
        yield f


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def error(self) -> str:
        return str(json.loads(self.body)["error"])


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


def raw(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> Answer:
    """Send bytes as they are on a fresh connection; read one HTTP response."""
    t0 = time.monotonic()
    with socket.create_connection(_host_port(url), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = s.recv(65536)
            if not piece:
                raise AssertionError(f"connection closed without an answer: {data[:200]!r}")
            data += piece
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            piece = s.recv(65536)
            if not piece:
                break
            rest += piece
    return Answer(status, headers, rest[:length], time.monotonic() - t0)


def request(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
) -> Answer:
    hdrs = {"Host": "x", "Connection": "close", **(headers or {})}
    hdrs["Content-Length"] = str(len(body) if content_length is None else content_length)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return raw(url, head.encode() + b"\r\n", body)


def healthy(url: str) -> bool:
    return request(url, "GET", "/healthz").status == 200


def rss(pid: int) -> int:
    """Resident set size in bytes (of the process and its threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


MSGPACK = {"Content-Type": wire.MSGPACK}
JSON = {"Content-Type": wire.JSON}


@pytest.mark.parametrize(
    ("path", "body", "headers", "says"),
    [
        ("/v1/announce", b"\xc1", MSGPACK, "malformed msgpack"),
        ("/v1/announce", b"\x92\x01", MSGPACK, "malformed msgpack"),  # truncated
        ("/v1/announce", b"\x93\x01\x02\x03", MSGPACK, "must be a map"),
        ("/v1/announce", b"\x81\x01\x02", MSGPACK, "malformed msgpack"),  # int map key
        ("/v1/announce", b"\x91" * 50_000 + b"\xc0", MSGPACK, "malformed msgpack"),  # too deep
        ("/v1/announce", wire.pack({"image": 5, "node_id": []}), MSGPACK, "'image' must be"),
        ("/v1/chunks/missing", b"\xdd\xff\xff\xff\xff", MSGPACK, "malformed msgpack"),
        ("/v1/chunks/missing", wire.pack({"digests": [1, 2]}), MSGPACK, "not a SHA-256"),
        ("/v1/nodes/node-x", b"{not json", JSON, "malformed JSON"),
        ("/v1/nodes/node-x", b"\xff\xfe", JSON, "malformed JSON"),
        ("/v1/nodes/node-x", wire.pack({"wait": 1e9}), MSGPACK, "'wait' must be"),
    ],
)
def test_malformed_bodies_get_a_400_that_says_why(
    fleet: Fleet, path: str, body: bytes, headers: dict[str, str], says: str
) -> None:
    url = fleet.cluster.seeder_url
    a = request(url, "POST", path, body, headers)
    assert a.status == 400, (a.status, a.body[:200])
    assert says in a.error(), a.error()
    assert "\n" not in a.error()
    assert healthy(url)


def test_oversized_bodies_are_refused_before_they_are_read(fleet: Fleet) -> None:
    url = fleet.cluster.seeder_url
    assert fleet.cluster.seeder is not None
    before = rss(fleet.cluster.seeder.pid)
    # Declared: answered at once, with nothing sent after the head.
    a = request(url, "POST", "/v1/announce", headers=MSGPACK, content_length=10 << 30)
    assert a.status == 413 and "over the 65536-byte limit" in a.error(), a
    assert a.seconds < 5
    push = {"Authorization": f"Bearer {fleet.cluster.token}", wire.H_ENCODING: "raw"}
    a = request(
        url,
        "PUT",
        "/v1/chunks/" + "ab" * 32,
        headers={**push, wire.H_SIZE: str(1 << 20)},
        content_length=1 << 40,
    )
    assert a.status == 413 and "larger than its 1048576-byte chunk" in a.error(), a
    # Chunked, so undeclared: cut off at the limit, not read to the end.
    head = (
        b"POST /v1/announce HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-msgpack\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"10000\r\n" + b"\x00" * (64 << 10) + b"\r\n"
    a = raw(url, head, piece * 16)
    assert a.status == 413 and "over the 65536-byte limit" in a.error(), a
    assert rss(fleet.cluster.seeder.pid) - before < 32 * MIB
    assert healthy(url)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 1000 + b"\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        # Headers that never end: refused once they grow past the limit.
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Endless: 1\r\n" * 20_000,
    ],
    ids=["long-header", "many-headers", "long-url", "endless"],
)
@pytest.mark.parametrize("target", ["seeder", "daemon"])
def test_oversized_headers_are_refused(fleet: Fleet, head: bytes, target: str) -> None:
    url = fleet.cluster.seeder_url if target == "seeder" else fleet.node.url
    a = raw(url, head)
    assert a.status in (400, 413, 414, 431), (a.status, a.body[:200])
    assert healthy(url)


def _manifest_doc(
    entries: list[list[object]],
    chunks: list[list[object]] | None = None,
    chunk_size: int = 1 << 20,
) -> bytes:
    out: bytes = msgpack.packb([FORMAT_TAG, FORMAT_VERSION, chunk_size, entries, chunks or []])
    return out


_D = hashlib.sha256(b"x").digest()
_FILE = ["f", "file", 0o644, 1, _D, [_D]]
_TABLE = [[_D, 1, 1, "raw"]]


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        (_manifest_doc([["..", "dir", 0o755]]), "has a '..' component"),
        (_manifest_doc([["a/../../etc", "dir", 0o755]]), "has a '..' component"),
        (_manifest_doc([["/etc/cron.d", "dir", 0o755]]), "is absolute"),
        (_manifest_doc([["a//b", "dir", 0o755]]), "has an empty component"),
        (
            _manifest_doc([["l", "symlink", 0o777, "/etc"], ["l/x", "dir", 0o755]]),
            "is beneath symlink 'l'",
        ),
        (_manifest_doc([["a/b", "dir", 0o755]]), "has no parent directory entry 'a'"),
        (_manifest_doc([_FILE], _TABLE, chunk_size=1 << 40), "chunk size must be an integer"),
        (_manifest_doc([["f", "file", 0o644, 1 << 60, _D, [_D]]], _TABLE), "size must be"),
        (_manifest_doc([["d", "dir", 0o17777]]), "mode must be an integer"),
        (_manifest_doc([_FILE] * 2, _TABLE), "appears twice"),
        (
            _manifest_doc([_FILE], _TABLE)[:-5],
            "not valid msgpack",
        ),
        (
            b"\x95" + msgpack.packb(FORMAT_TAG) + b"\x01\xce\x00\x10\x00\x00\xdd\xff\xff\xff\xff",
            "not valid msgpack",
        ),
        (_manifest_doc([["f", "file", 0o644, 1, _D, [_D] * 100_000]], _TABLE), "size 1 !="),
    ],
    ids=[
        "dotdot",
        "dotdot-inside",
        "absolute",
        "empty-component",
        "beneath-symlink",
        "no-parent",
        "absurd-chunk-size",
        "absurd-file-size",
        "absurd-mode",
        "duplicate",
        "truncated",
        "4-billion-entries",
        "100k-chunk-refs",
    ],
)
def test_hostile_manifests_get_a_422_naming_the_rule(fleet: Fleet, doc: bytes, rule: str) -> None:
    url = fleet.cluster.seeder_url
    digest = hashlib.sha256(doc).hexdigest()
    auth = {"Authorization": f"Bearer {fleet.cluster.token}"}
    a = request(url, "PUT", f"/v1/manifests/{digest}", doc, auth)
    assert a.status == 422, (a.status, a.body[:300])
    assert rule in a.error(), a.error()
    assert request(url, "GET", f"/v1/manifests/{digest}", headers=auth).status == 404
    assert healthy(url)


def test_chunks_larger_than_declared_or_wrong_are_refused(fleet: Fleet) -> None:
    url = fleet.cluster.seeder_url
    push = {"Authorization": f"Bearer {fleet.cluster.token}"}
    data = os.urandom(1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"/v1/chunks/{digest}"
    raw_headers = {**push, wire.H_ENCODING: "raw", wire.H_SIZE: "1024"}

    # One byte more than declared: refused from the Content-Length alone.
    a = request(url, "PUT", path, data + b"!", raw_headers)
    assert a.status == 413 and "larger than its 1024-byte chunk" in a.error(), a
    # The same, chunked: cut off at the declared size.
    head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in raw_headers.items()
    )
    body = b"%x\r\n" % (4 * len(data)) + data * 4 + b"\r\n0\r\n\r\n"
    a = raw(url, head.encode() + b"\r\n", body)
    assert a.status == 413, a
    # A decompression bomb: 256 MiB of zeros in an 8 KiB zstd frame, declared as 16 KiB.
    bomb = zstandard.ZstdCompressor().compress(bytes(256 * MIB))
    a = request(url, "PUT", path, bomb, {**push, wire.H_ENCODING: "zstd", wire.H_SIZE: "16384"})
    assert a.status == 422 and "declares 268435456 bytes, expected 16384" in a.error(), a
    # The right size, the wrong bytes.
    a = request(url, "PUT", path, os.urandom(1024), raw_headers)
    assert a.status == 422 and "content mismatch" in a.error(), a
    # A size that no chunk can have.
    a = request(url, "PUT", path, data, {**raw_headers, wire.H_SIZE: str(1 << 40)})
    assert a.status == 400 and wire.H_SIZE in a.error(), a
    # None of it was stored.
    a = request(url, "POST", "/v1/chunks/missing", wire.pack({"digests": [digest]}), MSGPACK)
    assert a.status == 200 and json.loads(a.body)["missing"] == [digest]
    assert healthy(url)


class Loris:
    """Connections that send a request head one byte at a time, on a thread of their own."""

    def __init__(self, url: str, count: int, every: float = 1.0) -> None:
        self.head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200
        self.socks = [socket.create_connection(_host_port(url)) for _ in range(count)]
        self.every = every
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every) and self.sent < len(self.head):
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.send(self.head[self.sent : self.sent + 1])
            self.sent += 1

    def __enter__(self) -> Loris:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("target", ["seeder", "daemon"])
def test_slow_loris_clients_do_not_hold_the_server(fleet: Fleet, target: str) -> None:
    url = fleet.cluster.seeder_url if target == "seeder" else fleet.node.url
    path = "/healthz" if target == "seeder" else "/v1/status"
    with Loris(url, 200, every=0.5) as loris:
        t_end = time.monotonic() + 3
        answered = 0
        while time.monotonic() < t_end:
            a = request(url, "GET", path)
            assert a.status == 200 and a.seconds < 3.0, a
            answered += 1
            time.sleep(0.05)
        assert loris.sent >= 4
    assert answered >= 20


async def test_idle_and_slow_loris_connections_are_closed_after_the_idle_timeout() -> None:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app.router.add_get("/", hello)
    stop = asyncio.Event()
    bound: list[int] = []
    server = asyncio.create_task(
        serve(
            app, "127.0.0.1", 0, stop=stop, idle_timeout=1.0, on_ready=lambda h, p: bound.append(p)
        )
    )
    try:
        while not bound:
            await asyncio.sleep(0.01)
        port = bound[0]
        # A slow loris: a byte every 0.2 s, never a whole head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        closed_after = None
        for ch in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100:
            writer.write(bytes([ch]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(100), 0.2)
            except TimeoutError:
                continue
            if data == b"":
                closed_after = time.monotonic() - t0
                break
        writer.close()
        assert closed_after is not None and closed_after < 5, closed_after
        # An idle keep-alive connection after its answer goes the same way.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(2) == b"hi"
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - t0 < 5
        writer.close()
    finally:
        stop.set()
        await server


async def test_slow_request_body_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "BODY_GRACE", 0.5)
    app = web.Application()

    async def echo(request: web.Request) -> web.Response:
        try:
            return web.Response(body=await read_body(request, 1000))
        except httpserver.ApiError as e:
            return web.Response(status=e.status, text=e.message)

    app.router.add_post("/", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert time.monotonic() - t0 < 5
        writer.close()
    finally:
        await runner.cleanup()
