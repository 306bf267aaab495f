"""The spec's scenario, staged on the sample service for `--no-story` before the demo reports ready.

The spec's four curl tests start from a service that is already broken: its database connection is gone (test 1
heals it) and a 500 MB file's pipeline run has failed on the timeout (test 2 escalates it, because the cause is
in the code: the fixed 64 KB chunk size). A freshly started sample service is healthy, so the spec's test 2
would find no failed run and nothing to escalate. The demo breaks it through the service's own fault endpoints
(the same ones the story uses, so no back door exists for the demo alone), checks that each fault took, and says
what it staged. The service's defaults stay as they are; the story injects its faults itself, test by test.
"""

from __future__ import annotations

import json
from typing import Any

from mendloop.demo.common import HTTP_TIMEOUT, DemoError
from mendloop.errors import MendloopError
from mendloop.infra.api_client import ApiClient

# Two refused reconnects before one succeeds: test 1 then shows the playbook's retry with backoff doing the work,
# not a reconnect that could not fail. The story's test 1 uses the same fault.
DB_FAULT: tuple[str, dict[str, Any]] = ("db_disconnect", {"reconnect_failures": 2})
# The service's defaults: archive_500mb.pdf, 500 MB, run against the configured 300 s timeout.
LARGE_FILE_FAULT: tuple[str, dict[str, Any]] = ("large_file", {})


def stage(service_url: str) -> list[str]:
    """Drop the database connection and fail a 500 MB pipeline run on the timeout; the lines that say so.

    Each fault is checked on the service afterwards (its own status and analysis endpoints): a demo that said it
    staged the scenario while the service saw none of it would make the spec's answers a coincidence."""
    with ApiClient(service_url, timeout=HTTP_TIMEOUT, trust_env=False, name="the sample service") as svc:
        db = _call(svc, "POST", f"/admin/faults/{DB_FAULT[0]}", json=DB_FAULT[1])
        status = _call(svc, "GET", "/admin/db/status")
        if status.get("connected") is not False:
            raise DemoError(
                "staging the spec's scenario: the sample service's database is still connected", _js(status)
            )

        answer = _call(svc, "POST", f"/admin/faults/{LARGE_FILE_FAULT[0]}", json=LARGE_FILE_FAULT[1])
        run = answer.get("run")
        if not isinstance(run, dict) or run.get("ok") is not False:
            raise DemoError("staging the spec's scenario: the large file's pipeline run did not time out", _js(answer))
        analysis = _call(svc, "GET", "/admin/pipeline/timeout-analysis")
        if analysis.get("cause") != "code":
            # Test 2 escalates only on a code cause; a copy whose chunking is already fixed would not.
            raise DemoError(
                "staging the spec's scenario: the service's timeout analysis finds no code cause", _js(analysis)
            )

    failures = DB_FAULT[1]["reconnect_failures"]
    return [
        "The spec's scenario, staged on the sample service through its own fault endpoints:",
        f"  the database connection dropped (POST /admin/faults/{DB_FAULT[0]} {_js(DB_FAULT[1])}): connected=false, "
        f"{db.get('stale_connections')} stale connection(s), the next {failures} reconnects refused",
        f"  pipeline run {run.get('run_id')} of {run.get('file_path')} ({run.get('size_mb')} MB) failed on the "
        f"timeout (POST /admin/faults/{LARGE_FILE_FAULT[0]}): {run.get('chunks')} chunks, "
        f"{run.get('modeled_seconds')} modeled seconds against {run.get('timeout_seconds')}",
        f"  the service's timeout analysis: a {analysis.get('cause')} cause in {analysis.get('suspect_file')} "
        f"({analysis.get('summary')})",
    ]


def _call(svc: ApiClient, method: str, path: str, **kw: Any) -> dict[str, Any]:
    try:
        return svc.call_object(method, path, **kw)
    except MendloopError as exc:
        raise DemoError(f"staging the spec's scenario: {method} {path} on the sample service: {exc.message}") from exc


def _js(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
