#!/usr/bin/env python3
"""sample_service: a small ingestion service with admin "capabilities" that mendloop heals.

Run from this directory:

    python service.py --port 8099 --state-dir ./state

Standard library only. Listens on 127.0.0.1. Writes `serve.log`, `state.json` and
`side_effects.jsonl` (plus schema backups) into the state directory.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep the service directory (a git repository in the demo) clean

import argparse  # noqa: E402
import copy  # noqa: E402
import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import date, datetime, timezone  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import ingestion_pipeline  # noqa: E402
import schema_validator  # noqa: E402
import verification  # noqa: E402

LOG = logging.getLogger("sample_service")

BOOT_ID = uuid.uuid4().hex[:12]
STARTED_AT = datetime.now(timezone.utc).isoformat(timespec="seconds")

STATE_FILE = "state.json"
SERVE_LOG = "serve.log"
SIDE_EFFECTS_LOG = "side_effects.jsonl"
SCHEMA_BACKUP_DIR = "schema_backups"

MB = ingestion_pipeline.MB
KB = ingestion_pipeline.KB
DEFAULT_TIMEOUT_SECONDS = ingestion_pipeline.DEFAULT_TIMEOUT_SECONDS
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_SIZE_MB = 10_000
LOW_TIMEOUT_SECONDS = 20
# Reference for "what good chunking looks like", used by the timeout analysis only.
ADAPTIVE_TARGET_CHUNKS = 200
ADAPTIVE_MIN_CHUNK_BYTES = 1 * MB

MEMORY_LIMIT_BYTES = 64 * MB
MAX_BODY_BYTES = 1 * MB
MAX_IDEMPOTENCY_KEYS_PER_ACTION = 1000
MAX_PIPELINE_RUNS_KEPT = 50

KNOWN_FAULTS = (
    "db_disconnect",
    "fill_caches",
    "corrupt_schema",
    "low_timeout",
    "large_file",
    "ingestion_failure",
    "verification_failure",
)


def _source_version(module) -> str:
    with open(module.__file__, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:12]


# Versions of the code that is *loaded* (computed once at start; a restart reloads).
CODE_VERSIONS = {
    "ingestion_pipeline.py": _source_version(ingestion_pipeline),
    "schema_validator.py": _source_version(schema_validator),
    "verification.py": _source_version(verification),
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fmt_size(nbytes: int | float) -> str:
    """500 MiB -> "500MB", 64 KiB -> "64KB"."""
    nbytes = int(nbytes)
    if nbytes and nbytes % MB == 0:
        return f"{nbytes // MB}MB"
    if nbytes and nbytes % KB == 0:
        return f"{nbytes // KB}KB"
    return f"{nbytes}B"


def fmt_seconds(value: float) -> str:
    return f"{int(value)}s" if float(value).is_integer() else f"{value}s"


# --------------------------------------------------------------------------- errors + validation


class ApiError(Exception):
    def __init__(self, status: int, error: str, field_name: str | None = None, **extra) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field_name = field_name
        self.extra = extra

    def payload(self) -> dict:
        body = {"error": self.error}
        if self.field_name is not None:
            body["field"] = self.field_name
        body.update(self.extra)
        return body


def validate_positive_int(value: object, field_name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{field_name} must be a positive integer, got {value!r}", field_name)
    if value <= 0 or value > maximum:
        raise ApiError(400, f"{field_name} must be between 1 and {maximum}, got {value}", field_name)
    return value


def validate_non_negative_int(value: object, field_name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > maximum:
        raise ApiError(400, f"{field_name} must be an integer between 0 and {maximum}, got {value!r}", field_name)
    return value


def validate_size_mb(value: object, field_name: str = "size_mb") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{field_name} must be a positive number, got {value!r}", field_name)
    if value <= 0 or value > MAX_SIZE_MB:
        raise ApiError(400, f"{field_name} must be > 0 and <= {MAX_SIZE_MB}, got {value}", field_name)
    return value


def validate_text(value: object, field_name: str, max_len: int = 500) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise ApiError(400, f"{field_name} must be a non-empty string of at most {max_len} characters", field_name)
    return value


def validate_bool(value: object, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{field_name} must be true or false, got {value!r}", field_name)
    return value


def validate_choice(value: object, field_name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ApiError(400, f"{field_name} must be one of {list(choices)}, got {value!r}", field_name)
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------- default state


def _doc(doc_id: str, file_path: str, content: str, page_count: int) -> dict:
    return {
        "id": doc_id,
        "file_path": file_path,
        "content": content,
        "page_count": page_count,
        "checksum": verification.content_checksum(content),
    }


def _book_record(file_path: str, with_date: bool) -> dict:
    digits = "".join(ch for ch in file_path if ch.isdigit())
    record = {
        "id": int(digits[:9]) if digits else 1,
        "file_path": file_path,
        "title": os.path.splitext(os.path.basename(file_path))[0].replace("_", " ").title(),
        "page_count": 412,
        "ingested_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checksum": hashlib.sha256(file_path.encode()).hexdigest()[:16],
    }
    if with_date:
        record["published_date"] = "2024-05-01"
    return record


def default_caches() -> list[dict]:
    return [
        {"name": "sessions", "bytes": 4 * MB, "critical": True},
        {"name": "thumbnails", "bytes": 2 * MB, "critical": False},
        {"name": "query_results", "bytes": 1 * MB, "critical": False},
        {"name": "page_renders", "bytes": 1 * MB, "critical": False},
    ]


def default_state() -> dict:
    docs = {}
    sources = {}
    for n in range(1, 6):
        content = f"Document {n}: " + " ".join(f"page-{p}" for p in range(1, n + 3))
        doc = _doc(f"doc-{n}", f"library/doc_{n}.pdf", content, n + 2)
        docs[doc["id"]] = doc
        sources[doc["id"]] = {"content": content, "checksum": doc["checksum"]}
    welcome = _book_record("welcome.pdf", with_date=False)
    return {
        "state_version": 1,
        "created_at": now_iso(),
        "restarts": 0,
        "config": {"pipeline_timeout_seconds": DEFAULT_TIMEOUT_SECONDS},
        "db": {
            "connected": True,
            "reconnects": 0,
            "reconnect_failures_remaining": 0,
            "connections": [{"id": 1, "stale": False}, {"id": 2, "stale": False}],
            "next_connection_id": 3,
        },
        "schema": schema_validator.expected_schema(),
        "schema_backups": [],
        "caches": default_caches(),
        "background_tasks": [
            {"name": "ingest_worker", "priority": "high", "status": "running", "memory_bytes": 6 * MB},
        ],
        "pipeline": {"next_run_id": 1, "runs": [], "failed": []},
        "ingestion": {
            "records": {
                "welcome.pdf": {
                    "file_path": "welcome.pdf",
                    "status": "completed",
                    "source": welcome,
                    "staged": copy.deepcopy(welcome),
                    "locked_by": None,
                    "error": None,
                    "attempts": 1,
                    "updated_at": now_iso(),
                }
            }
        },
        "verification": {"documents": docs, "sources": sources, "last_run": None},
        "faults": [],
        "idempotency": {},
    }


# --------------------------------------------------------------------------- the service


@dataclass
class Outcome:
    status: int
    body: dict
    effect: dict | None = None  # details for the side-effect log; None = nothing changed
    post: str | None = None  # action to run after the response is sent ("restart")


@dataclass
class Route:
    handler: str
    action: str | None = None  # side-effect action name; None = read-only
    methods: tuple[str, ...] = ("GET",)


class Service:
    def __init__(self, state_dir: str, port: int) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.port = port
        os.makedirs(self.state_dir, exist_ok=True)
        self.state_path = os.path.join(self.state_dir, STATE_FILE)
        self.side_effects_path = os.path.join(self.state_dir, SIDE_EFFECTS_LOG)
        self.lock = threading.RLock()
        self.restart_requested = threading.Event()
        self.state = self._load_state()
        self._save_state()

    # ---------------------------------------------------------------- persistence

    def _load_state(self) -> dict:
        defaults = default_state()
        if not os.path.exists(self.state_path):
            return defaults
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                loaded = json.load(fh)
            if not isinstance(loaded, dict):
                raise ValueError("state is not a JSON object")
        except (OSError, ValueError) as exc:
            aside = f"{self.state_path}.corrupt-{int(time.time())}"
            try:
                os.replace(self.state_path, aside)
            except OSError:
                aside = "(could not move aside)"
            LOG.error("State file unreadable (%s); starting from defaults, old file at %s", exc, aside)
            return defaults
        for key, value in defaults.items():
            loaded.setdefault(key, value)
        return loaded

    def _save_state(self) -> None:
        tmp = f"{self.state_path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def _log_side_effect(self, action: str, key: str | None, status: int, details: dict) -> None:
        entry = {"ts": now_iso(), "action": action, "idempotency_key": key, "status": status}
        for k, v in details.items():
            if k not in entry:
                entry[k] = v
        with open(self.side_effects_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()

    # ---------------------------------------------------------------- routing

    ROUTES: dict[str, Route] = {
        "/health": Route("health"),
        "/admin/state": Route("get_state"),
        "/admin/config": Route("config", "config.update", ("GET", "POST")),
        "/admin/faults": Route("list_faults"),
        "/admin/db/status": Route("db_status"),
        "/admin/db/close-stale": Route("db_close_stale", "db.close_stale", ("POST",)),
        "/admin/db/reconnect": Route("db_reconnect", "db.reconnect", ("POST",)),
        "/admin/caches": Route("caches"),
        "/admin/caches/clear": Route("caches_clear", "caches.clear", ("POST",)),
        "/admin/tasks/stop-background": Route("tasks_stop_background", "tasks.stop_background", ("POST",)),
        "/admin/memory": Route("memory"),
        "/admin/schema/validate": Route("schema_validate"),
        "/admin/schema/backup": Route("schema_backup", "schema.backup", ("POST",)),
        "/admin/schema/repair": Route("schema_repair", "schema.repair", ("POST",)),
        "/admin/pipeline/run": Route("pipeline_run", "pipeline.run", ("POST",)),
        "/admin/pipeline/runs": Route("pipeline_runs"),
        "/admin/pipeline/timeout-analysis": Route("pipeline_timeout_analysis"),
        "/admin/ingestion/analysis": Route("ingestion_analysis"),
        "/admin/ingestion/status": Route("ingestion_status"),
        "/admin/ingestion/reset-state": Route("ingestion_reset_state", "ingestion.reset_state", ("POST",)),
        "/admin/ingestion/retry": Route("ingestion_retry", "ingestion.retry", ("POST",)),
        "/admin/verification/analysis": Route("verification_analysis"),
        "/admin/verification/rerun": Route("verification_rerun", "verification.rerun", ("POST",)),
        "/admin/verification/repair-data": Route("verification_repair_data", "verification.repair_data", ("POST",)),
        "/admin/restart": Route("restart", "restart", ("POST",)),
    }

    def handle(
        self, method: str, path: str, query: dict, raw_body: bytes, key: str | None
    ) -> tuple[int, dict, str | None]:
        """Dispatch one request. Returns (status, json body, post action)."""
        if path.startswith("/admin/faults/") and path.count("/") == 3:
            name = path.rsplit("/", 1)[1]
            if name not in KNOWN_FAULTS:
                raise ApiError(404, f"unknown fault {name!r}", known_faults=list(KNOWN_FAULTS))
            if method != "POST":
                raise ApiError(405, f"method {method} not allowed on {path}", allowed=["POST"])
            route = Route("inject_fault", f"fault.{name}", ("POST",))
            query = {**query, "_fault": name}
        else:
            route = self.ROUTES.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint: {path}")
            if method not in route.methods:
                raise ApiError(405, f"method {method} not allowed on {path}", allowed=list(route.methods))

        fn = getattr(self, f"h_{route.handler}")
        if method == "GET" or route.action is None:
            with self.lock:
                outcome = fn(None, query)
            return outcome.status, outcome.body, None

        body = parse_json_body(raw_body)
        action = route.action
        with self.lock:
            if key is not None:
                stored = self.state["idempotency"].get(action, {}).get(key)
                if stored is not None:
                    replay = dict(stored["body"])
                    replay["replayed"] = True
                    return stored["status"], replay, None
            snapshot = copy.deepcopy(self.state)
            try:
                outcome = fn(body, query)
                response = dict(outcome.body)
                response["replayed"] = False
                if outcome.effect is not None:
                    self._log_side_effect(action, key, outcome.status, outcome.effect)
                if key is not None and 200 <= outcome.status < 300:
                    keys = self.state["idempotency"].setdefault(action, {})
                    keys[key] = {"status": outcome.status, "body": copy.deepcopy(outcome.body), "at": now_iso()}
                    while len(keys) > MAX_IDEMPOTENCY_KEYS_PER_ACTION:
                        keys.pop(next(iter(keys)))
                self._save_state()
            except BaseException:
                self.state = snapshot
                raise
        return outcome.status, response, outcome.post

    # ---------------------------------------------------------------- derived views

    def _memory_view(self) -> dict:
        caches = self.state["caches"]
        cache_bytes = sum(c["bytes"] for c in caches)
        non_critical = sum(c["bytes"] for c in caches if not c["critical"])
        running = [t for t in self.state["background_tasks"] if t["status"] == "running"]
        task_bytes = sum(t.get("memory_bytes", 0) for t in running)
        total = cache_bytes + task_bytes
        return {
            "cache_bytes": cache_bytes,
            "non_critical_cache_bytes": non_critical,
            "task_bytes": task_bytes,
            "total_bytes": total,
            "limit_bytes": MEMORY_LIMIT_BYTES,
            "over_limit": total > MEMORY_LIMIT_BYTES,
            "background_tasks": copy.deepcopy(self.state["background_tasks"]),
        }

    def _failed_records(self) -> list[dict]:
        records = [r for r in self.state["ingestion"]["records"].values() if r["status"] in ("failed", "stuck")]
        return sorted(records, key=lambda r: r.get("updated_at") or "")

    def _last_failed_run(self) -> dict | None:
        failed = self.state["pipeline"]["failed"]
        return failed[-1] if failed else None

    def _problems(self) -> list[str]:
        problems = []
        if not self.state["db"]["connected"]:
            problems.append("db_disconnected")
        if schema_validator.validate_schema(self.state["schema"]):
            problems.append("schema_invalid")
        if self._memory_view()["over_limit"]:
            problems.append("memory_over_limit")
        if self.state["pipeline"]["failed"]:
            problems.append("pipeline_failed")
        if self._failed_records():
            problems.append("ingestion_failed")
        last_verification = self.state["verification"]["last_run"]
        if last_verification is not None and not last_verification["ok"]:
            problems.append("verification_failed")
        return problems

    # ---------------------------------------------------------------- read-only endpoints

    def h_health(self, body: dict | None, query: dict) -> Outcome:
        problems = self._problems()
        return Outcome(
            200,
            {
                "status": "degraded" if problems else "ok",
                "problems": problems,
                "db_connected": self.state["db"]["connected"],
                "schema_valid": "schema_invalid" not in problems,
                "cache_bytes": self._memory_view()["cache_bytes"],
                "pipeline_timeout_seconds": self.state["config"]["pipeline_timeout_seconds"],
                "pid": os.getpid(),
                "boot_id": BOOT_ID,
                "started_at": STARTED_AT,
                "restarts": self.state["restarts"],
                "code_version": CODE_VERSIONS["ingestion_pipeline.py"],
                "code_versions": dict(CODE_VERSIONS),
                "port": self.port,
            },
        )

    def h_get_state(self, body: dict | None, query: dict) -> Outcome:
        return Outcome(200, copy.deepcopy(self.state))

    def h_list_faults(self, body: dict | None, query: dict) -> Outcome:
        return Outcome(200, {"faults": list(KNOWN_FAULTS), "injected": copy.deepcopy(self.state["faults"])})

    def h_db_status(self, body: dict | None, query: dict) -> Outcome:
        db = self.state["db"]
        return Outcome(
            200,
            {
                "connected": db["connected"],
                "reconnects": db["reconnects"],
                "open_connections": len(db["connections"]),
                "stale_connections": sum(1 for c in db["connections"] if c["stale"]),
                "reconnect_failures_remaining": db["reconnect_failures_remaining"],
            },
        )

    def h_caches(self, body: dict | None, query: dict) -> Outcome:
        mem = self._memory_view()
        return Outcome(
            200,
            {
                "caches": copy.deepcopy(self.state["caches"]),
                "total_bytes": mem["cache_bytes"],
                "non_critical_bytes": mem["non_critical_cache_bytes"],
            },
        )

    def h_memory(self, body: dict | None, query: dict) -> Outcome:
        return Outcome(200, self._memory_view())

    def h_schema_validate(self, body: dict | None, query: dict) -> Outcome:
        problems = schema_validator.validate_schema(self.state["schema"])
        return Outcome(200, {"valid": not problems, "problems": problems, "schema": copy.deepcopy(self.state["schema"])})

    def h_pipeline_runs(self, body: dict | None, query: dict) -> Outcome:
        return Outcome(
            200,
            {
                "runs": copy.deepcopy(self.state["pipeline"]["runs"]),
                "failed": copy.deepcopy(self.state["pipeline"]["failed"]),
                "last_failed": copy.deepcopy(self._last_failed_run()),
            },
        )

    def h_pipeline_timeout_analysis(self, body: dict | None, query: dict) -> Outcome:
        run = self._last_failed_run()
        if run is None:
            return Outcome(
                200,
                {
                    "cause": "none",
                    "recommended_timeout_seconds": None,
                    "details": {},
                    "suspect_file": None,
                    "summary": "no failed pipeline run",
                },
            )
        size = run["size_bytes"]
        timeout = run["timeout_seconds"]
        modeled = run["modeled_seconds"]
        adaptive_chunk = max(ADAPTIVE_MIN_CHUNK_BYTES, size // ADAPTIVE_TARGET_CHUNKS)
        adaptive_chunks = ingestion_pipeline.count_chunks(size, adaptive_chunk)
        adaptive_seconds = ingestion_pipeline.modeled_seconds(size, adaptive_chunk)
        details = {
            "run_id": run["run_id"],
            "file_path": run["file_path"],
            "file_size": fmt_size(size),
            "size_bytes": size,
            "current_chunk_size": fmt_size(run["chunk_size_bytes"]),
            "chunk_size_bytes": run["chunk_size_bytes"],
            "chunks": run["chunks"],
            "modeled_seconds": modeled,
            "timeout_threshold": fmt_seconds(timeout),
            "timeout_seconds": timeout,
            "default_timeout_seconds": DEFAULT_TIMEOUT_SECONDS,
            "configured_timeout_seconds": self.state["config"]["pipeline_timeout_seconds"],
            "adaptive_chunk_size": fmt_size(adaptive_chunk),
            "adaptive_chunks": adaptive_chunks,
            "adaptive_modeled_seconds": adaptive_seconds,
        }
        if modeled <= DEFAULT_TIMEOUT_SECONDS and timeout < DEFAULT_TIMEOUT_SECONDS:
            recommended = max(DEFAULT_TIMEOUT_SECONDS, math.ceil(modeled * 1.5))
            cause, suspect = "config", None
            summary = (
                f"{fmt_size(size)} file needs {modeled}s but the timeout is {timeout}s "
                f"(default {DEFAULT_TIMEOUT_SECONDS}s): timeout misconfigured"
            )
        elif run["chunks"] > adaptive_chunks and adaptive_seconds <= max(timeout, DEFAULT_TIMEOUT_SECONDS):
            recommended, cause, suspect = None, "code", "ingestion_pipeline.py"
            summary = (
                f"{fmt_size(size)} file split into {run['chunks']} chunks of {fmt_size(run['chunk_size_bytes'])} "
                f"takes {modeled}s; with adaptive chunking ({adaptive_chunks} chunks) it would take "
                f"{adaptive_seconds}s: fixed chunk size is inefficient for large files"
            )
        else:
            recommended = max(DEFAULT_TIMEOUT_SECONDS, math.ceil(modeled * 1.5))
            cause, suspect = "config", None
            summary = f"{fmt_size(size)} file genuinely needs {modeled}s; timeout {timeout}s is too low for it"
        return Outcome(
            200,
            {
                "cause": cause,
                "recommended_timeout_seconds": recommended,
                "details": details,
                "suspect_file": suspect,
                "summary": summary,
            },
        )

    def h_ingestion_status(self, body: dict | None, query: dict) -> Outcome:
        records = self.state["ingestion"]["records"]
        return Outcome(
            200,
            {
                "failed": [r["file_path"] for r in self._failed_records()],
                "completed": [p for p, r in records.items() if r["status"] == "completed"],
                "pending": [p for p, r in records.items() if r["status"] == "pending"],
                "records": {
                    p: {k: r[k] for k in ("status", "error", "locked_by", "attempts", "updated_at")}
                    for p, r in records.items()
                },
            },
        )

    def h_ingestion_analysis(self, body: dict | None, query: dict) -> Outcome:
        records = self.state["ingestion"]["records"]
        if "file_path" in query:
            record = records.get(query["file_path"])
            if record is None:
                raise ApiError(404, f"no ingestion record for {query['file_path']!r}", "file_path")
        else:
            failed = self._failed_records()
            record = failed[-1] if failed else None
        if record is None or record["status"] == "completed":
            return Outcome(
                200,
                {
                    "cause": "none",
                    "file_path": record["file_path"] if record else None,
                    "error": None,
                    "details": {"status": record["status"]} if record else {},
                },
            )
        staged = record["staged"]
        reference = reference_record_problems(staged)
        details: dict = {"status": record["status"], "locked_by": record["locked_by"], "attempts": record["attempts"]}
        schema_issues = schema_validator.validate_schema(self.state["schema"])
        if record["status"] == "stuck" or record["locked_by"] or staged != record["source"] or reference:
            cause = "data"
            details.update(
                {
                    "problems": reference,
                    "staged_differs_from_source": staged != record["source"],
                    "fix": "POST /admin/ingestion/reset-state, then POST /admin/ingestion/retry",
                }
            )
        elif schema_issues:
            cause = "data"
            details.update({"schema_problems": schema_issues, "fix": "POST /admin/schema/repair, then retry"})
        else:
            validator = schema_validator.validate_record(staged, self.state["schema"])
            if validator:
                cause = "code"
                details.update(
                    {
                        "validator_problems": validator,
                        "fields": sorted({p.split(":", 1)[0] for p in validator}),
                        "record_is_valid": True,
                        "suspect_file": "schema_validator.py",
                        "fix": "the validator rejects a valid record: patch schema_validator.py",
                    }
                )
            else:
                cause = "none"
                details["note"] = "the record validates now; retry it"
        return Outcome(
            200, {"cause": cause, "file_path": record["file_path"], "error": record["error"], "details": details}
        )

    def h_verification_analysis(self, body: dict | None, query: dict) -> Outcome:
        docs = self.state["verification"]["documents"]
        data_docs, logic_docs = [], []
        for doc_id, doc in docs.items():
            problems = verification.verify_document(doc)
            if not problems:
                continue
            entry = {"document_id": doc_id, "problems": problems}
            if document_is_intact(doc):
                logic_docs.append(entry)
            else:
                data_docs.append(entry)
        if data_docs:
            cause = "data"
            details = {
                "documents": data_docs,
                "logic_documents": logic_docs,
                "fix": "POST /admin/verification/repair-data, then POST /admin/verification/rerun",
            }
        elif logic_docs:
            cause = "logic"
            details = {
                "documents": logic_docs,
                "documents_intact": True,
                "suspect_file": "verification.py",
                "fix": "the verifier rejects intact documents: patch verification.py",
            }
        else:
            cause, details = "none", {}
        details["last_run"] = copy.deepcopy(self.state["verification"]["last_run"])
        return Outcome(200, {"cause": cause, "details": details})

    # ---------------------------------------------------------------- config

    def h_config(self, body: dict | None, query: dict) -> Outcome:
        if body is None:  # GET
            return Outcome(200, copy.deepcopy(self.state["config"]))
        if "pipeline_timeout_seconds" not in body:
            raise ApiError(400, "pipeline_timeout_seconds is required", "pipeline_timeout_seconds")
        value = validate_positive_int(body["pipeline_timeout_seconds"], "pipeline_timeout_seconds", MAX_TIMEOUT_SECONDS)
        previous = self.state["config"]["pipeline_timeout_seconds"]
        self.state["config"]["pipeline_timeout_seconds"] = value
        LOG.info("Config updated: pipeline_timeout_seconds %s -> %s", previous, value)
        return Outcome(
            200,
            {"pipeline_timeout_seconds": value, "previous": previous},
            effect={"pipeline_timeout_seconds": value, "previous": previous},
        )

    # ---------------------------------------------------------------- database

    def h_db_close_stale(self, body: dict, query: dict) -> Outcome:
        db = self.state["db"]
        stale = [c["id"] for c in db["connections"] if c["stale"]]
        db["connections"] = [c for c in db["connections"] if not c["stale"]]
        if stale:
            LOG.info("Closed %d stale database connection(s)", len(stale))
        return Outcome(200, {"closed": len(stale), "connection_ids": stale}, effect={"closed": len(stale)})

    def h_db_reconnect(self, body: dict, query: dict) -> Outcome:
        db = self.state["db"]
        if db["connected"]:
            return Outcome(200, {"connected": True, "already_connected": True}, effect={"connected": True, "noop": True})
        if db["reconnect_failures_remaining"] > 0:
            db["reconnect_failures_remaining"] -= 1
            LOG.warning("Database reconnect attempt failed: connection refused")
            return Outcome(
                503,
                {"error": "database unavailable: connection refused", "connected": False, "retryable": True},
                effect={"connected": False},
            )
        for conn in db["connections"]:
            conn["stale"] = True  # connections from before the drop are dead
        conn_id = db["next_connection_id"]
        db["next_connection_id"] += 1
        db["connections"] = [c for c in db["connections"] if not c["stale"]] + [{"id": conn_id, "stale": False}]
        db["connected"] = True
        db["reconnects"] += 1
        LOG.info("Database reconnected (connection %d)", conn_id)
        return Outcome(
            200,
            {"connected": True, "reconnects": db["reconnects"], "connection_id": conn_id},
            effect={"connected": True, "connection_id": conn_id},
        )

    # ---------------------------------------------------------------- caches / memory

    def h_caches_clear(self, body: dict, query: dict) -> Outcome:
        include_critical = validate_bool(body.get("include_critical", False), "include_critical")
        cleared, freed = [], 0
        for cache in self.state["caches"]:
            if cache["critical"] and not include_critical:
                continue
            freed += cache["bytes"]
            cache["bytes"] = 0
            cleared.append(cache["name"])
        if include_critical:
            LOG.warning("Critical caches cleared on request (include_critical=true)")
        LOG.info("Caches cleared: %s (%s freed)", ", ".join(cleared) or "none", fmt_size(freed))
        kept = [c["name"] for c in self.state["caches"] if c["name"] not in cleared]
        return Outcome(
            200,
            {"cleared": cleared, "kept": kept, "freed_bytes": freed},
            effect={"cleared": cleared, "freed_bytes": freed, "include_critical": include_critical},
        )

    def h_tasks_stop_background(self, body: dict, query: dict) -> Outcome:
        priority = validate_choice(body.get("priority", "low"), "priority", ("low", "high"))
        stopped = []
        for task in self.state["background_tasks"]:
            if task["priority"] == priority and task["status"] == "running":
                task["status"] = "stopped"
                stopped.append(task["name"])
        if stopped:
            LOG.info("Stopped %s-priority background tasks: %s", priority, ", ".join(stopped))
        running = [t["name"] for t in self.state["background_tasks"] if t["status"] == "running"]
        return Outcome(
            200, {"stopped": stopped, "running": running}, effect={"priority": priority, "stopped": stopped}
        )

    # ---------------------------------------------------------------- schema

    def h_schema_backup(self, body: dict, query: dict) -> Outcome:
        backup_dir = os.path.join(self.state_dir, SCHEMA_BACKUP_DIR)
        os.makedirs(backup_dir, exist_ok=True)
        backup_id = f"schema-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path = os.path.join(backup_dir, f"{backup_id}.json")
        payload = {"backup_id": backup_id, "created_at": now_iso(), "schema": self.state["schema"]}
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
        self.state["schema_backups"].append({"backup_id": backup_id, "path": path, "created_at": payload["created_at"]})
        LOG.info("Schema backed up to %s", path)
        return Outcome(200, {"backup_id": backup_id, "path": path}, effect={"backup_id": backup_id, "path": path})

    def h_schema_repair(self, body: dict, query: dict) -> Outcome:
        problems = schema_validator.schema_problems(self.state["schema"])
        repaired = sorted({p["column"] or "table" for p in problems})
        self.state["schema"] = schema_validator.expected_schema()
        if repaired:
            LOG.info("Schema repaired: %s", ", ".join(repaired))
        return Outcome(
            200,
            {"repaired": repaired, "problems_before": [p["message"] for p in problems], "valid": True},
            effect={"repaired": repaired},
        )

    # ---------------------------------------------------------------- pipeline

    def _run_pipeline(self, file_path: str, size_mb: float, trigger: str) -> dict:
        timeout = self.state["config"]["pipeline_timeout_seconds"]
        size_bytes = round(size_mb * MB)
        result = ingestion_pipeline.run_pipeline(file_path, size_bytes, timeout).to_dict()
        pipeline = self.state["pipeline"]
        run = {"run_id": pipeline["next_run_id"], "at": now_iso(), "trigger": trigger, **result}
        pipeline["next_run_id"] += 1
        pipeline["runs"].append(run)
        del pipeline["runs"][:-MAX_PIPELINE_RUNS_KEPT]
        pipeline["failed"] = [r for r in pipeline["failed"] if r["file_path"] != file_path]
        if run["ok"]:
            LOG.info(
                "Pipeline completed for %s (%s) in %s modeled seconds (%d chunks of %s)",
                file_path,
                fmt_size(size_bytes),
                run["modeled_seconds"],
                run["chunks"],
                fmt_size(run["chunk_size_bytes"]),
            )
        else:
            pipeline["failed"].append(run)
            LOG.error("Pipeline timeout after %s seconds", timeout)
            LOG.info(
                "Pipeline run %d details: file=%s size=%s chunks=%d chunk_size=%s processed=%d modeled=%ss",
                run["run_id"],
                file_path,
                fmt_size(size_bytes),
                run["chunks"],
                fmt_size(run["chunk_size_bytes"]),
                run["chunks_processed"],
                run["modeled_seconds"],
            )
        return run

    def h_pipeline_run(self, body: dict, query: dict) -> Outcome:
        file_path = body.get("file_path")
        size_mb = body.get("size_mb")
        if file_path is not None:
            file_path = validate_text(file_path, "file_path")
        if size_mb is not None:
            size_mb = validate_size_mb(size_mb)
        if file_path is None and size_mb is None:
            last = self._last_failed_run()
            if last is not None:
                file_path, size_mb = last["file_path"], last["size_bytes"] / MB
            else:
                file_path, size_mb = "sample_50mb.pdf", 50
        elif size_mb is None:
            previous = [r for r in self.state["pipeline"]["runs"] if r["file_path"] == file_path]
            size_mb = previous[-1]["size_bytes"] / MB if previous else 50
        elif file_path is None:
            file_path = f"upload_{fmt_size(round(size_mb * MB)).lower()}.pdf"
        run = self._run_pipeline(file_path, size_mb, "api")
        return Outcome(200, run, effect=run_effect(run))

    # ---------------------------------------------------------------- ingestion

    def _ingest(self, record: dict) -> None:
        record["attempts"] += 1
        record["updated_at"] = now_iso()
        path = record["file_path"]
        if record["status"] == "stuck" or record["locked_by"]:
            record["error"] = f"record stuck (locked by {record['locked_by']})"
            LOG.error("Ingestion failed for %s: Record stuck (locked by %s)", path, record["locked_by"])
            return
        if not self.state["db"]["connected"]:
            record["status"] = "failed"
            record["error"] = "database unavailable"
            LOG.error("Ingestion failed for %s: Database unavailable", path)
            return
        problems = schema_validator.validate_record(record["staged"], self.state["schema"])
        if problems:
            record["status"] = "failed"
            record["error"] = "Schema mismatch: " + "; ".join(problems)
            LOG.error("Ingestion failed for %s: Schema mismatch", path)
            LOG.info("Schema mismatch details for %s: %s", path, "; ".join(problems))
            return
        record["status"] = "completed"
        record["error"] = None
        LOG.info("Ingestion completed for %s", path)

    def h_ingestion_reset_state(self, body: dict, query: dict) -> Outcome:
        reset = []
        for path, record in self.state["ingestion"]["records"].items():
            if record["status"] == "completed":
                continue
            if record["status"] == "stuck" or record["locked_by"] or record["staged"] != record["source"]:
                record["staged"] = copy.deepcopy(record["source"])
                record["status"] = "pending"
                record["locked_by"] = None
                record["error"] = None
                record["updated_at"] = now_iso()
                reset.append(path)
        if reset:
            LOG.info("Ingestion state reset for: %s", ", ".join(reset))
        return Outcome(200, {"reset": reset}, effect={"reset": reset})

    def h_ingestion_retry(self, body: dict, query: dict) -> Outcome:
        records = self.state["ingestion"]["records"]
        if body.get("file_path") is not None:
            file_path = validate_text(body["file_path"], "file_path")
            if file_path not in records:
                raise ApiError(404, f"no ingestion record for {file_path!r}", "file_path")
        else:
            candidates = [r for r in records.values() if r["status"] != "completed"]
            candidates.sort(key=lambda r: r.get("updated_at") or "")
            if not candidates:
                raise ApiError(404, "nothing to retry: no failed or pending ingestion", "file_path")
            file_path = candidates[-1]["file_path"]
        record = records[file_path]
        if record["status"] == "completed":
            return Outcome(
                200,
                {"ok": True, "file_path": file_path, "status": "completed", "already_completed": True},
                effect={"file_path": file_path, "ok": True, "noop": True},
            )
        self._ingest(record)
        ok = record["status"] == "completed"
        return Outcome(
            200,
            {"ok": ok, "file_path": file_path, "status": record["status"], "error": record["error"]},
            effect={"file_path": file_path, "ok": ok},
        )

    # ---------------------------------------------------------------- verification

    def _verify(self) -> dict:
        docs = self.state["verification"]["documents"]
        failures = verification.verify_documents(docs)
        run = {"at": now_iso(), "ok": not failures, "checked": len(docs), "problems": failures}
        self.state["verification"]["last_run"] = run
        if failures:
            for f in failures:
                LOG.error("Verification failed for %s: %s", f["document_id"], f["problem"])
        else:
            LOG.info("Verification passed (%d documents)", len(docs))
        return run

    def h_verification_rerun(self, body: dict, query: dict) -> Outcome:
        run = self._verify()
        return Outcome(200, dict(run), effect={"ok": run["ok"], "problems": len(run["problems"])})

    def h_verification_repair_data(self, body: dict, query: dict) -> Outcome:
        repaired, unrepairable = [], []
        docs = self.state["verification"]["documents"]
        sources = self.state["verification"]["sources"]
        for doc_id, doc in docs.items():
            if document_is_intact(doc):
                continue
            source = sources.get(doc_id)
            if source and verification.content_checksum(source["content"]) == source["checksum"]:
                doc["content"] = source["content"]
                doc["checksum"] = source["checksum"]
                repaired.append(doc_id)
            else:
                unrepairable.append(doc_id)
        if repaired:
            LOG.info("Verification data repaired from source for: %s", ", ".join(repaired))
        return Outcome(
            200,
            {"repaired": repaired, "unrepairable": unrepairable},
            effect={"repaired": repaired, "unrepairable": unrepairable},
        )

    # ---------------------------------------------------------------- restart ("deploy")

    def h_restart(self, body: dict, query: dict) -> Outcome:
        self.state["restarts"] += 1
        LOG.info("Restart requested (pid %d); re-executing to load current code", os.getpid())
        return Outcome(
            200,
            {"restarting": True, "pid": os.getpid(), "boot_id": BOOT_ID, "code_version": CODE_VERSIONS["ingestion_pipeline.py"]},
            effect={"pid": os.getpid(), "boot_id": BOOT_ID},
            post="restart",
        )

    # ---------------------------------------------------------------- fault injection

    def h_inject_fault(self, body: dict, query: dict) -> Outcome:
        name = query["_fault"]
        response, details = getattr(self, f"_fault_{name}")(body)
        self.state["faults"].append({"name": name, "at": now_iso(), "details": details})
        del self.state["faults"][:-100]
        return Outcome(200, {"fault": name, "injected": True, **response}, effect={"fault": name, **details})

    def _fault_db_disconnect(self, body: dict) -> tuple[dict, dict]:
        failures = validate_non_negative_int(body.get("reconnect_failures", 0), "reconnect_failures", 100)
        db = self.state["db"]
        db["connected"] = False
        db["reconnect_failures_remaining"] = failures
        for conn in db["connections"]:
            conn["stale"] = True
        stale = len(db["connections"])
        LOG.error("Database connection lost: server closed the connection unexpectedly")
        return (
            {"db_connected": False, "stale_connections": stale, "reconnect_failures": failures},
            {"reconnect_failures": failures},
        )

    def _fault_fill_caches(self, body: dict) -> tuple[dict, dict]:
        sizes = {"sessions": 12 * MB, "thumbnails": 48 * MB, "query_results": 32 * MB, "page_renders": 24 * MB}
        caches = {c["name"]: c for c in self.state["caches"]}
        for cache in default_caches():
            caches.setdefault(cache["name"], cache)
        for name, nbytes in sizes.items():
            caches[name]["bytes"] = nbytes
        self.state["caches"] = list(caches.values())
        wanted = [
            {"name": "ingest_worker", "priority": "high", "memory_bytes": 6 * MB},
            {"name": "reindex", "priority": "low", "memory_bytes": 16 * MB},
            {"name": "thumbnail_warmup", "priority": "low", "memory_bytes": 8 * MB},
        ]
        tasks = {t["name"]: t for t in self.state["background_tasks"]}
        for spec in wanted:
            tasks[spec["name"]] = {**spec, "status": "running"}
        self.state["background_tasks"] = list(tasks.values())
        mem = self._memory_view()
        LOG.error(
            "Memory pressure: %s in use (caches %s, background tasks %s), limit %s",
            fmt_size(mem["total_bytes"]),
            fmt_size(mem["cache_bytes"]),
            fmt_size(mem["task_bytes"]),
            fmt_size(MEMORY_LIMIT_BYTES),
        )
        return {"cache_bytes": mem["cache_bytes"], "total_bytes": mem["total_bytes"]}, {
            "cache_bytes": mem["cache_bytes"]
        }

    def _fault_corrupt_schema(self, body: dict) -> tuple[dict, dict]:
        columns = self.state["schema"].setdefault("columns", {})
        columns.pop("checksum", None)
        columns["page_count"] = {"type": "text", "required": True}
        problems = schema_validator.validate_schema(self.state["schema"])
        LOG.error("Schema validation failed: %s", "; ".join(problems))
        return {"problems": problems}, {"problems": problems}

    def _fault_low_timeout(self, body: dict) -> tuple[dict, dict]:
        timeout = validate_positive_int(
            body.get("pipeline_timeout_seconds", LOW_TIMEOUT_SECONDS), "pipeline_timeout_seconds", MAX_TIMEOUT_SECONDS
        )
        self.state["config"]["pipeline_timeout_seconds"] = timeout
        LOG.warning("Config changed: pipeline_timeout_seconds set to %s", timeout)
        run = self._run_pipeline("report_50mb.pdf", 50, "fault")
        return {"pipeline_timeout_seconds": timeout, "run": run}, {
            "pipeline_timeout_seconds": timeout,
            "run_id": run["run_id"],
            "ok": run["ok"],
        }

    def _fault_large_file(self, body: dict) -> tuple[dict, dict]:
        file_path = validate_text(body.get("file_path", "archive_500mb.pdf"), "file_path")
        size_mb = validate_size_mb(body.get("size_mb", 500))
        run = self._run_pipeline(file_path, size_mb, "fault")
        return {"run": run}, {"file_path": file_path, "size_mb": size_mb, "run_id": run["run_id"], "ok": run["ok"]}

    def _fault_ingestion_failure(self, body: dict) -> tuple[dict, dict]:
        file_path = validate_text(body.get("file_path", "book_123.pdf"), "file_path")
        cause = validate_choice(body.get("cause", "data"), "cause", ("data", "code"))
        source = _book_record(file_path, with_date=(cause == "code"))
        staged = copy.deepcopy(source)
        record = {
            "file_path": file_path,
            "status": "failed",
            "source": source,
            "staged": staged,
            "locked_by": None,
            "error": None,
            "attempts": 0,
            "updated_at": now_iso(),
        }
        if cause == "data":
            staged["page_count"] = "4l2"  # garbled by a crashed worker
            record["status"] = "stuck"
            record["locked_by"] = "worker-3"
        problems = schema_validator.validate_record(staged, self.state["schema"])
        record["attempts"] = 1
        record["error"] = "Schema mismatch: " + "; ".join(problems) if problems else "Schema mismatch"
        self.state["ingestion"]["records"][file_path] = record
        LOG.error("Ingestion failed for %s: Schema mismatch", file_path)
        LOG.info("Schema mismatch details for %s: %s", file_path, "; ".join(problems))
        return {"file_path": file_path, "cause": cause, "error": record["error"]}, {
            "file_path": file_path,
            "cause": cause,
        }

    def _fault_verification_failure(self, body: dict) -> tuple[dict, dict]:
        cause = validate_choice(body.get("cause", "data"), "cause", ("data", "logic"))
        docs = self.state["verification"]["documents"]
        if cause == "data":
            doc_id = "doc-3"
            if doc_id not in docs:
                source = self.state["verification"]["sources"].setdefault(
                    doc_id, {"content": "Document 3", "checksum": verification.content_checksum("Document 3")}
                )
                docs[doc_id] = _doc(doc_id, "library/doc_3.pdf", source["content"], 5)
            docs[doc_id]["content"] = docs[doc_id]["content"][: len(docs[doc_id]["content"]) // 2] + "\x00<truncated>"
        else:
            doc_id = "doc-empty"
            docs[doc_id] = _doc(doc_id, "library/blank_insert.pdf", "", 0)  # a legitimately empty insert
            self.state["verification"]["sources"][doc_id] = {"content": "", "checksum": docs[doc_id]["checksum"]}
        run = self._verify()
        return {"cause": cause, "document_id": doc_id, "verification": run}, {"cause": cause, "document_id": doc_id}


def reference_record_problems(record: dict) -> list[str]:
    """Independent check of a record against the *expected* schema (used to tell data from code faults)."""
    problems = []
    for name, spec in schema_validator.EXPECTED_SCHEMA["columns"].items():
        value = record.get(name)
        if value is None:
            if spec["required"]:
                problems.append(f"{name}: required column missing")
            continue
        kind = spec["type"]
        ok = True
        if kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "text":
            ok = isinstance(value, str)
        elif kind in ("timestamp", "date"):
            try:
                (datetime if kind == "timestamp" else date).fromisoformat(value)
            except (TypeError, ValueError):
                ok = False
        if not ok:
            problems.append(f"{name}: expected {kind}, got {value!r}")
    for name in record:
        if name not in schema_validator.EXPECTED_SCHEMA["columns"]:
            problems.append(f"{name}: unexpected column")
    return problems


def document_is_intact(doc: dict) -> bool:
    """Independent integrity check of a stored document (content matches checksum, sane page count)."""
    page_count = doc.get("page_count")
    return (
        bool(doc.get("id"))
        and isinstance(page_count, int)
        and not isinstance(page_count, bool)
        and page_count >= 0
        and doc.get("checksum") == verification.content_checksum(doc.get("content", ""))
    )


def run_effect(run: dict) -> dict:
    return {
        k: run[k]
        for k in ("run_id", "file_path", "size_mb", "ok", "modeled_seconds", "timeout_seconds", "chunks")
    }


def parse_json_body(raw: bytes) -> dict:
    if not raw or not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8", "body") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "body")
    return body


# --------------------------------------------------------------------------- HTTP layer


class ServiceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, service: Service) -> None:
        self.service = service
        self.inflight = 0
        self.inflight_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request_thread(self, request, client_address) -> None:
        with self.inflight_lock:
            self.inflight += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.inflight_lock:
                self.inflight -= 1


class Handler(BaseHTTPRequestHandler):
    server_version = "sample_service/1.0"
    server: ServiceHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
        LOG.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the HTTP layer itself (bad request line, unsupported method...) as JSON too."""
        short = self.responses.get(code, ("error", ""))[0]
        data = (json.dumps({"error": message or short}) + "\n").encode("utf-8")
        self.log_error("code %d, message %s", code, message)
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "chunked bodies are not supported; send Content-Length", "Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise ApiError(400, "Content-Length is not an integer", "Content-Length") from None
        if length < 0:
            raise ApiError(400, "Content-Length is negative", "Content-Length")
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "body")
        return self.rfile.read(length)

    def _dispatch(self, method: str) -> None:
        service = self.server.service
        post = None
        try:
            split = urlsplit(self.path)
            path = split.path.rstrip("/") or "/"
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            raw = self._read_body()
            key = self.headers.get("Idempotency-Key")
            if key is not None and (not key.strip() or len(key) > 255):
                raise ApiError(400, "Idempotency-Key must be 1-255 characters", "Idempotency-Key")
            status, payload, post = service.handle(method, path, query, raw, key)
        except ApiError as exc:
            status, payload = exc.status, exc.payload()
        except Exception:
            LOG.exception("Unhandled error while handling %s %s", method, self.path)
            status, payload = 500, {"error": "internal server error (see serve.log)"}
        if method != "GET" or status >= 400:
            LOG.info("%s %s -> %d", method, self.path, status)
        self._send(status, payload)
        if post == "restart":
            service.restart_requested.set()
            threading.Thread(target=self.server.shutdown, name="restart-shutdown", daemon=True).start()

    def _send(self, status: int, payload: dict) -> None:
        data = (json.dumps(payload, sort_keys=True) + "\n").encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            LOG.debug("client went away before the response was sent")
        self.close_connection = True


