"""A playbook's steps as they would run for one event, without running any of them (`mendloop playbooks render`).

Each step's `with` is rendered against the event, the way the step loop would render it at the start of a run
(`engine/step_loop.py` `_scope`, `domain/runs.py` `plan`), and its `when` evaluated. What earlier steps will
answer is not known before they run: a value or a condition that reads `steps.<id>` is shown as depending on it,
never guessed. A capability step shows the call its binding would make (the argv, or the method and URL after the
same URL guard the http action applies), and an optional one the target does not bind is marked skipped.

Nothing here sends a request or starts a process: rendering is Jinja over dicts, and the checks it reuses
(`guard_url`, `check_argv`) are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mendloop.config import CapabilityBinding, Settings
from mendloop.errors import ActionError
from mendloop.playbooks.actions.capability import BINDING_TRACKING, Capabilities
from mendloop.playbooks.actions.command import as_arg, check_argv
from mendloop.playbooks.actions.http import guard_url
from mendloop.playbooks.loader import CompiledPlaybook, CompiledStep
from mendloop.playbooks.templates import TemplateRenderError, Templates, TrackedUrl, Tracking, names_used

# The strings of a step's `with` that the step loop compiles tracked (`loader._TRACKING`): rendered the same way
# here, so an argv or a URL is refused or encoded as it would be.
_TRACKING: dict[str, Tracking] = {
    "command": {("argv", "*"): "arg"},
    "http": {("url",): "url"},
    "verify": {("check", "command", "argv", "*"): "arg", ("check", "http", "url"): "url"},
}
RUN_ID = "run_render"


class _Pending(dict[str, Any]):
    """`steps` before any step ran: empty, and it remembers which step ids a template asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def __getitem__(self, key: str) -> Any:
        self.asked.append(str(key))
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.append(str(key))
        return default

    def __contains__(self, key: object) -> bool:
        self.asked.append(str(key))
        return False


@dataclass
class StepPlan:
    index: int
    id: str
    action: str
    title: str
    optional: bool
    # "would run", "skipped: when is false", "skipped: not bound", "depends on steps.X" (its `when`), "would fail"
    status: str
    when: str | None = None
    when_value: bool | None = None
    depends_on: list[str] = field(default_factory=list)
    params: Any = None
    call: dict[str, Any] | None = None
    # What stops the step (it would fail), and what is merely worth knowing.
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.id,
            "action": self.action,
            "title": self.title,
            "optional": self.optional,
            "status": self.status,
            "when": self.when,
            "when_value": self.when_value,
            "depends_on": self.depends_on,
            "with": self.params,
            "call": self.call,
            "problems": self.problems,
            "notes": self.notes,
        }


@dataclass
class Plan:
    playbook_id: str
    source: str
    target: str | None
    steps: list[StepPlan]

    def as_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook_id,
            "source": self.source,
            "target": self.target,
            "steps": [s.as_dict() for s in self.steps],
        }


def scope_for(pb: CompiledPlaybook, event: Mapping[str, Any], target_vars: dict[str, Any]) -> dict[str, Any]:
    """The step scope at the start of a run started by `event` (the names of `context_schema.STEP_CONTEXT`)."""
    handled = pb.model.handles.error_types
    error_type = str(event.get("error_type") or (handled[0] if handled else "unknown"))
    description = str(event.get("description") or event.get("line") or "")
    context = {"error_type": error_type, "description": description, "target": target_vars.get("name")}
    return {
        "event": dict(event),
        "context": {**context, "event": dict(event)},
        "steps": _Pending(),
        "error_type": error_type,
        "description": description,
        "run": {
            "id": RUN_ID,
            "escalated": False,
            "work_order_id": None,
            "patch": None,
            "component": target_vars.get("name"),
            "playbook_id": pb.id,
        },
        "target": target_vars,
    }


def plan(
    pb: CompiledPlaybook,
    event: Mapping[str, Any],
    settings: Settings,
    *,
    target: str | None = None,
    templates: Templates | None = None,
) -> Plan:
    templates = templates or Templates()
    capabilities = Capabilities(settings.targets, templates)
    name = target or settings.target_for(pb.model.target)
    target_vars = capabilities.target_vars(name)
    where = _Where(settings, capabilities, name, target_vars, templates)
    return Plan(pb.id, pb.source, name, [_step(i, cs, event, pb, where) for i, cs in enumerate(pb.steps)])


@dataclass(frozen=True, slots=True)
class _Where:
    """What a render runs against: the config, its compiled bindings, and the target."""

    settings: Settings
    capabilities: Capabilities
    target: str | None
    target_vars: dict[str, Any]
    templates: Templates


