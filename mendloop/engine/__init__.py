"""Runs: claim by lease, advance step by step, park, resume, retry."""
