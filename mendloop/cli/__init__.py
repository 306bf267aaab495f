"""The command line: parse → App or HTTP call → output and exit code. Every option also reads `MENDLOOP_*`.

One module per command group: `processes` (serve, worker, watch, agent, demo), `runs` (trigger, runs),
`work_orders`, `playbooks`, `admin` (db, config). `common` holds the options and the API call; `root` builds the
root command and `main`, the console script (`mendloop.cli:main`).
"""

from mendloop.cli.root import cli, main

__all__ = ["cli", "main"]
