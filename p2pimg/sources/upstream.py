"""An upstream OCI registry: the async client behind pull-through mirror mode, and its helpers.

    UpstreamClient     async (trio) reads of manifests and blobs from one registry
    import_image       `publish docker://HOST/REPO:TAG`: an image graph read synchronously
    normalize_repo     Docker Hub's `library/` rule, plus name validation
    containerd_hosts_toml, podman_registries_conf
                       client configuration that points a registry at a p2pimg mirror

Authentication follows the registry's `WWW-Authenticate` challenge: bearer tokens from the
registry's token service (anonymous or with credentials, cached per scope until they expire) or
HTTP basic. Credentials come from Docker's `config.json`, inline `auth` entries only.

Everything read is bounded: manifests by `MAX_MANIFEST_SIZE`, tokens and error bodies by small
caps, every request by a timeout, redirects by count. Bytes are trusted only after checking:
manifests against the digest they were asked by (and `Docker-Content-Digest`), whole blobs
against their digest before their last piece is handed out. Secrets are never logged or put in
an error message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

import httpx
import trio

from p2pimg.content.cid import digest_of, parse_digest
from p2pimg.content.graph import SourceBlob, SourceImage, manifest_media_type, walk_graph
from p2pimg.content.model import MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE, check_name, check_tag
from p2pimg.errors import (
    BlobUnknown,
    InvalidInput,
    ManifestUnknown,
    NameUnknown,
    OriginError,
    P2pimgError,
    RangeNotSatisfiable,
    SourceInvalid,
    VerificationError,
)
from p2pimg.sources.httpbody import read_capped

__all__ = [
    "ACCEPT_MANIFESTS",
    "DOCKER_HUB",
    "Challenge",
    "Credentials",
    "ImageUrl",
    "ManifestUnsupported",
    "UpstreamAuthError",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamManifest",
    "UpstreamRateLimited",
    "containerd_hosts_toml",
    "docker_config_path",
    "import_image",
    "load_credentials",
    "normalize_repo",
    "parse_image_url",
    "parse_www_authenticate",
    "podman_registries_conf",
    "registry_base",
]

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Every name Docker Hub goes by; all of them mean the registry at DOCKER_HUB_URL.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io",
                                 "registry.hub.docker.com"})
_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

# Preference order: an index first, so a multi-arch tag is served as the whole image.
ACCEPT_MANIFESTS = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_SCHEMA1_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})

_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 << 10
_MAX_TOKEN_BODY = 1 << 20
_MAX_DOCKER_CONFIG = 1 << 20
_MAX_CACHED_TOKENS = 256
_MAX_TOKEN_LIFETIME = 24 * 3600
# The token spec's default lifetime when a token service does not say.
_DEFAULT_TOKEN_LIFETIME = 60
# Small requests (manifests, HEADs, tokens) get this many `timeout`s in total, covering the
# token round trip and the one retry; httpx's own timeouts are per socket operation.
_DEADLINE_FACTOR = 3
_USER_AGENT = "p2pimg/0.1"
# Token values go into a header: visible ASCII only, so nothing can smuggle in a header break.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,16384}")
_HOST_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
                      r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


# -- errors ----------------------------------------------------------------------------------

class UpstreamError(OriginError):
    """The upstream registry failed, refused, sent something unusable, or could not be reached."""


class UpstreamAuthError(UpstreamError):
    """The upstream registry (or its token service) refused access after authentication."""

    oci_code = "DENIED"


class UpstreamRateLimited(UpstreamError):
    """The upstream registry answered 429 (Docker Hub's pull limit); passed on so clients back off."""

    oci_code = "TOOMANYREQUESTS"
    http_status = 429


class ManifestUnsupported(UpstreamError):
    """An upstream manifest p2pimg cannot serve (Docker schema 1, an unknown media type)."""

    oci_code = "MANIFEST_INVALID"


@dataclass(frozen=True)
class UpstreamManifest:
    """A manifest or index as the registry holds it: its digest, media type and exact bytes."""

    digest: str
    media_type: str
    data: bytes


# -- registry addresses and names ------------------------------------------------------------

def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def _canonical_host(hostname: str, port: int | None, scheme: str) -> str:
    """`host[:port]` as Docker names a registry: lower case, default ports dropped, Hub aliased."""
    hostname = hostname.lower()
    if ":" in hostname:  # an IPv6 literal, which urlsplit returns without brackets
        hostname = f"[{hostname}]"
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        return f"{hostname}:{port}"
    return DOCKER_HUB if hostname in _DOCKER_HUB_ALIASES else hostname


def registry_base(url: str) -> tuple[str, str]:
    """(base URL, host) of a registry given as `http(s)://HOST[:PORT]` or a bare `HOST[:PORT]`.

    A bare host is reached over HTTPS, except loopback hosts, which are plain HTTP as Docker
    treats them. Any Docker Hub name becomes its registry endpoint, registry-1.docker.io.
    """
    text = url.strip()
    if "://" not in text:
        hostname = urlsplit(f"//{text}").hostname or ""
        text = ("http://" if _is_loopback(hostname) else "https://") + text
    try:
        parts = urlsplit(text.rstrip("/"))
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"invalid registry URL {url[:100]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"invalid registry URL {url[:100]!r}: expected http(s)://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and process lists; they belong in config.json.
        raise InvalidInput("a registry URL must not carry credentials: put them in docker's config.json")
    if parts.path or parts.query or parts.fragment:
        raise InvalidInput(f"invalid registry URL {url[:100]!r}: a registry URL has no path")
    host = _canonical_host(parts.hostname, port, parts.scheme)
    if not _HOST_RE.fullmatch(host):
        raise InvalidInput(f"invalid registry host {host[:100]!r}")
    if host == DOCKER_HUB:
        return DOCKER_HUB_URL, host
    return f"{parts.scheme}://{host}", host


def normalize_repo(host: str, repo: str) -> str:
    """The repository name the registry knows: Docker Hub's official images live in `library/`."""
    if host in _DOCKER_HUB_ALIASES and "/" not in repo:
        repo = f"library/{repo}"
    return check_name(repo)


def _is_digest_reference(reference: str) -> bool:
    """True for a digest, False for a tag; anything else is refused."""
    if ":" in reference:
        parse_digest(reference)
        return True
    check_tag(reference)
    return False


@dataclass(frozen=True)
class ImageUrl:
    """A parsed `docker://HOST/REPO:TAG` (or `@DIGEST`)."""

    base_url: str
    host: str
    repo: str
    reference: str


def parse_image_url(url: str, *, plain_http: bool | None = None) -> ImageUrl:
    """Parse `[docker://][HOST/]REPO(:TAG|@DIGEST|:TAG@DIGEST)`, as skopeo's docker transport.

    The first path component is a host if it has a `.` or `:` or is `localhost` (Docker's
    rule); otherwise the image is on Docker Hub. A digest wins over a tag. With `plain_http`
    None, loopback registries are plain HTTP and all others HTTPS.
    """
    rest = url.removeprefix("docker://")
    name, _, digest = rest.partition("@")
    head, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        name = head
    else:
        tag = ""
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host_text, repo = first, remainder
    else:
        host_text, repo = DOCKER_HUB, name
    if plain_http is not None and host_text.lower() not in _DOCKER_HUB_ALIASES:
        host_text = ("http://" if plain_http else "https://") + host_text
    base_url, host = registry_base(host_text)
    repo = normalize_repo(host, repo)
    if digest:
        parse_digest(digest)
    if tag:
        check_tag(tag)
    reference = digest or tag
    if not reference:
        raise InvalidInput(f"{url[:200]!r} names no tag or digest: add :TAG or @sha256:DIGEST")
    return ImageUrl(base_url, host, repo, reference)


# -- credentials -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """A username and password for one registry, and the file they came from (for messages)."""

    username: str
    password: str = field(repr=False)
    source: str = ""


def docker_config_path(explicit: Path | None = None) -> Path:
    """The Docker client config: `explicit` (a file or a directory), `$DOCKER_CONFIG`, `~/.docker`."""
    if explicit is not None:
        return explicit / "config.json" if explicit.is_dir() else explicit
    env = os.environ.get("DOCKER_CONFIG")
    base = Path(env) if env else Path.home() / ".docker"
    return base / "config.json"


def _auth_key_host(key: str) -> str:
    """The registry host an `auths` key names: `host`, `https://host`, `http://host/v1/` alike."""
    key = key.strip().lower()
    if "://" in key:
        key = key.split("://", 1)[1]
    key = key.split("/", 1)[0]
    return DOCKER_HUB if key in _DOCKER_HUB_ALIASES else key


def _entry_credentials(entry: dict[str, Any], where: str, source: str) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        name, sep, secret = decoded.partition(":")
        if not sep or not name:
            # Never show the value: it is a password, merely encoded.
            raise InvalidInput(f"{source}: the auth entry for {where} is not base64 of user:password")
        return Credentials(name, secret, source)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and user and isinstance(password, str) and password:
        return Credentials(user, password, source)
    if entry.get("identitytoken") or entry.get("registrytoken"):
        log.warning("%s: the entry for %s holds a token (from a credential helper login), which "
                    "p2pimg does not support; using anonymous access", source, where)
    return None


def load_credentials(host: str, docker_config: Path | None = None) -> Credentials | None:
    """Inline credentials for `host` from Docker's config.json, or None (anonymous access).

    `credHelpers` and `credsStore` (external programs) are not supported: a warning, then
    anonymous access. A missing default config is not an error; a missing explicit one is.
    """
    path = docker_config_path(docker_config)
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_DOCKER_CONFIG + 1)
    except FileNotFoundError:
        if docker_config is not None:
            raise InvalidInput(f"docker config {source!r} does not exist") from None
        return None
    except OSError as exc:
        raise InvalidInput(f"cannot read docker config {source!r}: {exc.strerror}") from None
    if len(raw) > _MAX_DOCKER_CONFIG:
        raise InvalidInput(f"docker config {source!r} is larger than {_MAX_DOCKER_CONFIG} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # The parser's message quotes the file, which holds passwords: say only where.
        raise InvalidInput(f"docker config {source!r} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"docker config {source!r} is not a JSON object")
    host = DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host

    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        helper = next((v for k, v in helpers.items() if _auth_key_host(k) == host), None)
        if helper is not None:
            log.warning("%s: credential helper %r for %s is not supported by p2pimg; using anonymous "
                        "access (put an inline auth entry in auths to authenticate)",
                        source, str(helper)[:50], host)
            return None

    auths = doc.get("auths")
    matches: list[tuple[int, str, dict[str, Any]]] = []
    if isinstance(auths, dict):
        exact = {host, f"https://{host}", f"http://{host}"}
        if host == DOCKER_HUB:
            exact.add(_DOCKER_HUB_AUTH_KEY)
        for order, (key, entry) in enumerate(auths.items()):
            if isinstance(key, str) and isinstance(entry, dict) and _auth_key_host(key) == host:
                # Docker looks the exact key up first, then any key naming the same host.
                matches.append((0 if key in exact else 1 + order, key, entry))
    for _, key, entry in sorted(matches, key=lambda m: m[0]):
        creds = _entry_credentials(entry, host, source)
        if creds is not None:
            log.debug("using credentials of user %r for %s from %s (key %r)",
                      creds.username, host, source, key)
            return creds
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        log.warning("%s: credential store %r is not supported by p2pimg; using anonymous access to %s "
                    "(put an inline auth entry in auths to authenticate)", source, store[:50], host)
    return None


# -- authentication (sans I/O) ---------------------------------------------------------------

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


@dataclass
class _Step:
    """A request for a driver to send; with `body` set the driver reads (at most that) and closes."""

    request: httpx.Request
    body: int | None = None


# What a driver sends back into a flow: the response and, if it was read, its body.
_Reply = tuple[httpx.Response, bytes | None]
_Flow = Generator[_Step, _Reply, _Reply]


class _AuthState:
    """Authentication for one registry: which scheme it wants, and cached tokens per scope.

    The logic is a generator of requests (`flow`) so that one implementation serves the async
    client and the synchronous publish path alike; each has a small driver that sends.
    Shared between threads by `import_image`, hence the lock (never held across I/O).
    """

    def __init__(self, host: str, creds: Credentials | None, *, secure: bool) -> None:
        self.host = host
        self.creds = creds
        self._secure = secure
        self._lock = threading.Lock()
        self._bearer: Challenge | None = None
        self._basic = False
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _basic_header(self) -> str:
        assert self.creds is not None
        pair = f"{self.creds.username}:{self.creds.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _cached_token(self, scope: str) -> str | None:
        with self._lock:
            hit = self._tokens.get(scope)
            if hit is None:
                return None
            if hit[1] <= time.monotonic():
                del self._tokens[scope]
                return None
            self._tokens.move_to_end(scope)
            return hit[0]

    def _store_token(self, scope: str, token: str, lifetime: float) -> None:
        with self._lock:
            # Renew a little early so a token never expires between the check and its use.
            self._tokens[scope] = (token, time.monotonic() + lifetime * 0.9)
            self._tokens.move_to_end(scope)
            while len(self._tokens) > _MAX_CACHED_TOKENS:
                self._tokens.popitem(last=False)

    def flow(self, request: httpx.Request, scope: str) -> _Flow:
        """Send `request` authorized for `scope`: answer one 401 challenge and retry once."""
        token = self._cached_token(scope)
        if token is None and self._bearer is not None:
            # The registry is known to want tokens: get one first instead of a 401 round trip.
            token = yield from self._fetch_token(self._bearer, scope, request)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self.creds is not None:
            request.headers["Authorization"] = self._basic_header()
        reply = yield _Step(request)
        response = reply[0]
        if response.status_code != 401:
            return reply
        challenge = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        retry = httpx.Request(request.method, request.url, headers=request.headers)
        if challenge is not None and challenge.scheme == "bearer":
            self._bearer = challenge
            token = yield from self._fetch_token(challenge, scope, request)
            retry.headers["Authorization"] = f"Bearer {token}"
        elif (challenge is not None and challenge.scheme == "basic" and self.creds is not None
              and not request.headers.get("Authorization", "").startswith("Basic ")):
            self._basic = True
            retry.headers["Authorization"] = self._basic_header()
        else:
            return reply  # nothing more to try: the caller reports the 401
        return (yield _Step(retry))

    def _fetch_token(self, challenge: Challenge, scope: str, request: httpx.Request) -> Generator[
            _Step, _Reply, str]:
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
        headers = {"User-Agent": request.headers.get("User-Agent", _USER_AGENT), "Accept": "application/json"}
        if self.creds is not None:
            if realm_url.scheme == "https" or not self._secure or _is_loopback(realm_url.host):
                headers["Authorization"] = self._basic_header()
            else:
                # An HTTPS registry sending us to a plain-HTTP token service would expose the
                # password on the wire.
                log.warning("registry %s names a plain-HTTP token service %s: not sending credentials",
                            self.host, realm_url.host)
        response, body = yield _Step(httpx.Request("GET", realm_url, params=params, headers=headers),
                                     body=_MAX_TOKEN_BODY)
        where = f"token service {realm_url.host} of registry {self.host}"
        creds = self.creds
        if response.status_code in (401, 403):
            if creds is not None and "Authorization" in headers:
                raise UpstreamAuthError(
                    f"{where} rejected the credentials of user {creds.username!r} from {creds.source} "
                    f"(HTTP {response.status_code}): check them (docker login {self.host})")
            raise UpstreamAuthError(f"{where} refused an anonymous token (HTTP {response.status_code}): "
                                    f"this registry needs credentials (docker login {self.host})")
        if response.status_code == 429:
            raise UpstreamRateLimited(f"{where} is rate limiting us (HTTP 429)")
        if response.status_code != 200:
            raise UpstreamError(f"{where} answered HTTP {response.status_code}")
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
        self._store_token(scope, token, min(lifetime, _MAX_TOKEN_LIFETIME))
        return token


# -- responses -------------------------------------------------------------------------------

def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) < 20 else None


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";", 1)[0].strip().lower()


