"""Where agent and test processes run: a bubblewrap sandbox when this machine allows one, else the uid drop.

`Sandbox.run(argv, cwd=, env=, timeout=, writable=, network=)` is the one way an agent's or a test's process is
started: callers never call `process.run` for those themselves.

With bubblewrap (`kind == "bwrap"`) the process sees the whole system read-only (`--ro-bind / /`), a fresh `/dev`
and `/proc`, a private empty `/tmp`; only `cwd` and the `writable` paths are writable (bound back over the
read-only view, after the private `/tmp`, so a worktree under /tmp or /dev/shm is still there). Every namespace is
new (`--unshare-all`): no network but a private loopback unless `network` (`--share-net`, for an agent whose
adapter talks to a model endpoint), its own pid namespace (whatever it leaves running dies with it), no
capabilities, a session of its own (`--new-session`: no TIOCSTI into a terminal), and `--die-with-parent`.

As root with a `run_as` user, bwrap starts as root without a user namespace, so it can bind what only root can
reach (a project's venv in a 0700 directory, hidden by the private /tmp otherwise), keeps only the capabilities
to change users, and runs `setpriv`, which drops to that user for real with every capability, inheritable and
bounding ones included, gone (bwrap sets no_new_privs: nothing regains them). So the files the process writes
belong to that user outside too, and it holds no uid 0 anywhere. (bwrap's own `--uid` under root would only map
65534 inside onto root outside.) Without `setpriv` the uid is dropped before bwrap starts, which then runs
unprivileged in a user namespace of that user and can bind only what that user reaches.

Programs and files an argv names under /tmp (a venv, a script: the private /tmp would hide them) are bound
read-only at their own paths, a Python's whole venv with it.

Without bubblewrap (not installed, or namespaces are not allowed here, or `sandbox: off`) it falls back to the uid
drop (`kind == "uid-drop"`, as root) or to nothing (`"none"`), with the reason in `reason`, logged once per process
as a warning naming what is not confined. `sandbox: bwrap` makes a missing bubblewrap a configuration error.

bwrap reports its own failures (a program it cannot exec, a path it cannot bind) as exit code 1, which would read
as failing tests; those become 127 and 126, as a shell says, so a test runner tells the environment from the code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from mendloop.errors import ConfigError
from mendloop.infra import process

__all__ = ["MODE_ENV", "PATH_ENV", "Sandbox", "SandboxKind", "SandboxMode", "configure", "detect", "probe"]

log = logging.getLogger(__name__)

SandboxKind = Literal["bwrap", "uid-drop", "none"]
SandboxMode = Literal["auto", "bwrap", "off"]
SANDBOX_MODES: tuple[str, ...] = get_args(SandboxMode)
# The settings `sandbox` and `bwrap` (config.py) read the same variables; `mendloop agent`, which loads no config
# file, gets them from here.
MODE_ENV = "MENDLOOP_SANDBOX"
PATH_ENV = "MENDLOOP_BWRAP"

_PROBE_TIMEOUT = 15.0
# How bwrap's own failures begin (bubblewrap 0.8's die_with_error calls): exec, binds and mounts, namespaces.
_LAUNCHER_SAYS = ("bwrap: execvp ", "bwrap: Can't ", "bwrap: Creating new namespace", "bwrap: No permissions")


@dataclass(frozen=True)
class Sandbox:
    """How processes are confined. `kind`: "bwrap" (bubblewrap), "uid-drop" (the fallback: only a uid drop to
    `run_as`), "none" (neither is possible: not root and no bwrap). `reason`: why it is not "bwrap"."""

    kind: SandboxKind
    run_as: tuple[int, int] | None = None
    bwrap: str | None = None
    reason: str = ""
    extra_readonly: tuple[Path, ...] = field(default=())

    @property
    def confined(self) -> bool:
        return self.kind == "bwrap"

    def describe(self) -> str:
        """One line for logs and `/health`-like reports: what confines a process started here."""
        who = f"uid {self.run_as[0]}" if self.run_as is not None else f"uid {os.geteuid()} (mendloop's own)"
        if self.kind == "bwrap":
            return f"bubblewrap ({self.bwrap}) as {who}"
        return f"{self.kind} as {who}: {self.reason}"

    def warning(self) -> str | None:
        """What an operator must know when processes are not in bubblewrap; None when they are."""
        if self.kind == "bwrap":
            return None
        if self.kind == "uid-drop" and self.run_as is not None:
            exposed = (
                f"agent and test processes only drop to uid {self.run_as[0]}: they read everything that uid may read, "
                "write wherever it may write, and reach the network"
            )
        else:
            exposed = (
                f"agent and test processes run unconfined as uid {os.geteuid()}, mendloop's own user: they can read "
                "and write whatever mendloop can, and reach the network"
            )
        return f"no bubblewrap sandbox ({self.reason}); {exposed}"

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        writable: Sequence[Path],
        network: bool,
        readonly: Sequence[Path] = (),
        path_var: str | None = None,
    ) -> list[str]:
        """The full argv that runs `argv` in this sandbox (`argv` itself when it is not bubblewrap). `path_var`:
        the PATH the program will be found in (its environment's)."""
        if self.kind != "bwrap" or self.bwrap is None:
            return list(argv)
        setpriv = self._setpriv()
        cmd = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        # Parents before children, read-only before writable at the same path: a later mount covers an earlier one.
        binds: dict[Path, bool] = {}
        for path in (*self.extra_readonly, *readonly):
            binds.setdefault(_absolute(path), False)
        for path in _under_tmp(argv, path_var):
            # At the path the argv names, not its target: a symlink there (an agent CLI's) must resolve inside.
            binds.setdefault(Path(os.path.abspath(path)), False)
        for path in (cwd, *writable):
            binds[_absolute(path)] = True
        made: set[Path] = set()
        for path, write in sorted(binds.items(), key=lambda item: (len(item[0].parts), str(item[0]))):
            if not path.exists():  # a missing source would stop bwrap; nothing there means nothing to bind
                continue
            if not write and setpriv is None and self.run_as is not None:
                if process.blocked_for(path, self.run_as) is not None:
                    continue  # bwrap, started as that user, could not reach it either: it stays hidden
            # In the private /tmp and the fresh /dev (a worktree in /dev/shm), bwrap would make the parents of a
            # bind with the modes of the real ones (a 0700 temp dir of root's): made first, enterable, they hold
            # nothing but the way to the bind.
            for parent in reversed(path.parents):
                fresh = any(top in parent.parents for top in _FRESH_MOUNTS)
                if fresh and parent not in made and parent not in binds:
                    cmd += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            cmd += ["--bind" if write else "--ro-bind", str(path), str(path)]
        cmd += ["--chdir", str(_absolute(cwd))]
        if setpriv is None:
            cmd.append("--unshare-all")
            if network:
                cmd.append("--share-net")
            return [*cmd, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--", *argv]
        # Every namespace but the user's (setpriv must change the real uid), the network one unless asked for.
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if not network:
            cmd.append("--unshare-net")
        cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        # Only what setpriv needs (and to enter a worktree that user owns, mode 0700): setuid drops them all.
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH"):
            cmd += ["--cap-add", cap]
        assert self.run_as is not None
        uid, gid = self.run_as
        drop = [setpriv, "--reuid", str(uid), "--regid", str(gid), "--clear-groups"]
        return [*cmd, "--", *drop, "--inh-caps=-all", "--bounding-set=-all", "--", *argv]

    def _setpriv(self) -> str | None:
        """setpriv's path when bwrap starts as root and drops to `run_as` inside (see the module), else None."""
        if self.run_as is None or os.geteuid() != 0:
            return None
        return _setpriv_path()

    def launcher_user(self) -> tuple[int, int] | None:
        """Who starts bwrap: root when it drops to `run_as` itself (setpriv), else `run_as`."""
        return None if self._setpriv() is not None else self.run_as

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        timeout: float,
        writable: Sequence[Path],
        network: bool,
        cancel: threading.Event | None = None,
        keep_bytes: int | None = None,
        merge_stderr: bool = True,
        readonly: Sequence[Path] = (),
    ) -> process.Completed:
        """Run `argv` confined: the system read-only, only `cwd` and `writable` writable (`readonly` paths under
        the private /tmp are made visible, read-only), the network only when `network`; its process group dies
        with mendloop. Raises process.CannotStart like `process.run`."""
        if self.kind != "bwrap":
            return process.run(
                argv,
                cwd=cwd,
                env=env,
                timeout=timeout,
                cancel=cancel,
                merge_stderr=merge_stderr,
                keep_bytes=keep_bytes,
                run_as=self.run_as,
                die_with_parent=True,  # the group guard SIGKILLs the group when mendloop dies
            )
        if argv:
            process.check_startable(argv[0], cwd, env)  # bwrap would only exit 1
        done = process.run(
            self.command(
                argv, cwd=cwd, writable=writable, network=network, readonly=readonly, path_var=env.get("PATH")
            ),
            cwd="/",
            env=env,
            timeout=timeout,
            cancel=cancel,
            merge_stderr=merge_stderr,
            keep_bytes=keep_bytes,
            run_as=self.launcher_user(),
            # bwrap's --die-with-parent alone leaves a window: its launcher and its child each set PDEATHSIG only
            # late in their setup, so a mendloop killed in those first milliseconds left a whole sandbox running.
            # The group guard kills bwrap's group the moment mendloop's process is gone; what remains is the fork
            # before the group is registered, microseconds.
            die_with_parent=True,
        )
        return _launcher_failure(done)


# -- choosing one -------------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probed: dict[tuple[str, tuple[int, int] | None], str | None] = {}
_warned: set[str] = set()
# What `configure` set for this process (`serve`, `agent`: the settings, file and environment already merged).
_configured: dict[str, str | None] = {}


def configure(*, mode: str, bwrap: str | None, run_as: tuple[int, int] | None) -> Sandbox:
    """At the startup of a long-running command: make `mode` and `bwrap` what every later `detect` of this process
    uses when it is given none (the config file's `sandbox:` reaches the test runs of the patch pipeline too), and
    check them now: a required bubblewrap that is missing is a ConfigError before anything starts, and a fallback
    is logged as a warning here, once. Returns the sandbox processes of `run_as` will get."""
    chosen = detect(run_as, mode=mode, bwrap=bwrap)
    with _probe_lock:
        _configured.update(mode=mode, bwrap=bwrap)
    if chosen.confined:
        # Only debug: the sandbox is the normal case, and a command's first line of stderr is for its errors.
        log.debug("bubblewrap (%s) works here: agent and test processes run in its sandbox", chosen.bwrap)
    return chosen


def probe(bwrap: str, run_as: tuple[int, int] | None) -> str | None:
    """Whether `bwrap` can build the sandbox here, as `run_as`: None when it can, else why not. Cached per
    process: the answer does not change while mendloop runs, and every work order would pay for it."""
    key = (bwrap, run_as)
    with _probe_lock:
        if key in _probed:
            return _probed[key]
    trial = Sandbox(kind="bwrap", run_as=run_as, bwrap=bwrap)
    true = shutil.which("true") or "/bin/true"
    why: str | None = None
    try:
        done = process.run(
            trial.command([true], cwd=Path("/"), writable=(), network=False),
            cwd="/",
            env={"PATH": os.defpath},
            timeout=_PROBE_TIMEOUT,
            merge_stderr=True,
            keep_bytes=2000,
            run_as=trial.launcher_user(),
        )
    except process.CannotStart as exc:
        why = f"cannot start {bwrap}: {exc.strerror}"
    else:
        if done.timed_out:
            why = f"{bwrap} did not answer within {_PROBE_TIMEOUT:g}s"
        elif done.returncode != 0:
            said = done.stdout_text(300).strip().replace("\n", " ") or f"exit code {done.returncode}"
            why = f"{bwrap} cannot create namespaces here: {said}"
    with _probe_lock:
        _probed[key] = why
    return why


def detect(
    run_as: tuple[int, int] | None,
    *,
    mode: str | None = None,
    bwrap: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Sandbox:
    """The best sandbox this machine offers for processes that should run as `run_as` (None: as mendloop).

    `mode` "auto" (the default): bubblewrap when it works, else the fallback; "bwrap": bubblewrap or a ConfigError;
    "off": the fallback. `bwrap`: its path (default: `bwrap` on PATH). Either one unset is read from `environ`
    (default: mendloop's environment), MENDLOOP_SANDBOX and MENDLOOP_BWRAP, unless `configure` set them for this
    process. A fallback is logged once."""
    env = os.environ if environ is None else environ
    with _probe_lock:
        if mode is None:
            mode = _configured.get("mode")
        if bwrap is None:
            bwrap = _configured.get("bwrap")
    chosen = (mode if mode is not None else env.get(MODE_ENV, "")).strip() or "auto"
    if chosen not in SANDBOX_MODES:
        raise ConfigError(
            f"sandbox: {chosen!r} is not one of {', '.join(SANDBOX_MODES)} (setting `sandbox`, {MODE_ENV})",
            field="sandbox",
        )
    fallback: SandboxKind = "uid-drop" if run_as is not None else "none"
    if chosen == "off":
        sandbox = Sandbox(kind=fallback, run_as=run_as, reason=f"sandbox: off in the configuration ({MODE_ENV})")
        _warn_once(sandbox)
        return sandbox
    wanted = bwrap if bwrap is not None else (env.get(PATH_ENV, "").strip() or None)
    found = _find(wanted, env)
    why: str | None
    if found is None:
        why = (
            f"no bwrap at {wanted}"
            if wanted
            else "bwrap is not on PATH (install Debian's bubblewrap: apt-get install bubblewrap)"
        )
    else:
        why = probe(found, run_as)
    if why is None:
        return Sandbox(kind="bwrap", run_as=run_as, bwrap=found)
    if chosen == "bwrap":
        raise ConfigError(f"sandbox: bwrap is required, but {why}", field="sandbox")
    sandbox = Sandbox(kind=fallback, run_as=run_as, reason=why)
    _warn_once(sandbox)
    return sandbox


def _warn_once(sandbox: Sandbox) -> None:
    message = sandbox.warning()
    if message is None:
        return
    with _probe_lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("%s", message)


def _find(wanted: str | None, env: Mapping[str, str]) -> str | None:
    if wanted is None:
        return shutil.which("bwrap", path=env.get("PATH") or os.defpath)
    if os.sep in wanted:
        return wanted if os.path.isfile(wanted) and os.access(wanted, os.X_OK) else None
    return shutil.which(wanted, path=env.get("PATH") or os.defpath)


@functools.cache
def _setpriv_path() -> str | None:
    return shutil.which("setpriv") or next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.path.isfile(p)), None)


