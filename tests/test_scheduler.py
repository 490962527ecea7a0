"""The sans-IO scheduler, driven directly: invariants under hypothesis, and policy cases."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from distd.swarm import bitfield
from distd.swarm.peers import Failure
from distd.swarm.scheduler import Request, Scheduler, SchedulerConfig

BEHAVIOURS = ["good", "good", "slow", "busy", "corrupt", "liar", "staller", "flaky"]


@dataclass
class FakePeer:
    peer_id: str
    behaviour: str
    truly_has: int
    advertised: int
    is_seeder: bool = False
    zone: str = ""


def _outcome(peer: FakePeer, req: Request, rng: random.Random) -> tuple[float, Failure | None]:
    """(delay, failure or None for success) for one request to a fake peer."""
    if not bitfield.has(peer.truly_has, req.index):
        return 0.01, Failure.MISSING
    b = peer.behaviour
    if b == "busy":
        return 0.001, Failure.BUSY
    if b == "corrupt":
        return 0.5, Failure.CORRUPT
    if b == "staller":
        return float("inf"), None
    if b == "flaky" and rng.random() < 0.5:
        return 0.2, Failure.ERROR
    return (3.0 if b == "slow" else 0.4), None


def drive(
    sched: Scheduler, peers: list[FakePeer], rng: random.Random, limit: float = 20_000.0
) -> float:
    """Run the swarm until complete, checking the invariants on every decision."""
    by_id = {p.peer_id: p for p in peers}
    cfg = sched.config
    events: list[tuple[float, int, str, int]] = []
    live: dict[tuple[str, int], float] = {}
    seq = 0
    now = 0.0
    while not sched.complete:
        issued = sched.next_requests(now)
        for req in issued:
            peer = by_id[req.peer_id]
            assert not bitfield.has(sched.have, req.index), "asked for a chunk it holds"
            assert bitfield.has(peer.advertised, req.index), "asked a peer that never had it"
            assert (req.peer_id, req.index) not in live, "same request twice"
            delay, _ = _outcome(peer, req, rng)
            live[(req.peer_id, req.index)] = now + delay
            if delay != float("inf"):
                seq += 1
                heapq.heappush(events, (now + delay, seq, req.peer_id, req.index))
        for p in sched.peers.values():
            bound = cfg.per_seeder_inflight if p.is_seeder else cfg.per_peer_inflight
            assert len(p.inflight) <= bound
        # Stalled requests stay out but stop counting against the bound when new ones go out.
        # In endgame a hedge of a late request may take one more.
        if issued:
            hedging = max(cfg.max_inflight, cfg.endgame_duplicates)
            bound = hedging if sched.in_endgame() else cfg.max_inflight
            assert sched.inflight - sched.stalled <= bound
        assert sched.inflight == sum(len(r) for r in sched.pending.values())
        wake = sched.next_wakeup(now)
        nxt = min(events[0][0] if events else float("inf"), wake if wake is not None else 1e18)
        assert nxt < 1e18, f"stalled at t={now} with {sched.missing.bit_count()} missing"
        now = max(now, nxt)
        assert now < limit, "did not finish in time"
        while events and events[0][0] <= now:
            _, _, pid, index = heapq.heappop(events)
            if live.pop((pid, index), None) is None or index not in sched.pending:
                continue
            if pid not in sched.pending[index]:
                continue
            _, failure = _outcome(by_id[pid], Request(pid, index, 0, 0), rng)
            if failure is None:
                for cancelled in sched.on_received(pid, index, now):
                    live.pop((cancelled.peer_id, cancelled.index), None)
            else:
                sched.on_failed(pid, index, failure, now)
        for r in sched.expire(now):
            live.pop((r.peer_id, r.index), None)
    return now


@st.composite
def swarms(draw: st.DrawFn) -> tuple[int, list[FakePeer], int]:
    n = draw(st.integers(1, 40))
    full = bitfield.full(n)
    peers: list[FakePeer] = []
    for k in range(draw(st.integers(1, 7))):
        behaviour = draw(st.sampled_from(BEHAVIOURS))
        has = draw(st.integers(0, full))
        advertised = full if behaviour == "liar" else has
        peers.append(
            FakePeer(f"p{k}", behaviour, has, advertised, zone=draw(st.sampled_from("ab")))
        )
    honest = 0
    for p in peers:
        if p.behaviour in ("good", "slow", "flaky"):
            honest |= p.truly_has
    if honest != full or draw(st.booleans()):
        peers.append(FakePeer("seeder", "good", full, full, is_seeder=True))
    have = draw(st.integers(0, full))
    return n, peers, have


@settings(max_examples=300, deadline=None)
@given(swarms(), st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 12))
def test_invariants_hold_and_every_available_chunk_arrives(
    swarm: tuple[int, list[FakePeer], int], seed: int, per_peer: int, max_inflight: int
) -> None:
    n, peers, have = swarm
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        per_peer_inflight=per_peer, per_seeder_inflight=per_peer, max_inflight=max_inflight
    )
    sched = Scheduler([1 << 20] * n, bitfield.iter_set(have), config=cfg, rng=rng)
    for p in peers:
        sched.add_peer(p.peer_id, zone=p.zone, is_seeder=p.is_seeder, have=p.advertised)
    drive(sched, peers, rng)
    assert sched.complete


def test_seeder_is_asked_only_for_what_no_neighbour_holds() -> None:
    sched = Scheduler(
        [100] * 8,
        config=SchedulerConfig(
            per_peer_inflight=8, per_seeder_inflight=2, max_inflight=32, first_chunks=0
        ),
    )
    sched.add_peer("seed", is_seeder=True, have=bitfield.full(8))
    sched.add_peer("a", have=0b00001111)
    reqs = sched.next_requests(0.0)
    assert {r.index for r in reqs if r.peer_id == "a"} == {0, 1, 2, 3}
    from_seeder = {r.index for r in reqs if r.peer_id == "seed"}
    assert len(from_seeder) == 2 and from_seeder <= {4, 5, 6, 7}  # seeder slots: 2
    # When the neighbour is busy, the seeder may serve what only that neighbour had.
    for r in reqs:
        if r.peer_id == "a":
            sched.on_failed("a", r.index, Failure.BUSY, 0.0)
    more = sched.next_requests(0.01)
    assert all(r.peer_id == "seed" for r in more)


def test_rarest_chunk_is_picked_first_from_the_first_chunk_on() -> None:
    sched = Scheduler(
        [100] * 4, config=SchedulerConfig(per_peer_inflight=1, max_inflight=3, first_chunks=0)
    )
    sched.add_peer("a", have=0b1111)
    sched.add_peer("b", have=0b0111)
    sched.add_peer("c", have=0b0011)
    first = sched.next_requests(0.0)
    picked = {r.peer_id: r.index for r in first}
    assert picked["a"] == 3  # held by a alone
    assert picked["b"] == 2  # rarest of what remains with b


def test_the_rarest_transfer_is_read_first_and_the_order_follows_the_news() -> None:
    sched = Scheduler([100] * 3)
    sched.add_peer("a", have=0b011)
    sched.add_peer("b", have=0b001)
    sched.add_peer("s", is_seeder=True, have=0b111)  # a seeder is no neighbour to rank by
    order = sorted(range(3), key=sched.read_order)
    assert order == [2, 1, 0]
    sched.peer_has("b", 2, 0.0)
    sched.peer_has("a", 2, 0.0)
    assert sorted(range(3), key=sched.read_order) == [1, 0, 2]


def test_endgame_duplicates_a_late_last_request_and_cancels_the_loser() -> None:
    cfg = SchedulerConfig(per_peer_inflight=1, endgame_wait=2.0)
    sched = Scheduler([100] * 2, [0], config=cfg)
    sched.add_peer("a", have=0b11)
    sched.add_peer("b", have=0b11)
    (first,) = sched.next_requests(0.0)
    assert sched.in_endgame() and first.index == 1
    assert sched.next_requests(1.0) == []  # not late yet: no second peer's upload spent
    assert sched.next_wakeup(1.0) == 2.0
    (dup,) = sched.next_requests(2.0)
    assert dup.index == 1 and dup.peer_id != first.peer_id
    cancelled = sched.on_received(dup.peer_id, 1, 2.5)
    assert [(c.peer_id, c.index) for c in cancelled] == [(first.peer_id, 1)]
    assert sched.complete and sched.inflight == 0


def test_busy_peer_is_skipped_until_its_backoff_ends() -> None:
    sched = Scheduler([100], config=SchedulerConfig())
    sched.add_peer("a", have=1)
    (req,) = sched.next_requests(0.0)
    sched.on_failed("a", req.index, Failure.BUSY, 0.0)
    assert sched.next_requests(0.0) == []
    wake = sched.next_wakeup(0.0)
    assert wake is not None and 0 < wake <= 0.41
    assert len(sched.next_requests(wake)) == 1


def test_a_peer_that_announced_its_slots_taken_is_not_asked_until_then() -> None:
    sched = Scheduler([100, 100], config=SchedulerConfig(first_chunks=0))
    sched.add_peer("busy", have=0b11)
    sched.add_peer("other", have=0b01)
    sched.peer_busy("busy", 0.3, 0.0)
    sched.peer_busy("gone", 0.3, 0.0)  # not a neighbour: nothing to do
    # Only the other peer is asked, and for what it holds; chunk 1 waits for "busy".
    assert [(r.peer_id, r.index) for r in sched.next_requests(0.0)] == [("other", 0)]
    spread = sched.config.penalties.busy_spread
    wake = sched.next_wakeup(0.0)
    assert wake is not None and 0.3 <= wake <= 0.3 + spread
    assert [(r.peer_id, r.index) for r in sched.next_requests(wake)] == [("busy", 1)]


def test_have_news_wakes_the_driver_only_when_it_can_matter() -> None:
    """`peer_has` lets drivers skip decisions; skipping one must never strand a chunk:
    a held-off neighbour's first wanted chunk still wakes (for its wake-up time)."""
    sched = Scheduler([100] * 4, config=SchedulerConfig(first_chunks=0, max_inflight=1))
    sched.add_peer("free", have=0)
    sched.add_peer("held", have=0)
    sched.peer_busy("held", 0.5, 0.0)
    assert sched.peer_has("held", 1, 0.0)  # held off, but nothing else wanted from it
    assert sched.next_requests(0.0) == []
    wake = sched.next_wakeup(0.0)
    spread = sched.config.penalties.busy_spread
    assert wake is not None and 0.5 <= wake <= 0.5 + spread  # so chunk 1 is not stranded
    assert not sched.peer_has("held", 3, 0.1)  # held off, and its wake-up is set
    assert sched.peer_has("free", 0, 0.1)  # can be asked now
    assert [(r.peer_id, r.index) for r in sched.next_requests(0.1)] == [("free", 0)]
    assert not sched.peer_has("free", 2, 0.2)  # the one request slot is taken
    sched.on_received("free", 0, 0.3)
    assert sched.peer_has("free", 2, 0.3)
    sched.mark_have(2)
    assert not sched.peer_has("free", 2, 0.3)  # held already
    assert not sched.peer_has("gone", 1, 0.3)  # not a neighbour
    assert not sched.peer_has("free", 4, 0.3)  # no such chunk


