"""Restarting a target under a service manager (issue 9, item 5): systemd, docker, kubernetes.

Every subcommand and option of the argv `domain/restart_plan.py` builds is checked against the real tool's own
`--help` (`systemctl`, `docker`, `kubectl` must be installed: missing, these tests fail, never skip;
scripts/test.sh installs the docker and kubectl clients), each real client is shown to parse it up to the daemon
or cluster this machine does not run, and the restart is run end to end against stand-in executables named
`systemctl`, `docker` and `kubectl` that record their argv and answer like that daemon or cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mendloop.config import RunsConfig
from mendloop.domain import restart_plan
from mendloop.errors import ActionError
from mendloop.playbooks.actions.restart import Restarter
from tests.test_restart import capabilities_for, ctx_for

# -- systemd, docker, kubectl: the argv against the real tools' --help --------------------------------------------

# The documented argv (README, "Restarting a target"); the plans must build exactly these.
DOCUMENTED = {
    "systemd": (
        ["systemctl", "--user", "restart", "--", "importer.service"],
        ["systemctl", "--user", "is-active", "--", "importer.service"],
    ),
    "docker": (
        ["docker", "restart", "--", "importer"],
        ["docker", "inspect", "--type", "container", "--format", restart_plan.DOCKER_STATE_FORMAT, "--", "importer"],
    ),
    "kubernetes": (
        ["kubectl", "--context=prod", "--namespace=shop", "rollout", "restart", "deployment/importer"],
        [
            "kubectl",
            "--context=prod",
            "--namespace=shop",
            "rollout",
            "status",
            "deployment/importer",
            "--watch=true",
            "--timeout=60s",
        ],
    ),
}
RUNS = {
    "systemd": {"systemd": {"unit": "importer.service", "user": True}},
    "docker": {"docker": {"container": "importer"}},
    "kubernetes": {"kubernetes": {"deployment": "importer", "namespace": "shop", "context": "prod"}},
}


def _help(*argv: str) -> str:
    tool = shutil.which(argv[0])
    # Not a skip: CI installs them (scripts/test.sh), and without them nothing here would be checked.
    assert tool is not None, f"{argv[0]} is not installed (Debian: systemd, docker.io, kubernetes-client)"
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def _flags(argv: list[str]) -> list[str]:
    """The options of an argv: `--name` of `--name=value` and `--name value`; `--` (end of options) is POSIX."""
    return [a.split("=", 1)[0] for a in argv if a.startswith("-") and a != "--"]


def test_the_plans_build_the_documented_argv() -> None:
    for kind, (restart, status) in DOCUMENTED.items():
        plan = _plan(kind)
        assert (list(plan.restart), list(plan.status)) == (restart, status)
    assert list(restart_plan.systemd_plan("a.service").restart) == ["systemctl", "restart", "--", "a.service"]
    assert list(restart_plan.kubernetes_plan("w", namespace="default", context=None, timeout_seconds=5).restart) == [
        "kubectl",
        "--namespace=default",
        "rollout",
        "restart",
        "deployment/w",
    ]


def test_the_status_answers_are_read_as_the_tools_document_them() -> None:
    # systemctl is-active: exit 0 and "active"; 3 with the state otherwise (systemctl(1)).
    assert restart_plan.systemd_ready(0, "active\n") is True
    assert restart_plan.systemd_ready(3, "activating\n") is None
    assert restart_plan.systemd_ready(3, "failed\n") is False
    assert restart_plan.systemd_ready(3, "inactive\n") is False
    # docker inspect: the health status with a HEALTHCHECK, else the state.
    assert restart_plan.docker_ready(0, "healthy\n") is True
    assert restart_plan.docker_ready(0, "running\n") is True
    assert restart_plan.docker_ready(0, "starting\n") is None
    assert restart_plan.docker_ready(0, "unhealthy\n") is False
    assert restart_plan.docker_ready(1, "") is False  # no such container
    assert (
        restart_plan.kubernetes_plan("w", namespace="n", context=None, timeout_seconds=0).status[-1] == "--timeout=1s"
    )


def test_systemctl_argv_matches_its_help() -> None:
    text = _help("systemctl", "--help")
    restart, status = DOCUMENTED["systemd"]
    assert re.search(r"^\s+restart UNIT\.\.\.\s", text, re.M), "restart UNIT... is documented"
    assert re.search(r"^\s+is-active PATTERN\.\.\.\s", text, re.M)
    for flag in _flags(restart) + _flags(status):
        assert re.search(rf"\s{re.escape(flag)}\s", text), f"{flag} in systemctl --help"


def test_docker_argv_matches_its_help() -> None:
    restart, status = DOCUMENTED["docker"]
    restart_help = _help("docker", "restart", "--help")
    assert "Usage:  docker restart [OPTIONS] CONTAINER [CONTAINER...]" in restart_help
    assert _flags(restart) == []
    inspect_help = _help("docker", "inspect", "--help")
    assert "Usage:  docker inspect [OPTIONS] NAME|ID [NAME|ID...]" in inspect_help
    for flag in _flags(status):
        assert re.search(rf"\s{re.escape(flag)} string\s", inspect_help), f"{flag} in docker inspect --help"
    assert "{{.State.Health.Status}}" in restart_plan.DOCKER_STATE_FORMAT


def test_kubectl_argv_matches_its_help() -> None:
    restart, status = DOCUMENTED["kubernetes"]
    global_options = _help("kubectl", "options")
    restart_help = _help("kubectl", "rollout", "restart", "--help")
    status_help = _help("kubectl", "rollout", "status", "--help")
    assert "kubectl rollout restart RESOURCE [options]" in restart_help
    assert "kubectl rollout status (TYPE NAME | TYPE/NAME) [flags] [options]" in status_help
    for argv, local in ((restart, restart_help), (status, status_help)):
        for flag in _flags(argv):
            # kubectl lists an option as `    --name=default:` or `    -n, --name=default:`
            documented = re.search(rf"^\s+(?:-\w, )?{re.escape(flag)}=", local + global_options, re.M)
            assert documented, f"{flag} in kubectl's help"
    assert "--context=" in global_options and "--namespace=" in global_options


# What each tool prints when it cannot parse its arguments (checked below against a made-up option).
_PARSE_ERRORS = re.compile(r"unrecognized option|invalid option|unknown flag|unknown command|requires at least|Usage:")


def test_the_real_tools_parse_the_argv_up_to_the_missing_daemon(tmp_path: Path) -> None:
    """Beyond --help: each real client accepts the argv (`--` included) and gets as far as the daemon or cluster,
    which is absent here: no docker socket, a kubeconfig pointing at a closed port, no (user) systemd bus."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "prod", "context": {"cluster": "c", "user": "u", "namespace": "shop"}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "current-context": "prod",
            }
        )
    )
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}",
        "KUBECONFIG": str(kubeconfig),
        "HOME": str(tmp_path),
    }

    def said(argv: list[str]) -> str:
        tool = shutil.which(argv[0])
        assert tool is not None, f"{argv[0]} is not installed (Debian: systemd, docker.io, kubernetes-client)"
        done = subprocess.run(
            [tool, *argv[1:]], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
        )
        return done.stdout + done.stderr

    for kind, (restart, status) in DOCUMENTED.items():
        for argv in (restart, status if kind != "kubernetes" else [*status[:-1], "--timeout=2s"]):
            assert not _PARSE_ERRORS.search(out := said(argv)), f"{argv}: {out}"
        bogus = [*restart[:-2], "--bogus", *restart[-2:]] if kind != "kubernetes" else [*restart, "--bogus"]
        assert _PARSE_ERRORS.search(said(bogus)), f"{kind}: a made-up option is refused"


