"""longlive.data."""
