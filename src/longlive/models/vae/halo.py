"""Chunk-halo VAE encoding for sequence-parallel training (spec 5.3).

Each sequence-parallel rank keeps a contiguous range of latent frames. Instead of encoding the
whole clip, it encodes a raw-frame window that starts `halo` latents earlier; the halo only warms
the causal conv caches and is dropped, so the kept latents approximate a full-sequence encode.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from longlive.models.vae.model import WanVAE


@dataclass(frozen=True)
class HaloWindow:
    """Raw frames [raw_start, raw_end) to encode for kept latents [keep_start, keep_end).

    If the window does not start at frame 0, its first raw frame is encoded alone as a
    'first-frame' latent (the pseudo prefix); `drop` latents are removed after encoding.
    """

    keep_start: int
    keep_end: int
    halo_start: int
    raw_start: int
    raw_end: int
    pseudo_prefix: int
    drop: int

    @property
    def raw_frames(self) -> int:
        return self.raw_end - self.raw_start

    @property
    def kept_latents(self) -> int:
        return self.keep_end - self.keep_start

    @property
    def encoded_latents(self) -> int:
        """Latents the encoder produces for the raw window (= drop + kept)."""
        return self.drop + self.kept_latents

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["raw_frames"] = self.raw_frames
        return d


def halo_window(keep_start: int, keep_end: int, halo_latents: int, raw_frames: int, temporal_stride: int = 4) -> HaloWindow:
    """Window arithmetic of spec 5.3 for one kept latent range.

    halo_start = max(0, keep_start - halo); latents [a, b) need raw [0, 1+s(b-1)) if a == 0, else
    raw [s(a-1), 1+s(b-1)) with one pseudo-prefix latent; drop = prefix + (keep_start - halo_start).
    """
    s = temporal_stride
    if not 0 <= keep_start < keep_end:
        raise ValueError(f"halo_window: need 0 <= keep_start < keep_end, got [{keep_start}, {keep_end}).")
    if halo_latents < 0:
        raise ValueError(f"halo_window: halo_latents must be >= 0, got {halo_latents}.")
    needed_end = 1 + s * (keep_end - 1)
    if raw_frames < needed_end:
        raise ValueError(
            f"halo_window: kept latents [{keep_start}, {keep_end}) need raw frames up to {needed_end}, "
            f"but the clip has only {raw_frames} (a clip of F latents has 1 + {s}(F-1) frames)."
        )
    halo_start = max(0, keep_start - halo_latents)
    if halo_start == 0:
        raw_start, prefix = 0, 0
    else:
        raw_start, prefix = s * (halo_start - 1), 1
    return HaloWindow(keep_start, keep_end, halo_start, raw_start, needed_end, prefix, prefix + keep_start - halo_start)


def sp_halo_windows(latent_frames: int, sp_size: int, halo_latents: int, raw_frames: int | None = None,
                    temporal_stride: int = 4) -> list[HaloWindow]:
    """One `HaloWindow` per sequence-parallel rank; rank r keeps [r F/sp, (r+1) F/sp)."""
    if sp_size < 1 or latent_frames < 1 or latent_frames % sp_size:
        raise ValueError(
            f"sp_halo_windows: latent_frames ({latent_frames}) must be a positive multiple of sp_size ({sp_size})."
        )
    if raw_frames is None:
        raw_frames = 1 + temporal_stride * (latent_frames - 1)
    per_rank = latent_frames // sp_size
    return [halo_window(r * per_rank, (r + 1) * per_rank, halo_latents, raw_frames, temporal_stride) for r in range(sp_size)]


def encode_halo_window(vae: WanVAE, raw_window: torch.Tensor, window: HaloWindow) -> torch.Tensor:
    """Encode the raw frames of `window` ([B, 3, raw_frames, H, W]) and return only the kept latents."""
    if raw_window.dim() != 5 or raw_window.shape[2] != window.raw_frames:
        raise ValueError(
            f"encode_halo_window: expected {window.raw_frames} raw frames (window [{window.raw_start}, "
            f"{window.raw_end})), got video of shape {tuple(raw_window.shape)}."
        )
    latents = vae.encode(raw_window)
    if latents.shape[2] != window.encoded_latents:
        raise RuntimeError(
            f"encode_halo_window: encoder returned {latents.shape[2]} latents, expected "
            f"{window.encoded_latents} (drop {window.drop} + keep {window.kept_latents})."
        )
    kept = latents[:, :, window.drop :]
    assert kept.shape[2] == window.kept_latents
    return kept
