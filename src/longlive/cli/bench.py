"""`longlive bench`: time generation of a model preset with random weights (JSON + a readable table).

    longlive bench --preset tiny --height 64 --width 64 --device cpu --vae tiny      # CPU smoke run
    longlive bench --compile --steps 4 --json bench.json                             # 5B at 704x1280, one GPU
    longlive bench --compile --steps 4 --decode none --ceiling                       # side by side with the ceiling
    torchrun --nproc_per_node=4 -m longlive.cli.main bench --compile --steps 2       # sequence parallel over 4 GPUs

Under torchrun the ranks form sequence-parallel groups of --sp-size (default: all ranks, one group);
the first rank prints and writes the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger("longlive.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pipelines.bench import DECODE_MODES, BenchSpec

    d = BenchSpec()
    p.add_argument("--preset", default=d.preset, help="model preset: wan2.2-ti2v-5b (default) or tiny")
    p.add_argument("--height", type=int, default=d.height, help="video height in pixels (default 704)")
    p.add_argument("--width", type=int, default=d.width, help="video width in pixels (default 1280)")
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps per chunk (default 4)")
    p.add_argument("--chunks", type=int, default=d.chunks, help="chunks of the timed generation (default 10)")
    p.add_argument("--warmup-chunks", type=int, default=None, help="chunks of the warm-up generation (default: window + 1)")
    p.add_argument("--chunk-frames", type=int, default=d.chunk_frames, help="latent frames per chunk (default 8)")
    p.add_argument("--window", type=int, default=d.window_frames, help="KV window in latent frames (default 32)")
    p.add_argument("--sink", type=int, default=d.sink_frames, help="sink in latent frames (default 8)")
    p.add_argument("--decode", choices=DECODE_MODES, default=d.decode,
                   help="none: DiT only; batch: whole video at the end; sync: per chunk; stream: second CUDA stream; "
                        "device: dedicated --vae-device in a background thread; rows: under torchrun, every rank of the "
                        "group decodes a band of rows of each chunk (default sync)")
    p.add_argument("--vae", choices=("wan2.2", "tiny"), default=d.vae, help="VAE architecture (random weights)")
    p.add_argument("--vae-device", default=None, help="with --decode device, e.g. cuda:1")
    p.add_argument("--quant", choices=("none", "fp8"), default=d.quant, help="fp8: row-wise W8A8 block linears (Hopper)")
    p.add_argument("--kv", choices=("bf16", "fp4"), default=d.kv, help="KV cache storage")
    p.add_argument("--kv-comm", action="store_true", help="with --kv fp4 under torchrun: send K/V through the all-to-all as NVFP4")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--sp-size", type=int, default=None, help="ranks per sequence-parallel group (default: the world size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="keep the MP4 files here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the report to this JSON file")
    p.add_argument("--ceiling", action="store_true",
                   help="also time the chunk's matrix products and attention alone with the best kernels (the FPS "
                        "ceiling, longlive.pipelines.ceiling) and report the loop's fraction of it")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.wan import WanConfig
    from ..parallel.inference import init_inference_parallel
    from ..pipelines.bench import BenchSpec, format_table, run_bench, write_report

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    spec = BenchSpec(preset=args.preset, height=args.height, width=args.width, steps=args.steps, chunks=args.chunks,
                     warmup_chunks=args.warmup_chunks, chunk_frames=args.chunk_frames, window_frames=args.window,
                     sink_frames=args.sink, decode=args.decode, vae=args.vae, vae_device=args.vae_device, quant=args.quant,
                     kv=args.kv, kv_comm=args.kv_comm, compile=args.compile, dtype=dtype, seed=args.seed, output_dir=args.output_dir,
                     ceiling=args.ceiling)
    spec.check()
    world = int(os.environ.get("WORLD_SIZE", 1))
    sp_size = args.sp_size or world
    heads = WanConfig.preset(args.preset).num_heads
    parallel = init_inference_parallel(sp_size, None, False, heads, args.chunk_frames, device)
    try:
        if args.output_dir and parallel.num_groups > 1:
            spec = dataclasses.replace(spec, output_dir=os.path.join(args.output_dir, f"group{parallel.group_index}"))
        report = run_bench(spec, device, sp=parallel.sp, is_writer=parallel.is_writer)
        report["groups"] = parallel.num_groups
        if parallel.rank == 0:
            print(format_table(report), flush=True)
            if args.json:
                write_report(report, args.json)
                log.info("wrote %s", args.json)
    finally:
        parallel.close()
    return 0
