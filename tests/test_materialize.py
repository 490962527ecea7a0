"""The materializer on a real filesystem: exact trees, atomic placement, hostile manifests."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import random
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treeutil import build_manifest, rmtree_force, snapshot

import distd.materialize as mat
from distd.materialize import DestExistsError, MaterializeError, materialize, sweep_temp_dirs
from manifests.chunking import encode_chunk
from manifests.model import Chunk, Entry, Kind, Manifest
from manifests.validate import decode_manifest

CS = 64  # a tiny chunk size, so small files span several chunks


def _reader(raw: dict[str, bytes]) -> mat.ReadChunk:
    def read(digest: str, size: int) -> bytes:
        data = raw[digest]
        assert len(data) == size
        return data

    return read


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def _rich_tree(root: Path) -> None:
    """Every kind of entry the issue lists: nested/empty dirs, links, modes, odd names."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep\n" * 50)
    (root / "empty-file").write_bytes(b"")
    (root / "one-chunk").write_bytes(os.urandom(CS))
    (root / "one-chunk-plus-1").write_bytes(os.urandom(CS + 1))
    (root / "three-chunks").write_bytes(os.urandom(3 * CS))
    (root / "copy-of-three").write_bytes((root / "three-chunks").read_bytes())
    (root / "zeros").write_bytes(bytes(5 * CS))
    run = root / "run me.sh"
    run.write_bytes(b"#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    secret = root / "a" / "secret"
    secret.write_bytes(b"s3cret")
    secret.chmod(0o600)
    (root / "héllo wörld ☃.txt").write_bytes("ünïcödé\n".encode())
    (root / "日本 dir").mkdir()
    (root / "日本 dir" / "ファイル").write_bytes(b"x" * 100)
    (root / "rel-link").symlink_to("a/b/c/deep.txt")
    (root / "a" / "up-link").symlink_to("../run me.sh")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "dir-link").symlink_to("a/b")
    (root / "setgid-dir").mkdir()
    (root / "setgid-dir").chmod(0o2775)
    (root / "a" / "b").chmod(0o750)


@pytest.fixture
def rich(tmp_path: Path) -> tuple[Path, Manifest, dict[str, bytes]]:
    src = tmp_path / "src"
    src.mkdir()
    _rich_tree(src)
    manifest, raw = build_manifest(src, CS)
    # Whatever we build must also be a manifest the network side would accept.
    assert decode_manifest(manifest.encode()) == manifest
    return src, manifest, raw


