"""The content-addressed chunk store, shared by every daemon and the seeder.

Layout: `<data-dir>/chunks/<first two hex digits>/<digest>.<zst|raw>`, each file the
chunk in its stored encoding. A chunk is verified before it is written, written
to a temp file, fsynced and renamed, so a crash leaves a whole verified chunk or
nothing; leftover temp files are swept when the store opens. Disk and hashing
work runs in threads so the event loop never waits on them.

The last chunks stored stay in memory too (`RECENT_BYTES`): in a swarm the chunk a
node has just received is the one its neighbours ask for next and the one its
stager writes into the image, so both get it without reading the file back.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from distd.directio import pwrite_all
from manifests.chunking import ChunkBytes, decode_chunk, verify_chunk
from manifests.model import Encoding

_SUFFIX = {Encoding.ZSTD: ".zst", Encoding.RAW: ".raw"}
_BY_SUFFIX = {v: k for k, v in _SUFFIX.items()}
_TMP_MARK = ".tmp-"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# Bytes of recently stored chunks kept in memory: a few seconds of a 10 MiB/s pull.
RECENT_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class StoredChunk:
    digest: str
    encoding: Encoding
    stored_size: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RecentChunks:
    """The payloads of the last chunks stored, up to `budget` bytes, least recent out
    first. Read from the event loop and from stager threads, hence the lock."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[str, ChunkBytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, digest: str, payload: ChunkBytes) -> None:
        if len(payload) > self.budget:
            return
        with self._lock:
            if digest in self._items:
                return
            self._items[digest] = payload
            self._bytes += len(payload)
            while self._bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def get(self, digest: str) -> ChunkBytes | None:
        with self._lock:
            return self._items.get(digest)

    def discard(self, digest: str) -> None:
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._bytes -= len(old)


def raw_size_of(payload: ChunkBytes, encoding: Encoding) -> int:
    """The raw size of a stored chunk (zstd frames carry it in their header)."""
    if encoding is Encoding.RAW:
        return len(payload)
    return int(zstandard.frame_content_size(payload))


class ChunkStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir) / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, StoredChunk] = {}
        self._bytes = 0
        # Writes in progress, by digest: one at a time per digest, so two encodings of
        # the same chunk can never both land on disk.
        self._writing: dict[str, asyncio.Future[StoredChunk]] = {}
        self.listeners: list[Callable[[StoredChunk], None]] = []
        self.recent = RecentChunks(RECENT_BYTES)
        self.swept = self._load()

    def _load(self) -> int:
        """Index what is on disk and remove temp files left by a crash; returns temps swept."""
        swept = 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                name = f.name
                if _TMP_MARK in name:
                    f.unlink(missing_ok=True)
                    swept += 1
                    continue
                digest, dot, suffix = name.partition(".")
                enc = _BY_SUFFIX.get("." + suffix) if dot else None
                if enc is None or len(digest) != 64:
                    continue
                info = StoredChunk(digest, enc, f.stat().st_size)
                old = self._index.get(digest)
                if old is not None:
                    # Both encodings on disk (left by an older version): keep the smaller,
                    # so a delete cannot leave the other behind to come back at reopen.
                    keep, drop = (old, info) if old.stored_size <= info.stored_size else (info, old)
                    self.path(digest, drop.encoding).unlink(missing_ok=True)
                    info = keep
                self._add(info)
        return swept

    def _add(self, info: StoredChunk) -> None:
        old = self._index.get(info.digest)
        if old is not None:
            self._bytes -= old.stored_size
        self._index[info.digest] = info
        self._bytes += info.stored_size

    def path(self, digest: str, encoding: Encoding) -> Path:
        return self.root / digest[:2] / (digest + _SUFFIX[encoding])

    def has(self, digest: str) -> bool:
        return digest in self._index

    def info(self, digest: str) -> StoredChunk | None:
        return self._index.get(digest)

    def digests(self) -> Iterator[str]:
        return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def _write(
        self, digest: str, payload: ChunkBytes, encoding: Encoding, size: int
    ) -> StoredChunk:
        verify_chunk(digest, payload, encoding, size)
        final = self.path(digest, encoding)
        tmp = final.with_name(f"{digest}{_TMP_MARK}{secrets.token_hex(4)}")
        try:
            try:
                fd = os.open(tmp, _CREATE, 0o644)
            except FileNotFoundError:  # its fan-out dir is not there yet (or went away)
                final.parent.mkdir(exist_ok=True)
                fd = os.open(tmp, _CREATE, 0o644)
            try:
                pwrite_all(fd, payload, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return StoredChunk(digest, encoding, len(payload))

    async def put(
        self, digest: str, payload: ChunkBytes, encoding: Encoding | str, size: int
    ) -> bool:
        """Verify and store; False if already held. Raises ChunkError on a content mismatch.

        A put of a digest being written waits for that write, then answers as if the
        chunk had been held (or writes it itself if that write failed).
        The store keeps a reference to `payload` (see `RecentChunks`): do not change it.
        """
        while True:
            if digest in self._index:
                return False
            pending = self._writing.get(digest)
            if pending is None:
                break
            await asyncio.wait([pending])
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(None, self._write, digest, payload, Encoding(encoding), size)
        self._writing[digest] = write
        try:
            info = await asyncio.shield(write)
        except asyncio.CancelledError:
            # The thread goes on: others stay off this digest until it ends, and what it
            # wrote is indexed then.
            write.add_done_callback(lambda f: self._written(digest, f, payload))
            raise
        except BaseException:
            del self._writing[digest]
            raise
        del self._writing[digest]
        self._stored(info, payload)
        return True

    def _written(
        self, digest: str, write: asyncio.Future[StoredChunk], payload: ChunkBytes
    ) -> None:
        """A cancelled put's write ended: release the digest, index what landed."""
        del self._writing[digest]
        if not write.cancelled() and write.exception() is None:
            self._stored(write.result(), payload)

    def _stored(self, info: StoredChunk, payload: ChunkBytes) -> None:
        self.recent.add(info.digest, payload)
        self._add(info)
        for cb in self.listeners:
            cb(info)

    def read(self, info: StoredChunk) -> ChunkBytes:
        """The chunk's payload, from memory when it was stored recently (blocking)."""
        payload = self.recent.get(info.digest)
        if payload is None:
            payload = self.path(info.digest, info.encoding).read_bytes()
        return payload

    async def get(self, digest: str) -> tuple[StoredChunk, ChunkBytes]:
        """The chunk in its stored encoding; KeyError if not held."""
        info = self._index[digest]
        payload = self.recent.get(digest)
        if payload is None:
            payload = await asyncio.to_thread(self.read, info)
        return info, payload

    def read_raw(self, digest: str, size: int) -> ChunkBytes:
        """Raw bytes, verified (blocking): as checked on put while still in memory, else
        re-checked against the file. KeyError if not held; ChunkError if the file no
        longer matches its digest."""
        info = self._index[digest]
        payload = self.recent.get(digest)
        if payload is None:
            return self.read_verified(digest, size)
        return decode_chunk(payload, info.encoding, size)

    def read_verified(self, digest: str, size: int) -> ChunkBytes:
        """Raw bytes, re-verified against the file (blocking: call from a thread)."""
        info = self._index[digest]
        payload = self.path(digest, info.encoding).read_bytes()
        return verify_chunk(digest, payload, info.encoding, size)

    async def delete(self, digest: str) -> None:
        self.recent.discard(digest)
        info = self._index.pop(digest, None)
        if info is None:
            return
        self._bytes -= info.stored_size
        await asyncio.to_thread(self._unlink_all, digest)

    def _unlink_all(self, digest: str) -> None:
        # Every encoding: a file left in the other one would bring the chunk back at reopen.
        for enc in _SUFFIX:
            self.path(digest, enc).unlink(missing_ok=True)
