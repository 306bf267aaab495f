"""The long-running commands: serve, worker, watch (the forwarder), agent (the agent runner), demo."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

from mendloop.cli.common import (
    DEFAULT_URL,
    ConfigOpt,
    LogLevelOpt,
    TokenOpt,
    UrlOpt,
    err,
    fail,
    out,
    setup_logging,
)

# The heavy imports (the App, uvicorn, the agent adapters) wait until a command needs them, so that `--help` and
# the HTTP client commands start quickly.


def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(envvar="MENDLOOP_HOST", help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(envvar="MENDLOOP_PORT", help="Listen port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker threads (0: API only).")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            envvar="MENDLOOP_PROCESSES",
            help="Processes answering the API on one socket; the first also runs the workers (default 1).",
        ),
    ] = None,
    root_path: Annotated[
        str | None,
        typer.Option(envvar="MENDLOOP_ROOT_PATH", help="Path prefix a reverse proxy serves mendloop under."),
    ] = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """API + workers in one process (the API in more with --processes). Upgrades an empty database itself."""
    import uvicorn

    from mendloop import preflight
    from mendloop.agents.runner_options import NOBODY
    from mendloop.api.replicas import Replicas, replica_command
    from mendloop.api.server import create_api, uvicorn_config
    from mendloop.app import App
    from mendloop.config import is_loopback, load_settings
    from mendloop.infra import sandbox
    from mendloop.storage import migrate
    from mendloop.storage.store import Store
    from mendloop.storage.tokens import TokenStore, has_tokens

    setup_logging(log_level)
    chosen = {"host": host, "port": port, "workers": workers, "processes": processes, "root_path": root_path}
    settings = load_settings(config, **chosen)
    # What `config check` checks: every error at once (one line each, exit 2) before anything starts.
    for warning in preflight.require(settings):
        logging.getLogger("mendloop.preflight").warning("%s", warning.message)
    # The database first, before the server starts: one that can't be opened or upgraded is a one-line error
    # (exit 2), not a traceback from the server's startup.
    probe = Store(settings.database_url)
    try:
        migrate.upgrade(probe.engine)
        closed = has_tokens(settings, TokenStore(probe.db))
    finally:
        probe.close()
    # No token anywhere: open to whoever can reach it, which is acceptable only on loopback (the spec's curl
    # tests run as written against the demo).
    if not closed and not is_loopback(settings.host):
        fail(
            f"refusing to listen on {settings.host} without tokens; create one with `mendloop tokens create`, "
            "set MENDLOOP_API_TOKENS, or use 127.0.0.1"
        )
    if not closed:
        logging.getLogger("mendloop.serve").warning(
            "no API tokens (none in the config, none in the database): the API on %s is open to every local "
            "user and process; `mendloop tokens create --role admin --name NAME` closes it",
            settings.host,
        )
    # Bubblewrap for agent and test processes, or the fallback and its warning, before anything starts;
    # `sandbox: bwrap` without a working bwrap stops here. The settings then hold for every process it starts.
    sandbox.configure(mode=settings.sandbox, bwrap=settings.bwrap, run_as=NOBODY if os.geteuid() == 0 else None)
    app = App(settings, embedded_agent=True, watch=True)  # starts `agent_runner:` and `watchers:` if configured
    replicas = None
    if settings.processes > 1:
        # The replicas load the same settings: the same file and options, the environment they inherit.
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in chosen.items() if v is not None and k != "processes"]
        argv += [f"--config={config}"] if config is not None else []
        replicas = Replicas(app, settings.processes - 1, replica_command([*argv, f"--log-level={log_level}"]))
        app.link = replicas
    api = create_api(app)
    uv_config = uvicorn_config(api, settings, log_level=log_level)
    # uvicorn handles SIGTERM while it runs (a graceful shutdown: the App closes, its workers finish the steps in
    # flight and hand their runs back), then raises the signal again under the handler it found. By then the
    # shutdown is done, so this one lets `serve` exit 0, as `worker` does.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if replicas is not None:
        started = replicas.serve(uv_config)
    else:
        server = uvicorn.Server(uv_config)
        server.run()
        started = server.started
    if not started:
        raise typer.Exit(1)


def serve_replica(
    channels: Annotated[str, typer.Option(help="listen,alive,wake file descriptors and the report's path.")],
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option()] = None,
    root_path: Annotated[str | None, typer.Option()] = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """One of `serve --processes N`'s API-only processes; `serve` starts them (api/replicas.py)."""
    from mendloop.api.replicas import Channels, run_replica
    from mendloop.config import load_settings

    setup_logging(log_level)
    settings = load_settings(config, host=host, port=port, workers=workers, root_path=root_path)
    try:
        parsed = Channels.parse(channels)
    except ValueError:
        fail(f"--channels: {channels!r} is not LISTEN,ALIVE,WAKE,REPORT")
    if not run_replica(settings, parsed, log_level):
        raise typer.Exit(1)


