"""HTTP API: thin routes over the services that `app.App` builds."""
