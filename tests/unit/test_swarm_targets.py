"""Swarm-key proofs name the node they are for: a request captured on the LAN cannot be replayed
to another node of the swarm (which never saw its nonce). The sender learns each peer's node id
from its /info answer, which proves the id with the key, for that request only.

`FakePeer` answers as the peer listener does (`PeerService.gate`/`handle`), behind an
`httpx.MockTransport`, to follow `SwarmAuth`'s exchanges one by one; tests/test_swarm_proofs.py
runs the same against real listeners.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx

from p2pimg.node.swarmkey import (
    INFO_PATH,
    NODE_HEADER,
    OTHER_NODE,
    SCHEME,
    SwarmAuth,
    SwarmGuard,
    sign,
    vouched_node,
)

KEY = b"0123456789abcdef0123456789abcdef"
A = "a" * 32  # node ids
B = "b" * 32
HAVE = f"/p2pimg/v1/have/sha256:{'0' * 64}"
WARM = "/p2pimg/v1/warm"
PEER = "http://10.0.0.5:5051"


def _target(header: str | None) -> str | None:
    """The node a proof names ("" for none), None without a proof."""
    if not header or "to=" not in header:
        return None
    return header.partition("to=")[2].partition(",")[0]


class FakePeer:
    """A peer listener of node `node_id` with the swarm key `key` (None: an open peer)."""

    def __init__(self, node_id: str, key: bytes | None = KEY, *, says: str | None = None) -> None:
        self.guard = SwarmGuard(key, node_id) if key is not None else None
        self.says = says  # a node id its /info claims, proven with the key, other than its own
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, the node named)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization")
        self.seen.append((request.method, request.url.path, _target(header)))
        if self.guard is None:
            return httpx.Response(200, json={"open": True})
        verdict = self.guard.admit(header, request.method, request.url.path)
        if verdict.ok:
            verdict = self.guard.body_matches(header, request.content)
        if not verdict.ok:
            headers = {}
            if verdict.status == 401:
                headers["www-authenticate"] = SCHEME
            elif verdict.other_node:
                headers["www-authenticate"] = OTHER_NODE
            return httpx.Response(verdict.status, headers=headers, json={"reason": verdict.reason})
        headers = {}
        if request.url.path == INFO_PATH:
            vouch = self.guard.vouch(header)
            assert vouch is not None
            if self.says is not None:  # a member of the swarm lying about who it is
                nonce = header.partition("nonce=")[2][:32] if header else ""
                mac = hmac.new(
                    KEY, f"p2pimg-swarm/3/node\n{nonce}\n{self.says}".encode(), hashlib.sha256
                ).hexdigest()
                vouch = f"node={self.says},sig={mac}"
            headers[NODE_HEADER] = vouch
        return httpx.Response(200, headers=headers, json={"ok": True})


class Address:
    """One peer address, whose listener can be swapped (a node replaced by another)."""

    def __init__(self, peer: FakePeer) -> None:
        self.peer = peer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.peer(request)


def _client(address: Address) -> httpx.Client:
    return httpx.Client(auth=SwarmAuth(KEY), transport=httpx.MockTransport(address))


# The guard: the node named, and no other.


def test_a_proof_is_good_at_the_node_it_names_only() -> None:
    a, b = SwarmGuard(KEY, A), SwarmGuard(KEY, B)  # two nodes of one swarm
    for method, path in (("GET", HAVE), ("POST", WARM), ("GET", INFO_PATH)):
        proof = sign(KEY, method, path, to=A)
        # Captured on its way to A and sent to B, which never saw its nonce: refused.
        refused = b.admit(proof, method, path)
        assert refused.status == 403 and refused.other_node and refused.signed
        assert "another node" in refused.reason
        assert b.remembered == 0
        # At A, good once.
        assert a.admit(proof, method, path).ok
        replay = a.admit(proof, method, path)
        assert replay.status == 403 and "replayed" in replay.reason and not replay.other_node
    # The node named is signed: changed, the proof does not hold.
    forged = sign(KEY, "GET", HAVE, to=A).replace(f"to={A}", f"to={B}")
    assert b.admit(forged, "GET", HAVE).reason == "wrong swarm key"


def test_a_proof_naming_no_node_is_good_for_info_only() -> None:
    guard = SwarmGuard(KEY, B)
    for method in ("GET", "HEAD"):
        assert guard.admit(sign(KEY, method, INFO_PATH), method, INFO_PATH).ok
    for method, path in (
        ("GET", HAVE),
        ("POST", WARM),
        ("GET", f"{WARM}/0123"),
        ("POST", INFO_PATH),
        ("GET", f"{INFO_PATH}/x"),
        ("GET", "/ipfs/bafkqaaa"),
    ):
        refused = guard.admit(sign(KEY, method, path), method, path)
        assert refused.status == 403 and refused.other_node, (method, path)
        assert "no node" in refused.reason
    assert guard.remembered == 2  # only the two /info proofs


def test_version_2_proofs_are_refused() -> None:
    """A version 2 proof (no node named) would reopen the replay to other nodes: refused, even
    made with the key."""
    ts, nonce, body = 1_800_000_000_000, "0" * 32, hashlib.sha256(b"").hexdigest()
    message = f"p2pimg-swarm/2\nGET\n{ts}\n{nonce}\n{body}\n{INFO_PATH}"
    sig = hmac.new(KEY, message.encode(), hashlib.sha256).hexdigest()
    v2 = f"{SCHEME} v=2,ts={ts},nonce={nonce},body={body},sig={sig}"
    refused = SwarmGuard(KEY, A, clock=lambda: ts / 1000).admit(v2, "GET", INFO_PATH)
    assert refused.status == 403 and "version 2" in refused.reason and "this version" in refused.reason


def test_an_info_answer_proves_the_node_for_its_request_only() -> None:
    guard = SwarmGuard(KEY, B)
    asked = sign(KEY, "GET", INFO_PATH)
    assert guard.admit(asked, "GET", INFO_PATH).ok
    answer = guard.vouch(asked)
    assert answer is not None and vouched_node(KEY, asked, answer) == B
    # Not for another request (a captured answer, replayed to another asker), not under
    # another key, not with the node changed.
    assert vouched_node(KEY, sign(KEY, "GET", INFO_PATH), answer) is None
    assert vouched_node(b"another key of enough length!!", asked, answer) is None
    assert vouched_node(KEY, asked, answer.replace(B, A)) is None
    assert vouched_node(KEY, asked, None) is None
    assert vouched_node(KEY, asked, "node=x") is None
    assert guard.vouch(None) is None and guard.vouch("Bearer x") is None


# The sender: learning the node at each address.


def test_the_first_request_to_a_peer_asks_who_it_is() -> None:
    address = Address(FakePeer(A))
    with _client(address) as client:
        r = client.post(PEER + WARM, content=b'{"ref": "demo/app:1"}')
        assert r.status_code == 200
        assert [x.request.method for x in r.history] == ["HEAD"]
        assert client.get(PEER + HAVE).status_code == 200  # known by now: no asking
        assert client.get(PEER + INFO_PATH).status_code == 200
    assert address.peer.seen == [
        ("HEAD", INFO_PATH, ""),
        ("POST", WARM, A),
        ("GET", HAVE, A),
        ("GET", INFO_PATH, A),
    ]


def test_an_info_request_teaches_the_node_without_asking() -> None:
    """As a static peer's first /info check does (Swarm._check_static, DNS peers' probes)."""
    address = Address(FakePeer(A))
    with _client(address) as client:
        info = client.get(PEER + INFO_PATH)
        assert info.status_code == 200 and not info.history
        assert isinstance(client.auth, SwarmAuth) and client.auth.node_at(PEER + "/x") == A
        assert client.get(PEER + HAVE).status_code == 200
    assert address.peer.seen == [("GET", INFO_PATH, ""), ("GET", HAVE, A)]


def test_a_node_replaced_at_its_address_is_asked_again() -> None:
    address = Address(FakePeer(A))
    with _client(address) as client:
        assert client.get(PEER + HAVE).status_code == 200
        address.peer = FakePeer(B)  # another node now listens there (a new home, a new pod)
        r = client.get(PEER + HAVE)
        assert r.status_code == 200
        assert [(x.status_code, x.request.method) for x in r.history] == [(403, "GET"), (200, "HEAD")]
    assert address.peer.seen == [("GET", HAVE, A), ("HEAD", INFO_PATH, ""), ("GET", HAVE, B)]


def test_a_node_replaced_is_retried_for_an_info_request_too() -> None:
    address = Address(FakePeer(A))
    with _client(address) as client:
        assert client.get(PEER + INFO_PATH).status_code == 200
        address.peer = FakePeer(B)
        info = client.get(PEER + INFO_PATH)
        assert info.status_code == 200 and info.headers[NODE_HEADER].startswith(f"node={B},")
    assert address.peer.seen == [("GET", INFO_PATH, A), ("GET", INFO_PATH, "")]


def test_a_refused_request_is_sent_again_once_at_most() -> None:
    """A member that names itself wrongly is asked once more per request, never in a loop."""
    address = Address(FakePeer(B, says=A))
    with _client(address) as client:
        for _ in range(2):
            r = client.get(PEER + HAVE)
            assert r.status_code == 403 and OTHER_NODE in r.headers.get_list("www-authenticate")
    first = [("HEAD", INFO_PATH, ""), ("GET", HAVE, A)]
    again = [("GET", HAVE, A), ("HEAD", INFO_PATH, ""), ("GET", HAVE, A)]
    assert address.peer.seen == first + again


def test_an_open_peer_and_a_peer_with_another_key() -> None:
    """A peer that does not name itself (no key: open to all) gets requests naming no node, and
    is asked once; when it takes the key, its refusal makes the sender ask again."""
    address = Address(FakePeer(A, key=None))
    with _client(address) as client:
        assert client.get(PEER + HAVE).status_code == 200
        assert client.get(PEER + HAVE).status_code == 200
        assert isinstance(client.auth, SwarmAuth) and client.auth.node_at(PEER) is None
        assert address.peer.seen == [("HEAD", INFO_PATH, ""), ("GET", HAVE, ""), ("GET", HAVE, "")]
        address.peer = FakePeer(A)  # restarted with the swarm key
        assert client.get(PEER + HAVE).status_code == 200
        assert address.peer.seen == [("GET", HAVE, ""), ("HEAD", INFO_PATH, ""), ("GET", HAVE, A)]
        address.peer = FakePeer(B, key=b"another swarm's key, long enough")
        refused = client.get(PEER + HAVE)
        assert refused.status_code == 403 and json.loads(refused.content)["reason"] == "wrong swarm key"
    assert address.peer.seen == [("GET", HAVE, A)]  # not a refusal that asking again can help


async def test_the_async_client_asks_and_signs_the_body_too() -> None:
    address = Address(FakePeer(A))
    async with httpx.AsyncClient(auth=SwarmAuth(KEY), transport=httpx.MockTransport(address)) as client:
        r = await client.post(PEER + WARM, content=b'{"ref": "demo/app:1"}')
        assert r.status_code == 200 and len(r.history) == 1
        async with client.stream("POST", PEER + WARM, json={"ref": "demo/app:2"}) as streamed:
            assert streamed.status_code == 200
    assert address.peer.seen == [("HEAD", INFO_PATH, ""), ("POST", WARM, A), ("POST", WARM, A)]
