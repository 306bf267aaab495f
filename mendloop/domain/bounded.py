"""JSON-able copies of values with their nesting bounded: what mendloop stores and answers never recurses past a
limit, whatever an action returned or an old row holds. (The JSON encoder and pydantic recurse once per level; a
few hundred levels crash them.)"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# How deep a caller's free-form JSON (a trigger's context, an event's payload) may nest: far deeper than any real
# one, and shallow enough that neither the JSON encoder nor the database driver recurses out of its stack.
MAX_CONTEXT_DEPTH = 32


def nesting(value: Any) -> int:
    """Levels of objects and arrays below `value` itself (a flat dict is 0). Iterative: a hostile depth can't
    exhaust the stack while it is measured."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list | tuple) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, Mapping | list | tuple))
    return deepest


def bounded(value: Any, depth: int) -> Any:
    """`value` with nesting cut at `depth` levels (the cut value replaced by a note), keys made strings, and
    values JSON cannot hold (NaN, objects) turned into their text. Recurses at most `depth` levels."""
    return _bounded(value, depth, depth)


def _bounded(value: Any, depth: int, limit: int) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping | list | tuple):
        if depth <= 0:
            return f"… (cut: nested deeper than {limit} levels)"
        if isinstance(value, Mapping):
            return {str(k): _bounded(v, depth - 1, limit) for k, v in value.items()}
        return [_bounded(v, depth - 1, limit) for v in value]
    try:
        text = str(value)
    except Exception:  # a value whose str() fails is still recorded, by its type
        return f"<{type(value).__name__}>"
    return text if len(text) <= 2000 else "…" + text[-2000:]
