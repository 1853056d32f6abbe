"""Profile stage-1 AR training steps of a config on one GPU (torch profiler; CPU and CUDA time per op).

    python benchmarks/profile_train_step.py --config configs/synth/train_ar.yaml --steps 5 --out prof.txt [field=value ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longlive.config import load_config
from longlive.training.ar_trainer import ARTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    trainer = ARTrainer(cfg, tempfile.mkdtemp(), save=False, evaluate=False)
    for _ in range(a.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        trainer.train_step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t0) / a.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            trainer.train_step()
        torch.cuda.synchronize()
    with open(a.out, "w") as f:
        f.write(f"{plain:.4f} s/step without the profiler ({a.steps} steps after {a.warmup} warm-up)\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    print(f"{plain:.4f} s/step")


if __name__ == "__main__":
    main()
