"""The agent runner embedded in `serve`: the same `AgentRunner` as `mendloop agent`, in a thread of the server's
process, claiming through the pull API on the server's own loopback URL with the server's in-process agent
credential (`App.agent_token`: never stored, gone with the process). It waits for the server to answer /health
before its first claim, and `stop()` ends it with its agent's whole process group."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Literal

import httpx

from mendloop.agents import adapters
from mendloop.agents.agent_runner import AgentRunner, RunnerOptions
from mendloop.config import AgentRunnerConfig, Settings
from mendloop.domain.test_command import TestCommand
from mendloop.errors import ConfigError, MendloopError
from mendloop.infra.api_client import AgentClient

log = logging.getLogger(__name__)

# Long-poll per claim. Short, so a server shutting down (which waits for open requests) is not held up by it.
CLAIM_WAIT_SECONDS = 2.0
STARTUP_SECONDS = 120.0
# The server not answering its own runner is normal for a moment while it shuts down; longer, it is news.
UNREACHABLE_WARN_SECONDS = 10.0


def server_url(settings: Settings) -> str:
    """The server's own address as seen from inside its process: loopback unless it listens on one address."""
    host = settings.host
    if host in ("", "0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def run_as_option(value: str) -> tuple[int, int] | Literal["auto"] | None:
    if value == "auto":
        return "auto"
    if value == "none":
        return None
    uid, _, gid = value.partition(":")
    return int(uid), int(gid or uid)


class EmbeddedRunner:
    """An AgentRunner thread of `serve`, built from `settings.agent_runner`."""

    def __init__(self, settings: Settings, *, token: str | None = None, url: str | None = None) -> None:
        cfg: AgentRunnerConfig = settings.agent_runner
        if not cfg.repository or not cfg.adapter:
            raise ConfigError("agent_runner: repository and adapter are required when it is enabled")
        if settings.port == 0 and url is None:
            raise ConfigError("agent_runner: the embedded runner needs the server's port (port 0 was given)")
        self.url = url or server_url(settings)
        adapter = adapters.create(cfg.adapter, cfg.argv)
        # An explicit transport: no proxy from the environment between the server and itself.
        self.client = AgentClient(self.url, token, transport=httpx.HTTPTransport())
        self.runner = AgentRunner(
            self.client,
            RunnerOptions(
                repo=Path(cfg.repository),
                adapter=adapter,
                agent_id=cfg.agent_id,
                test_command=(
                    TestCommand.of(cfg.test_command, cfg.test_env, cfg.test_cwd) if cfg.test_command else None
                ),
                test_timeout=cfg.test_timeout,
                agent_timeout=cfg.timeout,
                apply=cfg.apply,
                wait_seconds=CLAIM_WAIT_SECONDS,
                run_as=run_as_option(cfg.run_as),
            ),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.runner.prepare()  # not a git repository: `serve` fails at once, not later in a thread
        except MendloopError:
            self.client.close()
            raise

    @property
    def agent_id(self) -> str:
        return self.runner.agent_id

    def start(self) -> EmbeddedRunner:
        logging.getLogger("httpx").addFilter(self._quiet_idle_claims)
        self._thread = threading.Thread(target=self._loop, name="embedded-agent-runner", daemon=True)
        self._thread.start()
        log.info(
            "embedded agent runner %s: %s on %s, claiming from %s",
            self.agent_id,
            self.runner.adapter.name,
            self.runner.repo,
            self.url,
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, kill the agent's process group if one runs, wait for the thread."""
        self._stop.set()
        self.runner.stop(timeout=0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.client.close()
        logging.getLogger("httpx").removeFilter(self._quiet_idle_claims)

    def _quiet_idle_claims(self, record: logging.LogRecord) -> bool:
        """httpx logs every request at INFO; the runner's claim answered 204 (no work) every few seconds is not
        news in the server's log."""
        args = record.args
        if isinstance(args, tuple) and len(args) >= 4 and args[3] == 204:
            return not str(args[1]).startswith(f"{self.url}/patches/work-orders/claim")
        return True

    def _loop(self) -> None:
        if not self._wait_for_server():
            return
        failing_since: float | None = None
        warned = False
        while not self._stop.is_set() and not self.runner.stopped:
            try:
                outcome = self.runner.process_next(wait_seconds=CLAIM_WAIT_SECONDS)
            except MendloopError as exc:
                if self._stop.is_set():
                    break
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.info("embedded agent runner: %s; retrying", exc.message)
                elif not warned and now - failing_since > UNREACHABLE_WARN_SECONDS:
                    warned = True
                    log.warning("embedded agent runner: %s (for %.0fs); retrying", exc.message, now - failing_since)
                self._stop.wait(1.0)
                continue
            except Exception:
                log.exception("embedded agent runner: unexpected error; retrying")
                self._stop.wait(1.0)
                continue
            failing_since, warned = None, False
            if outcome is not None:
                log.info("embedded agent runner: %s %s", outcome.work_order_id, outcome.status)

    def _wait_for_server(self) -> bool:
        deadline = time.monotonic() + STARTUP_SECONDS
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while not self._stop.is_set():
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log.error("embedded agent runner: %s/health did not answer within %.0fs", self.url, STARTUP_SECONDS)
                    return False
                self._stop.wait(0.1)
        return False
