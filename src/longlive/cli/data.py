"""`longlive data encode`: encode a video dataset to latents once, for training with `load_raw_video: false`.
`longlive data synth`: write a deterministic procedural video dataset (moving coloured shapes + captions).

    longlive data encode --config C --out DIR [--limit N] [--device D] [field=value ...]
    longlive data synth --out DIR [--samples N] [--seed S] [--frames F] [--height H] [--width W] [--fps 24]
                        [--eval-prompts M] [--eval-chunks C] [--max-shots K]
                        [--long-eval-prompts L] [--long-eval-chunks C] [--max-shot-chunks M]

synth writes `DIR/video/<sample>/<k>.mp4` + `DIR/caption/<sample>/<k>.json` (one clip per shot, the layout of
`MultiVideoConcatDataset`), evaluation prompt folders `DIR/prompts/eval_<i>/` and, with --long-eval-prompts,
long-horizon prompt folders `DIR/prompts_long/long_<i>/` (many shots of 1..--max-shot-chunks chunks each; see
`longlive.data.procedural`). It refuses a non-empty DIR that it did not make; a DIR made by synth is rewritten.

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

ACTIONS = ("encode", "synth")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # One positional action instead of argparse sub-parsers: `longlive` parses intermixed options and
    # overrides, which sub-parsers do not support.
    p.add_argument("action", choices=ACTIONS, help="encode: the data.data_path videos to latent files (resumable); "
                   "synth: write a procedural video dataset with captions and eval prompts")
    p.add_argument("--config", help="encode (required): config naming the dataset (data.*) and the VAE (inference.vae_type)")
    p.add_argument("--out", required=True, help="output folder (encode: <sample>.safetensors; synth: the dataset)")
    p.add_argument("--limit", type=int, help="only the first N samples of the dataset")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    synth = p.add_argument_group("synth")
    synth.add_argument("--samples", type=int, default=8, help="training samples (default 8)")
    synth.add_argument("--seed", type=int, default=0, help="everything written is a function of the seed (default 0)")
    synth.add_argument("--frames", type=int, default=33, help="frames per shot clip (default 33)")
    synth.add_argument("--height", type=int, default=64, help="frame height, even (default 64)")
    synth.add_argument("--width", type=int, default=64, help="frame width, even (default 64)")
    synth.add_argument("--fps", type=float, default=24.0, help="frame rate of the clips (default 24)")
    synth.add_argument("--eval-prompts", type=int, default=4, help="evaluation prompt folders (default 4)")
    synth.add_argument("--eval-chunks", type=int, default=6, help="chunks of every evaluation prompt (default 6)")
    synth.add_argument("--max-shots", type=int, default=3, help="at most this many shots per sample, 1..3 (default 3)")
    synth.add_argument("--long-eval-prompts", type=int, default=0,
                       help="long-horizon evaluation prompt folders under prompts_long/ (default 0: none)")
    synth.add_argument("--long-eval-chunks", type=int, default=30, help="chunks of every long prompt (default 30)")
    synth.add_argument("--max-shot-chunks", type=int, default=3,
                       help="chunks per shot of the long prompts are 1..this (default 3: fits --frames 97)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.data_path=/data/clips")


def run(args: argparse.Namespace) -> int:
    if args.action == "encode":
        if not args.config:
            raise SystemExit("longlive data encode: --config is required (the config naming data.data_path and the VAE)")
        return encode(args)
    if args.action == "synth":
        return synth(args)
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


def synth(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..data.procedural import write_procedural_dataset

    if args.overrides:
        raise SystemExit(f"longlive data synth takes no config overrides, got {args.overrides}")
    if args.config:
        raise SystemExit("longlive data synth does not read --config; give the dataset options (--samples, ...)")
    try:
        summary = write_procedural_dataset(args.out, samples=args.samples, seed=args.seed, frames=args.frames,
                                           height=args.height, width=args.width, fps=args.fps,
                                           eval_prompts=args.eval_prompts, eval_chunks=args.eval_chunks,
                                           max_shots=args.max_shots, long_eval_prompts=args.long_eval_prompts,
                                           long_eval_chunks=args.long_eval_chunks,
                                           max_shot_chunks=args.max_shot_chunks)
    except ValueError as exc:
        raise SystemExit(f"longlive data synth: {exc}") from None
    print(json.dumps(asdict(summary)))
    return 0
