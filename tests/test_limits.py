"""Issue 6, "Limits", on real processes: a daemon under a thousand concurrent requests,
and bounded memory per connection whatever a client declares or sends.

(The tracker's announces per second are a benchmark, not a test: `python -m bench.tracker`.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest
from treeutil import Fleet, one_node_fleet

from bench.cluster import MIB

pytestmark = pytest.mark.timeout(120)

IMAGE = "limits/image:v1"
CONCURRENT = 1000
# What a burst may add to the daemon's resident memory, and what it may keep afterwards.
BURST_RSS = 96 * MIB
KEPT_RSS = 24 * MIB


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with one_node_fleet("limits", IMAGE, seed=8) as f:
        yield f


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


async def burst(url: str, chunk: str, n: int) -> collections.Counter[str]:
    """`n` GETs at once, half of a chunk, half of the status, each on its own connection."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> str:
            path = f"/v1/chunks/{chunk}" if i % 2 else "/v1/status"
            async with session.get(url + path) as resp:
                body = await resp.read()
                if resp.status == 503:
                    assert b"busy" in body, body[:200]
                return f"{path.split('/')[2]} {resp.status}"

        return collections.Counter(await asyncio.gather(*(one(i) for i in range(n))))


def test_daemon_answers_a_thousand_concurrent_requests_with_bounded_memory(fleet: Fleet) -> None:
    node = fleet.node
    pid = node.proc.pid
    before = memory(pid)
    rounds = []
    for _ in range(3):
        t0 = time.monotonic()
        counts = asyncio.run(burst(node.url, fleet.chunk, CONCURRENT))
        rounds.append((time.monotonic() - t0, counts, memory(pid)))
        assert node.http.healthy()
        assert sum(counts.values()) == CONCURRENT
        assert set(counts) <= {"status 200", "chunks 200", "chunks 503"}, counts
        assert counts["status 200"] == CONCURRENT // 2, counts
        assert counts["chunks 200"] >= 1, counts
    after = memory(pid)
    for seconds, counts, mem in rounds:
        print(
            f"{CONCURRENT} requests in {seconds:.2f} s: {dict(counts)}; "
            f"RSS {mem['VmRSS'] / MIB:.1f} MiB (peak {mem['VmHWM'] / MIB:.1f})"
        )
    print(f"RSS before {before['VmRSS'] / MIB:.1f} MiB, after {after['VmRSS'] / MIB:.1f} MiB")
    assert after["VmHWM"] - before["VmRSS"] < BURST_RSS, (before, after)
    # No leak: the second and third bursts keep what the first took.
    assert rounds[2][2]["VmRSS"] - rounds[0][2]["VmRSS"] < KEPT_RSS, rounds
    assert fleet.cluster.status(node)["images"][0]["state"] == "ready"


def test_a_huge_declared_body_is_not_buffered(fleet: Fleet) -> None:
    """A GET that declares 1 TiB and streams 64 MiB: answered, and none of it is held."""
    node = fleet.node
    pid = node.proc.pid
    before = memory(pid)["VmRSS"]
    host, _, port = node.url.removeprefix("http://").partition(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        block = b"\0" * (1 << 20)
        deadline = time.monotonic() + 10
        # The daemon answers at once, then discards what follows for a while and hangs up.
        with contextlib.suppress(OSError):
            while sent < 64 * MIB and time.monotonic() < deadline:
                sent += s.send(block)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    grew = memory(pid)["VmRSS"] - before
    print(f"sent {sent / MIB:.1f} MiB of a 1 TiB body; daemon RSS grew {grew / MIB:.1f} MiB")
    assert grew < 8 * MIB
    assert node.http.healthy()
