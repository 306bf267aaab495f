"""Durable events and in-process fan-out."""
