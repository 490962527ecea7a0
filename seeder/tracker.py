"""The tracker: who is in each image's swarm. Soft state, rebuilt from announces.

Nothing durable depends on it: a restarted seeder forgets every member and learns
them again from the next announces, which every node sends on a short interval.
No I/O and no clock of its own: `now` is passed in.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

DEFAULT_TTL = 30.0
DEFAULT_SAMPLE = 30
# A fifth of an answer comes from other zones when they have members. Same zone only,
# a fleet in two zones split into two swarms as soon as each zone had `sample`
# members: joined only through the first few dozen nodes, whose early answers had
# mixed zones, and through the seeder, which hands each chunk out once to one zone.
# bench/sim.py, two zones, N=1,000, seeds 1 and 2: max over T_min 1.288 and 1.286
# against 1.332 and 1.332; one zone gives 1.287. Peer choice still prefers the
# same zone (`peers.preference`), so the far ones carry what the near ones lack.
DEFAULT_FAR_SHARE = 0.2


@dataclass(slots=True)
class Member:
    node_id: str
    address: str
    zone: str
    have: int
    total: int
    is_seeder: bool
    expires: float

    def public(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "zone": self.zone,
            "have": self.have,
            "total": self.total,
            "seeder": self.is_seeder,
        }


class _Swarm:
    """One image's members, with each zone's non-seeders in a list for O(k) random samples.

    A list per zone, and each member's position in it, make adding and removing O(1)
    (the last id moves into the hole) and let `random.sample` draw k members without
    copying or shuffling the whole swarm.
    """

    __slots__ = ("index", "members", "seeders", "swept", "zones")

    def __init__(self, now: float) -> None:
        self.members: dict[str, Member] = {}
        self.zones: dict[str, list[str]] = {}  # zone -> ids of its non-seeder members
        self.index: dict[str, int] = {}  # id -> position in its zone's list
        self.seeders: list[str] = []
        self.swept = now

    def add(self, m: Member) -> None:
        old = self.members.get(m.node_id)
        self.members[m.node_id] = m
        if old is not None and (old.zone, old.is_seeder) == (m.zone, m.is_seeder):
            return
        if old is not None:
            self._unlist(old)
        if m.is_seeder:
            self.seeders.append(m.node_id)
        else:
            ids = self.zones.setdefault(m.zone, [])
            self.index[m.node_id] = len(ids)
            ids.append(m.node_id)

    def _unlist(self, m: Member) -> None:
        if m.is_seeder:
            self.seeders.remove(m.node_id)
            return
        ids = self.zones[m.zone]
        i = self.index.pop(m.node_id)
        last = ids.pop()
        if i < len(ids):
            ids[i] = last
            self.index[last] = i
        if not ids:
            del self.zones[m.zone]

    def remove(self, node_id: str) -> None:
        m = self.members.pop(node_id, None)
        if m is not None:
            self._unlist(m)

    def sweep(self, now: float) -> None:
        for node_id in [k for k, m in self.members.items() if m.expires <= now]:
            self.remove(node_id)
        self.swept = now


class Tracker:
    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        sample: int = DEFAULT_SAMPLE,
        rng: random.Random | None = None,
        far_share: float = DEFAULT_FAR_SHARE,
    ) -> None:
        self.ttl = ttl
        self.sample = sample
        self.far = int(sample * far_share)  # places kept for other zones' members
        self.rng = rng or random.Random()
        self.swarms: dict[str, _Swarm] = {}

    def announce(
        self,
        image: str,
        node_id: str,
        address: str,
        *,
        zone: str = "",
        have: int = 0,
        total: int = 0,
        is_seeder: bool = False,
        now: float,
    ) -> list[Member]:
        """Record the announcing node and answer with a sample of the others."""
        swarm = self.swarms.get(image)
        if swarm is None:
            swarm = self.swarms[image] = _Swarm(now)
        swarm.add(Member(node_id, address, zone, have, total, is_seeder, now + self.ttl))
        return self.peers(image, node_id, zone, now)

    def leave(self, image: str, node_id: str) -> None:
        swarm = self.swarms.get(image)
        if swarm is not None:
            swarm.remove(node_id)
            if not swarm.members:
                del self.swarms[image]

    def peers(self, image: str, node_id: str, zone: str, now: float) -> list[Member]:
        """At most `sample` live members other than `node_id`: same zone first, seeders last,
        and a share of other zones' members (`DEFAULT_FAR_SHARE`) when there are any.

        Within each group the order is random, so that a thousand nodes joining at
        once do not all pick the same neighbours. Costs O(sample), not O(swarm): the
        swarm is swept of expired members once per `ttl`, and at once if a draw meets one.
        """
        swarm = self.swarms.get(image)
        if swarm is None:
            return []
        if now - swarm.swept >= self.ttl:
            swarm.sweep(now)
        got = self._draw(swarm, node_id, zone)
        if any(m.expires <= now for m in got):
            swarm.sweep(now)
            got = self._draw(swarm, node_id, zone)
        return got

    def _draw(self, swarm: _Swarm, node_id: str, zone: str) -> list[Member]:
        want = self.sample
        near = swarm.zones.get(zone, [])
        far = [z for key, z in swarm.zones.items() if key != zone]
        keep = min(self.far, sum(len(z) for z in far))
        ids = self._pick([near], want - keep, node_id)
        if len(ids) < want:
            ids += self._pick(far, want - len(ids), node_id)
        out = [swarm.members[i] for i in ids]
        if len(out) < want and swarm.seeders:
            seeds = [swarm.members[i] for i in swarm.seeders if i != node_id]
            self.rng.shuffle(seeds)
            seeds.sort(key=lambda m: m.zone != zone)
            out += seeds[: want - len(out)]
        return out

    def _pick(self, lists: list[list[str]], k: int, exclude: str) -> list[str]:
        """Up to `k` ids, uniformly at random and in random order, from the concatenation of
        `lists` (without `exclude`), in O(k + len(lists)) when the lists are longer."""
        total = sum(len(ids) for ids in lists)
        if total <= k + 1:
            pool = [i for ids in lists for i in ids if i != exclude]
            self.rng.shuffle(pool)
            return pool[:k]
        if len(lists) == 1:
            picked = self.rng.sample(lists[0], k + 1)
        else:
            starts = list(itertools.accumulate((len(ids) for ids in lists), initial=0))
            picked = []
            for n in self.rng.sample(range(total), k + 1):
                j = bisect.bisect_right(starts, n) - 1
                picked.append(lists[j][n - starts[j]])
        return [i for i in picked if i != exclude][:k]

    def expire(self, now: float) -> None:
        for image in list(self.swarms):
            swarm = self.swarms[image]
            swarm.sweep(now)
            if not swarm.members:
                del self.swarms[image]

    def __len__(self) -> int:
        return sum(len(s.members) for s in self.swarms.values())
