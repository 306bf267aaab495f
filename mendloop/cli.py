"""The command line: parse → App or HTTP call → output and exit code. Every option also reads `MENDLOOP_*`."""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, cast

import httpx
import typer
from rich.console import Console
from rich.table import Table

from mendloop import errors

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="mendloop: self-healing with coding agents.")
runs_cli = typer.Typer(no_args_is_help=True, help="Playbook runs.")
wo_cli = typer.Typer(no_args_is_help=True, help="Coding agent work orders.")
pb_cli = typer.Typer(no_args_is_help=True, help="Playbooks.")
db_cli = typer.Typer(no_args_is_help=True, help="The database.")
config_cli = typer.Typer(no_args_is_help=True, help="Configuration.")
cli.add_typer(runs_cli, name="runs")
cli.add_typer(wo_cli, name="work-orders")
cli.add_typer(pb_cli, name="playbooks")
cli.add_typer(db_cli, name="db")
cli.add_typer(config_cli, name="config")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", envvar="MENDLOOP_CONFIG", help="YAML config file.", dir_okay=False)
]
UrlOpt = Annotated[str, typer.Option("--url", envvar="MENDLOOP_URL", help="mendloop server URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="MENDLOOP_TOKEN", help="Bearer token.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON answer, for scripts.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- server processes ---------------------------------------------------------------------------------------


@cli.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(envvar="MENDLOOP_HOST", help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(envvar="MENDLOOP_PORT", help="Listen port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker threads (0: API only).")] = None,
    log_level: Annotated[str, typer.Option(envvar="MENDLOOP_LOG_LEVEL")] = "info",
) -> None:
    """API + workers in one process. Upgrades an empty database itself."""
    import uvicorn

    from mendloop.api.server import create_api
    from mendloop.app import App
    from mendloop.config import load_settings

    _logging(log_level)
    settings = load_settings(config, host=host, port=port, workers=workers)
    if not _is_loopback(settings.host) and not settings.api_tokens:
        fail(f"refusing to listen on {settings.host} without api_tokens; set MENDLOOP_API_TOKENS or use 127.0.0.1")
    app = App(settings, embedded_agent=True, watch=True)  # starts `agent_runner:` and `watchers:` if configured
    api = create_api(app)
    server = uvicorn.Server(
        uvicorn.Config(api, host=settings.host, port=settings.port, log_level=log_level, access_log=False)
    )
    server.run()
    if not server.started:
        raise typer.Exit(1)


@cli.command()
def worker(
    config: ConfigOpt = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="Worker threads.")] = None,
    log_level: Annotated[str, typer.Option(envvar="MENDLOOP_LOG_LEVEL")] = "info",
) -> None:
    """Workers only, no API: run as many as needed against one PostgreSQL database."""
    from mendloop.app import App
    from mendloop.config import load_settings

    _logging(log_level)
    settings = load_settings(config, workers=count)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app = App(settings).open()
    err.print(f"mendloop worker ready: {app.workers.count} thread(s) on {app.store.engine.dialect.name}")
    try:
        stop.wait()
    finally:
        app.close()


