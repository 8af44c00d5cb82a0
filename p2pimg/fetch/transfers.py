"""What a node's fetches did, kept for people to look at (the dashboard, `GET /ui/api/transfers`):
per blob fetch, which source delivered each chunk, bytes by source over time, failures, and how
it ended. Plain data, fed by the engine; bounded however long a node runs (a fetch's series
coarsens instead of growing, and only the last `KEPT` finished fetches are remembered)."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

KEPT = 50  # finished fetches remembered
_STEPS = 240  # points of a fetch's throughput series at most; the step doubles beyond
_STEP = 0.25  # seconds per point to start with
MISSING, CACHED = 0, 255  # in `TransferRecord.delivered`: not here yet, on disk before the fetch


@dataclass
class Series:
    """Bytes per source per time step since `start`; merges pairs of steps when it gets long."""

    start: float
    step: float = _STEP
    by_source: dict[str, list[int]] = field(default_factory=dict)

    def add(self, source: str, nbytes: int, now: float) -> None:
        slot = max(0, int((now - self.start) / self.step))
        while slot >= _STEPS:
            self.step *= 2
            for name, points in self.by_source.items():
                self.by_source[name] = [sum(points[i : i + 2]) for i in range(0, len(points), 2)]
            slot = max(0, int((now - self.start) / self.step))
        points = self.by_source.setdefault(source, [])
        points.extend([0] * (slot + 1 - len(points)))
        points[slot] += nbytes

    def to_json(self) -> dict[str, object]:
        width = max((len(p) for p in self.by_source.values()), default=0)
        return {
            "start": round(self.start, 4),
            "step": self.step,
            "by_source": {name: p + [0] * (width - len(p)) for name, p in self.by_source.items()},
        }


@dataclass(eq=False)
class TransferRecord:
    id: str
    digest: str
    size: int
    chunk_size: int
    count: int
    started: float
    repository: str | None = None
    sources: list[str] = field(default_factory=list)  # names, in the order they first delivered
    delivered: bytearray = field(default_factory=bytearray)  # per chunk: 1 + index in `sources`
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    ended: float | None = None
    ok: bool | None = None
    error: str | None = None
    series: Series | None = None
    totals: collections.Counter[str] | None = None  # the log's bytes by source, all fetches

    def chunk(self, index: int, source: str, nbytes: int, now: float) -> None:
        """Chunk `index` arrived from `source`, verified."""
        if source not in self.sources:
            if len(self.sources) >= CACHED - 1:  # 254 distinct sources in one fetch: lump the rest
                source = self.sources[-1]
            else:
                self.sources.append(source)
        self.delivered[index] = 1 + self.sources.index(source)
        self.bytes_by_source[source] = self.bytes_by_source.get(source, 0) + nbytes
        if self.totals is not None:
            self.totals[source] += nbytes
        assert self.series is not None
        self.series.add(source, nbytes, now)

    def restart(self) -> None:
        """The bytes received so far are fetched again (a second round): the map starts over."""
        self.delivered = bytearray(self.count)

    def rate(self, now: float, window: float = 2.0, source: str | None = None) -> float:
        """Bytes per second over the last `window` seconds of the series, from every source or
        from `source` (0 when ended)."""
        if self.ended is not None or self.series is None:
            return 0.0
        series = self.series
        last = int((now - series.start) / series.step)
        first = max(0, last - max(1, int(window / series.step)) + 1)
        points = series.by_source.values() if source is None else [series.by_source.get(source, [])]
        total = sum(sum(p[first : last + 1]) for p in points)
        return total / max(series.step, min(window, now - series.start, (last - first + 1) * series.step))

    def to_json(self, now: float, coming: bytes = b"") -> dict[str, object]:
        """`coming`: per chunk, nonzero where a request is bringing it now."""
        marks = "0123456789abcdefghijklmnopqrstuvwxyz"
        cells = []
        for i, d in enumerate(self.delivered):
            if d == CACHED:
                cells.append("*")
            elif d:
                cells.append(marks[d - 1] if d - 1 < len(marks) else "+")
            else:
                cells.append("~" if i < len(coming) and coming[i] else ".")
        return {
            "id": self.id,
            "digest": self.digest,
            "size": self.size,
            "repository": self.repository,
            "chunk_size": self.chunk_size,
            "chunks": self.count,
            "have": sum(1 for d in self.delivered if d),
            "map": "".join(cells),
            "sources": list(self.sources),
            "bytes_by_source": dict(self.bytes_by_source),
            "rate": round(self.rate(now), 1),
            "failures": self.failures,
            "started": round(self.started, 4),
            "ended": None if self.ended is None else round(self.ended, 4),
            "ok": self.ok,
            "error": self.error,
            "series": self.series.to_json() if self.series is not None else None,
        }


class TransferLog:
    """The records of a node's running and recent fetches."""

    def __init__(self) -> None:
        self.active: dict[str, TransferRecord] = {}  # id -> record
        self.finished: collections.deque[TransferRecord] = collections.deque(maxlen=KEPT)
        self._ids = itertools.count(1)
        self.totals: collections.Counter[str] = collections.Counter()  # verified bytes by source

    def source_rate(self, source: str, now: float, window: float = 2.0) -> float:
        """Bytes per second `source` delivered over the last `window` seconds, all fetches."""
        return sum(r.rate(now, window, source) for r in list(self.active.values()))

    def pulls(self, now: float, gap: float = 5.0, most: int = 20) -> list[dict[str, object]]:
        """Fetches grouped into pulls: those of one repository that ran within `gap` seconds of
        each other (a client pulling an image asks for its blobs one after another or a few at
        a time), newest first, each with its totals and one throughput series by source."""
        everything = [*self.active.values(), *self.finished]
        named = sorted((r for r in everything if r.repository), key=lambda r: (r.repository, r.started))
        groups: list[list[TransferRecord]] = []
        for record in named:
            last = groups[-1] if groups else None
            if (
                last is not None
                and last[0].repository == record.repository
                and record.started <= _end(last, now) + gap
            ):
                last.append(record)
            else:
                groups.append([record])
        # A fetch no client asked for by name (an image's small blobs, fetched when a node first
        # reads its root, just before its client asks for the blobs; a peer's) joins the pull
        # it started within or just before, else stands alone.
        for record in sorted((r for r in everything if not r.repository), key=lambda r: r.started):
            near = [g for g in groups if g[0].started - gap <= record.started <= _end(g, now)]
            if near:
                near[0].append(record)
            else:
                groups.append([record])
        groups.sort(key=lambda g: max(r.started for r in g), reverse=True)
        return [_pull(g, now) for g in groups[:most]]

    def begin(
        self, digest: str, size: int, chunk_size: int, have: bytes | bytearray, now: float
    ) -> TransferRecord:
        record = TransferRecord(
            id=str(next(self._ids)),
            digest=digest,
            size=size,
            chunk_size=chunk_size,
            count=len(have),
            started=now,
            delivered=bytearray(CACHED if h else MISSING for h in have),
            series=Series(now),
            totals=self.totals,
        )
        self.active[record.id] = record
        return record

    def end(self, record: TransferRecord, now: float, error: str | None) -> None:
        if self.active.pop(record.id, None) is None:
            return
        record.ended, record.ok, record.error = now, error is None, error
        self.finished.appendleft(record)


def _end(records: list[TransferRecord], now: float) -> float:
    return max(r.ended if r.ended is not None else now for r in records)


def _pull(records: list[TransferRecord], now: float) -> dict[str, object]:
    """One pull's summary, its series the sum of its fetches' on one time axis."""
    start = min(r.started for r in records)
    running = any(r.ended is None for r in records)
    end = now if running else max(r.ended or now for r in records)
    merged = Series(start)
    by_source: dict[str, int] = {}
    for r in records:
        for source, n in r.bytes_by_source.items():
            by_source[source] = by_source.get(source, 0) + n
        if r.series is not None:
            for source, points in r.series.by_source.items():
                for i, n in enumerate(points):
                    if n:
                        merged.add(source, n, r.series.start + (i + 0.5) * r.series.step)
    return {
        "id": records[0].id,
        "repository": next((r.repository for r in records if r.repository), None),
        "started": round(start, 4),
        "ended": None if running else round(end, 4),
        "seconds": round(end - start, 3),
        "blobs": len(records),
        "size": sum(r.size for r in records),
        "bytes_by_source": by_source,
        "ok": None if running else all(r.ok for r in records),
        "transfers": [r.id for r in records],
        "series": merged.to_json(),
    }
