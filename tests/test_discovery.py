"""Fast tests of p2pimg.node.discovery: the pure helpers, and the zeroconf-thread -> trio bridge.

Nothing here opens a socket: zeroconf's callbacks are simulated from plain threads and the
Zeroconf/ServiceBrowser classes are replaced by fakes. tests/integration/test_mdns.py runs the
real thing between two network namespaces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import trio
import trio.testing
from zeroconf import ServiceInfo, ServiceListener, Zeroconf

from p2pimg.node import discovery
from p2pimg.node.discovery import (
    SERVICE_TYPE,
    AnnouncementError,
    Discovery,
    PeerAnnouncement,
    advertised_addresses,
    announcements,
    compatible,
    instance_label,
    parse_txt,
    peer_url,
)

NO_ZC = cast(Zeroconf, None)  # the fake resolvers never touch it
NAME_B = f"p2pimg-b.{SERVICE_TYPE}"
NAME_C = f"p2pimg-c.{SERVICE_TYPE}"
NAME_ME = f"p2pimg-me.{SERVICE_TYPE}"


def txt(**fields: str | None) -> dict[bytes, bytes | None]:
    return {k.encode(): None if v is None else v.encode() for k, v in fields.items()}


def service(name: str, node: str, addresses: list[str], port: int = 5051, v: str = "1") -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE, name, port=port, properties={"node": node, "v": v}, parsed_addresses=addresses
    )


# --- URLs ------------------------------------------------------------------------------------


def test_peer_url_ipv4() -> None:
    assert peer_url("10.77.0.2", 5051) == "http://10.77.0.2:5051"


def test_peer_url_puts_ipv6_in_brackets_compressed() -> None:
    assert peer_url("fd00:0:0:0:0:0:0:2", 5051) == "http://[fd00::2]:5051"
    assert peer_url("::1", 80) == "http://[::1]:80"


def test_peer_url_escapes_an_ipv6_zone() -> None:
    assert peer_url("fe80::1%3", 5051) == "http://[fe80::1%253]:5051"


@pytest.mark.parametrize(
    ("address", "port"), [("10.0.0.1", 0), ("10.0.0.1", 65536), ("host.lan", 80), ("10.0.0", 80)]
)
def test_peer_url_rejects_bad_input(address: str, port: int) -> None:
    with pytest.raises(ValueError):
        peer_url(address, port)


# --- TXT records and versions ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "1.0", "1.7", "01"])
def test_same_major_version_is_compatible(version: str) -> None:
    assert compatible(version)


@pytest.mark.parametrize("version", ["2", "0", "10", "2.1", "", "x", "-1", "1x", " 1"])
def test_other_versions_are_not(version: str) -> None:
    assert not compatible(version)


def test_parse_txt() -> None:
    assert parse_txt(txt(node="abc", v="1", extra="whatever")) == ("abc", "1")


def test_parse_txt_keys_are_case_insensitive() -> None:
    assert parse_txt(txt(NODE="abc", V="1.2")) == ("abc", "1.2")


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        (txt(node="abc"), "no protocol version"),
        (txt(node="abc", v=None), "no protocol version"),
        (txt(node="abc", v="2"), "protocol version '2'"),
        (txt(v="1"), "no node id"),
        (txt(node=None, v="1"), "no node id"),
        (txt(node="", v="1"), "no node id"),
        ({b"node": b"\xff\xfe", b"v": b"1"}, "undecodable"),
        ({b"n\xffode": b"x", b"v": b"1"}, "undecodable"),
    ],
)
def test_parse_txt_rejects(properties: dict[bytes, bytes | None], reason: str) -> None:
    with pytest.raises(AnnouncementError, match=reason):
        parse_txt(properties)


# --- announcements ---------------------------------------------------------------------------


def test_one_entry_per_usable_address_sorted() -> None:
    found = announcements(
        NAME_B, txt(node="b", v="1"), ["fd00::2", "10.0.0.10", "10.0.0.9", "10.0.0.9"], 5051, own_node_id="me"
    )
    assert found == (
        PeerAnnouncement("http://10.0.0.9:5051", "b", NAME_B),
        PeerAnnouncement("http://10.0.0.10:5051", "b", NAME_B),
        PeerAnnouncement("http://[fd00::2]:5051", "b", NAME_B),
    )


def test_our_own_announcement_is_skipped() -> None:
    assert announcements(NAME_ME, txt(node="me", v="1"), ["10.0.0.1"], 5051, own_node_id="me") == ()


def test_unusable_addresses_are_dropped() -> None:
    addresses = ["0.0.0.0", "::", "224.0.0.251", "ff02::fb", "fe80::1", "junk", "fe80::1%2", "10.0.0.2"]
    found = announcements(NAME_B, txt(node="b", v="1"), addresses, 80, own_node_id="me")
    assert [p.url for p in found] == ["http://10.0.0.2:80", "http://[fe80::1%252]:80"]


@pytest.mark.parametrize(
    ("properties", "addresses", "port", "reason"),
    [
        (txt(node="b", v="1"), ["0.0.0.0", "fe80::1"], 5051, "no usable address"),
        (txt(node="b", v="1"), [], 5051, "no usable address"),
        (txt(node="b", v="1"), ["10.0.0.2"], None, "bad port"),
        (txt(node="b", v="1"), ["10.0.0.2"], 0, "bad port"),
        (txt(node="b", v="3"), ["10.0.0.2"], 5051, "protocol version"),
    ],
)
def test_bad_announcements_raise(
    properties: dict[bytes, bytes | None], addresses: list[str], port: int | None, reason: str
) -> None:
    with pytest.raises(AnnouncementError, match=reason):
        announcements(NAME_B, properties, addresses, port, own_node_id="me")


# --- what we advertise -----------------------------------------------------------------------


def test_a_specific_host_is_advertised_as_is() -> None:
    assert advertised_addresses("10.77.0.1") == ["10.77.0.1"]
    assert advertised_addresses("fd00:0::1") == ["fd00::1"]


def test_wildcard_means_non_loopback_ipv4_of_the_interfaces() -> None:
    interfaces = ["127.0.0.1", "10.77.0.1", "fd00::1", "192.168.5.5", "10.77.0.1"]
    assert advertised_addresses("0.0.0.0", interfaces) == ["10.77.0.1", "192.168.5.5"]


def test_ipv6_wildcard_adds_routable_ipv6() -> None:
    interfaces = ["127.0.0.1", "::1", "fe80::1", "10.77.0.1", "fd00::1"]
    assert advertised_addresses("::", interfaces) == ["10.77.0.1", "fd00::1"]


def test_wildcard_without_interfaces_asks_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "_machine_addresses", lambda: ["127.0.0.1", "10.1.2.3", "::1"])
    assert advertised_addresses("0.0.0.0") == ["10.1.2.3"]


def test_machine_addresses_are_strings() -> None:
    found = discovery._machine_addresses()
    assert all(isinstance(a, str) and "%" not in a for a in found)


def test_instance_label() -> None:
    assert instance_label("3f2a-node") == "p2pimg-3f2a-node"
    odd = instance_label("a.b c/d" * 20)
    assert odd.startswith("p2pimg-") and len(odd) == len("p2pimg-") + 16
    assert instance_label("x" * 49) != instance_label("x" * 50)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": "", "advertise": None},
        {"node_id": "me", "advertise": ("localhost", 5051)},
        {"node_id": "me", "advertise": ("10.0.0.1", 0)},
        {"node_id": "me", "advertise": None, "interfaces": ["eth0"]},
    ],
)
def test_bad_configuration_is_an_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Discovery(**kwargs)


# --- the thread -> trio bridge -----------------------------------------------------------------


class Network:
    """What a fake resolver answers, and zeroconf-like callbacks fired from foreign threads."""

    def __init__(self) -> None:
        self.infos: dict[str, ServiceInfo | None] = {}
        self.resolved: list[str] = []

    def resolve(self, zc: Zeroconf, type_: str, name: str) -> ServiceInfo | None:
        assert threading.current_thread() is not threading.main_thread(), "resolving on the trio thread"
        self.resolved.append(name)
        info = self.infos[name]
        return info

    def fire(self, listener: ServiceListener, method: str, name: str) -> threading.Thread:
        """Call a listener method from a new thread, as zeroconf's browser thread would."""
        thread = threading.Thread(target=getattr(listener, method), args=(NO_ZC, SERVICE_TYPE, name))
        thread.start()
        return thread

    def call(self, listener: ServiceListener, method: str, name: str) -> BaseException | None:
        """Call a listener method in a new thread and wait for it; what it raised into that thread."""
        raised: list[BaseException] = []

        def run() -> None:
            try:
                getattr(listener, method)(NO_ZC, SERVICE_TYPE, name)
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), f"{method} hung in zeroconf's thread"
        return raised[0] if raised else None


