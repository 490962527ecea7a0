"""`manifests push`: hash a tree, upload only the chunks the seeder lacks, publish, move the name.

The order makes a push safe to interrupt and cheap to repeat: chunks go first
(each is content-addressed, so a half-finished push leaves only unreferenced
chunks that the next push finds present), the manifest next, and the name moves
last, so nobody ever sees a name pointing at something incomplete.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from manifests.chunking import DEFAULT_ZSTD_LEVEL, encode_chunk, probe_compressible, sha256_hex
from manifests.client import SeederClient, SeederError
from manifests.model import Chunk, Encoding, Manifest
from manifests.progress import Progress
from manifests.scan import ChunkSource, ScanResult, scan_tree
from manifests.units import format_size
from manifests.wire import check_name

MISSING_BATCH = 10_000


class PushError(Exception):
    """A push that cannot complete; the message is one line that names the cause."""


@dataclass(frozen=True, slots=True)
class PushSummary:
    name: str
    digest: str
    files: int
    total_bytes: int
    unique_chunks: int
    uploaded_chunks: int
    uploaded_bytes: int
    """Bytes sent, in their stored (possibly compressed) encoding."""
    uploaded_raw_bytes: int
    seconds: float
    scan_seconds: float
    upload_seconds: float

    @property
    def mb_per_s(self) -> float:
        """Tree bytes per second of wall time, the figure an operator compares."""
        return self.total_bytes / max(self.seconds, 1e-9) / 1e6

    def line(self) -> str:
        return (
            f"pushed {self.name}: {self.files} files, {format_size(self.total_bytes)}, "
            f"{self.unique_chunks} unique chunks, uploaded {self.uploaded_chunks} chunks "
            f"({format_size(self.uploaded_bytes)}) in {self.seconds:.2f} s, "
            f"{self.mb_per_s:.0f} MB/s, digest {self.digest}"
        )


def read_source(src: ChunkSource) -> bytes:
    """The chunk's raw bytes read again from its file; PushError if the file got shorter."""
    try:
        fd = os.open(src.path, os.O_RDONLY)
    except OSError as e:
        raise PushError(f"{src.path!r}: cannot read it again to upload: {e.strerror}") from None
    try:
        parts: list[bytes] = []
        got = 0
        while got < src.size:
            piece = os.pread(fd, src.size - got, src.offset + got)
            if not piece:
                raise PushError(f"{src.path!r} changed while it was being pushed (it shrank)")
            parts.append(piece)
            got += len(piece)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_and_encode(src: ChunkSource, level: int) -> tuple[Encoding, bytes]:
    raw = read_source(src)
    # The probe skips zstd on random or already-compressed data, where it costs
    # more CPU than anything else in a push and saves nothing.
    if level == 0 or not probe_compressible(raw, level):
        return Encoding.RAW, raw
    return encode_chunk(raw, level)


def _changed(src: ChunkSource, digest: str) -> bool:
    try:
        return sha256_hex(read_source(src)) != digest
    except PushError:
        return True


async def _query_missing(
    client: SeederClient, digests: list[str]
) -> tuple[list[str], dict[str, tuple[int, Encoding]]]:
    """Ask in batches so a huge image does not make one enormous request."""
    missing: list[str] = []
    present: dict[str, tuple[int, Encoding]] = {}
    for i in range(0, len(digests), MISSING_BATCH):
        m, p = await client.missing(digests[i : i + MISSING_BATCH])
        missing.extend(m)
        present.update(p)
    return missing, present


