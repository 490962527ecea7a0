"""`manifests push` and the operator CLI against a real `seeder run` process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import PUSH_TOKEN, SeederProcess

from manifests.client import SeederClient, SeederError
from manifests.model import Encoding, Kind, Manifest
from manifests.push import PushError, PushSummary, push_tree
from manifests.scan import ScanCancelled, scan_tree
from manifests.validate import decode_manifest

CHUNK = 64 << 10


# -- helpers --


def make_tree(root: Path) -> Path:
    """Everything a push must carry: nesting, empties, links, exec bits, odd names, edges."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir" / "nested-empty").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    odd = root / "unicode dir ü"
    odd.mkdir()
    (odd / "naïve name with space.txt").write_text("héllo\n")
    (root / "a" / "b" / "c" / "one-chunk.bin").write_bytes(os.urandom(CHUNK))
    (root / "a" / "b" / "one-chunk-plus-one.bin").write_bytes(os.urandom(CHUNK + 1))
    (root / "a" / "log.txt").write_bytes(b"line of a very compressible log\n" * 20_000)
    os.symlink("b/one-chunk-plus-one.bin", root / "a" / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    (root / "private").write_bytes(b"secret")
    (root / "private").chmod(0o600)
    return root


async def push(seeder: SeederProcess, root: Path, name: str, chunk: int = CHUNK) -> PushSummary:
    async with SeederClient(seeder.url, token=seeder.token) as client:
        return await push_tree(client, root, name, chunk, progress=False)


async def name_digest(seeder: SeederProcess, name: str) -> str:
    async with SeederClient(seeder.url) as client:
        return await client.resolve_name(name)


def stored_chunks(seeder: SeederProcess) -> list[Path]:
    root = seeder.data_dir / "chunks"
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name]


