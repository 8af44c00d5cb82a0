"""The swarm as one node's scheduling core sees it, in the forms its decisions need (sans I/O).

`schedule.py` decides; this module keeps what it decides from cheap to ask at every poll,
whatever the number of peers and chunks:

- *Inventories as bits.* What a peer reports of a blob (one state per chunk) is also kept as two
  ints, bit i for chunk i: held, and being brought. A poll ORs them once into a `PeerView`
  (held by some peer, by a healthy one, by a free one, seen in view...), and a chunk's questions
  are then a shift and a test instead of a loop over the peers.
- *Ranks.* Rendezvous hashing (`score`): every node ranks the nodes fetching a blob the same way
  per block, so they agree on each block's owner without talking.
- *Membership* (`Scheduler.members`, given by a caller that knows the swarm's node ids, e.g. from
  discovery). A node polls a few peers, not the whole swarm; ranking only the nodes it sees, in
  a swarm much larger than its view, gives every block about (swarm size ÷ view size) owners,
  and the origin sends the blob that many times. With the members known, only the blob's
  `origin_fetchers` best ranked members (`fetchers`, the same on every node that knows the same
  members) take the origin's share, split among themselves block by block; everyone else ranks
  after them. Few fetchers keep few origin requests in flight, so their chunks come out early and
  steadily for the swarm to trade. The schedule's other rules for this case are listed where
  they apply (`BlobSchedule.sharing_now`, `_dispatch`, `claim`, `hedging.py`).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from p2pimg.fetch.policy import DROP_AFTER_ERRORS, SourceStats

HAVE, COMING = 1, 2  # per-chunk inventory states a peer reports (0: missing)


class SourceTraits(Protocol):
    """What the core needs to know of a source (every `sources.base.ChunkSource` has these)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "origin" | "peer" | "upstream"
    @property
    def limit(self) -> int: ...
    @property
    def max_span(self) -> int: ...
    @property
    def segment_size(self) -> int: ...
    @property
    def stall_timeout(self) -> float | None: ...
    @property
    def node_id(self) -> str | None: ...


@dataclass(frozen=True, order=True)
class Span:
    """Chunks [first, end) of a blob."""

    first: int
    end: int

    def __len__(self) -> int:
        return self.end - self.first

    def byte_range(self, size: int, chunk_size: int) -> tuple[int, int]:
        return self.first * chunk_size, min(self.end * chunk_size, size)


@dataclass(frozen=True)
class Traits:
    """Plain `SourceTraits` (for tests and the simulator)."""

    name: str
    kind: str
    limit: int = 8
    max_span: int = 16 << 20
    segment_size: int = 64 << 20
    stall_timeout: float | None = None
    node_id: str | None = None


@dataclass
class Inventory:
    """What one peer reports of one blob."""

    states: bytes | None = None  # per chunk HAVE/COMING/0; b"" = the whole blob; None = nothing
    verified: int = 0  # chunks it holds, as of the last report
    grew_at: float = float("-inf")  # when `verified` last grew (or the peer was first heard of)
    masks: tuple[int, int] | None = None  # (held, coming) as bits, from `states` (None: to make)

    def report(self, states: bytes | None) -> None:
        if states != self.states:
            self.masks = None
        self.states = states

    def bits(self, count: int) -> tuple[int, int]:
        if self.masks is None:
            states = self.states
            if states is None:
                self.masks = (0, 0)
            elif states == b"":
                self.masks = ((1 << count) - 1, 0)
            else:
                self.masks = (_bits(states, _HELD), _bits(states, _BRINGING))
        return self.masks


@dataclass
class PeerView:
    """What one poll knows of a blob's sources, as bits over its chunks (bit i: chunk i)."""

    held: int = 0  # held by a peer that is not banned
    healthy: int = 0  # held by a peer that is neither banned nor backing off
    reachable: int = 0  # held by a peer that is not failing (healthy, or only busy)
    kept: int = 0  # held by a peer not banned, dropped nor stuck busy (it may be backing off a little)
    coming: int = 0  # brought by a healthy peer that is progressing
    seen: int = 0  # held or brought by a healthy peer
    everywhere: int = 0  # held by every source (none banned)
    far_held: int = 0  # held by a source other than a peer, not banned
    far: list[tuple[SourceTraits, int]] = field(default_factory=list)  # those sources, what they hold
    peers: list[tuple[SourceStats, int]] = field(default_factory=list)  # healthy peers, what they hold

    def free(self) -> int:
        """Held by a healthy peer with a free slot (changes as requests start)."""
        bits = 0
        for st, held in self.peers:
            if st.in_flight < st.slots:
                bits |= held
        return bits


