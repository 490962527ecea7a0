"""Fleet workloads for the fan-out bench beyond "N equal nodes, one image, all at once".

A workload says, before any process starts, which node holds which images, at which
caps, from which instant, and so what the floor on its time to fleet ready is. The
fan-out bench runs it on a real Cluster; a test builds one without any process.

- mixed fleet: one image for every node, a share of the nodes at half rate (up and
  down) and a share that gets its assignment `late_at` seconds after the rest;
- repave: N nodes in two zones and K images that share a base (the same bytes, so the
  same chunks, in every image) plus layers of their own; image i (from 0) goes to about
  N/(i+1)^s nodes (Zipf-like popularity; image 0 to every node), so nodes need different
  sets, and every node starts empty at once. Slow and late nodes combine with it.

Assignments go through label selectors, as an operator's would: a node carries
`img<i>=1` for each image it must hold and `wave=0` (or `wave=1` when late), and each
image is assigned to `img<i>=1,wave=<w>`.
"""

from __future__ import annotations

import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import (
    DEFAULT_LABELS,
    Bound,
    ImageTree,
    NodeSpec,
    fleet_bound,
    make_random_tree,
    split_sizes,
    write_random_file,
)

ZONES = ("a", "b")
BASE_FILE = Path("base") / "rootfs.img"


@dataclass
class NodePlan:
    """One daemon of the workload: where it is, how fast, what it needs and from when."""

    node_id: str
    zone: str
    up: int
    down: int
    start: float
    images: list[str]
    need: int
    slow: bool = False
    late: bool = False

    @property
    def labels(self) -> dict[str, str]:
        out = {**DEFAULT_LABELS, "wave": "1" if self.late else "0"}
        if self.zone:
            out["zone"] = self.zone
        out.update({f"img{image_index(name)}": "1" for name in self.images})
        return out

    @property
    def own_bound(self) -> float:
        """Seconds this node needs at least once it has its assignment: need / its download cap."""
        return self.need / self.down

    def spec(self) -> NodeSpec:
        return NodeSpec(self.labels, self.zone, self.up, self.down)

    def kind(self) -> str:
        return "+".join(k for k, on in (("slow", self.slow), ("late", self.late)) if on) or "-"


@dataclass
class Workload:
    """The whole plan: images (name -> bytes of its own layers), nodes, caps, the shared base."""

    kind: str  # "mixed" or "repave"
    rate: int
    seed_rate: int
    base: int
    layers: dict[str, int]
    nodes: list[NodePlan]
    late_at: float = 0.0
    zipf: float = 0.0
    trees: dict[str, ImageTree] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        return list(self.layers)

    @property
    def unique_bytes(self) -> int:
        """Distinct bytes over every image: what the seeder must send at least once."""
        return self.base + sum(self.layers.values())

    @property
    def needed_bytes(self) -> int:
        return sum(n.need for n in self.nodes)

    def holders(self, name: str) -> list[NodePlan]:
        return [n for n in self.nodes if name in n.images]

    def rules(self, late: bool) -> list[tuple[str, str]]:
        """(name, selector) to assign at the start (late=False) or at `late_at` (late=True)."""
        wave = "1" if late else "0"
        out = []
        for name in self.images:
            if any(n.late == late for n in self.holders(name)):
                out.append((name, f"img{image_index(name)}=1,wave={wave}"))
        return out

    def wants(self) -> dict[str, dict[str, str | None]]:
        return {n.node_id: {name: None for name in n.images} for n in self.nodes}

    def bound(self) -> Bound:
        """The p2p floor (see `fleet_bound`): node, seeder and fleet terms."""
        return fleet_bound(
            {n.node_id: n.need for n in self.nodes},
            {n.node_id: n.down for n in self.nodes},
            {n.node_id: n.up for n in self.nodes},
            self.seed_rate,
            self.unique_bytes,
            {n.node_id: n.start for n in self.nodes},
        )

    def central_floor(self) -> float:
        """A lone distributor: every needed byte from the seeder, or the slowest node's own."""
        slowest = max(n.start + n.own_bound for n in self.nodes)
        return max(self.needed_bytes / self.seed_rate, slowest)

    def plan_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base": self.base,
            "layers": self.layers,
            "unique_bytes": self.unique_bytes,
            "needed_bytes": self.needed_bytes,
            "late_at": self.late_at,
            "zipf": self.zipf,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "zone": n.zone,
                    "up": n.up,
                    "down": n.down,
                    "start": n.start,
                    "images": n.images,
                    "need": n.need,
                    "own_bound": n.own_bound,
                    "slow": n.slow,
                    "late": n.late,
                    "labels": n.labels,
                }
                for n in self.nodes
            ],
        }


