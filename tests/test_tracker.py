"""The tracker's soft state: sampling order, expiry, bounds."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from seeder.tracker import Tracker


def test_same_zone_first_seeders_last_and_self_excluded() -> None:
    t = Tracker(sample=10, rng=random.Random(1))
    t.announce("img", "seed", "s:1", zone="a", is_seeder=True, now=0)
    for i in range(3):
        t.announce("img", f"far{i}", f"f{i}:1", zone="b", now=0)
        t.announce("img", f"near{i}", f"n{i}:1", zone="a", now=0)
    got = [m.node_id for m in t.announce("img", "me", "me:1", zone="a", now=1)]
    assert "me" not in got
    assert set(got[:3]) == {"near0", "near1", "near2"}
    assert set(got[3:6]) == {"far0", "far1", "far2"}
    assert got[6] == "seed"


def test_members_expire_and_swarms_vanish() -> None:
    t = Tracker(ttl=10)
    t.announce("img", "a", "a:1", now=0)
    t.announce("img", "b", "b:1", now=5)
    assert {m.node_id for m in t.peers("img", "x", "", now=9)} == {"a", "b"}
    assert [m.node_id for m in t.peers("img", "x", "", now=12)] == ["b"]
    t.expire(now=20)
    assert len(t) == 0 and t.swarms == {}


@given(st.integers(1, 200), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_sample_is_bounded_distinct_and_live(n: int, sample: int, seed: int) -> None:
    t = Tracker(ttl=10, sample=sample, rng=random.Random(seed))
    for i in range(n):
        t.announce("img", f"n{i}", f"h:{i}", zone="ab"[i % 2], now=i % 20)
    got = t.peers("img", "n0", "a", now=20)
    ids = [m.node_id for m in got]
    assert len(ids) == len(set(ids)) <= sample
    assert "n0" not in ids
    assert all(m.expires > 20 for m in got)
    live = sum(1 for i in range(1, n) if i % 20 > 10)
    assert len(ids) == min(sample, live)
