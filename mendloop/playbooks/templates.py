"""Sandboxed Jinja2: one environment, every template compiled once when its playbook or config is loaded.

A string that is a single `{{ expression }}` renders to the expression's native value (a number stays a number);
any other string with template syntax renders to a string; plain strings pass through untouched.

Strings in positions where data could steer a program or a request (an argv item, a URL) are compiled *tracked*:
they render to a `Tracked` string that remembers which characters came from an expression (event data, earlier
outputs, the target's variables) and which from the template's literal text, so the actions can refuse or encode
exactly the parts a caller controls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from jinja2 import ChainableUndefined, StrictUndefined, TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mendloop.playbooks.context_schema import RESULT_NAMES, STEP_NAMES

Renderer = Callable[[Mapping[str, Any]], Any]
# Where a tracked string sits, as a path of keys into the parameters ("*" is any list index), and what it is.
TrackKind = Literal["arg", "url"]
Tracking = Mapping[tuple[str, ...], TrackKind]

_SINGLE_EXPR = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


# Private-use characters that bracket every expression's output while a tracked string renders. Expression values
# have them removed before they are bracketed, and templates that contain them are refused, so data cannot forge a
# boundary.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _mark(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return _OPEN + text.replace(_OPEN, "").replace(_CLOSE, "") + _CLOSE


class Tracked(str):
    """A rendered string and the spans `[start, end)` of it that came from expressions, not literal text."""

    spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, spans: tuple[tuple[int, int], ...] = ()) -> Tracked:
        self = super().__new__(cls, text)
        self.spans = tuple((a, b) for a, b in spans if b > a)
        return self

    @property
    def data_led(self) -> bool:
        """The first character came from data: whether the string reads as an option is the data's choice."""
        return bool(self.spans) and self.spans[0][0] == 0

    def is_data(self, index: int) -> bool:
        return any(a <= index < b for a, b in self.spans)


class TrackedUrl(Tracked):
    """A tracked URL with what the target says about where it may go (see `actions/http.py` `guard_url`)."""

    base_url: str | None
    allowed_hosts: tuple[str, ...]


