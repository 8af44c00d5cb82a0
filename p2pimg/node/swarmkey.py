"""The swarm key: a shared secret that a LAN's nodes need to fetch from each other (like an IPFS
private network's key). With a key set, a peer answers 401 (no credentials) or 403 (wrong ones)
and serves nothing, not even its inventory; without one, peers are open to the LAN.

The key itself never crosses the network. Each request carries a proof,

    Authorization: P2pimg-Swarm v=2,ts=<Unix ms>,nonce=<32 hex>,body=<sha256 hex>,sig=<64 hex>

where `sig` is the HMAC-SHA256 under the key of the version, method, timestamp, nonce, the
SHA-256 of the body and the path. A peer takes it when the signature matches (compared in
constant time), the timestamp is within `WINDOW` seconds of its own clock either way (clock
skew), and it has not seen the nonce before: a captured request cannot be sent again, nor its
method, path or body changed. The head is checked before the body is read (`SwarmGuard.admit`),
the body once it is (`SwarmGuard.body_matches`).

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
VERSION = "2"
WINDOW = 30.0  # seconds either side of the receiver's clock
MAX_NONCES = 1 << 16  # remembered at once (a few MiB at most)
_MIN_KEY = 16
_PROOF = re.compile(
    r"v=(?P<v>[0-9]+),ts=(?P<ts>[0-9]{1,15}),nonce=(?P<nonce>[0-9a-f]{32}),"
    r"body=(?P<body>[0-9a-f]{64}),sig=(?P<sig>[0-9a-f]{64})"
)


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


def _mac(key: bytes, method: str, path: str, ts: int, nonce: str, body_sha256: str) -> str:
    # The path goes last: every field before it has a fixed form, so no two requests sign alike.
    message = f"p2pimg-swarm/{VERSION}\n{method.upper()}\n{ts}\n{nonce}\n{body_sha256}\n{path}"
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> str:
    """The Authorization header value proving the key for one request."""
    ts = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16) if nonce is None else nonce
    body_sha256 = hashlib.sha256(body).hexdigest()
    sig = _mac(key, method, path, ts, nonce, body_sha256)
    return f"{SCHEME} v={VERSION},ts={ts},nonce={nonce},body={body_sha256},sig={sig}"


@dataclass(frozen=True)
class Verdict:
    status: int  # 200 admitted, 401 no proof, 403 a proof that does not hold
    reason: str = ""
    signed: bool = False  # refused, though made with the key: a replay, or a member's clock is off

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
        return Verdict(403, "unreadable swarm-key proof (does every node run this version of p2pimg?)")
    return proof


class SwarmGuard:
    """Checks the proofs of requests to one peer listener, and remembers their nonces."""

    def __init__(
        self,
        key: bytes,
        *,
        window: float = WINDOW,
        max_nonces: int = MAX_NONCES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
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
        """A request's head: its proof must hold, be fresh and be new."""
        proof = _proof(header)
        if isinstance(proof, Verdict):
            return proof
        ts, nonce = int(proof["ts"]), proof["nonce"]
        if not hmac.compare_digest(_mac(self.key, method, path, ts, nonce, proof["body"]), proof["sig"]):
            return _WRONG
        # Only proofs made with the key get this far: strangers cannot fill the nonce memory.
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

    def _forget(self, before: int) -> None:
        """Drop nonces stamped before `before`: out of the window, the floor refuses them."""
        while self._by_time and self._by_time[0][0] < before:
            _ts, nonce = heapq.heappop(self._by_time)
            del self._seen[nonce]
        self._floor = max(self._floor, before - 1)


class SwarmAuth(httpx.Auth):
    """Signs every request to a peer with the swarm key (a fresh nonce each time, the body bound)."""

    requires_request_body = True  # the body is hashed into the proof

    def __init__(self, key: bytes) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["authorization"] = sign(self.key, request.method, request.url.path, request.content)
        yield request
