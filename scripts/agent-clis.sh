#!/usr/bin/env bash
# Installs the real coding agent CLIs the adapters drive, pinned, once per machine, and links them for a clone:
#
#   bash scripts/agent-clis.sh DIR
#
#   CACHE/<key>/aider-venv/bin/aider   aider-chat (PyPI), in its own venv (`python3 -m venv` + pip)
#   CACHE/<key>/npm/node_modules/.bin/ claude (@anthropic-ai/claude-code) and codex (@openai/codex), `npm install`
#   CACHE/<key>/bin/                   symlinks to the three
#   DIR/bin                            a symlink to CACHE/<key>/bin, for PATH
#
# CACHE is $MENDLOOP_AGENT_CLIS_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/mendloop/agent-clis: outside the clone,
# so every clone on a machine (CI's fresh clones included) shares one install. <key> is a hash of the pinned
# versions and the Python that runs aider, so a new pin or interpreter installs afresh beside the old one.
#
# A half-finished install is never taken for done: each install is built in its own CACHE/build.<key>.XXXX
# directory (a venv cannot be moved, so that is where it stays) and becomes CACHE/<key> only after every CLI
# answered --version, by an atomic rename of a symlink. Concurrent runs take turns on a lock. Only the registries
# the package managers use by default are reached (PyPI, npm). scripts/test.sh calls it with DIR=.agent-clis and
# puts DIR/bin on PATH, so the adapters' `--help` checks and the aider end-to-end test run instead of skipping.
# MENDLOOP_SKIP_AGENT_CLIS=1 (in test.sh) skips it (the tests then skip, or fail when CI is set).
#
# Quiet when nothing is to do; while installing, one line per phase with its duration, and a line every 15 s
# while a phase runs. The full output is in the build's install.log, shown when a phase fails.
set -euo pipefail

AIDER_VERSION=0.86.2
CLAUDE_VERSION=2.1.328
CODEX_VERSION=0.169.0