def _unmark(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    start: int | None = None
    size = 0
    for ch in marked:
        if ch == _OPEN:
            start = size
        elif ch == _CLOSE:
            if start is not None:
                spans.append((start, size))
            start = None
        else:
            out.append(ch)
            size += 1
    return "".join(out), tuple(spans)


class TemplateCompileError(ValueError):
    pass


class TemplateRenderError(ValueError):
    pass


# The names a step's templates see (engine/step_loop.py builds them), and the extra name of a verify step's
# `expect` and of a binding's `expect` and `outputs`: what the service answered. Both come from the one schema of
# the template context (`context_schema.py`; tests/test_template_context.py holds the code to it).
STEP_SCOPE: frozenset[str] = STEP_NAMES
RESULT_SCOPE: frozenset[str] = RESULT_NAMES


def names_used(text: str) -> set[str]:
    """The top-level names a template (`{{ ... }}` inside text) or a bare expression (a condition) reads:
    `steps`, `context`, ...; a loop's own names aside."""
    source = text if ("{{" in text or "{%" in text) else "{{ " + text + " }}"
    try:
        return set(meta.find_undeclared_variables(_PARSER.parse(source)))
    except TemplateError as exc:
        raise TemplateCompileError(f"bad template {text!r}: {exc}") from exc


_PARSER = ImmutableSandboxedEnvironment(autoescape=False)


class Templates:
    def __init__(self) -> None:
        # Parameters fail loudly on a missing name; conditions treat a missing name as false.
        self.strict = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        self.lenient = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)
        # Tracked strings: every expression's output is bracketed by _OPEN/_CLOSE, then the brackets become spans.
        self.tracking = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, finalize=_mark)

    def compile_value(self, value: Any, *, track: Tracking | None = None, path: tuple[str, ...] = ()) -> Renderer:
        """`track` names the paths whose strings are compiled tracked (e.g. `("argv", "*"): "arg"`)."""
        if isinstance(value, str):
            kind = _kind_at(track, path)
            return self.compile_tracked(value, kind) if kind else self._compile_str(value)
        if isinstance(value, Mapping):
            items = [(k, self.compile_value(v, track=track, path=(*path, str(k)))) for k, v in value.items()]
            return lambda ctx: {k: r(ctx) for k, r in items}
        if isinstance(value, list):
            parts = [self.compile_value(v, track=track, path=(*path, "*")) for v in value]
            return lambda ctx: [r(ctx) for r in parts]
        return lambda _ctx: value

    def compile_tracked(self, text: str, kind: TrackKind) -> Renderer:
        if _OPEN in text or _CLOSE in text:
            raise TemplateCompileError(f"bad template {text!r}: private-use characters U+E000/U+E001 are reserved")
        if "{{" not in text and "{%" not in text:
            render: Renderer = lambda _ctx: (text, ())  # noqa: E731
        elif kind == "arg" and (native := self._native(text)) is not None:
            # One expression: its value, as `compile_value` gives it, all of it data. A value that is not a string
            # is stringified by the action (`actions/command.py` `as_arg`), which tracks it as data.
            return lambda ctx: _tracked_native(native(ctx))
        else:
            try:
                template = self.tracking.from_string(text)
            except TemplateError as exc:
                raise TemplateCompileError(f"bad template {text!r}: {exc}") from exc
            render = _guard(lambda ctx: _unmark(template.render(**ctx)), text)
        if kind == "arg":
            return lambda ctx: Tracked(*render(ctx))

        def url(ctx: Mapping[str, Any]) -> TrackedUrl:
            rendered, spans = render(ctx)
            return _url(rendered, spans, ctx.get("target"))

        return url

    def _native(self, text: str) -> Renderer | None:
        match = _SINGLE_EXPR.match(text)
        if not (match and "}}" not in match.group("expr") and "{{" not in match.group("expr")):
            return None
        try:
            expr = self.strict.compile_expression(match.group("expr"), undefined_to_none=False)
        except TemplateError as exc:
            raise TemplateCompileError(f"bad template {text!r}: {exc}") from exc
        return _guard(lambda ctx: _plain(expr(**ctx)), text)

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

    def compile_lookup(self, expression: str) -> Renderer:
        """An expression's value (`result.json.db_connected`), None where a name is missing: a capability
        binding's output mapping, evaluated on whatever the service answered."""
        expr = self._lenient_expression(expression, "expression")
        return _guard(lambda ctx: _plain(expr(**ctx)), expression)

    def compile_condition(self, expression: str) -> Renderer:
        expr = self._lenient_expression(expression, "condition")
        return _guard(lambda ctx: bool(expr(**ctx)), expression)

    def _lenient_expression(self, expression: str, what: str) -> Callable[..., Any]:
        """A bare expression (or one `{{ ... }}`) where a missing name is None, not an error."""
        body = expression.strip()
        match = _SINGLE_EXPR.match(body)
        if match:
            body = match.group("expr")
        try:
            return self.lenient.compile_expression(body, undefined_to_none=True)
        except TemplateError as exc:
            raise TemplateCompileError(f"bad {what} {expression!r}: {exc}") from exc


def _tracked_native(value: Any) -> Any:
    return Tracked(value, ((0, len(value)),)) if isinstance(value, str) else value


def _kind_at(track: Tracking | None, path: tuple[str, ...]) -> TrackKind | None:
    return None if not track else track.get(path)


def _url(text: str, spans: tuple[tuple[int, int], ...], target: Any) -> TrackedUrl:
    base_url = allowed = None
    if isinstance(target, Mapping):
        base_url, allowed = target.get("base_url"), target.get("allowed_hosts")
    # `{{ target.base_url }}` at the start is the configured origin, not data: the one expression trusted with the
    # scheme, host and port. It is recognised by its value, so data equal to base_url is harmless by definition.
    if base_url and spans and spans[0][0] == 0 and text[: spans[0][1]] == base_url:
        spans = spans[1:]
    url = TrackedUrl(text, spans)
    url.base_url = base_url if isinstance(base_url, str) else None
    url.allowed_hosts = tuple(str(h) for h in allowed or ())
    return url


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
