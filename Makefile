# mendloop developer entry points. Everything runs from .venv, created/refreshed by scripts/bootstrap.sh.
#   make test ARGS='-k foo -x'     pass extra arguments to pytest
#   make bench ARGS='...'          pass extra arguments to bench/run.py

VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# Lint only the trees that exist (bench/ and tests/ may not exist yet).
LINT_PATHS := $(wildcard mendloop tests bench)

.PHONY: all bootstrap demo test lint bench fmt

all: lint test

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/mendloop demo

test:
	bash scripts/test.sh $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

bench: bootstrap
	$(PY) bench/run.py $(ARGS)

fmt: bootstrap
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)
