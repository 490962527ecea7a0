"""The daemon's stage feeder: chunks go from the store into the tree, verified exactly once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from treeutil import build_manifest, snapshot

from distd.staging import StageFeeder
from distd.store import ChunkStore
from manifests.chunking import ChunkError, encode_chunk

CS = 4096


def _tree(root: Path) -> None:
    root.mkdir()
    (root / "a.bin").write_bytes(os.urandom(3 * CS + 100))
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(os.urandom(2 * CS))
    (root / "sub" / "copy.bin").write_bytes((root / "a.bin").read_bytes())


async def test_feeder_builds_the_tree_and_sends_rotted_chunks_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    manifest, raw = build_manifest(src, CS)
    store = ChunkStore(tmp_path / "data")
    for d, data in raw.items():
        enc, payload = encode_chunk(data)
        await store.put(d, payload, enc, len(data))

    # Chunks straight from memory (as stored a moment ago): a byte-identical tree.
    feeder = await StageFeeder.open(manifest, store, tmp_path / "one")
    await feeder.finish()
    await feeder.close()
    assert snapshot(tmp_path / "one") == snapshot(src) and not feeder.bad

    # A chunk that rotted on disk since it was stored (and is no longer in memory) is
    # caught when read back for the tree: no tree, and the feeder names the chunk.
    victim = manifest.chunks[1]
    info = store.info(victim.digest)
    assert info is not None
    path = store.path(victim.digest, info.encoding)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(data)
    store.recent = type(store.recent)(store.recent.budget)  # as after a restart
    feeder = await StageFeeder.open(manifest, store, tmp_path / "two")
    with pytest.raises(ChunkError):
        await feeder.finish()
    await feeder.close()
    assert feeder.bad == {victim.digest}
    assert not (tmp_path / "two").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".two")] == []
