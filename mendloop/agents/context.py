"""The context a coding agent gets with a work order: the error and its events, log lines, the parsed
traceback located in the repository, the repository and base commit, the test command (with its `test_env` and
`test_cwd`), the constraints, and the past fixes of the same failure or the same code (`past_fixes`, with
`regression` when this run is one: domain/fix_memory.py). Everything passes through the redactor before it is
stored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mendloop.config import TargetConfig
from mendloop.domain import fix_memory
from mendloop.domain.fix_memory import Frame
from mendloop.domain.records import EventRecord, Run
from mendloop.domain.test_verdict import failing_tests_of
from mendloop.infra import git, traceback
from mendloop.infra.redact import Redactor


def build(
    *,
    run: Run,
    extra: dict[str, Any],
    target_name: str | None,
    target: TargetConfig | None,
    events: Sequence[EventRecord],
    redactor: Redactor,
    failure: dict[str, Any] | None = None,
    recall: Callable[[Sequence[Frame]], list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], str | None, str | None]:
    """Returns (context, repository, base_commit). `recall`: the past fixes relevant to this run's incident and
    the traceback's frames (`storage.fixes.FixStore.recall`)."""
    trigger = dict(run.context.get("event") or {})
    # The log lines around the trigger as its stored event has them now: after-lines arrive after the run began.
    held = trigger.pop("log_context", None)  # shown once, as `log_lines`
    stored = next((e.payload.get("log_context") for e in events if e.id == run.trigger_event_id), None)
    repository = Path(target.repository).resolve() if target and target.repository else None
    base_commit = git.head_or_none(repository, timeout=10) if repository and repository.is_dir() else None
    lines = trigger.get("lines") or ([trigger["line"]] if isinstance(trigger.get("line"), str) else [])
    context: dict[str, Any] = {
        "error_type": run.error_type,
        "description": run.description,
        **({"file_path": run.context["file_path"]} if run.context.get("file_path") else {}),
        **{k: v for k, v in run.context.items() if k not in ("event", "target", "error_type", "description")},
        **extra,
        "error": {
            "error_type": run.error_type,
            "description": run.description,
            "event": trigger,
        },
        "events": [{"type": e.type, "message": e.message, "time": e.created_at} for e in events][-20:],
        **_log_lines(stored or held, trigger),
        "target": target_name,
        "run_id": run.id,
        "playbook_id": run.playbook_id,
    }
    tb_text = next(
        (
            t
            for t in (trigger.get("traceback"), "\n".join(lines), run.description)
            if isinstance(t, str) and "Traceback" in t
        ),
        None,
    )
    if tb_text:
        parsed = traceback.parse(tb_text)
        if parsed is not None:
            context["traceback"] = traceback.locate(parsed, repository).as_dict()
    if target is not None:
        policy = target.patch
        context["repository"] = str(repository) if repository else None
        context["base_commit"] = base_commit
        context["test_command"] = target.test_command
        # With the command they belong to; redacted with the rest below (a remote runner sees what the agent sees).
        context["test_env"] = dict(target.test_env)
        context["test_cwd"] = target.test_cwd
        report = target.report
        context["test_report"] = report if report is None or isinstance(report, str) else report.model_dump()
        context["failing_tests"] = failing_tests_of(context, target.failing_tests)
        # Every field of the target's patch policy, so the agent runner judges a diff by the same rules as the
        # server's `complete` (a field listed by hand here was once left out: test_config_allowed).
        context["constraints"] = policy.model_dump()
    if failure is not None:
        context["failed_step"] = failure
    if recall is not None:
        context["past_fixes"] = recall(fix_memory.frames_of(context.get("traceback")))
    return redactor.value(context), (str(repository) if repository else None), base_commit


def _log_lines(found: Any, trigger: dict[str, Any]) -> dict[str, Any]:
    """{"log_lines": {path, before, lines, after}} from a watcher's `log_context`, or from the `lines` an event
    brought; {} when there are none (the trigger's own line is in `error.event` already)."""

    def strings(value: Any, last: int = 200) -> list[str]:
        return [str(x) for x in value[-last:]] if isinstance(value, list) else []

    if isinstance(found, dict) and (found.get("lines") or found.get("before") or found.get("after")):
        path = found.get("path")
        return {
            "log_lines": {
                "path": path if isinstance(path, str) else None,
                "before": strings(found.get("before")),
                "lines": strings(found.get("lines"), 1000),
                "after": strings(found.get("after")),
            }
        }
    given = strings(trigger.get("lines"), 50)
    if not given:
        return {}
    path = trigger.get("file")
    return {"log_lines": {"path": path if isinstance(path, str) else None, "before": [], "lines": given, "after": []}}
