"""The network-namespace LAN harness for tests: `tools/netns.py` plus its pytest bits.

The harness itself (Lan, Host, support(), shaping, cleanup, lans()) lives in `tools/netns.py`,
where the benchmarks use it too; this module re-exports it and adds what needs pytest: the
`lan_factory` fixture and `require_netns`/`require_shaping`, which skip with the reason.

Use from a test module (conftest.py of this directory belongs to other tests, so the fixture is
bound into the module by name rather than registered there; an assignment, unlike
`from netns import lan_factory`, does not trip ruff's F401/F811 on the fixture argument):

    import netns
    from netns import LanFactory

    lan_factory = netns.lan_factory

    def test_something(lan_factory: LanFactory) -> None:
        lan = lan_factory(3, rate_mbit=20)
        proc = lan.hosts[0].popen([sys.executable, "-m", "p2pimg", "serve", "--listen", ...])

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 and, for shaping, `tc` with the tbf qdisc
(netem is not assumed to exist). When they are missing the fixture skips with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest puts tests/ (pyproject's `pythonpath`) on sys.path, not the repository root that holds
# `tools`; the editable install only provides `p2pimg`.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

from tools.netns import (  # noqa: E402
    BRIDGE,
    DEFAULT_LATENCY_MS,
    HOST_IF,
    IP,
    MAX_HOSTS,
    MAX_ORIGINS,
    MULTICAST_NET,
    ORIGIN_BASE,
    PREFIX,
    RUN_TIMEOUT,
    Direction,
    Host,
    Lan,
    LanFactory,
    NetnsError,
    NetnsUnavailable,
    Support,
    lans,
    support,
    sweep_stale,
)

__all__ = [
    "BRIDGE",
    "DEFAULT_LATENCY_MS",
    "HOST_IF",
    "IP",
    "MAX_HOSTS",
    "MAX_ORIGINS",
    "MULTICAST_NET",
    "ORIGIN_BASE",
    "PREFIX",
    "RUN_TIMEOUT",
    "Direction",
    "Host",
    "Lan",
    "LanFactory",
    "NetnsError",
    "NetnsUnavailable",
    "Support",
    "lan_factory",
    "lans",
    "require_netns",
    "require_shaping",
    "support",
    "sweep_stale",
]


def require_netns() -> None:
    """pytest.skip unless namespaces can be created here."""
    reason = support().netns
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")


def require_shaping() -> None:
    """pytest.skip unless links can be shaped with tbf here."""
    require_netns()
    reason = support().shaping
    if reason:
        pytest.skip(f"link shaping (tc tbf) unavailable: {reason}")


@pytest.fixture
def lan_factory() -> Iterator[LanFactory]:
    """Factory fixture: `lan_factory(n, rate_mbit=None)` -> an open Lan, torn down after the test.

    Skips the test when namespaces (or, for a shaped Lan, tbf) are unavailable here.
    """
    require_netns()
    with lans() as make:

        def make_or_skip(
            n: int, rate_mbit: float | None = None, *, latency_ms: float = DEFAULT_LATENCY_MS
        ) -> Lan:
            if rate_mbit is not None:
                require_shaping()
            return make(n, rate_mbit, latency_ms=latency_ms)

        yield make_or_skip
