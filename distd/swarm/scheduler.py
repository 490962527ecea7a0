"""The download scheduler for one image: plain state, events in, requests out.

The driver (daemon, simulator or test) reports what happens -- a neighbour joined,
announced a chunk, answered a request, failed -- and asks `next_requests(now)` what
to send. The scheduler never sleeps or reads a clock; `next_wakeup(now)` says when
a backoff or deadline ends so the driver can sleep exactly that long.

Policy in brief: fill every non-seeder neighbour's request slots with the rarest
chunks it holds; ask a seeder only for chunks no usable neighbour holds; once every
missing chunk is already requested (endgame), duplicate the requests that run late
on other peers and cancel the losers when one answer lands.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from distd.swarm import bitfield
from distd.swarm.holds import Holds
from distd.swarm.peers import Failure, PeerState, Penalties, preference
from distd.swarm.picker import Picker, RarestFirst


@dataclass(frozen=True, slots=True)
class Request:
    peer_id: str
    index: int
    sent: float
    deadline: float


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    # Two requests in flight, one per peer, against one upload slot per peer (distd
    # --upload-slots): a peer sends one chunk at a time at its full rate, so a chunk is
    # whole and passed on as soon as it can be, and the next request is already out
    # when one lands. An upload ends when its last byte is in the socket buffers, so a
    # receiver reading two chunks at half speed does not hold its senders to that.
    # bench.fanout N=16, 256 MiB, 4 MiB chunks: p50 1.12x T_min against 1.16 with two
    # upload slots; bench/sim.py N=100: 1.20 against 1.24; 16 in flight: 1.5-1.8.
    per_peer_inflight: int = 1
    per_seeder_inflight: int = 1
    max_inflight: int = 2
    # With max_inflight above 1: until a node holds this many chunks it asks for one at
    # a time, so its first chunk lands as soon as it can and it can start uploading.
    first_chunks: int = 2
    # In endgame, up to this many requests for one chunk, and as many in flight in all:
    # a hedge for a late last chunk needs a slot of its own.
    endgame_duplicates: int = 2
    # In endgame, a request is duplicated only once it has run this many times longer
    # than its peer's measured rate predicts (or endgame_wait when unmeasured): hedging
    # a straggler, not spending a second peer's upload on every last chunk.
    endgame_slack: float = 1.5
    endgame_wait: float = 1.0
    # A request running this many times longer than its peer's rate predicts (at least
    # stall_floor s; stall_unmeasured s before any rate is known) is stalled: it stays
    # out, but stops counting against max_inflight, so a few silent peers cannot hold
    # every slot of a node until the deadline.
    stall_slack: float = 4.0
    stall_floor: float = 1.0
    # Before a transfer's first byte (or any rate) is seen. The daemon reports every
    # piece, and a live peer's first slice comes within a round trip and 0.1 s.
    stall_unmeasured: float = 1.0
    # With progress reported (on_progress), a transfer is stalled after this long silent.
    stall_idle: float = 1.0
    timeout_base: float = 5.0
    timeout_min_rate: float = 512 * 1024  # bytes/s below which a transfer counts as stalled
    my_zone: str = ""
    penalties: Penalties = field(default_factory=Penalties)


class Scheduler:
    def __init__(
        self,
        sizes: Sequence[int],
        have: Iterable[int] = (),
        *,
        config: SchedulerConfig | None = None,
        picker: Picker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sizes = list(sizes)
        self.n = len(self.sizes)
        self.all = bitfield.full(self.n)
        self.have = bitfield.from_indexes(have)
        self.config = config or SchedulerConfig()
        self.picker: Picker = picker or RarestFirst()
        self.rng = rng or random.Random()
        self.peers: dict[str, PeerState] = {}
        self.holds = Holds()  # the same peers, the held-off ones apart
        self.withholding: dict[str, PeerState] = {}  # peers with deferred chunks
        # Bans outlive a neighbour's departure: a liar that drops its have-stream and is
        # followed again (named by the tracker, or following us) must not start afresh.
        self.bans: dict[str, tuple[int, float]] = {}  # peer id -> (corrupt, banned_until)
        self.availability = [0] * self.n  # non-seeder neighbours holding each chunk
        self.pending: dict[int, dict[str, Request]] = {}
        self.pending_bits = 0
        self.inflight = 0
        self.stalled = 0  # requests past their stall time, as of the last next_requests
        self.progress: dict[tuple[str, int], float] = {}  # request -> last bytes seen

    # --- state ------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.have == self.all

    @property
    def missing(self) -> int:
        return self.all & ~self.have

    @property
    def held(self) -> int:
        return self.have.bit_count()

    def in_endgame(self) -> bool:
        # Without the properties: runs for every peer a decision visits (via _limit).
        return self.have != self.all and self.all & ~self.have & ~self.pending_bits == 0

    # --- events -----------------------------------------------------------------------

    def add_peer(
        self, peer_id: str, *, zone: str = "", is_seeder: bool = False, have: int = 0
    ) -> None:
        """A neighbour joined (or re-sent its whole bitfield)."""
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = PeerState(peer_id, zone, is_seeder)
            peer.corrupt, banned_until = self.bans.get(peer_id, (0, 0.0))
            peer.hold(banned_until=banned_until)
            self.holds.recheck(peer)
        self._set_have(peer, have & self.all)

    def remove_peer(self, peer_id: str) -> list[Request]:
        """A neighbour left; its outstanding requests are returned for the driver to cancel."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return []
        self.holds.remove(peer_id)
        self.withholding.pop(peer_id, None)
        if peer.corrupt:
            self.bans[peer_id] = (peer.corrupt, peer.banned_until)
        self._set_have(peer, 0)
        return [self._drop(peer_id, i) for i in list(peer.inflight)]

    def peer_has(self, peer_id: str, index: int, now: float) -> bool:
        """A neighbour announced one new chunk (the commonest event of all: kept short).

        True when the news could change the next decision or wake-up: only if we lack
        the chunk and have a request slot free, and either the peer can be asked now, or
        it is held off and held nothing else we lack: then no wake-up is set for the end
        of its hold yet. Drivers skip a decision otherwise: a node hears of every chunk
        each neighbour stores, and most of that news finds every slot taken."""
        peer = self.peers.get(peer_id)
        if peer is None or not 0 <= index < self.n:
            return False
        bit = 1 << index
        if not peer.have & bit:
            peer.have |= bit
            if not peer.is_seeder:
                self.availability[index] += 1
        if self.have & bit or self._free() <= 0:
            return False
        return now >= peer.ready_at or not peer.have & ~bit & self.missing

    def read_order(self, index: int) -> int:
        """Which of the transfers under way to read first, lowest first (the driver's
        ingress cap decides when several wait): the chunk fewest neighbours hold, as
        the picker ranks them. That one is whole, and passed on, a chunk time sooner
        than if both were read at half rate; the common one waits in socket buffers.
        bench/sim.py, 4 MiB, N=1,000: p50 over T_min 1.317 against 1.363."""
        return self.availability[index]

    def peer_busy(self, peer_id: str, seconds: float, now: float) -> None:
        """A neighbour announced that all its upload slots are taken for about `seconds`
        (on its have-stream, as an upload starts): not asked until then, so no request
        is spent on a "busy" answer the neighbour has already given to everyone."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.busy_for(seconds, now, self.config.penalties, self.rng)

    def mark_have(self, index: int) -> list[Request]:
        """We hold chunk `index` (from any source): requests still out for it are returned."""
        self.have |= 1 << index
        return [self._drop(pid, index) for pid in list(self.pending.get(index, {}))]

    def on_received(self, peer_id: str, index: int, now: float) -> list[Request]:
        """A verified chunk arrived; returns the duplicate requests to cancel (endgame)."""
        if peer_id in self.pending.get(index, {}):
            req = self._drop(peer_id, index)
            peer = self.peers.get(peer_id)
            if peer is not None:
                peer.record_success(self.sizes[index], now - req.sent)
        return self.mark_have(index)

    def on_progress(self, peer_id: str, index: int, now: float) -> None:
        """Bytes of a requested chunk arrived: the transfer is alive."""
        if peer_id in self.pending.get(index, {}):
            self.progress[(peer_id, index)] = now

    def on_failed(
        self,
        peer_id: str,
        index: int,
        reason: Failure,
        now: float,
        retry_after: float | None = None,
    ) -> None:
        """A request failed; `retry_after` is a busy peer's own estimate of its next free slot."""
        if peer_id in self.pending.get(index, {}):
            self._drop(peer_id, index)
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        if reason is Failure.MISSING:
            self._set_have(peer, peer.have & ~(1 << index))
        elif reason is Failure.DEFERRED:
            peer.withheld[index] = now + self.config.penalties.defer_seconds
            self.withholding[peer_id] = peer
        peer.record_failure(reason, now, self.config.penalties, self.rng, retry_after)
        self.holds.recheck(peer)  # a new backoff may end sooner than a busy hold

    def expire(self, now: float) -> list[Request]:
        """Requests past their deadline: counted as timeouts and returned for cancelling.

        Except a transfer still moving (progress within `stall_idle`) from the only
        usable holder of its chunk: cancelling it could only start the same bytes over
        from the same peer. That is the seeder shared by many nodes, in a central pull
        or before the swarm holds a chunk, where a slow transfer is not a broken one.
        """
        late = [
            r
            for reqs in self.pending.values()
            for r in reqs.values()
            if r.deadline <= now and not (self._moving(r, now) and self._sole_source(r, now))
        ]
        for r in late:
            self.on_failed(r.peer_id, r.index, Failure.TIMEOUT, now)
        return late

    def _moving(self, r: Request, now: float) -> bool:
        seen = self.progress.get((r.peer_id, r.index))
        return seen is not None and now - seen < self.config.stall_idle

    def _sole_source(self, r: Request, now: float) -> bool:
        bit = 1 << r.index
        return not any(
            p.have & bit and p.usable(now) for p in self.peers.values() if p.peer_id != r.peer_id
        )

    # --- decisions --------------------------------------------------------------------

    def next_requests(self, now: float) -> list[Request]:
        """Requests to send now, filling free slots of the best usable peers.

        Peers are visited best first (see `preference`, random within a rank), drawn
        lazily: a node with one free slot and eighty neighbours usually needs one or
        two of them, and this runs after every busy answer. Held-off peers are not
        visited at all (see `Holds`).
        """
        cfg = self.config
        stalled = [
            r for reqs in self.pending.values() for r in reqs.values() if self._stalled_at(r) <= now
        ]
        self.stalled = len(stalled)
        stuck = {r.peer_id for r in stalled}  # as good as busy: do not count on them
        if self.complete or self._free() <= 0:
            return []
        missing = self.missing
        ranks: dict[tuple[bool, bool, int], list[PeerState]] = {}
        reachable = 0
        for p in self.holds.usable(now):
            if p.have & missing:
                if not p.is_seeder and p.peer_id not in stuck:
                    reachable |= p.have
                ranks.setdefault(preference(p, cfg.my_zone), []).append(p)
        usable: list[PeerState] = []  # in the order visited, for the later passes
        out: list[Request] = []
        for p in self._best_first(ranks):
            usable.append(p)
            if not p.is_seeder:
                self._fill(p, p.have & self.missing & ~self.pending_bits, now, out)
            if self._free() <= 0:
                return out  # every pass below needs a free slot
        for p in usable:
            if p.is_seeder:
                wanted = p.have & self.missing & ~self.pending_bits & ~reachable
                self._fill(p, wanted & ~p.withheld_bits(now), now, out)
        if self.in_endgame():
            late = self._late(now)
            # Peers whose last request failed (timed out, reset) hedge last, after a seeder:
            # else silent neighbours claiming the last chunk, hedged to in turn as their
            # backoffs end, kept it from the seeder for ever (tests/test_scheduler.py).
            for p in sorted(usable, key=lambda p: p.failures > 0):
                if self._free() <= 0:
                    break
                # Not a chunk the peer deferred: asked again at once, a seeder would answer
                # "deferred" again, as fast as the round trip allows.
                hedge = late & p.have & ~bitfield.from_indexes(p.inflight) & ~p.withheld_bits(now)
                self._fill(p, hedge, now, out)
                late = self._late(now)
        return out

    def _best_first(
        self, ranks: dict[tuple[bool, bool, int], list[PeerState]]
    ) -> Iterator[PeerState]:
        """Every peer of `ranks`, best rank first, in random order within a rank; drawn as
        needed (a lazy Fisher-Yates), so stopping early costs nothing for the rest."""
        for key in sorted(ranks):
            group = ranks[key]
            while group:
                j = self.rng.randrange(len(group))
                group[j], group[-1] = group[-1], group[j]
                yield group.pop()

    def _hedge_at(self, index: int) -> float:
        """When the requests for `index` count as late enough to duplicate."""
        cfg = self.config
        at = []
        for r in self.pending[index].values():
            peer = self.peers.get(r.peer_id)
            rate = peer.rate if peer is not None else 0.0
            expected = cfg.endgame_slack * self.sizes[index] / rate if rate > 0 else 0.0
            at.append(r.sent + max(cfg.endgame_wait, expected))
        return min(at)

    def _late(self, now: float) -> int:
        limit = self.config.endgame_duplicates
        late = 0
        for i, reqs in self.pending.items():
            if len(reqs) < limit and self._hedge_at(i) <= now:
                late |= 1 << i
        return late

    def next_wakeup(self, now: float) -> float | None:
        """The earliest future moment something changes without an event: a deadline, a
        backoff ending, a request turning late enough to hedge."""
        times: list[float] = []
        for reqs in self.pending.values():  # runs on every wake-up: no generators
            for r in reqs.values():
                times += (r.deadline, self._stalled_at(r))
        if self._free() > 0:
            # Backoffs and deferrals matter only while a request slot is free; a stalled
            # request frees its slot, so the node must wake for them then too.
            missing = self.missing
            if self.in_endgame():
                limit = self.config.endgame_duplicates
                times += [self._hedge_at(i) for i, r in self.pending.items() if len(r) < limit]
            ready = self.holds.next_ready(now, missing)
            if ready is not None:
                times.append(ready)
            for p in list(self.withholding.values()):
                if not p.withheld:
                    del self.withholding[p.peer_id]
                times += [t for i, t in p.withheld.items() if bitfield.has(missing, i)]
        future = [t for t in times if t > now]
        return min(future) if future else None

    # --- internals --------------------------------------------------------------------

    def _free(self) -> int:
        """Request slots free in all (stalled requests do not hold theirs)."""
        return self._limit() - self.inflight + self.stalled

    def _limit(self) -> int:
        """Requests allowed in flight now (see SchedulerConfig.max_inflight, first_chunks)."""
        cfg = self.config
        if self.in_endgame():
            return max(cfg.max_inflight, cfg.endgame_duplicates)  # room for a hedge
        if self.held >= cfg.first_chunks:
            return cfg.max_inflight
        if self.stalled:
            # One at a time lands the first chunk sooner only if that one moves; tried one
            # by one, silent peers would cost a stall allowance each before any progress.
            return cfg.max_inflight
        return 1

    def _slots(self, peer: PeerState) -> int:
        cfg = self.config
        per_peer = cfg.per_seeder_inflight if peer.is_seeder else cfg.per_peer_inflight
        return min(per_peer - len(peer.inflight), self._free())

    def _stalled_at(self, r: Request) -> float:
        """When request `r` counts as stalled (see SchedulerConfig.stall_slack)."""
        cfg = self.config
        seen = self.progress.get((r.peer_id, r.index))
        if seen is not None:
            return seen + cfg.stall_idle
        peer = self.peers.get(r.peer_id)
        rate = peer.rate if peer is not None else 0.0
        if rate <= 0:
            return r.sent + cfg.stall_unmeasured
        return r.sent + max(cfg.stall_floor, cfg.stall_slack * self.sizes[r.index] / rate)

    def _fill(self, peer: PeerState, candidates: int, now: float, out: list[Request]) -> None:
        while candidates and self._slots(peer) > 0:
            i = self.picker.pick(candidates, self.availability, self.held, self.rng)
            candidates &= ~(1 << i)
            out.append(self._issue(peer, i, now))

    def _issue(self, peer: PeerState, index: int, now: float) -> Request:
        cfg = self.config
        timeout = cfg.timeout_base + self.sizes[index] / cfg.timeout_min_rate
        req = Request(peer.peer_id, index, now, now + timeout)
        self.pending.setdefault(index, {})[peer.peer_id] = req
        self.pending_bits |= 1 << index
        peer.inflight.add(index)
        self.inflight += 1
        return req

    def _drop(self, peer_id: str, index: int) -> Request:
        reqs = self.pending[index]
        req = reqs.pop(peer_id)
        self.progress.pop((peer_id, index), None)
        if not reqs:
            del self.pending[index]
            self.pending_bits &= ~(1 << index)
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.inflight.discard(index)
        self.inflight -= 1
        return req

    def _set_have(self, peer: PeerState, have: int) -> None:
        if not peer.is_seeder:
            for i in bitfield.iter_set(have & ~peer.have):
                self.availability[i] += 1
            for i in bitfield.iter_set(peer.have & ~have):
                self.availability[i] -= 1
        peer.have = have
