"""Process groups of a training run: data parallel x sequence parallel, and the FSDP mesh.

Ranks `[g*sp, (g+1)*sp)` form sequence-parallel group g (spec 5.2); ranks with the same position in
their SP group form a data-parallel group. FSDP shards over all ranks ("full"), or inside a node and
replicates across nodes ("hybrid_full" / "hybrid_zero2"), or replicates everywhere ("no_shard").
A run without torchrun is a world of one process with the same code path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)

_started_process_group = False


def start_process_group(backend: str, **kwargs) -> None:
    """`dist.init_process_group`, remembered for the CLI's exit (`longlive.cli.main.entry`)."""
    global _started_process_group
    dist.init_process_group(backend, **kwargs)
    _started_process_group = True


def process_group_started() -> bool:
    """Whether this process started a process group (its gloo / NCCL threads may outlive it)."""
    return _started_process_group


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    device: torch.device
    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    sp_group: object
    dp_group: object
    fsdp_mesh: DeviceMesh
    reshard_after_forward: bool
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_sp_root(self) -> bool:
        """The rank of its SP group that reads the batch and writes per-group outputs."""
        return self.sp_rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            # every rank reaches this point before any tears down (a rank destroying gloo while a peer
            # still finishes its last collective aborted with "terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()


def _fsdp_mesh(device_type: str, world: int, strategy: str) -> tuple[DeviceMesh, bool]:
    if strategy == "full":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",)), True
    if strategy == "no_shard":
        return init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard")), True
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise ValueError(f"infra.sharding_strategy {strategy}: world size {world} is not a multiple of the "
                         f"{local} processes per node (LOCAL_WORLD_SIZE)")
    mesh = init_device_mesh(device_type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    return mesh, strategy != "hybrid_zero2"


def init_parallel(sp_size: int, sharding_strategy: str = "full", device: str | torch.device | None = None) -> ParallelContext:
    """Initialise (or join) the process group and build the SP, DP and FSDP groups."""
    owns = not dist.is_initialized()
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            start_process_group(backend, timeout=timedelta(minutes=30), device_id=device if device.type == "cuda" else None)
        else:  # a single process without torchrun
            start_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp_size:
        raise ValueError(f"infra.sequence_parallel_size {sp_size} does not divide the world size {world} "
                         f"(world = data parallel x sequence parallel)")
    dp = world // sp_size
    mesh = init_device_mesh(device.type, (dp, sp_size), mesh_dim_names=("dp", "sp"))
    fsdp_mesh, reshard = _fsdp_mesh(device.type, world, sharding_strategy)
    ctx = ParallelContext(rank, world, device, dp, sp_size, rank // sp_size, rank % sp_size,
                          mesh["sp"].get_group(), mesh["dp"].get_group(), fsdp_mesh, reshard, owns)
    log.info("rank %d/%d on %s: dp %d/%d, sp %d/%d, fsdp mesh %s", rank, world, device, ctx.dp_rank, dp,
             ctx.sp_rank, sp_size, tuple(fsdp_mesh.shape))
    return ctx
