"""Many log patterns matched at once over whole chunks of lines.

Two stages, so that the expensive part never runs per line in Python:

1. **Find candidates**: one multi-pattern engine scans the whole chunk and says which (line, pattern) pairs may
   match. Hyperscan (block mode, one database for every pattern) when importable, else RE2's `Set` over blocks of
   lines, else Python `re`, one pattern at a time over the whole chunk (the slow fallback: one big alternation
   would be far slower still). A candidate set may hold false positives, never a false negative.
2. **Confirm and extract**: Python `re` runs on that ONE line, for that ONE pattern, and its named groups become
   the match's fields. Because this stage is the same for every engine, every engine gives the same matches.

Semantics, the same whatever the engine: a pattern is a Python regex matched against one line (`search`), with
`^`/`$` at the line's start and end. `\\d \\w \\s \\b` are ASCII (as in RE2 and Hyperscan; Unicode classes would
make Hyperscan's compile 14 times slower); `.` and literals are Unicode code points. A line is the text between two
`\\n`; a `\\r` before the `\\n` stays on the line. Invalid UTF-8 is replaced (U+FFFD) in the line reported.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from mendloop.errors import ConfigError

Engine = Literal["auto", "hyperscan", "re2", "re"]

# How much of a chunk one RE2 `Set.Match` call reads. Small blocks: few patterns hit a block, so locating their
# lines re-reads little; large blocks: fewer calls from Python. 4-16 KiB measured best with bench/scan.py.
_RE2_BLOCK = 8 * 1024
# Memory for the DFA of the whole set: with too little, RE2 refuses to compile a large set, or its DFA runs out
# in the middle of a scan and Set.Match reports nothing for that block. 200 patterns need well under 8 MiB.
_RE2_SET_MAX_MEM = 256 << 20

_VERIFY_FLAGS = re.ASCII | re.MULTILINE


@dataclass(frozen=True)
class Pattern:
    """One configured pattern: `regex` is a Python regex; its named groups become the event's fields."""

    name: str
    regex: str
    event_type: str
    error_type: str | None = None
    severity: str = "error"
    # Static fields added to every event of this pattern; not hashed, so a Pattern stays hashable.
    fields: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The watcher's own log prefix (`prefix:`), stripped before fingerprinting; None: the common formats.
    prefix: str | None = None


@dataclass(frozen=True)
class Match:
    """One line that one pattern matched."""

    pattern: Pattern
    # The whole line (for `scan_lines`, the whole record given, which may span several lines).
    line: str
    # `scan`: byte offset of the line in the chunk. `scan_lines`: index of the record in the sequence given.
    line_start: int
    groups: dict[str, str] = field(hash=False)


class _Buffer:
    """The bytes an engine scans (valid UTF-8, the same length as the chunk) and, on demand, their text."""

    def __init__(self, chunk: bytes) -> None:
        self.ascii = chunk.isascii()
        self._text: str | None = None
        if self.ascii:
            self.data = chunk
            return
        try:
            self._text = chunk.decode("utf-8")
            self.data = chunk
        except UnicodeDecodeError:
            # Hyperscan in UTF-8 mode must never see invalid UTF-8. Each invalid byte becomes one "?", so every
            # offset still points at the same line of the original chunk.
            self._text = chunk.decode("utf-8", "surrogateescape").encode("utf-8", "replace").decode("utf-8")
            self.data = self._text.encode("utf-8")

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode("ascii")
        return self._text

    def byte_offsets(self, char_offsets: Iterable[int]) -> dict[int, int]:
        """Character offsets in `text` → byte offsets in `data`."""
        if self.ascii:
            return {c: c for c in char_offsets}
        text = self.text
        out: dict[int, int] = {}
        chars = nbytes = 0
        for c in sorted(set(char_offsets)):
            nbytes += len(text[chars:c].encode("utf-8"))
            chars = c
            out[c] = nbytes
        return out


class _Finder(Protocol):
    """Stage 1: (byte offset of a line's start, pattern index) pairs that may match; a superset of the matches."""

    def candidates(self, buf: _Buffer, bounds: Sequence[int] | None, out: set[tuple[int, int]]) -> None: ...


