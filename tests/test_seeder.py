"""The seeder service against a real `seeder run` process, plus the token bucket (pure)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import PUSH_TOKEN, SeederFactory, SeederProcess

from distd.ratelimit import TokenBucket
from manifests import wire
from manifests.chunking import encode_chunk, sha256_hex
from manifests.client import SeederClient, SeederError
from manifests.model import Chunk, Encoding, Entry, Kind, Manifest
from seeder.app import SEEDER, make_app

# -- helpers ---------------------------------------------------------------

ChunkParts = tuple[str, Encoding, bytes, int]


def make_chunk(raw: bytes) -> ChunkParts:
    """(digest, encoding, stored payload, raw size) as a pusher would upload it."""
    encoding, payload = encode_chunk(raw)
    return sha256_hex(raw), encoding, payload, len(raw)


def make_manifest(files: dict[str, bytes]) -> tuple[Manifest, list[ChunkParts]]:
    """A one-chunk-per-file manifest over `files` and the chunks it needs."""
    entries: list[Entry] = []
    table: dict[str, Chunk] = {}
    chunks: list[ChunkParts] = []
    for path, raw in files.items():
        d, enc, payload, size = make_chunk(raw)
        chunks.append((d, enc, payload, size))
        table[d] = Chunk(d, size, len(payload), enc)
        entries.append(Entry(path, Kind.FILE, 0o644, size, sha256_hex(raw), (d,)))
    return Manifest.build(entries, table, 1 << 20), chunks


async def publish(c: SeederClient, files: dict[str, bytes]) -> str:
    m, chunks = make_manifest(files)
    for d, enc, payload, size in chunks:
        await c.put_chunk(d, payload, enc, size)
    return await c.put_manifest(m.encode())


def client(s: SeederProcess, token: str | None = PUSH_TOKEN) -> SeederClient:
    return SeederClient(s.url, token)


async def raw_request(
    s: SeederProcess,
    method: str,
    path: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A request outside the client, to see statuses and bodies exactly as sent."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, s.url + path, data=data, headers=headers) as resp,
    ):
        body = await resp.read()
        if resp.content_type == wire.JSON:
            return resp.status, json.loads(body)
        if resp.content_type == wire.MSGPACK:
            return resp.status, wire.unpack(body)
        return resp.status, body


# -- chunks ----------------------------------------------------------------


async def test_chunk_upload_download_and_idempotent_reupload(seeder: SeederProcess) -> None:
    compressible = b"abc" * 100_000
    incompressible = os.urandom(300_000)
    async with client(seeder) as c:
        await c.healthz()
        for raw in (compressible, incompressible):
            d, enc, payload, size = make_chunk(raw)
            assert await c.missing([d]) == ([d], {})
            assert await c.put_chunk(d, payload, enc, size) is True
            assert await c.put_chunk(d, payload, enc, size) is False
            assert await c.missing([d]) == ([], {d: (len(payload), enc)})
            assert await c.get_chunk(d) == (enc, size, payload)
        assert make_chunk(compressible)[1] is Encoding.ZSTD
        assert make_chunk(incompressible)[1] is Encoding.RAW


async def test_corrupt_chunk_is_rejected_and_not_stored(seeder: SeederProcess) -> None:
    d, enc, payload, size = make_chunk(os.urandom(10_000))
    bad = bytes([payload[0] ^ 1]) + payload[1:]
    async with client(seeder) as c:
        with pytest.raises(SeederError) as e:
            await c.put_chunk(d, bad, enc, size)
        assert e.value.status == 422
        assert f"chunk {d} content mismatch" in str(e.value)
        # A payload of the wrong size and a zstd frame that lies about its size: also refused.
        with pytest.raises(SeederError, match="content mismatch"):
            await c.put_chunk(d, payload[:-1], enc, size)
        with pytest.raises(SeederError):
            await c.put_chunk(d, encode_chunk(b"x" * 20_000)[1], Encoding.ZSTD, size)
        assert await c.missing([d]) == ([d], {})
        with pytest.raises(SeederError, match=f"seeder has no chunk {d}") as e:
            await c.get_chunk(d)
        assert e.value.status == 404
    assert not list((seeder.data_dir / "chunks").rglob(f"{d}*"))


async def test_bad_chunk_requests_are_400(seeder: SeederProcess) -> None:
    d, _, payload, _ = make_chunk(b"hello")
    auth = {"Authorization": f"Bearer {PUSH_TOKEN}"}
    status, body = await raw_request(
        seeder, "PUT", f"/v1/chunks/{d}", data=payload, headers={**auth, wire.H_SIZE: "5"}
    )
    assert status == 400 and "X-Chunk-Encoding" in body["error"]
    status, body = await raw_request(
        seeder, "PUT", "/v1/chunks/NOTHEX", data=payload, headers={**auth, wire.H_SIZE: "5"}
    )
    assert status == 400
    status, body = await raw_request(seeder, "GET", "/v1/chunks/" + "0" * 64)
    assert status == 404 and body == {"error": "no chunk " + "0" * 64}


def test_oversized_body_is_refused_before_it_is_sent(seeder: SeederProcess) -> None:
    """A 1 GB Content-Length gets 413 at once; the seeder does not wait for the bytes."""
    d = "a" * 64
    with socket.create_connection(("127.0.0.1", seeder.port), timeout=10) as sock:
        sock.sendall(
            (
                f"PUT /v1/chunks/{d} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUSH_TOKEN}\r\n"
                f"X-Chunk-Encoding: raw\r\nX-Chunk-Size: 100\r\nContent-Length: 1000000000\r\n\r\n"
            ).encode()
        )
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head


# -- auth ------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token", PUSH_TOKEN + "x", ""])
async def test_wrong_or_missing_token_changes_nothing(
    seeder: SeederProcess, token: str | None
) -> None:
    files = {"a": b"some content"}
    async with client(seeder) as good:
        digest = await publish(good, files)
        await good.set_name("team/app:v1", digest)
        await good.assign("team/app:v1", node="n1")
        before = (
            await good.list_names(),
            await good.name_info("team/app:v1"),
            await good.assignments(),
        )
    other, other_chunks = make_manifest({"b": b"other content"})
    d, enc, payload, size = other_chunks[0]
    async with client(seeder, token) as bad:
        attempts = [
            bad.put_chunk(d, payload, enc, size),
            bad.put_manifest(other.encode()),
            bad.set_name("team/app:v1", "0" * 64),
            bad.set_name("team/app:v2", digest),
            bad.assign("team/app:v1", node="n2"),
            bad.assign("team/app:v1", selector="zone=a"),
            bad.unassign("team/app:v1", node="n1"),
        ]
        for call in attempts:
            with pytest.raises(SeederError, match=r"\(401\)") as e:
                await call
            assert e.value.status == 401
        # Reads need no token.
        assert await bad.missing([d]) == ([d], {})
        after = (
            await bad.list_names(),
            await bad.name_info("team/app:v1"),
            await bad.assignments(),
        )
    assert after == before
    status, body = await raw_request(
        seeder, "PUT", f"/v1/chunks/{d}", data=payload, headers={"Authorization": "Basic x"}
    )
    assert status == 401 and body == {"error": "missing or wrong token"}
    assert PUSH_TOKEN not in seeder.log()


# -- manifests -------------------------------------------------------------


async def test_manifest_needs_every_chunk(seeder: SeederProcess) -> None:
    m, chunks = make_manifest({"a": b"alpha" * 1000, "b": os.urandom(5000), "c": b"gamma"})
    data = m.encode()
    async with client(seeder) as c:
        d0, enc, payload, size = chunks[0]
        await c.put_chunk(d0, payload, enc, size)
        with pytest.raises(SeederError, match="manifest rejected: 2 of") as e:
            await c.put_manifest(data)
        assert e.value.status == 409
        assert sorted(e.value.missing) == sorted(d for d, *_ in chunks[1:])
        with pytest.raises(SeederError, match="no such manifest"):
            await c.get_manifest(m.digest)
        for d, enc, payload, size in chunks[1:]:
            await c.put_chunk(d, payload, enc, size)
        assert await c.put_manifest(data) == m.digest
        assert await c.put_manifest(data) == m.digest  # idempotent
        assert await c.get_manifest(m.digest) == data
    status, body = await raw_request(seeder, "GET", f"/v1/manifests/{m.digest}")
    assert status == 200 and body == msgpack.unpackb(data, raw=False)


@pytest.mark.parametrize(
    ("path", "rule"),
    [("../escape", "'..' component"), ("/etc/passwd", "is absolute"), ("a//b", "empty component")],
)
async def test_invalid_manifest_is_422_with_the_rule(
    seeder: SeederProcess, path: str, rule: str
) -> None:
    raw = b"payload"
    d, enc, payload, size = make_chunk(raw)
    bad = Manifest(
        (Entry(path, Kind.FILE, 0o644, size, sha256_hex(raw), (d,)),),
        (Chunk(d, size, len(payload), enc),),
        1 << 20,
    )
    async with client(seeder) as c:
        await c.put_chunk(d, payload, enc, size)
        with pytest.raises(SeederError, match=f"manifest rejected: .*{rule}") as e:
            await c.put_manifest(bad.encode())
        assert e.value.status == 422


async def test_manifest_body_must_match_url_digest(seeder: SeederProcess) -> None:
    m, _ = make_manifest({"a": b"x"})
    status, body = await raw_request(
        seeder,
        "PUT",
        f"/v1/manifests/{'0' * 64}",
        data=m.encode(),
        headers={"Authorization": f"Bearer {PUSH_TOKEN}"},
    )
    assert status == 422 and "not the" in body["error"]


async def test_malformed_msgpack_is_400_not_500(seeder: SeederProcess) -> None:
    headers = {
        "Authorization": f"Bearer {PUSH_TOKEN}",
        "Content-Type": wire.MSGPACK,
        "Accept": wire.MSGPACK,
    }
    for method, path in [
        ("POST", "/v1/chunks/missing"),
        ("PUT", "/v1/names/team/app:v1"),
        ("POST", "/v1/assignments"),
        ("DELETE", "/v1/assignments"),
    ]:
        for junk in (b"\xc1", b"\x92\x01", wire.pack([1, 2]), wire.pack({"digests": "x"})):
            status, body = await raw_request(seeder, method, path, data=junk, headers=headers)
            assert status == 400, (method, path, junk, body)
            assert isinstance(body["error"], str) and "\n" not in body["error"]
    status, body = await raw_request(
        seeder, "POST", "/v1/chunks/missing", data=b"{not json", headers={}
    )
    assert status == 400 and "JSON" in body["error"]
    assert "Traceback" not in seeder.log()


# -- names -----------------------------------------------------------------


async def test_names_move_with_history(seeder: SeederProcess) -> None:
    async with client(seeder) as c:
        v1 = await publish(c, {"f": b"version one"})
        v2 = await publish(c, {"f": b"version two"})
        with pytest.raises(SeederError, match="no such name 'team/app:latest'") as e:
            await c.name_info("team/app:latest")
        assert e.value.status == 404
        with pytest.raises(SeederError, match="not published"):
            await c.set_name("team/app:latest", "f" * 64)
        with pytest.raises(SeederError, match="not an image name"):
            await c.set_name("Team/App", v1)
        first = await c.set_name("team/app:latest", v1)
        assert first["digest"] == v1 and first["previous"] is None
        moved = await c.set_name("team/app:latest", v2)
        assert moved["previous"] == v1
        await c.set_name("team/app:latest", v2)  # no-op: no new history entry
        await c.set_name("team/other:1.0", v1)
        info = await c.name_info("team/app:latest")
        assert info["digest"] == v2
        assert [h["digest"] for h in info["history"]] == [v2, v1]
        assert await c.resolve_name("team/app:latest") == v2
        assert await c.resolve_name(v1) == v1
        names = await c.list_names()
        assert [(n["name"], n["digest"]) for n in names] == [
            ("team/app:latest", v2),
            ("team/other:1.0", v1),
        ]


# -- assignments -----------------------------------------------------------


async def test_assignments_by_node_and_selector(seeder: SeederProcess) -> None:
    async with client(seeder) as c:
        a = await publish(c, {"a": b"image a"})
        b = await publish(c, {"b": b"image b"})
        await c.set_name("team/a:1", a)
        await c.set_name("team/b:1", b)
        assert await c.assign("team/a:1", node="node-1") is True
        assert await c.assign("team/a:1", node="node-1") is False
        assert await c.assign("team/b:1", selector="zone=fra3,arch=arm64") is True
        # The same selector in another order is the same rule.
        assert await c.assign("team/b:1", selector={"arch": "arm64", "zone": "fra3"}) is False
        assert await c.assign("team/future:1", node="node-1") is True  # not pushed yet

        rules = await c.assignments()
        assert rules == [
            {"name": "team/a:1", "node": "node-1", "selector": None},
            {"name": "team/b:1", "node": None, "selector": "arch=arm64,zone=fra3"},
            {"name": "team/future:1", "node": "node-1", "selector": None},
        ]
        both = [{"name": "team/a:1", "digest": a}, {"name": "team/b:1", "digest": b}]
        assert await c.assignments(node="node-1", labels="zone=fra3,arch=arm64,rack=7") == both
        assert await c.assignments(node="node-1") == both[:1]
        assert await c.assignments(node="node-2", labels="arch=arm64,zone=fra3") == both[1:]
        assert await c.assignments(node="node-2", labels="zone=fra3,arch=amd64") == []
        assert await c.assignments(node="node-3") == []

        with pytest.raises(SeederError, match="at least one"):
            await c.assign("team/a:1", selector="")
        with pytest.raises(SeederError, match="exactly one"):
            await c.assign("team/a:1")

        await c.unassign("team/a:1", node="node-1")
        with pytest.raises(SeederError, match="no assignment") as e:
            await c.unassign("team/a:1", node="node-1")
        assert e.value.status == 404
        assert await c.assignments(node="node-1") == []
        await c.unassign("team/b:1", selector="arch=arm64,zone=fra3")
        assert await c.assignments(node="node-2", labels="arch=arm64,zone=fra3") == []


async def test_restart_keeps_names_manifests_assignments_and_nodes(seeder: SeederProcess) -> None:
    """Also the nodes seen: recorded by a daemon's registration only (the operator's
    assignment preview for "n9" records nothing), listed by GET /v1/nodes."""
    files = {"a": os.urandom(2000), "b": b"bbb" * 500}
    t0 = time.time()
    async with client(seeder) as c:
        digest = await publish(c, files)
        await c.set_name("team/app:v1", digest)
        await c.assign("team/app:v1", node="n1")
        await c.assign("team/app:v1", selector="zone=a")
        await c.register("d1", labels={"zone": "a", "arch": "x86"}, address="127.0.0.1:9001")
        before = (
            await c.get_manifest(digest),
            await c.name_info("team/app:v1"),
            await c.assignments(),
            await c.assignments(node="n9", labels="zone=a"),
            await c.nodes(),
        )
    [node] = before[-1]
    assert node["id"] == "d1" and node["labels"] == "arch=x86,zone=a"
    assert node["address"] == "127.0.0.1:9001" and t0 <= node["last_seen"] <= time.time()
    for hard in (False, True):
        seeder.restart(hard=hard)
        async with client(seeder) as c:
            after = (
                await c.get_manifest(digest),
                await c.name_info("team/app:v1"),
                await c.assignments(),
                await c.assignments(node="n9", labels="zone=a"),
                await c.nodes(),
            )
            assert after == before
            _, chunks = make_manifest(files)
            assert await c.missing([d for d, *_ in chunks]) == (
                [],
                {d: (len(p), e) for d, e, p, _ in chunks},
            )


async def test_nodes_seen_need_the_cluster_token_and_show_in_the_cli(
    seeder_proc: SeederFactory,
) -> None:
    cluster = "cluster-secret-0123456789"
    s = seeder_proc(extra_args=("--cluster-token", cluster))
    async with SeederClient(s.url, None, cluster_token=cluster) as c:
        await c.register("rack1-n7", labels={"zone": "fra3"}, address="10.0.0.7:7701")
    assert await raw_request(s, "GET", "/v1/nodes") == (401, {"error": "missing or wrong token"})

    def nodes_cli(*extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SEEDER_", "DIST_"))}
        cmd = [sys.executable, "-m", "manifests.cli", "--seeder", s.url, *extra, "nodes"]
        return subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=60)

    r = nodes_cli()
    assert (r.returncode, r.stderr.count("\n")) == (1, 1) and "token" in r.stderr, r.stderr
    r = nodes_cli("--cluster-token", cluster)
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert (row["id"], row["labels"], row["address"]) == ("rack1-n7", "zone=fra3", "10.0.0.7:7701")


_IMAGE = sha256_hex(b"an image nobody pulls any more")


async def _members_gauge(c: TestClient[Any, Any]) -> int:
    text = await (await c.get("/metrics")).text()
    [line] = [x for x in text.splitlines() if x.startswith("seeder_tracker_members ")]
    return int(line.split()[1])


async def test_tracker_drops_members_that_stop_announcing(tmp_path: Path) -> None:
    """The app sweeps the tracker on its own (no request for the swarm needed)."""
    app = make_app(tmp_path, PUSH_TOKEN)
    tracker = app[SEEDER].tracker
    tracker.ttl = 0.4
    async with TestClient(TestServer(app)) as c:
        for node in ("gone", "stays"):
            body = {"image": _IMAGE, "node_id": node, "address": f"{node}:1"}
            assert (await c.post("/v1/announce", json=body)).status == 200
        assert await _members_gauge(c) == 2
        for _ in range(12):  # 1.2 s: three ttls for "gone", "stays" keeps announcing
            await asyncio.sleep(0.1)
            body = {"image": _IMAGE, "node_id": "stays", "address": "stays:1"}
            assert (await c.post("/v1/announce", json=body)).status == 200
        assert list(tracker.swarms[_IMAGE].members) == ["stays"]
        assert await _members_gauge(c) == 1
        await asyncio.sleep(1.0)
        assert tracker.swarms == {}  # the whole swarm went, not just its members
        assert await _members_gauge(c) == 0


async def test_members_gauge_counts_only_live_members(tmp_path: Path) -> None:
    """Between two sweeps (here the first is 15 s away) an expired member is not counted."""
    app = make_app(tmp_path, PUSH_TOKEN)
    tracker = app[SEEDER].tracker
    async with TestClient(TestServer(app)) as c:
        tracker.ttl = 0.2  # for this announce; the sweeper already waits the default ttl/2
        body = {"image": _IMAGE, "node_id": "brief", "address": "brief:1"}
        assert (await c.post("/v1/announce", json=body)).status == 200
        assert await _members_gauge(c) == 1
        await asyncio.sleep(0.3)
        assert await _members_gauge(c) == 0


# -- client errors ---------------------------------------------------------


async def test_client_errors_are_one_clear_line(seeder_proc: SeederFactory) -> None:
    s = seeder_proc()
    port = s.port
    s.stop()
    async with SeederClient(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(SeederError) as e:
            await c.list_names()
    assert str(e.value) == f"seeder at http://127.0.0.1:{port} is unreachable (connection refused)"
    async with SeederClient(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(SeederError, match="not a SHA-256 digest"):
            await c.get_manifest("latest")


# -- command line ----------------------------------------------------------


def _seeder_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEEDER_")}
    return subprocess.run(
        [sys.executable, "-m", "seeder.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_usage_and_startup_errors(seeder: SeederProcess, tmp_path: Path) -> None:
    ok = ["--data-dir", str(tmp_path / "d"), "--push-token", "t"]
    for argv in (
        [],
        ["run", "--data-dir", str(tmp_path), "--push-token", "t"],  # no --listen
        ["run", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],  # no token
        ["run", "--listen", "nowhere", *ok],
        ["run", "--listen", "127.0.0.1:0", "--max-upload-rate", "fast", *ok],
    ):
        r = _seeder_cmd(*argv)
        assert r.returncode == 2, (argv, r.stderr)
    r = _seeder_cmd("run", "--listen", f"127.0.0.1:{seeder.port}", *ok)
    assert r.returncode == 1 and "cannot listen" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("seeder: cannot listen on")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    r = _seeder_cmd("run", "--listen", "127.0.0.1:0", "--data-dir", str(a_file), "--push-token=t")
    assert r.returncode == 1 and "cannot use data dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("Yes", True), ("ON", True), ("off", False), ("no", False)]
)
def test_boolean_env_values_mean_what_they_say(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    """SEEDER_NO_SUPERSEED=off used to turn super-seeding off: only "", 0 and false were false."""
    from seeder.cli import build_parser

    monkeypatch.setenv("SEEDER_NO_SUPERSEED", value)
    assert build_parser().parse_args(["run"]).no_superseed is expected


def test_a_boolean_env_value_that_is_no_boolean_is_a_one_line_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDER_")}
    env["SEEDER_NO_SUPERSEED"] = "maybe"
    proc = subprocess.run(
        [sys.executable, "-m", "seeder.cli", "run"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "seeder: SEEDER_NO_SUPERSEED='maybe' is not a boolean: use one of 1/true/yes/on"
        " or 0/false/no/off"
    ]


def test_cli_takes_every_flag_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDER_")}
    env |= {
        "SEEDER_LISTEN": "127.0.0.1:0",
        "SEEDER_DATA_DIR": str(tmp_path / "data"),
        "SEEDER_PUSH_TOKEN": "env-token",
        "SEEDER_MAX_UPLOAD_RATE": "160Mbit",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "seeder.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the pytest timeout if it never comes
        assert line.startswith("seeder listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            assert r.read() == b"ok"
        req = urllib.request.Request(
            url + "/v1/names/team/app:v1",
            data=b'{"digest": "' + b"0" * 64 + b'"}',
            method="PUT",
            headers={"Authorization": "Bearer env-token"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 409  # the token was accepted; the manifest does not exist
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        _, err = proc.communicate(timeout=10)
        assert "20000000 B/s" in err and "env-token" not in err
        assert (tmp_path / "data" / "seeder.db").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- rate limit ------------------------------------------------------------


async def test_download_honours_max_upload_rate(seeder_proc: SeederFactory) -> None:
    """8 MiB at a 4 MiB/s cap cannot take less than ~1.9 s (0.4 MiB burst); floor only."""
    s = seeder_proc(max_upload_rate="4MiB")
    chunks = [make_chunk(os.urandom(4 << 20)) for _ in range(2)]
    async with client(s) as c:
        for d, enc, payload, size in chunks:
            await c.put_chunk(d, payload, enc, size)
        start = time.monotonic()
        got = await asyncio.gather(*(c.get_chunk(d) for d, *_ in chunks))
        elapsed = time.monotonic() - start
    assert [g[2] for g in got] == [p for _, _, p, _ in chunks]
    assert elapsed >= 1.5, f"8 MiB at 4 MiB/s took only {elapsed:.2f}s"


class FakeTime:
    """A clock that only moves when the bucket sleeps: deterministic, instant tests."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def sleep_and_yield(self, seconds: float) -> None:
        """As `sleep`, but lets other tasks run, as a real sleep would."""
        await self.sleep(seconds)
        await asyncio.sleep(0)


