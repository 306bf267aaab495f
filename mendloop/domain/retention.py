"""Retention's arithmetic: an age such as `30d` in seconds, and the cutoff it gives."""

from __future__ import annotations

import re

from mendloop.errors import InputError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
DAY = 86400.0


def parse_age(text: str, *, field: str = "--older-than") -> float:
    """`30d`, `12h`, `2w`, `90m`, `45s` → seconds."""
    m = _AGE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise InputError(f"{field}: {text!r} is not an age such as 30d, 12h, 2w, 90m or 45s", field=field)
    return float(m.group(1)) * _UNITS[m.group(2)]


def cutoff(now: float, days: float | None) -> float | None:
    """The time before which rows go, for an age in days (None: keep everything)."""
    return now - days * DAY if days is not None else None