def test_corrupt_peer_is_banned_and_its_chunks_go_elsewhere() -> None:
    sched = Scheduler([100], config=SchedulerConfig())
    sched.add_peer("liar", have=1)
    sched.add_peer("honest", have=1)
    sched.peers["liar"].rate = 1e9  # looks fastest, so it is asked first
    sched.peers["honest"].rate = 1.0
    (req,) = sched.next_requests(0.0)
    assert req.peer_id == "liar"
    sched.on_failed("liar", 0, Failure.CORRUPT, 0.1)
    (again,) = sched.next_requests(0.1)
    assert again.peer_id == "honest"
    assert sched.peers["liar"].banned_until >= 60


def test_ban_outlives_the_liar_leaving_and_coming_back() -> None:
    sched = Scheduler([100, 100], config=SchedulerConfig())
    sched.add_peer("liar", have=0b11)
    (req,) = sched.next_requests(0.0)
    sched.on_failed("liar", req.index, Failure.CORRUPT, 0.1)
    banned_until = sched.peers["liar"].banned_until
    sched.remove_peer("liar")  # its have-stream ended ...
    sched.add_peer("liar", have=0b11)  # ... and it is followed again
    assert sched.peers["liar"].banned_until == banned_until
    assert sched.next_requests(1.0) == []
    assert sched.next_wakeup(1.0) == banned_until
    sched.on_failed("liar", 0, Failure.CORRUPT, banned_until + 1)  # a second lie: longer
    assert sched.peers["liar"].banned_until - (banned_until + 1) > banned_until - 0.1