@cli.command()
def watch(
    config: ConfigOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    spool: Annotated[
        Path,
        typer.Option(
            "--spool",
            envvar="MENDLOOP_SPOOL",
            file_okay=False,
            help="Where events wait while the server is unreachable, and the files' offsets.",
        ),
    ] = Path(".mendloop/spool"),
    log_level: Annotated[str, typer.Option(envvar="MENDLOOP_LOG_LEVEL")] = "info",
) -> None:
    """Forwarder: run the config's `watchers:` on this host and ship their events to the server's POST /events,
    buffering on disk while it is unreachable."""
    from mendloop.config import load_settings
    from mendloop.intake.forwarder import Forwarder, run_forwarder

    _logging(log_level)
    settings = load_settings(config)
    forwarder = Forwarder(settings, url=url, token=token, spool_dir=spool)
    names = ", ".join(w.name for w in settings.watchers)
    err.print(f"mendloop watch: {names} → {url}/events (spool {spool})", markup=False)
    run_forwarder(forwarder)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def agent(
    ctx: typer.Context,
    repo: Annotated[
        Path,
        typer.Option("--repo", envvar="MENDLOOP_AGENT_REPO", help="The git repository to patch.", file_okay=False),
    ],
    adapter: Annotated[
        str,
        typer.Option(
            "--adapter",
            envvar="MENDLOOP_AGENT_ADAPTER",
            help="aider, claude, codex, openhands, command (the program after --) or openai.",
        ),
    ],
    test_command: Annotated[
        str | None,
        typer.Option(
            "--test-command",
            envvar="MENDLOOP_AGENT_TEST_COMMAND",
            help="Test argv as one string (split like a shell would, never run by one); default: the work order's.",
        ),
    ] = None,
    apply: Annotated[
        str, typer.Option("--apply", envvar="MENDLOOP_AGENT_APPLY", help="commit | branch | approval.")
    ] = "commit",
    once: Annotated[
        bool, typer.Option("--once", help="Process one work order (if any within --wait), then exit.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    agent_id: Annotated[str | None, typer.Option("--agent-id", envvar="MENDLOOP_AGENT_ID")] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", envvar="MENDLOOP_AGENT_TIMEOUT", min=1, help="Seconds the agent may run.")
    ] = 1800,
    test_timeout: Annotated[
        float, typer.Option("--test-timeout", envvar="MENDLOOP_AGENT_TEST_TIMEOUT", min=1, help="Seconds for tests.")
    ] = 600,
    wait: Annotated[
        float, typer.Option("--wait", envvar="MENDLOOP_AGENT_WAIT", min=0, max=120, help="Long-poll seconds per claim.")
    ] = 20,
    run_as: Annotated[
        str,
        typer.Option(
            "--run-as",
            envvar="MENDLOOP_AGENT_RUN_AS",
            help="auto (uid 65534 when root), none, or UID:GID: the user the agent and the tests run as.",
        ),
    ] = "auto",
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            envvar="MENDLOOP_AGENT_WORKDIR",
            file_okay=False,
            help="Where worktrees go (default: /dev/shm when it has room, else the temp dir).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="MENDLOOP_LOG_LEVEL")] = "info",
) -> None:
    """The agent runner: claim work orders and drive a coding agent in a git worktree; test and apply its diff.

    Anything after `--` goes to the adapter: extra flags for aider/claude/codex/openhands, the program for
    `command`, `--base-url/--model/--api-key-env` for `openai`.
    """
    import shlex

    from mendloop.agents import adapters
    from mendloop.agents.agent_runner import APPLY_MODES, AgentRunner, ApplyMode, RunnerOptions
    from mendloop.agents.client import AgentClient

    _logging(log_level)
    if apply not in APPLY_MODES:
        fail(f"--apply: {apply!r} is not one of {', '.join(APPLY_MODES)}")
    tests: list[str] | None = None
    if test_command:
        try:
            tests = shlex.split(test_command)
        except ValueError as exc:
            fail(f"--test-command: {exc}")
    owner: tuple[int, int] | Literal["auto"] | None = "auto"
    if run_as == "auto":
        pass
    elif run_as == "none":
        owner = None
    else:
        try:
            uid, _, gid = run_as.partition(":")
            owner = (int(uid), int(gid or uid))
        except ValueError:
            fail(f"--run-as: {run_as!r} is not auto, none or UID:GID")
    chosen = adapters.create(adapter, list(ctx.args))
    client = AgentClient(url, token)
    runner = AgentRunner(
        client,
        RunnerOptions(
            repo=repo,
            adapter=chosen,
            agent_id=agent_id,
            test_command=tests,
            test_timeout=test_timeout,
            agent_timeout=timeout,
            apply=cast(ApplyMode, apply),
            wait_seconds=wait,
            run_as=owner,
            workdir=workdir,
        ),
    )
    signal.signal(signal.SIGTERM, lambda *_: runner.stop(timeout=0))
    signal.signal(signal.SIGINT, lambda *_: runner.stop(timeout=0))
    err.print(f"mendloop agent runner {runner.agent_id}: {adapter} on {runner.repo}, claiming from {url}")
    try:
        done = runner.run(once=once)
    finally:
        client.close()
    if once:
        if done == 0:
            out.print(f"no work order within {wait:g}s")
            return
        outcome = runner.outcomes[-1]
        out.print(f"{outcome.work_order_id}: {outcome.status}: {outcome.reason or ''} {outcome.message}", markup=False)
        if outcome.status != "completed":
            raise typer.Exit(1)


@db_cli.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply the migrations to the configured database."""
    from mendloop.config import load_settings
    from mendloop.storage import migrate
    from mendloop.storage.store import Store

    store = Store(load_settings(config).database_url)
    try:
        migrate.upgrade(store.engine)
        out.print(f"database at revision {migrate.current(store.engine)}")
    finally:
        store.close()


@db_cli.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Show the database's migration revision."""
    from mendloop.config import load_settings
    from mendloop.storage import migrate
    from mendloop.storage.store import Store

    store = Store(load_settings(config).database_url)
    try:
        out.print(f"current: {migrate.current(store.engine)}  head: {migrate.head()}")
    finally:
        store.close()


