"""How an agent runner works (`RunnerOptions`) and what it did with one work order (`Outcome`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mendloop.agents.adapters import Adapter
from mendloop.agents.test_suite import TestResult
from mendloop.domain.test_command import TestCommand
from mendloop.errors import AgentError, InputError

ApplyMode = Literal["commit", "branch", "approval"]
APPLY_MODES: tuple[str, ...] = ("commit", "branch", "approval")
# The user an agent runs as when the runner is root and `run_as` is "auto".
NOBODY = (65534, 65534)


@dataclass
class RunnerOptions:
    """How a runner works. `run_as`: "auto" drops to uid/gid 65534 when the runner is root; None never drops;
    a (uid, gid) pair drops to that user. `test_command`: the runner's own (a bare argv is one with no extra
    environment, run at the worktree's root); None: the work order's, with its test_env and test_cwd."""

    repo: Path
    adapter: Adapter
    agent_id: str | None = None
    test_command: TestCommand | Sequence[str] | None = None
    test_timeout: float = 600.0
    agent_timeout: float = 1800.0
    apply: ApplyMode = "commit"
    wait_seconds: float = 20.0
    run_as: tuple[int, int] | Literal["auto"] | None = "auto"
    environ: Mapping[str, str] | None = None
    # Where worktrees and scratch directories go; None: a tmpfs when there is one (checking out a large
    # repository twice per work order is most of the runner's own time on a disk), else the system's temp dir.
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.test_command is not None:
            self.test_command = TestCommand.coerce(self.test_command)
        if self.apply not in APPLY_MODES:
            raise ValueError(f"apply must be one of {', '.join(APPLY_MODES)}, got {self.apply!r}")
        if self.agent_timeout <= 0 or self.test_timeout <= 0:
            raise ValueError("timeouts must be positive")

    def tests_for(self, context: Mapping[str, Any]) -> TestCommand | None:
        """The test command a work order's patch is judged by: the runner's own, whole, when it has one (the
        context's test_env and test_cwd belong to the context's command), else the context's. A malformed one in
        the context is `needs_human`: no patch can be judged by it."""
        if self.test_command is not None:
            return TestCommand.coerce(self.test_command)
        try:
            return TestCommand.from_context(context)
        except InputError as exc:
            raise AgentError(
                "needs_human", f"the work order's {exc.field or 'test command'} is invalid: {exc.message}"
            ) from exc


@dataclass
class Outcome:
    """What the runner did with one work order, as reported to the server."""

    work_order_id: str
    status: Literal["completed", "failed", "lost"]
    reason: str | None = None
    message: str = ""
    diff: str | None = None
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    branch: str | None = None
    tests: TestResult | None = None
    base_commit: str | None = None
    agent_claims: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    output_tail: str | None = None
    answer: dict[str, Any] | None = None


def default_workdir(min_free_bytes: int = 2 << 30) -> Path:
    """A tmpfs (/dev/shm) when it is writable and has room, else the system's temp directory."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= min_free_bytes:
                return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())
