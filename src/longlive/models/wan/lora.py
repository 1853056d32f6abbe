"""LoRA adapters on the DiT's block linears through PEFT, in the reference's checkpoint key layout.

Targets: every linear of every transformer block (self/cross-attention q, k, v, o and ffn.0, ffn.2:
10 per block, 300 for the 5B model). Checkpoints hold PEFT adapter state dicts with the adapter
name stripped and the `base_model.model.` prefix (`base_model.model.blocks.3.ffn.0.lora_A.weight`),
as `{generator_lora, critic_lora, step}` or as a bare dict.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ...io.checkpoint import CheckpointError, read_checkpoint

TARGET_MODULES = r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"
PEFT_PREFIX = "base_model.model."


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA adapters (PEFT) into the block linears of `model`, in place; returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES)
    return inject_adapter_in_model(config, model, adapter_name=adapter_name)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter weights in the reference layout (`base_model.model.<path>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {PEFT_PREFIX + k: v.detach() for k, v in sd.items()}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str = "default",
                         source: str = "LoRA state") -> None:
    """Load adapter weights strictly: every adapter of the model must be present, nothing extra."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit the adapters of this model (rank/targets from the `adapter` config section): "
            f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, shape mismatches {shapes[:4]}"
        )
    set_peft_model_state_dict(model, sd, adapter_name=adapter_name)


def read_lora_checkpoint(path: str | os.PathLike, role: str = "generator") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `{generator_lora, critic_lora, step}` (or a bare PEFT dict); returns (adapter state, metadata)."""
    obj, header = read_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a LoRA checkpoint (got {type(obj).__name__})")
    key = f"{role}_lora"
    meta = {k: v for k, v in obj.items() if not isinstance(v, (Mapping, torch.Tensor))}
    if key in obj:
        return dict(obj[key]), {**header, **meta}
    if any(".lora_A." in k or ".lora_B." in k for k in obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, header
    if "generator" in obj or "model" in obj:
        raise CheckpointError(f"{path}: this is a full generator checkpoint, not a LoRA checkpoint; give it as generator_ckpt")
    raise CheckpointError(f"{path}: no '{key}' entry and no lora_A/lora_B keys; keys: {sorted(obj)[:8]}")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear and remove the adapters (original module names return)."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in targets:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


@contextmanager
def active_adapter(module: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run `module` with one LoRA adapter active (None: the base alone), restoring the previous state.

    Sets PEFT's active-adapter / disabled flags directly instead of `set_adapter` / `enable_adapters`,
    which also flip `requires_grad` (that must stay fixed once FSDP2 has sharded the parameters).
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if adapter is None:
            m._disable_adapters = True
        else:
            m._active_adapter = [adapter]
            m._disable_adapters = False
    try:
        yield
    finally:
        for m, (a, d) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = a, d
