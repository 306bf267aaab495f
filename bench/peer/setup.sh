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
# The webhook source lives in the ansible.eda collection. When Galaxy answers, it is installed here and the
# rulebooks say `ansible.eda.webhook`; when it does not (no route to galaxy.ansible.com on the machine this was
# first run on), the same file vendored from ansible.eda 2.13.0 in bench/peer/vendor is used (see rulebook.py).
EDA=bench/.cache/peer-collections
if [ ! -d "$EDA/ansible_collections/ansible/eda" ]; then
  timeout 120 "$VENV/bin/ansible-galaxy" collection install -p "$EDA" 'ansible.eda==2.13.0' >/dev/null 2>&1 \
    || echo "peer-bench: ansible-galaxy could not install ansible.eda==2.13.0; using the vendored webhook source" >&2
fi
