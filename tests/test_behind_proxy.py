"""mendloop behind a real nginx under a path prefix, with the `location` block of docs/behind-a-proxy.md (only its
ports changed): the health check, the API docs and their assets, a run, and the live stream resuming from
Last-Event-ID all work through the proxy; forwarded headers are believed from the proxy only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mendloop.config import load_settings
from mendloop.errors import ConfigError
from tests.support import free_port, in_ci, serve_process, wait_for, write_playbooks
from tests.test_event_stream_resume import messages

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "behind-a-proxy.md"
TOKEN = "proxy-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUNS = {"type": "self_healing.*"}
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def documented_location(upstream_port: int) -> str:
    """The doc's `location /mendloop/ { ... }` block, pointed at this test's server."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"^    location /mendloop/ \{\n.*?^    \}\n", text, re.M | re.S)
    assert block is not None, "docs/behind-a-proxy.md lost its nginx location block"
    return block.group(0).replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")


def nginx_conf(tmp: Path, listen: int, upstream: int) -> Path:
    temp = tmp / "nginx-temp"
    temp.mkdir()
    temp.chmod(0o777)  # its workers (nobody, when the master is root) write request bodies here
    paths = "".join(
        f"    {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log warn;\ndaemon off;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{paths}"
        # From 127.0.0.2, the one address mendloop believes forwarded headers from: a caller on 127.0.0.1 is not it.
        f"  server {{\n    listen 127.0.0.1:{listen};\n    proxy_bind 127.0.0.2;\n"
        f"{documented_location(upstream)}  }}\n}}\n"
    )
    return conf


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(base URL through nginx, direct base URL) of a `mendloop serve --root-path /mendloop`."""
    if NGINX is None:
        if in_ci():
            pytest.fail("nginx is missing: scripts/test.sh installs Debian's nginx-light")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    write_playbooks(
        tmp_path / "pb",
        {
            "id": "heal",
            "type": "retry",
            "description": "d",
            "handles": {"error_types": ["proxied_failure"]},
            "steps": [{"id": "ok", "action": "command", "with": {"argv": ["true"]}}],
        },
    )
    cfg = tmp_path / "mendloop.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp_path / 'm.db'}",
                "playbook_dirs": ["pb"],
                "api_tokens": [TOKEN],
                "root_path": "/mendloop",
                "forwarded_allow_ips": ["127.0.0.2"],
                "limits": {"sse_keepalive_seconds": 0.5},
            }
        )
    )
    upstream, listen = free_port(), free_port()
    conf = nginx_conf(tmp_path, listen, upstream)
    with serve_process(cfg, upstream, log=tmp_path / "serve.log"):
        proc = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "nginx.out").open("wb"),
        )
        base = f"http://127.0.0.1:{listen}/mendloop"
        try:

            def up() -> bool:
                if proc.poll() is not None:
                    log = tmp_path / "nginx-error.log"
                    raise AssertionError(f"nginx exited {proc.returncode}: {log.read_text() if log.exists() else ''}")
                try:
                    return httpx.get(f"{base}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, 20, 0.05)
            yield base, f"http://127.0.0.1:{upstream}"
        finally:
            proc.terminate()
            proc.wait(10)


def test_docs_health_runs_and_the_stream_work_under_the_prefix(proxied: tuple[str, str]) -> None:
    base, direct = proxied
    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    # The docs page asks for its OpenAPI document and assets behind the prefix, and they load through nginx.
    page = httpx.get(f"{base}/docs", timeout=10).text
    assert "'/mendloop/openapi.json'" in page or '"/mendloop/openapi.json"' in page
    assets = re.findall(r"""["'](/mendloop/_static/swagger/[^"']+)["']""", page)
    assert len(assets) >= 2
    for asset in assets:
        assert httpx.get(f"http://{httpx.URL(base).netloc.decode()}{asset}", timeout=10).status_code == 200
    openapi = httpx.get(f"{base}/openapi.json", timeout=10).json()
    assert openapi["servers"] == [{"url": "/mendloop"}]

    # Authentication sees the path inside the app: a public path stays public, the rest needs the token.
    assert httpx.get(f"{base}/patches/runs", timeout=10).status_code == 401

    # A run, and its events on the live stream, through the proxy; then a resume from Last-Event-ID.
    with httpx.stream("GET", f"{base}/events/stream", params=RUNS, headers=AUTH, timeout=30) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        answer = httpx.post(
            f"{base}/patches/trigger",
            json={"error_type": "proxied_failure", "description": "through nginx", "component": "svc"},
            headers=AUTH,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        run = answer.json()
        got: list[Any] = []
        deadline = time.monotonic() + 60  # a guard against a stream that never ends, not a timing assertion
        for m in messages(stream):
            assert time.monotonic() < deadline, f"no self_healing.completed for {run} through the proxy: {got}"
            if m.event is not None and m.body.get("run_id") == run["run_id"]:
                got.append(m)
                if m.event == "self_healing.completed":
                    break
    assert len(got) >= 2 and got[-1].body["payload"]["status"] == "completed"
    detail = httpx.get(f"{base}/patches/runs/{run['run_id']}", headers=AUTH, timeout=10)
    assert detail.status_code == 200 and detail.json()["status"] == "completed"

    first = got[0]
    with httpx.stream(
        "GET",
        f"{base}/events/stream",
        params=RUNS,
        headers={**AUTH, "Last-Event-ID": first.id or ""},
    ) as again:
        replayed = []
        for m in messages(again):
            if m.event is not None:
                replayed.append(m)
                if m.id == got[-1].id:
                    break
    assert [m.id for m in replayed] == [m.id for m in got[1:]]

    # Straight to the server (not through the proxy) the app is still reachable without the prefix.
    assert httpx.get(f"{direct}/health", timeout=10).status_code == 200


def test_the_client_address_comes_from_the_proxy_only(proxied: tuple[str, str]) -> None:
    base, direct = proxied
    spoof = {**AUTH, "X-Forwarded-For": "203.0.113.7"}
    body = {"error_type": "proxied_failure", "description": "d", "component": "svc", "wait_seconds": 0}
    # Through nginx, which connects from 127.0.0.2 and names the caller it saw (127.0.0.1): believed, so the
    # client is 127.0.0.1, not the proxy's 127.0.0.2.
    assert httpx.post(f"{base}/patches/trigger", json=body, headers=AUTH, timeout=60).status_code == 200
    # Straight to mendloop from 127.0.0.1, which is not a listed proxy: the header is ignored.
    assert httpx.post(f"{direct}/patches/trigger", json=body, headers=spoof, timeout=60).status_code == 200
    audit = httpx.get(f"{direct}/audit", params={"action": "runs.trigger"}, headers=AUTH, timeout=10)
    assert audit.status_code == 200, audit.text
    clients = sorted(e["client"] for e in audit.json()["entries"])
    assert clients == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.parametrize("value", ["mendloop", "/mendloop/", "/a b", "/../x"])
def test_a_root_path_that_is_not_a_clean_prefix_is_a_config_error(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"root_path": value}))
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.fields["field"] == "root_path"
