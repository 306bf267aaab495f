"""Lines → records: tracebacks and stack traces grouped, JSON parsed, everything else one line per record."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from mendloop.infra import traceback as tb
from mendloop.intake.lines import Line
from mendloop.intake.multiline import Grouper, Record, parse_json
from mendloop.intake.offsets import MemoryOffsetStore
from mendloop.intake.tail import Tailer


def lines_of(text: str, *, path: str = "/var/log/app.log", ts: float = 100.0, start: int = 0) -> list[Line]:
    out = []
    offset = start
    for raw in text.split("\n"):
        end = offset + len(raw.encode()) + 1
        out.append(Line(path, raw, offset, end, False, ts))
        offset = end
    return out


def real_chained_traceback() -> str:
    def load(name: str) -> dict[str, int]:
        return {"a": 1}[name]  # type: ignore[return-value]

    try:
        try:
            load("missing")
        except KeyError as e:
            raise RuntimeError("config could not be loaded") from e
    except RuntimeError:
        return traceback.format_exc().rstrip("\n")
    raise AssertionError("unreachable")


def real_handling_traceback() -> str:
    def report() -> None:
        raise ValueError("reporting failed too")

    try:
        try:
            int("not a number")
        except ValueError:
            report()  # raised while handling: Python chains it implicitly
    except ValueError:
        return traceback.format_exc().rstrip("\n")
    raise AssertionError("unreachable")


JAVA = """\
Exception in thread "main" java.lang.IllegalStateException: pipeline stalled
\tat com.example.pipeline.Runner.step(Runner.java:42)
\tat com.example.pipeline.Runner.run(Runner.java:17)
Caused by: java.net.SocketTimeoutException: Read timed out
\tat java.base/java.net.SocketInputStream.read(SocketInputStream.java:168)
\tat com.example.pipeline.Client.fetch(Client.java:88)
\t... 2 more"""


def test_python_traceback_with_a_cause_is_one_record() -> None:
    text = real_chained_traceback()
    assert "The above exception was the direct cause of the following exception:" in text
    g = Grouper()
    lines = lines_of("2026-11-26 12:00:00 ERROR loader failed\n" + text + "\n2026-11-26 12:00:01 INFO next")
    records = g.feed(lines)
    assert [r.lines for r in records] == [1, len(text.split("\n")), 1]
    before, record, after = records
    assert before.text == "2026-11-26 12:00:00 ERROR loader failed"
    assert record.text == text
    assert record.offset == lines[1].offset and record.end_offset == lines[-2].end_offset
    assert after.text == "2026-11-26 12:00:01 INFO next"
    parsed = tb.parse(record.text)
    assert parsed is not None and parsed.exception_type == "RuntimeError"
    assert parsed.frames[-1].function == "real_chained_traceback"


def test_python_traceback_during_handling_is_one_record() -> None:
    text = real_handling_traceback()
    assert "During handling of the above exception, another exception occurred:" in text
    g = Grouper()
    records = g.feed(lines_of(text + "\nnext line"))
    assert [r.text for r in records] == [text, "next line"]
    assert text.count("Traceback (most recent call last):") == 2


def test_a_traceback_at_the_end_of_the_file_is_flushed_after_quiet() -> None:
    text = real_chained_traceback()
    g = Grouper(group_timeout=0.5)
    assert g.feed(lines_of(text, ts=100.0)) == []
    assert g.pending == 1
    assert g.next_deadline() == 100.5
    assert g.flush(100.4) == []
    (record,) = g.flush(100.5)
    assert record.text == text and record.ts == 100.0
    assert g.pending == 0 and g.next_deadline() is None


def test_blank_lines_after_a_traceback_that_is_not_chained_are_their_own_records() -> None:
    g = Grouper()
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nKeyError: 'k'"
    records = g.feed(lines_of(text + "\n\n\nINFO fine"))
    assert [r.text for r in records] == [text, "", "", "INFO fine"]


def test_a_log_line_interrupting_a_traceback_ends_it() -> None:
    g = Grouper()
    text = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>'
    records = g.feed(lines_of(text + "\n2026-11-26 INFO unrelated"))
    assert [r.text for r in records] == [text, "2026-11-26 INFO unrelated"]


def test_exception_group_traceback_is_one_record() -> None:
    text = """\
  + Exception Group Traceback (most recent call last):
  |   File "app.py", line 3, in <module>
  |     raise ExceptionGroup("many", [ValueError(1), TypeError(2)])
  | ExceptionGroup: many (2 sub-exceptions)
  +-+---------------- 1 ----------------
    | ValueError: 1
    +---------------- 2 ----------------
    | TypeError: 2
    +------------------------------------"""
    records = Grouper().feed(lines_of(text + "\nERROR: Pipeline timeout after 300 seconds"))
    assert [r.text for r in records] == [text, "ERROR: Pipeline timeout after 300 seconds"]


def test_java_stack_trace_is_one_record() -> None:
    g = Grouper()
    records = g.feed(lines_of("INFO starting\n" + JAVA + "\nINFO recovered"))
    assert [(r.text, r.lines) for r in records] == [("INFO starting", 1), (JAVA, 7), ("INFO recovered", 1)]


def test_a_line_naming_an_exception_without_a_trace_stays_one_line() -> None:
    g = Grouper()
    records = g.feed(lines_of("WARN retrying after java.io.IOException: reset\nINFO ok"))
    assert [(r.text, r.lines) for r in records] == [
        ("WARN retrying after java.io.IOException: reset", 1),
        ("INFO ok", 1),
    ]
    assert g.feed(lines_of("ERROR gave up: java.io.IOException", ts=5.0)) == []
    assert [r.text for r in g.flush(5.5)] == ["ERROR gave up: java.io.IOException"]


def test_files_never_mix() -> None:
    g = Grouper()
    a = lines_of(real_chained_traceback(), path="/logs/a.log")
    b = lines_of(JAVA, path="/logs/b.log")
    interleaved = [x for pair in zip(a, b + [None] * len(a), strict=False) for x in pair if x is not None]
    records = g.feed(interleaved) + g.flush()
    by_path = {r.path: r for r in records}
    assert len(records) == 2
    assert by_path["/logs/a.log"].text == real_chained_traceback()
    assert by_path["/logs/b.log"].text == JAVA


def test_json_lines_are_parsed() -> None:
    obj = {"level": "error", "message": "ERROR: Pipeline timeout after 300 seconds", "seconds": 300}
    lines = lines_of(
        "\n".join(
            [
                json.dumps(obj),
                json.dumps({"msg": "from msg", "n": 1}),
                json.dumps({"level": "info", "other": "no message field"}),
                "{not json}",
                "[1, 2]",
                json.dumps({"message": {"nested": True}}),
            ]
        )
    )
    records = Grouper().feed(lines)
    assert records[0].text == obj["message"] and records[0].json == obj
    assert records[1].text == "from msg" and records[1].json == {"msg": "from msg", "n": 1}
    assert records[2].text == lines[2].text and records[2].json == {"level": "info", "other": "no message field"}
    assert records[3].json is None and records[3].text == "{not json}"
    assert records[4].json is None
    assert records[5].text == lines[5].text and records[5].json == {"message": {"nested": True}}
    assert parse_json("{" * 100_000 + "}" * 100_000) == ("{" * 100_000 + "}" * 100_000, None)


def test_docker_json_lines_of_a_traceback_are_grouped() -> None:
    text = real_chained_traceback()
    docker = "\n".join(json.dumps({"log": part + "\n", "stream": "stderr"}) for part in text.split("\n"))
    (record,) = Grouper().feed(lines_of(docker + "\n" + json.dumps({"log": "next\n", "stream": "stdout"})))[:1]
    assert record.text == text
    assert record.json == {"log": "Traceback (most recent call last):\n", "stream": "stderr"}


def test_a_runaway_group_is_cut_at_its_limit() -> None:
    g = Grouper(max_group_lines=10)
    text = "Traceback (most recent call last):\n" + "\n".join(f'  File "f{i}.py", line 1, in f' for i in range(25))
    records = g.feed(lines_of(text))
    assert records[0].lines == 10
    assert all(r.lines == 1 for r in records[1:])


def test_a_traceback_written_to_a_real_file_becomes_one_record(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    text = real_chained_traceback()
    with Tailer("w", [str(tmp_path / "*.log")], offsets=MemoryOffsetStore(), start_at="beginning") as t:
        g = Grouper()
        records: list[Record] = []
        # Written in two parts with a pass between: the group spans reads.
        head, _, rest = text.partition("\n\nThe above exception")
        log.write_text("INFO up\n" + head + "\n")
        records += g.feed(t.poll())
        with open(log, "a") as fh:
            fh.write("\nThe above exception" + rest + "\nINFO still up\n")
        records += g.feed(t.poll())
    assert [r.text for r in records] == ["INFO up", text, "INFO still up"]
    assert records[1].offset == len("INFO up\n")
