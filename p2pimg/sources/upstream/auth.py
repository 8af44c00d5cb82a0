"""Registry authentication, sans I/O: what to send next, and what a reply means for the next one.

A registry says how it wants to be spoken to in the `WWW-Authenticate` challenge of a 401: bearer
tokens from its token service (anonymous, or with the user's credentials as basic auth), or
HTTP basic. `AuthState.flow` is that exchange as a generator: it yields each request to send
(`Step`) and is sent each reply back, so that it decides everything (which header, whether to
get a token first, whether one retry may help) and performs nothing. The client drives it.

Tokens are cached per scope, up to `_MAX_CACHED_TOKENS` of them, until shortly before the
lifetime the token service gave them (at most a day); once a registry is known to want tokens,
the next request for a new scope gets its token first instead of a 401 round trip.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from p2pimg.sources.upstream.dockerconfig import Credentials
from p2pimg.sources.upstream.errors import UpstreamAuthError, UpstreamError, UpstreamRateLimited
from p2pimg.sources.upstream.refs import is_loopback

__all__ = [
    "USER_AGENT",
    "AuthState",
    "Challenge",
    "Flow",
    "Reply",
    "Step",
    "TokenCache",
    "parse_www_authenticate",
    "pull_scope",
    "read_token",
]

log = logging.getLogger(__name__)

USER_AGENT = "p2pimg/0.1"
MAX_TOKEN_BODY = 1 << 20
_MAX_CACHED_TOKENS = 256
_MAX_TOKEN_LIFETIME = 24 * 3600
# The token spec's default lifetime when a token service does not say.
_DEFAULT_TOKEN_LIFETIME = 60
# Renew a little early so a token never expires between the check and its use.
_RENEW_AT = 0.9
# Token values go into a header: visible ASCII only, so nothing can smuggle in a header break.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,16384}")


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: scheme in lower case, parameters by lower-case name."""

    scheme: str
    params: dict[str, str]


_CHALLENGE_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(?:,|$)')


def parse_www_authenticate(values: list[str]) -> Challenge | None:
    """The challenge to answer among `WWW-Authenticate` header values: Bearer before Basic."""
    found: dict[str, Challenge] = {}
    for value in values:
        scheme, _, rest = value.strip().partition(" ")
        params: dict[str, str] = {}
        pos = 0
        rest = rest.strip()
        while pos < len(rest):
            m = _CHALLENGE_PARAM_RE.match(rest, pos)
            if m is None or m.end() == pos:
                break
            raw = m.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[m.group(1).lower()] = raw
            pos = m.end()
        found.setdefault(scheme.lower(), Challenge(scheme.lower(), params))
    return found.get("bearer") or found.get("basic")


def read_token(
    status: int, body: bytes | None, where: str, host: str, creds: Credentials | None, sent_credentials: bool
) -> tuple[str, float]:
    """(token, lifetime in seconds) from a token service's reply, or the error it stands for."""
    if status in (401, 403):
        if creds is not None and sent_credentials:
            raise UpstreamAuthError(
                f"{where} rejected the credentials of user {creds.username!r} from {creds.source} "
                f"(HTTP {status}): check them (docker login {host})"
            )
        raise UpstreamAuthError(
            f"{where} refused an anonymous token (HTTP {status}): "
            f"this registry needs credentials (docker login {host})"
        )
    if status == 429:
        raise UpstreamRateLimited(f"{where} is rate limiting us (HTTP 429)")
    if status != 200:
        raise UpstreamError(f"{where} answered HTTP {status}")
    try:
        doc = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise UpstreamError(f"{where} sent no usable token")
    assert isinstance(doc, dict)
    lifetime = doc.get("expires_in")
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = _DEFAULT_TOKEN_LIFETIME
    return token, min(lifetime, _MAX_TOKEN_LIFETIME)


