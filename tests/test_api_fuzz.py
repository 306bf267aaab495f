"""Schemathesis over the whole OpenAPI schema: whatever it sends, the API never answers 5xx and always answers
with what its schema promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from mendloop.api.server import create_api
from tests.support import examples, migrated_sqlite, open_app, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.hypothesis]  # `make fuzz` runs it too


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    app = open_app(
        settings_for(migrated_sqlite(tmp / "fuzz.db"), tmp, workers=1, trigger_wait_seconds=0), start_workers=True
    )
    yield create_api(app, manage=False)
    app.close()


def test_api_never_errors(api: object) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    checked = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/events/stream":
            continue  # an endless stream

        @given(case=op.as_strategy())
        # Seeds and database come from the profile (conftest.py): derandomized under CI, random under `make fuzz`.
        @settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if case.path in ("/patches/trigger", "/patches/work-orders/claim") and isinstance(case.body, dict):
                case.body["wait_seconds"] = 0  # long waits are for real clients, not for a fuzzer
            case.call_and_validate(excluded_checks=[negative_data_rejection, positive_data_acceptance])

        check()
        checked += 1
    assert checked >= 15
