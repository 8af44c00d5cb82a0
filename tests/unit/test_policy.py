"""Source selection decisions, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pimg.fetch.policy import BAN_AFTER_BAD_CHUNKS, OriginOnly, PreferNear, SourceStats, policy_named

KINDS = ["peer", "origin", "upstream"]


def stats_strategy() -> st.SearchStrategy[SourceStats]:
    return st.builds(
        lambda i, kind, limit, in_flight, rate, until, banned: SourceStats(
            f"s{i}",
            kind,
            limit,
            in_flight=min(in_flight, limit),
            throughput=rate,
            unavailable_until=until,
            banned=banned,
        ),
        st.integers(0, 10**6),
        st.sampled_from(KINDS),
        st.integers(1, 8),
        st.integers(0, 8),
        st.floats(0, 1e9),
        st.floats(0, 20),
        st.booleans(),
    )


ORDER = {"peer": 0, "origin": 1, "upstream": 2}


@given(st.lists(stats_strategy(), max_size=12, unique_by=lambda s: s.name), st.floats(0, 20))
def test_choices_are_usable_and_nearest_healthy_kind(candidates: list[SourceStats], now: float) -> None:
    for policy in (PreferNear(), OriginOnly()):
        pool = [s for s in candidates if policy.name != "origin-only" or s.kind != "peer"]
        healthy = [s for s in pool if not s.banned and now >= s.unavailable_until]
        chosen = policy.choose(candidates, now)
        if chosen is None:
            # Waiting is right only when no healthy source of the nearest healthy kind is free.
            if healthy:
                nearest = min(ORDER[s.kind] for s in healthy)
                assert all(s.in_flight >= s.slots for s in healthy if ORDER[s.kind] == nearest)
            continue
        assert chosen in pool and chosen.usable(now)
        assert ORDER[chosen.kind] == min(ORDER[s.kind] for s in healthy), "a nearer kind was passed over"
        hedge = policy.choose_hedge(candidates, now)
        assert hedge is not None and hedge.usable(now)


def test_waits_for_a_busy_peer_instead_of_using_the_origin() -> None:
    peer = SourceStats("p", "peer", 2, in_flight=2)
    origin = SourceStats("o", "origin", 8)
    assert PreferNear().choose([peer, origin], 0) is None
    assert PreferNear().choose_hedge([origin], 0) is origin  # a straggling peer is raced
    peer.unavailable_until = 5  # failing: the origin takes over until it recovers
    assert PreferNear().choose([peer, origin], 1) is origin


def test_prefers_peers_then_fast_then_idle() -> None:
    origin = SourceStats("origin", "origin", 8, throughput=1e9)
    slow = SourceStats("peer-slow", "peer", 4, throughput=1e6, delivered=1)
    fast = SourceStats("peer-fast", "peer", 4, throughput=1e8, delivered=1)
    policy = PreferNear()
    assert policy.choose([origin, slow, fast], 0) is fast
    fast.in_flight = 3  # 1e8 / 4 is still better than 1e6
    assert policy.choose([origin, slow, fast], 0) is fast
    fast.in_flight = 4  # at its limit
    assert policy.choose([origin, slow, fast], 0) is slow
    slow.banned = True
    assert policy.choose([origin, slow, fast], 0) is None  # the fast peer will have a slot soon
    fast.banned = True
    assert policy.choose([origin, slow, fast], 0) is origin
    assert OriginOnly().choose([slow, fast], 0) is None


def test_unknown_sources_are_tried_before_measured_ones() -> None:
    known = SourceStats("a", "peer", 4, throughput=5e8)
    new = SourceStats("b", "peer", 4)
    assert PreferNear().choose([known, new], 0) is new


def test_errors_back_off_exponentially_and_success_resets() -> None:
    s = SourceStats("o", "origin", 4)
    waits = []
    for _ in range(4):
        s.started()
        s.failed(100.0)
        waits.append(s.unavailable_until - 100.0)
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert not s.usable(100.0) and s.usable(100.0 + waits[-1])
    s.started()
    s.finished(1 << 20, 0.01, 0.001)
    assert s.errors == 0 and s.throughput > 0 and s.in_flight == 0


def test_lying_peer_is_banned_but_origin_never() -> None:
    peer, origin = SourceStats("p", "peer", 4), SourceStats("o", "origin", 4)
    for n in range(BAN_AFTER_BAD_CHUNKS):
        for s in (peer, origin):
            s.started()
            s.sent_bad_chunk(float(n))
    assert peer.banned and not origin.banned
    assert peer.unavailable_until > origin.unavailable_until
    assert origin.usable(float(BAN_AFTER_BAD_CHUNKS)) and origin.in_flight == 0


def test_policies_by_name() -> None:
    assert isinstance(policy_named("prefer-near"), PreferNear)
    assert isinstance(policy_named("origin-only"), OriginOnly)
    import pytest

    from p2pimg.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown source policy"):
        policy_named("fastest-ever")


def test_a_peer_is_on_probation_until_it_delivers() -> None:
    """One request at a time until a peer has delivered a span (a host claiming everything cannot
    take every chunk at once); a hedge prefers a proven source or the origin to such a peer."""
    new = SourceStats("new", "peer", 4)
    origin = SourceStats("origin", "origin", 8)
    assert new.slots == 1 and not new.proven
    new.started()
    assert PreferNear().choose([new, origin], 0) is None  # waits for the nearer kind, as ever
    assert not new.usable(0)
    new.finished(1 << 20, 0.01, 0.001)
    assert new.proven and new.slots == 4 and new.usable(0)
    stranger = SourceStats("stranger", "peer", 4)
    assert PreferNear().choose_hedge([stranger, origin], 0) is origin
    assert PreferNear().choose_hedge([stranger, origin, new], 0) is new
    new.started()
    new.failed(1.0)  # failing now: on probation again
    assert not new.proven and new.slots == 1
