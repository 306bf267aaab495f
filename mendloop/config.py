"""Settings: defaults < YAML file < `MENDLOOP_*` environment. Built by `app.py`, never at import time."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mendloop.domain import notifications, restart_plan, roles, test_command
from mendloop.errors import ConfigError

# Watcher event types of the spec and the error type each stands for when it triggers a run.
DEFAULT_EVENT_ERROR_TYPES: dict[str, str] = {
    "ingestion.failed": "ingestion_failed",
    "schema.invalid": "schema_invalid",
    "pipeline.timeout": "pipeline_timeout",
    "verification.failed": "verification_failed",
}


# `api_tokens` and `intake_tokens`: anything shorter is a config error.
MIN_TOKEN_LENGTH = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandBinding(_Strict):
    """Run a program. `argv` items are Jinja templates rendered in a sandbox, one item each: no shell."""

    argv: list[str] = Field(
        min_length=1,
        description="The program and its arguments, each a template over `args`, `target`, `idempotency_key`.",
    )
    cwd: str | None = Field(default=None, description="Working directory.")
    env: dict[str, str] = Field(default_factory=dict, description="Variables added to the program's environment.")
    timeout: float = Field(default=60, gt=0, description="Seconds before the program's process group is killed.")


class HttpBinding(_Strict):
    """Call an HTTP endpoint. `url`, header values and strings inside `json` are sandboxed templates."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(default="GET", description="The HTTP method.")
    url: str = Field(description="A template; its origin must be literal text or a leading `{{ target.base_url }}`.")
    json_body: Any = Field(
        default=None,
        alias="json",
        description="The JSON body (templates inside); unset: the capability's args (none for GET).",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers (values are templates).")
    expect_status: list[int] = Field(
        default_factory=lambda: [200, 201, 202, 204], description="Statuses that count as success."
    )
    timeout: float = Field(default=30, gt=0, description="Seconds the call may take.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CapabilityBinding(_Strict):
    """A named operation of a target, bound to exactly one of a command or an HTTP call."""

    description: str = Field(default="", description="Free text, for people.")
    command: CommandBinding | None = Field(default=None, description="Run a program (exactly one of command or http).")
    http: HttpBinding | None = Field(
        default=None, description="Call an HTTP endpoint (exactly one of command or http)."
    )
    expect: str | None = Field(
        default=None,
        description="When the call succeeded, by the service's own answer: an expression over `result` "
        "(e.g. `result.json.db_connected`). Unset: the exit code or the HTTP status decides.",
    )
    outputs: dict[str, str] = Field(
        default_factory=dict,
        description="The normalised outputs playbooks read as `result.outputs.<name>`: name -> expression over "
        "`result` (e.g. connected: result.json.db_connected). A JSON object answer gives its keys by default.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> CapabilityBinding:
        if (self.command is None) == (self.http is None):
            raise ValueError("a capability binds exactly one of 'command' or 'http'")
        return self


class PatchPolicy(_Strict):
    """What an agent's patch to a target's repository may touch. `forbidden_paths` adds to the built-in list
    (CI config, lock files, secrets, mendloop's own config)."""

    allowed_paths: list[str] = Field(
        default_factory=lambda: ["**"], description="Globs a patch may change; anything else is refused."
    )
    forbidden_paths: list[str] = Field(
        default_factory=list, description="Globs a patch may never change, beside the built-in list."
    )
    max_files: int = Field(default=10, ge=1, le=1000, description="Files one patch may change.")
    max_changed_lines: int = Field(
        default=400, ge=1, le=100_000, description="Lines one patch may add and remove together."
    )
    tests_may_change: bool = Field(default=False, description="Whether a patch may change test files.")
    test_config_allowed: list[str] = Field(
        default_factory=list,
        description="Test-runner configuration a patch may change anyway (globs: conftest.py, pyproject.toml, ...).",
    )


class WorkOrderPolicy(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=100, description="Claims before a work order fails.")
    deadline_seconds: float | None = Field(default=None, gt=0, description="Fail a work order not done by then.")


def _http_url(url: str | None) -> str | None:
    if url is not None and re.match(r"https?://[^/\s]+", url) is None:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


class ProcessRuns(_Strict):
    """A process mendloop starts and supervises itself: detached (its own session; it outlives mendloop), its
    pid in `pidfile`, its output appended to `log`. On mendloop's own restart the pid in the pidfile is adopted
    when that process is alive and its command line is `argv`; a restart is SIGTERM to its process group,
    `stop_timeout` seconds, SIGKILL, then `argv` again."""

    argv: list[str] = Field(min_length=1, description="The program and its arguments (no shell).")
    cwd: str | None = Field(default=None, description="Working directory; relative to the config file.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Variables over a clean environment (PATH, HOME, LANG, LC_*, TZ, USER from mendloop's; never "
        "MENDLOOP_* or mendloop's other secrets).",
    )
    health_url: str | None = Field(default=None, description="Polled after a start until it answers 2xx.")
    pidfile: str | None = Field(
        default=None,
        description="Relative to the config file. Default: $XDG_STATE_HOME/mendloop/supervised/<target>-<hash of "
        "argv and cwd>.pid (~/.local/state when unset).",
    )
    log: str | None = Field(
        default=None,
        description="stdout and stderr are appended here; relative to the config file. Default: beside the pidfile.",
    )
    stop_timeout: float = Field(default=10, gt=0, le=3600, description="Seconds between SIGTERM and SIGKILL.")

    @field_validator("argv")
    @classmethod
    def _non_empty_items(cls, argv: list[str]) -> list[str]:
        if any(not a or "\x00" in a for a in argv):
            raise ValueError("argv items must be non-empty strings without NUL")
        return argv

    @field_validator("health_url")
    @classmethod
    def _health_is_http(cls, value: str | None) -> str | None:
        return _http_url(value)


class SystemdRuns(_Strict):
    """A systemd unit: `systemctl [--user] restart -- UNIT`, then `systemctl [--user] is-active -- UNIT`."""

    unit: str = Field(description="The unit's name, e.g. importer.service.")
    user: bool = Field(default=False, description="The user's service manager (--user), not the system's.")

    @field_validator("unit")
    @classmethod
    def _unit_name(cls, value: str) -> str:
        return restart_plan.check_unit(value)


class DockerRuns(_Strict):
    """A container: `docker restart -- CONTAINER`, then `docker inspect` until healthy (or running)."""

    container: str = Field(description="The container's name or id.")

    @field_validator("container")
    @classmethod
    def _container_name(cls, value: str) -> str:
        return restart_plan.check_container(value)


class KubernetesRuns(_Strict):
    """A deployment: `kubectl rollout restart deployment/NAME`, then `kubectl rollout status` (which waits)."""

    deployment: str = Field(description="The deployment's name.")
    namespace: str = Field(default="default")
    context: str | None = Field(default=None, description="The kubeconfig context (default: kubectl's current).")

    @field_validator("deployment")
    @classmethod
    def _deployment_name(cls, value: str) -> str:
        return restart_plan.check_deployment(value)

    @field_validator("namespace")
    @classmethod
    def _namespace_name(cls, value: str) -> str:
        return restart_plan.check_namespace(value)

    @field_validator("context")
    @classmethod
    def _context_name(cls, value: str | None) -> str | None:
        return None if value is None else restart_plan.check_context(value)


class RunsConfig(_Strict):
    """How a target runs: exactly one of `process`, `systemd`, `docker`, `kubernetes`. With it mendloop provides
    the `restart` capability (and `deploy`, unless bound: the same restart) and waits for health afterwards;
    with a health URL it also provides `health` (a GET of it), unless bound. README: Restarting a target."""

    process: ProcessRuns | None = None
    systemd: SystemdRuns | None = None
    docker: DockerRuns | None = None
    kubernetes: KubernetesRuns | None = None
    health_url: str | None = Field(
        default=None, description="Answers 2xx when the target is up: awaited after every restart (any kind)."
    )
    ready_timeout: float = Field(
        default=60, gt=0, le=3600, description="Seconds a restart may take to become healthy before it fails."
    )

    @field_validator("health_url")
    @classmethod
    def _health_is_http(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> RunsConfig:
        kinds = [k for k in ("process", "systemd", "docker", "kubernetes") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("runs takes exactly one of process, systemd, docker, kubernetes")
        if self.process is not None and self.process.health_url and self.health_url:
            raise ValueError("set health_url once: in runs or in runs.process")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("process", "systemd", "docker", "kubernetes") if getattr(self, k) is not None)

    @property
    def health(self) -> str | None:
        return self.health_url or (self.process.health_url if self.process is not None else None)


def _test_env_name(name: str) -> str:
    problem = test_command.env_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def _test_env_value(value: str) -> str:
    problem = test_command.env_value_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _test_cwd(cwd: str | None) -> str | None:
    problem = None if cwd is None else test_command.cwd_problem(cwd)
    if problem is not None:
        raise ValueError(problem)
    return test_command.normal_cwd(cwd)


# The rules are domain/test_command.py's; a bad name is reported at targets.X.test_env.NAME (see `_where`).
TestEnv = dict[Annotated[str, AfterValidator(_test_env_name)], Annotated[str, AfterValidator(_test_env_value)]]
TestCwd = Annotated[str | None, AfterValidator(_test_cwd)]


class TargetConfig(_Strict):
    """A component mendloop acts on: its variables (for templates), repository and capabilities."""

    description: str = Field(default="", description="Free text, for people.")
    base_url: str | None = Field(
        default=None,
        description="The origin templates read as `{{ target.base_url }}`, trusted with a URL's scheme, host and port.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host or host:port (no port: the scheme's default). When set, a playbook URL may take its "
        "host from event data, and every URL must reach base_url's host or one of these.",
    )
    repository: str | None = Field(
        default=None, description="Path of the target's git repository; relative to the config file."
    )
    test_command: list[str] | None = Field(default=None, description="argv of the repository's tests.")
    test_env: TestEnv = Field(default_factory=dict, description="Variables added to the test process's environment.")
    test_cwd: TestCwd = Field(default=None, description="Where the tests run, relative to the repository's root.")
    test_timeout: float = Field(default=600, gt=0, description="Seconds the test command may run.")
    report: TestReportConfig | Literal["none"] | None = Field(
        default=None,
        description="How the test command reports each test (see README, How patches are tested). Unset: pytest "
        "and `python -m unittest` are recognised, anything else is judged by its exit code; `none`: the exit code "
        "only; {format: junit, path_arg: '--junit-xml={path}'}: the argument that makes it write JUnit XML.",
    )
    failing_tests: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Tests a patch must make pass (FAIL_TO_PASS), added to those a work order names.",
    )
    patch: PatchPolicy = Field(
        default_factory=PatchPolicy, description="What an agent's patch to the repository may touch."
    )
    work_orders: WorkOrderPolicy = Field(
        default_factory=WorkOrderPolicy, description="Attempts and deadline of this target's work orders."
    )
    vars: dict[str, Any] = Field(default_factory=dict, description="Variables templates read as `target.vars.<name>`.")
    capabilities: dict[str, CapabilityBinding] = Field(
        default_factory=dict, description="Capability name -> the command or HTTP call that performs it on this target."
    )
    runs: RunsConfig | None = Field(
        default=None,
        description="How the target runs (process, systemd, docker or kubernetes): mendloop then provides "
        "`restart`, `deploy` and `health` unless `capabilities` binds them.",
    )


class TestReportConfig(_Strict):
    """A test runner mendloop does not recognise, and the argument that makes it write a JUnit XML report."""

    __test__ = False  # a config model, not a pytest test class

    format: Literal["junit", "none"] = Field(
        default="junit",
        description="junit: the runner writes JUnit XML where `path_arg` says; none: the exit code only.",
    )
    path_arg: str | None = Field(
        default=None, description="One argument appended to the test command; {path} becomes the report's path."
    )

    @model_validator(mode="after")
    def _path_arg_names_the_path(self) -> TestReportConfig:
        if self.format == "junit" and (self.path_arg is None or "{path}" not in self.path_arg):
            raise ValueError("report.path_arg must contain {path} (e.g. --junit-xml={path})")
        return self


class TrustConfig(_Strict):
    """Trust moves toward 0 on an incident or failed verification, toward 1 on a verified fix.

    new = old + weight * (goal - old), goal 0 or 1; always within [0, 1].
    """

    initial: float = Field(default=1.0, ge=0, le=1, description="A component's trust before anything happened to it.")
    incident_weight: float = Field(default=0.25, ge=0, le=1, description="How far an incident moves trust toward 0.")
    verified_fix_weight: float = Field(
        default=0.5, ge=0, le=1, description="How far a verified fix moves trust toward 1."
    )
    failed_verification_weight: float = Field(
        default=0.4, ge=0, le=1, description="How far a failed verification moves trust toward 0."
    )


class StormConfig(_Strict):
    """Storm control for detected events; see mendloop/domain/storm.py."""

    once_within_seconds: float = Field(
        default=600, ge=0, description="At most one new run per fingerprint in this window."
    )
    breaker_failures: int = Field(default=3, ge=1, description="Failed runs of one component that open its breaker.")
    breaker_window_seconds: float = Field(
        default=3600, gt=0, description="The window in which `breaker_failures` failed runs open the breaker."
    )
    max_concurrent_runs: int = Field(
        default=32, ge=0, description="Runs executing at once; 0: no cap. Extra runs wait."
    )
    mutex_per_component: bool = Field(default=True, description="Runs for one component never execute concurrently.")
    # A storm of distinct errors (each its own fingerprint) passes the per-fingerprint throttle: these cap how many
    # new runs detections may start per fixed window; the overflow is recorded as incidents without runs.
    new_runs_window_seconds: float = Field(
        default=60, gt=0, description="The fixed window the two caps below count new runs in."
    )
    max_new_runs_per_window: int = Field(
        default=100, ge=0, description="New runs detections may start per window, all components; 0: no cap."
    )
    max_new_runs_per_component: int = Field(
        default=20, ge=0, description="New runs detections may start per window for one component; 0: no cap."
    )


class PatternConfig(_Strict):
    name: str = Field(min_length=1, description="The pattern's name (`event.pattern`).")
    regex: str = Field(min_length=1, description="A Python regex; its named groups become fields of the event.")

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        # The matcher compiles every pattern with Python's re as its verifier: the same rules, caught here.
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
        return value

    event_type: str = Field(
        default="log_pattern.error",
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$",
        description="The event type of its detections (dotted, lowercase).",
    )
    error_type: str | None = Field(
        default=None,
        description="The error type its detections route by (else the event type's, from `event_error_types`).",
    )
    severity: Literal["info", "warning", "error", "critical"] = Field(
        default="error", description="The severity of its detections."
    )
    component: str | None = Field(
        default=None, description="The component its detections concern (over the watcher's)."
    )


class ContextLinesConfig(_Strict):
    """The log lines around a detection that reach its work order (`log_lines`): up to `before` lines of the same
    file before the record that matched, and up to `after` lines after it. 0 turns either off."""

    before: int = Field(default=20, ge=0, le=200, description="Lines of the same file before the record.")
    after: int = Field(default=5, ge=0, le=200, description="Lines after it, added to the stored event as they come.")
    idle_seconds: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Stop waiting for the after-lines once the file has been quiet this long: the detection itself "
        "never waits, only the lines added to it later.",
    )


class WatcherConfig(_Strict):
    """Follow log files (`tail -F`): every line is matched against the patterns; a match is a detection."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The watcher's name (its checkpoints are kept under it).",
    )
    paths: list[str] = Field(min_length=1, description="Glob patterns; relative ones are relative to the config file.")
    patterns: list[PatternConfig] = Field(min_length=1, description="What to look for in each line.")
    component: str | None = Field(
        default=None, description="The component its detections concern, unless a pattern names one."
    )
    start_at: Literal["end", "beginning"] = Field(
        default="end", description="Where a file never seen before is read from."
    )
    multiline: bool = Field(default=True, description="Group tracebacks and stack traces into one record.")
    max_line_bytes: int = Field(default=65536, ge=256, description="Longer lines are cut to this many bytes.")
    prefix: str | None = Field(
        default=None,
        description="A regex matching the log prefix (timestamp, level, logger, thread) at the start of a line; "
        "it is left out of the fingerprint. Default: the common formats are recognised.",
    )
    context_lines: ContextLinesConfig = Field(
        default_factory=ContextLinesConfig,
        description="Lines of the same file before and after a detection, kept for its work order; "
        "a number N means N of each, 0 turns it off.",
    )

    @field_validator("context_lines", mode="before")
    @classmethod
    def _context_lines_number(cls, value: Any) -> Any:
        # `context_lines: 0` (or N): the same number before and after. A bool is not a number of lines.
        if isinstance(value, int) and not isinstance(value, bool):
            return {"before": value, "after": value}
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return value


# The coding agent adapters `agent_runner.adapter` may name. Settings are checked when loaded, below the agents
# package that implements them; its registry refuses an adapter that is not listed here.
AGENT_ADAPTERS = frozenset({"aider", "claude", "codex", "openhands", "command", "openai"})


class AgentRunnerConfig(_Strict):
    """The agent runner embedded in `serve` (the same runner as `mendloop agent`), claiming from the server's own
    URL on the loopback. `repository` is relative to the config file; `argv` goes to the adapter as the argv after
    `--` on `mendloop agent` (the program itself for `command`: give absolute paths, it runs in a worktree)."""

    enabled: bool = Field(default=False, description="Run the agent runner inside `serve`.")
    repository: str | None = Field(default=None, description="The git repository the runner patches.")
    adapter: str | None = Field(default=None, description="aider, claude, codex, openhands, command or openai.")
    argv: list[str] = Field(
        default_factory=list, description="The argv after `--` of `mendloop agent` (for `command`: the program itself)."
    )
    test_command: list[str] | None = Field(default=None, description="Default: the work order's (the target's).")
    test_env: TestEnv = Field(default_factory=dict, description="With test_command: its extra environment.")
    test_cwd: TestCwd = Field(default=None, description="With test_command: where it runs in the worktree.")
    apply: Literal["commit", "branch", "approval"] = Field(
        default="commit", description="How a verified patch lands: commit, branch (for review) or approval."
    )
    timeout: float = Field(default=1800, gt=0, description="Seconds the agent may run.")
    test_timeout: float = Field(default=600, gt=0, description="Seconds the test command may run.")
    agent_id: str = Field(
        default="embedded", min_length=1, description="The runner's name on the work orders it claims."
    )
    run_as: str = Field(default="auto", pattern=r"^(auto|none|\d+(:\d+)?)$", description="auto | none | UID:GID")

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> AgentRunnerConfig:
        if self.enabled and not self.repository:
            raise ValueError("an enabled agent_runner needs a repository")
        if self.enabled and not self.adapter:
            raise ValueError("an enabled agent_runner needs an adapter")
        if (self.test_env or self.test_cwd) and not self.test_command:
            raise ValueError("agent_runner.test_env and test_cwd go with its own test_command")
        if self.adapter and self.adapter not in AGENT_ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; known: {', '.join(sorted(AGENT_ADAPTERS))}")
        return self


class LimitsConfig(_Strict):
    """What one request may carry. A body over its size cap is a 413, a body nested too deep or a string too long
    a 422; each answer names the limit (`limits.<key>`) and its value."""

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Bytes in a request body (most routes).")
    max_intake_body_bytes: int = Field(
        default=32 << 20, ge=1024, description="Bytes in a POST /events body (batches of up to 10,000 events)."
    )
    max_diff_body_bytes: int = Field(
        default=32 << 20, ge=1024, description="Bytes in a work order's complete body (it carries the diff)."
    )
    max_json_depth: int = Field(default=64, ge=8, le=256, description="Nesting of arrays and objects in any JSON body.")
    max_string_chars: int = Field(
        default=1 << 20,
        ge=256,
        description="Characters in one string (or key) of a JSON body; the diff has its own bound (5,000,000).",
    )
    # What the server holds at once (`serve` passes the first three to uvicorn).
    max_connections: int = Field(
        default=1000, ge=1, description="Connections and requests in flight; beyond it a request gets a 503."
    )
    keep_alive_timeout_seconds: int = Field(default=5, ge=1, description="An idle kept-alive connection is closed.")
    header_timeout_seconds: float = Field(
        default=10, gt=0, description="A connection whose request headers are not complete by then is closed."
    )
    max_sse_streams: int = Field(default=200, ge=1, description="Open GET /events/stream streams, all clients.")
    max_sse_streams_per_client: int = Field(
        default=5, ge=1, description="Open GET /events/stream streams per client (its token, else its address)."
    )
    sse_keepalive_seconds: float = Field(
        default=15,
        gt=0,
        le=3600,
        description="GET /events/stream sends a `: keepalive` comment this often, so proxies keep an idle stream.",
    )


class HealthConfig(_Strict):
    """The write probe behind `/health`: a thread writes a heartbeat row every `probe_interval_seconds` (never on
    the request path); `/health` is degraded once the last successful write is older than `max_write_age_seconds`
    or the last attempt failed."""

    probe_interval_seconds: float = Field(
        default=5, gt=0, le=3600, description="How often the heartbeat row is written."
    )
    max_write_age_seconds: float = Field(
        default=30, gt=0, description="/health is degraded once the last successful write is older than this."
    )


class StatsConfig(_Strict):
    """The statistics' aggregates: state changes add delta rows, folded into totals by a housekeeping job."""

    fold_interval_seconds: float = Field(
        default=10, gt=0, le=86400, description="How often unfolded statistics deltas are folded into their totals."
    )


class RetentionConfig(_Strict):
    """Pruning by itself (what `mendloop db prune` does), as a housekeeping job of `serve` and `worker`. Off
    until a number of days is set. Statistics are aggregates and stay whole."""

    runs_days: float | None = Field(
        default=None,
        gt=0,
        description="Finished runs older than this many days go, with their steps, events, "
        "trust history and finished work orders (unset: kept).",
    )
    events_days: float | None = Field(
        default=None,
        gt=0,
        description="Events older than this many days go, except those of live runs and those "
        "a cursor still needs (unset: kept).",
    )
    audit_days: float | None = Field(
        default=None, gt=0, description="Audit log rows older than this many days go (unset: kept)."
    )
    interval_seconds: float = Field(default=3600, gt=0, description="How often the prune runs.")
    batch: int = Field(default=500, ge=1, le=100_000, description="Runs (or events) deleted per transaction.")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str) -> tuple[str, tuple[str, ...]]:
    """`text` with each `${NAME}` replaced by that environment variable, and the values put in (for redaction).
    A variable unset or empty is an error naming it, never the text (it may hold other secrets)."""
    values: list[str] = []

    def value(m: re.Match[str]) -> str:
        found = os.environ.get(m.group(1))
        if not found:
            raise ValueError(f"the environment variable {m.group(1)} is not set (or empty)")
        values.append(found)
        return found

    return _ENV_REF.sub(value, text), tuple(values)


class NotifyTarget(_Strict):
    """Where notifications go: an Apprise URL (Slack, Teams, Discord, email, PagerDuty, ntfy, json://, ...) and
    which events it wants. A new target starts at the newest event: it is never sent the history before it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,100}$", description="The target's name (its cursor, metrics).")
    url: str = Field(
        description="An Apprise URL; `${NAME}` is replaced by that environment variable when the config is loaded "
        "(secrets stay out of the file). Only this text, never the expanded URL, is shown or stored.",
    )
    event_types: list[str] = Field(
        default_factory=list, description="Globs of event types (`self_healing.*`); empty: every type."
    )
    components: list[str] = Field(default_factory=list, description="Components to notify about; empty: every one.")
    min_severity: Literal["info", "warning", "error", "critical"] = Field(
        default="info", description="The least severity sent (domain/notifications.py maps events to severities)."
    )
    # The URL with the environment put in, and the values put in (redacted from any error shown): never dumped.
    _expanded: str = PrivateAttr(default="")
    _secrets: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("url")
    @classmethod
    def _apprise_url(cls, url: str) -> str:
        import apprise

        expanded, _ = expand_env(url)
        if apprise.Apprise.instantiate(expanded) is None:
            scheme = url.split("://", 1)[0] if "://" in url else url[:20]
            raise ValueError(f"Apprise can't use this URL (scheme {scheme!r} unknown, or the URL is incomplete)")
        return url

    @field_validator("event_types")
    @classmethod
    def _globs(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            problem = notifications.glob_problem(glob)
            if problem is not None:
                raise ValueError(problem)
        return globs

    def model_post_init(self, context: Any, /) -> None:
        self._expanded, self._secrets = expand_env(self.url)

    @property
    def expanded_url(self) -> str:
        return self._expanded

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets


class NotifySettings(_Strict):
    """How notifications are delivered: from the events table by a durable cursor per target, at least once."""

    public_url: str | None = Field(
        default=None,
        description="The address users reach mendloop by (https://mendloop.example.com): run links are made "
        "absolute under it. Unset: links are paths (/patches/runs/ID).",
    )
    poll_interval_seconds: float = Field(default=1, gt=0, le=300, description="How often new events are looked for.")
    attempt_timeout_seconds: float = Field(
        default=5, gt=0, le=300, description="Connect and read timeout of one delivery attempt."
    )
    retry_base_seconds: float = Field(default=2, gt=0, le=3600, description="The wait after a first failed attempt.")
    retry_max_seconds: float = Field(default=300, gt=0, le=86400, description="The longest wait between attempts.")
    max_attempts: int = Field(
        default=8, ge=1, le=1000, description="Attempts at one event before it is counted dropped and skipped."
    )
    lease_seconds: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="A target is delivered by one process at a time (serve, a worker): its lease lapses this long "
        "after that process stops renewing it (a crash).",
    )

    @field_validator("public_url")
    @classmethod
    def _public_is_http(cls, value: str | None) -> str | None:
        return _http_url(value)


def _token_problem(token: str) -> str | None:
    """Why a configured token is too weak to stand for a caller (None: it is not). Never names the token."""
    if not token.strip():
        return "is empty or whitespace"
    if token != token.strip() or any(c.isspace() or not c.isprintable() for c in token):
        return "contains whitespace or control characters"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"is shorter than {MIN_TOKEN_LENGTH} characters"
    return None


RoleName = Literal["viewer", "operator", "agent", "intake", "admin"]


class TokenConfig(_Strict):
    """A bearer token from the configuration, with its role (`mendloop tokens create` keeps them, hashed, in the
    database instead)."""

    name: str = Field(min_length=1, max_length=200, description="Who the token stands for, in the audit log.")
    token: str = Field(
        repr=False, description="The secret (at least 16 characters); from the environment, not a file in git."
    )
    role: RoleName = Field(description="viewer, operator, agent, intake or admin.")
    repositories: list[str] = Field(
        default_factory=list,
        description="An agent token: the repositories (work orders' `repository`) it may work for; `*`: all.",
    )

    @field_validator("token")
    @classmethod
    def _strong(cls, token: str) -> str:
        problem = _token_problem(token)
        if problem:
            raise ValueError(f"the token {problem}")
        return token

    @model_validator(mode="after")
    def _scope(self) -> TokenConfig:
        problem = roles.spec_problem(self.role, self.repositories)
        if problem:
            raise ValueError(problem)
        return self


def _unique_names(tokens: list[TokenConfig]) -> list[TokenConfig]:
    names = [t.name for t in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two tokens are named {name!r}")
    return tokens


class ControlConfig(_Strict):
    """Human control: how much mendloop may do on its own."""

    trust_gates: dict[str, float] = Field(
        default_factory=dict,
        description="component -> trust level (0 to 1) below which its `destructive: true` steps and its patch "
        "applies wait for an operator's approval; at or above it they run on their own. `*`: every other component.",
    )
    dry_run: bool = Field(
        default=False,
        description="Every new run renders and records its steps, executes none, and ends as `dry_run` (a playbook's "
        "own `dry_run: true` does it for that playbook).",
    )
    shutdown_timeout_seconds: float = Field(
        default=20,
        ge=0,
        le=3600,
        description="On SIGTERM, `serve` and `worker` stop claiming and let the steps in flight finish this long; "
        "then the runs they hold are handed back (their leases released) for another worker.",
    )
    approval_timeout_seconds: float | None = Field(
        default=None, gt=0, description="Deadline of a trust gate's approval (none: it waits); `on_timeout` is reject."
    )

    @field_validator("trust_gates")
    @classmethod
    def _gates(cls, value: dict[str, float]) -> dict[str, float]:
        for name, gate in value.items():
            if not 0 <= gate <= 1:
                raise ValueError(f"{name}: a trust gate is between 0 and 1")
        return value

    def gate_for(self, component: str | None) -> float | None:
        if component and component in self.trust_gates:
            return self.trust_gates[component]
        return self.trust_gates.get("*")


class Settings(BaseSettings):
    """mendloop's configuration. Every key can come from the YAML file given with `--config` or from
    `MENDLOOP_<KEY>` (nested keys with `__`, e.g. `MENDLOOP_TRUST__INITIAL=0.9`); the environment wins."""

    model_config = SettingsConfigDict(env_prefix="MENDLOOP_", env_nested_delimiter="__", extra="forbid")

    database_url: str = Field(default="sqlite:///./mendloop.db", description="SQLAlchemy URL of the database.")
    host: str = Field(default="127.0.0.1", description="Address `serve` listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `serve` listens on (0: any free port).")
    root_path: str = Field(
        default="",
        description="The path prefix a reverse proxy serves mendloop under (`/mendloop`); the proxy strips it "
        "before forwarding. Links and the docs then carry it.",
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        description="Addresses (or CIDRs) of the reverse proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` "
        "are believed: the client address (stream caps, the audit log) and the scheme come from them. Empty: "
        "those headers are ignored.",
    )
    api_tokens: list[str] = Field(
        default_factory=list,
        description="Admin bearer tokens (see `tokens` for others); with no token in the config or the "
        "database, `serve` is open on loopback and refuses other addresses.",
    )
    tokens: Annotated[list[TokenConfig], AfterValidator(_unique_names)] = Field(
        default_factory=list, description="Bearer tokens with a role: `{name, token, role, repositories}`."
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes `serve` answers the API with, on one listening socket: the first runs the workers, "
        "watchers and notifier too, the others only the API. More than one pays off when reads keep one core "
        "busy; the stream caps (`limits.max_sse_streams`) are per process.",
    )
    workers: int = Field(default=2, ge=0, description="Worker threads in `serve` / `worker`.")
    lease_seconds: float = Field(default=30, gt=0, description="How long a claimed run stays leased.")
    poll_interval: float = Field(default=0.5, gt=0, description="Idle workers look for due runs this often.")
    cancel_poll_seconds: float = Field(
        default=1,
        gt=0,
        le=60,
        description="Workers check this often whether a run they execute was cancelled "
        "(by any process: the database is what they share); a cancelled step is stopped then.",
    )
    playbook_dirs: list[Path] = Field(
        default_factory=list,
        description="Extra directories of playbook YAML files (override built-ins by id).",
    )
    routing: dict[str, str] = Field(
        default_factory=dict,
        description="error type (or dotted event type) -> playbook id, over the routes the playbooks' `handles` "
        "claim; settles a type two playbooks claim.",
    )
    event_error_types: dict[str, str] = Field(
        default_factory=dict, description="event type -> error type; merged over the defaults."
    )
    default_target: str | None = Field(default=None, description="Target used when a playbook names none.")
    targets: dict[str, TargetConfig] = Field(
        default_factory=dict,
        description="The components mendloop acts on, by name: their variables, repository, tests and capabilities.",
    )
    trust: TrustConfig = Field(
        default_factory=TrustConfig, description="How incidents and verified fixes move a component's trust score."
    )
    control: ControlConfig = Field(
        default_factory=ControlConfig, description="Human control: trust gates in front of destructive steps."
    )
    trigger_wait_seconds: float = Field(
        default=30,
        ge=0,
        le=600,
        description="How long POST /patches/trigger waits for the run to settle before it answers.",
    )
    agent_lease_seconds: float = Field(
        default=120, gt=0, le=86400, description="How long a claimed work order stays leased between heartbeats."
    )
    storm: StormConfig = Field(
        default_factory=StormConfig, description="Storm control for detections: throttling, circuit breakers, run caps."
    )
    watchers: list[WatcherConfig] = Field(
        default_factory=list, description="Log files to follow and the patterns whose matches start runs."
    )
    intake_tokens: list[str] = Field(
        default_factory=list, description="Bearer tokens accepted by POST /events (webhooks, forwarders)."
    )
    forwarder_tokens: list[str] = Field(
        default_factory=list,
        description="Intake tokens of forwarders (`mendloop watch`): accepted by POST /events, and the only callers "
        "whose `fingerprint` is used (others get the server's own).",
    )
    trust_caller_fingerprint: bool = Field(
        default=False, description="Use the `fingerprint` of every POST /events caller, not only forwarders'."
    )
    webhook_hmac_secret: str | None = Field(
        default=None,
        description="Accept POST /events signed with X-Mendloop-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "
        "'<t>.' + body>.",
    )
    webhook_tolerance_seconds: float = Field(
        default=300,
        gt=0,
        le=3600,
        description="How far a signed webhook's timestamp may be from the server's clock (either way); a signature "
        "seen before within it gets the stored answer.",
    )
    secret_patterns: list[str] = Field(
        default_factory=list,
        description="Extra regexes whose matches are redacted from everything mendloop stores, answers or hands to "
        "an agent (beside detect-secrets' rules and mendloop's own); a named group `v` masks only that group.",
    )
    agent_runner: AgentRunnerConfig = Field(
        default_factory=AgentRunnerConfig, description="The agent runner embedded in `serve` (off by default)."
    )
    sandbox: Literal["auto", "bwrap", "off"] = Field(
        default="auto",
        description="Where agent and test processes run: auto (bubblewrap when it works here, else a uid drop with "
        "a warning at startup), bwrap (bubblewrap or refuse to start), off (the uid drop only).",
    )
    bwrap: str | None = Field(
        default=None, description="Path of bubblewrap's `bwrap` (default: found on PATH); for `sandbox`."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Request body size, nesting and string length caps; connections."
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="The write probe behind /health.")
    stats: StatsConfig = Field(default_factory=StatsConfig, description="The statistics' aggregates.")
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="Pruning old finished runs and events by itself."
    )
    notify: list[NotifyTarget] = Field(
        default_factory=list, description="Notification targets (Apprise URLs), each with a filter of events."
    )
    notify_settings: NotifySettings = Field(
        default_factory=NotifySettings, description="Delivery of notifications: retries, timeouts, run links."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must override it.
        return env_settings, init_settings

    @field_validator("default_target")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("root_path")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        # A prefix goes into every link the browser follows: only plain segments, no dot-segments, no slash at
        # the end (uvicorn joins it to the path, which starts with one).
        if (value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value)) or any(
            seg in (".", "..") for seg in value.split("/")
        ):
            raise ValueError("a path prefix like /mendloop: segments of letters, digits, . _ ~ -, no trailing /")
        return value

    @field_validator("api_tokens", "intake_tokens", "forwarder_tokens")
    @classmethod
    def _strong_tokens(cls, tokens: list[str]) -> list[str]:
        # An empty or guessable token must never pass for authentication (nor for "tokens are configured"). The
        # message names the entry, never the token.
        for i, token in enumerate(tokens):
            problem = _token_problem(token)
            if problem:
                raise ValueError(f"entry {i} {problem}")
        return tokens

    @model_validator(mode="after")
    def _default_target_exists(self) -> Settings:
        if self.default_target and self.default_target not in self.targets:
            raise ValueError(f"default_target {self.default_target!r} is not among targets")
        return self

    @field_validator("notify")
    @classmethod
    def _unique_notify_names(cls, targets: list[NotifyTarget]) -> list[NotifyTarget]:
        names = [t.name for t in targets]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two targets are named {name!r} (the name keys its cursor)")
        return targets

    def event_error_table(self) -> dict[str, str]:
        return {**DEFAULT_EVENT_ERROR_TYPES, **self.event_error_types}

    def target_for(self, name: str | None) -> str | None:
        if name:
            return name
        if self.default_target:
            return self.default_target
        if len(self.targets) == 1:
            return next(iter(self.targets))
        return None


def _where(loc: tuple[int | str, ...]) -> str:
    # pydantic puts a mapping key's own error at (..., KEY, "[key]"): the field is the key's path.
    # A key that is not a plain word (a newline, a space, nothing) is quoted, so the message stays one line.
    return ".".join(_part(p) for p in loc if p != "[key]")


def _part(p: int | str) -> str:
    text = str(p)
    return text if text and text.isprintable() and " " not in text and "." not in text else repr(text)


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem and line (a parser error), or its reason and character position (a
    reader error: a control character, bad UTF-8). str(exc) spans several lines, with the offending snippet."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"{exc.reason} at character {exc.position}"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem}{where}"


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply overrides, then the environment; raise ConfigError naming the field."""
    data: dict[str, Any] = {}
    source = str(path) if path else "<environment>"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        for key in loaded:
            if not isinstance(key, str):
                raise ConfigError(f"{path}: {key!r}: a setting's name is a string", field=repr(key))
        data = loaded
        base = Path(path).resolve().parent
        dirs = data.get("playbook_dirs")
        if isinstance(dirs, list):
            data["playbook_dirs"] = [str(base / str(d)) for d in dirs]
        watchers = data.get("watchers")
        for watcher in watchers if isinstance(watchers, list) else []:
            if isinstance(watcher, dict) and isinstance(watcher.get("paths"), list):
                watcher["paths"] = [str(base / str(p)) for p in watcher["paths"]]
        runner = data.get("agent_runner")
        if isinstance(runner, dict) and isinstance(runner.get("repository"), str):
            runner["repository"] = str(base / runner["repository"])
        targets = data.get("targets")
        for target in targets.values() if isinstance(targets, dict) else []:
            if isinstance(target, dict) and isinstance(target.get("repository"), str):
                # Like agent_runner.repository: the same file means the same repository from any directory.
                target["repository"] = str(base / target["repository"])
            runs = target.get("runs") if isinstance(target, dict) else None
            process = runs.get("process") if isinstance(runs, dict) else None
            if isinstance(process, dict):
                for key in ("cwd", "pidfile", "log"):
                    if isinstance(process.get(key), str):
                        process[key] = str(base / process[key])
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = [f"{source}: {_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        first = _where(exc.errors()[0]["loc"])
        raise ConfigError(problems[0], problems=problems, field=first) from exc
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return settings
    # Command-line options beat the environment, which beats the file: validate the merged values once more
    # without letting the environment take them back.
    try:
        merged = _FileOnly(**{**settings.model_dump(), **given})
    except ValidationError as exc:
        problems = [f"command line: {_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(problems[0], problems=problems, field=_where(exc.errors()[0]["loc"])) from exc
    return Settings.model_construct(**{name: getattr(merged, name) for name in Settings.model_fields})


class _FileOnly(Settings):
    """The same schema, validating what it is given and reading no environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def config_json_schema() -> str:
    return json.dumps(Settings.model_json_schema(), indent=2)
