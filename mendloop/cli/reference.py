"""The generated references: docs/configuration.md from the Settings model (every key, its type, default and
description, nested models in sections of their own) and docs/template-context.md from the template context's
schema (`playbooks/context_schema.py`). Generated, so they cannot drift from the code; the tests compare the
checked-in files with what this writes.

    python -m mendloop.cli.reference --write [--docs DIR]   # regenerate both files (default DIR: docs)
    python -m mendloop.cli.reference --check [--docs DIR]   # exit 1 naming each file that differs
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mendloop.config import Settings
from mendloop.playbooks import context_schema

CONFIGURATION = "configuration.md"
TEMPLATE_CONTEXT = "template-context.md"

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}


def _args(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_name(annotation: Any) -> str:
    """A field's type in words: `list of string`, `map of string to TargetConfig`, `"a" or "b"`."""
    if annotation is None or annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if typing.get_origin(annotation) is Annotated:
        return type_name(_args(annotation)[0])
    if _is_model(annotation):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in _args(annotation))
    if _is_union(annotation):
        return " or ".join(type_name(a) for a in _args(annotation))
    if origin is list:
        return f"list of {type_name(_args(annotation)[0])}"
    if origin is dict:
        key, value = _args(annotation)
        return f"map of {type_name(key)} to {type_name(value)}"
    return getattr(annotation, "__name__", str(annotation))


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if _is_model(annotation):
        yield annotation
        return
    for arg in _args(annotation):
        yield from _models_in(arg)


def default_of(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        value: Any = info.default
    elif info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "see its section"
    if isinstance(value, Path):
        value = str(value)
    return "`" + json.dumps(value, default=str) + "`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(model: type[BaseModel], title: str, env: str | None) -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"## {title}", ""]
    if doc and model is not Settings:
        lines += [_cell(doc).replace("\\|", "|"), ""]
    head = "| key | type | default | description |"
    if env:
        head = "| key | type | default | environment | description |"
    lines += [head, "|---|---|---|---|" + ("---|" if env else "")]
    hints = _hints(model)
    for name, info in model.model_fields.items():
        key = info.alias or name
        row = [f"`{key}`", _cell(type_name(hints.get(name, info.annotation))), _cell(default_of(info))]
        if env:
            row.append(f"`{env}{name.upper()}`")
        row.append(_cell(info.description or ""))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def configuration_markdown() -> str:
    """docs/configuration.md: every key of the Settings model and of each model nested in it."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from mendloop/config.py by `python -m mendloop.cli.reference --write`; do not edit by hand.",
        "tests/test_template_context.py fails when this file and the Settings model disagree. -->",
        "",
        "The keys of the YAML file given with `--config` (`mendloop config check -c FILE` validates one, "
        "`mendloop config schema` prints the JSON Schema). Every top-level key can also come from "
        "`MENDLOOP_<KEY>`, a nested one with `__` between the keys (`MENDLOOP_TRUST__INITIAL=0.9`); the "
        "environment wins over the file. Relative `playbook_dirs`, watcher `paths` and `agent_runner.repository` "
        "are relative to the config file.",
        "",
        *_section(Settings, "Top-level keys", "MENDLOOP_"),
    ]
    seen: set[type[BaseModel]] = {Settings}
    queue: list[type[BaseModel]] = list(_nested(Settings, seen))
    while queue:
        model = queue.pop(0)
        lines += _section(model, model.__name__, None)
        queue += _nested(model, seen)
    return "\n".join(lines).rstrip("\n") + "\n"


def _hints(model: type[BaseModel]) -> dict[str, Any]:
    """The fields' annotations resolved (a model defined later in config.py is a forward reference in its
    FieldInfo)."""
    hints: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        owner = next((k for k in model.__mro__ if name in inspect.get_annotations(k)), None)
        raw = inspect.get_annotations(owner)[name] if owner is not None else None
        if owner is None or not isinstance(raw, str):
            hints[name] = info.annotation
            continue
        holder = types.SimpleNamespace(__annotations__={name: raw})
        hints[name] = typing.get_type_hints(holder, globalns=vars(sys.modules[owner.__module__]), include_extras=True)[
            name
        ]
    return hints


def _nested(model: type[BaseModel], seen: set[type[BaseModel]]) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    hints = _hints(model)
    for name, info in model.model_fields.items():
        for nested in _models_in(hints.get(name, info.annotation)):
            if nested not in seen:
                seen.add(nested)
                found.append(nested)
    return found


def generated() -> dict[str, str]:
    """File name under docs/ → its text."""
    return {CONFIGURATION: configuration_markdown(), TEMPLATE_CONTEXT: context_schema.markdown()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mendloop.cli.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="The docs directory (default: docs).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="Write both references.")
    mode.add_argument("--check", action="store_true", help="Exit 1 if a checked-in reference differs.")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, text in generated().items():
        path = args.docs / name
        if args.write:
            path.write_text(text, encoding="utf-8")
            sys.stdout.write(f"wrote {path}\n")
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path))
    for path in stale:
        sys.stderr.write(f"error: {path} is out of date: run python -m mendloop.cli.reference --write\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