def image_name(i: int) -> str:
    return f"bench/repave-{i}:v1"


def image_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1].split(":", 1)[0])


def zipf_counts(nodes: int, images: int, s: float) -> list[int]:
    """How many nodes hold image i: round(N / (i+1)^s), at least 1 (image 0: every node)."""
    return [max(1, min(nodes, round(nodes / (i + 1) ** s))) for i in range(images)]


def pick(nodes: int, fraction: float, rng: random.Random) -> set[int]:
    """round(fraction * N) node indices, drawn by `rng` (so a seed gives the same fleet)."""
    k = max(0, min(nodes, round(fraction * nodes)))
    return set(rng.sample(range(nodes), k))


def build(
    *,
    nodes: int,
    rate: int,
    size: int,
    repave: bool,
    images: int = 5,
    base: int | None = None,
    zipf: float = 1.0,
    slow_fraction: float = 0.0,
    late_fraction: float = 0.0,
    late_at: float = 0.0,
    seed: int = 1,
    node_prefix: str = "node-",
) -> Workload:
    """The plan for a run (no bytes written, no process started).

    Mixed fleet (`repave=False`): one image of `size` for every node. Repave: `images`
    images of `size` each, `base` of it shared (default half), the rest its own.
    Node ids match what `Cluster` gives (node-01, ...), zones alternate a, b.
    """
    rng = random.Random(seed)
    slow = pick(nodes, slow_fraction, rng)
    late = pick(nodes, late_fraction, rng)
    if repave:
        base_bytes = size // 2 if base is None else base
        if not 0 <= base_bytes <= size:
            raise ValueError(f"the base ({base_bytes} B) must fit in the image ({size} B)")
        layers = {image_name(i): size - base_bytes for i in range(images)}
        holders: list[set[int]] = [
            set(rng.sample(range(nodes), k)) for k in zipf_counts(nodes, images, zipf)
        ]
    else:
        base_bytes = 0
        layers = {image_name(0): size}
        holders = [set(range(nodes))]
    plans = []
    for i in range(nodes):
        names = [name for name, who in zip(layers, holders, strict=True) if i in who]
        need = (base_bytes if names else 0) + sum(layers[n] for n in names)
        div = 2 if i in slow else 1
        plans.append(
            NodePlan(
                node_id=f"{node_prefix}{i + 1:02d}",
                zone=ZONES[i % len(ZONES)] if repave else "",
                up=rate // div,
                down=rate // div,
                start=late_at if i in late else 0.0,
                images=names,
                need=need,
                slow=i in slow,
                late=i in late,
            )
        )
    return Workload(
        kind="repave" if repave else "mixed",
        rate=rate,
        seed_rate=rate,
        base=base_bytes,
        layers=layers,
        nodes=plans,
        late_at=late_at if late else 0.0,
        zipf=zipf if repave else 0.0,
    )


def write_trees(wl: Workload, root: Path, files: int = 4, seed: int | None = None) -> None:
    """Write every image's tree below `root` and fill `wl.trees`.

    Mixed fleet: `make_random_tree`, as the default run. Repave: every image holds the
    same `base/rootfs.img` (one file on disk, hard-linked, so identical chunks) and
    `files - 1` layer files of its own random bytes.
    """
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    if wl.kind != "repave":
        (name,) = wl.images
        wl.trees[name] = make_random_tree(
            root / "image", wl.layers[name], files=files, seed=rng.getrandbits(64)
        )
        return
    shared = root / "base.img"
    write_random_file(shared, wl.base, rng)
    for name, own in wl.layers.items():
        tree = root / f"img{image_index(name)}"
        (tree / BASE_FILE).parent.mkdir(parents=True)
        os.link(shared, tree / BASE_FILE)
        for j, n in enumerate(split_sizes(own, max(1, files - 1)), start=1):
            write_random_file(tree / "layers" / f"{j:02d}.bin", n, rng)
        wl.trees[name] = ImageTree.scan(tree)
