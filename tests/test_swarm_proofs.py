"""Swarm-key proofs at a real peer listener, in process: a proof is good once, for one method,
path and body, within 30 s of the listener's clock.

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

import pytest
import trio
import trustme
from _support import published_home

from p2pimg.node.config import load_config
from p2pimg.node.node import Node, open_node, peer_client
from p2pimg.node.swarmkey import sign
from p2pimg.ops.sample import SampleImage
from p2pimg.web.peerapi import PeerService
from p2pimg.web.server import serve_connection, serve_http

KEY = b"a-swarm-key-for-these-tests-0123456789"
WARM = "/p2pimg/v1/warm"


@asynccontextmanager
async def keyed_listener(
    tmp_path: Path, sample: SampleImage, monkeypatch: pytest.MonkeyPatch, wiring: str
) -> AsyncIterator[tuple[Node, str, str]]:
    """A node with a swarm key behind its peer listener: (node, base URL, image root CID)."""
    home = tmp_path / "home"
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
        proof = sign(KEY, "POST", WARM, body)
        evil = json.dumps({"ref": "someone/else:1"}).encode()
        altered = await plain.post(f"{base}{WARM}", content=evil, headers={"authorization": proof})
        assert altered.status_code == 403 and "body" in altered.json()["errors"][0]["message"]
        assert len(node.warm.jobs) == 1
        # A proof for one path or method, used for another.
        other = await plain.get(
            f"{base}/p2pimg/v1/have/sha256:{'0' * 64}",
            headers={"authorization": sign(KEY, "GET", "/p2pimg/v1/info")},
        )
        assert other.status_code == 403

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
