"""Run a program from an argv list: never a shell, stdin closed, the whole process group killed on timeout
(all of it done by `mendloop.infra.process`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from mendloop.errors import ActionError, StepCancelled
from mendloop.infra import process
from mendloop.playbooks.actions.base import ActionContext, tail
from mendloop.playbooks.templates import Tracked

# What a command inherits from mendloop's own environment: enough to find programs, never mendloop's secrets.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def as_arg(item: Any) -> str:
    """An argv item as a string. Literal template text is always a string, so anything else is a value from an
    expression: data, tracked as such."""
    if isinstance(item, str):
        return item
    text = str(item)
    return Tracked(text, ((0, len(text)),))


def check_argv(argv: Sequence[str], option_positions: Collection[int] = ()) -> None:
    """Refuse an argv that data could turn into something the playbook did not write.

    A program reads an item that starts with `-` as an option (`git log --output=FILE` writes a file), so an item
    whose first character came from data (a `Tracked` item, see `templates.py`) may not start with `-` unless the
    step lists its position in `option_positions`. Literal text is the author's and is trusted: `--since={{ x }}`
    stays one option whatever `x` is. NUL bytes cannot be passed to a program at all, and a line break in the
    program name from data is never a program anyone meant."""
    for i, item in enumerate(argv):
        if "\x00" in item:
            raise ActionError(f"argv[{i}] contains a NUL byte; refused, nothing was run", retryable=False)
        if not isinstance(item, Tracked) or not item.spans:
            continue
        if i == 0 and ("\n" in item or "\r" in item):
            raise ActionError(
                f"argv[0] {item!r} comes from template data and contains a line break; refused, nothing was run",
                retryable=False,
            )
        if item.data_led and item.startswith("-") and (i == 0 or i not in option_positions):
            raise ActionError(
                f"argv[{i}] {item!r} comes from template data and starts with '-', so the program would read it "
                f"as an option; refused, nothing was run (list {i} in with.option_positions if it is meant to be "
                "an option)",
                retryable=False,
            )


def run_command(
    argv: list[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    timeout: float,
    idempotency_key: str,
    option_positions: Collection[int] = (),
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """`cancel`: the run's cancel; when it is set the program's whole group is SIGKILLed and StepCancelled
    raised (with what the program printed until then)."""
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ActionError("argv must be a non-empty list of strings", retryable=False)
    check_argv(argv, option_positions)
    if cwd is not None and "\x00" in cwd:
        raise ActionError("cwd contains a NUL byte; refused, nothing was run", retryable=False)
    if any("\x00" in f"{k}{v}" for k, v in env.items()):
        raise ActionError("an env variable contains a NUL byte; refused, nothing was run", retryable=False)
    if timeout <= 0:
        raise ActionError(f"the timeout must be positive, got {timeout:g}", retryable=False)
    child_env = process.pick_env(_INHERITED)
    child_env.update({str(k): str(v) for k, v in env.items()})
    child_env["MENDLOOP_IDEMPOTENCY_KEY"] = idempotency_key
    try:
        # kill_leftovers=False: a daemon the command starts on purpose outlives it; on a timeout the whole
        # group is killed all the same. die_with_parent: while the command runs, its group dies with mendloop
        # (even a `kill -9`), so a step never leaves an orphan working on after the server that judged it. Not in
        # the sandbox: these are the operator's own commands, run with mendloop's rights on purpose.
        if cancel is not None and cancel.is_set():
            raise StepCancelled(f"stopped by the run's cancel; {argv[0]} was not started")
        done = process.run(
            argv,
            cwd=cwd,
            env=child_env,
            timeout=timeout,
            kill_leftovers=False,
            die_with_parent=True,
            cancel=cancel,
        )
    except process.CannotStart as exc:
        raise ActionError(f"cannot start {argv[0]!r}: {exc.strerror}", retryable=False) from exc
    stdout = done.stdout_text()
    if done.cancelled:
        cancelled = StepCancelled(f"stopped by the run's cancel: {argv[0]} and its process group were killed")
        cancelled.output = {"exit_code": None, "stdout_tail": tail(stdout), "cancelled": True}
        raise cancelled
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
        # A Tracked item stays Tracked (str() of it would forget which characters came from data).
        [as_arg(a) for a in params["argv"]],
        cwd=params.get("cwd"),
        env=env,
        timeout=timeout,
        idempotency_key=ctx.idempotency_key,
        option_positions=frozenset(int(p) for p in params.get("option_positions") or ()),
        cancel=ctx.cancel,
    )