def _step(index: int, cs: CompiledStep, event: Mapping[str, Any], pb: CompiledPlaybook, where: _Where) -> StepPlan:
    step = cs.step
    target_vars = where.target_vars
    out = StepPlan(index, step.id, step.action, step.title, step.optional, "would run", when=step.when)
    if cs.when is not None:
        scope = scope_for(pb, event, target_vars)
        try:
            value = cs.when(scope)
        except TemplateRenderError as exc:
            value = False
            out.problems.append(f"when: {exc}")
        asked = _asked(scope)
        if asked:
            out.depends_on += asked
            out.status = "depends on " + ", ".join(asked)
        elif "run" in names_used(cs.step.when or "") and any(s.step.action == "escalate" for s in pb.steps[:index]):
            # `run.escalated`, `run.patch`, ... change when an earlier step escalates: not known before it runs.
            out.depends_on.append("run")
            out.status = "depends on run (an earlier step escalates)"
        else:
            out.when_value = bool(value)
            if not value:
                out.status = "skipped: when is false"
    params = dict(step.params)
    if step.action == "verify":
        params.pop("expect", None)
    renderer = _Renderer(pb, event, target_vars, where.templates, out)
    out.params = renderer.value(params, _TRACKING.get(step.action), ())
    if step.action == "verify":
        out.params["expect"] = step.params.get("expect")
    rendered: dict[str, Any] = out.params
    if step.action == "command":
        out.call = _command_call(rendered, out)
    elif step.action == "http":
        out.call = _http_call(rendered, out)
    elif step.action == "capability":
        out.call = _capability_call(step.id, rendered.get("name"), rendered.get("args"), where, out)
    elif step.action == "verify":
        check = rendered.get("check") or {}
        if "capability" in check:
            out.call = _capability_call(step.id, check.get("capability"), check.get("args"), where, out)
        elif "http" in check:
            out.call = _http_call(dict(check["http"]), out)
        elif "command" in check:
            out.call = _command_call(dict(check["command"]), out)
    elif step.action == "diagnose" and isinstance(rendered.get("analysis"), str):
        analysis = rendered["analysis"]
        if where.capabilities.is_bound(where.target, analysis):
            out.call = _capability_call(step.id, analysis, rendered.get("args"), where, out)
        else:
            out.notes.append(f"analysis capability {analysis!r} is not bound: the evidence alone decides")
    if out.problems and out.status == "would run":
        out.status = "would fail"
    out.depends_on = sorted(set(out.depends_on), key=out.depends_on.index)
    return out


