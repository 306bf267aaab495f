#!/usr/bin/env python3
"""Stand-in for a real coding agent, driven by mendloop's `command` adapter.

    mendloop agent --repo REPO --adapter command -- python examples/agents/demo_fix.py

It makes the fix of an example service in the worktree the runner gives it, with the edit of that service's fix
module, and adds the module's regression test when the work order's constraints allow tests to change:

    --fixes DIR   the directory of the fix module (default: examples/sample_service, the chunking bug: a fixed
                  64 KB chunk size that makes large files time out; examples/importer_service: the CSV quoting bug)
    --fix NAME    the module in DIR (default: the only fix_*.py there)

A fix module has `find_target(repo) -> path`, `patch_source(source) -> (new source, already fixed)`, `TEST_PATH`
(relative to the target's directory), `REGRESSION_TEST`, `FixError` and, optionally, `SUMMARY`. Like a real
agent it reads what the runner puts in its environment:

    WORKTREE     the git worktree to edit (the current directory)
    WORK_ORDER   the work order as JSON          PROMPT_FILE  the prompt a real agent would read
    RESULT_FILE  where it writes {"summary": ...}; the runner computes the diff and runs the tests itself

Swap it for a real agent with `--adapter aider`, `--adapter claude` or `--adapter codex` (see the README).
Standard library only; never commits.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

sys.dont_write_bytecode = True


def _option(args: list[str], name: str) -> str | None:
    if name not in args:
        return None
    at = args.index(name)
    if at + 1 >= len(args):
        sys.exit(f"demo_fix: {name} needs a value")
    value = args[at + 1]
    del args[at : at + 2]
    return value


# `--fixes DIR`: where the fix module is (default: the sample service beside this file). Named on the argv so a
# sandbox that shows only what the argv names shows it too.
_args = sys.argv[1:]
_FIXES = Path(_option(_args, "--fixes") or Path(__file__).resolve().parent.parent / "sample_service")
_FIX = _option(_args, "--fix")
if _FIX is None:
    _found = sorted(p.stem for p in _FIXES.glob("fix_*.py"))
    if len(_found) != 1:
        sys.exit(f"demo_fix: {len(_found)} fix_*.py modules in {_FIXES}; name one with --fix NAME")
    _FIX = _found[0]
sys.path.insert(0, str(_FIXES))
fix = importlib.import_module(_FIX)
# The sample service's module predates SUMMARY: its words stay the ones the demo has always printed.
_SUMMARY = getattr(
    fix,
    "SUMMARY",
    "chunk_size_for() now uses adaptive chunking (about 200 chunks per file, at least 1 MB), so a 500 MB file no "
    "longer times out",
)


def main() -> int:
    worktree = Path(os.environ.get("WORKTREE") or (_args[0] if _args else "."))
    work_order: dict[str, object] = {}
    if os.environ.get("WORK_ORDER"):
        work_order = json.loads(Path(os.environ["WORK_ORDER"]).read_text(encoding="utf-8"))
    context = work_order.get("context") if isinstance(work_order.get("context"), dict) else {}
    constraints = context.get("constraints") if isinstance(context, dict) else None
    tests_may_change = bool(isinstance(constraints, dict) and constraints.get("tests_may_change"))

    try:
        target = Path(fix.find_target(str(worktree)))
        new_source, already_fixed = fix.patch_source(target.read_text(encoding="utf-8"))
    except (fix.FixError, OSError) as exc:
        print(f"demo_fix: {exc}", file=sys.stderr)  # noqa: T201 (a script's own output)
        return 1
    changed: list[str] = []
    if not already_fixed:
        target.write_text(new_source, encoding="utf-8")
        changed.append(os.path.relpath(target, worktree))
    if tests_may_change:
        test_file = target.parent / fix.TEST_PATH
        if not test_file.exists():
            test_file.parent.mkdir(parents=True, exist_ok=True)
            test_file.write_text(fix.REGRESSION_TEST, encoding="utf-8")
            changed.append(os.path.relpath(test_file, worktree))
    summary = (
        _SUMMARY + ("; added a regression test" if tests_may_change else "")
        if changed
        else "already fixed: nothing to change"
    )
    print(f"demo_fix: {summary}; changed: {', '.join(changed) or 'nothing'}")  # noqa: T201 (a script's own output)
    if os.environ.get("RESULT_FILE"):
        Path(os.environ["RESULT_FILE"]).write_text(json.dumps({"summary": summary, "changed": changed}), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