class Matcher:
    """Built once from the configured patterns; `scan` is safe to call from several threads."""

    def __init__(
        self,
        patterns: Sequence[Pattern],
        verifiers: Sequence[re.Pattern[str]],
        engine_name: str,
        finders: Sequence[_Finder],
        slow: Sequence[str],
    ) -> None:
        # Use Matcher.build.
        self._patterns = tuple(patterns)
        self._verifiers = tuple(verifiers)
        self._engine_name = engine_name
        self._finders = tuple(finders)
        self._slow = tuple(slow)

    @classmethod
    def build(cls, patterns: Sequence[Pattern], engine: Engine = "auto") -> Matcher:
        """Compile every pattern once. Raises ConfigError naming the first pattern that cannot compile."""
        patterns = list(patterns)
        verifiers = [_verifier(p) for p in patterns]
        sources = [_engine_source(p.regex) for p in patterns]
        if engine == "auto":
            for candidate in ("hyperscan", "re2"):
                try:
                    return cls._build_with(candidate, patterns, verifiers, sources)
                except _EngineUnavailable:
                    continue
            return cls._build_with("re", patterns, verifiers, sources)
        try:
            return cls._build_with(engine, patterns, verifiers, sources)
        except _EngineUnavailable as e:
            raise ConfigError(f"matching engine {engine!r} is not available here: {e}", engine=engine) from e

    @classmethod
    def _build_with(
        cls, engine: str, patterns: list[Pattern], verifiers: list[re.Pattern[str]], sources: list[str]
    ) -> Matcher:
        ids = list(range(len(patterns)))
        if engine == "re":
            return cls(patterns, verifiers, "re", [_ReFinder(ids, sources, verifiers)], [])
        if engine == "hyperscan":
            fast: _Finder
            fast, unsupported = _HyperscanFinder.build(patterns, sources)
        elif engine == "re2":
            fast, unsupported = _Re2Finder.build(patterns, sources)
        else:
            raise ConfigError(f"unknown matching engine {engine!r}; choose auto, hyperscan, re2 or re", engine=engine)
        finders: list[_Finder] = [fast]
        if unsupported:
            # Valid Python regexes the engine cannot take (lookarounds, backreferences in RE2, ...): still
            # matched, by the slow path, so that a config means the same thing on every host.
            finders.append(_ReFinder(unsupported, sources, verifiers))
        return cls(patterns, verifiers, engine, finders, [patterns[i].name for i in unsupported])

    @property
    def engine_name(self) -> str:
        return self._engine_name

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return self._patterns

    @property
    def slow_patterns(self) -> tuple[str, ...]:
        """Names of the patterns the engine could not compile, matched one by one with Python `re` instead."""
        return self._slow

    def scan(self, chunk: bytes) -> list[Match]:
        """Every (line, pattern) match in a chunk of newline-separated lines, by line then pattern order."""
        if not chunk or not self._patterns:
            return []
        buf = _Buffer(chunk)
        found: set[tuple[int, int]] = set()
        for finder in self._finders:
            finder.candidates(buf, None, found)
        out: list[Match] = []
        lines: dict[int, str] = {}
        for start, pid in sorted(found):
            line = lines.get(start)
            if line is None:
                end = chunk.find(b"\n", start)
                line = lines[start] = chunk[start : end if end >= 0 else len(chunk)].decode("utf-8", "replace")
            m = self._verifiers[pid].search(line)
            if m is not None:
                out.append(Match(self._patterns[pid], line, start, _groups(m)))
        return out

    def scan_lines(self, lines: Sequence[str]) -> list[Match]:
        """Each record of `lines` matched as a unit (a record may hold several lines, e.g. a traceback: `^`/`$`
        match at each of its lines). `Match.line` is the record itself and `Match.line_start` its index."""
        if not lines or not self._patterns:
            return []
        encoded = [s.encode("utf-8", "replace") for s in lines]
        starts: list[int] = []
        at = 0
        for e in encoded:
            starts.append(at)
            at += len(e) + 1
        buf = _Buffer(b"\n".join(encoded))
        found: set[tuple[int, int]] = set()
        for finder in self._finders:
            finder.candidates(buf, starts, found)
        records = sorted({(bisect_right(starts, start) - 1, pid) for start, pid in found})
        out: list[Match] = []
        for index, pid in records:
            m = self._verifiers[pid].search(lines[index])
            if m is not None:
                out.append(Match(self._patterns[pid], lines[index], index, _groups(m)))
        return out


