"""Who may do what: the roles of API tokens, the action each route is, and which roles may take which actions.

A route is named by its method and its path template (`POST /patches/runs/{run_id}/cancel`); `RULES` says which
action it is, and `ALLOWED` which actions a role may take. A route missing from `RULES` is `UNLISTED`, which only
`admin` may call: a new route is closed until someone decides who may call it (a test walks the app's routes and
fails on any that is not listed). Pure: the API's access middleware asks, storage and config do not decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    AGENT = "agent"
    INTAKE = "intake"
    ADMIN = "admin"


class Action(StrEnum):
    PUBLIC = "public"  # no token needed: liveness and the docs
    UNROUTED = "unrouted"  # no route matches (a 404 or 405): any valid token may learn that
    UNLISTED = "unlisted"  # a route without a rule: admin only, until it has one
    READ = "read"
    # What a coding agent reads: work orders (their context, their diffs) and the run one belongs to. An agent
    # token naming repositories reads those of its repositories only; every other read (all runs, events,
    # incidents, statistics, the dashboard) would show it other repositories' failures.
    WORK_READ = "work.read"
    TRIGGER = "runs.trigger"
    CANCEL = "runs.cancel"
    APPROVE = "work_orders.approve"
    MERGED = "work_orders.merged"
    REJECT = "work_orders.reject"
    RESOLVE = "incidents.resolve"
    RUN_APPROVE = "runs.approve"
    RUN_REJECT = "runs.reject"
    RETRY = "runs.retry"
    PAUSE = "control.pause"
    RESUME = "control.resume"
    CLAIM = "work_orders.claim"
    HEARTBEAT = "work_orders.heartbeat"
    COMPLETE = "work_orders.complete"
    FAIL = "work_orders.fail"
    MCP = "mcp"  # the MCP endpoint; each tool is then the REST call it makes, judged on its own
    INTAKE = "events.intake"
    TOKENS_LIST = "tokens.list"
    TOKENS_CREATE = "tokens.create"
    TOKENS_REVOKE = "tokens.revoke"
    AUDIT_READ = "audit.read"
    LOGOUT = "session.logout"  # the dashboard's logout: whoever holds a session may end it


# A Mount (the docs' static files) has no methods: its rule's method is "*".
ANY_METHOD = "*"
_WO = "/patches/work-orders/{work_order_id}"

RULES: dict[tuple[str, str], Action] = {
    ("GET", "/health"): Action.PUBLIC,
    ("GET", "/docs"): Action.PUBLIC,
    ("GET", "/openapi.json"): Action.PUBLIC,
    (ANY_METHOD, "/_static/swagger"): Action.PUBLIC,
    ("GET", "/patches/work-orders"): Action.WORK_READ,
    ("GET", _WO): Action.WORK_READ,
    ("GET", "/patches/diffs/{work_order_id}.diff"): Action.WORK_READ,
    ("GET", "/patches/runs"): Action.READ,
    ("GET", "/patches/runs/{run_id}"): Action.WORK_READ,
    ("GET", "/patches/stats"): Action.READ,
    ("GET", "/events/recent"): Action.READ,
    ("GET", "/events/stream"): Action.READ,
    ("GET", "/incidents"): Action.READ,
    ("GET", "/incidents/{incident_id}"): Action.READ,
    ("GET", "/incidents/{incident_id}/history"): Action.READ,
    ("GET", "/playbooks"): Action.READ,
    ("GET", "/trust"): Action.READ,
    ("GET", "/trust/{component}"): Action.READ,
    ("GET", "/routing"): Action.READ,
    ("GET", "/metrics"): Action.READ,
    ("GET", "/pauses"): Action.READ,
    ("POST", "/patches/runs/{run_id}/approve"): Action.RUN_APPROVE,
    ("POST", "/patches/runs/{run_id}/reject"): Action.RUN_REJECT,
    ("POST", "/patches/runs/{run_id}/retry"): Action.RETRY,
    ("POST", "/pause"): Action.PAUSE,
    ("POST", "/resume"): Action.RESUME,
    ("POST", "/patches/trigger"): Action.TRIGGER,
    ("POST", "/patches/runs/{run_id}/cancel"): Action.CANCEL,
    ("POST", f"{_WO}/approve"): Action.APPROVE,
    ("POST", f"{_WO}/merged"): Action.MERGED,
    ("POST", f"{_WO}/reject"): Action.REJECT,
    ("POST", "/incidents/{incident_id}/resolve"): Action.RESOLVE,
    ("POST", "/patches/work-orders/claim"): Action.CLAIM,
    ("POST", f"{_WO}/heartbeat"): Action.HEARTBEAT,
    ("POST", f"{_WO}/complete"): Action.COMPLETE,
    ("POST", f"{_WO}/fail"): Action.FAIL,
    ("POST", "/events"): Action.INTAKE,
    ("POST", "/events/alertmanager"): Action.INTAKE,
    ("GET", "/tokens"): Action.TOKENS_LIST,
    ("POST", "/tokens"): Action.TOKENS_CREATE,
    ("DELETE", "/tokens/{token_id}"): Action.TOKENS_REVOKE,
    ("GET", "/audit"): Action.AUDIT_READ,
    (ANY_METHOD, "/mcp"): Action.MCP,
    # The dashboard (mendloop/dashboard): its pages are reads; the login page and its assets need no token.
    ("GET", "/"): Action.READ,
    ("GET", "/ui/runs"): Action.READ,
    ("GET", "/ui/runs/{run_id}"): Action.READ,
    ("GET", "/ui/patches"): Action.READ,
    ("GET", "/ui/patches/{work_order_id}"): Action.READ,
    ("GET", "/ui/incidents"): Action.READ,
    ("GET", "/ui/trust"): Action.READ,
    ("GET", "/ui/login"): Action.PUBLIC,
    ("POST", "/ui/login"): Action.PUBLIC,
    ("POST", "/ui/logout"): Action.LOGOUT,
    (ANY_METHOD, "/ui/static"): Action.PUBLIC,
}
# The dashboard's pages: a browser without a credential is sent to the login page.
_PAGE_PREFIX = "/ui/"

OPERATOR_ACTIONS = frozenset(
    {
        Action.TRIGGER,
        Action.CANCEL,
        Action.APPROVE,
        Action.MERGED,
        Action.REJECT,
        Action.RESOLVE,
        Action.RUN_APPROVE,
        Action.RUN_REJECT,
        Action.RETRY,
        Action.PAUSE,
        Action.RESUME,
    }
)
AGENT_ACTIONS = frozenset({Action.CLAIM, Action.HEARTBEAT, Action.COMPLETE, Action.FAIL, Action.MCP})
ADMIN_ACTIONS = frozenset(
    {Action.TOKENS_LIST, Action.TOKENS_CREATE, Action.TOKENS_REVOKE, Action.AUDIT_READ, Action.UNLISTED}
)
_EVERYONE = frozenset({Action.PUBLIC, Action.UNROUTED, Action.LOGOUT})

ALLOWED: dict[Role, frozenset[Action]] = {
    Role.VIEWER: _EVERYONE | {Action.READ, Action.WORK_READ},
    Role.OPERATOR: _EVERYONE | {Action.READ, Action.WORK_READ} | OPERATOR_ACTIONS,
    Role.AGENT: _EVERYONE | {Action.WORK_READ} | AGENT_ACTIONS,
    Role.INTAKE: _EVERYONE | {Action.INTAKE},
    Role.ADMIN: frozenset(Action),
}

# The actions whose work order (the path's `work_order_id`) must be of a repository the agent's token names. Reads
# of one work order (its context, its diff) are scoped too: see `scoped_to_work_order`.
WORK_ORDER_SCOPED = frozenset({Action.HEARTBEAT, Action.COMPLETE, Action.FAIL})
# What the audit log keeps: every operator and admin action, allowed or not. An agent's claims and heartbeats and
# intake's events are not operators' actions (a runner long-polls claim every few seconds, forever); any refusal
# with 403 is kept whatever its action.
AUDITED = OPERATOR_ACTIONS | ADMIN_ACTIONS
# In a token's repositories: every repository (and work orders that name none).
ALL_REPOSITORIES = "*"


def scoped_to_work_order(action: Action, params: Mapping[str, str]) -> bool:
    """Whether a scoped agent token's call must be of a work order of its repositories: the pull API's verbs, and
    any other route that names one work order (reading its context or its diff: what an agent sees of another
    repository's failure is not its to see)."""
    return action in WORK_ORDER_SCOPED or "work_order_id" in params


def scoped_to_run(action: Action, params: Mapping[str, str]) -> bool:
    """Whether a scoped agent token's call must be of a run whose work order is of its repositories: reading one
    run (the coding agent's own work order's, for its timeline)."""
    return action is Action.WORK_READ and "run_id" in params


def action_for(method: str, template: str) -> Action:
    """The action a route is; `UNLISTED` for a route without a rule. HEAD is GET's."""
    method = "GET" if method == "HEAD" else method
    found = RULES.get((method, template)) or RULES.get((ANY_METHOD, template))
    return found if found is not None else Action.UNLISTED


def is_page(template: str) -> bool:
    """Whether a route is one of the dashboard's pages (read with a session cookie, from a browser)."""
    return template == "/" or (template.startswith(_PAGE_PREFIX) and RULES.get(("GET", template)) is Action.READ)


def allows(role: Role, action: Action) -> bool:
    return action in ALLOWED[role]


def roles_for(action: Action) -> list[Role]:
    """The roles that may take `action`, for the 403's message."""
    return [role for role in Role if action in ALLOWED[role]]


def audited(action: Action, status: int) -> bool:
    return action in AUDITED or status == 403


@dataclass(frozen=True, slots=True)
class Credential:
    """Whoever a token stands for. `id` says where it comes from (`db:<id>`, `config:<name>`, `process:agent`);
    `repositories` is None when the token may work for every repository."""

    id: str
    name: str
    role: Role
    repositories: tuple[str, ...] | None = None

    def works_for(self, repository: str | None) -> bool:
        """Whether this token may claim, heartbeat, complete or fail a work order of `repository` (None: the work
        order names none). Only agent tokens are scoped; an admin works for every repository."""
        if self.role is not Role.AGENT or self.repositories is None:
            return True
        return repository is not None and repository in self.repositories

    def claim_scope(self) -> tuple[str, ...] | None:
        """The repositories a claim may hand out work orders of; None: any."""
        return self.repositories if self.role is Role.AGENT else None


def scope_of(repositories: Iterable[str]) -> tuple[str, ...] | None:
    """A token's stored repositories as a scope: `*` is every repository."""
    given = tuple(repositories)
    return None if ALL_REPOSITORIES in given else given


def spec_problem(role: str, repositories: Iterable[str]) -> str | None:
    """What is wrong with a token of `role` naming `repositories` (None when nothing): only agent tokens name
    repositories, and they must name at least one (`*` for every repository, alone)."""
    if role not in {r.value for r in Role}:
        return f"unknown role {role!r}; known: {', '.join(Role)}"
    given = list(repositories)
    if role != Role.AGENT:
        return f"only agent tokens name repositories, not {role} tokens" if given else None
    if not given:
        return f"an agent token names the repositories it may work for ({ALL_REPOSITORIES!r} for every repository)"
    if any(not r.strip() for r in given):
        return "a repository is empty"
    if ALL_REPOSITORIES in given and len(given) > 1:
        return f"{ALL_REPOSITORIES!r} (every repository) stands alone"
    return None


__all__ = [
    "ADMIN_ACTIONS",
    "AGENT_ACTIONS",
    "ALLOWED",
    "ALL_REPOSITORIES",
    "ANY_METHOD",
    "AUDITED",
    "OPERATOR_ACTIONS",
    "RULES",
    "WORK_ORDER_SCOPED",
    "Action",
    "Credential",
    "Role",
    "action_for",
    "allows",
    "audited",
    "is_page",
    "roles_for",
    "scope_of",
    "scoped_to_work_order",
    "spec_problem",
]
