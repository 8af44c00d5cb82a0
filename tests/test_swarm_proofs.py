"""Swarm-key proofs at a real peer listener, in process: a proof is good once, at the node it
names, for one method, path and body, within 30 s of the listener's clock.

The listener is wired as `serve` wires it (the head checked by the server's gate before the body
is read, the body by the handler), the same behind mutual TLS, and as a bare handler (both
checked by the handler).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from _support import published_home

from p2pimg.node.config import load_config
from p2pimg.node.node import Node, open_node, peer_client
from p2pimg.node.swarmkey import INFO_PATH, NODE_HEADER, OTHER_NODE, SwarmAuth, sign, vouched_node
from p2pimg.ops.sample import SampleImage
from p2pimg.web.peerapi import PeerService
from p2pimg.web.server import Request, Response, serve_connection, serve_http

KEY = b"a-swarm-key-for-these-tests-0123456789"
WARM = "/p2pimg/v1/warm"


@asynccontextmanager
async def keyed_listener(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch, wiring: str, name: str = "home"
) -> AsyncIterator[tuple[Node, str, str]]:
    """A node with a swarm key behind its peer listener: (node, base URL, image root CID)."""
    home = tmp_path / name
    _origin, root = await published_home(home, sample)
    monkeypatch.setenv("P2PIMG_SWARM_KEY", KEY.decode())
    if wiring == "tls":  # the node's certificate and the swarm CA in the home: mutual TLS
        ca, tls_dir = trustme.CA(), home / "tls"
        tls_dir.mkdir()
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(tls_dir / "peer.crt"))
        leaf.private_key_pem.write_to_path(str(tls_dir / "peer.key"))
        ca.cert_pem.write_to_path(str(tls_dir / "ca.crt"))
    async with open_node(load_config(home=str(home), mdns=False)) as node:
        peers = PeerService.for_node(node)
        if wiring in ("gate", "tls"):  # as `serve` does
            tls = node.tls.server_context() if node.tls is not None else None
            listeners = await node.nursery.start(
                trio.serve_listeners,
                serve_connection(peers.handle, tls, gate=peers.gate),
                await trio.open_tcp_listeners(0, host="127.0.0.1"),
            )
        else:
            listeners = await node.nursery.start(serve_http, peers.handle, "127.0.0.1", 0)
        scheme = "https" if wiring == "tls" else "http"
        yield node, f"{scheme}://127.0.0.1:{listeners[0].socket.getsockname()[1]}", str(root)
        node.nursery.cancel_scope.cancel()


@pytest.mark.parametrize("wiring", ["gate", "tls", "handler"])
async def test_replays_altered_requests_and_stale_proofs_are_refused(
    tmp_path: Path,
    sample: SampleImage,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    wiring: str,
) -> None:
    async with (
        keyed_listener(tmp_path, sample, monkeypatch, wiring) as (node, base, root),
        peer_client(KEY, node.tls) as keyed,
        peer_client(None, node.tls) as plain,
    ):
        # `plain` sends no proof of its own (with TLS, it holds the swarm's certificate).
        assert (node.tls is not None) == (wiring == "tls")
        # A keyed node's requests go through, each with a fresh proof.
        info = await keyed.get(f"{base}/p2pimg/v1/info")
        assert info.status_code == 200 and info.json()["node"] == node.node_id
        assert (await keyed.get(f"{base}/p2pimg/v1/info")).status_code == 200
        body = json.dumps({"ref": f"ipfs/{root}"}).encode()
        started = await keyed.post(f"{base}{WARM}", content=body)
        assert started.status_code == 202, started.text
        assert len(node.warm.jobs) == 1

        # Captured and sent again: refused, for a GET and for a POST with its very body.
        proof = info.request.headers["authorization"]
        again = await plain.get(f"{base}/p2pimg/v1/info", headers={"authorization": proof})
        assert again.status_code == 403 and "replayed" in again.json()["errors"][0]["message"]
        again = await plain.post(
            f"{base}{WARM}", content=body, headers={"authorization": started.request.headers["authorization"]}
        )
        assert again.status_code == 403 and len(node.warm.jobs) == 1

        # A proof for one body, sent with another: refused, and no warm job starts.
        proof = sign(KEY, "POST", WARM, body, to=node.node_id)
        evil = json.dumps({"ref": "someone/else:1"}).encode()
        altered = await plain.post(f"{base}{WARM}", content=evil, headers={"authorization": proof})
        assert altered.status_code == 403 and "body" in altered.json()["errors"][0]["message"]
        assert len(node.warm.jobs) == 1
        # A proof for one path or method, used for another.
        other = await plain.get(
            f"{base}/p2pimg/v1/have/sha256:{'0' * 64}",
            headers={"authorization": sign(KEY, "GET", "/p2pimg/v1/info", to=node.node_id)},
        )
        assert other.status_code == 403 and "wrong swarm key" in other.json()["errors"][0]["message"]

        # Stamped more than 30 s from the listener's clock, either way.
        for skew in (-45, 45):
            stale = await plain.get(
                f"{base}/p2pimg/v1/info",
                headers={"authorization": sign(KEY, "GET", "/p2pimg/v1/info", now=time.time() + skew)},
            )
            assert stale.status_code == 403 and "clock" in stale.json()["errors"][0]["message"]
        # No proof, or one without the key.
        assert (await plain.get(f"{base}/p2pimg/v1/info")).status_code == 401
        forged = sign(b"not-the-swarm-key-but-long-enough", "GET", "/p2pimg/v1/info")
        denied = await plain.get(f"{base}/p2pimg/v1/info", headers={"authorization": forged})
        assert denied.status_code == 403
        # A fresh proof made by hand is as good as the client's.
        fresh = await plain.get(
            f"{base}/p2pimg/v1/info", headers={"authorization": sign(KEY, "GET", "/p2pimg/v1/info")}
        )
        assert fresh.status_code == 200
    # Refusals of proofs made with the key (replays, altered bodies, clocks apart) are logged as
    # warnings, at most once a minute; strangers' are not.
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "p2pimg.web.peerapi"
    ]
    assert len(warned) == 1 and "made with the swarm key: replayed" in warned[0]


def _message(r: httpx.Response) -> str:
    return str(r.json()["errors"][0]["message"])


@pytest.mark.parametrize("wiring", ["gate", "handler"])
async def test_a_request_captured_on_its_way_to_one_node_is_refused_by_the_others(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch, wiring: str
) -> None:
    """Two nodes of one swarm (one key, two node ids): a request made for A and captured is
    refused by B, which never saw its nonce, and taken by A once."""
    async with (
        keyed_listener(tmp_path, sample, monkeypatch, wiring, "a") as (a, a_url, root),
        keyed_listener(tmp_path, sample, monkeypatch, wiring, "b") as (b, b_url, _root),
        peer_client(KEY, None) as keyed,
        peer_client(None, None) as plain,
    ):
        assert a.node_id != b.node_id
        body = json.dumps({"ref": f"ipfs/{root}"}).encode()
        started = await keyed.post(f"{a_url}{WARM}", content=body)
        assert started.status_code == 202, started.text
        # The client did not know A yet: it asked (a HEAD of /info naming no node), then named A.
        assert [(r.request.method, r.request.url.path) for r in started.history] == [("HEAD", INFO_PATH)]
        proof = started.request.headers["authorization"]
        assert f",to={a.node_id}," in proof
        have = await keyed.get(f"{a_url}/p2pimg/v1/have/sha256:{'0' * 64}")
        assert have.status_code == 404 and not have.history  # let in: A holds nothing of it

        for method, path, content, sent in (
            ("POST", WARM, body, started),
            ("GET", have.request.url.path, b"", have),
        ):
            captured = {"authorization": sent.request.headers["authorization"]}
            # Sent to B: refused, and B asks the sender to find out who it is.
            elsewhere = await plain.request(method, f"{b_url}{path}", content=content, headers=captured)
            assert elsewhere.status_code == 403 and "another node" in _message(elsewhere)
            assert elsewhere.headers.get_list("www-authenticate") == [OTHER_NODE]
            # Sent to A again: a replay.
            again = await plain.request(method, f"{a_url}{path}", content=content, headers=captured)
            assert again.status_code == 403 and "replayed" in _message(again)
        assert len(a.warm.jobs) == 1 and len(b.warm.jobs) == 0

        # A proof naming no node: good for /info only, whose answer names the node to the asker.
        for method in ("GET", "HEAD"):
            asked = sign(KEY, method, INFO_PATH)
            info = await plain.request(method, f"{b_url}{INFO_PATH}", headers={"authorization": asked})
            assert info.status_code == 200
            assert vouched_node(KEY, asked, info.headers.get(NODE_HEADER)) == b.node_id
            assert vouched_node(KEY, sign(KEY, method, INFO_PATH), info.headers.get(NODE_HEADER)) is None
        for method, path, content in (("POST", WARM, body), ("GET", have.request.url.path, b"")):
            nameless = {"authorization": sign(KEY, method, path, content)}
            refused = await plain.request(method, f"{b_url}{path}", content=content, headers=nameless)
            assert refused.status_code == 403 and "no node" in _message(refused)
        assert len(b.warm.jobs) == 0
        # A keyed client learns B the same way it learnt A, and is let in.
        assert (await keyed.post(f"{b_url}{WARM}", content=body)).status_code == 202
        assert isinstance(keyed.auth, SwarmAuth)
        assert keyed.auth.node_at(a_url) == a.node_id and keyed.auth.node_at(b_url) == b.node_id


async def test_a_client_follows_another_node_taking_over_an_address(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One address, A's listener, then B's (a node restarted with a new home, another pod at a
    reused address): the keyed client's proof for A is refused, it asks again and is let in."""
    async with (
        keyed_listener(tmp_path, sample, monkeypatch, "gate", "a") as (a, _a_url, _root),
        keyed_listener(tmp_path, sample, monkeypatch, "gate", "b") as (b, _b_url, _root2),
        peer_client(KEY, None) as keyed,
    ):
        services = [PeerService.for_node(a), PeerService.for_node(b)]

        async def handle(request: Request) -> Response:
            return await services[0].handle(request)

        listeners = await a.nursery.start(
            trio.serve_listeners,
            serve_connection(handle, None, gate=lambda request: services[0].gate(request)),
            await trio.open_tcp_listeners(0, host="127.0.0.1"),
        )
        base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        info = await keyed.get(f"{base}{INFO_PATH}")
        assert info.status_code == 200 and info.json()["node"] == a.node_id
        have = f"{base}/p2pimg/v1/have/sha256:{'0' * 64}"
        assert (await keyed.get(have)).status_code == 404
        services.pop(0)  # B answers at A's address from now on
        moved = await keyed.get(have)
        assert moved.status_code == 404  # let in by B
        assert [(r.status_code, r.request.method) for r in moved.history] == [(403, "GET"), (200, "HEAD")]
        assert f",to={b.node_id}," in moved.request.headers["authorization"]
        assert (await keyed.get(f"{base}{INFO_PATH}")).json()["node"] == b.node_id
