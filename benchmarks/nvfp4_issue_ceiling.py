"""Issue-rate ceiling of a 1x16 NVFP4 quantize pass on CUDA: throughput against instructions per element.

A stand-in kernel moves exactly the bytes of the real quantize kernel (bfloat16 words in, one 8-byte
word of codes and one scale byte per 16-block out), with the same loads, block max, nibble packing,
stores, tiles and launch as `longlive.quant.nvfp4_triton._quantize_kernel`, and between load and pack
runs ``--work`` float32 multiply-adds per element (runtime constants, so nothing folds; each result
feeds the packed output, so nothing is dead). Its codes are meaningless: it measures how fast *any*
kernel with that many instructions per element can go on this GPU, which bounds what a quantize rule
needing that many can reach.

For each work count it prints the SASS instructions per element (compiled for sm_90 as
`nvfp4_sass.py` counts them) and, on a GPU, the fraction of a device-to-device copy on the three 5B
shapes of `nvfp4_kernels.py` (device time by CUDA-graph replay, inputs read from HBM), and the same
for the real quantize kernel's nearest rules (static_6, mse) in the same run, to place them on the curve.

    python benchmarks/nvfp4_issue_ceiling.py --count-only   # any machine: SASS per element
    python benchmarks/nvfp4_issue_ceiling.py                # on a GPU: about a minute on an H200
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nvfp4_sass import compile_sm90, main_path_opcodes  # noqa: E402
from report import commit  # noqa: E402

from longlive.quant import nvfp4_triton as nt  # noqa: E402

ROWS, COLS, TILES, WARPS = 8, 128, 2, 2
"""The quantize kernel's nearest-rounding launch (`_LAUNCH_DEFAULTS`): 8-row tiles, 2 per program,
one 16-block per thread."""
ELEMENTS_PER_THREAD = ROWS * COLS * TILES / (32 * WARPS)


@triton.jit
def _work(v, c1, c2, WORK: tl.constexpr):
    for _ in tl.static_range(WORK):
        v = tl.fma(v, c1, c2)
    return v


@triton.jit
def _ceiling_kernel(x_ptr, words_ptr, scales_ptr, c_ptr, rows, cols, stride_x, words_per_row, scale_cols,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, WORK: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    M: tl.constexpr = BLOCK_R * NB
    c1 = tl.load(c_ptr)
    c2 = tl.load(c_ptr + 1)
    i = tl.arange(0, M)
    blk = tl.program_id(1) * NB + i % NB
    r = tl.program_id(0) * TILES * BLOCK_R + i // NB
    for _ in tl.static_range(TILES):
        ea, oa, sa = nt._load_half(x_ptr, r, blk, 0, rows, cols, stride_x, 0, True)
        eb, ob, sb = nt._load_half(x_ptr, r, blk, 1, rows, cols, stride_x, 0, True)
        bmax = tl.maximum(tl.maximum(tl.max(tl.abs(ea), axis=1), tl.max(tl.abs(oa), axis=1)),
                          tl.maximum(tl.max(tl.abs(eb), axis=1), tl.max(tl.abs(ob), axis=1)))
        ca = _work(ea, c1, c2, WORK).to(tl.int32, bitcast=True) & 7
        co = _work(oa, c1, c2, WORK).to(tl.int32, bitcast=True) & 7
        cb = _work(eb, c1, c2, WORK).to(tl.int32, bitcast=True) & 7
        cd = _work(ob, c1, c2, WORK).to(tl.int32, bitcast=True) & 7
        wa = nt._clear_negative_zeros(nt._pack_half(ca, co, sa, M))
        wb = nt._clear_negative_zeros(nt._pack_half(cb, cd, sb, M))
        word = wa.to(tl.uint32).to(tl.int64) | (wb.to(tl.int64) << 32)
        tl.store(words_ptr + r.to(tl.int64) * words_per_row + blk, word)
        code = (bmax.to(tl.int32, bitcast=True) >> 23) & 255
        tl.store(scales_ptr + nt._scale_offsets(r, blk, scale_cols), code.to(tl.uint8))
        r += BLOCK_R


def sass_per_element(work: int) -> tuple[float, collections.Counter]:
    """Main-path SASS instructions per element of the stand-in compiled for sm_90 (no GPU needed)."""
    kern = _ceiling_kernel
    sig = {"x_ptr": "*i32", "words_ptr": "*i64", "scales_ptr": "*u8", "c_ptr": "*fp32", "rows": "i32",
           "cols": "i32", "stride_x": "i32", "words_per_row": "i32", "scale_cols": "i32"}
    consts = {"BLOCK_R": ROWS, "BLOCK_C": COLS, "TILES": TILES, "WORK": work}
    sig.update({k: "constexpr" for k in consts})
    idx = kern.arg_names.index
    attrs = {(idx(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v != "constexpr"}
    src = ASTSource(fn=kern, signature=sig, constexprs={(idx(k),): v for k, v in consts.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": WARPS, **nt._LAUNCH_OPTIONS})
    ops = main_path_opcodes(compiled.asm["cubin"])
    return len(ops) / ELEMENTS_PER_THREAD, collections.Counter(ops)


def launch(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, consts: torch.Tensor, work: int) -> None:
    rows, cols = x.shape
    xw = x.view(torch.int32)
    _ceiling_kernel[(rows // (ROWS * TILES), cols // COLS)](
        xw, words.view(torch.int64), scales, consts, rows, cols, xw.stride(0), cols // 16, cols // 16,
        BLOCK_R=ROWS, BLOCK_C=COLS, TILES=TILES, WORK=work, num_warps=WARPS, **nt._LAUNCH_OPTIONS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=int, nargs="+", default=[0, 4, 8, 12, 16, 20, 24, 28, 32])
    parser.add_argument("--count-only", action="store_true", help="only the SASS counts (no GPU)")
    args = parser.parse_args()
    counts = {}
    for w in args.work:
        per_elem, ops = sass_per_element(w)
        counts[w] = per_elem
        print(f"work {w:3d}: {per_elem:6.2f} SASS per element  top: "
              + ", ".join(f"{k} {v / ELEMENTS_PER_THREAD:.2f}" for k, v in ops.most_common(5)), flush=True)
    real = {}
    for rule in ("static_6", "mse"):
        d_rows, d_tiles, d_prefetch, maxnreg = nt._LAUNCH_DEFAULTS[rule != "static_6", False]
        ops = main_path_opcodes(compile_sm90(rule, False, d_rows, d_tiles, 2, d_prefetch, maxnreg))
        real[rule] = len(ops) / (d_rows * COLS * d_tiles / 64)
        print(f"quantize {rule}: {real[rule]:6.2f} SASS per element", flush=True)
    if args.count_only:
        return 0
    from nvfp4_kernels import BENCH_SHAPES, L2_COLD_BYTES, _data, copy_bandwidth, time_graph

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    consts = torch.tensor([0.999, 1e-3], device=dev)
    rows_out = []
    print(f"copy {bw / 1e9:.0f} GB/s; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    for name, rows, cols in BENCH_SHAPES:
        copies = max(2, -(-L2_COLD_BYTES // (rows * cols * 2)))
        xs = [_data(rows, cols, "gauss", torch.bfloat16, gen) for _ in range(copies)]
        words = torch.empty(rows, cols // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(rows * cols // 16, dtype=torch.uint8, device=dev)
        n = rows * cols
        nbytes = n * 2 + n // 2 + n // 16
        amaxes = [v.abs().amax().float().reshape(1) for v in xs]
        for rule in real:
            it = itertools.count()

            def quantize():
                i = next(it)
                return nt.quantize_triton(xs[i % copies], rule, validate=False, amax=amaxes[i % copies])

            t = time_graph(quantize)
            rows_out.append({"shape_name": name, "shape": [rows, cols], "rule": rule,
                             "sass_per_element": real[rule], "seconds": t, "fraction_of_copy": nbytes / t / bw})
            print(f"{name:10s} quantize {rule:8s} ({real[rule]:5.2f} SASS/elem) {t * 1e6:7.1f} us  "
                  f"{nbytes / t / bw:.3f} of the copy", flush=True)
        for w in args.work:
            it = itertools.count()
            t = time_graph(lambda: launch(xs[next(it) % copies], words, scales, consts, w))
            rows_out.append({"shape_name": name, "shape": [rows, cols], "work": w, "sass_per_element": counts[w],
                             "seconds": t, "fraction_of_copy": nbytes / t / bw})
            print(f"{name:10s} work {w:3d} ({counts[w]:5.2f} SASS/elem) {t * 1e6:7.1f} us  "
                  f"{nbytes / t / bw:.3f} of the copy", flush=True)
    result = {"commit": commit(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "copy_GBps": bw / 1e9, "rows": rows_out}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "nvfp4_issue_ceiling.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