class RecordingMatcher(Matcher):
    """A matcher that keeps the matches of its last `scan_lines` (`matches`, `Match.line_start` the index of each
    record): code that builds one result per match, in order (`LogIntake.detect_lines`), can then be told which
    record each result came from. One per batch and thread: it shares the compiled engines, not its `matches`."""

    def __init__(self, inner: Matcher) -> None:
        super().__init__(inner._patterns, inner._verifiers, inner._engine_name, inner._finders, inner._slow)
        self.matches: list[Match] = []

    def scan_lines(self, lines: Sequence[str]) -> list[Match]:
        self.matches = super().scan_lines(lines)
        return self.matches


class _EngineUnavailable(Exception):
    pass


def _groups(m: re.Match[str]) -> dict[str, str]:
    return {k: v for k, v in m.groupdict().items() if v is not None}


def _verifier(p: Pattern) -> re.Pattern[str]:
    try:
        rx = re.compile(p.regex, _VERIFY_FLAGS)
    except (re.error, ValueError) as e:
        raise ConfigError(f"pattern {p.name!r}: invalid regex {p.regex!r}: {e}", pattern=p.name) from e
    if rx.search("") is not None:
        # It would fire on every empty line at least (`.*`, `\d*`): nobody means that, and Hyperscan refuses it.
        raise ConfigError(
            f"pattern {p.name!r}: regex {p.regex!r} matches an empty line; make it require some text",
            pattern=p.name,
        )
    return rx


def _engine_source(regex: str) -> str:
    """The regex as the scanning engines should see it: Python's `\\A`/`\\Z` become line anchors (engines scan a
    whole chunk, Python confirms on the line alone) and Python's `{,n}` becomes `{0,n}` (PCRE and RE2 read
    `{,n}` as literal text)."""
    out: list[str] = []
    i, n = 0, len(regex)
    in_class = False
    class_start = 0
    while i < n:
        ch = regex[i]
        if ch == "\\" and i + 1 < n:
            nxt = regex[i + 1]
            out.append({"A": "^", "Z": "$"}.get(nxt, regex[i : i + 2]) if not in_class else regex[i : i + 2])
            i += 2
            continue
        if in_class:
            # A "]" right after "[" or "[^" is a literal member, not the end of the class.
            if ch == "]" and i > class_start:
                in_class = False
        elif ch == "[":
            in_class = True
            class_start = i + 2 if regex.startswith("[^", i) else i + 1
        elif ch == "{" and i > 0:
            m = re.match(r"\{,(\d+)\}", regex[i:])
            if m:
                out.append("{0," + m.group(1) + "}")
                i += m.end()
                continue
        out.append(ch)
        i += 1
    rewritten = "".join(out)
    try:
        re.compile(rewritten)
    except re.error:
        return regex
    return rewritten


def _trim_tail(source: str) -> str:
    """Hyperscan reports every end offset of every match: a pattern ending in `.+` or `\\S+` reports once per
    character of each line it matches, a Python call each (a storm of matching lines gets 4x slower). Ending the
    pattern after the first character of that run (`X.+` → `X.`, `X\\d*` → `X`) matches the same lines; stage 2
    takes the groups from the real pattern."""
    core = source.rstrip(")")
    closers = source[len(core) :]
    if (len(core) - len(core.rstrip("\\"))) % 2:
        return source  # the last ")" is an escaped literal
    for quantifier in ("+?", "*?", "+", "*"):
        if core.endswith(quantifier):
            body = core[: -len(quantifier)]
            break
    else:
        return source
    at = _last_atom(body)
    atom = body[at:]
    if atom != "." and atom not in ("\\d", "\\D", "\\w", "\\W", "\\s", "\\S") and not atom.startswith("["):
        return source
    trimmed = body[:at] + (atom if quantifier.startswith("+") else "") + closers
    try:
        if re.compile(trimmed, _VERIFY_FLAGS).search("") is None:
            return trimmed
    except re.error:
        pass
    return source


