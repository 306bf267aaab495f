"""Hypothesis over mendloop's input parsers: whatever arrives, nothing crashes, and every rejection is the
project's own error (mendloop/errors.py) naming what is wrong, never a bare KeyError, TypeError or ValueError.

Covered here: the playbook loader (documents and files), the diff safety checks, fingerprinting, the log line,
multi-line and traceback parsers, the Alertmanager and log-shipper bodies, config loading. The API as a whole is
fuzzed by tests/test_api_fuzz.py; fingerprint stability by tests/test_fingerprint.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mendloop.agents.patch_safety import Constraints, PatchSummary, check_diff
from mendloop.api.routes.events import _parse as parse_shipper_body
from mendloop.config import Settings, load_settings
from mendloop.errors import ConfigError, InputError, MendloopError, PatchRejected, PlaybookError
from mendloop.infra import traceback as tb
from mendloop.intake import log_prefix
from mendloop.intake.fingerprint import fingerprint, fingerprint_labels, fingerprint_traceback, normalise
from mendloop.intake.lines import Line, strip_ansi
from mendloop.intake.logs import LogIntake
from mendloop.intake.multiline import Grouper, parse_json
from mendloop.intake.service import parse_alertmanager, records_of
from mendloop.playbooks.loader import builtin_files, compile_document, load_file
from mendloop.playbooks.templates import Templates
from tests.support import examples

pytestmark = pytest.mark.hypothesis
ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HEX = re.compile(r"^[0-9a-f]+$")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=40)
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False), st.text(max_size=40)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
BUILTIN = [yaml.safe_load(p.read_text()) for p in builtin_files()]
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
TEMPLATES = Templates()


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a nested document (dict keys and list indexes), the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """`base` with a few of its nodes replaced by arbitrary values or removed: mostly valid, wrong in one place."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_of(doc)))
        if not path:
            return draw(documents)
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(documents)
        if not paths_of(doc)[1:]:
            break
    return doc


def assert_own_error(exc: BaseException) -> None:
    assert isinstance(exc, MendloopError), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), "an error with no message"
    assert "\n" not in str(exc).strip(), str(exc)  # one line: a CLI message, a log line, a JSON field


# -- the playbook loader -----------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(300))
@given(doc=st.one_of(documents, st.sampled_from(BUILTIN).flatmap(mutated)))
def test_any_playbook_document_compiles_or_is_a_playbook_error(doc: Any) -> None:
    try:
        compiled = compile_document(doc, source="pb/fuzz.yaml", templates=TEMPLATES)
    except PlaybookError as exc:
        assert_own_error(exc)
        assert "pb/fuzz.yaml" in str(exc)
    except MendloopError as exc:  # pragma: no cover - the loader's own kind is PlaybookError
        raise AssertionError(f"not a PlaybookError: {type(exc).__name__}: {exc}") from exc
    else:
        assert compiled.steps and compiled.version


