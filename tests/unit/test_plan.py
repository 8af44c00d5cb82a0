"""Unit tests for p2pimg.fetch.plan: grouping missing chunks into spans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pimg.content.model import SEGMENT_SIZE
from p2pimg.fetch.plan import Span, plan_spans

MIB = 1 << 20

chunk_sizes = st.sampled_from([1 << k for k in range(12, 27)])


@st.composite
def plans(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    chunk_size = draw(chunk_sizes)
    max_span = draw(
        st.integers(0, 3 * chunk_size)
        | st.integers(0, 256 * MIB)
        | st.sampled_from([chunk_size, 2 * chunk_size])
    )
    segment_size = draw(
        st.sampled_from([SEGMENT_SIZE, chunk_size, 2 * chunk_size, 8 * chunk_size])
        | st.integers(1, 128 * MIB)
    )
    limit = draw(st.sampled_from([16, 200, 2000]))
    missing = sorted(draw(st.sets(st.integers(0, limit), max_size=300)))
    return missing, chunk_size, max_span, segment_size


@given(plan=plans())
def test_spans_cover_exactly_the_missing_chunks(plan: tuple[list[int], int, int, int]) -> None:
    missing, chunk_size, max_span, segment_size = plan
    spans = plan_spans(missing, chunk_size, max_span=max_span, segment_size=segment_size)
    per_span = max(1, max_span // chunk_size)
    per_segment = max(1, segment_size // chunk_size)

    covered = [i for s in spans for i in range(s.first, s.end)]
    assert covered == missing  # in order, disjoint, and exactly the missing set
    for s in spans:
        assert isinstance(s, Span)
        assert s.first < s.end
        assert len(s) == s.end - s.first <= per_span
        # no span crosses a segment boundary
        assert s.first // per_segment == (s.end - 1) // per_segment
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.end <= b.first
        assert a < b


@given(plan=plans())
def test_spans_are_maximal(plan: tuple[list[int], int, int, int]) -> None:
    """Two neighbouring spans are split only for a reason: a gap, the span cap or a segment."""
    missing, chunk_size, max_span, segment_size = plan
    spans = plan_spans(missing, chunk_size, max_span=max_span, segment_size=segment_size)
    per_span = max(1, max_span // chunk_size)
    per_segment = max(1, segment_size // chunk_size)
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.end != b.first or len(a) == per_span or b.first % per_segment == 0


@given(plan=plans())
def test_accepts_any_iterable(plan: tuple[list[int], int, int, int]) -> None:
    missing, chunk_size, max_span, segment_size = plan
    expected = plan_spans(missing, chunk_size, max_span=max_span, segment_size=segment_size)
    assert plan_spans(iter(missing), chunk_size, max_span=max_span, segment_size=segment_size) == expected
    assert plan_spans(tuple(missing), chunk_size, max_span=max_span, segment_size=segment_size) == expected


def test_no_missing_chunks_no_spans() -> None:
    assert plan_spans([], MIB, max_span=8 * MIB, segment_size=SEGMENT_SIZE) == []


def test_example_plan() -> None:
    missing = [0, 1, 2, 5, 6, 62, 63, 64, 65, 100]
    spans = plan_spans(missing, MIB, max_span=2 * MIB, segment_size=SEGMENT_SIZE)
    assert spans == [Span(0, 2), Span(2, 3), Span(5, 7), Span(62, 64), Span(64, 66), Span(100, 101)]


def test_segment_boundary_splits_a_run() -> None:
    spans = plan_spans(range(60, 70), MIB, max_span=256 * MIB, segment_size=SEGMENT_SIZE)
    assert spans == [Span(60, 64), Span(64, 70)]


def test_max_span_below_chunk_size_gives_single_chunks() -> None:
    spans = plan_spans([3, 4, 5], 4 * MIB, max_span=MIB, segment_size=SEGMENT_SIZE)
    assert spans == [Span(3, 4), Span(4, 5), Span(5, 6)]


def test_single_chunk_at_segment_start() -> None:
    assert plan_spans([16], 4 * MIB, max_span=64 * MIB, segment_size=SEGMENT_SIZE) == [Span(16, 17)]


@pytest.mark.parametrize(
    ("span", "size", "chunk_size", "expected"),
    [
        (Span(0, 1), 10 * MIB, MIB, (0, MIB)),
        (Span(2, 4), 10 * MIB, MIB, (2 * MIB, 4 * MIB)),
        (Span(9, 10), 10 * MIB - 5, MIB, (9 * MIB, 10 * MIB - 5)),  # last chunk is short
        (Span(0, 3), 2 * 4096 + 1, 4096, (0, 2 * 4096 + 1)),
    ],
)
def test_byte_range(span: Span, size: int, chunk_size: int, expected: tuple[int, int]) -> None:
    assert span.byte_range(size, chunk_size) == expected


def test_span_len_and_order() -> None:
    assert len(Span(3, 7)) == 4
    assert Span(1, 2) < Span(2, 3)
    assert sorted([Span(5, 6), Span(0, 2)]) == [Span(0, 2), Span(5, 6)]
