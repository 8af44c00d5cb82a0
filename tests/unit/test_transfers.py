"""The dashboard's record of fetches stays bounded and says who delivered what."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pimg.fetch.transfers import KEPT, Series, TransferLog


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 1 << 20), st.floats(0, 10_000)), max_size=300)
)
def test_a_series_keeps_every_byte_in_a_bounded_number_of_points(
    events: list[tuple[str, int, float]],
) -> None:
    series = Series(start=0.0)
    for source, n, t in sorted(events, key=lambda e: e[2]):
        series.add(source, n, t)
    doc = series.to_json()
    by_source = doc["by_source"]
    assert isinstance(by_source, dict)
    for source in "abc":
        assert sum(by_source.get(source, [])) == sum(n for s, n, _ in events if s == source)
    assert all(len(points) <= 240 for points in by_source.values())
    assert len({len(p) for p in by_source.values()}) <= 1  # one time axis for all sources


def test_a_record_maps_chunks_to_their_sources_and_ends_in_the_finished_list() -> None:
    log = TransferLog()
    record = log.begin("sha256:" + "0" * 64, 5 << 20, 1 << 20, bytes([1, 0, 0, 0, 0]), now=10.0)
    record.chunk(1, "origin file:///o", 1 << 20, 10.1)
    record.chunk(2, "peer http://10.0.0.2:5051", 1 << 20, 10.2)
    record.chunk(3, "origin file:///o", 1 << 20, 10.3)
    doc = record.to_json(10.3, coming=bytes([0, 0, 0, 0, 1]))
    assert doc["map"] == "*010~" and doc["have"] == 4
    assert doc["sources"] == ["origin file:///o", "peer http://10.0.0.2:5051"]
    assert doc["bytes_by_source"] == {"origin file:///o": 2 << 20, "peer http://10.0.0.2:5051": 1 << 20}
    assert doc["rate"] > 0
    record.restart()  # a second round: what was received is fetched again
    assert record.to_json(10.4)["map"] == "....."
    log.end(record, 11.0, "wrong digest")
    assert not log.active and log.finished[0].ok is False and log.finished[0].error == "wrong digest"
    assert record.rate(12.0) == 0.0


def test_only_the_last_finished_fetches_are_kept() -> None:
    log = TransferLog()
    for i in range(KEPT + 20):
        log.end(log.begin(f"sha256:{i:064x}", 1, 1 << 20, b"\0", now=float(i)), float(i), None)
    assert len(log.finished) == KEPT and log.finished[0].digest == f"sha256:{KEPT + 19:064x}"
