"""longlive.config."""
