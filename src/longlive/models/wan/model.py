"""The Wan2.2 diffusion transformer, one module for every execution mode.

`WanModel(x, t, context, ...)` with x `[B, C, F, H, W]`, per-frame timesteps t `[B, F]` and text
embeddings `[B, L, text_dim]` (or per-chunk prompts `[B, P, L, text_dim]`) returns the flow
velocity `[B, C, F, H, W]`. What the caller passes selects the mode:
- nothing else: bidirectional full-sequence forward (the original Wan model);
- `chunk_frames=n`: block-causal over the whole sequence (score networks);
- `chunk_frames=n, clean_x=..., clean_t=...`: teacher forcing over `[clean; noisy]`, returning the
  velocity of the noisy frames (spec 2.2);
- `kv_cache=cache` (after `cache.begin_chunk`): one chunk of cached AR inference (spec 2.3).
Parameter names and shapes are exactly the original Wan checkpoint keys (spec 1.4).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import ChunkLayout, masked_attention, sdpa
from .config import WanConfig
from .kv_cache import KVCache
from .fused import available as fused_available, cached_self_attention
from .rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    """RMS norm over the full width (q/k norm of Wan), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free LayerNorm in fp32 (norm1 / norm2 / head.norm of Wan)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in fp32 whatever the parameter dtype (time embedding, head)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _modulate(x: torch.Tensor, frames: int, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift with per-frame `[B, frames, dim]` modulation, in fp32."""
    b, s, d = x.shape
    h = _layer_norm(x, eps).view(b, frames, s // frames, d)
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, s, d)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, frames: int, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate with a per-frame gate, computed in fp32, returned in x's dtype."""
    b, s, d = x.shape
    update = (y.float().view(b, frames, s // frames, d) * gate[:, :, None]).view(b, s, d)
    return (x.float() + update).to(x.dtype)  # a fresh tensor, not a view (FSDP2 hooks block outputs)


@dataclass
class _Plan:
    """How self-attention runs in this forward (computed once, shared by all blocks)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: Any = None  # None | bool tensor | flex BlockMask
    cache: KVCache | None = None
    groups: int = 1  # token groups for per-chunk prompt routing in cross-attention
    attend: Any = None  # custom masked attention (sequence parallel), replacing `mask`
    sp: Any = None  # UlyssesGroup of sequence-parallel cached inference (all-to-all around the cache)
    fused: bool = False  # BF16 cache on a GPU: q/k norm, RoPE and the cache write in one kernel (fused.py)
    gelu_epilogue: bool = False  # no-grad CUDA forward: the FFN's GELU inside its first product (cuBLASLt)


class _Projections(nn.Module):
    """q, k, v, o linears with the full-width q/k RMS norms (shared by self- and cross-attention)."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        d = config.dim
        self.num_heads = config.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, config.eps) if config.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, config.eps) if config.qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def forward(self, x: torch.Tensor, plan: _Plan, layer: int, need_output: bool = True) -> torch.Tensor | None:
        """Attention output projected by `o`; with `need_output=False` (a cache refresh's last layer) only
        the chunk's K/V reach the cache, where the path allows skipping the rest, and None is returned."""
        b, s, _ = x.shape
        if plan.fused:
            w = [n.weight if isinstance(n, RMSNorm) else None for n in (self.norm_q, self.norm_k)]
            eps = getattr(self.norm_q, "eps", 0.0)
            if plan.sp is not None:  # the kernel packs q, k, v for the all-to-all (q is sent in any case)
                out = plan.sp.attend_projections(plan.cache, layer, self.q(x), self.k(x), self.v(x), w[0], w[1], eps,
                                                 plan.cos, plan.sin, need_output)
            else:
                out = cached_self_attention(plan.cache, layer, self.q(x) if need_output else None, self.k(x),
                                            self.v(x), w[0], w[1], eps, plan.cos, plan.sin, need_output)
            return None if out is None else self.o(out.flatten(2))
        if not need_output and plan.sp is None and isinstance(plan.cache, KVCache) and plan.cache.fp4 is None:
            k = apply_rope(self.norm_k(self.k(x)).view(b, s, self.num_heads, -1), plan.cos, plan.sin)
            plan.cache.update(layer, k, self.v(x).view(b, s, self.num_heads, -1))
            return None
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, s, self.num_heads, -1)
        v = self.v(x).view(b, s, self.num_heads, -1)
        q, k = apply_rope(q, plan.cos, plan.sin), apply_rope(k, plan.cos, plan.sin)
        if plan.sp is not None:
            out = plan.sp.attend(plan.cache, layer, q, k, v)
        elif plan.cache is not None:
            out = plan.cache.attend(layer, q, k, v)
        elif plan.attend is not None:
            out = plan.attend(q, k, v)
        elif plan.mask is None:
            out = sdpa(q, k, v)
        else:
            out = masked_attention(q, k, v, plan.mask)
        return self.o(out.flatten(2)) if need_output else None