def _oci_error(body: bytes | None) -> tuple[str, str]:
    """(code, message) of the first entry of a distribution-spec error body, if it is one."""
    try:
        doc = json.loads(body or b"")
        first = doc["errors"][0]
        return str(first.get("code", ""))[:64], str(first.get("message", ""))[:200]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError,
            RecursionError):
        return "", ""


@dataclass(frozen=True)
class _Context:
    """What a request was for, to turn a failure into a precise error."""

    host: str
    repo: str
    what: str  # "manifest REPO:TAG", "blob REPO@DIGEST"
    kind: str  # "manifest" or "blob"
    creds: Credentials | None


def _error_for(response: httpx.Response, body: bytes | None, ctx: _Context) -> P2pimgError:
    status = response.status_code
    code, message = _oci_error(body)
    detail = f" ({code}: {message})" if code else ""
    if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
        if code == "NAME_UNKNOWN":
            return NameUnknown(f"registry {ctx.host} has no repository {ctx.repo}")
        if code == "BLOB_UNKNOWN" or ctx.kind == "blob":
            return BlobUnknown(f"registry {ctx.host} has no {ctx.what}")
        return ManifestUnknown(f"registry {ctx.host} has no {ctx.what}")
    if status in (401, 403):
        if response.history and response.url.host != response.history[0].url.host:
            # A redirect target (blob storage, a CDN) refused: not about our credentials.
            return UpstreamError(f"storage {response.url.host} behind registry {ctx.host} refused "
                                 f"{ctx.what} (HTTP {status}){detail}")
        if ctx.creds is not None:
            hint = (f"check the credentials of user {ctx.creds.username!r} from {ctx.creds.source} "
                    "and that they may pull this repository")
        else:
            hint = (f"the repository may not exist, or needs credentials: run `docker login {ctx.host}` "
                    "or add an auths entry to docker's config.json")
        return UpstreamAuthError(f"registry {ctx.host} denied access to {ctx.what} "
                                 f"(HTTP {status}){detail}: {hint}")
    if status == 429:
        return UpstreamRateLimited(f"registry {ctx.host} is rate limiting pulls of {ctx.what} (HTTP 429)"
                                   f"{detail}", detail=response.headers.get("retry-after"))
    if status == 416:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return RangeNotSatisfiable(f"registry {ctx.host}: range not satisfiable for {ctx.what}",
                                   size=int(total) if total.isdigit() else 0)
    return UpstreamError(f"registry {ctx.host} answered HTTP {status} for {ctx.what}{detail}")


