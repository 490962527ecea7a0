"""End to end with real processes: one seeder and three capped `distd run` daemons.

No timing is asserted (the bench measures that); only that every node gets the
image, that its tree is byte-identical to the pushed one, and that the bench's
cluster library leaves no process behind.
"""

from __future__ import annotations

from pathlib import Path

from bench.cluster import MIB, Cluster, make_random_tree

NAME = "smoke/image:v1"
GENEROUS = 60.0


def test_three_capped_nodes_get_a_byte_identical_tree(tmp_path: Path) -> None:
    tree = make_random_tree(tmp_path / "tree", 6 * MIB, files=3, seed=1)
    with Cluster(tmp_path / "cluster", nodes=3, rate=4 * MIB) as cluster:
        pushed = cluster.push(tree.root, NAME, chunk_size=MIB)
        t0 = cluster.assign(NAME, selector="bench=1")
        times = cluster.wait_ready(NAME, since=t0, timeout=GENEROUS, digest=pushed.digest)
        assert sorted(times) == ["node-01", "node-02", "node-03"]
        cluster.verify(NAME, tree)  # raises TreeMismatch with the differences

        received = cluster.scrape()
        for node_id, m in received.items():
            assert m.chunks_rejected == 0, node_id
            # Every byte of the image came from somewhere: a node never skips a chunk.
            assert m.received >= tree.total_bytes, (node_id, m)
        procs = cluster.procs
        assert all(p.alive() for p in procs)
    assert not any(p.alive() for p in procs)
