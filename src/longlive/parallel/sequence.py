"""Sequence parallelism for teacher-forcing training (spec 5.2): shard layouts and Ulysses attention.

The teacher-forcing sequence is `[clean frames 0..F-1 ; noisy frames 0..F-1]`. Under sequence
parallelism each rank of a group holds a `SequenceShard` of it:
- balanced (the paper's layout): rank r holds the clean AND the noisy copy of its own contiguous
  chunks, so every rank has the same loss-bearing work and needs only its own frames' latents;
- plain: the `[clean; noisy]` sequence split contiguously (the first ranks hold clean frames only).
Self-attention exchanges heads for tokens with an all-to-all (Ulysses): each rank attends over the
whole sequence (every rank's tokens, in rank order) with 1/sp of the heads, under the one chunk-mask
rule of `ChunkLayout`, then the inverse all-to-all returns its own tokens with all heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from longlive.models.wan.attention import ChunkLayout, masked_attention

LAYOUTS = ("balanced", "plain")


@dataclass(frozen=True)
class SequenceShard:
    """Frames of the teacher-forcing sequence held by one rank: clean [c0, c1) and noisy [n0, n1)."""

    clean: tuple[int, int]
    noisy: tuple[int, int]

    @property
    def clean_frames(self) -> int:
        return self.clean[1] - self.clean[0]

    @property
    def noisy_frames(self) -> int:
        return self.noisy[1] - self.noisy[0]

    def frame_positions(self, device=None) -> torch.Tensor:
        """RoPE positions of `[clean; noisy]`: global frame indices (identical for a frame's two copies)."""
        return torch.cat([torch.arange(*self.clean, dtype=torch.float64, device=device),
                          torch.arange(*self.noisy, dtype=torch.float64, device=device)])

    def chunk_slots(self, chunk_frames: int) -> list[int]:
        """Global chunk index of each local chunk slot, clean slots first (the per-slot prompt order)."""
        return [f // chunk_frames for f in range(*self.clean, chunk_frames)] + \
               [f // chunk_frames for f in range(*self.noisy, chunk_frames)]

    def layout(self, chunk_frames: int, tokens_per_frame: int, device=None) -> ChunkLayout:
        """Per-token chunk index and noisy flag of this shard's `[clean; noisy]` tokens."""
        frames = torch.cat([torch.arange(*self.clean, device=device), torch.arange(*self.noisy, device=device)])
        noisy = torch.arange(frames.numel(), device=device) >= self.clean_frames
        return ChunkLayout((frames // chunk_frames).repeat_interleave(tokens_per_frame),
                           noisy.repeat_interleave(tokens_per_frame))


def shard_sequence(num_frames: int, chunk_frames: int, sp_size: int, layout: str = "balanced") -> list[SequenceShard]:
    """The shard of every rank of an SP group; each holds whole chunks and the same number of tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence-parallel layout {layout!r}; expected one of {LAYOUTS}")
    if num_frames % chunk_frames:
        raise ValueError(f"{num_frames} latent frames are not whole chunks of {chunk_frames}")
    if layout == "balanced":
        if num_frames % (sp_size * chunk_frames):
            raise ValueError(
                f"balanced sequence parallel needs the latent frames ({num_frames}) to be a multiple of "
                f"sequence_parallel_size x frames per chunk = {sp_size} x {chunk_frames}, so each rank owns whole chunks")
        n = num_frames // sp_size
        return [SequenceShard((r * n, (r + 1) * n), (r * n, (r + 1) * n)) for r in range(sp_size)]
    if (2 * num_frames) % (sp_size * chunk_frames):
        raise ValueError(
            f"plain sequence parallel needs 2 x latent frames ({2 * num_frames}) to be a multiple of "
            f"sequence_parallel_size x frames per chunk = {sp_size} x {chunk_frames}")
    n = 2 * num_frames // sp_size
    shards = []
    for r in range(sp_size):
        a, b = r * n, (r + 1) * n  # range in the [clean; noisy] frame sequence
        clean = (min(a, num_frames), min(b, num_frames))
        noisy = (max(a, num_frames) - num_frames, max(b, num_frames) - num_frames)
        shards.append(SequenceShard(clean, noisy))
    return shards


class _AllToAll(torch.autograd.Function):
    """all-to-all over `dim0` blocks; its gradient is the same exchange back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous: empty_like would keep a permuted input's strides
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def qkv_to_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, sp: int) -> tuple[torch.Tensor, ...]:
    """Local `[B, S, H, D]` q, k, v -> `[B, sp*S, H/sp, D]` each, in ONE all-to-all: every rank gets
    the tokens of all ranks (in rank order) for its 1/sp of the heads."""
    b, s, h, d = q.shape
    if h % sp:
        raise ValueError(f"sequence_parallel_size {sp} does not divide the {h} attention heads")
    send = torch.stack([q, k, v], dim=2).view(b, s, 3, sp, h // sp, d).permute(3, 0, 1, 2, 4, 5)
    recv = _AllToAll.apply(send, group)  # [sp (source rank), B, S, 3, H/sp, D]
    return recv.permute(1, 0, 2, 3, 4, 5).reshape(b, sp * s, 3, h // sp, d).unbind(2)


def sequence_to_heads(x: torch.Tensor, group, sp: int) -> torch.Tensor:
    """Inverse exchange for the attention output: `[B, sp*S, H/sp, D]` -> `[B, S, H, D]`."""
    b, st, hl, d = x.shape
    send = x.view(b, sp, st // sp, hl, d).permute(1, 0, 2, 3, 4)  # [sp (token owner), B, S, H/sp, D]
    recv = _AllToAll.apply(send, group)  # [sp (head owner), B, S, H/sp, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, st // sp, sp * hl, d)


class SequenceParallel:
    """One rank's view of a sequence-parallel group for teacher forcing.

    `attention(tokens_per_frame, device)` gives the `attention=` callable for `WanModel.forward`;
    its global mask is built once per geometry and reused across steps.
    """

    def __init__(self, group, num_frames: int, chunk_frames: int, layout: str = "balanced", num_heads: int | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if num_heads is not None and num_heads % self.size:
            raise ValueError(f"sequence_parallel_size {self.size} does not divide the {num_heads} attention heads")
        self.num_frames, self.chunk_frames, self.layout = num_frames, chunk_frames, layout
        self.shards = shard_sequence(num_frames, chunk_frames, self.size, layout)
        self.shard = self.shards[self.rank]
        self._masks: dict = {}

    def global_layout(self, tokens_per_frame: int, device=None) -> ChunkLayout:
        """Layout of the gathered sequence: every rank's `[clean; noisy]` tokens in rank order."""
        parts = [s.layout(self.chunk_frames, tokens_per_frame, device) for s in self.shards]
        return ChunkLayout(torch.cat([p.chunk for p in parts]), torch.cat([p.noisy for p in parts]))

    def _mask(self, tokens_per_frame: int, device: torch.device):
        key = (tokens_per_frame, str(device))
        if key not in self._masks:
            layout = self.global_layout(tokens_per_frame, device)
            self._masks[key] = layout.block_mask() if device.type == "cuda" else layout.dense_mask()
        return self._masks[key]

    def attention(self, tokens_per_frame: int, device: torch.device) -> Callable:
        mask = self._mask(tokens_per_frame, torch.device(device))
        group, sp = self.group, self.size

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if sp == 1:
                return masked_attention(q, k, v, mask)
            q, k, v = qkv_to_sequence(q, k, v, group, sp)
            return sequence_to_heads(masked_attention(q, k, v, mask), group, sp)

        return attend


class UlyssesGroup:
    """A sequence-parallel group for cached inference (spec 4): rank r of `size` holds frames
    `[r*F/size, (r+1)*F/size)` of every chunk and heads `[r*H/size, (r+1)*H/size)` of the KV cache.

    Per layer, Q, K, V go from tokens to heads in one all-to-all, attention runs over the head-sharded
    cache with all of the chunk's tokens, and the output comes back in a second all-to-all; after the
    head, `gather_tokens` gives every rank the whole chunk (it runs the sampler step itself).
    """

    def __init__(self, group, size: int, rank: int) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"UlyssesGroup: rank {rank} is not in [0, {size})")
        self.group, self.size, self.rank = group, size, rank

    def frame_range(self, frames: int) -> tuple[int, int]:
        """This rank's frames of a chunk of `frames` latent frames."""
        if frames % self.size:
            raise ValueError(f"sequence parallel: {self.size} ranks cannot split a chunk of {frames} frames into whole frames")
        n = frames // self.size
        return self.rank * n, (self.rank + 1) * n

    @torch.compiler.disable  # collectives and the cache step stay eager inside compiled blocks
    def attend(self, cache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Local-token q, k, v `[B, S/sp, H, D]` -> attention over the head-sharded `cache` -> `[B, S/sp, H, D]`.

        With `cache.kv_quant_comm`, K and V travel as NVFP4 codes and scales (4.5 instead of 16 bits per
        value): each rank quantizes its tokens with the whole chunk's scales, the receivers store them
        as they are, and the current chunk's attention reads them quantized too."""
        if getattr(cache, "kv_quant_comm", False):
            return self._attend_fp4(cache, layer, q, k, v)
        q, k, v = qkv_to_sequence(q, k, v, self.group, self.size)
        return sequence_to_heads(cache.attend(layer, q, k, v), self.group, self.size)

    @torch.compiler.disable
    def attend_projections(self, cache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           wq: torch.Tensor | None, wk: torch.Tensor | None, eps: float, cos: torch.Tensor,
                           sin: torch.Tensor, need_output: bool = True) -> torch.Tensor | None:
        """`attend` from the raw projections `q, k, v [B, S/sp, H*D]` (BF16 cache): q/k norm, RoPE and the
        all-to-all's send buffer are one kernel (`fused.norm_rope_pack`) instead of norm and RoPE ops, a stack
        and a permuting copy. With `need_output=False` (a refresh's last layer) only the cache is written
        and None is returned."""
        from longlive.models.wan.fused import norm_rope_pack

        b, s, hd = q.shape
        d = 2 * cos.shape[-1]
        send = norm_rope_pack(q, k, v, wq, wk, eps, cos, sin, d, self.size)  # [sp (head owner), B, S/sp, 3, H/sp, D]
        recv = _AllToAll.apply(send, self.group)  # [sp (token owner), B, S/sp, 3, H/sp, D]
        q, k, v = recv.transpose(0, 1).reshape(b, self.size * s, 3, hd // d // self.size, d).unbind(2)
        if not need_output:
            cache.update(layer, k, v)
            return None
        return sequence_to_heads(cache.attend(layer, q, k, v), self.group, self.size)

    def _attend_fp4(self, cache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, h, d = q.shape
        sp = self.size
        send_q = q.reshape(b, s, sp, h // sp, d).permute(2, 0, 1, 3, 4)  # [sp (head owner), B, S/sp, H/sp, D]
        q = _AllToAll.apply(send_q, self.group).permute(1, 0, 2, 3, 4).reshape(b, sp * s, h // sp, d)
        kv, ks, vv, vs, kdec, vdec, kmean = cache.fp4_stage(layer, k, v)
        widths = (kv.shape[-1], ks.shape[-1], vv.shape[-1], vs.shape[-1])
        payload = torch.cat([kv, ks, vv, vs], dim=-1)  # uint8 [B, H, S/sp, D/2 + D/16 + D/2 + D/16]
        send = payload.reshape(b, sp, h // sp, s, -1).transpose(0, 1)  # [sp (head owner), B, H/sp, S/sp, bytes]
        recv = _AllToAll.apply(send, self.group)  # [sp (token owner), B, H/sp, S/sp, bytes]
        recv = recv.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * s, -1)
        kv, ks, vv, vs = recv.split(widths, dim=-1)
        heads = slice(self.rank * (h // sp), (self.rank + 1) * (h // sp))
        mean = None if kmean is None else kmean[:, heads]
        out = cache.attend_received(layer, q, kv, ks, vv, vs, kdec, vdec, mean)
        return sequence_to_heads(out, self.group, self.size)

    def broadcast_(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite `x` on every rank with the group's first rank's copy (inputs of one video: noise and
        prompt embeddings must be bit-identical across the group, whatever each rank computed)."""
        dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    @torch.compiler.disable
    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S/sp, ...]` on every rank -> `[B, S, ...]` (tokens in rank order) on every rank."""
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=self.group)  # rank blocks stacked along dim 0
        return out.unflatten(0, (self.size, x.shape[0])).movedim(0, 1).flatten(1, 2)
