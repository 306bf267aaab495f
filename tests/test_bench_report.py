"""The benchmark report (bench/results.py): figures beside their baselines, the README's generated table, and the
regression check behind `make bench-check` (a CPU-per-unit figure more than 50% worse than recorded fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import results


def _raw(cpu_ms: float, single_us: float, batch_us: float) -> dict[str, Any]:
    phase = {"requests_per_s": 1000.0, "events_per_s": 1000.0, "p99_ms": 5.0}
    intake = {
        "load": {"rate": 1000.0, "batch": 500},
        "http_ceiling": {
            "closed": {**phase, "server_cpu_us_per_event": 50.0},
            "open": phase,
            "batch": {**phase, "server_cpu_us_per_event": 2.0},
        },
    }
    for kind in ("repeats", "distinct"):
        intake[kind] = {
            "closed": {**phase, "server_cpu_us_per_event": single_us},
            "open": phase,
            "batch": {**phase, "server_cpu_us_per_event": batch_us},
        }
    return {
        "cpu_runs": {
            "cpu_ms_per_run": cpu_ms,
            "bare_cpu_ms_per_run": 0.5,
            "statements_per_run": 19,
            "commits_per_run": 5,
        },
        "intake": intake,
    }


def _doc(cpu_ms: float = 2.0, single_us: float = 400.0, batch_us: float = 60.0) -> dict[str, Any]:
    return results.document(_raw(cpu_ms, single_us, batch_us), results.machine())


def test_each_figure_sits_beside_its_baseline_with_the_ratio() -> None:
    doc = _doc()
    by_key = {f["key"]: f for f in doc["figures"]}
    runs = by_key["runs.cpu_ms_per_run"]
    assert runs["cpu"] and runs["baseline_value"] == 0.5 and runs["ratio"] == 4.0
    assert by_key["intake.repeats.single_cpu_us"]["ratio"] == 8.0
    assert not by_key["intake.repeats.single_per_s"]["cpu"]
    assert doc["baselines"]["http_ceiling_posts_per_s"] == 1000.0


def test_the_check_fails_past_the_threshold_and_only_on_cpu_figures() -> None:
    recorded = _doc()
    assert results.check(recorded, _doc(cpu_ms=2.9, single_us=590.0, batch_us=89.0)) == []  # within 1.5x
    worse = results.check(recorded, _doc(cpu_ms=3.1, single_us=400.0, batch_us=60.0))
    assert len(worse) == 1 and worse[0].startswith("runs.cpu_ms_per_run") and "1.55x worse" in worse[0]
    # Throughput figures move with the machine's load: a halved POSTs/s is not a failure of the check.
    slow = _doc()
    for f in slow["figures"]:
        if not f["cpu"]:
            f["value"] /= 2
    assert results.check(recorded, slow) == []
    # Better is never a failure; a figure recorded by neither side is not compared.
    assert results.check(recorded, _doc(cpu_ms=0.5)) == []
    assert results.check({"figures": []}, _doc(cpu_ms=100.0)) == []


def test_the_readme_table_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{results.BEGIN}\nold table\n{results.END}\nafter\n")
    assert results.render_readme(_doc(), readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| 3-step no-op playbook, SQLite: server CPU per run (trigger + execute) | 2.00 ms |" in text
    assert "load average" in text
    readme.write_text("no markers\n")
    assert not results.render_readme(_doc(), readme) and readme.read_text() == "no markers\n"


def test_the_storm_figures_take_the_worst_probe_beside_the_idle_one() -> None:
    def probes(health: float, page: float) -> dict[str, Any]:
        return {"/health": {"p99_ms": health}, "runs page": {"p99_ms": page}}

    raw = {
        "storms": {
            "idle": probes(1.5, 3.0),
            "rss_idle_mb": 120.0,
            "batch": {"probes": probes(20.0, 30.0)},
            "watcher": {"probes": probes(10.0, 21.0), "first_run_started_s": 0.05, "peak_rss_mb": 131.0},
        }
    }
    by_key = {f["key"]: f for f in results.document(raw, results.machine())["figures"]}
    assert by_key["storms.batch.api_p99_ms"]["value"] == 30.0 and by_key["storms.batch.api_p99_ms"]["ratio"] == 10.0
    assert by_key["storms.watcher.api_p99_ms"]["value"] == 21.0
    assert by_key["storms.watcher.first_run_ms"]["value"] == 50.0
    assert by_key["storms.peak_rss_mb"]["value"] == 131.0 and by_key["storms.peak_rss_mb"]["baseline_value"] == 120.0
    assert not any(f["cpu"] for k, f in by_key.items() if k.startswith("storms."))


def test_the_postgres_worker_figures_sit_beside_the_bare_queue() -> None:
    cases = [
        {"processes": k, "mendloop": {"per_s": 100.0 * k}, "bare": {"per_s": 1000.0 * k}, "ratio": 0.1}
        for k in (1, 2, 4)
    ]
    by_key = {f["key"]: f for f in results.document({"pg_workers": {"cases": cases}}, results.machine())["figures"]}
    assert [by_key[f"pg_workers.{k}.runs_per_s"]["value"] for k in (1, 2, 4)] == [100.0, 200.0, 400.0]
    assert {by_key[f"pg_workers.{k}.runs_per_s"]["ratio"] for k in (1, 2, 4)} == {0.1}
    # Without PostgreSQL the bench is skipped and the report has no such rows.
    assert not any(f["key"].startswith("pg_workers") for f in results.document({}, results.machine())["figures"])
