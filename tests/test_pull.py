"""`distd pull`: against a real seeder process, and the pull-side checks with fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from conftest import PUSH_TOKEN, SeederProcess
from treeutil import build_manifest, snapshot

import distd.pull as pull_mod
from distd.pull import FetchStats, PullError, fetch_chunks, materialize_from_store, pull_image
from distd.store import ChunkStore, raw_size_of
from distd.swarm import bitfield
from distd.swarm_pull import SwarmPull, SwarmPullConfig
from manifests import wire
from manifests.chunking import encode_chunk, verify_chunk
from manifests.client import SeederClient
from manifests.model import Chunk, Encoding, Entry, Kind, Manifest, ManifestError
from manifests.push import PushSummary, push_tree
from manifests.validate import decode_manifest

CS = 4096
NAME = "team/app:v1"


def _tree(root: Path, cs: int = CS, big: int = 40 * CS) -> None:
    """The shapes the issue asks a pull to reproduce; `big` random bytes under two names."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep text\n" * 2000)
    (root / "empty-file").write_bytes(b"")
    (root / "one-chunk").write_bytes(os.urandom(cs))
    (root / "one-chunk-plus-1").write_bytes(os.urandom(cs + 1))
    (root / "big").write_bytes(os.urandom(big))
    (root / "a" / "same-as-big").write_bytes((root / "big").read_bytes())
    exe = root / "run me.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    (root / "héllo wörld ☃.txt").write_bytes("ünïcödé\n".encode())
    (root / "rel-link").symlink_to("a/b/c/deep.txt")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "a" / "ro").mkdir()
    (root / "a" / "ro" / "f").write_bytes(b"read only")
    (root / "a" / "ro").chmod(0o555)


async def _push(url: str, src: Path, cs: int = CS) -> tuple[PushSummary, Manifest]:
    """Push with the production push code, and the manifest the seeder now serves."""
    async with SeederClient(url, PUSH_TOKEN) as c:
        summary = await push_tree(c, src, NAME, cs, progress=False)
        manifest = decode_manifest(await c.get_manifest(summary.digest))
    return summary, manifest


def _distd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DISTD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "distd.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


# -- against a real seeder ---------------------------------------------------------


