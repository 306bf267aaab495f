"""`make heal-bench` (`python -m bench.heal`): every fault scenario of bench/heal/scenarios.py against a real
`mendloop serve` and the real example services, one after another, each from a fresh copy. Writes
bench/heal-results.json and prints, per scenario and overall: healed, escalated (handed to a human), mean time to
heal, false heals (mendloop said completed, the probe found the service broken: must be 0).

    python -m bench.heal [--only NAME,NAME] [--out PATH] [--keep DIR]

Code bugs are fixed by a stand-in agent (a per-bug fix module; rows say "fix supplied"): they measure mendloop's
loop, not an agent. With MENDLOOP_BENCH_MODEL_URL (an OpenAI-compatible endpoint; MENDLOOP_BENCH_MODEL names the
model, MENDLOOP_BENCH_MODEL_KEY holds its key, MENDLOOP_BENCH_AGENT=aider uses aider instead of the `openai`
adapter) the code bugs go to that model instead. Exit 1 on a false heal, or a scenario whose outcome is not the
expected one, or one the bench could not run."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.heal.harness import ROOT, dumps, model_agent, run_scenario
from bench.heal.scenarios import SCENARIOS, by_name


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["time_to_heal_seconds"] for r in results if r.get("time_to_heal_seconds") is not None]
    return {
        "scenarios": len(results),
        "healed": sum(1 for r in results if r.get("healed")),
        "escalated": sum(1 for r in results if r.get("escalated")),
        "false_heals": sum(1 for r in results if r.get("false_heal")),
        "as_expected": sum(1 for r in results if r.get("as_expected")),
        "errors": sum(1 for r in results if r.get("error")),
        "probes_blind": sum(1 for r in results if "control" in r and not r["control"].get("detects_fault")),
        "mean_time_to_heal_seconds": round(sum(times) / len(times), 2) if times else None,
    }


def table(results: list[dict[str, Any]], overall: dict[str, Any]) -> str:
    def yes(value: object) -> str:
        return "yes" if value else "no"

    rows = [("scenario", "class", "healed", "escalated", "time to heal", "false heal", "probe sees fault", "fixed by")]
    for r in results:
        took = r.get("time_to_heal_seconds")
        rows.append(
            (
                r["scenario"] + ("" if r.get("as_expected") else " (!)"),
                r["class"],
                "ERROR" if r.get("error") else yes(r.get("healed")),
                yes(r.get("escalated")),
                f"{took:.1f} s" if took is not None else "-",
                yes(r.get("false_heal")),
                yes(r["control"].get("detects_fault")) if "control" in r else "-",
                r.get("agent") or "playbook",
            )
        )
    mean = overall["mean_time_to_heal_seconds"]
    rows.append(
        (
            f"overall ({overall['scenarios']})",
            "",
            f"{overall['healed']}/{overall['scenarios']}",
            str(overall["escalated"]),
            f"{mean:.1f} s" if mean is not None else "-",
            str(overall["false_heals"]),
            f"{overall['scenarios'] - overall['probes_blind']}/{overall['scenarios']}",
            "",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heal-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "heal-results.json"), help="the results file")
    parser.add_argument("--keep", help="keep each scenario's directory (copy, logs, database) under DIR")
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control arm (each fault left unhealed, where its probe must fail)",
    )
    args = parser.parse_args(argv)
    scenarios = by_name(args.only.split(",")) if args.only else list(SCENARIOS)
    model = model_agent(dict(os.environ))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="heal-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    try:
        for scenario in scenarios:
            root = base / scenario.name
            if root.exists():
                shutil.rmtree(root)
            result = run_scenario(scenario, root, model=model if scenario.fix else None, control=not args.no_control)
            results.append(result)
            verdict = "ERROR " + result["error"] if result.get("error") else result["outcome"]
            print(f"heal-bench: {scenario.name}: {verdict} ({result['seconds']} s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    overall = summarize(results)
    overall["wall_seconds"] = round(time.monotonic() - started, 1)
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "agent": model.label if model else "stand-in: fix supplied per bug",
        "overall": overall,
        "scenarios": results,
    }
    Path(args.out).write_text(dumps(report), encoding="utf-8")
    print(table(results, overall))
    print(f"heal-bench: {overall['wall_seconds']} s; results in {args.out}")
    return 0 if overall["false_heals"] == 0 and overall["as_expected"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
