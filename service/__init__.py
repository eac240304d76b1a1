"""tsam-sweep service: the HTTP API, scheduler, dashboard and CLI."""
