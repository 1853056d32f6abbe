"""Configuration of the Wan2.2 VAE (and its pruned LightVAE variants).

One dataclass describes every variant: the full Wan2.2 VAE, the pruned LightVAE students (same
network, fewer channels) and the tiny test configuration all run the same code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Per-channel latent statistics of the Wan2.2 VAE (identical in Wan2.2 and diffusers; spec 1.1).
WAN22_LATENT_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

_PRESETS = ("wan2.2", "tiny")


@dataclass(frozen=True)
class WanVAEConfig:
    """Shape of a Wan2.2-style causal video VAE.

    `enc_dim`/`dec_dim` are the base widths of encoder and decoder (LightVAE prunes both); the
    decoder's first conv has `dec_dim * dim_mult[-1]` output channels.
    """

    z_dim: int = 48
    enc_dim: int = 160
    dec_dim: int = 256
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    image_channels: int = 3
    latent_mean: tuple[float, ...] = WAN22_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN22_LATENT_STD

    def __post_init__(self) -> None:
        # Accept lists from YAML/JSON but store tuples so the config stays hashable and frozen.
        for name in ("dim_mult", "temporal_downsample", "latent_mean", "latent_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample has {len(self.temporal_downsample)} entries but dim_mult "
                f"has {len(self.dim_mult)}; give one flag per down-sampling level (len(dim_mult) - 1)."
            )
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(
                f"WanVAEConfig.latent_mean/latent_std have {len(self.latent_mean)}/{len(self.latent_std)} "
                f"values but z_dim is {self.z_dim}; give one mean and one std per latent channel."
            )
        if any(s <= 0 for s in self.latent_std):
            raise ValueError("WanVAEConfig.latent_std must be positive in every channel.")
        for name in ("z_dim", "enc_dim", "dec_dim", "num_res_blocks", "patch_size", "image_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first one (4 for Wan2.2)."""
        return 2 ** sum(bool(f) for f in self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along H and W (16 for Wan2.2: 2x2 patchify, then 3 halvings)."""
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def decoder_conv1_channels(self) -> int:
        """Output channels of `decoder.conv1` (1024 for the full Wan2.2 VAE)."""
        return self.dec_dim * self.dim_mult[-1]

    def replace(self, **changes: object) -> "WanVAEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "WanVAEConfig":
        """Named configurations: `wan2.2` (the real model) and `tiny` (same code path, small widths)."""
        if name == "wan2.2":
            return cls()
        if name == "tiny":
            return cls(enc_dim=8, dec_dim=8, num_res_blocks=1)
        raise ValueError(f"Unknown WanVAEConfig preset {name!r}; choose one of {', '.join(_PRESETS)}.")


def pixel_frames_for_latents(latent_frames: int, temporal_stride: int = 4) -> int:
    """Pixel frames decoded from `latent_frames` latents of one stream: 1 + stride * (n - 1)."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}.")
    return 1 + temporal_stride * (latent_frames - 1)


def latent_frames_for_pixels(pixel_frames: int, temporal_stride: int = 4) -> int:
    """Latents encoded from `pixel_frames` frames; the count must have the form 1 + stride * k."""
    if pixel_frames < 1 or (pixel_frames - 1) % temporal_stride:
        raise ValueError(
            f"A causal VAE encodes 1 + {temporal_stride}k frames; got {pixel_frames}. "
            f"Trim or pad the clip to 1 + {temporal_stride}k frames before encoding."
        )
    return 1 + (pixel_frames - 1) // temporal_stride
