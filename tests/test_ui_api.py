"""The dashboard's JSON API (`/ui/api/`) and page, on a real `serve` (in process): what it shows
after real pulls, its actions, and every way an action is refused."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from _support import published_home, wait_cached

from p2pimg.content.cid import Cid
from p2pimg.node.config import load_config
from p2pimg.ops.sample import SampleImage
from p2pimg.web.serve import serve
from p2pimg.web.server import Request
from p2pimg.web.ui import Dashboard


@dataclass
class Served:
    base: str
    client: httpx.AsyncClient
    root: Cid
    token: str
    home: Path

    async def post(self, path: str, body: object, **headers: str) -> httpx.Response:
        sent = {"x-p2pimg-token": self.token, "content-type": "application/json", **headers}
        return await self.client.post(f"{self.base}{path}", json=body, headers=sent)

    async def get(self, path: str) -> Any:
        r = await self.client.get(f"{self.base}{path}")
        assert r.status_code == 200, r.text
        return r.json()


async def _start(
    nursery: trio.Nursery, tmp: Path, sample: SampleImage, name: str, **options: Any
) -> tuple[str, Path, Cid]:
    origin, root = await published_home(tmp, sample)
    home = tmp / name
    config = load_config(
        home=str(home), origin=origin.root.as_uri(), listen="127.0.0.1:0", mdns=False, **options
    )
    address = await nursery.start(serve, config)
    return f"http://{address}", home, root


@pytest.fixture
async def node(tmp_path: Path, sample: SampleImage, nursery: trio.Nursery) -> AsyncIterator[Served]:
    base, home, root = await _start(nursery, tmp_path, sample, "home", peer_listen="127.0.0.1:0")
    async with httpx.AsyncClient(timeout=30) as client:
        page = await client.get(f"{base}/ui/")
        token = re.search(r'name="p2pimg-token" content="([^"]+)"', page.text)
        assert token is not None, page.text[:500]
        yield Served(base, client, root, token[1], home)
    nursery.cancel_scope.cancel()


async def _wait(predicate: Any, what: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.02)


async def test_the_page_carries_a_fresh_token_and_a_strict_policy(node: Served) -> None:
    r = await node.client.get(f"{node.base}/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "{{TOKEN}}" not in r.text and node.token in r.text and len(node.token) >= 32
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert (await node.client.get(f"{node.base}/ui")).status_code == 308
    for name in ("app.js", "style.css"):
        r = await node.client.get(f"{node.base}/ui/static/{name}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", name
    for bad in ("../serve.py", "index.html", ".hidden.js", "nothing.js", "ui.py"):
        r = await node.client.get(f"{node.base}/ui/static/{bad}")
        assert r.status_code == 404, bad
    assert (await node.client.get(f"{node.base}/ui/api/nothing")).status_code == 404


async def test_a_rebound_host_name_gets_nothing(node: Served) -> None:
    """A page of another site whose name now resolves to 127.0.0.1 sends its own Host: refused,
    so it can neither read the token nor what the node holds."""
    for path in ("/ui/", "/ui/api/peers"):
        r = await node.client.get(f"{node.base}{path}", headers={"host": "attacker.example:5050"})
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    r = await node.client.get(f"{node.base}/ui/api/node", headers={"host": "localhost:5050"})
    assert r.status_code == 200


async def test_a_client_beyond_this_machine_is_refused(tmp_path: Path, sample: SampleImage) -> None:
    """The dashboard's handler given requests from a LAN address (with the right token and a
    loopback Host): everything is refused. (A test cannot connect from another address without a
    network namespace; this is the very handler the registry listener calls.)"""
    from p2pimg.node.node import open_node
    from p2pimg.web.peerapi import PeerService

    origin, _root = await published_home(tmp_path, sample)
    config = load_config(home=str(tmp_path / "home"), origin=origin.root.as_uri(), mdns=False)
    async with open_node(config) as node:
        dashboard = Dashboard(node, PeerService.for_node(node), registry="127.0.0.1:5050")
        for method, path in (("GET", "/ui/"), ("GET", "/ui/api/images"), ("POST", "/ui/api/gc")):
            headers = {"host": "127.0.0.1:5050", "x-p2pimg-token": dashboard.token}
            lan = Request(method, path, {}, headers, "10.1.2.3", "10.1.2.1", b"{}")
            assert (await dashboard.handle(lan)).status == 403, path
            here = Request(
                method,
                path,
                {},
                headers | {"content-type": "application/json"},
                "127.0.0.1",
                "127.0.0.1",
                b"{}",
            )
            assert (await dashboard.handle(here)).status == 200, path


async def test_node_images_transfers_and_cache_after_a_pull(node: Served) -> None:
    info = await node.get("/ui/api/node")
    assert info["registry"] == node.base.removeprefix("http://") and info["read_only"] is False
    assert info["tls"] is False and info["swarm_key"] is False and info["origin"].startswith("file://")

    images = (await node.get("/ui/api/images"))["images"]
    (image,) = [i for i in images if i["name"] == "demo/app"]
    assert image["tag"] == "1" and image["root"] == str(node.root) and image["kind"] == "published"
    assert image["size"] > 0 and image["blobs"] >= 2 and image["pinned"] is False

    manifest = (
        await node.client.get(
            f"{node.base}/v2/demo/app/manifests/1",
            headers={"accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    ).json()
    layer = max(manifest["layers"], key=lambda d: d["size"])
    r = await node.client.get(f"{node.base}/v2/demo/app/blobs/{layer['digest']}")
    assert r.status_code == 200 and len(r.content) == layer["size"]

    async def finished() -> bool:
        doc = await node.get("/ui/api/transfers")
        return any(t["digest"] == layer["digest"] for t in doc["finished"])

    await _wait(finished, "the layer's transfer to finish")
    doc = await node.get("/ui/api/transfers")
    (t,) = [t for t in doc["finished"] if t["digest"] == layer["digest"]]
    assert t["ok"] is True and t["error"] is None and t["repository"] == "demo/app"
    assert t["size"] == layer["size"] and t["have"] == t["chunks"] == len(t["map"])
    (origin,) = t["sources"]
    assert origin.startswith("origin file://") and t["bytes_by_source"] == {origin: layer["size"]}
    assert set(t["map"]) == {"0"} and t["ended"] >= t["started"]
    series = t["series"]["by_source"][origin]
    assert sum(series) == layer["size"] and t["series"]["step"] > 0

    await wait_cached_path(node, layer["digest"])

    async def counted() -> bool:
        images = (await node.get("/ui/api/images"))["images"]
        return any(i["name"] == "demo/app" and i["cached"] >= layer["size"] for i in images)

    await _wait(counted, "the image to count the cached layer")
    cache = await node.get("/ui/api/cache")
    assert cache["used"] >= layer["size"] and cache["limit"] is None and cache["blobs"] >= 1
    assert cache["evictions"] == 0


async def wait_cached_path(node: Served, digest: str) -> None:
    from p2pimg.store.chunks import ChunkStore

    await wait_cached(ChunkStore(node.home / "cache"), digest)


async def test_actions_are_refused_without_the_token_from_elsewhere_or_malformed(node: Served) -> None:
    url = f"{node.base}/ui/api/pin"
    body = {"ref": "demo/app:1"}
    cases = [
        ({"content-type": "application/json"}, 403),  # no token
        ({"content-type": "application/json", "x-p2pimg-token": "x" * 43}, 403),  # wrong token
        (
            {
                "content-type": "application/json",
                "x-p2pimg-token": node.token,
                "origin": "http://attacker.example",
            },
            403,
        ),
        ({"content-type": "text/plain", "x-p2pimg-token": node.token}, 400),  # a form could send this
    ]
    for headers, status in cases:
        r = await node.client.post(url, json=body, headers=headers)
        assert r.status_code == status, (headers, r.text)
        assert r.json()["errors"][0]["message"]
    # The listener's own origin is fine.
    r = await node.post("/ui/api/pin", body, origin=node.base)
    assert r.status_code == 200, r.text
    for bad in ({}, {"ref": 5}, {"ref": "no tag"}, {"ref": "ipfs/notacid"}, [1]):
        r = await node.post("/ui/api/pin", bad)
        assert r.status_code == 400, (bad, r.text)
    r = await node.client.post(
        f"{node.base}/ui/api/warm",
        content=b"{not json",
        headers={"x-p2pimg-token": node.token, "content-type": "application/json"},
    )
    assert r.status_code == 400
    r = await node.post("/ui/api/warm", {"ref": "demo/app:1", "lan": "yes"})
    assert r.status_code == 400
    r = await node.post("/ui/api/gc", {"max_size": [1]})
    assert r.status_code == 400
    r = await node.post("/ui/api/unpin", {"ref": "demo/app:nosuchtag"})
    assert r.status_code == 404
    assert (await node.client.get(f"{node.base}/ui/api/warm/nosuchjob")).status_code == 404


async def test_warm_pin_unpin_and_gc_from_the_api(node: Served) -> None:
    r = await node.post("/ui/api/warm", {"ref": "demo/app:1"})
    assert r.status_code == 202
    job = r.json()["id"]

    async def done() -> bool:
        status = await node.get(f"/ui/api/warm/{job}")
        assert status["state"] != "failed", status
        return bool(status["state"] == "done")

    await _wait(done, "the warm")
    status = await node.get(f"/ui/api/warm/{job}")
    assert status["blobs_done"] == status["blobs"] >= 2 and status["bytes_done"] == status["bytes"] > 0

    r = await node.post("/ui/api/pin", {"ref": "demo/app:1"})
    assert r.status_code == 200 and r.json()["root"] == str(node.root)
    images = (await node.get("/ui/api/images"))["images"]
    assert [i["pinned"] for i in images if i["name"] == "demo/app"] == [True]
    cache = await node.get("/ui/api/cache")
    assert cache["pinned"] == status["bytes"]

    # A pinned image survives a gc down to nothing.
    r = await node.post("/ui/api/gc", {"max_size": "0"})
    assert r.status_code == 200 and r.json()["removed"] == 0, r.text
    r = await node.post("/ui/api/unpin", {"ref": "demo/app:1"})
    assert r.status_code == 200 and r.json()["roots"] == [str(node.root)]
    r = await node.post("/ui/api/gc", {"max_size": "0"})
    assert r.status_code == 200 and r.json()["removed"] >= 2 and r.json()["freed"] >= status["bytes"]
    images = (await node.get("/ui/api/images"))["images"]
    assert [(i["pinned"], i["cached"]) for i in images if i["name"] == "demo/app"] == [(False, 0)]


async def test_read_only_mode_shows_but_acts_not(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    base, _home, _root = await _start(nursery, tmp_path, sample, "ro", ui_read_only=True)
    async with httpx.AsyncClient(timeout=30) as client:
        page = await client.get(f"{base}/ui/")
        assert 'name="p2pimg-read-only" content="1"' in page.text
        token = re.search(r'name="p2pimg-token" content="([^"]+)"', page.text)
        assert token is not None
        assert (await client.get(f"{base}/ui/api/node")).json()["read_only"] is True
        for path in ("/ui/api/warm", "/ui/api/pin", "/ui/api/unpin", "/ui/api/gc"):
            r = await client.post(
                f"{base}{path}", json={"ref": "demo/app:1"}, headers={"x-p2pimg-token": token[1]}
            )
            assert r.status_code == 403 and "read-only" in r.json()["errors"][0]["message"], path
    nursery.cancel_scope.cancel()


async def test_peers_of_a_two_node_swarm_and_bytes_both_ways(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """Node B pulls through its peer A, which already holds the image: A's dashboard counts the
    bytes it sent B, B's lists A (found statically) with the bytes A sent it."""
    from p2pimg.node.node import read_serve_info

    base_a, home_a, _root = await _start(nursery, tmp_path, sample, "a", peer_listen="127.0.0.1:0")
    info = read_serve_info(load_config(home=str(home_a)))
    assert info is not None
    peer_a = f"http://{info['peer']}"
    base_b, _home_b, _ = await _start(nursery, tmp_path, sample, "b", peers=[peer_a])
    async with httpx.AsyncClient(timeout=30) as client:
        token_a = re.search(
            r'name="p2pimg-token" content="([^"]+)"', (await client.get(f"{base_a}/ui/")).text
        )
        assert token_a is not None
        r = await client.post(
            f"{base_a}/ui/api/warm", json={"ref": "demo/app:1"}, headers={"x-p2pimg-token": token_a[1]}
        )
        job = r.json()["id"]
        with trio.fail_after(20):
            while (await client.get(f"{base_a}/ui/api/warm/{job}")).json()["state"] == "running":
                await trio.sleep(0.02)
        manifest = (
            await client.get(
                f"{base_b}/v2/demo/app/manifests/1",
                headers={"accept": "application/vnd.oci.image.manifest.v1+json"},
            )
        ).json()
        layer = max(manifest["layers"], key=lambda d: d["size"])
        r = await client.get(f"{base_b}/v2/demo/app/blobs/{layer['digest']}")
        assert r.status_code == 200 and len(r.content) == layer["size"]

        peers_b = (await client.get(f"{base_b}/ui/api/peers")).json()
        (peer,) = peers_b["peers"]
        assert peer["url"] == peer_a and peer["found"] == "static" and peer["state"] == "ok"
        assert peer["sent_us"] > 0
        peers_a = (await client.get(f"{base_a}/ui/api/peers")).json()
        assert peers_a["peers"] == []  # A was given no peers: B is only its client
        (b,) = peers_a["clients"]
        assert b["address"] == "127.0.0.1" and b["we_sent"] >= peer["sent_us"] > 0
        with trio.fail_after(20):  # the body is sent before the digest check ends the fetch
            while not [
                t
                for t in (await client.get(f"{base_b}/ui/api/transfers")).json()["finished"]
                if t["digest"] == layer["digest"]
            ]:
                await trio.sleep(0.02)
        transfers = (await client.get(f"{base_b}/ui/api/transfers")).json()
        (t,) = [t for t in transfers["finished"] if t["digest"] == layer["digest"]]
        assert any(s.startswith("peer ") for s in t["sources"])
    nursery.cancel_scope.cancel()


