"""Playbook templates that event data can steer (issue 8, item 12): a hostile table.

Argument injection: a value from event data that starts with `-` is refused in an argv position unless the step
lists that position in `option_positions`. SSRF: a URL's scheme, host and port come from the template's literal
text or the target's base_url (or its allowed_hosts); values from data are percent-encoded into the path or query.
Each refusal is a failed step with its reason, recorded once (never retried), and nothing ran: a real git
repository untouched with no file written by `git log --output=...`, and a real HTTP server on 127.0.0.1 on the
other port that received nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mendloop.app import App
from mendloop.domain.states import RunStatus, StepStatus
from mendloop.errors import ActionError, PlaybookError
from mendloop.playbooks.actions.command import run_command
from mendloop.playbooks.loader import compile_document
from mendloop.playbooks.templates import Templates, Tracked
from tests.support import drain, open_app, settings_for, write_playbooks

PY = sys.executable
SECRET = "Bearer s3cret-token-for-the-target"
RETRY = {"max_attempts": 3, "backoff_seconds": 0}


class Recorder:
    """A real HTTP server on 127.0.0.1 that records every request it gets: (method, raw path, Authorization)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.requests.append((self.command, self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"ok": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    """The target (`intended`) and a server on another port that must never be reached (`other`)."""
    intended, other = Recorder(), Recorder()
    try:
        yield intended, other
    finally:
        intended.close()
        other.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (path / "a.txt").write_text("a\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    return path


def head_and_status(repo: Path) -> tuple[str, str]:
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--ignored"], capture_output=True, text=True, check=True
    )
    return head.stdout.strip(), status.stdout


def make(
    database_url: str, tmp_path: Path, step: dict[str, Any], *, base_url: str, target: dict[str, Any] | None = None
) -> App:
    pb = {"id": "hostile", "type": "data_fix", "description": "d", "steps": [step]}
    write_playbooks(tmp_path / "pb", pb)
    settings = settings_for(
        database_url,
        tmp_path,
        playbook_dirs=[str(tmp_path / "pb")],
        routing={"hostile": "hostile"},
        targets={"svc": {"base_url": base_url, **(target or {})}},
        default_target="svc",
    )
    return open_app(settings)


def run_once(app: App, context: dict[str, Any]) -> tuple[RunStatus, Any]:
    run, _ = app.remediation.trigger(error_type="hostile", description="d", context=context)
    drain(app)
    steps = app.store.run_steps(run.id)
    assert len(steps) == 1, "a refusal is recorded once and never retried"
    return app.store.run_status(run.id), steps[0]


# --- argument injection ---------------------------------------------------------------------------------------

GIT_LOG = ["git", "log", "-1", "--format=%H"]

ARGV_HOSTILE = [
    # (argv template tail, context, refused position)
    (["{{ context.ref }}"], {"ref": "--output={out}"}, 4),
    (["{{ context.ref }}"], {"ref": "-o{out}"}, 4),
    (["{{ context.ref }}"], {"ref": "--output", "file": "{out}"}, 4),
    (["{{ context.a }}{{ context.ref }}"], {"a": "", "ref": "--output={out}"}, 4),
    (["{{ context.ref | trim }}"], {"ref": "  --output={out}"}, 4),
    (["HEAD", "{{ context.ref }}"], {"ref": "--upload-pack=touch {out}"}, 5),
    (["{{ context.ref }}", "--", "a.txt"], {"ref": "-p"}, 4),
]


@pytest.mark.parametrize(("tail", "context", "position"), ARGV_HOSTILE)
def test_a_value_from_data_that_starts_with_a_dash_is_refused_in_argv(
    database_url: str, tmp_path: Path, repo: Path, tail: list[str], context: dict[str, str], position: int
) -> None:
    out = tmp_path / "outside.txt"
    ctx = {k: v.replace("{out}", str(out)) for k, v in context.items()}
    step = {"id": "log", "action": "command", "with": {"argv": [*GIT_LOG, *tail], "cwd": str(repo)}, "retry": RETRY}
    before = head_and_status(repo)
    app = make(database_url, tmp_path, step, base_url="http://127.0.0.1:9")
    try:
        status, step_row = run_once(app, ctx)
        assert status is RunStatus.FAILED
        assert step_row.status is StepStatus.FAILED and step_row.attempt == 1
        assert step_row.error.startswith(f"argv[{position}] ")
        assert "comes from template data and starts with '-'" in step_row.error
        assert "nothing was run" in step_row.error and "option_positions" in step_row.error
    finally:
        app.close()
    assert not out.exists() and not (repo / "outside.txt").exists()
    assert head_and_status(repo) == before


def test_a_capability_bound_to_a_command_refuses_an_option_from_its_args(
    database_url: str, tmp_path: Path, repo: Path
) -> None:
    out = tmp_path / "outside.txt"
    binding = {"command": {"argv": [*GIT_LOG, "{{ args.ref }}"], "cwd": str(repo)}}
    step = {"id": "cap", "action": "capability", "with": {"name": "git.log", "args": {"ref": "{{ context.ref }}"}}}
    app = make(
        database_url, tmp_path, step, base_url="http://127.0.0.1:9", target={"capabilities": {"git.log": binding}}
    )
    try:
        status, step_row = run_once(app, {"ref": f"--output={out}"})
        assert status is RunStatus.FAILED and step_row.status is StepStatus.FAILED
        assert step_row.error.startswith("argv[4] ") and "starts with '-'" in step_row.error
    finally:
        app.close()
    assert not out.exists()


def test_a_verify_check_command_refuses_an_option_from_data(database_url: str, tmp_path: Path, repo: Path) -> None:
    out = tmp_path / "outside.txt"
    check = {"command": {"argv": [*GIT_LOG, "{{ context.ref }}"], "cwd": str(repo)}}
    step = {"id": "check", "action": "verify", "with": {"check": check, "expect": "result.exit_code == 0"}}
    app = make(database_url, tmp_path, step, base_url="http://127.0.0.1:9")
    try:
        status, step_row = run_once(app, {"ref": f"--output={out}"})
        assert status is RunStatus.FAILED and step_row.status is StepStatus.FAILED
        assert "argv[4] " in step_row.error and "starts with '-'" in step_row.error
    finally:
        app.close()
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "options", "context", "expected"),
    [
        # A marked position takes an option from data.
        ([*GIT_LOG, "{{ context.flag }}"], [4], {"flag": "--no-decorate"}, "sha"),
        # Literal text leads: the value stays the option's value, whatever it is (git prints it back here; as a
        # `--since=` value the answer would depend on the clock).
        (["git", "log", "-1", "--format={{ context.fmt }}"], None, {"fmt": "--output=x %H"}, "--output=x "),
        # Ordinary values: a ref, a number.
        ([*GIT_LOG, "{{ context.ref }}"], None, {"ref": "HEAD"}, "sha"),
        ([*GIT_LOG, "-n", "{{ context.n }}"], None, {"n": 1}, "sha"),
        # A literal option is the author's.
        ([*GIT_LOG, "--no-decorate", "{{ context.ref }}"], None, {"ref": "HEAD"}, "sha"),
    ],
    ids=["marked-option", "literal-led", "ref", "number", "literal-option"],
)
def test_legitimate_argv_templates_still_run(
    database_url: str,
    tmp_path: Path,
    repo: Path,
    argv: list[str],
    options: list[int] | None,
    context: dict[str, Any],
    expected: str,
) -> None:
    params: dict[str, Any] = {"argv": argv, "cwd": str(repo)}
    if options is not None:
        params["option_positions"] = options
    app = make(database_url, tmp_path, {"id": "log", "action": "command", "with": params}, base_url="http://x:1")
    try:
        status, step_row = run_once(app, context)
        assert status is RunStatus.COMPLETED, step_row.error
        sha = head_and_status(repo)[0]
        assert step_row.output["stdout_tail"].strip() == (sha if expected == "sha" else expected + sha)
    finally:
        app.close()
    assert not (repo / "x").exists()


