"""Issue 6, security: the cluster token and TLS, with real processes on loopback.

Every listener (seeder, `distd run`, a swarm `distd pull`) refuses a request without
the cluster token with the same 401 whether or not the thing asked for exists; writes
still need the push token; the whole chain (push, assign, a fleet of two daemons, a
pull) works with the tokens, and again over TLS with a `trustme` CA; a client that
does not trust the CA fails in one clear line; no token ever reaches a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp.test_utils import TestClient, TestServer
from conftest import SeederProcess
from treeutil import snapshot

from distd.store import ChunkStore
from distd.swarm_pull import SwarmPull, SwarmPullConfig
from manifests.model import Encoding

pytestmark = pytest.mark.timeout(120)

CLUSTER = "cluster-" + secrets.token_hex(16)
PUSH = "push-" + secrets.token_hex(16)
WRONG = "cluster-" + secrets.token_hex(16)
NAME = "team/secret:v1"
ABSENT = "0" * 64
WAIT = 60.0
REFUSED = {"error": "missing or wrong token"}


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the cluster CA, what clients trust
    cert: Path  # server chain for 127.0.0.1 and localhost
    key: Path
    other_ca: Path  # a CA that signed nothing here

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    (d / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.pem"))
    return Pki(d / "ca.pem", d / "cert.pem", d / "key.pem", d / "other-ca.pem")


# -- processes ------------------------------------------------------------------------------


class Seeder(SeederProcess):
    """`seeder run` with a cluster token and optionally TLS; health checked over https too."""

    def __init__(self, data_dir: Path, pki: Pki | None, extra: tuple[str, ...]) -> None:
        self.pki = pki
        args = ("-v", "--cluster-token", CLUSTER, *extra)
        if pki is not None:
            args += ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
        super().__init__(data_dir, PUSH, None, args)

    @property
    def url(self) -> str:
        scheme = "https" if self.pki else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        ctx = self.pki.client() if self.pki else None
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=ctx) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class Daemon:
    """One `distd run -v` on a free port, learnt from its log."""

    def __init__(self, workdir: Path, node_id: str, cmd: list[str]) -> None:
        self.node_id = node_id
        self.log_path = workdir / f"{node_id}.log"
        self.data_dir = workdir / node_id
        self.url = ""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTD_")}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + WAIT
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{node_id} did not start:\n{self.log()}")
            m = re.search(r"listening on (https?://[\d.]+:\d+)", self.log())
            if m:
                self.url = m.group(1)
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Env:
    """Everything one test started, so its logs can be searched for secrets."""

    work: Path
    pki: Pki
    seeders: list[Seeder]
    daemons: list[Daemon]
    outputs: list[str]

    def seeder(self, tls: bool = False, *extra: str) -> Seeder:
        s = Seeder(self.work / f"seeder{len(self.seeders)}", self.pki if tls else None, extra)
        self.seeders.append(s)
        return s.start()

    def daemon(self, seeder: Seeder, node_id: str, *extra: str, tls: bool = False) -> Daemon:
        args = ["--cluster-token", CLUSTER, *extra]
        if tls:
            args += self.tls_args(server=True)
        cmd = [
            *module("distd.cli"),
            "run",
            "-v",
            "--seeder",
            seeder.url,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.work / node_id),
            "--node-id",
            node_id,
            "--labels",
            "role=secure",
            "--announce-interval",
            "0.5",
            *args,
        ]
        d = Daemon(self.work, node_id, cmd)
        self.daemons.append(d)
        return d

    def tls_args(self, server: bool) -> list[str]:
        args = ["--tls-ca", str(self.pki.ca)]
        if server:
            args += ["--tls-cert", str(self.pki.cert), "--tls-key", str(self.pki.key)]
        return args

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("DISTD_", "DIST_", "SEEDER"))
        }
        r = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=WAIT, env=env, check=False
        )
        self.outputs += [r.stdout, r.stderr]
        return r

    def manifests(self, seeder: Seeder, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*module("manifests.cli"), "--seeder", seeder.url, *args)

    def assert_no_secrets(self) -> None:
        texts = [s.log() for s in self.seeders] + [d.log() for d in self.daemons] + self.outputs
        for text in texts:
            for secret in (CLUSTER, PUSH, WRONG):
                assert secret not in text, f"a token leaked into a log:\n{text[-2000:]}"


def module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


@pytest.fixture
def env(tmp_path: Path, pki: Pki) -> Iterator[Env]:
    e = Env(tmp_path, pki, [], [], [])
    try:
        yield e
        e.assert_no_secrets()
    finally:
        # All at once and briefly: a seeder lets a node's long poll run out before it exits,
        # and these tests check logs, not shutdowns.
        procs = [d.proc for d in e.daemons] + [s.proc for s in e.seeders if s.proc]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for s in e.seeders:
            s.proc = None


def make_tree(root: Path, size: int = 600_000) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "blob").write_bytes(os.urandom(size))
    (root / "sub" / "text").write_bytes(b"customer data\n" * 1000)
    return root


def push(env: Env, seeder: Seeder, tree: Path, *extra: str) -> str:
    """Push with both tokens as an operator would; the manifest digest."""
    r = env.manifests(
        seeder,
        "--token",
        PUSH,
        "--cluster-token",
        CLUSTER,
        *extra,
        "push",
        str(tree),
        "--name",
        NAME,
        "--chunk-size",
        "64KiB",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    info = env.manifests(seeder, "--cluster-token", CLUSTER, *extra, "list", "--json")
    assert info.returncode == 0, info.stderr
    (row,) = json.loads(info.stdout)
    return str(row["digest"])


def wait_ready(daemons: list[Daemon], ctx: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + WAIT
    pending = list(daemons)
    while pending:
        d = pending[0]
        req = urllib.request.Request(d.url + "/v1/status", headers={"X-Cluster-Token": CLUSTER})
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            rows = json.load(r)["images"]
        if any(row["name"] == NAME and row["state"] == "ready" for row in rows):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"{d.node_id} not ready: {rows}\n{d.log()[-3000:]}")
        time.sleep(0.1)


# -- raw requests ---------------------------------------------------------------------------


async def call(
    url: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    ctx: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON body or the first bytes); a stream is read only so far."""
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.request(method, url + path, data=data, headers=hdrs, ssl=ctx or True) as r,
    ):
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.content.read(64)


