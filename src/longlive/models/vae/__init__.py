"""longlive.models.vae."""
