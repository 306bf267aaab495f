"""Chaos: incidents across the six built-in playbooks while mendloop's own processes are killed with SIGKILL.

Several sample-service instances (examples/sample_service, each a copy in its own git repository, so a code
scenario's patch is applied there and reset before the next use) are bound to mendloop as targets svc0..svcN.
One driver thread per instance injects a fault, triggers the routed playbook (a distinct description and
`dedupe_key` per incident, so fingerprints differ and a retried trigger can't start a second run), completes the
coding work order as a stand-in agent (it applies the known patch; the hosted agent is what the machine can't
run), and waits for the run to end. Meanwhile a killer thread SIGKILLs one of mendloop's processes every few
seconds and starts it again:

- postgres: `serve` (no worker threads) plus two `mendloop worker` processes; a random worker is killed;
- sqlite: `serve` with its worker threads; `serve` itself is killed.

At the end (checks()): every run is final; one run per incident; work orders, runs and events agree; no work
order is duplicated and no event lost; no completed step's side effect appears twice in a service's log.

    python bench/chaos.py --backend postgres --postgres-url postgresql+psycopg://test@127.0.0.1:5544/postgres
    make chaos            # both backends, 1,000 incidents each
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mendloop.domain.states import RUN_FINAL  # noqa: E402

SERVICE_DIR = ROOT / "examples" / "sample_service"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
FINAL = {s.value for s in RUN_FINAL}
PY = sys.executable


def _replace(path: str, old: str, new: str) -> Callable[[Path], None]:
    def patch(repo: Path) -> None:
        target = repo / path
        target.write_text(target.read_text().replace(old, new))

    return patch


def _fix_chunking(repo: Path) -> None:
    subprocess.run([PY, "-B", "fix_large_file_chunking.py"], cwd=repo, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    body: dict[str, Any]
    error_type: str
    # The stand-in coding agent's patch for a code cause; None: the playbook heals without code.
    patch: Callable[[Path], None] | None = None


SCENARIOS = (
    Scenario("db_disconnect", "db_disconnect", {"reconnect_failures": 1}, "database_connection"),
    Scenario("memory", "fill_caches", {}, "memory_pressure"),
    Scenario("schema", "corrupt_schema", {}, "schema_invalid"),
    Scenario("timeout_config", "low_timeout", {}, "pipeline_timeout"),
    Scenario("timeout_code", "large_file", {}, "pipeline_timeout", _fix_chunking),
    Scenario("ingestion_data", "ingestion_failure", {"file_path": "book_1.pdf", "cause": "data"}, "ingestion_failed"),
    Scenario(
        "ingestion_code",
        "ingestion_failure",
        {"file_path": "book_2.pdf", "cause": "code"},
        "ingestion_failed",
        _replace("schema_validator.py", r'r"^\d{4}/\d{2}/\d{2}$"', r'r"^\d{4}-\d{2}-\d{2}$"'),
    ),
    Scenario("verification_data", "verification_failure", {"cause": "data"}, "verification_failed"),
    Scenario(
        "verification_code",
        "verification_failure",
        {"cause": "logic"},
        "verification_failed",
        _replace("verification.py", 'if not doc.get("page_count"):', 'if doc.get("page_count") is None:'),
    ),
)


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=chaos", "-c", "user.email=chaos@localhost", *args],
        check=True,
        capture_output=True,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Instance:
    """One sample service: a git repository holding a copy of its code, a state directory, a subprocess."""

    def __init__(self, index: int, work: Path) -> None:
        self.name = f"svc{index}"
        self.repo = work / self.name / "repo"
        self.state = work / self.name / "state"
        shutil.copytree(SERVICE_DIR, self.repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "state"))
        git(self.repo, "init", "-q")
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "sample service")
        self.port = free_port()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10, trust_env=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.resets = 0

    def start(self) -> None:
        with (self.state.parent / "service.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-B", "service.py", "--port", str(self.port), "--state-dir", str(self.state)],
                cwd=self.repo,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def healthy(self) -> bool:
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def boot_id(self) -> str | None:
        """The running boot's id; None while the service restarts (it re-execs and does not answer a moment)."""
        try:
            resp = self.client.get("/health")
        except httpx.TransportError:
            return None
        boot: str | None = resp.json().get("boot_id") if resp.status_code == 200 else None
        return boot

    def inject(self, scenario: Scenario) -> None:
        wait_until(lambda: self.boot_id() is not None, 30, f"{self.name} up")
        resp = self.client.post(f"/admin/faults/{scenario.fault}", json=scenario.body)
        resp.raise_for_status()

    def reset(self) -> None:
        """Put the repository back to its first commit and the service's state back to its defaults, and start it
        again onto that code. The state too: a code scenario's fault leaves data that only the patched code accepts
        (the verification scenario's legitimately empty document), and the reset code would fail every later
        verification on this instance for a reason no playbook can fix. The side-effect log stays: it is what the
        end checks read."""
        self.stop_service()
        git(self.repo, "checkout", "-q", "--", ".")
        git(self.repo, "clean", "-qfd")
        (self.state / "state.json").unlink(missing_ok=True)
        self.resets += 1
        self.start()
        wait_until(lambda: self.boot_id() is not None, 30, f"{self.name} up")

    def stop_service(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.stop_service()
        self.client.close()

    def side_effects(self) -> list[dict[str, Any]]:
        path = self.state / "side_effects.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]


def mendloop_config(instances: list[Instance], database_url: str, *, serve_workers: int) -> dict[str, Any]:
    quick = yaml.safe_load(QUICKSTART.read_text())
    capabilities = quick["targets"]["sample_service"]["capabilities"]
    targets = {i.name: {"base_url": f"http://127.0.0.1:{i.port}", "capabilities": capabilities} for i in instances}
    return {
        "database_url": database_url,
        "targets": targets,
        "default_target": instances[0].name,
        "workers": serve_workers,
        "poll_interval": 0.05,
        # A killed process's runs come back at the restart (reclaim of dead pids) or after this at the latest.
        "lease_seconds": 10,
    }


@dataclass
class Proc:
    """A mendloop process the killer may SIGKILL and start again."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    ready: Callable[[subprocess.Popen[bytes]], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        if self.ready is not None:
            self.ready(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()  # reaped, so a restarted worker sees the pid gone and reclaims its leases at once
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Outcome:
    incidents: int = 0
    by_scenario: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    # Each scenario's final statuses, and why a few runs that did not complete ended as they did: a kill must
    # never turn a run that would complete into one that needs a human.
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    not_completed: list[str] = field(default_factory=list)
    kills: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)  # dedupe key -> run id


class Api:
    """mendloop's API, retried while the server is down (it may be killed at any moment)."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=30, trust_env=False)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, ok: tuple[int, ...] = (200,)) -> Any:
        deadline = time.monotonic() + 120
        while True:
            try:
                resp = self.client.request(method, path, json=body)
                if resp.status_code in ok:
                    return resp.json()
                if resp.status_code < 500:
                    raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: mendloop did not answer within 120 s")
            time.sleep(0.1)


def drive(
    inst: Instance,
    api: Api,
    plan: list[tuple[str, Scenario]],
    out: Outcome,
    lock: threading.Lock,
    killed: threading.Event | None = None,
) -> None:
    """One incident at a time on this instance: inject, trigger, play the coding agent, wait for the end. The last
    incident waits for the first kill (`killed`): a short seeded run can otherwise end before the killer's first
    turn and prove nothing about recovery."""
    for n, (key, scenario) in enumerate(plan):
        if killed is not None and n == len(plan) - 1 and not killed.wait(timeout=120):
            with lock:
                out.problems.append(f"{inst.name}: no process was killed within 120 s")
        inst.inject(scenario)
        body = {
            "error_type": scenario.error_type,
            "description": f"{scenario.name} on {inst.name} ({key})",
            "component": inst.name,
            "dedupe_key": key,
            "wait_seconds": 0,
        }
        if "file_path" in scenario.body:
            body["file_path"] = scenario.body["file_path"]
        run_id: str = api.call("POST", "/patches/trigger", body)["run_id"]
        with lock:
            out.run_ids[key] = run_id
        patched = False
        deadline = time.monotonic() + 120
        while True:
            run = api.call("GET", f"/patches/runs/{run_id}")
            if run["status"] in FINAL:
                break
            if run["status"] == "awaiting_patch" and not patched:
                if scenario.patch is not None:
                    scenario.patch(inst.repo)
                    patched = True
                done = {"tests_passed": True, "files_changed": 1}
                api.call("POST", f"/patches/work-orders/{run['coding_work_order_id']}/complete", done, ok=(200, 409))
                patched = True
            if time.monotonic() > deadline:
                with lock:
                    out.problems.append(f"{run_id} ({scenario.name} on {inst.name}) stuck in {run['status']}")
                break
            time.sleep(0.05)
        with lock:
            out.incidents += 1
            out.by_scenario[scenario.name] += 1
            out.outcomes[scenario.name][run["status"]] += 1
            if run["status"] != "completed" and len(out.not_completed) < 20:
                last = (run.get("timeline") or [""])[-1]
                why = last.get("message") or last.get("line") or last if isinstance(last, dict) else last
                out.not_completed.append(f"{run_id} ({scenario.name}): {run['status']}: {str(why)[:200]}")
        if scenario.patch is not None and patched:
            inst.reset()


def killer(
    victims: list[Proc], rnd: random.Random, every: tuple[float, float], stop: threading.Event, killed: threading.Event
) -> None:
    """SIGKILL a random victim every `every` seconds and start it again, until `stop` is set; `killed` is set after
    the first kill."""
    while not stop.wait(rnd.uniform(*every)):
        victim = rnd.choice(victims)
        victim.kill()
        killed.set()
        victim.start()


def checks(engine: sa.Engine, instances: list[Instance], out: Outcome) -> list[str]:
    """The end state's invariants; a list of what does not hold (empty: all hold)."""
    problems: list[str] = []
    with engine.connect() as conn:
        runs = conn.execute(
            sa.text("SELECT id, status, dedupe_key, coding_work_order_id, trigger_event_id FROM runs")
        ).all()
        orders = conn.execute(sa.text("SELECT id, self_healing_run_id, status FROM work_orders")).all()
        events = conn.execute(sa.text("SELECT id, type, run_id, work_order_id FROM events")).all()
    out.statuses = Counter(r.status for r in runs)
    not_final = [f"{r.id}={r.status}" for r in runs if r.status not in FINAL]
    if not_final:
        problems.append(f"{len(not_final)} run(s) not final: {', '.join(not_final[:10])}")
    keys = Counter(r.dedupe_key for r in runs)
    if len(runs) != out.incidents or set(keys) != set(out.run_ids) or max(keys.values(), default=1) != 1:
        problems.append(f"{len(runs)} runs for {out.incidents} incidents ({len(set(keys))} distinct keys)")
    per_run = Counter(o.self_healing_run_id for o in orders)
    duplicated = [run for run, n in per_run.items() if n > 1]
    if duplicated:
        problems.append(f"work orders duplicated for runs {duplicated[:10]}")
    escalated = {r.id: r.coding_work_order_id for r in runs if r.coding_work_order_id}
    by_id = {o.id: o for o in orders}
    if len(orders) != len(escalated) or any(
        by_id.get(w) is None or by_id[w].self_healing_run_id != r for r, w in escalated.items()
    ):
        problems.append(f"{len(orders)} work orders for {len(escalated)} escalated runs")
    event_ids = {e.id for e in events}
    completed = Counter(e.run_id for e in events if e.type == "self_healing.completed")
    created = Counter(e.work_order_id for e in events if e.type == "coding_agent.work_order_created")
    for r in runs:
        if r.trigger_event_id is None or r.trigger_event_id not in event_ids:
            problems.append(f"{r.id}: its trigger event {r.trigger_event_id} is missing")
        if r.status in FINAL and completed[r.id] != 1:
            problems.append(f"{r.id}: {completed[r.id]} self_healing.completed events")
    for o in orders:
        if created[o.id] != 1:
            problems.append(f"work order {o.id}: {created[o.id]} work_order_created events")
    for inst in instances:
        done = Counter(
            (e["action"], e["idempotency_key"])
            for e in inst.side_effects()
            if not e["action"].startswith("fault.") and 200 <= e["status"] < 300
        )
        again = [pair for pair, n in done.items() if n > 1]
        if again:
            problems.append(f"{inst.name}: completed side effects repeated: {again[:5]}")
    return problems


@contextmanager
def sample_services(work: Path, n_instances: int) -> Iterator[list[Instance]]:
    """`n_instances` sample services, started and answering; stopped afterwards."""
    instances = [Instance(i, work) for i in range(n_instances)]
    try:
        for inst in instances:
            inst.start()
        for inst in instances:
            wait_until(inst.healthy, 30, f"{inst.name} start")
        yield instances
    finally:
        for inst in instances:
            inst.stop()


def run_chaos(
    work: Path,
    *,
    backend: str,
    database_url: str,
    incidents: int,
    seed: int,
    instances: int = 4,
    kill_every: tuple[float, float] = (2.0, 4.0),
) -> Outcome:
    """Run the chaos scenario once; returns the outcome, whose `problems` lists every invariant that broke."""
    rnd = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    out = Outcome()
    lock = threading.Lock()
    with sample_services(work, instances) as insts:
        cfg = work / "mendloop.yaml"
        serve_workers = 0 if backend == "postgres" else 2
        cfg.write_text(yaml.safe_dump(mendloop_config(insts, database_url, serve_workers=serve_workers)))
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        api = Api(f"http://127.0.0.1:{port}")

        def serve_ready(proc: subprocess.Popen[bytes]) -> None:
            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"mendloop serve exited {proc.returncode}; see {work / 'serve.log'}")
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).is_success
                except httpx.TransportError:
                    return False

            wait_until(up, 60, "mendloop serve")

        mendloop = [PY, "-m", "mendloop"]
        serve = Proc(
            "serve",
            [*mendloop, "serve", "--config", str(cfg), "--port", str(port), "--log-level", "warning"],
            work / "serve.log",
            env,
            serve_ready,
        )
        workers = [
            Proc(
                f"worker{i}",
                [*mendloop, "worker", "--config", str(cfg), "--count", "2", "--log-level", "warning"],
                work / f"worker{i}.log",
                env,
            )
            for i in range(2 if backend == "postgres" else 0)
        ]
        procs = [serve, *workers]
        stop = threading.Event()
        kill_thread: threading.Thread | None = None
        started = time.monotonic()
        try:
            for p in procs:
                p.start()
            plans: list[list[tuple[str, Scenario]]] = [[] for _ in insts]
            for n in range(incidents):
                plans[n % len(insts)].append((f"chaos-{seed}-{n}-{uuid.uuid4().hex[:6]}", rnd.choice(SCENARIOS)))
            victims = workers if backend == "postgres" else [serve]
            killed = threading.Event()
            kill_thread = threading.Thread(target=killer, args=(victims, rnd, kill_every, stop, killed), daemon=True)
            kill_thread.start()
            errors: list[BaseException] = []

            def guarded(inst: Instance, plan: list[tuple[str, Scenario]]) -> None:
                try:
                    drive(inst, api, plan, out, lock, killed)
                except BaseException as exc:  # reported as a problem below, with the thread's instance
                    errors.append(exc)
                    with lock:
                        out.problems.append(f"{inst.name}: driver stopped: {exc!r}")

            threads = [threading.Thread(target=guarded, args=(i, p)) for i, p in zip(insts, plans, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            stop.set()
            if kill_thread is not None:
                kill_thread.join()  # before stopping the processes: it may be starting one again
            out.kills = sum(p.kills for p in procs)
            for p in procs:
                p.stop()
        out.seconds = time.monotonic() - started
        engine = sa.create_engine(database_url)
        try:
            out.problems.extend(checks(engine, insts, out))
        finally:
            engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--postgres-url", default=os.environ.get("MENDLOOP_TEST_POSTGRES_URL"))
    parser.add_argument("--incidents", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    failed = False
    for backend in args.backend or ["postgres", "sqlite"]:
        work = Path(f"/tmp/mendloop-chaos-{backend}-{args.seed}")
        shutil.rmtree(work, ignore_errors=True)
        if backend == "sqlite":
            url = f"sqlite:///{work / 'mendloop.db'}"
        else:
            if not args.postgres_url:
                parser.error("postgres needs --postgres-url or MENDLOOP_TEST_POSTGRES_URL")
            url = fresh_postgres_database(args.postgres_url)
        out = run_chaos(
            work, backend=backend, database_url=url, incidents=args.incidents, seed=args.seed, instances=args.instances
        )
        print(
            json.dumps(
                {
                    "backend": backend,
                    "seed": args.seed,
                    "incidents": out.incidents,
                    "kills": out.kills,
                    "seconds": round(out.seconds, 1),
                    "statuses": dict(out.statuses),
                    "scenarios": dict(out.by_scenario),
                    "outcomes": {k: dict(v) for k, v in sorted(out.outcomes.items())},
                    "not_completed": out.not_completed,
                    "problems": out.problems,
                },
                indent=2,
            )
        )
        failed = failed or bool(out.problems)
    return 1 if failed else 0


def fresh_postgres_database(admin_url: str) -> str:
    """A new empty database on the server of `admin_url` (serve migrates it); returns its URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        admin.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
    ) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    db = make_url(url)
    admin = db.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.database or "")))


if __name__ == "__main__":
    sys.exit(main())
