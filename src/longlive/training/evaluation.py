"""Periodic evaluation during training: generate the evaluation prompts with the current model.

Shared by the AR and the DMD trainers. Every rank runs the generation (an FSDP-sharded model needs
all ranks for each forward); rank 0 writes latents (`evaluation.save_latents_only`) or MP4 videos
to `<logdir>/eval/step_XXXXXX/`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from longlive.config import Config

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_generator(model: Any, cfg: Config, *, text_encoder: Any, step: int, seed: int, out_root: Path,
                       device: torch.device, dtype: torch.dtype, is_main: bool, vae: Callable[[], Any],
                       tag: dict[str, Any] | None = None) -> list[Path]:
    """Generate every prompt of `data.eval_data_path` (`evaluation.num_frames` latent frames, the
    `inference` sampling settings); `model` is a WanModel or a DMD role; `vae()` returns the decoder."""
    from longlive.data.prompts import load_prompts
    from longlive.io.checkpoint import write_torch
    from longlive.pipelines.chunked import generate_latents
    from longlive.pipelines.inference import chunked_options

    if not cfg.data.eval_data_path:
        return []
    if cfg.i2v:
        log.warning("step %d: evaluation of I2V training needs conditioning images; not run", step)
        return []
    frames = int(cfg.evaluation.num_frames[0])
    eval_cfg = replace(cfg, inference=replace(cfg.inference, num_output_frames=frames))
    samples = load_prompts(cfg.data.eval_data_path, frames // cfg.frames_per_chunk, chunks_per_shot=cfg.data.chunks_per_shot,
                           scene_cut_prefix=cfg.inference.scene_cut_prefix, mismatch=cfg.data.prompt_length_mismatch)
    options = chunked_options(eval_cfg)
    _, _, channels, height, width = (int(s) for s in cfg.data.image_or_video_shape)
    out_dir = Path(out_root) / "eval" / f"step_{step:06d}"
    neg = None
    if options.guidance_scale != 1.0:
        neg = text_encoder.encode([cfg.inference.negative_prompt]).to(device, dtype)
    written = []
    for i, sample in enumerate(samples):
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(1, channels, frames, height, width, generator=g).to(device, dtype)
        prompts = text_encoder.encode_chunks([sample.prompts]).to(device, dtype)
        latents = generate_latents(model, noise, prompts, options=options, scene_cuts=[sample.scene_cuts], negative_embeds=neg)
        if not is_main:
            continue
        if cfg.evaluation.save_latents_only:
            path = out_dir / f"{i:03d}.pt"
            write_torch({"latents": latents.permute(0, 2, 1, 3, 4).contiguous().cpu(), "prompts": list(sample.prompts),
                         "step": step, **(tag or {})}, path)
        else:
            from longlive.io.video import save_video

            decoder = vae()
            path = out_dir / f"{i:03d}.mp4"
            video = decoder.decode(latents.to(decoder.dtype))
            save_video(video[0].permute(1, 0, 2, 3).float().add(1).mul(0.5).clamp(0, 1).cpu(), path)
        written.append(path)
    return written