def test_bucket_reserve_is_exact() -> None:
    t = FakeTime()
    b = TokenBucket(1000, burst=500, clock=t.clock)
    assert b.reserve(500) == 0.0  # starts full
    assert b.reserve(250) == pytest.approx(0.25)  # exact deficit, no quanta
    assert b.reserve(250) == pytest.approx(0.5)  # queued behind the first debt
    t.now += 0.5
    assert b.tokens == pytest.approx(0.0)
    t.now += 10
    assert b.tokens == pytest.approx(500)  # refill capped at burst
    assert b.reserve(0) == 0.0


async def test_bucket_consume_paces_to_the_rate() -> None:
    t = FakeTime()
    b = TokenBucket(1 << 20, burst=64 << 10, clock=t.clock, sleep=t.sleep)
    start = t.now
    for _ in range(160):  # 10 MiB in 64 KiB slices
        await b.consume(64 << 10)
    assert t.now - start == pytest.approx((10 << 20) / (1 << 20) - 1 / 16)
    assert all(s > 0 for s in t.sleeps[1:])


async def test_bucket_concurrent_consumers_share_the_rate() -> None:
    t = FakeTime()
    b = TokenBucket(100, burst=0, clock=t.clock)
    delays = [b.reserve(50) for _ in range(4)]
    assert delays == pytest.approx([0.5, 1.0, 1.5, 2.0])


