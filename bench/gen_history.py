"""Build a database of mendloop's history in the schema's real shape, fast, for the read benches and plan tests.

Per run: 5 steps, 6 events, 2 trust changes (the incident's and the outcome's). One incident per 5 runs (its
runs share it), one work order per 10 runs (the escalated ones, each remembered as a fix with 3 traceback
frames), 50 components, the built-in playbooks. Runs are
spread over the `days` before yesterday, so a run created now never takes one of their ids. Statuses follow a
long-lived installation: most runs finished, a few queued, running or waiting on a patch.

The tables are made by the real migrations (`migrate.upgrade`), the rows go in through the schema's own tables
(`schema.py`'s columns, in their order) with executemany of plain tuples in big transactions: on SQLite with the
stdlib driver and synchronous=OFF while building, on PostgreSQL with psycopg. Built databases are kept under
bench/.cache/ (SQLite files; PostgreSQL databases named after them) keyed by size, schema head and this
generator's version, so a rerun only copies one.

    python bench/gen_history.py --runs 100000 [--url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mendloop.domain.runs import run_id as make_run_id  # noqa: E402
from mendloop.storage import migrate  # noqa: E402
from mendloop.storage import schema as t  # noqa: E402
from mendloop.storage.db import sqlite_insert  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
SHAPE = 2  # bump when `rows` changes what it builds: the cache key has it
COMPONENTS = [f"svc-{i:02d}" for i in range(50)]
PLAYBOOKS = [
    ("database_reconnect", "retry"),
    ("pipeline_timeout_fix", "hybrid"),
    ("memory_cleanup", "cleanup"),
    ("ingestion_replay", "replay"),
    ("schema_recovery", "retry"),
    ("verification_fix", "code_patch"),
]
ERROR_TYPES = [f"error_{i:02d}" for i in range(20)]
# (status, share of runs, finished): a long-lived installation's mix.
STATUSES = [
    ("completed", 0.80, True),
    ("failed", 0.08, True),
    ("needs_human", 0.05, True),
    ("cancelled", 0.03, True),
    ("awaiting_patch", 0.02, False),
    ("queued", 0.01, False),
    ("running", 0.01, False),
]
WO_STATUSES = ["completed", "completed", "completed", "failed", "queued", "in_progress", "cancelled"]
RUNS_PER_INCIDENT = 5
RUNS_PER_WORK_ORDER = 10
BATCH = 20_000  # runs per transaction


def _playbook(pb_id: str, kind: str) -> dict[str, Any]:
    return {
        "id": pb_id,
        "type": kind,
        "description": f"Built-in playbook {pb_id}",
        "steps": [
            {"id": f"step{i}", "title": f"Step {i}", "action": "command", "with": {"argv": ["true"], "timeout": 30}}
            for i in range(5)
        ],
    }


def cache_key(runs: int) -> str:
    """Size, schema head, a digest of the migrations (an edited index rebuilds) and SHAPE."""
    digest = hashlib.sha1(str(SHAPE).encode())
    for path in sorted((migrate.MIGRATIONS / "versions").glob("*.py")):
        digest.update(path.read_bytes())
    return f"history-{runs}-{migrate.head()}-{digest.hexdigest()[:10]}"


def _columns(table: sa.Table, row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c.name] for c in table.c)


def rows(runs: int, *, end: float, days: float = 365.0, seed: int = 7) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """The history in batches of up to BATCH runs: for each table, its rows as tuples in the table's column order."""
    rnd = random.Random(seed)
    start = end - days * 86400
    step = (end - start) / max(runs, 1)
    dumps = json.dumps
    pb_json = {pb: dumps(_playbook(pb, kind)) for pb, kind in PLAYBOOKS}
    weights = [w for _, w, _ in STATUSES]
    event_id = 0
    trust = dict.fromkeys(COMPONENTS, 1.0)
    batch: dict[str, list[tuple[Any, ...]]] = {}
    for i in range(runs):
        if i % BATCH == 0:
            if batch:
                yield batch
            batch = {
                name: []
                for name in (
                    "runs",
                    "steps",
                    "events",
                    "trust_history",
                    "incidents",
                    "work_orders",
                    "fixes",
                    "fix_frames",
                )
            }
        created = start + i * step
        status, _, finished = rnd.choices(STATUSES, weights)[0]
        pb_id, kind = PLAYBOOKS[i % len(PLAYBOOKS)]
        component = COMPONENTS[rnd.randrange(len(COMPONENTS))]
        error_type = ERROR_TYPES[i % len(ERROR_TYPES)]
        rid = make_run_id(created, i + 1)
        incident = f"inc_{i // RUNS_PER_INCIDENT:08d}"
        escalated = i % RUNS_PER_WORK_ORDER == 0
        wo_id = f"wo_{i // RUNS_PER_WORK_ORDER:08d}" if escalated else None
        done_at = created + 40 + rnd.random() * 200
        if i % RUNS_PER_INCIDENT == 0:
            open_incident = i >= runs - RUNS_PER_INCIDENT * 50 and rnd.random() < 0.5
            last = created + RUNS_PER_INCIDENT * step
            batch["incidents"].append(
                _columns(
                    t.incidents,
                    {
                        "id": incident,
                        "fingerprint": f"{i:064x}"[-64:],
                        "status": "open" if open_incident else "resolved",
                        "error_type": error_type,
                        "event_type": "app.exception",
                        "component": component,
                        "source": f"/var/log/{component}.log",
                        "title": f"{error_type}: something failed in {component}",
                        "sample": f"Traceback (most recent call last):\n  ...\n{error_type}: failed",
                        "count": RUNS_PER_INCIDENT * 3,
                        "first_seen": created,
                        "last_seen": last,
                        "resolved_at": None if open_incident else last + 60,
                        "last_run_id": rid,
                        "last_run_at": created,
                        "absorbed": 2,
                        "recurrences": 0,
                        "resolved_by_run": None if open_incident else rid,
                        "resolved_commit": None,
                        "last_resolved_at": None if open_incident else last + 60,
                        "regressions": 0,
                        "regressed_commit": None,
                    },
                )
            )
        first_event = event_id + 1
        batch["runs"].append(
            _columns(
                t.runs,
                {
                    "id": rid,
                    "playbook_id": pb_id,
                    "playbook_version": "1-0123abcd",
                    "playbook_type": kind,
                    "playbook": pb_json[pb_id],
                    "status": status,
                    "component": component,
                    "error_type": error_type,
                    "description": f"{error_type} in {component}",
                    "context": dumps({"file_path": f"/srv/{component}/app.py", "line": i % 400}),
                    "step_index": 5 if finished else 2,
                    "attempt": 0,
                    "outputs": dumps({"step0": {"exit_code": 0}, "step1": {"exit_code": 0}}),
                    "pending": "{}",
                    "escalated": escalated,
                    "coding_work_order_id": wo_id,
                    "lease_owner": "bench:0:w" if status == "running" else None,
                    "lease_expires_at": done_at if status == "running" else None,
                    "next_run_at": created,
                    "created_at": created,
                    "updated_at": done_at,
                    "finished_at": done_at if finished else None,
                    "error": "step3: exit code 1" if status == "failed" else None,
                    "trigger_event_id": first_event,
                    "dedupe_key": None,
                    "incident_id": incident,
                    "mutex_key": component,
                    "stalled_claims": 0,
                },
            )
        )
        for s in range(5):
            batch["steps"].append(
                (
                    None,
                    rid,
                    s,
                    f"step{s}",
                    "command",
                    0,
                    "succeeded",
                    created + s * 8,
                    created + s * 8 + 7,
                    dumps({"exit_code": 0, "stdout": "ok\n"}),
                    None,
                    f"{rid}:{s}:0",
                )
            )
        kinds = [
            ("app.exception", f"{error_type}: failed"),
            ("self_healing.triggered", f"Running playbook: {pb_id}"),
            ("self_healing.step_completed", "Step 1 done"),
            ("self_healing.step_completed", "Step 3 done"),
            ("trust.changed", f"Trust of {component} moved"),
            (f"self_healing.{status}", f"Run {rid} {status}"),
        ]
        for k, (etype, message) in enumerate(kinds):
            event_id += 1
            batch["events"].append(
                (
                    event_id,
                    etype,
                    "bench",
                    message,
                    dumps({"run_id": rid, "component": component}),
                    rid,
                    wo_id if k == 5 else None,
                    component,
                    created + k * 7,
                )
            )
        old = trust[component]
        after_incident = max(0.0, old - 0.05)
        new = min(1.0, after_incident + (0.08 if status == "completed" else -0.02))
        trust[component] = new
        batch["trust_history"].append((None, component, old, after_incident, "incident", rid, created, None))
        batch["trust_history"].append((None, component, after_incident, new, "verified_fix", rid, done_at, None))
        if escalated and wo_id is not None:
            wo_status = WO_STATUSES[(i // RUNS_PER_WORK_ORDER) % len(WO_STATUSES)]
            batch["work_orders"].append(
                _columns(
                    t.work_orders,
                    {
                        "id": wo_id,
                        "type": "self_healing_patch",
                        "description": f"Code patch required for: {error_type}",
                        "context": dumps({"error_type": error_type, "component": component}),
                        "status": wo_status,
                        "self_healing_run_id": rid,
                        "playbook_id": pb_id,
                        "component": component,
                        "estimated_complexity": "medium",
                        "priority": "normal",
                        "created_at": created + 20,
                        "updated_at": done_at,
                        "completed_at": done_at if wo_status == "completed" else None,
                        "patch_result": dumps({"tests_passed": True, "files_changed": 1})
                        if wo_status == "completed"
                        else None,
                        "attempts": 1,
                        "fail_reason": None,
                        "lease_id": None,
                        "lease_owner": None,
                        "lease_expires_at": None,
                        "max_attempts": 3,
                        "deadline_at": None,
                        "cancel_requested": False,
                        "repository": None,
                        "base_commit": None,
                        "note": None,
                    },
                )
            )
            fix_id = i // RUNS_PER_WORK_ORDER + 1
            batch["fixes"].append(
                _columns(
                    t.fixes,
                    {
                        "id": fix_id,
                        "run_id": rid,
                        "incident_id": incident,
                        "fingerprint": f"{(i // RUNS_PER_INCIDENT) * RUNS_PER_INCIDENT:064x}"[-64:],
                        "component": component,
                        "work_order_id": wo_id,
                        "playbook_id": pb_id,
                        "summary": f"playbook {pb_id} applied commit {fix_id:012x}; Code patch required",
                        "commit": f"{fix_id:040x}",
                        "files": dumps([f"{component}/app.py"]),
                        "added": 3,
                        "removed": 1,
                        "verified": status == "completed",
                        "reverted": status != "completed",
                        "fixed_at": done_at,
                        "recurred_at": None,
                    },
                )
            )
            for path, function in (
                (f"{component}/server.py", "handle"),
                (f"{component}/app.py", f"step_{i % 40}"),
                ("lib/db.py", "query"),
            ):
                batch["fix_frames"].append((fix_id, path, function))
    if batch:
        batch["trust_scores"] = [(c, s, end) for c, s in trust.items()]
        yield batch


_TABLES = {
    "runs": t.runs,
    "steps": t.steps,
    "events": t.events,
    "trust_history": t.trust_history,
    "incidents": t.incidents,
    "work_orders": t.work_orders,
    "trust_scores": t.trust_scores,
    "fixes": t.fixes,
    "fix_frames": t.fix_frames,
}


# The rows went in through the tables' triggers (migration 0014), one delta row each: fold them all at once (a
# fresh database's counts are the sums of its deltas), as housekeeping would, so the lists' totals read as they do
# on a long-lived installation.
_FOLD_COUNTS = [
    "DELETE FROM row_counts",
    "INSERT INTO row_counts (list_name, field, value, n) "
    "SELECT list_name, field, value, sum(delta) FROM row_count_deltas GROUP BY list_name, field, value",
    "DELETE FROM row_count_deltas",
]


def build_sqlite(path: Path, runs: int, *, end: float) -> None:
    engine = sa.create_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    # No journal while building: a half-built file is thrown away, never served, and every page is written once
    # (WAL would write it twice). The finished file is switched to WAL, as mendloop opens it.
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("PRAGMA cache_size=-1000000")
    statements = {name: sqlite_insert(table) for name, table in _TABLES.items()}
    for batch in rows(runs, end=end):
        conn.execute("BEGIN")
        for name, tuples in batch.items():
            if tuples:
                conn.executemany(statements[name], tuples)
        conn.execute("COMMIT")
    conn.execute("BEGIN")
    for statement in _FOLD_COUNTS:
        conn.execute(statement)
    conn.execute("COMMIT")
    conn.execute("PRAGMA locking_mode=NORMAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def build_postgres(url: str, runs: int, *, end: float) -> None:
    engine = sa.create_engine(url)
    migrate.upgrade(engine)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for batch in rows(runs, end=end):
            for name, tuples in batch.items():
                if not tuples:
                    continue
                table = _TABLES[name]
                columns = [c.name for c in table.c]
                if tuples[0][0] is None and name in ("steps", "trust_history"):
                    # Serial ids: the database numbers them.
                    columns = columns[1:]
                    tuples = [tup[1:] for tup in tuples]
                cols = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join(["%s"] * len(columns))
                cur.executemany(f"INSERT INTO {name} ({cols}) VALUES ({marks})", tuples)
            raw.commit()
        for statement in _FOLD_COUNTS:
            cur.execute(statement)
        raw.commit()
        # Events were given ids here: move their sequence past them.
        cur.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), (SELECT max(id) FROM events))")
        cur.execute("SELECT setval(pg_get_serial_sequence('fixes', 'id'), max(id)) FROM fixes HAVING max(id) > 0")
        raw.commit()
        raw.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        cur.execute("ANALYZE")
    finally:
        raw.close()
        engine.dispose()


def sqlite_copy(runs: int, dest: Path) -> Path:
    """A copy of the cached SQLite history of `runs` runs at `dest` (built first if it is not cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / f"{cache_key(runs)}.db"
    if not cached.exists():
        partial = cached.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        started = time.monotonic()
        build_sqlite(partial, runs, end=end_of_history())
        print(f"gen_history: built {runs:,} runs on SQLite in {time.monotonic() - started:.1f} s", file=sys.stderr)
        partial.rename(cached)
    shutil.copyfile(cached, dest)
    return dest


def postgres_copy(runs: int, admin_url: str, name: str) -> str:
    """A database `name` on the server of `admin_url`, a copy of the cached history of `runs` runs."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    cached = cache_key(runs).replace("-", "_")
    try:
        with admin.connect() as conn:
            have = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": cached}).first()
            if have is None:
                partial = cached + "_partial"
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{partial}"'))
                conn.execute(sa.text(f'CREATE DATABASE "{partial}"'))
                started = time.monotonic()
                build_postgres(_on(admin_url, partial), runs, end=end_of_history())
                print(
                    f"gen_history: built {runs:,} runs on PostgreSQL in {time.monotonic() - started:.1f} s",
                    file=sys.stderr,
                )
                conn.execute(sa.text(f'ALTER DATABASE "{partial}" RENAME TO "{cached}"'))
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{cached}"'))
    finally:
        admin.dispose()
    return _on(admin_url, name)


def drop_copy(admin_url: str, name: str) -> None:
    """Drop a copy made by `postgres_copy` (the cached history stays)."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _on(url: str, database: str) -> str:
    return sa.make_url(url).set(database=database).render_as_string(hide_password=False)


def end_of_history() -> float:
    # Yesterday at midnight UTC: no run created today can take a history run's id.
    return (time.time() // 86400 - 1) * 86400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--url", help="a PostgreSQL server's URL (any database on it); default: SQLite")
    parser.add_argument("--out", type=Path, help="SQLite: where to copy the built file")
    args = parser.parse_args()
    started = time.monotonic()
    if args.url:
        print(postgres_copy(args.runs, args.url, f"bench_history_{args.runs}"))
    else:
        print(sqlite_copy(args.runs, args.out or Path(f"history-{args.runs}.db")))
    print(f"{time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
