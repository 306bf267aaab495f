"""Everything `serve` needs of a configuration, checked before it starts, every problem at once: what
`mendloop config check` reports and what `serve` refuses to start with (exit 2, one line a problem).

The settings' own schema (types, YAML, regexes) is checked when they load (`config.load_settings`, which reports
every schema error); this adds what needs the playbooks and the routing table:

- every playbook file loads (each bad one named with its field);
- the capability bindings compile;
- routing is complete (no route to a missing playbook, no type two playbooks claim unsettled);
- every capability a routed playbook calls is bound on the target it runs against, or its step is `optional`:
  an error for a playbook the operator chose (their own, or one `routing:` names), a warning for a built-in that
  is merely available;
- every name a step's templates read is one the step's scope has (`playbooks/templates.py` STEP_SCOPE);
- a watcher pattern whose detections route to no playbook is a warning: they would be counted and do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mendloop.config import Settings
from mendloop.domain.records import PlaybookRef
from mendloop.errors import ConfigError, PlaybookError
from mendloop.playbooks.actions.capability import Capabilities
from mendloop.playbooks.loader import CompiledPlaybook, PlaybookSet, builtin_files, load_file
from mendloop.playbooks.model import Step
from mendloop.playbooks.templates import RESULT_SCOPE, STEP_SCOPE, TemplateCompileError, Templates, names_used
from mendloop.rules.routing import Claim, routing_problems

__all__ = ["Problem", "check", "require"]


@dataclass(frozen=True, slots=True)
class Problem:
    message: str
    warning: bool = False

    def line(self) -> str:
        return f"{'warning' if self.warning else 'error'}: {self.message}"


def require(settings: Settings) -> list[Problem]:
    """`check`, raising one ConfigError holding every error; returns the warnings."""
    problems = check(settings)
    errors = [p.message for p in problems if not p.warning]
    if errors:
        raise ConfigError(errors[0], problems=errors)
    return problems


def check(settings: Settings) -> list[Problem]:
    """Every problem of `settings` that would stop `serve` (errors) or make part of it do nothing (warnings)."""
    templates = Templates()
    problems: list[Problem] = []
    playbooks, user_ids = _load_playbooks(settings, templates, problems)
    try:
        capabilities: Capabilities | None = Capabilities(settings.targets, templates)
    except ConfigError as exc:
        problems.append(Problem(exc.message))
        capabilities = None
    claims = [
        Claim(
            PlaybookRef(pb.id, pb.version, pb.document),
            tuple(pb.model.handles.error_types),
            tuple(pb.model.handles.event_types),
        )
        for pb in playbooks.by_id.values()
    ]
    problems += [Problem(message) for _, message in routing_problems(settings.routing, claims)]
    routed = _routed(settings, claims)
    unusable: list[str] = []
    for pb in sorted(playbooks.by_id.values(), key=lambda p: p.id):
        problems += _template_problems(pb)
        if capabilities is None or pb.id not in routed:
            continue
        why = _cannot_run(settings, capabilities, pb)
        if why is None:
            continue
        if pb.id in user_ids or pb.id in settings.routing.values():
            routes = ", ".join(sorted(routed[pb.id]))
            problems.append(Problem(f"playbook {pb.id!r} (routes {routes}) can't run: {why}"))
        else:
            unusable.append(f"{pb.id} ({why})")
    if unusable:
        # Built-ins nobody chose are merely available: one line, not one a playbook.
        problems.append(Problem("built-in playbooks that can't run here: " + "; ".join(unusable), warning=True))
    problems += _unrouted_patterns(settings, claims)
    return problems


def _load_playbooks(settings: Settings, templates: Templates, problems: list[Problem]) -> tuple[PlaybookSet, set[str]]:
    """The playbooks that load, later directories over earlier ones by id (as PlaybookSet.load does), and the ids
    of the operator's own."""
    loaded: list[CompiledPlaybook] = []
    user_ids: set[str] = set()
    for path, builtin in _playbook_files(settings, problems):
        try:
            pb = load_file(path, templates)
        except PlaybookError as exc:
            problems.append(Problem(exc.message))
            continue
        loaded.append(pb)
        if not builtin:
            user_ids.add(pb.id)
    return PlaybookSet(loaded), user_ids


