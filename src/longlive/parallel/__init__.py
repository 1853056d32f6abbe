"""longlive.parallel."""
