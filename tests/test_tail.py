"""The file follower against real files: rotation, copytruncate, truncation, new files, restarts, hostile content."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from mendloop.domain.checkpoints import Checkpoint, FileIdentity
from mendloop.errors import ConfigError
from mendloop.intake.follow import follow
from mendloop.intake.lines import Line, strip_ansi
from mendloop.intake.offsets import JsonFileOffsetStore, MemoryOffsetStore, OffsetStore
from mendloop.intake.tail import Tailer
from mendloop.testing import FakeClock


def append(path: Path, data: str | bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def texts(lines: list[Line]) -> list[str]:
    return [line.text for line in lines]


def tailer(tmp_path: Path, store: OffsetStore | None = None, pattern: str = "*.log", **kw: object) -> Tailer:
    kw.setdefault("start_at", "beginning")
    return Tailer("t", [str(tmp_path / pattern)], offsets=store or MemoryOffsetStore(), **kw)  # type: ignore[arg-type]


# -- basics ---------------------------------------------------------------------------------------------------------


def test_start_at_end_skips_existing_lines_and_reads_appends(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "old 1\nold 2\n")
    with tailer(tmp_path, start_at="end") as t:
        assert t.poll() == []
        append(log, "new 1\nnew 2\n")
        lines = t.poll()
    assert texts(lines) == ["new 1", "new 2"]
    assert lines[0].path == str(log)
    assert (lines[0].offset, lines[0].end_offset) == (12, 18)
    assert (lines[1].offset, lines[1].end_offset) == (18, 24)


def test_start_at_end_does_not_cut_a_line_being_written(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "old\nhalf of a li")
    with tailer(tmp_path, start_at="end") as t:
        assert t.poll() == []
        append(log, "ne\n")
        assert texts(t.poll()) == ["half of a line"]


def test_start_at_beginning_reads_everything(tmp_path: Path) -> None:
    append(tmp_path / "app.log", "a\nb\n")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["a", "b"]
        assert t.poll() == []


def test_half_written_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "one\ntw")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["one"]
        assert t.poll() == []
        append(log, "o")
        assert t.poll() == []
        append(log, "\nthree\n")
        lines = t.poll()
    assert texts(lines) == ["two", "three"]
    assert (lines[0].offset, lines[0].end_offset) == (4, 8)


def test_partial_line_timeout_flushes_a_line_that_never_ends(tmp_path: Path) -> None:
    clock = FakeClock()
    log = tmp_path / "app.log"
    append(log, "no newline yet")
    with tailer(tmp_path, clock=clock, partial_line_timeout=2.0) as t:
        assert t.poll() == []
        clock.advance(1.0)
        assert t.poll() == []
        clock.advance(1.0)
        lines = t.poll()
        assert texts(lines) == ["no newline yet"]
        assert lines[0].end_offset == len("no newline yet")
        append(log, " and the rest\n")
        assert texts(t.poll()) == [" and the rest"]


def test_ansi_escapes_invalid_utf8_nul_and_crlf(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, b"\x1b[1;31mERROR\x1b[0m: Pipeline timeout\n")
    append(log, b"\x1b]8;;http://x\x07link\x1b]8;;\x07 and \x1b(Bplain\n")
    append(log, b"caf\xe9 \xff\xfe ok\n")
    append(log, b"win\r\n")
    append(log, b"nul\x00byte\n")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == [
            "ERROR: Pipeline timeout",
            "link and plain",
            "caf\ufffd \ufffd\ufffd ok",
            "win",
            "nulbyte",
        ]
    assert strip_ansi("\x1b[38;5;196mred\x1b[m \x9b1mx") == "red x"


def test_binary_garbage_does_not_stop_the_tailer(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    rng = random.Random(4)
    garbage = bytes(rng.randrange(256) for _ in range(200_000)) + b"\x00" * 5000 + b"\xc3\x28\xa0\xa1\xf0\x28\x8c\xbc"
    with tailer(tmp_path) as t:
        append(log, b"before\n")
        assert texts(t.poll()) == ["before"]
        append(log, garbage + b"\n")
        append(log, "good 1\ngood 2\n")
        lines = t.poll()
        assert texts(lines[-2:]) == ["good 1", "good 2"]
        assert all("\x00" not in line.text for line in lines)
        # Every byte is accounted for: the lines tile the file with no gap and no overlap.
        assert lines[0].offset == len(b"before\n")
        assert all(a.end_offset == b.offset for a, b in itertools.pairwise(lines))
        assert lines[-1].end_offset == log.stat().st_size
        append(log, "good 3\n")
        assert texts(t.poll()) == ["good 3"]


def test_ten_megabyte_line_is_truncated_not_dropped_and_never_held_whole(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    size = 10 * 1024 * 1024
    piece = b"x" * (1024 * 1024)
    with tailer(tmp_path, max_line_bytes=65536, read_chunk=1 << 20) as t:
        append(log, b"first\n")
        assert texts(t.poll()) == ["first"]
        tracemalloc.start()
        try:
            # Written in pieces with a pass between them: the skip carries on across reads.
            for _ in range(size // len(piece)):
                append(log, piece)
                assert t.poll() == []
            append(log, b"\nnext line\n")
            lines = t.poll()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    big, nxt = lines
    assert big.truncated
    assert big.text == "x" * 65536
    assert (big.offset, big.end_offset) == (6, 6 + size + 1)
    assert not nxt.truncated
    assert nxt.text == "next line"
    # A read chunk and the kept beginning, never the 10 MB line.
    assert peak < 4 * 1024 * 1024, peak


def test_huge_line_in_one_read_and_truncation_on_a_character_boundary(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, ("é" * 3_000_000 + "\nafter\n").encode())
    with tailer(tmp_path, max_line_bytes=1001) as t:
        big, after = t.poll()
    assert big.truncated and big.text == "é" * 500  # 1001 bytes would end in half an "é"
    assert after.text == "after" and not after.truncated


def test_line_exactly_max_line_bytes_is_not_truncated(tmp_path: Path) -> None:
    append(tmp_path / "app.log", "a" * 100 + "\n" + "b" * 101 + "\n")
    with tailer(tmp_path, max_line_bytes=100) as t:
        a, b = t.poll()
    assert (a.text, a.truncated) == ("a" * 100, False)
    assert (b.text, b.truncated) == ("b" * 100, True)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    store = MemoryOffsetStore()
    with pytest.raises(ConfigError, match="no paths"):
        Tailer("w", [], offsets=store)
    with pytest.raises(ConfigError, match="start_at"):
        Tailer("w", ["x"], offsets=store, start_at="middle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_line_bytes"):
        Tailer("w", ["x"], offsets=store, max_line_bytes=0)


# -- files coming and going -----------------------------------------------------------------------------------------


def test_rotation_by_rename_and_create_finishes_the_old_file_first(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "1\n2\n")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["1", "2"]
        append(log, "3\n4\n")
        os.rename(log, tmp_path / "app.log.1")
        # The writer has not reopened yet: this goes to the renamed file, and must not be lost.
        append(tmp_path / "app.log.1", "5\nhalf")
        append(log, "6\n7\n")
        lines = t.poll()
        assert texts(lines) == ["3", "4", "5", "half", "6", "7"]
        assert {line.path for line in lines} == {str(log)}
        assert lines[-2].offset == 0  # the new file is read from its beginning
        append(log, "8\n")
        assert texts(t.poll()) == ["8"]


def test_a_pass_between_the_rename_and_the_writes_still_reads_them(tmp_path: Path) -> None:
    """The rename wakes the watcher before the writer's next line reaches the renamed file (tail -F): the old file
    is kept and read under its path until a new file appears there, then finished before the new one is read."""
    log = tmp_path / "app.log"
    append(log, "1\n2\n")
    store = MemoryOffsetStore()
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["1", "2"]
        os.rename(log, tmp_path / "app.log.1")
        assert t.poll() == []  # the pass the rename woke: nothing has replaced the file yet
        append(tmp_path / "app.log.1", "3\n4\n")
        assert texts(t.poll()) == ["3", "4"]
        t.checkpoint()
        assert store.load("t")[str(log)].offset == 8  # still followed under its path, for a restart
        append(tmp_path / "app.log.1", "5\nhalf")
        append(log, "6\n")
        lines = t.poll()
        assert texts(lines) == ["5", "half", "6"]
        assert {line.path for line in lines} == {str(log)}
        append(log, "7\n")
        assert texts(t.poll()) == ["7"]


def test_rename_to_a_watched_name_continues_without_repeating(tmp_path: Path) -> None:
    # A pattern that also matches rotated names: the renamed file is the same file, not a new one.
    log = tmp_path / "app.log"
    append(log, "1\n2\n")
    with tailer(tmp_path, pattern="app.log*") as t:
        assert texts(t.poll()) == ["1", "2"]
        append(log, "3\n")
        os.rename(log, tmp_path / "app.log.1")
        append(tmp_path / "app.log.1", "4\n")
        append(log, "5\n")
        lines = t.poll()
    assert sorted(texts(lines)) == ["3", "4", "5"]
    assert [line.text for line in lines if line.path.endswith(".1")] == ["3", "4"]


def test_copytruncate_reads_the_lines_only_the_copy_holds(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "1\n2\n")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["1", "2"]
        append(log, "3\n4\npart")
        shutil.copyfile(log, tmp_path / "app.log.1")
        with open(log, "r+b") as fh:
            fh.truncate(0)
        append(log, "5\n")
        assert texts(t.poll()) == ["3", "4", "part", "5"]
        append(log, "6\n")
        assert texts(t.poll()) == ["6"]


def test_copytruncate_rewritten_past_the_old_offset_is_noticed(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "a\nb\n")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["a", "b"]
        shutil.copyfile(log, tmp_path / "app.log.1")
        with open(log, "r+b") as fh:
            fh.truncate(0)
        # Longer than what was read: only the changed first bytes tell this file was truncated.
        append(log, "new line one\nnew line two\n")
        assert texts(t.poll()) == ["new line one", "new line two"]


def test_truncation_in_place_restarts_from_zero(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "one\ntwo\nthree\n")
    with tailer(tmp_path) as t:
        assert len(t.poll()) == 3
        log.write_bytes(b"")  # `> app.log`
        assert t.poll() == []
        append(log, "fresh\n")
        lines = t.poll()
    assert texts(lines) == ["fresh"]
    assert lines[0].offset == 0


def test_a_file_created_after_start_is_read_from_its_beginning(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    append(tmp_path / "logs" / "a.log", "a old\n")
    with tailer(tmp_path, pattern="logs/*.log", start_at="end") as t:
        assert t.poll() == []
        append(tmp_path / "logs" / "b.log", "b 1\nb 2\n")
        append(tmp_path / "logs" / "b.txt", "not watched\n")
        append(tmp_path / "logs" / "a.log", "a new\n")
        lines = t.poll()
    named = [(Path(line.path).name, line.text) for line in lines]
    assert named == [("a.log", "a new"), ("b.log", "b 1"), ("b.log", "b 2")]


def test_a_glob_over_directories_picks_up_a_new_directory(tmp_path: Path) -> None:
    with tailer(tmp_path, pattern="*/app.log") as t:
        assert t.poll() == []
        (tmp_path / "svc1").mkdir()
        append(tmp_path / "svc1" / "app.log", "hello\n")
        assert texts(t.poll()) == ["hello"]
        assert t.watch_dirs() == [(str(tmp_path), True)]


def test_a_deleted_file_is_finished_then_forgotten(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "1\n")
    store = MemoryOffsetStore()
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["1"]
        append(log, "2\nlast")
        log.unlink()
        assert texts(t.poll()) == ["2", "last"]
        t.checkpoint()
        assert store.load("t") == {}
        append(log, "reborn\n")
        assert texts(t.poll()) == ["reborn"]


def test_two_names_of_one_file_are_read_once(tmp_path: Path) -> None:
    append(tmp_path / "app.log", "x\n")
    os.symlink(tmp_path / "app.log", tmp_path / "current.log")
    with tailer(tmp_path) as t:
        assert texts(t.poll()) == ["x"]


# -- checkpoints and restarts ---------------------------------------------------------------------------------------


def test_checkpoint_records_identity_and_the_last_complete_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "1\n2\npartial")
    store = MemoryOffsetStore()
    with tailer(tmp_path, store) as t:
        t.checkpoint()  # before any pass: nothing to record, nothing erased
        assert store.load("t") == {}
        t.poll()
        t.checkpoint()
    (cp,) = store.load("t").values()
    st = log.stat()
    assert cp.path == str(log)
    assert cp.offset == 4
    assert (cp.identity.dev, cp.identity.inode) == (st.st_dev, st.st_ino)
    assert len(cp.identity.head_hash) == 40
    append(log, " line\n")
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["partial line"]


def test_restart_with_a_recycled_inode_starts_over(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "old 1\nold 2\n")
    store = MemoryOffsetStore()
    with tailer(tmp_path, store) as t:
        t.poll()
        t.checkpoint()
    (cp,) = store.load("t").values()
    # Pretend the new file got the old inode: same dev and inode, different content.
    log.unlink()
    append(log, "brand new file\n")
    st = log.stat()
    forged = Checkpoint(str(log), FileIdentity(st.st_dev, st.st_ino, cp.identity.head_hash), cp.offset)
    store.save("t", [forged])
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["brand new file"]


def test_restart_after_rotation_while_down_finishes_the_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    store = JsonFileOffsetStore(tmp_path / "state" / "offsets.json")
    append(log, "1\n2\n")
    with tailer(tmp_path, store, start_at="end") as t:
        assert t.poll() == []
        append(log, "3\n")
        assert texts(t.poll()) == ["3"]
        t.checkpoint()
    append(log, "4\n5\n")
    os.rename(log, tmp_path / "app.log.1")
    append(log, "6\n")
    with tailer(tmp_path, store, start_at="end") as t:
        assert texts(t.poll()) == ["4", "5", "6"]


def test_restart_after_copytruncate_while_down_reads_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    store = MemoryOffsetStore()
    append(log, "1\n2\n")
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["1", "2"]
        t.checkpoint()
    append(log, "3\n4\n")
    shutil.copyfile(log, tmp_path / "app.log-20261126")
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append(log, "5\n")
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["3", "4", "5"]


def test_a_file_that_appeared_while_down_is_read_from_its_beginning(tmp_path: Path) -> None:
    store = MemoryOffsetStore()
    append(tmp_path / "a.log", "a\n")
    with tailer(tmp_path, store, start_at="end") as t:
        t.poll()
        t.checkpoint()
    append(tmp_path / "b.log", "b 1\n")
    with tailer(tmp_path, store, start_at="end") as t:
        assert texts(t.poll()) == ["b 1"]


def test_json_offset_store_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "offsets.json"
    store = JsonFileOffsetStore(path)
    assert store.load("w") == {}
    cp = Checkpoint("/var/log/a.log", FileIdentity(1, 2, "ab" * 20), 42)
    store.save("w", [cp])
    store.save("other", [])
    assert JsonFileOffsetStore(path).load("w") == {"/var/log/a.log": cp}
    assert JsonFileOffsetStore(path).load("other") == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offsets.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["watchers"]["w"][0]["offset"] == 42


class _Writer:
    """Writes numbered lines to app.log and rotates it like logrotate would."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.log = directory / "app.log"
        self.n = 0

    def write(self, count: int) -> None:
        with open(self.log, "ab") as fh:
            for _ in range(count):
                fh.write(f"line {self.n:06d}\n".encode())
                self.n += 1

    def rename(self) -> None:
        for i in (3, 2, 1):
            src = self.dir / f"app.log.{i}"
            if src.exists():
                os.replace(src, self.dir / f"app.log.{i + 1}")
        os.replace(self.log, self.dir / "app.log.1")
        self.log.touch()

    def copytruncate(self) -> None:
        for i in (3, 2, 1):
            src = self.dir / f"app.log.{i}"
            if src.exists():
                os.replace(src, self.dir / f"app.log.{i + 1}")
        shutil.copyfile(self.log, self.dir / "app.log.1")
        with open(self.log, "r+b") as fh:
            fh.truncate(0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_line_exactly_once_across_rotations_and_restarts(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = JsonFileOffsetStore(tmp_path / "offsets.json")
    logs = tmp_path / "logs"
    logs.mkdir()
    writer = _Writer(logs)
    seen: Counter[str] = Counter()
    t = Tailer("w", [str(logs / "*.log")], offsets=store, start_at="beginning")
    restarts = rotations_down = rotations_live = 0
    for _ in range(60):
        # A copytruncate is only recognisable in a file something was read from (its first bytes are known):
        # an unread file truncated and rewritten looks like one that grew. So each round reads a little first.
        writer.write(rng.randrange(1, 20))
        seen.update(texts(t.poll()))
        writer.write(rng.randrange(0, 40))
        action = rng.choice(["poll", "poll", "rename", "copytruncate", "restart"])
        if action in ("rename", "copytruncate"):
            getattr(writer, action)()
            writer.write(rng.randrange(0, 5))
            rotations_live += 1
        elif action == "restart":
            seen.update(texts(t.poll()))
            t.checkpoint()  # the lines above are handled: only then is their offset saved
            t.close()
            writer.write(rng.randrange(0, 20))
            if rng.random() < 0.6:  # rotated while the watcher was down
                getattr(writer, rng.choice(["rename", "copytruncate"]))()
                rotations_down += 1
            writer.write(rng.randrange(0, 20))
            t = Tailer("w", [str(logs / "*.log")], offsets=store, start_at="beginning")
            restarts += 1
        seen.update(texts(t.poll()))
    seen.update(texts(t.poll()))
    t.close()
    assert restarts and rotations_down and rotations_live
    expected = {f"line {i:06d}" for i in range(writer.n)}
    assert set(seen) == expected, sorted(expected - set(seen))[:5]
    assert [k for k, v in seen.items() if v != 1] == []
    assert sum(seen.values()) == writer.n


def test_a_pass_reads_at_most_max_poll_bytes_per_file(tmp_path: Path) -> None:
    append(tmp_path / "app.log", "".join(f"{i:09d}\n" for i in range(1000)))
    with tailer(tmp_path, max_poll_bytes=4000, read_chunk=1000) as t:
        first = t.poll()
        assert len(first) == 400 and t.backlog
        rest: list[Line] = []
        while t.backlog:
            rest += t.poll()
    assert texts(first + rest) == [f"{i:09d}" for i in range(1000)]


# -- follow ---------------------------------------------------------------------------------------------------------


async def _wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


def test_follow_with_inotify_delivers_an_appended_line_long_before_a_poll(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.touch()
    got: list[Line] = []

    async def on_lines(lines: list[Line]) -> None:
        got.extend(lines)

    async def main() -> float:
        stop = asyncio.Event()
        t = tailer(tmp_path)
        # A 60 s polling interval: anything that arrives sooner came through inotify.
        task = asyncio.create_task(follow(t, on_lines=on_lines, stop=stop, poll_interval=60))
        # The watch starts in the background: write until a line arrives to know it is live.
        deadline = time.monotonic() + 10
        i = 0
        while not got:
            assert time.monotonic() < deadline, "inotify never reported a change"
            append(log, f"warm up {i}\n")
            i += 1
            await asyncio.sleep(0.02)
        await _wait_for(lambda: len(got) == i, 5)
        started = time.monotonic()
        append(log, "ERROR: Pipeline timeout after 300 seconds\n")
        await _wait_for(lambda: got[-1].text.startswith("ERROR"), 5)
        latency = time.monotonic() - started
        stop.set()
        await asyncio.wait_for(task, 5)
        t.close()
        return latency

    latency = asyncio.run(main())
    assert latency < 1.0
    assert got[-1].text == "ERROR: Pipeline timeout after 300 seconds"


def test_follow_by_polling_only_and_checkpoints_on_stop(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "before start\n")
    store = MemoryOffsetStore()
    got: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        t = tailer(tmp_path, store)
        task = asyncio.create_task(
            follow(
                t,
                on_lines=lambda lines: got.extend(texts(lines)),
                stop=stop,
                use_inotify=False,
                poll_interval=0.02,
                checkpoint_every=3600,
            )
        )
        await _wait_for(lambda: got == ["before start"], 5)
        append(log, "appended\n")
        await _wait_for(lambda: got == ["before start", "appended"], 5)
        stop.set()
        await asyncio.wait_for(task, 5)
        t.close()

    asyncio.run(main())
    append(log, "after restart\n")
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["after restart"]


def test_follow_does_not_checkpoint_a_batch_whose_handler_failed(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    append(log, "poison\n")
    store = MemoryOffsetStore()

    def on_lines(lines: list[Line]) -> None:
        raise RuntimeError("handler failed")

    async def main() -> None:
        with tailer(tmp_path, store) as t:
            await follow(t, on_lines=on_lines, stop=asyncio.Event(), use_inotify=False, checkpoint_every=0)

    with pytest.raises(RuntimeError, match="handler failed"):
        asyncio.run(main())
    with tailer(tmp_path, store) as t:
        assert texts(t.poll()) == ["poison"]