@settings(FUZZ, max_examples=examples(150))
@given(
    raw=st.one_of(
        st.binary(max_size=300), st.sampled_from(BUILTIN).flatmap(mutated).map(lambda d: yaml.safe_dump(d).encode())
    )
)
@example(raw=b"\xff\xfe")
@example(raw=b"id: [unclosed")
@example(raw=b"&a [*a]")
def test_any_playbook_file_loads_or_is_a_playbook_error(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("pb") / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        load_file(path, TEMPLATES)
    except PlaybookError as exc:
        assert_own_error(exc)


# -- the diff safety checks --------------------------------------------------------------------------------------

VALID_DIFF = (
    "diff --git a/app/handler.py b/app/handler.py\n"
    "index 1111111..2222222 100644\n"
    "--- a/app/handler.py\n"
    "+++ b/app/handler.py\n"
    "@@ -1,3 +1,3 @@\n"
    " def handle(x):\n"
    "-    return x[0]\n"
    "+    return x[0] if x else None\n"
    " # end\n"
)
DIFF_LINES = VALID_DIFF.splitlines(keepends=True)
diff_pieces = st.sampled_from(
    [
        *DIFF_LINES,
        "new file mode 100755\n",
        "deleted file mode 100644\n",
        "old mode 100644\n",
        "new mode 120000\n",
        "rename from a.py\n",
        "rename to ../../etc/passwd\n",
        "similarity index 90%\n",
        "Binary files a/x and b/x differ\n",
        "GIT binary patch\n",
        "--- /dev/null\n",
        "+++ b/.git/config\n",
        "@@ -0,0 +1 @@\n",
        "\\ No newline at end of file\n",
        "@@ -a,b +c @@\n",
        "+++ b/\x00\n",
    ]
)


@settings(FUZZ, max_examples=examples(300))
@given(
    diff=st.one_of(
        st.text(max_size=400),
        st.lists(diff_pieces, max_size=20).map("".join),
        st.lists(st.one_of(diff_pieces, st.text(max_size=30)), max_size=14).map("".join),
    ),
    max_files=st.integers(1, 12),
)
def test_any_diff_is_summarised_or_rejected_with_a_reason(diff: str, max_files: int) -> None:
    try:
        summary = check_diff(diff, Constraints(max_files=max_files))
    except PatchRejected as exc:
        assert_own_error(exc)
        assert exc.reason
    except MendloopError as exc:
        raise AssertionError(f"not a PatchRejected: {type(exc).__name__}: {exc}") from exc
    else:
        assert isinstance(summary, PatchSummary)
        assert summary.added >= 0 and summary.removed >= 0


def test_the_valid_diff_passes() -> None:
    assert check_diff(VALID_DIFF, Constraints()).files == ("app/handler.py",)


# -- fingerprinting ----------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(300))
@given(
    text=st.text(max_size=300),
    error_type=st.none() | st.text(max_size=30),
    pattern=st.none() | st.text(max_size=30),
    labels=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=6),
)
def test_fingerprints_of_any_text_are_stable_hex_digests(
    text: str, error_type: str | None, pattern: str | None, labels: dict[str, str]
) -> None:
    first = fingerprint(text, error_type=error_type, pattern=pattern)
    assert first == fingerprint(text, error_type=error_type, pattern=pattern) and HEX.match(first)
    assert normalise(normalise(text)) is not None
    assert HEX.match(fingerprint_labels(labels))
    parsed = tb.parse(text)
    if parsed is not None:
        assert HEX.match(fingerprint_traceback(parsed, error_type=error_type))


# -- log lines, multi-line records, tracebacks -------------------------------------------------------------------

TRACEBACK_PIECES = [
    "Traceback (most recent call last):",
    '  File "/srv/app/handler.py", line 12, in handle',
    "    return x[0]",
    '  File "<string>", line 1, in <module>',
    "    ^^^^^^",
    "IndexError: list index out of range",
    "During handling of the above exception, another exception occurred:",
    "ValueError",
    "  continued message",
    "",
    "2024-01-01 12:00:00,123 ERROR [main] app: boom",
    '{"level": "error", "message": "db down", "ts": 1}',
    '{"log": "\\u001b[31mred\\u001b[0m\\n"}',
    "\tat com.example.Foo.bar(Foo.java:10)",
    "Caused by: java.lang.NullPointerException",
    '  File "x.py", line 99999999999999999999999, in f',
]
log_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(TRACEBACK_PIECES) | st.text(max_size=40), max_size=14).map("\n".join),
)


@settings(FUZZ, max_examples=examples(300))
@given(text=log_text)
def test_the_traceback_parser_takes_any_text(text: str) -> None:
    parsed = tb.parse(text)
    if parsed is not None:
        assert isinstance(parsed.exception_type, str)
        assert all(isinstance(f.line, int) for f in parsed.frames)
        tb.locate(parsed, None)
    assert isinstance(log_prefix.strip(text), str)
    assert "\x1b[31m" not in strip_ansi(text + "\x1b[31m")
    message, obj = parse_json(text)
    assert isinstance(message, str) and (obj is None or isinstance(obj, dict))


@settings(FUZZ, max_examples=examples(200))
@given(
    texts=st.lists(log_text.map(lambda t: t.replace("\n", " ")) | st.sampled_from(TRACEBACK_PIECES), max_size=30),
    paths=st.lists(st.sampled_from(["a.log", "b.log"]), min_size=1, max_size=30),
    max_lines=st.integers(1, 8),
    max_bytes=st.integers(1, 400),
)
def test_the_multiline_grouper_keeps_every_line_of_any_stream(
    texts: list[str], paths: list[str], max_lines: int, max_bytes: int
) -> None:
    grouper = Grouper(group_timeout=0.5, max_group_lines=max_lines, max_group_bytes=max_bytes)
    lines = []
    offsets = {"a.log": 0, "b.log": 0}
    for i, text in enumerate(texts):
        path = paths[i % len(paths)]
        size = len(text.encode()) + 1
        lines.append(Line(path, text, offsets[path], offsets[path] + size, False, float(i) * 0.1))
        offsets[path] += size
    records = grouper.feed(lines) + grouper.flush(None)
    assert grouper.pending == 0
    # Every line ends up in exactly one record: per path, the records tile the stream from its first line to its
    # last, in order, and count every physical line.
    for path in ("a.log", "b.log"):
        fed = [ln for ln in lines if ln.path == path]
        got = [r for r in records if r.path == path]
        assert sum(r.lines for r in got) == len(fed)
        starts = {ln.offset: ln for ln in fed}
        for r in got:
            assert r.offset in starts and r.end_offset in {ln.end_offset for ln in fed}
        assert [r.offset for r in got] == sorted(r.offset for r in got)