DIR=${1:?usage: agent-clis.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PY=${PYTHON:-python3}
WANT="aider-chat==$AIDER_VERSION @anthropic-ai/claude-code@$CLAUDE_VERSION @openai/codex@$CODEX_VERSION"
CACHE=${MENDLOOP_AGENT_CLIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mendloop/agent-clis}
py_id=$("$PY" -c 'import sys; print(sys.executable, sys.version)')
# LAYOUT: bumped when what an install holds changes (2: aider's venv byte-compiled).
LAYOUT=2
KEY=$(printf '%s\n%s\n%s\n%s\n' "$WANT" "$py_id" "$(uname -m)" "$LAYOUT" | sha256sum | cut -c1-16)
FINAL="$CACHE/$KEY"

say() { echo "agent-clis: $*"; }

ready() { [ -f "$1/.stamp" ] && [ -x "$1/bin/aider" ] && [ -x "$1/bin/claude" ] && [ -x "$1/bin/codex" ]; }

# Point DIR/bin at the cached install (replacing the in-clone layout of earlier versions of this script).
link() {
    if [ ! -L "$DIR/bin" ]; then
        rm -rf "$DIR/bin" "$DIR/aider-venv" "$DIR/npm" "$DIR/.stamp" "$DIR/install.log"
    fi
    ln -sfn "$FINAL/bin" "$DIR/bin.new"
    mv -T "$DIR/bin.new" "$DIR/bin"
}

if ready "$FINAL"; then
    link
    exit 0
fi

mkdir -p "$CACHE"
# One install at a time per cache (CI and a developer's `make test`, or two clones): the second waits, then finds
# the first one's result.
if command -v flock >/dev/null 2>&1; then
    exec 8>"$CACHE/.lock"
    if ! flock -n 8; then
        say "waiting for another install into $CACHE"
        flock 8
    fi
fi
if ready "$FINAL"; then
    link
    say "installed by another run: $WANT"
    exit 0
fi

# Builds left by an interrupted run (a kill, a full disk): never used, removed here.
rm -rf "$CACHE"/build."$KEY".*
BUILD=$(mktemp -d "$CACHE/build.$KEY.XXXXXX")
chmod 755 "$BUILD" # mktemp makes it 0700; the CLIs may run as another user (the agent runner's run_as)
log="$BUILD/install.log"
: >"$log"
started=$(date +%s)
say "installing $WANT into $CACHE (first time on this machine, about a minute)"

# phase WHAT CMD...: runs CMD with its output in the log; prints WHAT and its duration, and a heartbeat every 15 s.
phase() {
    local what=$1 t0 pid rc=0
    shift
    t0=$(date +%s)
    "$@" >>"$log" 2>&1 &
    pid=$!
    while ! wait_for "$pid" 15; do
        say "  ... $what: $(($(date +%s) - t0)) s"
    done
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "$what failed (exit $rc); the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    say "$what ($(($(date +%s) - t0)) s)"
}

# wait_for PID SECONDS: 0 once PID has exited, 1 if it is still running after SECONDS.
wait_for() {
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -0 "$1" 2>/dev/null && return 1
    return 0
}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
phase "venv for aider" "$PY" -m venv "$BUILD/aider-venv"
# Most of the time this took (182 s on a fresh machine) was pip byte-compiling the 7,500 modules of aider's 570 MB of
# dependencies, most never imported: --no-compile leaves that to Python, for what aider imports when it first runs.
# --prefer-binary: a wheel over a newer sdist, never a build from source when a wheel exists.
phase "aider-chat==$AIDER_VERSION (PyPI)" \
    "$BUILD/aider-venv/bin/python" -m pip install -q --no-compile --prefer-binary --progress-bar off \
    "aider-chat==$AIDER_VERSION"
# The environment here sets PYTHONDONTWRITEBYTECODE=1: without this, every aider start compiles what it imports
# (seconds each time, in the tests that run it). Once per machine, in parallel, faster than pip's own compile.
# A file that doesn't compile (a package's template, say) is no reason to fail the install: `|| true`.
phase "byte-compiling aider's venv" sh -c '"$1" -m compileall -q -j 0 "$2" >/dev/null 2>&1 || true' _ \
    "$BUILD/aider-venv/bin/python" "$BUILD/aider-venv/lib"

if ! command -v npm >/dev/null 2>&1; then
    # A fresh Debian has no Node.js; its packages are enough for both CLIs.
    if [ "$(id -u)" = 0 ]; then
        phase "nodejs and npm (Debian)" \
            sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm'
    else
        say "npm is missing; install Node.js (Debian: apt-get install nodejs npm)" >&2
        exit 1
    fi
fi
mkdir -p "$BUILD/npm"
phase "@anthropic-ai/claude-code@$CLAUDE_VERSION @openai/codex@$CODEX_VERSION (npm)" \
    npm install --prefix "$BUILD/npm" --no-audit --no-fund --no-save --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_VERSION" "@openai/codex@$CODEX_VERSION"

mkdir -p "$BUILD/bin"
ln -sfn "$BUILD/aider-venv/bin/aider" "$BUILD/bin/aider"
ln -sfn "$BUILD/npm/node_modules/.bin/claude" "$BUILD/bin/claude"
ln -sfn "$BUILD/npm/node_modules/.bin/codex" "$BUILD/bin/codex"

phase "aider, claude and codex --version" sh -c '
    for cli in aider claude codex; do "$0/bin/$cli" --version || { echo "$cli --version failed"; exit 1; }; done' "$BUILD"

echo "$WANT" >"$BUILD/.stamp"
# The commit point: CACHE/<key> appears, complete, in one rename. An older install of the same key (it was not
# ready: no stamp) is replaced.
ln -sfn "$(basename "$BUILD")" "$CACHE/$KEY.new"
if [ -e "$FINAL" ] && [ ! -L "$FINAL" ]; then
    rm -rf "$FINAL"
fi
old=$(readlink "$FINAL" 2>/dev/null || true)
mv -T "$CACHE/$KEY.new" "$FINAL"
[ -n "$old" ] && [ "$old" != "$(basename "$BUILD")" ] && rm -rf "${CACHE:?}/$old"
link
say "installed $WANT in $(($(date +%s) - started)) s"