NO_TOKEN: dict[str, str] = {}
WRONG_TOKEN = {"X-Cluster-Token": WRONG}
TOKEN_IN_WRONG_HEADER = {"Authorization": f"Bearer {CLUSTER}"}
WITH_TOKEN = {"X-Cluster-Token": CLUSTER}
PUSH_ONLY = {"Authorization": f"Bearer {PUSH}"}


def seeder_requests(digest: str, chunk: str, missing: str) -> list[tuple[str, str, Any]]:
    """Every seeder route but /healthz, once for something that exists and once not."""
    out: list[tuple[str, str, Any]] = []
    for d, c, name in ((digest, chunk, NAME), (missing, missing, "team/none:v1")):
        out += [
            ("POST", "/v1/chunks/missing", {"digests": [c]}),
            ("GET", f"/v1/chunks/{c}", None),
            ("PUT", f"/v1/chunks/{c}", None),
            ("GET", f"/v1/manifests/{d}", None),
            ("PUT", f"/v1/manifests/{d}", None),
            ("GET", f"/v1/names/{name}", None),
            ("PUT", f"/v1/names/{name}", {"digest": d}),
            ("POST", "/v1/assignments", {"name": name, "node": "n9"}),
            ("DELETE", "/v1/assignments", {"name": name, "selector": "role=secure"}),
        ]
    out += [
        ("GET", "/v1/names", None),
        ("GET", "/v1/assignments", None),
        ("GET", "/v1/assignments?node=n1&labels=role=secure", None),
        ("POST", "/v1/nodes/n1", {"labels": {"role": "secure"}, "wait": 0}),
        ("POST", "/v1/announce", {"image": digest, "node_id": "n9", "address": "x:1"}),
        ("GET", "/metrics", None),
        ("GET", "/v1/no-such-route", None),
    ]
    return out


# -- the seeder -----------------------------------------------------------------------------