async def test_bucket_larger_than_burst_does_not_deadlock() -> None:
    t = FakeTime()
    b = TokenBucket(10, burst=1, clock=t.clock, sleep=t.sleep)
    await b.consume(101)
    assert t.sleeps == [pytest.approx(10.0)]


async def test_bucket_unlimited_and_rate_change() -> None:
    t = FakeTime()
    for rate in (None, 0):
        b = TokenBucket(rate, clock=t.clock, sleep=t.sleep)
        assert b.unlimited and b.rate is None
        await b.consume(1 << 40)
    assert t.sleeps == []
    b = TokenBucket(1000, clock=t.clock, sleep=t.sleep)
    assert b.burst == pytest.approx(100)  # default: 0.1 s worth
    b.set_rate(None)
    await b.consume(1 << 30)
    b.set_rate(2000, burst=0)
    assert b.reserve(1000) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        TokenBucket(-1)


async def test_bucket_refunds_a_cancelled_wait() -> None:
    t = FakeTime()

    async def never(_: float) -> None:
        await asyncio.Event().wait()

    b = TokenBucket(100, burst=100, clock=t.clock, sleep=never)
    assert b.reserve(100) == 0.0
    task = asyncio.ensure_future(b.consume(50))
    await asyncio.sleep(0)
    assert b.tokens == pytest.approx(-50)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.tokens == pytest.approx(0)


