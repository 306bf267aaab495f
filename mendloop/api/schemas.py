"""Request bodies. Strict types: a mistyped field is a 422 naming it, never a silent coercion.

And what every request must satisfy before a route sees it (`unstorable_body`, `text_problem`): no string that a
database refuses (a NUL character: PostgreSQL; a lone surrogate: any UTF-8 encoder) and no number JSON can't
carry back (NaN, Infinity, a float literal that overflows), anywhere in a body, a path, a query or a header.

And the limits (`settings.limits`, enforced by `api/server.py`): a body's nesting, measured on its bytes before
any parser recurses into it (`json_depth`), and the length of every string in it (`overlong_string`). Free-form
values (a trigger's `context`, an event's `payload`, a failure's `details`) nest at most `MAX_CONTEXT_DEPTH` levels.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from mendloop.api.responses import ErrorOut
from mendloop.domain.bounded import MAX_CONTEXT_DEPTH, nesting
from mendloop.domain.states import FAIL_REASONS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _shallow(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and nesting(value) >= MAX_CONTEXT_DEPTH:
        raise ValueError(f"nested deeper than {MAX_CONTEXT_DEPTH} levels")
    return value


# A free-form object from a caller: stored as JSON, rendered into templates and prompts, redacted by walking it.
# As deep as the engine takes a trigger's context (`MAX_CONTEXT_DEPTH`), and no deeper.
FreeForm = Annotated[dict[str, Any], AfterValidator(_shallow)]


class TriggerRequest(_Body):
    description: StrictStr = Field(min_length=1, max_length=4000)
    error_type: StrictStr = Field(min_length=1, max_length=200)
    file_path: StrictStr | None = Field(default=None, max_length=4000)
    component: StrictStr | None = Field(default=None, max_length=200)
    context: FreeForm | None = None
    playbook_id: StrictStr | None = Field(default=None, max_length=200)
    dedupe_key: StrictStr | None = Field(default=None, max_length=300)
    wait_seconds: float | None = Field(default=None, ge=0, le=600)


class AgentInfo(_Body):
    name: StrictStr | None = Field(default=None, max_length=200)
    version: StrictStr | None = Field(default=None, max_length=200)
    model: StrictStr | None = Field(default=None, max_length=200)


# More files than any patch policy allows (`max_files` is at most 1000), well inside every integer column.
MAX_FILES_CHANGED = 100_000


class CompleteRequest(_Body):
    tests_passed: StrictBool
    files_changed: StrictInt | None = Field(default=None, ge=0, le=MAX_FILES_CHANGED)
    diff_url: StrictStr | None = Field(default=None, max_length=2000)
    diff: StrictStr | None = Field(default=None, max_length=5_000_000)
    summary: StrictStr | None = Field(default=None, max_length=20_000)
    lease_id: StrictStr | None = Field(default=None, max_length=64)
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
    details: FreeForm = Field(default_factory=dict)


class EventIn(_Body):
    event_type: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
    source: StrictStr = Field(default="api", min_length=1, max_length=200)
    message: StrictStr | None = Field(default=None, max_length=4000)
    payload: FreeForm = Field(default_factory=dict)
    component: StrictStr | None = Field(default=None, max_length=200)
    event_id: StrictStr | None = Field(default=None, min_length=1, max_length=300)
    fingerprint: StrictStr | None = Field(default=None, min_length=1, max_length=64)
    count: StrictInt = Field(default=1, ge=1, le=1_000_000_000, description="Occurrences this event stands for.")


class RejectRequest(_Body):
    reason: StrictStr = Field(default="rejected", min_length=1, max_length=2000)


class DecisionRequest(_Body):
    """An operator's approval or rejection of what a run waits for."""

    comment: StrictStr | None = Field(default=None, min_length=1, max_length=2000)


class PauseRequest(_Body):
    component: StrictStr | None = Field(default=None, min_length=1, max_length=200, description="None: all.")
    reason: StrictStr = Field(min_length=1, max_length=2000, description="Shown on /health, runs and incidents.")


class ResumeRequest(_Body):
    component: StrictStr | None = Field(default=None, min_length=1, max_length=200, description="None: every pause.")


class RetryRequest(_Body):
    from_step: StrictStr = Field(min_length=1, max_length=200, description="The id of the step to start again from.")


class CancelRequest(_Body):
    reason: StrictStr = Field(default="cancelled by an operator", max_length=2000)


# -- every inbound value ------------------------------------------------------------------------------------

NUL_MESSAGE = "must not contain a NUL character"
SURROGATE_MESSAGE = "must be valid Unicode (no lone surrogates)"
NONFINITE_MESSAGE = "must be a finite number"

# A JSON escape that decodes to NUL or to half of a surrogate pair; searched before any string is walked.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


class _NonFinite:
    """Stands in the parsed body for NaN, Infinity or an overflowing float literal, so the walk can name it."""


_NONFINITE = _NonFinite()


def text_problem(value: str) -> str | None:
    """Why no database can store `value`; None when it is fine."""
    if "\x00" in value:
        return NUL_MESSAGE
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_MESSAGE
    return None


def _float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NONFINITE


