"""NVFP4 Triton kernels on CUDA: bit-exactness against the reference, then throughput.

Throughput is reported as logical bytes read + written per second (input once, outputs once) and
as a fraction of a device-to-device copy measured in the same run. "kernel" figures replay the
call (amax given, no validation: one kernel launch) from a CUDA graph, cycling through enough
input copies that they do not fit in L2; "call" figures time the eager Python call (host overhead
included); "validated" adds the amax pass and the host sync of the NaN/inf check. A compact sweep
of tile / warp configurations is timed the same way, each checked bit for bit first.
Prints a summary table, then JSON; also writes $OUT/nvfp4_kernels.json when OUT is set.

    python benchmarks/nvfp4_kernels.py             # checks + timings + sweep (under 3 minutes on an H200)
    python benchmarks/nvfp4_kernels.py --no-sweep  # default configurations only
    python benchmarks/nvfp4_kernels.py --sass      # SASS instructions per element, compiled offline (no GPU)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longlive.quant import nvfp4 as nv  # noqa: E402
from longlive.quant.nvfp4_triton import (  # noqa: E402
    _device_sms,
    _resolve_config,
    _row_tiles,
    dequantize_triton,
    quantize_triton,
    verify_conversions,
)

logger = logging.getLogger("nvfp4_kernels")

RULES = ["static_6", "static_4", "mse", "mae", "abs_max"]
# (name, rows, cols): a 5B FFN weight, one KV-cache chunk of one layer (spec 7.7), one chunk's activations
BENCH_SHAPES = [("ffn_weight", 3072, 14336), ("kv_chunk", 168960, 128), ("activation", 7040, 3072)]
H200_SMS = 132  # --sass: default row tiles as on an H200
ROTATE_BYTES = 256 * 2**20  # inputs cycled per graph replay: several times the 50 MB L2 of an H100/H200

QUANT_SWEEP = [
    dict(row_tiles=4),
    dict(block_rows=16, block_cols=128, num_warps=4, row_tiles=4),
    dict(block_rows=32, block_cols=128, num_warps=4, row_tiles=1),
    dict(block_rows=32, block_cols=128, num_warps=8, row_tiles=4),
    dict(block_rows=64, block_cols=128, num_warps=4, row_tiles=2),
    dict(block_rows=32, block_cols=128, num_warps=4, row_tiles=4, split_blocks=True),
    dict(block_rows=16, block_cols=256, num_warps=4, row_tiles=4),
    dict(hw_convert=False),
]
"""Alternatives to the default quantize configuration (missing keys = defaults)."""
DEQUANT_SWEEP = [
    dict(row_tiles=4),
    dict(block_rows=64, block_cols=128, num_warps=4, row_tiles=2),
    dict(block_rows=16, block_cols=128, num_warps=4, row_tiles=4),
    dict(block_rows=64, block_cols=128, num_warps=8, row_tiles=4),
    dict(block_rows=32, block_cols=256, num_warps=4, row_tiles=4),
    dict(block_rows=32, block_cols=128, num_warps=4, row_tiles=1),
    dict(split_blocks=False),
    dict(hw_convert=False),
]
"""Alternatives to the default dequantize configuration."""


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


# full matrix (5 rules x 2 roundings x 2 dtypes x 2 data kinds) on these shapes ...
EXACT_SHAPES = [(130, 200), (1000, 3072), (2048, 128)]
# ... and bf16 static_6 / mse nearest (both data kinds) on these
EXACT_SHAPES_SMALL_MATRIX = [(1, 16), (4096, 4096)]


def check_exactness(device: torch.device) -> list[dict]:
    """Compare kernels with the reference (on the same device) over rules, roundings, shapes, dtypes."""
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    plans = [(s, RULES, ("nearest", "stochastic"), (torch.bfloat16, torch.float32)) for s in EXACT_SHAPES]
    plans += [(s, ["static_6", "mse"], ("nearest",), (torch.bfloat16,)) for s in EXACT_SHAPES_SMALL_MATRIX]
    for (rows, cols), rules, roundings, dtypes in plans:
        for kind in ("gauss", "wide"):
            for in_dtype in dtypes:
                x = _data(rows, cols, kind, in_dtype, gen)
                for rule in rules:
                    for rnd in roundings:
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
    # the bit-arithmetic twins of the hardware conversions, through the whole kernels
    x = _data(1000, 3072, "wide", torch.bfloat16, gen)
    for rule in ("static_6", "mse"):
        qr = nv.quantize(x, rule)
        qt = quantize_triton(x, rule, hw_convert=False)
        rec = {"check": "software_conversions", "rule": rule, "values_diff": _same(qt.values, qr.values),
               "scales_diff": _same(qt.scale_factors, qr.scale_factors),
               "dequant_bfloat16_diff": _same(dequantize_triton(qr, torch.bfloat16, hw_convert=False),
                                              nv.dequantize(qr, torch.bfloat16))}
        rec["exact"] = all(v == 0 for k, v in rec.items() if k.endswith("_diff"))
        results.append(rec)
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
    """Median seconds per eager call over `repeats` timed loops of `reps` calls (after warm-up)."""
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


def time_graph(fns: list[Callable[[], object]], reps: int = 12, repeats: int = 5) -> float:
    """Median seconds per call of ``fns`` (cycled) replayed from one CUDA graph: GPU time only."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fns[0]()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(per_call)


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / t


