"""The pure parts of the peer bench's action measurements: the recorder log parse, the events, the configs."""

from pathlib import Path

import yaml

from bench.peer import actions, rulebook


def test_arrivals_keeps_each_jobs_first_line_and_skips_junk(tmp_path: Path) -> None:
    log = tmp_path / "recorder.log"
    log.write_text('10.5 {"job": 1}\n11.0 {"job": "2"}\n12.0 {"job": 1}\n13.0 not json at all\n14.0 {}\n')
    assert actions.arrivals(log) == {1: 10.5, 2: 11.0}


def test_latency_events_are_distinct_and_storm_events_identical() -> None:
    a, b = actions.distinct_event(1), actions.distinct_event(2)
    assert a["message"] != b["message"] and a["component"] != b["component"]
    s1, s2 = actions.storm_event(1), actions.storm_event(2)
    assert (s1["message"], s1["component"]) == (s2["message"], s2["component"])
    assert s1["event_id"] != s2["event_id"]


def test_mendloop_config_routes_the_event_type_to_an_http_first_step(tmp_path: Path) -> None:
    cfg = yaml.safe_load(actions.mendloop_config(tmp_path, 5555, storm=True).read_text())
    assert cfg["routing"] == {actions.EVENT_TYPE: actions.PLAYBOOK}
    assert cfg["storm"]["once_within_seconds"] == 10
    playbook = yaml.safe_load((tmp_path / "playbooks" / f"{actions.PLAYBOOK}.yaml").read_text())
    assert playbook["steps"][0]["action"] == "http"
    assert playbook["steps"][0]["with"]["url"] == "http://127.0.0.1:5555/action"


def test_storm_rulebook_throttles_once_within_10_seconds() -> None:
    rule = rulebook.rulebook("storm", 1, 2)[0]["rules"][0]
    assert rule["throttle"]["once_within"] == "10 seconds"
    assert rule["action"]["run_module"]["name"] == "ansible.builtin.uri"
