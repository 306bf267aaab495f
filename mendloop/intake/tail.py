"""`tail -F` over a set of glob patterns: complete lines, in order per file, checkpointed so a restart neither misses
nor repeats a line.

Files are known by identity (device, inode and a hash of their first bytes), not by name, so a file renamed by a
rotation is finished through the handle already open before its replacement is read, a copytruncated file is told
from a fresh one, and a recycled inode is not mistaken for the file that was checkpointed.

Around it: `discovery` (which files, and what a rotation left behind), `lines` (what a line is), `offsets` (where
checkpoints are kept) and `follow` (the loop that polls on inotify changes and checkpoints).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mendloop.domain.checkpoints import HEAD_BYTES, Checkpoint, FileIdentity, head_hash
from mendloop.errors import ConfigError
from mendloop.intake.discovery import expand, head_matches, pattern_roots, rotated_copy, siblings
from mendloop.intake.lines import Line, strip_ansi
from mendloop.intake.offsets import OffsetStore

log = logging.getLogger(__name__)

_TAIL_BYTES = 64
# How much of what was read just before the current position is kept to recognise the copy of a copytruncated file.

_RECENT_NS = 2_000_000_000


@dataclass(eq=False)
class _Source:
    """A file being followed, through a handle that stays valid when the file is renamed or deleted."""

    path: str
    fd: int
    dev: int
    inode: int
    read_pos: int  # next byte to read
    offset: int  # end of the last line delivered: what a checkpoint records
    head: bytes  # the file's first min(HEAD_BYTES, read_pos) bytes
    tail: bytes = b""  # the bytes just before read_pos
    buf: bytearray = field(default_factory=bytearray)  # the pending line's bytes so far, at most max_line_bytes
    skipping: bool = False  # the pending line outgrew max_line_bytes: the rest of it is discarded
    last_size: int = -1
    last_mtime_ns: int = -1
    last_data: float = 0.0
    real_dir: str = ""  # the directory of the file behind a symlink, where inotify sees its writes

    def reset(self) -> None:
        self.read_pos = self.offset = 0
        self.head = self.tail = b""
        self.buf = bytearray()
        self.skipping = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _still_linked(src: _Source) -> bool:
    """The file still has a name somewhere (renamed, not deleted): a deleted one is finished at once."""
    try:
        return os.fstat(src.fd).st_nlink > 0
    except OSError:
        return False


def _holds_what_was_read(fd: int, src: _Source) -> bool:
    """The file open at `fd` has `src`'s first bytes and, just before `src.read_pos`, the bytes read last: the file
    `src` was reading, unchanged (or its copy, after a copytruncate)."""
    if src.head and os.pread(fd, len(src.head), 0) != src.head:
        return False
    return not src.tail or os.pread(fd, len(src.tail), src.read_pos - len(src.tail)) == src.tail


def _utf8_keep(data: bytes | bytearray) -> int:
    """How many bytes of `data` to keep so that a cut does not leave half a UTF-8 character at its end."""
    n = len(data)
    i = n - 1
    while i >= 0 and n - i <= 3 and 0x80 <= data[i] < 0xC0:
        i -= 1
    if i < 0:
        return n
    lead = data[i]
    need = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1
    return i if need > n - i else n


class Tailer:
    """Follows every regular file matching `patterns`; `poll()` reads what was appended since the last call.

    On the very first run (no checkpoints) files are read from `start_at`; a file that appears later, or that
    appeared while the watcher was down, is read from its beginning. `partial_line_timeout` (seconds) delivers a
    line still missing its newline after that long without new data; None waits for the newline. A pass reads at
    most `max_poll_bytes` of each file (then `backlog` is true), so one pass over a big backlog does not hold the
    event loop for long; a rotated or deleted file is always finished in one pass.
    """

    def __init__(
        self,
        name: str,
        patterns: Sequence[str],
        *,
        offsets: OffsetStore,
        start_at: Literal["end", "beginning"] = "end",
        max_line_bytes: int = 65536,
        read_chunk: int = 1 << 20,
        clock: Callable[[], float] = time.time,
        partial_line_timeout: float | None = None,
        max_poll_bytes: int = 8 << 20,
    ) -> None:
        if isinstance(patterns, str):
            raise ConfigError(f"watcher {name!r}: paths must be a list of patterns, not a string")
        if not patterns:
            raise ConfigError(f"watcher {name!r}: no paths to watch")
        if start_at not in ("end", "beginning"):
            raise ConfigError(f"watcher {name!r}: start_at must be 'end' or 'beginning', not {start_at!r}")
        for label, value in (
            ("max_line_bytes", max_line_bytes),
            ("read_chunk", read_chunk),
            ("max_poll_bytes", max_poll_bytes),
        ):
            if value <= 0:
                raise ConfigError(f"watcher {name!r}: {label} must be positive")
        self.name = name
        # Absolute patterns: checkpoints are keyed by path and must mean the same file whatever the working directory.
        self.patterns = [os.path.abspath(os.path.expanduser(p)) for p in patterns]
        self.max_line_bytes = max_line_bytes
        self.read_chunk = read_chunk
        self.partial_line_timeout = partial_line_timeout
        self.max_poll_bytes = max_poll_bytes
        self._start_at = start_at
        self._clock = clock
        self._store = offsets
        self._saved = offsets.load(name)
        self._resuming = bool(self._saved)
        self._sources: dict[str, _Source] = {}
        self._polled = False
        self._backlog = False
        self._unreadable: set[str] = set()

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def backlog(self) -> bool:
        """The last poll stopped at `max_poll_bytes` for some file: poll again without waiting."""
        return self._backlog

    def watch_dirs(self) -> list[tuple[str, bool]]:
        """(directory, recursive) pairs whose changes can concern the patterns: the fixed part of each pattern, and
        the directories of symlink targets (writes to a target do not show up in the link's directory)."""
        dirs = pattern_roots(self.patterns)
        for path, src in self._sources.items():
            if src.real_dir != os.path.dirname(path):
                dirs.setdefault(src.real_dir, False)
        return sorted(dirs.items())

    def poll(self) -> list[Line]:
        """One pass: pick up new files, notice rotation, truncation and deletion, and return the complete lines
        written since the last pass, in file order for each file."""
        now = self._clock()
        out: list[Line] = []
        self._backlog = False
        found = expand(self.patterns)
        first = not self._polled
        self._polled = True
        by_inode: dict[tuple[int, int], str] = {}
        for path, st in found.items():
            by_inode.setdefault((st.st_dev, st.st_ino), path)

        # Files that left their path: renamed to another watched path (continue there), or rotated away or deleted
        # (finish through the open handle, before anything new at that path is read).
        kept: dict[str, _Source] = {}
        orphans: list[_Source] = []
        for path, src in sorted(self._sources.items()):
            now_at = found.get(path)
            if now_at is not None and (now_at.st_dev, now_at.st_ino) == (src.dev, src.inode):
                kept[path] = src
                continue
            target = by_inode.get((src.dev, src.inode))
            if target is not None and target not in kept:
                src.path = target
                kept[target] = src
            elif now_at is None and _still_linked(src):
                # tail -F: rotated away and nothing has replaced it yet, so its writer may still be appending
                # through its own handle (the rename wakes us before the writes that follow it): keep reading it
                # under its path until a new file appears there.
                kept[path] = src
            else:
                orphans.append(src)
        for src in orphans:
            self._finish(src, out, now)
        self._sources = kept

        fresh = sorted(p for p in found if p not in self._sources)
        taken = {(src.dev, src.inode) for src in self._sources.values()}
        starts = self._match_checkpoints(found, fresh, taken) if self._saved else {}
        if first and self._saved:
            self._recover_rotated(found, out, now)
        for path in sorted(self._sources):
            self._read(self._sources[path], found.get(path), out, now)
        # Only the very first run honours start_at: a file without a checkpoint on a later run appeared while the
        # watcher was down, and one that appears while it runs is new; both are read from their beginning.
        policy: Literal["end", "beginning"] = self._start_at if first and not self._resuming else "beginning"
        for path in fresh:
            st = found[path]
            if (st.st_dev, st.st_ino) in taken:
                continue  # another name (hard link, symlink) of a file already followed
            taken.add((st.st_dev, st.st_ino))
            new = self._open(path, starts.get(path), policy)
            if new is None:
                continue
            self._sources[path] = new
            self._read(new, None, out, now)
        return out

    @property
    def files(self) -> list[str]:
        """The paths of the files followed now."""
        return sorted(self._sources)

    def checkpoints(self, hold: Mapping[str, int] | None = None) -> list[Checkpoint]:
        """Where every followed file has been delivered. `hold` maps a path to an offset not to checkpoint past:
        the start of lines the caller was given but has not handled yet (a traceback still being grouped)."""
        cps = []
        for src in self._sources.values():
            offset = src.offset
            held = hold.get(src.path) if hold else None
            if held is not None and 0 <= held < offset:
                offset = held
            identity = FileIdentity(src.dev, src.inode, head_hash(src.head[: min(HEAD_BYTES, offset)]))
            cps.append(Checkpoint(src.path, identity, offset))
        return cps

    def checkpoint(self, hold: Mapping[str, int] | None = None) -> None:
        """Save how far every followed file has been delivered: call it only once the lines `poll` returned are
        safely handled, since after a restart the tailer resumes exactly there. `hold`: see `checkpoints`."""
        if not self._polled:
            return  # nothing was read: keep what is stored
        self._store.save(self.name, self.checkpoints(hold))

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def __enter__(self) -> Tailer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- discovery ---------------------------------------------------------------------------------------------

    def _match_checkpoints(
        self, found: dict[str, os.stat_result], fresh: list[str], taken: set[tuple[int, int]]
    ) -> dict[str, int]:
        """Path → offset for each new path holding a checkpointed file (under its name, or another one when the
        patterns also match rotated names). A checkpoint that matches nothing stays, in case its file comes back."""
        starts: dict[str, int] = {}
        for path in fresh:
            st = found[path]
            if (st.st_dev, st.st_ino) in taken:
                continue
            candidates = ([self._saved[path]] if path in self._saved else []) + [
                c for p, c in self._saved.items() if p != path
            ]
            for cp in candidates:
                if (cp.identity.dev, cp.identity.inode) == (st.st_dev, st.st_ino) and head_matches(path, cp):
                    starts[path] = cp.offset
                    del self._saved[cp.path]
                    break
        return starts

    def _recover_rotated(self, found: dict[str, os.stat_result], out: list[Line], now: float) -> None:
        """First pass after a restart: a checkpointed file that is no longer at its path was rotated while the
        watcher was down; finish it from its checkpoint before the path's new file is read from the beginning."""
        for cp_path, cp in sorted(self._saved.items()):
            if not any(fnmatch.fnmatchcase(cp_path, p) for p in self.patterns):
                del self._saved[cp_path]  # the configuration no longer watches it
                continue
            current = found.get(cp_path)
            rotated = rotated_copy(cp_path, cp, current, exclude=set(found))
            if rotated is not None:
                del self._saved[cp_path]
                self._drain_path(cp_path, rotated, cp.offset, out, now)
            elif current is not None:
                del self._saved[cp_path]
                log.warning(
                    "watcher %s: %s was replaced while stopped and the rotated file is not next to it: lines after "
                    "offset %d of the old file are lost",
                    self.name,
                    cp_path,
                    cp.offset,
                )
            else:
                # Kept in memory only: if the file comes back (a directory remounted), it resumes where it was.
                log.info("watcher %s: checkpointed %s is gone and was not found rotated", self.name, cp_path)

    # -- reading -----------------------------------------------------------------------------------------------

    def _open(self, path: str, start: int | None, policy: Literal["end", "beginning"]) -> _Source | None:
        # The handle's own stat is the truth: the path may have been replaced since the listing.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning("watcher %s: cannot open %s: %s", self.name, path, e)
            return None
        self._unreadable.discard(path)
        try:
            fst = os.fstat(fd)
            if start is None:
                start = self._line_start_before(fd, fst.st_size) if policy == "end" else 0
            head = os.pread(fd, min(HEAD_BYTES, start), 0) if start else b""
            tail = os.pread(fd, min(_TAIL_BYTES, start), start - min(_TAIL_BYTES, start)) if start else b""
        except OSError as e:
            os.close(fd)
            log.warning("watcher %s: cannot read %s: %s", self.name, path, e)
            return None
        return _Source(
            path=path,
            fd=fd,
            dev=fst.st_dev,
            inode=fst.st_ino,
            read_pos=start,
            offset=start,
            head=head,
            tail=tail,
            last_size=fst.st_size,
            last_mtime_ns=fst.st_mtime_ns,
            real_dir=os.path.dirname(os.path.realpath(path)),
            last_data=self._clock(),
        )

    def _line_start_before(self, fd: int, size: int) -> int:
        """Where the line being written at `size` starts, so starting at the end never yields half a line."""
        window = min(size, self.max_line_bytes + 1)
        data = os.pread(fd, window, size - window)
        nl = data.rfind(b"\n")
        if nl >= 0:
            return size - window + nl + 1
        return 0 if window == size else size

    def _read(self, src: _Source, st: os.stat_result | None, out: list[Line], now: float) -> None:
        try:
            if st is None:
                st = os.fstat(src.fd)
            size = st.st_size
            # Written to since the last pass (it grew, its mtime moved, or its mtime is too recent to tell, being
            # as coarse as a few ms): check that what was already read is still there; a file truncated and
            # rewritten since (copytruncate) has other bytes there, even when it is as long as before.
            written = (
                size != src.last_size
                or st.st_mtime_ns != src.last_mtime_ns
                or time.time_ns() - st.st_mtime_ns < _RECENT_NS
            )
            if size < src.read_pos or (written and not _holds_what_was_read(src.fd, src)):
                # Truncated (copytruncate or `> file`), maybe already rewritten: what was written before the
                # truncation and never read is in the copy, if there is one; then the file restarts at 0.
                self._from_copy(src, out, now)
                self._flush_partial(src, out, now)
                src.reset()
            src.last_size, src.last_mtime_ns = size, st.st_mtime_ns
            self._read_to_eof(src, out, now, self.max_poll_bytes)
            self._flush_stale_partial(src, out, now)
        except OSError as e:
            log.warning("watcher %s: cannot read %s: %s", self.name, src.path, e)

    def _read_to_eof(self, src: _Source, out: list[Line], now: float, budget: int | None) -> None:
        while budget is None or budget > 0:
            want = self.read_chunk if budget is None else min(self.read_chunk, budget)
            data = os.pread(src.fd, want, src.read_pos)
            if not data:
                return
            self._consume(src, data, out, now)
            if budget is not None:
                budget -= len(data)
        self._backlog = True

    def _consume(self, src: _Source, data: bytes, out: list[Line], now: float) -> None:
        base = src.read_pos
        if len(src.head) < HEAD_BYTES and len(src.head) == base:
            src.head += data[: HEAD_BYTES - len(src.head)]
        src.tail = data[-_TAIL_BYTES:] if len(data) >= _TAIL_BYTES else (src.tail + data)[-_TAIL_BYTES:]
        src.last_data = now
        parts = data.split(b"\n")
        pos = base
        limit = self.max_line_bytes
        for part in parts[:-1]:
            end = pos + len(part) + 1
            if not src.buf and not src.skipping and len(part) <= limit and b"\x00" not in part:
                # The common case, a whole line inside one read: no copy into the buffer.
                out.append(self._line(src.path, part, src.offset, end, False, now))
            else:
                self._append(src, part)
                out.append(self._line(src.path, src.buf, src.offset, end, src.skipping, now))
                src.buf = bytearray()
                src.skipping = False
            src.offset = end
            pos = end
        self._append(src, parts[-1])
        src.read_pos = pos + len(parts[-1])

    def _append(self, src: _Source, part: bytes) -> None:
        if src.skipping or not part:
            return
        if b"\x00" in part:
            # NUL bytes are padding (a writer without O_APPEND after a truncation) or garbage, and PostgreSQL text
            # cannot hold them: drop them before they count towards the line's length.
            part = part.replace(b"\x00", b"")
        room = self.max_line_bytes - len(src.buf)
        if len(part) <= room:
            src.buf += part
        else:
            src.buf += part[:room]
            src.skipping = True  # keep only the beginning; the rest of the line is skipped up to its newline

    def _line(self, path: str, raw: bytes | bytearray, offset: int, end: int, truncated: bool, now: float) -> Line:
        if truncated:
            raw = raw[: _utf8_keep(raw)]
        text = raw.decode("utf-8", "replace")
        if text.endswith("\r"):
            text = text[:-1]
        return Line(path, strip_ansi(text), offset, end, truncated, now)

    def _flush_partial(self, src: _Source, out: list[Line], now: float) -> None:
        """Deliver the pending unterminated line (the file ended for good, or waited too long)."""
        if src.read_pos > src.offset:
            if src.buf or src.skipping:
                out.append(self._line(src.path, src.buf, src.offset, src.read_pos, src.skipping, now))
            src.offset = src.read_pos
        src.buf = bytearray()
        src.skipping = False

    def _flush_stale_partial(self, src: _Source, out: list[Line], now: float) -> None:
        timeout = self.partial_line_timeout
        if timeout is not None and src.read_pos > src.offset and now - src.last_data >= timeout:
            self._flush_partial(src, out, now)

    def _finish(self, src: _Source, out: list[Line], now: float) -> None:
        """Read a file that left its path up to its end, deliver its last line even without a newline, close it."""
        try:
            self._read_to_eof(src, out, now, None)
        except OSError as e:
            log.warning("watcher %s: cannot finish %s: %s", self.name, src.path, e)
        self._flush_partial(src, out, now)
        src.close()

    def _from_copy(self, src: _Source, out: list[Line], now: float) -> None:
        """After a truncation: read the rest of what we had been reading from the copy a copytruncate made."""
        if not src.head or src.read_pos == 0:
            return
        for sib, st in siblings(src.path, set()):
            if (st.st_dev, st.st_ino) == (src.dev, src.inode) or st.st_size <= src.read_pos:
                continue
            try:
                fd = os.open(sib, os.O_RDONLY)
            except OSError:
                continue
            try:
                if not _holds_what_was_read(fd, src):
                    continue
                copy = _Source(src.path, fd, st.st_dev, st.st_ino, src.read_pos, src.offset, src.head, src.tail)
                copy.buf, copy.skipping = src.buf, src.skipping
                self._read_to_eof(copy, out, now, None)
                src.read_pos, src.offset, src.buf, src.skipping = copy.read_pos, copy.offset, copy.buf, copy.skipping
                return
            except OSError:
                continue
            finally:
                os.close(fd)

    def _drain_path(self, path: str, file: str, offset: int, out: list[Line], now: float) -> None:
        """Finish, under its watched `path`, a file rotated away while the watcher was down."""
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as e:
            log.warning("watcher %s: cannot open the rotated %s: %s", self.name, file, e)
            return
        fst = os.fstat(fd)
        head = os.pread(fd, min(HEAD_BYTES, offset), 0)
        log.info(
            "watcher %s: finishing %s (rotated from %s while stopped) from offset %d", self.name, file, path, offset
        )
        self._finish(_Source(path, fd, fst.st_dev, fst.st_ino, offset, offset, head), out, now)
