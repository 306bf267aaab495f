"""Landing a checked, tested patch on the operator's branch: all or nothing, even across a `kill -9`.

`git apply --index` followed by `git commit` is two steps on the operator's checkout: killed between them, the
touched files stay staged and every later apply refuses the "local changes". So a landing never works in the
checkout until the commit exists:

1. the new commit is built beside the checkout, from a scratch index (`read-tree`, `apply --cached`,
   `write-tree`, `commit-tree`): a crash here leaves an unreachable object and nothing else;
2. a journal naming the branch, the old and the new commit and the touched paths is written (fsynced, renamed
   into place) in the repository's git directory;
3. the branch moves with one compare-and-set `update-ref new old`: atomic in git (a lock file renamed over the
   ref), so the branch is before or after, never between;
4. the index entries and files of exactly the touched paths are set to the new commit's (`reset -- paths`,
   `checkout new -- paths`, deleted paths unlinked); other local changes are never touched;
5. the journal is removed.

`recover` reads a journal a killed landing left and finishes the job in the direction the branch shows: still at
the old commit, the touched paths are put back to it (the patch never landed and is applied again when its run
resumes); at the new commit, they are brought forward to it (the run finds it applied). The paths were clean when
the journal was written, so whatever they hold now is the landing's own half-work; a file that matches neither
side (edited by hand after the crash) is copied to `<git dir>/mendloop-recovered/` before it is overwritten, so
nothing is lost. Callers hold the repository's apply lock for both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mendloop.agents.worktrees import is_within
from mendloop.errors import MendloopError
from mendloop.infra import failpoints, git
from mendloop.infra.git import CHECKOUT_TIMEOUT

log = logging.getLogger(__name__)

__all__ = ["JOURNAL_NAME", "Journal", "land", "recover"]

JOURNAL_NAME = "mendloop-apply.json"
_RECOVERED_DIR = "mendloop-recovered"


@dataclass(frozen=True)
class Journal:
    ref: str
    old: str
    new: str
    paths: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"ref": self.ref, "old": self.old, "new": self.new, "paths": list(self.paths)})

    @classmethod
    def from_json(cls, text: str) -> Journal:
        data = json.loads(text)
        return cls(ref=str(data["ref"]), old=str(data["old"]), new=str(data["new"]), paths=tuple(data["paths"]))


def land(root: Path, diff: bytes, paths: Sequence[str], message: str) -> str:
    """Commit `diff` (already checked against HEAD and the checkout) on the current branch and bring the
    touched `paths` of the checkout to it; return the new commit's sha. See the module's steps."""
    ref = _branch_ref(root)
    old = git.head(root)
    new = _build_commit(root, old, diff, message)
    journal = Journal(ref=ref, old=old, new=new, paths=tuple(paths))
    _write_journal(root, journal)
    failpoints.reach("apply.journaled")
    try:
        git.run(root, "update-ref", "-m", "mendloop: apply patch", ref, new, old)
    except MendloopError:
        # Nothing moved (the compare-and-set refused, or git failed before the rename): nothing to undo.
        _remove_journal(root)
        raise
    failpoints.reach("apply.ref_moved")
    _sync_paths(root, journal, target=new)
    failpoints.reach("apply.checked_out")
    _remove_journal(root)
    return new


def recover(root: Path) -> str | None:
    """Finish a landing a crash interrupted (see the module); returns "rolled back" / "rolled forward" /
    "abandoned" when there was one, None when there was none."""
    path = _journal_path(root)
    try:
        journal = Journal.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("%s: unreadable apply journal %s (%s); removed", root, path, exc)
        path.unlink(missing_ok=True)
        return "abandoned"
    _clear_stale_locks(root, journal.ref)
    current = git.run(root, "rev-parse", "--verify", "--quiet", journal.ref, check=False)
    at = git.text(current.stdout).strip()
    if at == journal.new:
        outcome, target = "rolled forward", journal.new
    elif at == journal.old:
        outcome, target = "rolled back", journal.old
    else:
        # The branch moved on by other hands since: its index and files are theirs now, not the landing's.
        log.error(
            "%s: an interrupted apply (%s -> %s) found %s at %s; left as it is",
            root,
            journal.old[:12],
            journal.new[:12],
            journal.ref,
            at[:12] or "nothing",
        )
        _remove_journal(root)
        return "abandoned"
    _sync_paths(root, journal, target=target)
    _remove_journal(root)
    log.warning("%s: an apply interrupted by a crash was %s (%s)", root, outcome, target[:12])
    return outcome


# -- steps ---------------------------------------------------------------------------------------------------------


def _branch_ref(root: Path) -> str:
    proc = git.run(root, "symbolic-ref", "--quiet", "HEAD", check=False)
    if proc.returncode != 0:
        raise MendloopError(f"{root}: HEAD is detached; mendloop commits only onto a checked-out branch")
    return git.text(proc.stdout).strip()


def _build_commit(root: Path, parent: str, diff: bytes, message: str) -> str:
    with tempfile.TemporaryDirectory(prefix="mendloop-index-") as scratch:
        env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        git.run(root, "read-tree", parent, env=env, timeout=CHECKOUT_TIMEOUT)
        git.run(root, "apply", "--cached", input=diff, env=env, timeout=CHECKOUT_TIMEOUT)
        tree = git.text(git.run(root, "write-tree", env=env).stdout).strip()
    # commit-tree is plumbing and ignores commit.gpgSign; an operator who signs their commits gets signed ones.
    sign = git.text(git.run(root, "config", "--type=bool", "--get", "commit.gpgSign", check=False).stdout).strip()
    proc = git.run(
        root,
        *git.identity_flags(root),
        "commit-tree",
        *(["-S"] if sign == "true" else []),
        tree,
        "-p",
        parent,
        "-F",
        "-",
        input=message.encode("utf-8"),
    )
    return git.text(proc.stdout).strip()


def _sync_paths(root: Path, journal: Journal, *, target: str) -> None:
    """The index entries and files of the journal's paths exactly as `target` has them."""
    paths = list(journal.paths)
    in_target = set(
        git.nul_split(
            git.run(root, "--literal-pathspecs", "ls-tree", "-r", "-z", "--name-only", target, "--", *paths).stdout
        )
    )
    _keep_foreign_edits(root, journal, paths)
    git.run(root, "--literal-pathspecs", "reset", "--quiet", target, "--", *paths, timeout=CHECKOUT_TIMEOUT)
    present = sorted(p for p in paths if p in in_target)
    if present:
        git.run(root, "--literal-pathspecs", "checkout", target, "--", *present, timeout=CHECKOUT_TIMEOUT)
    for rel in paths:
        if rel in in_target:
            continue
        file = root / rel
        if file.is_symlink() or file.is_file():
            file.unlink()
        _remove_empty_parents(root, file.parent)