def test_tree_is_byte_identical(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    seen: list[int] = []
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            seen.append(n)

    materialize(manifest, _reader(raw), dest, workers=3, on_bytes=on_bytes)
    assert snapshot(dest) == snapshot(src)
    assert sum(seen) == manifest.total_size
    assert _leftovers(dest.parent) == []
    assert os.readlink(dest / "abs-link") == "/etc/hostname"
    assert not (dest / "dangling").exists()
    assert os.access(dest / "run me.sh", os.X_OK)


def test_sha_mismatch_aborts_and_cleans_up(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    _src, manifest, raw = rich
    for victim in ("three-chunks", "one-chunk", "empty-file"):
        bad = tuple(
            dataclasses.replace(e, sha256="ab" * 32) if e.path == victim else e
            for e in manifest.entries
        )
        dest = tmp_path / "out" / victim
        with pytest.raises(MaterializeError, match=f"'{victim}'"):
            materialize(dataclasses.replace(manifest, entries=bad), _reader(raw), dest)
        assert not os.path.lexists(dest)
        assert _leftovers(dest.parent) == []


def test_wrong_chunk_bytes_abort(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    """A reader that breaks its contract (short or missing chunk) fails cleanly."""
    _src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    some = next(iter(raw))

    def short(digest: str, size: int) -> bytes:
        return raw[digest][:-1] if digest == some else raw[digest]

    with pytest.raises(MaterializeError, match=some[:16]):
        materialize(manifest, short, dest)
    missing = dict(raw)
    del missing[some]
    with pytest.raises(MaterializeError, match=f"cannot read chunk {some[:16]}"):
        materialize(manifest, _reader(missing), dest)
    assert not os.path.lexists(dest)
    assert _leftovers(dest.parent) == []


def test_existing_dest_refused_then_swapped(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    dest.mkdir(parents=True)
    (dest / "old-file").write_text("old")
    (dest / "ro").mkdir()
    (dest / "ro" / "f").write_text("x")
    (dest / "ro").chmod(0o500)
    before = snapshot(dest)
    with pytest.raises(DestExistsError, match="already exists"):
        materialize(manifest, _reader(raw), dest)
    assert snapshot(dest) == before
    inode = os.stat(dest).st_ino

    materialize(manifest, _reader(raw), dest, replace=True)
    assert snapshot(dest) == snapshot(src)
    assert os.stat(dest).st_ino != inode
    assert _leftovers(dest.parent) == []
    # Replacing again with the same content is fine too (and a file in place of a dir).
    materialize(manifest, _reader(raw), dest, replace=True)
    assert snapshot(dest) == snapshot(src)


def test_refuse_empty_existing_dir(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    """rename(2) would silently replace an empty dir; we must not."""
    _src, manifest, raw = rich
    dest = tmp_path / "image"
    dest.mkdir()
    with pytest.raises(DestExistsError):
        materialize(manifest, _reader(raw), dest)
    assert os.listdir(dest) == []


def test_replace_without_renameat2(
    tmp_path: Path,
    rich: tuple[Path, Manifest, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, manifest, raw = rich
    monkeypatch.setattr(mat, "_renameat2", lambda *args: False)
    dest = tmp_path / "image"
    materialize(manifest, _reader(raw), dest)
    assert snapshot(dest) == snapshot(src)
    with pytest.raises(DestExistsError):
        materialize(manifest, _reader(raw), dest)
    (dest / "one-chunk").chmod(0o600)  # a local change that the replace must undo
    materialize(manifest, _reader(raw), dest, replace=True)
    assert snapshot(dest) == snapshot(src)
    assert _leftovers(tmp_path) == []


def test_replace_race_lost_to_new_dest(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    """dest appearing while we build: without replace the final rename refuses it."""
    _src, manifest, raw = rich
    dest = tmp_path / "image"
    first = True

    def read(digest: str, size: int) -> bytes:
        nonlocal first
        if first:
            first = False
            dest.mkdir()
        return raw[digest]

    with pytest.raises(DestExistsError):
        materialize(manifest, read, dest, workers=1)
    assert os.listdir(dest) == []
    assert _leftovers(tmp_path) == []


def test_read_only_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "ro" / "inner-ro").mkdir(parents=True)
    (src / "ro" / "inner-ro" / "f").write_bytes(b"data" * 40)
    (src / "ro" / "g").write_bytes(b"g")
    (src / "ro" / "g").chmod(0o444)
    (src / "ro" / "inner-ro").chmod(0o500)
    (src / "ro").chmod(0o555)
    (src / "noaccess").mkdir()
    (src / "noaccess").chmod(0o000)
    manifest, raw = build_manifest(src, CS)
    dest = tmp_path / "dest"
    materialize(manifest, _reader(raw), dest)
    assert snapshot(dest) == snapshot(src)
    materialize(manifest, _reader(raw), dest, replace=True)
    assert snapshot(dest) == snapshot(src)
    assert _leftovers(tmp_path) == []
    rmtree_force(dest)
    rmtree_force(src)


def _unprivileged_round_trip(base: Path) -> None:
    src = base / "src"
    (src / "ro" / "sub").mkdir(parents=True)
    (src / "ro" / "sub" / "f").write_bytes(b"x" * 300)
    (src / "ro" / "sub").chmod(0o500)
    (src / "ro").chmod(0o555)
    manifest, raw = build_manifest(src, 64)
    dest = base / "dest"
    materialize(manifest, _reader(raw), dest)
    assert snapshot(dest) == snapshot(src)
    materialize(manifest, _reader(raw), dest, replace=True)
    assert snapshot(dest) == snapshot(src)

    def broken(digest: str, size: int) -> bytes:
        raise OSError("boom")

    with pytest.raises(MaterializeError):
        materialize(manifest, broken, base / "other")
    assert _leftovers(base) == []
    (base / ".dest.tmp-0123456789abcdef" / "ro").mkdir(parents=True)
    (base / ".dest.tmp-0123456789abcdef" / "ro").chmod(0o500)
    assert sweep_temp_dirs(base) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the plain test above covers non-root")
def test_read_only_directories_unprivileged() -> None:
    """As root permissions never bite; run the read-only case as `nobody` to be sure."""
    top = Path(tempfile.mkdtemp(prefix="materialize-"))
    top.chmod(0o711)  # nobody may pass through, not list
    base = top / "w"
    base.mkdir()
    os.chown(base, 65534, 65534)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, run, report through the pipe
        os.close(rfd)
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            _unprivileged_round_trip(base)
            code = 0
        except BaseException as e:
            os.write(wfd, repr(e).encode()[:4000])
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        report = r.read().decode()
    _, status = os.waitpid(pid, 0)
    rmtree_force(top)
    assert os.waitstatus_to_exitcode(status) == 0, report


def _hostile(entries: list[Entry], data: bytes = b"pwned") -> tuple[Manifest, dict[str, bytes]]:
    """A manifest built by hand, in the given order, with no validation at all."""
    digest = hashlib.sha256(data).hexdigest()
    enc, payload = encode_chunk(data)
    table = (Chunk(digest, len(data), len(payload), enc),)
    fixed = tuple(
        dataclasses.replace(e, size=len(data), sha256=digest, chunks=(digest,))
        if e.kind is Kind.FILE
        else e
        for e in entries
    )
    return Manifest(fixed, table, 1 << 20), {digest: data}


@pytest.mark.parametrize(
    "entries",
    [
        # A file beneath a symlink that points outside.
        [Entry("link", Kind.SYMLINK, 0o777, target="{outside}"), Entry("link/evil", Kind.FILE, 0)],
        # The same with the file listed first (order must not matter).
        [Entry("link/evil", Kind.FILE, 0o644), Entry("link", Kind.SYMLINK, 0o777, target="{out}")],
        # A directory, then a file, beneath the symlink.
        [
            Entry("link", Kind.SYMLINK, 0o777, target="{outside}"),
            Entry("link/d", Kind.DIR, 0o755),
            Entry("link/d/evil", Kind.FILE, 0o644),
        ],
        # A symlink named like a file: the file must not be written through it.
        [
            Entry("victim", Kind.SYMLINK, 0o777, target="{outside}/marker"),
            Entry("victim", Kind.FILE, 0o644),
        ],
        # A dir symlink inside the tree pointing at a relative escape.
        [
            Entry("d", Kind.DIR, 0o755),
            Entry("d/up", Kind.SYMLINK, 0o777, target="../../outside"),
            Entry("d/up/evil", Kind.FILE, 0o644),
        ],
        # '..' components and absolute paths.
        [Entry("a", Kind.DIR, 0o755), Entry("a/../../outside/evil", Kind.FILE, 0o644)],
        [Entry("../outside/evil", Kind.FILE, 0o644)],
        [Entry("{outside}/evil", Kind.FILE, 0o644)],
        [Entry("a//evil", Kind.FILE, 0o644)],
        [Entry("./evil", Kind.FILE, 0o644)],
        # A file where a directory should be.
        [Entry("f", Kind.FILE, 0o644), Entry("f/evil", Kind.FILE, 0o644)],
    ],
)
def test_hostile_manifest_never_escapes(tmp_path: Path, entries: list[Entry]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker").write_text("untouched")
    before = snapshot(outside)

    def fill(text: str) -> str:
        return text.replace("{outside}", str(outside)).replace("{out}", str(outside))

    entries = [dataclasses.replace(e, path=fill(e.path), target=fill(e.target)) for e in entries]
    manifest, raw = _hostile(entries)
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "image"
    with pytest.raises(MaterializeError):
        materialize(manifest, _reader(raw), dest)
    with pytest.raises(MaterializeError):  # staged: refused when the tree is laid out
        mat.StagedImage(manifest, dest)
    assert snapshot(outside) == before
    assert sorted(os.listdir(tmp_path)) == ["outside", "work"]
    assert os.listdir(work) == []


def test_symlink_never_followed_even_in_same_dir(tmp_path: Path) -> None:
    """A link to a sibling file, then that sibling: both end up as in the manifest."""
    entries = [
        Entry("a", Kind.SYMLINK, 0o777, target="b"),
        Entry("b", Kind.FILE, 0o644),
    ]
    manifest, raw = _hostile(entries)
    dest = tmp_path / "image"
    materialize(manifest, _reader(raw), dest)
    assert os.readlink(dest / "a") == "b"
    assert (dest / "b").read_bytes() == b"pwned"


def test_cancel_and_interrupt_leave_nothing(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    _src, manifest, raw = rich
    dest = tmp_path / "image"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(MaterializeError, match="cancelled"):
        materialize(manifest, _reader(raw), dest, cancel=cancel)
    assert not os.path.lexists(dest)

    def interrupt(digest: str, size: int) -> bytes:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        materialize(manifest, interrupt, dest)
    assert not os.path.lexists(dest)
    assert _leftovers(tmp_path) == []


def test_sweep_temp_dirs(tmp_path: Path) -> None:
    stale = tmp_path / ".image.tmp-0123456789abcdef"
    (stale / "ro").mkdir(parents=True)
    (stale / "ro" / "f").write_text("x")
    (stale / "ro").chmod(0o500)
    (tmp_path / ".image.old-0123456789abcdef").mkdir()
    (tmp_path / ".other.tmp-fedcba9876543210").mkdir()
    live = tmp_path / ".image.tmp-aaaaaaaaaaaaaaaa"
    live.mkdir()
    (tmp_path / "image").mkdir()
    (tmp_path / ".image.tmp-notahexsuffix!!").mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sweep_temp_dirs(tmp_path, "image") == 2
        assert sorted(os.listdir(tmp_path)) == sorted(
            [
                ".other.tmp-fedcba9876543210",
                ".image.tmp-aaaaaaaaaaaaaaaa",
                ".image.tmp-notahexsuffix!!",
                "image",
            ]
        )
        assert sweep_temp_dirs(tmp_path) == 1
    finally:
        os.close(fd)
    assert sweep_temp_dirs(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == [".image.tmp-notahexsuffix!!", "image"]
    assert sweep_temp_dirs(tmp_path / "missing") == 0


def test_long_destination_name(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / ("é" * 127)  # 254 bytes: the temp name must still fit
    materialize(manifest, _reader(raw), dest)
    assert snapshot(dest) == snapshot(src)


# --- property: scan -> materialize is the identity on random small trees -------------

_NAMES = st.text(alphabet="abcxyz é日-_. ", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_FILE = st.tuples(
    st.just("file"),
    st.sampled_from([0o644, 0o755, 0o600, 0o444, 0o4755]),
    st.binary(max_size=3 * 8),
)
_LINK = st.tuples(st.just("link"), st.just(0), st.sampled_from(["x", "/abs/t", "../up", "a b/é"]))
_TREE = st.recursive(
    st.dictionaries(_NAMES, st.one_of(_FILE, _LINK), max_size=4),
    lambda children: st.dictionaries(
        _NAMES,
        st.one_of(
            _FILE,
            _LINK,
            st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700, 0o555, 0o1777]), children),
        ),
        max_size=4,
    ),
    max_leaves=12,
)


def _make(root: Path, tree: dict[str, tuple[str, int, object]]) -> None:
    for name, (kind, mode, payload) in tree.items():
        path = root / name
        if kind == "file":
            assert isinstance(payload, bytes)
            path.write_bytes(payload)
            path.chmod(mode)
        elif kind == "link":
            assert isinstance(payload, str)
            path.symlink_to(payload)
        else:
            assert isinstance(payload, dict)
            path.mkdir()
            _make(path, payload)
            path.chmod(mode)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tree=_TREE)
def test_scan_materialize_roundtrip(tree: dict[str, tuple[str, int, object]]) -> None:
    with tempfile.TemporaryDirectory() as base:
        src = Path(base) / "src"
        src.mkdir()
        _make(src, tree)
        manifest, raw = build_manifest(src, 8)
        dest = Path(base) / "dest"
        materialize(manifest, _reader(raw), dest, workers=2)
        try:
            assert snapshot(dest) == snapshot(src)
            assert _leftovers(Path(base)) == []
        finally:
            rmtree_force(dest)
            rmtree_force(src)


def test_temp_dir_swept_before_it_was_locked(
    tmp_path: Path,
    rich: tuple[Path, Manifest, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A concurrent sweeper removing our brand-new temp dir only costs a retry."""
    src, manifest, raw = rich
    out = tmp_path / "out"
    out.mkdir()
    real = fcntl.flock
    swept: list[str] = []

    def flock(fd: int, op: int) -> None:
        if not swept and op == fcntl.LOCK_EX:
            swept.extend(_leftovers(out))
            for name in swept:
                os.rmdir(out / name)
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    materialize(manifest, _reader(raw), out / "image")
    assert len(swept) == 1
    assert snapshot(out / "image") == snapshot(src)
    assert _leftovers(out) == []


# --- StagedImage: built while chunks arrive --------------------------------------------------


def test_staged_random_order_is_byte_identical(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    stage = mat.StagedImage(manifest, dest)
    order = stage.digests()
    assert set(order) <= set(raw)
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda d: stage.write_chunk(d, raw[d]), order))
    stage.write_chunk(order[0], raw[order[0]])  # a repeat is harmless
    assert not any(stage.needs(d) for d in order)
    assert not os.path.lexists(dest)
    stage.finish()
    stage.close()  # a no-op once finished
    assert snapshot(dest) == snapshot(src)
    assert _leftovers(dest.parent) == []


def test_staged_corrupt_chunk_is_refused(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    stage = mat.StagedImage(manifest, dest)
    victim = next(e for e in manifest.entries if e.path == "three-chunks").chunks[1]
    bad = bytes([raw[victim][0] ^ 1]) + raw[victim][1:]
    with pytest.raises(mat.ContentError, match="does not match") as info:
        stage.write_chunk(victim, bad)
    assert info.value.path in ("three-chunks", "copy-of-three")  # they share the chunk
    assert stage.needs(victim)  # nothing of it was written
    for d in stage.digests():
        if d != victim:
            stage.write_chunk(d, raw[d])
    with pytest.raises(MaterializeError, match="never written"):
        stage.finish()
    assert not os.path.lexists(dest) and _leftovers(dest.parent) == []

    stage = mat.StagedImage(manifest, dest)
    stage.write_chunk(victim, bad, verified=True)  # a caller's word is taken: its check
    for d in stage.digests():
        stage.write_chunk(d, raw[d])
    stage.finish()
    assert snapshot(dest) != snapshot(src)  # ...so the word must be true (see staging.py)


def test_staged_missing_chunk_and_cancel_clean_up(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    _src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    stage = mat.StagedImage(manifest, dest)
    digests = stage.digests()
    for d in digests[1:]:
        stage.write_chunk(d, raw[d])
    with pytest.raises(MaterializeError, match="never written"):
        stage.finish()
    assert _leftovers(dest.parent) == [] and not os.path.lexists(dest)
    with pytest.raises(MaterializeError, match="cancelled"):
        stage.write_chunk(digests[0], raw[digests[0]])  # a late write finds it closed

    with mat.StagedImage(manifest, dest) as stage:
        stage.write_chunk(digests[0], raw[digests[0]])
        assert len(_leftovers(dest.parent)) == 1
        # A live staging is locked: a sweep leaves it alone.
        assert sweep_temp_dirs(dest.parent) == 0
    assert _leftovers(dest.parent) == [] and not os.path.lexists(dest)

    stage = mat.StagedImage(manifest, dest)
    stage.cancel.set()
    with pytest.raises(MaterializeError, match="cancelled"):
        stage.finish()
    assert _leftovers(dest.parent) == [] and not os.path.lexists(dest)


def test_staged_replaces_and_refuses(
    tmp_path: Path, rich: tuple[Path, Manifest, dict[str, bytes]]
) -> None:
    src, manifest, raw = rich
    dest = tmp_path / "out" / "image"
    dest.mkdir(parents=True)
    (dest / "old").write_bytes(b"old")
    with pytest.raises(DestExistsError):
        mat.StagedImage(manifest, dest)
    stage = mat.StagedImage(manifest, dest, replace=True)
    for d in stage.digests():
        stage.write_chunk(d, raw[d])
    assert (dest / "old").exists()  # untouched until the rename
    stage.finish()
    assert snapshot(dest) == snapshot(src)
    assert _leftovers(dest.parent) == []
