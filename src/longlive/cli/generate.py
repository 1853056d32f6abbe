"""`longlive generate --config C [field=value ...]`: long videos for every prompt of a config.

Runs on CPU, one GPU, or under `torchrun`. With `sp_size: 1` every rank is its own group (data
parallel: rank r takes prompts r, r+W, r+2W, ...; no collectives). With `sp_size: N` consecutive
ranks form sequence-parallel groups that each generate one video together (spec 4); the groups take
the prompts in the same round-robin way, and only a group's first rank decodes and writes files.
Every prompt is generated exactly once whatever the layout. The seed of prompt i is
`logging.seed + i`, so a video does not depend on the number of ranks or on sp_size.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("longlive.generate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/inference.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.sampling_steps=2")
    p.add_argument("--output-folder", help="overrides inference.output_folder")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..data.prompts import load_prompts_from_config
    from ..parallel.inference import init_inference_parallel
    from ..pipelines.inference import InferencePipeline, output_stem

    cfg = load_config(args.config, args.overrides)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if cfg.i2v:
        from ..config.paths import require_path
        from ..data.prompts import load_image_prompts

        samples = load_image_prompts(require_path(cfg, "data.data_path", kind="dir"), cfg.num_chunks,
                                     scene_cut_prefix=cfg.inference.scene_cut_prefix, mismatch=cfg.data.prompt_length_mismatch)
    else:
        samples = load_prompts_from_config(cfg)
    limit = cfg.inference.inference_iter
    if limit >= 0:
        if limit < len(samples):
            log.info("inference_iter=%d: generating the first %d of %d prompts", limit, limit, len(samples))
        samples = samples[:limit]
    jobs = [(i, j) for i in range(len(samples)) for j in range(cfg.inference.num_samples)]
    parallel = init_inference_parallel(cfg.sp_size, cfg.dp_size if "dp_size" in cfg.origins else None,
                                       cfg.auto_sp_remainder, cfg.num_heads, cfg.frames_per_chunk, device)
    try:
        mine = parallel.my_jobs(jobs)
        log.info("rank %d/%d (group %d of %d, sp rank %d of %d): %d of %d videos (%d prompts x %d samples)",
                 parallel.rank, parallel.world_size, parallel.group_index, parallel.num_groups, parallel.sp_rank,
                 parallel.sp_size, len(mine), len(jobs), len(samples), cfg.inference.num_samples)
        if not mine:
            return 0
        pipe = InferencePipeline.from_config(cfg, device=device, dtype=dtype, parallel=parallel)
        out_dir = Path(args.output_folder or cfg.inference.output_folder)
        for i, j in mine:
            seed = cfg.logging.seed + i + 100_000 * j
            stem = output_stem(i, samples[i], seed)
            result = pipe.generate(samples[i], seed, out_dir, stem, progress=not args.no_progress and parallel.is_writer)
            if parallel.is_writer:
                log.info("wrote %s: %d latent frames -> %d frames in %.1f s", result.path, result.latent_frames,
                         result.pixel_frames, result.seconds)
    finally:
        parallel.close()
    return 0
