"""`python -m bench`: run the benchmark scenarios, reduce their figures, write and print a report.

    python -m bench [--quick | --full] [--runs N] [--only NAME[,NAME]] [--out DIR]

Scenarios run one after another, in this order: warm pull, cold pull, LAN swarm, LAN swarm of
pull-through mirrors, overheads, soak. A scenario module missing from this build, a tool it needs
that is not installed, or an exception it raises is recorded as a skipped scenario with the
reason; the run goes on. Each figure is reduced to median, p10 and p90 over the repetitions, and
the ratio p2pimg median / baseline median. Output goes to bench/results/<timestamp>/:
results.json, results.md and one PNG per scenario; the table is printed at the end. Nothing is
installed: missing tools are named.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from .procs import tool_version
from .scenario import Context, Measure, Scenario, Skipped

RESULTS = Path(__file__).resolve().parent / "results"
NOT_AVAILABLE = "not available in this build"
QUICK_RUNS = 3
FULL_RUNS = 5


@dataclass(frozen=True)
class Entry:
    """A scenario by name, imported only when it runs (another team may not have shipped it)."""

    name: str
    module: str
    function: str


SCENARIOS = [
    Entry("warm-pull", "bench.scenarios.warm", "warm_pull"),
    Entry("cold-pull", "bench.scenarios.cold", "cold_pull"),
    Entry("lan-swarm", "bench.scenarios.swarm", "lan_swarm"),
    Entry("lan-swarm-mirror", "bench.scenarios.mirror", "lan_swarm_mirror"),
    Entry("overheads", "bench.scenarios.overheads", "overheads"),
    Entry("soak", "bench.scenarios.soak", "soak"),
]


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between closest ranks.

    The same definition as numpy's default and statistics.quantiles(method="inclusive"): with
    three runs, p10 and p90 fall between the extremes and the median rather than on them.
    """
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """median, p10 and p90 of the figures (all None when there are none).

    A NaN or infinite figure is a measurement that failed, not a number to rank: it is left out.
    """
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"median": None, "p10": None, "p90": None}
    return {"median": percentile(values, 0.5), "p10": percentile(values, 0.1), "p90": percentile(values, 0.9)}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def summarize(m: Measure) -> dict[str, Any]:
    """One results.json record: the row's identity, its statistics and its raw figures."""
    ours, theirs = spread(m.p2pimg), spread(m.baseline)
    record: dict[str, Any] = {
        "scenario": m.scenario,
        "client": m.client,
        "metric": m.metric,
        "unit": m.unit,
        "baseline_name": m.baseline_name,
        "p2pimg": ours["median"],
        "baseline": theirs["median"],
        "ratio": ratio(ours["median"], theirs["median"]),
        "bound": m.bound,
        "lower_is_better": m.lower_is_better,
    }
    for side, stats in (("p2pimg", ours), ("baseline", theirs)):
        for key, value in stats.items():
            record[f"{side}_{key}"] = value
    record["p2pimg_runs"] = list(m.p2pimg)
    record["baseline_runs"] = list(m.baseline)
    record["details"] = m.details
    return record


# -- what this machine has -------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    hint: str  # how to get it; printed, never run
    version_flag: str = "--version"


TOOLS = [
    Tool("skopeo", "apt-get install skopeo"),
    Tool("docker-registry", "apt-get install docker-registry"),
    Tool("containerd", "apt-get install containerd"),
    Tool("ctr", "apt-get install containerd"),
    Tool("moto_server", "pip install -e '.[test]' (moto[server], run as python -m moto.server)"),
    Tool("ip", "apt-get install iproute2", "-V"),
    Tool("tc", "apt-get install iproute2", "-V"),
]