def test_nul_bytes_and_line_breaks_in_the_program_name_are_refused(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    touch = [PY, "-c", "import sys; open(sys.argv[1], 'w')", str(pwned)]
    cases = [
        ([*touch, Tracked("a\x00b", ((0, 3),))], "argv[4] contains a NUL byte"),
        ([*touch, "literal\x00"], "argv[4] contains a NUL byte"),
        ([Tracked(f"{PY}\n", ((0, len(PY) + 1),)), *touch[1:]], "argv[0] "),
        ([Tracked("-python", ((0, 7),)), *touch[1:]], "argv[0] "),
    ]
    for argv, reason in cases:
        with pytest.raises(ActionError) as caught:
            run_command(argv, cwd=None, env={}, timeout=5, idempotency_key="k", option_positions={0})
        assert caught.value.message.startswith(reason) and caught.value.retryable is False
        assert "nothing was run" in caught.value.message
    with pytest.raises(ActionError, match="env variable contains a NUL byte"):
        run_command(touch, cwd=None, env={"X": "a\x00"}, timeout=5, idempotency_key="k")
    assert not pwned.exists()


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ([0], "option_positions must be a list of distinct argv positions from 1 to 4"),
        ([5], "option_positions must be a list of distinct argv positions from 1 to 4"),
        ([2, 2], "option_positions must be a list"),
        ("{{ context.positions }}", "option_positions must be a list"),
        ([True], "option_positions must be a list"),
    ],
)
def test_option_positions_are_validated_naming_the_file_and_field(options: Any, why: str) -> None:
    doc = {
        "id": "p",
        "type": "data_fix",
        "description": "d",
        "steps": [
            {"id": "ok", "action": "command", "with": {"argv": ["true"]}},
            {"id": "s", "action": "command", "with": {"argv": [*GIT_LOG, "{{ x }}"], "option_positions": options}},
        ],
    }
    with pytest.raises(PlaybookError) as caught:
        compile_document(doc, source="pb/p.yaml", templates=Templates())
    assert caught.value.file == "pb/p.yaml" and caught.value.field == "steps.1"
    assert "with.option_positions" in caught.value.message and why in caught.value.message
    check = {"command": {"argv": ["true", "{{ x }}"], "option_positions": [3]}}
    doc["steps"] = [{"id": "v", "action": "verify", "with": {"check": check, "expect": "true"}}]
    with pytest.raises(PlaybookError, match=r"steps\.0: .*with\.check\.command\.option_positions"):
        compile_document(doc, source="pb/p.yaml", templates=Templates())