async def test_the_unix_socket_answers_its_owner_without_a_token(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    """`--ui-socket`: the registry and the dashboard on a unix socket of mode 0600, where an
    action needs no token (no browser page can connect to it); the file goes when serve stops."""
    import os
    import stat

    path = str(tmp_path / "p2pimg.sock")
    origin, root = await published_home(tmp_path, sample)
    config = load_config(
        home=str(tmp_path / "home"),
        origin=origin.root.as_uri(),
        listen="127.0.0.1:0",
        mdns=False,
        ui_socket=path,
    )
    async with trio.open_nursery() as inner:
        await inner.start(serve, config)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        transport = httpx.AsyncHTTPTransport(uds=path)
        async with httpx.AsyncClient(transport=transport, base_url="http://p2pimg", timeout=30) as client:
            assert (await client.get("/v2/")).status_code == 200
            assert (await client.get("/ui/api/node")).json()["node_id"]
            r = await client.post("/ui/api/pin", json={"ref": "demo/app:1"})
            assert r.status_code == 200 and r.json()["root"] == str(root), r.text
            assert [i["pinned"] for i in (await client.get("/ui/api/images")).json()["images"]] == [True]
        inner.cancel_scope.cancel()
    assert not os.path.exists(path)


async def test_names_that_only_look_like_addresses_are_refused(node: Served) -> None:
    """DNS rebinding with a name that starts like an address: refused; addresses written out
    (any IP, as when a node listens on 0.0.0.0 and is opened by its LAN address) are fine."""
    for host in ("127.evil.example:5050", "127.0.0.1.nip.io", "localhost.evil.example", ""):
        r = await node.client.get(f"{node.base}/ui/", headers={"host": host})
        assert r.status_code == 403, host
    for host in ("127.0.0.1:5050", "[::1]:5050", "localhost", "10.1.2.3:5050"):
        r = await node.client.get(f"{node.base}/ui/api/node", headers={"host": host})
        assert r.status_code == 200, host


async def test_the_nodes_other_control_endpoints_refuse_a_foreign_page(node: Served) -> None:
    """`/p2pimg/v1/warm` (what `p2pimg warm` uses) is on the same listener: a page of another
    site can send it neither a simple form POST, nor anything under its own Host or Origin."""
    url = f"{node.base}/p2pimg/v1/warm"
    body = b'{"ref": "demo/app:1"}'
    cases = [
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "application/json", "host": "attacker.example:5050"},
        {"content-type": "application/json", "origin": "http://attacker.example"},
    ]
    for headers in cases:
        r = await node.client.post(url, content=body, headers=headers)
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED", headers
    r = await node.client.post(url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text
    r = await node.client.get(f"{node.base}/p2pimg/v1/peers", headers={"host": "attacker.example"})
    assert r.status_code == 403


async def test_gc_from_the_dashboard_counts_its_evictions(node: Served) -> None:
    r = await node.post("/ui/api/warm", {"ref": "demo/app:1"})
    job = r.json()["id"]

    async def done() -> bool:
        return bool((await node.get(f"/ui/api/warm/{job}"))["state"] == "done")

    await _wait(done, "the warm")
    r = await node.post("/ui/api/gc", {"max_size": 0})
    removed, freed = r.json()["removed"], r.json()["freed"]
    assert removed >= 2
    cache = await node.get("/ui/api/cache")
    assert cache["evictions"] == removed and cache["evicted_bytes"] == freed
    assert cache["disk_size"] >= cache["disk_free"] > 0


async def test_a_peer_that_never_answers_is_shown_unreachable(
    tmp_path: Path, sample: SampleImage, nursery: trio.Nursery
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    base, _home, _root = await _start(nursery, tmp_path, sample, "lonely", peers=[dead])
    async with httpx.AsyncClient(timeout=30) as client:
        (peer,) = (await client.get(f"{base}/ui/api/peers")).json()["peers"]
        assert peer["url"] == dead and peer["state"] == "unreachable" and peer["sent_us"] == 0
    nursery.cancel_scope.cancel()


async def test_pulls_group_an_images_blobs_with_one_series(node: Served) -> None:
    manifest = (
        await node.client.get(
            f"{node.base}/v2/demo/app/manifests/1",
            headers={"accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    ).json()
    for layer in manifest["layers"]:
        r = await node.client.get(f"{node.base}/v2/demo/app/blobs/{layer['digest']}")
        assert r.status_code == 200

    async def grouped() -> bool:
        pulls = (await node.get("/ui/api/transfers"))["pulls"]
        return any(p["repository"] == "demo/app" and p["ended"] is not None for p in pulls)

    await _wait(grouped, "the pull to end")
    doc = await node.get("/ui/api/transfers")
    (pull,) = [p for p in doc["pulls"] if p["repository"] == "demo/app"]
    # The config, fetched on the node's first look at the image, before the client asked by
    # name, is part of the same pull.
    digests = {t["digest"]: t["size"] for t in doc["finished"] if t["id"] in pull["transfers"]}
    assert digests == {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
    total = sum(digests.values())
    assert pull["blobs"] == len(digests) and pull["size"] == total and pull["ok"] is True
    assert sum(pull["bytes_by_source"].values()) == total
    assert sum(sum(points) for points in pull["series"]["by_source"].values()) == total


async def test_a_second_node_does_not_take_a_live_socket_over(tmp_path: Path) -> None:
    from p2pimg.errors import ListenError
    from p2pimg.web.server import listen_unix

    path = str(tmp_path / "p2pimg.sock")
    first = await listen_unix(path)
    with pytest.raises(ListenError, match="another process"):
        await listen_unix(path)
    await first[0].aclose()  # gone, its file left behind: the next one takes the path
    second = await listen_unix(path)
    await second[0].aclose()
