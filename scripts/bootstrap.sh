#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv and install the project with its
# dev extras (`pip install -e '.[dev]'`).
#
# - Fast no-op when .venv works and .venv/.bootstrap-stamp holds the sha256 of pyproject.toml.
# - Re-installs when pyproject.toml changed; recreates .venv when its interpreter is broken.
# - Interpreter: $PYTHON if set, else the first of python3.11/3.12/3.13/python3 that is >= 3.11.
# - Quiet when there is nothing to do. When it installs: a line per phase with its duration, and a line every 15 s
#   while pip runs; pip's full output only when pip fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=.venv
STAMP=$VENV/.bootstrap-stamp
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "bootstrap: $*" >&2; }
started=$(date +%s)

# run_logged LOG CMD...: CMD with its output in LOG; a line every 15 s while it runs. Returns CMD's status.
run_logged() {
    local out=$1 pid t0 i rc=0
    shift
    t0=$(date +%s)
    "$@" >"$out" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for ((i = 0; i < 75; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && log "  ... still installing ($(($(date +%s) - t0)) s)"
    done
    wait "$pid" || rc=$?
    return "$rc"
}
die() { echo "bootstrap: error: $*" >&2; exit 1; }

# Serialise concurrent bootstraps (e.g. `make -j lint test`): lock this script's own file.
if command -v flock >/dev/null 2>&1; then
    exec 9<"${BASH_SOURCE[0]}"
    flock 9
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)

venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys, pip' >/dev/null 2>&1; }

if venv_ok && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

find_python() {
    local c
    for c in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

if ! venv_ok; then
    py=$(find_python) || die "no Python >= 3.11 found (set PYTHON=/path/to/python3.11)"
    log "creating $VENV with $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian ships venv/ensurepip separately.
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            log "installing python${ver}-venv via apt"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >/dev/null
            apt-get install -y -qq "python${ver}-venv" >/dev/null || apt-get install -y -qq python3-venv >/dev/null
        fi
        "$py" -m venv "$VENV" || die "'$py -m venv $VENV' failed"
    fi
    log "created $VENV ($(($(date +%s) - started)) s)"
fi

rm -f "$STAMP"
log "installing mendloop[dev] into $VENV (pyproject.toml changed or fresh venv)"
pip_log=$(mktemp "${TMPDIR:-/tmp}/mendloop-pip.XXXXXX")
trap 'rm -f "$pip_log"' EXIT
pip_started=$(date +%s)
# --no-compile: Python byte-compiles what is imported, when it is first imported, instead of pip compiling all.
if ! run_logged "$pip_log" "$VENV/bin/python" -m pip install -q --no-compile --progress-bar off -e '.[dev]'; then
    # The "Location ... is ignored" lines are noise from this machine's pip config.
    grep -v "WARNING: Location '.*' is ignored" "$pip_log" >&2 || true
    die "pip install -e '.[dev]' failed"
fi
# The environment here sets PYTHONDONTWRITEBYTECODE=1, so Python never caches the bytecode of what it imports:
# compiled once now (a few seconds), or every process the tests start compiles its imports afresh (the CLI then
# starts in 1 s instead of 0.4 s). pip's own compile step is off above: it is slower, and this does the same.
if ! run_logged "$pip_log" "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib"; then
    log "byte-compiling $VENV failed (imports will compile on the fly):"
    tail -n 5 "$pip_log" >&2 || true
fi
echo "$want" >"$STAMP"
log "installed mendloop[dev] ($(($(date +%s) - pip_started)) s; bootstrap $(($(date +%s) - started)) s)"
