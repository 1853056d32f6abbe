"""Wan DiT checkpoints in every layout users have, converted in one place (spec 1.4).

Canonical keys are the original Wan names (`blocks.0.self_attn.q.weight`, ...). Accepted inputs:
- original Wan folders (config.json + sharded safetensors) and single files;
- diffusers `WanTransformer3DModel` weights (keys converted, both directions);
- LongLive checkpoints: training `{generator, generator_ema, generator_optimizer, step}`,
  `{model: ...}`, merged exports with metadata, raw dicts with the `model.` wrapper prefix and
  FSDP / activation-checkpoint / compile wrapper fragments.
A wrong or partial checkpoint raises an error naming missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ...io.checkpoint import CheckpointError, read_checkpoint, write_safetensors, write_torch
from .config import WanConfig

log = logging.getLogger(__name__)

WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
MERGED_FORMAT = "longlive_generator_merged_lora"
NVFP4_FORMAT = "longlive_generator_nvfp4"
TE_FORMAT = "longlive_generator_merged_bf16"
REJECTED_FORMATS = {"longlive_generator_te_nvfp4": "legacy TE NVFP4 export; re-export it with `longlive export nvfp4`"}

# One table, used in both directions: (original Wan name, diffusers name). Top-level entries match
# a key prefix (or the whole key when it has no trailing dot); block entries apply after `blocks.N.`.
_TOP_LEVEL = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("patch_embedding.", "patch_embedding."),
]
_IN_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("norm3.", "norm2."),  # the affine LayerNorm before cross-attention
    *[(f"{orig}.{x}.", f"{new}.to_{x}.") for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2")) for x in "qkv"],
    *[(f"{orig}.o.", f"{new}.to_out.0.") for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2"))],
    *[(f"{orig}.norm_{x}.", f"{new}.norm_{x}.") for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2")) for x in "qk"],
]
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _map_name(name: str, table, to_diffusers: bool) -> str | None:
    for orig, diff in table:
        src, dst = (orig, diff) if to_diffusers else (diff, orig)
        if (src.endswith(".") and name.startswith(src)) or name == src:
            return dst + name[len(src):]
    return None


def _rename(sd: Mapping[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        new = m.group(1) + rest if m and (rest := _map_name(m.group(2), _IN_BLOCK, to_diffusers)) else None
        new = new if m else _map_name(key, _TOP_LEVEL, to_diffusers)
        if new is None:
            direction = "to the diffusers layout" if to_diffusers else "from the diffusers layout"
            raise CheckpointError(f"cannot convert key {key!r} {direction}: it is not a Wan DiT parameter")
        out[new] = value
    return out


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys -> diffusers `WanTransformer3DModel` keys."""
    return _rename(sd, to_diffusers=True)


