"""The scheduling core's vocabulary: its configuration, the requests it makes, and the actions it
returns to its caller (see schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pimg.errors import P2pimgError
from p2pimg.fetch.swarm import Span


@dataclass
class ScheduleConfig:
    attempts: int = 4  # failed tries of one chunk by the origin (or upstream) before giving up
    stall_timeout: float = 30.0  # a request that sends nothing for this long has failed
    coming_grace: float = 30.0  # how long a chunk a progressing peer is fetching is left to it
    stale_claims: float = 2.0  # a peer that verified nothing new for this long brings nothing
    # (or longer, where a chunk takes longer from the origin: see `swarm.claims_window`)
    swarm_span: int = 2 << 20  # origin span (and ownership block) while peers share the blob
    slow_start: float = 0.6  # with peers, one origin request at a time until they have spoken
    swarm_origin_requests: int = 3  # with peers, origin requests in flight per blob after that
    slow_peer_quiet: float = 0.5  # a peer request with bytes this recent is slow, not stalled...
    slow_peer_patience: float = 4.0  # ...and not raced on the origin while sharing, until this long
    first_hand_quiet: float = 2.0  # the same for a blob without CIDs: no bytes for this long is stalled
    busy_patience: float = 10.0  # a chunk a peer holds, and is busy for, waits this long for it
    same_source_hedge: float = 5.0  # no progress for this long: race a request on its own source
    steal_after: float = 1.5  # the r-th ranked node takes an unseen block after r times this
    origin_fetchers: int = 8  # with a membership list: nodes that fetch a blob from the origin
    span_wait_share: float = 0.125  # at most this share of an origin span spent before its first byte


@dataclass(eq=False)
class Request:
    """One request for a span, from `Start` until `ended` (or a `Cancel` has been carried out)."""

    id: int
    source: str
    kind: str
    span: Span
    started: float
    last_progress: float  # when it last verified a chunk (or started)
    next_index: int
    last_byte: float = float("-inf")  # when bytes last arrived (see `progressed`)
    hedge: bool = False  # started to race a straggler
    hedged: bool = False  # a hedge races it
    overtaken: bool = False  # stopped because it stalled while others brought its chunks
    received: int = 0  # bytes of chunks it verified
    why: str = ""  # why it was started ("own", "steal", "peer"...), for the node's timeline


@dataclass(frozen=True)
class Start:
    request: Request


@dataclass(frozen=True)
class Cancel:
    """Stop `request`; the caller then reports `ended(..., "cancelled")`. `failed`: the source is
    to blame (a stall, or it was overtaken while stalled) and is charged for it."""

    request: Request
    failed: bool
    reason: str


@dataclass(frozen=True)
class GiveUp:
    error: P2pimgError


Action = Start | Cancel | GiveUp
