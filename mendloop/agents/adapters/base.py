"""The adapter base: what an adapter gets for one work order (`AgentTask`), what it gives back (an `Invocation`
to start, or an `InProcessResult`), the `Adapter` base class and the registry of adapters by name."""

from __future__ import annotations

import fnmatch
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mendloop.config import AGENT_ADAPTERS
from mendloop.errors import ConfigError


@dataclass(frozen=True)
class AgentTask:
    """Everything an adapter needs for one work order. All paths but `worktree` are outside the worktree."""

    work_order_id: str
    work_order: dict[str, Any]
    worktree: Path
    prompt_file: Path
    work_order_file: Path
    result_file: Path
    scratch: Path
    timeout: float
    files: tuple[str, ...] = ()

    @property
    def context(self) -> dict[str, Any]:
        ctx = self.work_order.get("context")
        return ctx if isinstance(ctx, dict) else {}

    def variables(self) -> dict[str, str]:
        return {
            "WORK_ORDER": str(self.work_order_file),
            "WORK_ORDER_ID": self.work_order_id,
            "PROMPT_FILE": str(self.prompt_file),
            "WORKTREE": str(self.worktree),
            "RESULT_FILE": str(self.result_file),
        }


@dataclass(frozen=True)
class Invocation:
    """A program to start: its argv and the variables to add to the runner's minimal environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InProcessResult:
    output: str
    claims: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Base of all adapters. `env_keys`/`env_prefixes` name the runner's variables the agent may see;
    `leftovers` are globs of files an agent leaves at the worktree root that are never part of a fix."""

    name: ClassVar[str] = ""
    env_keys: ClassVar[tuple[str, ...]] = ()
    env_prefixes: ClassVar[tuple[str, ...]] = ()
    leftovers: ClassVar[tuple[str, ...]] = ()
    in_process: ClassVar[bool] = False
    # Whether the agent's process must reach the network (a model endpoint): the sandbox gives it the host's
    # network then, and a private loopback only otherwise. Tests never get it.
    network: ClassVar[bool] = False

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.args = [str(a) for a in args]

    @property
    def model(self) -> str | None:
        return None

    @property
    def needs_network(self) -> bool:
        """True when the agent talks to a model endpoint, so its sandbox shares the host's network."""
        return self.network

    def version(self) -> str | None:
        return None

    def passthrough_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The adapter's own keys from the runner's environment; never mendloop's."""
        out: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("MENDLOOP_"):
                continue
            if key in self.env_keys or key.startswith(self.env_prefixes):
                out[key] = value
        return out

    def build(self, task: AgentTask) -> Invocation:
        raise NotImplementedError

    def run(self, task: AgentTask, cancel: threading.Event) -> InProcessResult:
        raise NotImplementedError

    def remove_leftovers(self, worktree: Path, existed: set[str]) -> list[str]:
        """Delete root entries matching `leftovers` that were not there before the agent ran."""
        removed: list[str] = []
        if not self.leftovers:
            return removed
        for entry in os.scandir(worktree):
            if entry.name in existed or not any(fnmatch.fnmatch(entry.name, g) for g in self.leftovers):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
        return removed

    def existing_leftovers(self, worktree: Path) -> set[str]:
        if not self.leftovers:
            return set()
        return {e.name for e in os.scandir(worktree) if any(fnmatch.fnmatch(e.name, g) for g in self.leftovers)}


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"adapter name {cls.name!r} is empty or taken")
    # The settings check `agent_runner.adapter` against this list when they load (config sits below agents).
    if cls.name not in AGENT_ADAPTERS:
        raise ValueError(f"adapter {cls.name!r} is not listed in mendloop.config.AGENT_ADAPTERS")
    _REGISTRY[cls.name] = cls
    return cls


def adapter_names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, args: Sequence[str] = (), **options: Any) -> Adapter:
    """The adapter registered as `name`, built with the argv after `--` and its options."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown adapter {name!r}; known: {', '.join(adapter_names())}")
    return cls(args, **options)


# -- CLI agents ---------------------------------------------------------------------------------------------
