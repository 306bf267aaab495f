"""Run a program from an argv list: never a shell, stdin closed, the whole process group killed on timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

from mendloop.errors import ActionError
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
    child_env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    child_env.update({str(k): str(v) for k, v in env.items()})
    child_env["MENDLOOP_IDEMPOTENCY_KEY"] = idempotency_key
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise ActionError(f"cannot start {argv[0]!r}: {exc.strerror}", retryable=False) from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise ActionError(
            f"{argv[0]} timed out after {timeout:g}s",
            output={"exit_code": None, "stdout_tail": tail(out.decode(errors="replace")), "timed_out": True},
        ) from None
    stdout = out.decode(errors="replace")
    output: dict[str, Any] = {
        "exit_code": proc.returncode,
        "stdout_tail": tail(stdout),
        "stderr_tail": tail(err.decode(errors="replace")),
    }
    facts = _facts(stdout)
    if facts is not None:
        output["json"] = facts
        output["facts"] = facts
    if proc.returncode != 0:
        raise ActionError(f"{argv[0]} exited with {proc.returncode}", output=output)
    return output


def _facts(stdout: str) -> Any:
    text = stdout.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
