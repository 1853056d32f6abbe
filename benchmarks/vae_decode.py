"""Streaming decode speed and memory of the Wan2.2 VAE (random weights).

Times the first chunk of a stream and a steady-state chunk (decoded after a first chunk), each the
median of several runs after warm-up, with CUDA events on GPU (perf_counter on CPU), and reports
peak GPU memory. Prints JSON and writes it to $OUT/vae_decode.json when OUT is set. Needs only
torch and longlive (no diffusers).

    python benchmarks/vae_decode.py                                   # Wan2.2, CUDA, bf16, 704x1280
    python benchmarks/vae_decode.py --preset tiny --device cpu --dtype fp32 --latent-h 4 --latent-w 6
    torchrun --nproc_per_node=2 benchmarks/vae_decode.py --channels-last --fuse-norms --rows   # banded decode

With `--rows` (under torchrun) every rank decodes a band of latent rows and the bands are gathered on
rank 0 (`longlive.parallel.vae_decode`, the "rows" decode mode of SP generation); rank 0 reports.
`host_ms` is the time the Python thread spent issuing a steady chunk (close to the GPU time means the
decode is bound by the CPU's kernel launches, not by the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longlive.models.vae import WanVAE, WanVAEConfig
from longlive.parallel.vae_decode import RowSplit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Timer:
    """Wall time of a region in ms: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description="Streaming decode benchmark of the Wan2.2 VAE (random weights).")
    ap.add_argument("--preset", choices=["wan2.2", "tiny"], default="wan2.2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--latent-h", type=int, help="latent height (default 44 = 704 px; 2 for --preset tiny)")
    ap.add_argument("--latent-w", type=int, help="latent width (default 80 = 1280 px; 3 for --preset tiny)")
    ap.add_argument("--chunk-latents", type=int, default=8, help="latent frames per chunk")
    ap.add_argument("--warmup", type=int, help="untimed runs (default 2 on CUDA, 1 on CPU)")
    ap.add_argument("--iters", type=int, help="timed runs, median reported (default 5 on CUDA, 2 on CPU)")
    ap.add_argument("--channels-last", action="store_true",
                    help="WanVAE.to_channels_last(): channels-last weights and activations")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--fuse-norms", action="store_true", help="WanVAE.fuse_decoder_norms() (Triton norm + SiLU)")
    ap.add_argument("--profile", action="store_true", help="print the kernels of one steady chunk (torch.profiler)")
    ap.add_argument("--rows", action="store_true", help="under torchrun: each rank decodes a band of rows, gathered on rank 0")
    args = ap.parse_args()
    tiny = args.preset == "tiny"  # a smoke-test size, so that a CPU run takes seconds
    args.latent_h = args.latent_h or (2 if tiny else 44)
    args.latent_w = args.latent_w or (3 if tiny else 80)
    on_cpu = torch.device(args.device).type == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 2)
    args.iters = args.iters if args.iters is not None else (2 if on_cpu else 5)

    device = torch.device(args.device)
    split = None
    if args.rows:
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("vae_decode.py --rows runs under torchrun (e.g. torchrun --nproc_per_node=2 ...)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        split = RowSplit()
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    cfg = WanVAEConfig.preset(args.preset)
    with torch.device(device):
        vae = WanVAE(cfg)
    vae = vae.to(dtype=dtype).eval().requires_grad_(False)
    if args.channels_last:
        vae.to_channels_last()
    if args.fuse_norms:
        vae.fuse_decoder_norms()
    if split is not None:
        vae.split_rows(split)
    weight_bytes = sum(p.numel() * p.element_size() for p in vae.parameters())
    n = args.chunk_latents
    shape = (1, cfg.z_dim, n, args.latent_h, args.latent_w)
    gen = torch.Generator(device=device).manual_seed(1)
    chunks = [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    cuda = device.type == "cuda"

    def decode(dec, latents: torch.Tensor) -> torch.Tensor:
        if split is None:
            return dec.decode_chunk(latents)
        whole = split.gather_to_first(dec.decode_chunk(latents[..., split.rows(latents.shape[-2]), :]))
        return torch.empty(0) if whole is None else whole

    with torch.inference_mode():
        # first chunk of a fresh stream
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first_ms = []
        for i in range(args.warmup + args.iters):
            dec = vae.stream_decoder()
            first_frames = dec.frames_for(n)
            with Timer(device) as t:
                out = decode(dec, chunks[0])
            if i >= args.warmup:
                first_ms.append(t.ms)
        del out
        peak_first = torch.cuda.max_memory_allocated() if cuda else None
        # steady state: every timed chunk follows at least one decoded chunk of the same stream
        dec = vae.stream_decoder()
        decode(dec, chunks[0])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        steady_ms, host_ms = [], []
        for i in range(args.warmup + args.iters):
            steady_frames = dec.frames_for(n)
            with Timer(device) as t:
                h0 = time.perf_counter()
                out = decode(dec, chunks[1])
                h1 = time.perf_counter()
            if i >= args.warmup:
                steady_ms.append(t.ms)
                host_ms.append((h1 - h0) * 1e3)
            del out
        peak = torch.cuda.max_memory_allocated() if cuda else None
        if args.profile and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                decode(dec, chunks[1])
                torch.cuda.synchronize()
            if split is None or split.index == 0:
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))

    steady = statistics.median(steady_ms)
    result = {
        "benchmark": "vae_decode",
        "preset": args.preset,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "latent_hw": [args.latent_h, args.latent_w],
        "pixel_hw": [args.latent_h * cfg.spatial_stride, args.latent_w * cfg.spatial_stride],
        "chunk_latents": n,
        "first_chunk": {"frames": first_frames, "median_ms": statistics.median(first_ms), "all_ms": first_ms},
        "steady_chunk": {"frames": steady_frames, "median_ms": steady, "all_ms": steady_ms,
                         "frames_per_s": steady_frames / (steady / 1e3), "host_ms": statistics.median(host_ms)},
        "row_bands": split.size if split is not None else 1,
        "weight_bytes": weight_bytes,
        "feature_cache_bytes": dec.cache.nbytes(),
        "peak_gpu_bytes_first_chunk": peak_first,
        "peak_gpu_bytes_steady": peak,
        "peak_gpu_bytes_over_resident_steady": (peak - base_alloc) if cuda else None,
        "channels_last": args.channels_last,
        "fuse_norms": args.fuse_norms,
        "cudnn_benchmark": args.cudnn_benchmark,
        "warmup": args.warmup,
        "iters": args.iters,
    }
    if split is not None:
        dist.destroy_process_group()
        if split.index != 0:
            return
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / ("vae_decode.json" if split is None else f"vae_decode_rows{split.size}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()
