#!/usr/bin/env bash
# Installs the real coding agent CLIs the adapters drive, pinned, into a test-only directory:
#
#   bash scripts/agent-clis.sh DIR
#
#   DIR/aider-venv/bin/aider    aider-chat (PyPI), in its own venv (`python3 -m venv` + pip)
#   DIR/npm/node_modules/.bin/  claude (@anthropic-ai/claude-code) and codex (@openai/codex), `npm install --prefix`
#   DIR/bin/                    symlinks to the three, for PATH
#
# Idempotent: DIR/.stamp records the pinned versions; when it matches, nothing is done. Only the registries the
# package managers use by default are reached (PyPI, npm). scripts/test.sh calls it with DIR=.agent-clis and puts
# DIR/bin on PATH, so the adapters' `--help` checks and the aider end-to-end test run instead of skipping.
# MENDLOOP_SKIP_AGENT_CLIS=1 skips the install (the tests then skip, or fail when CI is set).
set -euo pipefail

AIDER_VERSION=0.86.2
CLAUDE_VERSION=2.1.328
CODEX_VERSION=0.169.0

DIR=${1:?usage: agent-clis.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
STAMP="$DIR/.stamp"
WANT="aider-chat==$AIDER_VERSION @anthropic-ai/claude-code@$CLAUDE_VERSION @openai/codex@$CODEX_VERSION"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && [ -x "$DIR/bin/aider" ] && [ -x "$DIR/bin/claude" ] && [ -x "$DIR/bin/codex" ]; then
    echo "agent-clis: up to date in $DIR ($WANT)"
    exit 0
fi

PY=${PYTHON:-python3}
started=$(date +%s)
rm -f "$STAMP"
log="$DIR/install.log"
: >"$log"

step() {
    local what=$1
    shift
    local t0
    t0=$(date +%s)
    if ! "$@" >>"$log" 2>&1; then
        echo "agent-clis: $what failed; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    echo "agent-clis: $what ($(($(date +%s) - t0)) s)"
}

if [ ! -x "$DIR/aider-venv/bin/python" ]; then
    step "venv for aider" "$PY" -m venv "$DIR/aider-venv"
fi
step "aider-chat==$AIDER_VERSION (PyPI)" \
    env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$DIR/aider-venv/bin/python" -m pip install -q "aider-chat==$AIDER_VERSION"

if ! command -v npm >/dev/null 2>&1; then
    # A fresh Debian has no Node.js; its packages are enough for both CLIs.
    if [ "$(id -u)" = 0 ]; then
        step "nodejs and npm (Debian)" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm'
    else
        echo "agent-clis: npm is missing; install Node.js (Debian: apt-get install nodejs npm)" >&2
        exit 1
    fi
fi
mkdir -p "$DIR/npm"
step "@anthropic-ai/claude-code@$CLAUDE_VERSION @openai/codex@$CODEX_VERSION (npm)" \
    npm install --prefix "$DIR/npm" --no-audit --no-fund --no-save --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_VERSION" "@openai/codex@$CODEX_VERSION"

mkdir -p "$DIR/bin"
ln -sfn "$DIR/aider-venv/bin/aider" "$DIR/bin/aider"
ln -sfn "$DIR/npm/node_modules/.bin/claude" "$DIR/bin/claude"
ln -sfn "$DIR/npm/node_modules/.bin/codex" "$DIR/bin/codex"

for cli in aider claude codex; do
    if ! "$DIR/bin/$cli" --version >>"$log" 2>&1; then
        echo "agent-clis: $DIR/bin/$cli --version failed; the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
done

echo "$WANT" >"$STAMP"
echo "agent-clis: installed $WANT in $(($(date +%s) - started)) s"
