"""The download loop of `distd pull`: fetch what the store lacks, then materialize.

Kept apart from the materializer because the source of chunks varies while the
rest stays: `pull_image` takes a `Fill` step, by default the seeder alone
(`fetch_chunks`, the `--no-p2p` path), or the swarm (`distd.swarm_pull`). Nothing
here trusts the source: the manifest is decoded as hostile before anything is
written, and every chunk is verified by the store on `put`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from distd.materialize import (
    ContentError,
    DestExistsError,
    ReadChunk,
    materialize,
    sweep_temp_dirs,
)
from distd.store import ChunkStore
from manifests.chunking import ChunkBytes, ChunkError, decode_chunk
from manifests.client import SeederError
from manifests.model import Encoding, Manifest, manifest_digest
from manifests.validate import decode_manifest

DEFAULT_PARALLEL = 4
DEFAULT_RETRIES = 3
DEFAULT_WORKERS = 2
SCRUB_ATTEMPTS = 3
# A seeder whose upload slots are all taken answers 503 at once; we come back after a
# short jittered, doubling pause, and give up on a chunk only after this long.
BUSY_BACKOFF = 0.05
MAX_BUSY_BACKOFF = 1.0
BUSY_GIVE_UP = 120.0


class PullError(Exception):
    """The pull cannot complete; the message is one line that names the chunk or step."""


class ChunkFetcher(Protocol):
    """Anything that can produce a chunk in its stored encoding (seeder now, peers next)."""

    async def fetch(self, digest: str) -> tuple[Encoding, bytes]: ...


class ImageSource(Protocol):
    """What `pull_image` needs of a seeder; `manifests.client.SeederClient` fits."""

    async def resolve_name(self, name_or_digest: str) -> str: ...

    async def get_manifest(self, digest: str) -> bytes: ...

    async def get_chunk(self, digest: str, *, direct: bool = False) -> tuple[Encoding, int, bytes]:
        """`direct`: no peers to turn to, so the seeder must not defer us to them."""
        ...


class ProgressSink(Protocol):
    """A progress display; `advance` must be safe to call from any thread."""

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], ProgressSink]


@dataclass
class FetchStats:
    chunks_fetched: int = 0
    chunks_held: int = 0
    bytes_fetched: int = 0  # stored (possibly compressed) bytes received
    rejected: int = 0  # payloads that failed verification and were fetched again
    bytes_from_peers: int = 0  # of bytes_fetched, those that came from peers, not the seeder

    def add(self, more: FetchStats) -> None:
        """Fold in a later fetch of the same image (after a scrub found rotten chunks)."""
        self.chunks_fetched += more.chunks_fetched
        self.chunks_held -= more.chunks_fetched
        self.bytes_fetched += more.bytes_fetched
        self.rejected += more.rejected
        self.bytes_from_peers += more.bytes_from_peers


# Fill the store with every chunk of (manifest, its digest) it lacks; `on_bytes` hears the
# stored size of each chunk as it lands. `fetch_chunks` from the seeder is the default.
Fill = Callable[[Manifest, str, Callable[[int], None] | None], Awaitable[FetchStats]]


@dataclass
class PullResult:
    digest: str
    manifest: Manifest
    dest: Path
    fetch: FetchStats = field(default_factory=FetchStats)
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.manifest.total_size


class SourceFetcher:
    """Adapts `ImageSource.get_chunk` to `ChunkFetcher`, refusing a wrong declared size.

    The seeder is asked `direct` (we have no peers) and a "busy" answer is retried
    after a pause, for up to `give_up` seconds per chunk.
    """

    def __init__(
        self,
        source: ImageSource,
        sizes: Mapping[str, int],
        *,
        give_up: float = BUSY_GIVE_UP,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.sizes = sizes
        self.give_up = give_up
        self.rng = rng or random.Random()

    async def _get(self, digest: str) -> tuple[Encoding, int, bytes]:
        deadline = time.monotonic() + self.give_up
        pause = BUSY_BACKOFF
        while True:
            try:
                return await self.source.get_chunk(digest, direct=True)
            except SeederError as e:
                if e.status != 503 or time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause * (1 + self.rng.random()))
            pause = min(MAX_BUSY_BACKOFF, pause * 2)

    async def fetch(self, digest: str) -> tuple[Encoding, bytes]:
        encoding, size, payload = await self._get(digest)
        expected = self.sizes.get(digest)
        if expected is not None and size != expected:
            raise ChunkError(
                f"chunk {digest[:16]} sent as {size} bytes, the manifest says {expected}"
            )
        return encoding, payload


def _chunk_order(manifest: Manifest) -> list[str]:
    """Unique chunk digests in file order, so a later streaming writer can start early."""
    seen: set[str] = set()
    order: list[str] = []
    for e in manifest.entries:
        for d in e.chunks:
            if d not in seen:
                seen.add(d)
                order.append(d)
    return order


def missing_bytes(manifest: Manifest, store: ChunkStore) -> int:
    """Stored bytes still to fetch: the total a progress bar for `fetch_chunks` should show."""
    return sum(c.stored_size for c in manifest.chunks if not store.has(c.digest))


async def fetch_chunks(
    manifest: Manifest,
    store: ChunkStore,
    source: ChunkFetcher,
    *,
    parallel: int = DEFAULT_PARALLEL,
    retries: int = DEFAULT_RETRIES,
    on_bytes: Callable[[int], None] | None = None,
) -> FetchStats:
    """Fetch into `store` every chunk of `manifest` it lacks, `parallel` at a time.

    A payload that fails verification is fetched again, up to `retries` attempts in
    all, then the pull fails naming the chunk. Other errors of the source propagate
    at once (the first one cancels the rest); chunks already stored stay stored, so
    a second pull resumes.
    """
    table = manifest.chunk_map()
    order = _chunk_order(manifest)
    todo = [d for d in order if not store.has(d)]
    stats = FetchStats(chunks_held=len(order) - len(todo))
    queue = iter(todo)  # shared by the workers; next() never awaits, so no lock

    async def fetch_one(digest: str) -> None:
        size = table[digest].size
        last: ChunkError | None = None
        for _ in range(max(1, retries)):
            try:
                encoding, payload = await source.fetch(digest)
                await store.put(digest, payload, encoding, size)
            except ChunkError as e:
                stats.rejected += 1
                last = e
                continue
            stats.chunks_fetched += 1
            stats.bytes_fetched += len(payload)
            if on_bytes is not None:
                on_bytes(len(payload))
            return
        raise PullError(
            f"chunk {digest[:16]} failed verification {max(1, retries)} times (last: {last})"
        )

    async def worker() -> None:
        for digest in queue:
            await fetch_one(digest)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, min(parallel, len(todo)))):
                tg.create_task(worker())
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return stats


def store_reader(store: ChunkStore) -> ReadChunk:
    """Read and decode chunks without re-hashing them: the store verified each on `put`
    and the materializer hashes every file it writes, so one hash per byte is enough."""

    def read(digest: str, size: int) -> ChunkBytes:
        info = store.info(digest)
        if info is None:
            raise KeyError(f"chunk {digest[:16]} is not in the store")
        return decode_chunk(store.read(info), info.encoding, size)

    return read


async def scrub_entry(manifest: Manifest, store: ChunkStore, path: str) -> int:
    """Re-verify the stored chunks of entry `path`; delete the bad ones, return how many."""
    table = manifest.chunk_map()
    chunks = next((e.chunks for e in manifest.entries if e.path == path), ())
    bad = 0
    for d in dict.fromkeys(chunks):
        if not store.has(d):
            continue
        try:
            await asyncio.to_thread(store.read_verified, d, table[d].size)
        except (ChunkError, OSError, KeyError):
            await store.delete(d)
            bad += 1
    return bad


async def materialize_from_store(
    manifest: Manifest,
    store: ChunkStore,
    dest: Path,
    *,
    replace: bool = False,
    workers: int = DEFAULT_WORKERS,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Run the materializer in a thread; if we are cancelled, stop it and wait for its cleanup.

    `asyncio.to_thread` alone cannot stop a thread: a cancelled pull would otherwise
    carry on and rename the tree into place after the user pressed Ctrl-C.
    """
    cancel = threading.Event()
    fut = asyncio.ensure_future(
        asyncio.to_thread(
            materialize,
            manifest,
            store_reader(store),
            dest,
            replace=replace,
            workers=workers,
            on_bytes=on_bytes,
            cancel=cancel,
        )
    )
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the expected "cancelled" error is not news
        raise


