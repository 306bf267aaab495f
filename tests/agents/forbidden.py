"""A test agent that fixes the bug but also edits CI config, which no patch may touch."""

import os
from pathlib import Path

root = Path(os.environ["WORKTREE"])
calc = root / "calc.py"
calc.write_text(calc.read_text().replace("return a * b", "return a + b"))
(root / ".github" / "workflows").mkdir(parents=True, exist_ok=True)
(root / ".github" / "workflows" / "ci.yml").write_text("on: push\njobs: {}\n")
