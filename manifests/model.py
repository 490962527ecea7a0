"""The content model: chunks, entries, manifests and their canonical encoding.

A manifest's identity is the SHA-256 of its canonical msgpack encoding, so the
encoding must be deterministic: entries sorted by path bytes, chunks sorted by
digest, arrays only (no maps whose order could vary), digests as raw bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack

FORMAT_TAG = "p2pdist-manifest"
FORMAT_VERSION = 1

DIGEST_HEX_LEN = 64


class ManifestError(ValueError):
    """A manifest (or an input that would become one) breaks a rule; the message says which."""


class Kind(StrEnum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"


class Encoding(StrEnum):
    RAW = "raw"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One row of the chunk table. `digest` is the hex SHA-256 of the raw bytes."""

    digest: str
    size: int
    stored_size: int
    encoding: Encoding


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory, regular file or symlink at a relative POSIX path."""

    path: str
    kind: Kind
    mode: int
    size: int = 0
    sha256: str = ""
    chunks: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: tuple[Entry, ...]
    chunks: tuple[Chunk, ...]
    chunk_size: int

    @staticmethod
    def build(entries: list[Entry], chunks: dict[str, Chunk], chunk_size: int) -> Manifest:
        """Put entries and chunks in canonical order, so walk order cannot change the digest."""
        ordered = sorted(entries, key=lambda e: e.path.encode())
        table = tuple(chunks[d] for d in sorted(chunks))
        return Manifest(tuple(ordered), table, chunk_size)

    def encode(self) -> bytes:
        return encode_manifest(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    @property
    def total_size(self) -> int:
        """Bytes of file content the materialized tree holds."""
        return sum(e.size for e in self.entries if e.kind is Kind.FILE)

    @property
    def stored_size(self) -> int:
        """Bytes a node must fetch to hold every unique chunk."""
        return sum(c.stored_size for c in self.chunks)

    def chunk_map(self) -> dict[str, Chunk]:
        return {c.digest: c for c in self.chunks}


def _entry_row(e: Entry) -> list[Any]:
    if e.kind is Kind.FILE:
        return [
            e.path,
            e.kind.value,
            e.mode,
            e.size,
            bytes.fromhex(e.sha256),
            [bytes.fromhex(d) for d in e.chunks],
        ]
    if e.kind is Kind.SYMLINK:
        return [e.path, e.kind.value, e.mode, e.target]
    return [e.path, e.kind.value, e.mode]


def encode_manifest(m: Manifest) -> bytes:
    """Canonical bytes: the same manifest always encodes to the same bytes."""
    doc = [
        FORMAT_TAG,
        FORMAT_VERSION,
        m.chunk_size,
        [_entry_row(e) for e in m.entries],
        [[bytes.fromhex(c.digest), c.size, c.stored_size, c.encoding.value] for c in m.chunks],
    ]
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
