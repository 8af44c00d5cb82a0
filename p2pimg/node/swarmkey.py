"""The swarm key: a shared secret that a LAN's nodes need to fetch from each other (like an IPFS
private network's key). With a key set, a peer answers 401 (no credentials) or 403 (wrong ones)
and serves nothing, not even its inventory; without one, peers are open to the LAN.

The key itself never crosses the network: each request carries an HMAC-SHA256 of its method,
path and the current minute, which the peer checks against the previous, current and next minute
(clock skew) in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Generator
from pathlib import Path

import httpx

from p2pimg.errors import InvalidInput

SCHEME = "P2pimg-Swarm"
_MIN_KEY = 16


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
        raise InvalidInput(f"the swarm key from {source} is too short: use at least {_MIN_KEY} characters "
                           "(e.g. `openssl rand -hex 32`)")
    return key


def token(key: bytes, method: str, path: str, minute: int) -> str:
    return hmac.new(key, f"{method.upper()}\n{path}\n{minute}".encode(), hashlib.sha256).hexdigest()


def check(key: bytes, header: str | None, method: str, path: str, now: float | None = None) -> int:
    """200 when `header` proves the key for this request, else 401 (none given) or 403."""
    if not header:
        return 401
    scheme, _, value = header.partition(" ")
    if scheme != SCHEME or not value:
        return 401
    minute = int((time.time() if now is None else now) // 60)
    ok = False
    for m in (minute - 1, minute, minute + 1):
        ok |= hmac.compare_digest(token(key, method, path, m), value.strip())
    return 200 if ok else 403


class SwarmAuth(httpx.Auth):
    """Signs every request to a peer with the swarm key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        proof = token(self.key, request.method, request.url.path, int(time.time() // 60))
        request.headers["authorization"] = f"{SCHEME} {proof}"
        yield request