def from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `WanTransformer3DModel` keys -> original Wan keys."""
    return _rename(sd, to_diffusers=False)


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def is_nvfp4_state_dict(keys) -> bool:
    return any(k.endswith("quantized_weight_values") for k in keys)


def unwrap_checkpoint(obj: Any, *, use_ema: bool = False, source: str = "checkpoint",
                      allow_nvfp4: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pick the generator state dict out of any LongLive/Wan checkpoint object (spec 1.4 rules).

    Returns (state dict with canonical Wan keys, metadata of the container).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    meta = {k: v for k, v in obj.items() if not isinstance(v, (Mapping, torch.Tensor))}
    if isinstance(obj.get("quantization"), Mapping):  # NVFP4 export metadata (rules), not a state dict
        meta["quantization"] = dict(obj["quantization"])
    fmt = meta.get("checkpoint_format")
    if fmt in REJECTED_FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format {fmt!r} is not supported: {REJECTED_FORMATS[fmt]}")
    if "generator" in obj or "generator_ema" in obj:
        if use_ema and "generator_ema" in obj:
            sd = obj["generator_ema"]
        elif use_ema:
            raise CheckpointError(f"{source}: use_ema is set but the checkpoint has no 'generator_ema' entry (keys: {sorted(obj)})")
        elif "generator" in obj:
            sd = obj["generator"]
        else:
            raise CheckpointError(f"{source}: only 'generator_ema' is present; set use_ema to load it")
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif "generator_lora" in obj:
        raise CheckpointError(
            f"{source}: this is a LoRA checkpoint ({{generator_lora, critic_lora, step}}); give it as "
            "checkpoints.lora_ckpt together with a base generator_ckpt, or merge it with `longlive export merge-lora`"
        )
    else:
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: state dict entries that are not tensors: {bad[:8]}")
    return normalize_keys(sd, source=source, allow_nvfp4=allow_nvfp4), meta


def normalize_keys(sd: Mapping[str, torch.Tensor], source: str = "checkpoint", allow_nvfp4: bool = False) -> dict[str, torch.Tensor]:
    """Strip wrapper fragments and the `model.` prefix; convert diffusers keys to Wan keys."""
    out = {}
    for key, value in sd.items():
        for frag in WRAPPER_FRAGMENTS:
            key = key.replace(frag, "")
        out[key] = value
    if out and all(k.startswith("model.") for k in out):
        out = {k[len("model.") :]: v for k, v in out.items()}
    if is_nvfp4_state_dict(out) and not allow_nvfp4:
        raise CheckpointError(
            f"{source}: this is a compact NVFP4 checkpoint (quantized_weight_* buffers); it can only be loaded "
            "into a quantized model (model_quant), not into a BF16 DiT"
        )
    if is_diffusers_layout(out):
        out = from_diffusers(out)
    return out


def load_state_dict(path: str | os.PathLike, *, use_ema: bool = False,
                    allow_nvfp4: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read any supported DiT checkpoint file or folder into canonical Wan keys (+ its metadata).
    `allow_nvfp4` accepts compact NVFP4 checkpoints (for a model converted by `prepare_compact_model`)."""
    obj, header_meta = read_checkpoint(path)
    sd, meta = unwrap_checkpoint(obj, use_ema=use_ema, source=str(path), allow_nvfp4=allow_nvfp4)
    meta = {**header_meta, **meta}
    return sd, meta


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a CheckpointError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:10]) + (f" ... (+{len(items) - 10} more)" if len(items) > 10 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {show(shapes)}")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))


def load_weights(model: torch.nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *, use_ema: bool = False,
                 allow_nvfp4: bool = False) -> dict[str, Any]:
    """Strictly load DiT weights from a path or a state dict into `model`; returns checkpoint metadata."""
    if isinstance(source, Mapping):
        sd, meta = unwrap_checkpoint(source, use_ema=use_ema, source="state dict", allow_nvfp4=allow_nvfp4)
        name = "state dict"
    else:
        sd, meta = load_state_dict(source, use_ema=use_ema, allow_nvfp4=allow_nvfp4)
        name = str(source)
    check_state_dict(model, sd, name)
    model.load_state_dict(sd, strict=True, assign=any(t.is_meta for t in (*model.parameters(), *model.buffers())))
    return meta


def load_config(path: str | os.PathLike) -> WanConfig | None:
    """The WanConfig of a checkpoint folder (`config.json`), or None for a single file."""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else None
    return WanConfig.from_json(cfg) if cfg is not None and cfg.exists() else None


def save_folder(model_or_sd, folder: str | os.PathLike, config: WanConfig, *, layout: str = "wan",
                max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write a checkpoint folder (config.json + sharded safetensors + index) in `wan` or `diffusers` layout."""
    import json

    sd = _state_dict_of(model_or_sd)
    if layout == "diffusers":
        sd, cfg = to_diffusers(sd), config.to_diffusers_dict()
    elif layout == "wan":
        cfg = config.to_dict()
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'wan' or 'diffusers'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / name, {"format": "pt"})
        weight_map.update({k: name for k in shard})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def save_generator(model_or_sd, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a LongLive generator checkpoint: `.pt` as `{generator: {model.*}, **metadata}`, or safetensors
    with `model.`-prefixed keys and the metadata in the header."""
    sd = {f"model.{k}": v for k, v in _state_dict_of(model_or_sd).items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        return write_safetensors(sd, path, metadata)
    return write_torch({"generator": sd, **dict(metadata or {})}, path)


def _state_dict_of(model_or_sd) -> dict[str, torch.Tensor]:
    if isinstance(model_or_sd, torch.nn.Module):
        return {k: v.detach() for k, v in model_or_sd.state_dict().items()}
    return dict(model_or_sd)
