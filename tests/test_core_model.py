"""Property tests for the pure content model: chunking, the codec, encoding, validation."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distd.materialize import materialize
from manifests import validate
from manifests.chunking import ChunkError, decode_chunk, encode_chunk, verify_chunk
from manifests.model import Chunk, Encoding, Entry, Kind, Manifest, ManifestError
from manifests.push import read_source
from manifests.scan import scan_tree
from manifests.validate import MAX_NAME_BYTES, decode_manifest, validate_path

# --- chunking and the chunk codec -------------------------------------------------------


def _content(kind: str, size: int, seed: int) -> bytes:
    """Random bytes, or runs that repeat so one file holds identical chunks."""
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "zeros":
        return bytes(size)
    unit = rnd.randbytes(rnd.randrange(1, 9))
    return (unit * (size // len(unit) + 1))[:size]


@st.composite
def _files(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    """A chunk size of 1 B..64 KiB and up to three files of up to four chunks and a byte,
    sizes near chunk boundaries drawn often."""
    cs = draw(st.one_of(st.integers(1, 64), st.integers(1, 64 << 10)))
    files = []
    for _ in range(draw(st.integers(1, 3))):
        near = st.builds(lambda n, d: max(0, n * cs + d), st.integers(0, 4), st.integers(-1, 1))
        size = draw(st.one_of(near, st.integers(0, 4 * cs + 1)))
        kind = draw(st.sampled_from(["random", "zeros", "pattern"]))
        files.append(_content(kind, size, draw(st.integers(0, 2**32))))
    return cs, files


@settings(max_examples=60, deadline=None)
@given(_files())
def test_scan_then_materialize_is_identity(case: tuple[int, list[bytes]]) -> None:
    """Chunking is the production path end to end: `scan_tree` cuts and hashes, the push's
    `read_source` reads each chunk back, `materialize` writes the files from the chunks."""
    cs, files = case
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = Path(tmp) / "src", Path(tmp) / "dest"
        src.mkdir()
        for i, data in enumerate(files):
            (src / f"f{i}").write_bytes(data)
        scan = scan_tree(src, cs, workers=2)
        raw = {d: read_source(s) for d, s in scan.sources.items()}
        for digest, chunk in raw.items():
            assert hashlib.sha256(chunk).hexdigest() == digest
            assert len(chunk) == scan.sources[digest].size
        for e in scan.entries:
            sizes = [len(raw[d]) for d in e.chunks]
            assert sum(sizes) == e.size
            assert all(n == cs for n in sizes[:-1])
            assert all(0 < n <= cs for n in sizes[-1:])
        table = {d: Chunk(d, len(b), len(b), Encoding.RAW) for d, b in raw.items()}
        manifest = Manifest.build(scan.entries, table, cs)
        materialize(manifest, lambda digest, size: raw[digest], dest)
        for i, data in enumerate(files):
            assert (dest / f"f{i}").read_bytes() == data


@given(st.one_of(st.binary(min_size=1, max_size=20000), st.text(min_size=1).map(str.encode)))
def test_encode_decode_chunk_round_trip(raw: bytes) -> None:
    enc, payload = encode_chunk(raw)
    if enc is Encoding.ZSTD:
        assert len(payload) <= len(raw) - len(raw) // 16
    else:
        assert payload == raw
    digest = hashlib.sha256(raw).hexdigest()
    assert verify_chunk(digest, payload, enc, len(raw)) == raw


def test_compressible_chunk_is_zstd_and_random_chunk_is_raw() -> None:
    assert encode_chunk(b"abc" * 10000)[0] is Encoding.ZSTD
    assert encode_chunk(os.urandom(100000))[0] is Encoding.RAW


@given(st.binary(min_size=64, max_size=4096), st.data())
def test_any_flipped_byte_is_rejected(raw: bytes, data: st.DataObject) -> None:
    enc, payload = encode_chunk(raw)
    i = data.draw(st.integers(0, len(payload) - 1))
    bad = bytearray(payload)
    bad[i] ^= 1 + data.draw(st.integers(0, 254))
    with pytest.raises(ChunkError):
        verify_chunk(hashlib.sha256(raw).hexdigest(), bytes(bad), enc, len(raw))


def test_zstd_frame_claiming_wrong_size_is_refused_before_decompressing() -> None:
    enc, payload = encode_chunk(b"x" * 100000)
    assert enc is Encoding.ZSTD
    with pytest.raises(ChunkError, match="declares 100000 bytes, expected 10"):
        decode_chunk(payload, enc, 10)
    with pytest.raises(ChunkError, match="not a zstd frame"):
        decode_chunk(b"garbage-garbage", Encoding.ZSTD, 10)


# --- paths ------------------------------------------------------------------------------

_component = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= MAX_NAME_BYTES)
legal_paths = st.lists(_component, min_size=1, max_size=6).map("/".join)


@given(legal_paths)
def test_every_legal_path_is_accepted(path: str) -> None:
    assert validate_path(path) == path


@given(st.lists(_component, max_size=4), st.lists(_component, max_size=4), st.data())
def test_every_escaping_path_is_rejected(
    before: list[str], after: list[str], data: st.DataObject
) -> None:
    bad = data.draw(st.sampled_from(["..", ".", ""]))
    path = "/".join([*before, bad, *after])
    with pytest.raises(ManifestError):
        validate_path(path)
    with pytest.raises(ManifestError, match="absolute"):
        validate_path("/" + "/".join([*before, "x"]))


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("a/../b", "'..' component"),
        ("..", "'..' component"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty component"),
        ("a/", "empty component"),
        ("./a", "'.' component"),
        ("a\0b", "NUL"),
        ("", "empty"),
        ("a\udcffb", "UTF-8"),
        ("x" * 256, "over 255 bytes"),
    ],
)
def test_path_rejections_name_the_rule(path: str, rule: str) -> None:
    with pytest.raises(ManifestError, match=rule.replace(".", r"\.")):
        validate_path(path)


# --- manifests ----------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """Random valid manifests: a tree of dirs, files sharing chunks, and symlinks."""
    chunk_size = draw(st.integers(1, 64))
    blobs = draw(st.lists(st.binary(min_size=1, max_size=chunk_size), min_size=1, max_size=8))
    table: dict[str, Chunk] = {}
    for b in blobs:
        enc = draw(st.sampled_from(list(Encoding)))
        stored = len(b) if enc is Encoding.RAW or len(b) < 2 else draw(st.integers(1, len(b) - 1))
        table[_digest(b)] = Chunk(_digest(b), len(b), stored, enc if len(b) > 1 else Encoding.RAW)
    digests = sorted(table)
    names = draw(st.lists(_component, min_size=1, max_size=12, unique=True))
    entries: list[Entry] = []
    dirs = [""]
    used: set[str] = set()
    for name in names:
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{name}" if parent else name
        if any(e.path == path for e in entries):
            continue
        kind = draw(st.sampled_from(list(Kind)))
        mode = draw(st.integers(0, 0o7777))
        if kind is Kind.DIR:
            entries.append(Entry(path, kind, mode))
            dirs.append(path)
        elif kind is Kind.SYMLINK:
            target = draw(
                st.text(
                    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                    min_size=1,
                )
            )
            entries.append(Entry(path, kind, mode, target=target))
        else:
            chunks = tuple(draw(st.lists(st.sampled_from(digests), max_size=4)))
            used.update(chunks)
            size = sum(table[d].size for d in chunks)
            sha = _digest(path.encode())
            entries.append(Entry(path, kind, mode, size=size, sha256=sha, chunks=chunks))
    return Manifest.build(entries, {d: table[d] for d in used}, chunk_size)


@given(manifests())
def test_decode_of_encode_is_identity(m: Manifest) -> None:
    data = m.encode()
    assert decode_manifest(data) == m
    assert decode_manifest(data).encode() == data


@given(manifests(), st.randoms(use_true_random=False))
def test_digest_is_stable_under_listing_order(m: Manifest, rnd: random.Random) -> None:
    entries = list(m.entries)
    rnd.shuffle(entries)
    chunks = list(m.chunks)
    rnd.shuffle(chunks)
    again = Manifest.build(entries, {c.digest: c for c in chunks}, m.chunk_size)
    assert again.digest == m.digest


@given(st.binary(max_size=2000))
def test_garbage_bytes_only_ever_raise_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        decode_manifest(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(manifests(), st.data())
def test_mutated_manifest_is_valid_or_rejected_cleanly(m: Manifest, data: st.DataObject) -> None:
    raw = bytearray(m.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        survivor = decode_manifest(bytes(raw))
    except ManifestError:
        return
    assert decode_manifest(survivor.encode()) == survivor


def _doc(entries: list[list[object]], chunks: list[list[object]], chunk_size: int = 8) -> bytes:
    out: bytes = msgpack.packb(["p2pdist-manifest", 1, chunk_size, entries, chunks])
    return out


_C = hashlib.sha256(b"abcd").digest()


@pytest.mark.parametrize(
    ("entries", "rule"),
    [
        ([["a", "symlink", 0o777, "/etc"], ["a/x", "file", 0o644, 4, _C, [_C]]], "beneath symlink"),
        ([["a/x", "file", 0o644, 4, _C, [_C]]], "no parent directory entry 'a'"),
        ([["a", "dir", 0o755], ["a", "dir", 0o755]], "appears twice"),
        ([["b", "dir", 0o755], ["a", "dir", 0o755]], "out of canonical"),
        ([["f", "file", 0o644, 5, _C, [_C]]], "size 5 != 4"),
        ([["../x", "dir", 0o755]], "'..' component"),
        ([["/x", "dir", 0o755]], "absolute"),
        ([["f", "file", 0o644, 4, _C, [_C]], ["f/x", "dir", 0o755]], "non-directory"),
        ([["d", "dir", 0o17777]], "mode must be"),
        ([["d", "fifo", 0o644]], "unknown kind"),
        ([["f", "file", 0o644, 4, b"short", [_C]]], "32-byte"),
    ],
)
def test_hostile_manifests_are_refused_with_the_rule(
    entries: list[list[object]], rule: str
) -> None:
    uses_chunk = any(len(e) == 6 for e in entries)
    chunks = [[_C, 4, 4, "raw"]] if uses_chunk else []
    with pytest.raises(ManifestError, match=rule.replace("(", r"\(")) as info:
        decode_manifest(_doc(entries, chunks))
    assert "\n" not in str(info.value)


def _with_bad_utf8(doc: bytes, placeholder: str) -> bytes:
    """`doc` with "BAD" in the msgpack str `placeholder` turned into invalid UTF-8."""
    packed = msgpack.packb(placeholder)
    assert doc.count(packed) == 1
    return doc.replace(packed, packed.replace(b"BAD", b"\xff\xfe\xfd"))


_LONG = "x" * 20_000


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _with_bad_utf8(_doc([["d", "dir", 0o755], ["d/BAD", "dir", 0o755]], []), "d/BAD"),
            "entry 1: path 'd/\\udcff\\udcfe\\udcfd' is not valid UTF-8",
        ),
        (
            _with_bad_utf8(_doc([["l", "symlink", 0o777, "BADBAD"]], []), "BADBAD"),
            "entry 'l' symlink target is not valid UTF-8",
        ),
        (
            _doc([["d", "dir", 0o755], ["d/" + _LONG, "dir", 0o755]], []),
            "entry 1: path 'd/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... "
            "is longer than 4096 bytes",
        ),
        (
            _doc([["l", "symlink", 0o777, _LONG]], []),
            "entry 'l' symlink target is over 4095 bytes",
        ),
        (
            _doc([["d", _LONG, 0o755]], []),
            "entry 'd' has unknown kind '" + "x" * 76 + "...",
        ),
    ],
    ids=["path-not-utf8", "target-not-utf8", "path-too-long", "target-too-long", "kind-long"],
)
def test_bad_strings_are_refused_naming_entry_and_rule(doc: bytes, message: str) -> None:
    """Invalid UTF-8 and over-long strings get the entry and the rule, not a decoder error."""
    with pytest.raises(ManifestError) as info:
        decode_manifest(doc)
    assert str(info.value) == message


def test_entry_count_limit_is_a_one_line_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "MAX_ENTRIES", 3)
    dirs: list[list[object]] = [[f"d{i}", "dir", 0o755] for i in range(4)]
    assert len(decode_manifest(_doc(dirs[:3], [])).entries) == 3
    with pytest.raises(ManifestError) as info:
        decode_manifest(_doc(dirs, []))
    assert str(info.value) == "manifest has 4 entries, over the limit of 3"


def test_manifest_size_limit_is_a_one_line_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    dirs: list[list[object]] = [[f"d{i:02}", "dir", 0o755] for i in range(20)]
    data = _doc(dirs, [])
    monkeypatch.setattr(validate, "MAX_MANIFEST_BYTES", len(data))
    assert len(decode_manifest(data).entries) == 20
    bigger = _doc([*dirs, ["e", "dir", 0o755]], [])
    with pytest.raises(ManifestError) as info:
        decode_manifest(bigger)
    assert str(info.value) == f"manifest is {len(bigger)} bytes, over the limit of {len(data)}"


def test_chunk_table_rules() -> None:
    f = ["f", "file", 0o644, 4, _C, [_C]]
    with pytest.raises(ManifestError, match="not in the chunk table"):
        decode_manifest(_doc([f], []))
    other = hashlib.sha256(b"zz").digest()
    with pytest.raises(ManifestError, match="no file uses it"):
        decode_manifest(_doc([f], sorted([[_C, 4, 4, "raw"], [other, 2, 2, "raw"]])))
    with pytest.raises(ManifestError, match="raw but its stored size"):
        decode_manifest(_doc([f], [[_C, 4, 3, "raw"]]))
    with pytest.raises(ManifestError, match="size must be an integer in"):
        decode_manifest(_doc([f], [[_C, 9, 9, "raw"]], chunk_size=8))


# --- scanning real trees -----------------------------------------------------------------


def _make_tree(root: Path, seed: int) -> None:
    rnd = random.Random(seed)
    for d in range(4):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(5):
            (sub / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 300)))
    (root / "same1").write_bytes(b"z" * 1000)
    (root / "same2").write_bytes(b"z" * 1000)
    (root / "link").symlink_to("dir0/nested/f0")
    (root / "empty").mkdir()


def test_same_tree_in_different_places_scans_to_the_same_digest(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _make_tree(a, 7)
    _make_tree(b, 7)

    def digest(root: Path, workers: int) -> str:
        r = scan_tree(root, 64, workers=workers)
        table = {d: Chunk(d, s.size, s.size, Encoding.RAW) for d, s in r.sources.items()}
        return Manifest.build(r.entries, table, r.chunk_size).digest

    assert digest(a, 1) == digest(b, 4)


def test_scan_shares_identical_chunks_and_refuses_special_files(tmp_path: Path) -> None:
    _make_tree(tmp_path, 1)
    r = scan_tree(tmp_path, 100)
    same = [e for e in r.entries if e.path.startswith("same")]
    assert same[0].chunks == same[1].chunks
    assert r.chunk_refs > len(r.sources)
    os.mkfifo(tmp_path / "dir1" / "pipe")
    with pytest.raises(ManifestError, match=r"dir1/pipe' is a fifo"):
        scan_tree(tmp_path, 100)


def test_scan_file_sha_is_whole_file_sha(tmp_path: Path) -> None:
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "g").write_bytes(data[:50])
    r = scan_tree(tmp_path, 64)
    by_path = {e.path: e for e in r.entries}
    assert by_path["f"].sha256 == _digest(data)
    assert len(by_path["f"].chunks) == 16
    assert by_path["g"].sha256 == _digest(data[:50]) == by_path["g"].chunks[0]


def test_hard_link_becomes_two_files_sharing_chunks(tmp_path: Path) -> None:
    """The issue's rule: a hard link is not a kind of entry; both names are files whose
    chunks are stored once, and the materialized image has two independent files."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    data = os.urandom(3 * 64 + 5)
    (src / "orig").write_bytes(data)
    os.link(src / "orig", src / "d" / "link")
    scan = scan_tree(src, 64, workers=2)
    files = {e.path: e for e in scan.entries if e.kind is Kind.FILE}
    assert sorted(files) == ["d/link", "orig"]
    a, b = files["orig"], files["d/link"]
    assert (a.size, a.sha256, a.chunks) == (b.size, b.sha256, b.chunks)
    assert (a.size, a.sha256) == (len(data), _digest(data))
    assert len(a.chunks) == 4 and len(scan.sources) == 4 and scan.chunk_refs == 8
    raw = {d: read_source(s) for d, s in scan.sources.items()}
    table = {d: Chunk(d, len(v), len(v), Encoding.RAW) for d, v in raw.items()}
    manifest = Manifest.build(scan.entries, table, 64)
    assert len(manifest.chunks) == 4
    dest = tmp_path / "dest"
    materialize(manifest, lambda digest, size: raw[digest], dest)
    for path in ("orig", "d/link"):
        assert (dest / path).read_bytes() == data
        assert os.stat(dest / path).st_nlink == 1
