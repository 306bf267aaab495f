"""Python tracebacks → exception type, message and frames; frames inside a repository are marked and carry a
snippet of the code around the failing line."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?\s*$')
# The last line of a traceback, `KeyError: 'x'`: the exception's type and, after a colon, its message.
EXCEPTION_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|[A-Z]\w*))(?::\s?(?P<msg>.*))?$"
)


@dataclass
class Frame:
    file: str
    line: int
    function: str
    code: str | None = None
    in_repository: bool = False
    repository_path: str | None = None
    snippet: list[str] = field(default_factory=list)


@dataclass
class ParsedTraceback:
    exception_type: str
    message: str
    frames: list[Frame]

    def failing_frame(self) -> Frame | None:
        inside = [f for f in self.frames if f.in_repository]
        candidates = inside or self.frames
        return candidates[-1] if candidates else None

    def failing_tests(self) -> list[str]:
        """The test the traceback ran through, as `path::function` (`tests/test_x.py::test_y`): the outermost
        frame in a test file of the repository (`test_*.py`, `*_test.py`, or under a `tests`/`test` directory)
        whose function is a test (`test*`). A work order names it in `failing_tests`: the patch must make it pass.
        Only repository files count (or relative paths, when the traceback was not located): a test of an
        installed library is not the repository's to fix."""
        for frame in self.frames:
            path = frame.repository_path or (frame.file if not frame.file.startswith("/") else None)
            if path and is_test_file(path) and frame.function.startswith("test"):
                return [f"{path}::{frame.function}"]
        return []

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        failing = self.failing_frame()
        out["failing_frame"] = asdict(failing) if failing else None
        out["failing_tests"] = self.failing_tests()
        return out


def is_test_file(path: str) -> bool:
    """`path` (relative, `/`-separated) is a test module by the usual conventions."""
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if not parts or not parts[-1].endswith(".py"):
        return False
    name = parts[-1]
    return name.startswith("test_") or name.endswith("_test.py") or any(p in ("tests", "test") for p in parts[:-1])


def parse(text: str) -> ParsedTraceback | None:
    """The last traceback in `text` (a chained one ends with the exception that escaped)."""
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        if line.strip().startswith("Traceback (most recent call last)"):
            start = i
    if start is None:
        return None
    frames: list[Frame] = []
    i = start + 1
    while i < len(lines):
        m = _FRAME.match(lines[i])
        if m:
            frame = Frame(file=m["file"], line=int(m["line"]), function=(m["func"] or "<module>").strip())
            if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) and lines[i + 1].startswith("    "):
                frame.code = lines[i + 1].strip()
                i += 1
            frames.append(frame)
            i += 1
            continue
        stripped = lines[i].strip()
        if not stripped or set(stripped) <= {"^", "~", " "}:
            i += 1
            continue
        e = EXCEPTION_LINE.match(stripped)
        if e and not lines[i].startswith(" "):
            message = e["msg"] or ""
            # A multi-line message continues until a blank line.
            j = i + 1
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("Traceback", "During handling")):
                message += "\n" + lines[j]
                j += 1
            return ParsedTraceback(exception_type=e["type"], message=message.strip(), frames=frames)
        i += 1
    if frames:
        return ParsedTraceback(exception_type="unknown", message="", frames=frames)
    return None


def locate(parsed: ParsedTraceback, repository: Path | None, *, context_lines: int = 3) -> ParsedTraceback:
    """Mark the frames whose file is inside `repository` and attach the code around the failing line."""
    if repository is None:
        return parsed
    root = repository.resolve()
    for frame in parsed.frames:
        candidate = _inside(root, frame.file)
        if candidate is None:
            continue
        frame.in_repository = True
        frame.repository_path = candidate.relative_to(root).as_posix()
        try:
            source = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        lo = max(0, frame.line - 1 - context_lines)
        hi = min(len(source), frame.line + context_lines)
        frame.snippet = [f"{n + 1:>5}{'>' if n + 1 == frame.line else ' '} {source[n]}" for n in range(lo, hi)]
    return parsed


def _inside(root: Path, file: str) -> Path | None:
    path = Path(file)
    candidates = [path] if path.is_absolute() else [root / path]
    if path.is_absolute():
        # A traceback from another host or container: try each suffix of the path under the repository.
        parts = path.parts[1:]
        candidates += [root.joinpath(*parts[i:]) for i in range(len(parts))]
    for c in candidates:
        try:
            # is_file() raises for some errors it does not swallow (a name longer than the system allows, from a
            # hostile log line): such a frame is simply not in the repository.
            resolved = c.resolve()
            if resolved.is_file() and resolved.is_relative_to(root):
                return resolved
        except OSError:
            continue
    return None
