"""Helpers for tests (ours and users'): a clock you move by hand."""

from __future__ import annotations

import threading


class FakeClock:
    """A clock that only moves when told to; pass it to `App(clock=...)` instead of patching time."""

    def __init__(self, start: float = 1_763_051_614.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