def test_pull_gives_identical_tree(seeder: SeederProcess, tmp_path: Path) -> None:
    """Pushed with `push_tree`, pulled with `distd pull`: the same tree, byte for byte; the
    20 MiB content under two names went up once."""
    src = tmp_path / "src"
    src.mkdir()
    cs, big = 1 << 20, 20 << 20
    _tree(src, cs, big)
    summary, manifest = asyncio.run(_push(seeder.url, src, cs))
    assert summary.uploaded_chunks == summary.unique_chunks == len(manifest.chunks)
    assert summary.uploaded_raw_bytes == manifest.total_size - big  # the copy cost nothing
    assert summary.uploaded_bytes < summary.total_bytes - big
    data = tmp_path / "data"
    dest = tmp_path / "out" / "image"

    r = _distd("pull", NAME, "--seeder", seeder.url, "--dest", str(dest), "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    assert snapshot(dest) == snapshot(src)
    n = len(manifest.chunks)
    assert f"{n} chunks fetched" in r.stdout and "0 already held" in r.stdout
    assert r.stdout.count("\n") == 1 and "MB/s" in r.stdout
    assert r.stderr == ""  # no progress bar when stderr is not a terminal

    # Again, into the same place: refused without --replace, nothing fetched with it.
    r = _distd("pull", NAME, "--seeder", seeder.url, "--dest", str(dest), "--data-dir", str(data))
    assert r.returncode == 1
    assert r.stderr.strip() == f"distd: {dest} already exists (pass --replace to swap it)"
    r = _distd(
        "pull",
        manifest.digest,
        "--dest",
        str(dest),
        "--replace",
        "--parallel",
        "1",
        env={"DISTD_SEEDER": seeder.url, "DISTD_DATA_DIR": str(data)},
    )
    assert r.returncode == 0, r.stderr
    assert f"0 chunks fetched (0 B), {n} already held" in r.stdout
    assert snapshot(dest) == snapshot(src)
    assert _leftovers(dest.parent) == []
    os.chmod(dest / "a" / "ro", 0o755)
    os.chmod(src / "a" / "ro", 0o755)


def test_pull_no_p2p_uses_the_seeder_alone(seeder: SeederProcess, tmp_path: Path) -> None:
    """The baseline path: more downloads in flight than the seeder has upload slots, so
    some are answered "busy" and retried; no peer server, no "from peers" in the summary."""
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    _, manifest = asyncio.run(_push(seeder.url, src))
    dest = tmp_path / "image"
    r = _distd(
        "pull",
        NAME,
        "--no-p2p",
        "--parallel",
        "8",
        "--seeder",
        seeder.url,
        "--dest",
        str(dest),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert r.returncode == 0, r.stderr
    assert snapshot(dest) == snapshot(src)
    assert f"{len(manifest.chunks)} chunks fetched" in r.stdout
    assert "from peers" not in r.stdout
    os.chmod(dest / "a" / "ro", 0o755)
    os.chmod(src / "a" / "ro", 0o755)


async def test_swarm_pull_gives_up_when_nothing_arrives(tmp_path: Path) -> None:
    """No seeder and no peer: the swarm pull fails with one line instead of hanging."""
    _src, manifest, _chunks = _good(tmp_path)
    store = ChunkStore(tmp_path / "data")
    gone = f"http://127.0.0.1:{_free_port()}"
    config = SwarmPullConfig(seeder=gone, node_id="lonely", stall_timeout=1.0)
    async with SwarmPull(config, store, tmp_path / "data") as swarm:
        assert swarm.address.startswith("127.0.0.1:")
        with pytest.raises(PullError, match=r"no chunk arrived for 1 s with \d+ still missing"):
            await swarm.fill(manifest, manifest.digest)
    assert len(store) == 0


async def test_swarm_pull_serves_what_it_holds_until_it_ends(
    seeder: SeederProcess, tmp_path: Path
) -> None:
    """While a swarm pull runs, its peer server hands out its chunks and its have-stream."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5 * CS))
    _, manifest = await _push(seeder.url, src)
    store = ChunkStore(tmp_path / "data")
    config = SwarmPullConfig(seeder=seeder.url, node_id="pull-1", announce_interval=0.2)
    async with SwarmPull(config, store, tmp_path / "data") as swarm:
        result = await pull_image(swarm.client, NAME, store, tmp_path / "image", fill=swarm.fill)
        assert snapshot(tmp_path / "image") == snapshot(src)
        assert result.fetch.chunks_fetched == len(manifest.chunks)
        assert result.fetch.bytes_fetched == manifest.stored_size
        assert result.fetch.bytes_from_peers == 0  # nobody else had it
        base = f"http://{swarm.address}"
        chunk = manifest.chunks[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/v1/chunks/{chunk.digest}") as r:
                assert r.status == 200
                payload = await r.read()
                enc = Encoding(r.headers[wire.H_ENCODING])
            verify_chunk(chunk.digest, payload, enc, chunk.size)
            async with http.get(f"{base}/v1/swarm/{manifest.digest}/haves") as r:
                assert r.status == 200
                unpacker = msgpack.Unpacker(raw=False)
                unpacker.feed(await r.content.readany())
                kind, bits = next(unpacker)
                n = len(manifest.chunks)
                assert (kind, bitfield.from_bytes(bits, n)) == ("bitfield", bitfield.full(n))
    host, port = swarm.address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


async def test_a_full_upload_slot_is_announced_on_the_have_stream(
    seeder: SeederProcess, tmp_path: Path
) -> None:
    """When an upload takes the last free slot, every follower hears for how long, so it
    can skip this node until then instead of asking and hearing "busy"."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * CS))
    _, manifest = await _push(seeder.url, src)
    store = ChunkStore(tmp_path / "data")
    # One slot at CS bytes/s: an upload of one chunk holds it for about a second.
    config = SwarmPullConfig(seeder=seeder.url, node_id="p", max_upload_rate=CS, upload_slots=1)
    async with SwarmPull(config, store, tmp_path / "data") as swarm:
        await pull_image(swarm.client, NAME, store, tmp_path / "image", fill=swarm.fill)
        base = f"http://{swarm.address}"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base}/v1/swarm/{manifest.digest}/haves") as stream,
        ):
            unpacker = msgpack.Unpacker(raw=False)

            async def message() -> Any:
                while True:
                    for msg in unpacker:
                        return msg
                    unpacker.feed(await stream.content.readany())

            assert (await message())[0] == "bitfield"
            chunk = manifest.chunks[0]
            upload = asyncio.ensure_future(http.get(f"{base}/v1/chunks/{chunk.digest}"))
            kind, ms = await asyncio.wait_for(message(), 10)
            assert kind == "busy" and 0 < ms <= 1000  # the upload's expected end at CS/s
            async with http.get(f"{base}/v1/chunks/{manifest.chunks[1].digest}") as r:
                assert r.status == 503  # and a request meanwhile still hears "busy"
            async with await upload as r:
                assert r.status == 200 and len(await r.read()) == chunk.stored_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_pull_errors_are_one_line(seeder: SeederProcess, tmp_path: Path) -> None:
    dest = tmp_path / "image"
    data = ["--data-dir", str(tmp_path / "data")]
    gone = f"http://127.0.0.1:{_free_port()}"
    r = _distd("pull", NAME, "--seeder", gone, "--dest", str(dest), *data)
    assert r.returncode == 1
    assert r.stderr.startswith(f"distd: seeder at {gone} is unreachable")
    assert r.stderr.count("\n") == 1

    r = _distd("pull", "team/none:v1", "--seeder", seeder.url, "--dest", str(dest), *data)
    assert r.returncode == 1
    assert r.stderr == "distd: no such name 'team/none:v1'\n"
    assert not dest.exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["pull"],
        ["pull", NAME, "--seeder", "http://x"],  # no --dest
        ["pull", NAME, "--dest", "d"],  # no --seeder, no DISTD_SEEDER
        ["pull", "Not A Name", "--seeder", "http://x", "--dest", "d"],
        ["pull", NAME, "--seeder", "http://x", "--dest", "d", "--parallel", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "distd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("DISTD_")},
    )
    assert r.returncode == 2, r.stderr
    assert "usage: distd" in r.stderr
    assert os.listdir(tmp_path) == []


