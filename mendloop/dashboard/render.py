"""The dashboard's Jinja2 environment (autoescaping: every value is data) and its filters: times, durations, the
spec's timeline form, JSON for step inputs and outputs, and a diff highlighted with Pygments on the server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
# The longest diff highlighted; past it the rest is shown as plain text (Pygments' time grows with the text).
MAX_HIGHLIGHT_CHARS = 400_000


def clock(ts: float | None) -> str:
    """A table's time: UTC, to the second."""
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def timeline_time(iso_seconds: str) -> str:
    """`2025-11-13T16:33:34Z` as the spec's timeline writes it: `16:33:34`."""
    return iso_seconds[11:19] if len(iso_seconds) >= 19 else iso_seconds


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def highlight_diff(diff: str) -> Markup:
    """The diff as HTML: Pygments' spans (classes `gi` inserted, `gd` deleted, `gu` hunk, `gh` header), escaped
    by Pygments itself; what is past MAX_HIGHLIGHT_CHARS is escaped plain text."""
    head, rest = diff[:MAX_HIGHLIGHT_CHARS], diff[MAX_HIGHLIGHT_CHARS:]
    html = highlight(head, DiffLexer(), HtmlFormatter(cssclass="diff", wrapcode=True))
    if rest:
        html += Markup("<pre class='diff-rest'>{}</pre>").format(rest)
    return Markup(html)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html", "svg"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(clock=clock, duration=duration, timeline_time=timeline_time, pretty=pretty)
    return env
