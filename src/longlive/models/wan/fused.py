"""One Triton kernel for the cached self-attention's input side: q/k RMS norm, RoPE and the KV-cache write.

In cached inference the projections `q, k, v [B, S, H*D]` go through the full-width RMS norm (q, k),
the adjacent-pair RoPE (q, k) and the cache write (k, v into the current chunk's slot, head-major).
Done as separate steps this reads and writes the chunk's activations several times: at the 5B shape
(7040 tokens x 3072) the compiled norm + RoPE kernel took 171 us and the two transposing cache copies
60 us each, per layer and forward (docs/benchmarks.md). This kernel reads q, k, v once and writes the
rotated q and the cache slot directly.

Numerics follow `RMSNorm` and `apply_rope` of `model.py` operation by operation (fp32 math, bf16
rounding after the norm, after the weight and after the rotation; no FMA contraction); only the
order of the mean's summation differs, as it does between eager and compiled PyTorch.
The kernel also runs on CPU tensors under `TRITON_INTERPRET=1` (tests).
"""
from __future__ import annotations

import logging
import os

import torch

from .attention import sdpa

try:  # CPU-only installs may lack triton: `available()` is then False and the PyTorch path runs
    import triton
    import triton.language as tl

    from longlive.triton_helpers import round_bf16 as _bf16
except ImportError:  # pragma: no cover - depends on the install
    triton = None


