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
  they apply (`BlobSchedule.sharing_now`, `_dispatch`, `_claim`, `hedging.py`).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from p2pimg.fetch.policy import SourceStats

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
        if now >= st.unavailable_until:
            view.healthy |= bits
            view.peers.append((st, bits))
            if progressing(source.name):
                view.coming |= brings
                view.seen |= bits | brings
            else:
                view.seen |= bits
    return view


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
