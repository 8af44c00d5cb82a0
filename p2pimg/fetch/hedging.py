"""Hedging: when a blob's schedule has nothing left to start, which straggling request is raced
on another source (or, stuck with no other, on its own), and which is stopped instead. A decision
of the scheduling core (schedule.py), kept apart because it reads the whole schedule at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from p2pimg.fetch.actions import Action, Cancel, Request, ScheduleConfig, Start
from p2pimg.fetch.policy import SourcePolicy
from p2pimg.fetch.swarm import SourceTraits, Span


class BlobSchedule(Protocol):
    """What hedging reads of a blob's schedule (`schedule.BlobSchedule`)."""

    scheduler: Any  # schedule.Scheduler
    config: ScheduleConfig
    chunk_size: int
    requests: dict[int, Request]
    unchecked: bool

    def holders(self, index: int) -> list[SourceTraits]: ...
    def holds(self, source: SourceTraits, index: int) -> bool: ...
    def live(self, name: str, now: float) -> bool: ...
    def sharing_now(self, now: float, live_peers: list[SourceTraits]) -> bool: ...
    def start_request(
        self, source: SourceTraits, span: Span, now: float, *, hedged: bool = False
    ) -> Request: ...


def hedge_stragglers(schedule: BlobSchedule, now: float, actions: list[Action]) -> None:
    """Nothing left to start: race a straggling request against another source."""
    stats = schedule.scheduler.stats
    policy = schedule.scheduler.policy
    cancelled = {a.request.id for a in actions if isinstance(a, Cancel)}
    # The default `should_hedge` races nothing idle for a second or less: skip those early.
    patient = type(policy).should_hedge is SourcePolicy.should_hedge
    # With a membership list, the origin's share of a shared blob is the fetchers' alone.
    sharing = schedule.sharing_now(
        now,
        [s for s in schedule.scheduler.sources.values() if s.kind == "peer" and schedule.live(s.name, now)],
    )
    fetchers_only = schedule.scheduler.members is not None and sharing
    config = schedule.config
    for request in list(schedule.requests.values()):
        if request.hedged or request.id in cancelled or request.next_index >= request.span.end:
            continue
        if patient and now - request.last_progress <= 1.0:
            continue
        holders = schedule.holders(request.next_index)
        mine = stats[request.source]
        # What a chunk takes from the fastest holder: a source that trickles is a straggler
        # next to it, even though it is "keeping its own pace".
        rate = max([mine.throughput, *(stats[s.name].throughput for s in holders)])
        # Nothing measured yet: a LAN peer should bring a chunk in well under a second.
        typical = schedule.chunk_size / rate if rate else 0.25 if request.kind == "peer" else 1.0
        idle = now - request.last_progress
        if not policy.should_hedge(mine, idle, typical):
            continue
        chosen = policy.choose_hedge([stats[s.name] for s in holders if s.name != request.source], now)
        stuck = now - max(request.last_byte, request.last_progress)
        if chosen is None and stuck > config.same_source_hedge:
            # With no other source, a second request to the same one beats waiting on a stuck
            # connection; but only when it is stuck (no bytes at all), not slow: on a busy
            # link or machine a second request would only send the same bytes twice.
            chosen = policy.choose_hedge([mine], now)
        if chosen is None:
            continue
        quiet = config.first_hand_quiet if schedule.unchecked else config.slow_peer_quiet
        far = sharing and request.kind == "peer" and chosen.kind != "peer"
        if far and stuck < quiet and idle < config.slow_peer_patience:
            # Slow, not stalled: its bytes still come (a peer short of CPU, say), or, for a
            # blob without CIDs (whose every chunk one peer holds, first-hand), not for long.
            # The origin, which the nodes sharing the blob take turns on, would send the chunk
            # once more, and over a shared uplink it would hardly come sooner.
            continue
        if fetchers_only and request.kind == "peer" and chosen.kind != "peer":
            # Not the origin: stop it; another peer, or the owner split, takes its chunks.
            request.hedged = request.overtaken = True
            actions.append(Cancel(request, True, "stalled"))
            continue
        request.hedged = True
        if request.kind == "peer" and chosen.name != request.source:
            # A LAN peer that stalls has failed: stop it now; the hedge takes its chunks.
            request.overtaken = True
            actions.append(Cancel(request, True, "stalled, hedged elsewhere"))
        source = schedule.scheduler.sources[chosen.name]
        end = request.next_index + 1  # the straggler's rest, as far as the new source holds it
        while end < request.span.end and schedule.holds(source, end):
            end += 1
        hedge = schedule.start_request(source, Span(request.next_index, end), now, hedged=True)
        hedge.why = f"hedge of {request.kind}"
        actions.append(Start(hedge))
