"""Builders shared by the tests: an App on a given database, playbook files, a live API server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from mendloop.app import App
from mendloop.config import Settings, load_settings
from mendloop.domain.states import RunStatus


def write_playbooks(directory: Path, *playbooks: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pb in playbooks:
        (directory / f"{pb['id']}.yaml").write_text(yaml.safe_dump(pb, sort_keys=False))
    return directory


def settings_for(database_url: str, tmp_path: Path, **extra: Any) -> Settings:
    cfg: dict[str, Any] = {"database_url": database_url, "poll_interval": 0.05, "workers": 1, **extra}
    path = tmp_path / "mendloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_settings(path)


def open_app(settings: Settings, *, start_workers: bool = False, **kw: Any) -> App:
    return App(settings, **kw).open(start_workers=start_workers)


def drain(app: App, owner: str = "test:0:w", limit: int = 1000) -> int:
    """Run due work on the calling thread until none is due; returns how many claims were made."""
    n = 0
    while n < limit and app.workers.run_once(owner):
        n += 1
    return n


def wait_for(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.02) -> None:
    """Poll until `predicate` holds; a deadline, not a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def wait_status(app: App, run_id: str, *statuses: RunStatus, timeout: float = 20) -> RunStatus:
    wait_for(lambda: app.store.run_status(run_id) in statuses, timeout)
    return app.store.run_status(run_id)


@contextmanager
def api_server(app: App, port: int) -> Iterator[httpx.Client]:
    """The real API on 127.0.0.1:port in a thread, around an already open App."""
    from mendloop.api.server import create_api

    server = uvicorn.Server(
        uvicorn.Config(create_api(app, manage=False), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def mendloop_argv(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "mendloop", *args]


@contextmanager
def serve_process(config: Path, port: int, *, log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """`mendloop serve` as a real subprocess; waits for /health and stops it by PID afterwards."""
    import os
    import subprocess

    full_env = {**os.environ, **(env or {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            mendloop_argv("serve", "--config", str(config), "--port", str(port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )
    try:
        wait_healthy(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(port: int, proc: Any, log: Path, timeout: float = 30) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mendloop serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout, 0.05)