# --------------------------------------------------------------------------- main


def setup_logging(state_dir: str) -> None:
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s: %(message)s")
    file_handler = logging.FileHandler(os.path.join(state_dir, SERVE_LOG), encoding="utf-8")
    file_handler.setFormatter(formatter)
    LOG.addHandler(file_handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    LOG.addHandler(stream)


def bind_server(port: int, service: Service, deadline_s: float = 10.0) -> ServiceHTTPServer:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return ServiceHTTPServer(("127.0.0.1", port), Handler, service)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sample_service: an ingestion service mendloop heals")
    parser.add_argument("--port", type=int, default=8099, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--state-dir", default="./state", help="directory for state.json, serve.log, side_effects.jsonl")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    setup_logging(state_dir)
    service = Service(state_dir, args.port)
    try:
        server = bind_server(args.port, service)
    except OSError as exc:
        LOG.error("Cannot listen on 127.0.0.1:%d: %s", args.port, exc)
        return 2
    port = server.server_address[1]
    service.port = port

    def on_sigterm(signum, frame) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    LOG.info(
        "Service started on http://127.0.0.1:%d (pid %d, boot %s, ingestion_pipeline %s)",
        port,
        os.getpid(),
        BOOT_ID,
        CODE_VERSIONS["ingestion_pipeline.py"],
    )
    print(f"sample_service listening on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except (KeyboardInterrupt, SystemExit):
        LOG.info("Service stopping (pid %d)", os.getpid())
        server.server_close()
        return 0
    # serve_forever returned: a restart was requested. Let in-flight requests finish.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        with server.inflight_lock:
            if server.inflight == 0:
                break
        time.sleep(0.01)
    server.server_close()
    if not service.restart_requested.is_set():
        return 0
    flags = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)] if hasattr(sys, "orig_argv") else []
    new_argv = [sys.executable, *flags, os.path.abspath(__file__), "--port", str(port), "--state-dir", state_dir]
    LOG.info("Re-executing: %s", " ".join(new_argv))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, new_argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