async def test_seeder_refuses_every_request_without_the_cluster_token(env: Env) -> None:
    s = env.seeder()
    digest = push(env, s, make_tree(env.work / "tree"))
    assert (await call(s.url, "GET", f"/v1/manifests/{digest}", headers=WITH_TOKEN))[0] == 200
    status, chunks = await call(
        s.url, "POST", "/v1/chunks/missing", headers=WITH_TOKEN, body={"digests": [ABSENT]}
    )
    assert status == 200 and chunks["missing"] == [ABSENT]
    chunk = next(p.name.split(".")[0] for p in (s.data_dir / "chunks").rglob("*") if p.is_file())
    assert (await call(s.url, "GET", f"/v1/chunks/{chunk}?direct=1", headers=WITH_TOKEN))[0] == 200
    before = await call(s.url, "GET", "/v1/assignments", headers=WITH_TOKEN)

    for headers in (NO_TOKEN, WRONG_TOKEN, TOKEN_IN_WRONG_HEADER):
        for method, path, body in seeder_requests(digest, chunk, ABSENT):
            got = await call(s.url, method, path, headers=headers, body=body)
            assert got == (401, REFUSED), (method, path, headers.keys())

    # The cluster token alone reads but never writes.
    for method, path, body in seeder_requests(digest, chunk, ABSENT):
        status, _ = await call(s.url, method, path, headers=WITH_TOKEN, body=body)
        if method in ("PUT", "DELETE") or (path == "/v1/assignments" and method == "POST"):
            assert status == 401, (method, path)
        else:
            assert status in (200, 404), (method, path, status)
    assert await call(s.url, "GET", "/v1/assignments", headers=WITH_TOKEN) == before
    # /healthz stays open for probes.
    assert (await call(s.url, "GET", "/healthz"))[0] == 200
    # The push token stands in for the cluster token: the operator reads what it writes.
    assert (await call(s.url, "GET", f"/v1/names/{NAME}", headers=PUSH_ONLY))[0] == 200


def test_operator_cli_token_rules(env: Env) -> None:
    s = env.seeder()
    tree = make_tree(env.work / "tree")
    # A push needs only the push token ...
    r = env.manifests(s, "--token", PUSH, "push", str(tree), "--name", NAME, "--no-progress")
    assert r.returncode == 0, r.stderr
    # ... reads need one of the tokens ...
    r = env.manifests(s, "list")
    assert r.returncode == 1 and r.stderr.strip() == (
        "manifests: seeder needs the cluster token for this (401) and none was given"
    )
    r = env.manifests(s, "--cluster-token", WRONG, "inspect", NAME)
    assert r.returncode == 1 and r.stderr.strip() == "manifests: seeder refused the token (401)"
    r = env.manifests(s, "--cluster-token", CLUSTER, "inspect", NAME)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == NAME
    # ... and the cluster token does not make a write.
    r = env.manifests(s, "--cluster-token", CLUSTER, "assign", NAME, "--node", "n1")
    assert r.returncode == 1 and "(401)" in r.stderr
    assert env.manifests(s, "--token", PUSH, "assignments", "--json").stdout.strip() == "[]"


def test_a_token_never_shows_up_in_argument_errors(env: Env, tmp_path: Path) -> None:
    bad = "short secret"
    for cmd in (
        [
            *module("seeder.cli"),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
            "--push-token",
            "t",
            "--cluster-token",
            bad,
        ],
        [*module("distd.cli"), "run", "--seeder", "http://127.0.0.1:1", "--cluster-token", bad],
        [
            *module("distd.cli"),
            "pull",
            NAME,
            "--seeder",
            "http://x",
            "--dest",
            str(tmp_path / "d"),
            "--cluster-token",
            bad,
        ],
        [*module("manifests.cli"), "--cluster-token", bad, "list"],
    ):
        r = env.run(*cmd)
        assert r.returncode == 2, r.stderr
        assert "cluster token must be at least 16" in r.stderr
        assert bad not in r.stderr + r.stdout


# -- the daemons ----------------------------------------------------------------------------


