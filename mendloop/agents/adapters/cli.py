"""The coding agent CLIs (aider, claude, codex, openhands) and `command`, any program given after `--`: each
builds the argv the runner starts in the worktree.

Where each flag comes from (checked against the CLI's own `--help` where the CLI installs on this machine):

- aider 0.86.2 (`aider --help`; https://aider.chat/docs/scripting.html): `--message-file` runs one message and
  exits; `--yes-always` answers confirmations (shell commands still need an explicit yes, and
  `--no-suggest-shell-commands` stops them being proposed); `--no-auto-commits`/`--no-dirty-commits` leave
  committing to the runner; `--no-gitignore` keeps it from editing `.gitignore`; the history files are moved out of
  the worktree so they never show up in the diff; `--no-check-update`, `--no-analytics`,
  `--no-show-release-notes`, `--no-fancy-input`, `--no-pretty`, `--no-stream`, `--no-detect-urls`,
  `--no-restore-chat-history` keep it from asking, phoning home, colouring or streaming into a log. Files after
  `--` are added to the chat.
- claude 2.1.328 (`claude --help`; Claude Code headless docs): `-p/--print` is the non-interactive mode,
  `--output-format json` a single JSON result, `--permission-mode acceptEdits` accepts file edits without a
  prompt (anything else that would prompt is denied in print mode), `--allowedTools` lists the tools it may use,
  `--no-session-persistence` keeps no session on disk. The prompt is the positional argument after `--`
  because `--allowedTools` takes a variable number of values.
- codex 0.169.0 (`codex exec --help`; https://developers.openai.com/codex/noninteractive): `exec` is the
  non-interactive mode, `--sandbox workspace-write` lets it edit the workspace only, `--skip-git-repo-check`
  because a worktree's `.git` is a file it may not recognise, `--ephemeral` persists no session files,
  `--color never` for a log file, `--cd` sets its working root, `--output-last-message` keeps its final message
  outside the worktree.
- openhands (https://docs.openhands.dev/openhands/usage/cli/headless and the `openhands` PyPI page; not
  installable here, it needs Python 3.12): `--headless` runs without the UI and always approves, `-f` reads the
  task from a file, `--override-with-envs` makes it use `LLM_API_KEY`, `LLM_MODEL` and `LLM_BASE_URL`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from mendloop.agents.adapters.base import Adapter, AgentTask, Invocation, register
from mendloop.agents.adapters.prompt import prompt_argument
from mendloop.errors import AgentError, ConfigError
from mendloop.infra import process

_COMMON_KEYS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class CliAdapter(Adapter):
    """A coding agent CLI found on PATH (or at `program`)."""

    program: ClassVar[str] = ""
    network = True  # every one of them calls its model's API

    def __init__(self, args: Sequence[str] = (), *, program: str | None = None) -> None:
        super().__init__(args)
        self._program = program
        self._version: str | bool | None = False

    def executable(self) -> str:
        found = shutil.which(self._program or self.program)
        if found is None:
            raise AgentError(
                "agent_error", f"{self._program or self.program!r} is not on PATH: install it or use --adapter command"
            )
        return found

    def version(self) -> str | None:
        if self._version is False:
            self._version = None
            try:
                out = process.run([self.executable(), "--version"], timeout=20)
            except (process.CannotStart, AgentError):
                return None
            first = (out.stdout_text() or out.stderr_text()).strip().splitlines()
            self._version = first[0][:100] if first and out.returncode == 0 else None
        return self._version if isinstance(self._version, str) else None


@register
class AiderAdapter(CliAdapter):
    name = "aider"
    program = "aider"
    env_keys = ("OPENAI_API_KEY", "OPENAI_API_BASE", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", *_COMMON_KEYS)
    # LITELLM_*: aider talks to models through litellm (LITELLM_LOCAL_MODEL_COST_MAP=True keeps it offline).
    env_prefixes = ("AIDER_", "LITELLM_")
    leftovers = (".aider*",)

    def build(self, task: AgentTask) -> Invocation:
        argv = [
            self.executable(),
            "--message-file",
            str(task.prompt_file),
            "--yes-always",
            "--no-auto-commits",
            "--no-dirty-commits",
            "--no-gitignore",
            "--no-check-update",
            "--no-analytics",
            "--no-show-release-notes",
            "--no-suggest-shell-commands",
            "--no-detect-urls",
            "--no-fancy-input",
            "--no-pretty",
            "--no-stream",
            "--no-restore-chat-history",
            "--input-history-file",
            str(task.scratch / "aider.input.history"),
            "--chat-history-file",
            str(task.scratch / "aider.chat.history.md"),
            *self.args,
        ]
        if task.files:
            argv += ["--", *task.files]
        return Invocation(argv)


@register
class ClaudeAdapter(CliAdapter):
    name = "claude"
    program = "claude"
    env_keys = (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_MODEL",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "CLAUDE_CONFIG_DIR",
        *_COMMON_KEYS,
    )

    def build(self, task: AgentTask) -> Invocation:
        return Invocation(
            [
                self.executable(),
                "-p",
                "--output-format",
                "json",
                "--permission-mode",
                "acceptEdits",
                "--no-session-persistence",
                "--allowedTools",
                "Read,Edit,Write,Glob,Grep",
                *self.args,
                "--",
                prompt_argument(task),
            ]
        )


@register
class CodexAdapter(CliAdapter):
    name = "codex"
    program = "codex"
    env_keys = ("OPENAI_API_KEY", "CODEX_API_KEY", "OPENAI_BASE_URL", "CODEX_HOME", *_COMMON_KEYS)

    def build(self, task: AgentTask) -> Invocation:
        return Invocation(
            [
                self.executable(),
                "exec",
                "--sandbox",
                "workspace-write",
                "--skip-git-repo-check",
                "--ephemeral",
                "--color",
                "never",
                "--cd",
                str(task.worktree),
                "--output-last-message",
                str(task.scratch / "codex-last-message.md"),
                *self.args,
                "--",
                prompt_argument(task),
            ]
        )


@register
class OpenHandsAdapter(CliAdapter):
    name = "openhands"
    program = "openhands"
    env_keys = ("LLM_API_KEY", "LLM_MODEL", "LLM_BASE_URL", *_COMMON_KEYS)

    def build(self, task: AgentTask) -> Invocation:
        argv = [self.executable(), "--headless", "--override-with-envs", "-f", str(task.prompt_file), *self.args]
        return Invocation(argv)


@register
class CommandAdapter(Adapter):
    """Any program: the argv after `--`. It reads WORK_ORDER, PROMPT_FILE, WORKTREE and RESULT_FILE."""

    name = "command"

    def __init__(self, args: Sequence[str] = (), *, pass_env: Iterable[str] = (), network: bool = False) -> None:
        super().__init__(args)
        if not self.args:
            raise ConfigError("the command adapter runs the program given after `--`, and none was given")
        self._pass_env = tuple(k for k in pass_env if not k.startswith("MENDLOOP_"))
        # Any program: no network unless whoever configures it says it calls a model endpoint.
        self._network = network

    @property
    def needs_network(self) -> bool:
        return self._network

    def passthrough_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {k: environ[k] for k in self._pass_env if k in environ}

    def version(self) -> str | None:
        return Path(self.args[0]).name if len(self.args) == 1 else " ".join(Path(a).name for a in self.args[:2])

    def build(self, task: AgentTask) -> Invocation:
        return Invocation(list(self.args))
