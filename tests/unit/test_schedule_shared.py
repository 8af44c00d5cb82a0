"""The scheduling core's rules for a blob shared by nodes that pull it at once (the owner split,
and mirrored blobs, which have no chunk CIDs), driven directly with a fake clock. Each test names
one rule; the general ones are in test_schedule.py."""

from __future__ import annotations

import random

from p2pimg.fetch.schedule import (
    COMING,
    HAVE,
    BlobSchedule,
    Request,
    ScheduleConfig,
    Scheduler,
    Start,
    Traits,
)

MB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def origin(**kw: object) -> Traits:
    return Traits("origin", "origin", **kw)  # type: ignore[arg-type]


def peer(name: str, **kw: object) -> Traits:
    options: dict[str, object] = {"limit": 4, "max_span": 4 * MB, "stall_timeout": 5.0, "node_id": name}
    options.update(kw)
    return Traits(name, "peer", **options)  # type: ignore[arg-type]


def scheduler(sources: list[Traits], node_id: str | None = "me", **config: float) -> Scheduler:
    made = Scheduler(config=ScheduleConfig(**config), node_id=node_id)  # type: ignore[arg-type]
    for source in sources:
        made.join(source)
    return made


def blob(made: Scheduler, count: int, *, digest: str = DIGEST, unchecked: bool = False) -> BlobSchedule:
    return made.blob(digest, count * MB, MB, [False] * count, 0.0, rng=random.Random(1), unchecked=unchecked)


def started(actions: object, source: str | None = None) -> list[Request]:
    assert isinstance(actions, list)
    return [a.request for a in actions if isinstance(a, Start) and source in (None, a.request.source)]


def chunks(requests: list[Request]) -> list[int]:
    return sorted(j for r in requests for j in range(r.span.first, r.span.end))


SHARED = {"swarm_span": MB, "slow_start": 0.0, "swarm_origin_requests": 100, "steal_after": 1.5}


def test_a_peer_with_the_blob_open_stays_ranked_while_it_verifies_nothing() -> None:
    """Membership is having the blob open (an inventory, if only of nothing), not progress: a
    pause between two of a peer's chunks does not hand its blocks to the others."""
    b = blob(scheduler([origin(limit=100), peer("a")], "b", stale_claims=2.0, **SHARED), 16)
    b.inventory("a", bytes(16), 0.0)
    owned = [i for i in range(16) if b.owner_rank(i, 0.0, [peer("a")]) == 0]
    assert 0 < len(owned) < 16
    b.inventory("a", bytes(16), 10.0)  # nothing verified for 10 s, five times stale_claims
    assert [i for i in range(16) if b.owner_rank(i, 10.0, [peer("a")]) == 0] == owned


def test_claims_are_believed_for_three_far_chunk_times() -> None:
    """A peer bringing chunks is waited for while it verified something within
    max(stale_claims, 3 x what a chunk takes from the origin): through a shared uplink a chunk
    takes seconds, and a peer between two chunks has not stopped."""
    made = scheduler([origin(), peer("p")], None, stale_claims=2.0, slow_start=0.0)
    made.stats["origin"].throughput = 0.5 * MB  # measured: a chunk takes 2 s
    slow = blob(made, 4)
    slow.inventory("p", bytes([COMING] * 4), 0.0)
    assert started(slow.poll(5.9)) == [], "5.9 s since p verified anything: within 3 x 2 s"
    assert chunks(started(slow.poll(6.1), "origin")) == [0, 1, 2, 3]
    fast = blob(scheduler([origin(), peer("p")], None, stale_claims=2.0, slow_start=0.0), 4)
    fast.scheduler.stats["origin"].throughput = 50 * MB
    fast.inventory("p", bytes([COMING] * 4), 0.0)
    assert chunks(started(fast.poll(2.1), "origin")) == [0, 1, 2, 3], "fast origin: 2 s as before"


def test_before_a_rate_is_known_the_wait_of_its_own_far_requests_counts() -> None:
    made = scheduler([origin(limit=1), peer("p")], None, stale_claims=2.0, slow_start=0.0)
    mine = blob(made, 2, digest=OTHER)
    assert started(mine.poll(0.0), "origin"), "a request of another blob, still waiting at 3 s"
    waiting = blob(made, 4)
    waiting.inventory("p", bytes([COMING] * 4), 0.0)
    made.stats["origin"].in_flight = 0  # a free slot for this blob
    assert started(waiting.poll(3.0)) == [], "a far chunk takes 3 s or more now: p is believed"


def test_unchecked_no_stealing_from_an_owner_that_verifies_chunks_of_any_blob() -> None:
    """Of a mirrored blob, the next ranked node takes an owner's unseen block only once the owner has verified
    nothing (of any blob) for the claims window, then `steal_after` more: an owner at work comes
    to the block in its turn, and a thief would only race it."""
    made = scheduler([origin(limit=100), peer("a")], "b", stale_claims=2.0, **SHARED)
    b = blob(made, 16, unchecked=True)
    other = blob(made, 4, digest=OTHER)
    b.inventory("a", bytes(16), 0.0)
    own = started(b.poll(0.0), "origin")
    mine = chunks(own)
    assert 0 < len(mine) < 16
    for request in own:  # in at 5 MB/s
        for i in range(request.span.first, request.span.end):
            b.verified(request, i, 0.2)
        b.ended(request, "ok", 0.2)
    for now in (0.5, 1.0, 1.5, 2.0):  # a verifies chunks of another blob
        other.inventory("a", bytes([HAVE] * int(now * 2) + [0] * (4 - int(now * 2))), now)
        assert started(b.poll(now), "origin") == [], "a is at work: its blocks wait for it"
    assert started(b.poll(3.9), "origin") == [], "verified at 2.0: at work within 2 s"
    assert started(b.poll(4.1), "origin") == [], "stopped: its blocks wait 1.5 s more"
    stolen = chunks(started(b.poll(5.7), "origin"))
    assert sorted(mine + stolen) == list(range(16))


