"""mendloop.infra.process with real programs: no shell, timeouts that kill the whole group, bounded tails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mendloop.errors import MendloopError
from mendloop.infra import group_guard, process
from tests.support import alive

PY = sys.executable


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_exit_code_and_both_streams() -> None:
    res = process.run([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=30)
    assert res.returncode == 3
    assert not res.ok
    assert res.stdout == b"out\n"
    assert res.stderr == b"err\n"
    assert not res.timed_out and not res.cancelled
    assert res.duration >= 0


def test_merge_stderr_puts_everything_in_stdout() -> None:
    res = process.run(
        [PY, "-c", "import sys; print('a', flush=True); print('b', file=sys.stderr)"], timeout=30, merge_stderr=True
    )
    assert res.returncode == 0
    assert res.stdout.split() == [b"a", b"b"]
    assert res.stderr == b""


def test_no_shell_interprets_metacharacters(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arg = f"$(touch {marker}); `touch {marker}` | > {marker} && echo *"
    res = process.run([PY, "-c", "import sys; print(sys.argv[1])", arg], timeout=30, cwd=tmp_path)
    assert res.stdout_text().rstrip("\n") == arg
    assert not marker.exists()


def test_env_is_exactly_what_is_given() -> None:
    res = process.run(
        [PY, "-c", "import os, json; print(json.dumps(dict(os.environ)))"],
        timeout=30,
        env={"ONLY": "this", "PATH": os.environ.get("PATH", os.defpath)},
    )
    env = __import__("json").loads(res.stdout)
    env.pop("LC_CTYPE", None)  # some Pythons set it at startup
    assert env == {"ONLY": "this", "PATH": os.environ.get("PATH", os.defpath)}


def test_pick_env_keeps_only_named_variables() -> None:
    env = process.pick_env(["A", "MISSING"], {"A": "1", "SECRET": "x"}, B="2")
    assert env == {"A": "1", "B": "2"}


def test_cwd_and_input(tmp_path: Path) -> None:
    res = process.run(
        [PY, "-c", "import os, sys; print(os.getcwd()); print(sys.stdin.read())"],
        timeout=30,
        cwd=tmp_path,
        input=b"fed",
    )
    assert res.stdout_text().split() == [str(tmp_path.resolve()), "fed"]


def test_stdin_is_closed_without_input() -> None:
    res = process.run([PY, "-c", "import sys; print(repr(sys.stdin.read()))"], timeout=30)
    assert res.stdout == b"''\n"


def test_timeout_kills_the_grandchild_too(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    res = process.run([PY, "-c", script], timeout=2)
    assert time.monotonic() - started < 20
    assert res.timed_out
    assert res.returncode is None
    grandchild = int(pidfile.read_text())
    assert _wait_dead(grandchild)


def test_leftovers_are_killed_when_the_leader_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    script = (
        "import subprocess\n"
        f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
    )
    res = process.run([PY, "-c", script], timeout=30)
    assert res.returncode == 0
    assert _wait_dead(int(pidfile.read_text()))


def test_a_background_child_holding_the_output_does_not_stall_the_wait(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    script = (
        "import subprocess\n"
        f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"  # inherits stdout and stderr
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('done')\n"
    )
    started = time.monotonic()
    res = process.run([PY, "-c", script], timeout=30, kill_leftovers=False)
    assert time.monotonic() - started < 20
    assert res.returncode == 0
    assert res.stdout == b"done\n"
    daemon = int(pidfile.read_text())
    try:
        assert alive(daemon)  # kill_leftovers=False: a daemon it started is left alone
    finally:
        os.kill(daemon, 9)


def test_output_tail_is_bounded() -> None:
    res = process.run([PY, "-c", "import sys; sys.stdout.write('x' * 100000 + 'END')"], timeout=30, keep_bytes=100)
    assert len(res.stdout) == 100
    assert res.stdout.endswith(b"END")
    text = res.stdout_text(10)
    assert text == "…" + "x" * 7 + "END"


def test_large_output_and_input_do_not_deadlock() -> None:
    data = os.urandom(3 << 20)
    res = process.run(
        [PY, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"], timeout=60, input=data
    )
    assert res.stdout == data


def test_tail_marks_a_cut() -> None:
    assert process.tail("abc", 3) == "abc"
    assert process.tail("abcd", 3) == "…bcd"


def test_cannot_start_names_the_program(tmp_path: Path) -> None:
    with pytest.raises(process.CannotStart) as info:
        process.run([str(tmp_path / "missing")], timeout=5)
    assert info.value.program == str(tmp_path / "missing")


def test_empty_argv_and_bad_timeout_are_refused() -> None:
    with pytest.raises(MendloopError):
        process.run([], timeout=5)
    with pytest.raises(MendloopError):
        process.run([PY, "-c", "pass"], timeout=0)


def test_cancel_kills_the_group() -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    res = process.run([PY, "-c", "import time; time.sleep(60)"], timeout=60, cancel=cancel)
    assert time.monotonic() - started < 20
    assert res.cancelled and not res.timed_out
    assert res.returncode is None


def test_die_with_parent_runs_the_program_and_passes_its_exit_code(tmp_path: Path) -> None:
    res = process.run([PY, "-c", "print('guarded'); raise SystemExit(4)"], timeout=30, die_with_parent=True)
    assert res.returncode == 4
    assert res.stdout == b"guarded\n"
    assert not group_guard._guarded  # reaped, so no longer the guard's to kill


def test_spawned_child_stops_with_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: raise_(SystemExit(0)))\n"
        "def raise_(e): raise e\n"
        f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "child.log"
    with log.open("wb") as fh:
        child = process.spawn([PY, "-c", script], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        assert child.poll() is None
        time.sleep(0.02)
    assert child.wait(0.05) is None  # still running; wait() never kills
    code = child.stop(grace=10)
    assert code == 0  # the leader exited by itself on SIGTERM
    assert _wait_dead(int(pidfile.read_text()))
    assert child.pid not in process._live_groups


def test_spawned_child_is_killed_after_the_grace() -> None:
    child = process.spawn(
        [
            PY,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child._proc.stdout is not None
    assert child._proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    code = child.stop(grace=0.5)
    assert time.monotonic() - started < 10
    assert code == -9
    child._proc.stdout.close()


def test_kill_live_groups_kills_running_children() -> None:
    child = process.spawn([PY, "-c", "import time; time.sleep(60)"])
    process.kill_live_groups()
    assert child.wait(10) == -9


def test_die_with_parent_child_keeps_its_pid_and_gets_the_leaders_signals(tmp_path: Path) -> None:
    """The program is started directly (the guard watches from outside the group): spawn()'s pid is the
    program's, and Child.stop's SIGTERM reaches the program itself, which can end cleanly (a server, say)."""
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('term', flush=True), sys.exit(3)))\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "child.log"
    with log.open("wb") as fh:
        child = process.spawn([PY, "-c", script], stdout=fh, die_with_parent=True)
    deadline = time.monotonic() + 20
    while not log.read_text().strip():
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.02)
    assert int(log.read_text().split()[0]) == child.pid
    assert child.stop(grace=10) == 3
    assert log.read_text().split()[1] == "term"


def test_die_with_parent_cannot_start_names_the_program() -> None:
    with pytest.raises(process.CannotStart) as caught:
        process.run(["no-such-program-mendloop"], timeout=5, die_with_parent=True)
    assert caught.value.program == "no-such-program-mendloop"


# A mendloop stand-in: it starts a long-lived child from a thread that then exits (PR_SET_PDEATHSIG alone would
# kill the child right then), says the child's pid once the thread is gone, and lives on until killed.
_SPAWNER = """
import sys, threading, time
sys.path.insert(0, {root!r})
from mendloop.infra import process
started = []
thread = threading.Thread(target=lambda: started.append(process.spawn(["sleep", "300"], die_with_parent=True)))
thread.start()
thread.join()
time.sleep(0.5)
open({pid_file!r}, "w").write(str(started[0].pid))
time.sleep(300)
"""


def test_die_with_parent_outlives_its_thread_and_dies_with_a_kill_9_of_the_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    root = str(Path(__file__).resolve().parent.parent)
    spawner = subprocess.Popen([PY, "-c", _SPAWNER.format(root=root, pid_file=str(pid_file))])
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and spawner.poll() is None
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert alive(child)  # the thread that started it has exited, the process has not
        spawner.kill()  # kill -9: no atexit, no cleanup of any kind
        spawner.wait()
        assert _wait_dead(child), "the child outlived a kill -9 of the process that started it"
    finally:
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait()


# A mendloop stand-in for the group guard: argv[1] names what to do before it says its children's pids.
_GUARDED = """
import json, os, signal, sys, time
sys.path.insert(0, {root!r})
from mendloop.infra import group_guard, process
out = {{}}
first = process.spawn(["sleep", "300"], die_with_parent=True)
out["first"] = first.pid
# The guard killed from outside: the next registration starts a new guard that holds both groups.
os.kill(group_guard._proc.pid, signal.SIGKILL)
group_guard._proc.wait()
out["second"] = process.spawn(["sleep", "300"], die_with_parent=True).pid
# A command that left a daemon and ended: the daemon is not the guard's any more.
daemon_file = {daemon_file!r}
leave = "import subprocess; p = subprocess.Popen(['sleep', '300']); open(%r, 'w').write(str(p.pid))" % daemon_file
done = process.run([sys.executable, "-c", leave], timeout=30, kill_leftovers=False, die_with_parent=True)
assert done.returncode == 0, done
out["daemon"] = int(open(daemon_file).read())
out["guard"] = group_guard._proc.pid
open({pid_file!r}, "w").write(json.dumps(out))
time.sleep(300)
"""


def test_the_group_guard_comes_back_when_killed_and_lets_a_finished_commands_daemon_live(tmp_path: Path) -> None:
    pid_file, daemon_file = tmp_path / "pids.json", tmp_path / "daemon.pid"
    root = str(Path(__file__).resolve().parent.parent)
    src = _GUARDED.format(root=root, pid_file=str(pid_file), daemon_file=str(daemon_file))
    spawner = subprocess.Popen([PY, "-c", src])
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and spawner.poll() is None
            time.sleep(0.02)
        pids = json.loads(pid_file.read_text())
        assert all(alive(pids[k]) for k in ("first", "second", "daemon", "guard"))
        spawner.kill()  # kill -9: only the (second) guard is left to act
        spawner.wait()
        assert _wait_dead(pids["first"]), "a group registered before the guard was killed outlived mendloop"
        assert _wait_dead(pids["second"]), "a group registered with the new guard outlived mendloop"
        assert _wait_dead(pids["guard"]), "the guard lived on after its work"
        assert alive(pids["daemon"]), "the daemon of a command that had ended was killed with mendloop"
    finally:
        if spawner.poll() is None:
            spawner.kill()
            spawner.wait()
        if pids.get("daemon") and alive(pids["daemon"]):
            os.kill(pids["daemon"], 9)


def test_a_normal_exit_stops_the_guard_without_leaving_it_behind(tmp_path: Path) -> None:
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from mendloop.infra import group_guard, process\n"
        "process.run(['true'], timeout=10, die_with_parent=True)\n"
        "print(group_guard._proc.pid, flush=True)\n"
    )
    done = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert _wait_dead(int(done.stdout.strip())), "the guard outlived a normal exit"