def worker(
    config: ConfigOpt = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="Worker threads.")] = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Workers only, no API: run as many as needed against one PostgreSQL database."""
    from mendloop.agents.runner_options import NOBODY
    from mendloop.app import App
    from mendloop.config import load_settings
    from mendloop.infra import sandbox

    setup_logging(log_level)
    settings = load_settings(config, workers=count)
    # A worker tests held patches too: the same sandbox settings as `serve`, checked before it starts.
    sandbox.configure(mode=settings.sandbox, bwrap=settings.bwrap, run_as=NOBODY if os.geteuid() == 0 else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    app = App(settings).open()
    err.print(f"mendloop worker ready: {app.workers.count} thread(s) on {app.store.engine.dialect.name}")
    try:
        stop.wait()
    finally:
        app.close()


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
    log_level: LogLevelOpt = "info",
) -> None:
    """Forwarder: run the config's `watchers:` on this host and ship their events to the server's POST /events,
    buffering on disk while it is unreachable."""
    from mendloop.config import load_settings
    from mendloop.intake.forwarder import Forwarder, run_forwarder

    setup_logging(log_level)
    settings = load_settings(config)
    forwarder = Forwarder(settings, url=url, token=token, spool_dir=spool)
    names = ", ".join(w.name for w in settings.watchers)
    err.print(f"mendloop watch: {names} → {url}/events (spool {spool})", markup=False)
    run_forwarder(forwarder)


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
    test_env: Annotated[
        list[str] | None,
        typer.Option(
            "--test-env",
            help="NAME=VALUE added to the tests' environment (repeatable); only with --test-command.",
        ),
    ] = None,
    test_cwd: Annotated[
        str | None,
        typer.Option(
            "--test-cwd",
            help="Where the tests run, relative to the worktree's root; only with --test-command.",
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
    log_level: LogLevelOpt = "info",
) -> None:
    """The agent runner: claim work orders and drive a coding agent in a git worktree; test and apply its diff.

    Anything after `--` goes to the adapter: extra flags for aider/claude/codex/openhands, the program for
    `command`, `--base-url/--model/--api-key-env` for `openai`.
    """
    import shlex

    from mendloop.agents import adapters
    from mendloop.agents.agent_runner import APPLY_MODES, AgentRunner, ApplyMode, RunnerOptions
    from mendloop.domain.test_command import TestCommand
    from mendloop.errors import InputError
    from mendloop.infra.api_client import AgentClient

    setup_logging(log_level)
    if apply not in APPLY_MODES:
        fail(f"--apply: {apply!r} is not one of {', '.join(APPLY_MODES)}")
    tests: TestCommand | None = None
    if (test_env or test_cwd) and not test_command:
        # The work order's test_env and test_cwd belong to its own command; mixing would judge a third one.
        fail("--test-env and --test-cwd go with --test-command")
    if test_command:
        try:
            argv = shlex.split(test_command)
        except ValueError as exc:
            fail(f"--test-command: {exc}")
        env: dict[str, str] = {}
        for item in test_env or []:
            name, eq, value = item.partition("=")
            if not eq:
                fail(f"--test-env: {item!r} is not NAME=VALUE")
            env[name] = value
        try:
            tests = TestCommand.of(argv, env, test_cwd)
        except InputError as exc:
            option = {"test_cwd": "--test-cwd", "test_command": "--test-command"}.get(exc.field or "", "--test-env")
            fail(f"{option}: {exc.message}")
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
