#!/usr/bin/env bash
# What `make test` runs:  bash scripts/test.sh [pytest args...]
#
# 1. bootstraps .venv (scripts/bootstrap.sh);
# 2. unless MENDLOOP_TEST_POSTGRES_URL is already set, starts a throwaway PostgreSQL cluster in a fresh
#    temp dir on a free port, exports MENDLOOP_TEST_POSTGRES_URL=postgresql+psycopg://test@127.0.0.1:PORT/postgres
#    and stops/removes it on exit;
# 3. installs Debian's bubblewrap when it is missing and this runs as root (ensure_bwrap: the sandbox tests need it);
#    Chromium and axe-core (npm, into .npm-test/) for the dashboard's browser tests (ensure_chromium, ensure_axe);
#    likewise the docker and kubectl clients (ensure_restart_clis: tests/test_restart.py checks their --help)
#    and nginx (tests/test_behind_proxy.py), without starting their daemons;
# 4. makes sure the real coding agent CLIs (aider, claude, codex; pinned) are installed with scripts/agent-clis.sh:
#    once per machine, in a cache outside the clone (~/.cache/mendloop/agent-clis; about a minute the first
#    time, nothing after), linked as .agent-clis/bin, which goes on PATH, so the adapters' `--help` checks and the
#    aider end-to-end test run (in CI they fail rather than skip without them). MENDLOOP_SKIP_AGENT_CLIS=1 skips
#    it; outside CI a failed install only warns;
# 5. runs `.venv/bin/python -m pytest -n 3 --dist worksteal "$@"` and exits with its code. pytest's 5 ("no tests
#    collected") is non-zero, so it fails the run too. -n: tests run in parallel (pytest-xdist) in
#    $MENDLOOP_TEST_WORKERS processes (3 unless set): most of their time is spent waiting on subprocesses, servers
#    and the database, so more workers than cores still help. ARGS='-n 0' (or MENDLOOP_TEST_WORKERS=0) runs them in
#    one process.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ---------------------------------------------------------------------------------------------
# ensure_chromium: Debian's Chromium for the dashboard's browser tests (tests/test_dashboard_browser.py,
# Playwright). Always called; installed when running as root and missing. Never `playwright install`
# (downloads; fails here). In CI a failed install fails the run.
# ---------------------------------------------------------------------------------------------
ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh: /usr/bin/chromium is missing; install it with: sudo apt-get install -y chromium" >&2
        return 1
    fi
    echo "test.sh: installing Debian's chromium (apt-get, ~40 s)..." >&2
    local aptlog
    aptlog=$(mktemp "${TMPDIR:-/tmp}/chromium-apt.XXXXXX")
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$aptlog" 2>&1; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        echo "test.sh: apt-get install chromium failed" >&2
        return 1
    fi
    rm -f "$aptlog"
}

# ---------------------------------------------------------------------------------------------
# ensure_bwrap: Debian's bubblewrap, the sandbox agent and test processes run in (tests/test_sandbox.py needs
# it). Always called. Installed when running as root and missing; otherwise a warning, and the sandbox tests
# fail in CI (they skip outside it). In CI a failed install fails the run.
# ---------------------------------------------------------------------------------------------
ensure_bwrap() {
    command -v bwrap >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh: bwrap is missing; install it with: sudo apt-get install -y bubblewrap" >&2
        return 1
    fi
    echo "test.sh: installing Debian's bubblewrap (apt-get)..." >&2
    local aptlog
    aptlog=$(mktemp "${TMPDIR:-/tmp}/bubblewrap-apt.XXXXXX")
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } >"$aptlog" 2>&1; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        echo "test.sh: apt-get install bubblewrap failed" >&2
        return 1
    fi
    rm -f "$aptlog"
}