class TokenCache:
    """Bearer tokens by scope, each until shortly before it expires; the least recently used go
    first beyond `capacity`. The clock is a parameter, so that expiry is a plain input."""

    def __init__(
        self, *, capacity: int = _MAX_CACHED_TOKENS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._capacity = capacity
        self._clock = clock
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, scope: str) -> str | None:
        hit = self._tokens.get(scope)
        if hit is None:
            return None
        if hit[1] <= self._clock():
            del self._tokens[scope]
            return None
        self._tokens.move_to_end(scope)
        return hit[0]

    def put(self, scope: str, token: str, lifetime: float) -> None:
        self._tokens[scope] = (token, self._clock() + lifetime * _RENEW_AT)
        self._tokens.move_to_end(scope)
        while len(self._tokens) > self._capacity:
            self._tokens.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tokens)


@dataclass
class Step:
    """A request for a driver to send; with `body` set the driver reads (at most that) and closes."""

    request: httpx.Request
    body: int | None = None


# What a driver sends back into a flow: the response and, if it was read, its body.
Reply = tuple[httpx.Response, bytes | None]
Flow = Generator[Step, Reply, Reply]


class AuthState:
    """Authentication for one registry: which scheme it wants, and its tokens by scope."""

    def __init__(
        self,
        host: str,
        creds: Credentials | None,
        *,
        secure: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.creds = creds
        self._secure = secure
        self._bearer: Challenge | None = None
        self._basic = False
        self.tokens = TokenCache(clock=clock)

    def _basic_header(self) -> str:
        assert self.creds is not None
        pair = f"{self.creds.username}:{self.creds.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def flow(self, request: httpx.Request, scope: str) -> Flow:
        """Send `request` authorized for `scope`: answer one 401 challenge and retry once."""
        token = self.tokens.get(scope)
        if token is None and self._bearer is not None:
            # The registry is known to want tokens: get one first instead of a 401 round trip.
            token = yield from self._fetch_token(self._bearer, scope, request)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self.creds is not None:
            request.headers["Authorization"] = self._basic_header()
        reply = yield Step(request)
        response = reply[0]
        if response.status_code != 401:
            return reply
        challenge = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        retry = httpx.Request(request.method, request.url, headers=request.headers)
        if challenge is not None and challenge.scheme == "bearer":
            self._bearer = challenge
            token = yield from self._fetch_token(challenge, scope, request)
            retry.headers["Authorization"] = f"Bearer {token}"
        elif (
            challenge is not None
            and challenge.scheme == "basic"
            and self.creds is not None
            and not request.headers.get("Authorization", "").startswith("Basic ")
        ):
            self._basic = True
            retry.headers["Authorization"] = self._basic_header()
        else:
            return reply  # nothing more to try: the caller reports the 401
        return (yield Step(retry))

    def _token_request(self, challenge: Challenge, scope: str, request: httpx.Request) -> httpx.Request:
        """The request for a token answering `challenge`, with credentials where they are safe."""
        realm = challenge.params.get("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL:
            realm_url = None
        if realm_url is None or realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise UpstreamError(f"registry {self.host} named an invalid token service {realm[:100]!r}")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params += [("scope", s) for s in (challenge.params.get("scope") or scope).split()]
        headers = {"User-Agent": request.headers.get("User-Agent", USER_AGENT), "Accept": "application/json"}
        if self.creds is not None:
            if realm_url.scheme == "https" or not self._secure or is_loopback(realm_url.host):
                headers["Authorization"] = self._basic_header()
            else:
                # An HTTPS registry sending us to a plain-HTTP token service would expose the
                # password on the wire.
                log.warning(
                    "registry %s names a plain-HTTP token service %s: not sending credentials",
                    self.host,
                    realm_url.host,
                )
        return httpx.Request("GET", realm_url, params=params, headers=headers)

    def _fetch_token(
        self, challenge: Challenge, scope: str, request: httpx.Request
    ) -> Generator[Step, Reply, str]:
        token_request = self._token_request(challenge, scope, request)
        response, body = yield Step(token_request, body=MAX_TOKEN_BODY)
        token, lifetime = read_token(
            response.status_code,
            body,
            f"token service {token_request.url.host} of registry {self.host}",
            self.host,
            self.creds,
            "Authorization" in token_request.headers,
        )
        self.tokens.put(scope, token, lifetime)
        return token
