"""What every part of the demo shares: where things are, its timings, and its one error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SAMPLE_SERVICE = REPO_ROOT / "examples" / "sample_service"
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
TARGET = "sample_service"
STAND_IN = "fix_large_file_chunking.py"
DEMO_AGENT = REPO_ROOT / "examples" / "agents" / "demo_fix.py"
AGENT_ID = "demo-runner"
NOBODY = 65534

# A fixed identity, so the copy's commits never depend on (or fail for lack of) the user's git configuration.
GIT_IDENTITY = (
    "-c",
    "user.name=mendloop demo",
    "-c",
    "user.email=demo@mendloop.invalid",
    "-c",
    "commit.gpgsign=false",
    "-c",
    "init.defaultBranch=main",
)

STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
RUN_FINISH_SECONDS = 90.0
POLL_SECONDS = 0.1
HTTP_TIMEOUT = 30.0
LISTENING_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class DemoError(Exception):
    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


def quickstart() -> dict[str, Any]:
    try:
        config = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DemoError(f"cannot read {QUICKSTART}: {exc}") from exc
    if not isinstance(config, dict):
        raise DemoError(f"{QUICKSTART}: the top level must be a mapping")
    return config


def report(out: Console, exc: DemoError) -> None:
    out.print(f"[red]demo failed:[/] {escape(exc.message)}")
    if exc.detail:
        out.print(exc.detail, markup=False)


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
