"""The story: the spec's four tests, walked against the running demo (`Story`), or printed as curl commands for a
person to run by hand (`instructions`, with `--no-story`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.markup import escape
from rich.table import Table

from mendloop.demo.common import DEMO_AGENT, HTTP_TIMEOUT, POLL_SECONDS, RUN_FINISH_SECONDS, STAND_IN, DemoError, shown
from mendloop.demo.scenario import DB_FAULT, LARGE_FILE_FAULT
from mendloop.demo.stage import Demo
from mendloop.domain.states import RUN_FINAL, RunStatus
from mendloop.errors import MendloopError
from mendloop.infra.api_client import ApiClient


class Story:
    """Tests 1-4 against the demo's mendloop, faults injected into its sample service."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.out = demo.out
        self.api = demo.api(HTTP_TIMEOUT)
        self.service = ApiClient(demo.service_url, timeout=HTTP_TIMEOUT, trust_env=False, name="the sample service")

    def _api(self, method: str, path: str, **kw: Any) -> Any:
        return _answer(self.api, method, path, f"{method} {path}", **kw)

    def _fault(self, name: str, body: dict[str, Any]) -> None:
        answer = _answer(self.service, "POST", f"/admin/faults/{name}", f"fault {name}", json=body)
        flat = {k: v for k, v in answer.items() if not isinstance(v, dict | list) and k not in ("fault", "replayed")}
        run = answer.get("run")
        if isinstance(run, dict):  # large_file: the pipeline run that timed out, in a few figures
            keys = ("file_path", "size_mb", "chunks", "modeled_seconds", "timeout_seconds", "ok")
            flat.update({f"run.{k}": run[k] for k in keys if k in run})
        self.out.print(f"[dim]injected fault[/] {name} into the sample service: {escape(json.dumps(flat))}")

    def story(self) -> bool:
        out = self.out
        with self.api, self.service:
            out.rule("Test 1: a playbook that heals without escalation")
            t1 = self._start_run(
                DB_FAULT,
                {"description": "Database connection lost", "error_type": "database_connection"},
                "database_reconnect",
            )
            ok1 = t1.get("status") == RunStatus.COMPLETED and t1.get("escalated_to_coding") is False
            self._print_run(self._api("GET", f"/patches/runs/{t1['run_id']}"))
            out.print("[green]completed without escalation[/]" if ok1 else "[red]did not complete as expected[/]")

            out.rule("Test 2: a playbook that escalates to a coding agent")
            t2 = self._start_run(
                LARGE_FILE_FAULT,
                {"description": "Pipeline validation timeout", "error_type": "pipeline_timeout"},
                "pipeline_timeout_fix",
            )
            wo_id, run_id = t2.get("work_order_id"), t2["run_id"]
            if not t2.get("escalated_to_coding") or not wo_id:
                raise DemoError(f"run {run_id} did not escalate (status {t2.get('status')})")
            out.print(f"escalated: work order [bold]{escape(wo_id)}[/]")

            out.rule("Test 3: the work orders")
            listing = self._api("GET", "/patches/work-orders")
            table = Table("work order", "status", "complexity", "run", "description")
            for column in table.columns:
                column.overflow = "fold"  # ids are to be copied whole, never cut with an ellipsis
            for w in listing["work_orders"]:
                table.add_row(
                    w["work_order_id"],
                    w["status"],
                    w["estimated_complexity"],
                    w["self_healing_run_id"] or "",
                    escape(w["description"]),
                )
            out.print(table)
            out.print(f"count={listing['count']}  " + "  ".join(f"{k}={v}" for k, v in listing["stats"].items()))

            out.rule("Test 4: the agent runner fixes the code, the run resumes")
            runner = self.demo.runner
            as_nobody = " as uid 65534" if runner.run_as == "auto" and os.geteuid() == 0 else ""
            if runner.adapter == "command" and str(DEMO_AGENT) in runner.argv:
                out.print(
                    "[yellow]stand-in for a real coding agent[/]: the agent runner embedded in mendloop serve "
                    f"([bold]{escape(runner.agent_id)}[/]) claims {escape(wo_id)} and drives "
                    f"{escape(shown(DEMO_AGENT))} through its `command` adapter, in a git worktree of the copy"
                    f"{as_nobody}. A real agent takes its place with agent_runner.adapter: aider, claude or codex "
                    "(see the README)."
                )
            else:
                out.print(
                    f"the agent runner embedded in mendloop serve ([bold]{escape(runner.agent_id)}[/]) claims "
                    f"{escape(wo_id)} and drives [bold]{escape(str(runner.adapter))}[/] "
                    f"{escape(' '.join(runner.argv))} in a git worktree of the copy{as_nobody}"
                )
            out.print(
                "[dim]the runner computes the diff itself, checks it, runs the service's tests in a fresh worktree "
                "and commits with a Work-Order: trailer; the run then deploys (restart), reruns and verifies[/]"
            )
            detail = self._wait_finished(run_id)
            wo = self._api("GET", f"/patches/work-orders/{wo_id}")
            self._print_patch(wo)
            self._print_run(detail)
            trust = detail["trust"]
            out.print(
                f"final status: [bold]{escape(detail['status'])}[/]   "
                f"trust of {escape(str(trust['component']))}: {trust['score']}"
            )
            return bool(ok1 and detail["status"] == RunStatus.COMPLETED)

    def _start_run(self, fault: tuple[str, dict[str, Any]], trigger: dict[str, Any], playbook: str) -> dict[str, Any]:
        """Inject the fault. When the config watches the service's serve.log, the run starts from the log line
        the fault writes (a watcher detects it); otherwise from POST /patches/trigger, as the spec's tests do.
        Returns once the run escalated or finished: {run_id, status, escalated_to_coding, work_order_id}."""
        known = {r["run_id"] for r in self._api("GET", "/patches/runs", params={"limit": 500})["runs"]}
        self._fault(*fault)
        if not self.demo.watched:
            answer: dict[str, Any] = self._api(
                "POST", "/patches/trigger", json=trigger, timeout=self.demo.trigger_timeout
            )
            self.out.print_json(data=answer)
            return answer
        line = last_error_line(self.demo.service_log)
        self.out.print(f"[dim]serve.log:[/] {escape(line)}")
        self.out.print(f"[dim]a watcher of serve.log starts the run ({playbook}); no trigger is posted[/]")
        deadline = time.monotonic() + self.demo.trigger_timeout
        while True:
            runs = self._api("GET", "/patches/runs", params={"limit": 50})["runs"]
            new = [r for r in runs if r["run_id"] not in known and r["playbook_id"] == playbook]
            if new:
                run = new[-1]
                if run["status"] in RUN_FINAL or (run["escalated_to_coding"] and run["coding_work_order_id"]):
                    summary = {
                        "run_id": run["run_id"],
                        "playbook_id": run["playbook_id"],
                        "status": run["status"],
                        "escalated_to_coding": run["escalated_to_coding"],
                        "work_order_id": run["coding_work_order_id"],
                        "description": run["description"],
                    }
                    self.out.print_json(data=summary)
                    return summary
            if time.monotonic() > deadline:
                raise DemoError(
                    f"no {playbook} run started from serve.log within {self.demo.trigger_timeout:.0f}s",
                    "runs: " + json.dumps([(r["run_id"], r["playbook_id"], r["status"]) for r in new or runs][:5]),
                )
            self.demo.check_children()
            time.sleep(POLL_SECONDS)

    def _print_patch(self, wo: dict[str, Any]) -> None:
        """What the runner reported (its own figures), and the commit it made in the copy."""
        out = self.out
        result = wo.get("patch_result") or {}
        if wo.get("status") != "completed":
            out.print(
                f"[red]work order {escape(wo['work_order_id'])} {escape(str(wo.get('status')))}[/]"
                f" ({escape(str(wo.get('fail_reason')))}): {escape(json.dumps(result)[:2000])}"
            )
            return
        agent = result.get("agent") or {}
        out.print(
            f"work order {wo['work_order_id']} completed: agent {agent.get('name')} ({agent.get('version', '')}), "
            f"the runner's own tests passed: {result.get('tests_passed')}, "
            f"files changed: {result.get('files_changed')}",
            markup=False,
        )
        commit = str(result.get("applied_commit") or "")
        if commit:
            text = self.demo.git("show", "--stat", "--format=commit %H%n    %s%n    %(trailers:only,unfold)", commit)
            out.print(re.sub(r"\n\s*\n+", "\n", text).rstrip(), markup=False)
        out.print(f"diff: {self.demo.api_url}/patches/diffs/{wo['work_order_id']}.diff", markup=False)

    def _wait_finished(self, run_id: str) -> dict[str, Any]:
        # A real agent may take a while; the stand-in takes about a second.
        runner = self.demo.runner
        allowed = RUN_FINISH_SECONDS + runner.timeout + runner.test_timeout
        deadline = time.monotonic() + allowed
        while True:
            detail: dict[str, Any] = self._api("GET", f"/patches/runs/{run_id}")
            if detail["status"] in RUN_FINAL:
                return detail
            if time.monotonic() > deadline:
                raise DemoError(f"run {run_id} is still {detail['status']} after {allowed:.0f}s")
            self.demo.check_children()
            time.sleep(POLL_SECONDS * 3)

    def _print_run(self, detail: dict[str, Any]) -> None:
        self.out.print(f"run {detail['run_id']} ({detail['playbook_id']}) timeline:", markup=False)
        for item in detail["timeline"]:
            self.out.print(f"  [{item['time'][11:19]}] {item['message']}", markup=False)


