"""Routing: which playbook handles a failure. The one place that decides it, for triggers and detections alike.

An error type routes through the routing table (the defaults merged with the config's `routing:`); a detection
with no routed error type falls back to the playbook whose `handles.event_types` names its event type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mendloop.domain.records import PlaybookRef
from mendloop.errors import ConfigError


class Routing:
    def __init__(
        self,
        error_types: Mapping[str, str],
        playbooks: Iterable[tuple[PlaybookRef, Iterable[str]]],
    ) -> None:
        """`error_types`: error type → playbook id; `playbooks`: each loaded playbook with the event types it
        handles. A route to a playbook that is not loaded is a ConfigError naming the routing key."""
        self.by_id: dict[str, PlaybookRef] = {}
        self._by_event_type: dict[str, str] = {}
        for ref, event_types in playbooks:
            self.by_id[ref.id] = ref
            for event_type in event_types:
                self._by_event_type[event_type] = ref.id
        for error_type, playbook_id in error_types.items():
            if playbook_id not in self.by_id:
                raise ConfigError(
                    f"routing.{error_type}: no playbook {playbook_id!r} is loaded", field=f"routing.{error_type}"
                )
        self._by_error_type = dict(error_types)

    def table(self) -> dict[str, str]:
        """Error type → playbook id, as `GET /playbooks` shows it."""
        return dict(self._by_error_type)

    def known_error_types(self) -> list[str]:
        return sorted(self._by_error_type)

    def knows_error_type(self, error_type: str) -> bool:
        return error_type in self._by_error_type

    def for_error_type(self, error_type: str) -> PlaybookRef | None:
        playbook_id = self._by_error_type.get(error_type)
        return self.by_id[playbook_id] if playbook_id is not None else None

    def for_detection(self, error_type: str | None, event_type: str) -> PlaybookRef | None:
        playbook_id = self._by_error_type.get(error_type or "") or self._by_event_type.get(event_type)
        return self.by_id.get(playbook_id) if playbook_id else None
