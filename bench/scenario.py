"""What a benchmark scenario is: a function of a Context that returns measured rows.

Every row carries p2pimg's figures and a baseline's, measured in the same run (these machines are
shared and noisy), and the physical bound where one exists. The runner (`python -m bench`) turns
the repeated figures into median, p10 and p90 and the ratio p2pimg / baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measure:
    """One scenario x client row: repeated figures of p2pimg and of its baseline."""

    scenario: str  # e.g. "warm-pull", "cold-pull", "lan-swarm", "overheads"
    client: str  # e.g. "skopeo", "ctr", "p2pimg warm --lan", "sha256"
    metric: str  # what the numbers are, e.g. "pull time", "origin egress / image size"
    unit: str  # "s", "MB/s", "x", "ms", "MiB"
    p2pimg: list[float]
    baseline: list[float]
    baseline_name: str  # what the baseline is, e.g. "docker-registry", "single sequential stream"
    bound: float | None = None  # the physical limit in the same unit, where one exists
    lower_is_better: bool = True
    details: dict[str, object] = field(default_factory=dict)


@dataclass
class Skipped:
    scenario: str
    reason: str


@dataclass
class Context:
    workdir: Path  # a fresh directory the scenario may fill; removed after the run
    quick: bool  # --quick (a few minutes on 2 cores) or --full (Spegel's matrix)
    runs: int  # repetitions per figure
    progress: Callable[[str], None]  # one line of what is running now


Scenario = Callable[[Context], list[Measure | Skipped]]