# --- SSRF ---------------------------------------------------------------------------------------------------------

# (url template, context) where data would choose the scheme, host or port. {A} is the target's port, {B} the
# other server's.
URL_REFUSED = [
    ("http://127.0.0.1:{{ context.port }}/x", {"port": "{A}@127.0.0.1:{B}"}),
    ("http://127.0.0.1:{{ context.port }}/x", {"port": "{B}"}),
    ("http://127.0.0.1:{{ context.port }}/x", {"port": "{A}#@127.0.0.1:{B}"}),
    ("http://127.0.0.1:{{ context.port }}/x", {"port": "{A}@[::ffff:127.0.0.1]:{B}"}),
    ("http://{{ context.host }}:{A}/x", {"host": "127.0.0.1:{B}/?"}),
    ("http://{{ context.user }}@127.0.0.1:{A}/x", {"user": "u:p@127.0.0.1:{B}/#"}),
    ("{{ context.scheme }}://127.0.0.1:{A}/x", {"scheme": "http://127.0.0.1:{B}/?"}),
    ("{{ context.url }}", {"url": "http://127.0.0.1:{B}/x"}),
    ("{{ context.url }}", {"url": "http://[::ffff:127.0.0.1]:{B}/x"}),
    ("{{ target.base_url }}{{ context.path }}", {"path": "@127.0.0.1:{B}/x"}),
    # Refused as well; a URL that could not be called at all says so first.
    ("{{ target.base_url }}{{ context.path }}", {"path": ":{B}/x"}, "invalid URL: Invalid port"),
]
REFUSED = "refused: template data would choose the URL's scheme, host or port"