class CrossAttention(_Projections):
    """Attention from video tokens to text tokens; token group g attends prompt g % P."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, P, L, H, D]` of the embedded text `[B, P, L, dim]`."""
        b, p, l, _ = context.shape
        return (self.norm_k(self.k(context)).view(b, p, l, self.num_heads, -1),
                self.v(context).view(b, p, l, self.num_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor], groups: int) -> torch.Tensor:
        """`context`: the embedded text `[B, P, L, dim]`, or this block's `text_kv` of it (`TextKV`)."""
        b, s, d = x.shape
        k, v = context if isinstance(context, tuple) else self.text_kv(context)
        p = k.shape[1]
        q = self.norm_q(self.q(x)).view(b * groups, s // groups, self.num_heads, -1)
        if groups != p:  # group g uses prompt g % P
            k = k.repeat(1, groups // p, 1, 1, 1)
            v = v.repeat(1, groups // p, 1, 1, 1)
        out = sdpa(q, k.flatten(0, 1), v.flatten(0, 1))
        return self.o(out.reshape(b, s, d))


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, config.dim))
        self.self_attn = SelfAttention(config)
        self.norm3 = nn.LayerNorm(config.dim, eps=config.eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(config)
        self.ffn = nn.Sequential(nn.Linear(config.dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, config.dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                plan: _Plan, layer: int, cache_only: bool = False) -> torch.Tensor | None:
        """The block's output; with `cache_only` (the refresh's last block) only the chunk's K/V reach the
        cache and None is returned."""
        if cache_only:
            return self._write_cache(x, e0, plan, layer)
        frames = e0.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e0).unbind(2)
        y = self.self_attn(_modulate(x, frames, shift1, scale1, self.eps).to(x.dtype), plan, layer)
        x = _gated_residual(x, y, frames, gate1)
        if isinstance(self.norm3, nn.LayerNorm):
            n = self.norm3
            h = F.layer_norm(x.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps).to(x.dtype)
        else:
            h = x
        x = x + self.cross_attn(h, context, plan.groups)
        y = self._ffn(_modulate(x, frames, shift2, scale2, self.eps).to(x.dtype), plan.gelu_epilogue)
        return _gated_residual(x, y, frames, gate2)

    def _ffn(self, h: torch.Tensor, gelu_epilogue: bool) -> torch.Tensor:
        up = self.ffn[0]
        if gelu_epilogue and type(up) is nn.Linear and up.bias is not None and h.dtype == up.weight.dtype:
            # GELU(tanh) on the fp32 accumulator in the product's epilogue: the 14336-wide hidden state is
            # written once instead of written, read and written again (an extern kernel under Inductor)
            a = torch._addmm_activation(up.bias, h.flatten(0, -2), up.weight.t(), use_gelu=True)
            return self.ffn[2](a.view(*h.shape[:-1], -1))
        return self.ffn(h)

    # Eager, outside the compiled block's graphs: a compiled frame that returned None early would share its
    # resume functions with the full block, and Dynamo skips a code object for good after an empty graph.
    @torch.compiler.disable
    def _write_cache(self, x: torch.Tensor, e0: torch.Tensor, plan: _Plan, layer: int) -> None:
        shift1, scale1 = (self.modulation.float()[:, None, :2] + e0[:, :, :2]).unbind(2)
        self.self_attn(_modulate(x, e0.shape[1], shift1, scale1, self.eps).to(x.dtype), plan, layer, need_output=False)


class Head(nn.Module):
    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if e.shape[1] == 0:  # no frames (sequence-parallel rank without noisy frames): zero gradients, not None
            return _linear_fp32(self.head, x) + 0 * self.modulation.sum()
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        return _linear_fp32(self.head, _modulate(x, e.shape[1], shift, scale, self.eps))


@dataclass
class TextKV:
    """Per-block cross-attention keys and values `[B, P, L, H, D]` of a prompt (`WanModel.text_kv`)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


KEEP_ADAPTERS = object()  # forward(adapter=...) default: leave LoRA adapters as they are
# prediction="sample": velocity = (x_t - x0_pred) / sigma with sigma = t / 1000, kept >= this (as JiT clips
# it) so that the nearly clean frames of a training batch cannot blow the flow loss up; 0 at t = 0 is the
# same floor. Above it, x_t - sigma * velocity gives x0_pred back exactly.
SAMPLE_MIN_SIGMA = 0.05


def _with_adapter(block: nn.Module, adapter: str | None, *args):
    from .lora import active_adapter

    with active_adapter(block, adapter):
        return block(*args)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan timestep embedding: concat(cos(t*w), sin(t*w)), w_k = 10000^(-k/(dim/2)), in float64."""
    half = dim // 2
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * w
    return torch.cat([args.cos(), args.sin()], dim=-1)


class WanModel(nn.Module):
    """The Wan2.2 DiT (see module docstring for the execution modes)."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        # no-grad GPU forwards: q/k norm + RoPE + cache write in one Triton kernel (cached inference) and the
        # FFN's GELU in its product's epilogue. Off: the plain PyTorch ops, for A/B benchmarks and debugging
        # (same values up to the norm's summation order and the GELU's input rounding)
        self.fused_kernels = True
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation (Wan-style; the output head is random too so outputs are non-trivial)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                w = m.weight.view(m.weight.shape[0], -1)
                bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for name in ("text_embedding", "time_embedding"):
            for m in getattr(self, name):
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.02, generator=generator)
        d = self.config.dim
        for block in self.blocks:
            block.modulation.normal_(0.0, 1.0 / math.sqrt(d), generator=generator)
        self.head.modulation.normal_(0.0, 1.0 / math.sqrt(d), generator=generator)

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each transformer block (fuses the fp32 norm/modulation/RoPE math around the
        GEMMs and attention). The KV-cache write stays eager; ints such as the layer index are
        compiled as dynamic, so all blocks share a few graphs instead of recompiling per layer."""
        for block in self.blocks:
            block.compile(mode=mode)

    # ------------------------------------------------------------------ pieces
    def embed_video(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patchify `[B, C, F, H, W]` into tokens `[B, F'*H'*W', dim]` (Conv3d with kernel == stride, as a GEMM)."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if c != self.config.in_dim or f % pt or h % ph or w % pw:
            raise ValueError(f"input {tuple(x.shape)} does not fit in_dim={self.config.in_dim} and patch_size={self.config.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        x = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        weight = self.patch_embedding.weight
        tokens = F.linear(x.reshape(b, -1, c * pt * ph * pw).to(weight.dtype), weight.flatten(1), self.patch_embedding.bias)
        return tokens, grid

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame time embedding `e [B, F, dim]` and block modulation `e0 [B, F, 6, dim]` (fp32)."""
        emb = sinusoidal_embedding(t, self.config.freq_dim).float()
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], emb)))
        e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.config.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad text embeddings to `text_len` and project: `[B, (P,) L, text_dim]` -> `[B, P, text_len, dim]`."""
        if context.dim() == 3:
            context = context[:, None]
        if context.dim() != 4 or context.shape[-1] != self.config.text_dim:
            raise ValueError(f"context must be [B, L, {self.config.text_dim}] or [B, P, L, {self.config.text_dim}], got {tuple(context.shape)}")
        length = context.shape[2]
        if length > self.config.text_len:
            raise ValueError(f"context has {length} tokens, more than text_len={self.config.text_len}")
        if length < self.config.text_len:
            context = F.pad(context, (0, 0, 0, self.config.text_len - length))
        w = self.text_embedding[0].weight
        return self.text_embedding(context.to(w.dtype))

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output `[B, F'*H'*W', pt*ph*pw*C]` (channel fastest) -> `[B, C, F, H, W]`."""
        b = out.shape[0]
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        out = out.view(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f * pt, h * ph, w * pw)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: "torch.Tensor | TextKV",
        *,
        chunk_frames: int | None = None,
        clean_x: torch.Tensor | None = None,
        clean_t: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        frame_positions: torch.Tensor | None = None,
        attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sequence_parallel: Any = None,
        adapter: Any = KEEP_ADAPTERS,
        _cache_only: bool = False,
    ) -> torch.Tensor | None:
        """Velocity for `x` (see the module docstring for the modes).

        Teacher forcing under sequence parallelism passes this rank's frames: `clean_x` and `x` may then
        hold different frames (either may be empty), `frame_positions` gives the RoPE positions of
        `[clean; noisy]` (or of `x`, shared by both halves), `context` one prompt per local chunk slot
        (or one prompt), and `attention(q, k, v)` replaces the masked self-attention (it exchanges
        tokens across ranks and applies the global mask itself).
        `context` may also be `self.text_kv(text)`: the text's cross-attention K/V, computed once per prompt.
        `adapter` selects the active LoRA adapter inside every block (None: base only); it is applied
        per block call, so activation checkpointing recomputes with the same adapter.
        A `kv_cache` forward with gradient enabled reads the cache but does not write it (DMD exit steps).
        `sequence_parallel` (a `longlive.parallel.sequence.UlyssesGroup`, kv_cache mode only): every rank
        passes the whole chunk and gets the whole velocity, but runs the blocks on its own frames only,
        with a cache that holds its 1/sp of the heads (Ulysses, spec 4).
        """
        b, _, f, _, _ = x.shape
        if sequence_parallel is not None and kv_cache is None:
            raise ValueError("sequence_parallel is for kv_cache inference; teacher forcing passes attention=")
        if t.dim() != 2 or t.shape != (b, f):
            raise ValueError(f"t must hold one timestep per latent frame, shape [B, F] = [{b}, {f}]; got {tuple(t.shape)}")
        tokens, grid = self.embed_video(x)
        frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        if isinstance(context, TextKV):
            if len(context.k) != len(self.blocks) or context.k[0].shape[0] != b:
                raise ValueError(f"TextKV of {len(context.k)} layers and batch {context.k[0].shape[0]} does not fit "
                                 f"this model ({len(self.blocks)} layers) and batch {b}")
            contexts = list(zip(context.k, context.v))
        else:
            contexts = [self.embed_text(context)] * len(self.blocks)
        prompts = contexts[0][0].shape[1] if isinstance(context, TextKV) else contexts[0].shape[1]
        e, e0 = self.embed_time(t)

        if kv_cache is not None:
            if chunk_frames is not None or clean_x is not None or attention is not None:
                raise ValueError("kv_cache mode takes one chunk; do not pass chunk_frames, clean_x or attention with it")
            if frames != kv_cache.chunk_frames or b != kv_cache.batch_size:
                raise ValueError(f"kv_cache expects chunks of [B={kv_cache.batch_size}, F={kv_cache.chunk_frames}], got [B={b}, F={frames}]")
            if frame_positions is None:
                cos, sin = kv_cache.rope_tables(self.config, grid[1], grid[2], x.device)
            else:
                cos, sin = rope_cos_sin(self.config, frame_positions, grid[1], grid[2])
            # the out-of-place grad window only when an autograd graph is really being built
            grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            cache = kv_cache.grad_window() if grad else kv_cache
            plan = _Plan(cos, sin, cache=cache, groups=prompts)
            plan.fused = (self.fused_kernels and not grad and kv_cache.shared_slot()
                          and kv_cache.k.dtype == tokens.dtype == torch.bfloat16 and fused_available(x.device))
            if sequence_parallel is not None and sequence_parallel.size > 1:
                if grad:
                    raise ValueError("sequence-parallel cached inference has no backward; run it under torch.no_grad()")
                a, z = sequence_parallel.frame_range(frames)  # this rank's frames; tokens are frame-major
                tokens = tokens[:, a * tokens_per_frame : z * tokens_per_frame]
                e, e0 = e[:, a:z], e0[:, a:z]
                plan.cos = cos[:, a * tokens_per_frame : z * tokens_per_frame]
                plan.sin = sin[:, a * tokens_per_frame : z * tokens_per_frame]
                plan.sp = sequence_parallel
        elif clean_x is not None:
            plan, tokens, e0 = self._teacher_forcing_plan(
                x, clean_x, clean_t, tokens, e0, grid, prompts, chunk_frames, frame_positions, attention)
        else:
            if attention is not None:
                raise ValueError("a custom attention is only used in teacher forcing (with clean_x)")
            pos = torch.arange(frames, dtype=torch.float64, device=x.device) if frame_positions is None else frame_positions
            cos, sin = rope_cos_sin(self.config, pos, grid[1], grid[2])
            plan = _Plan(cos, sin, groups=prompts)
            if chunk_frames is not None:
                layout = ChunkLayout.block_causal(frames, chunk_frames, tokens_per_frame, x.device)
                plan.mask = self._mask_for(layout, x)
        if tokens.shape[1] % plan.groups:
            raise ValueError(f"{prompts} prompts cannot split {tokens.shape[1]} tokens into equal groups")
        plan.gelu_epilogue = self.fused_kernels and x.is_cuda and not torch.is_grad_enabled()

        h = tokens
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            run = block if adapter is KEEP_ADAPTERS else functools.partial(_with_adapter, block, adapter)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(run, h, e0, contexts[i], plan, i, use_reentrant=False)
            else:
                h = run(h, e0, contexts[i], plan, i, _cache_only and i == last)
        if _cache_only:
            return None
        if clean_x is not None:
            h = h[:, h.shape[1] - frames * tokens_per_frame :]
            if frames == 0:  # a rank holding only clean frames: an empty output, still tied to every parameter
                return self.head(h, e).reshape(b, self.config.out_dim, 0, *x.shape[3:]).to(x.dtype).clone()
        out = self.head(h, e)
        if plan.sp is not None:
            out = plan.sp.gather_tokens(out)
        out = self.unpatchify(out, grid)
        if self.config.prediction == "sample":  # the head predicted x0: the same velocity every caller expects
            sigma = (t.float() / 1000.0).clamp_min(SAMPLE_MIN_SIGMA)[:, None, :, None, None]
            out = (x.float() - out.float()) / sigma
        return out.to(x.dtype)

    @torch.no_grad()
    def text_kv(self, context: torch.Tensor, adapter: Any = KEEP_ADAPTERS) -> "TextKV | torch.Tensor":
        """The cross-attention keys and values of text embeddings `[B, (P,) L, text_dim]` for every block,
        computed once: pass the result as `context` to every forward of the same prompt (the denoising
        steps and refresh of a chunk) instead of recomputing them per forward. Inference only; valid for
        the LoRA adapter state it was computed with. With FSDP-sharded weights the text is returned as it is
        (each block's own forward gathers its weights and computes the K/V)."""
        from torch.distributed.tensor import DTensor

        if isinstance(self.text_embedding[0].weight, DTensor):  # (never quantized, sharded like the rest)
            return context
        ctx = self.embed_text(context)
        k, v = [], []
        for block in self.blocks:
            if adapter is KEEP_ADAPTERS:
                kv = block.cross_attn.text_kv(ctx)
            else:
                from .lora import active_adapter

                with active_adapter(block, adapter):
                    kv = block.cross_attn.text_kv(ctx)
            k.append(kv[0])
            v.append(kv[1])
        return TextKV(k, v)

    @torch.no_grad()
    def refresh_cache(self, x: torch.Tensor, t: torch.Tensor, context: "torch.Tensor | TextKV", *, kv_cache: KVCache,
                      sequence_parallel: Any = None, adapter: Any = KEEP_ADAPTERS) -> None:
        """The clean refresh of a chunk (after `kv_cache.prepare_refresh()`): writes the chunk's K/V of every
        layer, as `forward(..., kv_cache=kv_cache)` does, and skips what only the discarded output needs
        (the last block after its K/V, and the head)."""
        if kv_cache is None:
            raise ValueError("refresh_cache needs the kv_cache to write")
        # through __call__, so module hooks (FSDP2 unsharding) run as for any forward
        self(x, t, context, kv_cache=kv_cache, sequence_parallel=sequence_parallel, adapter=adapter, _cache_only=True)

    def _teacher_forcing_plan(self, x, clean_x, clean_t, tokens, e0, grid, prompts, chunk_frames,
                              frame_positions, attention):
        """Build `[clean; noisy]` tokens, modulation, RoPE and attention for teacher forcing (spec 2.2)."""
        if chunk_frames is None or clean_t is None:
            raise ValueError("teacher forcing needs chunk_frames and clean_t together with clean_x")
        noisy_frames, clean_frames = x.shape[2], clean_x.shape[2]
        if clean_x.shape[:2] != x.shape[:2] or clean_x.shape[3:] != x.shape[3:] or clean_t.shape != (x.shape[0], clean_frames):
            raise ValueError(f"clean_x/clean_t {tuple(clean_x.shape)}/{tuple(clean_t.shape)} do not fit x {tuple(x.shape)}")
        if attention is None and clean_frames != noisy_frames:
            raise ValueError(f"teacher forcing on one device needs as many clean as noisy frames, got {clean_frames} and {noisy_frames}")
        if (clean_frames + noisy_frames) % chunk_frames:
            raise ValueError(f"{clean_frames} clean + {noisy_frames} noisy frames are not whole chunks of {chunk_frames}")
        clean_tokens, _ = self.embed_video(clean_x)
        _, clean_e0 = self.embed_time(clean_t)
        tokens = torch.cat([clean_tokens, tokens], dim=1)
        e0 = torch.cat([clean_e0, e0], dim=1)
        if frame_positions is None:
            frame_positions = torch.arange(noisy_frames, dtype=torch.float64, device=x.device)
        if frame_positions.numel() == noisy_frames and clean_frames == noisy_frames:
            frame_positions = torch.cat([frame_positions, frame_positions])
        if frame_positions.numel() != clean_frames + noisy_frames:
            raise ValueError(f"frame_positions has {frame_positions.numel()} entries for {clean_frames} clean + {noisy_frames} noisy frames")
        cos, sin = rope_cos_sin(self.config, frame_positions.to(torch.float64), grid[1], grid[2])
        slots = (clean_frames + noisy_frames) // chunk_frames
        if prompts == slots and prompts > 1:
            groups = prompts  # one prompt per chunk slot of this sequence, in order (sequence parallel)
        elif clean_frames == noisy_frames:
            groups = 2 * prompts  # clean and noisy halves each split over the video's prompts
        elif prompts == 1:
            groups = 1
        else:
            raise ValueError(f"{prompts} prompts for {slots} chunk slots: give one prompt or one per chunk slot")
        plan = _Plan(cos, sin, groups=groups, attend=attention)
        if attention is None:
            layout = ChunkLayout.teacher_forcing(noisy_frames, chunk_frames, grid[1] * grid[2], x.device)
            plan.mask = self._mask_for(layout, x)
        return plan, tokens, e0

    @staticmethod
    def _mask_for(layout: ChunkLayout, x: torch.Tensor):
        return layout.block_mask() if x.is_cuda else layout.dense_mask()
