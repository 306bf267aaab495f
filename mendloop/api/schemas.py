"""Request bodies. Strict types: a mistyped field is a 422 naming it, never a silent coercion."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerRequest(_Body):
    description: StrictStr = Field(min_length=1, max_length=4000)
    error_type: StrictStr = Field(min_length=1, max_length=200)
    file_path: StrictStr | None = Field(default=None, max_length=4000)
    component: StrictStr | None = Field(default=None, max_length=200)
    context: dict[str, Any] | None = None
    playbook_id: StrictStr | None = Field(default=None, max_length=200)
    dedupe_key: StrictStr | None = Field(default=None, max_length=300)
    wait_seconds: float | None = Field(default=None, ge=0, le=600)


class AgentInfo(_Body):
    name: StrictStr | None = None
    version: StrictStr | None = None
    model: StrictStr | None = None


class CompleteRequest(_Body):
    tests_passed: StrictBool
    files_changed: StrictInt | None = Field(default=None, ge=0)
    diff_url: StrictStr | None = Field(default=None, max_length=2000)
    diff: StrictStr | None = Field(default=None, max_length=5_000_000)
    summary: StrictStr | None = Field(default=None, max_length=20_000)
    lease_id: StrictStr | None = None
    base_commit: StrictStr | None = Field(default=None, max_length=100)
    applied_commit: StrictStr | None = Field(default=None, max_length=100)
    approval_required: StrictBool = False
    branch: StrictStr | None = Field(default=None, max_length=250)
    agent: AgentInfo | None = None


class ClaimRequest(_Body):
    agent_id: StrictStr = Field(min_length=1, max_length=200)
    repository: StrictStr | None = Field(default=None, max_length=1000)
    wait_seconds: float = Field(default=0, ge=0, le=120)


class HeartbeatRequest(_Body):
    lease_id: StrictStr = Field(min_length=1, max_length=64)
    note: StrictStr | None = Field(default=None, max_length=2000)


FailReason = Literal[
    "cannot_reproduce",
    "needs_human",
    "out_of_scope",
    "agent_error",
    "timeout",
    "tests_failed",
    "unsafe_patch",
    "verification_failed",
]


class FailRequest(_Body):
    lease_id: StrictStr | None = Field(default=None, max_length=64)
    reason: FailReason
    retryable: StrictBool = False
    details: dict[str, Any] = Field(default_factory=dict)


class EventIn(_Body):
    event_type: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
    source: StrictStr = Field(default="api", min_length=1, max_length=200)
    message: StrictStr | None = Field(default=None, max_length=4000)
    payload: dict[str, Any] = Field(default_factory=dict)
    component: StrictStr | None = Field(default=None, max_length=200)
    event_id: StrictStr | None = Field(default=None, min_length=1, max_length=300)
    fingerprint: StrictStr | None = Field(default=None, min_length=1, max_length=64)
    count: StrictInt = Field(default=1, ge=1, le=1_000_000_000, description="Occurrences this event stands for.")


class RejectRequest(_Body):
    reason: StrictStr = Field(default="rejected", min_length=1, max_length=2000)


class CancelRequest(_Body):
    reason: StrictStr = Field(default="cancelled by an operator", max_length=2000)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed JSON"},
    404: {"description": "Not found"},
    409: {"description": "Not allowed in the current state"},
    422: {"description": "Invalid input; `field` names the problem"},
}