def test_first_requests_go_to_blocks_owned_among_every_known_peer() -> None:
    """Before any inventory arrives, nodes that know each other start on blocks they own among
    all of them: their first requests do not collide."""
    firsts = {}
    for me, other in (("a", "b"), ("b", "a")):
        made = scheduler([origin(limit=100), peer(other)], me, swarm_span=MB, slow_start=0.6)
        (request,) = started(blob(made, 16).poll(0.0), "origin")
        firsts[me] = request.span.first
    assert firsts["a"] != firsts["b"]


def test_unchecked_a_first_hand_holder_backing_off_is_waited_for() -> None:
    """A mirrored blob's chunk that a peer holds (first-hand) is not asked of the origin while
    that peer backs off after an error; a published blob's would be."""
    for unchecked, expected in ((True, []), (False, [2])):
        made = scheduler([origin(), peer("p")], None, slow_start=0.0)
        b = blob(made, 4, unchecked=unchecked)
        b.inventory("p", bytes([0, 0, HAVE, 0]), 0.0)
        b.inventory("p", bytes([0, 0, HAVE, COMING]), 0.5)
        made.stats["p"].errors, made.stats["p"].unavailable_until = 1, 1.0
        assert [i for i in chunks(started(b.poll(0.5))) if i == 2] == expected
        if unchecked:
            assert started(b.poll(1.1), "p"), "its backoff over, it is asked"


def test_unchecked_a_slow_first_hand_peer_is_not_raced_on_the_origin() -> None:
    """Hedging a mirrored blob's peer request on the origin waits until it has sent no bytes
    for `first_hand_quiet`, or brought no chunk for `slow_peer_patience`."""
    made = scheduler([origin(), peer("p")], None, slow_start=0.0, first_hand_quiet=2.0)
    made.stats["origin"].throughput = 50 * MB
    b = blob(made, 1, unchecked=True)
    b.inventory("p", bytes([HAVE]), 0.0)
    (request,) = started(b.poll(0.0))
    assert request.source == "p"
    assert started(b.poll(1.9)) == [], "no bytes for 1.9 s: not yet"
    (hedge,) = started(b.poll(2.1))
    assert hedge.source == "origin" and hedge.hedge
    trickle = blob(scheduler([origin(), peer("p")], None, slow_start=0.0), 1, unchecked=True)
    trickle.scheduler.stats["origin"].throughput = 50 * MB
    trickle.inventory("p", bytes([HAVE]), 0.0)
    (slow,) = started(trickle.poll(0.0))
    for now in (1.0, 2.0, 3.0, 3.9):
        trickle.progressed(slow, now)  # bytes, no whole chunk
        assert started(trickle.poll(now)) == []
    trickle.progressed(slow, 4.1)
    assert [r.source for r in started(trickle.poll(4.1))] == ["origin"], "4 s without a chunk"


def test_a_holder_that_failed_the_chunk_does_not_hold_its_block_back() -> None:
    """A peer holding a whole one-chunk blob (an image config) ranks first for its one block on
    about half of the nodes. When its span fails (reset), the chunk is asked of the origin at
    once: the peer's holding no longer makes the block "seen" (it hung for ever before), for a
    blob with chunk CIDs and one without alike."""
    owned_by_peer = 0
    for k in range(24):
        for unchecked in (False, True):
            made = scheduler([origin(), peer("a")], f"n{k}")
            b = blob(made, 1, unchecked=unchecked)
            b.inventory("a", b"", 0.0)
            owned_by_peer += b.ranking.rank(0, frozenset({"a"})) > 0
            [first] = started(b.poll(0.0))
            assert first.source == "a"
            b.ended(first, "error", 0.01)
            again = [r for t in (0.1, 0.35, 1.0) for r in started(b.poll(t))]
            assert [r.source for r in again] == ["origin"], (k, unchecked)
    assert 0 < owned_by_peer < 48, "the peer owned the block on no node or on all: nothing was tested"


def test_a_peer_stuck_at_429_holds_a_chunk_back_only_for_busy_patience() -> None:
    """A mirrored blob's chunks, and any with a membership list, are left to a peer that holds
    them while it says "not now" (429): it is the one copy the upstream already sent. A peer
    that says it for ever delays them `busy_patience`, then the origin is asked; and is not
    waited for at all for the next blob, until it delivers a span again."""
    for unchecked, members in ((True, None), (False, frozenset({"me", "a"})), (True, frozenset({"me", "a"}))):
        made = scheduler([origin(), peer("a")], "me", busy_patience=10.0)
        made.members = members
        first_far: list[float] = []
        for digest, begin in ((DIGEST, 0.0), (OTHER, 60.0)):
            b = made.blob(digest, 4 * MB, MB, [False] * 4, begin, rng=random.Random(1), unchecked=unchecked)
            b.inventory("a", b"", begin)
            for step in range(200):
                now = begin + step * 0.25
                for request in started(b.poll(now)):
                    if request.source == "a":
                        b.ended(request, "busy", now + 0.01)
                    elif len(first_far) < (2 if begin else 1):
                        first_far.append(now - begin)
        assert len(first_far) == 2 and 10.0 <= first_far[0] <= 10.5, (unchecked, members, first_far)
        assert first_far[1] <= 1.0, (unchecked, members, first_far)
