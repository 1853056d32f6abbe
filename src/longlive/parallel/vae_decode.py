"""Row-parallel VAE decoding: the ranks of a group each decode a horizontal band of every frame.

Under sequence parallelism every rank ends a chunk with the whole latent chunk, but one rank decoding
it alone makes the VAE the end-to-end bottleneck (docs/benchmarks.md). Here rank i of N decodes
latent rows `[i*h/N, (i+1)*h/N)`. The decoder is local per row except in three places, which
exchange data so that the result equals a one-process decode (up to the convolutions' summation
order):
- a convolution with spatial padding p takes p rows from each neighbouring rank (zeros at the top
  and bottom of the frame) instead of padding its band with zeros (`RowSplit.extend`);
- the middle attention block (global over each frame's pixels) gathers the whole frame;
- the pixel bands are gathered into whole frames on the group's first rank at the end
  (`RowSplit.gather_to_first`).
Everything else (norms, activations, nearest up-sampling, channel-to-space shortcuts, the causal
time caches) is per pixel or per row.
`WanVAE.split_rows(split)` switches a VAE to this mode; `RowParallelChunkDecoder`
(`longlive.pipelines.decode`, mode "rows") uses it chunk by chunk.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.vae.layers import _memory_format


class RowSplit:
    """This rank's band of every frame within a process group, and the exchanges a banded decode needs."""

    def __init__(self, group=None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("RowSplit needs an initialised torch.distributed process group")
        self.group = group
        self.ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.size = len(self.ranks)
        self.index = self.ranks.index(dist.get_rank())

    def rows(self, height: int) -> slice:
        """This rank's rows of a frame `height` rows high (the bands are equal: height % size == 0)."""
        if height % self.size:
            raise ValueError(f"RowSplit: {height} rows do not split into {self.size} equal bands; use a height whose "
                             f"latent rows are a multiple of {self.size}")
        n = height // self.size
        return slice(self.index * n, (self.index + 1) * n)

    def extend(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """`x [..., rows, W]` with `p` rows of the neighbouring bands above and below (zeros beyond the frame)."""
        if p == 0:
            return x
        if x.shape[-2] < p:
            raise ValueError(f"RowSplit.extend: a band of {x.shape[-2]} rows cannot give {p} halo rows")
        top = torch.zeros_like(x[..., :p, :], memory_format=torch.contiguous_format)
        bottom = torch.zeros_like(top)
        ops = []
        if self.index > 0:
            up = self.ranks[self.index - 1]
            ops += [dist.P2POp(dist.isend, x[..., :p, :].contiguous(), up, self.group),
                    dist.P2POp(dist.irecv, top, up, self.group)]
        if self.index < self.size - 1:
            down = self.ranks[self.index + 1]
            ops += [dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), down, self.group),
                    dist.P2POp(dist.irecv, bottom, down, self.group)]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        # assembled in x's memory format (a channels-last band stays channels-last for the convolution)
        rows = x.shape[-2]
        out = torch.empty((*x.shape[:-2], rows + 2 * p, x.shape[-1]), dtype=x.dtype, device=x.device,
                          memory_format=_memory_format(x))
        out[..., :p, :] = top
        out[..., p : p + rows, :] = x
        out[..., p + rows :, :] = bottom
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole frames `[..., size*rows, W]` from every rank's band `x [..., rows, W]` (on every rank)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-2)

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole frames on the group's first rank (the writer), None on the others: the decoded pixels
        are needed in one place only, so the other ranks do not hold a copy of every frame."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.index == 0 else None
        dist.gather(x, parts, dst=self.ranks[0], group=self.group)
        return None if parts is None else torch.cat(parts, dim=-2)

