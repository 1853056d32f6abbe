"""A Triton kernel for the decoder's RMS norm + SiLU on channels-last activations.

In a channels-last (NDHWC) tensor the channels of one voxel are contiguous, so `SiLU(RMSNorm(x))`
over channels is a row-wise operation on a `[voxels, C]` matrix: one read and one write of `x`,
where the eager ops (`layers.rms_silu`: fp32 copy, norm, division, cast, two scalings, SiLU) make
about eight passes over activations of up to 32 frames at full resolution. The kernel follows the
eager ops step by step, rounding to bfloat16 where they do (after the division, each scaling and the
SiLU), with IEEE division; only the norm's summation order and `exp` differ (checked against the
eager ops under the Triton interpreter on CPU and on the GPU). A plain Triton launch, not
`torch.compile`, so it is safe in the background decode thread while the DiT compiles.
"""
from __future__ import annotations

import os

import torch

try:  # CPU-only installs may lack triton: `supported()` is then False and the eager ops run
    import triton
    import triton.language as tl

    from longlive.triton_helpers import round_bf16 as _bf16
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_MAX_CHANNELS = 4096


def supported(x: torch.Tensor) -> bool:
    """Whether `rms_silu_channels_last` takes `x`: bfloat16, 5-D channels-last, CUDA (or CPU under the
    Triton interpreter)."""
    if triton is None or x.dtype != torch.bfloat16 or x.dim() != 5 or x.shape[1] > _MAX_CHANNELS:
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return x.is_contiguous(memory_format=torch.channels_last_3d)


if triton is not None:

    @triton.jit
    def _rms_silu_kernel(x_ptr, gamma_ptr, out_ptr, rows, scale, C: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < C)
        x = tl.load(x_ptr + r * C + c, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        y = _bf16(tl.math.div_rn(x, tl.maximum(norm, 1e-12)))  # F.normalize, then .to(bf16)
        y = _bf16(y * scale)
        g = tl.load(gamma_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = _bf16(y * g)
        y = _bf16(tl.math.div_rn(y, 1.0 + tl.exp(-y)))  # SiLU as PyTorch computes it, in fp32
        tl.store(out_ptr + r * C + c, y.to(tl.bfloat16), mask=mask)


def rms_silu_channels_last(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """`layers.rms_silu(x, gamma, scale)` for a bfloat16 channels-last `x [B, C, T, H, W]` (see `supported`)."""
    if not supported(x):
        raise ValueError(f"rms_silu_channels_last: needs a bfloat16 channels-last 5-D tensor with at most "
                         f"{_MAX_CHANNELS} channels on CUDA; got {tuple(x.shape)} {x.dtype} on {x.device}")
    c = x.shape[1]
    if gamma.numel() != c:
        raise ValueError(f"rms_silu_channels_last: gamma has {gamma.numel()} entries for {c} channels")
    out = torch.empty_like(x)  # channels-last, like x
    rows = x.numel() // c
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 8192 // block_c))
    _rms_silu_kernel[(triton.cdiv(rows, block_r),)](
        x, gamma.reshape(c).contiguous(), out, rows, float(scale), C=c, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=8 if block_c >= 512 else 4)
    return out
