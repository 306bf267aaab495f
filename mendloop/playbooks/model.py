"""The playbook schema. A playbook is data: the engine interprets it, so a parked run survives an edit."""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PlaybookType = Literal["data_fix", "cache_clear", "retry", "code_patch", "hybrid"]
ActionName = Literal["command", "http", "capability", "diagnose", "sleep", "escalate", "verify", "approval"]
_ID = re.compile(r"^[a-z][a-z0-9_.-]*$")
_ON_FAILURE = re.compile(r"^(fail|continue|escalate|needs_human|goto:[a-z][a-z0-9_.-]*)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(_Strict):
    """Exponential backoff with jitter: delay = min(max_delay, backoff * factor**(attempt-1)) ± jitter."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff_seconds: float = Field(default=0.5, ge=0, le=3600)
    factor: float = Field(default=2.0, ge=1, le=10)
    max_delay_seconds: float = Field(default=30, ge=0, le=86400)
    jitter: float = Field(default=0.1, ge=0, le=1)

    def delay(self, failed_attempts: int, rnd: random.Random | None = None) -> float:
        base = min(self.max_delay_seconds, self.backoff_seconds * self.factor ** max(0, failed_attempts - 1))
        spread = (rnd or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1 + spread))


class Handles(_Strict):
    error_types: list[str] = Field(default_factory=list)
    event_types: list[str] = Field(default_factory=list)


_REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "command": ("argv",),
    "http": ("url",),
    "capability": ("name",),
    "diagnose": (),
    "sleep": ("seconds",),
    "escalate": (),
    "verify": ("check", "expect"),
    "approval": (),
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: Any) -> float:
    """`90`, `"90s"`, `"30m"`, `"2h"`, `"7d"` as seconds; ValueError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    found = _DURATION.match(value) if isinstance(value, str) else None
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a duration: a positive number of seconds, or e.g. 90s, 30m, 2h, 7d")
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2) or "s"]


class Step(_Strict):
    id: str
    name: str = ""
    action: ActionName
    params: dict[str, Any] = Field(default_factory=dict, alias="with")
    when: str | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = Field(default=None, gt=0, le=86400)
    on_failure: str = "fail"
    # A capability the service may not have: unbound, the step is skipped and the timeline says so.
    optional: bool = False
    # Below its component's trust gate (`control.trust_gates`), an operator approves the step before it runs.
    destructive: bool = False

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be lowercase letters, digits, '_', '.' or '-', starting with a letter")
        return value

    @field_validator("on_failure")
    @classmethod
    def _on_failure(cls, value: str) -> str:
        if not _ON_FAILURE.match(value):
            raise ValueError("must be fail, continue, escalate, needs_human or goto:<step id>")
        return value

    @model_validator(mode="after")
    def _params(self) -> Step:
        missing = [p for p in _REQUIRED_PARAMS[self.action] if p not in self.params]
        if missing:
            raise ValueError(f"action {self.action!r} needs with.{missing[0]}")
        if self.action == "command" and not (
            isinstance(self.params["argv"], list)
            and self.params["argv"]
            and all(isinstance(a, str) for a in self.params["argv"])
        ):
            raise ValueError("with.argv must be a non-empty list of strings (commands never go through a shell)")
        if self.action == "command":
            _option_positions(self.params, "with")
        if self.action == "verify":
            check = self.params["check"]
            if not isinstance(check, dict) or len(set(check) & {"capability", "http", "command"}) != 1:
                raise ValueError("with.check must name exactly one of capability, http or command")
            if isinstance(check.get("command"), dict):
                _option_positions(check["command"], "with.check.command")
        if self.action == "approval":
            _approval_params(self.params)
        if self.optional and not (self.action == "capability" or "capability" in self.params.get("check", {})):
            raise ValueError("optional: only a capability step, or a verify step checking one, can be optional")
        return self

    @property
    def title(self) -> str:
        return self.name or self.id.replace("_", " ")


def _approval_params(params: dict[str, Any]) -> None:
    """`with: {timeout: 2h, on_timeout: reject|approve|fail, message: ...}`; all optional (no timeout: it waits)."""
    unknown = sorted(set(params) - {"timeout", "on_timeout", "message"})
    if unknown:
        raise ValueError(f"with.{unknown[0]}: an approval step takes only timeout, on_timeout and message")
    if "timeout" in params:
        try:
            duration_seconds(params["timeout"])
        except ValueError as exc:
            raise ValueError(f"with.timeout: {exc}") from None
    if params.get("on_timeout", "reject") not in ("reject", "approve", "fail"):
        raise ValueError("with.on_timeout must be reject, approve or fail")
    if not isinstance(params.get("message", ""), str):
        raise ValueError("with.message must be a string")


def _option_positions(params: dict[str, Any], where: str) -> None:
    """`option_positions: [2]` lets argv[2] take a value from data that starts with `-` (an option chosen by the
    event); every other position refuses one. Literal integers only: data must not pick what may be an option."""
    if "option_positions" not in params:
        return
    positions = params["option_positions"]
    argv = params.get("argv")
    size = len(argv) if isinstance(argv, list) else 0
    if not (
        isinstance(positions, list)
        and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < size for p in positions)
        and len(set(positions)) == len(positions)
    ):
        raise ValueError(
            f"{where}.option_positions must be a list of distinct argv positions from 1 to {max(size - 1, 1)} "
            "(argv[0], the program, is never an option)"
        )


class Playbook(_Strict):
    id: str
    version: int | str = 1
    type: PlaybookType
    description: str
    target: str | None = None
    handles: Handles = Field(default_factory=Handles)
    steps: list[Step] = Field(min_length=1)
    # Every run renders and records its steps and executes none (`control.dry_run` does it for all playbooks).
    dry_run: bool = False

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be lowercase letters, digits, '_', '.' or '-', starting with a letter")
        return value

    @model_validator(mode="after")
    def _steps(self) -> Playbook:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.id in seen:
                raise ValueError(f"steps.{i}.id: duplicate step id {step.id!r}")
            seen.add(step.id)
        for i, step in enumerate(self.steps):
            if step.on_failure.startswith("goto:") and step.on_failure[5:] not in seen:
                raise ValueError(f"steps.{i}.on_failure: no step {step.on_failure[5:]!r}")
        return self

    def step_index(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(step_id)
