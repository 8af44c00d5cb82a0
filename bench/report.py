"""The report of a benchmark run: results.json, results.md, one PNG per scenario, a terminal table.

Everything here works from the results document the runner builds (records already reduced to
median, p10, p90 and ratio), so a report can be re-rendered from a results.json alone.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

COLUMNS = ["Scenario", "Client", "Metric", "p2pimg", "Baseline", "Baseline is", "Ratio", "Bound"]
DASH = "—"
REASON_CHARS = 300


def number(value: float | None) -> str:
    """Three significant figures without exponents: 0.0123, 1.23, 12.3, 1234."""
    if value is None or math.isnan(value):
        return DASH
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:#.3g}"  # '#' keeps trailing zeros: 0.500 beside 1.10, not 0.5


def figure(record: dict[str, Any], side: str) -> str:
    """`median (p10–p90)` of one side of a record."""
    median = record.get(f"{side}_median")
    if median is None:
        return DASH
    p10, p90 = record.get(f"{side}_p10"), record.get(f"{side}_p90")
    if p10 == p90 == median:  # a single run: no spread to show
        return number(median)
    return f"{number(median)} ({number(p10)}–{number(p90)})"


def rows(document: dict[str, Any]) -> list[list[str]]:
    """The table's cells: one row per record and per skip, in the order the scenarios ran."""
    order = list(document.get("scenarios", []))
    for item in document["results"] + document["skipped"]:
        if item["scenario"] not in order:
            order.append(item["scenario"])
    keyed: list[tuple[int, list[str]]] = []
    for r in document["results"]:
        better = "lower" if r["lower_is_better"] else "higher"
        keyed.append(
            (
                order.index(r["scenario"]),
                [
                    r["scenario"],
                    r["client"],
                    f"{r['metric']} ({r['unit']}, {better} is better)",
                    figure(r, "p2pimg"),
                    figure(r, "baseline"),
                    r["baseline_name"],
                    number(r["ratio"]),
                    number(r["bound"]),
                ],
            )
        )
    for s in document["skipped"]:
        # A failing command's output can fill a screen: the table gets its start, results.json all.
        reason = textwrap.shorten(s["reason"], REASON_CHARS, placeholder=" … (see results.json)")
        keyed.append((order.index(s["scenario"]), [s["scenario"], DASH, f"skipped: {reason}"] + [""] * 5))
    keyed.sort(key=lambda k: k[0])  # stable: within a scenario, rows keep the order they came in
    return [row for _, row in keyed]


def _cell(text: str) -> str:
    # A pipe would end the cell early; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(document: dict[str, Any]) -> str:
    m = document.get("machine", {})
    machine = ", ".join(
        str(part)
        for part in (
            f"{m.get('cpu_count')} × {m.get('cpu_model')}" if m.get("cpu_count") else None,
            f"{m['memory_mib'] / 1024:.1f} GiB" if m.get("memory_mib") else None,
            f"Linux {m['kernel']}" if m.get("kernel") else None,
            m.get("python"),
        )
        if part
    )
    lines = [
        "# p2pimg benchmarks",
        "",
        f"`{document.get('command', 'python -m bench')}`: {document.get('mode', '?')} run, "
        f"{document.get('runs', '?')} run{'' if document.get('runs') == 1 else 's'} per figure"
        + (f", {document['started']}" if document.get("started") else "")
        + f"; {machine}.",
    ]
    if document.get("tiny"):
        lines.append("**Toy image sizes (P2PIMG_BENCH_TINY): not comparable with real runs.**")
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows(document)]
    lines += [
        "",
        "Figures are median (p10–p90) over the runs, p2pimg and baseline measured alternately in the "
        "same run; ratio = p2pimg median ÷ baseline median; bound = the physical limit where one exists.",
    ]
    return "\n".join(lines) + "\n"


def rich_table(document: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="p2pimg benchmarks", caption="median (p10–p90); ratio = p2pimg ÷ baseline")
    for name in COLUMNS:
        numeric = name in ("p2pimg", "Baseline", "Ratio", "Bound")
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows(document):
        style = "dim" if row[2].startswith("skipped: ") else None
        table.add_row(*row, style=style)
    return table


