"""Interpreters the tests' processes can start: as root, mendloop runs test commands as uid 65534, and this
project's venv may live under /root (0700), so a test command needs a Python that uid can reach."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

NOBODY = (65534, 65534)


@functools.cache
def python_for_tests() -> str:
    """sys.executable when not root; as root, the first Python uid 65534 can start (else sys.executable, and the
    tests that need one see test_env_error)."""
    if os.geteuid() != 0:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "pass"],
                user=NOBODY[0],
                group=NOBODY[1],
                extra_groups=[],
                capture_output=True,
                cwd="/",
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return sys.executable
