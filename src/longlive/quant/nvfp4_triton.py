"""Triton kernels for NVFP4 quantize (1x16 blocks) and dequantize, bit-exact with the reference.

They follow the order of operations documented in :mod:`longlive.quant.nvfp4` exactly. The kernels
are written to be memory-bound on an H100/H200, which leaves only a few dozen instructions per
element, so every per-element step is one or two machine operations:

- inputs are loaded as 32-bit (bf16/fp16) or 64-bit (fp32) words holding two consecutive elements
  (element 2j and 2j+1 of a row: exactly the pair that shares one output byte), split by a shift;
- E2M1 rounding is one float addition of a "magic" number chosen from the exponent of the scaled
  value (a power of two plus 6 ulp whose ulp is the E2M1 step there, so the FPU's
  round-to-nearest-even does the work); the code is read from the bits of the sum, the magnitude
  is the sum minus the magic number;
- E2M1 and E4M3 decoding place the code bits in a float32 pattern and multiply by a power of two
  (the float32 subnormal range makes the format's subnormals come out right);
- everything per 1x16 block (scale rounding, the one division, the four-over-six choice) is done
  once per block; the per-tensor factors are computed in the kernel from amax with IEEE divisions
  (the same ``tensor_scales`` arithmetic as the reference), so a call launches one kernel.

Conversions whose rounding differs between the GPU and the CPU interpreter (float32 -> E4M3 and
float32 -> bfloat16, see docs/nvfp4.md) have two implementations selected by the ``HW_CVT``
constexpr: the hardware conversions (``cvt.rn.satfinite.e4m3x2.f32``, ``cvt.rn.bf16.f32``; CUDA,
sm_89+) and integer/float bit arithmetic that the interpreter runs (tested bit for bit against
torch, and against the hardware path on the GPU). The division is ``tl.math.div_rn`` and FMA
contraction is disabled at launch. Only features present in Triton 3.6 are used.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longlive.quant.nvfp4 import (
    BLOCK_SIZE,
    NVFP4Tensor,
    check_finite,
    padded_shape,
    rule_maxima,
)

_RULE_IDS = {"static_6": 0, "static_4": 0, "mse": 1, "mae": 2, "abs_max": 3}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_IN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
_INT32_LIMIT = 2**31 - 2**16  # offsets at or above this use int64 indexing (margin for in-tile columns)

_MIN_NORMAL_F32 = tl.constexpr(2.0**-126)
_TWO_POW_119 = tl.constexpr(2.0**119)
_TWO_POW_120 = tl.constexpr(2.0**120)  # E4M3 bias 7 -> float32 bias 127
_TWO_POW_126 = tl.constexpr(2.0**126)  # E2M1 bias 1 -> float32 bias 127


# --------------------------------------------------------------------------------------------------
# Device helpers: element and scale coding


@triton.jit
def _e4m3_round(p):
    """Round non-negative float32 p <= 448 to E4M3 (RNE); returns (code int32, value float32).

    One float addition of M = 2^(max(e, -6) + 20), whose ulp is the E4M3 step at p's exponent e,
    rounds p; the code is the number of steps plus 8 * (binade index).
    """
    eb = tl.maximum(p.to(tl.int32, bitcast=True) & 0x7F800000, 0x3C800000)  # 2^max(e, -6)
    mb = eb + 0x0A000000  # exponent + 20
    m = mb.to(tl.float32, bitcast=True)
    y = p + m
    code = (y.to(tl.int32, bitcast=True) - mb) + ((eb >> 20) - 968)
    return code, y - m


@triton.jit
def _e4m3_round_hw(p):
    """Hardware twin of :func:`_e4m3_round` (``cvt.rn.satfinite.e4m3x2.f32``, CUDA sm_89+ only)."""
    code = p.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    return code, _e4m3_value(code)


@triton.jit
def _e4m3_value(code):
    """Decode E4M3 codes (int32 0..255) to float32 (NaN codes 0x7F/0xFF are not special-cased)."""
    bits = ((code & 0x80) << 24) | ((code & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_120


@triton.jit
def _e2m1_value(code):
    """Decode E2M1 codes (int32 0..15) to float32 (code 8 is -0.0)."""
    bits = ((code & 8) << 28) | ((code & 7) << 22)
    return bits.to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def _bf16_bits(x):
    """bfloat16 bit pattern (int16) of finite float32 x, round-to-nearest-even by bit arithmetic."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return rounded.to(tl.int16)


@triton.jit
def _e2m1_magic(a):
    """Round a in [0, 6] to the E2M1 grid: returns (y, m) with y = a + m rounded once.

    m = 2^(22 + max(e, 0)) + 6 ulp has ulp = the E2M1 step at a's exponent e (0.5 below 2, 1 in
    [2, 4), 2 from 4) and an even mantissa, so y - m is the magnitude rounded to nearest with ties
    to the even code, and :func:`_e2m1_magic_code` reads the code from y's bits.
    """
    eb = a.to(tl.int32, bitcast=True) & 0x7F800000
    m = tl.maximum(eb + 0x0B000006, 0x4A800006).to(tl.float32, bitcast=True)  # one VIADDMNMX
    return a + m, m


