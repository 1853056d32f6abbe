"""Profile training steps of a config on one GPU: where a step's host and device time go.

    python benchmarks/profile_train_step.py --config configs/synth/train_ar.yaml --out prof.txt \
        [--warmup 10] [--steps 5] [field=value ...]

Runs `--warmup` steps (compilation, allocator warm-up), times `--steps` more with the data wait split
out, then profiles `--steps` steps with torch.profiler and writes to `--out` the ops that take the most
host (self CPU) and device time. Nothing else is saved. AR (`algorithm.trainer: diffusion`) and DMD configs.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from longlive.config import load_config

    cfg = load_config(args.config, overrides=args.overrides)
    logdir = tempfile.mkdtemp(prefix="profile_train_")
    if cfg.algorithm.trainer == "diffusion":
        from longlive.training.ar_trainer import ARTrainer as Trainer
    else:
        from longlive.training.dmd_trainer import DMDTrainer as Trainer
    trainer = Trainer(cfg, logdir, auto_resume=False, save=False, evaluate=False)
    cuda = trainer.ctx.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        trainer.train_step()
    # the data wait alone: the time `next()` blocks once the workers have had a step's time to refill
    stream = trainer.stream
    waits, steps = [], []
    original_next = stream.next

    def timed_next():
        t = time.perf_counter()
        out = original_next()
        waits.append(time.perf_counter() - t)
        return out

    stream.next = timed_next
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        trainer.train_step()
        sync()
        steps.append(time.perf_counter() - t)
    stream.next = original_next
    n = len(steps)
    summary = (f"{sum(steps) / n:.4f} s/step (synchronised, {n} steps after {args.warmup} warm-up), "
               f"data wait {sum(waits) / max(len(waits), 1):.4f} s per batch")
    print(summary)

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        sync()
    table = prof.key_averages()
    with open(args.out, "w") as f:
        f.write(summary + "\n\n" + table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if cuda:
            f.write("\n\n" + table.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
