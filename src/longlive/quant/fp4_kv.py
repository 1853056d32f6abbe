"""NVFP4 storage of the self-attention KV cache and a fused attention that reads it (spec 7.7).

Format: for each (layer, batch element, slot, K or V) the chunk ``[heads, chunk_tokens, head_dim]``,
viewed as the head-major matrix ``[heads * chunk_tokens, head_dim]`` (row = head * chunk_tokens +
token), is ONE NVFP4 tensor with the reference numerics of :mod:`longlive.quant.nvfp4`: 1x16 blocks
along head_dim, E4M3 block scales, one float32 amax per chunk matrix, nearest rounding. Storage
(preallocated, fixed addresses):

- ``k_values`` / ``v_values``: uint8 ``[L, B, S, H, T, D/2]``, element 2j in the low nibble;
- ``k_scales`` / ``v_scales``: uint8 bit patterns of float8_e4m3fn ``[L, B, S, H, T, D/16]``,
  plain row-major (this is runtime state, not the blocked GEMM layout of checkpoints);
- ``k_decode`` / ``v_decode``: float32 ``[L, B, S]``, ``amax / (E2M1_max * E4M3_max)``;
- ``k_mean``: float32 ``[L, B, S, H, D]``, only with ``key_smoothing="channel_mean"``.

Dequantized element: ``(e2m1(code) * block_scale) * decode`` (+ ``k_mean`` for keys, channel_mean).

Key smoothing (keys only):

- ``channel_mean`` (default): per head, the mean over the chunk's tokens of each channel, m[h, d], is
  subtracted before quantization and added back after dequantization. Attention sees
  ``deq(k - m) + m``: exact up to quantization error, which is smaller when channels have offsets.
- ``token_mean``: the reference system's variant: ``k - mean_d(k)`` per token and head, stored
  smoothed and NOT added back; the current chunk's keys are smoothed the same way in
  :meth:`FP4KVStore.attention`. It shifts logit (i, j) by ``-mean_d(k_j) * sum_d(q_i)``, which differs
  between keys, so it is NOT softmax-invariant and changes attention; it exists only to reproduce
  the reference.
- ``none``.

Backends: on CUDA, Triton kernels (``write`` without host synchronisation; ``attention`` is one fused
flash-attention forward that dequantizes packed FP4 K/V tiles in registers and never materialises a
BF16 copy of the cache); on CPU, the reference functions of :mod:`longlive.quant.nvfp4` and torch SDPA.
The Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (``backend="triton"``; tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from longlive.quant.nvfp4 import (
    BLOCK_SIZE,
    e2m1_codes_to_float,
    quantize,
    rule_maxima,
    tensor_scales,
    unpack_e2m1,
)

try:  # CPU-only installs may lack triton: the torch backend still works, "triton" then raises
    import triton
    import triton.language as tl
except ImportError as _exc:  # pragma: no cover - triton is installed wherever CUDA torch is
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = _exc
else:
    _TRITON_IMPORT_ERROR = None

KEY_SMOOTHING = ("channel_mean", "token_mean", "none")
_SMOOTH_IDS = {"none": 0, "channel_mean": 1, "token_mean": 2}
_RULE_IDS = {"static_6": 0, "static_4": 0, "mse": 1, "mae": 2, "abs_max": 3}
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # bit-exact quantization (same as nvfp4_triton)
_WRITE_BLOCK_ROWS = 16
_WRITE_NUM_WARPS = 4


@dataclass(frozen=True)
class AttentionKernelConfig:
    """Tile sizes and launch options of the fused FP4 attention kernel (powers of two, >= 16).

    The defaults are the fastest of `benchmarks/fp4_kv_attention.py`'s sweep at the 5B shapes on an H200
    (docs/benchmarks.md, "FP4 KV cache").
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            if v < (16 if name != "num_warps" else 1) or v & (v - 1):
                raise ValueError(f"AttentionKernelConfig.{name}={v} must be a power of two (block sizes >= 16)")
        if self.num_stages < 1:
            raise ValueError(f"AttentionKernelConfig.num_stages={self.num_stages} must be >= 1")


def smoothing_mean(k: torch.Tensor, mode: str) -> torch.Tensor | None:
    """float32 mean subtracted from keys ``[B, H, T, D]``: channel_mean -> [B, H, 1, D], token_mean -> [B, H, T, 1].

    The smoothed keys are exactly ``k.float() - smoothing_mean(k, mode)``; ``none`` returns None.
    """
    if mode == "channel_mean":
        return torch.mean(k, dim=2, keepdim=True, dtype=torch.float32)
    if mode == "token_mean":
        return torch.mean(k, dim=3, keepdim=True, dtype=torch.float32)
    if mode == "none":
        return None
    raise ValueError(f"key_smoothing must be one of {KEY_SMOOTHING}, got {mode!r}")


