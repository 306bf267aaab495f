#!/usr/bin/env bash
# Installs the peer into its own venv (bench/.cache/peer-venv, git-ignored), never into the project's .venv:
# ansible-rulebook 1.3.2 (the newest release; its drools engine needs Java 17) with ansible-core 2.18 (the
# newest line that still runs on Python 3.11).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=bench/.cache/peer-venv
if ! command -v java >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    echo "peer-bench: java is missing: apt-get install openjdk-17-jre-headless (as root)" >&2; exit 1
  fi
fi
if ! "$VENV/bin/ansible-rulebook" --version 2>/dev/null | grep -q '1.3.2'; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'ansible-rulebook==1.3.2' 'ansible-core==2.18.19' 'ansible-runner==2.4.3'
fi
