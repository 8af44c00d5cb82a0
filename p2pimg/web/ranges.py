"""HTTP byte ranges (RFC 9110 §14) for blob requests: one range per request (sans I/O)."""

from __future__ import annotations

import re

from p2pimg.errors import RangeInvalid, RangeNotSatisfiable

_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE | re.ASCII)
_MAX_HEADER = 200


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range [start, end) a Range header asks of a `size`-byte blob, or None for all.

    Malformed byte ranges raise RangeInvalid; well-formed ones that select nothing in the blob
    raise RangeNotSatisfiable. A range in a unit other than bytes is ignored, as RFC 9110
    requires, and so is a request for several ranges (None: the whole body, with 200), which
    RFC 9110 allows a server that does not send multipart responses.
    """
    if header is None:
        return None
    text = header.strip()
    if len(text) > _MAX_HEADER:
        raise RangeInvalid("Range header too long")
    unit = text.partition("=")[0].strip().lower()
    if unit != "bytes" and re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", unit):
        return None
    if "," in text:
        return None
    m = _RANGE_RE.fullmatch(text)
    if m is None:
        raise RangeInvalid(f"malformed Range header {text[:60]!r}: expected bytes=START-[END]")
    first, last = m.group(1), m.group(2)
    if not first and not last:
        raise RangeInvalid("malformed Range header: empty range")
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range of {suffix} bytes selects nothing", size=size)
        return max(0, size - suffix), size
    start = int(first)
    if last:
        end_inclusive = int(last)
        if end_inclusive < start:
            raise RangeInvalid(f"malformed Range header: end {end_inclusive} before start {start}")
        end = min(end_inclusive + 1, size)
    else:
        end = size
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, blob has {size} bytes", size=size)
    return start, end


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end - 1}/{size}"
