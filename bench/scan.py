"""Scan throughput: `Matcher` (auto engine) against a per-line Python `re` loop, at 10 and 200 patterns.

The corpus is generated: mixed access, application and kernel log lines with timestamps, ids, paths and
addresses, of which about 1% match one of the 200 patterns (and about 0.05% one of the first 10). The patterns
are realistic: literals with alternations, `\\d+`, classes, anchors, named groups.

The baseline is what a plain implementation does: for each line, for each compiled pattern, `search`. It runs on
a slice of the corpus (it is slow) and its MB/s is what it reached there. Both sides are checked to find the same
matches on the slice the baseline read.

    .venv/bin/python bench/scan.py [--seconds 10] [--engines auto,re2,re] [--size-mb 64]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mendloop.intake.matcher import Matcher, Pattern  # noqa: E402

COMPONENTS = [
    "billing",
    "auth",
    "search",
    "checkout",
    "inventory",
    "payments",
    "gateway",
    "scheduler",
    "mailer",
    "reports",
]

LineMaker = Callable[[random.Random, str], str]

# (regex with {c} standing for the component, a line that matches it). 20 shapes by 10 components: 200 patterns.
TEMPLATES: list[tuple[str, LineMaker]] = [
    (
        r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds in {c}",
        lambda r, c: f"ERROR: Pipeline timeout after {r.randint(1, 900)} seconds in {c}",
    ),
    (
        r"(?:ERROR|FATAL):? {c} database connection (?:refused|reset|lost) \((?P<host>[\w.-]+):(?P<port>\d+)\)",
        lambda r, c: f"FATAL: {c} database connection reset (db-{r.randint(1, 9)}.internal:{r.choice([5432, 3306])})",
    ),
    (
        r"Out of memory: Killed process (?P<pid>\d+) \((?P<proc>{c}(?:-worker)?)\)",
        lambda r, c: f"kernel: Out of memory: Killed process {r.randint(100, 99999)} ({c}-worker)",
    ),
    (
        r'"(?:GET|POST|PUT|DELETE|PATCH) (?P<path>/api/{c}/\S*) HTTP/1\.[01]" (?P<status>5\d\d) ',
        lambda r, c: (
            f'10.0.{r.randint(0, 255)}.{r.randint(0, 255)} - - "POST /api/{c}/orders/{r.randint(1, 10**6)} '
            f'HTTP/1.1" {r.choice([500, 502, 503])} 123'
        ),
    ),
    (
        r"No space left on device: '(?P<path>/var/lib/{c}/[^']+)'",
        lambda r, c: f"ERROR [{c}] write failed: No space left on device: '/var/lib/{c}/data/{r.randint(1, 999)}.db'",
    ),
    (
        r"^(?P<ts>\S+) CRITICAL \[{c}\] (?P<msg>.*certificate (?:has )?expired.*)$",
        lambda r, c: f"CRITICAL [{c}] TLS certificate has expired for {c}.example.com",
    ),
    (
        r"{c}: (?:Deadlock found when trying to get lock|Lock wait timeout exceeded)",
        lambda r, c: f"WARN {c}: Deadlock found when trying to get lock; txn {r.randint(1, 10**9)}",
    ),
    (
        r"\[{c}\] circuit breaker (?P<breaker>\w+) (?:opened|tripped) after (?P<failures>\d+) failures",
        lambda r, c: f"WARN [{c}] circuit breaker upstream_{r.randint(1, 9)} opened after {r.randint(5, 50)} failures",
    ),
    (
        r"{c}\.(?P<cls>[A-Z]\w+)Error: (?P<msg>[^\n]{{1,200}})$",
        lambda r, c: f"ERROR {c}.ValidationError: field 'amount' is {r.randint(1, 99)}",
    ),
    (
        r"(?i)panic: runtime error: (?P<what>index out of range|invalid memory address|nil map) .*{c}",
        lambda r, c: f"panic: runtime error: index out of range [{r.randint(1, 9)}] goroutine in {c}/handler.go",
    ),
    (
        r"Connection pool exhausted for {c} \(max=(?P<max>\d+), waiting=(?P<waiting>\d+)\)",
        lambda r, c: f"ERROR Connection pool exhausted for {c} (max=20, waiting={r.randint(1, 500)})",
    ),
    (
        r"{c} health check failed: (?P<code>\d{{3}}) from (?P<url>https?://\S+)",
        lambda r, c: f"WARN {c} health check failed: 503 from http://{c}:8080/healthz",
    ),
    (
        r"Job (?P<job>[\w-]+) in {c} failed with exit code (?P<code>[1-9]\d*)",
        lambda r, c: f"ERROR Job nightly-{r.randint(1, 99)} in {c} failed with exit code {r.randint(1, 137)}",
    ),
    (
        r"{c} replication lag (?P<lag>\d+(?:\.\d+)?)s exceeds threshold",
        lambda r, c: f"WARN {c} replication lag {r.randint(30, 900)}.{r.randint(0, 9)}s exceeds threshold",
    ),
    (
        r"Too many open files.*{c}|{c}.*Too many open files",
        lambda r, c: f"ERROR accept failed in {c}: Too many open files",
    ),
    (
        r"{c} queue (?P<queue>[\w.]+) backlog (?P<size>\d{{4,}}) messages",
        lambda r, c: f"WARN {c} queue orders.created backlog {r.randint(1000, 99999)} messages",
    ),
    (
        r"SSL(?:Error|_ERROR_\w+).*\b{c}\b",
        lambda r, c: f"ERROR SSLError: handshake failed talking to {c}",
    ),
    (
        r"{c}\[(?P<pid>\d+)\]: segfault at (?P<addr>[0-9a-f]+) ip (?P<ip>[0-9a-f]+)",
        lambda r, c: (
            f"kernel: {c}[{r.randint(100, 9999)}]: segfault at {r.randrange(16**8):x} ip {r.randrange(16**12):x}"
        ),
    ),
    (
        r"Unhandled exception in {c}: (?P<exc>\w+(?:\.\w+)*): (?P<msg>.+)",
        lambda r, c: f"ERROR Unhandled exception in {c}: builtins.KeyError: 'user_{r.randint(1, 999)}'",
    ),
    (
        r"{c} rate limit exceeded for (?P<client>\S+) \((?P<count>\d+)/(?P<limit>\d+) req/s\)",
        lambda r, c: f"WARN {c} rate limit exceeded for client-{r.randint(1, 99)} ({r.randint(101, 300)}/100 req/s)",
    ),
]

LEVELS = ["INFO"] * 60 + ["DEBUG"] * 25 + ["WARN"] * 10 + ["ERROR"] * 5
# Everyday lines, several of them near misses of the patterns (same words, other outcome).
NOISE: list[LineMaker] = [
    lambda r, c: (
        f'10.1.{r.randint(0, 255)}.{r.randint(0, 255)} - - "GET /api/{c}/items/{r.randint(1, 10**6)} HTTP/1.1" '
        f'200 {r.randint(100, 99999)} "-" "Mozilla/5.0"'
    ),
    lambda r, c: f"[{c}] request_id={r.randrange(16**16):016x} user={r.randint(1, 10**6)} took {r.randint(1, 2000)}ms",
    lambda r, c: f"{c}: cache {'hit' if r.random() < 0.8 else 'miss'} for key session:{r.randrange(16**12):012x}",
    lambda r, c: f"[{c}] processed batch {r.randint(1, 10**5)} with {r.randint(1, 500)} records in {r.random():.3f}s",
    lambda r, c: f"{c}.worker: job {r.randint(1, 10**6)} completed successfully (exit code 0)",
    lambda r, c: f"[{c}] connection to db-{r.randint(1, 9)}.internal:5432 established, pool size {r.randint(1, 20)}",
    lambda r, c: f"{c} health check ok: 200 from http://{c}:8080/healthz in {r.randint(1, 50)}ms",
    lambda r, c: f"[{c}] retrying upstream call attempt {r.randint(1, 3)}/3 after timeout of {r.randint(1, 30)}s",
    lambda r, c: f"{c} queue orders.created backlog {r.randint(0, 999)} messages",
    lambda r, c: f"Pipeline step {r.randint(1, 9)} in {c} finished after {r.randint(1, 300)} seconds",
]


def patterns(n: int) -> list[Pattern]:
    """`n` patterns: the i-th is shape i % 20 for component i // 20, so the first 10 are 10 different shapes."""
    out = []
    for i in range(n):
        regex, _ = TEMPLATES[i % len(TEMPLATES)]
        component = COMPONENTS[(i // len(TEMPLATES)) % len(COMPONENTS)]
        out.append(Pattern(name=f"p{i}", regex=regex.format(c=component), event_type="log.error"))
    return out


def corpus(size: int, *, match_rate: float = 0.01, seed: int = 1, distinct: int = 200_000) -> bytes:
    """About `size` bytes of log lines. `distinct` different lines are generated, then drawn at random to fill
    `size` (generating every line would dominate the run)."""
    r = random.Random(seed)
    pool: list[str] = []
    for _ in range(distinct):
        c = r.choice(COMPONENTS)
        ts = f"2026-11-26T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999):03d}Z"
        if r.random() < match_rate:
            body = r.choice(TEMPLATES)[1](r, c)
        else:
            body = f"{r.choice(LEVELS)} {r.choice(NOISE)(r, c)}"
        pool.append(f"{ts} {body}\n")
    mean = sum(map(len, pool)) / len(pool)
    lines = r.choices(pool, k=int(size / mean) + 1)
    return "".join(lines).encode("utf-8")


def chunks(data: bytes, size: int) -> list[bytes]:
    """`data` cut into chunks of about `size` bytes, each ending at a newline, as a log reader hands them over."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", min(pos + size, len(data) - 1))
        end = len(data) if end < 0 else end + 1
        out.append(data[pos:end])
        pos = end
    return out


def baseline(data: bytes, pats: Sequence[Pattern]) -> list[tuple[int, str, dict[str, str]]]:
    """The naive way: for each line, for each compiled pattern, `search`."""
    compiled = [(p.name, re.compile(p.regex, re.ASCII)) for p in pats]
    out = []
    for i, line in enumerate(data.decode("utf-8", "replace").split("\n")):
        for name, rx in compiled:
            m = rx.search(line)
            if m is not None:
                out.append((i, name, {k: v for k, v in m.groupdict().items() if v is not None}))
    return out


def _matcher_results(m: Matcher, data: bytes) -> list[tuple[int, str, dict[str, str]]]:
    # line_start is a byte offset: turn it into a line number to compare with the baseline.
    out = []
    line, at = 0, 0
    for match in m.scan(data):
        line += data.count(b"\n", at, match.line_start)
        at = match.line_start
        out.append((line, match.pattern.name, match.groups))
    return out


def _rate(pieces: Sequence[bytes], run: Callable[[bytes], object], seconds: float) -> float:
    """MB/s of `run` over the first k chunks, k growing until one pass takes `seconds` or every chunk is read."""
    k = 1
    while True:
        part = pieces[:k]
        t0 = time.perf_counter()
        for piece in part:
            run(piece)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or k >= len(pieces):
            return sum(map(len, part)) / 1e6 / elapsed
        k = min(len(pieces), int(k * max(2.0, min(8.0, seconds / max(elapsed, 1e-3)))))


def run(
    seconds_budget: float = 10,
    *,
    engines: Sequence[str] = ("auto",),
    size_mb: float = 64,
    chunk_kb: int = 256,
    pattern_counts: Sequence[int] = (10, 200),
) -> dict[str, float]:
    """MB/s of the matcher and of the per-line `re` baseline at each pattern count, and their ratios."""
    data = corpus(int(size_mb * 1e6))
    # Both sides read the corpus as a log reader hands it over: in chunks that end at a newline.
    pieces = chunks(data, chunk_kb * 1024)
    # Each measurement gets a slice of the budget; the matcher's over the whole corpus usually takes less.
    per = max(0.2, seconds_budget / (len(pattern_counts) * (len(engines) + 1) + 1))
    out: dict[str, float] = {"corpus_mb": len(data) / 1e6, "chunk_kb": float(chunk_kb)}
    # Both sides must agree on the first MB or so (1 s of baseline at 200 patterns).
    check = b"".join(pieces[: max(1, (1 << 20) // (chunk_kb * 1024))])
    for n in pattern_counts:
        pats = patterns(n)

        def naive(piece: bytes, pats: list[Pattern] = pats) -> object:
            return baseline(piece, pats)

        base = _rate(pieces, naive, per)
        out[f"baseline_{n}_mbps"] = base
        expected = baseline(check, pats)
        for engine in engines:
            t0 = time.perf_counter()
            m = Matcher.build(pats, engine)  # type: ignore[arg-type]
            key = f"{engine}_{n}"
            out[f"{key}_build_s"] = time.perf_counter() - t0
            if _matcher_results(m, check) != expected:
                raise AssertionError(f"{m.engine_name} at {n} patterns disagrees with the per-line re loop")
            mbps = _rate(pieces, m.scan, per)
            out[f"{key}_mbps"] = mbps
            out[f"{key}_vs_baseline"] = mbps / base
        out[f"matches_{n}_per_mb"] = len(expected) / (len(check) / 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="rough time budget for the measurements")
    parser.add_argument("--engines", default="auto", help="comma-separated: auto, hyperscan, re2, re")
    parser.add_argument("--size-mb", type=float, default=64)
    parser.add_argument("--chunk-kb", type=int, default=256)
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    print(f"auto engine here: {Matcher.build([], 'auto').engine_name}")
    figures = run(args.seconds, engines=engines, size_mb=args.size_mb, chunk_kb=args.chunk_kb)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:12.3f}")


if __name__ == "__main__":
    main()
