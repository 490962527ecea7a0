"""The fan-out bench's workload plans, bounds and CDF picture, without starting a process.

No timing here: only that a repave plan is what the bench says it runs (selectors
that give each node its set, a shared base that dedupes, a bound that reduces to
T_min for an equal fleet) and that the CDF writer produces a PNG.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster import MIB, fleet_bound, t_min, tree_digests
from bench.workload import BASE_FILE, build, image_name, write_trees, zipf_counts


def test_zipf_counts_start_at_the_whole_fleet_and_never_reach_zero() -> None:
    assert zipf_counts(16, 5, 1.0) == [16, 8, 5, 4, 3]
    assert zipf_counts(3, 6, 2.0) == [3, 1, 1, 1, 1, 1]


def test_fleet_bound_of_equal_nodes_is_kumar_ross() -> None:
    ids = [f"n{i}" for i in range(16)]
    for up in (10 * MIB, MIB):
        b = fleet_bound(
            dict.fromkeys(ids, 256 * MIB),
            dict.fromkeys(ids, 10 * MIB),
            dict.fromkeys(ids, up),
            10 * MIB,
            256 * MIB,
        )
        assert b.seconds == pytest.approx(t_min(256 * MIB, 16, 10 * MIB, up, 10 * MIB))


def test_a_late_node_bounds_the_fleet_from_its_own_start() -> None:
    b = fleet_bound(
        {"a": 100, "b": 100}, {"a": 10, "b": 10}, {"a": 10, "b": 10}, 100, 100, {"b": 5}
    )
    assert b.binding == "node"
    assert b.seconds == pytest.approx(15.0)


def test_repave_plan_gives_every_node_its_set_through_selectors(tmp_path: Path) -> None:
    wl = build(
        nodes=8,
        rate=10 * MIB,
        size=2 * MIB,
        repave=True,
        images=4,
        base=MIB,
        slow_fraction=0.25,
        late_fraction=0.25,
        late_at=3.0,
    )
    assert [len(wl.holders(n)) for n in wl.images] == zipf_counts(8, 4, 1.0)
    assert {n.zone for n in wl.nodes} == {"a", "b"}
    assert sum(n.slow for n in wl.nodes) == 2 and sum(n.late for n in wl.nodes) == 2
    rules = wl.rules(late=False) + wl.rules(late=True)
    for node in wl.nodes:
        # The images whose selector matches this node's labels are exactly its set.
        matched = {
            name
            for name, selector in rules
            if all(
                node.labels.get(k) == v for k, v in (kv.split("=") for kv in selector.split(","))
            )
        }
        assert matched == set(node.images)
        assert node.need == MIB + MIB * len(node.images)  # the base once, then each layer
        assert node.start == (3.0 if node.late else 0.0)
    assert wl.unique_bytes == MIB + 4 * MIB
    assert wl.bound().seconds >= max(n.start + n.own_bound for n in wl.nodes)

    write_trees(wl, tmp_path, files=3, seed=7)
    digests = [tree_digests(wl.trees[image_name(i)].root) for i in range(4)]
    bases = {d[BASE_FILE.as_posix()] for d in digests}
    assert len(bases) == 1  # the same base bytes in every image: its chunks dedupe
    layers = [d["layers/01.bin"] for d in digests]
    assert len(set(layers)) == 4  # and every image's own layer differs
    assert all(t.total_bytes == 2 * MIB for t in wl.trees.values())


def test_cdf_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.cdf import write_cdf

    out = write_cdf(
        tmp_path / "cdf.png", {"p2p": [1.0, 2.0, 2.5], "central": [4.0, 6.0]}, 2.0, "N=3"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "No such file or directory"),
        ("not json", "not JSON"),
        ("[1, 2]", "not a bench.fanout result"),
        ('{"modes": {"p2p": {}}}', "not a bench.fanout result"),
    ],
)
def test_cdf_names_a_bad_result_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, error: str
) -> None:
    from bench.cdf import main

    path = tmp_path / "fanout.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        main([str(path)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bench.cdf: {path}: ") and error in err
    assert len(err.strip().splitlines()) == 1
    assert not path.with_suffix(".png").exists()
