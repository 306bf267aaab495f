"""The MCP server for coding agents, end to end: the `mcp` SDK's own client drives `mendloop mcp` (stdio, a real
subprocess) and `/mcp` (streamable HTTP) of a real `mendloop serve` subprocess whose target is a real git
repository with a real test command. It lists, claims, reads the context, submits a hostile diff (rejected with
the reason) and a good one (accepted), and the run then verifies and completes; two clients race for one work
order and exactly one wins; an agent token for another repository sees nothing and is refused. Also: the
registration commands of docs/mcp.md run against the real `claude` and `codex` CLIs, and `claude mcp list`
connects to both transports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import yaml
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from mendloop.domain.patch_verdict import verdict
from tests.interpreters import python_for_tests
from tests.support import free_port, git, migrated_sqlite, serve_process, write_playbooks
from tests.test_agent_runner import require_cli

pytestmark = pytest.mark.slow

TEST_PY = python_for_tests()
OPERATOR = "mcp-operator-token-0123456789"
AGENT = "mcp-agent-token-0123456789ab"
STRANGER = "mcp-stranger-token-0123456789"  # an agent token for another repository
VIEWER = "mcp-viewer-token-0123456789ab"
GOOD = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
# Writes a git hook: code that would run on the server's next commit.
HOSTILE = "--- /dev/null\n+++ b/.git/hooks/post-commit\n@@ -0,0 +1,2 @@\n+#!/bin/sh\n+touch /tmp/owned\n"


@dataclass
class Server:
    url: str
    repo: Path
    config: Path

    def api(self, token: str = OPERATOR) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def escalate(self) -> str:
        """A run that escalates to a work order; its id."""
        with self.api() as api:
            answer = api.post("/patches/trigger", json={"error_type": "wrong_value", "description": "VALUE is 1"})
        assert answer.status_code == 200 and answer.json()["status"] == "awaiting_patch", answer.text
        return str(answer.json()["work_order_id"])


@contextmanager
def started(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """`mendloop serve` on `database_url`, its target a fresh git repository in `tmp_path`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("VALUE = 1\n")
    (repo / "check.py").write_text("import app, sys\nsys.exit(0 if app.VALUE < 10 else 1)\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")
    check = "import sys; sys.path.insert(0, sys.argv[1]); import app; sys.exit(0 if app.VALUE == 2 else 1)"
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "code",
            "type": "code_patch",
            "description": "escalates, then verifies the repository's state",
            "steps": [
                {"id": "escalate", "action": "escalate", "with": {"description": "Set VALUE to 2"}},
                {
                    "id": "verify",
                    "action": "verify",
                    "with": {
                        "check": {"command": {"argv": [sys.executable, "-c", check, str(repo)]}},
                        "expect": "result.exit_code == 0",
                    },
                    "on_failure": "needs_human",
                },
            ],
        },
    )
    config = tmp_path / "mendloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "poll_interval": 0.05,
                "workers": 1,
                "playbook_dirs": [str(tmp_path / "pb")],
                "routing": {"wrong_value": "code"},
                "default_target": "svc",
                "targets": {
                    "svc": {"repository": str(repo), "test_command": [TEST_PY, "check.py"], "test_timeout": 60}
                },
                "tokens": [
                    {"name": "ops", "token": OPERATOR, "role": "operator"},
                    {"name": "coder", "token": AGENT, "role": "agent", "repositories": [str(repo.resolve())]},
                    {"name": "stranger", "token": STRANGER, "role": "agent", "repositories": ["/srv/elsewhere"]},
                    {"name": "grafana", "token": VIEWER, "role": "viewer"},
                ],
            }
        )
    )
    port = free_port()
    # A deadline, not a pause: on a loaded 2-core machine a start-up has taken over 30 s.
    with serve_process(config, port, log=tmp_path / "serve.log", timeout=90):
        yield Server(f"http://127.0.0.1:{port}", repo, config)


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """A server of its own, on each database: for the tests that follow a work order's queue."""
    with started(database_url, tmp_path) as found:
        yield found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server (SQLite) for the tests that only ask and are refused: each starts no more than it needs."""
    tmp = tmp_path_factory.mktemp("mcp-shared")
    with started(migrated_sqlite(tmp / "mendloop.db"), tmp) as found:
        yield found


@asynccontextmanager
async def connect(server: Server, transport: str, token: str = AGENT) -> AsyncIterator[Client]:
    """The SDK's client on `mendloop mcp` (a subprocess on stdio) or on the server's `/mcp`."""
    if transport == "stdio":
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "mendloop", "mcp"],
            env={**os.environ, "MENDLOOP_URL": server.url, "MENDLOOP_TOKEN": token},
        )
        async with Client(params, cache=None) as client:
            yield client
        return
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        async with Client(streamable_http_client(f"{server.url}/mcp", http_client=http), cache=None) as client:
            yield client


async def call(
    client: Client, tool: str, progress: list[tuple[float, float | None, str | None]] | None = None, **args: Any
) -> Any:
    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        assert progress is not None
        progress.append((done, total, message))

    result = await client.call_tool(tool, args, progress_callback=on_progress if progress is not None else None)
    assert not result.is_error, (tool, result.content)
    return json.loads(result.content[0].text)  # type: ignore[union-attr]


async def tool_error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, (tool, result.content)
    text: str = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_an_agent_claims_reads_submits_and_the_run_verifies(server: Server, transport: str) -> None:
    hostile_wo = server.escalate()

    async def scenario() -> None:
        async with connect(server, transport) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {
                "list_work_orders",
                "claim_work_order",
                "get_work_order_context",
                "heartbeat",
                "submit_patch",
                "get_verdict",
                "fail_work_order",
            }
            listed = await call(client, "list_work_orders")
            assert [w["work_order_id"] for w in listed["work_orders"]] == [hostile_wo]

            claimed = await call(client, "claim_work_order")
            assert claimed["claimed"] and claimed["work_order"]["work_order_id"] == hostile_wo
            lease = claimed["lease_id"]
            context = await call(client, "get_work_order_context", work_order_id=hostile_wo)
            assert context["repository"] == str(server.repo.resolve())
            assert context["base_commit"] == git(server.repo, "rev-parse", "HEAD")
            assert context["context"]["test_command"] == [TEST_PY, "check.py"]
            assert context["context"]["constraints"]["max_files"] >= 1
            assert context["context"]["error"]["description"] == "VALUE is 1"
            beat = await call(client, "heartbeat", work_order_id=hostile_wo, lease_id=lease)
            assert beat["cancel_requested"] is False and beat["lease_expires_at"]

            submitted = await call(client, "submit_patch", work_order_id=hostile_wo, lease_id=lease, diff=HOSTILE)
            assert submitted["ticket"] == hostile_wo and submitted["status"] == "awaiting_apply"
            judged = await call(client, "get_verdict", ticket=hostile_wo, wait_seconds=60)
            assert judged["state"] == "rejected" and judged["final"], judged
            assert ".git" in judged["reason"], judged
            # The same tool answers for the other work order's lease too: refused, with the API's reason.
            stale = await tool_error(client, "heartbeat", work_order_id=hostile_wo, lease_id=lease)
            assert "409" in stale and "no lease" in stale

            good_wo = server.escalate()
            claimed = await call(client, "claim_work_order", wait_seconds=5)
            assert claimed["work_order"]["work_order_id"] == good_wo
            lease = claimed["lease_id"]
            progress: list[tuple[float, float | None, str | None]] = []
            if transport == "http":  # at once, then follow the ticket
                submitted = await call(client, "submit_patch", work_order_id=good_wo, lease_id=lease, diff=GOOD)
                assert submitted["verdict"]["state"] in ("testing", "applied", "verified"), submitted
                judged = await call(client, "get_verdict", progress, ticket=good_wo, wait_seconds=90)
            else:  # or in one call that follows it
                args = {"work_order_id": good_wo, "lease_id": lease, "diff": GOOD, "summary": "VALUE = 2"}
                submitted = await call(client, "submit_patch", progress, **args, wait_seconds=90)
                assert submitted["ticket"] == good_wo
                judged = submitted["verdict"]
            assert judged["state"] == "verified" and judged["final"] and judged["run_status"] == "completed", judged
            assert [v["status"] for v in judged["verification"]] == ["succeeded"]
            # One notification per stage reached, growing, ending at the last of them.
            assert progress and progress[-1][0] == progress[-1][1] == 4, progress
            assert [p[0] for p in progress] == sorted({p[0] for p in progress})
            assert "verified" in str(progress[-1][2])

            diff = await client.read_resource(f"mendloop://work-orders/{good_wo}/diff")
            assert diff.contents[0].text == GOOD  # type: ignore[union-attr]
            shown = await client.read_resource(f"mendloop://work-orders/{good_wo}/context")
            assert json.loads(shown.contents[0].text)["run_id"] == judged["run_id"]  # type: ignore[union-attr]

    anyio.run(scenario)
    # The hostile diff never touched the repository; the good one landed as mendloop's commit.
    assert not (server.repo / ".git" / "hooks" / "post-commit").exists()
    assert (server.repo / "app.py").read_text() == "VALUE = 2\n"
    trailers = git(server.repo, "log", "-1", "--format=%(trailers:key=Work-Order,valueonly)")
    assert trailers.strip() != ""
    with server.api() as api:
        runs = {r["coding_work_order_id"]: r["status"] for r in api.get("/patches/runs").json()["runs"]}
    assert runs[hostile_wo] == "needs_human"


def test_two_clients_race_for_one_work_order_and_one_wins(server: Server) -> None:
    wo = server.escalate()
    answers: list[dict[str, Any]] = []

    async def claim(transport: str, ready: anyio.Event, go: anyio.Event) -> None:
        async with connect(server, transport) as client:
            ready.set()
            await go.wait()
            answers.append(await call(client, "claim_work_order"))

    async def race() -> None:
        go = anyio.Event()
        ready = [anyio.Event() for _ in range(3)]
        async with anyio.create_task_group() as tg:
            for transport, event in zip(["stdio", "http", "http"], ready, strict=True):
                tg.start_soon(claim, transport, event, go)
            for event in ready:
                await event.wait()
            go.set()

    anyio.run(race)
    won = [a for a in answers if a["claimed"]]
    assert len(answers) == 3 and len(won) == 1, answers
    assert won[0]["work_order"]["work_order_id"] == wo


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_an_agent_token_for_another_repository_sees_nothing_and_is_refused(shared: Server, transport: str) -> None:
    server = shared
    wo = server.escalate()

    async def scenario() -> None:
        async with connect(server, transport, STRANGER) as client:
            assert (await call(client, "list_work_orders", status=""))["work_orders"] == []
            assert (await call(client, "claim_work_order"))["claimed"] is False
            refused = await tool_error(client, "claim_work_order", repository=str(server.repo.resolve()))
            assert "403" in refused and "does not work for repository" in refused
            refused = await tool_error(client, "get_work_order_context", work_order_id=wo)
            assert "403" in refused and "does not work for the repository" in refused
            refused = await tool_error(client, "submit_patch", work_order_id=wo, lease_id="x", diff=GOOD)
            assert "403" in refused
            with pytest.raises(Exception, match="does not work for the repository"):
                await client.read_resource(f"mendloop://work-orders/{wo}/context")

    anyio.run(scenario)
    with server.api() as api:
        assert api.get(f"/patches/work-orders/{wo}").json()["status"] == "queued"


def test_the_http_endpoint_is_the_agent_roles(shared: Server) -> None:
    server = shared
    hello = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        nobody = http.post("/mcp", json=hello, headers=headers)
        assert nobody.status_code == 401 and nobody.json()["field"] == "Authorization"
        for token in (VIEWER, OPERATOR):
            refused = http.post("/mcp", json=hello, headers={**headers, "Authorization": f"Bearer {token}"})
            assert refused.status_code == 403 and refused.json()["action"] == "mcp", refused.text
        allowed = http.post("/mcp", json=hello, headers={**headers, "Authorization": f"Bearer {AGENT}"})
        assert allowed.status_code == 200, allowed.text
        assert "submit_patch" in allowed.text


def _http_requests(server: Server) -> dict[tuple[str, str], float]:
    """/metrics' HTTP requests by (method, route), read with prometheus_client's own parser."""
    with server.api(VIEWER) as api:
        text = api.get("/metrics").text
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mendloop_process_http_requests_total":
                key = (sample.labels["method"], sample.labels["route"])
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def test_a_tool_call_counts_as_the_mcp_request_alone(shared: Server) -> None:
    """A tool calls the REST route it stands for in process: /metrics counts the /mcp request, not that call too
    (it would double every agent's traffic and time)."""
    server = shared
    before = _http_requests(server)

    async def scenario() -> None:
        async with connect(server, "http") as client:
            await call(client, "list_work_orders", status="")

    anyio.run(scenario)
    after = _http_requests(server)
    assert after.get(("POST", "/mcp"), 0) > before.get(("POST", "/mcp"), 0), after
    listed = ("GET", "/patches/work-orders")
    assert after.get(listed, 0) == before.get(listed, 0), (before.get(listed), after.get(listed))
    # The same route asked over REST is counted: the figure is there to move.
    with server.api() as api:
        assert api.get("/patches/work-orders").status_code == 200
    assert _http_requests(server)[listed] == after.get(listed, 0) + 1


def test_bad_arguments_are_tool_errors_naming_the_argument(shared: Server) -> None:
    server = shared

    async def scenario() -> None:
        async with connect(server, "http") as client:
            text = await tool_error(client, "get_verdict", ticket="wo_missing")
            assert "404" in text
            text = await tool_error(client, "claim_work_order", wait_seconds=-1)
            assert "wait_seconds" in text
            text = await tool_error(client, "list_work_orders", status="bogus")
            assert "422" in text and "status" in text
            text = await tool_error(client, "fail_work_order", work_order_id="wo_x", lease_id="l", reason="bored")
            assert "reason" in text
            # An id is one path segment, whatever it holds: never another route.
            text = await tool_error(client, "get_work_order_context", work_order_id="..")
            assert "not a work order id" in text
            text = await tool_error(client, "heartbeat", work_order_id="../../patches/trigger#", lease_id="l")
            assert "404" in text

    anyio.run(scenario)


# -- registering the server with the real agent CLIs (docs/mcp.md) ------------------------------------------------


def _run(argv: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
    env.pop("ANTHROPIC_API_KEY", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


def test_claude_mcp_add_registers_both_transports_and_claude_connects(shared: Server, tmp_path: Path) -> None:
    server = shared
    claude = require_cli("claude")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    mendloop = str(Path(sys.executable).with_name("mendloop"))
    stdio = [claude, "mcp", "add", "--scope", "user", "mendloop", "-e", f"MENDLOOP_URL={server.url}"]
    stdio += ["-e", f"MENDLOOP_TOKEN={AGENT}", "--", mendloop, "mcp"]
    http = [claude, "mcp", "add", "--scope", "user", "--transport", "http", "mendloop-http", f"{server.url}/mcp"]
    http += ["--header", f"Authorization: Bearer {AGENT}"]
    for argv in (stdio, http):
        done = _run(argv, home, work)
        assert done.returncode == 0, done.stderr
    written = json.loads((home / ".claude.json").read_text())["mcpServers"]
    assert written["mendloop"] == {
        "type": "stdio",
        "command": mendloop,
        "args": ["mcp"],
        "env": {"MENDLOOP_URL": server.url, "MENDLOOP_TOKEN": AGENT},
    }
    assert written["mendloop-http"] == {
        "type": "http",
        "url": f"{server.url}/mcp",
        "headers": {"Authorization": f"Bearer {AGENT}"},
    }
    listed = _run([claude, "mcp", "list"], home, work)
    lines = {line.split(":", 1)[0]: line for line in listed.stdout.splitlines() if ":" in line}
    assert "Connected" in lines["mendloop"] and "Connected" in lines["mendloop-http"], listed.stdout


def test_codex_mcp_add_writes_the_documented_config(tmp_path: Path) -> None:
    codex = require_cli("codex")
    home = tmp_path / "home"
    home.mkdir()
    argv = [codex, "mcp", "add", "mendloop", "--env", "MENDLOOP_URL=http://127.0.0.1:8000"]
    argv += ["--env", "MENDLOOP_TOKEN=mlt_x", "--", "mendloop", "mcp"]
    assert _run(argv, home, tmp_path).returncode == 0
    argv = [codex, "mcp", "add", "mendloop-http", "--url", "http://127.0.0.1:8000/mcp"]
    argv += ["--bearer-token-env-var", "MENDLOOP_TOKEN"]
    assert _run(argv, home, tmp_path).returncode == 0
    import tomllib

    written = tomllib.loads((home / ".codex" / "config.toml").read_text())["mcp_servers"]
    assert written["mendloop"] == {
        "command": "mendloop",
        "args": ["mcp"],
        "env": {"MENDLOOP_URL": "http://127.0.0.1:8000", "MENDLOOP_TOKEN": "mlt_x"},
    }
    assert written["mendloop-http"] == {"url": "http://127.0.0.1:8000/mcp", "bearer_token_env_var": "MENDLOOP_TOKEN"}
    # docs/mcp.md shows the same tables for ~/.codex/config.toml.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "mcp.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    assert tomllib.loads(block)["mcp_servers"].keys() == written.keys()


# -- the verdict, read from the API's JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wo", "run", "state", "final"),
    [
        ({"status": "in_progress"}, {"status": "awaiting_patch"}, "no_patch", False),
        ({"status": "awaiting_apply"}, {"status": "running"}, "testing", False),
        ({"status": "awaiting_approval"}, {"status": "awaiting_patch"}, "held", False),
        (
            {
                "status": "failed",
                "fail_reason": "unsafe_patch",
                "patch_result": {"failure": {"message": "a .git path"}},
            },
            {"status": "needs_human"},
            "rejected",
            True,
        ),
        (
            {"status": "failed", "fail_reason": "tests_regressed", "patch_result": {"failure": {"message": "tail"}}},
            {"status": "needs_human"},
            "tests_failed",
            True,
        ),
        (
            {"status": "completed", "patch_result": {"applied": {"commit": "abc"}}},
            {"status": "verifying"},
            "applied",
            False,
        ),
        ({"status": "completed"}, {"status": "completed"}, "verified", True),
        ({"status": "completed"}, {"status": "failed", "error": "deploy failed"}, "not_verified", True),
        (
            {"status": "failed", "fail_reason": "verification_failed"},
            {"status": "needs_human"},
            "verification_failed",
            True,
        ),
        ({"status": "failed", "fail_reason": "timeout"}, {"status": "needs_human"}, "failed", True),
        ({"status": "cancelled"}, {"status": "cancelled"}, "cancelled", True),
    ],
)
def test_the_verdict_of_each_state(wo: dict[str, Any], run: dict[str, Any], state: str, final: bool) -> None:
    found = verdict({"work_order_id": "wo_1", "self_healing_run_id": "run_1", **wo}, run)
    assert (found.state, found.final, found.ticket) == (state, final, "wo_1")
    if state == "rejected":
        assert found.reason == "a .git path"
    if state == "tests_failed":
        assert found.report == "tail" and found.reason == "tests_regressed"
    if state == "applied":
        assert found.commit == "abc" and "abc" in found.message
