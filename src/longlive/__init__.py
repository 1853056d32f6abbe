"""longlive: long video generation with chunk-level autoregressive diffusion (Wan2.2-TI2V-5B)."""

__version__ = "0.1.0"
