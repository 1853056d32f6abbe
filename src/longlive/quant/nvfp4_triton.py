"""Triton kernels for NVFP4 quantize (1x16 blocks) and dequantize, bit-exact with the reference.

They follow the order of operations documented in :mod:`longlive.quant.nvfp4` exactly. To stay
bit-exact on every backend (GPU and the CPU interpreter) the kernels avoid conversions whose
rounding differs between them: float32 -> E4M3 and float32 -> bfloat16 are done with integer bit
operations (round-to-nearest-even), divisions use ``tl.math.div_rn`` and FMA contraction is
disabled at launch. Only features present in Triton 3.6 are used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from longlive.quant.nvfp4 import (
    BLOCK_SIZE,
    FOUR_OVER_SIX_RULES,
    NVFP4Tensor,
    check_finite,
    padded_shape,
    rule_maxima,
    tensor_scales,
)

_RULE_IDS = {"static_6": 0, "static_4": 0, "mse": 1, "mae": 2, "abs_max": 3}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# --------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _e4m3_round(p):
    """Round non-negative float32 p <= 448 to E4M3 (RNE); returns (code int32, value float32)."""
    bits = p.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    rounded = (bits + 0x7FFFF + lsb) & -1048576  # clear the low 20 mantissa bits
    code_normal = (rounded >> 20) - 960  # (biased exp - 120) << 3 | mantissa
    value_normal = rounded.to(tl.float32, bitcast=True)
    y = p * 512.0  # subnormal E4M3: multiples of 2^-9
    i = y.to(tl.int32)
    frac = y - i.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((i & 1) == 1))
    i = i + up.to(tl.int32)
    value_sub = i.to(tl.float32) * 0.001953125
    normal = p >= 0.015625
    return tl.where(normal, code_normal, i), tl.where(normal, value_normal, value_sub)


@triton.jit
def _e4m3_value(code):
    """Decode E4M3 codes (int32 0..255) to float32."""
    e = (code >> 3) & 15
    m = code & 7
    normal = ((e + 120) << 23) | (m << 20)
    value = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    return tl.where((code & 128) != 0, -value, value)


@triton.jit
def _e2m1_value(code):
    """Decode E2M1 codes (int32 0..15) to float32 (code 8 is -0.0)."""
    k = code & 7
    e = k >> 1
    m = k & 1
    normal = ((e + 126) << 23) | (m << 22)
    value = tl.where(e == 0, m.to(tl.float32) * 0.5, normal.to(tl.float32, bitcast=True))
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _bf16_bits(x):
    """bfloat16 bit pattern (int16) of finite float32 x, round-to-nearest-even by bit arithmetic."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return rounded.to(tl.int16)


@triton.jit
def _e2m1_nearest(xs):
    """Nearest E2M1 code (ties to even, saturating at 6); -0 and rounded-to-zero negatives -> 0."""
    a = tl.abs(xs)
    k = (a > 0.25).to(tl.int32)
    k += (a >= 0.75).to(tl.int32)
    k += (a > 1.25).to(tl.int32)
    k += (a >= 1.75).to(tl.int32)
    k += (a > 2.5).to(tl.int32)
    k += (a >= 3.5).to(tl.int32)
    k += (a > 5.0).to(tl.int32)
    negative = (xs < 0) & (k > 0)
    return k + negative.to(tl.int32) * 8


@triton.jit
def _e2m1_stochastic(xs, u):
    """Stochastic E2M1 code: floor(|xs|/step + u) * step, saturating at 6 (see the reference)."""
    a = tl.abs(xs)
    a = tl.where(a > 6.0, 6.0, a)
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    v = a * inv_step + u
    m = v.to(tl.int32).to(tl.float32) * step
    k = (m >= 0.5).to(tl.int32)
    k += (m >= 1.0).to(tl.int32)
    k += (m >= 1.5).to(tl.int32)
    k += (m >= 2.0).to(tl.int32)
    k += (m >= 3.0).to(tl.int32)
    k += (m >= 4.0).to(tl.int32)
    k += (m >= 6.0).to(tl.int32)
    negative = (xs < 0) & (k > 0)
    return k + negative.to(tl.int32) * 8


