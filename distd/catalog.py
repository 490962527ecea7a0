"""What images a node knows: their manifests, progress, state, and where they live on disk.

Layout under the data dir: `manifests/<digest>` (canonical bytes, so a restarted node
knows its images without asking anyone) and `images/<digest>/` (the materialized tree,
renamed into place whole, so its existence means "ready"). The catalogue also maps
each chunk digest to the (image, index) pairs that use it: a chunk stored for one
image is at once announced in, and counted for, every image that shares it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from distd import materialize
from distd.store import ChunkStore, StoredChunk
from distd.swarm import bitfield
from manifests.model import Manifest
from manifests.validate import decode_manifest


class State(StrEnum):
    PENDING = "pending"
    PULLING = "pulling"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class Image:
    digest: str
    manifest: Manifest
    names: set[str] = field(default_factory=set)
    state: State = State.PENDING
    error: str = ""
    have: int = 0  # bitfield over manifest.chunks
    bytes_done: int = 0  # stored bytes held of this image's chunks
    started: float = 0.0
    finished: float = 0.0
    remove_at: float | None = None  # set while unassigned, during the grace period

    @property
    def bytes_total(self) -> int:
        return self.manifest.stored_size

    @property
    def complete(self) -> bool:
        return self.have == bitfield.full(len(self.manifest.chunks))


class Catalog:
    def __init__(self, data_dir: Path, store: ChunkStore) -> None:
        self.store = store
        self.manifest_dir = data_dir / "manifests"
        self.image_dir = data_dir / "images"
        self.names_file = data_dir / "names.json"
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, Image] = {}
        self.users: dict[str, list[tuple[Image, int]]] = {}  # chunk digest -> (image, index)
        self.on_have: list[Callable[[Image, int], None]] = []
        store.listeners.append(self._stored)

    def load(self) -> int:
        """Re-learn the images of a previous run; sweeps half-built trees. Returns images."""
        materialize.sweep_temp_dirs(self.image_dir)
        for f in sorted(self.manifest_dir.iterdir()):
            if ".tmp" in f.name:
                f.unlink(missing_ok=True)
                continue
            try:
                manifest = decode_manifest(f.read_bytes())
            except (OSError, ValueError):
                f.unlink(missing_ok=True)
                continue
            self.add(f.name, manifest, persist=False)
        for tmp in self.names_file.parent.glob(self.names_file.name + ".tmp-*"):
            tmp.unlink(missing_ok=True)  # a names file half-written when the node died
        try:
            names = json.loads(self.names_file.read_bytes())
        except (OSError, ValueError):
            names = {}
        if isinstance(names, dict):
            for digest, listed in names.items():
                image = self.images.get(digest)
                if image is not None and isinstance(listed, list):
                    image.names = {str(n) for n in listed}
        return len(self.images)

    def save_names(self) -> None:
        """Persist each image's names: a node restarted during a switch still knows
        which ready copy stands in for a moved name, and keeps it until the new one."""
        names = {d: sorted(i.names) for d, i in self.images.items() if i.names}
        _write_atomic(self.names_file, json.dumps(names, sort_keys=True).encode())

    def path(self, digest: str) -> Path:
        return self.image_dir / digest

    def add(self, digest: str, manifest: Manifest, *, persist: bool = True) -> Image:
        image = self.images.get(digest)
        if image is not None:
            return image
        if persist:
            _write_atomic(self.manifest_dir / digest, manifest.encode())
        image = Image(digest, manifest)
        for i, c in enumerate(manifest.chunks):
            self.users.setdefault(c.digest, []).append((image, i))
            if self.store.has(c.digest):
                image.have |= 1 << i
                image.bytes_done += c.stored_size
        if self.path(digest).is_dir() and image.complete:
            image.state = State.READY
        self.images[digest] = image
        return image

    def _stored(self, info: StoredChunk) -> None:
        for image, i in self.users.get(info.digest, ()):
            if not bitfield.has(image.have, i):
                image.have |= 1 << i
                image.bytes_done += image.manifest.chunks[i].stored_size
                for cb in self.on_have:
                    cb(image, i)

    def lost(self, digest: str) -> None:
        """A stored chunk turned out bad and was deleted: the images using it lack it again."""
        for image, i in self.users.get(digest, ()):
            if bitfield.has(image.have, i):
                image.have &= ~(1 << i)
                image.bytes_done -= image.manifest.chunks[i].stored_size

    def remove(self, digest: str) -> list[str]:
        """Forget an image and delete its tree; returns chunk digests no other image uses."""
        image = self.images.pop(digest, None)
        if image is None:
            return []
        tree = self.path(digest)
        if tree.exists():
            # Rename first, so the tree is either whole at its path or gone.
            doomed = tree.with_name(f".{digest}.tmp-gc-{time.monotonic_ns()}")
            os.rename(tree, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        (self.manifest_dir / digest).unlink(missing_ok=True)
        orphans = []
        for c in image.manifest.chunks:
            users = [u for u in self.users.get(c.digest, []) if u[0] is not image]
            if users:
                self.users[c.digest] = users
            else:
                self.users.pop(c.digest, None)
                orphans.append(c.digest)
        return orphans


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave nothing half-written
        raise
