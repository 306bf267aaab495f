"""`mendloop demo`: the sample service and `mendloop serve`, started side by side, and the spec's four tests.

The sample service is copied into `<state>/sample_service` as its own git repository. In the story, `serve` runs
the agent runner embedded in it (`agent_runner:` in the generated config): it claims the escalated work order and
drives `examples/agents/demo_fix.py`, the stand-in for a real coding agent, through the `command` adapter; the
runner computes the diff, checks it, runs the service's tests in a fresh worktree and commits to the copy, so the
checkout is never touched. Each story run starts from the service's own log line, detected by the config's
watchers of `serve.log` (or, with none, from POST /patches/trigger). With `--no-story` the service starts in the
spec's scenario (its database connection dropped, a 500 MB file's pipeline run failed on the timeout), and no
agent of any kind runs and no watcher: the spec's curl triggers are the only ones. Both processes are children
of the demo: it stops them (by PID, terminate then kill) however it ends: the story's end with `--exit`, Ctrl-C,
SIGTERM or SIGHUP.

The parts: `stage` (the copy, the config, both processes), `children` (starting and stopping them), `scenario`
(the spec's scenario staged for `--no-story`), `story` (the four tests, or the spec's curl commands), `lifetime`
(`run()` and the signals).
"""

from mendloop.demo.lifetime import run

__all__ = ["run"]
