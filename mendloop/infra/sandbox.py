"""Where agent and test processes run. SKELETON (session 3): the interface is fixed, the bubblewrap part is being
written; today `run` is the uid drop plus die-with-parent that the agent runner used before.

`Sandbox.run(argv, cwd=, env=, timeout=, writable=, network=)` is the one way an agent's or a test's process is
started: callers never call `process.run` for those themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mendloop.infra import process

__all__ = ["Sandbox", "SandboxKind", "detect"]

SandboxKind = Literal["bwrap", "uid-drop", "none"]


@dataclass(frozen=True)
class Sandbox:
    """How processes are confined. `kind`: "bwrap" (bubblewrap), "uid-drop" (the fallback: only a uid drop to
    `run_as`), "none" (neither is possible: not root and no bwrap). `reason`: why it is not "bwrap"."""

    kind: SandboxKind
    run_as: tuple[int, int] | None = None
    bwrap: str | None = None
    reason: str = ""
    extra_readonly: tuple[Path, ...] = field(default=())

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        writable: Sequence[Path],
        network: bool,
        cancel: threading.Event | None = None,
        keep_bytes: int | None = None,
        merge_stderr: bool = True,
    ) -> process.Completed:
        """Run `argv` confined: the system read-only, only `cwd` and `writable` writable, the network only when
        `network`; its process group dies with mendloop. Raises process.CannotStart like `process.run`."""
        del writable, network  # SKELETON: the uid drop only
        return process.run(
            argv,
            cwd=cwd,
            env=env,
            timeout=timeout,
            cancel=cancel,
            merge_stderr=merge_stderr,
            keep_bytes=keep_bytes,
            run_as=self.run_as,
            die_with_parent=True,
        )


def detect(run_as: tuple[int, int] | None) -> Sandbox:
    """The best sandbox this machine offers for processes that should run as `run_as` (None: as mendloop)."""
    return Sandbox(kind="uid-drop" if run_as is not None else "none", run_as=run_as, reason="skeleton")
