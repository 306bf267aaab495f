"""Adapters: how the agent runner drives one coding agent.

An adapter is registered by name. Most build an argv (never a shell string) that the runner starts in the
work order's git worktree, with stdin closed, a hard timeout, its own process group and an environment that
holds only PATH, HOME, LANG (and friends), the adapter's own keys when they are set, and these variables:

    WORK_ORDER      path of the work order as JSON        WORK_ORDER_ID  its id
    PROMPT_FILE     path of the prompt (outside the worktree)
    WORKTREE        the git worktree to edit               RESULT_FILE    where the agent may write a JSON report

The `openai` adapter instead runs in-process: it calls an OpenAI-compatible chat-completions endpoint and
applies the diff it answers with to the worktree. Whatever an agent says, the runner computes the diff itself.

Anything after `--` on `mendloop agent` is appended to the argv below, before the prompt argument (`claude`,
`codex`) or the file list (`aider`); for `command` it *is* the argv.

| adapter   | argv the runner starts (in the worktree)                                                              |
|-----------|-------------------------------------------------------------------------------------------------------|
| aider     | aider --message-file PROMPT_FILE --yes-always --no-auto-commits --no-dirty-commits --no-gitignore       |
|           | --no-check-update --no-analytics --no-show-release-notes --no-suggest-shell-commands --no-detect-urls  |
|           | --no-fancy-input --no-pretty --no-stream --no-restore-chat-history                                    |
|           | --input-history-file SCRATCH/aider.input.history                                                      |
|           | --chat-history-file SCRATCH/aider.chat.history.md [ARGV...] -- [FILES named in the context...]        |
| claude    | claude -p --output-format json --permission-mode acceptEdits --no-session-persistence                 |
|           | --allowedTools Read,Edit,Write,Glob,Grep [ARGV...] -- PROMPT                                          |
| codex     | codex exec --sandbox workspace-write --skip-git-repo-check --ephemeral --color never                  |
|           | --cd WORKTREE --output-last-message SCRATCH/codex-last-message.md [ARGV...] -- PROMPT                 |
| openhands | openhands --headless --override-with-envs -f PROMPT_FILE [ARGV...]                                    |
| command   | ARGV... (the program after `--`; it reads the variables above)                                        |
| openai    | in-process: POST {base_url}/chat/completions, then `git apply --recount` of the answer's ```diff block |

The package: `base` (the task, the adapter base class and the registry), `cli` (the CLI agents and the
`command` adapter), `llm` (the in-process OpenAI-compatible adapter), `prompt` (the prompt and the files it names).
"""

from __future__ import annotations

from mendloop.agents.adapters.base import (
    Adapter,
    AgentTask,
    InProcessResult,
    Invocation,
    adapter_names,
    create,
    register,
)
from mendloop.agents.adapters.cli import (
    AiderAdapter,
    ClaudeAdapter,
    CliAdapter,
    CodexAdapter,
    CommandAdapter,
    OpenHandsAdapter,
)
from mendloop.agents.adapters.llm import OpenAIAdapter, extract_diff, git_apply
from mendloop.agents.adapters.prompt import (
    MAX_FILE_CHARS,
    MAX_FILES_CHARS,
    MAX_PROMPT_CHARS,
    build_prompt,
    relevant_files,
)

__all__ = [
    "MAX_FILES_CHARS",
    "MAX_FILE_CHARS",
    "MAX_PROMPT_CHARS",
    "Adapter",
    "AgentTask",
    "AiderAdapter",
    "ClaudeAdapter",
    "CliAdapter",
    "CodexAdapter",
    "CommandAdapter",
    "InProcessResult",
    "Invocation",
    "OpenAIAdapter",
    "OpenHandsAdapter",
    "adapter_names",
    "build_prompt",
    "create",
    "extract_diff",
    "git_apply",
    "register",
    "relevant_files",
]