def check_tools() -> dict[str, dict[str, str | None]]:
    """name -> {path, version, hint} of every external tool a scenario may need (path None: missing)."""
    found: dict[str, dict[str, str | None]] = {}
    for tool in TOOLS:
        if tool.name == "moto_server":
            # Scenarios start it as `python -m moto.server` with this interpreter, so what counts
            # is whether this venv has moto with its server's extras, not a script on PATH.
            path, version = None, None
            if _importable("moto") and _importable("flask") and _importable("flask_cors"):
                path = f"{sys.executable} -m moto.server"
                with contextlib.suppress(Exception):
                    version = importlib.metadata.version("moto")
        else:
            path = shutil.which(tool.name)
            version = tool_version(tool.name, tool.version_flag) if path else None
        found[tool.name] = {"path": path, "version": version, "hint": tool.hint}
    return found


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def machine_info() -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return None

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name") or platform.processor() or None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "memory_mib": int(mem.split()[0]) // 1024 if mem else None,
    }


# -- running -----------------------------------------------------------------------------------


def load(entry: Entry) -> Scenario | str:
    """The scenario function, or why there is none."""
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as exc:
        if exc.name == entry.module:
            return NOT_AVAILABLE
        raise  # the module is there but something it imports is not: that is an error to show
    function = getattr(module, entry.function, None)
    if not callable(function):
        return f"{NOT_AVAILABLE} ({entry.module} has no {entry.function}())"
    scenario: Scenario = function
    return scenario


@dataclass
class Outcome:
    measures: list[Measure] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # tracebacks, for errors.log
    interrupted: bool = False


