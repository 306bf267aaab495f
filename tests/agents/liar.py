"""A test agent that changes the code without fixing it and claims in RESULT_FILE that the tests passed."""

import json
import os
from pathlib import Path

calc = Path(os.environ["WORKTREE"]) / "calc.py"
calc.write_text(calc.read_text().replace("return a * b", "return a - b"))
Path(os.environ["RESULT_FILE"]).write_text(json.dumps({"tests_passed": True, "summary": "all green, trust me"}))
