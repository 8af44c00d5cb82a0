"""Registry credentials from Docker's client config (`config.json`): inline `auths` entries only.

`credHelpers` and `credsStore` name external programs, which p2pimg does not run: for a registry
they cover, a warning, then anonymous access. Passwords are never logged or put in an error
message, not even base64-encoded as the file holds them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pimg.errors import InvalidInput
from p2pimg.sources.upstream.refs import DOCKER_HUB, canonical_hub

__all__ = ["Credentials", "docker_config_path", "load_credentials"]

log = logging.getLogger(__name__)

_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_MAX_DOCKER_CONFIG = 1 << 20


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
    return canonical_hub(key.split("/", 1)[0])


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
        log.warning(
            "%s: the entry for %s holds a token (from a credential helper login), which "
            "p2pimg does not support; using anonymous access",
            source,
            where,
        )
    return None


def _read_config(path: Path, explicit: bool) -> dict[str, Any] | None:
    """The config as a JSON object; None when the default one does not exist."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_DOCKER_CONFIG + 1)
    except FileNotFoundError:
        if explicit:
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
    return doc


def load_credentials(host: str, docker_config: Path | None = None) -> Credentials | None:
    """Inline credentials for `host` from Docker's config.json, or None (anonymous access).

    `credHelpers` and `credsStore` (external programs) are not supported: a warning, then
    anonymous access. A missing default config is not an error; a missing explicit one is.
    """
    path = docker_config_path(docker_config)
    source = str(path)
    doc = _read_config(path, explicit=docker_config is not None)
    if doc is None:
        return None
    host = canonical_hub(host)

    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        helper = next((v for k, v in helpers.items() if _auth_key_host(k) == host), None)
        if helper is not None:
            log.warning(
                "%s: credential helper %r for %s is not supported by p2pimg; using anonymous "
                "access (put an inline auth entry in auths to authenticate)",
                source,
                str(helper)[:50],
                host,
            )
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
            log.debug(
                "using credentials of user %r for %s from %s (key %r)", creds.username, host, source, key
            )
            return creds
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        log.warning(
            "%s: credential store %r is not supported by p2pimg; using anonymous access to %s "
            "(put an inline auth entry in auths to authenticate)",
            source,
            store[:50],
            host,
        )
    return None
