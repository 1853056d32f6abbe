"""NVFP4 Triton kernels on CUDA: bit-exactness against the reference, then throughput.

Throughput is reported as bytes read + written per second and as a fraction of a device-to-device
copy measured in the same run. Prints JSON; also writes $OUT/nvfp4_kernels.json when OUT is set.

    python benchmarks/nvfp4_kernels.py            # checks + timings (about 1-2 minutes on an H200)
    python benchmarks/nvfp4_kernels.py --no-sweep # skip the tile-shape sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import commit  # noqa: E402

from longlive.quant import nvfp4 as nv  # noqa: E402
from longlive.quant.nvfp4_triton import dequantize_triton, quantize_triton  # noqa: E402

logger = logging.getLogger("nvfp4_kernels")

RULES = ["static_6", "static_4", "mse", "mae", "abs_max"]
# (name, rows, cols): a 5B FFN weight, one KV-cache chunk of one layer (spec 7.7), one chunk's activations
BENCH_SHAPES = [("ffn_weight", 3072, 14336), ("kv_chunk", 168960, 128), ("activation", 7040, 3072)]


def _data(rows: int, cols: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random input; 'wide' scales each 16-block by 10^U(-7, 2) and zeroes 10% of blocks."""
    dev = gen.device
    x = torch.randn(rows, cols, generator=gen, device=dev)
    if kind == "wide":
        nb = -(-cols // 16)
        mag = 10.0 ** (torch.rand(rows, nb, generator=gen, device=dev) * 9 - 7)
        mag[torch.rand(rows, nb, generator=gen, device=dev) < 0.1] = 0
        x = x * mag.repeat_interleave(16, dim=1)[:, :cols]
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing elements (bitwise for floats)."""
    if a.shape != b.shape:
        return -1
    if a.is_floating_point():
        a = a.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()])
        b = b.view(a.dtype)
    return int((a != b).sum())


# (block rows, block cols, warps, tiles per program) of the sweep; a tile holds rows * cols / 16 blocks
TILES = [(16, 128, 4, 1), (16, 128, 4, 2), (16, 128, 4, 4), (16, 128, 4, 8), (32, 128, 4, 4), (8, 128, 2, 8),
         (8, 128, 2, 16), (16, 128, 8, 4), (32, 64, 4, 4), (16, 64, 2, 8)]
L2_COLD_BYTES = 256 * 2**20
"""Inputs cycled per call add up to at least this (the H200 has a 60 MB L2)."""

EXACT_SHAPES = [(1, 16), (130, 200), (1000, 3072), (4096, 4096), (2048, 128)]


def check_exactness(device: torch.device, shapes: list[tuple[int, int]] = EXACT_SHAPES) -> list[dict]:
    """Compare kernels with the reference (on the same device) over rules, roundings, shapes, dtypes."""
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for rows, cols in shapes:
        for kind in ("gauss", "wide"):
            for in_dtype in (torch.bfloat16, torch.float32):
                x = _data(rows, cols, kind, in_dtype, gen)
                for rule in RULES:
                    for rnd in ("nearest", "stochastic"):
                        u = torch.rand(x.shape, generator=gen, device=device) if rnd == "stochastic" else None
                        qr = nv.quantize(x, rule, round=rnd, uniform=u)
                        qt = quantize_triton(x, rule, round=rnd, uniform=u)
                        rec = {
                            "shape": [rows, cols], "data": kind, "dtype": str(in_dtype).removeprefix("torch."),
                            "rule": rule, "round": rnd,
                            "values_diff": _same(qt.values, qr.values),
                            "scales_diff": _same(qt.scale_factors, qr.scale_factors),
                            "amax_diff": _same(qt.amax, qr.amax),
                        }
                        for dt in (torch.float32, torch.bfloat16, torch.float16):
                            rec[f"dequant_{str(dt).removeprefix('torch.')}_diff"] = _same(
                                dequantize_triton(qr, dt), nv.dequantize(qr, dt)
                            )
                        rec["exact"] = all(v == 0 for k, v in rec.items() if k.endswith("_diff"))
                        results.append(rec)
                        if not rec["exact"]:
                            logger.error("MISMATCH %s", rec)
    # the reference itself must not depend on the device (CPU vs CUDA torch numerics)
    for rule in RULES:
        x = _data(512, 1024, "wide", torch.float32, gen)
        u = torch.rand(x.shape, generator=gen, device=device)
        for rnd in ("nearest", "stochastic"):
            uu = u if rnd == "stochastic" else None
            qg = nv.quantize(x, rule, round=rnd, uniform=uu)
            qc = nv.quantize(x.cpu(), rule, round=rnd, uniform=None if uu is None else uu.cpu())
            rec = {"check": "reference_cuda_vs_cpu", "rule": rule, "round": rnd,
                   "values_diff": _same(qg.values.cpu(), qc.values),
                   "scales_diff": _same(qg.scale_factors.cpu(), qc.scale_factors),
                   "dequant_bfloat16_diff": _same(nv.dequantize(qg, torch.bfloat16).cpu(),
                                                  nv.dequantize(qc, torch.bfloat16))}
            rec["exact"] = all(v == 0 for k, v in rec.items() if k.endswith("_diff"))
            results.append(rec)
    bad = torch.randn(64, 64, device=device)
    bad[3, 3] = float("nan")
    try:
        quantize_triton(bad)
        results.append({"check": "rejects_nan", "exact": False})
    except ValueError:
        results.append({"check": "rejects_nan", "exact": True})
    return results


def time_cuda(fn: Callable[[], object], reps: int = 20, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` timed loops of `reps` calls (after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(per_call)


def time_graph(fn: Callable[[], object], reps: int = 20, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls (device time only:
    no Python or launch overhead). ``fn`` must not synchronise with the host."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_cuda(graph.replay, reps=1, repeats=repeats) / reps


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / t


def throughput(device: torch.device, copy_bw: float, sweep: bool) -> list[dict]:
    """Time quantize / dequantize on realistic shapes; bytes are logical (input once, outputs once).

    ``kernel`` rows are device time from CUDA-graph replay (amax given, no validation: one kernel
    launch); ``call`` rows are the whole validated call (amax reduction + one host sync), event-timed.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    out = []

    def record(name, rows, cols, op, t, nbytes, **extra):
        out.append({"shape_name": name, "shape": [rows, cols], "op": op, **extra, "seconds": t,
                    "GBps": nbytes / t / 1e9, "fraction_of_copy": nbytes / t / copy_bw})

    for name, rows, cols in BENCH_SHAPES:
        # enough distinct inputs that each call reads from HBM, not from the 60 MB L2 left by the last
        copies = max(2, -(-L2_COLD_BYTES // (rows * cols * 2)))
        xs = [_data(rows, cols, "gauss", torch.bfloat16, gen) for _ in range(copies)]
        x = xs[0]
        n = x.numel()
        amaxes = [torch.linalg.vector_norm(v, ord=float("inf")).float().reshape(1) for v in xs]
        us = [torch.rand(x.shape, generator=gen, device=device) for _ in range(max(2, copies // 2))]
        q_bytes = n * 2 + n // 2 + n // 16

        def rotating(make):
            """A no-argument callable that gives each call the next input (recorded that way in the graph)."""
            it = itertools.count()
            return lambda: make(next(it))

        for rule, rnd in (("static_6", "nearest"), ("mse", "nearest"), ("abs_max", "nearest"),
                          ("static_6", "stochastic"), ("mse", "stochastic")):
            sto = rnd == "stochastic"
            b = q_bytes + (n * 4 if sto else 0)

            def call(i, validate=False, **kw):
                return quantize_triton(xs[i % copies], rule, round=rnd, uniform=us[i % len(us)] if sto else None,
                                       validate=validate, amax=None if validate else amaxes[i % copies], **kw)

            t = time_graph(rotating(call))
            record(name, rows, cols, "quantize_kernel", t, b, rule=rule, round=rnd)
            if rule != "abs_max":
                t = time_cuda(rotating(lambda i: call(i, validate=True)))
                record(name, rows, cols, "quantize_call_validated", t, b, rule=rule, round=rnd)
            if sweep and not sto:
                for br, bc, nw, tiles in TILES:
                    if (cols + 63) // 64 * 64 % bc:
                        continue
                    t = time_graph(rotating(lambda i: call(i, block_rows=br, block_cols=bc, num_warps=nw, tiles=tiles)))
                    record(name, rows, cols, "quantize_kernel_sweep", t, q_bytes, rule=rule, block=[br, bc, nw, tiles])
        qs = [quantize_triton(v, "mse") for v in xs]
        d_bytes = n // 2 + n // 16 + n * 2
        for dt in (torch.bfloat16, torch.float32):
            b = d_bytes + (n * 2 if dt == torch.float32 else 0)
            t = time_graph(rotating(lambda i: dequantize_triton(qs[i % copies], dt)))
            record(name, rows, cols, f"dequantize_{str(dt)[6:]}", t, b)
            if sweep and dt == torch.bfloat16:
                for br, bc, nw, _ in TILES:
                    if (cols + 63) // 64 * 64 % bc:
                        continue
                    t = time_graph(rotating(lambda i: dequantize_triton(qs[i % copies], dt, block_rows=br,
                                                                        block_cols=bc, num_warps=nw)))
                    record(name, rows, cols, "dequantize_sweep", t, d_bytes, block=[br, bc, nw])
        # for scale: the pure-PyTorch reference on the same input
        t = time_cuda(lambda: nv.quantize(x, "mse"), reps=2, repeats=3)
        record(name, rows, cols, "reference_quantize_torch", t, q_bytes, rule="mse")
    return out


def summary(perf: list[dict]) -> str:
    """One line per timed row: shape, op, rule/round/block, microseconds, fraction of the copy."""
    lines = []
    for r in perf:
        tag = " ".join(str(r[k]) for k in ("rule", "round", "block") if k in r)
        lines.append(f"{r['shape_name']:<11} {r['op']:<26} {tag:<24} {r['seconds'] * 1e6:9.1f} us "
                     f"{r['fraction_of_copy']:.3f}")
    return "\n".join(lines)


def main() -> int:
    """Run the checks and timings; exit code 1 if any bit mismatch was found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-shape sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        logger.error("CUDA is not available; this benchmark needs a GPU")
        return 2
    import triton

    device = torch.device("cuda")
    t0 = time.time()
    exact = check_exactness(device)
    n_ok = sum(r["exact"] for r in exact)
    logger.info("exactness: %d/%d cases exact (%.1f s)", n_ok, len(exact), time.time() - t0)
    copy_bw = copy_bandwidth(device)
    logger.info("device-to-device copy: %.1f GB/s", copy_bw / 1e9)
    perf = throughput(device, copy_bw, sweep=not args.no_sweep)
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": commit(),
        "all_exact": all(r["exact"] for r in exact),
        "n_exact_cases": len(exact),
        "mismatches": [r for r in exact if not r["exact"]],
        "copy_GBps": copy_bw / 1e9,
        "throughput": perf,
        "seconds_total": time.time() - t0,
    }
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    sys.stdout.write(summary(perf) + "\n")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "nvfp4_kernels.json"
        path.write_text(text)
        logger.info("wrote %s", path)
    return 0 if report["all_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
