"""Walking a source tree into manifest entries, hashing with every core.

Hashing releases the GIL, so threads scale: one pool reads files and keeps each
file's running SHA-256 (inherently sequential), another hashes the chunks, so
even a single large file (a VM disk) uses more than one core.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import RawIOBase
from pathlib import Path

from manifests.chunking import sha256_hex
from manifests.model import Entry, Kind, ManifestError
from manifests.validate import validate_path


@dataclass(frozen=True, slots=True)
class ChunkSource:
    """Where to read a chunk's raw bytes again when it has to be uploaded."""

    path: str
    offset: int
    size: int


@dataclass
class ScanResult:
    entries: list[Entry]
    sources: dict[str, ChunkSource]
    chunk_size: int
    files: int = 0
    total_bytes: int = 0
    chunk_refs: int = field(default=0)


def _rel(root: str, full: str) -> str:
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{full!r}: file name is not valid UTF-8") from None
    return validate_path(rel)


def _walk(root: str) -> tuple[list[Entry], list[tuple[str, str, int, int]]]:
    """Directory and symlink entries, plus (rel, full, mode, size) for each regular file."""
    entries: list[Entry] = []
    files: list[tuple[str, str, int, int]] = []
    stack = [root]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            children = list(it)
        for de in children:
            full = de.path
            st = de.stat(follow_symlinks=False)
            rel = _rel(root, full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, Kind.DIR, mode))
                stack.append(full)
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, full, mode, st.st_size))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                try:
                    target.encode("utf-8")
                except UnicodeEncodeError:
                    raise ManifestError(f"{full!r}: symlink target is not valid UTF-8") from None
                entries.append(Entry(rel, Kind.SYMLINK, mode, target=target))
            else:
                what = (
                    "socket"
                    if stat.S_ISSOCK(st.st_mode)
                    else "fifo"
                    if stat.S_ISFIFO(st.st_mode)
                    else "device"
                )
                raise ManifestError(
                    f"{full!r} is a {what}; only files, dirs and symlinks can be pushed"
                )
    return entries, files


def _fill(f: RawIOBase, buf: bytearray) -> int:
    """Read until `buf` is full or the file ends (chunk boundaries must not move)."""
    got = 0
    with memoryview(buf) as view:
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return got


def scan_tree(
    root: str | Path,
    chunk_size: int,
    workers: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ScanResult:
    """Hash every file under `root` into entries and the location of each unique chunk.

    `on_total` hears the byte count to hash once the walk is done (for a progress bar),
    `on_bytes` each piece as it is read.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ManifestError(f"{root!r} is not a directory")
    entries, files = _walk(root)
    if on_total is not None:
        on_total(sum(f[3] for f in files))
    workers = workers or os.cpu_count() or 1
    sources: dict[str, ChunkSource] = {}
    lock = threading.Lock()
    # Bound chunks held in memory across all files (each up to chunk_size bytes), and
    # reuse their buffers: a fresh 4 MiB buffer per read costs page faults (kernel time)
    # comparable to the read itself.
    in_flight = threading.BoundedSemaphore(workers * 2)
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()

    def take_buffer() -> bytearray:
        in_flight.acquire()
        try:
            return free.get_nowait()
        except queue.Empty:
            return bytearray(chunk_size)

    def give_back(buf: bytearray) -> None:
        free.put(buf)
        in_flight.release()

    def hash_chunk(buf: bytearray, n: int) -> str:
        try:
            with memoryview(buf) as view:
                return sha256_hex(view[:n])
        finally:
            give_back(buf)

    with (
        ThreadPoolExecutor(workers, thread_name_prefix="hash-chunk") as chunk_pool,
        ThreadPoolExecutor(workers, thread_name_prefix="hash-file") as file_pool,
    ):

        def hash_file(rel: str, full: str, mode: int, expected: int) -> Entry:
            # A one-chunk file's SHA-256 is its chunk's digest: do not hash it twice.
            single = expected <= chunk_size
            file_hash = hashlib.sha256()
            pending: list[tuple[int, int, Future[str]]] = []
            size = 0
            with open(full, "rb", buffering=0) as f:
                while True:
                    buf = take_buffer()
                    n = _fill(f, buf)
                    if not n:
                        give_back(buf)
                        break
                    if not single:
                        with memoryview(buf) as view:
                            file_hash.update(view[:n])
                    pending.append((size, n, chunk_pool.submit(hash_chunk, buf, n)))
                    size += n
                    if on_bytes is not None:
                        on_bytes(n)
            if size != expected or (single and len(pending) > 1):
                raise ManifestError(f"{full!r} changed while it was being read")
            digests = []
            for off, n, fut in pending:
                d = fut.result()
                digests.append(d)
                with lock:
                    sources.setdefault(d, ChunkSource(full, off, n))
            whole = digests[0] if single and digests else file_hash.hexdigest()
            return Entry(rel, Kind.FILE, mode, size=size, sha256=whole, chunks=tuple(digests))

        futures = [file_pool.submit(hash_file, *spec) for spec in files]
        file_entries = [f.result() for f in futures]
    entries.extend(file_entries)
    return ScanResult(
        entries=entries,
        sources=sources,
        chunk_size=chunk_size,
        files=len(file_entries),
        total_bytes=sum(e.size for e in file_entries),
        chunk_refs=sum(len(e.chunks) for e in file_entries),
    )
