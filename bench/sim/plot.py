"""A small SVG of a simulation's time to done per node, sorted (no plotting library needed)."""

from __future__ import annotations

import math
from typing import Any
from xml.sax.saxutils import escape

W, H = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 44, 52


def _ticks(top: float) -> list[float]:
    """Round steps up to `top`: 1, 2 or 5 times a power of ten, 4 to 10 of them."""
    if top <= 0:
        return [0.0]
    raw = top / 6
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(top / step) + 1)]


def done_svg(result: dict[str, Any]) -> str:
    times: list[float] = result["done_times_s"]
    alone: float = result["single_node_s"]
    top = max([*times, 2 * alone]) * 1.05
    n = max(len(times), 2)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(i: float) -> float:
        return LEFT + pw * i / (n - 1)

    def y(v: float) -> float:
        return TOP + ph * (1 - v / top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
    ]
    p = result["params"]
    title = (
        f"{result['nodes']} nodes, {result['image_bytes'] / (1 << 20):.0f} MiB image"
        + (f", hostile {p['hostile']:g}" if p["hostile"] else "")
        + (f", churn {p['churn']:g}" if p["churn"] else "")
        + (", view only" if p.get("view_only") else "")
        + (", mirror (digest-checked blobs)" if p.get("mirror") else "")
        + ": time to done per node"
    )
    parts.append(f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>')
    sub = (
        f"origin egress {result['origin_egress_ratio']:.3f}× the image; "
        f"p50 {result['p50_done_ratio'] or 0:.2f}, p99 {result['p99_done_ratio'] or 0:.2f} "
        "× one node alone; "
        f"{result['unfinished']} unfinished"
    )
    parts.append(f'<text x="{W / 2}" y="34" text-anchor="middle" fill="#555">{escape(sub)}</text>')
    for v in _ticks(top):
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for v, label, colour in ((alone, "one node alone", "#2f6db3"), (2 * alone, "2 × alone", "#c0392b")):
        parts.append(
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="{colour}" '
            'stroke-dasharray="5 4"/>'
        )
        parts.append(f'<text x="{LEFT + 6}" y="{y(v) - 4:.1f}" fill="{colour}">{label} ({v:.1f} s)</text>')
    if times:
        points = " ".join(f"{x(i):.1f},{y(t):.1f}" for i, t in enumerate(times))
        parts.append(f'<polyline points="{points}" fill="none" stroke="#222" stroke-width="1.5"/>')
    parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + ph}" stroke="#222"/>')
    parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{TOP + ph}" y2="{TOP + ph}" stroke="#222"/>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        i = frac * (n - 1)
        parts.append(f'<text x="{x(i):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{round(i + 1)}</text>')
    parts.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle">'
        f"nodes, fastest to slowest ({len(times)} finished)</text>"
    )
    parts.append(
        f'<text x="16" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + ph / 2})">seconds to done</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
