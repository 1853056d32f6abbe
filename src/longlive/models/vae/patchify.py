"""A weight-free pixel-space "VAE": space-to-depth with an exact inverse, for small demo models.

`PatchifyVAE` has the interface of `WanVAE` (`encode`, `decode`, `stream_decoder`, `config` with
`z_dim`, `temporal_stride`, `spatial_stride`, `image_channels`; `device`, `dtype`) and the same frame
arithmetic: a video of 1 + 4k frames becomes 1 + k latent frames, frame 0 on its own. Each latent
frame holds a 4 x s x s block of pixels (t, y, x) in its channels, so z_dim = 3 * 4 * s * s
(192 for s = 4). Frame 0 is stored four times; decoding averages the four copies, so
`decode(encode(x)) == x` exactly (for x in [-1, 1]) and a model's estimate of frame 0 is the mean of
its four slots. Latents are the pixel values themselves (no normalisation: backgrounds sit at
-1, 0 and 1, the scale flow-matching noise expects). Nothing is learned, so a demo needs no VAE
weights and CPU decoding costs a reshape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import latent_frames_for_pixels


@dataclass(frozen=True)
class PatchifyVAEConfig:
    """Space-to-depth strides: `temporal_stride` frames by `spatial_stride`^2 pixels per latent cell."""

    temporal_stride: int = 4
    spatial_stride: int = 4
    image_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("temporal_stride", "spatial_stride", "image_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"PatchifyVAEConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def z_dim(self) -> int:
        return self.image_channels * self.temporal_stride * self.spatial_stride**2


class PatchifyVAE(nn.Module):
    """Exact, parameter-free video <-> latent reshaping with `WanVAE`'s interface (see the module docstring)."""

    def __init__(self, config: PatchifyVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or PatchifyVAEConfig()
        # carries device and dtype through .to(); not saved (there are no weights)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return mu

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> [B, z_dim, 1+k, H/s, W/s]."""
        cfg = self.config
        t, s = cfg.temporal_stride, cfg.spatial_stride
        if video.dim() != 5 or video.shape[1] != cfg.image_channels:
            raise ValueError(f"PatchifyVAE.encode expects video [B, {cfg.image_channels}, T, H, W]; "
                             f"got shape {tuple(video.shape)}.")
        latent_frames_for_pixels(video.shape[2], t)  # raises on a bad frame count
        b, c, _, h, w = video.shape
        if h % s or w % s:
            raise ValueError(f"PatchifyVAE.encode needs H and W divisible by {s}; got {h}x{w}. Resize or crop the video first.")
        video = video.to(device=self.device, dtype=self.dtype)
        x = torch.cat([video[:, :, :1].expand(-1, -1, t, -1, -1), video[:, :, 1:]], dim=2)
        n = x.shape[2] // t
        x = x.reshape(b, c, n, t, h // s, s, w // s, s).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, cfg.z_dim, n, h // s, w // s).contiguous()

    def _unpatch(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        cfg = self.config
        t, s, c = cfg.temporal_stride, cfg.spatial_stride, cfg.image_channels
        b, zc, n, h, w = z.shape
        if zc != cfg.z_dim:
            raise ValueError(f"PatchifyVAE.decode expects latents [B, {cfg.z_dim}, n, h, w]; got {tuple(z.shape)}.")
        x = z.to(device=self.device, dtype=self.dtype).reshape(b, c, t, s, s, n, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, c, n * t, h * s, w * s)
        if first:
            x = torch.cat([x[:, :, :t].mean(dim=2, keepdim=True), x[:, :, t:]], dim=2)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, z_dim, n, h, w] -> [B, 3, 1+4(n-1), h*s, w*s] clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[2] < 1:
            raise ValueError(f"PatchifyVAE.decode expects latents [B, {self.config.z_dim}, n>=1, h, w]; "
                             f"got {tuple(latents.shape)}.")
        return self._unpatch(latents, first=True)

    def stream_decoder(self) -> "PatchifyStreamDecoder":
        return PatchifyStreamDecoder(self)


class PatchifyStreamDecoder:
    """Chunk-by-chunk decoding with `StreamingDecoder`'s interface; the concatenation equals `decode`."""

    def __init__(self, vae: PatchifyVAE) -> None:
        self.vae = vae
        self.latents_seen = 0

    def reset(self) -> None:
        self.latents_seen = 0

    def frames_for(self, latent_frames: int) -> int:
        stride = self.vae.config.temporal_stride
        return stride * latent_frames - (stride - 1 if self.latents_seen == 0 else 0)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[2] < 1:
            raise ValueError(f"PatchifyStreamDecoder.decode_chunk expects latents [B, {self.vae.config.z_dim}, n>=1, h, w]; "
                             f"got {tuple(latents.shape)}.")
        out = self.vae._unpatch(latents, first=self.latents_seen == 0)
        self.latents_seen += latents.shape[2]
        return out