def fill(value: str, intended: Recorder, other: Recorder) -> str:
    return value.replace("{A}", str(intended.port)).replace("{B}", str(other.port))


@pytest.mark.parametrize("case", URL_REFUSED)
def test_data_cannot_choose_where_a_request_goes(
    database_url: str, tmp_path: Path, servers: tuple[Recorder, Recorder], case: tuple[Any, ...]
) -> None:
    template, context, why = (*case, REFUSED)[:3]
    intended, other = servers
    url = fill(template, intended, other)
    step = {"id": "call", "action": "http", "with": {"url": url, "headers": {"Authorization": SECRET}}, "retry": RETRY}
    app = make(database_url, tmp_path, step, base_url=f"http://127.0.0.1:{intended.port}")
    try:
        status, step_row = run_once(app, {k: fill(v, intended, other) for k, v in context.items()})
        assert status is RunStatus.FAILED
        assert step_row.status is StepStatus.FAILED and step_row.attempt == 1
        assert why in step_row.error
        assert why != REFUSED or "nothing was sent" in step_row.error
    finally:
        app.close()
    assert other.requests == [] and intended.requests == []


# (path template after the target's base_url, value, the raw path the target receives)
URL_ENCODED = [
    ("/items/{{ context.v }}", "@127.0.0.1:{B}", "/items/%40127.0.0.1%3A{B}"),
    ("/items/{{ context.v }}", "//127.0.0.1:{B}/x", "/items/%2F%2F127.0.0.1%3A{B}%2Fx"),
    ("/items/{{ context.v }}", "../../admin", "/items/..%2F..%2Fadmin"),
    ("/items/{{ context.v }}", "%2F..%2Fadmin", "/items/%252F..%252Fadmin"),
    ("/items/{{ context.v }}", "x?admin=1#frag", "/items/x%3Fadmin%3D1%23frag"),
    ("/items?q={{ context.v }}", "a&admin=1#x", "/items?q=a%26admin%3D1%23x"),
    ("/items/{{ context.v }}", "a b\r\nHost: evil", "/items/a%20b%0D%0AHost%3A%20evil"),
]


@pytest.mark.parametrize(("path", "value", "received"), URL_ENCODED)
@pytest.mark.parametrize("origin", ["{{ target.base_url }}", "http://127.0.0.1:{A}"], ids=["base_url", "literal"])
def test_values_from_data_are_encoded_into_the_path_or_query(
    database_url: str,
    tmp_path: Path,
    servers: tuple[Recorder, Recorder],
    origin: str,
    path: str,
    value: str,
    received: str,
) -> None:
    intended, other = servers
    url = fill(origin, intended, other) + path
    step = {"id": "call", "action": "http", "with": {"url": url, "headers": {"Authorization": SECRET}}}
    app = make(database_url, tmp_path, step, base_url=f"http://127.0.0.1:{intended.port}")
    try:
        status, step_row = run_once(app, {"v": fill(value, intended, other)})
        assert status is RunStatus.COMPLETED, step_row.error
    finally:
        app.close()
    assert intended.requests == [("GET", fill(received, intended, other), SECRET)]
    assert other.requests == []


@pytest.mark.parametrize("value", ["..", ".", "%2e%2E"])
def test_a_dot_segment_from_data_is_refused(
    database_url: str, tmp_path: Path, servers: tuple[Recorder, Recorder], value: str
) -> None:
    intended, other = servers
    step = {"id": "call", "action": "http", "with": {"url": "{{ target.base_url }}/a/{{ context.v }}/admin"}}
    app = make(database_url, tmp_path, step, base_url=f"http://127.0.0.1:{intended.port}")
    try:
        status, step_row = run_once(app, {"v": value})
        assert status is RunStatus.FAILED and step_row.status is StepStatus.FAILED
        assert "makes the path segment" in step_row.error and "nothing was sent" in step_row.error
    finally:
        app.close()
    assert intended.requests == [] and other.requests == []


