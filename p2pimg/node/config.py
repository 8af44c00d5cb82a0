"""Configuration in one place: flags, then environment, then `$P2PIMG_HOME/config.toml`."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from p2pimg.content.model import DEFAULT_CHUNK_SIZE, check_chunk_size, parse_size
from p2pimg.errors import InvalidInput

DEFAULT_LISTEN = "127.0.0.1:5050"
DEFAULT_PEER_PORT = 5051  # the port of a `--peer-dns` name that gives none
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?")  # labels of 1..63, 253 in all


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("p2pimg", appauthor=False))


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise InvalidInput(f"invalid listen address {value!r}: expected HOST:PORT")
    return host, int(port)


def parse_peer_dns(value: str) -> tuple[str, int]:
    """(name, port) of a `--peer-dns NAME[:PORT]`: a DNS name or an address (IPv6 in brackets
    when a port follows) and the port of the peer listeners it names, 5051 when left out."""
    text = value.strip()
    if text.startswith("["):  # [IPv6] or [IPv6]:PORT
        name, bracket, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else str(DEFAULT_PEER_PORT) if not rest else ""
        usable = bool(bracket) and _ip_version(name) == 6
    elif text.count(":") == 1:  # NAME:PORT
        name, _, port = text.partition(":")
        usable = _is_dns_name(name) or _ip_version(name) == 4
    else:  # NAME, or a bare address
        name, port = text, str(DEFAULT_PEER_PORT)
        usable = _is_dns_name(name) or _ip_version(name) != 0
    if not (usable and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
        raise InvalidInput(f"invalid peer DNS name {value[:100]!r}: expected NAME[:PORT]")
    return name, int(port)


def _is_dns_name(text: str) -> bool:
    # A top-level label is never all digits: "1.2.3" is a malformed address, not a name.
    return bool(_DNS_NAME.fullmatch(text)) and not text.rstrip(".").rpartition(".")[2].isdigit()


def _ip_version(text: str) -> int:
    """4 or 6 for an IP address, 0 for anything else."""
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


def _env_flag(name: str, default: object) -> bool:
    value = os.environ.get(name)
    if value is None:
        return bool(default)
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Config:
    home: Path
    origin: str | None
    listen: str = DEFAULT_LISTEN
    chunk_size: int = DEFAULT_CHUNK_SIZE
    upstreams: tuple[str, ...] = ()
    upstream_tag_ttl: float = 300.0
    ipfs_gateways: tuple[str, ...] = ()  # IPFS trustless gateways: a source of IPFS content
    policy: str = "prefer-near"
    peer_listen: str | None = None
    peers: tuple[str, ...] = ()
    peer_dns: tuple[tuple[str, int], ...] = ()  # names whose addresses are peers (--peer-dns)
    mdns: bool = True
    peer_rate: float = 0.0
    peer_max_requests: int = 32
    cache_max: int | None = None  # bytes; a running node evicts down to this
    trust: tuple[str, ...] = ()  # extra publisher public key files (--trust)
    swarm_key_file: str | None = None  # see swarmkey.load_swarm_key for the order of sources
    swarm_key_file_given: bool = False  # named on the command line: it wins over the environment
    peer_tls: tuple[str | None, str | None, str | None] = (None, None, None)  # cert, key, CA files
    # serve a mirror that pulls with the user's credentials on a registry listener beyond loopback
    allow_public_mirror: bool = False
    ui_read_only: bool = False  # the dashboard shows, but takes no actions (warm, pin, gc)
    ui_socket: str | None = None  # also serve the registry listener's API on this unix socket

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def load_config(
    *,
    home: str | None = None,
    origin: str | None = None,
    listen: str | None = None,
    chunk_size: str | None = None,
    upstreams: list[str] | None = None,
    upstream_tag_ttl: float | None = None,
    ipfs_gateways: list[str] | None = None,
    policy: str | None = None,
    peer_listen: str | None = None,
    peers: list[str] | None = None,
    peer_dns: list[str] | None = None,
    mdns: bool | None = None,
    peer_rate: str | None = None,
    peer_max_requests: int | None = None,
    cache_max: str | None = None,
    trust: list[str] | None = None,
    swarm_key_file: str | None = None,
    peer_tls: tuple[str | None, str | None, str | None] | None = None,
    allow_public_mirror: bool | None = None,
    ui_read_only: bool | None = None,
    ui_socket: str | None = None,
) -> Config:
    home_path = Path(home or os.environ.get("P2PIMG_HOME") or default_home()).expanduser().absolute()
    file_values: dict[str, Any] = {}
    config_file = home_path / "config.toml"
    if config_file.is_file():
        try:
            file_values = tomllib.loads(config_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{config_file}: {exc}") from None
    chosen_origin = origin or os.environ.get("P2PIMG_ORIGIN") or file_values.get("origin")
    chosen_listen = listen or file_values.get("listen") or DEFAULT_LISTEN
    parse_listen(chosen_listen)
    size = parse_size(
        chunk_size
        or os.environ.get("P2PIMG_CHUNK_SIZE")
        or file_values.get("chunk_size")
        or DEFAULT_CHUNK_SIZE
    )
    check_chunk_size(size)
    chosen_upstreams = upstreams or file_values.get("upstreams") or []
    if not isinstance(chosen_upstreams, list) or not all(isinstance(u, str) for u in chosen_upstreams):
        raise InvalidInput(f"{config_file}: upstreams must be a list of URLs")
    ttl = upstream_tag_ttl if upstream_tag_ttl is not None else file_values.get("upstream_tag_ttl", 300.0)
    if not isinstance(ttl, int | float) or ttl < 0:
        raise InvalidInput(f"invalid upstream tag TTL {ttl!r}: expected seconds >= 0")
    gateways = ipfs_gateways or os.environ.get("P2PIMG_IPFS_GATEWAYS", "").replace(",", " ").split()
    gateways = gateways or file_values.get("ipfs_gateways") or []
    if not isinstance(gateways, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in gateways
    ):
        raise InvalidInput(f"invalid IPFS gateways {gateways!r}: expected http(s)://HOST[:PORT] URLs")
    chosen_peer_listen = peer_listen or file_values.get("peer_listen")
    if chosen_peer_listen:
        parse_listen(chosen_peer_listen)
    chosen_peers = peers or file_values.get("peers") or []
    for url in chosen_peers:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidInput(f"invalid peer {url!r}: expected http://HOST:PORT")
    chosen_peer_dns = peer_dns or file_values.get("peer_dns") or []
    if not isinstance(chosen_peer_dns, list) or not all(isinstance(n, str) for n in chosen_peer_dns):
        raise InvalidInput(f"{config_file}: peer_dns must be a list of NAME[:PORT]")
    max_requests = peer_max_requests or file_values.get("peer_max_requests") or 32
    if not isinstance(max_requests, int) or max_requests < 1:
        raise InvalidInput(f"invalid peer request limit {max_requests!r}")
    chosen_cache_max = cache_max or file_values.get("cache_max")
    max_bytes = parse_size(chosen_cache_max) if chosen_cache_max is not None else None
    if max_bytes is not None and max_bytes < 0:
        raise InvalidInput(f"invalid cache size limit {chosen_cache_max!r}")
    public_mirror = (
        allow_public_mirror
        if allow_public_mirror is not None
        else file_values.get("allow_public_mirror", False)
    )
    if not isinstance(public_mirror, bool):
        raise InvalidInput(f"{config_file}: allow_public_mirror must be true or false")
    read_only = ui_read_only if ui_read_only is not None else file_values.get("ui_read_only", False)
    if not isinstance(read_only, bool):
        raise InvalidInput(f"{config_file}: ui_read_only must be true or false")
    return Config(
        home=home_path,
        origin=chosen_origin,
        listen=chosen_listen,
        chunk_size=size,
        upstreams=tuple(chosen_upstreams),
        upstream_tag_ttl=float(ttl),
        ipfs_gateways=tuple(dict.fromkeys(u.rstrip("/") for u in gateways)),
        policy=policy or file_values.get("policy") or "prefer-near",
        peer_listen=chosen_peer_listen,
        peers=tuple(chosen_peers),
        peer_dns=tuple(dict.fromkeys(parse_peer_dns(n) for n in chosen_peer_dns)),
        mdns=_env_flag("P2PIMG_MDNS", file_values.get("mdns", True)) if mdns is None else mdns,
        peer_rate=float(parse_size(peer_rate or file_values.get("peer_rate") or 0)),
        peer_max_requests=max_requests,
        cache_max=max_bytes,
        trust=tuple(trust or file_values.get("trust") or ()),
        swarm_key_file=swarm_key_file or file_values.get("swarm_key_file"),
        swarm_key_file_given=bool(swarm_key_file),
        peer_tls=_peer_tls(peer_tls, file_values),
        allow_public_mirror=public_mirror,
        ui_read_only=read_only,
        ui_socket=ui_socket or file_values.get("ui_socket"),
    )


def _peer_tls(
    given: tuple[str | None, str | None, str | None] | None, file_values: dict[str, Any]
) -> tuple[str | None, str | None, str | None]:
    if given is not None and any(given):
        return given
    values = tuple(file_values.get(f"peer_tls_{part}") for part in ("cert", "key", "ca"))
    if not all(v is None or isinstance(v, str) for v in values):
        raise InvalidInput("peer_tls_cert, peer_tls_key and peer_tls_ca must be file paths")
    return values  # type: ignore[return-value]