def test_endgame_does_not_ask_a_seeder_again_for_a_chunk_it_deferred() -> None:
    sched = Scheduler([100], config=SchedulerConfig())
    sched.add_peer("seeder", is_seeder=True, have=1)
    sched.add_peer("slow", have=1)
    (first,) = sched.next_requests(0.0)
    assert first.peer_id == "slow"
    (hedge,) = sched.next_requests(1.5)  # running late: duplicated on the seeder
    assert hedge.peer_id == "seeder"
    sched.on_failed("seeder", 0, Failure.DEFERRED, 1.51)
    assert sched.next_requests(1.52) == []
    until = sched.peers["seeder"].withheld[0]
    now, asked = 1.52, []
    while not asked:  # wake whenever the scheduler says; nothing goes out before `until`
        wake = sched.next_wakeup(now)
        assert wake is not None and wake <= until
        now = wake
        asked = sched.next_requests(now)
    assert now == until and [r.peer_id for r in asked] == ["seeder"]


def test_timeouts_are_returned_for_cancelling_and_retried() -> None:
    sched = Scheduler([1 << 20], config=SchedulerConfig(timeout_base=1.0))
    sched.add_peer("a", have=1)
    sched.add_peer("b", have=1)
    (req,) = sched.next_requests(0.0)
    assert sched.expire(req.deadline - 0.01) == []
    assert sched.expire(req.deadline) == [req]
    (retry,) = sched.next_requests(req.deadline)
    assert retry.peer_id != req.peer_id


