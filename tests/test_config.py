"""Settings precedence (defaults < file < environment < command line) and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mendloop.agents.adapters import adapter_names
from mendloop.config import AGENT_ADAPTERS, load_settings
from mendloop.errors import ConfigError


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 7000\nworkers: 3\ntrust: {initial: 0.5}\n")
    assert load_settings(cfg).port == 7000
    monkeypatch.setenv("MENDLOOP_PORT", "8001")
    monkeypatch.setenv("MENDLOOP_TRUST__INITIAL", "0.9")
    s = load_settings(cfg)
    assert (s.port, s.workers, s.trust.initial) == (8001, 3, 0.9)
    assert load_settings(cfg, port=9000).port == 9000
    cfg.write_text("targets: {svc: {base_url: 'http://x', capabilities: {ping: {http: {url: 'http://x'}}}}}\n")
    overridden = load_settings(cfg, workers=1)
    assert overridden.workers == 1 and overridden.targets["svc"].capabilities["ping"].http is not None


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("workers: many\n", "workers"),
        ("targets: {t: {capabilities: {x: {}}}}\n", "targets.t.capabilities.x"),
        ("default_target: nope\n", ""),
        ("bogus_key: 1\n", "bogus_key"),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(cfg) in info.value.message and field in info.value.message


def test_an_invalid_override_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(None, port=70000)


def test_the_settings_know_exactly_the_registered_adapters() -> None:
    # config.py sits below agents/, so it keeps the list of names; the registry refuses one it doesn't list.
    assert set(adapter_names()) == AGENT_ADAPTERS
