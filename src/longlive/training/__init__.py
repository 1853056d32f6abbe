"""longlive.training."""