@config_cli.command("schema")
def config_schema() -> None:
    """Print the config file's JSON Schema."""
    from mendloop.config import config_json_schema

    sys.stdout.write(config_json_schema() + "\n")


@config_cli.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Load the config and the playbooks it names; report the first problem."""
    from mendloop.config import load_settings
    from mendloop.playbooks.actions.capability import Capabilities
    from mendloop.playbooks.loader import PlaybookSet
    from mendloop.playbooks.templates import Templates

    settings = load_settings(config)
    templates = Templates()
    pbs = PlaybookSet.load(settings.playbook_dirs, templates)
    Capabilities(settings.targets, templates)
    missing = {e: p for e, p in settings.routing_table().items() if pbs.get(p) is None}
    if missing:
        e, p = next(iter(missing.items()))
        fail(f"routing.{e}: no playbook {p!r} is loaded")
    out.print(f"ok: {len(pbs.by_id)} playbooks, {len(settings.targets)} target(s)")


# -- HTTP client commands -----------------------------------------------------------------------------------


def _call(method: str, url: str, path: str, token: str | None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    try:
        resp = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=kw.pop("timeout", 60), **kw)
    except httpx.HTTPError as exc:
        fail(f"cannot reach mendloop at {url}: {exc}")
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text.strip()[:300]}
    if resp.status_code >= 400:
        detail = body.get("detail") if isinstance(body, dict) else body
        fail(f"{resp.status_code}: {detail}")
    return body


def _print_json(body: Any) -> None:
    sys.stdout.write(json.dumps(body, indent=2) + "\n")


@cli.command()
def trigger(
    error_type: Annotated[str, typer.Option("--error-type", "-e", help="e.g. database_connection")],
    description: Annotated[str, typer.Option("--description", "-d")],
    file_path: Annotated[str | None, typer.Option("--file-path")] = None,
    component: Annotated[str | None, typer.Option("--component")] = None,
    wait: Annotated[float | None, typer.Option("--wait", help="Seconds to wait for escalation or the end.")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trigger the playbook routed for an error type (POST /patches/trigger)."""
    body: dict[str, Any] = {"error_type": error_type, "description": description}
    for k, v in (("file_path", file_path), ("component", component), ("wait_seconds", wait)):
        if v is not None:
            body[k] = v
    answer = _call("POST", url, "/patches/trigger", token, json=body, timeout=(wait or 30) + 30)
    if as_json:
        _print_json(answer)
        return
    out.print(f"{answer['message']}: run {answer['run_id']} is {answer['status']}")
    if answer.get("work_order_id"):
        out.print(f"escalated to coding agent: work order {answer['work_order_id']}")


@runs_cli.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option("--status")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    answer = _call("GET", url, "/patches/runs", token, params=params)
    if as_json:
        _print_json(answer)
        return
    table = Table("run", "playbook", "status", "steps", "work order", "created")
    for r in answer["runs"]:
        table.add_row(
            r["run_id"],
            r["playbook_id"],
            r["status"],
            f"{r['steps_completed']}/{r['steps_total']}",
            r["coding_work_order_id"] or "",
            r["created_at"],
        )
    out.print(table)


