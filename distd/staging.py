"""Materializing an image while it downloads: a `StagedImage` fed from the store.

Each chunk is written into the staged tree by a thread job as soon as it is
stored, so when the last chunk lands only the modes, one sync and the rename
remain, instead of decoding and writing the whole image while every other node
of a fan-out does the same.

A chunk just stored comes from the store's memory, verified on its way in; one
read back from its file is verified again, so the stage never hashes it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from distd.materialize import StagedImage
from distd.store import ChunkStore
from manifests.chunking import ChunkBytes, ChunkError
from manifests.model import Manifest

log = logging.getLogger(__name__)


class StageFeeder:
    """Writes stored chunks into a `StagedImage` in threads; at most one job per chunk."""

    def __init__(self, stage: StagedImage, store: ChunkStore) -> None:
        self.stage = stage
        self.store = store
        self.queued: set[str] = set()
        self.bad: set[str] = set()  # stored chunks whose file no longer matches its digest
        self.pending: set[asyncio.Future[None]] = set()

    @classmethod
    async def open(cls, manifest: Manifest, store: ChunkStore, dest: Path) -> StageFeeder:
        """Stage `manifest` for `dest` (replacing it when done) and queue every chunk held."""
        stage = await asyncio.to_thread(StagedImage, manifest, dest, replace=True)
        feeder = cls(stage, store)
        for d in stage.digests():
            feeder.feed(d)
        return feeder

    def feed(self, digest: str) -> None:
        """Queue `digest` for writing if it is stored and not yet queued (event loop only)."""
        if digest in self.queued or not self.store.has(digest) or not self.stage.needs(digest):
            return
        self.queued.add(digest)
        fut = asyncio.get_running_loop().run_in_executor(None, self._write, digest)
        self.pending.add(fut)
        fut.add_done_callback(self._done)

    def _write(self, digest: str) -> None:
        if self.stage.cancel.is_set() or not self.stage.needs(digest):
            return
        self.stage.write_chunk(digest, self._read(digest), verified=True)

    def _read(self, digest: str) -> ChunkBytes:
        """Raw bytes of a stored chunk, verified (see ChunkStore.read_raw)."""
        try:
            return self.store.read_raw(digest, self.stage.chunk_size(digest))
        except ChunkError:
            self.bad.add(digest)  # the owner deletes it, so the next try fetches it anew
            raise

    def _done(self, fut: asyncio.Future[None]) -> None:
        self.pending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            # `finish` writes whatever is still missing, and fails then if it must.
            log.debug("staging a chunk failed: %s", fut.exception())

    def _catch_up_and_finish(self) -> None:
        for d in self.stage.digests():
            if self.stage.needs(d):
                self.stage.write_chunk(d, self._read(d), verified=True)
        self.stage.finish()

    async def finish(self) -> None:
        """Once every chunk is stored: write any left, verify and put the tree in place.

        If we are cancelled meanwhile, the thread is stopped and waited for.
        """
        await asyncio.gather(*self.pending, return_exceptions=True)
        fut = asyncio.ensure_future(asyncio.to_thread(self._catch_up_and_finish))
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.stage.cancel.set()
            while not fut.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()  # retrieved: the expected "cancelled" error is not news
            raise

    async def close(self) -> None:
        """Give up (or tidy after `finish`): stop the jobs and remove the temp dir."""
        self.stage.cancel.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.pending, return_exceptions=True)
        await asyncio.to_thread(self.stage.close)