def write_plots(document: dict[str, Any], out: Path) -> list[Path]:
    """One bar chart per scenario: p2pimg and baseline medians with p10–p90 error bars, the ratio
    under each client and the bound as a dashed line; a subplot per metric, since units differ."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for r in document["results"]:
        by_scenario.setdefault(r["scenario"], []).append(r)
    written = []
    for scenario, records in by_scenario.items():
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault((r["metric"], r["unit"]), []).append(r)
        # At most three subplots a row, so a scenario with many metrics stays readable.
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        width = max(3.6, 1.3 * max(len(g) for g in groups.values()) + 1.6)
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.4 * nrows), squeeze=False)
        cells = [ax for row in axes for ax in row]
        for ax, ((metric, unit), group) in zip(cells, groups.items(), strict=False):
            _bars(ax, group)
            better = "lower" if group[0]["lower_is_better"] else "higher"
            scale = ", log scale" if ax.get_yscale() == "log" else ""
            ax.set_ylabel(f"{unit} ({better} is better{scale})")
            ax.set_title(textwrap.fill(metric, 40), fontsize=9)
        for ax in cells[len(groups) :]:
            ax.axis("off")
        fig.suptitle(f"{scenario}" + (" (toy sizes)" if document.get("tiny") else ""))
        fig.tight_layout()
        path = out / f"{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        series = next((r["details"]["series"] for r in records if "series" in r.get("details", {})), None)
        if series:
            written.append(_write_series(plt, scenario, series, out))
    return written


SERIES = (("fds", "open descriptors"), ("threads", "threads"), ("rss_mib", "resident memory (MiB)"))


def _write_series(plt: Any, scenario: str, series: dict[str, dict[str, list[float]]], out: Path) -> Path:
    """Samples over time (a soak): one subplot per quantity, a line per side."""
    fig, axes = plt.subplots(1, len(SERIES), figsize=(5.2 * len(SERIES), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], SERIES, strict=True):
        for side, samples in series.items():
            ax.plot(samples["t"], samples[key], label=side, linewidth=1.2)
        ax.set_xlabel("seconds")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{scenario}: the server over time")
    fig.tight_layout()
    path = out / f"{scenario}-over-time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, group: Sequence[dict[str, Any]]) -> None:
    width = 0.38
    xs = list(range(len(group)))
    sides = (("p2pimg", -width / 2, "#2f6db3", "p2pimg"), ("baseline", width / 2, "#b0b0b0", None))
    for side, offset, color, label in sides:
        # A row without figures on one side gets no bar there (NaN), not a misleading zero.
        stats = [[_or_nan(r[f"{side}_{k}"]) for k in ("median", "p10", "p90")] for r in group]
        ax.bar(
            [x + offset for x in xs],
            [m for m, _, _ in stats],
            width,
            yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
            capsize=4,
            color=color,
            label=label or textwrap.shorten(str(group[0]["baseline_name"]), 40),
        )
    bound_labelled = False
    for x, r in zip(xs, group, strict=True):
        if r["bound"] is not None:
            ax.hlines(
                r["bound"],
                x - width,
                x + width,
                colors="#c0392b",
                linestyles="--",
                label=None if bound_labelled else "bound",
            )
            bound_labelled = True
    # The ratio goes under the client's name: above the bars a legend may cover it.
    labels = [
        textwrap.fill(str(r["client"]), 20)
        + (f"\nratio {number(r['ratio'])}" if r["ratio"] is not None else "")
        for r in group
    ]
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlim(-0.8, len(group) - 0.2)  # slimmer bars for a single client, no empty flanks for many
    values = [v for r in group for s in ("p2pimg", "baseline") if (v := r[f"{s}_median"]) is not None]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        # --full puts 10 MB and 1 GB pulls side by side: linear, the small ones are invisible.
        ax.set_yscale("log")
    ax.margins(y=0.25)  # headroom for the legend
    ax.legend(fontsize=7)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def write_all(document: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the plots, results.md and results.json (which lists them) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    try:
        files += write_plots(document, out)
    except ImportError:
        document["plots_skipped"] = "matplotlib is not installed (pip install -e '.[bench]')"
    md = out / "results.md"
    md.write_text(markdown(document))
    files.append(md)
    files.append(out / "results.json")
    document["files"] = [str(f) for f in files]
    (out / "results.json").write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    return document


def emit(result: dict[str, Any], summary: str, out: Path | None) -> int:
    """The end of a focused benchmark: its summary line on stdout, its figures as JSON in `out`."""
    print(summary)
    if out:
        out.write_text(json.dumps(result, indent=2))
    return 0


def _finite(value: Any) -> Any:
    """The document with NaN and infinities as null: JSON has no spelling for them, and a
    scenario's odd figure must not cost the whole report."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
