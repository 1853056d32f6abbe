"""Row-wise FP8 W8A8 linears vs BF16 on CUDA at the 5B DiT's shapes for one chunk (M = 7040 tokens).

Per shape: BF16 `F.linear`; `Float8Linear` eager (per-call activation quantization included); the bare
`torch._scaled_mm` on a pre-quantized activation (fast accumulation on and off); `Float8Linear` under
`torch.compile` (Inductor fuses the activation quantization). CUDA events, median of --iters runs after
--warmup, no L2 flush. Reports ms, TFLOP/s, speedup over BF16 and the error against an fp32 reference.
Prints JSON; also writes $OUT/fp8_gemm.json when OUT is set. Needs compute capability >= 8.9.

    python benchmarks/fp8_gemm.py               # about a minute on an H200, mostly compilation
    python benchmarks/fp8_gemm.py --no-compile  # eager only
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from report import commit, emit  # noqa: E402
from longlive.quant.fp8 import Float8Linear, quantize_rowwise  # noqa: E402

logger = logging.getLogger("fp8_gemm")

# (name, K = in_features, N = out_features) of the 5B DiT block linears (spec 1.1)
SHAPES = [("attn_qkvo", 3072, 3072), ("ffn.0", 3072, 14336), ("ffn.2", 14336, 3072)]
CHUNK_TOKENS = 7040  # one chunk of the 5B model


def _time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of `fn` over `iters` calls, each bracketed by its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(name: str, m: int, k: int, n: int, warmup: int, iters: int, compile_: bool) -> dict:
    """Time every variant at one [m, k] x [k, n] shape; returns one JSON-ready record."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    linear = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    bound = math.sqrt(6.0 / (k + n))  # the Wan block initialisation
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(m, k, device=dev, generator=gen).bfloat16()
    w, b = linear.weight, linear.bias
    layer = Float8Linear.from_linear(linear, fast_accum=True)
    layer_exact = Float8Linear.from_linear(linear, fast_accum=False)
    x8, sx = quantize_rowwise(x)
    w8t, sw = layer.weight_fp8.t(), layer.weight_scale

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "bf16_linear": lambda: F.linear(x, w, b),
        "fp8_linear": lambda: layer(x),
        "fp8_linear_no_fast_accum": lambda: layer_exact(x),
        "scaled_mm_only": lambda: torch._scaled_mm(x8, w8t, sx, sw, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True),
        "scaled_mm_only_no_fast_accum": lambda: torch._scaled_mm(x8, w8t, sx, sw, bias=b, out_dtype=torch.bfloat16,
                                                                  use_fast_accum=False),
    }
    record: dict = {"name": name, "M": m, "K": k, "N": n, "GFLOP": 2 * m * k * n / 1e9}
    if compile_:
        compiled = torch.compile(layer, fullgraph=True)
        t0 = time.time()
        compiled(x)
        torch.cuda.synchronize()
        record["compile_seconds"] = time.time() - t0
        variants["fp8_linear_compiled"] = lambda: compiled(x)

    ref = F.linear(x.float(), w.float(), b.float())
    flop = 2 * m * k * n
    for key, fn in variants.items():
        out = fn()
        ms = _time_ms(fn, warmup, iters)
        record[key] = {"ms": ms, "TFLOPs": flop / (ms * 1e-3) / 1e12, "rel_err_vs_fp32": _rel(out, ref)}
    base = record["bf16_linear"]["ms"]
    for key in variants:
        record[key]["speedup_vs_bf16"] = base / record[key]["ms"]
    record["activation_quant_ms_eager"] = record["fp8_linear"]["ms"] - record["scaled_mm_only"]["ms"]
    if compile_:
        record["activation_quant_ms_compiled"] = record["fp8_linear_compiled"]["ms"] - record["scaled_mm_only"]["ms"]
        record["compiled_vs_eager_rel_diff"] = _rel(variants["fp8_linear_compiled"](), layer(x))
    logger.info("%s [%d x %d x %d]: bf16 %.3f ms, fp8 eager %.3f ms, _scaled_mm %.3f ms%s", name, m, k, n, base,
                record["fp8_linear"]["ms"], record["scaled_mm_only"]["ms"],
                f", fp8 compiled {record['fp8_linear_compiled']['ms']:.3f} ms" if compile_ else "")
    return record


def main() -> int:
    """Run all shapes; exit code 2 without a CUDA GPU of compute capability >= 8.9."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=CHUNK_TOKENS, help="M, the token rows (default: one 5B chunk)")
    parser.add_argument("--iters", type=int, default=100, help="timed runs per variant (median reported; >= 50)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.iters < 50:
        parser.error("--iters must be at least 50")
    if not torch.cuda.is_available():
        logger.error("CUDA is not available; this benchmark needs a GPU")
        return 2
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        logger.error("compute capability %d.%d has no FP8 tensor cores (needs >= 8.9)", *cap)
        return 2
    t0 = time.time()
    with torch.inference_mode():
        results = [bench_shape(name, args.tokens, k, n, args.warmup, args.iters, not args.no_compile)
                   for name, k, n in SHAPES]
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(),
        "capability": f"{cap[0]}.{cap[1]}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit(),
        "timing": f"CUDA events, median of {args.iters} runs after {args.warmup} warm-up runs, no L2 flush",
        "results": results,
        "seconds_total": time.time() - t0,
    }
    emit(report, "fp8_gemm.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
