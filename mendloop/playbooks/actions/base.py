"""What every action gets and gives: a frozen context in, a JSON-able output dict out, ActionError on failure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx


@dataclass(frozen=True, slots=True)
class ActionContext:
    run_id: str
    step_id: str
    attempt: int
    # run_id:step_id:attempt: the same key when a crashed step runs again, so targets can deduplicate.
    idempotency_key: str
    timeout: float | None
    target: str | None
    http: httpx.Client
    template_vars: Mapping[str, Any] = field(default_factory=dict)


class Action(Protocol):
    def __call__(self, params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]: ...


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]
