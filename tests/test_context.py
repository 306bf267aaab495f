"""What reaches an agent: tracebacks parsed and located in the repository, secrets redacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from mendloop.infra import traceback
from mendloop.infra.redact import MASK, Redactor

TB = """2026-11-26 10:00:00 ERROR ingestion crashed
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
  File "/srv/app/ingestion_pipeline.py", line 3, in chunk_size_for
    return size // 0
           ~~~~~^^~~
ZeroDivisionError: integer division or modulo by zero
"""


def test_traceback_is_parsed_and_located(tmp_path: Path) -> None:
    (tmp_path / "ingestion_pipeline.py").write_text("a = 1\n\ndef chunk_size_for(size):\n    return size // 0\n")
    parsed = traceback.parse(TB)
    assert parsed is not None
    assert parsed.exception_type == "ZeroDivisionError"
    assert parsed.message == "integer division or modulo by zero"
    assert [(f.file, f.line, f.function) for f in parsed.frames] == [
        ("/usr/lib/python3.11/threading.py", 1045, "_bootstrap_inner"),
        ("/srv/app/ingestion_pipeline.py", 3, "chunk_size_for"),
    ]
    traceback.locate(parsed, tmp_path)
    failing = parsed.failing_frame()
    assert failing is not None and failing.in_repository and failing.repository_path == "ingestion_pipeline.py"
    assert any(line.startswith("    3>") for line in failing.snippet)
    assert not parsed.frames[0].in_repository
    assert traceback.parse("no traceback here") is None


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("password=hunter2 user=bob", "hunter2"),
        ('{"api_key": "abcd1234efgh"}', "abcd1234efgh"),
        ("postgresql://app:s3cr3t@db:5432/x", "s3cr3t"),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl", "eyJhbGciOi"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123", "ghp_abcdefghijklmnopqrstuvwxyz0123"),
        ("key sk-proj-abcdefghijklmnop1234", "sk-proj-abcdefghijklmnop1234"),
        ("AKIAABCDEFGHIJKLMNOP in env", "AKIAABCDEFGHIJKLMNOP"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    out = Redactor().text(text)
    assert secret not in out and MASK in out


def test_redaction_walks_structures_and_takes_extra_patterns() -> None:
    r = Redactor(extra=[r"internal-\d+"])
    out = r.value({"line": "id internal-42 failed", "db_password": "x", "nested": [{"token": "abc"}], "n": 3})
    assert out == {"line": f"id {MASK} failed", "db_password": MASK, "nested": [{"token": MASK}], "n": 3}
    assert r.text("file book_123.pdf failed after 300 seconds") == "file book_123.pdf failed after 300 seconds"
