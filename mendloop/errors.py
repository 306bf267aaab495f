"""The one error tree. Only `api/errors.py` and `cli/root.py` turn these into HTTP statuses or exit codes."""

from __future__ import annotations

from typing import Any


class MendloopError(Exception):
    """Something went wrong in mendloop."""

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.message = message or (self.__doc__ or "error").strip()
        self.fields = fields
        super().__init__(self.message)


class ConfigError(MendloopError):
    """The configuration is invalid. `problems`: every problem found, one line each (the message is the first)."""

    def __init__(self, message: str | None = None, *, problems: list[str] | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.problems = list(problems) if problems else [self.message]


class PlaybookError(MendloopError):
    """A playbook is invalid."""

    def __init__(self, message: str, *, file: str, field: str | None = None) -> None:
        where = f"{file}: {field}: " if field else f"{file}: "
        super().__init__(where + message, file=file, field=field)
        self.file = file
        self.field = field


class InputError(MendloopError):
    """The request is invalid."""

    def __init__(self, message: str, *, field: str | None = None, **fields: Any) -> None:
        super().__init__(message, field=field, **fields)
        self.field = field


class UnknownErrorType(InputError):
    """No playbook handles this error type."""

    def __init__(self, error_type: str, known: list[str]) -> None:
        super().__init__(
            f"unknown error_type {error_type!r}; known: {', '.join(known)}",
            field="error_type",
            known_error_types=known,
        )


class AuthError(MendloopError):
    """Missing or invalid credentials."""


class Forbidden(MendloopError):
    """The credentials are valid, but their role or scope does not allow this."""


class NotFound(MendloopError):
    """The object does not exist."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} not found", kind=kind, id=ident)


class Conflict(MendloopError):
    """The object is not in a state that allows this."""


class StorageError(MendloopError):
    """The database failed."""


class ActionError(MendloopError):
    """A playbook step's action failed."""

    def __init__(self, message: str, *, output: dict[str, Any] | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.output = output or {}
        self.retryable = retryable


class StepCancelled(ActionError):
    """The run was cancelled (or its lease lost) while this step ran: the step was stopped, not failed."""

    def __init__(self, message: str = "stopped by the run's cancel") -> None:
        super().__init__(message, retryable=False)


class CapabilityNotBound(ActionError):
    """A playbook needs a capability the configuration does not bind."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(
            f"capability {name!r} is not bound for target {target!r}; "
            f"set targets.{target}.capabilities.{name!r} in the config",
            retryable=False,
        )
        self.name = name
        self.target = target


class PatchRejected(MendloopError):
    """A patch failed a safety check, did not apply, or its tests failed; nothing was applied."""

    def __init__(self, reason: str, message: str, **fields: Any) -> None:
        # reason: a work order fail reason such as unsafe_patch or tests_failed.
        super().__init__(message, reason=reason, **fields)
        self.reason = reason


class AgentError(MendloopError):
    """A coding agent failed, hung or produced nothing."""

    def __init__(self, reason: str, message: str, **fields: Any) -> None:
        super().__init__(message, reason=reason, **fields)
        self.reason = reason
