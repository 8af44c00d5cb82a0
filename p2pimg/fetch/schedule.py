"""Where each chunk of a blob comes from: the scheduling core, with no I/O (in the spirit of h11).

A `Scheduler` knows a node's sources (their traits, and what the policy has observed of them:
`SourceStats`). Each blob being fetched has a `BlobSchedule`: a table of chunk states that takes
events and returns actions. Events: what a source holds of the blob changed (`inventory`), a
source joined or left (`Scheduler.join` / `leave`), a request verified a chunk (`verified`),
a request ended well or badly (`ended`), time passed (`poll`). Actions: `Start` a request for
span S on source X (a hedge is a `Start` too), `Cancel` a request, `GiveUp` with an error. The
caller (the engine's I/O loop, or the simulator) carries the actions out and reports back. Time
is always an argument: nothing here reads a clock, sleeps, starts a task or touches a socket, so
every decision can be driven by a fake clock in a test, and a thousand nodes can run it in one
process (`bench/sim`).

A chunk's life:

    missing --(Start, in a span)--> requested --(verified)--> have
                                       |--(ended: bad bytes)--> missing; a peer is penalised/banned
                                       |--(ended: error, stall, Cancel failed)--> missing; backs off
    requested --(no progress for a while, nothing else to do)--> also requested from a 2nd source

The decisions, each named in the tests (tests/unit/test_schedule.py):
- *Order.* Alone, a blob is fetched in order, which feeds an in-order reader first. With peers,
  the origin's share is taken in a random order of blocks (`swarm_span` bytes), those it owns
  among every peer it knows first (`swarm.first_blocks`), so that nodes fetching the same blob at
  once ask the origin for different parts from their first request on, and trade the rest.
- *Owner split.* Every node fetching a blob ranks the nodes taking part (itself and the peers
  that hold it or have it open: `participates`) per block by a hash of (node, blob, block), the
  same on every node (rendezvous hashing). The owner asks the origin for the block; the others
  take it from peers. The node ranked r-th takes a block nobody in its view holds or brings
  after r times `steal_after` seconds: a slow or vanished owner delays a block, it does not lose
  it. Of a blob without CIDs (`unchecked`), not while the owner verifies chunks of any blob.
- *Waiting for a peer that is bringing a chunk* (up to `coming_grace`), but only while that peer
  shows progress (it verified something new within `swarm.claims_window`: `stale_claims`, or
  three times what a far chunk takes): a host that claims everything and never brings it holds
  nobody up. An unchecked blob's chunk a peer holds is waited for while that peer backs off
  (if it is only busy, up to `busy_patience`).
- *Slow start.* While sharing with peers, one origin request per blob until `slow_start` has
  passed, then `swarm_origin_requests`: claims are small and seen by peers before the next.
- *Span growth and segment alignment.* A span grows over contiguous chunks that its source holds
  and nobody else is fetching, up to the source's span size, never across a segment boundary.
- *Attempt limits.* Failures of the authoritative source (origin, upstream) count toward a
  chunk's `attempts`; a peer that fails a chunk is not asked for it again in this fetch. A chunk
  whose holders are all gone or banned ends the fetch (`GiveUp`) with the last failure.
- *Backoff, drops and bans* live in `policy.SourceStats` (one record per source, over all blobs).
- *Stalls and hedging.* A request with no progress for its source's `stall_timeout` is cancelled
  as a failure. With nothing left to start, a request that has made no progress for much longer
  than a chunk takes from the fastest holder is raced on another source; a stalled peer request
  is cancelled at once when hedged (a stranger may hold a slot open on purpose). While sharing,
  a peer request whose bytes still come is raced on the origin only after `slow_peer_patience`.

*Membership* (`Scheduler.members`, None unless the caller sets it): with the swarm's node ids
known, only the blob's `origin_fetchers` best ranked members fetch from the origin; why, and how a
poll stays cheap with many peers and chunks (bit masks), is in `swarm.py`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from p2pimg.errors import OriginError, P2pimgError
from p2pimg.fetch import swarm
from p2pimg.fetch.actions import Action, Cancel, GiveUp, Request, ScheduleConfig, Start
from p2pimg.fetch.hedging import hedge_stragglers
from p2pimg.fetch.policy import PreferNear, SourcePolicy, SourceStats
from p2pimg.fetch.swarm import COMING, HAVE, SourceTraits, Span, Traits

# Re-exported: the core's interface.
__all__ = [
    "COMING",
    "HAVE",
    "Action",
    "Cancel",
    "GiveUp",
    "Request",
    "ScheduleConfig",
    "SourceTraits",
    "Span",
    "Start",
    "Traits",
]


class Scheduler:
    """A node's sources and what has been observed of them, shared by every blob's schedule."""

    def __init__(
        self,
        *,
        policy: SourcePolicy | None = None,
        config: ScheduleConfig | None = None,
        node_id: str | None = None,
    ) -> None:
        self.policy = policy or PreferNear()
        self.config = config or ScheduleConfig()
        self.node_id = node_id
        # The swarm's node ids (this one's included), if the caller knows them: see swarm.py.
        self.members: frozenset[str] | None = None
        self.sources: dict[str, SourceTraits] = {}
        self.stats: dict[str, SourceStats] = {}
        self.far: dict[int, Request] = {}  # every blob's requests in flight to a non-peer source
        self.grew: dict[str, float] = {}  # peer -> when what it holds of any blob last grew
        self._ids = 0

    def join(self, source: SourceTraits) -> None:
        """A source joined (a peer was discovered, an origin configured). Its record is kept if
        it had one: a peer that comes back does not wipe its past."""
        self.sources[source.name] = source
        self.stats.setdefault(source.name, SourceStats(source.name, source.kind, source.limit))

    def leave(self, name: str) -> None:
        """A source left: nothing new is asked of it (running requests end on their own)."""
        self.sources.pop(name, None)

    def blob(
        self,
        digest: str,
        size: int,
        chunk_size: int,
        have: Sequence[bool],
        now: float,
        *,
        rng: random.Random | None = None,
        with_peers: bool | None = None,
        unchecked: bool = False,
    ) -> BlobSchedule:
        """A blob's schedule; `with_peers` False: fetched without peers (None: with them if any);
        `unchecked`: no chunk CIDs (mirrored: a peer offers only what it fetched from afar)."""
        schedule = BlobSchedule(self, digest, size, chunk_size, have, now, rng=rng, with_peers=with_peers)
        schedule.unchecked = unchecked
        return schedule

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids


class BlobSchedule:
    """The state machine of one blob's fetch (see the module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler,
        digest: str,
        size: int,
        chunk_size: int,
        have: Sequence[bool],
        now: float,
        *,
        rng: random.Random | None = None,
        with_peers: bool | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = scheduler.config
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.count = len(have)
        self.have = list(have)
        self.missing = self.count - sum(self.have)
        self.requested = [0] * self.count  # requests in flight covering each chunk
        self.failures = [0] * self.count  # per chunk, by the origin or upstream
        self.peer_failed: dict[int, set[str]] = {}  # chunk -> peers that failed it
        self.failed_chunks: set[int] = set()  # chunks the origin (or upstream) failed
        self.requests: dict[int, Request] = {}
        self.inventories: dict[str, swarm.Inventory] = {}
        self.last_failure: P2pimgError | None = None
        self.error: P2pimgError | None = None
        self.started = now
        self.last_own_dispatch = now  # when this node last asked the origin for a chunk
        self.coming_since: dict[int, float] = {}
        self.unseen_since: dict[int, float] = {}  # block -> when it was first seen owned elsewhere
        self.left_to_owner: dict[int, float] = {}  # block -> when first left to a working owner
        self.busy_since: dict[int, float] = {}  # chunk -> when its peers were first found busy
        self.received: dict[str, int] = {}  # verified bytes by kind of source
        self._window = (float("nan"), 0.0)  # (when, `swarm.claims_window` then)
        peers = any(s.kind == "peer" for s in scheduler.sources.values())
        self.swarm = peers if with_peers is None else with_peers and peers
        self.unchecked = False  # see `Scheduler.blob`
        order = list(range(self.count))
        self.block_chunks = max(1, self.config.swarm_span // chunk_size)
        if self.swarm:
            blocks = [order[i : i + self.block_chunks] for i in range(0, len(order), self.block_chunks)]
            (rng or random.Random()).shuffle(blocks)
            blocks.sort(key=swarm.first_blocks(scheduler, digest, self.block_chunks))
            order = [i for b in blocks for i in b]
        self.order = order
        self.position = [0] * self.count
        for pos, i in enumerate(order):
            self.position[i] = pos
        self.cursor = 0  # no chunk before order[cursor] is waiting to be requested
        self._all = (1 << self.count) - 1
        self.ranking = swarm.Ranking(scheduler.node_id, digest)

    # -- what the caller reads ---------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def availability(self) -> bytes:
        """Per chunk: 1 verified, 2 being fetched, 0 missing (what this node tells its peers)."""
        return bytes(
            HAVE if h else COMING if r else 0 for h, r in zip(self.have, self.requested, strict=True)
        )

    # -- events --------------------------------------------------------------------------------

    def inventory(self, source: str, states: bytes | None, now: float) -> None:
        """What a peer holds of the blob: per chunk HAVE/COMING/0, b"" for all of it, None for
        nothing. Its claims to be bringing chunks are believed while its holdings grow."""
        inv = self.inventories.setdefault(source, swarm.Inventory())
        verified = self.count if states == b"" else (states.count(HAVE) if states else 0)
        if states is not None and (inv.states is None or verified > inv.verified):
            inv.grew_at = now
            if verified > inv.verified:
                self.scheduler.grew[source] = now
        inv.report(states)
        inv.verified = verified

    def progressed(self, request: Request, now: float) -> None:
        """Bytes arrived for `request` (not yet a whole chunk, perhaps). A request that receives
        nothing for its stall timeout has failed; one that receives bytes but no chunk for long is
        a straggler, which is not the same thing (see `hedging.py`)."""
        request.last_byte = now

    def verified(self, request: Request | None, index: int, now: float) -> list[Action]:
        """Chunk `index` matched its CID and is on disk (from `request`, or None: found by other
        means). Returns the requests now pointless: the rest of their span is verified, or it
        trails a request that is racing it and will bring everything it has left (a hedge and the
        straggler it races: the one behind stops, so the two send at most a chunk twice)."""
        if not self.have[index]:
            self.have[index] = True
            self.missing -= 1
            if request is not None:
                nbytes = min(self.size, (index + 1) * self.chunk_size) - index * self.chunk_size
                request.received += nbytes
                self.received[request.kind] = self.received.get(request.kind, 0) + nbytes
        if request is not None:
            request.next_index = max(request.next_index, index + 1)
            request.last_progress = request.last_byte = now
        actions: list[Action] = []
        for other in self.requests.values():
            if other is request or other.next_index >= other.span.end:
                continue
            rest = range(other.next_index, other.span.end)
            if request is not None and (request.hedge or request.hedged) and (other.hedge or other.hedged):
                ahead = range(request.next_index, request.span.end)
                if other.next_index <= index and all(self.have[j] or j in ahead for j in rest):
                    other.overtaken = other.hedged  # the straggler is charged, a trailing hedge not
                    actions.append(Cancel(other, other.hedged, "a request racing it is ahead"))
                    continue
            if all(self.have[j] for j in rest):
                other.overtaken = other.hedged
                actions.append(Cancel(other, other.hedged, "others brought its chunks"))
        return actions

    def ended(
        self,
        request: Request,
        outcome: str,
        now: float,
        *,
        error: P2pimgError | None = None,
        first_byte: float | None = None,
    ) -> None:
        """A request ended: "ok" (its span is in), "bad" (a chunk failed verification), "busy"
        (the source declined for now), "error" (an error or a stall), "cancelled" (a `Cancel`
        carried out, or the caller stopped it)."""
        if self.requests.pop(request.id, None) is None:
            return
        stats = self.scheduler.stats[request.source]
        span = request.span
        index = request.next_index
        if outcome == "ok":
            stats.finished(request.received, now - request.started, first_byte)
        elif outcome == "bad":
            stats.sent_bad_chunk(now, request.received)
            self._count_failure(request, index)
        elif outcome == "busy":
            stats.busy(now, 0.5)
        elif outcome == "error" or request.overtaken:
            stats.failed(now, request.received)
            self._count_failure(request, index)
        else:
            stats.in_flight -= 1  # cancelled: says nothing about the source
        if error is not None and outcome in ("bad", "error"):
            self.last_failure = error
        elif outcome == "cancelled" and request.overtaken and index < span.end:
            self.last_failure = OriginError(f"{request.source} stalled on chunk {index} of {self.digest}")
        for j in range(span.first, span.end):
            self.requested[j] -= 1
        self.scheduler.far.pop(request.id, None)
        if index < span.end:  # what it left undone may need asking again
            self.cursor = min(self.cursor, *(self.position[j] for j in range(index, span.end)))

    def fail(self, error: P2pimgError) -> None:
        """The fetch cannot go on whatever the sources do (the cache refused a chunk)."""
        self.error = self.error or error

    def poll(self, now: float) -> list[Action]:
        """Time passed (or something changed): cancel stalled requests, start what can start,
        and, when nothing could, hedge stragglers."""
        actions: list[Action] = []
        if self.error is not None or self.complete:
            return actions
        for request in list(self.requests.values()):
            source = self.scheduler.sources.get(request.source)
            timeout = (source.stall_timeout if source else None) or self.config.stall_timeout
            quiet = now - max(request.last_byte, request.last_progress)
            if request.next_index < request.span.end and quiet > timeout:
                request.overtaken = True  # charged as a failure when it ends
                actions.append(Cancel(request, True, f"no progress for {timeout:g} s"))
        started = self._dispatch(now, actions)
        if self.error is not None:
            return [*actions, GiveUp(self.error)]
        if not started:
            hedge_stragglers(self, now, actions)
        return actions

    # -- decisions ---------------------------------------------------------------------------

    def holds(self, source: SourceTraits, index: int) -> bool:
        inv = self.inventories.get(source.name)
        if inv is None:
            return source.kind != "peer"  # an origin (or upstream) has everything it published
        states = inv.states
        return states is not None and (states == b"" or (len(states) > index and states[index] == HAVE))

    def _progressing(self, name: str, now: float, *, anything: bool = False) -> bool:
        """Whether a peer's claims to be bringing chunks are believed: it verified one lately, of
        this blob or any other (or, `anything`, whether it verified any chunk at all lately)."""
        inv = self.inventories.get(name)
        if inv is None and not anything:
            return False
        if self._window[0] != now:
            far = self.scheduler.far.values()
            window = swarm.claims_window(self.config, self.chunk_size, self.scheduler, far, now)
            self._window = (now, window)
        grew = self.scheduler.grew.get(name, float("-inf"))
        return now - (grew if anything or inv is None else max(grew, inv.grew_at)) < self._window[1]

    def participates(self, name: str, now: float) -> bool:
        """Whether a peer takes part in the blob: it holds it, or has a fetch of it open (it tells
        what it holds and brings, if only nothing yet). Whether it progresses is not asked: it is
        ranked with the others while it does, so a pause between two of its chunks does not hand
        its blocks to others; a block it owns and does not bring is taken after `steal_after`."""
        inv = self.inventories.get(name)
        return inv is not None and inv.states is not None

    def coming(self, name: str, index: int, now: float) -> bool:
        inv = self.inventories.get(name)
        return (
            inv is not None
            and inv.states is not None
            and len(inv.states) > index
            and inv.states[index] == COMING
            and self._progressing(name, now)
        )

    def live(self, name: str, now: float) -> bool:
        stats = self.scheduler.stats[name]
        return not stats.banned and now >= stats.unavailable_until

    def _failing(self, name: str, now: float) -> bool:
        """Banned, backing off after errors, or declining every request for `busy_patience` (a
        peer stuck at 429; declining now and then is only busy)."""
        stats = self.scheduler.stats[name]
        return (
            stats.banned
            or (stats.errors > 0 and now < stats.unavailable_until)
            or stats.stuck_busy(now, self.config.busy_patience)
        )

    def holders(self, index: int) -> list[SourceTraits]:
        """Sources that may be asked for chunk `index`: they hold it, are not banned, and (peers)
        have not failed it in this fetch."""
        failed = self.peer_failed.get(index, ())
        stats = self.scheduler.stats
        return [
            s
            for s in self.scheduler.sources.values()
            if not stats[s.name].banned and s.name not in failed and self.holds(s, index)
        ]

    def sharing_now(self, now: float, live_peers: list[SourceTraits]) -> bool:
        """Whether the origin's work on this blob is shared with peers now: during the slow start
        of a fetch that began with peers known, then while a live peer takes part in it."""
        if not self.swarm:
            return False
        if now - self.started < self.config.slow_start:
            return True
        if (
            self.scheduler.members is not None
            and len(self.scheduler.members) > 1
            and any(
                s.kind == "peer" and not self._failing(s.name, now) for s in self.scheduler.sources.values()
            )
        ):
            return True  # it knows the swarm fetches the blob too, whether or not its peers progress
        return any(self.participates(p.name, now) for p in live_peers)

    def _slow_start(self, now: float) -> bool:
        far = sum(1 for r in self.requests.values() if r.kind != "peer")
        if now - self.started < self.config.slow_start:
            return far >= 1
        return far >= self.config.swarm_origin_requests

    def owner_rank(self, index: int, now: float, live_peers: list[SourceTraits]) -> int:
        """This node's rank among the nodes taking part in the blob for chunk `index`'s block
        (0: the owner; rendezvous hashing, the same ranking on every node)."""
        return self.ranking.rank(index // self.block_chunks, *self._taking_part(now, live_peers))

    def _taking_part(self, now: float, live_peers: list[SourceTraits]) -> tuple[frozenset[str], int]:
        """The other nodes this one is ranked among for each block, and what to add to its rank
        among them (see `swarm.Ranking.among`)."""
        node_id = self.scheduler.node_id
        seen = frozenset(
            p.node_id
            for p in live_peers
            if p.node_id and p.node_id != node_id and self.participates(p.name, now)
        )
        return self.ranking.among(seen, self.scheduler.members, self.config.origin_fetchers)

    def _waiting_for_peer(self, index: int, now: float, coming: int) -> bool:
        """Leave chunk `index` to a healthy peer that is fetching it, for a while, rather than
        ask the origin for it too (`coming`: chunks live, progressing peers bring, as bits)."""
        if not coming >> index & 1:
            self.coming_since.pop(index, None)
            return False
        since = self.coming_since.setdefault(index, now)
        return now - since < self.config.coming_grace

    def _wait_busy(self, index: int, now: float) -> bool:
        """Whether to go on waiting for the busy peers that hold chunk `index` (they said "not
        now"): for up to `busy_patience`. A peer stuck at 429 holds nothing back for longer."""
        return now - self.busy_since.setdefault(index, now) < self.config.busy_patience

    def _dispatch(self, now: float, actions: list[Action]) -> bool:
        """Start requests for every chunk nobody is fetching, as far as sources allow. What a chunk
        needs to know of the peers is gathered once per poll, as bit masks (`swarm.PeerView`)."""
        have, order, requested = self.have, self.order, self.requested
        sources = self.scheduler.sources
        stats = self.scheduler.stats
        live_peers = [s for s in sources.values() if s.kind == "peer" and self.live(s.name, now)]
        # Backing off is about asking a peer for chunks, not whether it fetches the blob too.
        ranked = [s for s in sources.values() if s.kind == "peer" and not stats[s.name].banned]
        sharing = self.sharing_now(now, ranked)
        nodes = self._taking_part(now, ranked) if sharing else (frozenset[str](), 0)
        count = self.count
        view = swarm.peer_view(
            list(sources.values()),
            stats,
            self.inventories,
            count,
            now,
            lambda n: self._progressing(n, now),
            lambda n: self._failing(n, now),
            self.config.busy_patience,
        )
        held, healthy, reachable, seen, far_held = (
            view.held,
            view.healthy,
            view.reachable,
            view.seen,
            view.far_held,
        )
        # PreferNear waits while a healthy peer holds a chunk and none of them has a free slot.
        nearest_first = type(self.scheduler.policy) is PreferNear
        members = self.scheduler.members is not None
        free = view.free()
        # The origin has as many requests in flight as sharing allows (None: not asked yet).
        limited: bool | None = None
        peers_known = any(s.kind == "peer" for s in sources.values())
        while self.cursor < count and (have[order[self.cursor]] or requested[order[self.cursor]]):
            self.cursor += 1
        scan: Sequence[int] = order[self.cursor :]
        if members and sharing and nodes[1] and now - self.started < nodes[1] * self.config.steal_after:
            # Outside the fetchers, early on: nothing from the origin (its rank is too low to
            # steal yet); only chunks a peer may bring now, or that must end the fetch, are seen.
            failed = [
                *self.peer_failed,
                *(i for i in self.failed_chunks if self.failures[i] >= self.config.attempts),
            ]
            scan = swarm.may_start(have, requested, free | ~(held | far_held), failed, self.position)
        started = False
        for i in scan:
            if have[i] or requested[i]:
                continue
            if self.failures[i] >= self.config.attempts:
                last = self.last_failure or OriginError("no answer")
                self.error = type(last)(
                    f"chunk {i} of {self.digest} failed {self.failures[i]} times, "
                    f"giving up; last: {last.message}"
                )
                return started
            holders: list[SourceTraits] | None = None
            if i in self.peer_failed:
                holders = self.holders(i)
                far_only = not any(
                    s.kind == "peer" and not (members and self._failing(s.name, now)) for s in holders
                )
            else:
                far_only = not (reachable if members else held) >> i & 1
                if not (held | far_held) >> i & 1:
                    holders = []
            if holders is not None and not holders:
                why = f"; last: {self.last_failure.message}" if self.last_failure else ""
                self.error = OriginError(f"no usable source has chunk {i} of {self.digest}{why}")
                return started
            if far_only and self._waiting_for_peer(i, now, view.coming):
                continue
            claim = swarm.claim(self, i, now, seen, nodes) if far_only and sharing else "own"
            if claim == "leave":
                continue
            if holders is None and far_only:
                if sharing and peers_known:
                    if limited is None:
                        limited = self._slow_start(now)
                    if limited:
                        continue  # only the origin has it, and the origin has enough in flight
                holders = [s for s, bits in view.far if bits >> i & 1]
            elif holders is None:
                if nearest_first and healthy >> i & 1 and not free >> i & 1:
                    if view.everywhere >> i & 1:
                        break  # every source holds it and none can take it now
                    continue
                waits_for = reachable if members else view.kept if self.unchecked else 0
                if sharing and waits_for >> i & 1 and not free >> i & 1 and self._wait_busy(i, now):
                    continue  # its peers are busy or said "not now": wait for them (see below)
                holders = self.holders(i)
            chosen = self.scheduler.policy.choose([stats[s.name] for s in holders], now)
            if chosen is None:
                if len(holders) == len(sources):
                    break  # every source is busy or backing off: nothing later can start either
                continue  # its holders are busy; later chunks may have others
            source = sources[chosen.name]
            if source.kind != "peer" and sharing and self._slow_start(now):
                continue  # peers may be starting on this blob too: let them say what they take
            if (
                source.kind != "peer"
                and sharing
                and not far_only
                and (members or self.unchecked)
                and any(s.kind == "peer" and not self._failing(s.name, now) for s in holders)
                and self._wait_busy(i, now)
            ):
                continue  # a peer that holds it only said "not now" (busy): wait for it
            span = swarm.grow_span(self, source, i, live_peers, sharing, now)
            request = self.start_request(source, span, now)
            request.why = "peer" if source.kind == "peer" else claim if sharing else "alone"
            actions.append(Start(request))
            if source.kind != "peer" and claim == "own":
                self.last_own_dispatch = now  # its own work, not a block taken from its owner
            if source.kind == "peer":
                free = view.free()
            elif not limited:
                limited = None
            started = True
        return started

    def start_request(self, source: SourceTraits, span: Span, now: float, *, hedged: bool = False) -> Request:
        request = Request(
            self.scheduler._next_id(), source.name, source.kind, span, now, now, span.first, hedge=hedged
        )
        for j in range(span.first, span.end):
            self.requested[j] += 1
        self.requests[request.id] = request
        if source.kind != "peer":
            self.scheduler.far[request.id] = request
        self.scheduler.stats[source.name].started()
        return request

    def _count_failure(self, request: Request, index: int) -> None:
        """Chunk `index` of the request failed (nothing to count once its span is done): a peer
        is not asked for it again in this fetch; the origin's failures count toward the chunk's
        attempt limit."""
        if index >= request.span.end:
            return
        if request.kind == "peer":
            self.peer_failed.setdefault(index, set()).add(request.source)
        else:
            self.failures[index] += 1
            self.failed_chunks.add(index)
