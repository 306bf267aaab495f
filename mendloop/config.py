"""Settings: defaults < YAML file < `MENDLOOP_*` environment. Built by `app.py`, never at import time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mendloop.errors import ConfigError

# The spec's error types and the playbook each one runs. Overridable (and extendable) with `routing:`.
DEFAULT_ROUTING: dict[str, str] = {
    "database_connection": "database_reconnect",
    "pipeline_timeout": "pipeline_timeout_fix",
    "timeout": "pipeline_timeout_fix",
    "verification_failed": "verification_fix",
    "validation_failed": "verification_fix",
    "schema_mismatch": "ingestion_replay",
    "ingestion_failed": "ingestion_replay",
    "schema_invalid": "schema_recovery",
    "memory_pressure": "memory_cleanup",
    "cache_overflow": "memory_cleanup",
}

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
    patch: PatchPolicy = Field(default_factory=PatchPolicy)
    work_orders: WorkOrderPolicy = Field(default_factory=WorkOrderPolicy)
    vars: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, CapabilityBinding] = Field(default_factory=dict)


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


class PatternConfig(_Strict):
    name: str = Field(min_length=1)
    regex: str = Field(min_length=1)
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
        default_factory=dict, description="error_type -> playbook id; merged over the defaults."
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
        default_factory=list, description="Extra regexes whose matches are redacted from work order context."
    )
    agent_runner: AgentRunnerConfig = Field(
        default_factory=AgentRunnerConfig, description="The agent runner embedded in `serve` (off by default)."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Request body size, nesting and string length caps."
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

    @field_validator("api_tokens", "intake_tokens")
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

    def routing_table(self) -> dict[str, str]:
        return {**DEFAULT_ROUTING, **self.routing}

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
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {loc}: {first['msg']}", field=loc) from exc
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return settings
    # Command-line options beat the environment, which beats the file: validate the merged values once more
    # without letting the environment take them back.
    try:
        merged = _FileOnly(**{**settings.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"command line: {loc}: {first['msg']}", field=loc) from exc
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