def _last_atom(body: str) -> int:
    """Where the last atom of `body` starts: an escape (`\\d`), a class (`[^']`), or one character."""
    i, last, n = 0, 0, len(body)
    while i < n:
        last = i
        if body[i] == "\\":
            i += 2
        elif body[i] == "[":
            i += 2 if body.startswith("[^", i) else 1
            if i < n and body[i] == "]":
                i += 1  # a "]" first in the class is a member
            while i < n and body[i] != "]":
                i += 2 if body[i] == "\\" else 1
            i += 1
        else:
            i += 1
    return last


# -- Python re: per pattern, over the whole text -----------------------------------------------------------------


class _ReFinder:
    def __init__(self, ids: Sequence[int], sources: Sequence[str], verifiers: Sequence[re.Pattern[str]]) -> None:
        self._scanners: list[tuple[int, re.Pattern[str]]] = []
        for pid in ids:
            try:
                rx = re.compile(sources[pid], _VERIFY_FLAGS)
            except re.error:
                rx = verifiers[pid]
            self._scanners.append((pid, rx))

    def candidates(self, buf: _Buffer, bounds: Sequence[int] | None, out: set[tuple[int, int]]) -> None:
        text = buf.text
        n = len(text)
        hits: list[tuple[int, int]] = []
        for pid, rx in self._scanners:
            search = rx.search
            pos = 0
            while pos <= n:
                m = search(text, pos)
                if m is None:
                    break
                s = m.start()
                hits.append((text.rfind("\n", 0, s) + 1, pid))
                # One candidate per line is enough: go on from the next line. A match that ran over the end of
                # its line may hide one that starts on the next, which this search from the next line finds.
                end = text.find("\n", s)
                if end < 0:
                    break
                pos = end + 1
        offsets = buf.byte_offsets(start for start, _ in hits)
        out.update((offsets[start], pid) for start, pid in hits)


# -- Hyperscan: one database, one block-mode scan of the whole chunk ---------------------------------------------


class _HyperscanFinder:
    def __init__(self, db: Any, count: int) -> None:
        self._db = db
        self._count = count
        # A scratch space serves one scan at a time: one per thread.
        self._local = threading.local()

    @classmethod
    def build(cls, patterns: Sequence[Pattern], sources: Sequence[str]) -> tuple[_HyperscanFinder, list[int]]:
        try:
            import hyperscan
        except ImportError as e:
            raise _EngineUnavailable(f"hyperscan is not installed ({e})") from e
        # MULTILINE: ^ and $ at every line of the chunk. UTF8: `.` is a code point, as in Python.
        base = hyperscan.HS_FLAG_MULTILINE | hyperscan.HS_FLAG_UTF8
        sources = [_trim_tail(s) for s in sources]
        flags = dict.fromkeys(range(len(patterns)), base)
        unsupported: list[int] = []
        db = cls._compile(hyperscan, sources, flags)
        if db is None:
            # One of them failed and Hyperscan does not say which: find out one by one. Constructs it lacks
            # (backreferences, lookarounds) compile in prefilter mode, a superset that stage 2 narrows down.
            flags = {}
            for i in range(len(patterns)):
                for f in (base, base | hyperscan.HS_FLAG_PREFILTER):
                    if cls._compile(hyperscan, sources, {i: f}) is not None:
                        flags[i] = f
                        break
                else:
                    unsupported.append(i)
            db = cls._compile(hyperscan, sources, flags) if flags else None
            if db is None and flags:
                raise ConfigError("hyperscan could not compile the patterns together", engine="hyperscan")
        return cls(db, len(patterns)), unsupported

    @staticmethod
    def _compile(hyperscan: Any, sources: Sequence[str], flags: Mapping[int, int]) -> Any:
        if not flags:
            return None
        ids = sorted(flags)
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        try:
            db.compile(
                expressions=[sources[i].encode("utf-8") for i in ids],
                ids=ids,
                elements=len(ids),
                flags=[flags[i] for i in ids],
            )
        except hyperscan.ArchitectureError as e:
            raise _EngineUnavailable(f"hyperscan does not run on this CPU ({e})") from e
        except hyperscan.error:
            return None
        return db

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            import hyperscan

            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch

    def candidates(self, buf: _Buffer, bounds: Sequence[int] | None, out: set[tuple[int, int]]) -> None:
        if self._db is None:
            return
        data = buf.data
        n = len(data)
        rfind, find, add = data.rfind, data.find, out.add
        # Per pattern, the line of its last report: Hyperscan reports every end offset of every match (each digit
        # of `\d+`, each character of `.*`), and those repeats must cost one comparison, not a line lookup.
        lo = [-1] * self._count
        hi = [-1] * self._count
        current = [-1, -1]

        def on_match(pid: int, _start: int, end: int, _flags: int, _context: object) -> None:
            if lo[pid] < end <= hi[pid]:
                return None
            if current[0] < end <= current[1]:
                lo[pid], hi[pid] = current
                add((current[0], pid))
                return None
            # The report's line holds the byte before `end`, unless that byte is a newline: then the match is an
            # empty one (`\b`, `$`) at the start of the next line.
            at = end if end == 0 or data[end - 1] == 10 else end - 1
            if at >= n:
                return None
            start = rfind(b"\n", 0, at) + 1
            stop = find(b"\n", at)
            if stop < 0:
                stop = n
            current[0], current[1] = lo[pid], hi[pid] = start, stop
            add((start, pid))
            return None

        # `on_match` is a local that outlives the scan (block mode calls it only during `scan`).
        self._db.scan(data, match_event_handler=on_match, scratch=self._scratch())