# -- the pull side with fakes: hostile manifests, lying sources, cancellation ----------


class FakeSeeder:
    """A SeederClient stand-in serving one manifest (whatever its content) and its chunks."""

    def __init__(self, manifest_bytes: bytes, chunks: dict[str, tuple[Encoding, bytes]]) -> None:
        self.data = manifest_bytes
        self.chunks = chunks
        self.chunk_calls: list[str] = []

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    async def resolve_name(self, name_or_digest: str) -> str:
        return self.digest

    async def get_manifest(self, digest: str) -> bytes:
        assert digest == self.digest
        return self.data

    async def get_chunk(self, digest: str, *, direct: bool = False) -> tuple[Encoding, int, bytes]:
        self.chunk_calls.append(digest)
        enc, payload = self.chunks[digest]
        return enc, raw_size_of(payload, enc), payload


def _hostile(entries: list[Entry]) -> FakeSeeder:
    data = b"you have been pwned"
    digest = hashlib.sha256(data).hexdigest()
    enc, payload = encode_chunk(data)
    fixed = tuple(
        dataclasses.replace(e, size=len(data), sha256=digest, chunks=(digest,))
        if e.kind is Kind.FILE
        else e
        for e in entries
    )
    m = Manifest(fixed, (Chunk(digest, len(data), len(payload), enc),), 1 << 20)
    return FakeSeeder(m.encode(), {digest: (enc, payload)})


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([Entry("a", Kind.DIR, 0o755), Entry("a/../b", Kind.FILE, 0o644)], "'..' component"),
        (
            [
                Entry("link", Kind.SYMLINK, 0o777, target="/tmp"),
                Entry("link/evil", Kind.FILE, 0o644),
            ],
            "beneath symlink 'link'",
        ),
        ([Entry("/etc/evil", Kind.FILE, 0o644)], "is absolute"),
        ([Entry("x/evil", Kind.FILE, 0o644)], "no parent directory"),
    ],
)
async def test_hostile_manifest_refused_before_any_write(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    fake = _hostile(entries)
    store = ChunkStore(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ManifestError, match=why):
        await pull_image(fake, NAME, store, out / "image")
    assert fake.chunk_calls == []
    assert len(store) == 0 and list((tmp_path / "data" / "chunks").iterdir()) == []
    assert os.listdir(out) == []


def _good(tmp_path: Path) -> tuple[Path, Manifest, dict[str, tuple[Encoding, bytes]]]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * CS + 5))
    (src / "g").write_bytes(b"g" * 10 * CS)
    manifest, raw = build_manifest(src, CS)
    return src, manifest, {d: encode_chunk(b) for d, b in raw.items()}


