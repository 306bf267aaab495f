"""Redaction cost: `Redactor` (detect-secrets' rules + mendloop's, Hyperscan prefilter) against the regex Redactor
mendloop had before (9 Python regexes, each run over every string), measured in the same run on the same corpus.

The corpus is generated log lines and event payloads (timestamps, ids, paths, hosts) of which about 1% hold a
secret (an AWS key, a GitHub token, a DSN password, `password=`). Both sides must mask every secret the old one
knows; the figures are strings/s and the ratio.

    .venv/bin/python bench/redact.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mendloop.infra.redact import MASK, Redactor  # noqa: E402

# The Redactor as it was before detect-secrets (mendloop/infra/redact.py at f367919), kept here as the baseline.
_LEGACY_PATTERNS = (
    r"(?i)(?P<k>\bbearer\s+)(?P<v>[A-Za-z0-9._~+/=-]{8,})",
    r"(?P<v>\bgh[pousr]_[A-Za-z0-9]{20,})",
    r"(?P<v>\bsk-[A-Za-z0-9_-]{16,})",
    r"(?P<v>\bxox[abprs]-[A-Za-z0-9-]{10,})",
    r"(?P<v>\bAKIA[0-9A-Z]{16}\b)",
    r"(?P<v>\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})",
    r"(?P<v>-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)",
    r"(?P<k>\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)(?P<v>[^\s@/]+)(?=@)",
    r"(?i)(?P<k>\b[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)"
    r"[\w.-]*\b[\"']?\s*[:=]\s*[\"']?)(?P<v>(?!\[REDACTED\])[^\s\"',;]{3,})",
)
_LEGACY_KEY = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)")


class LegacyRedactor:
    def __init__(self) -> None:
        self._patterns = [re.compile(p) for p in _LEGACY_PATTERNS]

    def text(self, value: str) -> str:
        for pattern in self._patterns:
            value = pattern.sub(_keep_key, value)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                k: (MASK if isinstance(k, str) and _LEGACY_KEY.search(k) and isinstance(v, str) else self.value(v))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def _keep_key(m: re.Match[str]) -> str:
    return (m.group("k") if "k" in m.re.groupindex and m.group("k") else "") + MASK


COMPONENTS = ["billing", "auth", "search", "checkout", "inventory", "payments", "gateway", "scheduler"]
SECRETS = [
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2,
    "postgresql://app:s3cr3t-pw@db-1.internal:5432/orders",
    "password=hunter2hunter2",
]


def corpus(n: int, seed: int = 7) -> tuple[list[str], list[dict[str, Any]]]:
    rnd = random.Random(seed)
    lines: list[str] = []
    payloads: list[dict[str, Any]] = []
    for i in range(n):
        c = rnd.choice(COMPONENTS)
        line = (
            f"2026-12-02T03:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}.{rnd.randint(0, 999):03d}Z ERROR "
            f"[{c}.worker-{rnd.randint(1, 9)}] request {rnd.getrandbits(64):016x} "
            f"failed after {rnd.randint(1, 900)} ms "
            f"on db-{rnd.randint(1, 4)}.internal:5432 reading /srv/{c}/data/batch_{rnd.randint(1, 99999)}.csv"
        )
        if i % 100 == 0:
            line += f" using {rnd.choice(SECRETS)}"
        lines.append(line)
        payloads.append(
            {
                "message": line,
                "component": c,
                "host": f"{c}-{rnd.randint(1, 40)}.prod",
                "labels": {"severity": "error", "team": "core", "region": "eu-west-1"},
                "attempt": rnd.randint(1, 5),
                "tags": ["ingest", c],
            }
        )
    return lines, payloads


def rate(fn: Callable[[Any], Any], items: Iterable[Any], seconds: float) -> float:
    """Items/s over repeated passes for at least `seconds`."""
    items = list(items)
    done = 0
    start = time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def run(seconds: float = 2.0, n: int = 2000) -> dict[str, Any]:
    t0 = time.perf_counter()
    new = Redactor()
    build_s = time.perf_counter() - t0
    old = LegacyRedactor()
    lines, payloads = corpus(n)
    # Both mask what the old one knew; the new one misses nothing the old one caught.
    for line in lines:
        o, w = old.text(line), new.text(line)
        for secret in ("AKIAIOSFODNN7EXAMPLE", "a1B2c3D4e5F6g7H8i9J0", "s3cr3t-pw", "hunter2hunter2"):
            assert secret not in w, (line, w)
            assert secret not in o or secret in line
    clean = [line for line in lines if MASK not in new.text(line)]
    return {
        "build_s": build_s,
        "rules": len(new.rules),
        "legacy_rules": len(_LEGACY_PATTERNS),
        "lines_per_s": rate(new.text, lines, seconds),
        "legacy_lines_per_s": rate(old.text, lines, seconds),
        "clean_lines_per_s": rate(new.text, clean, seconds),
        "legacy_clean_lines_per_s": rate(old.text, clean, seconds),
        "payloads_per_s": rate(new.value, payloads, seconds),
        "legacy_payloads_per_s": rate(old.value, payloads, seconds),
    }


def report(r: dict[str, Any]) -> list[str]:
    def row(label: str, new: float, old: float) -> str:
        return f"  {label:<34} {new:11,.0f}/s   old regex Redactor {old:10,.0f}/s   ({new / old:5.1f}x)"

    return [
        f"redaction, one core: {r['rules']} rules (detect-secrets + mendloop's) vs the old {r['legacy_rules']} "
        f"(bench/redact.py; built once per process in {r['build_s']:.2f} s)",
        row("log lines (1% with a secret)", r["lines_per_s"], r["legacy_lines_per_s"]),
        row("clean log lines", r["clean_lines_per_s"], r["legacy_clean_lines_per_s"]),
        row("event payloads (6 fields, nested)", r["payloads_per_s"], r["legacy_payloads_per_s"]),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print("\n".join(report(run(seconds=args.seconds))))
