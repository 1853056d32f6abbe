"""Apply FSDP2 (and activation checkpointing, compile) to a built WanModel, from outside the model.

One FSDP unit per transformer block plus the root (embeddings, head). Parameters are kept in fp32
(the optimizer's master weights) and cast to bf16 for compute with fp32 gradient reduction when
mixed precision is on. The whole model is loaded on rank 0 only and broadcast into the shards, so a
5B model never sits in host memory once per rank.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from longlive.models.wan import WanModel
from longlive.parallel.mesh import ParallelContext


def shard_model(model: WanModel, ctx: ParallelContext, *, mixed_precision: bool, gradient_checkpointing: bool,
                compile_blocks: bool = False) -> WanModel:
    """fully_shard each block and the root on `ctx.fsdp_mesh`; the model may be on the meta device."""
    # cast_forward_inputs off: the model casts its own inputs and keeps modulation and RoPE tables in fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None,
                              reduce_dtype=torch.float32 if mixed_precision else None, cast_forward_inputs=False)
    model.gradient_checkpointing = gradient_checkpointing
    if compile_blocks:
        model.compile_blocks()
    for block in model.blocks:
        fully_shard(block, mesh=ctx.fsdp_mesh, mp_policy=mp, reshard_after_forward=ctx.reshard_after_forward)
    fully_shard(model, mesh=ctx.fsdp_mesh, mp_policy=mp, reshard_after_forward=ctx.reshard_after_forward)
    return model


def load_full_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None, ctx: ParallelContext) -> None:
    """Fill a sharded model from a full state dict given on rank 0 (other ranks pass None)."""
    if ctx.is_main and state is None:
        raise ValueError("rank 0 must provide the full state dict")
    set_model_state_dict(model, dict(state) if ctx.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
