"""A test agent that hangs: it starts a child `sleep 1000`, writes the child's pid to argv[1], and sleeps."""

import subprocess
import sys
import time

child = subprocess.Popen(["sleep", "1000"])
with open(sys.argv[1], "w") as fh:
    fh.write(str(child.pid))
sys.stdout.write("working very hard\n")
sys.stdout.flush()
time.sleep(1000)
