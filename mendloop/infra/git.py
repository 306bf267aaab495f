"""Every git call mendloop makes goes through `run` here, under one environment policy:

- argv only (`git -C <dir> ...`), stdin closed or carrying the given bytes, run by `infra.process` with a timeout
  that kills the whole process group;
- every inherited `GIT_*` variable is dropped (one could point git at another repository, index, object store or
  config), and so is `LANGUAGE`; git runs in the C locale (its messages are parsed), never prompts, never pages
  and never opens an editor; a caller may set `GIT_*` variables deliberately through `env`;
- nothing of the repository's runs inside a git call mendloop makes, not even on the operator's branch (a patch
  could have edited a hook, and an agent's worktree is its to write): hooks are off (`core.hooksPath=/dev/null`),
  so is `core.fsmonitor`, the system config and the system and global attribute files are not read
  (`GIT_CONFIG_NOSYSTEM`, `GIT_ATTR_NOSYSTEM`, `core.attributesFile=/dev/null`), and every filter driver the
  configuration defines is emptied (`filter.<x>.clean=`, `.smudge=`, `.process=`, `.required=false`) for the
  commands that read or write file content, so a `.gitattributes` naming a driver runs nothing. git 2.39 has no
  switch that ignores in-tree `.gitattributes` (`--attr-source` came in 2.41), hence the per-driver overrides.
  Diffs are made with `--no-ext-diff --no-textconv` (an empty `diff.external` makes git fail, not skip it);
- an identity is supplied only where the repository has none configured (`identity_flags`).

The queries every part needs (is this a repository, its top level, HEAD, does a commit exist) live here too;
worktrees and the patch pipeline are built on top of this in `mendloop.agents`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mendloop.errors import InputError, MendloopError
from mendloop.infra import process
from mendloop.infra.process import Completed

__all__ = [
    "CHECKOUT_TIMEOUT",
    "FALLBACK_IDENTITY",
    "GIT_TIMEOUT",
    "Completed",
    "common_dir",
    "configured_hooks_path",
    "describe",
    "environment",
    "has_commit",
    "head",
    "head_or_none",
    "identity_flags",
    "is_repo",
    "nul_split",
    "resolve",
    "run",
    "text",
    "toplevel",
]

GIT_TIMEOUT = 120.0
# A checkout of a large repository, or a repository's own hooks, can take a while.
CHECKOUT_TIMEOUT = 600.0
FALLBACK_IDENTITY: tuple[tuple[str, str], ...] = (("user.name", "mendloop"), ("user.email", "mendloop@localhost"))

_FIXED_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
    "GIT_EDITOR": "true",
    "GIT_PAGER": "cat",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_ATTR_NOSYSTEM": "1",
}
SAFE_FLAGS: tuple[str, ...] = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.attributesFile=/dev/null",
)
# Subcommands that never read or write file content through a filter: no need to look up the filter drivers.
_NO_CONTENT = frozenset(
    {"rev-parse", "config", "symbolic-ref", "cat-file", "check-ref-format", "branch", "log", "ls-tree", "version"}
)
_FILTER_KEY = r"^filter\..+\.(clean|smudge|process)$"


def environment(extra: Mapping[str, str] | None = None, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a git call: `source` (default: mendloop's own) without any `GIT_*` variable or
    `LANGUAGE`, plus the fixed settings, plus `extra` (the caller's deliberate choices, which win)."""
    src = os.environ if source is None else source
    env = {k: v for k, v in src.items() if not k.startswith("GIT_") and k != "LANGUAGE"}
    env.update(_FIXED_ENV)
    env.update(extra or {})
    return env


