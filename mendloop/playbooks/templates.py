"""Sandboxed Jinja2: one environment, every template compiled once when its playbook or config is loaded.

A string that is a single `{{ expression }}` renders to the expression's native value (a number stays a number);
any other string with template syntax renders to a string; plain strings pass through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jinja2 import ChainableUndefined, StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

Renderer = Callable[[Mapping[str, Any]], Any]

_SINGLE_EXPR = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


class TemplateCompileError(ValueError):
    pass


class TemplateRenderError(ValueError):
    pass


class Templates:
    def __init__(self) -> None:
        # Parameters fail loudly on a missing name; conditions treat a missing name as false.
        self.strict = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self.lenient = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)

    def compile_value(self, value: Any) -> Renderer:
        if isinstance(value, str):
            return self._compile_str(value)
        if isinstance(value, Mapping):
            items = [(k, self.compile_value(v)) for k, v in value.items()]
            return lambda ctx: {k: r(ctx) for k, r in items}
        if isinstance(value, list):
            parts = [self.compile_value(v) for v in value]
            return lambda ctx: [r(ctx) for r in parts]
        return lambda _ctx: value

    def _compile_str(self, text: str) -> Renderer:
        if "{{" not in text and "{%" not in text:
            return lambda _ctx: text
        try:
            match = _SINGLE_EXPR.match(text)
            if match and "}}" not in match.group("expr") and "{{" not in match.group("expr"):
                expr = self.strict.compile_expression(match.group("expr"), undefined_to_none=False)
                return _guard(lambda ctx: _plain(expr(**ctx)), text)
            template = self.strict.from_string(text)
        except TemplateError as exc:
            raise TemplateCompileError(f"bad template {text!r}: {exc}") from exc
        return _guard(lambda ctx: template.render(**ctx), text)

    def compile_condition(self, expression: str) -> Renderer:
        body = expression.strip()
        match = _SINGLE_EXPR.match(body)
        if match:
            body = match.group("expr")
        try:
            expr = self.lenient.compile_expression(body, undefined_to_none=True)
        except TemplateError as exc:
            raise TemplateCompileError(f"bad condition {expression!r}: {exc}") from exc
        return _guard(lambda ctx: bool(expr(**ctx)), expression)


def _plain(value: Any) -> Any:
    # Undefined values that slipped through lenient lookups become None rather than leaking Jinja objects.
    if value.__class__.__module__.startswith("jinja2"):
        return None
    return value


def _guard(fn: Renderer, source: str) -> Renderer:
    def render(ctx: Mapping[str, Any]) -> Any:
        try:
            return fn(ctx)
        except TemplateError as exc:
            raise TemplateRenderError(f"template {source!r}: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as exc:
            raise TemplateRenderError(f"template {source!r}: {exc}") from exc
        except RecursionError as exc:
            # Values nested deeper than Python recurses (a context thousands of levels deep) fail the render,
            # not the worker; the stack has unwound by the time this runs.
            raise TemplateRenderError(f"template {source!r}: value nested too deeply to render ({exc})") from exc

    return render
