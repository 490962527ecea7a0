"""A bogus bitfield (issue 6, fault 2): a neighbour that advertises chunks and then says it
does not hold them. The first "missing" may be a race and only backs the peer off; the
second bans it like a liar, and the ban outlives the neighbour re-sending its bitfield
(a fresh have-stream starts a fresh PeerState: only Scheduler.bans carries over)."""

from __future__ import annotations

import random

from distd.swarm.peers import Failure, PeerState, Penalties
from distd.swarm.scheduler import Scheduler, SchedulerConfig

PENALTIES = Penalties()


def test_one_missing_chunk_only_backs_the_peer_off() -> None:
    peer = PeerState("p")
    peer.record_failure(Failure.MISSING, 10.0, PENALTIES, random.Random(1))
    assert peer.banned_until == 0.0
    assert 10.0 < peer.blocked_until <= 10.0 + 2 * PENALTIES.error_backoff
    assert peer.usable(11.1)


def test_a_second_missing_chunk_bans_the_peer_as_a_lie_would() -> None:
    peer = PeerState("p")
    rng = random.Random(1)
    peer.record_failure(Failure.MISSING, 10.0, PENALTIES, rng)
    peer.record_success(100, 0.1)  # an honest chunk in between does not wipe the strike
    peer.record_failure(Failure.MISSING, 12.0, PENALTIES, rng)
    assert peer.banned_until == 12.0 + PENALTIES.ban_seconds
    assert not peer.usable(12.0 + PENALTIES.ban_seconds - 1)
    peer.record_failure(Failure.MISSING, 80.0, PENALTIES, rng)  # again: twice as long
    assert peer.banned_until == 80.0 + 2 * PENALTIES.ban_seconds


def test_a_seeder_is_never_banned_for_missing_chunks() -> None:
    seeder = PeerState("seeder", is_seeder=True)
    rng = random.Random(1)
    for t in range(5):
        seeder.record_failure(Failure.MISSING, float(t * 100), PENALTIES, rng)
    assert seeder.banned_until == 0.0 and seeder.corrupt == 0
    assert seeder.usable(500.0)


def test_the_ban_for_a_bogus_bitfield_survives_re_following() -> None:
    """The scheduler follows the peer, asks it, hears "missing", loses it (its have-stream
    ends), follows it again with the same full bitfield: the second request is the last."""
    sched = Scheduler([100] * 8, config=SchedulerConfig(first_chunks=0))
    now, asked = 0.0, 0
    for _ in range(6):
        sched.add_peer("bogus", have=0xFF)
        for req in sched.next_requests(now):
            assert req.peer_id == "bogus"
            asked += 1
            sched.on_failed("bogus", req.index, Failure.MISSING, now + 0.01)
        sched.remove_peer("bogus")
        now += 2.0  # past any backoff, well within a ban
    assert asked == 2
    sched.add_peer("bogus", have=0xFF)
    assert sched.next_requests(now) == []
    assert sched.peers["bogus"].banned_until >= 2.0 + PENALTIES.ban_seconds


def test_a_peer_failing_thousands_of_times_in_a_row_never_overflows_its_backoff() -> None:
    """2.0 ** 1024 overflows a float: at the 1,025th busy answer in a row (some 17 minutes of
    an always-busy peer) the decision loop used to raise OverflowError."""
    peer = PeerState("p")
    rng = random.Random(1)
    for i in range(2000):
        now = float(i)
        peer.record_failure(Failure.BUSY, now, PENALTIES, rng)
        peer.record_failure(Failure.ERROR, now, PENALTIES, rng)
        peer.record_failure(Failure.CORRUPT, now, PENALTIES, rng)
    assert peer.blocked_until <= 2000.0 + 2 * max(PENALTIES.max_backoff, PENALTIES.max_busy_backoff)
    assert peer.banned_until > 2000.0