async def test_fleet_of_two_with_tokens_and_peers_refuse_outsiders(env: Env) -> None:
    s = env.seeder(False, "--max-upload-rate", "4MiB")
    tree = make_tree(env.work / "tree", 2_000_000)
    digest = push(env, s, tree)
    a, b = env.daemon(s, "n1"), env.daemon(s, "n2")
    r = env.manifests(s, "--token", PUSH, "assign", NAME, "--selector", "role=secure")
    assert r.returncode == 0, r.stderr
    wait_ready([a, b])
    for d in (a, b):
        assert snapshot(d.data_dir / "images" / digest) == snapshot(tree)

    held = next(p.name.split(".")[0] for p in (a.data_dir / "chunks").rglob("*") if p.is_file())
    daemon_requests = [
        (f"/v1/chunks/{held}", f"/v1/chunks/{ABSENT}"),
        (f"/v1/swarm/{digest}/haves", f"/v1/swarm/{ABSENT}/haves"),
        ("/v1/status", "/v1/no-such-route"),
        ("/metrics", "/metrics"),
    ]
    for headers in (NO_TOKEN, WRONG_TOKEN, TOKEN_IN_WRONG_HEADER, PUSH_ONLY):
        for exists, absent in daemon_requests:
            for path in (exists, absent):
                assert await call(a.url, "GET", path, headers=headers) == (401, REFUSED), path
    # With the token the same requests are answered.
    assert (await call(a.url, "GET", f"/v1/chunks/{held}", headers=WITH_TOKEN))[0] == 200
    assert (await call(a.url, "GET", f"/v1/chunks/{ABSENT}", headers=WITH_TOKEN))[0] == 404
    status, head = await call(a.url, "GET", f"/v1/swarm/{digest}/haves", headers=WITH_TOKEN)
    assert status == 200 and b"bitfield" in head
    assert (await call(a.url, "GET", "/healthz"))[0] == 200


async def test_a_swarm_pull_serves_only_cluster_members(tmp_path: Path) -> None:
    """`distd pull` serves peers while it pulls: the same rule holds on its listener."""
    store = ChunkStore(tmp_path / "data")
    await store.put(*_chunk(b"held"))
    held = _chunk(b"held")[0]
    config = SwarmPullConfig(seeder="http://127.0.0.1:1", cluster_token=CLUSTER)
    async with TestClient(TestServer(SwarmPull(config, store, tmp_path).make_app())) as c:
        for headers in (NO_TOKEN, WRONG_TOKEN, TOKEN_IN_WRONG_HEADER):
            for path in (f"/v1/chunks/{held}", f"/v1/chunks/{ABSENT}", f"/v1/swarm/{ABSENT}/haves"):
                r = await c.get(path, headers=headers)
                assert (r.status, await r.json()) == (401, REFUSED), path
        assert (await c.get(f"/v1/chunks/{held}", headers=WITH_TOKEN)).status == 200
        assert (await c.get(f"/v1/chunks/{ABSENT}", headers=WITH_TOKEN)).status == 404


def _chunk(data: bytes) -> tuple[str, bytes, Encoding, int]:
    return hashlib.sha256(data).hexdigest(), data, Encoding.RAW, len(data)


def test_daemon_with_a_wrong_token_gets_nothing_and_says_why(env: Env) -> None:
    s = env.seeder()
    push(env, s, make_tree(env.work / "tree"))
    assert env.manifests(s, "--token", PUSH, "assign", NAME, "--node", "bad").returncode == 0
    d = env.daemon(s, "bad", "--cluster-token", WRONG)  # the later flag wins
    deadline = time.monotonic() + WAIT
    while "seeder refused the token (401)" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    assert not (d.data_dir / "images").exists() or not any((d.data_dir / "images").iterdir())


# -- TLS ------------------------------------------------------------------------------------