# -- RE2: a Set per block of lines, then each hit pattern's own regex to find its lines ---------------------------


class _Re2Finder:
    def __init__(self, rset: Any, regexes: dict[int, Any]) -> None:
        self._set = rset
        self._regexes = regexes
        # Set indices are dense in the order added; pattern ids skip the unsupported ones.
        self._ids = sorted(regexes)

    @classmethod
    def build(cls, patterns: Sequence[Pattern], sources: Sequence[str]) -> tuple[_Re2Finder, list[int]]:
        try:
            import re2  # type: ignore[import-untyped]
        except ImportError as e:
            raise _EngineUnavailable(f"google-re2 is not installed ({e})") from e
        # log_errors: a pattern RE2 cannot take is expected (it goes to the slow path), not worth a stderr line.
        quiet = re2.Options()
        quiet.log_errors = False
        regexes: dict[int, Any] = {}
        unsupported: list[int] = []
        for i in range(len(patterns)):
            try:
                regexes[i] = re2.compile(("(?m)" + sources[i]).encode("utf-8"), quiet)
            except re2.error:
                unsupported.append(i)
        options = re2.Options()
        options.max_mem = _RE2_SET_MAX_MEM
        options.log_errors = False
        rset = re2.Set.SearchSet(options)
        for i in sorted(regexes):
            rset.Add(("(?m)" + sources[i]).encode("utf-8"))
        if regexes:
            try:
                rset.Compile()
            except re2.error as e:
                raise ConfigError(f"re2 could not compile the {len(regexes)} patterns together: {e}") from e
        return cls(rset, regexes), unsupported

    def candidates(self, buf: _Buffer, bounds: Sequence[int] | None, out: set[tuple[int, int]]) -> None:
        if not self._regexes:
            return
        data = buf.data
        n = len(data)
        match_set = self._set.Match
        pos = 0
        while pos < n:
            target = pos + _RE2_BLOCK
            if target >= n:
                end = n
            elif bounds is None:
                end = data.find(b"\n", target)
                end = n if end < 0 else end
            else:
                # Blocks end between records, so that a match spanning the lines of one record is seen whole.
                k = bisect_left(bounds, target)
                end = bounds[k] - 1 if k < len(bounds) else n
            hit = match_set(data[pos:end])
            if hit:
                for index in hit:
                    self._locate(self._ids[index], data, pos, end, out)
            pos = end + 1

    def _locate(self, pid: int, data: bytes, pos: int, end: int, out: set[tuple[int, int]]) -> None:
        search = self._regexes[pid].search
        while pos < end:
            m = search(data, pos, end)
            if m is None:
                return
            s = m.start()
            out.add((data.rfind(b"\n", 0, s) + 1, pid))
            stop = data.find(b"\n", s, end)
            if stop < 0:
                return
            pos = stop + 1
