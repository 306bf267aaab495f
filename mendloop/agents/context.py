"""The context a coding agent gets with a work order: the error and its events, log lines, the parsed
traceback located in the repository, the repository and base commit, the test command and the constraints.
Everything passes through the redactor before it is stored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mendloop.config import TargetConfig
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
) -> tuple[dict[str, Any], str | None, str | None]:
    """Returns (context, repository, base_commit)."""
    trigger = dict(run.context.get("event") or {})
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
        "log_lines": lines[-50:],
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
        report = target.report
        context["test_report"] = report if report is None or isinstance(report, str) else report.model_dump()
        context["failing_tests"] = failing_tests_of(context, target.failing_tests)
        context["constraints"] = {
            "allowed_paths": policy.allowed_paths,
            "forbidden_paths": policy.forbidden_paths,
            "max_files": policy.max_files,
            "max_changed_lines": policy.max_changed_lines,
            "tests_may_change": policy.tests_may_change,
        }
    if failure is not None:
        context["failed_step"] = failure
    return redactor.value(context), (str(repository) if repository else None), base_commit
