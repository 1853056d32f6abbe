"""Attention backends and the chunk masks, in one small layer.

- dense, unmasked (bidirectional, KV-cache inference, cross-attention): PyTorch SDPA; on CUDA the
  cuDNN backend is preferred (664 vs 359 TFLOP/s for flash at our shapes on an H200), then flash.
- masked (block-causal and teacher forcing): `flex_attention` with a block mask on GPU; a dense
  boolean mask through SDPA on CPU (flex_attention has no CPU backward).
Masks are described per token by its chunk index and whether it is a noisy (teacher-forcing
target) token; one rule covers block-causal and teacher-forcing layouts in any token order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         kv_heads_first: bool = False) -> torch.Tensor:
    """Softmax attention on `[B, S, H, D]` tensors, returning `[B, S, H, D]`.

    With `kv_heads_first`, k and v are already `[B, H, S, D]` (the KV cache layout): cuDNN then reads
    them in place instead of copying a strided 28k-token window every call.
    """
    q = q.transpose(1, 2)
    if not kv_heads_first:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class ChunkLayout:
    """Per-token chunk index and noisy flag of a sequence; defines the attention mask.

    Rule: a key is visible to a query iff
      (key clean and (key chunk < query chunk, or key chunk == query chunk and query clean)), or
      (key noisy and query noisy and same chunk).
    With no noisy tokens this is the plain block-causal mask; with `[clean; noisy]` it is the
    teacher-forcing mask of spec 2.2; any permutation (e.g. Balanced SP's natural order) works.
    """

    chunk: torch.Tensor  # [S] int64
    noisy: torch.Tensor  # [S] bool

    @staticmethod
    def block_causal(num_frames: int, chunk_frames: int, tokens_per_frame: int, device=None) -> "ChunkLayout":
        chunk = (torch.arange(num_frames, device=device) // chunk_frames).repeat_interleave(tokens_per_frame)
        return ChunkLayout(chunk, torch.zeros_like(chunk, dtype=torch.bool))

    @staticmethod
    def teacher_forcing(num_frames: int, chunk_frames: int, tokens_per_frame: int, device=None) -> "ChunkLayout":
        half = ChunkLayout.block_causal(num_frames, chunk_frames, tokens_per_frame, device)
        return ChunkLayout(torch.cat([half.chunk, half.chunk]), torch.cat([half.noisy, ~half.noisy]))

    def dense_mask(self) -> torch.Tensor:
        """Boolean `[S, S]` mask (True = attend)."""
        return _visible(self.chunk[:, None], self.noisy[:, None], self.chunk[None, :], self.noisy[None, :])

    def block_mask(self, block: int = 128, rows_per_pass: int = 2048):
        """A flex_attention BlockMask for this layout, built without an `[S, S]` mask in memory.

        `create_block_mask` materialises the dense mask (114 GB for the 338k tokens of a 32 s clip);
        here the block table is computed `rows_per_pass` query tokens at a time. A tile is "full" when
        every pair in it is visible and it lies inside the sequence, "partial" (mask_mod applied) when
        some pair is visible.
        """
        from torch.nn.attention.flex_attention import BlockMask

        chunk, noisy = self.chunk, self.noisy
        n = chunk.numel()
        nb = -(-n // block)
        pad = nb * block - n
        # padded keys/queries are invisible: chunk -1 clean keys are "earlier" than everything, so mark
        # them with a flag instead and clear them explicitly
        ck = torch.cat([chunk, chunk.new_zeros(pad)])
        nk = torch.cat([noisy, noisy.new_zeros(pad)])
        real = torch.arange(nb * block, device=chunk.device) < n
        rows = max(block, rows_per_pass // block * block)
        any_parts, all_parts = [], []
        for start in range(0, nb * block, rows):
            stop = min(start + rows, nb * block)
            vis = _visible(ck[start:stop, None], nk[start:stop, None], ck[None, :], nk[None, :])
            vis &= real[start:stop, None] & real[None, :]
            tiles = vis.view((stop - start) // block, block, nb, block)
            any_parts.append(tiles.any(dim=3).any(dim=1))
            all_parts.append(tiles.all(dim=3).all(dim=1))
        full = torch.cat(all_parts)
        partial = torch.cat(any_parts) & ~full

        def table(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            counts = m.sum(dim=1, dtype=torch.int32)
            order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)  # True tiles first, ascending
            return counts[None, None], order[None, None]

        def mask_mod(b, h, q_idx, kv_idx):
            return _visible(chunk[q_idx], noisy[q_idx], chunk[kv_idx], noisy[kv_idx])

        kv_num, kv_idx = table(partial)
        full_num, full_idx = table(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                        seq_lengths=(n, n))


def _visible(cq, nq, ck, nk):
    clean_ok = ~nk & ((ck < cq) | ((ck == cq) & ~nq))
    noisy_ok = nk & nq & (ck == cq)
    return clean_ok | noisy_ok


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Attention under a layout mask: a BlockMask (flex, GPU) or a dense bool mask (SDPA)."""
    if isinstance(mask, torch.Tensor):
        return sdpa(q, k, v, mask)
    if q.is_cuda:
        flex = _compiled_flex()
    else:  # eager flex_attention: forward only on CPU, used by tests of the mask rule
        from torch.nn.attention.flex_attention import flex_attention as flex
    out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return out.transpose(1, 2)
