"""Smoke test of `python -m bench`: statistics, scenario planning and the report, in seconds.

The warm-pull scenario runs for real (docker-registry, p2pimg serve, skopeo) on a tiny image
(P2PIMG_BENCH_TINY) with one run; the report is then written from its rows and checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import runner
from bench.runner import Entry, percentile, ratio, run_scenarios, spread, summarize, write_results
from bench.scenario import Context, Measure, Skipped
from bench.scenarios import TINY_ENV, image_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECORD_KEYS = {
    "scenario", "client", "metric", "unit", "baseline_name", "p2pimg", "baseline", "ratio", "bound",
    "p2pimg_median", "p2pimg_p10", "p2pimg_p90", "baseline_median", "baseline_p10", "baseline_p90",
}  # fmt: skip
META = {"command": "python -m bench --quick", "mode": "quick", "runs": 1, "machine": runner.machine_info()}


def ctx(tmp_path: Path, runs: int = 1) -> Context:
    return Context(workdir=tmp_path, quick=True, runs=runs, progress=lambda _line: None)


def test_percentiles_interpolate_linearly() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0.5) == pytest.approx(2.5)
    assert percentile(values, 0.1) == pytest.approx(1.3)  # rank 0.3 between 1 and 2
    assert percentile(values, 0.9) == pytest.approx(3.7)  # rank 2.7 between 3 and 4
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile([7.0], 0.9) == 7.0
    assert spread([1.0, 2.0, 3.0]) == pytest.approx({"median": 2.0, "p10": 1.2, "p90": 2.8})
    assert spread([]) == {"median": None, "p10": None, "p90": None}
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_summarize_reports_medians_and_ratio() -> None:
    m = Measure("warm-pull", "skopeo", "pull time", "s", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0], "registry")
    r = summarize(m)
    assert r.keys() >= RECORD_KEYS
    assert (r["p2pimg"], r["baseline"]) == (2.0, 5.0)
    assert r["ratio"] == pytest.approx(0.4)
    assert r["baseline_p10"] == pytest.approx(2.6) and r["baseline_p90"] == pytest.approx(7.4)
    assert r["bound"] is None


def test_runner_records_missing_and_failing_scenarios(tmp_path: Path) -> None:
    def broken(_ctx: Context) -> list[Measure | Skipped]:
        raise RuntimeError("boom")

    def fine(c: Context) -> list[Measure | Skipped]:
        assert c.workdir.is_dir() and c.runs == 2
        return [Measure("fine", "x", "m", "s", [1.0], [2.0], "b"), Skipped("fine", "half of it")]

    found = {"broken": broken, "fine": fine}
    missing = Entry("cold-pull", "bench.scenarios.no_such_module", "cold_pull")
    outcome = run_scenarios(
        [missing, Entry("broken", "", ""), Entry("fine", "", "")],
        quick=True,
        runs=2,
        loader=lambda e: runner.load(e) if e.module else found[e.name],
    )
    reasons = {s.scenario: s.reason for s in outcome.skipped}
    assert reasons["cold-pull"] == runner.NOT_AVAILABLE
    assert reasons["broken"] == "error: RuntimeError: boom"
    assert reasons["fine"] == "half of it"
    assert [m.scenario for m in outcome.measures] == ["fine"]
    assert "RuntimeError: boom" in outcome.errors[0]


def test_only_selects_scenarios_in_order() -> None:
    args = runner.parse_args(["--only", "overheads,warm-pull"])
    assert [e.name for e in args.entries] == ["warm-pull", "overheads"] and args.quick
    assert not runner.parse_args(["--full"]).quick
    with pytest.raises(SystemExit):
        runner.parse_args(["--only", "nope"])


def check_report(out: Path, document: dict[str, Any], scenarios: set[str]) -> None:
    data = json.loads((out / "results.json").read_text())
    assert data["results"], "no records"
    for record in data["results"]:
        assert record.keys() >= RECORD_KEYS, RECORD_KEYS - record.keys()
    assert {"cpu_count", "cpu_model", "kernel", "python", "memory_mib"} <= data["machine"].keys()
    assert data["command"].startswith("python -m bench")
    assert {"scenario": "cold-pull", "reason": runner.NOT_AVAILABLE} in data["skipped"]
    md = (out / "results.md").read_text()
    assert "| Scenario | Client | Metric | p2pimg | Baseline |" in md
    assert f"| cold-pull | — | skipped: {runner.NOT_AVAILABLE} |" in md
    assert "plots_skipped" not in document, document.get("plots_skipped")  # matplotlib: the bench extra
    for scenario in scenarios:
        png = out / f"{scenario}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"
    assert str(out / "results.json") in document["files"]


def test_report_from_known_rows(tmp_path: Path) -> None:
    measures = [
        Measure("overheads", "HEAD p50", "latency", "ms", [1.0, 1.2, 1.1], [0.5, 0.6, 0.4], "registry"),
        Measure("overheads", "sha", "throughput", "MB/s", [900.0], [1000.0], "sha256", lower_is_better=False),
        Measure("lan-swarm", "warm --lan", "time", "s", [3.0, float("nan")], [9.0], "alone", bound=2.5),
    ]
    skipped = [Skipped("cold-pull", runner.NOT_AVAILABLE)]
    document = write_results(measures, skipped, tmp_path / "out", dict(META))
    check_report(tmp_path / "out", document, {"overheads", "lan-swarm"})
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| HEAD p50 | latency (ms, lower is better) | 1.10 (1.02–1.18) | 0.500 (0.420–0.580) |" in md
    assert "| lan-swarm | warm --lan | time (s, lower is better) | 3.00 | 9.00 | alone | 0.333 | 2.50 |" in md


def test_warm_pull_tiny_then_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if missing := [t for t in ("skopeo", "docker-registry") if shutil.which(t) is None]:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install skopeo docker-registry)")
    from bench.scenarios.warm import warm_pull

    monkeypatch.setenv(TINY_ENV, "1")
    work = tmp_path / "work"
    work.mkdir()
    c = ctx(work)
    assert [s.total for s in image_matrix(c)] == [200_000]
    rows = warm_pull(c, clients=("skopeo",))
    measures = [r for r in rows if isinstance(r, Measure)]
    assert [m.client for m in measures] == ["skopeo, 200 kB in 2 layers"], rows
    (m,) = measures
    assert len(m.p2pimg) == len(m.baseline) == 1 and min(m.p2pimg + m.baseline) > 0
    out = tmp_path / "out"
    document = write_results(measures, [Skipped("cold-pull", runner.NOT_AVAILABLE)], out, dict(META))
    check_report(out, document, {"warm-pull"})


def test_soak_tiny_then_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak scenario at toy size: both servers watched under the mixed load, every ordinary
    GET correct, and the over-time plot drawn."""
    if missing := [t for t in ("skopeo", "docker-registry") if shutil.which(t) is None]:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install skopeo docker-registry)")
    from bench.scenarios.soak import soak

    monkeypatch.setenv(TINY_ENV, "1")
    work = tmp_path / "work"
    work.mkdir()
    rows = soak(ctx(work))
    measures = [r for r in rows if isinstance(r, Measure)]
    assert len(measures) == 6, rows
    details = measures[0].details
    for side in ("p2pimg", "baseline"):
        clients = details["clients"][side]  # type: ignore[index]
        assert clients["normal_ok"] >= 1 and clients["normal_failed"] == 0, clients
        assert clients["vanished"] >= 1 and clients["slow_ready"] == clients["slow"], clients
        assert len(details["series"][side]["fds"]) >= 3  # type: ignore[index]
    out = tmp_path / "out"
    document = write_results(measures, [Skipped("cold-pull", runner.NOT_AVAILABLE)], out, dict(META))
    check_report(out, document, {"soak"})
    assert (out / "soak-over-time.png").read_bytes()[:8] == PNG_MAGIC


