"""The one open-loop load generator both systems are driven by.

Requests are due on a fixed schedule (`rate` per second) whatever the answers do, and each latency is counted
from its scheduled send time, so a server that queues cannot hide its backlog (no coordinated omission).
A raw HTTP/1.1 keep-alive client on asyncio: httpx would measure itself at these rates (see bench/intake.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank percentile of an already sorted list; NaN when it is empty."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def schedule(rate: float, duration: float) -> list[float]:
    """Send offsets in seconds from the start: one every 1/rate, for `duration` seconds."""
    return [i / rate for i in range(int(rate * duration))]


async def _post(conn: list[Any], host: str, port: int, path: str, body: bytes) -> int:
    if not conn:
        conn.extend(await asyncio.open_connection(host, port))
    reader, writer = conn
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
        lower = raw.lower()
        at = lower.find(b"content-length:")
        length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
        await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        conn.clear()
        raise
    if b"connection: close" in lower:
        writer.close()
        conn.clear()
    return int(raw[9:12])


async def open_loop(
    host: str, port: int, path: str, body: Callable[[int], dict[str, Any]], *,
    rate: float, duration: float, connections: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Offer `rate` POSTs/s for `duration` s; achieved rate, p50/p99 from the scheduled time, errors."""
    clock = time.perf_counter
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0

    async def client() -> None:
        nonlocal errors
        conn: list[Any] = []
        while (item := await due.get()) is not None:
            i, scheduled = item
            try:
                status = await _post(conn, host, port, path, json.dumps(body(i)).encode())
            except OSError:
                errors += 1
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if 200 <= status < 300:
                latencies.append(clock() - scheduled)
            else:
                errors += 1
        if conn:
            conn[1].close()

    tasks = [asyncio.create_task(client()) for _ in range(connections)]
    offsets = schedule(rate, duration)
    t0 = clock()
    sent = 0
    while sent < len(offsets):
        now = clock() - t0
        while sent < len(offsets) and offsets[sent] <= now:
            due.put_nowait((sent, t0 + offsets[sent]))
            sent += 1
        await asyncio.sleep(min(0.001, 1 / rate))
    for _ in tasks:
        due.put_nowait(None)
    await asyncio.gather(*tasks)
    elapsed = clock() - t0
    latencies.sort()
    return {
        "offered_per_s": rate,
        "achieved_per_s": len(latencies) / elapsed,
        "ok": len(latencies),
        "errors": errors,
        "statuses": statuses,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "seconds": elapsed,
    }
