"""A watcher fingerprints the pattern and the message, not the log prefix in front of it (issue 9, item 7): one
error written by two logging setups is one incident and one run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mendloop.errors import ConfigError
from mendloop.intake import log_prefix
from mendloop.intake.logs import LogIntake
from tests.support import settings_for

MESSAGE = "Pipeline timeout after 300 seconds"


@pytest.mark.parametrize(
    "line",
    [
        f"ERROR: {MESSAGE}",
        f"2026-11-26 10:00:00 ERROR: {MESSAGE}",
        f"2026-11-26T10:00:00.123+01:00 ERROR {MESSAGE}",
        f"2026-11-26 10:00:00,123 - importer.db - ERROR - {MESSAGE}",
        f"ERROR:importer.db:{MESSAGE}",
        f"Nov 26 10:00:00 web1 importer[4242]: ERROR {MESSAGE}",
        f"[2026-11-26T10:00:00Z] [ERROR] [Thread-3] {MESSAGE}",
        f"2026-11-26 10:00:00 [main] ERROR c.e.Importer - {MESSAGE}",
        f"12:00:01.5 ERROR (worker-2) {MESSAGE}",
        f"1764151200.123 ERROR {MESSAGE}",
    ],
)
def test_common_prefixes_are_recognised(line: str) -> None:
    assert log_prefix.strip(line) == MESSAGE


@pytest.mark.parametrize(
    "line",
    [
        "ValueError: bad value",  # an exception name is the message, not a logger
        "Import failed for rent.csv:",
        "- item 3 failed",
        "ERROR",  # nothing but a prefix: its own message
    ],
)
def test_a_message_without_a_prefix_is_left_whole(line: str) -> None:
    assert log_prefix.strip(line) == line


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_a_timestamp_in_front_never_changes_what_is_left(message: str) -> None:
    bare = log_prefix.strip(f"ERROR: {message}")
    if bare != f"ERROR: {message}":  # when the level alone was recognised, the timestamp must be too
        assert log_prefix.strip(f"2026-11-26 10:00:00.5 ERROR: {message}") == bare


def test_a_watchers_own_prefix_regex_is_used_instead() -> None:
    custom = re.compile(r"<\d+>\S+ ")
    assert log_prefix.strip(f"<13>svc-a ERROR: {MESSAGE}", custom) == f"ERROR: {MESSAGE}"
    assert log_prefix.strip(f"no match {MESSAGE}", custom) == f"no match {MESSAGE}"


def watcher_settings(tmp_path: Path, **watcher: object) -> LogIntake:
    settings = settings_for(
        "sqlite:///unused.db",
        tmp_path,
        watchers=[
            {
                "name": "app",
                "paths": [str(tmp_path / "app.log")],
                "patterns": [{"name": "timeout", "regex": "Pipeline timeout", "error_type": "pipeline_timeout"}],
                **watcher,
            }
        ],
    )
    return LogIntake(settings)


def test_two_prefixes_of_one_error_have_one_fingerprint(tmp_path: Path) -> None:
    intake = watcher_settings(tmp_path)
    lines = [f"2026-11-26 10:00:00 ERROR: {MESSAGE}", f"ERROR: {MESSAGE}", "[WARN] Pipeline timeout after 301 seconds"]
    found = intake.detect_lines(lines, matcher=intake.matchers["app"], source="watcher:app")
    assert len(found) == 3
    assert len({d.fingerprint for d in found}) == 1
    assert [d.message for d in found] == lines  # the evidence keeps the whole line


def test_the_pattern_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    settings = settings_for(
        "sqlite:///unused.db",
        tmp_path,
        watchers=[
            {
                "name": "app",
                "paths": [str(tmp_path / "app.log")],
                "patterns": [{"name": "a", "regex": "timeout"}, {"name": "b", "regex": "Pipeline"}],
            }
        ],
    )
    intake = LogIntake(settings)
    found = intake.detect_lines([f"ERROR: {MESSAGE}"], matcher=intake.matchers["app"], source="watcher:app")
    assert len(found) == 2 and found[0].fingerprint != found[1].fingerprint


def test_a_bad_prefix_regex_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"prefix.*not a valid regex"):
        watcher_settings(tmp_path, prefix="(unclosed")
