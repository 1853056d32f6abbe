"""Time one steady-state chunk of the DiT with the KV cache (random weights; speed does not depend on values).

Default: the Wan2.2-TI2V-5B preset at 704x1280 (latent 44x80 -> 880 tokens/frame), 8-frame chunks,
a 32-frame window (full), sink 8 with multi-shot sink, N denoising steps (FlowUniPC) + 1 clean refresh.
FPS = 4 * chunk_frames output frames / median chunk time (CUDA events, warm-up excluded).

    python benchmarks/dit_chunk.py --steps 4 [--steps 2] [--profile]
    python benchmarks/dit_chunk.py --preset tiny --device cpu --height 8 --width 8   # smoke test
    python benchmarks/dit_chunk.py --quant fp8 --compile      # FP8 W8A8 block linears (spec 3.7)
    python benchmarks/dit_chunk.py --quant nvfp4-weight-only  # packed FP4 weights, BF16 activations
    python benchmarks/dit_chunk.py --kv fp4                   # NVFP4 KV cache + fused attention
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from longlive.diffusion.samplers import FlowUniPCSampler
from report import commit
from longlive.models.wan import KVCache, WanConfig, WanModel


def build(preset: str, device: str, dtype: torch.dtype, quant: str = "none") -> WanModel:
    cfg = WanConfig.preset(preset)
    with torch.device("meta"):
        model = WanModel(cfg)
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    model = model.to(dtype).eval().requires_grad_(False)
    if quant == "fp8":
        from longlive.quant.fp8 import convert_to_fp8

        convert_to_fp8(model)
    elif quant.startswith("nvfp4"):
        from longlive.quant.convert import quantize_model
        from longlive.quant.filters import nvfp4_filter
        from longlive.quant.linear import NVFP4Recipe

        backend = "weight_only" if quant == "nvfp4-weight-only" else "emulated"
        quantize_model(model, NVFP4Recipe.from_rules("mse", weight_2d=False), nvfp4_filter(None), backend=backend,
                       materialize=True)
    return model


@torch.no_grad()
def run_chunk(model, cache, k, steps, ctx, noise, sync_timer=None):
    cache.begin_chunk(k * cache.chunk_frames)
    sampler = FlowUniPCSampler(steps)
    ctx = model.text_kv(ctx)  # once per chunk, as the pipeline does
    x = noise
    b, f = noise.shape[0], noise.shape[2]
    for t in sampler.timesteps.tolist():
        v = model(x, torch.full((b, f), float(t), device=x.device), ctx, kv_cache=cache)
        x = sampler.step(v, x)
    cache.prepare_refresh()
    model.refresh_cache(x, torch.zeros((b, f), device=x.device), ctx, kv_cache=cache)
    cache.end_chunk()
    return x


def bench(args, steps: int) -> dict:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build(args.preset, args.device, dtype, args.quant)
    model.fused_kernels = not args.no_fused_kernels
    if args.compile:  # per-block torch.compile; the KV-cache write stays eager
        model.compile_blocks(args.compile_mode)
    cfg = model.config
    cache = KVCache.for_model(cfg, batch_size=1, latent_height=args.height, latent_width=args.width, chunk_frames=8,
                              window_frames=args.window, sink_frames=args.sink, multi_shot_sink=True,
                              rope_offset_per_shot=8, dtype=dtype, device=dev, kv_quant=args.kv == "fp4")
    cache.fill_random_()
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dtype)
    noise = torch.randn(1, cfg.in_dim, 8, args.height, args.width, device=dev, dtype=dtype)
    # fill the window without computing (contents are random), so the next chunks are steady state
    for k in range(cache.num_slots):
        cache.begin_chunk(8 * k)
        cache.end_chunk()
    k = cache.num_slots
    is_cuda = dev.type == "cuda"
    times = []
    for i in range(args.warmup + args.iters):
        if is_cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
        t0 = time.perf_counter()
        run_chunk(model, cache, k, steps, ctx, noise)
        if is_cuda:
            e.record()
            torch.cuda.synchronize()
            dt = s.elapsed_time(e) / 1e3
        else:
            dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        k += 1
    med = statistics.median(times)
    out = {
        "preset": args.preset, "steps": steps, "dtype": args.dtype, "latent": [args.height, args.width],
        "compile": bool(args.compile), "compile_mode": args.compile_mode, "quant": args.quant, "kv": args.kv,
        "fused_kernels": model.fused_kernels,
        "tokens_per_chunk": cache.chunk_tokens, "window_tokens": cache.num_slots * cache.chunk_tokens,
        "chunk_s_median": med, "chunk_s_all": times, "forward_ms": med / (steps + 1) * 1e3,
        "fps": 4 * 8 / med, "kv_cache_gib": cache.nbytes / 2**30,
    }
    if is_cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile and is_cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_chunk(model, cache, k, steps, ctx, noise)
            torch.cuda.synchronize()
        # self time per kernel: where the GPU time goes (the regions' totals overlap their kernels)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile_rows,
                                          max_name_column_width=100)
        print(table)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"profile_{steps}step.txt"), "w") as f:
                f.write(table)
    del model, cache
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.2-ti2v-5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--height", type=int, default=44)
    p.add_argument("--width", type=int, default=80)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--sink", type=int, default=8)
    p.add_argument("--steps", type=int, action="append")
    p.add_argument("--warmup", type=int, default=2, help="untimed chunks (include compilation)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=40, help="kernels listed in the profile table")
    p.add_argument("--quant", default="none", choices=("none", "fp8", "nvfp4-weight-only", "nvfp4-emulated"))
    p.add_argument("--kv", default="bf16", choices=("bf16", "fp4"))
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--no-fused-kernels", action="store_true",
                   help="plain PyTorch ops instead of the fused norm/RoPE/cache-write kernel and GELU epilogue")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    env = {"torch": torch.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env["commit"] = commit() or ""
    results = {"env": env, "runs": [bench(args, s) for s in (args.steps or [4])]}
    for r in results["runs"]:
        print(f"{r['preset']} {r['steps']}-step {r['dtype']} quant={r['quant']} kv={r['kv']}: chunk {r['chunk_s_median']*1e3:.1f} ms, "
              f"{r['forward_ms']:.1f} ms/forward, {r['fps']:.2f} FPS, peak {r.get('peak_gib', float('nan')):.1f} GiB")
    print(json.dumps(results))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dit_chunk.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
