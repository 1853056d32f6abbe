"""Shared helpers for the VAE tests (use the `vh` fixture): tiny random-weight models and videos."""
from __future__ import annotations

import sys

import pytest
import torch

from longlive.models.vae import WanVAE, WanVAEConfig


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter (norm gains included) with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("gamma") else scale * noise)
    return module


def random_vae(cfg: WanVAEConfig | None = None, seed: int = 0) -> WanVAE:
    """A tiny WanVAE with seeded random weights, in eval mode."""
    return randomize_(WanVAE(cfg or WanVAEConfig.preset("tiny")), seed).eval()


def diffusers_vae(cfg: WanVAEConfig):
    """diffusers' AutoencoderKLWan with the Wan2.2 architecture at the widths of `cfg` (test oracle)."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKLWan(
        base_dim=cfg.enc_dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample), is_residual=True,
        in_channels=cfg.image_channels * cfg.patch_size**2, out_channels=cfg.image_channels * cfg.patch_size**2,
        patch_size=cfg.patch_size, scale_factor_temporal=cfg.temporal_stride, scale_factor_spatial=cfg.spatial_stride,
        latents_mean=list(cfg.latent_mean), latents_std=list(cfg.latent_std),
    ).eval()


def smooth_video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth moving pattern in [-1, 1], [b, 3, t, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    phase = torch.rand(b, 3, 1, 1, 1, generator=gen) * 6.28
    tt = torch.arange(t).view(1, 1, t, 1, 1) * 0.3
    yy = torch.linspace(0, 3.14, h).view(1, 1, 1, h, 1)
    xx = torch.linspace(0, 3.14, w).view(1, 1, 1, 1, w)
    return 0.8 * torch.sin(phase + tt + 2 * yy + 3 * xx) * torch.cos(xx - tt)


@pytest.fixture
def vh():
    """The helper functions of this conftest (random_vae, diffusers_vae, randomize_, smooth_video)."""
    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread for every test here (see tests/conftest.py)."""