async def fired(discovery_: Discovery, fire: Callable[[], threading.Thread]) -> None:
    """Fire a callback and wait for `changed()`; fails instead of hanging."""
    with trio.fail_after(5):
        # No checkpoint between fire() and changed(): the change cannot slip in unseen.
        thread = fire()
        await discovery_.changed()
    thread.join()


async def settled(listener: ServiceListener, method: str, name: str) -> None:
    """Run a callback in a worker thread; when this returns, its delivery has been applied.

    trio reports the worker's result through the same token queue after our callback, so it is
    processed in order.
    """
    await trio.to_thread.run_sync(getattr(listener, method), NO_ZC, SERVICE_TYPE, name)


async def test_added_updated_removed_services_reach_trio() -> None:
    d = Discovery(node_id="me", advertise=None)
    net = Network()
    listener = d._listener(trio.lowlevel.current_trio_token(), resolve=net.resolve)

    net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.2"])
    await fired(d, lambda: net.fire(listener, "add_service", NAME_B))
    assert d.peers() == [PeerAnnouncement("http://10.0.0.2:5051", "b", NAME_B)]

    net.infos[NAME_C] = service(NAME_C, "c", ["fd00::3"], port=6000)
    await fired(d, lambda: net.fire(listener, "add_service", NAME_C))
    assert [p.url for p in d.peers()] == ["http://10.0.0.2:5051", "http://[fd00::3]:6000"]

    # An update replaces what the service announced before.
    net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.22", "10.0.0.2"], port=5052)
    await fired(d, lambda: net.fire(listener, "update_service", NAME_B))
    assert [p.url for p in d.peers() if p.node_id == "b"] == ["http://10.0.0.2:5052", "http://10.0.0.22:5052"]
    assert [p.node_id for p in d.peers()] == ["b", "b", "c"]

    await fired(d, lambda: net.fire(listener, "remove_service", NAME_B))
    assert [p.node_id for p in d.peers()] == ["c"]
    await fired(d, lambda: net.fire(listener, "remove_service", NAME_C))
    assert d.peers() == []


