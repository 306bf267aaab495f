"""The memory of past fixes: which earlier fixes a new work order is shown, and what counts as a regression.

A fix is what a run did about its incident once it ended: the patch it applied (commit, files, +/- lines) or the
playbook alone, whether its verification passed, and when that incident came back. A new work order is shown the
fixes most relevant to it (at most MAX_RECALLED), found two ways, each by an index:

- the same fingerprint: the same error came back (most relevant: what was tried on exactly this failure);
- the same code: its traceback went through the same (file, function) pairs, under another fingerprint.

Ranking (`rank`): same fingerprint first, then by how many frames are shared, then by how many of the new
traceback's frames those cover, then newest first. A verified fix is not ranked above a failed one: a fix that did
not hold is the most useful thing an agent can be told about.

A regression is a recurrence after a run's verified code fix (`is_regression`): the patch was checked and the
failure still came back. It costs more trust than a plain recurrence (`domain.trust.regression_weight`) and names
the patch's commit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mendloop.domain.records import NewEvent

# At most this many past fixes go into a work order's context: enough to show a pattern, small for a prompt.
MAX_RECALLED = 5
# Frames of one traceback kept per fix and looked up per work order: a deep recursion repeats one frame anyway.
MAX_FRAMES = 20
# Candidates read per lookup path before ranking: each query walks an index and stops there.
CANDIDATES = 20
# A fix's summary ("what was done") as stored and shown.
MAX_SUMMARY_CHARS = 2000
MAX_FILES = 50

Frame = tuple[str, str]  # (repository path, function)
# A frame is a key of PostgreSQL's (path, function, fix_id) index, whose entries must stay under ~2700 bytes: a
# traceback's paths come from logs, so they are cut by bytes, not characters.
MAX_PATH_BYTES = 1000
MAX_FUNCTION_BYTES = 300

_HUNK = re.compile(r"^@@ -\d+(?:,(?P<old>\d+))? \+\d+(?:,(?P<new>\d+))? @@")


@dataclass(frozen=True, slots=True)
class Fix:
    """One past fix as stored (`storage/fixes.py`)."""

    id: int
    run_id: str
    incident_id: str | None
    fingerprint: str | None
    component: str | None
    work_order_id: str | None
    playbook_id: str
    summary: str
    commit: str | None
    files: tuple[str, ...]
    added: int | None
    removed: int | None
    verified: bool
    reverted: bool
    fixed_at: float
    recurred_at: float | None
    frames: tuple[Frame, ...] = ()


def frames_of(traceback: Any) -> list[Frame]:
    """The (path, function) pairs of a work order's located traceback (`infra.traceback.ParsedTraceback.as_dict`),
    innermost last, deduplicated, at most MAX_FRAMES (the innermost ones: nearest the failure). A frame inside
    the repository is named by its repository path, so two checkouts of one repository match; others by file."""
    if not isinstance(traceback, Mapping) or not isinstance(traceback.get("frames"), list):
        return []
    out: dict[Frame, None] = {}
    for f in traceback["frames"]:
        if not isinstance(f, Mapping):
            continue
        path = f.get("repository_path") or f.get("file")
        function = f.get("function")
        if isinstance(path, str) and path and isinstance(function, str) and function:
            key = (_clip(path, MAX_PATH_BYTES), _clip(function, MAX_FUNCTION_BYTES))
            out.pop(key, None)
            out[key] = None
    return list(out)[-MAX_FRAMES:]


def _clip(text: str, limit: int) -> str:
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")


def diff_stat(diff: str) -> tuple[tuple[str, ...], int, int]:
    """A unified diff's files (as its `---`/`+++` headers name them, `a/` and `b/` dropped) and its added and
    removed lines: the summary a past fix is remembered by (the diff itself stays in the `diffs` table). Hunk
    bodies are read by the line counts of their `@@` headers, so a removed line that reads `--- x` is a line."""
    files: dict[str, None] = {}
    added = removed = 0
    old_left = new_left = 0
    for line in diff.splitlines():
        if old_left > 0 or new_left > 0:
            if line.startswith("+"):
                added, new_left = added + 1, new_left - 1
            elif line.startswith("-"):
                removed, old_left = removed + 1, old_left - 1
            elif not line.startswith("\\"):  # "\ No newline at end of file" counts for neither side
                old_left, new_left = old_left - 1, new_left - 1
            continue
        hunk = _HUNK.match(line)
        if hunk:
            old_left = int(hunk["old"]) if hunk["old"] is not None else 1
            new_left = int(hunk["new"]) if hunk["new"] is not None else 1
        elif line.startswith(("--- ", "+++ ")):
            name = line[4:].split("\t")[0].strip()
            if name != "/dev/null":
                files.setdefault(name[2:] if name[:2] in ("a/", "b/") else name, None)
    return tuple(files), added, removed


def summary_of(*, playbook_id: str, description: str | None, note: str | None, commit: str | None) -> str:
    """What was done, in one line: the playbook and its commit, the work order's description, the agent's summary."""
    parts = [f"playbook {playbook_id}" + (f" applied commit {commit[:12]}" if commit else " (no patch)")]
    parts += [p.strip() for p in (description, f"the agent: {note}" if note else None) if p and p.strip()]
    return "; ".join(parts)[:MAX_SUMMARY_CHARS]


def held_seconds(fix: Fix, now: float) -> float | None:
    """How long a fix lasted: until its incident recurred, else until now. None for a fix whose verification did
    not pass (it never held) or that was reverted."""
    if not fix.verified or fix.reverted:
        return None
    return max(0.0, (fix.recurred_at if fix.recurred_at is not None else now) - fix.fixed_at)


def rank(
    candidates: Iterable[Fix],
    *,
    fingerprint: str | None,
    frames: Sequence[Frame],
    exclude_run: str | None = None,
    limit: int = MAX_RECALLED,
) -> list[tuple[Fix, str, int]]:
    """The `limit` most relevant fixes, each with why it was found ("same_fingerprint" or "same_code") and the
    number of frames it shares with `frames` (see the module's docstring for the order)."""
    wanted = set(frames)
    seen: set[int] = set()
    scored: list[tuple[tuple[int, int, float, int], Fix, str, int]] = []
    for fix in candidates:
        if fix.id in seen or fix.run_id == exclude_run:
            continue
        seen.add(fix.id)
        shared = len(wanted.intersection(fix.frames))
        same = fingerprint is not None and fix.fingerprint == fingerprint
        if not same and shared == 0:
            continue
        scored.append(
            ((1 if same else 0, shared, fix.fixed_at, fix.id), fix, "same_fingerprint" if same else "same_code", shared)
        )
    scored.sort(key=lambda s: s[0], reverse=True)
    return [(fix, why, shared) for _, fix, why, shared in scored[:limit]]


def recalled(fix: Fix, why: str, shared: int, now: float) -> dict[str, Any]:
    """A past fix as a work order's context and `GET /incidents/{id}/history` show it."""
    held = held_seconds(fix, now)
    return {
        "run_id": fix.run_id,
        "incident_id": fix.incident_id,
        "work_order_id": fix.work_order_id,
        "matched": why,
        "shared_frames": shared,
        "what_was_done": fix.summary,
        "commit": fix.commit,
        "diff": {"files": list(fix.files), "added": fix.added, "removed": fix.removed},
        "verified": fix.verified,
        "reverted": fix.reverted,
        "fixed_at": fix.fixed_at,
        "recurred_at": fix.recurred_at,
        "held_seconds": None if held is None else round(held, 3),
        "still_holding": held is not None and fix.recurred_at is None,
    }


def is_regression(*, resolved_by_run: str | None, resolved_commit: str | None) -> bool:
    """A recurrence is a regression when a run's verified *code* fix had resolved the incident: a patch whose
    verification passed, and the failure came back anyway. A verified playbook-only fix that recurs (a restart,
    a replay: the cause was outside the code) is a plain recurrence, and so is one after an operator's or the
    source's `resolved`, which say nothing about a fix holding."""
    return resolved_by_run is not None and resolved_commit is not None


def regressed(
    incident_id: str,
    *,
    resolved_by_run: str,
    commit: str,
    resolved_at: float | None,
    now: float,
    regressions: int,
    component: str | None,
) -> tuple[dict[str, Any], NewEvent]:
    """The flag a regression puts on the incident and the new run (its columns / context entry), and its event.
    `regressions` is the incident's count before this one."""
    held = None if resolved_at is None else round(max(0.0, now - resolved_at), 3)
    flag = {"resolved_by_run": resolved_by_run, "commit": commit, "resolved_at": resolved_at, "held_seconds": held}
    lasted = f" after {held:.0f} s" if held is not None else ""
    event = NewEvent(
        type="incident.regressed",
        message=(
            f"Incident {incident_id} regressed{lasted}: "
            f"run {resolved_by_run}'s verified fix, commit {commit[:12]}, did not hold"
        ),
        payload={"incident_id": incident_id, "regressions": regressions + 1, **flag},
        component=component,
    )
    return flag, event
