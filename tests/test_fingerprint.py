"""Fingerprints group the same error whatever its values, and keep different errors apart."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mendloop.infra import traceback
from mendloop.intake.fingerprint import fingerprint, fingerprint_traceback, normalise
from tests.support import examples


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("ERROR: Pipeline timeout after 300 seconds", "ERROR: Pipeline timeout after 5 seconds"),
        (
            "2026-11-26T10:00:00.123Z request 3fa85f64-5717-4562-b3fc-2c963f66afa6 failed",
            "2027-01-02 23:59:59,999 request 9c1e0b7a-0000-4abc-8def-000000000001 failed",
        ),
        ("segfault at 0x7f3a2b9c ip 00007f3a2b9c1234", "segfault at 0xdeadbeef ip 0000000000401000"),
        ("commit a71d08e2 not found", "commit 12345678 not found"),
        ("connection to 10.0.3.4:5432 refused", "connection to 192.168.1.20:6543 refused"),
        ("connection to [fe80::1]:8080 refused", "connection to [2001:db8::7334]:80 refused"),
        ("cannot open /var/lib/app/data/12.db", "cannot open /srv/other/x.sqlite"),
        (r"cannot open C:\Users\me\app.log", r"cannot open D:\logs\today.log"),
        ("error in src/app/models.py", "error in lib/other/views.py"),
        ("fetch https://api.example.com/v1/items?id=4 failed", "fetch http://localhost:8080/ failed"),
        ("KeyError: 'user_123'", "KeyError: 'some other key'"),
        ('unknown field "amount" in payload', 'unknown field "currency_code" in payload'),
        ("missing ids [1, 2, 3]", "missing ids [42]"),
        ("took 12:00:01 to run", "took 3:4:5.250 to run"),
        ("\x1b[31mERROR\x1b[0m   disk   full", "ERROR disk full"),
        ("worker-7 crashed", "worker-12 crashed"),
    ],
)
def test_the_same_error_with_other_values_has_one_fingerprint(a: str, b: str) -> None:
    assert normalise(a) == normalise(b)
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("ERROR: Pipeline timeout after 300 seconds", "ERROR: Pipeline failed after 300 seconds"),
        ("KeyError: 'user_123'", "ValueError: 'user_123'"),
        ("connection to 10.0.3.4:5432 refused", "connection to 10.0.3.4:5432 reset"),
        ("error in main.py", "error in util.py"),
        ("disk full", "disk  full on /var"),
    ],
)
def test_different_message_shapes_have_different_fingerprints(a: str, b: str) -> None:
    assert fingerprint(a) != fingerprint(b)


def test_error_type_is_part_of_the_fingerprint() -> None:
    line = "ERROR: Pipeline timeout after 300 seconds"
    assert fingerprint(line, error_type="a") != fingerprint(line, error_type="b") != fingerprint(line)
    assert fingerprint(line, error_type="a") == fingerprint(line.replace("300", "7"), error_type="a")


def test_fingerprint_is_16_hex_digits_and_normalise_is_readable() -> None:
    fp = fingerprint("anything 1")
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert normalise("2026-11-26T10:00:00Z  user 42 read '/etc/x' from 10.1.2.3\tin 0.5s") == (
        "<ts> user <n> read <str> from <ip> in <n>.<n>s"
    )
    # Apostrophes are not quotes; words stay words.
    assert normalise("don't retry, it's final") == "don't retry, it's final"


def test_a_huge_line_is_fingerprinted_by_its_beginning_quickly() -> None:
    huge = "ERROR boom " + "x1 " * 3_000_000
    assert fingerprint(huge) == fingerprint(huge + "tail")


TB_A = """Traceback (most recent call last):
  File "/srv/app/service.py", line 42, in handle
    result = compute(payload)
  File "/srv/app/compute.py", line 7, in compute
    return table[key]
