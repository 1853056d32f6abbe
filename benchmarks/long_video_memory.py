"""Peak GPU memory (and speed) of a long generation: the 5B DiT, random weights, 704x1280, BF16 compute.

Generates `--frames` latent frames (384 = 48 chunks = 64 s of video) with the chunked loop
(`generate_latents`: KV cache with window 32, sink 8, multi-shot sink, 4 steps + refresh). Text
embeddings are random (the text encoder is off the GPU) and the VAE is not run, so the figure is the
DiT's own footprint: weights + KV cache + activations + the latents of the whole video.

    python benchmarks/long_video_memory.py --weights bf16 --kv bf16
    python benchmarks/long_video_memory.py --weights nvfp4 --kv fp4     # packed FP4 weights + FP4 KV cache
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from report import commit  # noqa: E402
from longlive.models.wan import WanConfig, WanModel  # noqa: E402
from longlive.pipelines.chunked import ChunkedOptions, generate_latents  # noqa: E402


def build(preset: str, weights: str, device: torch.device) -> WanModel:
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(preset))
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    if weights == "nvfp4":
        from longlive.quant.convert import quantize_model
        from longlive.quant.filters import nvfp4_filter
        from longlive.quant.linear import NVFP4Recipe

        quantize_model(model, NVFP4Recipe.from_rules("mse", weight_2d=False), nvfp4_filter(None), backend="weight_only",
                       materialize=True)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.2-ti2v-5b")
    p.add_argument("--weights", default="bf16", choices=("bf16", "nvfp4"))
    p.add_argument("--kv", default="bf16", choices=("bf16", "fp4"))
    p.add_argument("--frames", type=int, default=384, help="latent frames (384 = 64 s at 24 fps)")
    p.add_argument("--height", type=int, default=44)
    p.add_argument("--width", type=int, default=80)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("long_video_memory.py measures GPU memory; no CUDA device here")
    dev = torch.device("cuda")
    model = build(args.preset, args.weights, dev)
    if args.compile:
        model.compile_blocks()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the BF16 weights a quantized model was built from are not part of generation
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    cfg = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    noise = torch.randn(1, cfg.in_dim, args.frames, args.height, args.width, device=dev, generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, args.frames // 8, cfg.text_len, cfg.text_dim, device=dev, generator=g).to(torch.bfloat16)
    opts = ChunkedOptions(sampling_steps=args.steps, kv_quant=args.kv == "fp4")
    times: list[float] = []
    last = [time.perf_counter()]

    def on_chunk(k: int, x: torch.Tensor) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    generate_latents(model, noise, ctx, options=opts, on_chunk=on_chunk)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    steady = sorted(times[len(times) // 2:])[len(times[len(times) // 2:]) // 2]
    out = {
        "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit()},
        "weights": args.weights, "kv": args.kv, "frames": args.frames, "steps": args.steps, "compile": args.compile,
        "model_gib": weights_gib, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "seconds": total,
        "steady_chunk_s": steady, "steady_fps": 32 / steady,
    }
    print(f"{args.weights} weights + {args.kv} KV, {args.frames} latent frames: peak {out['peak_allocated_gib']:.2f} GiB "
          f"allocated ({out['peak_reserved_gib']:.2f} reserved), model {weights_gib:.2f} GiB, {total:.1f} s, "
          f"steady {out['steady_fps']:.2f} FPS")
    print(json.dumps(out))
    if os.environ.get("OUT"):
        name = f"long_video_memory_{args.weights}_{args.kv}.json"
        Path(os.environ["OUT"], name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
