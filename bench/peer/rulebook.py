"""The ansible-rulebook side: the rulebooks each measurement runs, and how `ansible-rulebook` is started.

Every rulebook listens with the webhook source of ansible.eda 2.13.0 (vendored in bench/peer/vendor, since
ansible-galaxy cannot reach its server here) on 127.0.0.1; its rules match the same event the
mendloop side gets (`payload.kind == "bench"`). The action is the measured part:

- `intake`: a condition no event meets, so what is measured is the webhook source and the rule engine alone;
- `run_playbook`: a one-task playbook, `ansible.builtin.uri` POST to the recorder: what an operator writes;
- `run_module`: `ansible.builtin.uri` straight from the rule, the cheapest EDA action that reaches HTTP;
- `run_module_parallel`: the same with the ruleset's `execution_strategy: parallel`;
- `storm`: `run_module` as above, under `throttle: once_within: 10 seconds` grouped on the message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.intake import _free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache"
VENV = CACHE / "peer-venv"
VENDOR = Path(__file__).resolve().parent / "vendor"
COLLECTIONS = CACHE / "peer-collections"


def collection_installed() -> bool:
    """Whether setup.sh got ansible.eda from Galaxy; otherwise its vendored webhook source is used."""
    return (COLLECTIONS / "ansible_collections" / "ansible" / "eda").is_dir()


def _uri(recorder: int, event: str = "event") -> dict[str, Any]:
    """`event`: how the template names the event (a rule's action sees `event`; a playbook `ansible_eda.event`)."""
    return {
        "url": f"http://127.0.0.1:{recorder}/action",
        "method": "POST",
        "body_format": "json",
        "body": {"job": f"{{{{ {event}.payload.payload.job }}}}"},
    }


def rulebook(kind: str, port: int, recorder: int) -> list[dict[str, Any]]:
    # `<kind>_parallel`: the same rule in a ruleset with `execution_strategy: parallel`, so its actions need not
    # wait for each other (the default, sequential, runs one action at a time).
    parallel = kind.endswith("_parallel")
    kind = kind.removesuffix("_parallel")
    condition = 'event.payload.event_type == "bench.event"'
    action: dict[str, Any]
    if kind == "intake":
        condition, action = 'event.payload.event_type == "never"', {"debug": {"msg": "unreachable"}}
    elif kind == "run_playbook":
        action = {"run_playbook": {"name": "uri.yml"}}
    else:
        action = {"run_module": {"name": "ansible.builtin.uri", "module_args": _uri(recorder)}}
    rule: dict[str, Any] = {"name": kind, "condition": condition, "action": action}
    if kind == "storm":
        rule["throttle"] = {"once_within": "10 seconds", "group_by_attributes": ["event.payload.message"]}
    name = "ansible.eda.webhook" if collection_installed() else "webhook"
    source = {name: {"host": "127.0.0.1", "port": port}}
    ruleset: dict[str, Any] = {"name": f"peer-{kind}", "hosts": "all", "sources": [source], "rules": [rule]}
    if parallel:
        ruleset["execution_strategy"] = "parallel"
    return [ruleset]


def write(d: Path, kind: str, port: int, recorder: int) -> Path:
    """The rulebook, a localhost inventory and the one-task playbook, in `d`; returns the rulebook's path."""
    (d / "inventory.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": str(VENV / "bin" / "python"),
                        }
                    }
                }
            }
        )
    )
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [{"ansible.builtin.uri": _uri(recorder, "ansible_eda.event")}],
        }
    ]
    (d / "uri.yml").write_text(yaml.safe_dump(play))
    path = d / f"{kind}.yml"
    path.write_text(yaml.safe_dump(rulebook(kind, port, recorder), sort_keys=False))
    return path


def java_home() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java not found: run bench/peer/setup.sh (apt-get install openjdk-17-jre-headless)")
    return str(Path(os.path.realpath(java)).parents[1])


def start(d: Path, path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "JAVA_HOME": java_home(),
        "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
    }
    argv = [
        str(VENV / "bin" / "ansible-rulebook"),
        "--rulebook",
        str(path),
        "-i",
        str(d / "inventory.yml"),
        "-S",
        str(VENDOR),
    ]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ansible-rulebook exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError("ansible-rulebook's webhook did not open its port")


@contextlib.contextmanager
def eda(d: Path, kind: str, recorder: int = 0) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    proc = start(d, write(d, kind, port, recorder), d / f"eda-{kind}.log")
    try:
        _wait_port(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
