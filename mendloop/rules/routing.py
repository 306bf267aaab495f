"""Routing: which playbook handles a failure. The one table that decides it, for triggers and detections alike.

The table is built from the playbooks' own `handles` (their error types and event types) and overridden by the
config's `routing:` (error type, or event type, → playbook id). Two playbooks claiming one type is a config error
naming both, unless `routing:` picks one for that type; a route to a playbook that is not loaded is a config error
naming the routing key. A detection routes by its error type first, then by its event type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from mendloop.domain.records import PlaybookRef
from mendloop.errors import ConfigError

RouteKind = Literal["error_type", "event_type"]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the table: `key` of `kind` goes to `playbook`, because of `source` (the playbook's `handles`,
    or the config's `routing:`)."""

    kind: RouteKind
    key: str
    playbook: str
    source: Literal["handles", "routing"]


@dataclass(frozen=True, slots=True)
class Claim:
    """A playbook and the types its `handles` names."""

    ref: PlaybookRef
    error_types: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()


def kind_of(key: str) -> RouteKind:
    """Event types are dotted (`database.connection_lost`); error types are not (`database_connection`)."""
    return "event_type" if "." in key else "error_type"


class Routing:
    def __init__(self, overrides: Mapping[str, str], claims: Iterable[Claim]) -> None:
        """`overrides`: the config's `routing:`; `claims`: every loaded playbook with its `handles`. Raises
        ConfigError for the first problem; `problems` lists them all (what `config check` reports)."""
        claims = list(claims)
        problems = routing_problems(overrides, claims)
        if problems:
            raise ConfigError(problems[0][1], field=problems[0][0])
        self.by_id: dict[str, PlaybookRef] = {c.ref.id: c.ref for c in claims}
        self.routes: dict[tuple[RouteKind, str], Route] = {}
        for claim in claims:
            for key in claim.error_types:
                self.routes[("error_type", key)] = Route("error_type", key, claim.ref.id, "handles")
            for key in claim.event_types:
                self.routes[("event_type", key)] = Route("event_type", key, claim.ref.id, "handles")
        for key, playbook_id in overrides.items():
            kind = kind_of(key)
            self.routes[(kind, key)] = Route(kind, key, playbook_id, "routing")

    def table(self) -> dict[str, str]:
        """Error type → playbook id."""
        return {key: r.playbook for (kind, key), r in sorted(self.routes.items()) if kind == "error_type"}

    def rows(self) -> list[Route]:
        """Every route, error types first, as `GET /routing` and `mendloop routing` show them."""
        return [self.routes[k] for k in sorted(self.routes)]

    def known_error_types(self) -> list[str]:
        return sorted(self.table())

    def knows_error_type(self, error_type: str) -> bool:
        return ("error_type", error_type) in self.routes

    def for_error_type(self, error_type: str) -> PlaybookRef | None:
        route = self.routes.get(("error_type", error_type))
        return self.by_id[route.playbook] if route is not None else None

    def for_detection(self, error_type: str | None, event_type: str) -> PlaybookRef | None:
        route = self.routes.get(("error_type", error_type or "")) or self.routes.get(("event_type", event_type))
        return self.by_id.get(route.playbook) if route is not None else None


def routing_problems(overrides: Mapping[str, str], claims: Iterable[Claim]) -> list[tuple[str, str]]:
    """(field, message) for every routing problem: a route to a playbook that is not loaded, a type two
    playbooks claim that `routing:` does not settle."""
    claims = list(claims)
    loaded = {c.ref.id for c in claims}
    problems: list[tuple[str, str]] = []
    for key, playbook_id in overrides.items():
        if playbook_id not in loaded:
            problems.append((f"routing.{key}", f"routing.{key}: no playbook {playbook_id!r} is loaded"))
    claimed: dict[tuple[RouteKind, str], list[str]] = {}
    for claim in claims:
        for key in claim.error_types:
            claimed.setdefault(("error_type", key), []).append(claim.ref.id)
        for key in claim.event_types:
            claimed.setdefault(("event_type", key), []).append(claim.ref.id)
    for (kind, key), ids in sorted(claimed.items()):
        if len(ids) > 1 and key not in overrides:
            names = " and ".join(repr(i) for i in ids)
            problems.append(
                (
                    f"routing.{key}",
                    f"{kind.replace('_', ' ')} {key!r} is claimed by playbooks {names}; choose one with routing.{key}",
                )
            )
    return problems
