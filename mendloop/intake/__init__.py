"""Producers of events: log lines and tracebacks turned into structured facts."""
