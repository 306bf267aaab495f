"""YAML → schema → compiled playbook. A bad file is a PlaybookError naming the file and the field."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mendloop.config import yaml_problem
from mendloop.errors import PlaybookError
from mendloop.playbooks.model import Playbook, Step
from mendloop.playbooks.templates import Renderer, TemplateCompileError, Templates, Tracking

# The strings of a step that data could use to steer a program or a request: compiled tracked, so the command and
# http actions know which characters came from data (see `templates.Tracked`).
_TRACKING: dict[str, Tracking] = {
    "command": {("argv", "*"): "arg"},
    "http": {("url",): "url"},
    "verify": {("check", "command", "argv", "*"): "arg", ("check", "http", "url"): "url"},
}


@dataclass(frozen=True, slots=True)
class CompiledStep:
    step: Step
    params: Renderer
    when: Renderer | None
    expect: Renderer | None


@dataclass(frozen=True, slots=True)
class CompiledPlaybook:
    model: Playbook
    source: str
    # The exact document a run stores and later resumes from.
    document: dict[str, Any]
    version: str
    steps: tuple[CompiledStep, ...]

    @property
    def id(self) -> str:
        return self.model.id


def version_of(document: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{document.get('version', 1)}-{digest}"


def compile_document(document: Mapping[str, Any], *, source: str, templates: Templates) -> CompiledPlaybook:
    if not isinstance(document, Mapping):
        raise PlaybookError("the top level must be a mapping", file=source)
    try:
        model = Playbook.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        name = document.get("id") if isinstance(document.get("id"), str) else None
        prefix = f"playbook {name!r}: " if name else ""
        raise PlaybookError(prefix + first["msg"], file=source, field=field) from exc
    compiled: list[CompiledStep] = []
    for i, step in enumerate(model.steps):
        field = f"steps.{i}"
        try:
            params_src = dict(step.params)
            expect = None
            if step.action == "verify":
                expect = templates.compile_condition(str(params_src.pop("expect")))
            compiled.append(
                CompiledStep(
                    step=step,
                    params=templates.compile_value(params_src, track=_TRACKING.get(step.action)),
                    when=templates.compile_condition(step.when) if step.when else None,
                    expect=expect,
                )
            )
        except TemplateCompileError as exc:
            raise PlaybookError(str(exc), file=source, field=f"{field} ({step.id})") from exc
    doc = json.loads(json.dumps(dict(document), default=str))
    return CompiledPlaybook(model=model, source=source, document=doc, version=version_of(doc), steps=tuple(compiled))


def load_file(path: Path, templates: Templates) -> CompiledPlaybook:
    source = str(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlaybookError(f"cannot read: {exc.strerror}", file=source) from exc
    except UnicodeDecodeError as exc:
        raise PlaybookError("not UTF-8 text", file=source) from exc
    except yaml.YAMLError as exc:
        raise PlaybookError(f"not valid YAML: {yaml_problem(exc)}", file=source) from exc
    return compile_document(document, source=source, templates=templates)


def builtin_files() -> list[Path]:
    root = resources.files("mendloop.playbooks") / "builtin"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith((".yaml", ".yml")))


class PlaybookSet:
    """The loaded playbooks, by id; later directories override earlier ones (and the built-ins) by id."""

    def __init__(self, playbooks: Iterable[CompiledPlaybook]) -> None:
        self.by_id: dict[str, CompiledPlaybook] = {}
        for pb in playbooks:
            self.by_id[pb.id] = pb

    @classmethod
    def load(cls, dirs: Iterable[Path], templates: Templates) -> PlaybookSet:
        files = builtin_files()
        for d in dirs:
            if not d.is_dir():
                raise PlaybookError("playbook directory does not exist", file=str(d))
            files.extend(sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml")))
        return cls(load_file(p, templates) for p in files)

    def get(self, playbook_id: str) -> CompiledPlaybook | None:
        return self.by_id.get(playbook_id)

    def ids(self) -> list[str]:
        return sorted(self.by_id)


class CompiledCache:
    """Compiles a run's stored playbook document once per (id, version)."""

    def __init__(self, templates: Templates) -> None:
        self._templates = templates
        self._cache: dict[tuple[str, str], CompiledPlaybook] = {}

    def get(self, playbook_id: str, version: str, document: Mapping[str, Any]) -> CompiledPlaybook:
        key = (playbook_id, version)
        found = self._cache.get(key)
        if found is None:
            found = compile_document(document, source=f"run snapshot of {playbook_id}", templates=self._templates)
            self._cache[key] = found
        return found

    def put(self, pb: CompiledPlaybook) -> None:
        self._cache[(pb.id, pb.version)] = pb
