"""`longlive train --config C --logdir DIR [field=value ...]`: the trainer named by `algorithm.trainer`.

`diffusion`: stage-1 AR training by teacher forcing (data parallel x sequence parallel on FSDP2).
`score_distillation`: stage-2 DMD distillation (LoRA adapters on a shared base when `adapter` is set).
Runs as one process (CPU or one GPU) or under `torchrun`. A logdir that already holds checkpoints is
resumed from the newest one unless --no-auto-resume. Any error stops the run with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("longlive.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/train_ar.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_iters=10")
    p.add_argument("--logdir", required=True, help="checkpoints, TensorBoard logs and evaluation outputs")
    p.add_argument("--no-auto-resume", action="store_true", help="start fresh even if the logdir has checkpoints")
    p.add_argument("--no-save", action="store_true", help="write no checkpoints")
    p.add_argument("--no-eval", "--no_visualize", dest="no_eval", action="store_true", help="skip periodic evaluation")
    p.add_argument("--disable-wandb", action="store_true", help="do not log to wandb even if logging.use_wandb is set")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in this run (the schedule still ends at training.max_iters)")
    p.add_argument("--summary-json", help="write the run summary (losses, s/step, peak memory) to this file")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from ..config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.disable_wandb:
        cfg = replace(cfg, logging=replace(cfg.logging, use_wandb=False))
    if cfg.algorithm.trainer == "score_distillation":
        from ..training.dmd_trainer import DMDTrainer

        trainer = DMDTrainer(cfg, args.logdir, auto_resume=not args.no_auto_resume, save=not args.no_save,
                             evaluate=not args.no_eval, max_steps=args.max_steps)
    else:
        from ..training.ar_trainer import ARTrainer

        trainer = ARTrainer(cfg, args.logdir, auto_resume=not args.no_auto_resume, save=not args.no_save,
                            evaluate=not args.no_eval, max_steps=args.max_steps)
    try:
        summary = trainer.run()
    finally:
        trainer.ctx.close()
    if trainer.ctx.is_main:
        log.info("steps %d -> %d, %.3f s/step", summary.start_step, summary.end_step, summary.seconds_per_step)
        if args.summary_json:
            with open(args.summary_json, "w") as fh:
                json.dump(asdict(summary), fh, indent=1)
    return 0