@triton.jit
def _e2m1_magic_code(y):
    """E2M1 magnitude code (0..7) of y from :func:`_e2m1_magic` in the low 4 bits of the result.

    y's bits are (149 + binade) << 23 | (6 + steps), so bits + (bits >> 22) = code + 304 (mod 2^23)
    with code = steps + 2 * binade and 304 = 19 * 16: the low nibble is the code (bit 3 clear), the
    higher bits are garbage.
    """
    yb = y.to(tl.int32, bitcast=True)
    return yb + (yb >> 22)


@triton.jit
def _e2m1_stochastic_magic(a, u):
    """Stochastic E2M1 magnitude code of a in [0, 6] with uniform u: floor(a/step + u), capped.

    Same arithmetic as the reference (``a * (1/step) + u`` then truncation to an integer); the sum
    can round up to the next integer, where the reference's code is that of the largest grid value
    <= the result: n + 2 * binade, capped at 4 + 2 * binade and at 7.
    """
    eb = tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, 0x3F800000)  # 2^max(e, 0)
    inv_step = (0x7F800000 - eb).to(tl.float32, bitcast=True)  # 2^(1 - max(e, 0))
    n = (a * inv_step + u).to(tl.int32)  # truncation = floor (non-negative)
    twice_binade = (eb >> 22) - 254
    return tl.minimum(n + twice_binade, tl.minimum(twice_binade + 4, 7))


@triton.jit
def _e2m1_nearest(xs):
    """Nearest E2M1 code (ties to even, saturating at 6); -0 and rounded-to-zero negatives -> 0."""
    y, m = _e2m1_magic(tl.minimum(tl.abs(xs), 6.0))
    k = _e2m1_magic_code(y) & 7
    return tl.where(xs < -0.25, k | 8, k)


@triton.jit
def _e2m1_stochastic(xs, u):
    """Stochastic E2M1 code: floor(|xs|/step + u) * step, saturating at 6 (see the reference)."""
    k = _e2m1_stochastic_magic(tl.minimum(tl.abs(xs), 6.0), u)
    return tl.where((xs < 0) & (k > 0), k | 8, k)


