"""3-axis rotary position embedding of the Wan DiT.

Head dimensions are rotated in ADJACENT pairs (2j, 2j+1); the pairs are split between the
time, height and width axes (22/21/21 pairs for head_dim 128). Angles are computed analytically
in float64 from the (possibly fractional, offset or scaled) positions, so temporal positions are
not limited to a 1024-entry table (the reference breaks past 1024 latent frames).
"""
from __future__ import annotations

import torch

from .config import WanConfig


def axis_frequencies(config: WanConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Per-axis angular frequencies (float64): omega_j = theta^(-j/n) for an axis with n pairs."""
    out = []
    for n in config.rope_split:
        j = torch.arange(n, dtype=torch.float64, device=device)
        out.append(config.rope_theta ** (-j / n))
    return tuple(out)


def rope_cos_sin(
    config: WanConfig,
    frame_positions: torch.Tensor,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[B, F*height*width, 1, head_dim/2]` (fp32) for tokens in frame-major order.

    `frame_positions` is `[B, F]` (or `[F]`), the temporal position of each latent frame; rows and
    columns use positions 0..height-1 and 0..width-1.
    """
    if frame_positions.dim() == 1:
        frame_positions = frame_positions[None]
    device = frame_positions.device
    w_t, w_h, w_w = axis_frequencies(config, device)
    b, f = frame_positions.shape
    ang_t = frame_positions.to(torch.float64)[..., None] * w_t  # [B, F, nt]
    ang_h = torch.arange(height, dtype=torch.float64, device=device)[:, None] * w_h  # [H, nh]
    ang_w = torch.arange(width, dtype=torch.float64, device=device)[:, None] * w_w  # [W, nw]
    ang = torch.cat(
        [
            ang_t[:, :, None, None, :].expand(b, f, height, width, -1),
            ang_h[None, None, :, None, :].expand(b, f, height, width, -1),
            ang_w[None, None, None, :, :].expand(b, f, height, width, -1),
        ],
        dim=-1,
    ).reshape(b, f * height * width, 1, -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, S, H, D]` by the tables from `rope_cos_sin`; math in fp32, result in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)