# The spec's "Testing the Workflow" commands as it writes them. `instructions` prints them with only the host:port
# (and for test 4 the work order id) replaced; tests/test_spec_curls.py checks these against the spec's own text.
SPEC_BASE = "http://localhost:8000"
SPEC_WORK_ORDER = "wo_20251113_0001"  # the spec's example id; real ids carry the day they were made
SPEC_TESTS: tuple[tuple[str, str], ...] = (
    (
        "Test 1: Trigger Playbook That Doesn't Escalate",
        "curl -X POST http://localhost:8000/patches/trigger \\\n"
        '  -H "Content-Type: application/json" \\\n'
        '  -d \'{"description":"Database connection lost","error_type":"database_connection"}\'',
    ),
    (
        "Test 2: Trigger Playbook That Escalates",
        "curl -X POST http://localhost:8000/patches/trigger \\\n"
        '  -H "Content-Type: application/json" \\\n'
        '  -d \'{"description":"Pipeline validation timeout","error_type":"pipeline_timeout"}\'',
    ),
    ("Test 3: Check Work Orders", "curl http://localhost:8000/patches/work-orders"),
    (
        "Test 4: Complete Work Order (Simulate Coding Agent)",
        "curl -X POST http://localhost:8000/patches/work-orders/wo_20251113_0001/complete \\\n"
        '  -H "Content-Type: application/json" \\\n'
        '  -d \'{"tests_passed":true,"files_changed":2}\'',
    ),
)


