"""Wan2.2 VAE (z_dim 48, stride 4x16x16) with a streaming decoder, LightVAE loading and halo encoding."""
from longlive.models.vae.checkpoint import (
    CheckpointMismatchError,
    diffusers_to_wan,
    load_vae,
    read_state_dict,
    save_vae,
    wan_to_diffusers,
)
from longlive.models.vae.config import WanVAEConfig, latent_frames_for_pixels, pixel_frames_for_latents
from longlive.models.vae.halo import HaloWindow, encode_halo_window, halo_window, sp_halo_windows
from longlive.models.vae.model import StreamingDecoder, WanVAE

__all__ = [
    "CheckpointMismatchError",
    "HaloWindow",
    "StreamingDecoder",
    "WanVAE",
    "WanVAEConfig",
    "diffusers_to_wan",
    "encode_halo_window",
    "halo_window",
    "latent_frames_for_pixels",
    "load_vae",
    "pixel_frames_for_latents",
    "read_state_dict",
    "save_vae",
    "sp_halo_windows",
    "wan_to_diffusers",
]
