"""Writes that bypass the page cache must land exactly the bytes a plain pwrite would:
aligned bulk and unaligned tail, offsets on and off the block grid, buffers larger than
the bounce buffer, sources in aligned memory (written as they are) and elsewhere (through
the bounce buffer), on a disk filesystem and on tmpfs; the file's flags are left as they
were, and a full disk is an error, not a silent fallback."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treeutil import mounted

from distd.directio import ALIGN, BOUNCE, DIRECT_MIN, _address, aligned_buffer, pwrite_all
from manifests.chunking import ChunkBytes


def _source(data: bytes, where: str) -> ChunkBytes:
    """`data` in read-only memory, in an aligned buffer, or in a buffer off the grid."""
    if where == "bytes":
        return data
    buf = (
        aligned_buffer(len(data))
        if where == "aligned"
        else memoryview(bytearray(len(data) + 1))[1:]
    )
    buf[:] = data
    return buf


def _check(path: Path, before: bytes, data: bytes, offset: int, where: str = "bytes") -> None:
    path.write_bytes(before)
    fd = os.open(path, os.O_WRONLY)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        pwrite_all(fd, _source(data, where), offset)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
    finally:
        os.close(fd)
    want = bytearray(before)
    if data:  # a write of nothing past the end does not extend the file
        want = want.ljust(offset, b"\0")
        want[offset : offset + len(data)] = data
    assert path.read_bytes() == bytes(want)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.integers(0, 3 * DIRECT_MIN),
    blocks=st.integers(0, 40),
    shift=st.sampled_from([0, 0, 1, 511, 512]),
    size=st.integers(0, 3 * DIRECT_MIN),
    seed=st.binary(min_size=1, max_size=16),
    where=st.sampled_from(["bytes", "aligned", "unaligned"]),
)
def test_written_bytes_are_the_bytes_given(
    tmp_path: Path, before: int, blocks: int, shift: int, size: int, seed: bytes, where: str
) -> None:
    data = (seed * (size // len(seed) + 1))[:size]
    _check(tmp_path / "f", os.urandom(before), data, blocks * ALIGN + shift, where)


@given(size=st.integers(0, 3 * BOUNCE))
def test_aligned_buffers_start_on_the_grid(size: int) -> None:
    buf = aligned_buffer(size)
    assert len(buf) == size and not buf.readonly
    assert buf.tobytes() == bytes(size)
    if size:
        assert _address(buf) % ALIGN == 0


def _targets(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        yield shm


@pytest.mark.parametrize("size", [BOUNCE, 2 * BOUNCE + ALIGN + 123, DIRECT_MIN - 1])
@pytest.mark.parametrize("source", ["bytes", "aligned"])
def test_large_and_small_writes_on_disk_and_tmpfs(tmp_path: Path, size: int, source: str) -> None:
    data = os.urandom(size)
    for where in _targets(tmp_path):
        path = where / f"directio-{os.getpid()}"
        try:
            _check(path, b"x" * 100, data, ALIGN, source)
            _check(path, b"", data, 0, source)
        finally:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB ext4 on a loop device (a block filesystem, where O_DIRECT reaches the
    disk); skips when this machine will not make one (needs root and loop devices)."""
    image = tmp_path / "fs.img"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {made.stderr.strip()}")
    with mounted(tmp_path / "mnt", "-o", "loop", str(image)) as mnt:
        yield mnt


def test_a_full_disk_is_an_error(tmp_path: Path) -> None:
    with small_ext4(tmp_path) as mnt:
        fd = os.open(mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as info:
                pwrite_all(fd, os.urandom(8 << 20), 0)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
