"""The tracker: who is in each image's swarm. Soft state, rebuilt from announces.

Nothing durable depends on it: a restarted seeder forgets every member and learns
them again from the next announces, which every node sends on a short interval.
No I/O and no clock of its own: `now` is passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_TTL = 30.0
DEFAULT_SAMPLE = 30


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


class Tracker:
    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        sample: int = DEFAULT_SAMPLE,
        rng: random.Random | None = None,
    ) -> None:
        self.ttl = ttl
        self.sample = sample
        self.rng = rng or random.Random()
        self.swarms: dict[str, dict[str, Member]] = {}

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
        swarm = self.swarms.setdefault(image, {})
        swarm[node_id] = Member(node_id, address, zone, have, total, is_seeder, now + self.ttl)
        return self.peers(image, node_id, zone, now)

    def leave(self, image: str, node_id: str) -> None:
        swarm = self.swarms.get(image)
        if swarm is not None:
            swarm.pop(node_id, None)
            if not swarm:
                del self.swarms[image]

    def peers(self, image: str, node_id: str, zone: str, now: float) -> list[Member]:
        """At most `sample` live members other than `node_id`: same zone first, seeders last.

        Within each group the order is random, so that a thousand nodes joining at
        once do not all pick the same neighbours.
        """
        swarm = self.swarms.get(image, {})
        for gone in [k for k, m in swarm.items() if m.expires <= now]:
            del swarm[gone]
        others = [m for m in swarm.values() if m.node_id != node_id]
        self.rng.shuffle(others)
        others.sort(key=lambda m: (m.is_seeder, m.zone != zone))
        return others[: self.sample]

    def expire(self, now: float) -> None:
        for image in list(self.swarms):
            swarm = self.swarms[image]
            for node_id in [k for k, m in swarm.items() if m.expires <= now]:
                del swarm[node_id]
            if not swarm:
                del self.swarms[image]

    def __len__(self) -> int:
        return sum(len(s) for s in self.swarms.values())
