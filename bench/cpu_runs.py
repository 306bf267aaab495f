"""CPU per run of a 3-step no-op playbook, beside the same statements and commits through bare SQLAlchemy.

mendloop's own figure is the process CPU clock (`time.process_time`, every thread) spent triggering and executing
`runs` runs in one process on SQLite. While they run, a listener counts the statements and commits they cost;
the baseline then spends exactly that many statements (an indexed UPDATE of one narrow row, the cheapest real
write) and commits through SQLAlchemy Core on a fresh SQLite file with the same pragmas and `BEGIN IMMEDIATE`.
The ratio is therefore mendloop's overhead over its own database work, which carries from a quiet day to a busy
one where absolute times don't.

    .venv/bin/python bench/cpu_runs.py --runs 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mendloop.app import App  # noqa: E402
from mendloop.config import load_settings  # noqa: E402
from mendloop.domain.states import RunStatus  # noqa: E402

STEPS = 3


def _app(tmp: Path) -> App:
    pbdir = tmp / "pb"
    pbdir.mkdir()
    steps = [{"id": f"s{i}", "action": "sleep", "with": {"seconds": 0}} for i in range(STEPS)]
    (pbdir / "noop.yaml").write_text(
        yaml.safe_dump({"id": "noop", "type": "retry", "description": "no-op", "steps": steps})
    )
    cfg = tmp / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp}/runs.db",
                "playbook_dirs": [str(pbdir)],
                "routing": {"noop": "noop"},
                "workers": 0,
            }
        )
    )
    return App(load_settings(cfg)).open(start_workers=False)


class _Counter:
    """Statements and commits an engine runs (the BEGIN each transaction sends is counted as a statement)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements = 0
        self.commits = 0
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "commit", self._commit)

    def _statement(self, *_a: Any) -> None:
        self.statements += 1

    def _commit(self, *_a: Any) -> None:
        self.commits += 1


def mendloop_runs(tmp: Path, runs: int, warmup: int = 50) -> dict[str, Any]:
    app = _app(tmp)
    try:
        for i in range(warmup):
            app.remediation.trigger(error_type="noop", description=f"warm {i}")
        while app.workers.run_once("bench:0:w0"):
            pass
        counter = _Counter(app.store.engine)
        c0 = time.process_time()
        for i in range(runs):
            app.remediation.trigger(error_type="noop", description=str(i))
        c1 = time.process_time()
        trigger_statements, trigger_commits = counter.statements, counter.commits
        while app.workers.run_once("bench:0:w0"):
            pass
        c2 = time.process_time()
        done = app.store.list_runs(status=RunStatus.COMPLETED.value, limit=1)[1]
        assert done == runs + warmup, f"{done} of {runs + warmup} runs completed"
    finally:
        app.close()
    return {
        "runs": runs,
        "trigger_cpu_ms_per_run": (c1 - c0) * 1000 / runs,
        "execute_cpu_ms_per_run": (c2 - c1) * 1000 / runs,
        "cpu_ms_per_run": (c2 - c0) * 1000 / runs,
        "statements_per_run": counter.statements / runs,
        "commits_per_run": counter.commits / runs,
        "trigger_statements_per_run": trigger_statements / runs,
        "trigger_commits_per_run": trigger_commits / runs,
    }


def bare_sqlalchemy(tmp: Path, statements: int, commits: int) -> float:
    """CPU seconds for `statements` statements in `commits` transactions through SQLAlchemy Core on SQLite."""
    engine = sa.create_engine(f"sqlite:///{tmp}/bare.db")

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    meta = sa.MetaData()
    rows = sa.Table("rows", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Integer))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(rows.insert(), [{"id": i, "v": 0} for i in range(100)])
    update = rows.update().where(rows.c.id == sa.bindparam("k")).values(v=rows.c.v + 1)
    # Each transaction's BEGIN is one of mendloop's counted statements too.
    per_commit = max(1, round(statements / commits) - 1)
    c0 = time.process_time()
    for i in range(commits):
        with engine.begin() as conn:
            for j in range(per_commit):
                conn.execute(update, {"k": (i + j) % 100})
    c1 = time.process_time()
    engine.dispose()
    return c1 - c0


def run(runs: int = 1000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mendloop-bench-cpu-") as d:
        tmp = Path(d)
        (tmp / "m").mkdir()
        (tmp / "b").mkdir()
        ours = mendloop_runs(tmp / "m", runs)
        total_statements = round(ours["statements_per_run"] * runs)
        total_commits = round(ours["commits_per_run"] * runs)
        bare = bare_sqlalchemy(tmp / "b", total_statements, total_commits)
    bare_ms = bare * 1000 / runs
    return {**ours, "bare_cpu_ms_per_run": bare_ms, "ratio": ours["cpu_ms_per_run"] / bare_ms}


def report(r: dict[str, Any]) -> list[str]:
    return [
        f"3-step no-op playbook, SQLite, one process, {r['runs']} runs: CPU per run (bench/cpu_runs.py)",
        f"  server CPU per run (trigger + execute)  {r['cpu_ms_per_run']:7.2f} ms   goal <= 1.5 ms",
        f"    trigger {r['trigger_cpu_ms_per_run']:.2f} ms, execute {r['execute_cpu_ms_per_run']:.2f} ms",
        f"  statements / commits per run           {r['statements_per_run']:7.1f} / {r['commits_per_run']:.1f}",
        f"  the same through bare SQLAlchemy       {r['bare_cpu_ms_per_run']:7.2f} ms   ratio {r['ratio']:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.runs)
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
