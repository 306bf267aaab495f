"""The capabilities mendloop provides for a target that declares `runs:`: `restart` (and `deploy`, the same
restart) and `health` (one GET of the health URL).

A restart returns once the target is up again, never merely once the command was sent: for `process:` the
supervisor's new process answers the health URL; for systemd `is-active` says `active`; for docker `inspect` says
`healthy` (or `running`, without a HEALTHCHECK); for kubernetes `rollout status` finished; and, whatever the kind,
the health URL (when given) answers 2xx. All within `ready_timeout`, or the step fails saying what was seen.
The argv of the tools is built in `domain/restart_plan.py` alone.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import httpx

from mendloop.config import RunsConfig
from mendloop.domain import restart_plan
from mendloop.domain.restart_plan import RestartPlan
from mendloop.errors import ActionError, StepCancelled
from mendloop.infra import process
from mendloop.infra.supervisor import Supervisor, await_health

__all__ = ["PROVIDED", "Restarter"]

# The capabilities a `runs:` declaration provides (a target's own binding of the same name wins).
PROVIDED = ("restart", "deploy", "health")

# What the operator's tools read from mendloop's environment: how to reach the daemon or the cluster.
_TOOL_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "USER",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_CONFIG",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "KUBECONFIG",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
_STATUS_CALL_SECONDS = 15.0  # one `is-active` or `inspect`: they answer at once, or something is wrong


class Restarter:
    """Restart and health of one target, as its `runs:` says."""

    def __init__(self, target: str, runs: RunsConfig) -> None:
        self.target = target
        self.runs = runs
        self.supervisor = Supervisor(target, runs.process, health_url=runs.health) if runs.process is not None else None

    def provides(self, name: str) -> bool:
        return name in ("restart", "deploy") or (name == "health" and self.runs.health is not None)

    def plan(self, timeout: float | None = None) -> RestartPlan | None:
        """The tool's argv for this target (None for `process:`, which mendloop runs itself)."""
        runs = self.runs
        if runs.systemd is not None:
            return restart_plan.systemd_plan(runs.systemd.unit, user=runs.systemd.user)
        if runs.docker is not None:
            return restart_plan.docker_plan(runs.docker.container)
        if runs.kubernetes is not None:
            k = runs.kubernetes
            wait = int(min(timeout or runs.ready_timeout, runs.ready_timeout))
            return restart_plan.kubernetes_plan(
                k.deployment, namespace=k.namespace, context=k.context, timeout_seconds=wait
            )
        return None

    # -- restart -----------------------------------------------------------------------------------------------------

    def restart(
        self, *, idempotency_key: str, timeout: float | None, cancel: threading.Event | None = None
    ) -> dict[str, Any]:
        """`cancel`: the run's cancel. It stops the restart tool's commands (their group killed) and the waits
        for readiness and health (StepCancelled); a process already restarted by the supervisor stays started."""
        budget = min(filter(None, [timeout, self.runs.ready_timeout]))
        started = time.monotonic()
        stop = cancel if cancel is not None else threading.Event()
        if self.supervisor is not None:
            out = self._restart_process(idempotency_key, budget, stop)
        else:
            out = self._restart_with_tool(budget, stop)
        out["seconds"] = round(time.monotonic() - started, 3)
        return out

    def _restart_process(self, idempotency_key: str, budget: float, cancel: threading.Event) -> dict[str, Any]:
        sup = self.supervisor
        assert sup is not None
        if cancel.is_set():
            raise StepCancelled(f"stopped by the run's cancel; target {self.target!r} was not restarted")
        done = sup.restart(idempotency_key=idempotency_key)
        out: dict[str, Any] = {
            "restarted": done.restarted,
            "kind": "process",
            "pid": done.pid,
            "previous_pid": done.adopted_from,
            "healthy": None,
        }
        if self.runs.health is not None:
            await_health(
                self.runs.health,
                timeout=budget,
                alive=lambda: sup.alive(done.pid),
                what=f"target {self.target!r} (pid {done.pid})",
                log_tail=sup.log_tail,
                cancel=cancel,
            )
            out["healthy"] = True
        elif not sup.alive(done.pid):
            raise ActionError(f"target {self.target!r}: pid {done.pid} exited right after it started", output=out)
        return out

    def _restart_with_tool(self, budget: float, cancel: threading.Event) -> dict[str, Any]:
        plan = self.plan(budget)
        assert plan is not None
        deadline = time.monotonic() + budget
        env = process.pick_env(_TOOL_ENV)
        restart = _run(plan.restart, _remaining(deadline), env, cancel)
        if not restart.ok:
            raise ActionError(f"target {self.target!r}: {_said(restart)}", output=_output(plan, restart))
        checks = 0
        while True:
            checks += 1
            # kubectl's own --timeout ends its wait first; the margin only bounds a kubectl that hangs.
            limit = _remaining(deadline) + 5 if plan.status_waits else min(_STATUS_CALL_SECONDS, _remaining(deadline))
            status = _run(plan.status, limit, env, cancel)
            if plan.status_waits:
                ready: bool | None = status.ok
            elif plan.kind == "systemd":
                ready = restart_plan.systemd_ready(status.returncode, status.stdout_text())
            else:
                ready = restart_plan.docker_ready(status.returncode, status.stdout_text())
            if ready:
                break
            if ready is False or time.monotonic() >= deadline:
                raise ActionError(
                    f"target {self.target!r} did not come back after {' '.join(plan.restart)}: {_said(status)}",
                    output=_output(plan, status),
                )
            # The next status poll; the deadline bounds the loop, and a cancel ends the wait (then `_run` raises).
            cancel.wait(min(0.5, 0.05 * checks))
        out: dict[str, Any] = {
            "restarted": True,
            "kind": plan.kind,
            "status": status.stdout_text().strip()[-200:],
            "status_checks": checks,
            "healthy": True,
        }
        if self.runs.health is not None:
            await_health(
                self.runs.health,
                timeout=max(0.1, deadline - time.monotonic()),
                what=f"target {self.target!r}",
                cancel=cancel,
            )
        return out

    # -- health ------------------------------------------------------------------------------------------------------

    def health(self, http: httpx.Client, timeout: float | None) -> dict[str, Any]:
        """One GET of the health URL: a 2xx is healthy, anything else a (retryable) failure."""
        url = self.runs.health
        assert url is not None
        try:
            answer = http.get(url, timeout=min(filter(None, [timeout, 10.0])))
        except httpx.HTTPError as exc:
            raise ActionError(f"target {self.target!r}: GET {url} failed: {type(exc).__name__}") from exc
        out: dict[str, Any] = {"status_code": answer.status_code, "healthy": 200 <= answer.status_code < 300}
        try:
            out["json"] = answer.json()
        except ValueError:
            out["json"] = None
        if self.supervisor is not None:
            out["pid"] = self.supervisor.current()
        if not out["healthy"]:
            raise ActionError(f"target {self.target!r}: GET {url} answered {answer.status_code}", output=out)
        return out


