"""Fuzz target: HTTP Range headers against blobs of assorted sizes."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path

from p2pimg.web import ranges

SEEDS = [
    b"bytes=0-",
    b"bytes=0-99",
    b"bytes=-5",
    b"BYTES = 10-20",
    b"items=1-2",
    b"bytes=1-2,3-4",
    b"bytes=99999999999999999999-",
]
SIZES = [0, 1, 100, 1 << 20, (1 << 63) + 7]


def test_one_input(data: bytes) -> None:
    header = _harness.text(_harness.seeded(data, SEEDS))
    for size in SIZES:
        rng = _harness.allowed(ranges.parse_range, header, size)
        if rng is not None:
            start, end = rng
            assert 0 <= start < end <= size, (header, size, rng)
            ranges.content_range(start, end, size)


if __name__ == "__main__":
    _harness.main(test_one_input)
