"""The simulator: the daemon's scheduler under a flow model must obey the physics it models."""

from __future__ import annotations

import heapq
import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import native
from bench.sim import Flow, SimConfig, Simulation, main, simulate
from distd.swarm.scheduler import Scheduler

MiB = 1 << 20


@settings(max_examples=25, deadline=None)
@given(
    nodes=st.integers(1, 12),
    chunks=st.integers(1, 12),
    upload_slots=st.integers(1, 3),
    max_inflight=st.integers(1, 3),
    slow=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 1000),
)
def test_every_node_finishes_and_none_beats_the_bound(
    nodes: int, chunks: int, upload_slots: int, max_inflight: int, slow: float, seed: int
) -> None:
    cfg = SimConfig(
        nodes=nodes,
        size=chunks * MiB - 12345,
        chunk_size=MiB,
        rate=4 * MiB,
        upload_slots=upload_slots,
        max_inflight=max_inflight,
        slow_fraction=slow,
        seed=seed,
    )
    sim = Simulation(cfg)
    sim.run()
    clients = [n for n in sim.nodes.values() if n is not sim.seeder]
    for n in clients:
        assert n.finished is not None
        # Every byte arrived once at least, and no node is faster than its own link.
        assert n.received_from_seeder + n.received_from_peers >= cfg.size
        assert n.finished - n.joined >= cfg.size / n.down * (1 - 1e-9)
    assert sim.seeder_sent >= cfg.size  # the seeder is the only origin of every chunk
    r = sim.summary()
    assert r["max_ratio"] >= 1 - 1e-9


def test_a_seed_gives_one_result() -> None:
    cfg = SimConfig(nodes=10, size=24 * MiB, chunk_size=MiB, rate=8 * MiB, seed=7)
    a, b = simulate(cfg), simulate(cfg)
    for key in ("p50", "max", "seeder_sent_over_s", "events"):
        assert a[key] == b[key]


@pytest.mark.parametrize("neighbour_holds, first", [(None, 0), (0, 1), (1, 0)])
def test_an_upload_ends_at_the_senders_pace(neighbour_holds: int | None, first: int) -> None:
    """A node is sent two chunks at once; each sender's upload (and its slot) ends after
    size / its own rate, the bytes waiting in socket buffers, as over TCP, where the
    daemon's slot frees when the last byte is written. The node reads one at its full
    rate, the rarer among its neighbours (the older on a tie), then the other: one
    lands after one chunk time, not both after two."""
    sim = Simulation(SimConfig(nodes=3, size=2 * MiB, chunk_size=MiB, rate=MiB, latency=0.0))
    sim.events.clear()  # no joins: the flows below are all there is
    reader, other = sim.nodes["n0"], sim.nodes["n1"]
    reader.sched = Scheduler(sim.sizes)
    if neighbour_holds is not None:
        reader.sched.add_peer("n2", have=1 << neighbour_holds)
    flows = [Flow(sim.seeder, reader, 0, MiB, MiB, seq=1), Flow(other, reader, 1, MiB, MiB, seq=2)]
    for f in flows:
        f.src.ups.add(f)
        reader.downs[(f.src.node_id, f.index)] = f
    landed: dict[int, float] = {}

    def lands(f: Flow, version: int) -> None:
        if version == f.version:  # as Simulation.complete, without the scheduler
            landed.setdefault(f.index, sim.now)
            f.done = True
            f.src.ups.discard(f)
            reader.downs.pop((f.src.node_id, f.index))
            sim.reshare(f.src, reader)

    sim.complete = lands  # type: ignore[method-assign]
    sim.reshare(sim.seeder, other, reader)
    freed: dict[str, float] = {}
    while sim.events and len(landed) < 2:
        t, _, fn = heapq.heappop(sim.events)
        sim.now = t
        fn()
        for n in (sim.seeder, other):
            if not n.ups:
                freed.setdefault(n.node_id, t)
    assert freed == {"seeder": pytest.approx(1.0), "n1": pytest.approx(1.0)}
    assert landed == {first: pytest.approx(1.0), 1 - first: pytest.approx(2.0)}


def _can_compile() -> bool:
    cc = sysconfig.get_config_var("CC")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return bool(cc) and shutil.which(cc.split()[0]) is not None and headers.exists()


@pytest.mark.skipif(not _can_compile(), reason="the native build needs gcc and Python.h")
def test_the_native_build_gives_the_same_results(tmp_path: Path) -> None:
    """`--native` claims the same run, only faster: any mypyc difference shows here."""
    argv = ["--nodes", "30", "--size", "40MiB", "--chunk-size", "1MiB", "--seed", "3"]
    out = tmp_path / "native.json"
    subprocess.run(
        native.command(native.build(quiet=True), [*argv, "--json", str(out)]),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    [compiled] = json.loads(out.read_text())
    plain = simulate(SimConfig(nodes=30, size=40 * MiB, chunk_size=MiB, seed=3))
    assert compiled.pop("native") is True and plain.pop("native") is False
    for r in (compiled, plain):
        del r["wall_seconds"]
    assert compiled == plain


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "No such file or directory"),
        ("not json", "not JSON"),
        ('{"config": {}}', "not a bench.fanout result with a p2p run"),
    ],
)
def test_validate_names_a_bad_result_file_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, error: str
) -> None:
    path = tmp_path / "fanout.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        main(["--validate", str(path)])
    assert exited.value.code == 1
    err = capsys.readouterr()
    assert err.err.startswith(f"bench.sim: {path}: ")
    assert error in err.err and len(err.err.strip().splitlines()) == 1
    assert "| run |" not in err.out  # nothing ran