def peer_view(
    sources: Sequence[SourceTraits],
    stats: Mapping[str, SourceStats],
    inventories: Mapping[str, Inventory],
    count: int,
    now: float,
    progressing: Callable[[str], bool],
    failing: Callable[[str], bool],
    busy_patience: float = float("inf"),
) -> PeerView:
    everything = (1 << count) - 1
    view = PeerView(everywhere=everything)
    for source in sources:
        st = stats[source.name]
        inv = inventories.get(source.name)
        if inv is None:  # an origin (or upstream) holds everything it published
            bits, brings = (0 if source.kind == "peer" else everything), 0
        else:
            bits, brings = inv.bits(count)
        if st.banned:
            view.everywhere = 0
            continue
        view.everywhere &= bits
        if source.kind != "peer":
            view.far.append((source, bits))
            view.far_held |= bits
            continue
        view.held |= bits
        if not failing(source.name):
            view.reachable |= bits
        if st.errors < DROP_AFTER_ERRORS and not st.stuck_busy(now, busy_patience):
            view.kept |= bits
        if now >= st.unavailable_until:
            view.healthy |= bits
            view.peers.append((st, bits))
            if progressing(source.name):
                view.coming |= brings
                view.seen |= bits | brings
            else:
                view.seen |= bits
    return view


CLAIM_CHUNKS = 3  # a peer's claims are believed for this many times what a far chunk takes


def claims_window(
    config: Any, chunk_size: int, scheduler: Any, far_requests: Iterable[Any], now: float
) -> float:
    """How long a peer that verified nothing new is still believed to be bringing the chunks it
    says it brings: `stale_claims`, or `CLAIM_CHUNKS` times what a chunk takes from the origin (or
    upstream) now, if longer (up to `coming_grace`). The peers fetch through the same far link as
    this node: where it is shared by many (a mirror's uplink), a chunk takes seconds, and a peer
    between two chunks is not a peer that stopped. What a chunk takes: at the fastest far
    source's measured rate per request, or longer if one of this node's own far requests has
    already waited longer for its next chunk (`far_requests`: of every blob)."""
    rates = [
        st.throughput
        for s in scheduler.sources.values()
        if s.kind != "peer" and (st := scheduler.stats[s.name]).throughput > 0
    ]
    # A request quiet for longer than a stall is left out: its schedule cancels it at its next
    # poll, or was dropped without telling (a caller that abandons a blob's schedule).
    waits = [
        now - r.last_progress
        for r in far_requests
        if now - max(r.last_byte, r.last_progress) <= config.stall_timeout
    ]
    per_chunk = max([chunk_size / max(rates) if rates else 0.0, *waits])
    return float(max(config.stale_claims, min(config.coming_grace, CLAIM_CHUNKS * per_chunk)))


