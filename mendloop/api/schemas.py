"""Request bodies. Strict types: a mistyped field is a 422 naming it, never a silent coercion."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from mendloop.api.responses import ErrorOut
from mendloop.domain.states import FAIL_REASONS


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


if TYPE_CHECKING:
    FailReason = str
else:
    # The domain's one list, as a Literal: the schema lists the reasons and anything else is a 422 naming `reason`.
    FailReason = Literal[FAIL_REASONS]


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


_ERRORS = {
    400: "Malformed JSON",
    404: "Not found",
    409: "Not allowed in the current state",
    422: "Invalid input; `field` names the problem",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "model": ErrorOut} for code, text in _ERRORS.items()
}
# For a route whose own answer is not JSON (a diff, an event stream): FastAPI would document a `model` in the
# route's media type, but errors are JSON there too.
JSON_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorOut.__name__}"}}},
    }
    for code, text in _ERRORS.items()
}
