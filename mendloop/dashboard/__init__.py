"""The dashboard: the spec's Patch Tracking panel (Workflow, Runs, Patches), a run's page, incidents, trust and the
Co-Pilot feed, rendered on the server with Jinja2, kept live with EventSource on `/events/stream`, acting through
the same API routes as the CLI. No build step and nothing fetched at run time: its script and styles are files of
this package, served by `serve` itself."""