def test_mirror_metrics_are_parsed_by_source() -> None:
    from bench.scenarios.mirror import parse_sources

    page = (
        "# HELP p2pimg_source_bytes_total Verified bytes received, by kind of source\n"
        "# TYPE p2pimg_source_bytes_total counter\n"
        'p2pimg_source_bytes_total{source="origin"} 0.0\n'
        'p2pimg_source_bytes_total{source="peer"} 7.5e+07\n'
        'p2pimg_source_bytes_total{source="upstream"} 2.5e+07\n'
        'p2pimg_verify_failures_total{source="peer"} 1.0\n'
        "p2pimg_served_bytes_total 1.0e+08\n"
    )
    assert parse_sources(page) == {
        "p2pimg_source_bytes_total": {"origin": 0.0, "peer": 75e6, "upstream": 25e6},
        "p2pimg_verify_failures_total": {"peer": 1.0},
    }
    assert [e.name for e in runner.parse_args(["--only", "lan-swarm-mirror"]).entries] == ["lan-swarm-mirror"]


def test_mirror_upstream_spans_count_chunks_fetched_twice() -> None:
    """From the nodes' timelines: which chunks more than one node kept from the upstream, and
    whether each later fetch overlapped the first or came after it had ended."""
    from bench.scenarios.mirror import upstream_spans

    def span(source: str, chunks: tuple[int, int], nbytes: int, start: float, end: float, **kw: Any) -> Any:
        return {"what": "span", "source": source, "blob": "b", "chunks": list(chunks), "bytes": nbytes,
                "start": start, "end": end, "hedge": False, "outcome": "ok", **kw}  # fmt: skip

    up, peer, origin, mib = (
        "upstream http://10.0.0.201:5000",
        "peer http://10.0.0.2:5051",
        "origin file:///o",
        1 << 20,
    )
    got = upstream_spans(
        {
            "h0": [span(up, (0, 2), 2 * mib, 10.0, 11.0), span(peer, (2, 4), 2 * mib, 10, 10.5)],
            "h1": [
                span(up, (0, 2), 2 * mib, 10.5, 12.0),
                span(up, (2, 4), mib, 12, 13, hedge=True, outcome="cancelled"),
            ],
            "h2": [span(up, (1, 2), mib, 11.5, 12.0), span(origin, (0, 1), 0, 10, 10.1, outcome="error")],
        }
    )
    kinds = {"upstream": {"ok": 3, "cancelled": 1}, "peer": {"ok": 1}, "origin": {"error": 1}}
    assert got["spans_by_kind"] == kinds
    assert got["chunk_bytes"] == mib and got["upstream_hedges"] == 1
    assert got["chunks_kept_more_than_once"] == 2 and got["extra_chunk_fetches"] == 3
    assert (got["extra_while_fetched_elsewhere"], got["extra_after_held_elsewhere"]) == (2, 1)
    assert got["extra_fetches"][-1] == [1.5, 1.0, False, "h2"]


