"""longlive.models."""
