"""The chunk store on a real filesystem: verification, atomicity, restart, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from distd.store import ChunkStore
from manifests.chunking import ChunkError, encode_chunk
from manifests.model import Encoding


def _chunk(data: bytes) -> tuple[str, Encoding, bytes]:
    enc, payload = encode_chunk(data)
    return hashlib.sha256(data).hexdigest(), enc, payload


async def test_put_get_and_reopen(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    text = b"hello world " * 1000
    d1, e1, p1 = _chunk(text)
    d2, e2, p2 = _chunk(os.urandom(5000))
    assert e1 is Encoding.ZSTD and e2 is Encoding.RAW
    assert await store.put(d1, p1, e1, len(text))
    assert await store.put(d2, p2, e2, 5000)
    assert not await store.put(d1, p1, e1, len(text))
    info, payload = await store.get(d1)
    assert (info.encoding, payload) == (Encoding.ZSTD, p1)
    assert store.total_bytes == len(p1) + len(p2)
    assert store.read_verified(d1, len(text)) == text

    again = ChunkStore(tmp_path)
    assert set(again.digests()) == {d1, d2}
    assert again.total_bytes == store.total_bytes
    assert again.info(d2) == store.info(d2)


async def test_corrupt_chunk_is_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, enc, payload = _chunk(os.urandom(4096))
    bad = bytearray(payload)
    bad[100] ^= 0xFF
    with pytest.raises(ChunkError, match="content mismatch"):
        await store.put(d, bytes(bad), enc, 4096)
    with pytest.raises(ChunkError):
        await store.put(d, payload[:-1], enc, 4096)
    assert not store.has(d)
    assert [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()] == []


async def test_concurrent_writers_of_the_same_chunk(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = os.urandom(1 << 20)
    d, enc, payload = _chunk(data)
    results = await asyncio.gather(*(store.put(d, payload, enc, len(data)) for _ in range(8)))
    assert results.count(True) == 1
    files = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == payload
    assert store.total_bytes == len(payload)


def _files(root: Path, digest: str) -> list[str]:
    return sorted(p.name for p in (root / "chunks").rglob(digest + "*"))


async def test_one_chunk_put_in_two_encodings_at_once_is_stored_once(tmp_path: Path) -> None:
    """Raw and zstd puts of one digest race: one file, so a delete removes the chunk for
    good instead of a reopen finding the other encoding's file."""
    store = ChunkStore(tmp_path)
    data = b"compressible " * 100_000
    d, enc, packed = _chunk(data)
    assert enc is Encoding.ZSTD
    puts = [store.put(d, data, Encoding.RAW, len(data)), store.put(d, packed, enc, len(data))]
    assert sorted(await asyncio.gather(*puts)) == [False, True]
    assert len(_files(tmp_path, d)) == 1
    info = store.info(d)
    assert info is not None and store.total_bytes == info.stored_size
    await store.delete(d)
    assert _files(tmp_path, d) == [] and not ChunkStore(tmp_path).has(d)


async def test_a_cancelled_put_still_holds_the_digest_until_its_write_ends(
    tmp_path: Path,
) -> None:
    """Cancelling a put does not stop its thread: a put in the other encoding meanwhile
    must wait for it (and find the chunk held) rather than write a second file."""
    store = ChunkStore(tmp_path)
    data = b"compressible " * 400_000
    d, enc, packed = _chunk(data)
    first = asyncio.create_task(store.put(d, data, Encoding.RAW, len(data)))
    await asyncio.sleep(0)  # its write is in a thread now
    first.cancel()
    assert not await store.put(d, packed, enc, len(data))
    assert _files(tmp_path, d) == [d + ".raw"] and store.has(d)
    assert store.total_bytes == len(data)
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_digest_on_disk_in_both_encodings_is_kept_once(tmp_path: Path) -> None:
    """A store left with both files (by an older version): the reopen keeps one and counts
    it once; a delete removes every encoding."""
    store = ChunkStore(tmp_path)
    data = b"compressible " * 10_000
    d, enc, packed = _chunk(data)
    await store.put(d, packed, enc, len(data))
    store.path(d, Encoding.RAW).write_bytes(data)
    reopened = ChunkStore(tmp_path)
    assert _files(tmp_path, d) == [d + ".zst"]  # the smaller one stays
    assert reopened.total_bytes == len(packed)
    assert reopened.read_verified(d, len(data)) == data
    store.path(d, Encoding.RAW).write_bytes(data)
    await reopened.delete(d)
    assert _files(tmp_path, d) == [] and not ChunkStore(tmp_path).has(d)


async def test_temp_files_from_a_crash_are_swept_at_open(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    d, enc, payload = _chunk(b"abc" * 999)
    await store.put(d, payload, enc, 2997)
    leftover = store.path(d, enc).with_name(d + ".tmp-deadbeef")
    leftover.write_bytes(payload[:10])
    reopened = ChunkStore(tmp_path)
    assert reopened.swept == 1
    assert not leftover.exists()
    assert reopened.has(d)


async def test_delete_and_listener(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    seen: list[str] = []
    store.listeners.append(lambda info: seen.append(info.digest))
    d, enc, payload = _chunk(os.urandom(100))
    await store.put(d, payload, enc, 100)
    await store.put(d, payload, enc, 100)
    assert seen == [d]
    await store.delete(d)
    assert not store.has(d) and store.total_bytes == 0
    assert not store.path(d, enc).exists()
    with pytest.raises(KeyError):
        await store.get(d)


async def test_recent_chunks_are_served_from_memory_within_their_budget(tmp_path: Path) -> None:
    """The last chunks stored come back without a file read (the file is gone here, so a
    read would fail); older ones come from disk; the memory held stays within budget."""
    store = ChunkStore(tmp_path)
    store.recent.budget = 3 * 5000
    chunks = [_chunk(os.urandom(5000)) for _ in range(5)]
    for d, e, p in chunks:
        await store.put(d, p, e, 5000)
    for d, e, _ in chunks[-3:]:
        store.path(d, e).unlink()
    for d, _, p in chunks[-3:]:
        assert (await store.get(d))[1] == p
    for d, _, p in chunks[:2]:
        assert (await store.get(d))[1] == p
    assert sum(store.recent.get(d) is not None for d, _, _ in chunks) == 3
    await store.delete(chunks[-1][0])
    assert store.recent.get(chunks[-1][0]) is None
