"""Training clips of the procedural world rendered in memory (`data.dataset_type: procedural`).

Sample i is sample i of `longlive data synth --seed S --frames N --max-shots M`: the same shots, captions
and chunk placement as `MultiVideoConcatDataset` reading that folder (`plan_clip` on shots of N frames
at 24 fps, a random start per (seed, epoch, index), scene-cut prefix on chunks that start a new shot),
(with the same training seed), but the frames come straight from `render_shot` instead of H.264 files. That removes the video decode
(0.2-0.3 s per clip on one core, which starved a GPU at 1.4 s per step) and its compression noise, and
the number of distinct samples is only a setting (`data.synthetic_samples`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from longlive.data.procedural import render_shot, sample_shot_list
from longlive.data.video_dataset import (
    TARGET_FPS,
    SampleReadError,
    SourceVideo,
    item_generator,
    load_with_fallback,
    plan_clip,
    random_clip_start,
    vae_strides,
)

if TYPE_CHECKING:
    from longlive.config.schema import Config


class ProceduralClipDataset(torch.utils.data.Dataset):
    """Items like `MultiVideoConcatDataset`'s: "frames" float16 [3, T, H, W] in [-1, 1], "prompts" (one
    per chunk), "num_valid_latent_frames", "name", "index", "skipped"."""

    def __init__(self, *, samples: int, latent_frames: int, frames_per_chunk: int, frame_size: tuple[int, int],
                 temporal_stride: int, world_seed: int, seed: int, shot_frames: int, max_shots: int, scene_cut_prefix: str,
                 train: bool = True) -> None:
        if latent_frames % frames_per_chunk:
            raise ValueError(f"latent_frames={latent_frames} is not a multiple of frames_per_chunk={frames_per_chunk}")
        raw = 1 + temporal_stride * (frames_per_chunk - 1)
        if shot_frames < raw:
            raise ValueError(f"data.procedural_shot_frames={shot_frames} is shorter than one chunk ({raw} frames)")
        self.samples, self.latent_frames, self.frames_per_chunk = samples, latent_frames, frames_per_chunk
        self.height, self.width = frame_size
        self.temporal_stride, self.world_seed, self.seed, self.train = temporal_stride, world_seed, seed, train
        self.shot_frames, self.max_shots, self.scene_cut_prefix = shot_frames, max_shots, scene_cut_prefix
        self.num_chunks = latent_frames // frames_per_chunk
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg: "Config", seed: int, train: bool = True) -> "ProceduralClipDataset":
        """`data.procedural_*` choose the world; `seed` (the training seed) the random clip starts."""
        _, f, _, h, w = cfg.data.image_or_video_shape
        temporal, spatial = vae_strides(cfg.inference.vae_type)
        d = cfg.data
        return cls(samples=d.synthetic_samples, latent_frames=int(f), frames_per_chunk=cfg.frames_per_chunk,
                   frame_size=(int(h) * spatial, int(w) * spatial), temporal_stride=temporal,
                   world_seed=d.procedural_seed, seed=seed, shot_frames=d.procedural_shot_frames, max_shots=d.procedural_max_shots,
                   scene_cut_prefix=cfg.inference.scene_cut_prefix, train=train)

    def __len__(self) -> int:
        return self.samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_with_fallback(self.load_sample, int(index), len(self), f"procedural world seed {self.world_seed}")

    def load_sample(self, index: int) -> dict[str, Any]:
        shots = sample_shot_list(self.world_seed, index, self.max_shots)
        info = SourceVideo(self.shot_frames, TARGET_FPS)
        kwargs = dict(frames_per_chunk=self.frames_per_chunk, num_chunks=self.num_chunks,
                      temporal_stride=self.temporal_stride)
        start = (0, 0)
        if self.train:  # as MultiVideoConcatDataset: a random start among those that hold a whole clip
            start = random_clip_start(lambda _: info, len(shots), item_generator(self.seed, self.epoch, index), **kwargs)
        plan = plan_clip(lambda _: info, len(shots), start, **kwargs)
        name = f"sample_{index:03d}"
        if not plan.complete:
            raise SampleReadError(name, f"{len(shots)} shot(s) of {self.shot_frames} frames cannot hold "
                                        f"{self.num_chunks} chunks; raise data.procedural_shot_frames")
        pieces = [render_shot(shots[run.video], self.shot_frames, self.height, self.width)[run.start:run.start + run.num_frames]
                  for run in plan.runs]
        video = np.concatenate(pieces, axis=0)  # [T, H, W, 3] uint8
        frames = torch.from_numpy(video).permute(3, 0, 1, 2).to(torch.float16).div_(127.5).sub_(1.0)
        prompts = [(self.scene_cut_prefix if cut else "") + shots[v].caption()
                   for v, cut in zip(plan.chunk_video, plan.chunk_cut)]
        return {"frames": frames.contiguous(), "prompts": prompts, "num_valid_latent_frames": plan.valid_latents,
                "name": name, "index": int(index), "skipped": []}
