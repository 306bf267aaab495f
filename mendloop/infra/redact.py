"""Secrets out of anything that reaches a work order's context or an agent's prompt: tokens, keys, passwords,
connection strings. Patterns are configurable; the defaults cover the common shapes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"

DEFAULT_PATTERNS: tuple[str, ...] = (
    # Specific shapes first, so the generic key=value rule below cannot eat half of them.
    r"(?i)(?P<k>\bbearer\s+)(?P<v>[A-Za-z0-9._~+/=-]{8,})",
    r"(?P<v>\bgh[pousr]_[A-Za-z0-9]{20,})",
    r"(?P<v>\bsk-[A-Za-z0-9_-]{16,})",
    r"(?P<v>\bxox[abprs]-[A-Za-z0-9-]{10,})",
    r"(?P<v>\bAKIA[0-9A-Z]{16}\b)",
    r"(?P<v>\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})",
    r"(?P<v>-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)",
    # credentials inside URLs / connection strings: scheme://user:password@host
    r"(?P<k>\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)(?P<v>[^\s@/]+)(?=@)",
    # key=value, key: value and "key": "value" for secret-looking keys
    r"(?i)(?P<k>\b[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)"
    r"[\w.-]*\b[\"']?\s*[:=]\s*[\"']?)(?P<v>(?!\[REDACTED\])[^\s\"',;]{3,})",
)


class Redactor:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._patterns = [re.compile(p) for p in (*DEFAULT_PATTERNS, *extra)]

    def text(self, value: str) -> str:
        for pattern in self._patterns:
            if "v" in pattern.groupindex:
                value = pattern.sub(_keep_key, value)
            else:
                value = pattern.sub(MASK, value)
        return value

    def value(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value; keys that name secrets lose their values entirely."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: (MASK if _secret_key(k) and isinstance(v, str) else self.value(v)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)")


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def _keep_key(m: re.Match[str]) -> str:
    prefix = m.group("k") if "k" in m.re.groupindex and m.group("k") else ""
    return prefix + MASK
