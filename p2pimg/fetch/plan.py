"""Span planning: which contiguous runs of a blob's chunks to request together (sans I/O).

A request per chunk would let per-request overhead dominate; one request per blob would leave
parallelism unused. A span is a run of missing chunks, capped at `max_span` bytes, that never
crosses a segment boundary of the origin, so parallel spans land on different segments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Span:
    """Chunks [first, end) of a blob."""

    first: int
    end: int

    def __len__(self) -> int:
        return self.end - self.first

    def byte_range(self, size: int, chunk_size: int) -> tuple[int, int]:
        return self.first * chunk_size, min(self.end * chunk_size, size)


def plan_spans(missing: Iterable[int], chunk_size: int, *, max_span: int,
               segment_size: int) -> list[Span]:
    """Group missing chunk indices (ascending) into spans, in blob order."""
    per_span = max(1, max_span // chunk_size)
    per_segment = max(1, segment_size // chunk_size)
    spans: list[Span] = []
    first = prev = -1
    for i in missing:
        if first >= 0 and (i != prev + 1 or i - first >= per_span or i % per_segment == 0):
            spans.append(Span(first, prev + 1))
            first = -1
        if first < 0:
            first = i
        prev = i
    if first >= 0:
        spans.append(Span(first, prev + 1))
    return spans
