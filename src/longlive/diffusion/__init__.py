"""longlive.diffusion."""
