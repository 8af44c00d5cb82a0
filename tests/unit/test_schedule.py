"""The scheduling core, driven directly with a fake clock: each decision by name, then properties
over random event sequences. No trio, no sockets: time is a number the test chooses."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pimg.errors import OriginError, VerificationError
from p2pimg.fetch.policy import BAN_AFTER_BAD_CHUNKS
from p2pimg.fetch.schedule import (
    COMING,
    BlobSchedule,
    Cancel,
    GiveUp,
    Request,
    ScheduleConfig,
    Scheduler,
    Span,
    Start,
    Traits,
)

MB = 1 << 20
DIGEST = "sha256:" + "ab" * 32


def origin(**kw: object) -> Traits:
    return Traits("origin", "origin", **kw)  # type: ignore[arg-type]


def peer(name: str, **kw: object) -> Traits:
    options: dict[str, object] = {"limit": 4, "max_span": 4 * MB, "stall_timeout": 5.0, "node_id": name}
    options.update(kw)
    return Traits(name, "peer", **options)  # type: ignore[arg-type]


def make(
    sources: list[Traits],
    count: int = 8,
    *,
    node_id: str | None = "me",
    have: list[bool] | None = None,
    now: float = 0.0,
    seed: int = 1,
    **config: float,
) -> BlobSchedule:
    scheduler = Scheduler(config=ScheduleConfig(**config), node_id=node_id)  # type: ignore[arg-type]
    for source in sources:
        scheduler.join(source)
    return scheduler.blob(DIGEST, count * MB, MB, have or [False] * count, now, rng=random.Random(seed))


def starts(actions: list[Start | Cancel | GiveUp], source: str | None = None) -> list[Request]:
    return [a.request for a in actions if isinstance(a, Start) and source in (None, a.request.source)]


def chunks(requests: list[Request]) -> list[int]:
    return sorted(j for r in requests for j in range(r.span.first, r.span.end))


def deliver(blob: BlobSchedule, request: Request, now: float) -> None:
    for i in range(request.next_index, request.span.end):
        blob.verified(request, i, now)
    blob.ended(request, "ok", now)


# -- order, spans, resume ----------------------------------------------------------------------------


def test_alone_in_order_in_spans_that_never_cross_a_segment() -> None:
    blob = make([origin(max_span=4 * MB, segment_size=3 * MB)], count=8)
    spans = [r.span for r in starts(blob.poll(0.0))]
    assert spans == [Span(0, 3), Span(3, 6), Span(6, 8)]  # in order; cut at 3 and 6 (segments)


def test_spans_grow_where_the_wait_for_a_first_byte_dominates() -> None:
    """A source that has shown 0.5 s before each first byte at 40 MB/s gets spans of at least
    8 x 0.5 x 40 MB (within its segments); one with a short wait keeps its span size."""
    slow = make([origin(max_span=2 * MB, segment_size=64 * MB)], count=64)
    stats = slow.scheduler.stats["origin"]
    stats.throughput, stats.latency = 40 * MB, 0.5
    spans = [r.span for r in starts(slow.poll(0.0))]
    assert spans[0] == Span(0, 64)  # 160 MB wanted: the whole 64 MB segment in one request
    quick = make([origin(max_span=2 * MB, segment_size=64 * MB)], count=64)
    stats = quick.scheduler.stats["origin"]
    stats.throughput, stats.latency = 40 * MB, 0.001
    assert {r.span.end - r.span.first for r in starts(quick.poll(0.0))} == {2}


def test_resume_from_verified_chunks_asks_only_for_what_is_missing() -> None:
    have = [True, True, False, False, True, False, False, False]
    blob = make([origin()], have=have)
    assert chunks(starts(blob.poll(0.0))) == [2, 3, 5, 6, 7]
    assert [r.span for r in blob.requests.values()] == [Span(2, 4), Span(5, 8)]  # not across chunk 4


def test_a_complete_blob_needs_nothing() -> None:
    blob = make([origin()], have=[True] * 8)
    assert blob.complete and blob.poll(0.0) == []


# -- sharing with peers ------------------------------------------------------------------------------


def _pair(count: int, **config: float) -> tuple[BlobSchedule, BlobSchedule]:
    a = make([origin(limit=100), peer("b")], count, node_id="a", **config)  # type: ignore[arg-type]
    b = make([origin(limit=100), peer("a")], count, node_id="b", **config)  # type: ignore[arg-type]
    a.inventory("b", bytes(count), 0.0)  # b takes part (nothing verified yet, just heard of)
    b.inventory("a", bytes(count), 0.0)
    return a, b


def test_owner_split_each_block_from_the_origin_once() -> None:
    count = 32
    a, b = _pair(count, swarm_span=MB, slow_start=0.0, swarm_origin_requests=100)
    from_a = chunks(starts(a.poll(0.1), "origin"))
    from_b = chunks(starts(b.poll(0.1), "origin"))
    assert from_a and from_b, "both nodes own some blocks"
    assert not set(from_a) & set(from_b), "a block is asked of the origin by its owner only"
    assert sorted(from_a + from_b) == list(range(count))
    assert all(a.owner_rank(i, 0.1, [peer("b")]) == 0 for i in from_a)


def test_the_next_ranked_node_takes_an_unseen_block_after_steal_after() -> None:
    a, b = _pair(
        16, swarm_span=MB, slow_start=0.0, swarm_origin_requests=100, steal_after=1.5, stale_claims=100.0
    )
    mine = chunks(starts(b.poll(0.0), "origin"))
    assert 0 < len(mine) < 16
    assert starts(b.poll(1.4)) == [], "the owner (a) is still given time"
    stolen = chunks(starts(b.poll(1.6), "origin"))
    assert sorted(mine + stolen) == list(range(16)), "rank 1 takes a's unseen blocks after 1.5 s"


def test_a_block_the_owner_is_bringing_is_not_stolen() -> None:
    a, b = _pair(4, swarm_span=MB, slow_start=0.0, swarm_origin_requests=100, stale_claims=100.0)
    owned_by_a = [i for i in range(4) if b.owner_rank(i, 0.0, [peer("a")]) == 1]
    assert owned_by_a
    states = bytes(COMING if i in owned_by_a else 0 for i in range(4))
    b.inventory("a", states, 0.0)
    b.poll(0.0)
    assert all(b.requested[i] == 0 for i in owned_by_a)
    b.poll(10.0)  # long after steal_after: a is still bringing them (and progressing)
    assert all(b.requested[i] == 0 for i in owned_by_a)


def test_waits_for_a_peer_bringing_a_chunk_only_while_it_progresses() -> None:
    blob = make([origin(), peer("p")], 4, node_id=None, slow_start=0.0, stale_claims=2.0)
    blob.inventory("p", bytes([COMING] * 4), 0.0)
    assert starts(blob.poll(0.5)) == [], "p says it is bringing every chunk: wait"
    blob.inventory("p", bytes([COMING] * 4), 2.5)  # nothing new for 2.5 s: a claim, not progress
    assert chunks(starts(blob.poll(2.5), "origin")) == [0, 1, 2, 3]


def test_slow_start_one_origin_request_then_a_few() -> None:
    blob = make([origin(max_span=MB)], 16, node_id=None, slow_start=0.6, swarm_origin_requests=3)
    blob.scheduler.join(peer("p"))
    blob.swarm = True  # peers were known when it started
    blob.inventory("p", bytes(16), 0.0)
    assert len(starts(blob.poll(0.1))) == 1
    assert starts(blob.poll(0.2)) == []
    assert len(starts(blob.poll(0.7))) == 2  # three in flight after the slow start


def test_a_peer_is_preferred_and_on_probation_gets_one_request() -> None:
    blob = make([origin(), peer("p")], 16, node_id=None)
    blob.inventory("p", b"", 0.0)
    first = starts(blob.poll(0.0))
    assert [r.source for r in first if r.source == "p"] == ["p"], "one request while unproven"
    deliver(blob, next(r for r in first if r.source == "p"), 0.1)
    assert blob.scheduler.stats["p"].proven
    assert len(starts(blob.poll(0.1), "p")) >= 2, "proven: up to its limit"


# -- failures ----------------------------------------------------------------------------------------


def test_hedge_against_the_fastest_holder_and_stop_the_stalled_peer() -> None:
    blob = make([origin(), peer("p", max_span=4 * MB)], 4, node_id=None, swarm_span=4 * MB)
    blob.scheduler.stats["origin"].throughput = 50e6  # learnt earlier: a chunk takes 0.02 s
    blob.inventory("p", b"", 0.0)
    (stuck,) = starts(blob.poll(0.0))
    assert stuck.source == "p" and stuck.span == Span(0, 4)
    blob.verified(stuck, 0, 0.1)
    assert starts(blob.poll(0.9)) == [], "not yet: idle 0.8 s"
    actions = blob.poll(1.2)  # idle 1.1 s, where a chunk takes 0.02 s from the origin
    (hedge,) = starts(actions)
    assert hedge.source == "origin" and hedge.span == Span(1, 4) and hedge.hedge
    assert [(c.request, c.failed) for c in actions if isinstance(c, Cancel)] == [(stuck, True)]
    blob.ended(stuck, "cancelled", 1.2)
    assert blob.scheduler.stats["p"].errors == 1, "a stalled peer is charged"


def test_a_stalled_request_is_cancelled_after_its_stall_timeout() -> None:
    blob = make([origin(stall_timeout=3.0)], 2, node_id=None)
    (request,) = starts(blob.poll(0.0))
    assert not [a for a in blob.poll(2.9) if isinstance(a, Cancel)]
    (cancel,) = [a for a in blob.poll(3.1) if isinstance(a, Cancel)]
    assert cancel.request is request and cancel.failed
    blob.ended(request, "cancelled", 3.1)
    assert blob.failures[0] == 1 and blob.scheduler.stats["origin"].errors == 1
    assert blob.last_failure is not None and "stalled" in blob.last_failure.message


def test_a_slow_request_that_still_sends_bytes_is_not_a_stall() -> None:
    blob = make([origin(stall_timeout=3.0)], 2, node_id=None)
    (request,) = starts(blob.poll(0.0))
    for now in (1.0, 2.0, 3.0, 4.0):
        blob.progressed(request, now)  # bytes, but no whole chunk yet
    assert not [a for a in blob.poll(4.5) if isinstance(a, Cancel)]
    assert [a.request for a in blob.poll(7.5) if isinstance(a, Cancel)] == [request]


def test_same_source_hedge_only_when_stuck_and_the_one_behind_stops() -> None:
    blob = make([origin(max_span=4 * MB)], 4, node_id=None, same_source_hedge=5.0)
    (first,) = starts(blob.poll(0.0))
    blob.verified(first, 0, 0.5)
    blob.progressed(first, 5.0)  # slow, not stuck: a second request would send the same bytes
    assert starts(blob.poll(6.0)) == []
    (hedge,) = starts(blob.poll(10.1))  # nothing at all for 5.1 s: stuck
    assert hedge.source == "origin" and hedge.span == Span(1, 4) and hedge.hedge and first.hedged
    # The straggler wakes up and brings chunk 1 first: the hedge, behind it, stops uncharged.
    (cancel,) = blob.verified(first, 1, 10.2)
    assert isinstance(cancel, Cancel) and cancel.request is hedge and not cancel.failed
    blob.ended(hedge, "cancelled", 10.2)
    assert blob.scheduler.stats["origin"].errors == 0 and blob.failures == [0] * 4


def test_a_hedge_that_gets_ahead_stops_the_straggler_and_charges_it() -> None:
    blob = make([origin(max_span=4 * MB)], 4, node_id=None, same_source_hedge=5.0)
    (first,) = starts(blob.poll(0.0))
    (hedge,) = starts(blob.poll(5.1))
    (cancel,) = blob.verified(hedge, 0, 5.3)
    assert isinstance(cancel, Cancel) and cancel.request is first and cancel.failed
    blob.ended(first, "cancelled", 5.3)
    assert blob.scheduler.stats["origin"].errors == 1


def test_ban_after_three_bad_chunks() -> None:
    blob = make([origin(), peer("liar")], 8, node_id=None, slow_start=0.0)
    blob.inventory("liar", b"", 0.0)
    stats = blob.scheduler.stats["liar"]
    now = 0.0
    for _ in range(BAN_AFTER_BAD_CHUNKS):
        now = max(now, stats.unavailable_until) + 0.01
        lied = [r for r in starts(blob.poll(now)) if r.source == "liar"]
        assert lied, "the liar is tried again once its penalty is over"
        blob.ended(lied[0], "bad", now, error=VerificationError("chunk does not match"))
        for r in list(blob.requests.values()):  # the origin's requests: let them fail politely
            blob.ended(r, "busy", now)
    assert stats.banned
    for step in range(1, 40):
        assert all(r.source != "liar" for r in starts(blob.poll(now + step)))


def test_give_up_after_the_origin_failed_a_chunk_attempts_times() -> None:
    blob = make([origin(max_span=MB)], 1, node_id=None, attempts=4)
    now = 0.0
    for _ in range(4):
        now = max(now, blob.scheduler.stats["origin"].unavailable_until) + 0.01
        (request,) = starts(blob.poll(now))
        blob.ended(request, "error", now, error=OriginError("connection reset"))
    now = max(now, blob.scheduler.stats["origin"].unavailable_until) + 0.01
    (give_up,) = [a for a in blob.poll(now) if isinstance(a, GiveUp)]
    assert "failed 4 times" in give_up.error.message and "connection reset" in give_up.error.message


def test_peer_failures_do_not_count_toward_attempts() -> None:
    names = [f"p{i}" for i in range(6)]
    blob = make([origin(), *(peer(n) for n in names)], 1, node_id=None, attempts=2)
    for n in names:
        blob.inventory(n, b"", 0.0)
    now, failed = 0.0, set[str]()
    while len(failed) < len(names):
        (request,) = starts(blob.poll(now))
        assert request.source != "origin", "peers first"
        blob.ended(request, "error", now, error=OriginError("reset"))
        failed.add(request.source)
    assert blob.failures == [0]
    (last,) = starts(blob.poll(now))
    assert last.source == "origin", "every peer failed the chunk: the origin, and no give-up"


def test_give_up_when_no_source_holds_a_chunk_any_more() -> None:
    blob = make([peer("p")], 2, node_id=None)
    blob.inventory("p", b"", 0.0)
    (request,) = starts(blob.poll(0.0))
    blob.ended(request, "error", 0.1, error=OriginError("gone"))
    (give_up,) = [a for a in blob.poll(0.2) if isinstance(a, GiveUp)]
    assert "no usable source has chunk 0" in give_up.error.message and "gone" in give_up.error.message


def test_busy_is_neither_a_failure_nor_an_attempt() -> None:
    blob = make([origin()], 1, node_id=None)
    (request,) = starts(blob.poll(0.0))
    blob.ended(request, "busy", 0.0)
    stats = blob.scheduler.stats["origin"]
    assert stats.errors == 0 and blob.failures == [0] and stats.unavailable_until == 0.5
    assert starts(blob.poll(0.4)) == []
    assert len(starts(blob.poll(0.6))) == 1


def test_a_source_that_left_is_not_asked_again() -> None:
    blob = make([origin(), peer("p")], 4, node_id=None)
    blob.inventory("p", b"", 0.0)
    blob.scheduler.leave("p")
    assert {r.source for r in starts(blob.poll(0.0))} == {"origin"}


# -- properties over random event sequences --------------------------------------------------------------


@st.composite
def _swarms(draw: st.DrawFn) -> tuple[int, list[tuple[str, bytes | None]], list[int]]:
    count = draw(st.integers(1, 12))
    holdings = []
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["all", "some", "none", "coming"]))
        listed = st.lists(st.sampled_from([0, 1, 2]), min_size=count, max_size=count)
        states: bytes | None = b"" if kind == "all" else None if kind == "none" else bytes(draw(listed))
        holdings.append((f"p{i}", states))
    steps = draw(st.lists(st.integers(0, 999), min_size=1, max_size=60))
    return count, holdings, steps


@settings(max_examples=150, deadline=None)
@given(_swarms(), st.booleans())
def test_properties_of_random_runs(
    swarm: tuple[int, list[tuple[str, bytes | None]], list[int]], with_origin: bool
) -> None:
    """Whatever happens: no chunk is requested from a source that does not hold it, a banned
    source gets nothing, and in the end every chunk is verified or the fetch gave up with a
    reason."""
    count, holdings, steps = swarm
    sources = [peer(name) for name, _ in holdings] + ([origin(max_span=2 * MB)] if with_origin else [])
    blob = make(sources, count, node_id=None, attempts=3, slow_start=0.0)
    for name, states in holdings:
        blob.inventory(name, states, 0.0)
    now = 0.0
    rng = random.Random(sum(steps))

    def step(actions: list[Start | Cancel | GiveUp], behave: bool) -> None:
        for action in actions:
            if isinstance(action, Start):
                r = action.request
                assert not blob.scheduler.stats[r.source].banned, "a banned source got a request"
                source = blob.scheduler.sources[r.source]
                assert all(blob.holds(source, j) for j in range(r.span.first, r.span.end)), (
                    f"{r.source} asked for {r.span} it does not hold"
                )
        for request in list(blob.requests.values()):
            roll = 0 if behave else rng.randrange(6)
            if roll <= 1:
                deliver(blob, request, now)
            elif roll == 2:
                blob.ended(request, "bad", now, error=VerificationError("bad"))
            elif roll == 3:
                blob.ended(request, "error", now, error=OriginError("reset"))
            elif roll == 4:
                blob.ended(request, "busy", now)
            # 5: it stalls (the schedule's stall timeout will cancel it)
        for action in actions:
            if isinstance(action, Cancel) and action.request.id in blob.requests:
                blob.ended(action.request, "cancelled", now)

    for s in steps:
        now += s / 100
        step(blob.poll(now), behave=False)
    for _ in range(2000):  # then the sources behave: it must end, one way or the other
        if blob.complete or blob.error is not None:
            break
        now += 1.0
        step(blob.poll(now), behave=True)
    assert blob.complete or (blob.error is not None and blob.error.message)
    if blob.complete:
        assert all(blob.have)
    if with_origin:
        assert blob.complete or "giving up" in blob.error.message  # type: ignore[union-attr]


def test_a_tiny_transfer_does_not_set_a_sources_rate() -> None:
    """A few hundred bytes in 50 ms measure a round trip, not a rate: counted as the source's
    throughput they would make every later straggler look normal and never be hedged."""
    from p2pimg.fetch.policy import SourceStats

    stats = SourceStats("peer p", "peer", 4)
    stats.started()
    stats.finished(400, 0.05, 0.04)
    assert stats.throughput == 0.0 and stats.delivered == 1
    stats.started()
    stats.finished(MB, 0.5, 0.04)
    assert stats.throughput == 2 * MB