def _keep_foreign_edits(root: Path, journal: Journal, paths: Sequence[str]) -> None:
    """Copy aside any touched file whose content is neither side's (edited by hand after a crash)."""
    saved: Path | None = None
    for rel in paths:
        file = root / rel
        if file.is_symlink() or not file.is_file():
            continue
        blob = git.text(git.run(root, "hash-object", "--no-filters", "--", str(file)).stdout).strip()
        if blob in (_blob_id(root, journal.old, rel), _blob_id(root, journal.new, rel)):
            continue
        if saved is None:
            saved = _git_dir(root) / _RECOVERED_DIR / time.strftime("%Y%m%dT%H%M%S")
        copy = saved / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, copy)
        log.warning("%s: %s matched neither side of an interrupted apply; a copy is in %s", root, rel, copy)


def _blob_id(root: Path, commit: str, rel: str) -> str | None:
    proc = git.run(root, "rev-parse", "--verify", "--quiet", f"{commit}:{rel}", check=False)
    return git.text(proc.stdout).strip() if proc.returncode == 0 else None


def _remove_empty_parents(root: Path, directory: Path) -> None:
    while is_within(directory, root) and directory != root:
        try:
            directory.rmdir()  # only ever removes an empty directory
        except OSError:
            return
        directory = directory.parent


def _clear_stale_locks(root: Path, ref: str) -> None:
    # A git child killed with the landing leaves its lock files; with the journal present and the apply lock
    # held, no other landing can own them. (An operator's own git running at this very moment could: it would
    # fail its own rename and say so, losing nothing.)
    git_dir = _git_dir(root)
    common = git.common_dir(root)
    for lock in (git_dir / "index.lock", common / (ref + ".lock")):
        if lock.is_file():
            log.warning("%s: removing %s left by an interrupted apply", root, lock)
            lock.unlink(missing_ok=True)


# -- the journal ---------------------------------------------------------------------------------------------------


def _git_dir(root: Path) -> Path:
    return Path(git.text(git.run(root, "rev-parse", "--absolute-git-dir").stdout).strip())


def _journal_path(root: Path) -> Path:
    return _git_dir(root) / JOURNAL_NAME


def _write_journal(root: Path, journal: Journal) -> None:
    path = _journal_path(root)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(journal.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_journal(root: Path) -> None:
    path = _journal_path(root)
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
