"""The template context, as one schema: every name a playbook's templates (and a capability binding's) can read,
its type, when it is there, and what it holds.

The code that builds these dicts is held to this schema by `tests/test_template_context.py`, which runs a real
playbook (a real HTTP server, real commands, a real detection with a traceback) and fails when a key is present
that is not described here, or a key described as always present is missing. `templates.STEP_SCOPE` and
`RESULT_SCOPE` (what `config check` accepts as names) are derived from it, and `docs/template-context.md` is
generated from it (`mendloop playbooks context --markdown`), so the reference cannot drift from the code.

Who builds what: `engine/step_loop.py` `StepLoop._scope` (a step's scope), `domain/runs.py` `plan` (`context`,
and `event` from `engine/service.py` `trigger` or `intake/service.py` `run_for`, whose `exception` comes from
`intake/logs.py`), `playbooks/actions/http.py` and `command.py` (a `result`), `actions/capability.py` (a binding's
scope and `outputs`), `step_loop.py` `_verify` and `_sleep` (those steps' outputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A key written `<...>` stands for any key (a step id, a variable's name); `[]` for each item of a list.
ANY_KEY_PREFIX = "<"
ITEM = "[]"


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    type: str
    description: str
    children: tuple[Name, ...] = ()
    # Empty: present every time its parent is. Otherwise when it is there.
    when: str = ""
    # Keys beyond `children` may appear: the caller's own data (an event's payload, a trigger's context).
    open: bool = False

    @property
    def always(self) -> bool:
        return not self.when


def _n(name: str, type_: str, description: str, *children: Name, when: str = "", open_: bool = False) -> Name:
    return Name(name, type_, description, tuple(children), when, open_)


# -- results: what one call answered ---------------------------------------------------------------------------

HTTP_RESULT: tuple[Name, ...] = (
    _n("status_code", "integer", "The HTTP status of the answer."),
    _n("text", "string", "The answer's body as text, its last 2,000 characters."),
    _n("json", "any", "The body decoded as JSON; null when it is not JSON."),
)

COMMAND_RESULT: tuple[Name, ...] = (
    _n("exit_code", "integer or null", "The program's exit code; null when it was killed on its timeout."),
    _n("stdout_tail", "string", "The last 4,000 characters of its standard output."),
    _n("stderr_tail", "string", "The last 4,000 characters of its standard error.", when="it was not timed out"),
    _n("timed_out", "boolean", "true: it ran past its timeout and its process group was killed.", when="timed out"),
    _n("json", "any", "Standard output parsed as JSON.", when="stdout is a JSON object or array"),
    _n("facts", "any", "The same as `json` (the name older playbooks read).", when="stdout is a JSON object or array"),
)

_OUTPUTS = _n(
    "outputs",
    "object",
    "The normalised answer playbooks read: a JSON object answer's own keys, then the binding's `outputs:` "
    "mapping over `result` (a name whose expression finds nothing is null).",
    _n("<name>", "any", "One output, by the name the binding (or the answer) gives it."),
)

CAPABILITY_RESULT: tuple[Name, ...] = (
    *(
        Name(n.name, n.type, n.description + " (an `http` binding)", n.children, "the binding is `http`")
        for n in HTTP_RESULT
        if n.name != "json"
    ),
    *(
        Name(n.name, n.type, n.description + " (a `command` binding)", n.children, n.when or "the binding is `command`")
        for n in COMMAND_RESULT
        if n.name != "json"
    ),
    _n(
        "json",
        "any",
        "An `http` binding's body as JSON (null when not JSON); a `command` binding's stdout as JSON.",
        when="always for `http`; a `command` whose stdout is JSON",
    ),
    _OUTPUTS,
)

# The result a verify step's `expect` judges, by what its `check` names.
RESULTS: dict[str, tuple[Name, ...]] = {
    "http": HTTP_RESULT,
    "command": COMMAND_RESULT,
    "capability": CAPABILITY_RESULT,
}

# -- steps.<id>: what an earlier step left ---------------------------------------------------------------------

STEP_OUTPUTS: dict[str, tuple[Name, ...]] = {
    "http": HTTP_RESULT,
    "command": COMMAND_RESULT,
    "capability": CAPABILITY_RESULT,
    "verify": (
        _n("passed", "boolean", "Whether `expect` held."),
        _n("result", "object", "What the check answered: a `result` of the check's kind (above)."),
    ),
    "sleep": (_n("slept_until", "number", "When the sleep ended (Unix seconds)."),),
    "approval": (
        _n("approved", "boolean", "Whether it was approved (a rejection ends the run)."),
        _n("by", "string", "Who decided: `operator`, or `timeout` when the deadline's `on_timeout` did."),
        _n("comment", "string or null", "The operator's comment."),
        _n("decided_at", "number", "When (Unix seconds)."),
    ),
    "diagnose": (
        _n(
            "outputs",
            "object",
            "The cause, read like a capability's outputs (the analysis capability's outputs refine the evidence).",
            _n("cause", "string", "`code`, `config`, `unknown`, or the analysis's own word."),
            _n("details", "string", "Why, in words."),
            _n("source", "string", "What decided: the evidence or the analysis."),
            _n("suspect_file", "string or null", "The repository file the traceback points at."),
            _n("suspect_line", "integer or null", "Its line."),
            _n("suspect_function", "string or null", "Its function."),
            _n("recommended_timeout_seconds", "number or null", "A raised limit, for a config cause."),
            open_=True,
        ),
        _n("evidence", "object", "What mendloop's own evidence alone said (the same keys as `outputs`).", open_=True),
        _n("analysis", "object or null", "The analysis capability's whole result; null when it is not bound."),
    ),
}

_PATCH = _n(
    "patch",
    "object",
    "The coding agent's completion of the run's work order (a claim: the tests are mendloop's own to run).",
    _n("tests_passed", "boolean", "What the agent (or its runner) said of the tests."),
    _n("files_changed", "integer or null", "Files the agent says it changed."),
    _n("diff_url", "string or null", "Where the diff is served (`/patches/diffs/{id}.diff`), if one was sent."),
    _n("summary", "string", "The agent's own summary.", when="the agent sent one"),
    when="the run escalated and its work order was completed",
    open_=True,
)

_APPLY_PATCH = _n(
    "apply_patch",
    "object",
    "mendloop's own check, test and commit of the agent's diff (or why it was refused).",
    _n("commit", "string", "The commit that landed.", when="the patch was applied"),
    _n("files_changed", "integer", "Files the commit changes.", when="mendloop applied it"),
    _n("files", "list", "Paths the commit changes.", _n(ITEM, "string", "A path."), when="the patch was applied"),
    _n(
        "tests_passed",
        "boolean or null",
        "mendloop's test run; null without a test command.",
        when="mendloop applied it",
    ),
    _n("tests_output", "string or null", "The tail of the tests' output.", when="mendloop applied it"),
    _n("tests_message", "string or null", "The verdict in words.", when="mendloop applied it"),
    _n("already_applied", "boolean", "The agent runner had committed it itself.", when="the runner committed it"),
    _n("judged", "string", "`parent..commit`: the range that was checked.", when="the runner named its commit"),
    _n("rejected", "string", "Why it was refused (`unsafe_patch`, `tests_failed`, ...).", when="it was refused"),
    _n("failed", "string", "The error type, when the pipeline itself broke.", when="the pipeline failed"),
    _n("message", "string", "What was wrong.", when="it was refused or the pipeline failed"),
    when="the run escalated and a diff was held for it",
)

# -- the event -------------------------------------------------------------------------------------------------

_FRAME = _n(
    ITEM,
    "object",
    "One frame, outermost first (the last 50).",
    _n("file", "string", "The file as the traceback names it."),
    _n("line", "integer", "The line number."),
    _n("function", "string", "The function (`<module>` at the top level)."),
)

EVENT: Name = _n(
    "event",
    "object",
    "What started the run. A trigger: its fields and its `event_payload`. A log detection: the pattern's named "
    "groups and the fields below. A published event (`POST /events`): its payload, `event_type` and `line`.",
    _n("error_type", "string", "The error type.", when="a trigger, or a pattern with an `error_type`"),
    _n("description", "string", "The trigger's description.", when="a trigger"),
    _n("file_path", "string", "The file the trigger names (`--file-path`).", when="a trigger that names one"),
    _n("event_type", "string", "The event type (`log_pattern.error`, `pipeline.timeout`, ...).", when="a detection"),
    _n("line", "string", "The matched log record (a whole traceback for a multi-line one).", when="a detection"),
    _n("pattern", "string", "The watcher pattern's name.", when="a log detection"),
    _n("traceback", "string", "The traceback's text.", when="a log detection of a Python traceback"),
    _n(
        "exception",
        "object",
        "The parsed traceback (`infra/traceback.py`).",
        _n("type", "string", "The exception's type (`KeyError`; `unknown` if the last line is missing)."),
        _n("message", "string", "The exception's message (up to 2,000 characters)."),
        _n("frames", "list", "The stack, outermost first.", _FRAME),
        when="a log detection of a Python traceback",
    ),
    _n("host", "string", "Metadata of a raw record from a shipper.", when="a raw record that carries it"),
    _n("<field>", "any", "A named group of the pattern's regex, or a published event's payload key.", when="given"),
    open_=True,
)

# -- a step's scope ---------------------------------------------------------------------------------------------

STEP_CONTEXT: tuple[Name, ...] = (
    EVENT,
    _n(
        "context",
        "object",
        "The run's context: the caller's facts (a trigger's `context`; a detection's fields), then these.",
        _n("error_type", "string", "The run's error type."),
        _n("description", "string", "The run's description."),
        _n("target", "string or null", "The target the run acts on."),
        _n("event", "object", "The same as `event`."),
        _n("file_path", "string", "The file the trigger names.", when="a trigger that names one"),
        _n("fingerprint", "string", "The detection's fingerprint (its incident).", when="a detection"),
        _n("<key>", "any", "A key of the trigger's `context`, or of the detection's fields.", when="given"),
        open_=True,
    ),
    _n(
        "steps",
        "object",
        "What earlier steps left, by step id (a skipped step, an escalation and a failed step without "
        "`on_failure: continue` or `goto` leave nothing).",
        _n(
            "<id>",
            "object",
            "An earlier step's output: its action's result (see Step outputs below). `steps.patch` and "
            "`steps.apply_patch` are the agent's completion and mendloop's apply of it.",
        ),
        _PATCH,
        _APPLY_PATCH,
    ),
    _n("error_type", "string", "The run's error type (`database_connection`, ...)."),
    _n("description", "string", "The run's description (a trigger's, or the detected line)."),
    _n(
        "run",
        "object",
        "The run itself.",
        _n("id", "string", "`run_YYYYMMDD_HHMMSS_NNNNNN`."),
        _n("escalated", "boolean", "A work order was created for it."),
        _n("work_order_id", "string or null", "Its work order."),
        _n("patch", "object or null", "The same as `steps.patch`."),
        _n("component", "string or null", "The component whose trust the run moves."),
        _n("playbook_id", "string", "The playbook it runs."),
    ),
    _n(
        "target",
        "object",
        "The target the run acts on, from the config's `targets:`.",
        _n("name", "string or null", "Its name."),
        _n(
            "base_url",
            "string or null",
            "`base_url`: the one expression trusted with a URL's origin.",
            when="configured",
        ),
        _n(
            "allowed_hosts",
            "list",
            "`allowed_hosts`.",
            _n(ITEM, "string", "host or host:port."),
            when="configured",
        ),
        _n("repository", "string or null", "The target's git repository.", when="configured"),
        _n(
            "vars",
            "object",
            "The target's `vars:`.",
            _n("<name>", "any", "One variable."),
            when="configured",
        ),
    ),
)

# A verify step's `expect` reads the step's scope and this.
RESULT_NAME = _n("result", "object", "What the check answered: the result of its kind (see Results).")

# A capability binding's argv, URL, headers and JSON body render over these.
BINDING_CONTEXT: tuple[Name, ...] = (
    _n("args", "object", "The step's `with.args`, rendered.", _n("<name>", "any", "One argument.")),
    STEP_CONTEXT[-1],
    _n("idempotency_key", "string", "`run_id:step_id:attempt`, the same when a crashed step runs again."),
)

STEP_NAMES: frozenset[str] = frozenset(n.name for n in STEP_CONTEXT)
RESULT_NAMES: frozenset[str] = frozenset({RESULT_NAME.name})


# -- checking a real dict against the schema ------------------------------------------------------------------


def undocumented(value: Any, names: Sequence[Name], path: str = "") -> list[str]:
    """Paths of keys in `value` the schema does not describe (inside an `open` object, any key is described)."""
    return list(_walk(value, names, path, open_=False, missing=False))


def missing(value: Any, names: Sequence[Name], path: str = "") -> list[str]:
    """Paths of keys the schema says are always there that `value` lacks."""
    return list(_walk(value, names, path, open_=False, missing=True))


def _walk(value: Any, names: Sequence[Name], path: str, *, open_: bool, missing: bool) -> Iterator[str]:
    if isinstance(value, list):
        item = next((n for n in names if n.name == ITEM), None)
        if item is not None:
            for i, element in enumerate(value):
                yield from _walk(element, item.children, f"{path}[{i}]", open_=item.open, missing=missing)
        return
    if not isinstance(value, Mapping):
        return
    by_name = {n.name: n for n in names}
    wildcard = next((n for n in names if n.name.startswith(ANY_KEY_PREFIX)), None)
    if missing:
        yield from (_join(path, n.name) for n in names if n.always and n.name[0] not in "<[" and n.name not in value)
    for key, child in value.items():
        where = _join(path, str(key))
        node = by_name.get(str(key)) or wildcard
        if node is None:
            if not open_ and not missing:
                yield where
            continue
        if node.children:
            yield from _walk(child, node.children, where, open_=node.open, missing=missing)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- the reference ---------------------------------------------------------------------------------------------


def _rows(names: Sequence[Name], prefix: str) -> Iterator[str]:
    for n in names:
        path = f"{prefix}{n.name}" if n.name == ITEM else (f"{prefix}.{n.name}" if prefix else n.name)
        when = n.when or ("each" if n.name == ITEM or n.name.startswith(ANY_KEY_PREFIX) else "always")
        extra = " Other keys may appear." if n.open else ""
        yield f"| `{path}` | {n.type} | {when} | {n.description}{extra} |"
        yield from _rows(n.children, path)


def _table(names: Sequence[Name], prefix: str = "") -> list[str]:
    return ["| name | type | present | description |", "|---|---|---|---|", *_rows(names, prefix)]


def markdown() -> str:
    """docs/template-context.md."""
    lines = [
        "# The template context",
        "",
        "<!-- Generated from mendloop/playbooks/context_schema.py by `mendloop playbooks context --markdown`; do not",
        "edit by hand. tests/test_template_context.py fails when this file and the code disagree. -->",
        "",
        "Every name a playbook's templates can read. A step's `with` and `when` see the step scope; a verify "
        "step's `expect` sees it and `result`; a capability binding's `argv`, `url`, `headers` and `json` see "
        "the binding scope, and its `expect` and `outputs` see only `result`. `config check` refuses a top-level "
        "name outside these. `mendloop playbooks render FILE --event EVENT.json` shows what a playbook's steps "
        "render to for an event, without running them.",
        "",
        "`present` says when a key is there (`always`: whenever its parent is); a missing name fails a `with` "
        "template (strict) and is false in a `when` or `expect`, null in a binding's `outputs`. `<id>` stands for "
        "any key, `[]` for each item of a list.",
        "",
        "## Step scope (`with`, `when`, a verify step's `expect`)",
        "",
        *_table(STEP_CONTEXT),
        "",
        "## Step outputs (`steps.<id>`, by the step's action)",
        "",
    ]
    for action, names in STEP_OUTPUTS.items():
        lines += [f"### `{action}`", "", *_table(names, f"steps.<{action} step>"), ""]
    lines += [
        "## Results (`result`: a verify step's `expect`; a binding's `expect` and `outputs`)",
        "",
        "A capability's `result` is its binding's `http` or `command` result plus `outputs`.",
        "",
    ]
    for kind, names in RESULTS.items():
        lines += [f"### `{kind}`", "", *_table(names, "result"), ""]
    lines += [
        "## Binding scope (a capability binding's `argv`, `url`, `headers`, `json`)",
        "",
        *_table(BINDING_CONTEXT),
    ]
    return "\n".join(lines) + "\n"


def _tree(names: Sequence[Name]) -> list[dict[str, Any]]:
    return [
        {
            "name": n.name,
            "type": n.type,
            "present": n.when or "always",
            "description": n.description,
            "open": n.open,
            "children": _tree(n.children),
        }
        for n in names
    ]


def as_json() -> dict[str, Any]:
    """The schema as data (`mendloop playbooks context --json`)."""
    return {
        "step": _tree(STEP_CONTEXT),
        "step_outputs": {action: _tree(names) for action, names in STEP_OUTPUTS.items()},
        "results": {kind: _tree(names) for kind, names in RESULTS.items()},
        "binding": _tree(BINDING_CONTEXT),
    }


def names_text() -> str:
    """One name a line, with its type: the step scope, then `result` by kind."""
    lines = ["step scope (with, when, expect):"]
    lines += [f"  {row}" for row in _paths(STEP_CONTEXT, "")]
    for kind, names in RESULTS.items():
        lines.append(f"result of {kind} (a verify step's expect; a binding's expect and outputs):")
        lines += [f"  {row}" for row in _paths(names, "result")]
    lines.append("binding scope (a capability binding's argv, url, headers, json):")
    lines += [f"  {row}" for row in _paths(BINDING_CONTEXT, "")]
    return "\n".join(lines) + "\n"


def _paths(names: Sequence[Name], prefix: str) -> Iterator[str]:
    for n in names:
        path = f"{prefix}{n.name}" if n.name == ITEM else (f"{prefix}.{n.name}" if prefix else n.name)
        yield f"{path}: {n.type}" + ("" if n.always else f" ({n.when})")
        yield from _paths(n.children, path)