class _Renderer:
    """Renders a `with` leaf by leaf, so one value that waits for an earlier step does not hide the others."""

    def __init__(
        self,
        pb: CompiledPlaybook,
        event: Mapping[str, Any],
        target_vars: dict[str, Any],
        templates: Templates,
        out: StepPlan,
    ) -> None:
        self.pb, self.event, self.target_vars, self.templates, self.out = pb, event, target_vars, templates, out

    def value(self, value: Any, track: Tracking | None, path: tuple[str, ...], where: str = "with") -> Any:
        """`path` is the tracking path (`*` for any list index), `where` the field as messages name it."""
        if isinstance(value, Mapping):
            return {k: self.value(v, track, (*path, str(k)), f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, track, (*path, "*"), f"{where}.{i}") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        kind = track.get(path) if track else None
        renderer = self.templates.compile_tracked(value, kind) if kind else self.templates.compile_value(value)
        scope = scope_for(self.pb, self.event, self.target_vars)
        try:
            return renderer(scope)
        except TemplateRenderError as exc:
            asked = _asked(scope)
            if asked:
                self.out.depends_on += asked
                return "<depends on " + ", ".join(asked) + ">"
            self.out.problems.append(f"{where}: {exc}")
            return "<cannot render>"


def _asked(scope: Mapping[str, Any]) -> list[str]:
    steps = scope["steps"]
    return [f"steps.{a}" for a in dict.fromkeys(steps.asked)] if isinstance(steps, _Pending) else []


def _waits(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith(("<depends on ", "<cannot render>"))
    if isinstance(value, Mapping):
        return any(_waits(v) for v in value.values())
    if isinstance(value, list):
        return any(_waits(v) for v in value)
    return False


def _command_call(spec: Mapping[str, Any], out: StepPlan, *, option_positions: Any = None) -> dict[str, Any]:
    argv = [as_arg(a) for a in spec.get("argv") or []]
    positions = option_positions if option_positions is not None else spec.get("option_positions") or ()
    if not _waits(argv):
        try:
            check_argv(argv, frozenset(int(p) for p in positions))
        except ActionError as exc:
            out.problems.append(exc.message)
    call: dict[str, Any] = {"kind": "command", "argv": [str(a) for a in argv]}
    if spec.get("cwd"):
        call["cwd"] = spec["cwd"]
    if spec.get("env"):
        call["env"] = dict(spec["env"])
    return call


def _http_call(spec: Mapping[str, Any], out: StepPlan, *, body: Any = None) -> dict[str, Any]:
    method = str(spec.get("method", "GET")).upper()
    url = spec.get("url")
    shown = str(url)
    if isinstance(url, TrackedUrl) and not _waits(shown):
        try:
            shown = guard_url(method, url)
        except ActionError as exc:
            out.problems.append(exc.message)
    call: dict[str, Any] = {"kind": "http", "method": method, "url": shown}
    json_body = body if body is not None else spec.get("json")
    if json_body is not None:
        call["json"] = json_body
    if spec.get("headers"):
        call["headers"] = dict(spec["headers"])
    return call


def _capability_call(step_id: str, name: Any, args: Any, where: _Where, out: StepPlan) -> dict[str, Any] | None:
    cname = str(name)
    target = where.target
    if _waits(name):
        out.notes.append(f"the capability's name is known only when an earlier step has run ({cname})")
        return None
    if target is None:
        out.problems.append(f"capability {cname!r} needs a target: set default_target or the playbook's target")
        return None
    if not where.capabilities.is_bound(target, cname):
        if out.optional:
            if not out.status.startswith("skipped"):
                out.status = "skipped: not bound"
            out.notes.append(f"optional capability {cname!r} is not bound for target {target!r}")
            return None
        out.problems.append(
            f"capability {cname!r} is not bound on target {target!r}: bind it under targets.{target}.capabilities"
        )
        return None
    binding: CapabilityBinding = where.settings.targets[target].capabilities[cname]
    given = dict(args) if isinstance(args, Mapping) else {}
    spec_src = binding.command.model_dump() if binding.command is not None else None
    if spec_src is None:
        assert binding.http is not None
        spec_src = binding.http.model_dump(by_alias=True)
    scope = {"args": given, "target": where.target_vars, "idempotency_key": f"{RUN_ID}:{step_id}:1"}
    try:
        spec = where.templates.compile_value(spec_src, track=BINDING_TRACKING)(scope)
    except TemplateRenderError as exc:
        out.problems.append(f"capability {cname!r}: {exc}")
        return None
    if binding.command is not None:
        call = _command_call(spec, out, option_positions=())
    else:
        # As the capability action sends it: an explicit body, else the arguments (GET carries none).
        body = spec.get("json")
        if body is None and spec["method"] != "GET" and given:
            body = given
        call = _http_call(spec, out, body=body)
    call["capability"] = cname
    if binding.expect:
        call["expect"] = binding.expect
    if binding.outputs:
        call["outputs"] = dict(binding.outputs)
    return call


def text(p: Plan) -> str:
    """The plan for a terminal: one block per step."""
    lines = [f"playbook {p.playbook_id} ({p.source}), target {p.target or '(none)'}; nothing was run"]
    for s in p.steps:
        flag = " [optional]" if s.optional else ""
        lines.append(f"{s.index + 1}. {s.id} ({s.action}){flag}: {s.status}")
        if s.when is not None:
            value = "depends on " + ", ".join(s.depends_on) if s.when_value is None else s.when_value
            lines.append(f"   when: {s.when}  -> {str(value).lower() if isinstance(value, bool) else value}")
        call = s.call
        if call and call["kind"] == "http":
            lines.append(
                f"   calls: {call['method']} {call['url']}"
                + (f"  (capability {call['capability']})" if "capability" in call else "")
            )
            if "json" in call:
                lines.append(f"   body: {call['json']}")
        elif call and call["kind"] == "command":
            lines.append(
                f"   runs: {call['argv']}" + (f"  (capability {call['capability']})" if "capability" in call else "")
            )
        elif s.params:
            lines.append(f"   with: {s.params}")
        if call and call.get("expect"):
            lines.append(f"   binding expects: {call['expect']}")
        if s.action == "verify":
            lines.append(f"   expect: {s.params.get('expect')}")
        lines += [f"   problem: {problem}" for problem in s.problems]
        lines += [f"   note: {note}" for note in s.notes]
    return "\n".join(lines) + "\n"
