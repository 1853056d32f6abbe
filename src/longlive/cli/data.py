"""`longlive data encode`: encode a video dataset to latents once, for training with `load_raw_video: false`.

    longlive data encode --config C --out DIR [--limit N] [--device D] [field=value ...]

Reads `data.data_path` with `MultiVideoConcatDataset` in deterministic mode (start at video 0,
frame 0), encodes each whole clip with the config's VAE, and writes `DIR/<sample>.safetensors`
atomically ("latents" [C, F, H, W] bf16 + JSON metadata; read back with `LatentDataset`). Samples
already written are skipped, so an interrupted run resumes where it stopped. Exit status 1 when
any sample failed (each failure is logged with its file; a rerun retries only those).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("longlive.data")

ACTIONS = ("encode",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One positional action instead of argparse sub-parsers: `longlive` parses intermixed options and
    # overrides, which sub-parsers do not support.
    p.add_argument("action", choices=ACTIONS, help="encode: the data.data_path videos to latent files (resumable)")
    p.add_argument("--config", required=True, help="config naming the dataset (data.*) and the VAE (inference.vae_type)")
    p.add_argument("--out", required=True, help="output folder for <sample>.safetensors")
    p.add_argument("--limit", type=int, help="only the first N samples of the dataset")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.data_path=/data/clips")


def run(args: argparse.Namespace) -> int:
    if args.action == "encode":
        return encode(args)
    raise SystemExit(f"unknown data action {args.action!r}; choose from {ACTIONS}")


def encode(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..config import load_config
    from ..data.latent_dataset import LATENT_KEY, latent_metadata
    from ..data.video_dataset import MultiVideoConcatDataset, SampleReadError
    from ..io.checkpoint import write_safetensors
    from ..pipelines.inference import build_vae

    cfg = load_config(args.config, args.overrides)
    if args.limit is not None and args.limit < 0:
        raise SystemExit(f"--limit must be >= 0, got {args.limit}")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dataset = MultiVideoConcatDataset.from_config(cfg, train=False, seed=cfg.logging.seed, return_image=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    _, f, c, h, w = (int(s) for s in cfg.data.image_or_video_shape)
    vae = None
    written, existing, failed = 0, 0, []
    for i in tqdm(range(count), desc="encode", unit="clip", disable=args.no_progress):
        name = dataset.samples[i]
        target = out / f"{name}.safetensors"
        if target.exists():
            existing += 1
            continue
        try:
            item = dataset.load_sample(i)
        except SampleReadError as exc:
            log.warning("sample %s failed: %s", name, exc)
            failed.append(name)
            continue
        if vae is None:
            vae = build_vae(cfg, device, dtype)
        with torch.no_grad():
            latents = vae.encode(item["frames"][None].to(device=device, dtype=dtype))[0]
        if tuple(latents.shape) != (c, f, h, w):
            raise RuntimeError(f"{name}: the VAE gave latents {tuple(latents.shape)} but data.image_or_video_shape "
                               f"asks for (C, F, H, W) = {(c, f, h, w)}; check inference.vae_type and the shape")
        meta = latent_metadata(item["prompts"], item["num_valid_latent_frames"], str(dataset.video_root / name),
                               vae_type=cfg.inference.vae_type, frames_per_chunk=cfg.frames_per_chunk)
        write_safetensors({LATENT_KEY: latents.to(torch.bfloat16)}, target, metadata=meta)
        written += 1
        log.debug("%s -> %s (%d valid latent frames)", name, target, item["num_valid_latent_frames"])
    summary = {"written": written, "skipped_existing": existing, "failed": len(failed), "total": count, "out": str(out)}
    print(json.dumps(summary))
    if failed:
        log.warning("%d sample(s) failed: %s", len(failed), ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else ""))
        return 1
    return 0
