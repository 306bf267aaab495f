# mendloop developer entry points. Everything runs from .venv, created/refreshed by scripts/bootstrap.sh.
#   make test ARGS='-k foo -x'     pass extra arguments to pytest
#   make bench ARGS='...'          pass extra arguments to bench/run.py (writes bench/results.json, README table)
#   make bench-check ARGS='--repeat 5'  CPU-per-unit figures against bench/results.json
#   make fuzz ARGS='...'           the property tests with random seeds and 20x the examples
#   make heal-bench ARGS='...'     pass extra arguments to `python -m bench.heal` (--only NAME,NAME --keep DIR)

VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# Lint only the trees that exist (bench/ and tests/ may not exist yet).
LINT_PATHS := $(wildcard mendloop tests bench)

.PHONY: all bootstrap demo test fuzz lint bench bench-check heal-bench peer-bench fmt chaos scale storms

all: lint test

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/mendloop demo

test:
	bash scripts/test.sh $(ARGS)

# The same properties as `make test` (Hypothesis tests: `-m hypothesis`), with random seeds and more examples
# (profile `fuzz` in tests/conftest.py); `make test` under CI runs them derandomized.
fuzz: bootstrap
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m hypothesis -p no:cacheprovider $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: bootstrap
	$(PY) bench/run.py $(ARGS)

# ansible-rulebook (own venv in bench/.cache) and mendloop through one open-loop load generator, side by side.
peer-bench: bootstrap
	bash bench/peer/setup.sh
	$(PY) -m bench.peer $(ARGS)

# The CPU-per-unit figures alone, against the recorded bench/results.json: fails when one is more than 50% worse.
bench-check: bootstrap
	$(PY) bench/run.py --check $(ARGS)

# The fix rate: every fault scenario of bench/heal/scenarios.py healed (or handed to a human) by a real mendloop
# serve, judged by each scenario's own probe; writes bench/heal-results.json and prints the table.
heal-bench: bootstrap
	$(PY) -m bench.heal $(ARGS)

fmt: bootstrap
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# Chaos (bench/chaos.py): 1,000 incidents per backend while mendloop's processes are SIGKILLed; not in `make test`
# (its seeded CI version is tests/test_chaos.py). PostgreSQL: a throwaway cluster, as `make test` starts one.
chaos: bootstrap
	bash scripts/pg-test-cluster.sh start /tmp/mendloop-chaos-pg 55499 >/dev/null
	MENDLOOP_TEST_POSTGRES_URL=postgresql+psycopg://test@127.0.0.1:55499/postgres $(PY) bench/chaos.py $(ARGS)

# Scale (bench/scale.py): startup with 10k vs 1M runs of history, and serve holding 100k runs parked in
# awaiting_patch (RSS, API p99, idle CPU, the reaper's search). Not in `make bench`: building the 1M-run history
# the first time takes minutes (cached under bench/.cache/ after that).
scale: bootstrap
	$(PY) bench/scale.py $(ARGS)

# No stalls (bench/storms.py, also in `make bench`): the API's p99 during a 100k-event batch storm and a
# 100k-line watcher storm, the watcher storm's first line -> its run started, serve's peak RSS. About 40 s.
storms: bootstrap
	$(PY) bench/storms.py $(ARGS)
