"""Launch-parameter sweep of the NVFP4 quantize kernel on CUDA: block rows x tiles per program x
prefetch (warps = block rows / 4, so that each thread holds one block of a tile),
for nearest and stochastic rounding with a static and a four-over-six rule, on the three shapes of
`nvfp4_kernels.py` (inputs read from HBM, device time by CUDA-graph replay). `_LAUNCH_DEFAULTS` in
`longlive.quant.nvfp4_triton` holds the best of each (rule kind, rounding). Prints one line per launch;
writes $OUT/nvfp4_launch_sweep.json when OUT is set.

    python benchmarks/nvfp4_launch_sweep.py      # about 2 minutes on an H200
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nvfp4_kernels import BENCH_SHAPES, L2_COLD_BYTES, _data, copy_bandwidth, time_graph  # noqa: E402
from report import commit  # noqa: E402

from longlive.quant.nvfp4_triton import quantize_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-rows", type=int, nargs="+", default=[8, 16, 32], choices=[8, 16, 32],
                        help="block rows to try (warps = rows / 4)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    rows_out = []
    for name, rows, cols in BENCH_SHAPES:
        copies = max(2, -(-L2_COLD_BYTES // (rows * cols * 2)))
        xs = [_data(rows, cols, "gauss", torch.bfloat16, gen) for _ in range(copies)]
        amaxes = [v.abs().amax().float().reshape(1) for v in xs]
        us = [torch.rand(rows, cols, generator=gen, device=dev) for _ in range(max(2, copies // 2))]
        n = rows * cols
        for rule, rnd in (("static_6", "nearest"), ("mse", "nearest"), ("static_6", "stochastic"), ("mse", "stochastic")):
            sto = rnd == "stochastic"
            nbytes = n * 2 + n // 2 + n // 16 + (n * 4 if sto else 0)
            for prefetch, tiles, block_rows in itertools.product((False, True), (1, 2, 4, 8), args.block_rows):
                warps = block_rows // 4
                if block_rows * tiles > 128:
                    continue
                it = itertools.count()

                def call():
                    i = next(it)
                    return quantize_triton(xs[i % copies], rule, round=rnd, uniform=us[i % len(us)] if sto else None,
                                           validate=False, amax=amaxes[i % copies], tiles=tiles, num_warps=warps,
                                           prefetch=prefetch, block_rows=block_rows)

                t = time_graph(call)
                rows_out.append(dict(shape=name, rule=rule, round=rnd, prefetch=prefetch, block_rows=block_rows,
                                     tiles=tiles, warps=warps,
                                     us=t * 1e6, frac=nbytes / t / bw))
                print(f"{name:10s} {rule:8s} {rnd:10s} prefetch={int(prefetch)} rows={block_rows} tiles={tiles} warps={warps} "
                      f"{t * 1e6:7.1f} us {nbytes / t / bw:.3f}", flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "nvfp4_launch_sweep.json", "w") as f:
            json.dump({"commit": commit(), "copy_GBps": bw / 1e9, "device": torch.cuda.get_device_name(dev),
                       "torch": torch.__version__,
                       "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