def _under_tmp(argv: Sequence[str], path_var: str | None) -> list[Path]:
    """What the private /tmp would hide of the program and the files its argv names, named by absolute path under
    /tmp: a directory itself; a file's directory (a script imports its siblings, a CLI's bin directory holds
    links), or the file alone when it lies right in /tmp; for a program that is a venv's Python, the whole venv.
    `path_var`: the PATH the program is looked up in."""
    found: list[Path] = []
    program = argv[0] if argv else ""
    located = program if os.path.isabs(program) else shutil.which(program, path=path_var or os.defpath)
    for item in (located, *argv[1:]):
        if not item or not os.path.isabs(item):
            continue
        path = Path(item)
        if not (path == _TMP or _TMP in path.parents) or not path.exists():
            continue
        venv = path.parent.parent
        if item == located and path.parent.name == "bin" and (venv / "pyvenv.cfg").is_file():
            found.append(venv)
        elif path.is_dir() or path.parent == _TMP:
            found.append(path)
        else:
            found.append(path.parent)
    return found


_TMP = Path("/tmp")
# Mounted afresh in the sandbox (`--tmpfs /tmp`, `--dev /dev`): what is bound below them needs its parents made.
_FRESH_MOUNTS = (_TMP, Path("/dev"))


def _absolute(path: Path) -> Path:
    # realpath: bwrap binds what a path names, and a symlinked parent (/var/run -> /run) must not bind twice.
    return Path(os.path.realpath(path))


def _launcher_failure(done: process.Completed) -> process.Completed:
    """bwrap exits 1 when it cannot set the sandbox up or exec the program, which reads like a failing test. Its
    one line of complaint (and nothing else: the program never ran) becomes what a shell would say: 127 for a
    program it cannot find, 126 for anything else that kept it from starting (the environment, not the code)."""
    if done.returncode != 1:
        return done
    said = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()
    if "\n" in said or not said.startswith(_LAUNCHER_SAYS):
        return done
    code = 127 if said.startswith("bwrap: execvp") and said.endswith("No such file or directory") else 126
    return dataclasses.replace(done, returncode=code)