@contextlib.contextmanager
def _mapped(ctx: _Context) -> Iterator[None]:
    """Turn httpx's failures (network, protocol, redirects, timeouts) into UpstreamError."""
    try:
        yield
    except httpx.TooManyRedirects:
        raise UpstreamError(f"registry {ctx.host}: more than {_MAX_REDIRECTS} redirects for {ctx.what}") \
            from None
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"registry {ctx.host} timed out on {ctx.what} ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        # httpx messages name the failure and at most a URL; they never carry headers.
        raise UpstreamError(f"cannot fetch {ctx.what} from registry {ctx.host}: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _too_large(ctx: _Context, limit: int) -> UpstreamError:
    return UpstreamError(f"registry {ctx.host} sent more than {limit} bytes for {ctx.what}; refused")


def _check_manifest(response: httpx.Response, data: bytes, reference: str, ctx: _Context) -> UpstreamManifest:
    digest = digest_of(data)
    if _is_digest_reference(reference) and digest != reference:
        raise VerificationError(f"registry {ctx.host} sent a manifest with digest {digest} "
                                f"for {ctx.what}")
    claimed = response.headers.get("docker-content-digest", "").strip()
    if claimed.startswith("sha256:") and claimed != digest:
        raise VerificationError(f"registry {ctx.host} sent {ctx.what} as {claimed}, "
                                f"but its bytes hash to {digest}")
    declared = _media_type(response)
    try:
        schema = json.loads(data).get("schemaVersion")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        schema = None
    if declared in _SCHEMA1_TYPES or schema == 1:
        raise ManifestUnsupported(
            f"{ctx.what} on registry {ctx.host} is a Docker schema 1 manifest, which p2pimg does not "
            "support: push the image again with a current client (e.g. skopeo copy --format v2s2)")
    try:
        media = manifest_media_type(data, declared if declared in MANIFEST_MEDIA_TYPES else "", ctx.what)
    except SourceInvalid as exc:
        raise ManifestUnsupported(f"registry {ctx.host}: {exc.message}") from None
    return UpstreamManifest(digest, media, data)


def _range_header(offset: int, length: int | None) -> dict[str, str]:
    if offset < 0 or (length is not None and length < 0):
        raise InvalidInput(f"invalid blob range: offset {offset}, length {length}")
    if offset == 0 and length is None:
        return {}
    end = "" if length is None else str(offset + length - 1)
    return {"Range": f"bytes={offset}-{end}"}


def _range_skip(response: httpx.Response, offset: int, ctx: _Context) -> int:
    """Bytes to drop from the body: a 206 must start at `offset`; a 200 ignored the Range."""
    if response.status_code != 206:
        return offset
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", "").strip())
    if m is None or int(m.group(1)) != offset:
        raise UpstreamError(f"registry {ctx.host} answered a range request for {ctx.what} with "
                            f"a mismatching Content-Range")
    return 0


class _BodyCheck:
    """Cuts a blob body to the requested range and verifies a whole blob's digest."""

    def __init__(self, ctx: _Context, digest: str, skip: int, length: int | None, whole: bool) -> None:
        self.ctx, self.digest, self.skip, self.left = ctx, digest, skip, length
        self.hasher = hashlib.sha256() if whole else None

    def feed(self, piece: bytes) -> bytes:
        if self.skip:
            cut = min(self.skip, len(piece))
            piece, self.skip = piece[cut:], self.skip - cut
        if self.left is not None:
            piece = piece[: self.left]
            self.left -= len(piece)
        if self.hasher is not None:
            self.hasher.update(piece)
        return piece

    @property
    def done(self) -> bool:
        return self.left == 0

    def finish(self) -> None:
        if self.skip or self.left:
            raise UpstreamError(f"registry {self.ctx.host} ended {self.ctx.what} early")
        if self.hasher is not None and "sha256:" + self.hasher.hexdigest() != self.digest:
            raise VerificationError(f"registry {self.ctx.host} sent bytes for {self.ctx.what} that do "
                                    "not match its digest")


def _client_options(timeout: float) -> dict[str, Any]:
    return {
        "timeout": httpx.Timeout(timeout),
        "follow_redirects": True,  # blob GETs are redirected to storage; httpx drops our
        "max_redirects": _MAX_REDIRECTS,  # Authorization when a redirect leaves the origin
        # identity: the bytes we hash must be the stored bytes, never a decoded transfer form.
        "headers": {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        "limits": httpx.Limits(max_connections=64, max_keepalive_connections=16),
    }


# -- the async client ------------------------------------------------------------------------

def _scope(repo: str) -> str:
    return f"repository:{repo}:pull"


class UpstreamClient:
    """Reads from one upstream registry on trio. Safe for concurrent use by many tasks."""

    def __init__(self, url: str, *, docker_config: Path | None = None, timeout: float = 30.0) -> None:
        self.url, self.host = registry_base(url)
        self.timeout = timeout
        creds = load_credentials(self.host, docker_config)
        self._auth = _AuthState(self.host, creds, secure=self.url.startswith("https:"))
        self._client = httpx.AsyncClient(**_client_options(timeout))

    @property
    def credentialed(self) -> bool:
        """Whether requests carry the user's credentials (what they bring may be private)."""
        return self._auth.creds is not None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _ctx(self, repo: str, what: str, kind: str) -> _Context:
        return _Context(self.host, repo, what, kind, self._auth.creds)

    async def _send(self, method: str, path: str, repo: str, headers: dict[str, str]) -> _Reply:
        flow = self._auth.flow(self._client.build_request(method, self.url + path, headers=headers),
                               _scope(repo))
        auth_ctx = self._ctx(repo, f"the token for {repo}", "token")
        step = next(flow)
        while True:
            response = await self._client.send(step.request, stream=True)
            body = None
            if step.body is not None or response.status_code == 401:
                try:
                    body = await _aread(response, step.body or _MAX_ERROR_BODY, auth_ctx,
                                        truncate=step.body is None)
                finally:
                    await response.aclose()
            try:
                step = flow.send((response, body))
            except StopIteration as stop:
                reply: _Reply = stop.value
                return reply

    @contextlib.contextmanager
    def _bounded(self, ctx: _Context) -> Iterator[None]:
        try:
            with _mapped(ctx), trio.fail_after(self.timeout * _DEADLINE_FACTOR):
                yield
        except trio.TooSlowError:
            raise UpstreamError(f"registry {self.host} did not deliver {ctx.what} within "
                                f"{self.timeout * _DEADLINE_FACTOR:.0f}s") from None

    async def _fail(self, reply: _Reply, ctx: _Context) -> P2pimgError:
        response, body = reply
        if body is None:
            body = await _aread(response, _MAX_ERROR_BODY, ctx, truncate=True)
        return _error_for(response, body, ctx)

    async def _manifest_reply(self, method: str, repo: str,
                              reference: str) -> tuple[httpx.Response, bytes, _Context]:
        """GET or HEAD a manifest: the (closed) 200 response, its body (b"" for HEAD) and the
        request's context; the mapped error for any other status."""
        ctx = self._ctx(repo, _manifest_what(repo, reference), "manifest")
        with self._bounded(ctx):
            reply = await self._send(method, f"/v2/{repo}/manifests/{reference}", repo,
                                     {"Accept": ACCEPT_MANIFESTS})
            response = reply[0]
            try:
                if response.status_code != 200:
                    raise await self._fail(reply, ctx)
                data = await _aread(response, MAX_MANIFEST_SIZE, ctx) if method == "GET" else b""
            finally:
                await response.aclose()
        return response, data, ctx

    async def get_manifest(self, repo: str, reference: str) -> UpstreamManifest:
        """A manifest or index by tag or digest, byte for byte, its digest checked."""
        repo = normalize_repo(self.host, repo)
        _is_digest_reference(reference)
        response, data, ctx = await self._manifest_reply("GET", repo, reference)
        return _check_manifest(response, data, reference, ctx)

    async def head_manifest(self, repo: str, reference: str) -> tuple[str, str, int]:
        """(digest, media type, size) of a manifest, by HEAD when the registry says enough.

        Falls back to a GET when the HEAD lacks the digest, a known media type or the size.
        """
        repo = normalize_repo(self.host, repo)
        is_digest = _is_digest_reference(reference)
        response, _, ctx = await self._manifest_reply("HEAD", repo, reference)
        digest = response.headers.get("docker-content-digest", "").strip()
        media, size = _media_type(response), _content_length(response)
        if media in _SCHEMA1_TYPES:
            raise ManifestUnsupported(f"{ctx.what} on registry {self.host} is a Docker schema 1 manifest, "
                                      "which p2pimg does not support")
        if (not digest.startswith("sha256:") or media not in MANIFEST_MEDIA_TYPES or size is None
                or size > MAX_MANIFEST_SIZE):
            manifest = await self.get_manifest(repo, reference)
            return manifest.digest, manifest.media_type, len(manifest.data)
        parse_digest(digest)
        if is_digest and digest != reference:
            raise VerificationError(f"registry {self.host} answered {ctx.what} with digest {digest}")
        return digest, media, size

    async def read_blob(self, repo: str, digest: str, offset: int = 0,
                        length: int | None = None) -> AsyncGenerator[bytes, None]:
        """Stream a blob, or `length` bytes of it from `offset` (all the rest with None).

        A whole-blob read is verified against `digest`: its last piece is only yielded once the
        hash matched, so a consumer never sees a complete, wrong blob.
        """
        repo = normalize_repo(self.host, repo)
        parse_digest(digest)
        headers = _range_header(offset, length)
        if length == 0:
            return
        ctx = self._ctx(repo, f"blob {repo}@{digest}", "blob")
        with self._bounded(ctx):
            reply = await self._send("GET", f"/v2/{repo}/blobs/{digest}", repo, headers)
        response = reply[0]
        try:
            if response.status_code not in (200, 206):
                with self._bounded(ctx):
                    raise await self._fail(reply, ctx)
            check = _BodyCheck(ctx, digest, _range_skip(response, offset, ctx), length,
                               whole=not headers and response.status_code == 200)
            # Closed explicitly below: a range read stops before the body ends.
            pieces = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            held = b""
            while not check.done:
                with _mapped(ctx):
                    piece = await anext(pieces, None)
                if piece is None:
                    break
                piece = check.feed(piece)
                if check.hasher is None:
                    if piece:
                        yield piece
                elif piece:
                    if held:
                        yield held
                    held = piece
            await pieces.aclose()
            check.finish()
            if held:
                yield held
        finally:
            await response.aclose()

    async def blob_size(self, repo: str, digest: str) -> int:
        """A blob's size from a HEAD (or, if that lacks it, a one-byte ranged GET)."""
        repo = normalize_repo(self.host, repo)
        parse_digest(digest)
        ctx = self._ctx(repo, f"blob {repo}@{digest}", "blob")
        with self._bounded(ctx):
            reply = await self._send("HEAD", f"/v2/{repo}/blobs/{digest}", repo, {})
            response = reply[0]
            try:
                if response.status_code != 200:
                    raise await self._fail(reply, ctx)
            finally:
                await response.aclose()
            size = _content_length(response)
            if size is not None:
                return size
            reply = await self._send("GET", f"/v2/{repo}/blobs/{digest}", repo, {"Range": "bytes=0-0"})
            response = reply[0]
            try:
                if response.status_code not in (200, 206):
                    raise await self._fail(reply, ctx)
            finally:
                await response.aclose()
        total = response.headers.get("content-range", "").rpartition("/")[2]
        size = int(total) if response.status_code == 206 and total.isdigit() else _content_length(response)
        if size is None:
            raise UpstreamError(f"registry {self.host} does not tell the size of {ctx.what}")
        return size


def _manifest_what(repo: str, reference: str) -> str:
    return f"manifest {repo}{'@' if ':' in reference else ':'}{reference}"


async def _aread(response: httpx.Response, limit: int, ctx: _Context, *, truncate: bool = False) -> bytes:
    """At most `limit` bytes of a body: cut there (`truncate`) or refuse a larger one."""
    data = await read_capped(response, limit, truncate=truncate)
    if data is None:
        raise _too_large(ctx, limit)
    return data


# -- synchronous reads for publish -----------------------------------------------------------

def _read(response: httpx.Response, limit: int, deadline: float, ctx: _Context, *,
          truncate: bool = False) -> bytes:
    size = _content_length(response)
    if not truncate and size is not None and size > limit:
        raise _too_large(ctx, limit)
    buf = bytearray()
    for piece in response.iter_raw():
        buf += piece
        if len(buf) > limit:
            if truncate:
                return bytes(buf[:limit])
            raise _too_large(ctx, limit)
        if time.monotonic() > deadline:
            raise UpstreamError(f"registry {ctx.host} is too slow delivering {ctx.what}")
    return bytes(buf)


class _SyncSession:
    """One synchronous connection pool to a registry, sharing the image's `_AuthState`."""

    def __init__(self, image: ImageUrl, auth: _AuthState, timeout: float) -> None:
        self.image, self.auth, self.timeout = image, auth, timeout
        self.client = httpx.Client(**_client_options(timeout))

    def close(self) -> None:
        self.client.close()

    def ctx(self, what: str, kind: str) -> _Context:
        return _Context(self.image.host, self.image.repo, what, kind, self.auth.creds)

    def send(self, method: str, path: str, headers: dict[str, str], deadline: float, ctx: _Context) -> _Reply:
        flow = self.auth.flow(self.client.build_request(method, self.image.base_url + path, headers=headers),
                              _scope(self.image.repo))
        auth_ctx = self.ctx(f"the token for {self.image.repo}", "token")
        step = next(flow)
        while True:
            response = self.client.send(step.request, stream=True)
            body = None
            if step.body is not None or response.status_code == 401:
                try:
                    body = _read(response, step.body or _MAX_ERROR_BODY, deadline, auth_ctx,
                                 truncate=step.body is None)
                finally:
                    response.close()
            try:
                step = flow.send((response, body))
            except StopIteration as stop:
                reply: _Reply = stop.value
                return reply

    def fail(self, reply: _Reply, deadline: float, ctx: _Context) -> P2pimgError:
        response, body = reply
        if body is None:
            body = _read(response, _MAX_ERROR_BODY, deadline, ctx, truncate=True)
        return _error_for(response, body, ctx)

    def get_manifest(self, reference: str) -> UpstreamManifest:
        repo = self.image.repo
        ctx = self.ctx(_manifest_what(repo, reference), "manifest")
        deadline = time.monotonic() + self.timeout * _DEADLINE_FACTOR
        with _mapped(ctx):
            reply = self.send("GET", f"/v2/{repo}/manifests/{reference}", {"Accept": ACCEPT_MANIFESTS},
                              deadline, ctx)
            response = reply[0]
            try:
                if response.status_code != 200:
                    raise self.fail(reply, deadline, ctx)
                data = _read(response, MAX_MANIFEST_SIZE, deadline, ctx)
            finally:
                response.close()
        return _check_manifest(response, data, reference, ctx)

    def open_blob(self, digest: str, size: int) -> BinaryIO:
        ctx = self.ctx(f"blob {self.image.repo}@{digest}", "blob")
        deadline = time.monotonic() + self.timeout * _DEADLINE_FACTOR
        with _mapped(ctx):
            reply = self.send("GET", f"/v2/{self.image.repo}/blobs/{digest}", {}, deadline, ctx)
            response = reply[0]
            if response.status_code != 200:
                try:
                    raise self.fail(reply, deadline, ctx)
                finally:
                    response.close()
        return cast(BinaryIO, _BlobReader(self, response, _BodyCheck(ctx, digest, 0, size, whole=True)))


class _BlobReader(io.RawIOBase):
    """A blob as a file: streamed from the registry, checked for size and digest before EOF."""

    def __init__(self, session: _SyncSession, response: httpx.Response, check: _BodyCheck) -> None:
        self._session, self._response, self._check = session, response, check
        self._pieces = response.iter_raw()
        self._buf = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if self._eof:
                return 0
            piece = None
            if not self._check.done:
                with _mapped(self._check.ctx):
                    piece = next(self._pieces, None)
            if piece is None:
                self._eof = True
                self._check.finish()  # raises: the body ended short
                return 0
            self._buf = memoryview(self._check.feed(piece))
            if self._check.done:
                # Checked when the last byte arrives, before it is handed out: a reader that
                # stops at `size` bytes without reading EOF still never gets a wrong blob.
                self._eof = True
                self._check.finish()
        out = memoryview(b).cast("B")
        n = min(len(out), len(self._buf))
        out[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                cast(Generator[bytes, None, None], self._pieces).close()
            self._response.close()
            self._session.close()
        super().close()


def _open_blob(image: ImageUrl, auth: _AuthState, timeout: float, digest: str, size: int) -> BinaryIO:
    # One session per stream: publish reads streams from worker threads, and each stream's
    # connections go away with it when it is closed.
    session = _SyncSession(image, auth, timeout)
    try:
        return session.open_blob(digest, size)
    except BaseException:
        session.close()
        raise


def import_image(url: str, *, docker_config: Path | None = None, plain_http: bool | None = None,
                 timeout: float = 30.0) -> SourceImage:
    """Read `docker://HOST/REPO:TAG` (or `@DIGEST`) as a publish source, synchronously.

    Every manifest (for an index, every child too) is fetched byte for byte and checked; blobs
    are only opened, each as a stream from the registry, when publish reads them.
    """
    image = parse_image_url(url, plain_http=plain_http)
    auth = _AuthState(image.host, load_credentials(image.host, docker_config),
                      secure=image.base_url.startswith("https:"))
    session = _SyncSession(image, auth, timeout)
    with contextlib.closing(session):
        top = session.get_manifest(image.reference)

        def read_manifest(digest: str, size: int) -> bytes:
            if digest == top.digest:
                return top.data
            if size > MAX_MANIFEST_SIZE:
                raise SourceInvalid(f"manifest {digest} exceeds {MAX_MANIFEST_SIZE} bytes")
            return session.get_manifest(digest).data

        def blob(digest: str, size: int) -> SourceBlob:
            return SourceBlob(digest, size, functools.partial(_open_blob, image, auth, timeout, digest, size))

        return walk_graph(top.digest, top.media_type, read_manifest, blob)


# -- client configuration --------------------------------------------------------------------

def _check_registry(registry: str) -> str:
    host = registry.strip().lower()
    if not _HOST_RE.fullmatch(host):
        raise InvalidInput(f"invalid registry {registry[:100]!r}: expected HOST[:PORT]")
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _mirror_url(mirror: str) -> tuple[str, str]:
    """(URL, host:port) of a p2pimg mirror; a bare HOST:PORT is plain HTTP, as p2pimg serves."""
    text = mirror if "://" in mirror else f"http://{mirror}"
    try:
        parts = urlsplit(text.rstrip("/"))
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"invalid mirror {mirror[:100]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query \
            or parts.username is not None:
        raise InvalidInput(f"invalid mirror {mirror[:100]!r}: expected http://HOST:PORT")
    hostname = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname.lower()
    netloc = f"{hostname}:{port}" if port is not None else hostname
    if not _HOST_RE.fullmatch(netloc):
        raise InvalidInput(f"invalid mirror host {netloc[:100]!r}")
    return f"{parts.scheme}://{netloc}", netloc


def containerd_hosts_toml(registry: str, mirror: str, *, server: str | None = None,
                          skip_verify: bool = False) -> str:
    """`/etc/containerd/certs.d/<registry>/hosts.toml`: pull and resolve through `mirror`.

    containerd tries the mirror first and falls back to `server`, the real registry
    (registry-1.docker.io for Docker Hub, else https://<registry>). An `http://` mirror is
    spoken to in plain HTTP; `skip_verify` is only for an HTTPS mirror with an untrusted cert.
    """
    host = _check_registry(registry)
    mirror_url, _ = _mirror_url(mirror)
    server_url = registry_base(server)[0] if server else (
        DOCKER_HUB_URL if host == DOCKER_HUB else f"https://{host}")
    # Inputs are validated to URL/host characters, so they need no TOML escaping beyond quotes.
    lines = [
        f"# containerd registry configuration for {host}, generated by p2pimg.",
        f"# Install as /etc/containerd/certs.d/{host}/hosts.toml (containerd's registry config_path).",
        f'server = "{server_url}"',
        "",
        f'[host."{mirror_url}"]',
        '  capabilities = ["pull", "resolve"]',
    ]
    if skip_verify and mirror_url.startswith("https:"):
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def podman_registries_conf(registry: str, mirror: str) -> str:
    """A registries.conf (v2) entry that pulls `registry`'s images through `mirror` first."""
    host = _check_registry(registry)
    mirror_url, netloc = _mirror_url(mirror)
    # containers/image has no scheme in a mirror location: plain HTTP is `insecure = true`.
    insecure = "true" if mirror_url.startswith("http:") else "false"
    return (
        f"# Pull {host} images through the p2pimg mirror at {mirror_url}; generated by p2pimg.\n"
        "[[registry]]\n"
        f'location = "{host}"\n'
        "\n"
        "[[registry.mirror]]\n"
        f'location = "{netloc}"\n'
        f"insecure = {insecure}\n"
    )
