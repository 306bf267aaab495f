"""The agent runner's own overhead per work order, beside bare git doing the same in the same run.

A generated git repository of 5,000 files (100 directories of 50 source files). Each work order goes through
`AgentRunner.handle()` as in production (claim → worktree at the base commit → agent → the runner's own diff →
safety checks → tests in a fresh worktree with the diff applied → one commit with a `Work-Order:` trailer →
complete), with a trivial `command` agent (`sh` appending one line to one file) and a trivial test command
(`true`), through an in-process stand-in for the pull API, so the server's time is not counted either. Every phase
is timed from inside (the runner's functions wrapped with timers); the agent's and the tests' processes are
subtracted, so what remains is the runner's own work: worktrees, diff, checks, commit, cleanup.

The baseline, measured on the same repository in the same run (one round before each work order, so both see
the machine in the same state): bare `git worktree add` + `git apply` + `git commit` of the same kind of one-line
change (and `git worktree remove`, shown apart). The runner needs two checkouts per work order (the agent's and a
fresh one for the tests), the bare baseline one, so the ratio is about 2 at best.

    .venv/bin/python bench/runner.py [--files 5000] [--orders 7] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mendloop.agents import adapters, agent_runner, patch_pipeline, patch_safety, worktrees  # noqa: E402
from mendloop.agents.agent_runner import AgentRunner, RunnerOptions  # noqa: E402
from mendloop.infra import git, process  # noqa: E402
from mendloop.infra.api_client import AgentClient, Claim, Heartbeat  # noqa: E402

GOAL_SECONDS = 1.0
GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
    "LC_ALL": "C",
}
TARGET_FILE = "src/pkg000/mod000.py"


def _git(repo: Path, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "commit.gpgsign=false", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=GIT_ENV,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def make_repo(path: Path, files: int) -> Path:
    """`files` small Python modules (about 1 KB each) in directories of 50, committed once and packed, as a
    cloned repository is (5,000 loose objects make every checkout open 5,000 more files)."""
    per_dir = 50
    for i in range(files):
        d = path / "src" / f"pkg{i // per_dir:03d}"
        d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n\n" for j in range(20))
        (d / f"mod{i % per_dir:03d}.py").write_text(f'"""module {i}"""\n\n\n{body}')
    _git(path, "init", "-q", "-b", "main")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "generated")
    _git(path, "repack", "-adq")
    _git(path, "prune-packed")
    return path


def settle() -> None:
    """Flush the previous round's writes and deletions before timing the next, so neither side pays for the
    other's cleanup (on a file system mounted with `discard`, freed blocks are trimmed at the next journal
    commit, which can land in the middle of the next checkout)."""
    os.sync()


class StandInApi(AgentClient):
    """The pull API in-process: one claim per call, heartbeats and reports recorded, no HTTP."""

    def __init__(self, repo: Path) -> None:
        super().__init__("http://127.0.0.1:9")
        self.repo = repo
        self.seq = 0
        self.reports: list[tuple[str, Any]] = []

    def claim(self, agent_id: str, *, repository: str | None = None, wait_seconds: float = 0) -> Claim | None:
        self.seq += 1
        wo = {
            "work_order_id": f"wo_bench_{self.seq:04d}",
            "description": f"bench work order {self.seq}",
            "context": {
                "repository": str(self.repo),
                "base_commit": git.head(self.repo),
                "suspect_file": TARGET_FILE,
                "constraints": {"allowed_paths": ["**"], "max_files": 5, "max_changed_lines": 50},
            },
        }
        return Claim(wo, f"lease-{self.seq}", None, 3600.0)

    def heartbeat(self, work_order_id: str, lease_id: str, note: str | None = None) -> Heartbeat:
        return Heartbeat(lease_expires_at=None, cancel_requested=False)

    def complete(self, work_order_id: str, body: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        self.reports.append(("complete", body))
        return {"status": "completed"}

    def fail(self, work_order_id: str, **kw: Any) -> Any:
        self.reports.append(("fail", kw))
        return {"status": "failed"}


class Timers:
    """Wraps the runner's building blocks with timers, per work order."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []
        self._worktrees = 0
        self._processes = 0

    def _patch(self, module: Any, name: str, wrapper: Any) -> None:
        original = getattr(module, name)
        setattr(module, name, wrapper(original))
        self._undo.append(lambda: setattr(module, name, original))

    def timed(self, phase: str) -> Callable[[Any], Any]:
        def wrap(fn: Any) -> Any:
            def inner(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    self.current[phase] += time.perf_counter() - t0

            return inner

        return wrap

    def install(self) -> None:
        def worktree(original: Any) -> Any:
            @contextlib.contextmanager
            def inner(*a: Any, **kw: Any) -> Iterator[Path]:
                self._worktrees += 1
                label = {1: "agent", 2: "tests"}.get(self._worktrees, "commit")
                t0 = time.perf_counter()
                cm = original(*a, **kw)
                path = cm.__enter__()
                self.current[f"worktree add ({label})"] += time.perf_counter() - t0
                try:
                    yield path
                finally:
                    t1 = time.perf_counter()
                    cm.__exit__(None, None, None)
                    self.current[f"worktree remove ({label})"] += time.perf_counter() - t1

            return inner

        def run_process(original: Any) -> Any:
            def inner(*a: Any, **kw: Any) -> Any:
                self._processes += 1
                label = {1: "agent process", 2: "tests process"}.get(self._processes, "process")
                t0 = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    self.current[label] += time.perf_counter() - t0

            return inner

        # Each is patched where the runner looks it up: module attributes (`worktrees.worktree(...)`) in their
        # module, names the runner imported (`give_tree`) in agent_runner's namespace. The agent and test
        # processes are timed at the runner's own `_run_process`: `process.run` also carries every git call.
        self._patch(worktrees, "worktree", worktree)
        self._patch(AgentRunner, "_run_process", run_process)
        self._patch(patch_pipeline, "diff_worktree", self.timed("diff"))
        self._patch(patch_safety, "check_diff", self.timed("checks"))
        self._patch(patch_safety, "check_paths_in_worktree", self.timed("checks"))
        self._patch(patch_pipeline, "apply_check", self.timed("checks"))
        self._patch(patch_pipeline, "apply", self.timed("apply to the test worktree"))
        self._patch(patch_pipeline, "_apply_and_commit", self.timed("commit"))
        self._patch(agent_runner, "give_tree", self.timed("chown (run as another user)"))

    def start_order(self) -> None:
        self.current = defaultdict(float)
        self._worktrees = 0
        self._processes = 0

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()


def bench_runner(
    repo: Path, orders: int, *, run_as: tuple[int, int] | None, before_each: Callable[[int], None] | None = None
) -> dict[str, Any]:
    client = StandInApi(repo)
    agent = ["/bin/sh", "-c", f'echo "# $WORK_ORDER_ID" >> {TARGET_FILE}']
    runner = AgentRunner(
        client,
        RunnerOptions(
            repo=repo,
            adapter=adapters.create("command", agent),
            agent_id="bench",
            test_command=["true"],
            run_as=run_as,
            environ={"PATH": os.environ.get("PATH", os.defpath)},
            # The same place the bare-git baseline of this round uses.
            workdir=Path(tempfile.gettempdir()),
        ),
    )
    runner.prepare()
    timers = Timers()
    timers.install()
    per_order: list[dict[str, float]] = []
    try:
        for i in range(orders):
            if before_each is not None:
                before_each(i)
            settle()
            timers.start_order()
            t0 = time.perf_counter()
            outcome = runner.process_next(wait_seconds=0)
            total = time.perf_counter() - t0
            assert outcome is not None and outcome.status == "completed", outcome and outcome.message
            phases = dict(timers.current)
            phases.pop("process", None)
            excluded = phases.get("agent process", 0.0) + phases.get("tests process", 0.0)
            phases["total"] = total
            phases["overhead"] = total - excluded
            per_order.append(phases)
    finally:
        timers.uninstall()
        client.close()
    # The first order warms git's caches (index, object lookups); the median is the steady state.
    names = sorted({k for p in per_order for k in p})
    median = {k: statistics.median(p.get(k, 0.0) for p in per_order) for k in names}
    return {"orders": orders, "median_seconds": median, "overheads": [p["overhead"] for p in per_order]}


class BareGit:
    """worktree add + apply + commit of the same kind of one-line change, bare git on the same repository."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.rounds: dict[str, list[float]] = defaultdict(list)

    def round(self, i: int) -> None:
        repo = self.repo
        settle()
        wt = Path(tempfile.mkdtemp(prefix="bench-bare-")) / "wt"
        t0 = time.perf_counter()
        _git(repo, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
        t1 = time.perf_counter()
        with (wt / TARGET_FILE).open("a") as fh:
            fh.write(f"# bare {i}\n")
        diff = _git(wt, "diff")
        t2 = time.perf_counter()
        _git(repo, "apply", "--index", "-", stdin=diff)
        t3 = time.perf_counter()
        _git(repo, "commit", "-q", "-m", f"bare {i}\n\nWork-Order: wo_bare_{i}")
        t4 = time.perf_counter()
        _git(repo, "worktree", "remove", "--force", str(wt))
        t5 = time.perf_counter()
        shutil.rmtree(wt.parent, ignore_errors=True)
        for name, value in (
            ("worktree add", t1 - t0),
            ("apply", t3 - t2),
            ("commit", t4 - t3),
            ("worktree remove", t5 - t4),
        ):
            self.rounds[name].append(value)
        self.rounds["add+apply+commit"].append((t1 - t0) + (t3 - t2) + (t4 - t3))

    def medians(self) -> dict[str, float]:
        out = {name: statistics.median(values) for name, values in self.rounds.items()}
        out["best"] = min(self.rounds["add+apply+commit"])
        return out


def run(files: int = 5000, orders: int = 7) -> dict[str, Any]:
    """Generate the repository, run `orders` work orders through the runner and the bare-git baseline, on disk
    (the system's temp dir) and, where there is one, on tmpfs (/dev/shm, the runner's default workdir)."""
    result = _run_in(None, files, orders)
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        # A 5,000-file checkout costs what the disk makes it cost (0.05 s to over 1 s on a busy VM disk); on tmpfs,
        # where the runner puts its worktrees by default, the same work order shows the runner's own work.
        result["tmpfs"] = _run_in("/dev/shm", files, orders, as_nobody=False)
    return result


def _run_in(directory: str | None, files: int, orders: int, *, as_nobody: bool = True) -> dict[str, Any]:
    previous = tempfile.tempdir
    tempfile.tempdir = directory  # where worktrees.worktree() puts the runner's worktrees, and the bare ones go
    try:
        with tempfile.TemporaryDirectory(prefix="mendloop-bench-runner-") as d:
            tmp = Path(d)
            t0 = time.perf_counter()
            repo = make_repo(tmp / "repo", files)
            generated = time.perf_counter() - t0
            tracked = len(_git(repo, "ls-files").splitlines())
            # Interleaved, one bare round before each work order, so both see the machine in the same state.
            baseline = BareGit(repo)
            runner = bench_runner(repo, orders, run_as=None, before_each=baseline.round)
            bare = baseline.medians()
            result: dict[str, Any] = {
                "directory": tempfile.gettempdir(),
                "files": tracked,
                "generate_seconds": generated,
                "runner": runner,
                "bare_git": bare,
                "goal_seconds": GOAL_SECONDS,
            }
            if as_nobody and os.geteuid() == 0 and _nobody_can_enter():
                # As root the runner drops the agent and the tests to uid 65534: it chowns the worktrees.
                result["runner_as_nobody"] = bench_runner(repo, orders, run_as=agent_runner.NOBODY)
            result["ratio"] = runner["median_seconds"]["overhead"] / bare["add+apply+commit"]
    finally:
        tempfile.tempdir = previous
    return result


def _nobody_can_enter() -> bool:
    return process.blocked_for(Path(tempfile.gettempdir()), agent_runner.NOBODY) is None


def _report_one(result: dict[str, Any]) -> list[str]:
    r, b = result["runner"]["median_seconds"], result["bare_git"]
    lines = [
        f"agent runner overhead per work order, repository of {result['files']:,} files, worktrees in "
        f"{result['directory']} (median of {result['runner']['orders']} work orders)",
        f"  runner's own work (total - agent - tests)  {r['overhead'] * 1000:8.0f} ms   goal <= "
        f"{result['goal_seconds'] * 1000:.0f} ms   (best {min(result['runner']['overheads']) * 1000:.0f} ms)",
    ]
    skip = {"overhead", "total", "agent process", "tests process"}
    for name in sorted(k for k in r if k not in skip):
        lines.append(f"    {name:<38} {r[name] * 1000:8.0f} ms")
    other = r["overhead"] - sum(v for k, v in r.items() if k not in skip)
    lines.append(f"    {'other (prompt, scratch, reports)':<38} {max(other, 0.0) * 1000:8.0f} ms")
    lines.append(
        f"    excluded: agent process {r.get('agent process', 0) * 1000:.0f} ms, "
        f"tests process {r.get('tests process', 0) * 1000:.0f} ms"
    )
    lines.append(
        f"  bare git worktree add + apply + commit     {b['add+apply+commit'] * 1000:8.0f} ms   "
        f"(add {b['worktree add'] * 1000:.0f}, apply {b['apply'] * 1000:.0f}, commit {b['commit'] * 1000:.0f}; "
        f"worktree remove {b['worktree remove'] * 1000:.0f} ms more; best {b['best'] * 1000:.0f} ms)"
    )
    lines.append(f"  ratio runner overhead : bare git           {result['ratio']:8.2f}")
    nobody = result.get("runner_as_nobody")
    if nobody:
        n = nobody["median_seconds"]
        lines.append(
            f"  as root, agent and tests as uid 65534      {n['overhead'] * 1000:8.0f} ms   "
            f"(of which chown {n.get('chown (run as another user)', 0) * 1000:.0f} ms)"
        )
    return lines


def report(result: dict[str, Any]) -> list[str]:
    lines = _report_one(result)
    if "tmpfs" in result:
        lines += _report_one(result["tmpfs"])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--orders", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(files=args.files, orders=args.orders)
    print(json.dumps(result, indent=2) if args.json else "\n".join(report(result)))


if __name__ == "__main__":
    main()
