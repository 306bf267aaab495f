"""Run a program from an argv list: never a shell, stdin closed, the whole process group killed on timeout
(all of it done by `mendloop.infra.process`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mendloop.errors import ActionError
from mendloop.infra import process
from mendloop.playbooks.actions.base import ActionContext, tail

# What a command inherits from mendloop's own environment: enough to find programs, never mendloop's secrets.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def run_command(
    argv: list[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    timeout: float,
    idempotency_key: str,
) -> dict[str, Any]:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ActionError("argv must be a non-empty list of strings", retryable=False)
    if timeout <= 0:
        raise ActionError(f"the timeout must be positive, got {timeout:g}", retryable=False)
    child_env = process.pick_env(_INHERITED)
    child_env.update({str(k): str(v) for k, v in env.items()})
    child_env["MENDLOOP_IDEMPOTENCY_KEY"] = idempotency_key
    try:
        # kill_leftovers=False: a daemon the command starts on purpose outlives it; on a timeout the whole
        # group is killed all the same.
        done = process.run(argv, cwd=cwd, env=child_env, timeout=timeout, kill_leftovers=False)
    except process.CannotStart as exc:
        raise ActionError(f"cannot start {argv[0]!r}: {exc.strerror}", retryable=False) from exc
    stdout = done.stdout_text()
    if done.timed_out:
        raise ActionError(
            f"{argv[0]} timed out after {timeout:g}s",
            output={"exit_code": None, "stdout_tail": tail(stdout), "timed_out": True},
        )
    output: dict[str, Any] = {
        "exit_code": done.returncode,
        "stdout_tail": tail(stdout),
        "stderr_tail": tail(done.stderr_text()),
    }
    facts = _facts(stdout)
    if facts is not None:
        output["json"] = facts
        output["facts"] = facts
    if done.returncode != 0:
        raise ActionError(f"{argv[0]} exited with {done.returncode}", output=output)
    return output


def _facts(stdout: str) -> Any:
    text = stdout.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def command_action(params: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    timeout = float(params.get("timeout") or ctx.timeout or 60)
    env = params.get("env") or {}
    if not isinstance(env, Mapping):
        raise ActionError("with.env must be a mapping", retryable=False)
    return run_command(
        [str(a) for a in params["argv"]],
        cwd=params.get("cwd"),
        env=env,
        timeout=timeout,
        idempotency_key=ctx.idempotency_key,
    )
