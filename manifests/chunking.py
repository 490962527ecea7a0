"""The chunk codec (zstd or raw) and its verification; `scan.py` cuts files into chunks.

Every receiver goes through `decode_chunk`: it bounds the output to the declared
size before decompressing (a hostile frame cannot make us allocate more) and
checks the SHA-256 of the raw bytes, the project's trust anchor.
"""

from __future__ import annotations

import hashlib
import threading

import zstandard

from manifests.model import Encoding

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_ZSTD_LEVEL = 3


# A chunk's bytes as they travel: a receiver fills one preallocated buffer (a view of a
# bytearray, aligned for direct I/O) and hands it on (store, stager, upload) without
# copying it into a bytes object.
ChunkBytes = bytes | bytearray | memoryview


class ChunkError(ValueError):
    """Chunk bytes that do not decode or do not match their digest."""


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not safe to share between threads: one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def encode_chunk(raw: bytes, level: int = DEFAULT_ZSTD_LEVEL) -> tuple[Encoding, bytes]:
    """zstd when it saves at least 1/16 of the size, raw otherwise."""
    packed: bytes = _compressor(level).compress(raw)
    if len(packed) <= len(raw) - len(raw) // 16 and len(packed) < len(raw):
        return Encoding.ZSTD, packed
    return Encoding.RAW, raw


_PROBE_SLICES = 8
_PROBE_SLICE = 8 << 10


def probe_compressible(
    raw: bytes | bytearray | memoryview, level: int = DEFAULT_ZSTD_LEVEL
) -> bool:
    """A cheap guess whether `encode_chunk` would choose zstd, to skip it on random data.

    Compresses 8 slices of 8 KiB spread over the chunk (1.5% of a 4 MiB chunk) and says
    False only when they save under 1/32, i.e. clearly less than the 1/16 zstd must save.
    Already-compressed or encrypted data (half of many images) then costs nothing to
    "compress"; a wrong False only means a chunk is stored raw, which is always valid.
    """
    n = len(raw)
    if n <= 2 * _PROBE_SLICES * _PROBE_SLICE:
        return True
    view = memoryview(raw)
    step = n // _PROBE_SLICES
    sample = b"".join(view[i * step : i * step + _PROBE_SLICE] for i in range(_PROBE_SLICES))
    packed = _compressor(level).compress(sample)
    return len(packed) < len(sample) - len(sample) // 32


def decode_chunk(payload: ChunkBytes, encoding: Encoding | str, size: int) -> ChunkBytes:
    """Raw bytes of a stored chunk, refusing anything that is not exactly `size` bytes."""
    enc = Encoding(encoding)
    if enc is Encoding.RAW:
        if len(payload) != size:
            raise ChunkError(f"raw chunk is {len(payload)} bytes, expected {size}")
        return payload
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk is not a zstd frame: {e}") from None
    if declared != size:
        raise ChunkError(f"zstd frame declares {declared} bytes, expected {size}")
    try:
        raw: bytes = _decompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as e:
        raise ChunkError(f"chunk does not decompress: {e}") from None
    if len(raw) != size:
        raise ChunkError(f"chunk decompressed to {len(raw)} bytes, expected {size}")
    return raw


def verify_chunk(
    digest: str, payload: ChunkBytes, encoding: Encoding | str, size: int
) -> ChunkBytes:
    """Decode and check the SHA-256; return the raw bytes or raise `ChunkError`."""
    raw = decode_chunk(payload, encoding, size)
    actual = sha256_hex(raw)
    if actual != digest:
        raise ChunkError(f"chunk {digest[:16]} has SHA-256 {actual[:16]}: content mismatch")
    return raw