log = logging.getLogger(__name__)
_TOLD: list[bool] = []  # the missing-triton warning is given once


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on `device` (CUDA with triton, or CPU under the interpreter)."""
    if triton is None:
        if device.type == "cuda" and not _TOLD:
            _TOLD.append(True)
            log.warning("triton is not installed: cached inference runs q/k norm, RoPE and the KV-cache write as "
                        "separate PyTorch ops (slower; same values)")
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, row, b_rope, s, offs, mask, pair, j, eps,
                   scb, scs, HD: tl.constexpr, NORM: tl.constexpr):
        """Load one token row of q or k ([1, 2*BLOCK_P] elements), return the rotated pairs (fp32, bf16-exact)."""
        x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            ms = tl.sum(x * x, axis=1)[:, None] / HD
            x = _bf16(x * tl.math.rsqrt(ms + eps))
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = _bf16(x * w)
        x0, x1 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        c = tl.load(cos_ptr + b_rope * scb + s * scs + j, mask=pair, other=0.0)
        sn = tl.load(sin_ptr + b_rope * scb + s * scs + j, mask=pair, other=0.0)
        y0 = _bf16(x0 * c - x1 * sn)
        y1 = _bf16(x0 * sn + x1 * c)
        return tl.reshape(tl.join(y0, y1), (x.shape[0], x.shape[1]))

    @triton.jit
    def _norm_rope_store_kernel(
        q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr,
        S, eps,
        sqb, sqs, skb, sks, svb, svs,  # projections [B, S, H*D], last stride 1
        scb, scs,  # rope tables [B or 1, S, 1, D/2], last stride 1
        sob, sos,  # rotated q [B, S, H*D]
        skcb, skch, skcs,  # cache slot views [B, H, S, D], last stride 1
        svcb, svch, svcs,
        ROPE_BATCH: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
        HAS_Q: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // S
        s = pid % S
        b_rope = b if ROPE_BATCH else 0
        offs = tl.arange(0, BLOCK)[None, :]  # element of the row (h * D + d)
        mask = offs < HD
        p = tl.arange(0, BLOCK // 2)[None, :]  # pair index; j = pair within its head
        pair = p < HD // 2
        j = p % (D // 2)
        head, d = offs // D, offs % D
        if HAS_Q:
            q = _norm_rope(q_ptr, wq_ptr, cos_ptr, sin_ptr, b * sqb + s * sqs, b_rope, s, offs, mask, pair, j, eps,
                           scb, scs, HD, NORM)
            tl.store(qo_ptr + b * sob + s * sos + offs, q.to(tl.bfloat16), mask=mask)
        k = _norm_rope(k_ptr, wk_ptr, cos_ptr, sin_ptr, b * skb + s * sks, b_rope, s, offs, mask, pair, j, eps,
                       scb, scs, HD, NORM)
        tl.store(kc_ptr + b * skcb + head * skch + s * skcs + d, k.to(tl.bfloat16), mask=mask)
        v = tl.load(v_ptr + b * svb + s * svs + offs, mask=mask, other=0.0)
        tl.store(vc_ptr + b * svcb + head * svch + s * svcs + d, v, mask=mask)


def norm_rope_store(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor | None,
                    wk: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    k_dst: torch.Tensor, v_dst: torch.Tensor) -> torch.Tensor | None:
    """Norm + RoPE of q and k, k and v written to `k_dst, v_dst [B, H, S, D]`; returns rotated q `[B, S, H, D]`
    (None when q is None: only the cache is written).

    `q, k, v [B, S, H*D]` bf16 (rows may be strided, elements contiguous); `wq, wk [H*D]` the RMS norm
    weights, or both None without q/k norm; `cos, sin [B or 1, S, 1, D/2]` fp32 from `rope_cos_sin`.
    """
    if triton is None:
        raise RuntimeError("norm_rope_store needs the triton package")
    has_q = q is not None
    q = k if q is None else q
    b, s, hd = q.shape
    _, h, _, d = k_dst.shape
    if h * d != hd or k.shape != q.shape or v.shape != q.shape or k_dst.shape != (b, h, s, d) or v_dst.shape != k_dst.shape:
        raise ValueError(f"norm_rope_store: q/k/v {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not fit the "
                         f"cache views {tuple(k_dst.shape)}/{tuple(v_dst.shape)}")
    if any(t.dtype != torch.bfloat16 for t in (q, k, v, k_dst, v_dst)):
        raise ValueError("norm_rope_store: q, k, v and the cache must be bfloat16")
    if cos.dtype != torch.float32 or sin.shape != cos.shape or cos.shape[1:] != (s, 1, d // 2) or cos.shape[0] not in (1, b):
        raise ValueError(f"norm_rope_store: cos/sin {tuple(cos.shape)} {cos.dtype} do not fit {s} tokens of head_dim {d}")
    if (wq is None) != (wk is None):
        raise ValueError("norm_rope_store: give both norm weights or neither")
    tensors = (q, k, v, k_dst, v_dst, cos, sin)
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("norm_rope_store: every tensor's last dimension must be contiguous")
    q_out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device) if has_q else k_dst
    norm = wq is not None
    wq_, wk_ = (wq, wk) if norm else (q, k)  # unused pointers without the norm
    block = triton.next_power_of_2(hd)
    _norm_rope_store_kernel[(b * s,)](
        q, k, v, wq_, wk_, cos, sin, q_out, k_dst, v_dst, s, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cos.stride(1), q_out.stride(0), q_out.stride(1),
        k_dst.stride(0), k_dst.stride(1), k_dst.stride(2), v_dst.stride(0), v_dst.stride(1), v_dst.stride(2),
        ROPE_BATCH=cos.shape[0] > 1, HD=hd, D=d, BLOCK=block, NORM=norm, HAS_Q=has_q,
        num_warps=8 if block >= 2048 else 4, enable_fp_fusion=False,
    )
    return q_out if has_q else None


@torch.compiler.disable  # slot views and a Triton launch: one opaque step inside a compiled block
def cached_self_attention(cache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          wq: torch.Tensor | None, wk: torch.Tensor | None, eps: float, cos: torch.Tensor,
                          sin: torch.Tensor, need_output: bool = True) -> torch.Tensor | None:
    """Self-attention of the current chunk over a BF16 `KVCache` window from the raw projections
    `q, k, v [B, S, H*D]`: one `norm_rope_store` launch writes the chunk's K/V into its slot, then SDPA
    reads the window in place. Returns `[B, S, H, D]`, or None with `need_output=False` (the refresh of
    the last layer only writes the cache)."""
    k_dst, v_dst, k_win, v_win = cache.chunk_views(layer)
    q_rot = norm_rope_store(q if need_output else None, k, v, wq, wk, eps, cos, sin, k_dst, v_dst)
    if not need_output:
        return None
    return sdpa(q_rot, k_win, v_win, kv_heads_first=True)
