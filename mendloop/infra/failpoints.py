"""Named failpoints for crash-injection tests: `reach("apply.ref_moved")` kills this process and its process
group with SIGKILL when `MENDLOOP_FAILPOINTS` (a comma-separated list) names that point, and does nothing
otherwise. This is how the tests kill `serve` at an exact stage of an apply (before, during and after the commit)
without racing a timer; the same idea as FoundationDB's buggify and TiKV's fail-rs, reduced to the one action a
crash test needs. Nothing is read from outside the process's own environment."""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "reach"]

ENV = "MENDLOOP_FAILPOINTS"


def reach(name: str) -> None:
    """Die here, as `kill -9` would, when the environment names this failpoint."""
    armed = os.environ.get(ENV)
    if not armed or name not in {part.strip() for part in armed.split(",")}:
        return
    # The whole group when we lead one (serve started by a test does): its git or test children die with it,
    # exactly like a kill -9 of the group. Otherwise only this process.
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
