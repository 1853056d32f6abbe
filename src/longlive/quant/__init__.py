"""longlive.quant."""