@triton.jit
def _candidate(xb, bmax, k, dec, u, STOCHASTIC: tl.constexpr):
    """Quantize blocks [R, NB, 16] with block scale bmax*k -> (codes, scale codes, dequantized)."""
    p = bmax * k
    p = tl.where(bmax > 0, p, 0.0)
    p = tl.where(p > 448.0, 448.0, p)
    sb_code, sb = _e4m3_round(p)
    scale = sb * dec
    normal = scale >= 1.1754943508222875e-38  # smallest normal float32
    safe = tl.where(normal, scale, 1.0)
    inv = tl.where(normal, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    xs = xb * inv[:, :, None]
    if STOCHASTIC:
        codes = _e2m1_stochastic(xs, u)
    else:
        codes = _e2m1_nearest(xs)
    deq = (_e2m1_value(codes) * sb[:, :, None]) * dec
    return codes, sb_code, deq


@triton.jit
def _tree_sum16(t, BLOCK_R: tl.constexpr, NB: tl.constexpr):
    """Sum [R, NB, 16] over the last dim as ((e0+e1)+(e2+e3))+... (same tree as the reference)."""
    a, b = tl.split(tl.reshape(t, (BLOCK_R, NB, 8, 2)))
    t = a + b
    a, b = tl.split(tl.reshape(t, (BLOCK_R, NB, 4, 2)))
    t = a + b
    a, b = tl.split(tl.reshape(t, (BLOCK_R, NB, 2, 2)))
    t = a + b
    a, b = tl.split(t)
    return a + b


@triton.jit
def _block_error(diff, RULE: tl.constexpr, BLOCK_R: tl.constexpr, NB: tl.constexpr):
    """Four-over-six block error: 1 = sum of squares, 2 = sum of abs, 3 = max abs."""
    if RULE == 1:
        err = _tree_sum16(diff * diff, BLOCK_R, NB)
    elif RULE == 2:
        err = _tree_sum16(tl.abs(diff), BLOCK_R, NB)
    else:
        err = tl.max(tl.abs(diff), axis=2)
    return err


@triton.jit
def _scale_offsets(row, scol, scale_cols):
    """Blocked (128x4 tile -> 32x16) offset of scale (row, scol), spec 7.1."""
    tile = (row // 128) * (scale_cols // 4) + scol // 4
    return (tile * 32 + row % 32) * 16 + (row % 128 // 32) * 4 + scol % 4


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _quantize_kernel(
    x_ptr, u_ptr, values_ptr, scales_ptr, k_ptr, k4_ptr, dec_ptr,
    rows, cols, stride_x, stride_u, half_cols_padded, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RULE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """One program quantizes a [BLOCK_R, BLOCK_C] tile of the padded tensor (1x16 blocks)."""
    NB: tl.constexpr = BLOCK_C // 16
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    xb = tl.reshape(x, (BLOCK_R, NB, 16))
    if STOCHASTIC:
        u = tl.load(u_ptr + r[:, None] * stride_u + c[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.reshape(u, (BLOCK_R, NB, 16))
    else:
        u = xb
    bmax = tl.max(tl.abs(xb), axis=2)
    k = tl.load(k_ptr)
    dec = tl.load(dec_ptr)
    codes, sb_code, deq = _candidate(xb, bmax, k, dec, u, STOCHASTIC)
    if RULE != 0:
        k4 = tl.load(k4_ptr)
        codes4, sb_code4, deq4 = _candidate(xb, bmax, k4, dec, u, STOCHASTIC)
        err6 = _block_error(deq - xb, RULE, BLOCK_R, NB)
        err4 = _block_error(deq4 - xb, RULE, BLOCK_R, NB)
        pick4 = err4 < err6
        codes = tl.where(pick4[:, :, None], codes4, codes)
        sb_code = tl.where(pick4, sb_code4, sb_code)
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_C // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    cc = (pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)).to(tl.int64)
    tl.store(values_ptr + r[:, None] * half_cols_padded + cc[None, :], packed)
    sc = (pid_c * NB + tl.arange(0, NB)).to(tl.int64)
    tl.store(scales_ptr + _scale_offsets(r[:, None], sc[None, :], scale_cols), sb_code.to(tl.uint8))


@triton.jit
def _dequantize_kernel(
    values_ptr, scales_ptr, dec_ptr, out_ptr,
    rows, cols, stride_out, half_cols_padded, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, OUT_KIND: tl.constexpr,
):
    """One program dequantizes a [BLOCK_R, BLOCK_C] tile: (value * block scale) * decode."""
    NB: tl.constexpr = BLOCK_C // 16
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cc = (pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)).to(tl.int64)
    row_ok = r[:, None] < rows
    b = tl.load(values_ptr + r[:, None] * half_cols_padded + cc[None, :], mask=row_ok, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_R, BLOCK_C))
    vals = tl.reshape(_e2m1_value(codes), (BLOCK_R, NB, 16))
    sc = (pid_c * NB + tl.arange(0, NB)).to(tl.int64)
    s_code = tl.load(scales_ptr + _scale_offsets(r[:, None], sc[None, :], scale_cols), mask=row_ok, other=0)
    s = _e4m3_value(s_code.to(tl.int32))
    dec = tl.load(dec_ptr)
    out = tl.reshape((vals * s[:, :, None]) * dec, (BLOCK_R, BLOCK_C))
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = row_ok & (c[None, :] < cols)
    ptrs = out_ptr + r[:, None] * stride_out + c[None, :]
    if OUT_KIND == 0:
        tl.store(ptrs, out, mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptrs, _bf16_bits(out), mask=mask)
    else:
        tl.store(ptrs, out.to(tl.float16), mask=mask)


# --------------------------------------------------------------------------------------------------
# Host wrappers


def _block_shape(padded_cols: int, block_rows: int | None, block_cols: int | None) -> tuple[int, int]:
    bc = block_cols or (128 if padded_cols % 128 == 0 else 64)
    br = block_rows or 16
    if padded_cols % bc or 128 % br or bc % 16 or bc & (bc - 1) or br & (br - 1):
        raise ValueError(
            f"block shape ({br}, {bc}) must be powers of two with 128 % rows == 0 and padded cols "
            f"{padded_cols} % cols == 0"
        )
    return br, bc


def _check_device(t: torch.Tensor) -> None:
    """CPU tensors only work under the Triton interpreter; say so instead of failing inside Triton."""
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "NVFP4 Triton kernels need a CUDA tensor (CPU tensors run only under TRITON_INTERPRET=1, "
            "set before triton is imported); use longlive.quant.nvfp4.quantize/dequantize on CPU"
        )


def quantize_triton(
    x: torch.Tensor,
    rule: str = "static_6",
    round: str = "nearest",
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
    validate: bool = True,
    amax: torch.Tensor | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> NVFP4Tensor:
    """NVFP4-quantize a 2-D tensor with 1x16 blocks; bit-identical to ``nvfp4.quantize``.

    ``validate`` rejects inf/NaN (and uniforms outside [0, 1)) at the cost of one host sync;
    with ``validate=False`` non-finite inputs give undefined codes. A caller-supplied ``amax``
    (float32, must equal max|x|, else values saturate) skips the reduction pass.
    """
    rule_maxima(rule)
    if round not in ("nearest", "stochastic"):
        raise ValueError(f"round must be 'nearest' or 'stochastic', got {round!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_triton expects a 2-D floating tensor, got {x.dtype} {tuple(x.shape)}")
    _check_device(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    prow, pcol = padded_shape(rows, cols)
    br, bc = _block_shape(pcol, block_rows, block_cols)
    if amax is None:
        amax = torch.linalg.vector_norm(x.detach(), ord=math.inf).to(torch.float32).reshape(1)
    elif amax.dtype != torch.float32 or amax.numel() != 1 or amax.device != x.device:
        raise ValueError(
            f"amax must be a 1-element float32 tensor on {x.device}, got {amax.dtype} {tuple(amax.shape)}"
        )
    else:
        amax = amax.reshape(1)
    if validate and not bool(torch.isfinite(amax).all()):
        check_finite(x)
    scales = tensor_scales(amax, rule)
    k4 = scales.block_encode_four if scales.block_encode_four is not None else scales.block_encode
    u = x  # placeholder pointer when not stochastic (never read)
    if round == "stochastic":
        if uniform is None:
            if generator is None:
                raise ValueError("stochastic rounding needs an explicit torch.Generator or a `uniform` tensor")
            uniform = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        if tuple(uniform.shape) != (rows, cols) or uniform.dtype != torch.float32 or uniform.device != x.device:
            raise ValueError(
                f"uniform must be float32 {tuple(x.shape)} on {x.device}, got {uniform.dtype} "
                f"{tuple(uniform.shape)} on {uniform.device}"
            )
        if validate and not bool(((uniform >= 0) & (uniform < 1)).all()):
            raise ValueError("stochastic rounding uniforms must lie in [0, 1)")
        u = uniform if uniform.stride(-1) == 1 else uniform.contiguous()
    values = torch.empty((prow, pcol // 2), dtype=torch.uint8, device=x.device)
    sf = torch.empty((prow * pcol // BLOCK_SIZE,), dtype=torch.uint8, device=x.device)
    grid = (prow // br, pcol // bc)
    _quantize_kernel[grid](
        x, u, values, sf, scales.block_encode, k4, scales.decode,
        rows, cols, x.stride(0), u.stride(0), pcol // 2, pcol // BLOCK_SIZE,
        BLOCK_R=br, BLOCK_C=bc, RULE=_RULE_IDS[rule], STOCHASTIC=round == "stochastic",
        **_LAUNCH_OPTIONS,
    )
    return NVFP4Tensor(
        values=values,
        scale_factors=sf.view(torch.float8_e4m3fn),
        amax=amax,
        metadata=torch.tensor([rows, cols, prow, pcol], dtype=torch.int32),
        rule=rule,
    )


def dequantize_triton(
    q: NVFP4Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> torch.Tensor:
    """Dequantize to float32 / bfloat16 / float16 [orig rows, orig cols]; bit-identical to the reference."""
    if dtype not in _OUT_KINDS:
        raise ValueError(f"dequantize_triton supports {list(_OUT_KINDS)}, got {dtype}")
    _check_device(q.values)
    rows, cols = q.shape
    prow, pcol = q.padded_shape
    br, bc = _block_shape(pcol, block_rows, block_cols)
    dec = tensor_scales(q.amax, q.rule).decode
    out = torch.empty((rows, cols), dtype=dtype, device=q.values.device)
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    _dequantize_kernel[grid](
        q.values, q.scale_factors.view(torch.uint8), dec, out_view,
        rows, cols, out.stride(0), pcol // 2, pcol // BLOCK_SIZE,
        BLOCK_R=br, BLOCK_C=bc, OUT_KIND=_OUT_KINDS[dtype],
        **_LAUNCH_OPTIONS,
    )
    return out


__all__ = ["dequantize_triton", "quantize_triton"]
