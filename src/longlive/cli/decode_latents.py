"""`longlive decode-latents`: decode saved latents (`generate` with inference.save_latents_only) to MP4.

    longlive decode-latents --config configs/inference.yaml --input videos/run [--output-dir D] [--fps 24]

Accepts a `.pt` file or a folder of them (`--pattern`). Each file holds a tensor `[T, C, H, W]` or
`[B, T, C, H, W]` (the reference's layout), or a dict with `latents` (ours) or one tensor value.
The VAE comes from the config (`inference.vae_type`, `checkpoints.wan_model_dir`). Under torchrun
the files are split over ranks (file i on rank i % world), each decoded exactly once.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("longlive.decode_latents")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config naming the VAE (inference.vae_type, checkpoints.*)")
    p.add_argument("--input", required=True, help="a .pt latents file or a folder of them")
    p.add_argument("--output-dir", help="default: <input folder>/decoded_videos")
    p.add_argument("--pattern", default="*.pt")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")


def read_latents(path: Path):
    """Latents of one file as `[B, C, T, H, W]` (DiT/VAE layout)."""
    import torch

    from ..io.checkpoint import read_checkpoint

    obj, _ = read_checkpoint(path)
    if isinstance(obj, dict):
        if "latents" in obj:
            obj = obj["latents"]
        else:
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
            if not tensors:
                raise ValueError(f"{path}: no tensor in this file (keys: {sorted(obj)[:8]})")
            obj = tensors[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (4, 5):
        raise ValueError(f"{path}: expected latents [T, C, H, W] or [B, T, C, H, W], got {getattr(obj, 'shape', type(obj))}")
    if obj.dim() == 4:
        obj = obj[None]
    return obj.permute(0, 2, 1, 3, 4)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..io.video import save_video
    from ..pipelines.inference import build_vae

    cfg = load_config(args.config, args.overrides)
    src = Path(args.input)
    files = sorted(src.glob(args.pattern)) if src.is_dir() else [src]
    if not files:
        raise SystemExit(f"{src}: no files match {args.pattern!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build_vae(cfg, device, dtype)
    out_dir = Path(args.output_dir) if args.output_dir else (src if src.is_dir() else src.parent) / "decoded_videos"
    for path in files[rank::world]:
        latents = read_latents(path).to(device, dtype)
        with torch.no_grad():
            video = vae.decode(latents)
        for b in range(video.shape[0]):
            name = path.stem.replace("latents_", "video_", 1) + (f"_{b}" if video.shape[0] > 1 else "") + ".mp4"
            frames = video[b].permute(1, 0, 2, 3).float().add(1).mul(0.5).clamp(0, 1).cpu()
            save_video(frames, out_dir / name, fps=args.fps)
            log.info("%s -> %s (%d frames)", path, out_dir / name, frames.shape[0])
    return 0