# -- Alertmanager and log-shipper bodies -------------------------------------------------------------------------

ALERT = {
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "HighErrorRate", "service": "api", "severity": "critical"},
            "annotations": {"summary": "errors"},
            "startsAt": "2024-01-01T00:00:00Z",
            "fingerprint": "abc123",
        }
    ],
}


@settings(FUZZ, max_examples=examples(300))
@given(body=st.one_of(json_values, st.just(ALERT).flatmap(mutated)))
def test_any_alertmanager_body_parses_or_names_the_bad_field(body: Any) -> None:
    try:
        parsed = parse_alertmanager(body)
    except InputError as exc:
        assert_own_error(exc)
        assert exc.fields.get("field")
    else:
        for alert in parsed.alerts:
            assert alert.labels is None or all(isinstance(v, str) for v in alert.labels.values())


SHIPPER = Settings.model_validate(
    {
        "database_url": "sqlite:///unused.db",
        "watchers": [
            {
                "name": "w",
                "paths": ["/nonexistent/*.log"],
                "patterns": [{"name": "err", "regex": r"ERROR (?P<what>\w+)", "error_type": "boom"}],
            }
        ],
    }
)
SHIPPER_INTAKE = LogIntake(SHIPPER)


@settings(FUZZ, max_examples=examples(300))
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.lists(json_values, max_size=6).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
        st.lists(
            st.fixed_dictionaries({}, optional={"log": log_text, "message": json_values, "host": json_values}),
            max_size=6,
        ).map(lambda rs: json.dumps(rs).encode()),
    ),
    content_type=st.sampled_from(["application/json", "application/x-ndjson", "text/plain", ""]),
)
@example(raw=b'[{"log": "ERROR disk"}, {"log": "ERROR disk"}]', content_type="application/json")
def test_any_log_shipper_body_is_read_or_rejected_as_bad_json(raw: bytes, content_type: str) -> None:
    try:
        body = parse_shipper_body(raw, content_type)
    except InputError as exc:
        assert_own_error(exc)
        assert exc.fields.get("field") == "body"
        return
    records = list(records_of(body))
    detections = SHIPPER_INTAKE.detect_records(records, "http")
    assert len(detections) <= len(records)
    assert all(d.error_type == "boom" and HEX.match(d.fingerprint) for d in detections)


# -- config loading ----------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(200))
@given(
    config=st.one_of(
        documents,
        st.just({**QUICKSTART, "database_url": "sqlite:///fuzz.db"}).flatmap(mutated),
        st.fixed_dictionaries(
            {"database_url": st.just("sqlite:///fuzz.db")},
            optional={
                "workers": scalars,
                "poll_interval": scalars,
                "routing": documents,
                "watchers": documents,
                "targets": documents,
                "storm": documents,
                "trust_gates": documents,
                "playbook_dirs": documents,
                "agent_runner": documents,
            },
        ),
    )
)
def test_any_config_file_loads_or_is_a_config_error(config: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("cfg") / "mendloop.yaml"
    try:
        path.write_text(yaml.safe_dump(config))
    except yaml.YAMLError:
        return
    try:
        loaded = load_settings(path)
    except ConfigError as exc:
        assert_own_error(exc)
    else:
        assert isinstance(loaded, Settings)


@settings(FUZZ, max_examples=examples(100))
@given(raw=st.binary(max_size=200))
@example(raw=b"\xff")
@example(raw=b"- a\n- b\n")
@example(raw=b"a: !!python/object:os.system {}")
def test_any_config_bytes_load_or_are_a_config_error(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("cfg") / "mendloop.yaml"
    path.write_bytes(raw)
    try:
        load_settings(path)
    except ConfigError as exc:
        assert_own_error(exc)