async def _upload_missing(
    client: SeederClient,
    missing: list[str],
    sources: dict[str, ChunkSource],
    table: dict[str, Chunk],
    *,
    parallel_uploads: int,
    level: int,
    bar: Progress,
) -> tuple[int, int]:
    """Read, encode and upload every missing chunk; returns (chunks sent, stored bytes sent).

    2 x parallel_uploads workers each hold at most one chunk, so memory stays bounded
    while encoding (threads) overlaps with `parallel_uploads` requests in flight.
    """
    loop = asyncio.get_running_loop()
    todo: Iterator[str] = iter(missing)
    uploads = asyncio.Semaphore(parallel_uploads)
    sent = [0, 0]
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="push-encode") as pool:

        async def worker() -> None:
            for digest in todo:
                src = sources[digest]
                encoding, payload = await loop.run_in_executor(pool, _read_and_encode, src, level)
                async with uploads:
                    try:
                        stored = await client.put_chunk(digest, payload, encoding, src.size)
                    except SeederError:
                        # A 422 usually means the file was modified after it was hashed:
                        # say which file, not which chunk digest.
                        if await loop.run_in_executor(pool, _changed, src, digest):
                            raise PushError(
                                f"{src.path!r} changed while it was being pushed "
                                f"(bytes at offset {src.offset} no longer match their hash)"
                            ) from None
                        raise
                if stored:
                    table[digest] = Chunk(digest, src.size, len(payload), encoding)
                    sent[0] += 1
                    sent[1] += len(payload)
                else:
                    # Someone else stored it meanwhile, maybe in another encoding: ask which.
                    _, present = await client.missing([digest])
                    if digest not in present:
                        raise PushError(f"seeder reported chunk {digest[:16]} both held and not")
                    stored_size, enc = present[digest]
                    table[digest] = Chunk(digest, src.size, stored_size, Encoding(enc))
                bar.advance(src.size)

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, 2 * parallel_uploads))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return sent[0], sent[1]


async def push_tree(
    client: SeederClient,
    root: str | Path,
    name: str,
    chunk_size: int,
    *,
    parallel_uploads: int = 4,
    level: int = DEFAULT_ZSTD_LEVEL,
    progress: bool = True,
) -> PushSummary:
    """Push the tree at `root` as `name`; `level` 0 uploads chunks raw.

    Raises ManifestError (bad tree), PushError or SeederError, each with a one-line message.
    """
    check_name(name)
    if parallel_uploads < 1:
        raise ValueError("parallel uploads must be at least 1")
    t0 = time.monotonic()
    with Progress(0, "hashing  ", enabled=progress) as bar:
        scan: ScanResult = await asyncio.to_thread(
            scan_tree, root, chunk_size, on_bytes=bar.advance, on_total=bar.set_total
        )
    t_scan = time.monotonic()

    digests = sorted(scan.sources)
    _, present = await _query_missing(client, digests)
    table: dict[str, Chunk] = {}
    for d, (stored_size, enc) in present.items():
        src = scan.sources.get(d)
        if src is not None:
            table[d] = Chunk(d, src.size, stored_size, Encoding(enc))
    # Anything the seeder did not report present is uploaded, even if it forgot to list it.
    need = [d for d in digests if d not in table]
    with Progress(sum(scan.sources[d].size for d in need), "uploading", enabled=progress) as bar:
        uploaded_chunks, uploaded_bytes = await _upload_missing(
            client,
            need,
            scan.sources,
            table,
            parallel_uploads=parallel_uploads,
            level=level,
            bar=bar,
        )
    t_upload = time.monotonic()

    manifest = Manifest.build(scan.entries, table, chunk_size)
    data = manifest.encode()
    digest = await client.put_manifest(data)
    if digest != manifest.digest:
        raise PushError(f"seeder stored the manifest as {digest}, expected {manifest.digest}")
    await client.set_name(name, digest)
    t_end = time.monotonic()
    return PushSummary(
        name=name,
        digest=digest,
        files=scan.files,
        total_bytes=scan.total_bytes,
        unique_chunks=len(scan.sources),
        uploaded_chunks=uploaded_chunks,
        uploaded_bytes=uploaded_bytes,
        uploaded_raw_bytes=sum(scan.sources[d].size for d in need),
        seconds=t_end - t0,
        scan_seconds=t_scan - t0,
        upload_seconds=t_upload - t_scan,
    )
