"""longlive.models.text."""
