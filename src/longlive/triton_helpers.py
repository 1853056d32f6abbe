"""Triton device functions shared by the project's kernels (import only where triton is installed)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """Round finite fp32 to the nearest bfloat16 (ties to even) and return it as fp32: the `.to(bfloat16)`
    between PyTorch ops. By bit arithmetic, so that the CPU interpreter rounds as the GPU does (its own
    conversion does not round to nearest)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits(x):
    """The bfloat16 bit pattern (int16) of `round_bf16(x)`: for stores into a bfloat16 tensor viewed as int16."""
    return (round_bf16(x).to(tl.int32, bitcast=True) >> 16).to(tl.int16)
