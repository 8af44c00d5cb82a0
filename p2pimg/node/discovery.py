"""LAN discovery of p2pimg peers over mDNS/DNS-SD (`_p2pimg._tcp.local.`), bridged into trio.

zeroconf runs its own asyncio loop in its own thread; we only use its thread API. Blocking calls
(startup, registration, shutdown) go through `trio.to_thread`, and the browser's listener callbacks,
which zeroconf runs in its browser thread, resolve there and hand the result to trio with
`TrioToken.run_sync_soon`. All peer state is owned by the trio thread, so `peers()` and `changed()`
never race with the callbacks.

Discovery is best effort: when zeroconf cannot start, p2pimg logs one warning and keeps working with
its static peers.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import ifaddr  # a dependency of zeroconf, which uses it for the same enumeration
import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pimg._tcp.local."
PROTOCOL_VERSION = "1"
# Services whose TXT `v` has another major version speak a protocol we do not.
PROTOCOL_MAJOR = 1
# Resolution runs in zeroconf's browser thread, which handles one event at a time: a peer that
# never answers must not hold up the others for long.
RESOLVE_TIMEOUT_MS = 2000
# Unregistering sends goodbyes (~0.4 s) and the browser thread may be mid-resolution; past this we
# abandon the worker thread rather than hold up the caller's shutdown.
CLOSE_TIMEOUT = 5.0
# RFC 6762 suggests 75 minutes for non-address records, so a peer that died without a goodbye would
# linger that long. Two minutes bounds that, at the price of a re-query per peer every ~100 s.
RECORD_TTL = 120

_SAFE_LABEL = re.compile(r"[A-Za-z0-9-]{1,48}")


@dataclass(frozen=True)
class PeerAnnouncement:
    """One reachable address of a discovered peer."""

    url: str  # "http://ADDR:PORT" of the peer server (https with mutual TLS; IPv6 in brackets)
    node_id: str  # stable random id of the node: to ignore ourselves and group a node's addresses
    name: str  # the DNS-SD instance name


class AnnouncementError(ValueError):
    """A service announcement that is malformed or speaks another protocol version."""


# --- pure helpers ------------------------------------------------------------------------------


def peer_url(address: str, port: int, scheme: str = "http") -> str:
    """`http://ADDR:PORT` (or https), with IPv6 addresses in brackets (a zone as `%25`, RFC 6874)."""
    ip = ipaddress.ip_address(address)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    if isinstance(ip, ipaddress.IPv6Address):
        host = ip.compressed.partition("%")[0]
        zone = f"%25{ip.scope_id}" if ip.scope_id else ""
        return f"{scheme}://[{host}{zone}]:{port}"
    return f"{scheme}://{ip}:{port}"


def compatible(version: str) -> bool:
    """Whether a TXT `v` value ("1", "1.2", ...) has our major protocol version."""
    major = version.partition(".")[0]
    return major.isdigit() and int(major) == PROTOCOL_MAJOR


def parse_txt(properties: Mapping[bytes, bytes | None]) -> tuple[str, str]:
    """(node_id, version) from a TXT record; raises AnnouncementError if unusable."""
    fields: dict[str, str | None] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode("ascii").lower()  # RFC 6763 §6.4: keys are case-insensitive ASCII
            value = None if raw_value is None else raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise AnnouncementError(f"undecodable TXT entry {raw_key!r}") from None
        fields.setdefault(key, value)
    version = fields.get("v")
    if not version:
        raise AnnouncementError("TXT has no protocol version (v=)")
    if not compatible(version):
        raise AnnouncementError(f"protocol version {version!r}, we speak {PROTOCOL_VERSION}")
    node_id = fields.get("node")
    if not node_id:
        raise AnnouncementError("TXT has no node id (node=)")
    return node_id, version


def _usable(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if a peer can be reached at it, else None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    # A link-local IPv6 address means nothing without the zone of the interface it was seen on.
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local and not ip.scope_id:
        return None
    return ip


def announcements(
    name: str,
    properties: Mapping[bytes, bytes | None],
    addresses: Iterable[str],
    port: int | None,
    *,
    own_node_id: str,
) -> tuple[PeerAnnouncement, ...]:
    """The peer entries of one resolved service: one per usable address (IPv4 first), none for ourselves.

    Raises AnnouncementError for a malformed or incompatible announcement.
    """
    node_id, _ = parse_txt(properties)
    if node_id == own_node_id:
        return ()
    if port is None or not 0 < port < 65536:
        raise AnnouncementError(f"bad port {port!r}")
    usable = {ip for ip in map(_usable, addresses) if ip is not None}
    ordered = sorted(usable, key=lambda ip: (ip.version, int(ip), str(ip)))
    # A node whose peer listener speaks mutual TLS says so with `tls=1`.
    scheme = "https" if properties.get(b"tls") == b"1" else "http"
    urls = list(dict.fromkeys(peer_url(str(ip), port, scheme) for ip in ordered))
    if not urls:
        raise AnnouncementError("no usable address")
    return tuple(PeerAnnouncement(url, node_id, name) for url in urls)


def advertised_addresses(host: str, interfaces: Sequence[str] | None = None) -> list[str]:
    """The addresses to announce for a server bound to `host`.

    "0.0.0.0" stands for every non-loopback IPv4 address (of `interfaces` when given, else of the
    machine); "::" adds the routable IPv6 ones. Any other address is announced as is.
    """
    ip = ipaddress.ip_address(host)
    if not ip.is_unspecified:
        return [ip.compressed]
    candidates = list(interfaces) if interfaces is not None else _machine_addresses()
    wanted: list[str] = []
    for candidate in candidates:
        try:
            addr = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if addr.is_loopback or addr.is_unspecified or addr.compressed in wanted:
            continue
        if addr.version == 4 or (ip.version == 6 and not addr.is_link_local):
            wanted.append(addr.compressed)
    return wanted


def _machine_addresses() -> list[str]:
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            # ifaddr gives IPv6 as (address, flowinfo, scope_id).
            found.append(entry.ip if isinstance(entry.ip, str) else entry.ip[0])
    return found


def instance_label(node_id: str) -> str:
    """The DNS label naming this node: readable when the id is, bounded and unique otherwise."""
    if _SAFE_LABEL.fullmatch(node_id):
        return f"p2pimg-{node_id}"
    return "p2pimg-" + hashlib.sha256(node_id.encode()).hexdigest()[:16]


# --- the zeroconf side (runs in zeroconf's threads) ------------------------------------------

Resolver = Callable[[Zeroconf, str, str], ServiceInfo | None]


def resolve_service(zc: Zeroconf, type_: str, name: str) -> ServiceInfo | None:
    """Ask for a service's SRV/TXT/addresses; None when nothing answered in time."""
    info = ServiceInfo(type_, name)
    return info if info.request(zc, RESOLVE_TIMEOUT_MS) else None


