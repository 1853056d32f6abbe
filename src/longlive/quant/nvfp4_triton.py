"""Triton kernels for NVFP4 quantize (1x16 blocks) and dequantize, bit-exact with the reference.

They follow the order of operations documented in :mod:`longlive.quant.nvfp4` exactly. To stay
bit-exact on every backend (GPU and the CPU interpreter) the kernels avoid conversions whose
rounding differs between them: float32 -> E4M3 and float32 -> bfloat16 are done with integer bit
operations, and E2M1 (and E4M3-subnormal) rounding with one float32 addition of a number whose
unit in the last place is the grid spacing (IEEE round-to-nearest-even does the rounding); divisions
use ``tl.math.div_rn`` and FMA contraction is disabled at launch, so nothing is fused into those
additions. Only features present in Triton 3.6 are used. docs/nvfp4.md has the layout and the timings.
"""

from __future__ import annotations

import math
import os

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
from longlive.triton_helpers import bf16_bits as _bf16_bits

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
    # subnormal E4M3 (p < 2^-6): multiples of 2^-9, the float32 spacing just above 2^14, so the
    # addition rounds to nearest-even (FMA contraction is off at every launch)
    t = p + 16384.0
    i = t.to(tl.int32, bitcast=True) - 0x46800000
    value_sub = t - 16384.0
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
    """Decode E2M1 codes (int32 0..15) to float32 (code 8 is -0.0).

    The code's sign, exponent and mantissa fields placed in a float32 (bits 31, 23-22) give the value
    times 2^-126 (the E2M1 subnormals 0 and 0.5 land on float32 subnormals), so one exact product by
    2^126 decodes it.
    """
    bits = ((code & 7) << 22) | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37


@triton.jit
def _candidate(xb, bmax, k, dec, u, STOCHASTIC: tl.constexpr):
    """Quantize blocks [R, NB, 16] with block scale bmax*k -> (codes, scale codes, dequantized).

    The FP4 KV cache's kernels use this 3-D form; the quantize kernel holds blocks as [M, 8] halves.
    """
    sb_code, sb, inv = _block_scale(bmax, k, dec)
    xs = xb * inv[:, :, None]
    if STOCHASTIC:
        m, _ = _e2m1_round_stochastic(tl.abs(xs), u)
    else:
        m, _ = _e2m1_round(tl.abs(xs))
    codes = tl.where(m == 0, 0, _with_sign(m, xs))  # negatives rounded to 0 get code 0
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
    tile = (row >> 7) * (scale_cols >> 2) + (scol >> 2)  # row, scol >= 0; scale_cols % 4 == 0
    return ((tile << 5) + (row & 31)) * 16 + ((row >> 5) & 3) * 4 + (scol & 3)


@triton.jit
def _e2m1_round_bits(a):
    """Nearest E2M1 step of a = |xs| (float32, finite, >= 0), ties to even, saturating at 6.

    Returns (bits, value): the low nibble of the int32 `bits` is the code (0..7), bits 4-22 are zero
    and bits 23-31 are not (mask or shift them away); `value` is the E2M1 magnitude. The sum
    t = a + m, with m = 2^22 / 2^23 / 2^24 (for a below 2 / 4 / 8, from the biased exponent E of
    max(a, 1)) plus 2(E - 127) units in its last place, rounds to nearest-even by itself: the float32
    unit in the last place of m is the E2M1 spacing of the binade (0.5, 1, 2), and the added units
    are even so the tie parity is that of the step count. t's mantissa then reads the binade's first
    code 2(E - 127) plus the steps. E comes from a multiply-high and m from one multiply-add: those
    run on the FMA pipe, while the integer/logic pipe, which issues at half rate, is this kernel's
    limit. Needs FMA contraction off (``enable_fp_fusion=False``), which every launch sets.
    """
    a = tl.minimum(a, 6.0)
    be = tl.umulhi(tl.maximum(a, 1.0).to(tl.uint32, bitcast=True), 512).to(tl.int32)  # 127..129
    magic = (be * 8388610 + ((22 << 23) - 254)).to(tl.float32, bitcast=True)
    t = a + magic
    return t.to(tl.int32, bitcast=True), t - magic


