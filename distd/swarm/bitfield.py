"""Chunk sets as Python ints: one bit per chunk index, set operations in C.

A node tracks one set per neighbour per image; ints keep that to n/8 bytes each
and make "what could this peer give me" a single `peer & ~mine & ~pending`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def from_indexes(indexes: Iterable[int]) -> int:
    bits = 0
    for i in indexes:
        bits |= 1 << i
    return bits


def full(n: int) -> int:
    return (1 << n) - 1


def has(bits: int, i: int) -> bool:
    return (bits >> i) & 1 == 1


def iter_set(bits: int) -> Iterator[int]:
    """Indexes of set bits, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def count(bits: int) -> int:
    return bits.bit_count()


def to_bytes(bits: int, n: int) -> bytes:
    """Wire form: little-endian, ceil(n/8) bytes."""
    return bits.to_bytes((n + 7) // 8, "little")


def from_bytes(data: bytes, n: int) -> int:
    """Parse a peer's bitfield, refusing one longer than the image or with stray high bits."""
    if len(data) != (n + 7) // 8:
        raise ValueError(f"bitfield is {len(data)} bytes, expected {(n + 7) // 8}")
    bits = int.from_bytes(data, "little")
    if bits >> n:
        raise ValueError("bitfield has bits set beyond the last chunk")
    return bits