def _first_problem(doc: Any, prefix: tuple[str, ...]) -> tuple[str, str] | None:
    """The first value in document order no database could store, as (dotted field, message)."""
    stack: list[tuple[tuple[str, ...], Any]] = [(prefix, doc)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return ".".join(where) or "body", problem
        elif value is _NONFINITE:
            return ".".join(where) or "body", NONFINITE_MESSAGE
        elif isinstance(value, dict):
            children = []
            for key, item in value.items():
                problem = text_problem(key)
                if problem:
                    return ".".join(where) or "body", f"a key {problem}"
                children.append(((*where, key), item))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([((*where, str(i)), item) for i, item in enumerate(value)]))
    return None


def unstorable_body(raw: bytes) -> tuple[str, str] | None:
    """(field, message) for the first string or number in a JSON (or NDJSON) body that can't be stored.

    None when there is none, or when the body is not JSON at all (the route answers that). Parsed in C once; the
    strings are walked only when the raw bytes hold a suspect escape or a NUL byte (a UTF-16 or UTF-32 body)."""
    if not raw:
        return None
    nonfinite = False

    def constant(_name: str) -> _NonFinite:
        nonlocal nonfinite
        nonfinite = True
        return _NONFINITE

    def number(text: str) -> float | _NonFinite:
        nonlocal nonfinite
        value = _float(text)
        nonfinite = nonfinite or value is _NONFINITE
        return value

    docs: list[tuple[tuple[str, ...], Any]]
    try:
        docs = [((), json.loads(raw, parse_constant=constant, parse_float=number))]
    except (ValueError, RecursionError):
        try:  # NDJSON: one document a line, named by its index as the events route names them
            lines = [line for line in raw.splitlines() if line.strip()]
            docs = [
                ((str(i),), json.loads(line, parse_constant=constant, parse_float=number))
                for i, line in enumerate(lines)
            ]
        except (ValueError, RecursionError):
            return None
    suspect = b"\x00" in raw or (b"\\u" in raw and _SUSPECT_ESCAPE.search(raw) is not None)
    if not (suspect or nonfinite):
        return None
    for prefix, doc in docs:
        try:
            found = _first_problem(doc, prefix)
        except RecursionError:  # pragma: no cover - the walk keeps its own stack
            return None
        if found:
            return found
    return None


# -- the limits on a body ----------------------------------------------------------------------------------

# Bytes that shape a JSON document once escapes are gone: quotes (strings) and brackets (nesting).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_NESTING = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _NESTING[_open], _NESTING[_close] = 1, -1


def json_depth(raw: bytes, limit: int) -> int:
    """How deep the arrays and objects of a JSON (or NDJSON) body nest, measured on the bytes, before any parser
    recurses into them; 0 when it is obviously within `limit` (fewer brackets than `limit`). Not JSON at all: the
    depth its brackets would give a parser, which is what matters.

    Linear and in C but for the last step: escaped backslashes, then escaped quotes, are dropped (left to right, as
    a parser pairs them); what lies between the remaining quotes is string content; the brackets outside are the
    structure, and the deepest point of their running sum is the depth."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    shape = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    outside = b"".join(shape.split(b'"')[::2])
    return max(accumulate(map(_NESTING.__getitem__, outside)), default=0)


def overlong_string(raw: bytes, max_chars: int) -> str | None:
    """The dotted field of the first string or key in a JSON (or NDJSON) body longer than `max_chars`; None when
    there is none or the body is not JSON (the route answers that). A body no longer than `max_chars` bytes can't
    hold one, and is not parsed here."""
    if len(raw) <= max_chars:
        return None
    try:
        docs: list[tuple[tuple[str, ...], Any]] = [((), json.loads(raw))]
    except (ValueError, RecursionError):
        try:
            lines = [line for line in raw.splitlines() if line.strip()]
            docs = [((str(i),), json.loads(line)) for i, line in enumerate(lines)]
        except (ValueError, RecursionError):
            return None
    for prefix, doc in docs:
        stack: list[tuple[tuple[str, ...], Any]] = [(prefix, doc)]
        while stack:
            where, value = stack.pop()
            if isinstance(value, str):
                if len(value) > max_chars:
                    return ".".join(where) or "body"
            elif isinstance(value, dict):
                children = []
                for key, item in value.items():
                    if len(key) > max_chars:
                        return ".".join(where) or "body"
                    children.append(((*where, key), item))
                stack.extend(reversed(children))
            elif isinstance(value, list):
                stack.extend(reversed([((*where, str(i)), item) for i, item in enumerate(value)]))
    return None


_ERRORS = {
    400: "Malformed JSON",
    401: "No bearer token, or an unknown or revoked one; `field` is `Authorization`",
    403: "The token's role or repositories do not allow this; `field` is `Authorization`, `role` and `action` say why",
    404: "Not found",
    409: "Not allowed in the current state",
    413: "The body is larger than its limit; `limit` names the setting and `max` its value",
    422: "Invalid input; `field` names the problem (and `limit` the setting, when a limit was exceeded)",
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


class TokenCreate(_Body):
    name: StrictStr = Field(min_length=1, max_length=200)
    role: Literal["viewer", "operator", "agent", "intake", "admin"]
    repositories: list[Annotated[StrictStr, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=list, max_length=100
    )
