"""Identical GETs in flight share one read (api/coalesce.py), and no answer is older than its request.

The reads here run in real threads against shared state a test changes between arrivals; a `threading.Event`
holds the first read open so the order of arrival is the test's, not the scheduler's. The HTTP end of it (twenty
clients on one page, with a write load beside them) is measured by bench/reads.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.requests import Request

from mendloop.api.coalesce import ReadCoalescer, shared_read
from mendloop.domain.roles import Credential, Role


class Answer(BaseModel):
    value: str


class Source:
    """What the reads read: a value the test changes, a count of reads, and a gate that holds reads open."""

    def __init__(self) -> None:
        self.value = 0
        self.reads = 0
        self.running = 0
        self.most_at_once = 0
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def read(self, label: str = "") -> Callable[[], str]:
        def fn() -> str:
            with self.lock:
                self.reads += 1
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
                seen = self.value  # what this read sees: the state when it began
            self.entered.set()
            self.gate.wait(10)
            with self.lock:
                self.running -= 1
            return f"{label}{seen}"

        return fn


async def _until(flag: threading.Event) -> None:
    await asyncio.to_thread(flag.wait, 10)


def test_requests_arriving_during_a_read_share_the_next_one_and_see_what_changed_before_it() -> None:
    src = Source()

    async def scenario() -> tuple[str, list[str]]:
        reads = ReadCoalescer()
        first = asyncio.ensure_future(reads.read("k", src.read()))
        await _until(src.entered)  # the first read has begun, at value 0
        src.value = 1  # a write that commits after the first read began and before the others arrive
        later = [asyncio.ensure_future(reads.read("k", src.read())) for _ in range(5)]
        await asyncio.sleep(0)
        src.gate.set()
        return await first, list(await asyncio.gather(*later))

    first, later = asyncio.run(scenario())
    assert first == "0"
    # The five that arrived after the write are answered by one read begun after them: none sees the old value.
    assert later == ["1"] * 5
    assert src.reads == 2


def test_different_keys_are_read_apart_and_one_at_a_time_with_one_thread() -> None:
    src = Source()
    src.gate.set()

    async def scenario() -> list[str]:
        reads = ReadCoalescer(threads=1)
        return list(await asyncio.gather(*(reads.read(k, src.read(k)) for k in ("a", "b", "c", "a"))))

    answers = asyncio.run(scenario())
    assert answers[:3] == ["a0", "b0", "c0"] and answers[3] == "a0"
    assert src.reads == 3  # the two `a`s arrived together, before either read began: one read
    assert src.most_at_once == 1


def test_two_threads_read_two_keys_at_once() -> None:
    src = Source()

    async def scenario() -> int:
        reads = ReadCoalescer(threads=2)
        both = asyncio.gather(reads.read("a", src.read()), reads.read("b", src.read()))
        await asyncio.to_thread(lambda: [src.entered.wait(10)])
        while src.running < 2:  # the second read enters while the first is held open
            await asyncio.sleep(0.001)
        src.gate.set()
        await both
        return src.most_at_once

    assert asyncio.run(scenario()) == 2


def test_a_failed_read_fails_every_request_that_shared_it_and_leaves_nothing_behind() -> None:
    calls = 0

    def broken() -> str:
        nonlocal calls
        calls += 1
        raise LookupError("no such run")

    async def scenario() -> tuple[list[BaseException | str], int]:
        reads = ReadCoalescer()
        answers = await asyncio.gather(*(reads.read("k", broken) for _ in range(4)), return_exceptions=True)
        return list(answers), len(reads)

    answers, kept = asyncio.run(scenario())
    assert all(isinstance(a, LookupError) for a in answers) and calls == 1
    assert kept == 0  # nothing is cached: the next request reads again


def test_a_request_that_goes_away_leaves_the_read_to_the_others() -> None:
    src = Source()

    async def scenario() -> tuple[str, bool]:
        reads = ReadCoalescer()
        gone = asyncio.ensure_future(reads.read("k", src.read()))
        stays = asyncio.ensure_future(reads.read("k", src.read()))
        await _until(src.entered)
        gone.cancel()  # its client disconnected
        await asyncio.sleep(0)
        src.gate.set()
        return await stays, gone.cancelled()

    answer, cancelled = asyncio.run(scenario())
    assert answer == "0" and cancelled and src.reads == 1


def _request(path: str, query: bytes, credential: Credential | None, reads: ReadCoalescer) -> Request:
    state: dict[str, Any] = {} if credential is None else {"credential": credential}
    app = SimpleNamespace(state=SimpleNamespace(reads=reads))
    return Request({"type": "http", "path": path, "query_string": query, "state": state, "app": app})


@pytest.mark.parametrize(
    ("other", "shared"),
    [
        (Credential("db:2", "another viewer", Role.VIEWER), True),  # same answer: same read
        (Credential("db:3", "agent of b", Role.AGENT, ("/srv/b",)), False),  # its own repositories' answer
    ],
)
def test_the_key_is_the_path_the_query_and_the_callers_scope(other: Credential, shared: bool) -> None:
    src = Source()
    agent_a = Credential("db:1", "agent of a", Role.AGENT, ("/srv/a",))

    async def scenario() -> list[str]:
        reads = ReadCoalescer(threads=2)

        async def shared(path: str, query: bytes, credential: Credential | None, fn: Callable[[], str]) -> str:
            response = await shared_read(_request(path, query, credential, reads), lambda: Answer(value=fn()))
            return str(json.loads(bytes(response.body))["value"])

        held = asyncio.ensure_future(shared("/x", b"", None, src.read("held-")))
        await _until(src.entered)
        src.value = 1
        viewer = Credential("db:0", "viewer", Role.VIEWER)
        calls = [
            shared("/patches/work-orders", b"limit=5", viewer, src.read("v-")),
            shared("/patches/work-orders", b"limit=5", other, src.read("o-")),
            shared("/patches/work-orders", b"limit=5", agent_a, src.read("a-")),
            shared("/patches/work-orders", b"limit=6", viewer, src.read("q-")),
        ]
        src.gate.set()
        return [await held, *await asyncio.gather(*calls)]

    held, viewer, other_answer, agent, other_query = asyncio.run(scenario())
    assert held == "held-0" and viewer == "v-1" and agent == "a-1" and other_query == "q-1"
    assert other_answer == ("v-1" if shared else "o-1")