async def pull_image(
    seeder: ImageSource,
    name_or_digest: str,
    store: ChunkStore,
    dest: Path,
    replace: bool = False,
    progress: ProgressFactory | None = None,
    *,
    parallel: int = DEFAULT_PARALLEL,
    workers: int = DEFAULT_WORKERS,
    fill: Fill | None = None,
) -> PullResult:
    """Resolve, fetch and verify the manifest, fetch missing chunks, materialize at `dest`.

    Chunks come from `fill` (e.g. `distd.swarm_pull.SwarmPull.fill`), by default from
    the seeder alone, `parallel` at a time. A manifest that fails validation raises
    `ManifestError` before anything is written to the store or to `dest`.
    """
    start = time.monotonic()
    dest = Path(os.path.abspath(dest))
    if not replace and os.path.lexists(dest):
        raise DestExistsError(f"{dest} already exists")
    digest = await seeder.resolve_name(name_or_digest)
    data = await seeder.get_manifest(digest)
    if manifest_digest(data) != digest:
        raise PullError(f"manifest bytes do not match digest {digest}")
    manifest = await asyncio.to_thread(decode_manifest, data)

    if fill is None:
        fetcher = SourceFetcher(seeder, {c.digest: c.size for c in manifest.chunks})

        async def from_seeder(
            m: Manifest, _digest: str, on_bytes: Callable[[int], None] | None
        ) -> FetchStats:
            return await fetch_chunks(m, store, fetcher, parallel=parallel, on_bytes=on_bytes)

        fill = from_seeder
    stats = await _fetch_with_progress(manifest, digest, store, fill, progress)
    await asyncio.to_thread(sweep_temp_dirs, dest.parent, dest.name)
    for attempt in range(1, SCRUB_ATTEMPTS + 1):
        try:
            await _materialize_with_progress(manifest, store, dest, replace, workers, progress)
            break
        except ContentError as e:
            # A stored chunk rotted since it was verified: drop it, fetch it again, retry.
            # If the entry's chunks are all sound, the manifest itself is inconsistent.
            if attempt == SCRUB_ATTEMPTS or not await scrub_entry(manifest, store, e.path):
                raise
        stats.add(await _fetch_with_progress(manifest, digest, store, fill, progress))
    return PullResult(digest, manifest, dest, stats, time.monotonic() - start)


async def _fetch_with_progress(
    manifest: Manifest,
    digest: str,
    store: ChunkStore,
    fill: Fill,
    progress: ProgressFactory | None,
) -> FetchStats:
    todo = missing_bytes(manifest, store)
    bar = progress(todo, "fetching") if progress and todo else None
    try:
        return await fill(manifest, digest, bar.advance if bar else None)
    finally:
        if bar is not None:
            bar.close()


async def _materialize_with_progress(
    manifest: Manifest,
    store: ChunkStore,
    dest: Path,
    replace: bool,
    workers: int,
    progress: ProgressFactory | None,
) -> None:
    bar = progress(manifest.total_size, "writing") if progress else None
    try:
        await materialize_from_store(
            manifest,
            store,
            dest,
            replace=replace,
            workers=workers,
            on_bytes=bar.advance if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
