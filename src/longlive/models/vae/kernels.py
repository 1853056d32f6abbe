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


def _rows_layout(t: torch.Tensor) -> tuple[int, int] | None:
    """(frames B*T, row stride between frames) when every frame of the channels-last 5-D `t [B, C, T, H, W]`
    is a packed `[H*W, C]` block (a whole tensor, or a slice of rows of one), else None."""
    b, c, n, h, w = t.shape
    st = t.stride()
    if st[1] != 1 or (w > 1 and st[4] != c) or (h > 1 and st[3] != w * c) or (b > 1 and st[0] != n * st[2]):
        return None
    return b * n, st[2]


if triton is not None:

    @triton.jit
    def _rms_silu_kernel(x_ptr, bias_ptr, gamma_ptr, out_ptr, rows, hw, x_frame, out_frame, scale, C: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < C)
        frame = (r // hw).to(tl.int64)
        pix = (r % hw) * C + c
        x = tl.load(x_ptr + frame * x_frame + pix, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # the convolution's bias, added (and rounded) as its separate add_ would
            x = _bf16(x + tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32))
        norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        y = _bf16(tl.math.div_rn(x, tl.maximum(norm, 1e-12)))  # F.normalize, then .to(bf16)
        y = _bf16(y * scale)
        g = tl.load(gamma_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = _bf16(y * g)
        y = _bf16(tl.math.div_rn(y, 1.0 + tl.exp(-y)))  # SiLU as PyTorch computes it, in fp32
        tl.store(out_ptr + frame * out_frame + pix, y.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _bias_add_kernel(x_ptr, bias_ptr, h_ptr, out_ptr, rows, C: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < C)
        offs = r.to(tl.int64) * C + c
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = _bf16(x + tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32))  # the convolution's add_
        y = _bf16(x + tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32))  # then the residual add
        tl.store(out_ptr + offs, y.to(tl.bfloat16), mask=mask)


def _blocks(c: int) -> tuple[int, int, int]:
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, min(64, 8192 // block_c)), 8 if block_c >= 512 else 4


def rms_silu_channels_last(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """`layers.rms_silu(x + bias, gamma, scale)` for a bfloat16 channels-last `x [B, C, T, H, W]` (see
    `supported`); `bias` (per channel, optional) is a convolution's bias added as its own `add_` would.
    `out`: where to write (default a new channels-last tensor), e.g. a slice of rows of a larger one."""
    if not supported(x):
        raise ValueError(f"rms_silu_channels_last: needs a bfloat16 channels-last 5-D tensor with at most "
                         f"{_MAX_CHANNELS} channels on CUDA; got {tuple(x.shape)} {x.dtype} on {x.device}")
    c = x.shape[1]
    if gamma.numel() != c or (bias is not None and bias.numel() != c):
        raise ValueError(f"rms_silu_channels_last: gamma ({gamma.numel()}) and bias "
                         f"({None if bias is None else bias.numel()}) need one entry per channel ({c})")
    if out is None:
        out = torch.empty_like(x)  # channels-last, like x
    layout = _rows_layout(out) if out.shape == x.shape and out.dtype == x.dtype and out.device == x.device else None
    if layout is None:
        raise ValueError(f"rms_silu_channels_last: out must be a bfloat16 channels-last {tuple(x.shape)} tensor whose "
                         f"frames are packed rows (a slice of rows is fine); got {tuple(out.shape)} strides {out.stride()}")
    frames, out_frame = layout
    hw = x.shape[3] * x.shape[4]
    rows = frames * hw
    if rows == 0:
        return out
    block_c, block_r, warps = _blocks(c)
    _rms_silu_kernel[(triton.cdiv(rows, block_r),)](
        x, gamma.reshape(c).contiguous() if bias is None else bias.reshape(c).contiguous(),
        gamma.reshape(c).contiguous(), out, rows, hw, x.stride(2), out_frame, float(scale), C=c,
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out


def bias_residual_add(x: torch.Tensor, bias: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`(x + bias) + h` in bfloat16 with the rounding of the eager ops (a convolution's bias `add_`, then the
    residual addition) in one pass, written into `x` (bfloat16 channels-last 5-D `x` and `h`, see `supported`)."""
    if not (supported(x) and supported(h)) or h.shape != x.shape or bias.numel() != x.shape[1]:
        raise ValueError(f"bias_residual_add: needs bfloat16 channels-last 5-D x and h of one shape and a bias per "
                         f"channel; got {tuple(x.shape)}, {tuple(h.shape)}, bias {bias.numel()}")
    c = x.shape[1]
    rows = x.numel() // c
    if rows:
        block_c, block_r, warps = _blocks(c)
        _bias_add_kernel[(triton.cdiv(rows, block_r),)](x, bias.reshape(c).contiguous(), h, x, rows, C=c,
                                                        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return x
