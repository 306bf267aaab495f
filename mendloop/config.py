"""Settings: defaults < YAML file < `MENDLOOP_*` environment. Built by `app.py`, never at import time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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

    argv: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=60, gt=0)


class HttpBinding(_Strict):
    """Call an HTTP endpoint. `url`, header values and strings inside `json` are sandboxed templates."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str
    json_body: Any = Field(default=None, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)
    expect_status: list[int] = Field(default_factory=lambda: [200, 201, 202, 204])
    timeout: float = Field(default=30, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CapabilityBinding(_Strict):
    """A named operation of a target, bound to exactly one of a command or an HTTP call."""

    description: str = ""
    command: CommandBinding | None = None
    http: HttpBinding | None = None
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

    allowed_paths: list[str] = Field(default_factory=lambda: ["**"])
    forbidden_paths: list[str] = Field(default_factory=list)
    max_files: int = Field(default=10, ge=1, le=1000)
    max_changed_lines: int = Field(default=400, ge=1, le=100_000)
    tests_may_change: bool = False
    test_config_allowed: list[str] = Field(
        default_factory=list,
        description="Test-runner configuration a patch may change anyway (globs: conftest.py, pyproject.toml, ...).",
    )


class WorkOrderPolicy(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=100, description="Claims before a work order fails.")
    deadline_seconds: float | None = Field(default=None, gt=0, description="Fail a work order not done by then.")


class TargetConfig(_Strict):
    """A component mendloop acts on: its variables (for templates), repository and capabilities."""

    description: str = ""
    base_url: str | None = None
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host or host:port (no port: the scheme's default). When set, a playbook URL may take its "
        "host from event data, and every URL must reach base_url's host or one of these.",
    )
    repository: str | None = Field(default=None, description="Path of the target's git repository.")
    test_command: list[str] | None = Field(default=None, description="argv of the repository's tests.")
    test_timeout: float = Field(default=600, gt=0)
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
    patch: PatchPolicy = Field(default_factory=PatchPolicy)
    work_orders: WorkOrderPolicy = Field(default_factory=WorkOrderPolicy)
    vars: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, CapabilityBinding] = Field(default_factory=dict)


class TestReportConfig(_Strict):
    """A test runner mendloop does not recognise, and the argument that makes it write a JUnit XML report."""

    __test__ = False  # a config model, not a pytest test class

    format: Literal["junit", "none"] = "junit"
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

    initial: float = Field(default=1.0, ge=0, le=1)
    incident_weight: float = Field(default=0.25, ge=0, le=1)
    verified_fix_weight: float = Field(default=0.5, ge=0, le=1)
    failed_verification_weight: float = Field(default=0.4, ge=0, le=1)


