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
        q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr,
        S, eps,
        sqb, sqs, skb, sks, svb, svs,  # projections [B, S, H*D], last stride 1
        scb, scs,  # rope tables [B or 1, S, 1, D/2], last stride 1
        sob, sos, sog,  # outputs: element (b, s, i = h*D + d) goes to b*sb + s*ss + (i // G)*sg + i % G
        skob, skos, skog,
        svob, svos, svog,
        ROPE_BATCH: tl.constexpr, HD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
        HAS_Q: tl.constexpr, QG: tl.constexpr, KG: tl.constexpr,
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
        if HAS_Q:
            q = _norm_rope(q_ptr, wq_ptr, cos_ptr, sin_ptr, b * sqb + s * sqs, b_rope, s, offs, mask, pair, j, eps,
                           scb, scs, HD, NORM)
            tl.store(qo_ptr + b * sob + s * sos + (offs // QG) * sog + offs % QG, q.to(tl.bfloat16), mask=mask)
        k = _norm_rope(k_ptr, wk_ptr, cos_ptr, sin_ptr, b * skb + s * sks, b_rope, s, offs, mask, pair, j, eps,
                       scb, scs, HD, NORM)
        tl.store(ko_ptr + b * skob + s * skos + (offs // KG) * skog + offs % KG, k.to(tl.bfloat16), mask=mask)
        v = tl.load(v_ptr + b * svb + s * svs + offs, mask=mask, other=0.0)
        tl.store(vo_ptr + b * svob + s * svos + (offs // KG) * svog + offs % KG, v, mask=mask)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor | None, wk: torch.Tensor | None,
                  cos: torch.Tensor, sin: torch.Tensor, d: int, where: str) -> None:
    if triton is None:
        raise RuntimeError(f"{where} needs the triton package")
    b, s, hd = q.shape
    if k.shape != q.shape or v.shape != q.shape or hd % d:
        raise ValueError(f"{where}: q/k/v {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} must be equal "
                         f"[B, S, H*D] with head_dim {d}")
    if any(t.dtype != torch.bfloat16 for t in (q, k, v)):
        raise ValueError(f"{where}: q, k and v must be bfloat16")
    if cos.dtype != torch.float32 or sin.shape != cos.shape or cos.shape[1:] != (s, 1, d // 2) or cos.shape[0] not in (1, b):
        raise ValueError(f"{where}: cos/sin {tuple(cos.shape)} {cos.dtype} do not fit {s} tokens of head_dim {d}")
    if (wq is None) != (wk is None):
        raise ValueError(f"{where}: give both norm weights or neither")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin)):
        raise ValueError(f"{where}: every tensor's last dimension must be contiguous")


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor | None, wk: torch.Tensor | None,
            eps: float, cos: torch.Tensor, sin: torch.Tensor, d: int, has_q: bool,
            q_out: tuple, k_out: tuple, v_out: tuple, q_group: int, kv_group: int) -> None:
    """One program per token. Each output is `(tensor, stride_b, stride_s, stride_group)`: element
    `i = h*D + d` of token (b, s) is stored at `b*stride_b + s*stride_s + (i // group)*stride_group + i % group`."""
    b, s, hd = q.shape
    norm = wq is not None
    wq_, wk_ = (wq, wk) if norm else (q, k)  # unused pointers without the norm
    block = triton.next_power_of_2(hd)
    _norm_rope_store_kernel[(b * s,)](
        q, k, v, wq_, wk_, cos, sin, q_out[0], k_out[0], v_out[0], s, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cos.stride(1), *q_out[1:], *k_out[1:], *v_out[1:],
        ROPE_BATCH=cos.shape[0] > 1, HD=hd, D=d, BLOCK=block, NORM=norm, HAS_Q=has_q, QG=q_group, KG=kv_group,
        num_warps=8 if block >= 2048 else 4, enable_fp_fusion=False,
    )


def norm_rope_store(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor | None,
                    wk: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    k_dst: torch.Tensor, v_dst: torch.Tensor) -> torch.Tensor | None:
    """Norm + RoPE of q and k, k and v written to `k_dst, v_dst [B, H, S, D]`; returns rotated q `[B, S, H, D]`
    (None when q is None: only the cache is written).

    `q, k, v [B, S, H*D]` bf16 (rows may be strided, elements contiguous); `wq, wk [H*D]` the RMS norm
    weights, or both None without q/k norm; `cos, sin [B or 1, S, 1, D/2]` fp32 from `rope_cos_sin`.
    """
    has_q = q is not None
    q = k if q is None else q
    b, s, hd = q.shape
    _, h, _, d = k_dst.shape
    _check_inputs(q, k, v, wq, wk, cos, sin, d, "norm_rope_store")
    if h * d != hd or k_dst.shape != (b, h, s, d) or v_dst.shape != k_dst.shape:
        raise ValueError(f"norm_rope_store: q/k/v {tuple(q.shape)} do not fit the cache views "
                         f"{tuple(k_dst.shape)}/{tuple(v_dst.shape)}")
    if k_dst.dtype != torch.bfloat16 or v_dst.dtype != torch.bfloat16 or k_dst.stride(-1) != 1 or v_dst.stride(-1) != 1:
        raise ValueError("norm_rope_store: the cache views must be bfloat16 with a contiguous last dimension")
    q_out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device) if has_q else k_dst
    _launch(q, k, v, wq, wk, eps, cos, sin, d, has_q,
            (q_out, q_out.stride(0), q_out.stride(1), 0),
            (k_dst, k_dst.stride(0), k_dst.stride(2), k_dst.stride(1)),
            (v_dst, v_dst.stride(0), v_dst.stride(2), v_dst.stride(1)), q_group=hd, kv_group=d)
    return q_out if has_q else None


def norm_rope_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor | None,
                   wk: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                   parts: int) -> torch.Tensor:
    """Norm + RoPE of q and k, packed with v for a sequence-parallel all-to-all: returns
    `[parts, B, S, 3, H/parts, D]`, block p holding heads `[p*H/parts, (p+1)*H/parts)` of q, k, v (the
    send buffer of `parallel.sequence.qkv_to_sequence`, written in one pass instead of norm, RoPE,
    stack and a permuting copy). Inputs as for `norm_rope_store`."""
    _check_inputs(q, k, v, wq, wk, cos, sin, head_dim, "norm_rope_pack")
    b, s, hd = q.shape
    h = hd // head_dim
    if h % parts:
        raise ValueError(f"norm_rope_pack: {parts} parts do not divide the {h} heads")
    send = torch.empty(parts, b, s, 3, h // parts, head_dim, dtype=q.dtype, device=q.device)
    outs = [(t, t.stride(1), t.stride(2), t.stride(0)) for t in send.unbind(3)]
    _launch(q, k, v, wq, wk, eps, cos, sin, head_dim, True, *outs, q_group=hd // parts, kv_group=hd // parts)
    return send


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