# -- systemd, docker, kubectl: the restart against stand-ins --------------------------------------------------------

# A STAND-IN for the real tool (this machine runs no systemd, docker daemon or cluster): it records its argv and
# answers like the daemon would. The status call answers "not yet" once, then ready (or `FINAL`), so a test sees
# that mendloop waited for the status rather than returning after the restart command.
STAND_IN = """#!{python}
# stand-in for {tool}: records argv, answers like the daemon or cluster would
import json, sys
from pathlib import Path
calls = Path({calls!r})
with calls.open("a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
n = sum(1 for _ in calls.open())
args = sys.argv[1:]
if "restart" in args:
    print({restarted!r})
    sys.exit(0)
if n == 2:
    print({pending!r})
    sys.exit({pending_code})
print({final!r})
sys.exit({final_code})
"""

ANSWERS = {
    "systemd": ("systemctl", "", "activating", 3, "active", 0),
    "docker": ("docker", "importer", "starting", 0, "healthy", 0),
    "kubernetes": ("kubectl", "deployment.apps/importer restarted", "Waiting for rollout", 1, "rolled out", 0),
}


def _stand_in(tmp_path: Path, kind: str, final: str | None = None) -> Path:
    tool, restarted, pending, pending_code, ok, ok_code = ANSWERS[kind]
    bin_dir = tmp_path / "stand-ins"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / f"{tool}.calls"
    if kind == "kubernetes":  # `rollout status` waits by itself: one call, its exit code decides
        pending, pending_code = ok, ok_code
    script = STAND_IN.format(
        python=sys.executable,
        tool=tool,
        calls=str(calls),
        restarted=restarted,
        pending=pending,
        pending_code=pending_code,
        final=final or ok,
        final_code=3 if final else ok_code,
    )
    path = bin_dir / tool
    path.write_text(textwrap.dedent(script))
    path.chmod(0o755)
    return calls


@pytest.mark.parametrize("kind", ["systemd", "docker", "kubernetes"])
def test_a_restart_runs_the_documented_argv_and_awaits_the_status(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _stand_in(tmp_path, kind)
    monkeypatch.setenv("PATH", f"{tmp_path / 'stand-ins'}{os.pathsep}{os.environ['PATH']}")
    caps = capabilities_for({"t": {"runs": RUNS[kind]}})
    result = caps.call("restart", {}, ctx_for("t"), timeout=None)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    restart, status = DOCUMENTED[kind]
    polls = 1 if kind == "kubernetes" else 2  # one "not yet" answer, then ready
    assert recorded == [restart[1:]] + [status[1:]] * polls
    assert result["restarted"] is True and result["healthy"] is True and result["kind"] == kind
    assert result["status_checks"] == polls


@pytest.mark.parametrize("kind", ["systemd", "docker"])
def test_a_unit_or_container_that_fails_after_its_restart_fails_the_step(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stand_in(tmp_path, kind, final="failed" if kind == "systemd" else "unhealthy")
    monkeypatch.setenv("PATH", f"{tmp_path / 'stand-ins'}{os.pathsep}{os.environ['PATH']}")
    caps = capabilities_for({"t": {"runs": RUNS[kind]}})
    with pytest.raises(ActionError, match="did not come back after") as err:
        caps.call("restart", {}, ctx_for("t"), timeout=None)
    assert err.value.output["kind"] == kind and err.value.output["restarted"] is False


def _plan(kind: str) -> restart_plan.RestartPlan:
    plan = Restarter("t", RunsConfig.model_validate(RUNS[kind])).plan()
    assert plan is not None
    return plan
