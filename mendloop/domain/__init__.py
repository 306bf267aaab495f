"""Value objects, states and allowed transitions. No I/O."""
