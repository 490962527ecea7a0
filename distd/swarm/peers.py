"""What a node knows about each neighbour, and how a neighbour earns or loses its trust.

Penalties are time-based (the caller passes `now`): a busy peer is skipped for a
short, jittered moment; a failing one for an exponentially growing one; a peer
that served bytes that did not match their digest is banned outright, and so is one
that twice said it lacks a chunk it had advertised (a bogus bitfield).
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
    DEFERRED = "deferred"  # a seeder handed this chunk out recently: get it from peers


@dataclass(frozen=True, slots=True)
class Penalties:
    busy_backoff: float = 0.05
    max_busy_backoff: float = 1.0
    # A neighbour's news "my upload slots are taken for t s" reaches all its followers
    # at once: each comes back within this much after t, the first one gets the slot
    # and its news of the next upload reaches the rest before most of them ask.
    # bench/sim.py N=16: 730 busy answers against 6,350 without the news, same times.
    busy_spread: float = 0.02
    defer_seconds: float = 2.0
    error_backoff: float = 0.5
    max_backoff: float = 30.0
    ban_seconds: float = 60.0
    # "I do not hold it" for an advertised chunk: the first time may be a race (the chunk
    # dropped between the bitfield and the request) and only backs the peer off; from
    # this many on the peer is banned as a liar is. A bogus bitfield is no lie a digest
    # can prove, but without a ban its author is asked again after every backoff and at
    # every re-sent bitfield (tests/test_faults.py, fault 2: 11 requests from 4 nodes
    # in a 7 s pull, against 8 at most with the ban). Not for a seeder: it holds
    # everything pushed, and a node has nowhere else to go for a chunk no peer holds.
    missing_strikes: int = 2


@dataclass(eq=False)
class PeerState:
    peer_id: str
    zone: str = ""
    is_seeder: bool = False
    have: int = 0
    inflight: set[int] = field(default_factory=set)
    rate: float = 0.0  # moving average of bytes/s per completed request; 0 = unknown
    failures: int = 0
    busy: int = 0  # consecutive busy answers
    # Strikes: chunks that did not match their digest, and advertised chunks the peer
    # said it lacks. Never reset; kept across the peer's departure (Scheduler.bans).
    corrupt: int = 0
    withheld: dict[int, float] = field(default_factory=dict)  # index -> deferred until
    blocked_until: float = 0.0
    banned_until: float = 0.0
    # max(blocked_until, banned_until), kept by `hold`: the scheduler reads it for every
    # neighbour on every decision, so it is a field, not a computation.
    ready_at: float = 0.0

    def usable(self, now: float) -> bool:
        return now >= self.ready_at

    def hold(
        self, *, blocked_until: float | None = None, banned_until: float | None = None
    ) -> None:
        """Set when the peer may be asked again (a backoff, a ban)."""
        if blocked_until is not None:
            self.blocked_until = blocked_until
        if banned_until is not None:
            self.banned_until = banned_until
        self.ready_at = max(self.blocked_until, self.banned_until)

    def withheld_bits(self, now: float) -> int:
        """Chunks this peer deferred us on, still within their deferral."""
        bits = 0
        for i, until in list(self.withheld.items()):
            if until > now:
                bits |= 1 << i
            else:
                del self.withheld[i]
        return bits

    def busy_for(
        self, seconds: float, now: float, penalties: Penalties, rng: random.Random
    ) -> None:
        """The peer said its upload slots are taken for about `seconds`: skip it until then."""
        until = now + min(penalties.max_busy_backoff, max(0.0, seconds))
        self.hold(
            blocked_until=max(self.blocked_until, until + penalties.busy_spread * rng.random())
        )

    def record_success(self, nbytes: int, elapsed: float) -> None:
        self.failures = 0
        self.busy = 0
        sample = nbytes / max(elapsed, 1e-6)
        self.rate = sample if self.rate == 0 else 0.7 * self.rate + 0.3 * sample

    def record_failure(
        self,
        reason: Failure,
        now: float,
        penalties: Penalties,
        rng: random.Random,
        retry_after: float | None = None,
    ) -> None:
        jitter = 1.0 + rng.random()
        if reason is Failure.BUSY and retry_after is not None:
            # The peer said when its next slot frees: come back then, not before, with a
            # little jitter so that everyone told the same moment does not arrive at once.
            self.busy += 1
            wait = min(penalties.max_busy_backoff, max(0.0, retry_after))
            self.hold(blocked_until=now + wait * (1.0 + 0.25 * rng.random()))
        elif reason is Failure.BUSY:
            # Doubling on each busy answer in a row: a thousand nodes told "busy" by an
            # overloaded seeder spread out instead of coming back as one wave.
            self.busy += 1
            backoff = min(
                penalties.max_busy_backoff, _doubled(penalties.busy_backoff, self.busy - 1)
            )
            self.hold(blocked_until=now + backoff * jitter)
        elif reason is Failure.DEFERRED:
            return  # the caller records which chunk; the peer itself stays usable
        elif reason is Failure.CORRUPT:
            self.corrupt += 1
            self.hold(banned_until=now + _doubled(penalties.ban_seconds, self.corrupt - 1))
        elif reason is Failure.MISSING and not self.is_seeder:
            self.corrupt += 1
            if self.corrupt >= penalties.missing_strikes:
                strikes = self.corrupt - penalties.missing_strikes
                self.hold(banned_until=now + _doubled(penalties.ban_seconds, strikes))
            else:
                self._back_off(now, penalties, jitter)
        else:
            self._back_off(now, penalties, jitter)

    def _back_off(self, now: float, penalties: Penalties, jitter: float) -> None:
        self.failures += 1
        backoff = _doubled(penalties.error_backoff, self.failures - 1)
        self.hold(blocked_until=now + min(penalties.max_backoff, backoff) * jitter)


def _doubled(base: float, times: int) -> float:
    """`base` doubled `times` times, the exponent capped: a peer busy or failing a
    thousand times in a row would otherwise overflow a float (2.0 ** 1024)."""
    return base * 2.0 ** min(times, 40)


def preference(peer: PeerState, my_zone: str) -> tuple[bool, bool, int]:
    """Sort key, best first: non-seeders, then same zone, then faster.

    Speed counts in coarse steps (factors of two): peers capped alike measure
    slightly differently, and ranking on that noise would send every node to the
    same "fastest" peers, which then answer busy. Callers shuffle first, so peers
    within a step are tried in random order. A peer not yet measured ranks with
    the fastest, so every neighbour gets tried.
    """
    step = -64 if peer.rate <= 0 else -int(peer.rate).bit_length()
    return (peer.is_seeder, peer.zone != my_zone, step)
