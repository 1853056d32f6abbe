"""SASS instructions per element of the NVFP4 quantize kernel, compiled for sm_90 without a GPU.

Compiles `_quantize_kernel` ahead of time (Triton's bundled ptxas, bfloat16 input, all sizes divisible by
16 as at a real launch of the 5B shapes) and counts the instructions up to the first EXIT (the main path;
the division slow path after it never runs for finite inputs), split by pipe: the integer/logic pipe
issues at half rate on Hopper, so max(2 x ALU, total) bounds the issue cycles per element.

    python benchmarks/nvfp4_sass.py                  # the default launches of each rule kind and rounding
    python benchmarks/nvfp4_sass.py --rows 16 --tiles 4 --warps 4
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longlive.quant import nvfp4_triton as nt  # noqa: E402

ALU = {"FMNMX", "LOP3", "LEA", "SHF", "PRMT", "IADD3", "ISETP", "FSETP", "SEL", "FSEL", "SGXT", "VIMNMX",
       "IMNMX", "P2R", "R2P"}
"""Opcodes issued to the integer/logic (ALU) pipe; FADD/FMUL/FFMA/IMAD go to the FMA pipe."""


def compile_sm90(rule: str, stochastic: bool, rows: int, tiles: int, warps: int, prefetch: bool,
                 maxnreg: int | None = None) -> bytes:
    kern = nt._quantize_kernel
    sig = {"x_ptr": "*i32", "u_ptr": "*i64", "words_ptr": "*i64", "scales_ptr": "*u8", "amax_ptr": "*fp32",
           "rows": "i32", "cols": "i32", "stride_x": "i32", "stride_u": "i32", "words_per_row": "i32",
           "scale_cols": "i32"}
    consts = {"BLOCK_R": rows, "BLOCK_C": 128, "TILES": tiles, "RULE": nt._RULE_IDS[rule], "STOCHASTIC": stochastic,
              "E2M1_MAX": 6.0, "E4M3_MAX": 448.0, "PREFETCH": prefetch, "KIND": 0, "EVEN": True}
    sig.update({k: "constexpr" for k in consts})
    idx = kern.arg_names.index
    attrs = {(idx(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v != "constexpr"}
    src = ASTSource(fn=kern, signature=sig, constexprs={(idx(k),): v for k, v in consts.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={
        "num_warps": warps, **nt._LAUNCH_OPTIONS, **({"maxnreg": maxnreg} if maxnreg else {})})
    return compiled.asm["cubin"]


def main_path_opcodes(cubin: bytes) -> list[str]:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([str(cuobjdump), "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("/*") or "*/" not in line:
            continue
        body = line.split("*/", 1)[1].strip()
        if not body or body.startswith("/*"):
            continue
        words = body.split()
        op = (words[1] if words[0].startswith("@") else words[0]).rstrip(";").split(".")[0]
        if op == "EXIT":
            break
        ops.append(op)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, help="tile rows (default: each launch default)")
    parser.add_argument("--tiles", type=int)
    parser.add_argument("--warps", type=int)
    parser.add_argument("--prefetch", type=int, choices=[0, 1])
    args = parser.parse_args()
    for (four_six, sto), (d_rows, d_tiles, d_prefetch, maxnreg) in nt._LAUNCH_DEFAULTS.items():
        rows, tiles = args.rows or d_rows, args.tiles or d_tiles
        warps = args.warps or max(1, rows * 128 // 512)
        prefetch = d_prefetch if args.prefetch is None else bool(args.prefetch)
        rule = "mse" if four_six else "static_6"
        ops = main_path_opcodes(compile_sm90(rule, sto, rows, tiles, warps, prefetch, maxnreg))
        per_thread = rows * 128 * tiles / (32 * warps)  # elements each thread quantizes
        counts = collections.Counter(ops)
        alu = sum(v for k, v in counts.items() if k in ALU)
        print(f"{rule:8s} {'stochastic' if sto else 'nearest':10s} rows={rows} tiles={tiles} warps={warps} "
              f"prefetch={int(prefetch)}: {len(ops) / per_thread:5.2f} SASS per element, ALU {alu / per_thread:5.2f}, "
              f"bound {max(2 * alu, len(ops)) / per_thread:5.2f}  top: "
              + ", ".join(f"{k} {v / per_thread:.2f}" for k, v in counts.most_common(6)))


if __name__ == "__main__":
    main()