def test_lan_swarm_mirror_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mirror swarm at toy size (4 namespaces, a 200 kB image, one run, a few seconds): both
    rounds pull the image on every node, the upstream's egress is counted and every node's
    counters by source are recorded. Its figures are not checked against the targets here."""
    from bench.scenarios.mirror import SCENARIO, lan_swarm_mirror
    from bench.shaped import unavailable

    if reason := unavailable("skopeo", "docker-registry", "curl"):
        pytest.skip(reason)
    monkeypatch.setenv(TINY_ENV, "1")
    work = tmp_path / "work"
    work.mkdir()
    rows = lan_swarm_mirror(ctx(work))
    measures = [r for r in rows if isinstance(r, Measure)]
    assert [m.metric.split(" (")[0] for m in measures] == [
        "time to first done",
        "time to all done",
        "per-node pull time",
        "upstream egress / image size",
    ], rows
    assert all(m.scenario == SCENARIO for m in measures)
    times, egress = measures[1], measures[3]
    assert len(times.p2pimg) == len(times.baseline) == 1 and min(times.p2pimg + times.baseline) > 0
    # Four direct pulls take four copies; the mirrors take at least one and at most four.
    assert 3.9 <= egress.baseline[0] <= 4.1
    assert 0.9 <= egress.p2pimg[0] <= 4.1
    (nodes,) = egress.details["source_bytes"]  # type: ignore[misc]
    assert [n["node"] for n in nodes] == ["h0", "h1", "h2", "h3"]
    for n in nodes:  # every node received each blob once, from the upstream or a peer
        assert n["upstream"] + n["peer"] >= 0.99 * 200_000, n
    out = tmp_path / "out"
    document = write_results(measures, [Skipped("cold-pull", runner.NOT_AVAILABLE)], out, dict(META))
    check_report(out, document, {SCENARIO})


def test_cpu_seconds_reads_proc_stat() -> None:
    import os

    from bench.procs import cpu_seconds

    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(200_000))
    assert cpu_seconds(os.getpid()) >= before >= 0


def test_warm_blob_get_tiny_then_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """curl's warm-pull rows at toy size: a blob GET from each server, throughput and the
    server's CPU per GB, both with docker-registry as the baseline; and the throughput against a
    bare server sending it from memory (the ceiling)."""
    if missing := [t for t in ("skopeo", "docker-registry", "curl") if shutil.which(t) is None]:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install skopeo docker-registry curl)")
    from bench.scenarios.warm import BASELINE, warm_pull

    monkeypatch.setenv(TINY_ENV, "1")
    work = tmp_path / "work"
    work.mkdir()
    rows = warm_pull(ctx(work), clients=("curl",))
    measures = [r for r in rows if isinstance(r, Measure)]
    assert [(m.metric, m.unit) for m in measures] == [
        ("blob GET throughput, blob in p2pimg's cache", "MB/s"),
        ("server CPU seconds per GB served (utime + stime)", "s/GB"),
        ("blob GET throughput against this machine's ceiling, blob in p2pimg's cache", "MB/s"),
    ], rows
    speed, cpu, ceiling = measures
    assert not speed.lower_is_better and cpu.lower_is_better and not ceiling.lower_is_better
    assert {speed.baseline_name, cpu.baseline_name} == {BASELINE}
    assert "ceiling_server" in ceiling.baseline_name and ceiling.p2pimg == speed.p2pimg
    assert len(speed.p2pimg) == len(speed.baseline) == 1 and min(speed.p2pimg + speed.baseline) > 0
    assert len(ceiling.baseline) == 1 and ceiling.baseline[0] > 0
    assert min(cpu.p2pimg + cpu.baseline) >= 0  # CPU time comes in clock ticks: a toy GET may take none
    out = tmp_path / "out"
    document = write_results(measures, [Skipped("cold-pull", runner.NOT_AVAILABLE)], out, dict(META))
    check_report(out, document, {"warm-pull"})


def test_cold_s3_loopback_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cold-pull rows of one layer from moto on loopback (no namespaces), at toy size: behind
    faultproxy's per-connection cap, then uncapped, each against one sequential stream."""
    import importlib.util

    from bench.scenarios.cold import s3_loopback

    if shutil.which("curl") is None or importlib.util.find_spec("moto") is None:
        pytest.skip("curl or moto[server] missing")
    monkeypatch.setenv(TINY_ENV, "1")
    work = tmp_path / "work"
    work.mkdir()
    rows = s3_loopback(ctx(work))
    measures = [r for r in rows if isinstance(r, Measure)]
    assert [(m.client, m.unit, m.lower_is_better) for m in measures] == [
        ("GET of one layer, S3 at 8 MiB/s per connection", "MB/s", False),
        ("GET of one layer on an uncapped link", "s", True),
    ], rows
    for m in measures:
        assert len(m.p2pimg) == len(m.baseline) == 1 and min(m.p2pimg + m.baseline) > 0
        assert m.details["layer_bytes"] and m.details["p2pimg_peak_rss_mib"]
    out = tmp_path / "out"
    document = write_results(measures, [Skipped("cold-pull", runner.NOT_AVAILABLE)], out, dict(META))
    check_report(out, document, {"cold-pull"})