def run(
    cwd: str | os.PathLike[str],
    *args: str,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """`git -C cwd args...` under the policy above. With `check`, a non-zero exit raises MendloopError naming the
    subcommand and the tail of its message; a timeout always raises (the process group is killed first). `env`
    adds to the policy's environment."""
    command = describe(args)
    flags = [*SAFE_FLAGS]
    if command.removeprefix("git ") not in _NO_CONTENT:
        flags += _no_filters(cwd, env)
    argv = ["git", "-C", str(cwd), *flags, *args]
    try:
        proc = process.run(argv, timeout=timeout, env=environment(env), input=input)
    except process.CannotStart as exc:
        raise MendloopError(f"cannot run git: {exc.strerror}") from exc
    if proc.timed_out:
        raise MendloopError(f"{command} timed out after {timeout:g}s")
    if check and proc.returncode != 0:
        detail = process.tail(text(proc.stderr).strip() or text(proc.stdout).strip(), 2000)
        raise MendloopError(f"{command} failed (exit {proc.returncode}): {detail}", exit_code=proc.returncode)
    return proc


def _no_filters(cwd: str | os.PathLike[str], env: Mapping[str, str] | None) -> list[str]:
    """`-c` overrides that empty every filter driver the configuration in effect at `cwd` defines."""
    argv = ["git", "-C", str(cwd), *SAFE_FLAGS, "config", "-z", "--name-only", "--get-regexp", _FILTER_KEY]
    try:
        proc = process.run(argv, timeout=GIT_TIMEOUT, env=environment(env))
    except process.CannotStart as exc:
        raise MendloopError(f"cannot run git: {exc.strerror}") from exc
    if proc.timed_out:
        raise MendloopError(f"git config timed out after {GIT_TIMEOUT:g}s")
    if proc.returncode not in (0, 1):  # 1: no such key, i.e. no filter configured
        detail = process.tail(text(proc.stderr).strip(), 2000)
        raise MendloopError(f"git config failed (exit {proc.returncode}): {detail}", exit_code=proc.returncode)
    drivers = sorted({key.rsplit(".", 1)[0] for key in nul_split(proc.stdout)})
    flags: list[str] = []
    for driver in drivers:
        for key in ("clean", "smudge", "process"):
            flags += ["-c", f"{driver}.{key}="]
        flags += ["-c", f"{driver}.required=false"]
    return flags


def configured_hooks_path(root: Path) -> str | None:
    """The repository's own `core.hooksPath` (mendloop's override on the command line aside), or None."""
    proc = run(root, "config", "--show-scope", "--get-all", "core.hooksPath", check=False)
    values = [line.split("\t", 1) for line in text(proc.stdout).splitlines() if "\t" in line]
    configured = [value for scope, value in values if scope != "command"]
    return configured[-1] if configured else None


def describe(args: Sequence[str]) -> str:
    """`git <subcommand>` for messages, without the global options in front of it."""
    words = list(args)
    while words and words[0].startswith("-"):
        words = words[2:] if words[0] == "-c" else words[1:]
    return "git " + " ".join(words[:1])


# -- queries ---------------------------------------------------------------------------------------------------


def is_repo(path: Path) -> bool:
    """True when `path` is inside a git working tree (bare repositories have none to patch)."""
    if not Path(path).is_dir():
        return False
    try:
        proc = run(path, "rev-parse", "--is-inside-work-tree", check=False)
    except MendloopError:
        return False
    return proc.returncode == 0 and text(proc.stdout).strip() == "true"


def toplevel(path: Path) -> Path:
    """The root of the working tree `path` is in; MendloopError when it is in none."""
    proc = run(path, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{path}: not inside a git working tree", repository=str(path))
    return Path(text(proc.stdout).rstrip("\n"))


def head(repo: Path) -> str:
    """The sha of HEAD's commit."""
    proc = run(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if proc.returncode != 0:
        toplevel(repo)  # the clearer error when repo is no repository at all
        raise MendloopError(f"{repo}: HEAD does not name a commit (no commits yet?)", repository=str(repo))
    return text(proc.stdout).strip()


def head_or_none(repo: Path, *, timeout: float = 10.0) -> str | None:
    """HEAD's sha, or None when `repo` is no repository, has no commit yet or git is missing or slow."""
    try:
        proc = run(repo, "rev-parse", "HEAD", check=False, timeout=timeout)
    except MendloopError:
        return None
    sha = text(proc.stdout).strip()
    return sha if proc.returncode == 0 and sha else None


def resolve(root: Path, rev: str) -> str:
    """The full sha of the commit `rev` names; InputError for something that is no revision at all (an option,
    whitespace, control characters), MendloopError for one the repository does not have."""
    if not rev or rev.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in rev):
        raise InputError(f"not a commit: {rev!r}", field="commit")
    proc = run(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{root}: unknown commit {rev!r}", commit=rev)
    return text(proc.stdout).strip()


def has_commit(repo: Path, sha: str, *, timeout: float = 30.0) -> bool:
    """True when the repository has the commit `sha` (an object name, not an arbitrary revision)."""
    proc = run(repo, "cat-file", "-e", "--end-of-options", f"{sha}^{{commit}}", check=False, timeout=timeout)
    return proc.returncode == 0


def common_dir(root: Path) -> Path:
    """The repository's common git directory (shared by all its worktrees)."""
    out = text(run(root, "rev-parse", "--git-common-dir").stdout).rstrip("\n")
    return (root / out).resolve()


def identity_flags(root: Path) -> list[str]:
    """`-c user.name=… -c user.email=…` for whichever of the two the repository's config lacks."""
    flags: list[str] = []
    for key, fallback in FALLBACK_IDENTITY:
        proc = run(root, "config", "--get", key, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            flags += ["-c", f"{key}={fallback}"]
    return flags


# -- output ----------------------------------------------------------------------------------------------------


def text(data: bytes) -> str:
    """git's output as text; bytes that are not UTF-8 survive a round trip (surrogateescape)."""
    return data.decode("utf-8", errors="surrogateescape")


def nul_split(data: bytes) -> list[str]:
    """The records of a `-z` listing."""
    return [part for part in text(data).split("\0") if part]
