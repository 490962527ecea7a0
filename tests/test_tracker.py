"""The tracker's soft state: sampling order, expiry, bounds."""

from __future__ import annotations

import random

from hypothesis import example, given
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


def test_other_zones_keep_a_share_of_the_answer() -> None:
    """A zone never becomes a swarm of its own: a fifth of each answer is from the other
    zones, listed after the same zone's members, whatever the zones' sizes."""
    t = Tracker(sample=30, rng=random.Random(2))
    for i in range(200):
        t.announce("img", f"a{i}", f"a{i}:1", zone="a", now=0)
    for i in range(100):
        t.announce("img", f"b{i}", f"b{i}:1", zone="b" if i % 2 else "c", now=0)
    zones = [m.zone for m in t.peers("img", "a0", "a", now=1)]
    assert zones[:24] == ["a"] * 24 and sorted(set(zones[24:])) == ["b", "c"]
    assert len(zones) == 30
    for i in range(2, 100):
        t.leave("img", f"b{i}")  # two far members left: both in every answer, near fills
    zones = [m.zone for m in t.peers("img", "a0", "a", now=1)]
    assert zones[:28] == ["a"] * 28 and sorted(zones[28:]) == ["b", "c"]
    only_near = Tracker(sample=30, far_share=0.0)
    for i in range(40):
        only_near.announce("img", f"n{i}", "h:1", zone="ab"[i >= 35], now=0)
    assert {m.zone for m in only_near.peers("img", "n0", "a", now=1)} == {"a"}


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


_ops = st.lists(
    st.tuples(
        st.sampled_from(["announce", "announce", "announce", "leave", "peers"]),
        st.integers(0, 25),  # node
        st.sampled_from(["", "a", "b"]),  # zone
        st.booleans(),  # seeder (rarely kept: see below)
        # time step: mostly short, so that swarms grow past the sample and zones compete
        st.one_of(st.floats(0, 0.2), st.floats(0, 4)),
    ),
    max_size=120,
)


# A zone larger than the sample beside a small one: the far share must be kept.
@example(
    [("announce", i, "a", False, 0.0) for i in range(7)]
    + [("announce", 9, "b", False, 0.0), ("peers", 0, "a", False, 0.0)],
    5,
    1,
)
@given(_ops, st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_sample_matches_a_model_of_the_swarm(
    ops: list[tuple[str, int, str, bool, float]], sample: int, seed: int
) -> None:
    """Whatever the sequence of announces, zone and role changes, departures and expiries:
    the sample is the live others, same zone first, seeders last, each group as full as
    the sample allows once the other zones have their share."""
    t = Tracker(ttl=10, sample=sample, rng=random.Random(seed))
    model: dict[str, tuple[str, bool, float]] = {}  # node -> (zone, seeder, expires)
    now = 0.0
    for op, n, zone, seeder, step in ops:
        now += step
        node = f"n{n}"
        seeder = seeder and n % 5 == 0
        if op == "announce":
            got = t.announce("img", node, f"h:{n}", zone=zone, is_seeder=seeder, now=now)
            model[node] = (zone, seeder, now + 10)
        elif op == "leave":
            t.leave("img", node)
            model.pop(node, None)
            continue
        else:
            got = t.peers("img", node, zone, now)
        live = {k: v for k, v in model.items() if v[2] > now and k != node}

        def group(k: str, zone: str = zone, live: dict[str, tuple[str, bool, float]] = live) -> int:
            z, s, _ = live[k]
            return 2 * s + (z != zone)

        ids = [m.node_id for m in got]
        assert len(ids) == len(set(ids)) == min(sample, len(live))
        assert set(ids) <= set(live)
        groups = [group(k) for k in ids]
        assert groups == sorted(groups)
        size = [sum(1 for k in live if group(k) == g) for g in range(4)]
        near = min(size[0], sample - min(t.far, size[1]))
        assert groups.count(0) == near
        assert groups.count(1) == min(size[1], sample - near)
        if 3 in groups:
            assert groups.count(2) == size[2]
    t.expire(now)
    assert len(t) == sum(1 for v in model.values() if v[2] > now)


def test_sample_is_uniform_within_a_group() -> None:
    t = Tracker(sample=3, rng=random.Random(7))
    for i in range(10):
        t.announce("img", f"n{i}", f"h:{i}", zone="a", now=0)
    counts = dict.fromkeys((f"n{i}" for i in range(10)), 0)
    for _ in range(3000):
        for m in t.peers("img", "x", "a", now=1):
            counts[m.node_id] += 1
    assert all(800 < c < 1000 for c in counts.values()), counts
