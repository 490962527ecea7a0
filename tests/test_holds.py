"""The held-off index agrees with a scan of every peer, whatever order holds come in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from distd.swarm.holds import Holds
from distd.swarm.peers import Failure, PeerState, Penalties

PENALTIES = Penalties()
STEP = st.tuples(
    # Busy news and the passing of time, the commonest events, weighted up.
    st.sampled_from(["busy_news"] * 3 + ["wait"] * 3 + ["busy", "error", "ban", "remove", "add"]),
    st.integers(0, 1),  # which peer
    st.integers(0, 40).map(lambda i: i / 20),  # seconds of the hold, or of time passing
)


@settings(max_examples=500, deadline=None)
@given(st.lists(STEP, min_size=10, max_size=60), st.integers(0, 2**32))
def test_usable_and_next_ready_match_a_full_scan(
    steps: list[tuple[str, int, float]], seed: int
) -> None:
    rng = random.Random(seed)
    holds = Holds()
    peers: dict[str, PeerState] = {}
    now = 0.0
    for what, k, x in steps:
        pid = f"p{k}"
        p = peers.get(pid)
        if what == "add" and p is None:
            p = peers[pid] = PeerState(pid, have=rng.getrandbits(4))
            holds.recheck(p)
        elif what == "remove" and p is not None:
            del peers[pid]
            holds.remove(pid)
        elif what == "wait":
            now += x
        elif p is None or what in ("add", "remove"):
            pass
        elif what == "busy_news":
            p.busy_for(x, now, PENALTIES, rng)  # only lengthens: the index is not told
        else:
            reason = {"busy": Failure.BUSY, "error": Failure.ERROR, "ban": Failure.CORRUPT}[what]
            p.record_failure(reason, now, PENALTIES, rng, retry_after=x if what == "busy" else None)
            holds.recheck(p)  # as the scheduler does after every failure
        wanted = rng.getrandbits(4)
        expect = [q.ready_at for q in peers.values() if q.ready_at > now and q.have & wanted]
        assert holds.next_ready(now, wanted) == (min(expect) if expect else None)
        usable = holds.usable(now)
        assert sorted(q.peer_id for q in usable) == sorted(
            q.peer_id for q in peers.values() if now >= q.ready_at
        )
        assert holds.next_ready(now, wanted) == (min(expect) if expect else None)
