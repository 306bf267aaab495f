"""A list's `total`: which count answers it, so that its cost never grows with history.

The database keeps counted rows (storage/row_counts.py, migration 0014) for each list unfiltered and for each
value of the columns in `COUNTED`. A request with no filter, or with exactly one filter on a counted column, is
answered from those, exactly. Any other filter set (a filter whose values are unbounded, such as a fingerprint or a
run id, or two filters at once) is counted over its index, but only up to `CAP` rows: beyond that the answer is
`CAP` with `total_is_lower_bound: true`, so the count costs at most `CAP` index entries however long the history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CAP = 1000

# list -> the columns counted per value (the triggers of migration 0014 keep the same ones).
COUNTED: dict[str, frozenset[str]] = {
    "runs": frozenset({"status"}),
    "work_orders": frozenset({"status"}),
    "incidents": frozenset({"status", "error_type"}),
}


@dataclass(frozen=True, slots=True)
class CountKey:
    """A row of the counts: the list, and the counted column and its value ("" and "" for the whole list)."""

    list_name: str
    field: str
    value: str


@dataclass(frozen=True, slots=True)
class Total:
    n: int
    lower_bound: bool  # n is CAP and more rows match


def key_for(list_name: str, filters: Mapping[str, str | None]) -> CountKey | None:
    """The counted row that answers `filters` (None values are no filter), or None if none does."""
    given = {k: v for k, v in filters.items() if v is not None and v != ""}
    if not given:
        return CountKey(list_name, "", "")
    if len(given) == 1:
        ((column, value),) = given.items()
        if column in COUNTED.get(list_name, frozenset()):
            return CountKey(list_name, column, value)
    return None


def capped(counted: int, cap: int = CAP) -> Total:
    """A count taken over at most `cap` + 1 rows."""
    return Total(min(counted, cap), counted > cap)
