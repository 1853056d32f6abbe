"""Synthetic training data: small real video datasets for tests, and learnable latents generated on the fly.

`write_synthetic_video_dataset` writes the `video/<sample>/<k>.mp4` + `caption/<sample>/<k>.json` layout
of `MultiVideoConcatDataset`; every frame carries a binary block code (sample, video, source frame) that
`read_frame_codes` recovers from decoded frames, so tests can check which source frame landed where.

`SyntheticLatentDataset` makes latents `[C, F, H, W]` of travelling waves whose colour (channel loading),
stripe width, and direction of motion are named by the chunk prompts: a small DiT can learn to denoise
them, and the 5B geometry (48 x 96 x 44 x 80) costs one einsum per item, with nothing stored.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from longlive.config.schema import DEFAULT_SCENE_CUT_PREFIX

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Frame codes: a 4x4 grid of black/white blocks, bit b in block (b // 4, b % 4).
# ------------------------------------------------------------------------------------------------
_GRID = 4
_FRAME_BITS, _VIDEO_BITS, _SAMPLE_BITS = 8, 4, 4
_LOW, _HIGH = 32, 224  # uint8 levels of a 0 / 1 block, far from the threshold after H.264 coding


def frame_code_image(sample: int, video: int, frame: int, size: tuple[int, int]) -> np.ndarray:
    """A `[H, W, 3]` uint8 image whose 16 blocks encode frame % 256, video % 16 and sample % 16."""
    height, width = size
    if height % _GRID or width % _GRID:
        raise ValueError(f"frame size {size} must be divisible by {_GRID} for the block code")
    code = (frame % 256) | ((video % 16) << _FRAME_BITS) | ((sample % 16) << (_FRAME_BITS + _VIDEO_BITS))
    bh, bw = height // _GRID, width // _GRID
    image = np.full((height, width, 3), _LOW, dtype=np.uint8)
    for bit in range(_GRID * _GRID):
        if code >> bit & 1:
            r, c = divmod(bit, _GRID)
            image[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = _HIGH
    return image


def read_frame_codes(frames: torch.Tensor) -> list[tuple[int, int, int]]:
    """Decode `(sample % 16, video % 16, frame % 256)` from each frame of `[3, T, H, W]` in [-1, 1]."""
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames must be [3, T, H, W], got {tuple(frames.shape)}")
    _, t, height, width = frames.shape
    bh, bw = height // _GRID, width // _GRID
    gray = frames.float().mean(dim=0)  # [T, H, W]
    # Mean of the inner half of each block: away from the edges that the codec and the resize blur.
    mh, mw = max(bh // 4, 0), max(bw // 4, 0)
    out = []
    for i in range(t):
        code = 0
        for bit in range(_GRID * _GRID):
            r, c = divmod(bit, _GRID)
            block = gray[i, r * bh + mh : (r + 1) * bh - mh, c * bw + mw : (c + 1) * bw - mw]
            if float(block.mean()) > 0.0:
                code |= 1 << bit
        out.append(((code >> (_FRAME_BITS + _VIDEO_BITS)) & 15, (code >> _FRAME_BITS) & 15, code & 255))
    return out


def synthetic_caption(sample: int, video: int) -> str:
    """Caption written for video `video` of sample `sample`."""
    return f"sample {sample} clip {video}: coloured blocks"


def write_synthetic_video_dataset(
    root: str | os.PathLike[str],
    num_samples: int,
    videos_per_sample: int,
    frames_per_video: int | Sequence[int],
    fps: float = 24.0,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> list[Path]:
    """Write `root/video/<sample>/<k>.mp4` and `root/caption/<sample>/<k>.json` with block-coded frames.

    `frames_per_video` is one count for every video or one count per video index k. Sample folders are
    named `sample_000`, ...; captions come from `synthetic_caption`. `seed` varies the background noise
    level of the blocks (kept small so the code stays readable). Returns the sample video folders.
    """
    from longlive.io.video import save_video

    root = Path(root)
    counts = [int(frames_per_video)] * videos_per_sample if isinstance(frames_per_video, int) else list(frames_per_video)
    if len(counts) != videos_per_sample:
        raise ValueError(f"frames_per_video has {len(counts)} entries for videos_per_sample={videos_per_sample}")
    if any(c < 1 for c in counts):
        raise ValueError(f"every video needs at least one frame, got {counts}")
    rng = np.random.default_rng(seed)
    folders = []
    for s in range(num_samples):
        name = f"sample_{s:03d}"
        vdir, cdir = root / "video" / name, root / "caption" / name
        cdir.mkdir(parents=True, exist_ok=True)
        for k, count in enumerate(counts):
            frames = np.stack([frame_code_image(s, k, i, size) for i in range(count)])
            noise = rng.integers(-6, 7, size=frames.shape[:3] + (1,))
            frames = np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            save_video(frames, vdir / f"{k}.mp4", fps=fps, crf=10, preset="ultrafast", fsync=False)
            (cdir / f"{k}.json").write_text(json.dumps({"caption": synthetic_caption(s, k)}), encoding="utf-8")
        folders.append(vdir)
    logger.info("wrote %d synthetic samples x %d videos to %s", num_samples, videos_per_sample, root)
    return folders


# ------------------------------------------------------------------------------------------------
# Learnable synthetic latents
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticVocabulary:
    """Words of the synthetic prompts: each colour is a fixed channel loading, each width a spatial
    frequency (cycles per frame), each direction a wave vector and direction of motion."""

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    widths: tuple[tuple[str, float], ...] = (("wide", 0.5), ("narrow", 1.0))
    directions: tuple[str, ...] = ("left", "right", "up", "down")

    def prompt(self, colour: int, width: int, direction: int) -> str:
        return f"{self.widths[width][0]} {self.colours[colour]} stripes moving {self.directions[direction]}"


@dataclass(frozen=True)
class SyntheticShot:
    """One shot of a synthetic sample: chunks [first_chunk, first_chunk + num_chunks) share one pattern."""

    first_chunk: int
    num_chunks: int
    colour: int
    width: int
    direction: int
    phase: float


_DIRECTION_VECTORS = {"left": (0.0, 1.0, 1.0), "right": (0.0, 1.0, -1.0), "up": (1.0, 0.0, 1.0), "down": (1.0, 0.0, -1.0)}


class SyntheticLatentDataset(torch.utils.data.Dataset):
    """Deterministic, learnable latents `[C, F, H, W]` (float32) with per-chunk prompts, made on the fly.

    Item `index` is a function of (seed, index) only: 1..max_shots shots, each a travelling cosine wave
    `loading[colour][c] * cos(k . (y, x) + sign * omega * f + phase)`, where the prompt names colour,
    width (|k|) and direction; the phase is random per shot (the model must infer it from context).
    Shots after the first start with `scene_cut_prefix`. Item keys match the real datasets.
    """

    def __init__(
        self,
        num_samples: int,
        latent_shape: Sequence[int],
        frames_per_chunk: int,
        seed: int = 0,
        vocabulary: SyntheticVocabulary | None = None,
        *,
        max_shots: int = 1,
        scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX,
        frames_per_cycle: float | None = None,
        vocab_seed: int = 0,
    ) -> None:
        if len(latent_shape) != 4 or any(int(s) < 1 for s in latent_shape):
            raise ValueError(f"latent_shape must be 4 positive ints (C, F, H, W), got {tuple(latent_shape)}")
        self.latent_shape = tuple(int(s) for s in latent_shape)
        c, f, _, _ = self.latent_shape
        if frames_per_chunk < 1 or f % frames_per_chunk:
            raise ValueError(f"F={f} latent frames must be a positive multiple of frames_per_chunk={frames_per_chunk}")
        if num_samples < 1 or max_shots < 1:
            raise ValueError(f"num_samples and max_shots must be >= 1, got {num_samples}, {max_shots}")
        self.num_samples, self.frames_per_chunk, self.seed = int(num_samples), int(frames_per_chunk), int(seed)
        self.num_chunks = f // frames_per_chunk
        self.vocabulary = vocabulary or SyntheticVocabulary()
        unknown = [d for d in self.vocabulary.directions if d not in _DIRECTION_VECTORS]
        if unknown:
            raise ValueError(f"unknown directions {unknown}; choose from {sorted(_DIRECTION_VECTORS)}")
        self.max_shots = min(int(max_shots), self.num_chunks)
        self.scene_cut_prefix = scene_cut_prefix
        # Half a cycle per chunk by default: motion is visible inside every chunk.
        self.frames_per_cycle = float(frames_per_cycle or 2 * frames_per_chunk)
        g = torch.Generator().manual_seed(vocab_seed)
        loadings = torch.randn(len(self.vocabulary.colours), c, generator=g)
        # Unit RMS per channel vector, so latents have roughly unit variance like normalised VAE latents.
        self._loadings = loadings / loadings.pow(2).mean(dim=1, keepdim=True).sqrt() * math.sqrt(2.0)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch (kept for the common dataset interface)."""

    def shots(self, index: int) -> list[SyntheticShot]:
        """The shots (pattern parameters) of item `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        g = torch.Generator().manual_seed(_mix(self.seed, index))
        num_shots = 1 + int(torch.randint(self.max_shots, (1,), generator=g))
        cuts = sorted(torch.randperm(self.num_chunks - 1, generator=g)[: num_shots - 1].add(1).tolist())
        bounds = [0] + cuts + [self.num_chunks]
        vocab = self.vocabulary
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            colour, width, direction = (int(torch.randint(n, (1,), generator=g)) for n in
                                        (len(vocab.colours), len(vocab.widths), len(vocab.directions)))
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            out.append(SyntheticShot(a, b - a, colour, width, direction, phase))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, f, h, w = self.latent_shape
        vocab, fpc = self.vocabulary, self.frames_per_chunk
        latents = torch.empty(c, f, h, w)
        prompts: list[str] = []
        ys = torch.arange(h, dtype=torch.float32) / h
        xs = torch.arange(w, dtype=torch.float32) / w
        omega = 2 * math.pi / self.frames_per_cycle
        for i, shot in enumerate(self.shots(index)):
            text = vocab.prompt(shot.colour, shot.width, shot.direction)
            prompts += [self.scene_cut_prefix + text if i > 0 else text] + [text] * (shot.num_chunks - 1)
            wy, wx, sign = _DIRECTION_VECTORS[vocab.directions[shot.direction]]
            k = 2 * math.pi * vocab.widths[shot.width][1]
            space = k * (wy * ys[:, None] + wx * xs[None, :])  # [H, W]
            f0, f1 = shot.first_chunk * fpc, (shot.first_chunk + shot.num_chunks) * fpc
            time = sign * omega * torch.arange(f1 - f0, dtype=torch.float32) + shot.phase  # [F_shot]
            # cos(space + time) = cos(space)cos(time) - sin(space)sin(time): two separable terms.
            spatial = torch.stack([space.cos(), -space.sin()])  # [2, H, W]
            temporal = torch.stack([time.cos(), time.sin()])  # [2, F_shot]
            latents[:, f0:f1] = torch.einsum("c,qf,qhw->cfhw", self._loadings[shot.colour], temporal, spatial)
        return {
            "latents": latents,
            "prompts": prompts,
            "num_valid_latent_frames": f,
            "name": f"synthetic_{index:06d}",
            "index": int(index),
            "skipped": [],
        }


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (stable across runs and platforms)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1