def test_peak_rss_has_a_1gb_layer_row_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick adds a 1 GB-layer row to the largest image's; in --full that is the largest."""
    monkeypatch.delenv(TINY_ENV, raising=False)
    from bench.scenarios import largest
    from bench.scenarios.overheads import GB_LAYER

    assert largest(ctx(Path("."))) != GB_LAYER
    full = Context(workdir=Path("."), quick=False, runs=1, progress=lambda _line: None)
    assert largest(full) == GB_LAYER


def test_peak_rss_with_many_clients_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1 GB layer's rows, on a small stand-in layer: the skopeo pull's peak RSS and that of
    clients GETting the blob at once (5 in tiny mode, 100 otherwise), each side's every GET
    complete and counted."""
    monkeypatch.setenv(TINY_ENV, "1")
    from bench.scenarios import ImageSpec, overheads

    small = ImageSpec(3 << 20, 1)
    monkeypatch.setattr(overheads, "GB_LAYER", small)
    work = tmp_path / "work"
    work.mkdir()
    rows = overheads.peak_rss_of(ctx(work), small)
    assert [(m.client, m.unit) for m in rows] == [
        (f"skopeo, cold pull of {small.label}", "MiB"),
        (f"5 x curl at once, GET of the {small.label} blob (cold in p2pimg)", "MiB"),
    ]
    many = rows[1]
    assert len(many.p2pimg) == len(many.baseline) == 1 and min(many.p2pimg + many.baseline) > 0
    took = many.details["p2pimg_seconds"]
    assert many.details["clients"] == 5 and isinstance(took, list) and len(took) == 1 and took[0] > 0
    document = write_results(rows, [Skipped("cold-pull", runner.NOT_AVAILABLE)], tmp_path / "out", dict(META))
    check_report(tmp_path / "out", document, {"overheads"})
