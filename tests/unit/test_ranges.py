"""Unit tests for p2pimg.web.ranges: single byte ranges (RFC 9110 §14.1.2) and Content-Range."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from p2pimg.errors import RangeInvalid, RangeNotSatisfiable
from p2pimg.web.ranges import content_range, parse_range

MAX_POS = 10**19 - 1  # positions the hypothesis tests use; larger numerals are tested explicitly

INVALID = "invalid"
UNSATISFIABLE = "unsatisfiable"


def reference(first: int | None, last: int | None, size: int) -> tuple[int, int] | str:
    """RFC 9110 §14.1.2 for one range-spec of unit `bytes`, as [start, end) or an outcome.

    int-range  = first-pos "-" [ last-pos ]: invalid if last-pos < first-pos; satisfiable iff
                 first-pos < length; a last-pos at or past the end means "to the end".
    suffix-range = "-" suffix-length: the last suffix-length bytes (all of them if the
                 representation is shorter); a zero suffix-length is unsatisfiable.
    """
    if first is None:
        assert last is not None
        if last == 0:
            return UNSATISFIABLE
        return max(0, size - last), size
    if last is not None and last < first:
        return INVALID
    if first >= size:
        return UNSATISFIABLE
    end = size if last is None else min(last, size - 1) + 1
    return first, end


def header_for(first: int | None, last: int | None) -> str:
    return f"bytes={'' if first is None else first}-{'' if last is None else last}"


def outcome(header: str, size: int) -> tuple[int, int] | str | None:
    try:
        return parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.size == size
        assert exc.http_status == 416
        return UNSATISFIABLE
    except RangeInvalid as exc:
        assert exc.http_status == 400
        return INVALID


sizes = st.integers(0, 64) | st.integers(0, 10**7) | st.integers(0, 10**18)


@st.composite
def position_near(draw: st.DrawFn, size: int) -> int:
    return draw(
        st.integers(0, 3)
        | st.integers(max(0, size - 3), size + 3)
        | st.integers(0, max(0, size * 2))
        | st.integers(0, MAX_POS)
    )


@given(data=st.data(), size=sizes, form=st.sampled_from(["int-range", "open", "suffix"]))
def test_parse_range_matches_rfc_reference(data: st.DataObject, size: int, form: str) -> None:
    first: int | None = None
    last: int | None = None
    if form in ("int-range", "open"):
        first = min(data.draw(position_near(size)), MAX_POS)
    if form in ("int-range", "suffix"):
        last = min(data.draw(position_near(size)), MAX_POS)
    # A suffix range of an empty representation is "satisfiable" by the letter of RFC 9110 but
    # selects nothing; servers may ignore the header there (not asserted here).
    assume(not (form == "suffix" and size == 0 and last))
    expected = reference(first, last, size)
    assert outcome(header_for(first, last), size) == expected


@given(data=st.data(), size=sizes)
def test_satisfiable_ranges_lie_inside_the_blob(data: st.DataObject, size: int) -> None:
    first = data.draw(st.none() | position_near(size))
    last = data.draw(position_near(size)) if first is None else data.draw(st.none() | position_near(size))
    result = outcome(header_for(first, last), size)
    if isinstance(result, tuple):
        start, end = result
        assert 0 <= start < end <= size
        text = content_range(start, end, size)
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", text)
        assert m is not None
        assert (int(m.group(1)), int(m.group(2)) + 1, int(m.group(3))) == (start, end, size)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 5, (0, 1)),
        ("bytes=0-4", 5, (0, 5)),
        ("bytes=0-100", 5, (0, 5)),
        ("bytes=2-3", 5, (2, 4)),
        ("bytes=4-4", 5, (4, 5)),
        ("bytes=4-", 5, (4, 5)),
        ("bytes=0-", 5, (0, 5)),
        ("bytes=-1", 5, (4, 5)),
        ("bytes=-5", 5, (0, 5)),
        ("bytes=-6", 5, (0, 5)),  # suffix larger than the blob: the whole blob
        ("bytes=-1000000", 5, (0, 5)),
        ("bytes=0-0", 1, (0, 1)),
        ("bytes=00-01", 5, (0, 2)),  # leading zeros are still 1*DIGIT
        ("bytes=9999999999999999999-", 10**19, (9999999999999999999, 10**19)),
        ("  bytes=1-2  ", 5, (1, 3)),
        ("bytes=1-2\r\n", 5, (1, 3)),
    ],
)
def test_parse_range_explicit(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == expected


def test_no_header_means_everything() -> None:
    assert parse_range(None, 5) is None
    assert parse_range(None, 0) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=5-", 5),
        ("bytes=5-5", 5),
        ("bytes=6-10", 5),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-0", 5),  # zero suffix length selects nothing
        ("bytes=-0", 0),
        ("bytes=9999999999999999999-", 5),
    ],
)
def test_parse_range_not_satisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.size == size


@pytest.mark.parametrize("header", ["bytes=0-1,2-3", "bytes=0-0,-1", "bytes=0-1, 3-4", "bytes=9-9,0-0"])
def test_several_ranges_are_ignored(header: str) -> None:
    """p2pimg sends no multipart responses: per RFC 9110 it ignores the Range header then and
    sends the whole body with 200 (a 416 would tell the client the ranges cannot be met)."""
    assert parse_range(header, 5) is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        "bytes",
        "bytes=",
        "bytes=-",
        "bytes=a-b",
        "bytes=1-a",
        "bytes=a-1",
        "bytes=1",
        "bytes=1--2",
        "bytes=--1",
        "bytes=+1-2",
        "bytes=-1-2",
        "bytes=1-2-3",
        "bytes=0x1-2",
        "bytes=1.0-2",
        "bytes =1-2",
        "bytes:1-2",
        "bytes=1 -2",
        "bytes=3-2",  # last-pos before first-pos
        "bytes=10-0",
        "=1-2",
    ],
)
def test_parse_range_invalid(header: str) -> None:
    with pytest.raises(RangeInvalid):
        parse_range(header, 100)


def test_end_before_start_is_invalid_even_when_past_the_end() -> None:
    with pytest.raises(RangeInvalid):
        parse_range("bytes=50-40", 10)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-" + "1" * 5000,  # would hit int()'s digit limit if parsed naively
        "bytes=" + "1" * 5000 + "-",
        "bytes=-" + "1" * 5000,
        "bytes=" + "0-1," * 100,
        "x" * 100_000,
    ],
)
def test_very_long_header_is_refused(header: str) -> None:
    # Refusing a field value too large to process with a 4xx is allowed by RFC 9110 §5.4.
    with pytest.raises(RangeInvalid):
        parse_range(header, 100)


@pytest.mark.parametrize(
    ("start", "end", "size", "text"),
    [
        (0, 1, 5, "bytes 0-0/5"),
        (4, 5, 5, "bytes 4-4/5"),
        (0, 5, 5, "bytes 0-4/5"),
        (10, 20, 1000, "bytes 10-19/1000"),
        (0, 10**18, 10**18, f"bytes 0-{10**18 - 1}/{10**18}"),
    ],
)
def test_content_range(start: int, end: int, size: int, text: str) -> None:
    assert content_range(start, end, size) == text


def test_content_range_of_parsed_suffix() -> None:
    rng = parse_range("bytes=-1", 5)
    assert rng is not None
    assert content_range(*rng, 5) == "bytes 4-4/5"


# --- RFC 9110 conformance beyond the single-range arithmetic --------------------------------------------


def test_unknown_range_unit_is_ignored() -> None:
    # RFC 9110 §14.2: "An origin server MUST ignore a Range header field that contains a range
    # unit it does not understand." Ignoring means serving the whole blob (None), not a 400.
    assert parse_range("items=0-1", 10) is None


def test_range_unit_is_case_insensitive() -> None:
    # RFC 9110 §14.1: "All range unit names are case-insensitive".
    assert parse_range("Bytes=0-0", 10) == (0, 1)
    assert parse_range("BYTES=-1", 10) == (9, 10)


def test_large_numerals_are_understood() -> None:
    # RFC 9110 §14.1.1: "recipients MUST anticipate potentially large decimal numerals and prevent
    # parsing errors due to integer conversion overflows". These headers are short and valid.
    big = "9" * 20
    results = {
        f"bytes=0-{big}": outcome(f"bytes=0-{big}", 10),
        f"bytes=5-{10**19}": outcome(f"bytes=5-{10**19}", 10),
        f"bytes=-{big}": outcome(f"bytes=-{big}", 10),
        f"bytes={big}-": outcome(f"bytes={big}-", 10),
        f"bytes={big}-{big}9": outcome(f"bytes={big}-{big}9", 10),
    }
    assert results == {
        f"bytes=0-{big}": (0, 10),
        f"bytes=5-{10**19}": (5, 10),
        f"bytes=-{big}": (0, 10),
        f"bytes={big}-": UNSATISFIABLE,
        f"bytes={big}-{big}9": UNSATISFIABLE,
    }


def test_only_ascii_digits_are_digits() -> None:
    # DIGIT is %x30-39 (RFC 5234); `\d` and int() also accept other Unicode decimal digits.
    headers = ["bytes=\u0661-\u0662", "bytes=\uff10-\uff11", "bytes=-\u0967"]
    assert {h: outcome(h, 10) for h in headers} == {h: INVALID for h in headers}
