"""longlive.models.wan."""