def spec_base(api_url: str) -> str:
    """The spec's `http://localhost:8000` for this demo: `localhost` while mendloop listens on loopback, so the
    spec's text changes only in its port (curl tries both of localhost's addresses); else the demo's own URL."""
    parts = urlsplit(api_url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1") and parts.port is not None:
        return f"http://localhost:{parts.port}"
    return api_url


def spec_commands(api_url: str, token: str | None = None) -> list[tuple[str, str]]:
    """The spec's four tests for this demo: its base URL for the spec's, and `$WO` for the spec's example id."""
    base = spec_base(api_url)
    auth = ' \\\n  -H "Authorization: Bearer $MENDLOOP_TOKEN"' if token else ""
    return [(title, text.replace(SPEC_BASE, base).replace(SPEC_WORK_ORDER, "$WO") + auth) for title, text in SPEC_TESTS]


def instructions(demo: Demo) -> None:
    p = demo.out.print
    base = spec_base(demo.api_url)
    p("", markup=False)
    p(
        "The spec's four tests, as the spec writes them (no agent of any kind and no log watcher runs in this mode;"
        + (f" only the port differs from the spec's, {base}" if base != SPEC_BASE else " nothing to type before them")
        + "):",
        markup=False,
    )
    for title, text in spec_commands(demo.api_url, demo.token):
        p(f"# {title}", markup=False)
        if "$WO" in text:
            p(
                f"# WO=<the work_order_id test 2 answered>   (the spec names its own example, {SPEC_WORK_ORDER})",
                markup=False,
            )
        p(text, markup=False)
        p("", markup=False)
    lines = [
        "# Test 4 claims a fix nobody made: the run deploys (restarts the service), reruns the 500 MB file, which",
        "# still times out, and ends honestly in needs_human with trust lowered. To give it a fix to verify, first",
        "# make the one a coding agent would (the stand-in), then complete:",
        f"#   cd {shlex.quote(str(demo.copy))} && {shlex.quote(sys.executable)} {STAND_IN} .",
        f"curl '{base}/patches/runs?limit=5'" + (' -H "Authorization: Bearer $MENDLOOP_TOKEN"' if demo.token else ""),
    ]
    for line in lines:
        p(line, markup=False)


def last_error_line(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " ERROR" in line]
    return errors[-1] if errors else ""


def _answer(client: ApiClient, method: str, path: str, what: str, **kw: Any) -> Any:
    """The JSON answer; any HTTP problem is a DemoError saying what was asked (and the server's detail)."""
    try:
        return client.call(method, path, **kw)
    except MendloopError as exc:
        status = exc.fields.get("status")
        if status is None:
            raise DemoError(f"{what}: {exc.message}") from exc
        detail = exc.fields.get("detail")
        raise DemoError(f"{what}: HTTP {status}", detail if isinstance(detail, str) else json.dumps(detail)) from exc
