"""A test agent that exits 0 and changes nothing."""

import sys

sys.stdout.write("looked around; nothing to do\n")