async def test_ourselves_and_duplicates_do_not_count_as_changes() -> None:
    d = Discovery(node_id="me", advertise=None)
    net = Network()
    listener = d._listener(trio.lowlevel.current_trio_token(), resolve=net.resolve)
    changes = 0

    async def count(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal changes
        task_status.started()
        while True:
            await d.changed()
            changes += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(count)
        net.infos[NAME_ME] = service(NAME_ME, "me", ["10.0.0.1"])
        await settled(listener, "add_service", NAME_ME)
        await trio.testing.wait_all_tasks_blocked()
        assert (changes, d.peers()) == (0, [])

        net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.2"])
        await settled(listener, "add_service", NAME_B)
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 1
        # The same data again (zeroconf fires updates for TTL refreshes too): no change.
        await settled(listener, "update_service", NAME_B)
        # The same node under a second instance name (e.g. renamed after a restart): deduplicated.
        net.infos[NAME_C] = service(NAME_C, "b", ["10.0.0.2"])
        await settled(listener, "add_service", NAME_C)
        await trio.testing.wait_all_tasks_blocked()
        assert changes == 1
        assert d.peers() == [PeerAnnouncement("http://10.0.0.2:5051", "b", NAME_B)]
        nursery.cancel_scope.cancel()


async def test_bad_announcements_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    d = Discovery(node_id="me", advertise=None)
    net = Network()
    listener = d._listener(trio.lowlevel.current_trio_token(), resolve=net.resolve)
    net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.2"])
    await settled(listener, "add_service", NAME_B)

    with caplog.at_level(logging.INFO, logger="p2pimg.node.discovery"):
        net.infos[NAME_C] = service(NAME_C, "c", ["10.0.0.3"], v="2")
        await settled(listener, "add_service", NAME_C)
        assert "protocol version '2'" in caplog.text

        net.infos[NAME_C] = ServiceInfo(
            SERVICE_TYPE, NAME_C, port=5051, properties=b"\x05node=", parsed_addresses=["10.0.0.3"]
        )
        await settled(listener, "add_service", NAME_C)

        def broken(zc: Zeroconf, type_: str, name: str) -> ServiceInfo | None:
            raise RuntimeError("zeroconf had a bad day")

        crashing = d._listener(trio.lowlevel.current_trio_token(), resolve=broken)
        await settled(crashing, "add_service", NAME_C)  # must not raise into zeroconf's thread
        assert "zeroconf had a bad day" in caplog.text

    # A resolution that times out keeps what we knew; a now-incompatible update drops the peer.
    net.infos[NAME_B] = None
    await settled(listener, "update_service", NAME_B)
    assert [p.node_id for p in d.peers()] == ["b"]
    net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.2"], v="9")
    await fired(d, lambda: net.fire(listener, "update_service", NAME_B))
    assert d.peers() == []


def test_callbacks_after_the_trio_run_are_harmless(caplog: pytest.LogCaptureFixture) -> None:
    """zeroconf's thread outlives the trio run: its callbacks then resolve and deliver into a run
    that is over. Nothing may raise into that thread (it would end discovery), nothing is applied."""
    d = Discovery(node_id="me", advertise=None)
    net = Network()

    async def make() -> ServiceListener:
        return d._listener(trio.lowlevel.current_trio_token(), resolve=net.resolve)

    listener = trio.run(make)
    net.infos[NAME_B] = service(NAME_B, "b", ["10.0.0.2"])
    with caplog.at_level(logging.DEBUG, logger="p2pimg.node.discovery"):
        for method in ("add_service", "remove_service"):
            raised = net.call(listener, method, NAME_B)
            assert raised is None, f"{method} after the run raised into zeroconf's thread: {raised!r}"
    # The add got as far as delivering (resolved, usable, no failure swallowed on the way) ...
    assert net.resolved == [NAME_B]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text
    # ... and what it delivered went nowhere.
    assert d.peers() == []


# --- run(): lifecycle against fake zeroconf classes --------------------------------------------


class FakeZeroconf:
    instances: list[FakeZeroconf] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[str] = []
        self.registered: ServiceInfo | None = None
        self.register_error: Exception | None = None
        self.close_delay = 0.0
        FakeZeroconf.instances.append(self)

    def register_service(
        self, info: ServiceInfo, ttl: int | None = None, allow_name_change: bool = False
    ) -> None:
        assert threading.current_thread() is not threading.main_thread(), "blocking call on the trio thread"
        self.calls.append("register")
        if self.register_error is not None:
            raise self.register_error
        self.registered = info
        self.ttl = ttl

    def unregister_service(self, info: ServiceInfo) -> None:
        assert info is self.registered
        self.calls.append("unregister")

    def close(self) -> None:
        self.calls.append("close")
        time.sleep(self.close_delay)


class FakeBrowser:
    instances: list[FakeBrowser] = []

    def __init__(self, zc: FakeZeroconf, type_: str, *, listener: ServiceListener) -> None:
        assert type_ == SERVICE_TYPE
        self.zc = zc
        self.listener = listener
        zc.calls.append("browse")
        FakeBrowser.instances.append(self)

    def cancel(self) -> None:
        self.zc.calls.append("cancel")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[list[FakeZeroconf], list[FakeBrowser]]:
    FakeZeroconf.instances = []
    FakeBrowser.instances = []
    monkeypatch.setattr(discovery, "Zeroconf", FakeZeroconf)
    monkeypatch.setattr(discovery, "ServiceBrowser", FakeBrowser)
    return FakeZeroconf.instances, FakeBrowser.instances


async def test_run_registers_browses_and_cleans_up(
    fakes: tuple[list[FakeZeroconf], list[FakeBrowser]], monkeypatch: pytest.MonkeyPatch
) -> None:
    zcs, browsers = fakes
    d = Discovery(node_id="me", advertise=("0.0.0.0", 5051), interfaces=["127.0.0.1", "192.0.2.7"])
    peer = service(NAME_B, "b", ["192.0.2.8"])
    monkeypatch.setattr(discovery, "resolve_service", lambda zc, type_, name: peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        (zc,) = zcs
        assert zc.kwargs == {"interfaces": ["127.0.0.1", "192.0.2.7"]}
        assert zc.calls == ["register", "browse"]
        info = zc.registered
        assert info is not None
        assert info.name == f"p2pimg-me.{SERVICE_TYPE}"
        assert info.properties == {b"node": b"me", b"v": b"1"}
        assert info.port == 5051 and info.parsed_addresses() == ["192.0.2.7"]
        assert zc.ttl == discovery.RECORD_TTL

        # The listener run() handed to the browser delivers into this Discovery.
        (browser,) = browsers
        await fired(d, lambda: Network().fire(browser.listener, "add_service", NAME_B))
        assert [p.url for p in d.peers()] == ["http://192.0.2.8:5051"]
        nursery.cancel_scope.cancel()
    assert zc.calls == ["register", "browse", "cancel", "unregister", "close"]
    assert d.peers() == []  # nothing keeps them fresh once we stop


async def test_browse_only(fakes: tuple[list[FakeZeroconf], list[FakeBrowser]]) -> None:
    zcs, _ = fakes
    d = Discovery(node_id="me", advertise=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        nursery.cancel_scope.cancel()
    assert zcs[0].calls == ["browse", "cancel", "close"]


async def test_a_failed_registration_still_browses(
    fakes: tuple[list[FakeZeroconf], list[FakeBrowser]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    zcs, _ = fakes

    def failing(**kwargs: Any) -> FakeZeroconf:
        zc = FakeZeroconf(**kwargs)
        zc.register_error = RuntimeError("name conflict storm")
        return zc

    monkeypatch.setattr(discovery, "Zeroconf", failing)
    d = Discovery(node_id="me", advertise=("10.0.0.1", 5051))
    with caplog.at_level(logging.WARNING, logger="p2pimg.node.discovery"):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            nursery.cancel_scope.cancel()
    assert zcs[0].calls == ["register", "browse", "cancel", "close"]
    assert "name conflict storm" in caplog.text


async def test_zeroconf_that_cannot_start_means_empty_discovery(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_multicast(**kwargs: Any) -> Zeroconf:
        raise OSError(19, "No such device")

    monkeypatch.setattr(discovery, "Zeroconf", no_multicast)
    d = Discovery(node_id="me", advertise=("0.0.0.0", 5051))
    with caplog.at_level(logging.WARNING, logger="p2pimg.node.discovery"), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            assert d.peers() == []
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No such device" in warnings[0].getMessage()


async def test_a_hung_shutdown_is_abandoned(
    fakes: tuple[list[FakeZeroconf], list[FakeBrowser]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    zcs, browsers = fakes
    monkeypatch.setattr(discovery, "CLOSE_TIMEOUT", 0.2)
    monkeypatch.setattr(
        discovery, "resolve_service", lambda zc, type_, name: service(name, "b", ["10.0.0.2"])
    )
    d = Discovery(node_id="me", advertise=None)
    with caplog.at_level(logging.WARNING, logger="p2pimg.node.discovery"):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            zcs[0].close_delay = 1.0
            start = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - start < 0.9
    assert "abandoned" in caplog.text
    # The abandoned browser thread may still call back: that must not resurrect any peer.
    await settled(browsers[0].listener, "add_service", NAME_B)
    assert d.peers() == []