@triton.jit
def _block_scale(bmax, k, dec, HW_CVT: tl.constexpr):
    """Per-block scale of one candidate: (E4M3 code, E4M3 value, 1/(value*dec) or 0)."""
    p = bmax * k
    p = tl.where(bmax > 0, p, 0.0)
    p = tl.minimum(p, 448.0)
    if HW_CVT:
        sb_code, sb = _e4m3_round_hw(p)
    else:
        sb_code, sb = _e4m3_round(p)
    scale = sb * dec
    normal = scale >= _MIN_NORMAL_F32
    safe = tl.where(normal, scale, 1.0)
    inv = tl.where(normal, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    return sb_code, sb, inv


@triton.jit
def _candidate(xb, bmax, k, dec, u, STOCHASTIC: tl.constexpr):
    """Quantize blocks [R, NB, 16] with block scale bmax*k -> (codes, scale codes, dequantized).

    Kept for kernels built on these helpers; software E4M3 rounding (runs everywhere).
    """
    sb_code, sb, inv = _block_scale(bmax, k, dec, False)
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
    """Four-over-six block error of [R, NB, 16]: 1 = sum of squares, 2 = sum of abs, 3 = max abs."""
    if RULE == 1:
        err = _tree_sum16(diff * diff, BLOCK_R, NB)
    elif RULE == 2:
        err = _tree_sum16(tl.abs(diff), BLOCK_R, NB)
    else:
        err = tl.max(tl.abs(diff), axis=2)
    return err


@triton.jit
def _scale_offsets(row, scol, scale_cols):
    """Blocked (128x4 tile -> 32x16) offset of scale (row, scol), spec 7.1 (non-negative indices).

    Written with shifts and masks: Triton then assumes no contiguity along the scale columns and
    keeps the per-block layout of the computation for the byte access (no shared-memory shuffle).
    """
    tile = (row >> 7) * (scale_cols >> 2) + (scol >> 2)
    return (tile * 32 + (row & 31)) * 16 + ((row >> 5) & 3) * 4 + (scol & 3)


# --------------------------------------------------------------------------------------------------
# Device helpers of the word-based kernels: tensors [BLOCK_R, NB, W] hold W words of each block


@triton.jit
def _tile_rows(tile, BLOCK_R: tl.constexpr, R4: tl.constexpr, INDEX64: tl.constexpr):
    """Rows of row tile ``tile``, ordered (row % 32, row // 32) so adjacent rows have adjacent scale bytes.

    int64 when an offset can pass 2^31 (INDEX64), else int32 (cheaper address arithmetic).
    """
    i = tl.arange(0, BLOCK_R)
    r = tile * BLOCK_R + (i % R4) * 32 + i // R4
    if INDEX64:
        r = r.to(tl.int64)
    return r


@triton.jit
def _unpack_pair(w, IN_KIND: tl.constexpr):
    """float32 (element 2j, element 2j+1) of words holding two input elements (little endian)."""
    if IN_KIND == 0:  # float32 pairs in int64
        lo = w.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif IN_KIND == 1:  # bfloat16 pairs in int32
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:  # float16 pairs in int32
        lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_words(ptr, rows_idx, wcol, stride, n_rows, n_wcols, EVEN: tl.constexpr):
    """Load words [R, NB, W] (zeros outside the tensor)."""
    ptrs = ptr + rows_idx[:, None, None] * stride + wcol
    if EVEN:
        w = tl.load(ptrs)
    else:
        mask = (rows_idx[:, None, None] < n_rows) & (wcol < n_wcols)
        w = tl.load(ptrs, mask=mask, other=0)
    return w


@triton.jit
def _word_tree(t, BLOCK_R: tl.constexpr, NB: tl.constexpr, W: tl.constexpr):
    """Sum [R, NB, W] (W = 4 or 8 per-word partial sums) pairwise: ((w0+w1)+(w2+w3))+...

    Every level adds two terms, so the result does not depend on how a reduction orders them.
    """
    if W == 8:
        t = tl.sum(tl.reshape(t, (BLOCK_R, NB, 4, 2)), axis=3)
    t = tl.sum(tl.reshape(t, (BLOCK_R, NB, 2, 2)), axis=3)
    return tl.sum(t, axis=2)


@triton.jit
def _half_error(xlo, xhi, qlo, qhi, sb, dec, RULE: tl.constexpr, STOCHASTIC: tl.constexpr,
                BLOCK_R: tl.constexpr, NB: tl.constexpr, W: tl.constexpr):
    """Error of one candidate over the W words of every block: |d| = |(q*sb)*dec - |x||, by RULE.

    q comes from :func:`_half_candidate`: the magnitude (nearest), or the code's float32 pattern
    (stochastic), which is value * 2^-126: then (q * (sb * 2^119)) * (dec * 2^7), the same single
    rounding of value * sb * dec (see the dequantize kernel).
    """
    if STOCHASTIC:
        s = (sb * _TWO_POW_119)[:, :, None]
        f = dec * 128.0
    else:
        s = sb[:, :, None]
        f = dec
    dlo = (qlo * s) * f - tl.abs(xlo)
    dhi = (qhi * s) * f - tl.abs(xhi)
    if RULE == 1:
        err = _word_tree(dlo * dlo + dhi * dhi, BLOCK_R, NB, W)
    elif RULE == 2:
        err = _word_tree(tl.abs(dlo) + tl.abs(dhi), BLOCK_R, NB, W)
    else:
        err = tl.max(tl.maximum(tl.abs(dlo), tl.abs(dhi)), axis=2)
    return err


@triton.jit
def _half_candidate(x, inv, u, STOCHASTIC: tl.constexpr):
    """Per-element part of one candidate: (code carrier, q) of a = min(|x * inv|, 6).

    Nearest: y of :func:`_e2m1_magic` and the magnitude q = y - m. Stochastic: the code and its
    float32 pattern (value * 2^-126, see :func:`_half_error`).
    """
    a = tl.minimum(tl.abs(x * inv[:, :, None]), 6.0)
    if STOCHASTIC:
        c = _e2m1_stochastic_magic(a, u)
        q = (c << 22).to(tl.float32, bitcast=True)
    else:
        c, m = _e2m1_magic(a)
        q = c - m
    return c, q


@triton.jit
def _sign_bits(w, xlo, xhi, IN_KIND: tl.constexpr):
    """int32 with bit 3 / bit 7 set where element 2j / 2j+1 is negative; other set bits are >= bit 9."""
    if IN_KIND == 0:
        lo = xlo.to(tl.uint32, bitcast=True) >> 28
        hi = xhi.to(tl.uint32, bitcast=True) >> 24
        s = (lo & 8) | (hi & 0x80)
    else:  # sign bits 15 and 31 of the word -> 3 (and 23) and 7 (and 19): one high multiply
        s = tl.umulhi((w & -2147450880).to(tl.uint32, bitcast=True), tl.full(w.shape, 0x100100, tl.uint32))
    return s.to(tl.int32, bitcast=True)


@triton.jit
def _pack_codes(klo, khi, sign):
    """Byte of two magnitude codes (element 2j in the low nibble) with the sign of the nonzero ones.

    klo / khi carry the code in their low nibble (bit 3 clear) and garbage above; ``sign`` has bits
    3 and 7 for negative elements and garbage only from bit 9 on, which the byte store drops.
    """
    p = (klo & 15) | ((khi << 4) & -16)
    return (p | ((p + 0x77) & sign)).to(tl.uint8)


@triton.jit
def _code(c, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        k = c
    else:
        k = _e2m1_magic_code(c)
    return k


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _quantize_kernel(
    x_ptr, u_ptr, values_ptr, scales_ptr, amax_ptr,
    rows, cols_w, stride_xw, stride_u, half_cols, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, R4: tl.constexpr,
    E2M1_MAX: tl.constexpr, E4M3_MAX: tl.constexpr, RULE: tl.constexpr, STOCHASTIC: tl.constexpr,
    IN_KIND: tl.constexpr, SPLIT: tl.constexpr, HW_CVT: tl.constexpr, EVEN: tl.constexpr,
    INDEX64: tl.constexpr,
):
    """One program quantizes TILES row tiles of [BLOCK_R, BLOCK_C] of the padded tensor (1x16 blocks).

    x is read as words of two elements, a tensor [BLOCK_R, NB, 8] (8 words per block). With SPLIT
    the load is shaped [BLOCK_R, 2 NB, 4] so that a block's two 16-byte halves go to two lanes (each
    load instruction of a warp then covers contiguous bytes; per-block work is done by both lanes).
    """
    NB: tl.constexpr = BLOCK_C // 16
    # per-tensor factors, the same IEEE divisions as nvfp4.tensor_scales
    amax = tl.load(amax_ptr)
    k = tl.math.div_rn(E4M3_MAX + 0.0, amax)
    dec = tl.math.div_rn(amax, E2M1_MAX * E4M3_MAX + 0.0)
    if RULE != 0:
        k4 = tl.math.div_rn(E4M3_MAX * E2M1_MAX / 4.0, amax)
    else:
        k4 = k
    nb = tl.program_id(1) * NB + tl.arange(0, NB)
    if SPLIT:
        hb = tl.program_id(1) * (2 * NB) + tl.arange(0, 2 * NB)
        wcol = tl.reshape(hb[None, :, None] * 4 + tl.arange(0, 4)[None, None, :], (1, NB, 8))
    else:
        wcol = nb[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # word columns [1, NB, 8]
    t0 = tl.program_id(0) * TILES
    for i in range(TILES):  # the wrapper makes TILES divide the number of row tiles
        tile = t0 + i
        r = _tile_rows(tile, BLOCK_R, R4, INDEX64)
        w = _load_words(x_ptr, r, wcol, stride_xw, rows, cols_w, EVEN)
        xlo, xhi = _unpack_pair(w, IN_KIND)
        bmax = tl.max(tl.maximum(tl.abs(xlo), tl.abs(xhi)), axis=2)
        if STOCHASTIC:  # float32 uniforms read as int64 pairs, like float32 x
            ulo, uhi = _unpack_pair(_load_words(u_ptr, r, wcol, stride_u, rows, cols_w, EVEN), 0)
        else:
            ulo = xlo
            uhi = xhi
        sb_code, sb, inv = _block_scale(bmax, k, dec, HW_CVT)
        clo, qlo = _half_candidate(xlo, inv, ulo, STOCHASTIC)
        chi, qhi = _half_candidate(xhi, inv, uhi, STOCHASTIC)
        if RULE != 0:
            sb_code4, sb4, inv4 = _block_scale(bmax, k4, dec, HW_CVT)
            c4lo, q4lo = _half_candidate(xlo, inv4, ulo, STOCHASTIC)
            c4hi, q4hi = _half_candidate(xhi, inv4, uhi, STOCHASTIC)
            err6 = _half_error(xlo, xhi, qlo, qhi, sb, dec, RULE, STOCHASTIC, BLOCK_R, NB, 8)
            err4 = _half_error(xlo, xhi, q4lo, q4hi, sb4, dec, RULE, STOCHASTIC, BLOCK_R, NB, 8)
            pick4 = err4 < err6  # ties keep the max->6 candidate
            clo = tl.where(pick4[:, :, None], c4lo, clo)
            chi = tl.where(pick4[:, :, None], c4hi, chi)
            sb_code = tl.where(pick4, sb_code4, sb_code)
        packed = _pack_codes(_code(clo, STOCHASTIC), _code(chi, STOCHASTIC), _sign_bits(w, xlo, xhi, IN_KIND))
        tl.store(values_ptr + r[:, None, None] * half_cols + wcol, packed)
        tl.store(scales_ptr + _scale_offsets(r[:, None], nb[None, :], scale_cols), sb_code.to(tl.uint8))


@triton.jit
def _dequantize_kernel(
    values_ptr, scales_ptr, amax_ptr, out_ptr,
    rows, cols, stride_out, words_per_row, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, R4: tl.constexpr,
    E2M1_MAX: tl.constexpr, E4M3_MAX: tl.constexpr, OUT_KIND: tl.constexpr, SPLIT: tl.constexpr,
    HW_CVT: tl.constexpr, EVEN: tl.constexpr, INDEX64: tl.constexpr,
):
    """One program dequantizes TILES row tiles of [BLOCK_R, BLOCK_C]: (value * block scale) * decode.

    The packed values are read as int32 words of 8 codes (2 words per block). With SPLIT each lane
    handles one word and stores its 8 outputs (16 bytes for bf16/fp16: the widest store, warps
    write contiguous bytes); otherwise a lane handles a block and stores its two halves separately.
    """
    NB: tl.constexpr = BLOCK_C // 16
    amax = tl.load(amax_ptr)
    dec = tl.math.div_rn(amax, E2M1_MAX * E4M3_MAX + 0.0)
    # (value * sb) * dec with value = bits * 2^126 (bits: code in a float32 pattern, see _e2m1_value)
    # is computed as (bits * (sb * 2^119)) * (dec * 2^7): both factors are exact power-of-two
    # scalings in range (sb <= 448, dec <= FLT_MAX / 1536) and bits * sb * 2^119 = value * sb * 2^-7
    # is exact, so the one rounding is that of the reference's ``* dec``.
    dec7 = dec * 128.0
    nb = tl.program_id(1) * NB + tl.arange(0, NB)
    if SPLIT:
        # written so that Triton sees no contiguity along the two words of a block: the load then
        # gets one word per lane, the layout of the output store (no shuffle in between)
        half = (tl.arange(0, 2) * 3) & 1
    else:
        half = tl.arange(0, 2)
    wcol = nb[None, :, None] * 2 + half[None, None, :]  # [1, NB, 2]
    t0 = tl.program_id(0) * TILES
    for i in range(TILES):  # the wrapper makes TILES divide the number of row tiles
        tile = t0 + i
        r = _tile_rows(tile, BLOCK_R, R4, INDEX64)
        words = tl.load(values_ptr + r[:, None, None] * words_per_row + wcol)  # [R, NB, 2]
        if SPLIT:  # the block's scale, read by both lanes of the block
            s_code = tl.load(scales_ptr + _scale_offsets(r[:, None, None], nb[None, :, None] + 0 * half[None, None, :],
                                                          scale_cols))
            s119 = _e4m3_value(s_code.to(tl.int32)) * _TWO_POW_119  # sb * 2^119, [R, NB, 2]
            shift = 4 * tl.arange(0, 8)[None, None, None, :]
            codes = (words[:, :, :, None] >> shift) & 15  # [R, NB, 2, 8]: word-major = column order
            bits = ((codes & 8) << 28) | ((codes & 7) << 22)
            out = tl.reshape((bits.to(tl.float32, bitcast=True) * s119[:, :, :, None]) * dec7, (BLOCK_R, NB, 16))
            col = nb[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NB, 16]
            _dequant_store(out_ptr, out, r, col, rows, cols, stride_out, OUT_KIND, HW_CVT, EVEN)
        else:
            s_code = tl.load(scales_ptr + _scale_offsets(r[:, None], nb[None, :], scale_cols))
            s119 = (_e4m3_value(s_code.to(tl.int32)) * _TWO_POW_119)[:, :, None]  # sb * 2^119
            shift = 4 * tl.arange(0, 8)[None, None, :]
            col = nb[None, :, None] * 16 + tl.arange(0, 8)[None, None, :]  # first half of each block
            w0, w1 = tl.split(words)
            for h in tl.static_range(2):
                codes = ((w0 if h == 0 else w1)[:, :, None] >> shift) & 15  # [R, NB, 8]
                bits = ((codes & 8) << 28) | ((codes & 7) << 22)
                out = (bits.to(tl.float32, bitcast=True) * s119) * dec7
                _dequant_store(out_ptr, out, r, col + 8 * h, rows, cols, stride_out, OUT_KIND, HW_CVT, EVEN)


@triton.jit
def _dequant_store(out_ptr, out, r, col, rows, cols, stride_out,
                   OUT_KIND: tl.constexpr, HW_CVT: tl.constexpr, EVEN: tl.constexpr):
    """Convert float32 results [R, NB, n] to the output dtype and store them at (r, col)."""
    ptrs = out_ptr + r[:, None, None] * stride_out + col
    if OUT_KIND == 0:
        res = out
    elif OUT_KIND == 1:
        if HW_CVT:
            res = out.to(tl.bfloat16)
        else:
            res = _bf16_bits(out).to(tl.bfloat16, bitcast=True)
    else:
        res = out.to(tl.float16)
    if EVEN:
        tl.store(ptrs, res)
    else:
        tl.store(ptrs, res, mask=(r[:, None, None] < rows) & (col < cols))


# --------------------------------------------------------------------------------------------------
# Self-check of the conversion helpers (used by the tests and benchmarks/nvfp4_kernels.py)


@triton.jit
def _conversion_probe_kernel(
    x_ptr, u_ptr, e4_ptr, e4v_ptr, bf_ptr, e2_ptr, e2v_ptr, e2n_ptr, e2s_ptr, n,
    HW_CVT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per float32 x: E4M3 of min(|x|, 448), bfloat16 of x, E2M1 nearest / stochastic codes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    u = tl.load(u_ptr + offs, mask=m, other=0.0)
    p = tl.minimum(tl.abs(x), 448.0)
    if HW_CVT:
        code, val = _e4m3_round_hw(p)
        bf = x.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        code, val = _e4m3_round(p)
        bf = _bf16_bits(x)
    tl.store(e4_ptr + offs, code.to(tl.uint8), mask=m)
    tl.store(e4v_ptr + offs, val, mask=m)
    tl.store(bf_ptr + offs, bf, mask=m)
    a = tl.minimum(tl.abs(x), 6.0)
    y, mm = _e2m1_magic(a)
    tl.store(e2_ptr + offs, (_e2m1_magic_code(y) & 15).to(tl.uint8), mask=m)
    tl.store(e2v_ptr + offs, y - mm, mask=m)
    tl.store(e2n_ptr + offs, _e2m1_nearest(x).to(tl.uint8), mask=m)
    tl.store(e2s_ptr + offs, _e2m1_stochastic(x, u).to(tl.uint8), mask=m)


@triton.jit
def _decode_probe_kernel(code_ptr, e4v_ptr, e2v_ptr, BLOCK: tl.constexpr):
    """E4M3 and E2M1 (low nibble) values of the codes 0..255."""
    offs = tl.arange(0, BLOCK)
    c = tl.load(code_ptr + offs).to(tl.int32)
    tl.store(e4v_ptr + offs, _e4m3_value(c))
    tl.store(e2v_ptr + offs, _e2m1_value(c & 15))


def _bit_pattern_chunks(ranges: list[tuple[int, int]], chunk: int, device: torch.device):
    """int64 tensors of the bit patterns in ``ranges``, about ``chunk`` at a time."""
    pieces: list[torch.Tensor] = []
    size = 0
    for lo, hi in ranges:
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            pieces.append(torch.arange(start, stop, dtype=torch.int64, device=device))
            size += stop - start
            if size >= chunk:
                yield torch.cat(pieces)
                pieces, size = [], 0
    if pieces:
        yield torch.cat(pieces)


def verify_conversions(
    device: torch.device | str,
    bit_ranges: list[tuple[int, int]] | None = None,
    chunk: int = 1 << 26,
    seed: int = 0,
) -> dict[str, int]:
    """Bit-compare the kernels' rounding/decoding helpers with torch and the reference on ``device``.

    Checks float32 -> E4M3 (of min(|x|, 448)), float32 -> bfloat16, E2M1 nearest rounding (magic
    code and magnitude of min(|x|, 6), and the signed helper), stochastic E2M1 (uniforms drawn per
    value) and the E4M3 / E2M1 decoders. ``bit_ranges`` are half-open ranges of float32 bit patterns
    (as non-negative ints < 2^32); the default is all 2^32 patterns (non-finite ones are skipped).
    On CUDA sm_89+ both the hardware and the bit-arithmetic paths are checked. Returns counts:
    ``values`` checked and ``<check>_mismatches`` (all zero when exact).
    """
    from longlive.quant import nvfp4 as nv

    device = torch.device(device)
    _check_device(torch.empty(0, device=device))
    paths = [False] + ([True] if device.type == "cuda" and _use_hw_cvt(device, None) else [])
    counts: dict[str, int] = {"values": 0}
    gen = torch.Generator(device=device).manual_seed(seed)
    grid_vals = torch.tensor(nv.E2M1_VALUES, device=device)
    for bits in _bit_pattern_chunks(bit_ranges or [(0, 1 << 32)], chunk, device):
        x = (bits - (bits >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.float32)
        x = x[torch.isfinite(x)]
        n = x.numel()
        if n == 0:
            continue
        u = torch.rand(n, generator=gen, device=device)
        u[: min(n, 64)] = 1.0 - 2.0**-24  # the largest uniform: sums that round up to an integer
        p = x.abs().clamp(max=448.0)
        a = x.abs().clamp(max=6.0)
        ref = {
            "e4m3": p.to(torch.float8_e4m3fn).view(torch.uint8),
            "e4m3_value": p.to(torch.float8_e4m3fn).float().view(torch.int32),
            "bf16": x.to(torch.bfloat16).view(torch.int16),
            "e2m1": nv.round_to_e2m1_codes(a),
            "e2m1_signed": nv.round_to_e2m1_codes(x),
            "e2m1_stochastic": nv.stochastic_round_to_e2m1_codes(x, u),
        }
        ref["e2m1_value"] = grid_vals[ref["e2m1"].long()].view(torch.int32)
        counts["values"] += n
        for hw in paths:
            out = {
                "e4m3": torch.empty(n, dtype=torch.uint8, device=device),
                "e4m3_value": torch.empty(n, dtype=torch.float32, device=device),
                "bf16": torch.empty(n, dtype=torch.int16, device=device),
                "e2m1": torch.empty(n, dtype=torch.uint8, device=device),
                "e2m1_value": torch.empty(n, dtype=torch.float32, device=device),
                "e2m1_signed": torch.empty(n, dtype=torch.uint8, device=device),
                "e2m1_stochastic": torch.empty(n, dtype=torch.uint8, device=device),
            }
            block = 1024 if device.type == "cuda" else 1 << 16  # interpreter: few large programs
            _conversion_probe_kernel[(triton.cdiv(n, block),)](
                x, u, out["e4m3"], out["e4m3_value"], out["bf16"], out["e2m1"], out["e2m1_value"],
                out["e2m1_signed"], out["e2m1_stochastic"], n, HW_CVT=hw, BLOCK=block, **_LAUNCH_OPTIONS,
            )
            tag = "_hw" if hw else ""
            for key, want in ref.items():
                got = out[key].view(want.dtype) if out[key].element_size() == want.element_size() else out[key]
                counts[f"{key}{tag}_mismatches"] = counts.get(f"{key}{tag}_mismatches", 0) + int(
                    (got != want).sum()
                )
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    e4v = torch.empty(256, dtype=torch.float32, device=device)
    e2v = torch.empty(256, dtype=torch.float32, device=device)
    _decode_probe_kernel[(1,)](codes, e4v, e2v, BLOCK=256, **_LAUNCH_OPTIONS)
    want4 = codes.view(torch.float8_e4m3fn).float()
    finite = torch.isfinite(want4)
    counts["e4m3_decode_mismatches"] = int((e4v[finite].view(torch.int32) != want4[finite].view(torch.int32)).sum())
    want2 = nv.e2m1_codes_to_float(codes & 15)
    counts["e2m1_decode_mismatches"] = int((e2v.view(torch.int32) != want2.view(torch.int32)).sum())
    return counts


# --------------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class KernelConfig:
    """Tile and launch shape of one kernel call; changes speed only, never results."""

    block_rows: int
    """Rows of one tile (a power of two dividing 128)."""
    block_cols: int
    """Columns of one tile (a power of two >= 16 dividing the padded width)."""
    num_warps: int
    row_tiles: int = 1
    """Row tiles one program handles in a loop (amortises the per-program setup). A call uses the
    largest divisor of its number of row tiles that does not exceed this; left to the default, it
    is lowered further until the grid has about four waves of programs on the GPU."""
    split_blocks: bool = False
    """Spread each 16-block over two lanes instead of one (quantize: two 16-byte loads of a lane
    become one load each of two lanes; dequantize: one 8-element word and one store per lane)."""


# Defaults (padded width a multiple of 128; 64-wide tensors use block_cols 64). Chosen by reasoning
# about instruction counts and occupancy; benchmarks/nvfp4_kernels.py sweeps the alternatives.
_QUANT_DEFAULT = KernelConfig(block_rows=32, block_cols=128, num_warps=4, row_tiles=4)
_DEQUANT_DEFAULT = KernelConfig(block_rows=32, block_cols=128, num_warps=4, row_tiles=4, split_blocks=True)


def _resolve_config(
    padded_cols: int,
    dequant: bool,
    block_rows: int | None,
    block_cols: int | None,
    num_warps: int | None,
    row_tiles: int | None,
    split_blocks: bool | None,
) -> KernelConfig:
    base = _DEQUANT_DEFAULT if dequant else _QUANT_DEFAULT
    bc = block_cols or (base.block_cols if padded_cols % base.block_cols == 0 else 64)
    cfg = KernelConfig(
        block_rows or base.block_rows,
        bc,
        num_warps or base.num_warps,
        row_tiles or base.row_tiles,
        base.split_blocks if split_blocks is None else bool(split_blocks),
    )
    br, nw = cfg.block_rows, cfg.num_warps
    if (
        padded_cols % bc or 128 % br or bc < 16 or bc & (bc - 1) or br & (br - 1)
        or nw & (nw - 1) or not 1 <= nw <= 32 or cfg.row_tiles < 1
    ):
        raise ValueError(
            f"invalid NVFP4 kernel config {cfg}: block_rows must be a power of two dividing 128, "
            f"block_cols a power of two >= 16 dividing the padded width {padded_cols}, num_warps a "
            "power of two <= 32, row_tiles >= 1"
        )
    return cfg


_MIN_WAVES_PROGRAMS_PER_SM = 24
"""Default row_tiles keep at least this many programs per SM (about four waves of resident
programs), so that the last, partial wave costs little; explicit row_tiles are used as given."""


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _row_tiles(requested: int | None, default: int, n_row_tiles: int, n_col_tiles: int, sms: int | None) -> int:
    """Row tiles per program: a divisor of n_row_tiles; by default also enough programs per SM."""
    tiles = math.gcd(requested or default, n_row_tiles)
    if requested is None and sms:
        while tiles > 1 and (n_row_tiles // tiles) * n_col_tiles < _MIN_WAVES_PROGRAMS_PER_SM * sms:
            tiles = math.gcd(tiles // 2, n_row_tiles)
    return tiles


@functools.lru_cache(maxsize=None)
def _device_has_fp8_cvt(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _use_hw_cvt(device: torch.device, hw_convert: bool | None) -> bool:
    """Hardware E4M3/bf16 conversions on CUDA sm_89+ unless disabled; never under the interpreter."""
    if device.type != "cuda":
        if hw_convert:
            raise ValueError("hw_convert=True needs a CUDA tensor (the interpreter uses the bit-arithmetic path)")
        return False
    ok = _device_has_fp8_cvt(device.index if device.index is not None else torch.cuda.current_device())
    if hw_convert and not ok:
        raise ValueError("hw_convert=True needs compute capability 8.9 or newer (fp8 conversions)")
    return ok if hw_convert is None else bool(hw_convert)


def _check_device(t: torch.Tensor) -> None:
    """CPU tensors only work under the Triton interpreter; say so instead of failing inside Triton."""
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "NVFP4 Triton kernels need a CUDA tensor (CPU tensors run only under TRITON_INTERPRET=1, "
            "set before triton is imported); use longlive.quant.nvfp4.quantize/dequantize on CPU"
        )


def _as_words(t: torch.Tensor, word_dtype: torch.dtype) -> torch.Tensor:
    """View a 2-D tensor with unit last stride as words of two elements (pads one zero column if needed)."""
    if t.shape[1] % 2 or t.stride(0) % 2 or t.storage_offset() % 2:
        t = torch.nn.functional.pad(t, (0, t.shape[1] % 2)).contiguous()
    return t.view(word_dtype)


# --------------------------------------------------------------------------------------------------
# Host wrappers


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
    num_warps: int | None = None,
    row_tiles: int | None = None,
    split_blocks: bool | None = None,
    hw_convert: bool | None = None,
) -> NVFP4Tensor:
    """NVFP4-quantize a 2-D tensor with 1x16 blocks; bit-identical to ``nvfp4.quantize``.

    ``validate`` rejects inf/NaN (and uniforms outside [0, 1)) at the cost of one host sync;
    with ``validate=False`` non-finite inputs give undefined codes. A caller-supplied ``amax``
    (float32, must equal max|x|, else values saturate) skips the reduction pass. The tile options
    (see :class:`KernelConfig`) and ``hw_convert`` (hardware E4M3 conversion, default on for CUDA
    sm_89+) change speed only, never results.
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
    cfg = _resolve_config(pcol, False, block_rows, block_cols, num_warps, row_tiles, split_blocks)
    hw = _use_hw_cvt(x.device, hw_convert)
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
    if x.dtype not in _IN_KINDS:
        x = x.to(torch.float32)  # same first step as the reference (exact for fp8, RNE for fp64)
    xw = _as_words(x.detach(), torch.int64 if x.dtype == torch.float32 else torch.int32)
    u = xw  # placeholder pointer when not stochastic (never read)
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
        u = _as_words(uniform if uniform.stride(-1) == 1 else uniform.contiguous(), torch.int64)
    values = torch.empty((prow, pcol // 2), dtype=torch.uint8, device=x.device)
    sf = torch.empty((prow * pcol // BLOCK_SIZE,), dtype=torch.uint8, device=x.device)
    e2m1_max, e4m3_max = rule_maxima(rule)
    cols_w = (cols + 1) // 2
    even = rows == prow and cols == pcol  # the grid covers the padding: masks only where it exists
    n_row_tiles = prow // cfg.block_rows
    tiles = _row_tiles(row_tiles, cfg.row_tiles, n_row_tiles, pcol // cfg.block_cols, _device_sms(x.device))
    grid = (n_row_tiles // tiles, pcol // cfg.block_cols)
    _quantize_kernel[grid](
        xw, u, values, sf, amax,
        rows, cols_w, xw.stride(0), u.stride(0), pcol // 2, pcol // BLOCK_SIZE,
        BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, TILES=tiles, R4=max(cfg.block_rows // 32, 1),
        E2M1_MAX=e2m1_max, E4M3_MAX=e4m3_max, RULE=_RULE_IDS[rule], STOCHASTIC=round == "stochastic",
        IN_KIND=_IN_KINDS[x.dtype], SPLIT=cfg.split_blocks, HW_CVT=hw, EVEN=even,
        INDEX64=max(prow * max(xw.stride(0), u.stride(0), pcol // 2), prow * pcol // BLOCK_SIZE) >= _INT32_LIMIT,
        num_warps=cfg.num_warps, **_LAUNCH_OPTIONS,
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
    num_warps: int | None = None,
    row_tiles: int | None = None,
    split_blocks: bool | None = None,
    hw_convert: bool | None = None,
) -> torch.Tensor:
    """Dequantize to float32 / bfloat16 / float16 [orig rows, orig cols]; bit-identical to the reference."""
    if dtype not in _OUT_KINDS:
        raise ValueError(f"dequantize_triton supports {list(_OUT_KINDS)}, got {dtype}")
    _check_device(q.values)
    rows, cols = q.shape
    prow, pcol = q.padded_shape
    cfg = _resolve_config(pcol, True, block_rows, block_cols, num_warps, row_tiles, split_blocks)
    hw = _use_hw_cvt(q.values.device, hw_convert)
    e2m1_max, e4m3_max = rule_maxima(q.rule)
    amax = q.amax.to(device=q.values.device, dtype=torch.float32).reshape(1)
    out = torch.empty((rows, cols), dtype=dtype, device=q.values.device)
    words = q.values.contiguous().view(torch.int32)  # [prow, pcol / 8], 8 codes per word
    scales = q.scale_factors.contiguous().view(torch.uint8)
    even = rows % cfg.block_rows == 0 and cols % cfg.block_cols == 0
    n_row_tiles = triton.cdiv(rows, cfg.block_rows)
    tiles = _row_tiles(row_tiles, cfg.row_tiles, n_row_tiles, triton.cdiv(cols, cfg.block_cols),
                       _device_sms(q.values.device))
    grid = (n_row_tiles // tiles, triton.cdiv(cols, cfg.block_cols))
    _dequantize_kernel[grid](
        words, scales, amax, out,
        rows, cols, out.stride(0), pcol // 8, pcol // BLOCK_SIZE,
        BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, TILES=tiles, R4=max(cfg.block_rows // 32, 1),
        E2M1_MAX=e2m1_max, E4M3_MAX=e4m3_max, OUT_KIND=_OUT_KINDS[dtype], SPLIT=cfg.split_blocks,
        HW_CVT=hw, EVEN=even,
        INDEX64=max(prow * max(out.stride(0), pcol // 8), prow * pcol // BLOCK_SIZE) >= _INT32_LIMIT,
        num_warps=cfg.num_warps, **_LAUNCH_OPTIONS,
    )
    return out


__all__ = ["KernelConfig", "dequantize_triton", "quantize_triton", "verify_conversions"]