async def test_push_pull_and_swarm_over_tls(env: Env) -> None:
    s = env.seeder(True, "--max-upload-rate", "4MiB")
    assert s.url.startswith("https://")
    tree = make_tree(env.work / "tree", 2_000_000)
    digest = push(env, s, tree, "--tls-ca", str(env.pki.ca))

    # A two-daemon swarm: peers reach each other over https, verified against the CA.
    a = env.daemon(s, "t1", tls=True)
    b = env.daemon(s, "t2", tls=True)
    assert a.url.startswith("https://") and b.url.startswith("https://")
    r = env.manifests(
        s,
        "--token",
        PUSH,
        "--tls-ca",
        str(env.pki.ca),
        "assign",
        NAME,
        "--selector",
        "role=secure",
    )
    assert r.returncode == 0, r.stderr
    wait_ready([a, b], env.pki.client())
    for d in (a, b):
        assert snapshot(d.data_dir / "images" / digest) == snapshot(tree)
    from_peers = 0.0
    for d in (a, b):
        status, _ = await call(d.url, "GET", "/metrics", headers=WITH_TOKEN, ctx=env.pki.client())
        assert status == 200
        req = urllib.request.Request(d.url + "/metrics", headers=WITH_TOKEN)
        with urllib.request.urlopen(req, context=env.pki.client()) as resp:
            text = resp.read().decode()
        m = re.search(r'distd_received_bytes_total\{source="peer"\} (\S+)', text)
        from_peers += float(m.group(1)) if m else 0.0
    assert from_peers > 0, "no chunk crossed an https peer link"
    # Plain http to a TLS listener gets no answer at all.
    with pytest.raises(aiohttp.ClientError):
        await call(a.url.replace("https://", "http://"), "GET", "/healthz")

    # `distd pull` over TLS, serving its own peers over https meanwhile.
    dest = env.work / "pulled"
    r = env.run(
        *module("distd.cli"),
        "pull",
        NAME,
        "--seeder",
        s.url,
        "--dest",
        str(dest),
        "--data-dir",
        str(env.work / "pull-data"),
        "--cluster-token",
        CLUSTER,
        "--announce-interval",
        "0.5",
        *env.tls_args(server=True),
    )
    assert r.returncode == 0, r.stderr
    assert snapshot(dest) == snapshot(tree)


@pytest.mark.parametrize("ca", ["none", "other"])
def test_client_without_the_ca_fails_in_one_clear_line(env: Env, ca: str) -> None:
    s = env.seeder(True)
    trust = [] if ca == "none" else ["--tls-ca", str(env.pki.other_ca)]
    r = env.manifests(s, "--cluster-token", CLUSTER, *trust, "list")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"manifests: seeder at {s.url}: TLS certificate verify failed"), line
    r = env.run(
        *module("distd.cli"),
        "pull",
        NAME,
        "--seeder",
        s.url,
        "--dest",
        str(env.work / "d"),
        "--data-dir",
        str(env.work / "data"),
        "--cluster-token",
        CLUSTER,
        *trust,
    )
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "TLS certificate verify failed" in line, line


def test_plain_http_to_a_tls_seeder_says_so(env: Env) -> None:
    s = env.seeder(True)
    url = s.url.replace("https://", "http://")
    r = env.run(*module("manifests.cli"), "--seeder", url, "--cluster-token", CLUSTER, "list")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"manifests: seeder at {url} closed the connection (if it serves TLS, use an https:// URL)"
    )


def test_bad_tls_files_are_one_line_errors(env: Env, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases: list[tuple[list[str], Callable[[str], bool]]] = [
        (
            [
                *module("seeder.cli"),
                "run",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "s"),
                "--push-token",
                "t",
                "--tls-cert",
                str(junk),
                "--tls-key",
                str(junk),
            ],
            lambda e: e.startswith("seeder: cannot load --tls-cert/--tls-key"),
        ),
        (
            [*module("distd.cli"), "run", "--seeder", "https://127.0.0.1:1", "--tls-ca", str(junk)],
            lambda e: e.startswith("distd: cannot load --tls-ca"),
        ),
        (
            [*module("manifests.cli"), "--tls-ca", str(junk), "list"],
            lambda e: e.startswith("manifests: cannot load --tls-ca"),
        ),
    ]
    for cmd, ok in cases:
        r = env.run(*cmd)
        assert r.returncode == 1, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert ok(line), line
    with contextlib.suppress(FileNotFoundError):
        junk.unlink()


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [
        ("0.0.0.0", None, True),
        ("10.1.2.3", None, True),
        ("node7.example", None, True),
        ("0.0.0.0", "a-cluster-token-of-16+", False),
        ("127.0.0.1", None, False),
        ("127.3.4.5", None, False),
        ("::1", None, False),
        ("localhost", None, False),
    ],
)
def test_a_reachable_listener_without_a_cluster_token_is_warned_about(
    host: str, token: str | None, warned: bool
) -> None:
    """The token stays optional (loopback tests, the demo), but a listener others can reach
    without one says so in the log at start."""
    from distd.httpserver import open_listener_warning

    warning = open_listener_warning(host, token)
    assert (warning is not None) is warned
    if warning:
        assert host in warning and "--cluster-token" in warning and "\n" not in warning
