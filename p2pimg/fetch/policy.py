"""Source choice and what is observed of sources (sans I/O): the scheduling core's policy part.

`schedule.py` decides what to ask for, when and in what spans; for each span it asks a
`SourcePolicy` which of the sources holding its first chunk should send it, from plain numbers
kept in `SourceStats` (throughput, errors, backoff, bans). Policies can be swapped by name.

Theory of operation. For each span the schedule offers every source that holds its first chunk
and is not banned. A policy picks one, or None to wait. Kinds matter first: peers (near, free)
before the origin (far, metered, shared) before an upstream registry. While a healthy source of a
nearer kind holds the chunk, the policy waits for it to have a free slot rather than spend the
origin's bandwidth; only a kind whose holders are all failing (backing off) is passed over.
Within a kind, faster and less busy first. Hedging a straggler is the exception: it takes the
best free source other than the straggler, whatever its kind. A peer that sends a wrong byte is
penalised for a while and banned after repeated offences; any source that errs or stalls backs
off exponentially. A peer that fails `DROP_AFTER_ERRORS` times in a row (resets, stalls, claims
it cannot keep) is dropped: unused for `DROP_BASE` seconds, twice as long at each later drop (up
to `DROP_MAX`), until a success clears its record. Any host on the LAN can announce itself, so
a peer must earn its place: until it has delivered one span it is on probation, with one request
in flight (so a host that claims everything cannot take every chunk at once while the origin
waits), and a hedge goes to a source that has delivered, or to the origin, before an unproven
peer. The origin is never dropped (it is the authority of what it holds).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

KIND_RANK = {"peer": 0, "origin": 1, "upstream": 2, "gateway": 2}
# Kinds that pass on content others published (LAN peers, IPFS gateways): bytes that do not match
# their CID are their fault, so they are penalised, then banned, for it; an origin or upstream is
# the authority for what it holds (a bad object there is damage, not a lie).
RELAYS = frozenset({"peer", "gateway"})
MIN_RATE_SAMPLE = 256 << 10  # bytes a finished request needs for its rate to count
BAN_AFTER_BAD_CHUNKS = 3
BACKOFF_BASE = 0.25
BACKOFF_MAX = 8.0
DROP_AFTER_ERRORS = 3
DROP_BASE = 30.0
DROP_MAX = 600.0
_EWMA = 0.3


@dataclass
class SourceStats:
    """What the engine has observed of one source (updated by the engine, read by policies)."""

    name: str
    kind: str
    limit: int
    in_flight: int = 0
    requests: int = 0
    bytes: int = 0
    throughput: float = 0.0  # bytes/s, EWMA over finished requests; 0 = unknown yet
    latency: float = 0.0  # seconds to first byte, EWMA
    errors: int = 0  # consecutive errors (reset by a success)
    bad_chunks: int = 0
    unavailable_until: float = 0.0
    banned: bool = False
    drops: int = 0  # times a peer was dropped for failing again and again
    delivered: int = 0  # requests finished whole
    busy_since: float | None = None  # when it began to decline every request (429), if it does

    @property
    def proven(self) -> bool:
        """An origin always is; a peer once it has delivered a span and is not failing now."""
        return self.kind != "peer" or (self.delivered > 0 and self.errors == 0)

    @property
    def slots(self) -> int:
        """Requests it may have in flight: one while a peer is on probation."""
        return self.limit if self.proven else min(self.limit, 1)

    def stuck_busy(self, now: float, patience: float) -> bool:
        """It has declined every request for `patience` seconds: waiting for it is pointless."""
        return self.busy_since is not None and now - self.busy_since >= patience

    def usable(self, now: float) -> bool:
        return not self.banned and now >= self.unavailable_until and self.in_flight < self.slots

    # -- the engine's reports ---------------------------------------------------------------

    def started(self) -> None:
        self.in_flight += 1
        self.requests += 1

    def finished(self, nbytes: int, seconds: float, first_byte: float | None) -> None:
        self.in_flight -= 1
        self.bytes += nbytes
        self.errors = 0
        self.delivered += 1
        self.busy_since = None
        if nbytes >= MIN_RATE_SAMPLE and seconds > 0:
            # (A small transfer measures its round trip, not the rate: a few hundred bytes in
            # 50 ms would make a fast source look like a trickle, and its stragglers never hedged.)
            rate = nbytes / seconds
            self.throughput = rate if not self.throughput else (1 - _EWMA) * self.throughput + _EWMA * rate
        if first_byte is not None:
            self.latency = first_byte if not self.latency else (1 - _EWMA) * self.latency + _EWMA * first_byte

    def failed(self, now: float, nbytes: int = 0) -> None:
        """An error or a stall: back off exponentially; a peer failing again and again is dropped."""
        self.in_flight -= 1
        self.bytes += nbytes
        self.errors += 1
        backoff = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self.errors - 1))
        if self.kind == "peer" and self.errors >= DROP_AFTER_ERRORS:
            self.drops += 1
            backoff = min(DROP_MAX, DROP_BASE * 2 ** (self.drops - 1))
        self.unavailable_until = max(self.unavailable_until, now + backoff)

    def busy(self, now: float, seconds: float) -> None:
        """It declined a request for now (a peer's 429): leave it alone for `seconds`; no error."""
        self.in_flight -= 1
        self.unavailable_until = max(self.unavailable_until, now + seconds)
        if self.busy_since is None:
            self.busy_since = now

    def sent_bad_chunk(self, now: float, nbytes: int = 0) -> None:
        """A chunk that did not match its CID.

        A peer or gateway that lies (`RELAYS`) gets a long penalty and, when it repeats, a ban.
        An origin or upstream is the authority for what it published: a bad chunk there is
        damage to that one object (or to one transfer), so the source stays in use at once for
        everything else; the engine's per-chunk attempt limit ends the fetch of a damaged object.
        """
        self.bad_chunks += 1
        if self.kind not in RELAYS:
            self.in_flight -= 1
            self.bytes += nbytes
            return
        self.failed(now, nbytes)
        self.unavailable_until = now + min(BACKOFF_MAX, 4 * BACKOFF_BASE * 2**self.bad_chunks)
        self.banned = self.bad_chunks >= BAN_AFTER_BAD_CHUNKS

    def lied(self) -> None:
        """Its bytes of a blob only a digest checks (a mirrored blob) proved wrong against the
        upstream's: nothing else explains that, so it is banned at once."""
        self.bad_chunks += 1
        self.banned = True


class SourcePolicy(abc.ABC):
    """Picks a source for a span from the sources that hold its first chunk."""

    name: str

    @abc.abstractmethod
    def choose(self, candidates: list[SourceStats], now: float) -> SourceStats | None:
        """The source for the next span, or None to wait for a slot or a backoff to end."""

    def choose_hedge(self, candidates: list[SourceStats], now: float) -> SourceStats | None:
        """A free source to race a straggler with (the straggler is not among the candidates):
        one that has delivered (or the origin) before a peer on probation, then by rank."""
        usable = [s for s in candidates if s.usable(now)]
        return min(usable, key=lambda s: (not s.proven, *_rank(s))) if usable else None

    def should_hedge(self, current: SourceStats, idle: float, typical: float) -> bool:
        """Race a request that has made no progress for `idle` s against another source?"""
        return idle > max(1.0, 4 * typical)


class PreferNear(SourcePolicy):
    """Peers, then the origin, then upstream; within a kind the fastest, least loaded first."""

    name = "prefer-near"

    def choose(self, candidates: list[SourceStats], now: float) -> SourceStats | None:
        healthy = [s for s in candidates if not s.banned and now >= s.unavailable_until]
        if not healthy:
            return None
        nearest = min(KIND_RANK.get(s.kind, 9) for s in healthy)
        free = [s for s in healthy if KIND_RANK.get(s.kind, 9) == nearest and s.in_flight < s.slots]
        return min(free, key=_rank) if free else None


class OriginOnly(SourcePolicy):
    """Never use peers: everything from the origin (and upstream), e.g. to measure the origin."""

    name = "origin-only"

    def choose(self, candidates: list[SourceStats], now: float) -> SourceStats | None:
        return PreferNear().choose([s for s in candidates if s.kind != "peer"], now)

    def choose_hedge(self, candidates: list[SourceStats], now: float) -> SourceStats | None:
        return super().choose_hedge([s for s in candidates if s.kind != "peer"], now)


def _rank(s: SourceStats) -> tuple[int, float, str]:
    return KIND_RANK.get(s.kind, 9), -_score(s), s.name


def _score(s: SourceStats) -> float:
    """Expected share of throughput a new request would get; unknown sources are tried early."""
    rate = s.throughput if s.throughput else math.inf
    return rate / (1 + s.in_flight)


POLICIES: dict[str, type[SourcePolicy]] = {p.name: p for p in (PreferNear, OriginOnly)}


def policy_named(name: str) -> SourcePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        from p2pimg.errors import InvalidInput

        raise InvalidInput(f"unknown source policy {name!r} (known: {', '.join(POLICIES)})") from None