class StormConfig(_Strict):
    """Storm control for detected events; see mendloop/domain/storm.py."""

    once_within_seconds: float = Field(
        default=600, ge=0, description="At most one new run per fingerprint in this window."
    )
    breaker_failures: int = Field(default=3, ge=1, description="Failed runs of one component that open its breaker.")
    breaker_window_seconds: float = Field(default=3600, gt=0)
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
    name: str = Field(min_length=1)
    regex: str = Field(min_length=1)

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        # The matcher compiles every pattern with Python's re as its verifier: the same rules, caught here.
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
        return value

    event_type: str = Field(default="log_pattern.error", pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
    error_type: str | None = None
    severity: Literal["info", "warning", "error", "critical"] = "error"
    component: str | None = None


class WatcherConfig(_Strict):
    """Follow log files (`tail -F`): every line is matched against the patterns; a match is a detection."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    paths: list[str] = Field(min_length=1, description="Glob patterns; relative ones are relative to the config file.")
    patterns: list[PatternConfig] = Field(min_length=1)
    component: str | None = None
    start_at: Literal["end", "beginning"] = "end"
    multiline: bool = Field(default=True, description="Group tracebacks and stack traces into one record.")
    max_line_bytes: int = Field(default=65536, ge=256)
    prefix: str | None = Field(
        default=None,
        description="A regex matching the log prefix (timestamp, level, logger, thread) at the start of a line; "
        "it is left out of the fingerprint. Default: the common formats are recognised.",
    )

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

    enabled: bool = False
    repository: str | None = Field(default=None, description="The git repository the runner patches.")
    adapter: str | None = Field(default=None, description="aider, claude, codex, openhands, command or openai.")
    argv: list[str] = Field(default_factory=list)
    test_command: list[str] | None = Field(default=None, description="Default: the work order's (the target's).")
    apply: Literal["commit", "branch", "approval"] = "commit"
    timeout: float = Field(default=1800, gt=0, description="Seconds the agent may run.")
    test_timeout: float = Field(default=600, gt=0)
    agent_id: str = Field(default="embedded", min_length=1)
    run_as: str = Field(default="auto", pattern=r"^(auto|none|\d+(:\d+)?)$", description="auto | none | UID:GID")

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> AgentRunnerConfig:
        if self.enabled and not self.repository:
            raise ValueError("an enabled agent_runner needs a repository")
        if self.enabled and not self.adapter:
            raise ValueError("an enabled agent_runner needs an adapter")
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


class HealthConfig(_Strict):
    """The write probe behind `/health`: a thread writes a heartbeat row every `probe_interval_seconds` (never on
    the request path); `/health` is degraded once the last successful write is older than `max_write_age_seconds`
    or the last attempt failed."""

    probe_interval_seconds: float = Field(default=5, gt=0, le=3600)
    max_write_age_seconds: float = Field(default=30, gt=0)


class Settings(BaseSettings):
    """mendloop's configuration. Every key can come from the YAML file given with `--config` or from
    `MENDLOOP_<KEY>` (nested keys with `__`, e.g. `MENDLOOP_TRUST__INITIAL=0.9`); the environment wins."""

    model_config = SettingsConfigDict(env_prefix="MENDLOOP_", env_nested_delimiter="__", extra="forbid")

    database_url: str = Field(default="sqlite:///./mendloop.db", description="SQLAlchemy URL of the database.")
    host: str = Field(default="127.0.0.1", description="Address `serve` listens on.")
    port: int = Field(default=8000, ge=0, le=65535)
    api_tokens: list[str] = Field(
        default_factory=list,
        description="Bearer tokens; without any, `serve` refuses non-loopback addresses.",
    )
    workers: int = Field(default=2, ge=0, description="Worker threads in `serve` / `worker`.")
    lease_seconds: float = Field(default=30, gt=0, description="How long a claimed run stays leased.")
    poll_interval: float = Field(default=0.5, gt=0, description="Idle workers look for due runs this often.")
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
    targets: dict[str, TargetConfig] = Field(default_factory=dict)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    trigger_wait_seconds: float = Field(default=30, ge=0, le=600)
    agent_lease_seconds: float = Field(
        default=120, gt=0, le=86400, description="How long a claimed work order stays leased between heartbeats."
    )
    storm: StormConfig = Field(default_factory=StormConfig)
    watchers: list[WatcherConfig] = Field(default_factory=list)
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

    @field_validator("api_tokens", "intake_tokens", "forwarder_tokens")
    @classmethod
    def _strong_tokens(cls, tokens: list[str]) -> list[str]:
        # An empty or guessable token must never pass for authentication (nor for "tokens are configured"). The
        # message names the entry, never the token.
        for i, token in enumerate(tokens):
            if not token.strip():
                raise ValueError(f"entry {i} is empty or whitespace")
            if token != token.strip() or any(c.isspace() or not c.isprintable() for c in token):
                raise ValueError(f"entry {i} contains whitespace or control characters")
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"entry {i} is shorter than {MIN_TOKEN_LENGTH} characters")
        return tokens

    @model_validator(mode="after")
    def _default_target_exists(self) -> Settings:
        if self.default_target and self.default_target not in self.targets:
            raise ValueError(f"default_target {self.default_target!r} is not among targets")
        return self

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
    return ".".join(str(p) for p in loc)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (if any), apply overrides, then the environment; raise ConfigError naming the field."""
    data: dict[str, Any] = {}
    source = str(path) if path else "<environment>"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        base = Path(path).resolve().parent
        dirs = data.get("playbook_dirs")
        if isinstance(dirs, list):
            data["playbook_dirs"] = [str(base / str(d)) for d in dirs]
        for watcher in data.get("watchers") or []:
            if isinstance(watcher, dict) and isinstance(watcher.get("paths"), list):
                watcher["paths"] = [str(base / str(p)) for p in watcher["paths"]]
        runner = data.get("agent_runner")
        if isinstance(runner, dict) and isinstance(runner.get("repository"), str):
            runner["repository"] = str(base / runner["repository"])
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
