"""longlive.io."""
