"""The simulated swarm: nodes that each drive their own instance of the real scheduling core.

Every honest node has a `Scheduler` (the origin and its neighbours as sources) and one
`BlobSchedule` for the image; the world plays the engine's part for it (`p2pimg/fetch/engine.py`):
it tells the schedule what the neighbours hold, polls it, carries out its actions over the
simulated network (`net.py`) and reports back: `verified` for each chunk that matched, `ended`
for each request. Time is the simulation's clock, passed to the core as `now`.

Every node of the first N is up (serving, known to discovery) from the start and starts pulling
within `start_spread` s; unless `view_only`, every scheduler is given the swarm's membership
(`Scheduler.members`: the nodes that are up), updated as nodes come and go.

Events, in a heap ordered by time (ties in the order they were made):
- a node starts pulling: it learns its neighbours' inventories at once (the engine's prime),
  makes its schedule, polls it, and ticks every `tick` s (the engine's loop waits at most that
  long); before each poll it reports `progressed` for its requests that are receiving bytes;
- inventory rounds: every `poll_interval` s each node reads its neighbours' availability (the
  real peer source polls each peer that often; here in `poll_slots` staggered groups of nodes);
  a node whose view changed is polled;
- a request's first byte, one RTT after it started (the origin's RTT or the LAN's); a peer that
  has left refuses it (error), a full peer answers busy (429), a liar ends it early (error), a
  staller accepts it and sends nothing;
- a chunk boundary crossed by a flow (from `Network.advance`): the receiver checks the chunk's
  content against the truth (its CID, in the real engine) and reports `verified`, or `ended`
  with "bad"; a request ended, or cancelled, makes its node poll at once (a chunk verified in
  the middle of a span does not: the engine polls then too, but nothing can start that the
  next end or tick would not start, and polls are most of the simulation's cost);
- churn: a node leaves (its uploads end in errors, its neighbours forget it after three missed
  inventory polls), another joins late with fresh neighbours and a fresh schedule.

What a chunk holds is tracked per node (`store`: the true bytes, or forged ones), so that a
wrong chunk accepted anywhere would show in `wrong_chunks_accepted`.

Mirror mode (`mirror`): the origin is an upstream registry, a blob is checked only by its digest
once whole, as the engine does for a mirrored blob (`p2pimg/fetch/engine.py`):
- a chunk from a peer cannot be checked on its own: it is taken as it comes (forged or not);
- before its blob is whole and checked, a node tells its peers of (and serves them) only the
  chunks it fetched from the upstream itself (first-hand: HAVE), and those an upstream request
  of its own is bringing (COMING); once checked, all of it;
- a whole blob is hashed (`digest_mbps`) before it counts as checked; if it does not match, every
  chunk is forgotten and the blob fetched again from the upstream alone (`Scheduler.blob(...,
  with_peers=False)`, peers told as holding nothing), and each peer whose chunks of the first
  round differ from the upstream's is banned (`SourceStats.lied`). `wrong_blobs_accepted`
  counts honest nodes done with a forged chunk in their blob.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pimg.content.model import DEFAULT_CHUNK_SIZE
from p2pimg.errors import OriginError, P2pimgError, VerificationError
from p2pimg.fetch.schedule import (
    COMING,
    HAVE,
    BlobSchedule,
    Cancel,
    GiveUp,
    Request,
    ScheduleConfig,
    Scheduler,
    Start,
    Traits,
)
from p2pimg.sources.peer import PeerSource

from .net import Network

MiB = 1 << 20
MBIT = 1e6 / 8  # bytes/s in a Mbit/s
DIGEST = "sha256:" + "5e" * 32
ORIGIN = "origin"
MISSING, TRUE, FORGED = 0, 1, 2
HOSTILE_KINDS = ("liar", "forger", "staller")
PROGRESS_EVERY = 10.0  # simulated seconds between progress lines (--progress)

# Event kinds.
_JOIN, _LEAVE, _FORGET, _ROUND, _TICK, _POLL, _OPEN, _CHUNK, _RETRY, _SAMPLE, _DIGEST = range(11)


@dataclass
class Params:
    nodes: int = 1000
    image_mb: float = 1024.0
    chunk_mb: float = DEFAULT_CHUNK_SIZE / MiB
    down_mbit: float = 1000.0  # every node's downlink
    up_mbit: float = 1000.0  # every node's uplink (to its peers)
    origin_mbit: float = 1000.0  # the origin's uplink, shared by every node
    conn_mbit: float = 0.0  # cap per connection (origin and peers); 0: none
    lan_rtt: float = 0.001  # s to a peer's first byte
    origin_rtt: float = 0.03  # s to the origin's first byte
    peers_per_node: int = 24  # neighbours (mean degree of a random graph)
    churn: float = 0.0  # share of nodes that leave mid-pull; as many join late
    hostile: float = 0.0  # share of nodes that lie, forge or stall (in turn)
    seed: int = 1
    dt: float = 0.01  # network time step
    start_spread: float = 0.1  # nodes start within this many seconds of each other
    poll_interval: float = 0.3  # inventory polls (the real peer source's interval)
    poll_slots: int = 3  # staggered groups of nodes polling in turn
    tick: float = 0.25  # the engine's loop wakes at least this often
    peer_max_requests: int = 32  # a peer's concurrent uploads (its --peer-max-requests)
    origin_limit: int = 8  # a node's requests to the origin in flight (its source limit)
    churn_window: float = 0.0  # leaves and late joins happen within (0, this); 0: single_node_s
    max_sim_s: float = 3600.0
    sample_every: float = 0.5  # the time series in the results
    retry_after: float = 1.0  # a fetch that gave up is asked again (a client retrying) after this
    origin_fetchers: int = ScheduleConfig.origin_fetchers  # with the membership list
    view_only: bool = False  # no membership list: each node ranks only the peers it polls
    skip_verify: bool = False  # accept chunks unchecked (to show that the check is real)
    mirror: bool = False  # the origin is an upstream registry: blobs are checked by digest only
    digest_mbps: float = 1200.0  # mirror: sha256 of a whole blob, MB/s (1e6 bytes); 0: instant

    @property
    def image_bytes(self) -> int:
        return int(self.image_mb * MiB)

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * MiB)


@dataclass(eq=False)
class Flow:
    slot: int
    node: Node  # the receiver
    sender: Node | None  # None: the origin
    request: Request
    index: int
    started: float
    first_byte: float | None = None
    state: str = "opening"  # opening | live | stalled | done
    serving: bool = False  # holds one of the sender's upload slots


@dataclass(eq=False)
class Node:
    idx: int
    endpoint: int
    name: str
    kind: str  # honest | liar | forger | staller
    start_at: float
    leave_at: float | None = None
    late: bool = False
    alive: bool = False
    joined_at: float | None = None
    left_at: float | None = None
    done_at: float | None = None
    neighbours: list[Node] = field(default_factory=list)
    scheduler: Scheduler | None = None
    blob: BlobSchedule | None = None
    store: bytearray = field(default_factory=bytearray)
    flows: dict[int, Flow] = field(default_factory=dict)  # request id -> its flow (downloads)
    uploads: dict[Flow, None] = field(default_factory=dict)  # ordered: a set's order would vary by run
    serving: int = 0
    version: int = 0  # bumped whenever its availability may have changed
    avail: bytes | None = None
    avail_version: int = -1
    told: dict[int, bytes | None] = field(default_factory=dict)  # neighbour idx -> states last told
    poll_pending: bool = False
    polls: int = 0
    gave_up: int = 0
    last_error: str | None = None
    # Mirror mode: chunks fetched from the upstream by this node itself; the peer that sent each
    # other chunk; the round (1, or 2: fetching again without peers after a digest mismatch).
    firsthand: bytearray | None = None
    suppliers: dict[int, str] = field(default_factory=dict)
    referee: dict[int, tuple[str, int]] | None = None  # round 2: chunk -> (peer, what it sent)
    hashing: bool = False  # whole, its digest being computed
    received_before: dict[str, int] = field(default_factory=dict)  # bytes of discarded rounds

    @property
    def honest(self) -> bool:
        return self.kind == "honest"

    def availability(self) -> bytes | None:
        """What a neighbour polling this node hears (`Fetcher.availability` for honest nodes)."""
        if not self.honest:
            return b""  # every hostile node claims the whole blob
        if self.done_at is not None:
            return b""
        if self.blob is None:
            return None
        if self.avail_version != self.version:
            self.avail = self.blob.availability()
            if self.firsthand is not None:
                self.avail = self._firsthand_only(self.blob, self.avail, self.firsthand)
            self.avail_version = self.version
        return self.avail

    @staticmethod
    def _firsthand_only(blob: BlobSchedule, states: bytes, firsthand: bytearray) -> bytes:
        """A blob only its digest checks: peers hear of the chunks this node fetched from the
        upstream itself, and of those its own upstream requests are bringing (as the engine's
        `Fetcher.availability`)."""
        far = bytearray(len(states))
        for request in blob.requests.values():
            if request.kind != "peer":
                far[request.next_index : request.span.end] = b"\x01" * (request.span.end - request.next_index)
        return bytes(
            HAVE if state == HAVE and firsthand[i] else COMING if state == COMING and far[i] else 0
            for i, state in enumerate(states)
        )


@dataclass
class Counters:
    outcomes: dict[str, int] = field(default_factory=dict)  # requests by outcome
    starts: dict[str, int] = field(default_factory=dict)  # requests by kind of source
    hedges: int = 0
    bad_chunks: int = 0
    serve_misses: int = 0  # an honest peer asked for a chunk it did not hold (should be 0)
    # Mirror mode.
    unchecked_bad: int = 0  # forged chunks taken from peers (unchecked until the blob is whole)
    digest_failures: int = 0  # whole blobs that did not match their digest: fetched again
    bans: int = 0  # peers banned for bytes that differ from the upstream's
    discard_misses: int = 0  # a peer asked for a chunk a node had forgotten (digest mismatch)
    polls: int = 0
    events: int = 0
    steps: int = 0


class World:
    def __init__(
        self,
        params: Params,
        *,
        churn_window: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        p = self.params = params
        self.rng = random.Random(p.seed)
        self.size = p.image_bytes
        self.chunk = p.chunk_bytes
        self.count = -(-self.size // self.chunk)
        self.config = ScheduleConfig() if p.view_only else ScheduleConfig(origin_fetchers=p.origin_fetchers)
        self.origin_traits = Traits(ORIGIN, "upstream" if p.mirror else "origin", limit=p.origin_limit)
        self.counters = Counters()
        self.queue: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.step_end = 0.0
        self.progress = progress  # a line every PROGRESS_EVERY simulated seconds
        window = p.churn_window or churn_window or 10.0

        n = p.nodes
        hostile = set(self.rng.sample(range(n), round(p.hostile * n))) if p.hostile else set()
        honest = [i for i in range(n) if i not in hostile]
        leaving = set(self.rng.sample(honest, min(len(honest), round(p.churn * n)))) if p.churn else set()
        late = len(leaving)
        self.nodes: list[Node] = []
        for i in range(n + late):
            kind = "honest"
            if i in hostile:
                kind = HOSTILE_KINDS[len([h for h in hostile if h < i]) % len(HOSTILE_KINDS)]
            is_late = i >= n
            start = (
                self.rng.uniform(0.0, window)
                if is_late
                else (0.0 if kind != "honest" else self.rng.uniform(0.0, p.start_spread))
            )
            node = Node(
                i,
                i + 1,
                f"n{i}",
                kind,
                start,
                late=is_late,
                store=bytearray(self.count) if kind == "honest" else bytearray(),
                firsthand=bytearray(self.count) if kind == "honest" and p.mirror else None,
            )
            if i in leaving:
                node.leave_at = self.rng.uniform(0.0, window)
            self.nodes.append(node)
        self.by_name = {node.name: node for node in self.nodes}
        self.traits = {
            node.idx: Traits(
                node.name,
                "peer",
                limit=PeerSource.limit,
                max_span=PeerSource.max_span,
                stall_timeout=PeerSource.stall_timeout,
                node_id=node.name,
            )
            for node in self.nodes
        }
        self._graph(n)
        endpoints = 1 + len(self.nodes)
        self.net = Network(
            [p.origin_mbit * MBIT] + [p.up_mbit * MBIT] * len(self.nodes),
            [0.0] + [p.down_mbit * MBIT] * len(self.nodes),
        )
        self.conn_cap = p.conn_mbit * MBIT if p.conn_mbit else math.inf
        assert self.net.up.shape[0] == endpoints
        self.flows: dict[int, Flow] = {}  # slot -> flow
        self.members: frozenset[str] = frozenset()  # the nodes in the swarm, as discovery knows them

        for node in self.nodes:
            node.alive = not node.late  # up (discoverable, serving) from the start; pulls from start_at
            self._push(node.start_at, _JOIN, node)
            if node.leave_at is not None:
                self._push(max(node.leave_at, node.start_at + 0.01), _LEAVE, node)
        self.series: dict[str, list[float]] = {
            "t": [],
            "origin_bytes": [],
            "origin_flows": [],
            "peer_flows": [],
            "done": [],
            "chunks": [],
        }
        self._push(0.0, _SAMPLE, None)
        slots = max(1, p.poll_slots)
        for k in range(slots):
            self._push(p.poll_interval * (k + 0.5) / slots, _ROUND, k)

    # -- set-up ------------------------------------------------------------------------------

    def _graph(self, n: int) -> None:
        """A random graph over the first `n` nodes, mean degree `peers_per_node`: each node links
        to half that many others, picked at random, both ways."""
        k = min(n - 1, max(1, -(-self.params.peers_per_node // 2)))
        if n < 2:
            return
        links: set[tuple[int, int]] = set()
        for i in range(n):
            for j in self._pick(n, i, k):
                links.add((min(i, j), max(i, j)))
        for i, j in sorted(links):
            self.nodes[i].neighbours.append(self.nodes[j])
            self.nodes[j].neighbours.append(self.nodes[i])

    def _pick(self, n: int, me: int, k: int) -> list[int]:
        chosen: set[int] = set()
        while len(chosen) < k:
            j = self.rng.randrange(n)
            if j != me:
                chosen.add(j)
        return sorted(chosen)

    def _push(self, at: float, kind: int, obj: Any) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, kind, obj))

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        p = self.params
        dt = p.dt
        while self.now < p.max_sim_s and not self._finished():
            self.step_end = end = self.now + dt
            self.counters.steps += 1
            for at, slot, rate in self.net.advance(dt):
                flow = self.flows[slot]
                self._push(self.now + at, _CHUNK, (flow, int(self.net.gen[slot]), rate))
            queue = self.queue
            while queue and queue[0][0] < end:
                at, _, kind, obj = heapq.heappop(queue)
                self.now = max(self.now, at)
                self.counters.events += 1
                self._handle(kind, obj)
            self.now = end

    def _finished(self) -> bool:
        """Every honest node is done or gone, and nobody is still to join or leave."""
        if self.counters.steps % 10:
            return False
        return all(node.done_at is not None or node.left_at is not None for node in self.nodes if node.honest)

    def _handle(self, kind: int, obj: Any) -> None:
        now = self.now
        if kind == _CHUNK:
            flow, gen, rate = obj
            if flow.state == "live" and self.net.gen[flow.slot] == gen:
                self._chunk(flow, rate, now)
        elif kind == _POLL:
            obj.poll_pending = False
            self._poll(obj, now)
        elif kind == _TICK:
            if obj.alive and obj.done_at is None:
                self._poll(obj, now)
                self._push(now + self.params.tick, _TICK, obj)
        elif kind == _OPEN:
            self._open(obj, now)
        elif kind == _ROUND:
            self._round(obj, now)
            self._push(now + self.params.poll_interval, _ROUND, obj)
        elif kind == _JOIN:
            self._join(obj, now)
        elif kind == _LEAVE:
            self._leave(obj, now)
        elif kind == _FORGET:
            node, gone = obj
            self._forget(node, gone, now)
        elif kind == _RETRY:
            self._restart(obj, now)
        elif kind == _SAMPLE:
            self._sample(now)
            self._push(now + self.params.sample_every, _SAMPLE, None)
        elif kind == _DIGEST:
            self._digest(obj, now)

    def _sample(self, now: float) -> None:
        series = self.series
        origin_flows = sum(1 for f in self.flows.values() if f.sender is None and f.state == "live")
        series["t"].append(round(now, 3))
        series["origin_bytes"].append(float(self.net.sent[0]))
        series["origin_flows"].append(origin_flows)
        series["peer_flows"].append(len(self.flows) - origin_flows)
        series["done"].append(sum(1 for n in self.nodes if n.honest and n.done_at is not None))
        series["chunks"].append(sum(self.count - n.blob.missing for n in self.nodes if n.blob is not None))
        if (
            self.progress is not None
            and len(series["t"]) % max(1, round(PROGRESS_EVERY / self.params.sample_every)) == 1
        ):
            egress = series["origin_bytes"][-1] / self.size
            self.progress(
                f"t={now:.1f} s: {series['done'][-1]} done, origin {egress:.2f}x the image, "
                f"{origin_flows} origin and {series['peer_flows'][-1]} peer flows"
            )

    # -- nodes coming and going ----------------------------------------------------------------

    def _join(self, node: Node, now: float) -> None:
        """The node starts pulling (a late one comes up first: new links, known to discovery)."""
        node.alive, node.joined_at = True, now
        if node.late or not self.members:
            self._membership(now)
        if node.late:
            alive = [m for m in self.nodes if m.alive and m is not node]
            k = min(len(alive), max(1, -(-self.params.peers_per_node // 2)))
            for m in self.rng.sample(alive, k):
                node.neighbours.append(m)
                m.neighbours.append(node)
        if not node.honest:
            return
        node.scheduler = Scheduler(config=self.config, node_id=node.name)
        if not self.params.view_only:
            node.scheduler.members = self.members
        node.scheduler.join(self.origin_traits)
        for m in node.neighbours:
            if m.alive:
                node.scheduler.join(self.traits[m.idx])
                if m.scheduler is not None:
                    m.scheduler.join(self.traits[node.idx])
        self._restart(node, now)
        self._push(now + self.params.tick, _TICK, node)

    def _restart(self, node: Node, now: float) -> None:
        """A fresh schedule for the blob, from what the node holds (a join, or a retry)."""
        assert node.scheduler is not None
        if not node.alive:
            return
        have = [s != MISSING for s in node.store]
        rng = random.Random(self.rng.random())
        if node.referee is None:
            node.blob = node.scheduler.blob(
                DIGEST, self.size, self.chunk, have, now, rng=rng, unchecked=self.params.mirror
            )
        else:  # mirror mode, after a digest mismatch: the upstream alone
            node.blob = node.scheduler.blob(
                DIGEST, self.size, self.chunk, have, now, rng=rng, with_peers=False
            )
        node.version += 1
        node.told.clear()
        self._tell(node, now)
        self._poll(node, now)

    def _leave(self, node: Node, now: float) -> None:
        if not node.alive:
            return
        node.alive, node.left_at = False, now
        for flow in list(node.flows.values()):
            self._close(flow)
        node.flows.clear()
        for flow in list(node.uploads):
            self._end(flow, "error", now, OriginError(f"{node.name}: connection reset"))
        for m in node.neighbours:
            if m.alive and m.scheduler is not None:
                self._push(now + 3 * self.params.poll_interval, _FORGET, (m, node))
        self._push(now + 3 * self.params.poll_interval, _FORGET, (None, node))

    def _membership(self, now: float) -> None:
        """Discovery's view of the swarm (every node that is up), given to every scheduler."""
        self.members = frozenset(n.name for n in self.nodes if n.alive)
        if not self.params.view_only:
            for n in self.nodes:
                if n.scheduler is not None and n.alive:
                    n.scheduler.members = self.members

    def _forget(self, node: Node | None, gone: Node, now: float) -> None:
        """Three inventory polls missed: the peer holds nothing, and is no longer a source (and
        discovery no longer lists it: `node` None)."""
        if node is None:
            self._membership(now)
            return
        if node.scheduler is None:
            return
        if node.blob is not None:
            node.blob.inventory(gone.name, None, now)
        node.told.pop(gone.idx, None)
        node.scheduler.leave(gone.name)
        if gone in node.neighbours:
            node.neighbours.remove(gone)
        self._want_poll(node, now)

    # -- what the neighbours hold ------------------------------------------------------------------

    def _round(self, slot: int, now: float) -> None:
        slots = max(1, self.params.poll_slots)
        for node in self.nodes[slot::slots]:
            if node.alive and node.blob is not None and node.done_at is None and self._tell(node, now):
                self._want_poll(node, now)

    def _tell(self, node: Node, now: float) -> bool:
        blob = node.blob
        assert blob is not None
        told = node.told
        changed = False
        alone = node.referee is not None  # a mirrored blob fetched again without peers
        for m in node.neighbours:
            if not m.alive:
                continue  # gone: its last answer stands until it is forgotten
            states = None if alone else m.availability()
            if told.get(m.idx, ...) is not states:
                told[m.idx] = states
                blob.inventory(m.name, states, now)
                changed = True
        return changed

    # -- the schedule's actions --------------------------------------------------------------------

    def _want_poll(self, node: Node, now: float) -> None:
        if not node.poll_pending:
            node.poll_pending = True
            self._push(now, _POLL, node)

    def _poll(self, node: Node, now: float) -> None:
        blob = node.blob
        if blob is None or not node.alive or node.done_at is not None or node.hashing:
            return
        self.counters.polls += 1
        node.polls += 1
        for flow in node.flows.values():
            if flow.state == "live":
                blob.progressed(flow.request, now)  # bytes are arriving (the engine: every piece)
        actions = blob.poll(now)
        for action in actions:
            if isinstance(action, Start):
                self._start(node, action.request, now)
            elif isinstance(action, Cancel):
                cancelled = node.flows.get(action.request.id)
                if cancelled is not None:
                    self._end(cancelled, "cancelled", now)
            elif isinstance(action, GiveUp):
                self._give_up(node, action.error, now)
                return

    def _give_up(self, node: Node, error: P2pimgError, now: float) -> None:
        """The fetch failed: its client asks again a little later, from what is on disk."""
        node.gave_up += 1
        node.last_error = error.message
        for flow in list(node.flows.values()):
            self._close(flow)
        node.flows.clear()
        node.blob = None
        self._push(now + self.params.retry_after, _RETRY, node)

    def _start(self, node: Node, request: Request, now: float) -> None:
        c = self.counters
        c.starts[request.kind] = c.starts.get(request.kind, 0) + 1
        if request.hedge:
            c.hedges += 1
        node.version += 1
        if request.kind == "peer":
            sender: Node | None = self.by_name[request.source]
            rtt, src = self.params.lan_rtt, sender.endpoint  # type: ignore[union-attr]
        else:
            sender, rtt, src = None, self.params.origin_rtt, 0
        slot = self.net.open(src, node.endpoint, self._chunk_len(request.span.first), self.conn_cap)
        flow = Flow(slot, node, sender, request, request.span.first, now)
        self.flows[slot] = flow
        node.flows[request.id] = flow
        if sender is not None:
            sender.uploads[flow] = None
        self._push(now + rtt, _OPEN, flow)

    def _open(self, flow: Flow, now: float) -> None:
        if flow.state != "opening":
            return
        sender = flow.sender
        if sender is not None:
            if not sender.alive:
                self._end(flow, "error", now, OriginError(f"{sender.name}: connection refused"))
                return
            if sender.kind == "liar":
                self._end(flow, "error", now, OriginError(f"{sender.name} ended chunk {flow.index} early"))
                return
            if sender.serving >= self.params.peer_max_requests:
                self._end(flow, "busy", now)
                return
            sender.serving += 1
            flow.serving = True
            if sender.kind == "staller":
                flow.state = "stalled"  # holds the connection open, sends nothing
                return
        flow.state = "live"
        flow.first_byte = now - flow.started
        self.net.start(flow.slot)

    def _chunk(self, flow: Flow, rate: float, now: float) -> None:
        node, request, i = flow.node, flow.request, flow.index
        blob = node.blob
        assert blob is not None
        sender = flow.sender
        mirror = self.params.mirror
        if sender is None:
            content = TRUE
        elif sender.kind == "forger":
            content = FORGED
        elif sender.firsthand is not None and sender.done_at is None and not sender.firsthand[i]:
            content = MISSING  # a mirrored blob not checked yet: only first-hand chunks go out
        else:
            content = sender.store[i]
        if content == MISSING:
            if sender is not None and sender.referee is not None:
                self.counters.discard_misses += 1
            else:
                self.counters.serve_misses += 1
            self._end(flow, "error", now, OriginError(f"{sender.name if sender else ORIGIN} ended early"))
            return
        if content != TRUE and not self.params.skip_verify and not mirror:
            self.counters.bad_chunks += 1
            self._end(flow, "bad", now, VerificationError(f"chunk {i} from {request.source} does not match"))
            return
        if node.store[i] == MISSING:
            node.store[i] = content
            if node.firsthand is not None:
                if sender is None:
                    node.firsthand[i] = 1
                else:
                    node.suppliers[i] = sender.name
                    if content != TRUE:
                        self.counters.unchecked_bad += 1
        node.version += 1
        for action in blob.verified(request, i, now):
            if not isinstance(action, Cancel):
                continue
            other = node.flows.get(action.request.id)
            if other is not None and other is not flow:
                self._end(other, "cancelled", now)
        if blob.complete:
            if mirror:
                self._whole(node, now)
            else:
                self._done(node, now)
            return
        i += 1
        flow.index = i
        span_end = request.span.end
        have = blob.have
        if i >= span_end or all(have[j] for j in range(i, span_end)):
            self._end(flow, "ok", now)
            return
        net = self.net
        net.rem[flow.slot] += self._chunk_len(i)
        left = float(net.rem[flow.slot])
        if left <= 0:  # the next chunk ends within this step too
            self._push(self.step_end + left / rate, _CHUNK, (flow, int(net.gen[flow.slot]), rate))

    def _whole(self, node: Node, now: float) -> None:
        """Mirror mode: every chunk is in; the blob's digest is computed before it counts. The
        requests still running (hedged losers) end, as the engine cancels them."""
        blob = node.blob
        assert blob is not None
        for flow in list(node.flows.values()):
            self._close(flow)
            blob.ended(flow.request, "cancelled", now)
        node.flows.clear()
        node.hashing = True
        node.version += 1
        rate = self.params.digest_mbps * 1e6
        self._push(now + (self.size / rate if rate > 0 else 0.0), _DIGEST, node)

    def _digest(self, node: Node, now: float) -> None:
        """Mirror mode: the whole blob's digest. A match ends the fetch (and, after a second round,
        bans each peer whose first-round chunks differ from the upstream's); a mismatch forgets
        every chunk and fetches the blob again from the upstream alone."""
        if not node.alive or not node.hashing:
            return
        node.hashing = False
        assert node.scheduler is not None and node.blob is not None
        if self.params.skip_verify or all(c == TRUE for c in node.store):
            for peer in sorted({peer for peer, sent in (node.referee or {}).values() if sent != TRUE}):
                stats = node.scheduler.stats.get(peer)
                if stats is not None and not stats.banned:
                    self.counters.bans += 1
                if stats is not None:
                    stats.lied()
            self._done(node, now)
            return
        if node.referee is not None or not node.suppliers:
            raise RuntimeError(f"{node.name}: the upstream's own bytes did not match the digest")
        self.counters.digest_failures += 1
        node.referee = {i: (peer, node.store[i]) for i, peer in node.suppliers.items()}
        for kind, nbytes in node.blob.received.items():
            node.received_before[kind] = node.received_before.get(kind, 0) + nbytes
        node.store = bytearray(self.count)
        node.firsthand = bytearray(self.count)
        node.suppliers.clear()
        node.blob = None
        self._restart(node, now)

    def _done(self, node: Node, now: float) -> None:
        node.done_at = now
        node.version += 1
        for flow in list(node.flows.values()):
            self._close(flow)  # the hedged losers still running
        node.flows.clear()

    def _close(self, flow: Flow) -> None:
        """Stop a flow's bytes and free what it held (no report to its schedule)."""
        if flow.state == "done":
            return
        if flow.state == "live":
            self.net.unsend(flow.slot)
        flow.state = "done"
        self.net.close(flow.slot)
        del self.flows[flow.slot]
        if flow.sender is not None:
            flow.sender.uploads.pop(flow, None)
            if flow.serving:
                flow.sender.serving -= 1

    def _end(self, flow: Flow, outcome: str, now: float, error: P2pimgError | None = None) -> None:
        """A request ended: its schedule hears of it (as the engine's `_request` reports it)."""
        if flow.state == "done":
            return
        self._close(flow)
        node, request = flow.node, flow.request
        node.flows.pop(request.id, None)
        c = self.counters
        c.outcomes[outcome] = c.outcomes.get(outcome, 0) + 1
        if node.blob is None or not node.alive:
            return
        request.next_index = max(request.next_index, flow.index)
        node.blob.ended(request, outcome, now, error=error, first_byte=flow.first_byte)
        node.version += 1
        self._want_poll(node, now)

    def _chunk_len(self, index: int) -> int:
        return min(self.size, (index + 1) * self.chunk) - index * self.chunk
