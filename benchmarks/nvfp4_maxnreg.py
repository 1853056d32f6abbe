"""Register cap (Triton's ``maxnreg``) vs throughput of the NVFP4 quantize kernel on CUDA.

Times static_6 and mse nearest on the three shapes of `nvfp4_kernels.py` with no cap, 40 and 32
registers and three tile shapes (device time by CUDA-graph replay, inputs read from HBM); the
fraction is of a device-to-device copy in the same run. `_LAUNCH_DEFAULTS` caps the static nearest
kernel at 40 from this (docs/nvfp4.md).

    python benchmarks/nvfp4_maxnreg.py      # about 30 s on an H200
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nvfp4_kernels import BENCH_SHAPES, L2_COLD_BYTES, _data, copy_bandwidth, time_graph  # noqa: E402

from longlive.quant import nvfp4_triton as nt  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy {bw / 1e9:.0f} GB/s")
    gen = torch.Generator(device=dev).manual_seed(1)
    base_options = dict(nt._LAUNCH_OPTIONS)
    for name, rows, cols in BENCH_SHAPES:
        copies = max(2, -(-L2_COLD_BYTES // (rows * cols * 2)))
        xs = [_data(rows, cols, "gauss", torch.bfloat16, gen) for _ in range(copies)]
        amaxes = [v.abs().amax().float().reshape(1) for v in xs]
        n = rows * cols
        nbytes = n * 2 + n // 2 + n // 16
        for rule, maxnreg, (block_rows, tiles) in itertools.product(("static_6", "mse"), (None, 40, 32),
                                                                      ((8, 1), (8, 2), (16, 2))):
            # the explicit option overrides the default cap (it is passed through _LAUNCH_OPTIONS)
            nt._LAUNCH_OPTIONS = {**base_options, "maxnreg": maxnreg or 255}
            it = itertools.count()

            def call():
                i = next(it)
                return nt.quantize_triton(xs[i % copies], rule, validate=False, amax=amaxes[i % copies],
                                          block_rows=block_rows, tiles=tiles, prefetch=False)

            t = time_graph(call)
            print(f"{name:10s} {rule:8s} maxnreg={maxnreg} rows={block_rows} tiles={tiles} "
                  f"{t * 1e6:6.1f} us {nbytes / t / bw:.3f}", flush=True)
    nt._LAUNCH_OPTIONS = base_options


if __name__ == "__main__":
    main()