@triton.jit
def _e2m1_round(a):
    """Nearest E2M1 step of a = |xs| (ties to even, saturating at 6): (code 0..7 int32, magnitude)."""
    bits, value = _e2m1_round_bits(a)
    return bits & 7, value


@triton.jit
def _pair_signs(w):
    """Sign bits 8 and 128 of the output byte of int32 words w holding two 16-bit floats (the even
    element's sign is bit 15, the odd one's bit 31): one mask and one multiply-high by 2^20 + 2^8,
    which moves bit 15 to 3 and bit 31 to 7 (and a copy of bit 31 to 19, which the packing drops)."""
    return tl.umulhi((w & -2147450880).to(tl.uint32), 1048832).to(tl.int32)  # 0x80008000, 0x100100


@triton.jit
def _float_signs(even, odd):
    """Sign bits 8 and 128 of the output byte of float32 (even, odd) pairs."""
    return (tl.umulhi(even.to(tl.uint32, bitcast=True), 2) * 8
            + tl.umulhi(odd.to(tl.uint32, bitcast=True), 2) * 128).to(tl.int32)


@triton.jit
def _e2m1_round_stochastic(a, u):
    """Stochastic E2M1 step of a = |xs|: floor(min(a, 6)/step + u) * step, as the reference computes it.

    Returns (k int32 0..7, the E2M1 magnitude). The binade comes from the biased exponent E of
    max(a, 1) (127..129, a multiply-high): 1/step = 2^(128 - E) and the binade's first code is
    2(E - 127). When the float32 sum rounds up to a step past the binade the reference's thresholds
    give the next binade's first code (at most code 7), hence the two minimums.
    """
    a = tl.minimum(a, 6.0)
    be = tl.umulhi(tl.maximum(a, 1.0).to(tl.uint32, bitcast=True), 512).to(tl.int32)
    inv_step = ((255 - be) << 23).to(tl.float32, bitcast=True)
    n = tl.minimum((a * inv_step + u).to(tl.int32), 4)
    first = 2 * be - 254
    k = tl.minimum(n + first, 7)
    return k, (k - first).to(tl.float32) * ((be - 1) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _with_sign(k, x):
    """Code magnitudes k 0..7 with the sign bit of x in bit 3 (negative zeros are cleared after packing)."""
    return k | ((x.to(tl.int32, bitcast=True) >> 28) & 8)


@triton.jit
def _clear_negative_zeros(word):
    """Give code 0 (not 8) to every nibble of an int32 whose magnitude is 0, as the reference does.

    A nibble's magnitude m is 0..7, so m + 7 carries into its bit 3 exactly when m > 0 and never
    into the next nibble.
    """
    nonzero = ((word & 0x77777777) + 0x77777777) & -2004318072  # 0x88888888
    return word & (nonzero | 0x77777777)


@triton.jit
def _block_scale(bmax, k, dec):
    """E4M3 block scale of blocks with max bmax: (scale code int32, its value, 1/(scale*dec) or 0)."""
    p = bmax * k
    p = tl.where(bmax > 0, p, 0.0)
    p = tl.where(p > 448.0, 448.0, p)
    sb_code, sb = _e4m3_round(p)
    scale = sb * dec
    normal = scale >= 1.1754943508222875e-38  # smallest normal float32
    safe = tl.where(normal, scale, 1.0)
    inv = tl.where(normal, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    return sb_code, sb, inv


@triton.jit
def _pair_round(x, u, inv, STOCHASTIC: tl.constexpr):
    """E2M1 magnitude code of one element of each pair [M, 4] (low nibble, as `_e2m1_round_bits`)
    and the magnitude."""
    a = tl.abs(x * inv[:, None])
    if STOCHASTIC:
        bits, r = _e2m1_round_stochastic(a, u)
    else:
        bits, r = _e2m1_round_bits(a)
    return bits, r


@triton.jit
def _pair_diff(r, sb, dec, x):
    """|dequantized| - |x|: the candidate's error up to its sign (which no rule uses)."""
    return (r * sb[:, None]) * dec - tl.abs(x)


@triton.jit
def _sum4(t, M: tl.constexpr):
    """Sum [M, 4] over the last dim as (t0+t1)+(t2+t3)."""
    a, b = tl.split(tl.reshape(t, (M, 2, 2)))
    t = a + b
    a, b = tl.split(t)
    return a + b


@triton.jit
def _half_error(de, do, RULE: tl.constexpr, M: tl.constexpr):
    """Four-over-six error of half a block from its even and odd elements' (dequantized - x), [M, 4]
    each: 1 = sum of squares, 2 = sum of abs (the reference's tree: pairs first), 3 = max abs."""
    if RULE == 1:
        err = _sum4(de * de + do * do, M)
    elif RULE == 2:
        err = _sum4(tl.abs(de) + tl.abs(do), M)
    else:
        err = tl.maximum(tl.max(tl.abs(de), axis=1), tl.max(tl.abs(do), axis=1))
    return err


@triton.jit
def _candidate_error(rea, roa, reb, rob, sb, dec, ea, oa, eb, ob, RULE: tl.constexpr, M: tl.constexpr):
    """Four-over-six error of a candidate (magnitudes r of the four parts) against the block."""
    err_a = _half_error(_pair_diff(rea, sb, dec, ea), _pair_diff(roa, sb, dec, oa), RULE, M)
    err_b = _half_error(_pair_diff(reb, sb, dec, eb), _pair_diff(rob, sb, dec, ob), RULE, M)
    if RULE == 3:
        err = tl.maximum(err_a, err_b)
    else:
        err = err_a + err_b
    return err


@triton.jit
def _pack_half(even, odd, signs, M: tl.constexpr):
    """Pack the magnitude codes of half a block (even and odd elements, [M, 4] each, the code in the
    low nibble, garbage from bit 23 up) and the sign bits of each byte (`_pair_signs`) into one int32
    per block, low nibble first.

    The shift-adds never carry into a lower field (bits 4-18 of every input are zero), so the garbage
    stays above each field and one mask per 16 bits removes it."""
    b = even + (odd << 4) + signs  # byte j = elements 2j, 2j+1
    lo, hi = tl.split(tl.reshape(b, (M, 2, 2)))
    h = lo + (hi << 8)
    lo, hi = tl.split(h)
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def _load_half(ptr, r, blk, H: tl.constexpr, rows, cols, stride, KIND: tl.constexpr, EVEN: tl.constexpr):
    """Elements 8H .. 8H+7 of blocks (row r, block column blk) as float32 (even, odd) [M, 4], and
    the sign bits of each output byte (8 for the even element, 128 for the odd one).

    ``ptr`` holds words of two elements: int32 for KIND 0 (bfloat16, widened by a shift and a mask)
    and 1 (float16), int64 for KIND 2 (float32); ``stride`` counts words. Each thread reads 16
    bytes per load. Outside the tensor (unless EVEN says there is no outside) the elements are zero.
    """
    row = r.to(tl.int64)[:, None] * stride
    row_ok = (r < rows)[:, None]
    if KIND == 2:  # float32 read as int64 words of two elements, 16 bytes (two words) per load
        wcol = (blk * 8 + 4 * H)[:, None] + tl.arange(0, 2)[None, :]
        if EVEN:
            w0 = tl.load(ptr + row + wcol)
            w1 = tl.load(ptr + row + wcol + 2)
        else:
            w0 = tl.load(ptr + row + wcol, mask=row_ok & (2 * wcol < cols), other=0)
            w1 = tl.load(ptr + row + wcol + 2, mask=row_ok & (2 * wcol + 4 < cols), other=0)
        w = tl.reshape(tl.permute(tl.join(w0, w1), (0, 2, 1)), (r.shape[0], 4))
        even = w.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        signs = _float_signs(even, odd)
    else:
        wcol = (blk * 8 + 4 * H)[:, None] + tl.arange(0, 4)[None, :]
        if EVEN:
            w = tl.load(ptr + row + wcol)
        else:
            w = tl.load(ptr + row + wcol, mask=row_ok & (2 * wcol < cols), other=0)
        if KIND == 0:
            even = (w << 16).to(tl.float32, bitcast=True)
            odd = (w & -65536).to(tl.float32, bitcast=True)
        else:
            even = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        signs = _pair_signs(w)
    return even, odd, signs


@triton.jit
def _load_tile(x_ptr, u_ptr, r, blk, rows, cols, stride_x, stride_u,
               KIND: tl.constexpr, STOCHASTIC: tl.constexpr, EVEN: tl.constexpr):
    """The tile's blocks as four float32 [M, 4] parts (even and odd elements of each half), the sign
    bits of each half's bytes, and the parts' uniforms (else the parts again)."""
    ea, oa, sa = _load_half(x_ptr, r, blk, 0, rows, cols, stride_x, KIND, EVEN)
    eb, ob, sb = _load_half(x_ptr, r, blk, 1, rows, cols, stride_x, KIND, EVEN)
    if STOCHASTIC:
        uea, uoa, _ = _load_half(u_ptr, r, blk, 0, rows, cols, stride_u, 2, EVEN)
        ueb, uob, _ = _load_half(u_ptr, r, blk, 1, rows, cols, stride_u, 2, EVEN)
    else:
        uea, uoa, ueb, uob = ea, oa, eb, ob
    return ea, oa, eb, ob, sa, sb, uea, uoa, ueb, uob


@triton.jit
def _candidate_half(e, o, ue, uo, inv, STOCHASTIC: tl.constexpr):
    ce, re = _pair_round(e, ue, inv, STOCHASTIC)
    co, ro = _pair_round(o, uo, inv, STOCHASTIC)
    return ce, co, re, ro


@triton.jit
def _quantize_tile(
    ea, oa, eb, ob, sa, sb_, uea, uoa, ueb, uob, words_ptr, scales_ptr, r, blk, k, k4, dec, words_per_row,
    scale_cols, M: tl.constexpr, RULE: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    """Quantize the M blocks (row r, block column blk), loaded by `_load_tile`, with the per-tensor
    factors k, k4, dec."""
    bmax = tl.maximum(tl.maximum(tl.max(tl.abs(ea), axis=1), tl.max(tl.abs(oa), axis=1)),
                      tl.maximum(tl.max(tl.abs(eb), axis=1), tl.max(tl.abs(ob), axis=1)))
    sb_code, sb, inv = _block_scale(bmax, k, dec)
    cea, coa, rea, roa = _candidate_half(ea, oa, uea, uoa, inv, STOCHASTIC)
    ceb, cob, reb, rob = _candidate_half(eb, ob, ueb, uob, inv, STOCHASTIC)
    if RULE != 0:
        sb_code4, sb4, inv4 = _block_scale(bmax, k4, dec)
        cea4, coa4, rea4, roa4 = _candidate_half(ea, oa, uea, uoa, inv4, STOCHASTIC)
        ceb4, cob4, reb4, rob4 = _candidate_half(eb, ob, ueb, uob, inv4, STOCHASTIC)
        err6 = _candidate_error(rea, roa, reb, rob, sb, dec, ea, oa, eb, ob, RULE, M)
        err4 = _candidate_error(rea4, roa4, reb4, rob4, sb4, dec, ea, oa, eb, ob, RULE, M)
        pick4 = err4 < err6  # ties keep the max->6 candidate
        cea = tl.where(pick4[:, None], cea4, cea)
        coa = tl.where(pick4[:, None], coa4, coa)
        ceb = tl.where(pick4[:, None], ceb4, ceb)
        cob = tl.where(pick4[:, None], cob4, cob)
        sb_code = tl.where(pick4, sb_code4, sb_code)
    wa = _clear_negative_zeros(_pack_half(cea, coa, sa, M))
    wb = _clear_negative_zeros(_pack_half(ceb, cob, sb_, M))
    word = wa.to(tl.uint32).to(tl.int64) | (wb.to(tl.int64) << 32)
    tl.store(words_ptr + r.to(tl.int64) * words_per_row + blk, word)
    tl.store(scales_ptr + _scale_offsets(r, blk, scale_cols), sb_code.to(tl.uint8))


@triton.jit
def _quantize_kernel(
    x_ptr, u_ptr, words_ptr, scales_ptr, amax_ptr,
    rows, cols, stride_x, stride_u, words_per_row, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, RULE: tl.constexpr,
    STOCHASTIC: tl.constexpr, E2M1_MAX: tl.constexpr, E4M3_MAX: tl.constexpr, PREFETCH: tl.constexpr,
    KIND: tl.constexpr, EVEN: tl.constexpr,
):
    """One program quantizes TILES tiles of [BLOCK_R, BLOCK_C] (stacked rows) of the padded tensor.

    A tile is held as M = BLOCK_R * BLOCK_C / 16 blocks, each loaded as two halves of 8 elements
    split into even and odd elements (`_load_half`), so that a block's elements stay in one thread
    (block max, error sums and nibble packing need no shuffles) and an even and an odd element are
    the two nibbles of one output byte. The per-tensor factors are computed once per program from
    amax with the reference's divisions; the unrolled tiles give the scheduler independent work to
    overlap with the loads, and with PREFETCH the next tile's loads are issued before this tile's
    arithmetic. EVEN (the tensor fills the padded shape) drops the bounds masks.
    """
    NB: tl.constexpr = BLOCK_C // 16
    M: tl.constexpr = BLOCK_R * NB
    amax = tl.load(amax_ptr)
    k = tl.math.div_rn(tl.zeros_like(amax) + E4M3_MAX, amax)
    k4 = tl.math.div_rn(tl.zeros_like(amax) + E4M3_MAX * E2M1_MAX / 4.0, amax)
    dec = tl.math.div_rn(amax, tl.zeros_like(amax) + E2M1_MAX * E4M3_MAX)
    i = tl.arange(0, M)
    blk = tl.program_id(1) * NB + i % NB
    r = tl.program_id(0) * TILES * BLOCK_R + i // NB
    tile = _load_tile(x_ptr, u_ptr, r, blk, rows, cols, stride_x, stride_u, KIND, STOCHASTIC, EVEN)
    for t in tl.static_range(TILES):
        if PREFETCH and t + 1 < TILES:  # the next tile's loads go out before this tile's arithmetic
            nxt = _load_tile(x_ptr, u_ptr, r + BLOCK_R, blk, rows, cols, stride_x, stride_u, KIND, STOCHASTIC, EVEN)
        ea, oa, eb, ob, sa, sb, uea, uoa, ueb, uob = tile
        _quantize_tile(ea, oa, eb, ob, sa, sb, uea, uoa, ueb, uob, words_ptr, scales_ptr, r, blk, k, k4, dec,
                       words_per_row, scale_cols, M, RULE, STOCHASTIC)
        if t + 1 < TILES:
            r += BLOCK_R
            if PREFETCH:
                tile = nxt
            else:
                tile = _load_tile(x_ptr, u_ptr, r, blk, rows, cols, stride_x, stride_u, KIND, STOCHASTIC, EVEN)


@triton.jit
def _unpack_half(word, dec, sb, M: tl.constexpr):
    """Dequantize 8 codes packed in an int32 per row: (value * block scale) * decode, float32 [M, 8]."""
    shift = tl.arange(0, 8) * 4
    code = (word[:, None] >> shift[None, :]) & 15
    return (_e2m1_value(code) * sb[:, None]) * dec


@triton.jit
def _dequantize_kernel(
    words_ptr, scales_ptr, amax_ptr, out_ptr,
    rows, cols, stride_out, words_per_row, scale_cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, OUT_KIND: tl.constexpr, DENOM: tl.constexpr,
):
    """One program dequantizes a [BLOCK_R, BLOCK_C] tile: (value * block scale) * decode.

    One 8-byte word holds a block's 16 codes; decode = amax / DENOM (E2M1_max * E4M3_max of the rule).
    """
    NB: tl.constexpr = BLOCK_C // 16
    M: tl.constexpr = BLOCK_R * NB
    i = tl.arange(0, M)
    r = tl.program_id(0) * BLOCK_R + i // NB
    blk = tl.program_id(1) * NB + i % NB
    ok = (r < rows) & (blk * 16 < cols)
    word = tl.load(words_ptr + r.to(tl.int64) * words_per_row + blk, mask=ok, other=0)
    s_code = tl.load(scales_ptr + _scale_offsets(r, blk, scale_cols), mask=ok, other=0)
    sb = _e4m3_value(s_code.to(tl.int32))
    amax = tl.load(amax_ptr)
    dec = tl.math.div_rn(amax, tl.zeros_like(amax) + DENOM)
    oa = _unpack_half(word.to(tl.int32), dec, sb, M)
    ob = _unpack_half((word >> 32).to(tl.int32), dec, sb, M)
    j = tl.arange(0, 8)
    col = blk[:, None] * 16 + j[None, :]
    row_ok = (r < rows)[:, None]
    orow = out_ptr + r.to(tl.int64) * stride_out
    pa = orow[:, None] + col
    ma = row_ok & (col < cols)
    mb = row_ok & (col + 8 < cols)
    if OUT_KIND == 0:
        tl.store(pa, oa, mask=ma)
        tl.store(pa + 8, ob, mask=mb)
    elif OUT_KIND == 1:
        tl.store(pa, _bf16_bits(oa), mask=ma)
        tl.store(pa + 8, _bf16_bits(ob), mask=mb)
    else:
        tl.store(pa, oa.to(tl.float16), mask=ma)
        tl.store(pa + 8, ob.to(tl.float16), mask=mb)


# --------------------------------------------------------------------------------------------------
# Host wrappers


# (four over six, stochastic) -> (tile rows, tiles per program, prefetch, register cap or None): the best of
# a sweep on an H200 (benchmarks/nvfp4_launch_sweep.py: rows 8 / 16 x tiles 1-8 x prefetch, three 5B shapes;
# docs/nvfp4.md). The warps default to one block per thread. Capping the static nearest kernel at 40
# registers (46 uncapped) raised its occupancy and throughput by 0.5-1% on all three shapes, without
# spills; at 32 it spills and loses a third, and the four-over-six kernel loses a quarter at 40.
_LAUNCH_DEFAULTS = {
    (False, False): (8, 2, False, 40),
    (False, True): (8, 1, True, None),
    (True, False): (8, 2, False, None),
    (True, True): (8, 1, False, None),
}


def _block_shape(padded_cols: int, block_rows: int | None, block_cols: int | None, tiles: int = 1) -> tuple[int, int]:
    bc = block_cols or (128 if padded_cols % 128 == 0 else 64)
    br = block_rows or 16
    if padded_cols % bc or 128 % (br * tiles) or bc % 16 or bc & (bc - 1) or br & (br - 1):
        raise ValueError(
            f"block shape ({br}, {bc}) x {tiles} tiles must be powers of two with 128 % (rows * tiles) == 0 "
            f"and padded cols {padded_cols} % cols == 0"
        )
    return br, bc


_IN_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # the quantize kernel's KIND


def _kernel_input(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t as the quantize kernel reads it, words of two elements (int32 for bfloat16 / float16, int64
    for float32; other dtypes become float32 first, as in the reference), and its KIND. An odd
    column count gets a zero column: the reference pads with zeros, so the codes are the same."""
    if t.dtype not in _IN_KINDS:
        t = t.to(torch.float32)
    if t.shape[1] % 2:
        t = torch.nn.functional.pad(t, (0, 1))
    elif t.stride(1) != 1 or t.stride(0) % 2 or t.storage_offset() % 2:
        t = t.contiguous()
    return t.view(torch.int32 if t.element_size() == 2 else torch.int64), _IN_KINDS[t.dtype]


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
    num_warps: int | None = None,
    tiles: int | None = None,
    prefetch: bool | None = None,
) -> NVFP4Tensor:
    """NVFP4-quantize a 2-D tensor with 1x16 blocks; bit-identical to ``nvfp4.quantize``.

    ``validate`` rejects inf/NaN (and uniforms outside [0, 1)) at the cost of one host sync;
    with ``validate=False`` non-finite inputs give undefined codes. A caller-supplied ``amax``
    (float32, must equal max|x|, else values saturate) skips the reduction pass.
    ``block_rows`` x ``block_cols`` (a tile), ``tiles`` (tiles per program, stacked along rows;
    fewer than the default if 128 rows are exceeded), ``num_warps`` (default: one block per thread)
    and ``prefetch`` (load the next tile before this one's arithmetic) tune the launch, not the
    result; the defaults (`_LAUNCH_DEFAULTS`) are the best measured per rule kind and rounding.
    """
    e2m1_max, e4m3_max = rule_maxima(rule)
    if round not in ("nearest", "stochastic"):
        raise ValueError(f"round must be 'nearest' or 'stochastic', got {round!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_triton expects a 2-D floating tensor, got {x.dtype} {tuple(x.shape)}")
    _check_device(x)
    rows, cols = x.shape
    prow, pcol = padded_shape(rows, cols)
    d_rows, d_tiles, d_prefetch, maxnreg = _LAUNCH_DEFAULTS[_RULE_IDS[rule] != 0, round == "stochastic"]
    block_rows = block_rows or d_rows
    if tiles is None:
        tiles = max(1, min(d_tiles, 128 // block_rows))
    prefetch = d_prefetch if prefetch is None else prefetch
    br, bc = _block_shape(pcol, block_rows, block_cols, tiles)
    num_warps = num_warps or max(1, br * bc // 512)  # one block (16 elements) per thread
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
        u = uniform
    values = torch.empty((prow, pcol // 2), dtype=torch.uint8, device=x.device)
    sf = torch.empty((prow * pcol // BLOCK_SIZE,), dtype=torch.uint8, device=x.device)
    xw, kind = _kernel_input(x)
    uw = _kernel_input(u)[0] if round == "stochastic" else xw
    grid = (prow // (br * tiles), pcol // bc)
    options = dict(_LAUNCH_OPTIONS)
    if maxnreg and x.device.type == "cuda":
        options.setdefault("maxnreg", maxnreg)
    _quantize_kernel[grid](
        xw, uw, values.view(torch.int64), sf, amax,
        rows, cols, xw.stride(0), uw.stride(0), pcol // BLOCK_SIZE, pcol // BLOCK_SIZE,
        BLOCK_R=br, BLOCK_C=bc, TILES=tiles, RULE=_RULE_IDS[rule], STOCHASTIC=round == "stochastic",
        E2M1_MAX=e2m1_max, E4M3_MAX=e4m3_max, PREFETCH=prefetch, KIND=kind,
        EVEN=(rows, cols) == (prow, pcol), num_warps=num_warps, **options,
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
    num_warps: int = 4,
) -> torch.Tensor:
    """Dequantize to float32 / bfloat16 / float16 [orig rows, orig cols]; bit-identical to the reference."""
    if dtype not in _OUT_KINDS:
        raise ValueError(f"dequantize_triton supports {list(_OUT_KINDS)}, got {dtype}")
    _check_device(q.values)
    rows, cols = q.shape
    prow, pcol = q.padded_shape
    br, bc = _block_shape(pcol, block_rows, block_cols)
    e2m1_max, e4m3_max = rule_maxima(q.rule)
    amax = q.amax.reshape(1).to(device=q.values.device, dtype=torch.float32)
    out = torch.empty((rows, cols), dtype=dtype, device=q.values.device)
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    _dequantize_kernel[grid](
        q.values.contiguous().view(torch.int64), q.scale_factors.view(torch.uint8), amax, out_view,
        rows, cols, out.stride(0), pcol // BLOCK_SIZE, pcol // BLOCK_SIZE,
        BLOCK_R=br, BLOCK_C=bc, OUT_KIND=_OUT_KINDS[dtype], DENOM=e2m1_max * e4m3_max, num_warps=num_warps,
        **_LAUNCH_OPTIONS,
    )
    return out


__all__ = ["dequantize_triton", "quantize_triton"]