async def test_pull_image_with_fake_and_progress(tmp_path: Path) -> None:
    src, manifest, chunks = _good(tmp_path)
    fake = FakeSeeder(manifest.encode(), chunks)
    store = ChunkStore(tmp_path / "data")
    bars: list[tuple[str, int, list[int], list[bool]]] = []

    class Bar:
        def __init__(self, total: int, label: str) -> None:
            self.seen: list[int] = []
            self.closed: list[bool] = []
            bars.append((label, total, self.seen, self.closed))

        def advance(self, n: int) -> None:
            self.seen.append(n)

        def close(self) -> None:
            self.closed.append(True)

    result = await pull_image(fake, NAME, store, tmp_path / "image", progress=Bar)
    assert snapshot(tmp_path / "image") == snapshot(src)
    assert result.fetch == FetchStats(len(manifest.chunks), 0, manifest.stored_size, 0)
    assert [(label, total) for label, total, _, _ in bars] == [
        ("fetching", manifest.stored_size),
        ("writing", manifest.total_size),
    ]
    assert all(sum(seen) == total and closed == [True] for _, total, seen, closed in bars)


class Flaky:
    """A chunk source that corrupts the first `bad` answers for each chunk."""

    def __init__(self, chunks: dict[str, tuple[Encoding, bytes]], bad: int) -> None:
        self.chunks = chunks
        self.bad = bad
        self.calls: dict[str, int] = {}

    async def fetch(self, digest: str) -> tuple[Encoding, bytes]:
        n = self.calls[digest] = self.calls.get(digest, 0) + 1
        enc, payload = self.chunks[digest]
        if n <= self.bad:
            return Encoding.RAW, b"\0" * len(payload)
        return enc, payload


async def test_fetch_retries_corrupt_chunks_then_fails(tmp_path: Path) -> None:
    _src, manifest, chunks = _good(tmp_path)
    store = ChunkStore(tmp_path / "data")
    stats = await fetch_chunks(manifest, store, Flaky(chunks, bad=1), parallel=3)
    assert stats.chunks_fetched == len(manifest.chunks)
    assert stats.rejected == len(manifest.chunks)
    assert set(store.digests()) == {c.digest for c in manifest.chunks}

    again = await fetch_chunks(manifest, store, Flaky(chunks, bad=99))
    assert (again.chunks_fetched, again.chunks_held) == (0, len(manifest.chunks))

    empty = ChunkStore(tmp_path / "data2")
    with pytest.raises(PullError, match=r"chunk [0-9a-f]{16} failed verification 3 times"):
        await fetch_chunks(manifest, empty, Flaky(chunks, bad=3), retries=3)
    assert len(empty) == 0


async def test_cancelled_materialize_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling the pull (Ctrl-C) must stop the thread before it renames into place."""
    _src, manifest, chunks = _good(tmp_path)
    store = ChunkStore(tmp_path / "data")
    await fetch_chunks(manifest, store, Flaky(chunks, bad=0))
    real = pull_mod.store_reader(store)
    calls: list[str] = []

    def slow(digest: str, size: int) -> bytes:
        calls.append(digest)
        time.sleep(0.05)
        return real(digest, size)

    monkeypatch.setattr(pull_mod, "store_reader", lambda store: slow)
    out = tmp_path / "out"
    out.mkdir()
    task = asyncio.create_task(materialize_from_store(manifest, store, out / "image", workers=1))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0 < len(calls) < sum(len(e.chunks) for e in manifest.entries)
    assert os.listdir(out) == []


async def test_rotten_chunk_in_store_is_fetched_again(tmp_path: Path) -> None:
    """A stored chunk damaged on disk: the file SHA check catches it, the pull heals."""
    src, manifest, chunks = _good(tmp_path)
    fake = FakeSeeder(manifest.encode(), chunks)
    store = ChunkStore(tmp_path / "data")
    await pull_image(fake, NAME, store, tmp_path / "first")
    fake.chunk_calls.clear()
    for victim in [c for c in manifest.chunks if c.encoding is Encoding.RAW][:1] + [
        c for c in manifest.chunks if c.encoding is Encoding.ZSTD
    ][:1]:
        path = store.path(victim.digest, victim.encoding)
        path.write_bytes(bytes(len(path.read_bytes())))
    # A new store, as after a restart: the old one still holds the good bytes in memory.
    store = ChunkStore(tmp_path / "data")
    result = await pull_image(fake, NAME, store, tmp_path / "second")
    assert snapshot(tmp_path / "second") == snapshot(src)
    assert result.fetch.chunks_fetched == len(fake.chunk_calls) == 2
    assert _leftovers(tmp_path) == []