class _Listener(ServiceListener):
    """Browser callbacks: resolve in zeroconf's thread, then hand the result to trio."""

    def __init__(
        self,
        own_node_id: str,
        deliver: Callable[[str, tuple[PeerAnnouncement, ...]], None],
        resolve: Resolver,
    ) -> None:
        self._own_node_id = own_node_id
        self._deliver = deliver
        self._resolve = resolve
        self.closed = False  # set and read on the trio thread only

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._refresh(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._refresh(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        log.debug("mDNS: %s withdrawn", name)
        self._deliver(name, ())

    def _refresh(self, zc: Zeroconf, type_: str, name: str) -> None:
        # An exception here would end zeroconf's browser thread, and with it all discovery.
        try:
            info = self._resolve(zc, type_, name)
            if info is None:
                # A later record update retries; until then keep what we knew.
                log.debug("mDNS: %s did not resolve in time", name)
                return
            found = announcements(
                name,
                info.properties,
                info.parsed_scoped_addresses(IPVersion.All),
                info.port,
                own_node_id=self._own_node_id,
            )
        except AnnouncementError as exc:
            log.info("mDNS: ignoring %s: %s", name, exc)
            found = ()  # an update may have made a known peer unusable: forget it
        except Exception:
            log.warning("mDNS: cannot process announcement %s", name, exc_info=True)
            return
        self._deliver(name, found)


# --- the trio side ---------------------------------------------------------------------------


class Discovery:
    """Advertise our peer server and browse for others on the LAN."""

    def __init__(
        self,
        *,
        node_id: str,
        advertise: tuple[str, int] | None,
        interfaces: list[str] | None = None,
        tls: bool = False,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        if advertise is not None:
            ipaddress.ip_address(advertise[0])  # a hostname cannot be announced as an address
            if not 0 < advertise[1] < 65536:
                raise ValueError(f"port out of range: {advertise[1]}")
        for interface in interfaces or ():
            ipaddress.ip_address(interface)
        self.node_id = node_id
        self.advertise = advertise
        self.interfaces = interfaces
        self.tls = tls
        self._by_name: dict[str, tuple[PeerAnnouncement, ...]] = {}
        self._changed = trio.Event()

    def peers(self) -> list[PeerAnnouncement]:
        """Current peers, excluding ourselves: one entry per node and address, grouped by node."""
        seen: dict[tuple[str, str], PeerAnnouncement] = {}
        for entries in self._by_name.values():
            for entry in entries:
                seen.setdefault((entry.node_id, entry.url), entry)
        return sorted(seen.values(), key=lambda p: p.node_id)  # stable: keeps each node's address order

    async def changed(self) -> None:
        """Return at the next change of `peers()`."""
        await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Advertise, then browse until cancelled; started() once browsing (or once given up).

        Registration probes the LAN for name conflicts first, so started() comes ~2 s after the call.
        """
        listener = self._listener(trio.lowlevel.current_trio_token())
        zc = await trio.to_thread.run_sync(self._open)
        if zc is None:
            task_status.started()
            await trio.sleep_forever()
        info: ServiceInfo | None = None
        browser: ServiceBrowser | None = None
        try:
            if self.advertise is not None:
                info = await trio.to_thread.run_sync(self._register, zc, self.advertise)
            try:
                browser = await trio.to_thread.run_sync(
                    partial(ServiceBrowser, zc, SERVICE_TYPE, listener=listener)
                )
            except Exception as exc:
                log.warning("mDNS discovery disabled: cannot browse: %s", exc)
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
                await trio.to_thread.run_sync(_shutdown, zc, browser, info, abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.warning("mDNS: shutdown took over %.0fs, abandoned", CLOSE_TIMEOUT)
            # Nothing keeps these fresh any more; a consumer must not act on them.
            listener.closed = True
            self._apply_all({})

    # - internals -

    def _listener(self, token: trio.lowlevel.TrioToken, resolve: Resolver | None = None) -> _Listener:
        """A browser listener that delivers into this Discovery via `token` until closed."""
        listener: _Listener

        def apply(name: str, found: tuple[PeerAnnouncement, ...]) -> None:
            # After an abandoned shutdown the browser thread may still deliver: drop that.
            if not listener.closed:
                self._apply(name, found)

        def deliver(name: str, found: tuple[PeerAnnouncement, ...]) -> None:
            # RunFinishedError: the trio run is over and nobody is listening any more.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(apply, name, found)

        listener = _Listener(self.node_id, deliver, resolve if resolve is not None else resolve_service)
        return listener

    def _apply(self, name: str, found: tuple[PeerAnnouncement, ...]) -> None:
        updated = dict(self._by_name)
        if found:
            updated[name] = found
        else:
            updated.pop(name, None)
        self._apply_all(updated)

    def _apply_all(self, by_name: dict[str, tuple[PeerAnnouncement, ...]]) -> None:
        before = self.peers()
        self._by_name = by_name
        if self.peers() != before:
            self._changed.set()
            self._changed = trio.Event()

    def _open(self) -> Zeroconf | None:
        """Start zeroconf (blocking: opens sockets, starts its loop thread); None if it cannot."""
        try:
            if self.interfaces is not None:
                return Zeroconf(interfaces=list(self.interfaces))
            v6 = self.advertise is not None and ipaddress.ip_address(self.advertise[0]).version == 6
            return Zeroconf(ip_version=IPVersion.All if v6 else IPVersion.V4Only)
        except Exception as exc:
            # No multicast-capable interface, no permission, ...: p2pimg works without discovery.
            log.warning("mDNS discovery disabled: cannot start zeroconf: %s", exc)
            return None

    def _register(self, zc: Zeroconf, advertise: tuple[str, int]) -> ServiceInfo | None:
        """Announce our server (blocking: probes for name conflicts first); None if we cannot."""
        host, port = advertise
        addresses = advertised_addresses(host, self.interfaces)
        if not addresses:
            log.warning("mDNS: not advertising: no non-loopback address for %s", host)
            return None
        label = instance_label(self.node_id)
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties={"node": self.node_id, "v": PROTOCOL_VERSION, **({"tls": "1"} if self.tls else {})},
            server=f"{label}.local.",
            parsed_addresses=addresses,
        )
        try:
            # Another node may hold the instance name (e.g. a restarted one's stale records):
            # zeroconf then picks "NAME-2"; the node id in TXT is what identifies us anyway.
            zc.register_service(info, ttl=RECORD_TTL, allow_name_change=True)
        except Exception as exc:
            log.warning("mDNS: not advertising %s: %s", addresses, exc)
            return None
        log.info("mDNS: advertising %s as %s", [peer_url(a, port) for a in addresses], info.name)
        return info


def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None) -> None:
    """Stop browsing, send goodbyes, close (blocking; each step fails on its own)."""
    if browser is not None:
        try:
            browser.cancel()
        except Exception:
            log.debug("mDNS: stopping the browser failed", exc_info=True)
    if info is not None:
        try:
            zc.unregister_service(info)
        except Exception as exc:
            log.warning("mDNS: could not withdraw %s: %s", info.name, exc)
    try:
        zc.close()
    except Exception:
        log.debug("mDNS: closing zeroconf failed", exc_info=True)