def test_a_moving_transfer_from_the_only_source_outlives_its_deadline() -> None:
    """A seeder shared by many nodes sends slowly, not wrongly: while bytes keep coming
    and no one else holds the chunk, the deadline does not cancel (and restart) it.
    Once it goes silent, or another holder appears, the deadline applies again."""
    sched = Scheduler([1 << 20], config=SchedulerConfig(timeout_base=1.0))
    sched.add_peer("seeder", is_seeder=True, have=1)
    (req,) = sched.next_requests(0.0)
    t = req.deadline
    sched.on_progress("seeder", 0, t - 0.1)
    assert sched.expire(t) == []
    sched.on_progress("seeder", 0, t + 5.0)
    assert sched.expire(t + 5.5) == []
    assert sched.next_wakeup(t + 5.5) == t + 5.0 + sched.config.stall_idle
    assert sched.expire(t + 5.0 + sched.config.stall_idle) == [req]  # silent: cancelled

    again = Scheduler([1 << 20], config=SchedulerConfig(timeout_base=1.0))
    again.add_peer("seeder", is_seeder=True, have=1)
    (req,) = again.next_requests(0.0)
    again.add_peer("a", have=1)  # a second holder: a slow transfer is worth replacing
    again.on_progress("seeder", 0, req.deadline - 0.1)
    assert again.expire(req.deadline) == [req]


