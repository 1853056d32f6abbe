"""A few NVFP4 quantize launches for Nsight Compute: per 5B shape (FFN weight, KV chunk, activations),
two launches each of static_6 nearest, mse nearest and static_6 stochastic (amax given), then one dequantize.

    ncu --clock-control none --kernel-name regex:_quantize_kernel --launch-count 18 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis --section InstructionStats \\
        python3 benchmarks/nvfp4_ncu_launches.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longlive.quant.nvfp4_triton import dequantize_triton, quantize_triton  # noqa: E402

if __name__ == "__main__":
    dev = torch.device("cuda")
    for rows, cols in ((3072, 14336), (168960, 128), (7040, 3072)):
        x = torch.randn(rows, cols, device=dev).to(torch.bfloat16)
        amax = x.abs().amax().float().reshape(1)
        u = torch.rand(rows, cols, device=dev)
        for rule, rnd in (("static_6", "nearest"), ("mse", "nearest"), ("static_6", "stochastic")):
            for _ in range(2):
                q = quantize_triton(x, rule, round=rnd, amax=amax, validate=False,
                                    uniform=u if rnd == "stochastic" else None)
        dequantize_triton(q, torch.bfloat16)
    torch.cuda.synchronize()