def _playbook_files(settings: Settings, problems: list[Problem]) -> Iterator[tuple[Path, bool]]:
    for path in builtin_files():
        yield path, True
    for directory in settings.playbook_dirs:
        if not directory.is_dir():
            problems.append(Problem(f"{directory}: playbook directory does not exist"))
            continue
        for path in sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml")):
            yield path, False


def _routed(settings: Settings, claims: list[Claim]) -> dict[str, list[str]]:
    """Playbook id → the types that route to it."""
    routes: dict[str, list[str]] = {}
    for claim in claims:
        for key in (*claim.error_types, *claim.event_types):
            if key not in settings.routing:
                routes.setdefault(claim.ref.id, []).append(key)
    for key, playbook_id in settings.routing.items():
        routes.setdefault(playbook_id, []).append(key)
    return routes


def _cannot_run(settings: Settings, capabilities: Capabilities, pb: CompiledPlaybook) -> str | None:
    """Why `pb` can't run its capability steps, or None when it can."""
    needed = [(step, name) for step in pb.model.steps if (name := _capability_of(step)) is not None]
    if not needed:
        return None
    target = settings.target_for(pb.model.target)
    if target is None:
        return "it calls capabilities and has no target: set its `target` or `default_target`"
    missing = [
        f"{name} (step {step.id})"
        for step, name in needed
        if not step.optional and not capabilities.is_bound(target, name)
    ]
    if not missing:
        return None
    return (
        f"not bound on target {target!r}: {', '.join(missing)}; bind them under targets.{target}.capabilities "
        "or mark the steps `optional`"
    )


def _capability_of(step: Step) -> str | None:
    """The capability a step calls, when its name is literal text (a templated name is known only at run time)."""
    if step.action == "capability":
        name = step.params.get("name")
    elif step.action == "verify" and isinstance(step.params.get("check"), dict):
        name = step.params["check"].get("capability")
    else:
        return None
    return name if isinstance(name, str) and "{{" not in name else None


def _template_problems(pb: CompiledPlaybook) -> list[Problem]:
    problems: list[Problem] = []
    for i, step in enumerate(pb.model.steps):
        sources: list[tuple[str, str, frozenset[str]]] = []
        if step.when:
            sources.append(("when", step.when, STEP_SCOPE))
        for where, text in _strings(step.params, "with"):
            scope = STEP_SCOPE | RESULT_SCOPE if where == "with.expect" else STEP_SCOPE
            sources.append((where, text, scope))
        for where, text, scope in sources:
            if where != "when" and where != "with.expect" and "{{" not in text and "{%" not in text:
                continue  # plain text: no names
            try:
                unknown = sorted(names_used(text) - scope)
            except TemplateCompileError as exc:
                problems.append(Problem(f"{pb.source}: steps.{i}.{where}: {exc}"))
                continue
            if unknown:
                problems.append(
                    Problem(
                        f"{pb.source}: steps.{i}.{where} ({step.id}): unknown name{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; a step's templates see {', '.join(sorted(scope))} "
                        "(docs/template-context.md)"
                    )
                )
    return problems


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}.{index}")


def _unrouted_patterns(settings: Settings, claims: list[Claim]) -> list[Problem]:
    error_types = {k for k in settings.routing if "." not in k} | {e for c in claims for e in c.error_types}
    event_types = {k for k in settings.routing if "." in k} | {e for c in claims for e in c.event_types}
    mapped = {**_event_error_types(settings)}
    problems: list[Problem] = []
    for w in settings.watchers:
        for j, p in enumerate(w.patterns):
            error_type = p.error_type or mapped.get(p.event_type)
            if (error_type and error_type in error_types) or p.event_type in event_types:
                continue
            problems.append(
                Problem(
                    f"watchers.{w.name}.patterns.{j} ({p.name}): its detections (event type {p.event_type!r}"
                    + (f", error type {error_type!r}" if error_type else "")
                    + ") route to no playbook; they are counted on incidents and start nothing",
                    warning=True,
                )
            )
    return problems


def _event_error_types(settings: Settings) -> dict[str, str]:
    return settings.event_error_table()
