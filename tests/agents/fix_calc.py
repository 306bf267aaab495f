"""A test agent that fixes calc.add; with a path in argv[1] it also writes there what it could see."""

import json
import os
import sys
from pathlib import Path

root = Path(os.environ["WORKTREE"])
calc = root / "calc.py"
calc.write_text(calc.read_text().replace("return a * b", "return a + b"))
Path(os.environ["RESULT_FILE"]).write_text(json.dumps({"summary": "add() adds instead of multiplying"}))
if len(sys.argv) > 1:
    seen = {
        "cwd": str(Path.cwd().resolve()),
        "env": dict(os.environ),
        "uid": os.getuid(),
        "stdin_is_devnull": os.path.samefile("/dev/stdin", os.devnull) if os.path.exists("/dev/stdin") else None,
        "prompt": Path(os.environ["PROMPT_FILE"]).read_text(),
        "work_order": json.loads(Path(os.environ["WORK_ORDER"]).read_text()),
    }
    Path(sys.argv[1]).write_text(json.dumps(seen))
