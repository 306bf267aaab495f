"""How each kind of target restarts: the argv mendloop runs and how it reads the answer (pure: no I/O).

This is the one place the argv of `systemctl`, `docker` and `kubectl` is written; the README's table and the tests
(which check every subcommand and option against the real tool's `--help`) follow it. `process:` targets are
supervised by mendloop itself (`infra/supervisor.py`) and have no argv here.

Names come from configuration, which event data never writes, but they are still checked here (and when the
config loads) so that none can ever stand where an option goes: each must match the tool's own charset and may
not start with `-`; and `--` ends the options where the tool accepts it (systemctl's getopt and docker's pflag
do; kubectl's positional is `deployment/NAME`, which cannot read as an option).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "RestartPlan",
    "check_container",
    "check_context",
    "check_deployment",
    "check_namespace",
    "check_unit",
    "docker_plan",
    "docker_ready",
    "kubernetes_plan",
    "systemd_plan",
    "systemd_ready",
]

# systemd.unit(5): unit names are made of ASCII letters, digits, ":", "-", "_", ".", "\" (escapes) and "@"
# (templates), at most 255 characters.
_UNIT = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}")
# Docker's own rule for container names (daemon/names: `^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$`); ids are hex, a subset.
_CONTAINER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
# Kubernetes: a deployment's name is a DNS-1123 subdomain (253), a namespace a DNS-1123 label (63).
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_NAMESPACE = re.compile(_LABEL)
# A kubeconfig context name is free text; passed as `--context=NAME`, one argument, it cannot be read as another
# option, but control characters and a leading '-' are refused anyway.
_CONTEXT = re.compile(r"[^\x00-\x20\x7f-][^\x00-\x1f\x7f]{0,252}")

# What `docker inspect` prints for a container: its health when it has a HEALTHCHECK, else its state.
DOCKER_STATE_FORMAT = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"


def _check(value: str, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if value.startswith("-") or pattern.fullmatch(value) is None:
        raise ValueError(f"{what} {value!r} is not valid: {rule}, not starting with '-'")
    return value


def check_unit(unit: str) -> str:
    return _check(unit, _UNIT, "systemd unit", "letters, digits and :_.@\\- (systemd.unit(5)), at most 255")


def check_container(container: str) -> str:
    return _check(container, _CONTAINER, "docker container", "a letter or digit, then letters, digits and _.-")


def check_deployment(name: str) -> str:
    if len(name) > 253:
        raise ValueError(f"deployment name is longer than 253 characters: {name[:40]!r}...")
    return _check(name, _SUBDOMAIN, "deployment", "a DNS-1123 subdomain (lowercase letters, digits, '-', '.')")


def check_namespace(namespace: str) -> str:
    return _check(namespace, _NAMESPACE, "namespace", "a DNS-1123 label (lowercase letters, digits, '-'), at most 63")


def check_context(context: str) -> str:
    return _check(context, _CONTEXT, "kubeconfig context", "printable text without spaces at its ends")


@dataclass(frozen=True, slots=True)
class RestartPlan:
    """The restart, then the status check mendloop repeats until it says ready (or the deadline passes).
    `status_waits` is True when the status command itself waits (kubectl's `rollout status`): it is run once,
    with the deadline as its own timeout, and its exit code decides."""

    kind: str
    restart: tuple[str, ...]
    status: tuple[str, ...]
    status_waits: bool = False


def systemd_plan(unit: str, *, user: bool = False) -> RestartPlan:
    """`systemctl [--user] restart -- UNIT`, then `systemctl [--user] is-active -- UNIT` until it prints `active`.
    `restart` waits for the start job itself (no `--no-block`); `is-active` then catches a unit that failed
    right after starting, or one still `activating`."""
    scope = ("--user",) if user else ()
    check_unit(unit)
    return RestartPlan(
        kind="systemd",
        restart=("systemctl", *scope, "restart", "--", unit),
        status=("systemctl", *scope, "is-active", "--", unit),
    )


def systemd_ready(exit_code: int | None, stdout: str) -> bool | None:
    """True: active. False: it has failed (waiting longer won't help). None: not yet (activating, reloading)."""
    state = stdout.strip().splitlines()[-1].strip() if stdout.strip() else ""
    if exit_code == 0 and state == "active":
        return True
    if state in ("activating", "reloading", "deactivating", "refreshing"):
        return None
    return False


def docker_plan(container: str) -> RestartPlan:
    """`docker restart -- CONTAINER`, then `docker inspect --type container --format F -- CONTAINER` until it
    prints `healthy` (a container with a HEALTHCHECK) or `running` (one without)."""
    check_container(container)
    return RestartPlan(
        kind="docker",
        restart=("docker", "restart", "--", container),
        status=("docker", "inspect", "--type", "container", "--format", DOCKER_STATE_FORMAT, "--", container),
    )


def docker_ready(exit_code: int | None, stdout: str) -> bool | None:
    """True: healthy, or running without a health check. None: starting or restarting. False: anything else
    (unhealthy, exited, dead, no such container)."""
    state = stdout.strip()
    if exit_code != 0:
        return False
    if state in ("healthy", "running"):
        return True
    if state in ("starting", "restarting", "created"):
        return None
    return False


def kubernetes_plan(deployment: str, *, namespace: str, context: str | None, timeout_seconds: int) -> RestartPlan:
    """`kubectl [--context=C] --namespace=NS rollout restart deployment/NAME`, then
    `kubectl [--context=C] --namespace=NS rollout status deployment/NAME --watch=true --timeout=Ns`, which waits
    for the new pods itself and exits non-zero when the rollout does not finish in time."""
    check_deployment(deployment)
    check_namespace(namespace)
    scope = ([f"--context={check_context(context)}"] if context is not None else []) + [f"--namespace={namespace}"]
    resource = f"deployment/{deployment}"
    return RestartPlan(
        kind="kubernetes",
        restart=("kubectl", *scope, "rollout", "restart", resource),
        status=(
            "kubectl",
            *scope,
            "rollout",
            "status",
            resource,
            "--watch=true",
            f"--timeout={max(1, timeout_seconds)}s",
        ),
        status_waits=True,
    )
