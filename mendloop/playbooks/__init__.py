"""Playbooks: YAML → schema → compiled, immutable objects the engine interprets."""
