"""`distd run` configuration: every flag from `DISTD_<FLAG>`, one strict boolean reading
of the environment, values refused before the daemon starts; and what the
--cache-max-bytes budget keeps, driven on a real Daemon and ChunkStore in a tmp dir.

The CLI's own parser is built under a patched environment (the defaults are read from
it when the parser is built), so nothing here starts a process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from treeutil import build_manifest

from distd import cli
from distd.daemon import Daemon, DaemonConfig
from manifests.chunking import encode_chunk

TOKEN = "0123456789abcdef0123456789abcdef"


def run_parser() -> argparse.ArgumentParser:
    """The `run` subcommand's parser, as `main` builds it."""
    parser: argparse.ArgumentParser = cli.build_parser().parse_args(["run"]).parser
    return parser


def env_cases(tmp_path: Path) -> dict[str, tuple[str, str, Any]]:
    """{flag: (env value, dest, parsed value)}; every value differs from the default."""
    return {
        "--seeder": ("http://seeder.example:7700", "seeder", "http://seeder.example:7700"),
        "--listen": ("127.0.0.2:7800", "listen", ("127.0.0.2", 7800)),
        "--data-dir": (str(tmp_path / "d"), "data_dir", tmp_path / "d"),
        "--node-id": ("env-node", "node_id", "env-node"),
        "--advertise": ("10.0.0.5:7701", "advertise", "10.0.0.5:7701"),
        "--labels": ("rack=r1,role=worker", "labels", {"rack": "r1", "role": "worker"}),
        "--zone": ("z2", "zone", "z2"),
        "--max-upload-rate": ("160Mbit", "max_upload_rate", 20_000_000),
        "--max-download-rate": ("8MiB", "max_download_rate", 8 << 20),
        "--upload-slots": ("3", "upload_slots", 3),
        "--cache-max-bytes": ("1GiB", "cache_max_bytes", 1 << 30),
        "--gc-grace": ("2.5", "gc_grace", 2.5),
        "--max-inflight": ("7", "max_inflight", 7),
        "--per-peer-inflight": ("5", "per_peer_inflight", 5),
        "--announce-interval": ("0.5", "announce_interval", 0.5),
        "--no-p2p": ("yes", "no_p2p", True),
        "--verbose": ("on", "verbose", True),
        "--cluster-token": (TOKEN, "cluster_token", TOKEN),
        "--tls-cert": ("/etc/distd/cert.pem", "tls_cert", "/etc/distd/cert.pem"),
        "--tls-key": ("/etc/distd/key.pem", "tls_key", "/etc/distd/key.pem"),
        "--tls-ca": ("/etc/distd/ca.pem", "tls_ca", "/etc/distd/ca.pem"),
    }


