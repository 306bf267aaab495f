"""Actions by name. `sleep`, `escalate` and `verify` change the run itself, so the engine handles them."""

from __future__ import annotations

from mendloop.playbooks.actions.base import Action
from mendloop.playbooks.actions.command import command_action
from mendloop.playbooks.actions.http import http_action

ACTIONS: dict[str, Action] = {
    "command": command_action,
    "http": http_action,
}
