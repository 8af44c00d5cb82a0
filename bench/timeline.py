"""Where a pull's time went, from a node's timeline (`GET /p2pimg/v1/timeline`, see
`p2pimg.metrics.Timeline`): the client's requests, the origin round trips for metadata (tag
records, tag heads, roots, manifests, blob maps) and every span fetched from a source.

`summarize` reduces the events of one pull to the figures a regression shows up in: how long the
first span waited for metadata, how many round trips that took, how many spans there were and
what their first bytes cost, and how long no span at all was running between the first and the
last (the link idle while the pull was not over).
"""

from __future__ import annotations

import statistics
from typing import Any


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals."""
    covered, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        covered += hi - max(lo, end)
        end = hi
    return covered


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one pull (all times in seconds, relative to the first client request)."""
    clients = [e for e in events if e["what"] == "client"]
    spans = [e for e in events if e["what"] == "span"]
    meta = [e for e in events if e["what"] in ("tag", "head", "block")]
    if not clients or not spans:
        return {"events": len(events)}
    t0 = min(float(e["start"]) for e in clients)
    first_span = min(float(e["start"]) for e in spans)
    last_span = max(float(e["end"]) for e in spans)
    busy = _union([(float(e["start"]), float(e["end"])) for e in spans])
    first_bytes = [float(e["first_byte"]) for e in spans if e.get("first_byte") is not None]
    before = [e for e in meta if float(e["end"]) <= first_span]
    return {
        "first_span_after_s": round(first_span - t0, 3),
        "metadata_round_trips_before_first_span": len(before),
        "metadata_round_trips": len(meta),
        "spans": len(spans),
        "spans_by_source": {
            s: sum(1 for e in spans if e["source"] == s) for s in sorted({str(e["source"]) for e in spans})
        },
        "hedges": sum(1 for e in spans if e.get("hedge")),
        "span_first_byte_median_s": round(statistics.median(first_bytes), 4) if first_bytes else None,
        "spans_running_s": round(last_span - first_span, 3),
        "no_span_running_s": round((last_span - first_span) - busy, 3),
        "last_span_end_s": round(last_span - t0, 3),
        "client_requests": len(clients),
        # The pull itself: every span as [start, first byte, end, MB] and every client request as
        # [start, when its answer began], seconds after the first client request.
        "span_windows": [
            [
                round(float(e["start"]) - t0, 3),
                round(float(e["start"]) - t0 + float(e.get("first_byte") or 0), 3),
                round(float(e["end"]) - t0, 3),
                round(int(e["bytes"]) / 1e6, 2),
            ]
            for e in sorted(spans, key=lambda e: float(e["start"]))
        ],
        # Blob bytes read from the origin before their map was known (`sources/readahead.py`):
        # [start, end, MB taken by a span, MB dropped].
        "read_ahead_windows": [
            [
                round(float(e["start"]) - t0, 3),
                round(float(e["end"]) - t0, 3),
                round(int(e["used"]) / 1e6, 2),
                round(int(e["wasted"]) / 1e6, 2),
            ]
            for e in sorted(events, key=lambda e: float(e["start"]))
            if e["what"] == "ahead"
        ],
        "client_windows": [
            [round(float(e["start"]) - t0, 3), round(float(e["end"]) - t0, 3), str(e["request"])[:80]]
            for e in sorted(clients, key=lambda e: float(e["start"]))
        ],
    }
