"""Hostile input (issue 8, item 10): secrets sent in through every way data enters are masked once, at the intake
boundary, before anything is stored. Each case sends a table of secret shapes (AWS keys, GitHub and GitLab
tokens, Stripe and Google keys, Slack and SendGrid tokens, a JWT, DSN passwords, `password=`, a private key, a
secret-named JSON key, a configured pattern) through one entry (an event, a batch, Fluent Bit records,
Alertmanager, a trigger, a watched log file), lets the run escalate to a work order, has an agent claim,
heartbeat and complete it, and then asserts that no part of any secret is anywhere: not in any API answer, not in
the agent's prompt, not in any row of any table (and, on SQLite, not in the bytes of the database file), on SQLite
and PostgreSQL. Each case also checks that the masks are there, so a case that stored nothing cannot pass.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from mendloop.agents.adapters.prompt import build_prompt
from mendloop.app import App
from mendloop.domain.states import RunStatus
from mendloop.infra.redact import MASK
from tests.support import api_client, drain, open_app, settings_for, wait_for, write_playbooks

PY = sys.executable


def _j(*parts: str) -> str:
    """Secrets are assembled at run time, so that this file holds no string a secret scanner would flag."""
    return "".join(parts)


AL = "aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xYz"

# name → (the text sent, the parts of it that must be nowhere afterwards)
SECRETS: dict[str, tuple[str, list[str]]] = {
    "aws_akia": (_j("AKIA", "QWERTYUIOPASDFGH"), [_j("AKIA", "QWERTYUIOPASDFGH")]),
    "aws_asia": (_j("ASIA", "Y34FZKBOKMUTVV7A"), [_j("ASIA", "Y34FZKBOKMUTVV7A")]),
    "github_ghp": (_j("ghp_", AL, "abc"), [_j("ghp_", AL)]),
    "github_pat": (_j("github_pat_", "11ABCDEFG0", AL, "_", AL, AL[:20]), [_j("11ABCDEFG0", AL)]),
    "gitlab_glpat": (_j("glpat-", "xY9_zA8-bC7dE6fG5hI4"), ["xY9_zA8-bC7dE6fG5hI4"]),
    "stripe_sk_live": (_j("sk_", "live_", AL, AL), [_j("live_", AL)]),
    "stripe_rk_live": (_j("rk_", "live_", AL[::-1][:24]), [AL[::-1][:24]]),
    "google_aiza": (_j("AIza", "SyA1234567890abcdefghijklmnopqrstu"), ["SyA1234567890abcdefghijklmnopqrstu"]),
    "slack": (_j("xoxb", "-123456789012-1234567890123-", "AbCdEfGhIjKlMnOpQrStUvWx"), ["AbCdEfGhIjKlMnOpQrStUvWx"]),
    "sendgrid": (_j("SG", ".", "abcdefghijklmnopqrstuv", ".", AL, "abcdefghij"), ["abcdefghijklmnopqrstuv"]),
    "jwt": (
        _j("eyJhbGciOiJIUzI1NiJ9", ".eyJzdWIiOiJsZWFreSJ9", ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9"),
        ["eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJsZWFreSJ9", "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9"],
    ),
    "dsn": (_j("postgresql://app:", "Tr0ub4dor-3x", "@db.internal:5432/orders"), ["Tr0ub4dor-3x"]),
    "dsn_with_at": (_j("redis://default:", "p@ssW0rd!x", "@cache:6379/0"), ["p@ssW0rd!x", "ssW0rd!x"]),
    "password_kv": ("password=hunter2-correct-horse", ["hunter2-correct-horse"]),
    "bearer": (_j("Bearer ", "opaqueToken0987654321zz"), ["opaqueToken0987654321zz"]),
    "private_key": (
        _j(
            "-----BEGIN OPENSSH ", "PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5v -----END OPENSSH ", "PRIVATE KEY-----"
        ),
        ["b3BlbnNzaC1rZXktdjEAAAAABG5v"],
    ),
    "configured_pattern": ("internal-secret-424242", ["internal-secret-424242"]),
}
LINE = " | ".join(text for text, _ in SECRETS.values())
# A key that names a secret: its value is masked whole, whatever it looks like.
KEYED = ("db_password", "plain-value-for-a-keyed-secret")
# What a step prints: made by the step's program, so the playbook stored on the run doesn't hold it.
STEP_SECRET = _j("ghp_", "Q1w2E3r4T5" * 4)
STEP_DSN_PASSWORD = "StepFail99xx"
STEP_SCRIPT = "print('ghp_' + 'Q1w2E3r4T5' * 4)"
STEP_FAIL_SCRIPT = "import sys; sys.stderr.write('postgresql://u:' + 'StepFail' + '99xx' + '@db/x'); sys.exit(3)"
# What the agent posts.
AGENT_SECRET = _j("glpat-", "AgentPosted0123456789")
AGENT_PARTS = ["AgentPosted0123456789"]

EVERY_PART: dict[str, list[str]] = {
    **{name: parts for name, (_, parts) in SECRETS.items()},
    "secret_key": [KEYED[1]],
    "step_output": [STEP_SECRET, STEP_DSN_PASSWORD],
    "agent_posted": AGENT_PARTS,
}


def _payload() -> dict[str, Any]:
    return {
        "error_type": "leaky",
        "dsn": SECRETS["dsn"][0],
        KEYED[0]: KEYED[1],
        "nested": {
            "headers": {"Authorization": SECRETS["bearer"][0]},
            "list": [SECRETS["github_ghp"][0], {"deep": [SECRETS["aws_asia"][0]]}],
        },
        "detail": LINE,
    }


@pytest.fixture
def app(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[App]:
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "leaky",
            "type": "code_patch",
            "description": "a step prints secrets, then the run escalates with a description rendered from data",
            "steps": [
                {"id": "probe", "action": "command", "with": {"argv": [PY, "-c", STEP_SCRIPT]}},
                {
                    "id": "probe_fail",
                    "action": "command",
                    "with": {"argv": [PY, "-c", STEP_FAIL_SCRIPT]},
                    "on_failure": "continue",
                },
                {
                    "id": "escalate",
                    "action": "escalate",
                    "with": {"description": "Fix {{ description }} (dsn {{ context.dsn | default('none') }})"},
                },
            ],
        },
    )
    (tmp_path / "logs").mkdir()
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"leaky": "leaky", "LeakyAlert": "leaky"},
        secret_patterns=[r"internal-secret-\d+"],
        watchers=[
            {
                "name": "app",
                "paths": ["logs/*.log"],
                "start_at": "beginning",
                "patterns": [
                    {"name": "leak", "regex": r"LEAK: (?P<detail>.*)", "event_type": "app.leak", "error_type": "leaky"}
                ],
            }
        ],
    )
    # The log watcher runs only for the case that writes to the log.
    callspec = getattr(request.node, "callspec", None)
    a = open_app(settings, watch=callspec is not None and callspec.params.get("kind") == "watcher")
    yield a
    a.close()


def _send(kind: str, client: httpx.Client, app: App, tmp_path: Path) -> list[httpx.Response]:
    """Send the table of secrets in through one entry; the answers."""
    event = {
        "event_type": "app.leak",
        "message": f"LEAK: {LINE}",
        "payload": _payload(),
        "component": "svc",
        "event_id": f"ev-{SECRETS['github_ghp'][0]}",
    }
    if kind == "event":
        return [client.post("/events", json=event)]
    if kind == "batch":
        second = {**event, "event_id": f"ev2-{SECRETS['aws_akia'][0]}", "count": 3}
        return [client.post("/events", json={"events": [event, second]})]
    if kind == "records":
        records = [{"log": f"LEAK: {LINE}", "host": "web-1"}, {"message": f"LEAK: {LINE}", "file": "/var/log/a"}]
        return [client.post("/events", json=records)]
    if kind == "alertmanager":
        alert = {
            "status": "firing",
            "labels": {"alertname": "LeakyAlert", "component": "svc", "dsn": SECRETS["dsn_with_at"][0]},
            "annotations": {"summary": LINE, "runbook": SECRETS["bearer"][0], KEYED[0]: KEYED[1]},
            "startsAt": "2026-12-02T03:00:00Z",
            "fingerprint": SECRETS["gitlab_glpat"][0],  # a caller's fingerprint is stored: redacted too
        }
        return [client.post("/events/alertmanager", json={"version": "4", "alerts": [alert]})]
    if kind == "trigger":
        body = {
            "error_type": "leaky",
            "description": f"LEAK: {LINE}",
            "component": "svc",
            "file_path": f"/srv/{SECRETS['aws_akia'][0]}/app.py",
            "context": {k: v for k, v in _payload().items() if k != "error_type"},
            "dedupe_key": f"k-{SECRETS['github_pat'][0]}",
            "wait_seconds": 0,
        }
        return [client.post("/patches/trigger", json=body)]
    if kind == "watcher":
        with (tmp_path / "logs" / "app.log").open("a") as f:
            f.write(f"2026-12-02 03:00:00 LEAK: {LINE}\n")
        assert app.watchers is not None
        wait_for(lambda: app.store.list_runs(limit=1)[1] >= 1)
        return []
    raise AssertionError(kind)


def _agent_works_the_order(client: httpx.Client) -> tuple[str, list[str]]:
    """An agent claims the work order, reads its prompt, heartbeats and completes, posting secrets of its own.
    Returns the work order id and every answer and the prompt, as texts."""
    claimed = client.post("/patches/work-orders/claim", json={"agent_id": "hostile-agent", "wait_seconds": 0})
    assert claimed.status_code == 200, claimed.text
    answer = claimed.json()
    wo = answer["work_order"]
    prompt = build_prompt(wo, files=[], test_command=None, constraints={})
    assert "### Description" in prompt and MASK in prompt
    beat = client.post(
        f"/patches/work-orders/{wo['work_order_id']}/heartbeat",
        json={"lease_id": answer["lease_id"], "note": f"using {AGENT_SECRET}"},
    )
    assert beat.status_code == 200, beat.text
    done = client.post(
        f"/patches/work-orders/{wo['work_order_id']}/complete",
        json={
            "tests_passed": True,
            "lease_id": answer["lease_id"],
            "summary": f"fixed it; the token was {AGENT_SECRET}",
            "diff_url": _j("https://bot:", AGENT_PARTS[0], "@ci.example/diff/1"),
            "agent": {"name": "hostile", "model": AGENT_SECRET},
        },
    )
    assert done.status_code == 200, done.text
    return wo["work_order_id"], [claimed.text, prompt, beat.text, done.text]


def _every_row(app: App) -> dict[str, list[str]]:
    """Every row of every table, as text."""
    out: dict[str, list[str]] = {}
    with app.store.engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            rows = conn.execute(sa.text(f'SELECT * FROM "{table}"')).all()
            out[table] = [json.dumps([str(v) for v in row]) + repr(tuple(row)) for row in rows]
    return out


def _database_bytes(app: App) -> bytes:
    """On SQLite, the bytes of the database file and its WAL: a secret written anywhere, even in a freed page,
    would be found there."""
    url = app.store.engine.url
    if url.get_backend_name() != "sqlite" or not url.database:
        return b""
    path = Path(url.database)
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def _assert_nowhere(where: str, text: str) -> None:
    for name, parts in EVERY_PART.items():
        for part in parts:
            assert part not in text, f"{name} ({part!r}) reached {where}"


@pytest.mark.parametrize("kind", ["event", "batch", "records", "alertmanager", "trigger", "watcher"])
def test_secrets_sent_in_are_nowhere_afterwards(kind: str, app: App, tmp_path: Path) -> None:
    with api_client(app) as client:
        posted = _send(kind, client, app, tmp_path)
        for r in posted:
            assert r.status_code in (200, 202), r.text
        drain(app)
        runs, total = app.store.list_runs(limit=10)
        assert total == 1, f"one run expected, got {total}"
        run = runs[0]
        assert run.status is RunStatus.AWAITING_PATCH, (run.status, run.error)
        wo_id, agent_texts = _agent_works_the_order(client)
        drain(app)
        assert app.store.run_status(run.id) is RunStatus.COMPLETED
        incidents = client.get("/incidents").json()["incidents"]
        answers = [r.text for r in posted] + agent_texts
        for path in (
            "/events/recent?limit=1000",
            "/patches/runs",
            f"/patches/runs/{run.id}",
            "/patches/work-orders",
            f"/patches/work-orders/{wo_id}",
            "/incidents",
            *(f"/incidents/{i['incident_id']}" for i in incidents),
            "/patches/stats",
        ):
            got = client.get(path)
            assert got.status_code == 200, (path, got.text)
            answers.append(got.text)
            _assert_nowhere(f"GET {path}", got.text)
    for i, text in enumerate(answers):
        _assert_nowhere(f"answer {i}", text)
    rows = _every_row(app)
    for table, texts in rows.items():
        for text in texts:
            _assert_nowhere(f"a row of {table}", text)
    raw = _database_bytes(app)
    for name, parts in EVERY_PART.items():
        for part in parts:
            assert part.encode() not in raw, f"{name} ({part!r}) is in the bytes of the SQLite file"

    # The masks are there: the data was stored, redacted, not dropped.
    wo = app.store.get_work_order(wo_id)
    assert MASK in wo.description and MASK in json.dumps(wo.context)
    assert wo.description.startswith("Fix ")
    steps = {s.step_id: s for s in app.store.run_steps(run.id)}
    assert MASK in json.dumps(steps["probe"].output)
    assert MASK in json.dumps(steps["probe_fail"].output)
    assert any(MASK in text for text in rows["events"])
    assert wo.patch_result is not None and MASK in json.dumps(wo.patch_result)


def test_a_failing_agents_details_are_redacted(app: App) -> None:
    with api_client(app) as client:
        r = client.post("/patches/trigger", json={"error_type": "leaky", "description": "boom", "wait_seconds": 0})
        assert r.status_code == 200, r.text
        drain(app)
        claimed = client.post("/patches/work-orders/claim", json={"agent_id": "a", "wait_seconds": 0}).json()
        wo_id = claimed["work_order"]["work_order_id"]
        failed = client.post(
            f"/patches/work-orders/{wo_id}/fail",
            json={
                "lease_id": claimed["lease_id"],
                "reason": "agent_error",
                "details": {"output_tail": f"Traceback ... {AGENT_SECRET}", "env": {"API_TOKEN": "tok-abcdef123"}},
            },
        )
        assert failed.status_code == 200, failed.text
        shown = client.get(f"/patches/work-orders/{wo_id}").text + client.get("/events/recent").text
    for text in [failed.text, shown, *(t for texts in _every_row(app).values() for t in texts)]:
        for part in [*AGENT_PARTS, "tok-abcdef123"]:
            assert part not in text


def test_a_secret_that_changes_does_not_split_an_incident(app: App) -> None:
    """Fingerprints are computed on the redacted text: the same error with another key in it is a repeat."""
    with api_client(app) as client:
        ids = set()
        for key in (_j("AKIA", "QWERTYUIOPASDFGH"), _j("AKIA", "ZXCVBNMLKJHGFDSA"), _j("AKIA", "POIUYTREWQLKJHGF")):
            r = client.post("/events", json={"event_type": "app.leak", "message": f"S3 denied for key {key}"})
            assert r.status_code == 202, r.text
            ids.add(r.json()["incident_id"])
        assert len(ids) == 1
        incident = client.get(f"/incidents/{ids.pop()}").json()
        assert incident["count"] == 3 and MASK in incident["title"]
