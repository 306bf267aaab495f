"""Step actions, registered by name."""
