"""Registry addresses and image references, as Docker spells them: pure parsing, no I/O.

    registry_base      `http(s)://HOST[:PORT]` or a bare `HOST[:PORT]` -> (base URL, canonical host)
    normalize_repo     Docker Hub's `library/` rule, plus name validation
    parse_image_url    `[docker://][HOST/]REPO(:TAG|@DIGEST)` -> ImageUrl

A registry is known by one canonical host everywhere (credentials, cache paths, messages): lower
case, default ports dropped, and every name Docker Hub goes by folded into `docker.io`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from p2pimg.content.cid import parse_digest
from p2pimg.content.model import check_name, check_tag
from p2pimg.errors import InvalidInput

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_ALIASES",
    "DOCKER_HUB_URL",
    "HOST_RE",
    "ImageUrl",
    "canonical_hub",
    "is_digest_reference",
    "is_loopback",
    "normalize_repo",
    "parse_image_url",
    "registry_base",
]

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Every name Docker Hub goes by; all of them mean the registry at DOCKER_HUB_URL.
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
# `host[:port]` in the form registry_base returns it: DNS labels or a bracketed IPv6 literal.
HOST_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)


def canonical_hub(host: str) -> str:
    """`host`, or `docker.io` if it is any of Docker Hub's names."""
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def is_loopback(hostname: str) -> bool:
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
    return canonical_hub(hostname)


def registry_base(url: str) -> tuple[str, str]:
    """(base URL, host) of a registry given as `http(s)://HOST[:PORT]` or a bare `HOST[:PORT]`.

    A bare host is reached over HTTPS, except loopback hosts, which are plain HTTP as Docker
    treats them. Any Docker Hub name becomes its registry endpoint, registry-1.docker.io.
    """
    text = url.strip()
    if "://" not in text:
        hostname = urlsplit(f"//{text}").hostname or ""
        text = ("http://" if is_loopback(hostname) else "https://") + text
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
    if not HOST_RE.fullmatch(host):
        raise InvalidInput(f"invalid registry host {host[:100]!r}")
    if host == DOCKER_HUB:
        return DOCKER_HUB_URL, host
    return f"{parts.scheme}://{host}", host


def normalize_repo(host: str, repo: str) -> str:
    """The repository name the registry knows: Docker Hub's official images live in `library/`."""
    if host in DOCKER_HUB_ALIASES and "/" not in repo:
        repo = f"library/{repo}"
    return check_name(repo)


def is_digest_reference(reference: str) -> bool:
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
    if plain_http is not None and host_text.lower() not in DOCKER_HUB_ALIASES:
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
