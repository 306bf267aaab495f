"""The matcher on its real engines: Hyperscan, RE2 and Python `re` must find exactly the same matches, the ones a
per-line Python `re` loop finds."""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mendloop.errors import ConfigError
from mendloop.intake.matcher import Engine, Match, Matcher, Pattern
from tests.support import examples

ENGINES: list[Engine] = ["hyperscan", "re2", "re"]
_MODULES = {"hyperscan": "hyperscan", "re2": "re2", "re": "re"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    name: Engine = request.param
    if importlib.util.find_spec(_MODULES[name]) is None:
        # The engines are dependencies of the project: CI must test all of them.
        message = f"{name} is not installed"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return name


def P(name: str, regex: str, *, error_type: str | None = None) -> Pattern:
    return Pattern(name=name, regex=regex, event_type="log.error", error_type=error_type)


def reference(patterns: Sequence[Pattern], chunk: bytes) -> list[tuple[int, str, str, dict[str, str]]]:
    """What the matcher must find: for each line, for each pattern, Python `re.search` on that line."""
    compiled = [(p.name, re.compile(p.regex, re.ASCII)) for p in patterns]
    out = []
    start = 0
    for raw in chunk.split(b"\n"):
        line = raw.decode("utf-8", "replace")
        for name, rx in compiled:
            m = rx.search(line)
            if m is not None:
                out.append((start, name, line, {k: v for k, v in m.groupdict().items() if v is not None}))
        start += len(raw) + 1
    return out


def found(matches: Sequence[Match]) -> list[tuple[int, str, str, dict[str, str]]]:
    return [(m.line_start, m.pattern.name, m.line, m.groups) for m in matches]


def test_named_groups_become_fields(engine: Engine) -> None:
    timeout = P("pipeline_timeout", r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds", error_type="timeout")
    m = Matcher.build([timeout], engine)
    assert m.engine_name == engine
    chunk = b"INFO started\n2026-11-26 ERROR: Pipeline timeout after 300 seconds (job 7)\nINFO done\n"
    [match] = m.scan(chunk)
    assert match.pattern is timeout
    assert match.line == "2026-11-26 ERROR: Pipeline timeout after 300 seconds (job 7)"
    assert match.line_start == chunk.index(b"2026")
    assert match.groups == {"seconds": "300"}


def test_optional_group_that_did_not_take_part_is_left_out(engine: Engine) -> None:
    m = Matcher.build([P("db", r"db (?P<op>read|write)(?: of (?P<table>\w+))? failed")], engine)
    got = [x.groups for x in m.scan(b"db read failed\ndb write of users failed\n")]
    assert got == [{"op": "read"}, {"op": "write", "table": "users"}]


def test_anchors_hold_at_each_line(engine: Engine) -> None:
    pats = [P("start", r"^start (?P<x>\w+)$"), P("abs", r"\Aend\Z"), P("tail", r"done$")]
    chunk = b"start a\nxstart b\nstart c trailing\nend\n end\nis done\ndone later\nstart d"
    assert found(Matcher.build(pats, engine).scan(chunk)) == [
        (0, "start", "start a", {"x": "a"}),
        (chunk.index(b"end\n"), "abs", "end", {}),
        (chunk.index(b"is done"), "tail", "is done", {}),
        (chunk.index(b"start d"), "start", "start d", {"x": "d"}),
    ]


def test_several_patterns_on_one_line_in_pattern_order(engine: Engine) -> None:
    pats = [P("err", r"ERROR"), P("num", r"after (?P<n>\d+)"), P("never", r"WARN"), P("word", r"\btimeout\b")]
    chunk = b"ok\nERROR timeout after 30 seconds\n"
    assert [(x.pattern.name, x.groups) for x in Matcher.build(pats, engine).scan(chunk)] == [
        ("err", {}),
        ("num", {"n": "30"}),
        ("word", {}),
    ]


def test_a_pattern_that_cannot_compile_is_a_config_error_naming_it(engine: Engine) -> None:
    good = P("good", r"ok")
    with pytest.raises(ConfigError) as e:
        Matcher.build([good, P("broken_one", r"timeout after (?P<s>\d+")], engine)
    assert "broken_one" in str(e.value)
    assert "missing )" in str(e.value)  # the compiler's own message
    assert e.value.fields["pattern"] == "broken_one"


def test_a_pattern_that_matches_an_empty_line_is_refused(engine: Engine) -> None:
    with pytest.raises(ConfigError, match=r"'anything'.*empty line"):
        Matcher.build([P("anything", r"(?P<x>\d*)")], engine)


def test_10000_lines_find_exactly_the_expected_matches(engine: Engine) -> None:
    pats = [
        P("timeout", r"ERROR: Pipeline timeout after (?P<seconds>\d+) seconds"),
        P("refused", r"(?:ERROR|FATAL) (?P<svc>\w+) connection (?:refused|reset)"),
        P("http5xx", r'" (?P<status>5\d\d) '),
        P("msg", r"^CRITICAL (?P<msg>.+)"),
    ]
    lines: list[str] = []
    expected: list[tuple[int, str, str, dict[str, str]]] = []
    offset = 0
    for i in range(10_000):
        if i % 97 == 0:
            line = f"2026-11-26 ERROR: Pipeline timeout after {i} seconds"
            expected.append((offset, "timeout", line, {"seconds": str(i)}))
        elif i % 101 == 0:
            line = f"FATAL billing{i} connection reset by peer"
            expected.append((offset, "refused", line, {"svc": f"billing{i}"}))
        elif i % 103 == 0:
            line = f'10.0.0.{i % 255} - - "GET /x/{i} HTTP/1.1" 503 12'
            expected.append((offset, "http5xx", line, {"status": "503"}))
        elif i % 107 == 0:
            line = f"CRITICAL disk {i} failing"
            expected.append((offset, "msg", line, {"msg": f"disk {i} failing"}))
        else:
            # Near misses: the same words with another outcome.
            line = f"INFO request {i} took {i % 300} seconds; connection ok; status 200; ERROR: none"
        lines.append(line)
        offset += len(line.encode()) + 1
    chunk = "\n".join(lines).encode() + b"\n"
    assert found(Matcher.build(pats, engine).scan(chunk)) == expected


def test_unicode_and_invalid_utf8_do_not_break_matching(engine: Engine) -> None:
    pats = [
        P("user", r"user (?P<name>\S+) failed"),
        P("dot", r"a.b"),  # `.` is one character, even a non-ASCII one
        P("word", r"\bab\b"),
        P("accent", r"café (?P<n>\d+)"),
    ]
    chunk = (
        "user josé failed\n".encode()
        + b"bad \xff\xfe bytes then user x\xc3 failed\n"
        + "aéb a💥b\n".encode()
        + b"\xe9ab\xe9\n"
        + "café 42 ☕\n".encode()
        + b"truncated \xe2\x82"
    )
    got = Matcher.build(pats, engine).scan(chunk)
    assert found(got) == reference(pats, chunk)
    names = [(x.pattern.name, x.groups) for x in got]
    assert names == [
        ("user", {"name": "josé"}),
        ("user", {"name": "x\ufffd"}),
        ("dot", {}),
        ("word", {}),
        ("accent", {"n": "42"}),
    ]
    assert got[1].line == "bad \ufffd\ufffd bytes then user x\ufffd failed"
    assert got[1].line_start == chunk.index(b"bad")
    assert got[3].line == "\ufffdab\ufffd"


def test_a_match_never_runs_from_one_line_into_the_next(engine: Engine) -> None:
    pats = [P("pair", r"alpha\s+beta"), P("tail", r"omega\s*$")]
    chunk = b"alpha\nbeta\nalpha  beta\nomega\nomega \r\n"
    assert [(x.pattern.name, x.line) for x in Matcher.build(pats, engine).scan(chunk)] == [
        ("pair", "alpha  beta"),
        ("tail", "omega"),
        ("tail", "omega \r"),  # `\s*` takes the "\r" of a CRLF line
    ]


def test_a_trailing_run_pattern_is_one_match_per_line_with_the_whole_group(engine: Engine) -> None:
    # Hyperscan scans a shortened copy of these (`.+` → `.`); the groups still come from the real pattern.
    pats = [P("msg", r"ERROR: (?P<msg>.+)"), P("url", r"from (?P<url>https?://\S+)"), P("q", r"'(?P<v>[^']*)")]
    chunk = b"ERROR: disk full on /var from http://x.example/a?b=1 and 'quoted value\n" * 500
    got = Matcher.build(pats, engine).scan(chunk)
    assert len(got) == 1500
    assert got[0].groups == {"msg": "disk full on /var from http://x.example/a?b=1 and 'quoted value"}
    assert got[1].groups == {"url": "http://x.example/a?b=1"}
    assert got[2].groups == {"v": "quoted value"}


def test_patterns_the_engine_lacks_still_match(engine: Engine) -> None:
    # Lookarounds and backreferences: Hyperscan prefilters them, RE2 cannot compile them, so they take the slow
    # path there; the matches are the same everywhere.
    pats = [P("behind", r"(?<=user=)(?P<u>\w+) denied"), P("twice", r"(?P<w>\w+) again (?P=w)"), P("plain", r"ok")]
    m = Matcher.build(pats, engine)
    assert set(m.slow_patterns) == ({"behind", "twice"} if engine == "re2" else set())
    chunk = b"user=bob denied\nid=bob denied\nfoo again foo\nfoo again bar\nok\n"
    assert found(m.scan(chunk)) == reference(pats, chunk)
    assert [x.pattern.name for x in m.scan(chunk)] == ["behind", "twice", "plain"]


def test_scan_lines_matches_each_record_as_a_unit(engine: Engine) -> None:
    pats = [
        P("exc", r"^(?P<type>\w+Error): (?P<msg>.*)$"),
        P("head", r"^Traceback \(most recent call last\):$"),
        P("spread", r"failed:\s+retrying"),
    ]
    tb = "Traceback (most recent call last):\n  File \"/app/x.py\", line 3, in f\nKeyError: 'k'"
    records = ["plain line", tb, "job failed:\n   retrying", "ValueError: bad", "failed:", "retrying"]
    got = Matcher.build(pats, engine).scan_lines(records)
    assert [(x.line_start, x.pattern.name, x.groups) for x in got] == [
        (1, "exc", {"type": "KeyError", "msg": "'k'"}),
        (1, "head", {}),
        (2, "spread", {}),
        (3, "exc", {"type": "ValueError", "msg": "bad"}),
    ]
    assert got[0].line == tb


def test_scan_lines_with_records_larger_than_a_block(engine: Engine) -> None:
    # RE2 cuts its input in blocks of a few KiB: a record is never split, so a match across its lines is seen.
    big = "x" * 20_000 + "\nboom:\n  " + "y" * 20_000 + " now"
    records = ["a"] * 100 + [big] + ["boom: now"] * 3
    got = Matcher.build([P("boom", r"boom:\s+y+ now|^boom: now$")], engine).scan_lines(records)
    assert [x.line_start for x in got] == [100, 101, 102, 103]


def test_empty_inputs(engine: Engine) -> None:
    m = Matcher.build([P("x", r"x")], engine)
    assert m.scan(b"") == [] and m.scan_lines([]) == [] and m.scan(b"\n\n\n") == []
    assert Matcher.build([], engine).scan(b"x\n") == []


def test_concurrent_scans_each_get_their_own_results(engine: Engine) -> None:
    m = Matcher.build([P("n", r"item (?P<n>\d+)")], engine)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for _ in range(50):
                chunk = "".join(f"item {k * 1000 + i}\nnoise\n" for i in range(200)).encode()
                got = [x.groups["n"] for x in m.scan(chunk)]
                assert got == [str(k * 1000 + i) for i in range(200)]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_auto_picks_the_fastest_engine_installed() -> None:
    m = Matcher.build([P("x", r"x")])
    if importlib.util.find_spec("hyperscan") is not None:
        assert m.engine_name == "hyperscan"
    elif importlib.util.find_spec("re2") is not None:
        assert m.engine_name == "re2"
    else:
        assert m.engine_name == "re"


def test_an_unknown_engine_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown matching engine"):
        Matcher.build([P("x", r"x")], "pcre")  # type: ignore[arg-type]


def test_patterns_and_matches_are_hashable_values() -> None:
    a = P("x", r"x", error_type="e")
    b = Pattern(name="x", regex=r"x", event_type="log.error", error_type="e", fields={"component": "api"})
    assert hash(a) == hash(b) and a != b
    m = Match(a, "x", 0, {"k": "v"})
    assert m == Match(a, "x", 0, {"k": "v"}) and hash(m) == hash(Match(a, "x", 0, {}))


# -- every engine agrees with the per-line loop, on arbitrary input ------------------------------------------------

AGREEMENT_PATTERNS = [
    P("err", r"ERROR:? (?P<n>\d+)"),
    P("start", r"^start\b"),
    P("end", r"end$"),
    P("caseless", r"(?i)error x"),
    P("dot", r"a.b"),
    P("accent", r"(?P<w>\w+)é"),
    P("behind", r"(?<=x)1"),
    P("spread", r"x\s+1"),
    P("tail", r"(?P<all>b.+)"),
    P("word", r"\bab\b"),
    P("colon", r"[^:\s]+:\d"),
    P("abs", r"\A1"),
    P("upto", r"ax{,2}1"),  # Python's {,n}: PCRE and RE2 would read it as text
]
_AGREEMENT: dict[str, Matcher] = {}


def _agreement_matcher(engine: Engine) -> Matcher:
    if engine not in _AGREEMENT:
        _AGREEMENT[engine] = Matcher.build(AGREEMENT_PATTERNS, engine)
    return _AGREEMENT[engine]


_PIECES = [b"a", b"b", b"x", b"ax", b"1", b"23", b" ", b"\t", b"\n", b"\n", b":", b"ERROR", b"error", b"start", b"end"]
_PIECES += [b"\xc3\xa9", b"\xff", b"\xc3", "💥".encode(), b"\r", b"ab", b"E"]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.lists(st.sampled_from(_PIECES), max_size=80).map(b"".join))
def test_every_engine_finds_what_the_per_line_loop_finds(engine: Engine, chunk: bytes) -> None:
    assert found(_agreement_matcher(engine).scan(chunk)) == reference(AGREEMENT_PATTERNS, chunk)
