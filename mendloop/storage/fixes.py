"""The memory of past fixes (`domain/fix_memory.py` decides what is relevant): written when a run ends, marked when
its incident recurs, read for a new work order's context and for `GET /incidents/{id}/history`.

Every read walks an index and stops at a bound: fixes by fingerprint or by incident on (column, id) newest first,
frames by (path, function, fix_id) one pair at a time, fixes and their frames by primary key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from mendloop.domain import fix_memory as memory
from mendloop.domain import incidents as lifecycle
from mendloop.domain.fix_memory import Fix, Frame
from mendloop.domain.records import Run
from mendloop.domain.states import RunStatus
from mendloop.errors import NotFound
from mendloop.storage import schema as t
from mendloop.storage.db import Database, Tx

# An incident's own fixes shown by its history, newest first.
MAX_OWN = 50


def record_in(tx: Tx, run: Run) -> Fix | None:
    """A run has just ended (`run` as it ends): keep what it did about its incident, when it applied a patch or
    resolved the incident (a verified fix). Other ends (a failed step before any patch, a cancel) taught
    nothing about a fix. Idempotent per run."""
    commit = _commit(run.outputs)
    verified = run.status is RunStatus.COMPLETED and lifecycle.verified_run(run.playbook, run.outputs)
    if commit is None and not verified:
        return None
    conn = tx.conn
    if conn.execute(sa.select(t.fixes.c.id).where(t.fixes.c.run_id == run.id)).scalar() is not None:
        return None
    wo = None
    if run.coding_work_order_id:
        w = t.work_orders.c
        wo = conn.execute(
            sa.select(w.description, w.patch_result, w.context, w.fail_reason).where(w.id == run.coding_work_order_id)
        ).first()
    diff = None
    if run.coding_work_order_id and commit is not None:
        diff = conn.execute(
            sa.select(t.diffs.c.diff).where(t.diffs.c.work_order_id == run.coding_work_order_id)
        ).scalar()
    files, added, removed = memory.diff_stat(diff) if isinstance(diff, str) else ((), None, None)
    applied = run.outputs.get("apply_patch")
    if isinstance(applied, Mapping) and isinstance(applied.get("files"), list) and not files:
        files = tuple(str(f) for f in applied["files"])
    fingerprint = None
    if run.incident_id:
        fingerprint = conn.execute(
            sa.select(t.incidents.c.fingerprint).where(t.incidents.c.id == run.incident_id)
        ).scalar()
    context = wo.context if wo is not None and isinstance(wo.context, dict) else {}
    row = {
        "run_id": run.id,
        "incident_id": run.incident_id,
        "fingerprint": fingerprint,
        "component": run.component,
        "work_order_id": run.coding_work_order_id,
        "playbook_id": run.playbook_id,
        "summary": memory.summary_of(
            playbook_id=run.playbook_id,
            description=wo.description if wo is not None else run.description,
            note=_agent_summary(wo.patch_result if wo is not None else None),
            commit=commit,
        ),
        "commit": commit,
        "files": list(files[: memory.MAX_FILES]),
        "added": added,
        "removed": removed,
        "verified": verified,
        # Verification overrules an applied patch by reverting it (engine/held_patch.py) and failing the order.
        "reverted": commit is not None and wo is not None and wo.fail_reason == "verification_failed",
        "fixed_at": tx.now,
        "recurred_at": None,
    }
    fix_id = int(conn.execute(sa.insert(t.fixes).values(row).returning(t.fixes.c.id)).scalar_one())
    frames = memory.frames_of(context.get("traceback"))
    if frames:
        conn.execute(t.fix_frames.insert(), [{"fix_id": fix_id, "path": p, "function": f} for p, f in frames])
    return _fix({**row, "id": fix_id}, tuple(frames))


def mark_recurred_in(conn: Connection, incident_id: str, now: float) -> None:
    """The incident came back: its fixes that were holding stop holding now."""
    f = t.fixes.c
    conn.execute(
        sa.update(t.fixes).where(f.incident_id == incident_id, f.recurred_at.is_(None)).values(recurred_at=now)
    )


class FixStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def recall(
        self, *, incident_id: str | None, frames: Sequence[Frame], exclude_run: str | None = None
    ) -> list[dict[str, Any]]:
        """The past fixes most relevant to a work order of `incident_id` whose traceback went through `frames`,
        as its context shows them (at most `fix_memory.MAX_RECALLED`)."""
        with self.db.read() as conn:
            fingerprint = None
            if incident_id:
                fingerprint = conn.execute(
                    sa.select(t.incidents.c.fingerprint).where(t.incidents.c.id == incident_id)
                ).scalar()
            found = _candidates(conn, fingerprint, frames)
        ranked = memory.rank(found, fingerprint=fingerprint, frames=frames, exclude_run=exclude_run)
        now = self.db.clock()
        return [memory.recalled(fix, why, shared, now) for fix, why, shared in ranked]

    def history(self, incident_id: str) -> dict[str, Any]:
        """An incident's own fixes (newest first) and the most relevant fixes of other incidents: the same
        fingerprint under an older incident, or the same code (its fixes' frames)."""
        i = t.incidents.c
        with self.db.read() as conn:
            inc = conn.execute(
                sa.select(i.fingerprint, i.recurrences, i.regressions, i.regressed_commit).where(i.id == incident_id)
            ).first()
            if inc is None:
                raise NotFound("incident", incident_id)
            f = t.fixes.c
            own_rows = conn.execute(
                sa.select(t.fixes).where(f.incident_id == incident_id).order_by(f.id.desc()).limit(MAX_OWN)
            ).all()
            own = _with_frames(conn, own_rows)
            frames = list(dict.fromkeys(fr for fix in own for fr in fix.frames))[-memory.MAX_FRAMES :]
            others = [c for c in _candidates(conn, inc.fingerprint, frames) if c.incident_id != incident_id]
        now = self.db.clock()
        ranked = memory.rank(others, fingerprint=inc.fingerprint, frames=frames)
        return {
            "incident_id": incident_id,
            "fingerprint": inc.fingerprint,
            "recurrences": int(inc.recurrences),
            "regressions": int(inc.regressions),
            "regressed_commit": inc.regressed_commit,
            "fixes": [memory.recalled(fix, "own", len(fix.frames), now) for fix in own],
            "related": [memory.recalled(fix, why, shared, now) for fix, why, shared in ranked],
        }


def _candidates(conn: Connection, fingerprint: str | None, frames: Sequence[Frame]) -> list[Fix]:
    f, fr = t.fixes.c, t.fix_frames.c
    rows: list[Row[Any]] = []
    if fingerprint:
        rows += conn.execute(
            sa.select(t.fixes).where(f.fingerprint == fingerprint).order_by(f.id.desc()).limit(memory.CANDIDATES)
        ).all()
    ids: dict[int, None] = {}
    # One index range per pair, newest first, each stopping at the bound: no sort of a growing set.
    by_pair = (
        sa.select(fr.fix_id)
        .where(fr.path == sa.bindparam("_path"), fr.function == sa.bindparam("_function"))
        .order_by(fr.fix_id.desc())
        .limit(memory.CANDIDATES)
    )
    for path, function in frames[-memory.MAX_FRAMES :]:
        ids.update(dict.fromkeys(int(x) for (x,) in conn.execute(by_pair, {"_path": path, "_function": function})))
    known = {int(r.id) for r in rows}
    wanted = [x for x in ids if x not in known]
    if wanted:
        rows += conn.execute(sa.select(t.fixes).where(f.id.in_(wanted))).all()
    return _with_frames(conn, rows)


def _with_frames(conn: Connection, rows: Sequence[Row[Any]]) -> list[Fix]:
    if not rows:
        return []
    fr = t.fix_frames.c
    frames: dict[int, list[Frame]] = {}
    found = conn.execute(sa.select(fr.fix_id, fr.path, fr.function).where(fr.fix_id.in_([int(r.id) for r in rows])))
    for fix_id, path, function in found:
        frames.setdefault(int(fix_id), []).append((str(path), str(function)))
    return [_fix(dict(r._mapping), tuple(frames.get(int(r.id), ()))) for r in rows]


def _fix(r: Mapping[str, Any], frames: tuple[Frame, ...]) -> Fix:
    files = r["files"] if isinstance(r["files"], list) else []
    return Fix(
        id=int(r["id"]),
        run_id=str(r["run_id"]),
        incident_id=r["incident_id"],
        fingerprint=r["fingerprint"],
        component=r["component"],
        work_order_id=r["work_order_id"],
        playbook_id=str(r["playbook_id"]),
        summary=str(r["summary"]),
        commit=r["commit"],
        files=tuple(str(x) for x in files),
        added=None if r["added"] is None else int(r["added"]),
        removed=None if r["removed"] is None else int(r["removed"]),
        verified=bool(r["verified"]),
        reverted=bool(r["reverted"]),
        fixed_at=float(r["fixed_at"]),
        recurred_at=None if r["recurred_at"] is None else float(r["recurred_at"]),
        frames=frames,
    )


def _agent_summary(patch_result: Any) -> str | None:
    """What the agent said it changed (its completion's `summary`, redacted on the way in)."""
    said = patch_result.get("summary") if isinstance(patch_result, Mapping) else None
    return said if isinstance(said, str) and said.strip() else None


def _commit(outputs: Mapping[str, Any]) -> str | None:
    applied = outputs.get("apply_patch")
    commit = applied.get("commit") if isinstance(applied, Mapping) else None
    return commit[:64] if isinstance(commit, str) and commit else None
