"""A line of a followed file, as a tailer delivers it: decoded, without its newline or terminal escapes."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSI = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]              # CSI: colours, cursor movement
    | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)  # OSC: window titles, hyperlinks
    | \x1b[PX^_][^\x1b]*\x1b\\           # DCS, SOS, PM, APC strings
    | \x1b[ -/]*[0-~]                    # other escapes: charset selection, save/restore cursor
    | \x9b[0-?]*[ -/]*[@-~]              # 8-bit CSI
    | \x1b                               # a lone ESC left by a line cut short
    """,
    re.VERBOSE,
)


def strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences (colours, cursor movement, hyperlinks)."""
    if "\x1b" not in text and "\x9b" not in text:
        return text
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class Line:
    """One line of a file. `offset` is where it starts, `end_offset` just past its newline. `text` has no newline,
    no terminal escapes, no NUL bytes, and U+FFFD for bytes that are not UTF-8; `truncated` says it was longer than
    `max_line_bytes` and only its beginning is here. `ts` is when it was read."""

    path: str
    text: str
    offset: int
    end_offset: int
    truncated: bool
    ts: float