def test_legitimate_url_templates_still_work(
    database_url: str, tmp_path: Path, servers: tuple[Recorder, Recorder]
) -> None:
    intended, other = servers
    url = "{{ target.base_url }}/jobs/{{ context.job }}/retry?n={{ context.n }}&file={{ context.file }}&v=1.2"
    step = {"id": "call", "action": "http", "with": {"method": "POST", "url": url, "json": {"n": "{{ context.n }}"}}}
    app = make(database_url, tmp_path, step, base_url=f"http://127.0.0.1:{intended.port}")
    try:
        status, step_row = run_once(app, {"job": "job-42.v2", "n": 3, "file": "/data/in put.csv"})
        assert status is RunStatus.COMPLETED, step_row.error
        assert step_row.output["json"] == {"ok": True}
    finally:
        app.close()
    assert intended.requests == [("POST", "/jobs/job-42.v2/retry?n=3&file=%2Fdata%2Fin%20put.csv&v=1.2", None)]
    assert other.requests == []


def test_a_capability_bound_to_http_encodes_its_args_and_keeps_its_host(
    database_url: str, tmp_path: Path, servers: tuple[Recorder, Recorder]
) -> None:
    intended, other = servers
    bindings = {
        "item.get": {"http": {"method": "GET", "url": "{{ target.base_url }}/items/{{ args.name }}"}},
        "port.get": {"http": {"method": "GET", "url": "http://127.0.0.1:{{ args.port }}/x"}},
    }
    for name, args, ok in [
        ("item.get", {"name": "{{ context.v }}"}, True),
        ("port.get", {"port": "{{ context.port }}"}, False),
    ]:
        step = {"id": "cap", "action": "capability", "with": {"name": name, "args": args}}
        app = make(
            database_url,
            tmp_path,
            step,
            base_url=f"http://127.0.0.1:{intended.port}",
            target={"capabilities": bindings},
        )
        try:
            status, step_row = run_once(app, {"v": f"@127.0.0.1:{other.port}/x", "port": f"1@127.0.0.1:{other.port}"})
            if ok:
                assert status is RunStatus.COMPLETED, step_row.error
            else:
                assert status is RunStatus.FAILED and "refused: template data would choose" in step_row.error
        finally:
            app.close()
    assert intended.requests == [("GET", f"/items/%40127.0.0.1%3A{other.port}%2Fx", None)]
    assert other.requests == []


def test_allowed_hosts_lets_data_choose_only_among_them(
    database_url: str, tmp_path: Path, servers: tuple[Recorder, Recorder]
) -> None:
    intended, other = servers
    step = {"id": "call", "action": "http", "with": {"url": "{{ context.url }}", "headers": {"Authorization": SECRET}}}
    app = make(
        database_url,
        tmp_path,
        step,
        base_url="http://127.0.0.1:9",
        target={"allowed_hosts": [f"127.0.0.1:{intended.port}"]},
    )
    try:
        status, step_row = run_once(app, {"url": f"http://127.0.0.1:{intended.port}/ok?x=1"})
        assert status is RunStatus.COMPLETED, step_row.error
        refused = [
            (f"http://127.0.0.1:{other.port}/x", "is not in the target's allowed_hosts"),
            (f"http://localhost:{other.port}/x", "is not in the target's allowed_hosts"),
            (f"http://127.0.0.1:{intended.port}@127.0.0.1:{other.port}/x", "credentials"),
            (f"http://u:p@127.0.0.1:{intended.port}/x", "credentials"),
        ]
        for url, why in refused:
            status, step_row = run_once(app, {"url": url})
            assert status is RunStatus.FAILED and why in step_row.error and "nothing was sent" in step_row.error
    finally:
        app.close()
    assert intended.requests == [("GET", "/ok?x=1", SECRET)]
    assert other.requests == []
