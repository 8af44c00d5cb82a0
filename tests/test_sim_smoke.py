"""Smoke test of the swarm simulator (`python -m bench.sim`): small swarms, a second or so each.

The large runs (1,000 nodes, 1 GB) are benchmarks: see docs/bench/sim/ and the README."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench.sim.cli import KEYS, main
from bench.sim.net import Network

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def simulate(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "sim.json"
    assert main(["--json", str(out), *args]) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_fifty_nodes_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    argv = [sys.executable, "-m", "bench.sim", "--nodes", "50", "--image-mb", "64", "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "origin egress" in run.stdout
    result = json.loads(out.read_text())
    assert set(KEYS) <= result.keys()
    assert result["nodes"] == 50 and result["image_bytes"] == 64 * MB
    assert result["wrong_chunks_accepted"] == 0
    assert result["unfinished"] == 0 and len(result["done_times_s"]) == 50
    # The origin sends the image about once, not once per node (the membership split).
    assert 0.99 <= result["origin_egress_ratio"] <= 1.5
    assert result["single_node_s"] > 0 and result["wall_s"] > 0
    assert 1.0 <= result["p50_done_ratio"] <= result["p99_done_ratio"] <= result["max_done_ratio"] < 10
    assert result["upload_max_over_mean"] >= 1.0
    svg = ET.parse(tmp_path / "sim.svg").getroot()
    assert svg.tag.endswith("svg") and svg.find("{http://www.w3.org/2000/svg}polyline") is not None


def test_hostile_nodes_and_churn(tmp_path: Path) -> None:
    result = simulate(tmp_path, "--nodes", "50", "--image-mb", "64", "--hostile", "0.1", "--churn", "0.1")
    assert result["hostile_nodes"] == 5 and result["left"] == 5 and result["joined_late"] == 5
    assert result["bad_chunks_rejected"] > 0, "the forgers were asked, and caught"
    assert result["wrong_chunks_accepted"] == 0
    assert result["unfinished"] == 0
    assert result["serve_misses"] == 0, "an honest peer was asked for a chunk it did not hold"
    assert result["origin_egress_ratio"] < 3


def test_wrong_chunks_are_counted_when_nothing_checks_them(tmp_path: Path) -> None:
    """The check behind wrong_chunks_accepted == 0 is real: skip verification and forged
    chunks from the hostile nodes end up in the honest nodes' caches."""
    result = simulate(tmp_path, "--nodes", "50", "--image-mb", "64", "--hostile", "0.1", "--skip-verify")
    assert result["wrong_chunks_accepted"] > 0


def test_membership_keeps_origin_egress_near_one_where_views_alone_do_not(tmp_path: Path) -> None:
    small_views = ["--nodes", "120", "--image-mb", "32", "--peers-per-node", "8"]
    members = simulate(tmp_path, *small_views)
    views = simulate(tmp_path, *small_views, "--view-only")
    assert members["origin_egress_ratio"] < 1.2
    assert views["origin_egress_ratio"] > 3 * members["origin_egress_ratio"]


def test_same_seed_same_run(tmp_path: Path) -> None:
    args = ["--nodes", "30", "--image-mb", "32", "--churn", "0.1", "--hostile", "0.1", "--seed", "7"]
    first, second = simulate(tmp_path, *args), simulate(tmp_path, *args)
    for key in ("done_times_s", "origin_egress_ratio", "polls", "events", "requests"):
        assert first[key] == second[key], key


def test_flows_share_links_without_exceeding_them() -> None:
    # Endpoint 0 sends (100 B/s up); 1 and 2 receive (1: 10 B/s down, 2: 1000 B/s down).
    net = Network([100.0, 0.0, 0.0], [0.0, 10.0, 1000.0])
    slow, fast = net.open(0, 1, 1e9, float("inf")), net.open(0, 2, 1e9, float("inf"))
    net.start(slow)
    net.start(fast)
    idx, rate = net.rates()
    by_slot = dict(zip(idx.tolist(), rate.tolist(), strict=True))
    assert by_slot[slow] == pytest.approx(10.0), "held back by its receiver"
    assert by_slot[fast] == pytest.approx(90.0), "takes what the slow one leaves of the uplink"
    capped = net.open(0, 2, 1e9, 5.0)
    net.start(capped)
    idx, rate = net.rates()
    assert dict(zip(idx.tolist(), rate.tolist(), strict=True))[capped] == pytest.approx(5.0)
    assert float(rate.sum()) <= 100.0 + 1e-6
    net.advance(1.0)
    assert float(net.sent[0]) == pytest.approx(100.0)


def test_mirror_checks_whole_blobs_and_fetches_wrong_ones_again(tmp_path: Path) -> None:
    """--mirror: no chunk CIDs, a blob is checked by its digest once whole; until then a node
    shares only what it fetched from the upstream itself. Forged chunks are taken unchecked, so
    every blob they reach fails its digest and is fetched again whole from the upstream alone;
    none is accepted, and their senders are banned."""
    small = ["--nodes", "50", "--image-mb", "64", "--mirror"]
    plain = simulate(tmp_path, *small)
    assert plain["params"]["mirror"] and plain["wrong_blobs_accepted"] == 0
    assert plain["unfinished"] == 0
    assert plain["serve_misses"] == 0, "a peer was asked for what it may not send"
    assert plain["mirror"]["digest_failures"] == 0
    # Peers carry most of the image: far from one copy per node (50), above one copy.
    assert 0.99 <= plain["origin_egress_ratio"] <= 5
    assert plain["received_bytes"]["peer"] > 5 * plain["received_bytes"]["upstream"]

    hostile = simulate(tmp_path, *small, "--hostile", "0.1")
    m = hostile["mirror"]
    assert hostile["wrong_blobs_accepted"] == 0 and hostile["wrong_chunks_accepted"] == 0
    assert hostile["unfinished"] == 0
    assert m["unchecked_bad_chunks_taken"] > 0 and m["digest_failures"] > 0 and m["peers_banned"] > 0
    assert hostile["bad_chunks_rejected"] == 0, "no chunk is checked on its own in mirror mode"
    # Each blob that failed its digest was fetched again, whole, from the upstream alone.
    size = hostile["image_bytes"]
    assert m["digest_failures"] * size <= hostile["origin_bytes"] <= (m["digest_failures"] + 5) * size

    unchecked = simulate(tmp_path, *small, "--hostile", "0.1", "--skip-verify")
    assert unchecked["wrong_blobs_accepted"] > 0, "the digest check is what keeps forged blobs out"
    assert unchecked["mirror"]["digest_failures"] == 0
