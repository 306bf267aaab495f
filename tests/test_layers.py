"""The import contracts in pyproject.toml hold, and they catch a layer violation (checked on a copy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy's package, not the installed (editable) one, is what grimp analyses.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "mendloop", tmp_path / "mendloop", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold_on_a_copy_and_break_when_storage_imports_intake(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    kept = _lint(root)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Contracts: 1 kept, 0 broken" in kept.stdout

    target = root / "mendloop" / "storage" / "events.py"
    target.write_text(target.read_text() + "\nfrom mendloop.intake import tail  # noqa: E402,F401\n")
    broken = _lint(root)
    assert broken.returncode != 0
    assert "mendloop.storage is not allowed to import mendloop.intake" in broken.stdout
    assert "mendloop.storage.events -> mendloop.intake.tail" in broken.stdout


def test_a_new_package_must_be_placed_in_the_layers(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "mendloop" / "newpart").mkdir()
    (root / "mendloop" / "newpart" / "__init__.py").write_text('"""Not in any layer yet."""\n')
    result = _lint(root)
    assert result.returncode != 0
    assert "newpart" in result.stdout
