"""Decoding and validation of manifests received from anywhere: treat them as hostile.

`decode_manifest` is the only way bytes become a `Manifest`. It checks structure,
types, bounds and the tree rules (relative paths, no escaping, parents present,
nothing beneath a symlink, sizes that match the chunks) and raises a one-line
`ManifestError` that names the entry and the rule.
"""

from __future__ import annotations

from typing import Any

import msgpack

from manifests.model import (
    FORMAT_TAG,
    FORMAT_VERSION,
    Chunk,
    Encoding,
    Entry,
    Kind,
    Manifest,
    ManifestError,
)

MAX_ENTRIES = 1_000_000
MAX_MANIFEST_BYTES = 256 << 20
MAX_CHUNK_SIZE = 64 << 20
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_FILE_SIZE = 1 << 50
MAX_LINK_TARGET_BYTES = 4095


def _short(value: object) -> str:
    """A value for an error line: hostile strings can be as long as the manifest."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_path(path: object) -> str:
    """Return `path` if it is a safe relative POSIX path inside an image root, else raise."""
    if not isinstance(path, str):
        raise ManifestError(f"path {_short(path)} is not a string")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"path {_short(path)} is not valid UTF-8") from None
    if not raw:
        raise ManifestError("path is empty")
    if len(raw) > MAX_PATH_BYTES:
        raise ManifestError(f"path {path[:60]!r}... is longer than {MAX_PATH_BYTES} bytes")
    if b"\0" in raw:
        raise ManifestError(f"path {path!r} contains a NUL byte")
    if raw.startswith(b"/"):
        raise ManifestError(f"path {path!r} is absolute")
    for part in raw.split(b"/"):
        if part == b"":
            raise ManifestError(f"path {path!r} has an empty component")
        if part == b".":
            raise ManifestError(f"path {path!r} has a '.' component")
        if part == b"..":
            raise ManifestError(f"path {path!r} has a '..' component")
        if len(part) > MAX_NAME_BYTES:
            raise ManifestError(f"path {path!r} has a component over {MAX_NAME_BYTES} bytes")
    return path


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"{what} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ManifestError(f"{what} must be a 32-byte SHA-256 digest")
    return value.hex()


def _list(value: object, what: str, n: int | None = None) -> list[Any]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        shape = f"a list of {n} items" if n is not None else "a list"
        raise ManifestError(f"{what} must be {shape}")
    return value


def _decode_chunk(i: int, row: object, chunk_size: int) -> Chunk:
    what = f"chunk {i}"
    r = _list(row, what, 4)
    digest = _digest(r[0], f"{what} digest")
    what = f"chunk {digest[:16]}"
    size = _int(r[1], f"{what} size", 1, chunk_size)
    stored = _int(r[2], f"{what} stored size", 1, MAX_CHUNK_SIZE)
    try:
        encoding = Encoding(r[3])
    except ValueError:
        raise ManifestError(f"{what} has unknown encoding {_short(r[3])}") from None
    if encoding is Encoding.RAW and stored != size:
        raise ManifestError(f"{what} is raw but its stored size {stored} != size {size}")
    if encoding is Encoding.ZSTD and stored >= size:
        raise ManifestError(f"{what} is zstd but its stored size {stored} >= size {size}")
    return Chunk(digest, size, stored, encoding)


def _decode_entry(i: int, row: object, table: dict[str, Chunk]) -> Entry:
    r = _list(row, f"entry {i}")
    if len(r) < 3:
        raise ManifestError(f"entry {i} has {len(r)} fields, needs at least 3")
    try:
        path = validate_path(r[0])
    except ManifestError as e:
        raise ManifestError(f"entry {i}: {e}") from None
    what = f"entry {path!r}"
    try:
        kind = Kind(r[1])
    except ValueError:
        raise ManifestError(f"{what} has unknown kind {_short(r[1])}") from None
    mode = _int(r[2], f"{what} mode", 0, 0o7777)
    if kind is Kind.DIR:
        _list(r, what, 3)
        return Entry(path, kind, mode)
    if kind is Kind.SYMLINK:
        _list(r, what, 4)
        target = r[3]
        if not isinstance(target, str) or not target or "\0" in target:
            raise ManifestError(f"{what} symlink target must be a non-empty string without NUL")
        try:
            target_bytes = len(target.encode("utf-8"))
        except UnicodeEncodeError:
            raise ManifestError(f"{what} symlink target is not valid UTF-8") from None
        if target_bytes > MAX_LINK_TARGET_BYTES:
            raise ManifestError(f"{what} symlink target is over {MAX_LINK_TARGET_BYTES} bytes")
        return Entry(path, kind, mode, target=target)
    _list(r, what, 6)
    size = _int(r[3], f"{what} size", 0, MAX_FILE_SIZE)
    sha = _digest(r[4], f"{what} sha256")
    chunks = tuple(_digest(d, f"{what} chunk digest") for d in _list(r[5], f"{what} chunks"))
    total = 0
    for d in chunks:
        c = table.get(d)
        if c is None:
            raise ManifestError(f"{what} uses chunk {d[:16]} that is not in the chunk table")
        total += c.size
    if total != size:
        raise ManifestError(f"{what} size {size} != {total}, the sum of its chunk sizes")
    return Entry(path, kind, mode, size=size, sha256=sha, chunks=chunks)


def _check_tree(entries: list[Entry]) -> None:
    kinds: dict[str, Kind] = {}
    prev = b""
    for e in entries:
        key = e.path.encode()
        if e.path in kinds:
            raise ManifestError(f"entry {e.path!r} appears twice")
        if key < prev:
            raise ManifestError(f"entry {e.path!r} is out of canonical (sorted) order")
        prev = key
        parent, _, _ = e.path.rpartition("/")
        if parent:
            pk = kinds.get(parent)
            if pk is None:
                raise ManifestError(f"entry {e.path!r} has no parent directory entry {parent!r}")
            if pk is Kind.SYMLINK:
                raise ManifestError(f"entry {e.path!r} is beneath symlink {parent!r}")
            if pk is not Kind.DIR:
                raise ManifestError(f"entry {e.path!r} is beneath non-directory {parent!r}")
        kinds[e.path] = e.kind


def decode_manifest(data: bytes) -> Manifest:
    """Parse and fully validate canonical manifest bytes."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest is {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}"
        )
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            # Invalid UTF-8 decodes to lone surrogates, and strings and bins are bounded
            # only by the (bounded) input, so that the checks below can reject them
            # with the entry and the rule rather than a bare decoder error.
            unicode_errors="surrogateescape",
            max_array_len=max(MAX_ENTRIES, MAX_MANIFEST_BYTES // 33),
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise ManifestError(f"manifest is not valid msgpack: {e}") from None
    top = _list(doc, "manifest", 5)
    if top[0] != FORMAT_TAG:
        raise ManifestError(f"not a manifest (format tag {_short(top[0])})")
    if top[1] != FORMAT_VERSION:
        raise ManifestError(f"unsupported manifest version {_short(top[1])}")
    chunk_size = _int(top[2], "chunk size", 1, MAX_CHUNK_SIZE)
    rows = _list(top[3], "entries")
    if len(rows) > MAX_ENTRIES:
        raise ManifestError(f"manifest has {len(rows)} entries, over the limit of {MAX_ENTRIES}")
    chunk_rows = _list(top[4], "chunk table")
    chunks = [_decode_chunk(i, row, chunk_size) for i, row in enumerate(chunk_rows)]
    table: dict[str, Chunk] = {}
    for c in chunks:
        if table and c.digest <= chunks[len(table) - 1].digest:
            raise ManifestError(f"chunk {c.digest[:16]} is duplicated or out of sorted order")
        table[c.digest] = c
    entries = [_decode_entry(i, row, table) for i, row in enumerate(rows)]
    _check_tree(entries)
    used = {d for e in entries for d in e.chunks}
    unused = table.keys() - used
    if unused:
        raise ManifestError(f"chunk {min(unused)[:16]} is in the table but no file uses it")
    return Manifest(tuple(entries), tuple(chunks), chunk_size)
