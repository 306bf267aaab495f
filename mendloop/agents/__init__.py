"""Coding agents: work order context, the patch pipeline, the agent runner and its adapters."""
