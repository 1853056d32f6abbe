"""Row-parallel VAE decoding: the ranks of a group each decode a horizontal band of every frame.

Under sequence parallelism every rank ends a chunk with the whole latent chunk, but one rank decoding
it alone makes the VAE the end-to-end bottleneck (docs/benchmarks.md). Here rank i of N decodes
latent rows `[i*h/N, (i+1)*h/N)`. The decoder is local per row except in three places, which
exchange data so that the result equals a one-process decode (up to the convolutions' summation
order):
- a convolution with spatial padding p needs p rows from each neighbouring rank (zeros at the top
  and bottom of the frame) instead of zeros at its band's edges: the band is convolved zero-padded
  and the p output rows at each inner edge are recomputed with the neighbours' rows (`RowSplit.conv`);
  a residual block exchanges 2 rows once for both of its convolutions and runs them on the band
  extended by those rows (`ResidualBlock._forward_band`);
- the middle attention block (global over each frame's pixels) gathers the whole frame;
- the pixel bands are gathered into whole frames on the group's first rank at the end
  (`RowSplit.gather_to_first`).
Everything else (norms, activations, nearest up-sampling, channel-to-space shortcuts, the causal
time caches) is per pixel or per row.
`WanVAE.split_rows(split)` switches a VAE to this mode; `RowParallelChunkDecoder`
(`longlive.pipelines.decode`, mode "rows") uses it chunk by chunk.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


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

    def start_exchange(self, x: torch.Tensor, p: int) -> "HaloExchange":
        """Send the first and last `p` rows of this rank's band `x [..., rows, W]` to the neighbouring ranks
        and receive theirs; `.wait()` gives (rows from above, rows from below), None at the frame's edges."""
        if x.shape[-2] < p:
            raise ValueError(f"RowSplit: a band of {x.shape[-2]} rows cannot give {p} halo rows")
        top = bottom = None
        ops = []
        if self.index > 0:
            up = self.ranks[self.index - 1]
            top = torch.empty_like(x[..., :p, :], memory_format=torch.contiguous_format)
            ops += [dist.P2POp(dist.isend, x[..., :p, :].contiguous(), up, self.group),
                    dist.P2POp(dist.irecv, top, up, self.group)]
        if self.index < self.size - 1:
            down = self.ranks[self.index + 1]
            bottom = torch.empty_like(x[..., -p:, :], memory_format=torch.contiguous_format)
            ops += [dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), down, self.group),
                    dist.P2POp(dist.irecv, bottom, down, self.group)]
        return HaloExchange(dist.batch_isend_irecv(ops) if ops else [], top, bottom)

    def conv(self, x: torch.Tensor, p: int, conv: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """A row-stride-1 convolution of `2p+1` rows over this rank's band `x [..., rows, W]` as if the
        neighbouring bands were there (zeros beyond the frame). `conv(t, pad)` convolves `t` padded with
        `pad` zero rows on each side (inside the convolution).

        The band is convolved zero-padded, without a padded copy of it; meanwhile p rows are exchanged
        with each neighbour, and then the p output rows at each inner edge are recomputed from a slab
        of 3p rows (p halo rows and 2p band rows). A band thinner than 2p rows is convolved extended by
        its halo rows instead."""
        if p == 0:
            return conv(x, 0)
        exchange = self.start_exchange(x, p)
        thin = x.shape[-2] < 2 * p
        out = None if thin else conv(x, p)  # every row but the inner edges' is final
        top, bottom = exchange.wait()
        if thin:
            zeros = torch.zeros_like(x[..., :p, :])
            return conv(torch.cat([zeros if top is None else top, x, zeros if bottom is None else bottom], dim=-2), 0)
        if top is not None:
            out[..., :p, :] = conv(torch.cat([top, x[..., : 2 * p, :]], dim=-2), 0)
        if bottom is not None:
            out[..., -p:, :] = conv(torch.cat([x[..., -2 * p :, :], bottom], dim=-2), 0)
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



class HaloExchange:
    """Halo rows in flight (`RowSplit.start_exchange`)."""

    def __init__(self, requests: list, top: torch.Tensor | None, bottom: torch.Tensor | None) -> None:
        self._requests, self._top, self._bottom = requests, top, bottom

    def wait(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for req in self._requests:
            req.wait()
        self._requests = []
        return self._top, self._bottom
