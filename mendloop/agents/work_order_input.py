"""What the runner reads from a claim and from the agent: the work order's constraints and test command, the
agent's own report (claims only, never trusted), and the text of the commit and of the runner's summary."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from mendloop.agents import patch_safety
from mendloop.agents.runner_options import Outcome
from mendloop.errors import AgentError
from mendloop.infra.api_client import Claim

MAX_RESULT_BYTES = 64 * 1024


def safe_name(text: str) -> str:
    """`text` (a work order id) as a file-name and branch-name component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100] or "wo"


def argv_of(value: Any) -> list[str] | None:
    """`value` when it is a non-empty list of strings (a test command from the context), else None."""
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return list(value)
    return None


def constraints_of(ctx: Mapping[str, Any]) -> patch_safety.Constraints:
    given = ctx.get("constraints")
    data = dict(given) if isinstance(given, Mapping) else {}
    known = {f.name for f in fields(patch_safety.Constraints)}
    data = {k: v for k, v in data.items() if k in known and v is not None}
    # The target's forbidden paths add to the built-in list; they never replace it.
    data["forbidden_paths"] = [*patch_safety.DEFAULT_FORBIDDEN, *(data.get("forbidden_paths") or [])]
    try:
        return patch_safety.Constraints.from_mapping(data)
    except ValueError as exc:
        raise AgentError("needs_human", f"the work order's constraints are invalid: {exc}") from exc


def read_result(path: Path) -> dict[str, Any]:
    """The agent's own report, if any: a small JSON object, read without following a symlink. Only claims."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, MAX_RESULT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RESULT_BYTES:
        return {"error": "result file too large"}
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"error": "result file is not JSON"}
    if not isinstance(parsed, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(parsed.get("summary"), str):
        out["summary"] = parsed["summary"][:4000]
    if isinstance(parsed.get("tests_passed"), bool):
        out["tests_passed"] = parsed["tests_passed"]
    return out


def commit_message(claim: Claim, claims: Mapping[str, Any]) -> str:
    title = str(claim.work_order.get("description") or f"Fix for {claim.work_order_id}").splitlines()[0][:200]
    body = str(claims.get("summary") or "").strip()
    return f"{title}\n\n{body}\n" if body else f"{title}\n"


def summary_text(adapter_name: str, outcome: Outcome, summary: patch_safety.PatchSummary) -> str:
    parts = [
        f"{adapter_name} changed {len(summary.files)} file(s) (+{summary.added}/-{summary.removed}): "
        + ", ".join(summary.files),
    ]
    if outcome.tests is not None:
        parts.append(f"mendloop's own test run passed in {outcome.tests.duration_seconds:g}s")
    if outcome.commit and outcome.branch:
        parts.append(f"committed {outcome.commit[:12]} on branch {outcome.branch} for review (not merged)")
    elif outcome.commit:
        parts.append(f"applied as commit {outcome.commit[:12]}")
    else:
        parts.append("held for approval: nothing applied")
    if outcome.agent_claims.get("summary"):
        parts.append(f"agent's summary: {outcome.agent_claims['summary']}")
    return "; ".join(parts)