def _config_of(dequant: bool, rows: int, cols: int, opts: dict, device: torch.device | None = None) -> dict:
    """The configuration a call with ``opts`` uses (row_tiles as the call reduces it on ``device``)."""
    prow, pcol = nv.padded_shape(rows, cols)
    cfg = _resolve_config(pcol, dequant, opts.get("block_rows"), opts.get("block_cols"), opts.get("num_warps"),
                          opts.get("row_tiles"), opts.get("split_blocks"))
    d = asdict(cfg)
    if device is not None:
        n_row_tiles = -(-rows // cfg.block_rows) if dequant else prow // cfg.block_rows
        n_col_tiles = -(-cols // cfg.block_cols) if dequant else pcol // cfg.block_cols
        d["row_tiles"] = _row_tiles(opts.get("row_tiles"), cfg.row_tiles, n_row_tiles, n_col_tiles,
                                    _device_sms(device))
    d["hw_convert"] = opts.get("hw_convert", True) is not False
    return d


class Budget:
    """Wall-clock guard: the sweep stops (and says so) once the run has used its time."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.time() + seconds
        self.skipped = 0

    def left(self) -> bool:
        return time.time() < self.deadline


def throughput(device: torch.device, copy_bw: float, sweep: bool, budget: Budget) -> list[dict]:
    """Time quantize / dequantize on realistic shapes (bf16 input, Gaussian data).

    Default configurations first (all shapes), then the sweep entries in list order across shapes,
    so that a time budget cuts the least important entries.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    out: list[dict] = []
    quant_ops = (("static_6", "nearest"), ("mse", "nearest"), ("mse", "stochastic"))

    def record(shape: tuple, **rec: object) -> None:
        name, rows, cols = shape
        t = rec.get("seconds")
        if t:
            rec["GBps"] = rec.pop("nbytes") / t / 1e9
            rec["fraction_of_copy"] = rec["GBps"] * 1e9 / copy_bw
        else:
            rec.pop("nbytes", None)
        out.append({"shape_name": name, "shape": [rows, cols], **rec})

    data = {}
    for shape in BENCH_SHAPES:
        _, rows, cols = shape
        n = rows * cols
        copies = max(2, math.ceil(ROTATE_BYTES / (n * 2)))
        xs = [_data(rows, cols, "gauss", torch.bfloat16, gen) for _ in range(copies)]
        amaxes = [torch.linalg.vector_norm(x, ord=float("inf")).float().reshape(1) for x in xs]
        u = torch.rand(rows, cols, generator=gen, device=device)
        refs = {(rule, rnd): nv.quantize(xs[0], rule, round=rnd, uniform=u if rnd == "stochastic" else None)
                for rule, rnd in quant_ops}
        qs = [quantize_triton(x, "mse", validate=False, amax=a) for x, a in zip(xs, amaxes)]
        for dt in (torch.bfloat16, torch.float32):
            refs[dt] = nv.dequantize(qs[0], dt)
        data[shape] = (xs, amaxes, u, refs, qs)

    def time_quantize(shape: tuple, rule: str, rnd: str, opts: dict) -> None:
        name, rows, cols = shape
        xs, amaxes, u, refs, _ = data[shape]
        n = rows * cols
        uu = u if rnd == "stochastic" else None
        nbytes = n * 2 + n // 2 + n // 16 + (n * 4 if uu is not None else 0)
        base = {"op": "quantize", "rule": rule, "round": rnd, "default": not opts}
        try:
            cfg = _config_of(False, rows, cols, opts, device)
        except ValueError as exc:
            record(shape, **base, config=opts, not_applicable=str(exc), nbytes=0)
            return
        try:
            qt = quantize_triton(xs[0], rule, round=rnd, uniform=uu, validate=False, amax=amaxes[0], **opts)
            ref = refs[(rule, rnd)]
            exact = _same(qt.values, ref.values) == 0 and _same(qt.scale_factors, ref.scale_factors) == 0
            fns = [lambda x=x, a=a: quantize_triton(x, rule, round=rnd, uniform=uu, validate=False, amax=a, **opts)
                   for x, a in zip(xs, amaxes)]
            record(shape, **base, timing="kernel_graph", config=cfg, exact=exact, seconds=time_graph(fns),
                   nbytes=nbytes)
        except Exception as exc:  # a configuration that does not compile or run is reported
            logger.warning("quantize %s %s %s %s failed: %s", name, rule, rnd, cfg, exc)
            record(shape, **base, config=cfg, error=f"{type(exc).__name__}: {exc}"[:500], nbytes=0)
            return
        if not opts:
            t = time_cuda(lambda: quantize_triton(xs[0], rule, round=rnd, uniform=uu, validate=False, amax=amaxes[0]))
            record(shape, **base, timing="call", config=cfg, seconds=t, nbytes=nbytes)
            t = time_cuda(lambda: quantize_triton(xs[0], rule, round=rnd, uniform=uu))
            record(shape, **base, timing="validated", config=cfg, seconds=t, nbytes=nbytes)

    def time_dequantize(shape: tuple, dt: torch.dtype, opts: dict) -> None:
        name, rows, cols = shape
        _, _, _, refs, qs = data[shape]
        n = rows * cols
        nbytes = n // 2 + n // 16 + n * dt.itemsize
        base = {"op": f"dequantize_{str(dt)[6:]}", "default": not opts}
        try:
            cfg = _config_of(True, rows, cols, opts, device)
        except ValueError as exc:
            record(shape, **base, config=opts, not_applicable=str(exc), nbytes=0)
            return
        try:
            exact = _same(dequantize_triton(qs[0], dt, **opts), refs[dt]) == 0
            fns = [lambda q=q: dequantize_triton(q, dt, **opts) for q in qs]
            record(shape, **base, timing="kernel_graph", config=cfg, exact=exact, seconds=time_graph(fns),
                   nbytes=nbytes)
        except Exception as exc:
            logger.warning("dequantize %s %s %s failed: %s", name, dt, cfg, exc)
            record(shape, **base, config=cfg, error=f"{type(exc).__name__}: {exc}"[:500], nbytes=0)
            return
        if not opts:
            t = time_cuda(lambda: dequantize_triton(qs[0], dt))
            record(shape, **base, timing="call", config=cfg, seconds=t, nbytes=nbytes)

    for shape in BENCH_SHAPES:
        for rule, rnd in quant_ops:
            time_quantize(shape, rule, rnd, {})
        for dt in (torch.bfloat16, torch.float32):
            time_dequantize(shape, dt, {})
        # for scale: the pure-PyTorch reference on the same input
        name, rows, cols = shape
        x0 = data[shape][0][0]
        t = time_cuda(lambda: nv.quantize(x0, "mse"), reps=2, repeats=3)
        record(shape, op="reference_quantize_torch", rule="mse", timing="call", seconds=t,
               nbytes=rows * cols * 2 + rows * cols // 2 + rows * cols // 16)
    if not sweep:
        return out
    for opts in QUANT_SWEEP:
        for shape in BENCH_SHAPES:
            for rule in ("static_6", "mse"):
                if budget.left():
                    time_quantize(shape, rule, "nearest", opts)
                else:
                    budget.skipped += 1
    for opts in DEQUANT_SWEEP:
        for shape in BENCH_SHAPES:
            if budget.left():
                time_dequantize(shape, torch.bfloat16, opts)
            else:
                budget.skipped += 1
    return out


def summarize(perf: list[dict]) -> tuple[str, dict]:
    """Markdown table of the default configuration and the best sweep entry per shape and op."""
    cols = [("quantize", "static_6", "nearest"), ("quantize", "mse", "nearest"), ("quantize", "mse", "stochastic"),
            ("dequantize_bfloat16", None, None), ("dequantize_float32", None, None)]
    heads = ["quantize static_6", "quantize mse (4/6)", "quantize mse + stochastic", "dequantize -> bf16",
             "dequantize -> fp32"]

    def pick(shape: str, op: str, rule: str | None, rnd: str | None, timing: str, default: bool | None) -> list:
        return [r for r in perf if r["shape_name"] == shape and r["op"] == op and r.get("rule") == rule
                and r.get("round") == rnd and r.get("timing") == timing and "fraction_of_copy" in r
                and (default is None or r["default"] == default)]

    lines = ["| tensor | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    best: dict = {}
    for shape, rows, c in BENCH_SHAPES:
        cells = []
        for op, rule, rnd in cols:
            k = pick(shape, op, rule, rnd, "kernel_graph", True)
            call = pick(shape, op, rule, rnd, "call", True)
            val = pick(shape, op, rule, rnd, "validated", True)
            cell = f"{k[0]['fraction_of_copy']:.2f}" if k else "-"
            extra = [f"{r[0]['fraction_of_copy']:.2f}" for r in (call, val) if r]
            cells.append(cell + (f" ({' / '.join(extra)})" if extra else ""))
            cands = [r for r in pick(shape, op, rule, rnd, "kernel_graph", None) if r.get("exact")]
            if cands:
                b = max(cands, key=lambda r: r["fraction_of_copy"])
                best.setdefault(shape, {})[" ".join(x for x in (op, rule, rnd) if x)] = {
                    "fraction_of_copy": round(b["fraction_of_copy"], 3), "config": b["config"],
                    "default": b["default"]}
        lines.append(f"| {shape} {rows}x{c} | " + " | ".join(cells) + " |")
    return "\n".join(lines), best


def sass_instruction_counts(arch: int = 90) -> list[dict]:
    """Instructions per element of the default kernels, compiled offline to SASS (no GPU needed).

    Uses Triton's bundled ptxas / nvdisasm; the row-tile loop body is counted ``row_tiles`` times and
    the code outside it once; the division slow path (a called subroutine) is not counted. Integer
    arguments get Triton's divisible-by-16 specialization as for the KV-chunk shape (168960 x 128),
    and row_tiles is the default an H200 would use for it.
    """
    import collections
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longlive.quant import nvfp4_triton as nt

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    rows, cols = 168960, 128
    cases = []
    for rule, stochastic in (("static_6", False), ("mse", False), ("static_6", True), ("mse", True)):
        cases.append(("quantize", rule, stochastic, 1))
    cases += [("dequantize", "mse", False, 1), ("dequantize", "mse", False, 0)]
    out = []
    for op, rule, stochastic, out_kind in cases:
        cfg = _resolve_config(cols, op == "dequantize", None, None, None, None, None)
        cfg = replace(cfg, row_tiles=_row_tiles(None, cfg.row_tiles, rows // cfg.block_rows,
                                                cols // cfg.block_cols, H200_SMS))
        e2m1_max, e4m3_max = nv.rule_maxima(rule)
        consts = dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, TILES=cfg.row_tiles,
                      R4=max(cfg.block_rows // 32, 1), E2M1_MAX=e2m1_max, E4M3_MAX=e4m3_max)
        if op == "quantize":
            fn = nt._quantize_kernel
            sig = {"x_ptr": "*i32", "u_ptr": "*i64", "values_ptr": "*u8", "scales_ptr": "*u8", "amax_ptr": "*fp32",
                   "rows": "i32", "cols_w": "i32", "stride_xw": "i32", "stride_u": "i32", "half_cols": "i32",
                   "scale_cols": "i32"}
            ints = {"rows": rows, "cols_w": cols // 2, "stride_xw": cols // 2, "stride_u": cols // 2,
                    "half_cols": cols // 2, "scale_cols": cols // 16}
            consts.update(RULE=nt._RULE_IDS[rule], STOCHASTIC=stochastic, IN_KIND=1, SPLIT=cfg.split_blocks,
                          HW_CVT=True, EVEN=True, INDEX64=False)
        else:
            fn = nt._dequantize_kernel
            sig = {"values_ptr": "*i32", "scales_ptr": "*u8", "amax_ptr": "*fp32",
                   "out_ptr": "*bf16" if out_kind == 1 else "*fp32", "rows": "i32", "cols": "i32",
                   "stride_out": "i32", "words_per_row": "i32", "scale_cols": "i32"}
            ints = {"rows": rows, "cols": cols, "stride_out": cols, "words_per_row": cols // 8,
                    "scale_cols": cols // 16}
            consts.update(OUT_KIND=out_kind, SPLIT=cfg.split_blocks, HW_CVT=True, EVEN=True, INDEX64=False)
        names = list(sig) + list(consts)
        sig.update({k: "constexpr" for k in consts})
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if t.startswith("*") or ints.get(n, 1) % 16 == 0}
        rec = {"op": op, "rule": rule,
               "round": None if op == "dequantize" else ("stochastic" if stochastic else "nearest"),
               "output": {0: "float32", 1: "bfloat16"}[out_kind] if op == "dequantize" else None,
               "config": asdict(cfg), "arch": f"sm_{arch}"}
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=dict(num_warps=cfg.num_warps, enable_fp_fusion=False))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                sass = subprocess.run([str(bindir / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                                      check=True).stdout
        except Exception as exc:  # e.g. another Triton version's compile API
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.append(rec)
            continue
        instrs, labels = [], {}
        for line in sass.splitlines():
            if re.match(r"^\s*\$?__internal", line):
                break
            m = re.match(r"^\s*(\.L_x_\d+):", line)
            if m:
                labels[m.group(1)] = len(instrs)
                continue
            m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\S*)(.*)", line)
            if m:
                instrs.append((m.group(2), m.group(4)))
        loop = None
        for i, (opname, rest) in enumerate(instrs):
            t = re.search(r"(\.L_x_\d+)", rest) if opname == "BRA" else None
            if t and labels.get(t.group(1), i) < i:
                loop = (labels[t.group(1)], i)
        counts: collections.Counter = collections.Counter()
        for i, (opname, _) in enumerate(instrs):
            counts[opname] += cfg.row_tiles if loop and loop[0] <= i <= loop[1] else 1
        elems = cfg.block_rows * cfg.block_cols * cfg.row_tiles / (32 * cfg.num_warps)
        rec["instructions_per_element"] = round(sum(counts.values()) / elems, 1)
        rec["top_opcodes_per_element"] = {k: round(v / elems, 2) for k, v in counts.most_common(12)}
        out.append(rec)
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    """Run the checks and timings; exit code 1 if any bit mismatch was found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile / warp sweep")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds after which remaining sweep entries are skipped (default 150)")
    parser.add_argument("--sass", action="store_true",
                        help="only compile the default kernels for sm_90 offline and count SASS instructions "
                             "per element (no GPU needed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.sass:
        import triton

        counts = sass_instruction_counts()
        for r in counts:
            logger.info("%s %s %s: %s instructions per element", r["op"], r["rule"], r["round"] or r["output"],
                        r.get("instructions_per_element", r.get("error")))
        sys.stdout.write(json.dumps({"command": " ".join([Path(sys.executable).name] + sys.argv),
                                     "triton": triton.__version__, "commit": _commit(), "sass": counts},
                                    indent=1) + "\n")
        return 0 if all("error" not in r for r in counts) else 1
    if not torch.cuda.is_available():
        logger.error("CUDA is not available; this benchmark needs a GPU")
        return 2
    import triton

    device = torch.device("cuda")
    t0 = time.time()
    budget = Budget(args.budget)
    phases = {}
    exact = check_exactness(device)
    n_ok = sum(r["exact"] for r in exact)
    phases["exactness"] = time.time() - t0
    logger.info("exactness: %d/%d cases exact (%.1f s)", n_ok, len(exact), phases["exactness"])
    t1 = time.time()
    conversions = verify_conversions(device)
    conv_ok = all(v == 0 for k, v in conversions.items() if k.endswith("_mismatches"))
    phases["conversions"] = time.time() - t1
    logger.info("conversion helpers vs torch on %d float32 patterns: %s (%.1f s)", conversions["values"],
                "all exact" if conv_ok else f"MISMATCHES {conversions}", phases["conversions"])
    copy_bw = copy_bandwidth(device)
    logger.info("device-to-device copy: %.1f GB/s", copy_bw / 1e9)
    t2 = time.time()
    perf = throughput(device, copy_bw, sweep=not args.no_sweep, budget=budget)
    phases["throughput"] = time.time() - t2
    table, best = summarize(perf)
    sweep_bad = [r for r in perf if r.get("exact") is False]
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
        "all_exact": all(r["exact"] for r in exact) and conv_ok and not sweep_bad,
        "n_exact_cases": len(exact),
        "mismatches": [r for r in exact if not r["exact"]] + sweep_bad,
        "conversions": conversions,
        "copy_GBps": copy_bw / 1e9,
        "summary_table": table,
        "best_configs": best,
        "sweep_skipped_for_time": budget.skipped,
        "throughput": perf,
        "phase_seconds": phases,
        "seconds_total": time.time() - t0,
    }
    logger.info("fraction of copy bandwidth, kernel only (eager call given amax / validated call):\n%s", table)
    logger.info("best exact configuration per shape and op: %s", json.dumps(best))
    if budget.skipped:
        logger.warning("%d sweep entries skipped: time budget of %.0f s reached", budget.skipped, args.budget)
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "nvfp4_kernels.json"
        path.write_text(text)
        logger.info("wrote %s", path)
    return 0 if report["all_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
