"""Stage-1 AR training speed and memory: Balanced vs plain sequence parallelism.

Runs the real trainer (`ARTrainer.train_step`: teacher-forcing forward and backward under FSDP2 with
activation checkpointing, clip, AdamW, EMA; error recycling off: the plain layout cannot use it) on the model preset with random
weights and generated latents, for each (clip length, SP layout). The text encoder is replaced by
fixed random embeddings (its cost is not part of the figure; with real data the video/VAE time is
also excluded). The first step of each configuration (flex_attention compilation) is reported
separately.

    torchrun --nproc_per_node 4 benchmarks/train_ar.py --frames 96 --layouts balanced plain --steps 3
    torchrun --nproc_per_node 2 benchmarks/train_ar.py --preset tiny --frames 16 --steps 2   # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch


class RandomTextEmbeddings:
    """Stand-in text encoder: fixed random embeddings `[B, chunks, text_len, text_dim]` (no UMT5 in the timing)."""

    def __init__(self, dim: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim, self.length, self.device, self.dtype = dim, length, device, dtype

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return torch.randn(len(prompts), self.length, self.dim, generator=g).to(self.device, self.dtype)

    def encode_chunks(self, prompts):
        flat = [p for sample in prompts for p in sample]
        return self.encode(flat).unflatten(0, (len(prompts), len(prompts[0])))


def _without_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def commit() -> str:
    env = os.environ.get("LONGLIVE_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train_ar.yaml")
    p.add_argument("--preset", default="Wan2.2-TI2V-5B", help="model_kwargs.model_name (Wan2.2-TI2V-5B or tiny)")
    p.add_argument("--frames", type=int, nargs="+", default=[96], help="latent frames per clip (96 = 16 s, 192 = 32 s)")
    p.add_argument("--layouts", nargs="+", default=["balanced", "plain"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up step)")
    p.add_argument("--latent-hw", type=int, nargs=2, default=[44, 80])
    p.add_argument("--compile", action="store_true", help="infra.compile_blocks: torch.compile each transformer block")
    p.add_argument("--out", help="JSON results (rank 0)")
    args = p.parse_args()

    from longlive.config import load_config
    from longlive.parallel.mesh import init_parallel
    from longlive.training.ar_trainer import ARTrainer
    from longlive.training.runtime import build_sharded_model

    world = int(os.environ.get("WORLD_SIZE", 1))
    h, w = args.latent_hw
    base = load_config(args.config, [
        f"model_kwargs.model_name={args.preset}", "checkpoints.random_weights=true", "checkpoints.generator_ckpt=null",
        "data.dataset_type=synthetic", "data.synthetic_samples=64", "logging.tensorboard=false", "logging.seed=1",
        f"infra.sequence_parallel_size={world}", "infra.sharding_strategy=full",
        "training.ema_start_step=0", "training.error_recycling.enabled=false",
        f"training.max_iters={args.steps + 1}", f"infra.compile_blocks={str(args.compile).lower()}",
    ])
    ctx = init_parallel(world, "full")
    if base.model_preset == "tiny":
        base = replace(base, infra=replace(base.infra, mixed_precision=False))
    model = build_sharded_model(base, ctx, seed=1)
    dtype = torch.bfloat16 if base.infra.mixed_precision else torch.float32
    text = RandomTextEmbeddings(model.config.text_dim, model.config.text_len, ctx.device, dtype)
    results = []
    for frames in args.frames:
        for layout in args.layouts:
            cfg = replace(base, infra=replace(base.infra, sp_layout=layout),
                          data=replace(base.data, image_or_video_shape=[1, frames, model.config.in_dim, h, w]))
            trainer = ARTrainer(cfg, "/tmp/longlive_bench_train", save=False, evaluate=False, ctx=ctx,
                                text_encoder=text, model=model)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            warm = trainer.train_step()
            first = time.perf_counter() - t0
            times, losses = [], [warm["loss"]]
            for _ in range(args.steps):
                s = trainer.train_step()  # ends with a host sync (loss all-reduce + float())
                times.append(s["seconds_per_step"])
                losses.append(s["loss"])
            peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None
            reserved = torch.cuda.max_memory_reserved() / 2**30 if ctx.device.type == "cuda" else None
            row = {"latent_frames": frames, "seconds_of_video": round((1 + 4 * (frames - 1)) / 24, 1), "layout": layout,
                   "sp_size": ctx.sp_size, "first_step_s": round(first, 2), "seconds_per_step": round(sum(times) / len(times), 3),
                   "step_times": [round(t, 3) for t in times], "peak_allocated_gib": peak and round(peak, 2),
                   "peak_reserved_gib": reserved and round(reserved, 2), "losses": [round(x, 4) for x in losses]}
            results.append(row)
            if ctx.is_main:
                print(json.dumps(row), flush=True)
            del trainer
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    if ctx.is_main:
        info = {"compile_blocks": args.compile, "gpu": torch.cuda.get_device_name() if ctx.device.type == "cuda" else platform.processor() or "cpu",
                "world_size": ctx.world_size, "torch": torch.__version__, "commit": commit(), "preset": args.preset,
                "command": "torchrun --nproc_per_node %d benchmarks/train_ar.py %s" % (ctx.world_size, " ".join(
                    _without_out(os.sys.argv[1:])))}
        print("| video | layout | s/step | first step (compile) | peak allocated GiB |")
        print("| --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['seconds_of_video']} s ({r['latent_frames']} latents) | {r['layout']} | {r['seconds_per_step']} | "
                  f"{r['first_step_s']} | {r['peak_allocated_gib']} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1))
    ctx.close()


if __name__ == "__main__":
    main()