def env_name(flag: str) -> str:
    return "DISTD_" + flag.removeprefix("--").upper().replace("-", "_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DISTD_* from the machine running the tests leaks into a case."""
    for var in [v for v in os.environ if v.startswith("DISTD_")]:
        monkeypatch.delenv(var)


def test_every_run_flag_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = env_cases(tmp_path)
    flags = {
        max(a.option_strings, key=len)
        for a in run_parser()._actions
        if a.option_strings and a.dest != "help"
    }
    assert flags == set(cases), "a flag of `distd run` without a case here (or one gone)"
    defaults = run_parser().parse_args([])
    for flag, (value, dest, parsed) in cases.items():
        assert getattr(defaults, dest) != parsed, f"{flag}: the case cannot tell env from default"
        monkeypatch.setenv(env_name(flag), value)
    args = run_parser().parse_args([])
    for flag, (_value, dest, parsed) in cases.items():
        assert getattr(args, dest) == parsed, (flag, env_name(flag))
    # The command line still wins over the environment.
    assert run_parser().parse_args(["--zone", "z9", "--gc-grace", "0"]).zone == "z9"


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_true_words_turn_a_boolean_on(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTD_NO_P2P", value)
    assert run_parser().parse_args([]).no_p2p is True


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no", "NO", "off", "Off"])
def test_false_words_leave_a_boolean_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTD_NO_P2P", value)
    assert run_parser().parse_args([]).no_p2p is False


@pytest.mark.parametrize("var", ["DISTD_NO_P2P", "DISTD_VERBOSE"])
@pytest.mark.parametrize("value", ["maybe", "2", "nope"])
def test_other_boolean_words_are_refused_naming_the_variable(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(var, value)
    assert cli.main(["run", "--seeder", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"distd: {var}="), err


@pytest.mark.parametrize("grace", ["-1", "-0.5", "nan", "NaN"])
def test_negative_or_nan_gc_grace_is_a_usage_error(
    grace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as flag:
        cli.main(["run", "--seeder", "http://127.0.0.1:1", "--gc-grace", grace])
    assert flag.value.code == 2
    assert "--gc-grace" in capsys.readouterr().err
    monkeypatch.setenv("DISTD_GC_GRACE", grace)
    with pytest.raises(SystemExit) as env:
        cli.main(["run", "--seeder", "http://127.0.0.1:1"])
    assert env.value.code == 2
    assert "--gc-grace" in capsys.readouterr().err


def test_zero_gc_grace_is_allowed() -> None:
    assert run_parser().parse_args(["--gc-grace", "0"]).gc_grace == 0.0


# -- --cache-max-bytes ------------------------------------------------------------------

CS = 64 << 10  # chunk size: random data, so stored raw at exactly this size


async def _put_random(daemon: Daemon, n: int) -> list[str]:
    """n random chunks no image uses, stored; their digests."""
    out = []
    for _ in range(n):
        raw = os.urandom(CS)
        enc, payload = encode_chunk(raw)
        digest = hashlib.sha256(raw).hexdigest()
        await daemon.store.put(digest, payload, enc, len(raw))
        out.append(digest)
    return out


def _daemon(data_dir: Path, cache: int) -> Daemon:
    return Daemon(
        DaemonConfig(
            seeder="http://127.0.0.1:1",
            listen=("127.0.0.1", 0),
            data_dir=data_dir,
            node_id="gc",
            cache_max_bytes=cache,
        )
    )


async def test_cache_budget_counts_unused_chunks_only_also_at_start(tmp_path: Path) -> None:
    """In-use chunks (4 x 64 KiB) exceed the 2.5-chunk cache: the cache still keeps
    two unused chunks, at collection time and when a restarted daemon restores."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(4 * CS))
    manifest, raw = build_manifest(src, CS)
    data = tmp_path / "data"
    cache = 2 * CS + CS // 2

    daemon = _daemon(data, cache)
    daemon.catalog.add(manifest.digest, manifest)
    for digest, chunk in raw.items():
        enc, payload = encode_chunk(chunk)
        await daemon.store.put(digest, payload, enc, len(chunk))
    unused = await _put_random(daemon, 3)
    assert await daemon._collect_garbage() == 1
    assert all(daemon.store.has(d) for d in raw)  # in use: never collected
    assert sum(daemon.store.has(d) for d in unused) == 2

    # Left over by a crash, or the budget shrank: the next start collects at once.
    more = await _put_random(daemon, 2)
    restarted = _daemon(data, CS)
    await restarted.restore()
    assert manifest.digest in restarted.catalog.images
    assert all(restarted.store.has(d) for d in raw)
    assert sum(restarted.store.has(d) for d in unused + more) == 1
    on_disk = {f.name.partition(".")[0] for f in (data / "chunks").glob("*/*")}
    assert on_disk == set(restarted.store.digests())


def test_image_names_survive_a_restart_and_a_half_written_names_file_is_swept(
    tmp_path: Path,
) -> None:
    """Names persist so that a restarted node still knows which ready copy stands in
    for a name that moved (see test_swarm's moving-name test for the whole switch)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(CS))
    manifest, _ = build_manifest(src, CS)
    data = tmp_path / "data"
    first = _daemon(data, 0)
    first.catalog.add(manifest.digest, manifest).names = {"team/app:v1", "team/app:stable"}
    first.catalog.save_names()
    stale = data / "names.json.tmp-12345"
    stale.write_bytes(b'{"half')
    again = _daemon(data, 0)
    again.catalog.load()
    assert again.catalog.images[manifest.digest].names == {"team/app:v1", "team/app:stable"}
    assert not stale.exists()