async def test_bucket_serves_waiters_by_priority_then_arrival() -> None:
    """While one caller pays off its debt, the rarest chunk's reader goes next; equal
    priorities keep their order; the aggregate rate is the same."""
    t = FakeTime()

    b = TokenBucket(100, burst=0, clock=t.clock, sleep=t.sleep_and_yield)
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await b.consume(50, priority)
        order.append(name)

    start = t.now
    await asyncio.gather(
        *(take(n, p) for n, p in [("first", 9), ("common", 5), ("rare", 1), ("common2", 5)])
    )
    assert order == ["first", "rare", "common", "common2"]
    assert t.now - start == pytest.approx(2.0)  # 200 bytes at 100/s, reordered, not slowed


async def test_bucket_priority_holds_for_streams_paying_slice_after_slice() -> None:
    """Two transfers read at once, each slice paid as it comes: the rarer is whole after
    its own bytes' time, not after both (turn-taking would finish them together)."""
    t = FakeTime()

    b = TokenBucket(100, burst=0, clock=t.clock, sleep=t.sleep_and_yield)
    whole: dict[str, float] = {}

    async def stream(name: str, priority: int) -> None:
        for _ in range(20):
            await b.consume(5, priority)
            await asyncio.sleep(0)  # the socket's next read
        whole[name] = t.now - start

    start = t.now
    await asyncio.gather(stream("common", 5), stream("rare", 1))
    assert whole["rare"] == pytest.approx(1.05)  # one slice of "common" went first
    assert whole["common"] == pytest.approx(2.0)  # 200 bytes at 100/s: nothing lost


async def test_bucket_waiters_cancelled_in_line_or_on_their_turn_pass_it_on() -> None:
    t = FakeTime()
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        t.now += seconds
        await gate.wait()

    b = TokenBucket(100, burst=0, clock=t.clock, sleep=sleep)
    queued: list[asyncio.Future[None]] = []

    async def pay() -> None:
        await b.consume(50)
        queued[0].cancel()  # its turn has just come, before it could run

    start = t.now
    payer = asyncio.ensure_future(pay())
    await asyncio.sleep(0)
    queued += [asyncio.ensure_future(b.consume(50, p)) for p in (1, 2, 3)]
    await asyncio.sleep(0)
    queued[1].cancel()  # in line
    gate.set()
    await payer
    await queued[2]  # served: neither cancelled waiter left it stranded
    for task in queued[:2]:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert t.now - start == pytest.approx(1.0)  # paid for the two that went, no more
    assert not b._waiting and not b._paying