def test_an_empty_node_whose_one_request_stalls_tries_several_sources_at_once() -> None:
    """One request at a time while empty (first_chunks), but not one silent peer at a
    time: once it stalls, the node fills every slot, so the next silent peers cost one
    stall allowance together, not one each."""
    sched = Scheduler([1 << 20] * 4, config=SchedulerConfig(first_chunks=2, max_inflight=2))
    for p in "abc":
        sched.add_peer(p, have=0b1111)
    (first,) = sched.next_requests(0.0)
    stall = sched.next_wakeup(0.0)
    assert stall is not None
    more = sched.next_requests(stall)
    assert len(more) == 2 and first.peer_id not in {r.peer_id for r in more}


def test_peer_leaving_returns_its_requests() -> None:
    sched = Scheduler(
        [10] * 3, config=SchedulerConfig(per_peer_inflight=3, max_inflight=3, first_chunks=0)
    )
    sched.add_peer("a", have=0b111)
    reqs = sched.next_requests(0.0)
    assert len(sched.remove_peer("a")) == len(reqs) == 3
    assert sched.inflight == 0 and sched.pending_bits == 0
    assert sched.availability == [0, 0, 0]


def test_same_zone_peers_are_preferred() -> None:
    sched = Scheduler([10] * 4, config=SchedulerConfig(per_peer_inflight=1, my_zone="fra"))
    sched.add_peer("far", zone="ams", have=0b1111)
    sched.add_peer("near", zone="fra", have=0b1111)
    cfg = SchedulerConfig(per_peer_inflight=1, max_inflight=1, my_zone="fra")
    sched.config = cfg
    (req,) = sched.next_requests(0.0)
    assert req.peer_id == "near"


def test_stalled_requests_stop_holding_every_slot() -> None:
    cfg = SchedulerConfig(max_inflight=2, stall_unmeasured=2.0, first_chunks=0)
    sched = Scheduler([1 << 20] * 4, config=cfg)
    for name in ("silent1", "silent2", "good"):
        sched.add_peer(name, have=0b1111)
    sched.peers["good"].rate = 1.0  # measured slow: tried after the unmeasured ones
    first = sched.next_requests(0.0)
    assert sorted(r.peer_id for r in first) == ["silent1", "silent2"]
    assert sched.next_requests(1.9) == []  # not stalled yet: the bound holds
    assert sched.next_wakeup(1.9) == 2.0
    (more,) = sched.next_requests(2.0)  # both stalled: a slot opens without a timeout
    assert more.peer_id == "good" and sched.stalled == 2
    assert sched.inflight == 3 and all(r.deadline > 2.0 for r in first)


def test_a_transfer_gone_silent_is_stalled_after_stall_idle() -> None:
    cfg = SchedulerConfig(max_inflight=1, stall_idle=1.0, stall_unmeasured=30.0)
    sched = Scheduler([1 << 20] * 2, config=cfg)
    sched.add_peer("a", have=0b11)
    sched.add_peer("b", have=0b11)
    (first,) = sched.next_requests(0.0)
    sched.on_progress(first.peer_id, first.index, 0.5)
    sched.on_progress(first.peer_id, first.index, 1.2)  # still flowing: not stalled
    assert sched.next_requests(2.1) == []
    assert sched.next_wakeup(2.1) == 2.2
    (second,) = sched.next_requests(2.2)  # silent for 1 s: its slot is free again
    assert second.peer_id != first.peer_id and second.index != first.index


def test_an_empty_node_asks_for_one_chunk_at_a_time_until_it_holds_first_chunks() -> None:
    cfg = SchedulerConfig(per_peer_inflight=1, max_inflight=2, first_chunks=2)
    sched = Scheduler([100] * 4, config=cfg)
    sched.add_peer("a", have=0b1111)
    sched.add_peer("b", have=0b1111)
    (first,) = sched.next_requests(0.0)  # one, though two slots and two peers
    sched.on_received(first.peer_id, first.index, 0.1)
    assert sched.next_requests(0.1) and sched.inflight == 1  # still one: holds 1 of 2
    (r,) = next(iter(sched.pending.values())).values()
    sched.on_received(r.peer_id, r.index, 0.2)
    assert len(sched.next_requests(0.2)) == 2  # holds 2: the full max_inflight