# ---------------------------------------------------------------------------------------------
# ensure_restart_clis: the docker and kubectl clients (Debian's docker.io and kubernetes-client), whose `--help`
# tests/test_restart.py checks mendloop's restart argv against (no daemon or cluster is used). Always called;
# installed when running as root and missing. In CI a failed install fails the run (the tests fail, not skip).
# systemctl is checked too but not installed here: every Debian system has it.
# ---------------------------------------------------------------------------------------------
ensure_restart_clis() {
    local missing=()
    command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
    # nginx: tests/test_behind_proxy.py runs mendloop behind a real nginx under a path prefix.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
    [ ${#missing[@]} = 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh: missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "test.sh: installing Debian's ${missing[*]} (apt-get)..." >&2
    local aptlog
    aptlog=$(mktemp "${TMPDIR:-/tmp}/restart-clis-apt.XXXXXX")
    # Installing must not start daemons (dockerd, nginx on port 80): Debian's policy-rc.d convention (exit 101,
    # "action forbidden") tells the packages' scripts not to, for this install only.
    local policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1
    fi
    local ok=1
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$aptlog" 2>&1 || ok=
    [ -n "$policy" ] && rm -f /usr/sbin/policy-rc.d
    if [ -z "$ok" ]; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        echo "test.sh: apt-get install ${missing[*]} failed" >&2
        return 1
    fi
    rm -f "$aptlog"
}

# ---------------------------------------------------------------------------------------------
# ensure_axe: axe-core (npm), which the browser tests inject to check accessibility, in a test-only folder
# outside git (.npm-test/). Installs Debian's npm first when it is missing (root only). Quick when present.
# ---------------------------------------------------------------------------------------------
AXE_VERSION=4.14.1
ensure_axe() {
    [ -f .npm-test/node_modules/axe-core/axe.min.js ] && return 0
    if ! command -v npm >/dev/null 2>&1; then
        if [ "$(id -u)" != 0 ]; then
            echo "test.sh: npm is missing; install it with: sudo apt-get install -y npm" >&2
            return 1
        fi
        echo "test.sh: installing Debian's npm (apt-get)..." >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; } >/dev/null 2>&1 || {
            echo "test.sh: apt-get install npm failed" >&2
            return 1
        }
    fi
    echo "test.sh: installing axe-core $AXE_VERSION into .npm-test/ (npm)..." >&2
    mkdir -p .npm-test
    (cd .npm-test && npm install --no-audit --no-fund --silent "axe-core@$AXE_VERSION") || {
        echo "test.sh: npm install axe-core failed" >&2
        return 1
    }
}

bash scripts/bootstrap.sh

if ! ensure_bwrap && [ -n "${CI:-}" ]; then
    exit 1
fi

if ! ensure_restart_clis && [ -n "${CI:-}" ]; then
    exit 1
fi

if ! ensure_chromium && [ -n "${CI:-}" ]; then
    exit 1
fi

if ! ensure_axe && [ -n "${CI:-}" ]; then
    exit 1
fi

PGTEST_DIR=
cleanup() {
    if [ -n "$PGTEST_DIR" ]; then
        bash scripts/pg-test-cluster.sh stop "$PGTEST_DIR" || true
        rm -rf "$PGTEST_DIR"
        PGTEST_DIR=
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    .venv/bin/python -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

if [ -z "${MENDLOOP_TEST_POSTGRES_URL:-}" ]; then
    # The port is free when picked but could be taken before the server binds it: retry a few times.
    started=
    for _ in 1 2 3; do
        PGTEST_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mendloop-pg.XXXXXX")
        port=$(free_port)
        if bash scripts/pg-test-cluster.sh start "$PGTEST_DIR" "$port"; then
            started=1
            break
        fi
        cleanup
    done
    [ -n "$started" ] || { echo "test.sh: could not start the PostgreSQL test cluster" >&2; exit 1; }
    export MENDLOOP_TEST_POSTGRES_URL="postgresql+psycopg://test@127.0.0.1:$port/postgres"
fi

if [ "${MENDLOOP_SKIP_AGENT_CLIS:-0}" != 1 ]; then
    if bash scripts/agent-clis.sh "$ROOT/.agent-clis"; then
        export PATH="$ROOT/.agent-clis/bin:$PATH"
    elif [ -n "${CI:-}" ]; then
        echo "test.sh: installing the agent CLIs failed" >&2
        exit 1
    else
        echo "test.sh: installing the agent CLIs failed; their tests will skip" >&2
    fi
fi

rc=0
pytest_started=$(date +%s)
# The project's own bytecode too (PYTHONDONTWRITEBYTECODE=1 here, see bootstrap.sh): the tests start many
# `mendloop` processes, and each would compile the package afresh.
.venv/bin/python -m compileall -q -j 0 mendloop >/dev/null || true
.venv/bin/python -m pytest -n "${MENDLOOP_TEST_WORKERS:-3}" --dist worksteal "$@" || rc=$?
echo "test.sh: pytest took $(($(date +%s) - pytest_started)) s (exit $rc)" >&2
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit 5): treated as a failure" >&2
fi
exit "$rc"