class Display:
    """What is running now: a rich progress line on a terminal, timestamped lines otherwise
    (a CI log or a pipe gets a readable record instead of cursor movements)."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        # soft_wrap: a log line stays one line in a CI log instead of breaking at 80 columns.
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = self.console.is_terminal
        self.name = ""
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[scenario]}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("", total=total, scenario="")

    def __enter__(self) -> Display:
        if self.live:
            self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live:
            self.progress.stop()

    def begin(self, name: str) -> None:
        self.name = name
        self.progress.update(self.task, scenario=name, description="starting")
        if not self.live:
            self.say(f"{name}: starting")

    def line(self, text: str) -> None:
        self.progress.update(self.task, description=text)
        if not self.live:
            self.say(f"{self.name}: {text}")

    def end(self, name: str, summary: str) -> None:
        self.progress.advance(self.task)
        self.say(f"{name}: {summary}")

    def say(self, text: str) -> None:
        # console.print goes above a live progress line and keeps it intact.
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)


def run_scenarios(
    entries: Sequence[Entry],
    *,
    quick: bool,
    runs: int,
    display: Display | None = None,
    keep_workdirs: bool = False,
    loader: Callable[[Entry], Scenario | str] = load,
) -> Outcome:
    """Run each scenario in a fresh work directory; never let one scenario end the run."""
    outcome = Outcome()
    for entry in entries:
        started = time.monotonic()
        if display:
            display.begin(entry.name)
        before = (len(outcome.measures), len(outcome.skipped))
        workdir = Path(tempfile.mkdtemp(prefix=f"p2pimg-bench-{entry.name}-"))
        try:
            scenario = loader(entry)
            if isinstance(scenario, str):
                outcome.skipped.append(Skipped(entry.name, scenario))
            else:
                ctx = Context(
                    workdir=workdir,
                    quick=quick,
                    runs=runs,
                    progress=display.line if display else (lambda _text: None),
                )
                rows = scenario(ctx)
                for row in rows:
                    if isinstance(row, Measure):
                        outcome.measures.append(row)
                    elif isinstance(row, Skipped):
                        outcome.skipped.append(row)
                    else:
                        raise TypeError(f"{entry.name} returned {type(row).__name__}, not Measure or Skipped")
                if not rows:
                    outcome.skipped.append(Skipped(entry.name, "produced no figures"))
        except Exception as exc:
            outcome.skipped.append(Skipped(entry.name, f"error: {type(exc).__name__}: {exc}"))
            outcome.errors.append(f"--- {entry.name} ---\n{traceback.format_exc()}")
        except KeyboardInterrupt:
            # Ctrl-C in an hour-long --full run still leaves a report of what was measured.
            outcome.interrupted = True
            outcome.skipped.append(Skipped(entry.name, "interrupted"))
        finally:
            if keep_workdirs:
                if display:
                    display.say(f"{entry.name}: work directory kept at {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        outcome.durations[entry.name] = round(time.monotonic() - started, 1)
        if display:
            measured = len(outcome.measures) - before[0]
            skipped = [s.reason for s in outcome.skipped[before[1] :]]
            summary = f"{measured} figure{'s' if measured != 1 else ''}"
            if skipped:
                summary += "; skipped: " + "; ".join(skipped)
            display.end(entry.name, f"{summary} ({outcome.durations[entry.name]:.0f} s)")
        if outcome.interrupted:
            break
    return outcome


def write_results(
    measures: Sequence[Measure], skipped: Sequence[Skipped], out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Reduce the figures and write results.json, results.md and the plots into `out`.

    Returns the results document (with `files`: what was written).
    """
    from . import report

    document = dict(meta)
    document["results"] = [summarize(m) for m in measures]
    document["skipped"] = [{"scenario": s.scenario, "reason": s.reason} for s in skipped]
    return report.write_all(document, out)


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help="one ~100 MB image, a few minutes on 2 cores (default)",
    )
    mode.add_argument(
        "--full",
        dest="quick",
        action="store_false",
        help="Spegel's matrix: images of 10 MB, 100 MB and 1 GB in 1 and 4 layers",
    )
    parser.add_argument(
        "--runs",
        type=int,
        metavar="N",
        help=f"repetitions of every figure (default {QUICK_RUNS} quick, {FULL_RUNS} full)",
    )
    names = ", ".join(e.name for e in SCENARIOS)
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these scenarios ({names})")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="results directory (default bench/results/<timestamp>)"
    )
    parser.add_argument(
        "--keep-workdirs", action="store_true", help="keep each scenario's work directory (logs, images)"
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := [n for n in wanted if n not in {e.name for e in SCENARIOS}]:
            parser.error(f"unknown scenario {', '.join(unknown)}; known: {names}")
        args.entries = [e for e in SCENARIOS if e.name in wanted]
    else:
        args.entries = list(SCENARIOS)
    return args


def default_out() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / stamp
    n = 1
    while out.exists():  # two runs within a second must not mix their files
        n += 1
        out = RESULTS / f"{stamp}-{n}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else FULL_RUNS)
    out: Path = args.out or default_out()
    started = datetime.now(UTC)

    display = Display(len(args.entries))
    tools = check_tools()
    missing = [name for name, t in tools.items() if t["path"] is None]
    plots = _importable("matplotlib")
    for name in missing:
        display.say(f"[yellow]missing[/yellow] {name}: {tools[name]['hint']}")
    if missing:
        display.say("scenarios that need a missing tool are recorded as skipped, with the reason")
    if not plots:
        display.say("[yellow]missing[/yellow] matplotlib: pip install -e '.[bench]'; no plots this run")
    display.say(
        f"{'quick' if args.quick else 'full'} run, {runs} run{'s' if runs > 1 else ''} per figure: "
        f"{', '.join(e.name for e in args.entries)}; results into {out}"
    )

    with display:
        outcome = run_scenarios(
            args.entries, quick=args.quick, runs=runs, display=display, keep_workdirs=args.keep_workdirs
        )
    finished = datetime.now(UTC)
    meta: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "argv": argv,
        "mode": "quick" if args.quick else "full",
        "runs": runs,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds(), 1),
        "scenarios": [e.name for e in args.entries],
        "interrupted": outcome.interrupted,
        "scenario_durations_s": outcome.durations,
        "machine": machine_info(),
        "tools": {name: {"path": t["path"], "version": t["version"]} for name, t in tools.items()},
    }
    if os.environ.get("P2PIMG_BENCH_TINY", "").strip() not in ("", "0"):
        meta["tiny"] = True  # figures of toy images: not to be compared with real runs
    document = write_results(outcome.measures, outcome.skipped, out, meta)
    if outcome.errors:
        (out / "errors.log").write_text("\n".join(outcome.errors))

    from . import report

    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(report.rich_table(document))
    print(report.markdown(document))
    display.say(f"results in {out}: " + ", ".join(Path(f).name for f in document["files"]))
    if outcome.errors:
        display.say(f"tracebacks of failed scenarios: {out / 'errors.log'}")
    if outcome.interrupted:
        return 130
    return 0 if outcome.measures else 1