@runs_cli.command("show")
def runs_show(run_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = _call("GET", url, f"/patches/runs/{run_id}", token)
    if as_json:
        _print_json(answer)
        return
    out.print(f"{answer['run_id']}  {answer['playbook_id']} ({answer['playbook_type']})  status: {answer['status']}")
    if answer.get("error"):
        out.print(f"error: {answer['error']}", markup=False)
    for item in answer["timeline"]:
        out.print(f"  [{item['time'][11:19]}] {item['message']}", markup=False)


@wo_cli.command("list")
def wo_list(
    status: Annotated[str | None, typer.Option("--status")] = None,
    run_id: Annotated[str | None, typer.Option("--run")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if run_id:
        params["self_healing_run_id"] = run_id
    answer = _call("GET", url, "/patches/work-orders", token, params=params)
    if as_json:
        _print_json(answer)
        return
    table = Table("work order", "status", "complexity", "run", "description")
    for w in answer["work_orders"]:
        table.add_row(
            w["work_order_id"], w["status"], w["estimated_complexity"], w["self_healing_run_id"] or "", w["description"]
        )
    out.print(table)
    out.print(" ".join(f"{k}={v}" for k, v in answer["stats"].items()))


@wo_cli.command("show")
def wo_show(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = _call("GET", url, f"/patches/work-orders/{wo_id}", token)
    if as_json:
        _print_json(answer)
        return
    for key in ("work_order_id", "status", "description", "self_healing_run_id", "estimated_complexity", "priority"):
        out.print(f"{key}: {answer[key]}", markup=False)
    out.print("context: " + json.dumps(answer["context"], indent=2), markup=False)
    if answer.get("patch_result"):
        out.print("patch_result: " + json.dumps(answer["patch_result"]), markup=False)


@wo_cli.command("complete")
def wo_complete(
    wo_id: str,
    tests_passed: Annotated[bool, typer.Option("--tests-passed/--tests-failed", help="What the agent's tests said.")],
    files_changed: Annotated[int | None, typer.Option("--files-changed", min=0)] = None,
    diff_file: Annotated[Path | None, typer.Option("--diff-file", exists=True, dir_okay=False)] = None,
    summary: Annotated[str | None, typer.Option("--summary")] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report a work order done (the agent's claim; verification decides)."""
    body: dict[str, Any] = {"tests_passed": tests_passed}
    if files_changed is not None:
        body["files_changed"] = files_changed
    if diff_file is not None:
        body["diff"] = diff_file.read_text(encoding="utf-8", errors="replace")
    if summary:
        body["summary"] = summary
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    answer = _call("POST", url, f"/patches/work-orders/{wo_id}/complete", token, json=body, headers=headers)
    if as_json:
        _print_json(answer)
        return
    out.print(answer["message"], markup=False)


@wo_cli.command("approve")
def wo_approve(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Apply a verified patch held for approval; its run resumes."""
    answer = _call("POST", url, f"/patches/work-orders/{wo_id}/approve", token)
    _print_json(answer) if as_json else out.print(answer["message"], markup=False)


@wo_cli.command("merged")
def wo_merged(wo_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Say a review branch was merged; its run resumes to deploy and verify."""
    answer = _call("POST", url, f"/patches/work-orders/{wo_id}/merged", token)
    _print_json(answer) if as_json else out.print(answer["message"], markup=False)


@wo_cli.command("reject")
def wo_reject(
    wo_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "rejected",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Reject a patch waiting for an operator; its run needs a human."""
    answer = _call("POST", url, f"/patches/work-orders/{wo_id}/reject", token, json={"reason": reason})
    _print_json(answer) if as_json else out.print(f"{answer['work_order_id']}: {answer['status']}", markup=False)


@pb_cli.command("list")
def pb_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    answer = _call("GET", url, "/playbooks", token)
    if as_json:
        _print_json(answer)
        return
    table = Table("playbook", "type", "error types", "steps")
    for p in answer["playbooks"]:
        table.add_row(p["id"], p["type"], ", ".join(p["handles"]["error_types"]), str(len(p["steps"])))
    out.print(table)


@pb_cli.command("validate")
def pb_validate(file: Annotated[Path, typer.Argument(dir_okay=False)], as_json: JsonOpt = False) -> None:
    """Check a playbook file; the first problem names the file and the field."""
    from mendloop.playbooks.loader import load_file
    from mendloop.playbooks.templates import Templates

    pb = load_file(file, Templates())
    if as_json:
        _print_json({"valid": True, "id": pb.id, "version": pb.version, "steps": len(pb.model.steps)})
        return
    out.print(f"ok: {file}: playbook {pb.id!r} ({pb.model.type}), {len(pb.model.steps)} steps", markup=False)


@cli.command()
def demo(
    port: Annotated[int, typer.Option("--port", envvar="MENDLOOP_DEMO_PORT", help="mendloop's port.")] = 8000,
    service_port: Annotated[int | None, typer.Option("--service-port", help="The sample service's port.")] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the demo keeps its copy and database.")] = Path(
        ".mendloop/demo"
    ),
    exit_after: Annotated[bool, typer.Option("--exit", help="Stop after the story.")] = False,
    no_story: Annotated[bool, typer.Option("--no-story", help="Only start both and serve.")] = False,
) -> None:
    """Start the sample service and mendloop, and walk the spec's four tests."""
    from mendloop import demo as demo_mod

    code = demo_mod.run(
        port=port, service_port=service_port, state_dir=state_dir, exit_after=exit_after, story=not no_story, out=out
    )
    raise typer.Exit(code)


def _logging(level: str) -> None:
    if level.upper() not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
        fail(f"--log-level: {level!r} is not one of critical, error, warning, info, debug")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of raising it.
        code = cli(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except errors.MendloopError as exc:
        err.print(f"error: {exc.message}", markup=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
