"""The swarm key: a shared secret that a LAN's nodes need to fetch from each other (like an IPFS
private network's key). With a key set, a peer answers 401 (no credentials) or 403 (wrong ones)
and serves nothing, not even its inventory; without one, peers are open to the LAN.

The key itself never crosses the network. Each request carries a proof,

    Authorization: P2pimg-Swarm v=3,ts=<Unix ms>,nonce=<32 hex>,body=<sha256 hex>,to=<node id>,
                   sig=<64 hex>

(on one line) where `sig` is the HMAC-SHA256 under the key of the version, method, timestamp,
nonce, the SHA-256 of the body, the node the request is for and the path. A peer takes it when
the signature matches (compared in constant time), the proof names this very node, the timestamp
is within `WINDOW` seconds of its own clock either way (clock skew), and it has not seen the
nonce before: a captured request cannot be sent again, neither to the node it was for nor to any
other node of the swarm, nor its method, path or body changed. The head is checked before the
body is read (`SwarmGuard.admit`), the body once it is (`SwarmGuard.body_matches`).

A proof naming no node (`to=` empty) is taken for `GET`/`HEAD /p2pimg/v1/info` only: that is how
a sender that does not know a peer's node id yet asks for it. The answer carries the id in an
`X-P2pimg-Swarm-Node: node=<id>,sig=<64 hex>` header, an HMAC under the key of the id and the
asking proof's nonce, so only a node holding the key can name itself, and only in answer to that
request. `SwarmAuth` keeps the id of each peer address (scheme, host, port) it learnt that way,
asks for it before the first other request to an address, and asks again (then sends the request
once more) when a peer refuses a proof as made for another node: its address now answers as
another node. Version 2 proofs (no node named) are refused: nodes of versions 2 and 3 do not talk.

Nonces are remembered until their timestamp leaves the window (from then on the timestamp alone
refuses them), and at most `MAX_NONCES` of them: when that many arrived within one window, the
oldest is forgotten early and every proof stamped no later than it is refused from then on, so
a forgotten nonce can never be replayed; memory stays bounded whatever the request rate.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import httpx

from p2pimg.errors import InvalidInput

SCHEME = "P2pimg-Swarm"
VERSION = "3"
WINDOW = 30.0  # seconds either side of the receiver's clock
MAX_NONCES = 1 << 16  # remembered at once (a few MiB at most)
INFO_PATH = "/p2pimg/v1/info"  # the one path a proof naming no node is good for
NODE_HEADER = "x-p2pimg-swarm-node"  # an /info answer's proof of the node's id
# With a 403: the proof was made with the key, for another node (or none); ask who is there.
OTHER_NODE = f'{SCHEME} error="other_node"'
MAX_ADDRESSES = 4096  # peer addresses whose node id a SwarmAuth remembers
_MIN_KEY = 16
_NODE_ID = r"[0-9A-Za-z._-]{1,64}"
_PROOF = re.compile(
    r"v=(?P<v>[0-9]+),ts=(?P<ts>[0-9]{1,15}),nonce=(?P<nonce>[0-9a-f]{32}),"
    rf"body=(?P<body>[0-9a-f]{{64}}),to=(?P<to>{_NODE_ID}|),sig=(?P<sig>[0-9a-f]{{64}})"
)
_VERSION_ONLY = re.compile(r"v=(?P<v>[0-9]+),")
_VOUCH = re.compile(rf"node=(?P<node>{_NODE_ID}),sig=(?P<sig>[0-9a-f]{{64}})")


def load_swarm_key(home: Path, key_file: str | None = None, *, given: bool = False) -> bytes | None:
    """The LAN's swarm key, or None. As for every setting, the command line wins, then the
    environment, then the config file: `key_file` when `given` (--swarm-key-file), else
    `$P2PIMG_SWARM_KEY`, else `key_file` (config.toml's swarm_key_file), else
    `$P2PIMG_HOME/swarm.key` when it exists."""
    text = None if given and key_file else os.environ.get("P2PIMG_SWARM_KEY")
    source = "P2PIMG_SWARM_KEY"
    if text is None:
        path = Path(key_file) if key_file else home / "swarm.key"
        if key_file is None and not path.exists():
            return None
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read the swarm key file {path}: {exc}") from None
        source = str(path)
    key = text.strip().encode()
    if len(key) < _MIN_KEY:
        raise InvalidInput(
            f"the swarm key from {source} is too short: use at least {_MIN_KEY} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return key


def _mac(key: bytes, method: str, path: str, ts: int, nonce: str, body_sha256: str, to: str) -> str:
    # The path goes last: every field before it has a fixed form without a newline, so no two
    # requests sign alike.
    message = f"p2pimg-swarm/{VERSION}\n{method.upper()}\n{ts}\n{nonce}\n{body_sha256}\n{to}\n{path}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _node_mac(key: bytes, nonce: str, node: str) -> str:
    # Its first line differs from every request's ("p2pimg-swarm/3"): no proof signs alike.
    message = f"p2pimg-swarm/{VERSION}/node\n{nonce}\n{node}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    to: str = "",
    now: float | None = None,
    nonce: str | None = None,
) -> str:
    """The Authorization header value proving the key for one request to the node `to` (its
    node id; "" when not known yet, which only `GET`/`HEAD /p2pimg/v1/info` takes)."""
    if to and re.fullmatch(_NODE_ID, to) is None:
        raise ValueError(f"not a node id: {to[:80]!r}")
    ts = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    body_sha256 = hashlib.sha256(body).hexdigest()
    sig = _mac(key, method, path, ts, nonce, body_sha256, to)
    return f"{SCHEME} v={VERSION},ts={ts},nonce={nonce},body={body_sha256},to={to},sig={sig}"


def vouched_node(key: bytes, proof: str, answer: str | None) -> str | None:
    """The node id an /info answer's `NODE_HEADER` proves, for the request whose Authorization
    was `proof`; None when it proves nothing (missing, malformed, or not made with the key for
    that very request)."""
    asked = _PROOF.fullmatch(proof.partition(" ")[2].strip())
    vouch = _VOUCH.fullmatch(answer.strip()) if answer else None
    if asked is None or vouch is None:
        return None
    if not hmac.compare_digest(_node_mac(key, asked["nonce"], vouch["node"]), vouch["sig"]):
        return None
    return vouch["node"]


@dataclass(frozen=True)
class Verdict:
    status: int  # 200 admitted, 401 no proof, 403 a proof that does not hold
    reason: str = ""
    signed: bool = False  # refused, though made with the key: a replay, or a member's clock is off
    other_node: bool = False  # made with the key for another node, or for none: see OTHER_NODE

    @property
    def ok(self) -> bool:
        return self.status == 200


_ADMITTED = Verdict(200)
_NO_PROOF = Verdict(401, "this peer needs the swarm key")
_WRONG = Verdict(403, "wrong swarm key")


def _proof(header: str | None) -> re.Match[str] | Verdict:
    if not header:
        return _NO_PROOF
    scheme, _, value = header.partition(" ")
    if scheme != SCHEME or not value.strip():
        return _NO_PROOF
    proof = _PROOF.fullmatch(value.strip())
    if proof is None or proof["v"] != VERSION:
        version = _VERSION_ONLY.match(value.strip())
        said = f" (it says version {version['v'][:4]}, this node takes {VERSION})" if version else ""
        return Verdict(403, f"unreadable swarm-key proof{said}: does every node run this version of p2pimg?")
    return proof


class SwarmGuard:
    """Checks the proofs of requests to one peer listener (of the node `node_id`), and remembers
    their nonces."""

    def __init__(
        self,
        key: bytes,
        node_id: str,
        *,
        window: float = WINDOW,
        max_nonces: int = MAX_NONCES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.node_id = node_id
        self.window_ms = int(window * 1000)
        self.max_nonces = max_nonces
        self.clock = clock
        self._seen: dict[str, int] = {}  # nonce -> its timestamp (ms)
        self._by_time: list[tuple[int, str]] = []  # a heap of (timestamp, nonce) of `_seen`
        # Every nonce stamped after the floor is remembered; proofs stamped at or before it are
        # refused, since theirs may have been forgotten (also after this clock goes back).
        self._floor = -1

    @property
    def remembered(self) -> int:
        return len(self._seen)

    def admit(self, header: str | None, method: str, path: str) -> Verdict:
        """A request's head: its proof must hold, be for this node, be fresh and be new."""
        proof = _proof(header)
        if isinstance(proof, Verdict):
            return proof
        ts, nonce, to = int(proof["ts"]), proof["nonce"], proof["to"]
        if not hmac.compare_digest(_mac(self.key, method, path, ts, nonce, proof["body"], to), proof["sig"]):
            return _WRONG
        # Only proofs made with the key get this far: strangers cannot fill the nonce memory.
        if to != self.node_id and not (to == "" and method in ("GET", "HEAD") and path == INFO_PATH):
            return Verdict(
                403,
                "swarm-key proof made for another node (a request captured and sent here, or the "
                "sender has this address down as another node's)"
                if to
                else f"swarm-key proof made for no node in particular: only {INFO_PATH} takes that",
                signed=True,
                other_node=True,
            )
        now = int(self.clock() * 1000)
        self._forget(now - self.window_ms)
        if abs(now - ts) > self.window_ms:
            return Verdict(
                403,
                f"swarm-key proof stamped {(ts - now) / 1000:+.0f} s from this peer's "
                f"clock (more than {self.window_ms / 1000:.0f} s: a replay, or the clocks "
                "differ)",
                signed=True,
            )
        if nonce in self._seen:
            return Verdict(403, "replayed swarm-key proof", signed=True)
        if len(self._seen) >= self.max_nonces:  # full: forget the oldest, and refuse what it dates
            oldest, forgotten = heapq.heappop(self._by_time)
            del self._seen[forgotten]
            self._floor = max(self._floor, oldest)
        if ts <= self._floor:
            return Verdict(
                403, "stale swarm-key proof (this peer took many requests since; send a new one)", signed=True
            )
        self._seen[nonce] = ts
        heapq.heappush(self._by_time, (ts, nonce))
        return _ADMITTED

    def body_matches(self, header: str | None, body: bytes) -> Verdict:
        """A request's body, once read: it must be the one its (admitted) proof was made for."""
        proof = _proof(header)
        if isinstance(proof, Verdict):
            return proof
        if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), proof["body"]):
            return Verdict(
                403, "the request body is not the one its swarm-key proof was made for", signed=True
            )
        return _ADMITTED

    def vouch(self, header: str | None) -> str | None:
        """The `NODE_HEADER` value naming this node to the sender of an admitted request (its
        proof `header`), good for that request only; None without a usable proof or id."""
        proof = _proof(header)
        if isinstance(proof, Verdict) or re.fullmatch(_NODE_ID, self.node_id) is None:
            return None
        return f"node={self.node_id},sig={_node_mac(self.key, proof['nonce'], self.node_id)}"

    def _forget(self, before: int) -> None:
        """Drop nonces stamped before `before`: out of the window, the floor refuses them."""
        while self._by_time and self._by_time[0][0] < before:
            _ts, nonce = heapq.heappop(self._by_time)
            del self._seen[nonce]
        self._floor = max(self._floor, before - 1)


