"""The have-stream server (`HaveHub`) in-process, over real HTTP on loopback: what each
follower is sent, given what it is known to hold."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web
from treeutil import build_manifest

from distd import peer_server
from distd.catalog import Catalog
from distd.httpserver import middlewares
from distd.peer_server import MAX_NEIGHBOURS, HaveHub
from distd.store import ChunkStore
from distd.swarm import bitfield

CS = 64 << 10


@dataclass
class _Swarm:
    """What `HaveHub` asks of a node's download of the image (see peer_server.Swarm)."""

    known: dict[str, int]
    followed_back: list[str] = field(default_factory=list)

    def add_peer(self, node_id: str, address: str, zone: str) -> None:
        self.followed_back.append(node_id)

    def known_have(self, node_id: str) -> int | None:
        return self.known.get(node_id)


async def _messages(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every message of a have-stream, until the server ends it."""
    unpacker = msgpack.Unpacker(raw=False)
    async for data in resp.content.iter_any():
        unpacker.feed(data)
    return list(unpacker)


async def _serve(hub: HaveHub) -> tuple[web.AppRunner, int]:
    app = web.Application(middlewares=middlewares(None))
    app.router.add_get("/v1/swarm/{image}/haves", hub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def test_followers_are_not_told_what_they_are_known_to_hold(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * CS))
    manifest, raw = build_manifest(src, CS)
    store = ChunkStore(tmp_path / "data")
    catalog = Catalog(tmp_path / "data", store)
    image = catalog.add(manifest.digest, manifest)
    # As the daemon knows them from following each back: "some" holds chunk 1, "all"
    # holds every chunk, "new" is not followed (unknown).
    swarm = _Swarm({"some": 1 << 1, "all": bitfield.full(3)})
    hub = HaveHub(catalog, swarms={image.digest: swarm})
    runner, port = await _serve(hub)
    url = f"http://127.0.0.1:{port}/v1/swarm/{manifest.digest}/haves"
    try:
        async with aiohttp.ClientSession() as http:
            streams = {}
            for node in ("some", "all", "new"):
                params = {"node": node, "address": f"127.0.0.1:{port}"}
                streams[node] = await http.get(url, params=params)
                first = msgpack.unpackb(await streams[node].content.readany(), raw=False)
                assert first == ["bitfield", bitfield.to_bytes(0, 3)]
            for chunk in manifest.chunks[:2]:
                await store.put(chunk.digest, raw[chunk.digest], "raw", chunk.size)
            hub.busy(asyncio.get_running_loop().time() + 0.5)
            await asyncio.sleep(0)  # let the writers send before the streams end
            hub.close()
            got = {node: await _messages(resp) for node, resp in streams.items()}
    finally:
        await runner.cleanup()

    def haves(msgs: list[Any]) -> list[int]:
        return sorted(i for kind, body in msgs if kind == "have" for i in body)

    def busy(msgs: list[Any]) -> int:
        return sum(1 for kind, _ in msgs if kind == "busy")

    assert haves(got["new"]) == [0, 1] and busy(got["new"]) == 1
    assert haves(got["some"]) == [0] and busy(got["some"]) == 1  # it lacks chunk 0
    assert got["all"] == []  # it holds all we have: neither news is of use to it
    assert swarm.followed_back == ["some", "all", "new"]  # each follower followed back


async def test_a_follower_beyond_the_cap_is_refused_and_not_followed_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream's end is seen at its next write: the keepalive, shortened here.
    monkeypatch.setattr(peer_server, "KEEPALIVE_SECONDS", 0.05)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(CS))
    manifest, _ = build_manifest(src, CS)
    catalog = Catalog(tmp_path / "data", ChunkStore(tmp_path / "data"))
    image = catalog.add(manifest.digest, manifest)
    swarm = _Swarm({})
    hub = HaveHub(catalog, swarms={image.digest: swarm})
    runner, port = await _serve(hub)
    url = f"http://127.0.0.1:{port}/v1/swarm/{manifest.digest}/haves"

    async def follow(node: str) -> aiohttp.ClientResponse:
        return await http.get(url, params={"node": node, "address": f"127.0.0.1:{port}"})

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            streams = [await follow(f"n{i}") for i in range(MAX_NEIGHBOURS)]
            assert all(r.status == 200 for r in streams)
            extra = await follow("extra")
            assert extra.status == 503
            assert "followers" in (await extra.json())["error"]
            assert "extra" not in swarm.followed_back and hub.count == MAX_NEIGHBOURS
            streams.pop().close()  # one leaves: its place is free again
            for _ in range(200):
                if hub.count < MAX_NEIGHBOURS:
                    break
                await asyncio.sleep(0.01)
            again = await follow("extra")
            assert again.status == 200 and swarm.followed_back[-1] == "extra"
            streams.append(again)
            hub.close()
            for r in streams:
                r.close()
    finally:
        await runner.cleanup()
