"""Which neighbours are held off (busy, backing off, banned) and until when.

A node hears of every upload each of its neighbours starts, and holds the neighbour
off until that upload ends, so at any moment most of its eighty neighbours are held
(bench/sim.py, N=300: 82% of the neighbours a decision looked at). A decision needs
only the others: this index keeps them apart, so a decision visits those alone and
the next wake-up is read off a heap instead of a scan of every neighbour.

Holds only ever lengthen without the index hearing of it (`PeerState.busy_for`):
a peer found held when the ready ones are listed moves to the heap, keyed by its
`ready_at` then; one found still held when its key comes due is pushed again. A
hold that may have shortened (a failure sets a new backoff) must be reported with
`recheck`.
"""

from __future__ import annotations

import heapq
import math

from distd.swarm.peers import PeerState


class Holds:
    def __init__(self) -> None:
        self.ready: dict[str, PeerState] = {}  # not held as of the last `usable`
        self._heap: list[tuple[float, int, PeerState]] = []  # (ready_at then, seq, peer)
        self._live: dict[str, int] = {}  # peer id -> seq of its one current heap entry
        self._seq = 0

    def recheck(self, peer: PeerState) -> None:
        """A new peer, or one whose hold may have shortened."""
        self._live.pop(peer.peer_id, None)  # its heap entry, if any, goes stale
        self.ready[peer.peer_id] = peer

    def remove(self, peer_id: str) -> None:
        self.ready.pop(peer_id, None)
        self._live.pop(peer_id, None)

    def usable(self, now: float) -> list[PeerState]:
        """The peers not held at `now`, in a stable order."""
        heap, live, ready = self._heap, self._live, self.ready
        while heap and heap[0][0] <= now:
            _, seq, p = heapq.heappop(heap)
            if live.get(p.peer_id) != seq:
                continue
            del live[p.peer_id]
            if now >= p.ready_at:
                ready[p.peer_id] = p
            else:
                self._push(p)  # held again since it was pushed
        out: list[PeerState] = []
        held: list[PeerState] = []
        for p in ready.values():
            (out if now >= p.ready_at else held).append(p)
        for p in held:
            del ready[p.peer_id]
            self._push(p)
        return out

    def next_ready(self, now: float, wanted: int) -> float | None:
        """The earliest moment after `now` a held peer holding any of `wanted` is free."""
        best = math.inf
        for p in self.ready.values():
            if p.ready_at > now and p.have & wanted:
                best = min(best, p.ready_at)
        heap, live = self._heap, self._live
        # Visit the heap in key order (a heap of positions in it); a key is the peer's
        # ready_at when pushed, never later than its ready_at now, so once a key
        # reaches the best found, nothing further can beat it.
        frontier = [(heap[0][0], 0)] if heap else []
        while frontier:
            key, i = heapq.heappop(frontier)
            if key >= best:
                break
            _, seq, p = heap[i]
            if live.get(p.peer_id) == seq and p.ready_at > now and p.have & wanted:
                best = min(best, p.ready_at)
            for c in (2 * i + 1, 2 * i + 2):
                if c < len(heap):
                    heapq.heappush(frontier, (heap[c][0], c))
        return None if best == math.inf else best

    def _push(self, peer: PeerState) -> None:
        self._seq += 1
        self._live[peer.peer_id] = self._seq
        heapq.heappush(self._heap, (peer.ready_at, self._seq, peer))
