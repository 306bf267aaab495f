"""The seeded CI version of `make chaos` (bench/chaos.py): fewer incidents, the same processes, kills and checks.

Real `mendloop serve` / `mendloop worker` processes, real sample-service instances and git repositories, real
SQLite and PostgreSQL; only the coding agent is a stand-in (bench/chaos.py applies the known patch).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import chaos

# The CI version fits its 90 s with room on 2 busy cores; the timeout is for a machine far busier than CI.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SEED = 13


def assert_held(out: chaos.Outcome, incidents: int) -> None:
    assert out.problems == []
    assert out.incidents == incidents
    assert sum(out.statuses.values()) == incidents
    assert out.kills >= 1  # the chaos happened: at least one process was killed mid-load


@pytest.mark.postgres
def test_chaos_on_postgres_with_workers_killed(postgres_admin_url: str, tmp_path: Path) -> None:
    url = chaos.fresh_postgres_database(postgres_admin_url)
    try:
        out = chaos.run_chaos(
            tmp_path, backend="postgres", database_url=url, incidents=10, seed=SEED, instances=5, kill_every=(1.0, 2.5)
        )
        assert_held(out, 10)
    finally:
        chaos.drop_postgres_database(url)


def test_chaos_on_sqlite_with_serve_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mendloop.db'}"
    out = chaos.run_chaos(
        tmp_path, backend="sqlite", database_url=url, incidents=10, seed=SEED, instances=4, kill_every=(1.0, 2.5)
    )
    assert_held(out, 10)