def _remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def _run(argv: tuple[str, ...], limit: float, env: dict[str, str], cancel: threading.Event) -> process.Completed:
    if cancel.is_set():
        raise StepCancelled(f"stopped by the run's cancel; {argv[0]} was not started")
    try:
        done = process.run(list(argv), timeout=limit, env=env, keep_bytes=64_000, cancel=cancel)
    except process.CannotStart as exc:
        raise ActionError(
            f"cannot start {argv[0]!r}: {exc.strerror} (PATH={env.get('PATH', os.defpath)})", retryable=False
        ) from exc
    if done.cancelled:
        raise StepCancelled(f"stopped by the run's cancel: {argv[0]} and its process group were killed")
    return done


def _said(done: process.Completed) -> str:
    if done.timed_out:
        return f"{done.argv[0]} timed out"
    text = (done.stderr_text() or done.stdout_text()).strip()
    return f"{' '.join(done.argv)} exited {done.returncode}" + (f": {text[-500:]}" if text else "")


def _output(plan: RestartPlan, done: process.Completed) -> dict[str, Any]:
    return {
        "restarted": False,
        "kind": plan.kind,
        "argv": list(done.argv),
        "exit_code": done.returncode,
        "stdout_tail": done.stdout_text(2000),
        "stderr_tail": done.stderr_text(2000),
    }
