"""Process layout of sequence-parallel inference (spec 4): SP groups, data-parallel groups, prompt split.

`sp_size` consecutive ranks form one sequence-parallel group that generates one video together
(Ulysses: each rank holds a contiguous slice of every chunk's frames and 1/sp of the attention heads
of the KV cache). The groups split the prompts between them like data-parallel ranks: group g takes
jobs g, g+G, g+2G, ... so every prompt is generated exactly once. With `auto_sp_remainder` a world
that is not a multiple of `sp_size` ends with one smaller group (its size must also be a valid SP size).
Only the first rank of a group (`is_writer`) builds the VAE, decodes and writes files.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .mesh import start_process_group
from .sequence import UlyssesGroup

log = logging.getLogger(__name__)


def sp_size_problem(size: int, num_heads: int, chunk_frames: int) -> str | None:
    """Why `size` cannot be a sequence-parallel group size, or None when it can."""
    if size < 1:
        return f"{size} is not a positive group size"
    if num_heads % size:
        return f"{size} does not divide the {num_heads} attention heads (the KV cache is split by head)"
    if chunk_frames % size:
        return f"{size} does not divide the {chunk_frames} latent frames per chunk (each rank holds whole frames)"
    return None


def plan_groups(world: int, sp_size: int, dp_size: int | None, auto_sp_remainder: bool,
                num_heads: int, chunk_frames: int) -> list[list[int]]:
    """Ranks of each SP group (consecutive ranks). `dp_size=None` means "as many groups as fit"."""
    problem = sp_size_problem(sp_size, num_heads, chunk_frames)
    if problem:
        raise ValueError(f"sp_size: {problem}; valid sizes divide both")
    if auto_sp_remainder:
        sizes = [sp_size] * (world // sp_size) + ([world % sp_size] if world % sp_size else [])
        if sizes and sizes[-1] != sp_size:
            problem = sp_size_problem(sizes[-1], num_heads, chunk_frames)
            if problem:
                raise ValueError(f"auto_sp_remainder: the {world} processes leave a last group of {sizes[-1]} ranks, and "
                                 f"{problem}; start a multiple of sp_size={sp_size} processes")
        if dp_size is not None and dp_size != len(sizes):
            raise ValueError(f"dp_size: {dp_size} groups requested, but {world} processes with sp_size={sp_size} and "
                             f"auto_sp_remainder make {len(sizes)} groups ({sizes})")
    else:
        if world % sp_size:
            raise ValueError(f"sp_size: {sp_size} does not divide the {world} processes started by torchrun "
                             f"(world = sp_size x dp_size); set auto_sp_remainder: true to allow a smaller last group")
        sizes = [sp_size] * (world // sp_size)
        if dp_size is not None and dp_size != len(sizes):
            raise ValueError(f"dp_size: sp_size x dp_size = {sp_size} x {dp_size} = {sp_size * dp_size} processes, but "
                             f"torchrun started {world}; launch with --nproc_per_node={sp_size * dp_size} (per node)")
    groups, start = [], 0
    for size in sizes:
        groups.append(list(range(start, start + size)))
        start += size
    return groups


@dataclass
class InferenceParallel:
    """One rank's place in the inference layout."""

    rank: int
    world_size: int
    groups: list[list[int]]
    group_index: int
    sp: UlyssesGroup | None  # None when this rank's group has one rank
    owns_process_group: bool = False

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def sp_size(self) -> int:
        return 1 if self.sp is None else self.sp.size

    @property
    def sp_rank(self) -> int:
        return 0 if self.sp is None else self.sp.rank

    @property
    def is_writer(self) -> bool:
        """The rank of its group that decodes and writes the group's files."""
        return self.sp_rank == 0

    def my_jobs(self, jobs: list) -> list:
        """This group's share of `jobs` (group g takes g, g+G, ...): every job exactly once over the groups."""
        return jobs[self.group_index :: self.num_groups]

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_inference_parallel(sp_size: int, dp_size: int | None, auto_sp_remainder: bool, num_heads: int,
                            chunk_frames: int, device: torch.device) -> InferenceParallel:
    """Join (or start, under torchrun) the process group and build the SP groups.

    With sp_size 1 the groups are single ranks that never talk to each other, so no process group is
    started (plain data parallelism from torchrun's RANK / WORLD_SIZE).
    """
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not dist.is_initialized() and sp_size == 1:
        groups = plan_groups(env_world, 1, dp_size, auto_sp_remainder, num_heads, chunk_frames)
        return InferenceParallel(env_rank, env_world, groups, env_rank, None)
    if not dist.is_initialized() and env_world == 1:
        raise ValueError(f"sp_size: {sp_size} needs {sp_size} x dp_size processes; launch with "
                         f"torchrun --nproc_per_node={sp_size * (dp_size or 1)} -m longlive.cli.main generate ...")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        start_process_group(backend, timeout=timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = plan_groups(world, sp_size, dp_size, auto_sp_remainder, num_heads, chunk_frames)
    index = next(i for i, g in enumerate(groups) if rank in g)
    mine = None
    for i, g in enumerate(groups):  # every rank creates every group, in the same order (a collective)
        pg = dist.new_group(g) if len(g) > 1 else None
        if i == index and pg is not None:
            mine = UlyssesGroup(pg, len(g), g.index(rank))
    log.info("rank %d/%d: SP group %d of %d (ranks %s), sp rank %d", rank, world, index, len(groups), groups[index],
             0 if mine is None else mine.rank)
    return InferenceParallel(rank, world, groups, index, mine, owns)
