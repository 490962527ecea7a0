"""What a node knows about each neighbour, and how a neighbour earns or loses its trust.

Penalties are time-based (the caller passes `now`): a busy peer is skipped for a
short, jittered moment; a failing one for an exponentially growing one; a peer
that served bytes that did not match their digest is banned outright.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum


class Failure(StrEnum):
    BUSY = "busy"  # the peer's upload slots are full: try another at once
    TIMEOUT = "timeout"  # no complete answer before the deadline
    ERROR = "error"  # connection refused, reset, HTTP error
    MISSING = "missing"  # the peer said it does not hold a chunk it advertised
    CORRUPT = "corrupt"  # the bytes did not match the digest: the peer is lying or broken


@dataclass(frozen=True, slots=True)
class Penalties:
    busy_backoff: float = 0.2
    error_backoff: float = 0.5
    max_backoff: float = 30.0
    ban_seconds: float = 60.0


@dataclass(eq=False)
class PeerState:
    peer_id: str
    zone: str = ""
    is_seeder: bool = False
    have: int = 0
    inflight: set[int] = field(default_factory=set)
    rate: float = 0.0  # moving average of bytes/s per completed request; 0 = unknown
    failures: int = 0
    corrupt: int = 0
    blocked_until: float = 0.0
    banned_until: float = 0.0

    def usable(self, now: float) -> bool:
        return now >= self.blocked_until and now >= self.banned_until

    def record_success(self, nbytes: int, elapsed: float) -> None:
        self.failures = 0
        sample = nbytes / max(elapsed, 1e-6)
        self.rate = sample if self.rate == 0 else 0.7 * self.rate + 0.3 * sample

    def record_failure(
        self, reason: Failure, now: float, penalties: Penalties, rng: random.Random
    ) -> None:
        jitter = 1.0 + rng.random()
        if reason is Failure.BUSY:
            self.blocked_until = now + penalties.busy_backoff * jitter
        elif reason is Failure.CORRUPT:
            self.corrupt += 1
            self.banned_until = now + penalties.ban_seconds * 2 ** (self.corrupt - 1)
        else:
            self.failures += 1
            backoff = penalties.error_backoff * 2 ** (self.failures - 1)
            self.blocked_until = now + min(penalties.max_backoff, backoff) * jitter


def preference(peer: PeerState, my_zone: str) -> tuple[bool, bool, float]:
    """Sort key, best first: non-seeders, then same zone, then faster.

    A peer with no measured rate sorts as fastest, so every neighbour gets tried.
    """
    rate = peer.rate if peer.rate > 0 else float("inf")
    return (peer.is_seeder, peer.zone != my_zone, -rate)