def grow_span(
    schedule: Any,
    source: SourceTraits,
    first: int,
    live_peers: Sequence[SourceTraits],
    sharing: bool,
    now: float,
) -> Span:
    """The span a request to `source` starting at chunk `first` covers (`schedule`: a
    `schedule.BlobSchedule`): it grows over contiguous chunks that the source holds and nobody
    else is fetching, up to the source's span size, never across a segment boundary; from the
    origin, not over chunks a live peer holds or brings."""
    config, count, chunk_size = schedule.config, schedule.count, schedule.chunk_size
    whole = not getattr(source, "ranges", True)  # every request streams from the blob's start
    peers = live_peers if source.kind != "peer" and not whole else []
    span_bytes = (
        source.max_span
        if source.kind == "peer" or not sharing or whole
        else min(source.max_span, config.swarm_span)
    )
    if source.kind != "peer" and not sharing:
        # A source whose requests cost much time before their first byte (a far gateway, a
        # store that reads the whole object for every range) gets spans long enough that the
        # wait is a small part of each: `span_wait_share` of it at the rate it has shown.
        stats = schedule.scheduler.stats[source.name]
        span_bytes = max(span_bytes, int(stats.throughput * stats.latency / config.span_wait_share))
    per_span = max(1, span_bytes // chunk_size)
    per_segment = max(1, source.segment_size // chunk_size)
    end = first + 1
    while (
        end < count
        and end - first < per_span
        and end % per_segment
        and not schedule.have[end]
        and not schedule.requested[end]
        and schedule.holds(source, end)
        and not any(schedule.coming(p.name, end, now) or schedule.holds(p, end) for p in peers)
    ):
        end += 1
    return Span(first, end)


def owner_working(schedule: Any, block: int, nodes: frozenset[str], now: float) -> bool:
    """Whether the block's owner among `nodes` (and this node) is a peer that verified chunks, of
    any blob, lately (`schedule`: a `schedule.BlobSchedule`): it is at work, and comes to the
    block in its turn. Taking the block from such an owner would only race it, as the owner
    cannot see the thief's claim before it starts the block itself. Asked of a blob without
    CIDs only (`unchecked`: every extra upstream copy is the egress the mirror swarm exists to
    save), and without a membership list (with one, stealing has its own rules). A published
    blob's stealing is left as it was: the lan-swarm benchmark's pulls were slower with this
    rule for them too (one run of three pulls, within its spread, so not proven either way)."""
    if not schedule.unchecked or schedule.scheduler.members is not None:
        return False
    owner = schedule.ranking.owner(block, nodes)
    return any(
        s.kind == "peer" and s.node_id == owner and schedule._progressing(s.name, now, anything=True)
        for s in schedule.scheduler.sources.values()
    )


def claim(schedule: Any, index: int, now: float, seen: int, nodes: tuple[frozenset[str], int]) -> str:
    """Whose turn chunk `index` is (`schedule`: a `schedule.BlobSchedule`): "own" (this node
    owns its block), "leave" (to its owner), or "steal" (another node owns it and has had its
    time). The node ranked r-th takes a block
    that nobody in its view holds or brings once it has been idle (asked the origin for nothing
    of its own) and the block unseen, both for r times `steal_after` (`seen`: bits of the chunks
    peers hold or bring); unchecked, the owner must have stopped too (`owner_working`), or
    have had the block for `coming_grace` (an owner busy with other blobs does not keep it).
    Seen counts only chunks a peer that has not failed them holds or brings (`offered`), of
    the block (with a membership list, the chunk itself): a peer that failed a chunk, or a
    hostile fetcher, cannot strand a block."""
    block = index // schedule.block_chunks
    if schedule.scheduler.members is None:  # the block: whoever shows some of it takes part
        first = block * schedule.block_chunks
        mask = seen >> first & ((1 << schedule.block_chunks) - 1)
        visible = any(mask >> k & 1 and offered(schedule, first + k, now) for k in range(mask.bit_length()))
    else:
        visible = bool(seen >> index & 1) and offered(schedule, index, now)
    rank = schedule.ranking.rank(block, *nodes)  # after the fetchers (nodes[1]) when not one of them
    if rank == 0:
        return "own"
    if visible or (
        index not in schedule.peer_failed
        and now - schedule.left_to_owner.setdefault(block, now) < schedule.config.coming_grace
        and owner_working(schedule, block, nodes[0], now)
    ):
        schedule.unseen_since.pop(block, None)
        return "leave"
    rank -= owner_holds(schedule, block, nodes[0], index)  # and failed it: the next one's turn
    if rank == 0:
        return "steal"
    since = max(schedule.unseen_since.setdefault(block, now), schedule.last_own_dispatch)
    return "steal" if now - since >= rank * schedule.config.steal_after else "leave"


def offered(schedule: Any, index: int, now: float) -> bool:
    """Whether chunk `index` may still come from a peer (`schedule`: a `schedule.BlobSchedule`):
    no peer failed it, or a live one that did not holds or brings it. Without this, a peer that
    failed a chunk, were it the block's owner and held it all, would hold the block back for ever."""
    failed = schedule.peer_failed.get(index)
    return not failed or any(
        s.kind == "peer"
        and s.name not in failed
        and schedule.live(s.name, now)
        and (schedule.holds(s, index) or schedule.coming(s.name, index, now))
        for s in schedule.scheduler.sources.values()
    )


def owner_holds(schedule: Any, block: int, nodes: frozenset[str], index: int) -> bool:
    """Whether the block's owner among `nodes` (and this node) is a peer that holds chunk
    `index` (`schedule`: a `schedule.BlobSchedule`). Asked of a chunk no peer offers: that owner
    failed it, and will not fetch from the origin what it holds, so the next node takes its turn."""
    owner = schedule.ranking.owner(block, nodes)
    return any(
        s.kind == "peer" and s.node_id == owner and schedule.holds(s, index)
        for s in schedule.scheduler.sources.values()
    )


def first_blocks(scheduler: Any, digest: str, block_chunks: int) -> Callable[[list[int]], bool]:
    """A sort key for a blob's blocks (lists of chunks), in a shared fetch: those this node owns
    among every peer it knows first. A fetch starts before the peers' inventories arrive, so
    the nodes pulling an image at once each think themselves alone at first, and their first
    requests would often hit the same blocks; ranked among every known peer, their first blocks
    differ. (Without a membership list only: with one, the fetchers are chosen otherwise; and a
    view of many peers is a sample of the swarm, whose ranking would not be shared.)"""
    node_id = scheduler.node_id
    known = frozenset(
        s.node_id
        for s in scheduler.sources.values()
        if s.kind == "peer" and s.node_id and s.node_id != node_id and not scheduler.stats[s.name].banned
    )
    if not node_id or not known or scheduler.members is not None or len(known) > 64:
        return lambda chunks: False
    ranking = Ranking(node_id, digest)
    return lambda chunks: ranking.rank(chunks[0] // block_chunks, known) > 0


class Ranking:
    """One node's ranks for the blocks of one blob, among the nodes fetching it."""

    def __init__(self, node_id: str | None, digest: str) -> None:
        self.node_id, self.digest = node_id, digest
        self._nodes: frozenset[str] = frozenset()  # the nodes `_ranks` ranks this one among
        self._ranks: dict[int, int] = {}  # block -> this node's rank among `_nodes`

    def among(
        self, seen: frozenset[str], members: frozenset[str] | None, count: int
    ) -> tuple[frozenset[str], int]:
        """The other nodes to rank this one among, and what to add to its rank among them.
        Without a membership list: the nodes it sees taking part (`seen`). With one: the blob's
        `count` fetchers (`fetchers`); a node outside them ranks after them all, then among the
        nodes it sees that are not fetchers."""
        node_id = self.node_id
        if members is None or not node_id:
            return seen, 0
        pool = members if seen <= members and node_id in members else members | seen | {node_id}
        chosen = fetchers(self.digest, pool, count)
        if node_id in chosen:
            return chosen - {node_id}, 0
        return seen - chosen, len(chosen)

    def owner(self, block: int, nodes: frozenset[str]) -> str | None:
        """The node ranked first for `block` among `nodes` and this one."""
        pool = nodes | {self.node_id} if self.node_id else nodes
        return max(pool, key=lambda n: score(n, self.digest, block), default=None)

    def rank(self, block: int, nodes: frozenset[str], base: int = 0) -> int:
        """This node's rank among `nodes` for `block`, plus `base` (0: the owner); remembered
        while the same nodes take part (hashing every peer for every block at every poll would
        cost more than everything else)."""
        node_id = self.node_id
        if not node_id or (not nodes and not base):
            return 0
        if nodes != self._nodes:
            self._nodes, self._ranks = nodes, {}
        rank = self._ranks.get(block)
        if rank is None:
            mine = score(node_id, self.digest, block)
            rank = self._ranks[block] = sum(1 for n in nodes if score(n, self.digest, block) > mine)
        return base + rank


def may_start(
    have: Sequence[bool],
    requested: Sequence[int],
    candidates: int,
    special: Sequence[int],
    position: Sequence[int],
) -> list[int]:
    """The chunks neither held nor requested that are among `candidates` (bits) or `special`
    (indices), in the order of `position`."""
    count = len(have)
    wanted = ((1 << count) - 1) & ~(chunks_set(have) | chunks_set(requested))
    bits = candidates
    for i in special:
        bits |= 1 << i
    return sorted(indices(wanted & bits), key=position.__getitem__)


def chunks_set(states: Sequence[int]) -> int:
    """The chunks whose state is not 0 (not False), as bits."""
    return int(bytes(states).translate(_NONZERO)[::-1], 2) if states else 0  # counts stay below 256


def indices(bits: int) -> list[int]:
    """The set bits of `bits`, lowest first."""
    digits = bin(bits)[:1:-1]
    found, i = [], digits.find("1")
    while i >= 0:
        found.append(i)
        i = digits.find("1", i + 1)
    return found


def _bits(states: bytes, table: bytes) -> int:
    """Chunk i's state, mapped by `table` to "1" or "0", as bit i of an int."""
    digits = states.translate(table)[::-1]
    return int(digits, 2) if digits else 0


_HELD = bytes(ord("1") if b == HAVE else ord("0") for b in range(256))
_BRINGING = bytes(ord("1") if b == COMING else ord("0") for b in range(256))
_NONZERO = bytes(ord("0") if b == 0 else ord("1") for b in range(256))


@functools.lru_cache(maxsize=64)
def fetchers(digest: str, pool: frozenset[str], count: int) -> frozenset[str]:
    """The `count` nodes of `pool` that fetch blob `digest` from the origin: the best ranked for
    the blob as a whole. Remembered: every blob's schedule on a node asks at every poll, with the
    same pool."""
    if len(pool) <= count:
        return pool
    return frozenset(heapq.nlargest(count, sorted(pool), key=lambda n: score(n, digest, -1)))


def score(node: str, digest: str, block: int) -> bytes:
    return hashlib.blake2b(f"{node}/{digest}/{block}".encode(), digest_size=8).digest()
