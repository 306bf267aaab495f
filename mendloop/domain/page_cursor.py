"""Keyset pages of a list: the opaque cursor a list answers as `next_cursor` and takes back as `cursor`.

A cursor is the sort key and the id of the last item a page gave, base64url of `[list, key, id]`. The next page
is the items strictly after it in the list's order, so it costs the same however deep it is (an offset makes the
database walk past every item before it), and items inserted meanwhile neither repeat nor shift the page. The
list's name is in the cursor so that a cursor of one list given to another is refused rather than misread.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

from mendloop.errors import InputError

Key = float | int | str
MAX_CHARS = 500  # far above any real cursor: ids are at most 64 characters, keys a number


@dataclass(frozen=True, slots=True)
class After:
    """Where the next page starts: strictly after (`key`, `id`) in the list's order."""

    key: Key
    id: Key


def encode(kind: str, key: Key, item_id: Key) -> str:
    raw = json.dumps([kind, key, item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None, kind: str, key: type[Key], item_id: type[Key], *, field: str = "cursor") -> After | None:
    """The position a request's cursor names; None without one. An InputError naming `field` for anything that is
    not a cursor of this list, the types of its key and id included, so a wrong type never reaches SQL."""
    if cursor is None or cursor == "":
        return None
    bad = InputError(f"{field}: not a cursor of this list; pass the next_cursor a page of it answered", field=field)
    if len(cursor) > MAX_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise bad from exc
    if not (isinstance(value, list) and len(value) == 3 and value[0] == kind):
        raise bad
    parts = [_checked(value[1], key), _checked(value[2], item_id)]
    if None in parts:
        raise bad
    return After(key=value[1] if key is not float else float(value[1]), id=value[2])


def _checked(part: object, want: type[Key]) -> Key | None:
    """`part` if it is a `want` a database compares safely (a finite float, a 64-bit int, a short string)."""
    if isinstance(part, bool):  # an int to Python, never a key
        return None
    if want is float and isinstance(part, int | float):
        return part if math.isfinite(part) else None
    if want is int and isinstance(part, int):
        return part if -(2**63) <= part < 2**63 else None
    if want is str and isinstance(part, str):
        # JSON may carry a lone surrogate or a NUL: neither is in any id, and no database takes them as a value.
        return part if len(part) <= 200 and "\x00" not in part and part.isprintable() and _utf8(part) else None
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