def cli_env(seeder_url: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SEEDER_URL", "DIST_PUSH_TOKEN")}
    env["SEEDER_URL"] = seeder_url
    if token is not None:
        env["DIST_PUSH_TOKEN"] = token
    return env


def cli(
    seeder: SeederProcess | str,
    *args: str,
    token: str | None = PUSH_TOKEN,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    url = seeder if isinstance(seeder, str) else seeder.url
    return subprocess.run(
        [sys.executable, "-m", "manifests.cli", *args],
        env=cli_env(url, token),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 and exactly one stderr line `manifests: ...`, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("manifests: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- push through the library --


async def test_push_publishes_manifest_and_name(seeder: SeederProcess, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    s = await push(seeder, root, "team/app:v1")
    local = scan_tree(root, CHUNK)
    assert s.files == local.files == 7
    assert s.total_bytes == local.total_bytes
    assert s.unique_chunks == len(local.sources)
    assert s.uploaded_chunks == s.unique_chunks
    assert 0 < s.uploaded_bytes < s.uploaded_raw_bytes  # the log compressed
    assert s.uploaded_raw_bytes == sum(c.size for c in local.sources.values())
    assert s.uploaded_raw_bytes < s.total_bytes  # the log's identical chunks went once
    assert await name_digest(seeder, "team/app:v1") == s.digest
    async with SeederClient(seeder.url) as client:
        m = decode_manifest(await client.get_manifest(s.digest))
    assert m.entries == Manifest.build(local.entries, {}, CHUNK).entries
    by_path = {e.path: e for e in m.entries}
    assert by_path["bin/tool"].mode == 0o755
    assert by_path["private"].mode == 0o600
    assert by_path["abs-link"].target == "/etc/hostname"
    assert by_path["empty-dir/nested-empty"].kind is Kind.DIR
    assert by_path["empty"].size == 0 and by_path["empty"].chunks == ()
    encodings = {c.encoding for c in m.chunks}
    assert encodings == {Encoding.RAW, Encoding.ZSTD}  # random stays raw, the log is zstd
    assert "pushed team/app:v1: 7 files" in s.line() and s.digest in s.line()


async def test_repush_uploads_nothing(seeder: SeederProcess, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    first = await push(seeder, root, "team/app:v1")
    again = await push(seeder, root, "team/app:v1")
    assert again.digest == first.digest
    assert again.uploaded_chunks == 0
    assert again.uploaded_bytes == 0
    assert again.uploaded_raw_bytes == 0


async def test_changed_byte_uploads_only_its_chunk(seeder: SeederProcess, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    big = root / "disk.img"
    big.write_bytes(os.urandom(5 * CHUNK + 123))
    (root / "other").write_bytes(os.urandom(3 * CHUNK))
    v1 = await push(seeder, root, "team/disk:v1")
    data = bytearray(big.read_bytes())
    data[2 * CHUNK + 10] ^= 0xFF
    big.write_bytes(data)
    v2 = await push(seeder, root, "team/disk:v2")
    assert v2.digest != v1.digest
    assert v2.uploaded_chunks == 1
    assert v2.uploaded_raw_bytes == CHUNK
    assert await name_digest(seeder, "team/disk:v1") == v1.digest
    assert await name_digest(seeder, "team/disk:v2") == v2.digest


async def test_same_content_under_two_names_uploads_once(
    seeder: SeederProcess, tmp_path: Path
) -> None:
    content = os.urandom(20 << 20)
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "x").mkdir(parents=True)
    (b / "y" / "z").mkdir(parents=True)
    (a / "x" / "layer.tar").write_bytes(content)
    (b / "y" / "z" / "copy.tar").write_bytes(content)
    first = await push(seeder, a, "team/a:v1", chunk=4 << 20)
    second = await push(seeder, b, "team/b:v1", chunk=4 << 20)
    assert first.uploaded_chunks == 5
    assert second.uploaded_chunks == 0 and second.uploaded_bytes == 0
    assert first.digest != second.digest
    assert sum(p.stat().st_size for p in stored_chunks(seeder)) == len(content)


async def test_file_changed_after_hashing_names_the_file(
    seeder: SeederProcess, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    victim = root / "changing.bin"
    victim.write_bytes(os.urandom(3 * CHUNK))

    class MutatingClient(SeederClient):
        """Rewrites the file between the scan and the upload, like a busy build would."""

        async def missing(
            self, digests: Sequence[str]
        ) -> tuple[list[str], dict[str, tuple[int, Encoding]]]:
            victim.write_bytes(os.urandom(3 * CHUNK))
            return await super().missing(digests)

    async with MutatingClient(seeder.url, token=seeder.token) as client:
        with pytest.raises(PushError, match=r"changing\.bin.*changed while it was being pushed"):
            await push_tree(client, root, "team/changing:v1", CHUNK, progress=False)
    with pytest.raises(SeederError, match="no such name"):
        await name_digest(seeder, "team/changing:v1")


async def test_level_zero_uploads_raw(seeder: SeederProcess, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "log").write_bytes(b"compressible " * 50_000)
    async with SeederClient(seeder.url, token=seeder.token) as client:
        s = await push_tree(client, root, "team/raw:v1", CHUNK, level=0, progress=False)
        m = decode_manifest(await client.get_manifest(s.digest))
    assert {c.encoding for c in m.chunks} == {Encoding.RAW}
    assert s.uploaded_bytes == s.total_bytes


# -- interruption and refusal, through the CLI --


def test_killed_push_leaves_nothing_visible_and_resumes(
    seeder: SeederProcess, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    # Many small chunks uploaded one at a time, so the kill lands half way.
    for i in range(4):
        (root / f"part-{i}.bin").write_bytes(os.urandom(12 << 20))
    chunk = 32 << 10
    total_chunks = 4 * (12 << 20) // chunk
    args = ["push", str(root), "--name", "team/big:v1", "--chunk-size", "32KiB"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "manifests.cli", *args, "--parallel", "1"],
        env=cli_env(seeder.url, PUSH_TOKEN),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(stored_chunks(seeder)) < 20:
            assert proc.poll() is None, "push finished before it could be interrupted"
            assert time.monotonic() < deadline, "no chunk arrived within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    held = len(stored_chunks(seeder))
    assert 20 <= held < total_chunks
    names = json.loads(cli(seeder, "list", "--json").stdout)
    assert names == []

    done = cli(seeder, *args)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("pushed team/big:v1: 4 files")
    uploaded = int(line.split("uploaded ")[1].split(" chunks")[0])
    assert uploaded <= total_chunks - held
    assert len(stored_chunks(seeder)) == total_chunks
    assert [n["name"] for n in json.loads(cli(seeder, "list", "--json").stdout)] == ["team/big:v1"]


def test_wrong_token_changes_nothing(seeder: SeederProcess, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    proc = cli(seeder, "push", str(root), "--name", "team/app:v1", token="not-the-token")
    assert "token" in one_error_line(proc)
    assert stored_chunks(seeder) == []
    proc = cli(seeder, "push", str(root), "--name", "team/app:v1", token=None)
    assert "token" in one_error_line(proc)
    assert stored_chunks(seeder) == []
    assert json.loads(cli(seeder, "list", "--json").stdout) == []
    assert "token" in one_error_line(
        cli(seeder, "assign", "team/app:v1", "--node", "n1", token="nope")
    )


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_are_refused_with_their_path(
    seeder: SeederProcess, tmp_path: Path, kind: str
) -> None:
    root = make_tree(tmp_path / "t")
    special = root / "a" / "b" / f"the-{kind}"
    sock: socket.socket | None = None
    if kind == "fifo":
        os.mkfifo(special)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(special))
    try:
        line = one_error_line(cli(seeder, "push", str(root), "--name", "team/app:v1"))
    finally:
        if sock is not None:
            sock.close()
    assert str(special) in line and kind in line
    assert stored_chunks(seeder) == []


# -- the rest of the CLI --


def test_cli_push_inspect_list(seeder: SeederProcess, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    proc = cli(seeder, "push", str(root), "--name", "team/app:v1", "--chunk-size", "64KiB")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    digest = lines[0].rsplit(" ", 1)[1]
    assert len(digest) == 64
    for word in ("7 files", "unique chunks", "uploaded", "MB/s"):
        assert word in lines[0]

    doc = json.loads(cli(seeder, "inspect", "team/app:v1").stdout)
    assert doc["digest"] == digest and doc["name"] == "team/app:v1"
    assert doc["chunk_size"] == CHUNK
    assert doc["total_size"] == sum(e.get("size", 0) for e in doc["entries"])
    assert doc["stored_size"] == sum(c["stored_size"] for c in doc["chunks"])
    entries = {e["path"]: e for e in doc["entries"]}
    assert entries["bin/tool"]["mode"] == "0755" and entries["bin/tool"]["type"] == "file"
    assert entries["a/rel-link"] == {
        "path": "a/rel-link",
        "type": "symlink",
        "mode": "0777",
        "target": "b/one-chunk-plus-one.bin",
    }
    assert entries["a/b/one-chunk-plus-one.bin"]["size"] == CHUNK + 1
    assert len(entries["a/b/one-chunk-plus-one.bin"]["chunks"]) == 2
    by_digest = json.loads(cli(seeder, "inspect", digest).stdout)
    assert "name" not in by_digest
    assert by_digest["entries"] == doc["entries"]

    cli(seeder, "push", str(root / "a"), "--name", "team/other:v2")
    table = cli(seeder, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "DIGEST", "UPDATED"]
    assert [row.split()[0] for row in table[1:]] == ["team/app:v1", "team/other:v2"]
    assert table[1].split()[1] == digest
    assert table[1].index(digest) == table[2].index(table[2].split()[1])  # aligned
    listed = json.loads(cli(seeder, "list", "--json").stdout)
    assert [r["name"] for r in listed] == ["team/app:v1", "team/other:v2"]


def test_cli_assignments(seeder: SeederProcess, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    assert cli(seeder, "push", str(root), "--name", "team/app:v1").returncode == 0
    digest = json.loads(cli(seeder, "inspect", "team/app:v1").stdout)["digest"]

    ok = cli(seeder, "assign", "team/app:v1", "--node", "node-1")
    assert ok.returncode == 0 and "node node-1" in ok.stdout
    ok = cli(seeder, "assign", "team/app:v1", "--selector", "zone=fra3, arch=arm64")
    assert ok.returncode == 0 and "arch=arm64,zone=fra3" in ok.stdout

    rules = json.loads(cli(seeder, "assignments", "--json").stdout)
    assert {(r["name"], r.get("node"), r.get("selector")) for r in rules} == {
        ("team/app:v1", "node-1", None),
        ("team/app:v1", None, "arch=arm64,zone=fra3"),
    }
    table = cli(seeder, "assignments").stdout.splitlines()
    assert table[0].split() == ["NAME", "NODE", "SELECTOR"] and len(table) == 3

    def resolved(*args: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(cli(seeder, "assignments", "--json", *args).stdout)
        return out

    assert resolved("--node", "node-1") == [{"name": "team/app:v1", "digest": digest}]
    assert resolved("--node", "node-2", "--labels", "zone=fra3,arch=arm64,rack=7") == [
        {"name": "team/app:v1", "digest": digest}
    ]
    assert resolved("--node", "node-2", "--labels", "zone=fra3,arch=x86") == []
    table = cli(seeder, "assignments", "--node", "node-1").stdout.splitlines()
    assert table[0].split() == ["NAME", "DIGEST"] and table[1].split() == ["team/app:v1", digest]

    assert cli(seeder, "unassign", "team/app:v1", "--node", "node-1").returncode == 0
    assert resolved("--node", "node-1") == []
    one_error_line(cli(seeder, "unassign", "team/app:v1", "--node", "node-1"))
    assert (
        cli(seeder, "unassign", "team/app:v1", "--selector", "arch=arm64,zone=fra3").returncode == 0
    )
    assert json.loads(cli(seeder, "assignments", "--json").stdout) == []


@pytest.mark.parametrize(
    "args",
    [
        ["push", ".", "--name", "Not A Name"],
        ["push", "."],
        ["push", ".", "--name", "team/app:v1", "--chunk-size", "lots"],
        ["push", ".", "--name", "team/app:v1", "--chunk-size", "1GiB"],
        ["push", ".", "--name", "team/app:v1", "--parallel", "0"],
        ["assign", "team/app:v1"],
        ["assign", "team/app:v1", "--node", "n1", "--selector", "a=b"],
        ["assign", "team/app:v1", "--selector", "zone"],
        ["assign", "team/app:v1", "--selector", ""],
        ["assign", "team/app:v1", "--node", "bad id"],
        ["unassign", "nope", "--node", "n1"],
        ["assignments", "--labels", "zone=fra3"],
        ["inspect", "not a name"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = cli("http://127.0.0.1:9", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_runtime_errors_are_one_line(seeder: SeederProcess, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    assert "not a directory" in one_error_line(cli(seeder, "push", str(f), "--name", "t/a:v1"))
    missing = str(tmp_path / "missing")
    assert "does not exist" in one_error_line(cli(seeder, "push", missing, "--name", "t/a:v1"))
    assert "no such name" in one_error_line(cli(seeder, "inspect", "team/none:v1"))
    assert "no such manifest" in one_error_line(cli(seeder, "inspect", "ab" * 32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert "unreachable" in one_error_line(cli(dead, "list"))
    root = make_tree(tmp_path / "tree")
    assert "unreachable" in one_error_line(cli(dead, "push", str(root), "--name", "t/a:v1"))


def test_help_lists_every_command() -> None:
    proc = cli("http://127.0.0.1:9", "--help")
    assert proc.returncode == 0
    for cmd in ("push", "inspect", "list", "assign", "unassign", "assignments"):
        assert cmd in proc.stdout


async def test_many_chunks_are_queried_in_batches(
    seeder: SeederProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manifests.push as push_mod

    monkeypatch.setattr(push_mod, "MISSING_BATCH", 7)
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(os.urandom(50 * 1024))
    calls: list[int] = []

    class Counting(SeederClient):
        async def missing(
            self, digests: Sequence[str]
        ) -> tuple[list[str], dict[str, tuple[int, Encoding]]]:
            calls.append(len(digests))
            return await super().missing(digests)

    async with Counting(seeder.url, token=seeder.token) as client:
        s = await push_tree(client, root, "team/many:v1", 1024, progress=False)
    assert s.unique_chunks == 50
    assert max(calls) <= 7 and sum(calls) == 50
    assert len(calls) == s.queries


def test_scan_cancel_and_errors_name_the_cause(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(6):
        (root / f"f{i}").write_bytes(os.urandom(3 * CHUNK))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScanCancelled):
        scan_tree(root, CHUNK, cancel=stop)
    found: list[str] = []
    result = scan_tree(root, CHUNK, on_chunk=lambda d, src: found.append(d))
    assert sorted(found) == sorted(result.sources) and len(found) == 18
    (root / "f3").chmod(0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(PermissionError):
            scan_tree(root, CHUNK)