def _per_sample_scales(amax: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, k4, decode) for a float32 amax vector [B]: the expressions of ``nvfp4.tensor_scales``, elementwise."""
    e2m1_max, e4m3_max = rule_maxima(rule)

    def full(v: float) -> torch.Tensor:
        return torch.full_like(amax, v)

    k = full(e4m3_max) / amax
    k4 = full(e4m3_max * e2m1_max / 4.0) / amax if _RULE_IDS[rule] != 0 else k
    dec = amax / full(e2m1_max * e4m3_max)
    return k, k4, dec


# --------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:
    from longlive.quant.nvfp4_triton import (
        _bf16_bits,
        _block_error,
        _candidate,
        _e2m1_value,
        _e4m3_value,
    )

    @triton.jit
    def _load_smoothed(x_ptr, mean_ptr, b, r, d, rows, T, D, sxb, sxh, sxt, sxd, SMOOTH: tl.constexpr):
        """Rows r (= head * T + token) of sample b's chunk in float32, minus the smoothing mean; 0 outside."""
        h = r // T
        t = r % T
        mask = (r[:, None] < rows) & (d[None, :] < D)
        ptrs = x_ptr + b * sxb + h[:, None] * sxh + t[:, None] * sxt + d[None, :] * sxd
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if SMOOTH == 1:  # channel mean, contiguous [B, H, D]
            m = tl.load(mean_ptr + (b * (rows // T) + h[:, None]) * D + d[None, :], mask=mask, other=0.0)
            x = x - m
        elif SMOOTH == 2:  # token mean, contiguous [B, H * T]
            m = tl.load(mean_ptr + b * rows + r, mask=r < rows, other=0.0)
            x = x - m[:, None]
        return tl.where(mask, x, 0.0)

    @triton.jit
    def _nan_max(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _amax_kernel(
        x_ptr, mean_ptr, partial_ptr, rows, T, D, sxb, sxh, sxt, sxd, n_tiles,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SMOOTH: tl.constexpr,
    ):
        """Per-tile max|x - mean| (NaN-propagating) of one sample's chunk matrix -> partial[b, tile]."""
        pid_r = tl.program_id(0)
        b = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        x = _load_smoothed(x_ptr, mean_ptr, b, r, d, rows, T, D, sxb, sxh, sxt, sxd, SMOOTH)
        a = tl.reduce(tl.reduce(tl.abs(x), 1, _nan_max), 0, _nan_max)
        tl.store(partial_ptr + b * n_tiles + pid_r, a)

    @triton.jit
    def _write_kernel(
        x_ptr, mean_ptr, slot_ptr, enc_ptr, enc4_ptr, dec_ptr, values_ptr, scales_ptr, dec_out_ptr,
        rows, T, D, sxb, sxh, sxt, sxd, chunk0, num_slots,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, RULE: tl.constexpr, SMOOTH: tl.constexpr,
    ):
        """Quantize BLOCK_R rows of sample b's (smoothed) chunk matrix into slot slot[b] (1x16 blocks)."""
        NB: tl.constexpr = BLOCK_D // 16
        pid_r = tl.program_id(0)
        b = tl.program_id(1)
        chunk = (chunk0 + b * num_slots + tl.load(slot_ptr + b)).to(tl.int64)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        x = _load_smoothed(x_ptr, mean_ptr, b, r, d, rows, T, D, sxb, sxh, sxt, sxd, SMOOTH)
        xb = tl.reshape(x, (BLOCK_R, NB, 16))
        bmax = tl.max(tl.abs(xb), axis=2)
        enc = tl.load(enc_ptr + b)
        dec = tl.load(dec_ptr + b)
        codes, sb_code, deq = _candidate(xb, bmax, enc, dec, xb, False)
        if RULE != 0:
            enc4 = tl.load(enc4_ptr + b)
            codes4, sb_code4, deq4 = _candidate(xb, bmax, enc4, dec, xb, False)
            err6 = _block_error(deq - xb, RULE, BLOCK_R, NB)
            err4 = _block_error(deq4 - xb, RULE, BLOCK_R, NB)
            pick4 = err4 < err6  # ties keep the max->6 candidate, as the reference
            codes = tl.where(pick4[:, :, None], codes4, codes)
            sb_code = tl.where(pick4, sb_code4, sb_code)
        lo, hi = tl.split(tl.reshape(codes, (BLOCK_R, BLOCK_D // 2, 2)))
        packed = (lo | (hi << 4)).to(tl.uint8)
        rr = r.to(tl.int64)
        cc = tl.arange(0, BLOCK_D // 2)
        vmask = (r[:, None] < rows) & (cc[None, :] < D // 2)
        tl.store(values_ptr + (chunk * rows + rr[:, None]) * (D // 2) + cc[None, :], packed, mask=vmask)
        sc = tl.arange(0, NB)
        smask = (r[:, None] < rows) & (sc[None, :] < D // 16)
        tl.store(scales_ptr + (chunk * rows + rr[:, None]) * (D // 16) + sc[None, :], sb_code.to(tl.uint8), mask=smask)
        if pid_r == 0:
            tl.store(dec_out_ptr + chunk, dec)

    @triton.jit
    def _dequant_kernel(
        values_ptr, scales_ptr, dec_ptr, mean_ptr, out_ptr,
        rows, T, H, D, chunk0, num_slots, n_slots, sob, soh, sot,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ADD_MEAN: tl.constexpr, OUT_BF16: tl.constexpr,
    ):
        """Dequantize BLOCK_R rows of slot s of sample b to out[b, h, s*T + t, :] (bit-exact with the reference)."""
        NB: tl.constexpr = BLOCK_D // 16
        pid_r = tl.program_id(0)
        b = tl.program_id(1) // n_slots
        s = tl.program_id(1) % n_slots
        chunk = (chunk0 + b * num_slots + s).to(tl.int64)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rr = r.to(tl.int64)
        row_ok = r[:, None] < rows
        cc = tl.arange(0, BLOCK_D // 2)
        byte = tl.load(values_ptr + (chunk * rows + rr[:, None]) * (D // 2) + cc[None, :],
                       mask=row_ok & (cc[None, :] < D // 2), other=0).to(tl.int32)
        vals = tl.reshape(_e2m1_value(tl.interleave(byte & 15, byte >> 4)), (BLOCK_R, NB, 16))
        sc = tl.arange(0, NB)
        s_code = tl.load(scales_ptr + (chunk * rows + rr[:, None]) * (D // 16) + sc[None, :],
                         mask=row_ok & (sc[None, :] < D // 16), other=0).to(tl.int32)
        dec = tl.load(dec_ptr + chunk)
        out = tl.reshape((vals * _e4m3_value(s_code)[:, :, None]) * dec, (BLOCK_R, BLOCK_D))
        h = r // T
        t = r % T
        d = tl.arange(0, BLOCK_D)
        mask = row_ok & (d[None, :] < D)
        if ADD_MEAN:
            out = out + tl.load(mean_ptr + (chunk * H + h[:, None]) * D + d[None, :], mask=mask, other=0.0)
        ptrs = out_ptr + b * sob + h[:, None] * soh + (s * T + t[:, None]).to(tl.int64) * sot + d[None, :]
        if OUT_BF16:
            tl.store(ptrs, _bf16_bits(out), mask=mask)
        else:
            tl.store(ptrs, out, mask=mask)

    @triton.jit
    def _fp4_tile(values_ptr, scales_ptr, row0, n0, T, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tokens [n0, n0+BLOCK_N) of one (chunk, head) as bf16 ``e2m1 * block_scale`` (exact; no decode factor)."""
        t = n0 + tl.arange(0, BLOCK_N)
        rows = (row0 + t).to(tl.int64)
        tmask = t < T
        cc = tl.arange(0, BLOCK_D // 2)
        byte = tl.load(values_ptr + rows[:, None] * (D // 2) + cc[None, :],
                       mask=tmask[:, None] & (cc[None, :] < D // 2), other=0).to(tl.int32)
        codes = tl.interleave(byte & 15, byte >> 4)
        # E2M1 (s e e m) placed in float16 bits (s at 15, e at 10-11, m at 9) is exactly value * 2^-14
        half = (((codes & 7) << 9) | ((codes & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
        sc = tl.arange(0, BLOCK_D // 16)
        s_code = tl.load(scales_ptr + rows[:, None] * (D // 16) + sc[None, :],
                         mask=tmask[:, None] & (sc[None, :] < D // 16), other=0).to(tl.int32)
        sb = _e4m3_value(s_code) * 16384.0
        val = tl.reshape(half.to(tl.float32), (BLOCK_N, BLOCK_D // 16, 16)) * sb[:, :, None]
        return tl.reshape(val, (BLOCK_N, BLOCK_D)).to(tl.bfloat16)

    @triton.jit
    def _mma(a, b, FP32_DOT: tl.constexpr):
        """a @ b with float32 accumulation; FP32_DOT for the CPU interpreter, whose bf16 tl.dot is wrong."""
        if FP32_DOT:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _attention_kernel(
        q_ptr, kc_ptr, vc_ptr, out_ptr,
        kval_ptr, ksc_ptr, kdec_ptr, kmean_ptr, vval_ptr, vsc_ptr, vdec_ptr, cur_ptr,
        Sq, T, Tc, H, D, num_valid, num_slots, chunk0, qk_scale,
        sqb, sqs, sqh, skb, skh, skt, svb, svh, svt, sob, sos, soh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SMOOTH: tl.constexpr, FP32_DOT: tl.constexpr,
    ):
        """Flash-attention forward of one (query tile, batch*head) over FP4 slots then the bf16 current chunk."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        m_off = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        qmask = (m_off[:, None] < Sq) & dmask[None, :]
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + m_off[:, None].to(tl.int64) * sqs + h * sqh + d[None, :],
                    mask=qmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_ar = tl.arange(0, BLOCK_N)
        cur = tl.load(cur_ptr + b)
        rows = H * T
        for s in range(0, num_valid):
            if s != cur:
                chunk = (chunk0 + b * num_slots + s).to(tl.int64)
                row0 = chunk * rows + h * T
                dk = tl.load(kdec_ptr + chunk) * qk_scale
                dv = tl.load(vdec_ptr + chunk)
                if SMOOTH == 1:  # logits gain q . m (per query, per slot): added in float32
                    mk = tl.load(kmean_ptr + (chunk * H + h) * D + d, mask=dmask, other=0.0)
                    qm = tl.sum(q.to(tl.float32) * mk[None, :], axis=1) * qk_scale
                else:
                    qm = tl.zeros([BLOCK_M], tl.float32)
                for n0 in range(0, T, BLOCK_N):
                    kt = _fp4_tile(kval_ptr, ksc_ptr, row0, n0, T, D, BLOCK_N, BLOCK_D)
                    sij = _mma(q, tl.trans(kt), FP32_DOT) * dk + qm[:, None]
                    sij = tl.where((n0 + n_ar)[None, :] < T, sij, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(sij, axis=1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(sij - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    vt = _fp4_tile(vval_ptr, vsc_ptr, row0, n0, T, D, BLOCK_N, BLOCK_D)
                    acc = acc * alpha[:, None] + _mma((p * dv).to(tl.bfloat16), vt, FP32_DOT)
                    m_i = m_new
        kc_base = kc_ptr + b.to(tl.int64) * skb + h * skh
        vc_base = vc_ptr + b.to(tl.int64) * svb + h * svh
        for n0 in range(0, Tc, BLOCK_N):
            t = n0 + n_ar
            tmask = (t[:, None] < Tc) & dmask[None, :]
            k = tl.load(kc_base + t[:, None].to(tl.int64) * skt + d[None, :], mask=tmask, other=0.0)
            if SMOOTH == 2:  # token_mean: the current chunk's keys are smoothed like the stored ones
                kf = k.to(tl.float32)
                kf = kf - (tl.sum(kf, axis=1) / D)[:, None]
                k = tl.where(tmask, kf, 0.0).to(tl.bfloat16)
            sij = _mma(q, tl.trans(k), FP32_DOT) * qk_scale
            sij = tl.where(t[None, :] < Tc, sij, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sij, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sij - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vc_base + t[:, None].to(tl.int64) * svt + d[None, :], mask=tmask, other=0.0)
            acc = acc * alpha[:, None] + _mma(p.to(tl.bfloat16), v, FP32_DOT)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + b.to(tl.int64) * sob + m_off[:, None].to(tl.int64) * sos + h * soh + d[None, :]
        tl.store(o_ptrs, out.to(tl.bfloat16), mask=qmask)


# --------------------------------------------------------------------------------------------------
# The store


class FP4KVStore:
    """Preallocated NVFP4 K/V chunk slots ``[layers, batch, slots]`` plus write and fused attention."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        num_slots: int,
        chunk_tokens: int,
        rule: str = "mse",
        key_smoothing: str = "channel_mean",
        device: torch.device | str = "cpu",
        backend: str = "auto",
        attention_config: AttentionKernelConfig | None = None,
        group=None,
        shard: str = "heads",
    ) -> None:
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                        ("head_dim", head_dim), ("num_slots", num_slots), ("chunk_tokens", chunk_tokens)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"FP4KVStore: {name} must be a positive int, got {v!r}")
        if head_dim % BLOCK_SIZE:
            raise ValueError(f"FP4KVStore: head_dim={head_dim} must be a multiple of {BLOCK_SIZE} (NVFP4 1x16 blocks)")
        rule_maxima(rule)
        if key_smoothing not in KEY_SMOOTHING:
            raise ValueError(f"FP4KVStore: key_smoothing must be one of {KEY_SMOOTHING}, got {key_smoothing!r}")
        device = torch.device(device)
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"FP4KVStore: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if backend == "triton":
            if triton is None:
                raise ValueError(f"FP4KVStore: backend 'triton' needs the triton package ({_TRITON_IMPORT_ERROR})")
            if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(
                    "FP4KVStore: backend 'triton' on a CPU device runs only under TRITON_INTERPRET=1 (set before "
                    "triton is imported); use backend 'torch' (or 'auto') on CPU"
                )
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"FP4KVStore: backend 'triton' supports CUDA devices, got {device}")
        self.num_layers, self.batch_size, self.num_heads = num_layers, batch_size, num_heads
        self.head_dim, self.num_slots, self.chunk_tokens = head_dim, num_slots, chunk_tokens
        if shard not in ("heads", "tokens"):
            raise ValueError(f"FP4KVStore: shard must be 'heads' or 'tokens', got {shard!r}")
        self.rule, self.key_smoothing, self.backend = rule, key_smoothing, backend
        # Sequence parallel: the ranks of `group` hold other heads ("heads": a head-sharded cache) or other
        # tokens ("tokens": the sender side of the FP4 all-to-all) of the same chunk matrices, whose
        # amax (and channel mean) are reduced over the group, so every rank quantizes with the scales
        # one process holding the whole chunk would use.
        self.group, self.shard = group, shard
        self.attention_config = attention_config or AttentionKernelConfig()
        shape = (num_layers, batch_size, num_slots, num_heads, chunk_tokens)
        self.k_values = torch.zeros(*shape, head_dim // 2, dtype=torch.uint8, device=device)
        self.v_values = torch.zeros_like(self.k_values)
        self.k_scales = torch.zeros(*shape, head_dim // BLOCK_SIZE, dtype=torch.uint8, device=device)
        self.v_scales = torch.zeros_like(self.k_scales)
        self.k_decode = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        self.v_decode = torch.zeros_like(self.k_decode)
        self.k_mean = (torch.zeros(*shape[:4], head_dim, dtype=torch.float32, device=device)
                       if key_smoothing == "channel_mean" else None)
        self.device = self.k_values.device

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Total bytes of the preallocated storage."""
        bufs = [self.k_values, self.v_values, self.k_scales, self.v_scales, self.k_decode, self.v_decode]
        if self.k_mean is not None:
            bufs.append(self.k_mean)
        return sum(t.numel() * t.element_size() for t in bufs)

    @property
    def bf16_nbytes(self) -> int:
        """Bytes of a BF16 K/V cache of the same geometry (for the memory ratio, ~3.56x at D=128)."""
        return 2 * self.num_layers * self.batch_size * self.num_slots * self.num_heads * self.chunk_tokens * self.head_dim * 2

    # ------------------------------------------------------------------ argument checks
    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"FP4KVStore: layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_slots(self, name: str, slots: Sequence[int]) -> list[int]:
        slots = list(slots)
        if len(slots) != self.batch_size:
            raise ValueError(f"FP4KVStore: {name} has {len(slots)} entries, expected batch_size={self.batch_size}")
        for b, s in enumerate(slots):
            if not isinstance(s, int) or not 0 <= s < self.num_slots:
                raise ValueError(f"FP4KVStore: {name}[{b}]={s!r} is not a slot index in [0, {self.num_slots})")
        return slots

    def _check_tensor(self, name: str, t: torch.Tensor, shape: tuple, dtypes: tuple[torch.dtype, ...]) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"FP4KVStore: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise ValueError(f"FP4KVStore: {name} has shape {tuple(t.shape)}, expected {want}")
        if t.dtype not in dtypes:
            raise ValueError(f"FP4KVStore: {name} has dtype {t.dtype}, expected one of {list(dtypes)}")
        if t.device != self.device:
            raise ValueError(f"FP4KVStore: {name} is on {t.device}, the store is on {self.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"FP4KVStore: {name} requires grad; the FP4 KV cache is inference-only (no backward). "
                "Run under torch.no_grad() / inference_mode() or detach the input."
            )

    # ------------------------------------------------------------------ write
    def write(self, layer: int, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize sample b's chunk K/V ``[B, H, T, D]`` (bf16 or fp32) into slot ``slots[b]`` of ``layer``.

        Bit-identical to ``nvfp4.quantize`` of the (smoothed) head-major chunk matrix. On CUDA there is no
        host sync, so inf/NaN are not raised: they make that slot's decode factor non-finite (attention -> NaN).
        """
        self._check_layer(layer)
        slots = self._check_slots("slots", slots)
        shape = (self.batch_size, self.num_heads, self.chunk_tokens, self.head_dim)
        self._check_tensor("k", k, shape, (torch.bfloat16, torch.float32))
        self._check_tensor("v", v, shape, (torch.bfloat16, torch.float32))
        mean = self._smoothing_mean(k)
        if self.backend == "torch":
            self._write_torch(layer, slots, k, v, mean)
        else:
            slot_t = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
            self._write_triton(layer, slot_t, k, mean, self.k_values, self.k_scales, self.k_decode)
            self._write_triton(layer, slot_t, v, None, self.v_values, self.v_scales, self.v_decode)
        if self.k_mean is not None:
            assert mean is not None
            for b, s in enumerate(slots):
                self.k_mean[layer, b, s].copy_(mean[b, :, 0])

    def _smoothing_mean(self, k: torch.Tensor) -> torch.Tensor | None:
        """The key smoothing mean; a channel mean over tokens held by several ranks is summed over the group."""
        if self.group is None or self.shard == "heads" or self.key_smoothing != "channel_mean":
            return smoothing_mean(k, self.key_smoothing)
        import torch.distributed as dist

        total = torch.sum(k, dim=2, keepdim=True, dtype=torch.float32)
        dist.all_reduce(total, group=self.group)
        return total / (k.shape[2] * dist.get_world_size(self.group))

    def _group_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """Per-sample float32 amax [B] reduced (max) over the group."""
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    def _write_torch(self, layer: int, slots: list[int], k: torch.Tensor, v: torch.Tensor,
                     mean: torch.Tensor | None) -> None:
        rows, d = self.num_heads * self.chunk_tokens, self.head_dim
        ks = k.float() - mean if mean is not None else k
        amaxes = [self._group_amax(x.detach().abs().flatten(1).amax(1).float()) for x in (ks, v)]
        for b, s in enumerate(slots):
            for x, amax, values, scales, decode in ((ks[b], amaxes[0], self.k_values, self.k_scales, self.k_decode),
                                                    (v[b], amaxes[1], self.v_values, self.v_scales, self.v_decode)):
                q = quantize(x.reshape(rows, d), self.rule, amax=amax[b])
                values[layer, b, s] = q.values[:rows, : d // 2].reshape(values.shape[3:])
                scales[layer, b, s] = q.scale_matrix()[:rows, : d // BLOCK_SIZE].view(torch.uint8).reshape(scales.shape[3:])
                decode[layer, b, s] = tensor_scales(q.amax, self.rule).decode[0]

    def _write_triton(self, layer: int, slot_t: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None,
                      values: torch.Tensor, scales: torch.Tensor, decode: torch.Tensor) -> None:
        B, H, T, D = x.shape
        rows = H * T
        smooth = 0 if mean is None else (1 if self.key_smoothing == "channel_mean" else 2)
        mean_arg = x if mean is None else mean.contiguous()
        br, bd = _WRITE_BLOCK_ROWS, triton.next_power_of_2(D)
        n_tiles = triton.cdiv(rows, br)
        strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
        partial = torch.empty((B, n_tiles), dtype=torch.float32, device=self.device)
        _amax_kernel[(n_tiles, B)](x, mean_arg, partial, rows, T, D, *strides, n_tiles,
                                   BLOCK_R=br, BLOCK_D=bd, SMOOTH=smooth, num_warps=_WRITE_NUM_WARPS)
        enc, enc4, dec = _per_sample_scales(self._group_amax(partial.amax(dim=1)), self.rule)
        _write_kernel[(n_tiles, B)](
            x, mean_arg, slot_t, enc, enc4, dec, values, scales, decode,
            rows, T, D, *strides, layer * B * self.num_slots, self.num_slots,
            BLOCK_R=br, BLOCK_D=bd, RULE=_RULE_IDS[self.rule], SMOOTH=smooth,
            num_warps=_WRITE_NUM_WARPS, **_LAUNCH_OPTIONS,
        )

    def packed(self, layer: int, slot: int) -> tuple[torch.Tensor, ...]:
        """Views of slot `slot` of every sample: (k_values, k_scales, v_values, v_scales) `[B, H, T, *]`,
        (k_decode, v_decode) `[B]` and k_mean `[B, H, D]` (None without channel_mean)."""
        self._check_layer(layer)
        mean = None if self.k_mean is None else self.k_mean[layer, :, slot]
        return (self.k_values[layer, :, slot], self.k_scales[layer, :, slot], self.v_values[layer, :, slot],
                self.v_scales[layer, :, slot], self.k_decode[layer, :, slot], self.v_decode[layer, :, slot], mean)

    def write_packed(self, layer: int, slots: Sequence[int], k_values: torch.Tensor, k_scales: torch.Tensor,
                     v_values: torch.Tensor, v_scales: torch.Tensor, k_decode: torch.Tensor, v_decode: torch.Tensor,
                     k_mean: torch.Tensor | None) -> None:
        """Store already quantized chunks (codes `[B, H, T, D/2]`, scales `[B, H, T, D/16]`, decode `[B]`,
        key mean `[B, H, D]`) in slots `slots[b]`: what a rank receives in the FP4 all-to-all."""
        self._check_layer(layer)
        slots = self._check_slots("slots", slots)
        H, T, D = self.num_heads, self.chunk_tokens, self.head_dim
        self._check_tensor("k_values", k_values, (self.batch_size, H, T, D // 2), (torch.uint8,))
        self._check_tensor("v_values", v_values, (self.batch_size, H, T, D // 2), (torch.uint8,))
        self._check_tensor("k_scales", k_scales, (self.batch_size, H, T, D // BLOCK_SIZE), (torch.uint8,))
        self._check_tensor("v_scales", v_scales, (self.batch_size, H, T, D // BLOCK_SIZE), (torch.uint8,))
        if (k_mean is None) != (self.k_mean is None):
            raise ValueError(f"FP4KVStore.write_packed: k_mean must be given exactly with key_smoothing=channel_mean "
                             f"(this store: {self.key_smoothing})")
        for b, s in enumerate(slots):
            self.k_values[layer, b, s].copy_(k_values[b])
            self.k_scales[layer, b, s].copy_(k_scales[b])
            self.v_values[layer, b, s].copy_(v_values[b])
            self.v_scales[layer, b, s].copy_(v_scales[b])
            self.k_decode[layer, b, s] = k_decode[b]
            self.v_decode[layer, b, s] = v_decode[b]
            if k_mean is not None:
                self.k_mean[layer, b, s].copy_(k_mean[b])

    # ------------------------------------------------------------------ dequantize
    def dequantize(self, layer: int, num_valid: int | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of physical slots [0, num_valid) as ``[B, H, num_valid*T, D]`` (keys with the channel mean added back).

        Materialises the cache (what the reference system does before every attention); for tests and baselines.
        """
        self._check_layer(layer)
        n = self.num_slots if num_valid is None else num_valid
        if not isinstance(n, int) or not 0 < n <= self.num_slots:
            raise ValueError(f"FP4KVStore.dequantize: num_valid must be an int in [1, {self.num_slots}], got {num_valid!r}")
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"FP4KVStore.dequantize: dtype must be bfloat16 or float32, got {dtype}")
        if self.backend == "torch":
            ks, vs = zip(*(self._dequantize_torch(layer, b, list(range(n))) for b in range(self.batch_size)))
            return torch.stack(ks).to(dtype), torch.stack(vs).to(dtype)
        B, H, T, D = self.batch_size, self.num_heads, self.chunk_tokens, self.head_dim
        outs = []
        for values, scales, decode, mean in ((self.k_values, self.k_scales, self.k_decode, self.k_mean),
                                             (self.v_values, self.v_scales, self.v_decode, None)):
            out = torch.empty((B, H, n * T, D), dtype=dtype, device=self.device)
            view = out.view(torch.int16) if dtype == torch.bfloat16 else out
            br = 32
            _dequant_kernel[(triton.cdiv(H * T, br), B * n)](
                values, scales, decode, values if mean is None else mean, view,
                H * T, T, H, D, layer * B * self.num_slots, self.num_slots, n,
                out.stride(0), out.stride(1), out.stride(2),
                BLOCK_R=br, BLOCK_D=triton.next_power_of_2(D), ADD_MEAN=mean is not None,
                OUT_BF16=dtype == torch.bfloat16, **_LAUNCH_OPTIONS,
            )
            outs.append(out)
        return outs[0], outs[1]

    def _dequantize_torch(self, layer: int, b: int, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 K, V ``[H, len(slots)*T, D]`` of sample b: ``(e2m1 * scale) * decode`` (+ channel mean)."""
        H, T, D = self.num_heads, self.chunk_tokens, self.head_dim
        outs = []
        for values, scales, decode, mean in ((self.k_values, self.k_scales, self.k_decode, self.k_mean),
                                             (self.v_values, self.v_scales, self.v_decode, None)):
            parts = []
            for s in slots:
                vals = e2m1_codes_to_float(unpack_e2m1(values[layer, b, s])).reshape(H, T, D // BLOCK_SIZE, BLOCK_SIZE)
                sbf = scales[layer, b, s].view(torch.float8_e4m3fn).to(torch.float32)
                x = ((vals * sbf[..., None]) * decode[layer, b, s]).reshape(H, T, D)
                if mean is not None:
                    x = x + mean[layer, b, s][:, None, :]
                parts.append(x)
            outs.append(torch.cat(parts, dim=1) if parts else torch.zeros(H, 0, D, device=self.device))
        return outs[0], outs[1]

    # ------------------------------------------------------------------ attention
    def attention(self, layer: int, q: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                  num_valid: int, current_slots: Sequence[int]) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over FP4 slots [0, num_valid) except each sample's current slot, plus k_cur/v_cur.

        q ``[B, Sq, H, D]`` bf16, k_cur / v_cur ``[B, H, Tc, D]`` bf16 (the current chunk, unquantized);
        returns ``[B, Sq, H, D]`` bf16.
        """
        self._check_layer(layer)
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        if not isinstance(num_valid, int) or not 0 <= num_valid <= self.num_slots:
            raise ValueError(f"FP4KVStore.attention: num_valid must be an int in [0, {self.num_slots}], got {num_valid!r}")
        cur = self._check_slots("current_slots", current_slots)
        # the fused kernel computes in bf16; the torch reference path also takes fp32 (CPU models)
        dtypes = (torch.bfloat16,) if self.backend == "triton" else (torch.bfloat16, torch.float32)
        self._check_tensor("q", q, (B, None, H, D), dtypes)
        self._check_tensor("k_cur", k_cur, (B, H, None, D), dtypes)
        self._check_tensor("v_cur", v_cur, (B, H, k_cur.shape[2], D), dtypes)
        if q.shape[1] == 0 or k_cur.shape[2] == 0:
            raise ValueError(f"FP4KVStore.attention: q has {q.shape[1]} queries and k_cur {k_cur.shape[2]} tokens; both must be > 0")
        if self.backend == "torch":
            return self._attention_torch(layer, q, k_cur, v_cur, num_valid, cur)
        return self._attention_triton(layer, q, k_cur, v_cur, num_valid, cur)

    def attention_from_slots(self, layer: int, q: torch.Tensor, num_valid: int, current_slots: Sequence[int],
                             route: str = "dequantize") -> torch.Tensor:
        """Attention over slots [0, num_valid) with the current chunk read from its FP4 slot as well (it was
        written by `write_packed`: the chunk's K/V arrived quantized). route: "dequantize" (window to q's
        dtype, then SDPA) or "reference" (float32 per sample, any device)."""
        cur = self._check_slots("current_slots", current_slots)
        if route == "dequantize":
            return self.attention_dequantized(layer, q, None, None, num_valid, cur)
        outs = []
        for b in range(self.batch_size):
            k, v = self._dequantize_torch(layer, b, list(range(max(num_valid, cur[b] + 1))))
            outs.append(F.scaled_dot_product_attention(q[b].transpose(0, 1).float(), k, v).transpose(0, 1))
        return torch.stack(outs).to(q.dtype)

    def attention_dequantized(self, layer: int, q: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                              num_valid: int, current_slots: Sequence[int]) -> torch.Tensor:
        """Same result as `attention` by another route: dequantize the window to q's dtype (one layer's
        transient copy, 260 MB at the 5B shapes), put the current chunk in its slot, then SDPA (cuDNN on
        CUDA). Faster than the fused kernel on an H200 (docs/benchmarks.md); the fused one needs no copy."""
        from longlive.models.wan.attention import sdpa

        cur = self._check_slots("current_slots", current_slots)
        T = self.chunk_tokens
        n = max(num_valid, max(cur) + 1)
        if k_cur is None:  # the current chunk is read from its slot (it arrived quantized: FP4 all-to-all)
            k, v = self.dequantize(layer, n, dtype=q.dtype)
            return sdpa(q, k, v, kv_heads_first=True)
        if k_cur.shape[2] != T:
            raise ValueError(f"FP4KVStore.attention_dequantized: the current chunk has {k_cur.shape[2]} tokens, slots hold {T}")
        k, v = self.dequantize(layer, n, dtype=q.dtype)
        if self.key_smoothing == "token_mean":
            k_cur = k_cur.float() - smoothing_mean(k_cur, "token_mean")
        if all(c == cur[0] for c in cur):
            k[:, :, cur[0] * T:(cur[0] + 1) * T] = k_cur
            v[:, :, cur[0] * T:(cur[0] + 1) * T] = v_cur
        else:
            for b, c in enumerate(cur):
                k[b, :, c * T:(c + 1) * T] = k_cur[b]
                v[b, :, c * T:(c + 1) * T] = v_cur[b]
        return sdpa(q, k, v, kv_heads_first=True)

    def _attention_torch(self, layer: int, q: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                         num_valid: int, cur: list[int]) -> torch.Tensor:
        """Reference: dequantize the attended slots to float32 and call SDPA in float32, per sample."""
        mean = smoothing_mean(k_cur, "token_mean") if self.key_smoothing == "token_mean" else None
        kc = k_cur.float() - mean if mean is not None else k_cur.float()
        outs = []
        for b in range(self.batch_size):
            k, v = self._dequantize_torch(layer, b, [s for s in range(num_valid) if s != cur[b]])
            k = torch.cat([k, kc[b]], dim=1)
            v = torch.cat([v, v_cur[b].float()], dim=1)
            o = F.scaled_dot_product_attention(q[b].transpose(0, 1).float(), k, v)
            outs.append(o.transpose(0, 1))
        return torch.stack(outs).to(q.dtype)

    def _attention_triton(self, layer: int, q: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                          num_valid: int, cur: list[int]) -> torch.Tensor:
        B, Sq, H, D = q.shape
        q = q if q.stride(-1) == 1 else q.contiguous()
        k_cur = k_cur if k_cur.stride(-1) == 1 else k_cur.contiguous()
        v_cur = v_cur if v_cur.stride(-1) == 1 else v_cur.contiguous()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        cur_t = torch.tensor(cur, dtype=torch.int32).to(self.device, non_blocking=True)
        cfg = self.attention_config
        kmean = self.k_mean if self.k_mean is not None else self.k_decode
        grid = (triton.cdiv(Sq, cfg.block_m), B * H)
        _attention_kernel[grid](
            q, k_cur, v_cur, out,
            self.k_values, self.k_scales, self.k_decode, kmean, self.v_values, self.v_scales, self.v_decode, cur_t,
            Sq, self.chunk_tokens, k_cur.shape[2], H, D, num_valid, self.num_slots, layer * B * self.num_slots,
            (1.0 / math.sqrt(D)) * math.log2(math.e),
            q.stride(0), q.stride(1), q.stride(2), k_cur.stride(0), k_cur.stride(1), k_cur.stride(2),
            v_cur.stride(0), v_cur.stride(1), v_cur.stride(2), out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
            SMOOTH=_SMOOTH_IDS[self.key_smoothing], FP32_DOT=self.device.type == "cpu",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out


__all__ = ["AttentionKernelConfig", "FP4KVStore", "KEY_SMOOTHING", "smoothing_mean"]
