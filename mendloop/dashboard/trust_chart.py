"""Trust per component over time, as an SVG drawn on the server: one line per component, score 0..1 upwards,
time rightwards. The SVG is built from numbers and escaped names only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from mendloop.domain.records import TrustChange

WIDTH, HEIGHT = 720, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 44, 16, 12, 28
# Distinct, and each at least 4.5:1 against white (the chart's lines and legend are text-like).
COLOURS = ("#0b5cad", "#a3330f", "#1e6b33", "#6b3fa0", "#8a5a00", "#00657a", "#a0215b", "#4a4a4a")


@dataclass(frozen=True, slots=True)
class Series:
    component: str
    colour: str
    score: float
    points: list[tuple[float, float]]  # (time, score), oldest first


def series_of(scores: Mapping[str, float], history: Mapping[str, Sequence[TrustChange]]) -> list[Series]:
    found = []
    for i, component in enumerate(sorted(scores)):
        changes = history.get(component, ())
        points = [(changes[0].created_at, changes[0].old)] if changes else []
        points += [(c.created_at, c.new) for c in changes]
        found.append(Series(component, COLOURS[i % len(COLOURS)], scores[component], points))
    return found


def svg(series: Sequence[Series]) -> Markup:
    times = [t for s in series for t, _ in s.points]
    if not times:
        return Markup("")
    start, end = min(times), max(times)
    span = (end - start) or 1.0
    inner_w, inner_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def x(t: float) -> float:
        return PAD_LEFT + (t - start) / span * inner_w

    def y(score: float) -> float:
        return PAD_TOP + (1 - max(0.0, min(1.0, score))) * inner_h

    parts = [
        f'<svg class="trust-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="trust-chart-title" '
        'xmlns="http://www.w3.org/2000/svg">',
        '<title id="trust-chart-title">Trust score per component over time (0 to 1)</title>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
            f'<text x="{PAD_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" class="axis">{tick:.2f}</text>'
        )
    for s in series:
        if not s.points:
            continue
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{s.colour}" stroke-width="2.5">'
            f"<title>{escape(s.component)}: {s.score:.2f}</title></polyline>"
        )
        lx, ly = s.points[-1]
        parts.append(f'<circle cx="{x(lx):.1f}" cy="{y(ly):.1f}" r="4" fill="{s.colour}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