KeyError: 'user_1'
"""


def _tb(text: str) -> traceback.ParsedTraceback:
    parsed = traceback.parse(text)
    assert parsed is not None
    return parsed


def test_a_traceback_fingerprint_ignores_line_numbers_messages_and_directories() -> None:
    moved = TB_A.replace("line 42", "line 58").replace("line 7,", "line 9,").replace("user_1", "someone else")
    elsewhere = TB_A.replace("/srv/app/", "/home/dev/checkout/app/")
    assert (
        fingerprint_traceback(_tb(TB_A)) == fingerprint_traceback(_tb(moved)) == fingerprint_traceback(_tb(elsewhere))
    )


def test_a_traceback_fingerprint_changes_with_the_type_or_the_frames() -> None:
    base = fingerprint_traceback(_tb(TB_A))
    assert fingerprint_traceback(_tb(TB_A.replace("KeyError", "IndexError"))) != base
    assert fingerprint_traceback(_tb(TB_A.replace("in compute", "in lookup"))) != base
    assert fingerprint_traceback(_tb(TB_A.replace("compute.py", "tables.py"))) != base
    assert fingerprint_traceback(_tb(TB_A), error_type="x") != base
    # Not the same key as the plain line fingerprint of the same text.
    assert base != fingerprint(TB_A)


def test_a_traceback_without_frames_falls_back_to_type_and_message_shape() -> None:
    a = traceback.ParsedTraceback(exception_type="RuntimeError", message="worker 3 died", frames=[])
    b = traceback.ParsedTraceback(exception_type="RuntimeError", message="worker 17 died", frames=[])
    c = traceback.ParsedTraceback(exception_type="RuntimeError", message="queue closed", frames=[])
    assert fingerprint_traceback(a) == fingerprint_traceback(b) != fingerprint_traceback(c)


# -- properties ------------------------------------------------------------------------------------------------------

# Lines built from the pieces the rules care about, so that the generated text exercises them.
_TOKENS = st.sampled_from(
    [
        "ERROR",
        "timeout",
        "user",
        "0x",
        "x",
        "a",
        "f",
        "e",
        "T",
        "Z",
        "/",
        "\\",
        ".",
        ":",
        "::",
        "-",
        ",",
        " ",
        "  ",
        "\t",
        "'",
        '"',
        "[",
        "]",
        "http://",
        "C:\\",
        "~/",
        "_",
        "é",
        "py",
        "7",
        "42",
        "2026",
    ]
)
_LINES = st.lists(st.one_of(_TOKENS, st.from_regex(r"[0-9]{1,12}", fullmatch=True)), max_size=40).map("".join)


@settings(max_examples=examples(400), deadline=None)
@given(line=_LINES, data=st.data())
def test_replacing_any_digit_run_never_changes_the_fingerprint(line: str, data: st.DataObject) -> None:
    runs = list(re.finditer(r"\d+", line))
    if not runs:
        return
    which = data.draw(st.sampled_from(runs))
    replacement = data.draw(st.from_regex(r"[0-9]{1,12}", fullmatch=True))
    changed = line[: which.start()] + replacement + line[which.end() :]
    assert normalise(changed) == normalise(line)
    assert fingerprint(changed) == fingerprint(line)


@settings(max_examples=examples(200), deadline=None)
@given(text=st.text(max_size=200))
# A later rule's placeholder must not open a boundary an earlier rule stopped at: `1/x` → `<n>/x`, not `<n><path>`.
@example(text="0/@")
@example(text="1g://b")
@example(text="1'a'")
@example(text="'a'1")
@example(text="1./a")
@example(text="/a//b")
@example(text="C:\\a/b")
@example(text="'a', 1/x")
@example(text="a/b.c9/")
# Whitespace collapses before quotes pair; a Windows path leaves a quote's escape alone; a stray escape goes.
@example(text='"a\nb"')
@example(text='"C:\\a\\"')
@example(text="\x1b\x1b[m[m")
# A normal form longer than MAX_CHARS would be cut when normalised again.
@example(text="1 " * 40_000)
@example(text="a" * 65_535 + "1")
def test_normalise_is_total_and_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert len(fingerprint(text)) == 16


@settings(max_examples=examples(300), deadline=None)
@given(line=st.text(max_size=120), data=st.data())
def test_replacing_a_digit_run_in_any_text_never_changes_the_fingerprint(line: str, data: st.DataObject) -> None:
    runs = list(re.finditer(r"[0-9]+", line))
    if not runs:
        line += " 1"
        runs = list(re.finditer(r"[0-9]+", line))
    which = data.draw(st.sampled_from(runs))
    replacement = data.draw(st.from_regex(r"[0-9]{1,12}", fullmatch=True))
    assert fingerprint(line[: which.start()] + replacement + line[which.end() :]) == fingerprint(line)
