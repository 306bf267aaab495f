"""The demo's two children (the sample service and `mendloop serve`): started through `infra.process` in sessions
of their own, watched, and stopped by PID however the demo ends."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from mendloop.demo.common import LISTENING_RE, POLL_SECONDS, STARTUP_SECONDS, STOP_SECONDS, DemoError
from mendloop.infra import process

T = TypeVar("T")


@dataclass
class Child:
    name: str
    proc: process.Child
    log_path: Path
    log_file: IO[bytes]
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(f"{self.name} exited with code {code} (log: {self.log_path})", self.tail())

    def stop(self) -> None:
        """Terminate, then kill (its whole process group) after a deadline; reaped either way, so no process is
        left behind."""
        try:
            self.proc.stop(grace=STOP_SECONDS)
        finally:
            self.log_file.close()


def spawn(name: str, argv: list[str], log_path: Path, cwd: Path, env: Mapping[str, str]) -> Child:
    """Start a child whose output goes to `log_path`. A session of its own: a terminal's Ctrl-C reaches only the
    demo, which then stops its children in order, instead of racing them as they each react to the signal. And
    `die_with_parent`: a demo killed with -9 (no cleanup runs) takes its children with it, instead of leaving them
    serving on in their sessions with its state directory."""
    log_file = log_path.open("wb")
    try:
        proc = process.spawn(argv, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT, die_with_parent=True)
    except process.CannotStart as exc:
        log_file.close()
        raise DemoError(f"cannot start {name}: {exc.strerror}") from exc
    return Child(name, proc, log_path, log_file)


def poll(probe: Callable[[], T | None], child: Child, what: str) -> T:
    """Until `probe` gives a value; fails early if the child dies, with its log's tail."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        child.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not answer {what} within {STARTUP_SECONDS:.0f}s", child.tail())
        time.sleep(POLL_SECONDS)


def listening_port(child: Child) -> int | None:
    try:
        match = LISTENING_RE.search(child.log_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def port_free(port: int) -> bool:
    # SO_REUSEADDR as uvicorn and the service use it: only a bound socket makes the port busy, not TIME_WAIT.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
