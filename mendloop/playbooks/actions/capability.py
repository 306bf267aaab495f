"""Capabilities: named operations of a target, bound in config to a command or an HTTP call.

Playbooks name capabilities (`db.reconnect`), never endpoints, so one playbook serves any system whose config
binds them. An unbound capability fails its step with the config key to set: never a silent success.

A target that declares `runs:` (process, systemd, docker, kubernetes) gets `restart`, `deploy` (the same restart)
and, with a health URL, `health` from mendloop itself (`actions/restart.py`); its own binding of one of those names
wins. They count as bound everywhere: in `is_bound`/`bound`, and so in `config check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mendloop.config import CapabilityBinding, TargetConfig
from mendloop.errors import ActionError, CapabilityNotBound, ConfigError
from mendloop.infra.supervisor import Supervisor
from mendloop.playbooks.actions.base import ActionContext, glimpse
from mendloop.playbooks.actions.command import as_arg, run_command
from mendloop.playbooks.actions.http import call_http
from mendloop.playbooks.actions.restart import PROVIDED, Restarter
from mendloop.playbooks.templates import (
    Renderer,
    TemplateCompileError,
    TemplateRenderError,
    Templates,
    Tracking,
)

BINDING_TRACKING: Tracking = {("argv", "*"): "arg", ("url",): "url"}


@dataclass(frozen=True, slots=True)
class CompiledBinding:
    binding: CapabilityBinding
    render: Renderer
    expect: Renderer | None
    outputs: tuple[tuple[str, Renderer], ...]


class Capabilities:
    def __init__(self, targets: Mapping[str, TargetConfig], templates: Templates) -> None:
        self._targets = dict(targets)
        self._bindings: dict[tuple[str, str], CompiledBinding] = {}
        for tname, target in targets.items():
            for cname, binding in target.capabilities.items():
                if binding.command is not None:
                    spec = binding.command.model_dump()
                else:
                    assert binding.http is not None
                    spec = binding.http.model_dump(by_alias=True)
                try:
                    # A binding's argv and URL are filled from `args`, i.e. from the playbook and so from event
                    # data: tracked, so the actions refuse or encode what data wrote (bindings mark no options).
                    render = templates.compile_value(spec, track=BINDING_TRACKING)
                    expect = templates.compile_condition(binding.expect) if binding.expect else None
                    outputs = tuple((k, templates.compile_lookup(v)) for k, v in binding.outputs.items())
                except TemplateCompileError as exc:
                    raise ConfigError(f"targets.{tname}.capabilities.{cname}: {exc}") from exc
                self._bindings[(tname, cname)] = CompiledBinding(binding, render, expect, outputs)
        # Building one has no effect: a Restarter only reads its config until a capability is called.
        self._restarters = {tname: Restarter(tname, t.runs) for tname, t in targets.items() if t.runs is not None}

    def target_vars(self, name: str | None) -> dict[str, Any]:
        target = self._targets.get(name or "")
        if target is None:
            return {"name": name}
        return {
            "name": name,
            "base_url": target.base_url,
            "allowed_hosts": list(target.allowed_hosts),
            "repository": target.repository,
            "vars": dict(target.vars),
        }

    def bound(self, target: str | None) -> list[str]:
        names = {c for t, c in self._bindings if t == target}
        names.update(c for c in PROVIDED if self._provider(target, c) is not None)
        return sorted(names)

    def is_bound(self, target: str | None, name: str) -> bool:
        return (target or "", name) in self._bindings or self._provider(target, name) is not None

    def restarter(self, target: str | None) -> Restarter | None:
        """What restarts `target`, when it declares `runs:`."""
        return self._restarters.get(target or "")

    def supervisors(self) -> list[Supervisor]:
        """The `runs: {process: ...}` targets' supervisors (for starting or adopting them at startup)."""
        return [r.supervisor for r in self._restarters.values() if r.supervisor is not None]

    def _provider(self, target: str | None, name: str) -> Restarter | None:
        restarter = self._restarters.get(target or "")
        return restarter if restarter is not None and restarter.provides(name) else None

    def call(self, name: str, args: Mapping[str, Any], ctx: ActionContext, timeout: float | None) -> dict[str, Any]:
        if ctx.target is None:
            raise ActionError(
                f"capability {name!r} needs a target: set default_target or a playbook's target in the config",
                retryable=False,
            )
        found = self._bindings.get((ctx.target, name))
        if found is None:
            provider = self._provider(ctx.target, name)
            if provider is None:
                raise CapabilityNotBound(name, ctx.target)
            if name == "deploy" and (ctx.target, "restart") in self._bindings:
                return self.call("restart", args, ctx, timeout)  # deploy is the restart: the target's own one
            return _provided(provider, name, ctx, timeout)
        scope = {
            "args": dict(args),
            "target": self.target_vars(ctx.target),
            "idempotency_key": ctx.idempotency_key,
        }
        try:
            spec = found.render(scope)
        except TemplateRenderError as exc:
            raise ActionError(f"capability {name!r}: {exc}", retryable=False) from exc
        limit = min(filter(None, [timeout, float(spec["timeout"])]))
        try:
            if found.binding.command is not None:
                result = run_command(
                    [as_arg(a) for a in spec["argv"]],
                    cwd=spec.get("cwd"),
                    env=spec.get("env") or {},
                    timeout=limit,
                    idempotency_key=ctx.idempotency_key,
                    cancel=ctx.cancel,
                )
            else:
                result = call_http(
                    ctx.http,
                    method=spec["method"],
                    url=spec["url"],
                    json_body=_body(spec, args),
                    headers=spec.get("headers") or {},
                    expect_status=list(spec["expect_status"]),
                    timeout=limit,
                    idempotency_key=ctx.idempotency_key,
                    cancel=ctx.cancel,
                )
        except ActionError as exc:
            if exc.output:  # it answered, badly: a verify step still judges the normalised answer
                exc.output = _normalised(found, exc.output)
            raise
        result = _normalised(found, result)
        if found.expect is not None and not found.expect({"result": result}):
            raise ActionError(
                f"capability {name!r}: expected {found.binding.expect}; the answer was {glimpse(result)}",
                output=result,
            )
        return result


def _provided(provider: Restarter, name: str, ctx: ActionContext, timeout: float | None) -> dict[str, Any]:
    """A capability mendloop provides: `restart`/`deploy` (awaiting health) or `health`; its outputs are its own
    keys, as a JSON answer's are for a binding."""
    try:
        if name == "health":
            result = provider.health(ctx.http, timeout)
        else:
            result = provider.restart(idempotency_key=ctx.idempotency_key, timeout=timeout, cancel=ctx.cancel)
    except ActionError as exc:
        if exc.output:
            exc.output = {**exc.output, "outputs": dict(exc.output)}
        raise
    return {**result, "outputs": dict(result)}


def _normalised(found: CompiledBinding, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with `outputs`: a JSON object answer's keys, then the binding's own mapping over them."""
    outputs: dict[str, Any] = {}
    answer = result.get("json")
    if isinstance(answer, dict):
        outputs.update(answer)
    for key, lookup in found.outputs:
        try:
            outputs[key] = lookup({"result": result})
        except TemplateRenderError:
            outputs[key] = None
    return {**result, "outputs": outputs}


def _body(spec: Mapping[str, Any], args: Mapping[str, Any]) -> Any:
    # Without an explicit body, a capability's arguments are its JSON body (GET carries none).
    if spec.get("json") is not None:
        return spec["json"]
    if spec["method"] == "GET" or not args:
        return None
    return dict(args)
