"""`longlive export merge-lora`: fold a DMD LoRA into its base generator and write one checkpoint.

    longlive export merge-lora --config configs/inference.yaml --output-path merged.pt \
        [--generator-ckpt base.pt] [--lora-ckpt lora.pt] [--dtype bf16|fp32]

The output is `{generator, checkpoint_format: longlive_generator_merged_lora, ...}` (spec 1.4), or
a safetensors file with the same metadata in its header when the path ends in `.safetensors`.
Afterwards remove `lora_ckpt` and the `adapter` section from the inference config.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("longlive.export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("merge-lora", help="merge a LoRA checkpoint into the generator (BF16 by default)")
    m.add_argument("--config", required=True)
    m.add_argument("--output-path", required=True)
    m.add_argument("--generator-ckpt", help="overrides checkpoints.generator_ckpt")
    m.add_argument("--lora-ckpt", help="overrides checkpoints.lora_ckpt")
    m.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    m.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..models.wan.state_dict import MERGED_FORMAT, save_generator
    from ..pipelines.inference import build_generator

    overrides = ["merge_lora=true"]
    if args.generator_ckpt:
        overrides.append(f"checkpoints.generator_ckpt={args.generator_ckpt}")
    if args.lora_ckpt:
        overrides.append(f"checkpoints.lora_ckpt={args.lora_ckpt}")
    cfg = load_config(args.config, overrides)
    if cfg.adapter is None or not cfg.checkpoints.lora_ckpt:
        raise SystemExit(f"{args.config}: merge-lora needs an `adapter` section and checkpoints.lora_ckpt (or --lora-ckpt)")
    if not cfg.checkpoints.generator_ckpt:
        raise SystemExit(f"{args.config}: merge-lora needs checkpoints.generator_ckpt (or --generator-ckpt)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_generator(cfg, torch.device(args.device), torch.float32).to(dtype)
    path = save_generator(model, Path(args.output_path), metadata={
        "checkpoint_format": MERGED_FORMAT, "source_generator_ckpt": str(cfg.checkpoints.generator_ckpt),
        "source_lora_ckpt": str(cfg.checkpoints.lora_ckpt), "model_name": cfg.model_kwargs.model_name,
        "dtype": str(dtype).replace("torch.", ""), "merged_lora": True})
    log.info("wrote merged generator %s", path)
    return 0