def _address(url: httpx.URL) -> str:
    """The peer a URL reaches: scheme, host and port (a node id belongs to a listener)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{url.host.lower()}:{port}"


def _is_info(request: httpx.Request) -> bool:
    return request.method in ("GET", "HEAD") and request.url.path == INFO_PATH


class SwarmAuth(httpx.Auth):
    """Signs every request to a peer with the swarm key for that peer (a fresh nonce each time,
    the body bound, the peer's node id named). The node id of each address is learnt from its
    /info answers (see the module's doc): before any other first request to an address, the
    flow asks it (`HEAD /p2pimg/v1/info`), and a request refused as made for another node is
    sent once more after asking again."""

    requires_request_body = True  # the body is hashed into the proof

    def __init__(self, key: bytes) -> None:
        self.key = key
        # address -> its node id, as the key proved it; "" when it was asked and did not say
        # (an open peer, one with another key or version): requests go without a node then.
        self.nodes: dict[str, str] = {}

    def node_at(self, url: str | httpx.URL) -> str | None:
        """The node id learnt for the peer at `url`; None when not learnt (or not said)."""
        return self.nodes.get(_address(httpx.URL(url))) or None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        address = _address(request.url)
        asked = False
        if address not in self.nodes and not _is_info(request):
            yield from self._ask(request, address)
            asked = True
        response = yield self._signed(request, address)
        self._learn(address, request, response)
        if (
            not asked
            and response.status_code == 403
            and OTHER_NODE in response.headers.get_list("www-authenticate")
        ):
            # The node there is not the one we had down (or we had none): ask again, send again.
            self.nodes.pop(address, None)
            if not _is_info(request):
                yield from self._ask(request, address)
            response = yield self._signed(request, address)
            self._learn(address, request, response)

    def _signed(self, request: httpx.Request, address: str) -> httpx.Request:
        request.headers["authorization"] = sign(
            self.key, request.method, request.url.path, request.content, to=self.nodes.get(address, "")
        )
        return request

    def _ask(self, request: httpx.Request, address: str) -> Generator[httpx.Request, httpx.Response, None]:
        """Ask the peer at `address` who it is: a body-less HEAD, with the request's timeouts."""
        probe = httpx.Request("HEAD", request.url.join(INFO_PATH), extensions=dict(request.extensions))
        response = yield self._signed(probe, address)
        self._learn(address, probe, response)

    def _learn(self, address: str, request: httpx.Request, response: httpx.Response) -> None:
        """Take the node id an /info answer proves; an address asked that did not say is down
        as "" (requests to it name no node) until a refusal says otherwise."""
        if not _is_info(request):
            return
        node = vouched_node(self.key, request.headers["authorization"], response.headers.get(NODE_HEADER))
        if node is None and address in self.nodes:
            return
        self.nodes.pop(address, None)
        if len(self.nodes) >= MAX_ADDRESSES:
            del self.nodes[next(iter(self.nodes))]  # the longest known
        self.nodes[address] = node or ""
