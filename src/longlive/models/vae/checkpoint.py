"""Reading and writing Wan2.2 VAE weights: original, diffusers and LightVAE key layouts.

Canonical names are those of the original `Wan2.2_VAE.pth`. diffusers' `AutoencoderKLWan` names
convert both ways here (and only here). The pruned LightVAE students (`MG-LightVAE*.pth` from
Matrix-Game-3.0) use diffusers-style names plus training-only keys; their channel widths are read
from the weights. Every load is strict: a missing, unexpected or mis-shaped key is an error.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from longlive.io.checkpoint import read_checkpoint
from longlive.models.vae.config import WanVAEConfig
from longlive.models.vae.model import WanVAE

logger = logging.getLogger(__name__)

VAE_TYPES = ("wan", "mg_lightvae", "mg_lightvae_v2", "auto")
# Nominal pruning rate of each LightVAE file (the reference passes 0.5 / 0.75 by name).
LIGHTVAE_NOMINAL_PRUNING = {"mg_lightvae": 0.5, "mg_lightvae_v2": 0.75}
# Containers the reference unwraps before reading a LightVAE checkpoint, outermost first.
CHECKPOINT_CONTAINERS = ("state_dict", "gen_model", "generator")
# Training-only distillation heads stored in LightVAE checkpoints; not part of the VAE.
LIGHTVAE_DROPPED_PREFIXES = ("dynamic_feature_projection_heads.",)

StateDict = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------- key layouts
_RESNET_WAN_TO_DIFFUSERS = {
    "residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_RESNET_DIFFUSERS_TO_WAN = {v: k for k, v in _RESNET_WAN_TO_DIFFUSERS.items()}
_SAMPLER_TAILS = ("resample.", "time_conv.")


def _map_prefix(tail: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if tail.startswith(old):
            return new + tail[len(old):]
    return None


def wan_key_to_diffusers(key: str) -> str | None:
    """Original Wan2.2 VAE key -> diffusers `AutoencoderKLWan` key (None if the key is not a VAE key)."""
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    if (m := _map_prefix(key, top)) is not None:
        return m
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        return None
    part, rest = m.groups()
    simple = {"conv1.": "conv_in.", "middle.1.": "mid_block.attentions.0.", "head.0.": "norm_out.", "head.2.": "conv_out."}
    if (mapped := _map_prefix(rest, simple)) is not None:
        return f"{part}.{mapped}"
    if (mm := re.match(r"^middle\.([02])\.(.*)$", rest)) is not None:
        tail = _map_prefix(mm.group(2), _RESNET_WAN_TO_DIFFUSERS)
        return None if tail is None else f"{part}.mid_block.resnets.{int(mm.group(1)) // 2}.{tail}"
    block, sampler = ("downsamples", "downsampler") if part == "encoder" else ("upsamples", "upsampler")
    new_block = "down_blocks" if part == "encoder" else "up_blocks"
    if (mm := re.match(rf"^{block}\.(\d+)\.{block}\.(\d+)\.(.*)$", rest)) is not None:
        i, j, tail = mm.groups()
        if tail.startswith(_SAMPLER_TAILS):
            return f"{part}.{new_block}.{i}.{sampler}.{tail}"
        mapped_tail = _map_prefix(tail, _RESNET_WAN_TO_DIFFUSERS)
        return None if mapped_tail is None else f"{part}.{new_block}.{i}.resnets.{j}.{mapped_tail}"
    return None


def _diffusers_key_to_wan(key: str, sampler_index: Mapping[str, int]) -> str | None:
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    if (m := _map_prefix(key, top)) is not None:
        return m
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        return None
    part, rest = m.groups()
    simple = {"conv_in.": "conv1.", "mid_block.attentions.0.": "middle.1.", "norm_out.": "head.0.", "conv_out.": "head.2."}
    if (mapped := _map_prefix(rest, simple)) is not None:
        return f"{part}.{mapped}"
    if (mm := re.match(r"^mid_block\.resnets\.([01])\.(.*)$", rest)) is not None:
        tail = _map_prefix(mm.group(2), _RESNET_DIFFUSERS_TO_WAN)
        return None if tail is None else f"{part}.middle.{2 * int(mm.group(1))}.{tail}"
    block, sampler = ("down_blocks", "downsampler") if part == "encoder" else ("up_blocks", "upsampler")
    old_block = "downsamples" if part == "encoder" else "upsamples"
    if (mm := re.match(rf"^{block}\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)) is not None:
        i, j, tail = mm.groups()
        mapped_tail = _map_prefix(tail, _RESNET_DIFFUSERS_TO_WAN)
        return None if mapped_tail is None else f"{part}.{old_block}.{i}.{old_block}.{j}.{mapped_tail}"
    if (mm := re.match(rf"^{block}\.(\d+)\.{sampler}\.(.*)$", rest)) is not None:
        return f"{part}.{old_block}.{mm.group(1)}.{old_block}.{sampler_index[part]}.{mm.group(2)}"
    return None


def is_diffusers_key(key: str) -> bool:
    """True for keys in diffusers' `AutoencoderKLWan` naming."""
    return _diffusers_key_to_wan(key, {"encoder": 0, "decoder": 0}) is not None


def wan_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a state dict from original Wan2.2 names to diffusers names (errors on unknown keys)."""
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        new = wan_key_to_diffusers(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"wan_to_diffusers: {len(unknown)} keys are not Wan2.2 VAE keys: {unknown[:8]}")
    return out


def diffusers_to_wan(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert diffusers-named keys to original Wan2.2 names; keys already in Wan naming pass through.

    The index of the resampler inside a Wan block equals the number of residual blocks before it,
    counted from the state dict itself.
    """
    enc_res = {int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    dec_res = {int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    sampler_index = {"encoder": len(enc_res), "decoder": len(dec_res)}
    out: StateDict = {}
    for key, value in state_dict.items():
        new = _diffusers_key_to_wan(key, sampler_index)
        out[new if new is not None else key] = value
    return out


# ----------------------------------------------------------------------------------- file I/O
def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> StateDict:
    """Tensors from a `.pth`/`.pt` (weights_only) or `.safetensors` file, or a given mapping.

    Known wrapper dicts (`state_dict`, `gen_model`, `generator`) are unwrapped, with a log line.
    """
    if isinstance(source, Mapping):
        raw: object = dict(source)
        where = "<state dict>"
    else:
        where = str(source)
        raw, _ = read_checkpoint(source)  # safetensors, or torch.load(weights_only=True)
    for name in CHECKPOINT_CONTAINERS:
        if isinstance(raw, Mapping) and name in raw and isinstance(raw[name], Mapping):
            logger.info("VAE checkpoint %s: using the tensors under %r", where, name)
            raw = raw[name]
    if not isinstance(raw, Mapping):
        raise ValueError(f"VAE checkpoint {where}: expected a dict of tensors, got {type(raw).__name__}.")
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"VAE checkpoint {where}: entries that are not tensors: {not_tensors[:8]}.")
    return {str(k): v for k, v in raw.items()}


def save_vae(vae: WanVAE, path: str | os.PathLike, layout: str = "wan") -> None:
    """Write the weights as `.safetensors` or `.pth`, in `wan` (original) or `diffusers` naming."""
    if layout not in ("wan", "diffusers"):
        raise ValueError(f"save_vae: layout must be 'wan' or 'diffusers', got {layout!r}.")
    sd = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    if layout == "diffusers":
        sd = wan_to_diffusers(sd)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))


# ----------------------------------------------------------------------------------- loading
class CheckpointMismatchError(ValueError):
    """The weights do not fit the model: lists missing, unexpected and mis-shaped keys."""


def infer_config(state_dict: Mapping[str, torch.Tensor], base: WanVAEConfig) -> WanVAEConfig:
    """Widths (encoder, decoder, z) and residual-block count read from Wan-named weights."""
    needed = ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"Cannot infer the VAE widths: keys {missing} are missing. Is this a Wan2.2 VAE / LightVAE checkpoint?"
        )
    dec_out = state_dict["decoder.conv1.weight"].shape[0]
    if dec_out % base.dim_mult[-1]:
        raise CheckpointMismatchError(
            f"decoder.conv1 has {dec_out} output channels, not a multiple of dim_mult[-1]={base.dim_mult[-1]}."
        )
    z_dim = state_dict["conv2.weight"].shape[0]
    if z_dim != base.z_dim:
        raise CheckpointMismatchError(
            f"The weights have z_dim={z_dim} but the configuration has {base.z_dim} latent channels "
            "(and mean/std for that many); pass a `config` with matching z_dim/latent_mean/latent_std."
        )
    res = {int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.upsamples\.0\.upsamples\.(\d+)\.residual\.", k))}
    num_res_blocks = len(res) - 1 if res else base.num_res_blocks
    return base.replace(
        enc_dim=state_dict["encoder.conv1.weight"].shape[0],
        dec_dim=dec_out // base.dim_mult[-1],
        num_res_blocks=num_res_blocks,
    )


def _drop_named_keys(sd: StateDict, where: str) -> StateDict:
    dropped = [k for k in sd if k.startswith(LIGHTVAE_DROPPED_PREFIXES)]
    if dropped:
        logger.warning(
            "%s: dropping %d LightVAE training-only keys (prefix %s), e.g. %s",
            where, len(dropped), ", ".join(LIGHTVAE_DROPPED_PREFIXES), dropped[0],
        )
    return {k: v for k, v in sd.items() if not k.startswith(LIGHTVAE_DROPPED_PREFIXES)}


def _check_fit(model: WanVAE, sd: Mapping[str, torch.Tensor], where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        def listing(name: str, items: list[str]) -> str:
            more = f" (+{len(items) - 12} more)" if len(items) > 12 else ""
            return f"\n  {name} ({len(items)}): {items[:12]}{more}" if items else ""

        raise CheckpointMismatchError(
            f"VAE weights from {where} do not match the model (config {model.config})."
            + listing("missing keys", missing) + listing("unexpected keys", unexpected) + listing("shape mismatches", shapes)
            + "\n  Check vae_type (wan / mg_lightvae / mg_lightvae_v2 / auto) and that the file is a complete VAE."
        )


def load_vae(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    vae_type: str = "auto",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: WanVAEConfig | None = None,
    encoder_source: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
) -> WanVAE:
    """Build a `WanVAE` from original, diffusers-layout or LightVAE weights, strictly.

    `config` is the unpruned base (default: the Wan2.2 preset); LightVAE widths are inferred from
    the weights. `encoder_source` optionally takes `encoder.*` and `conv1.*` from another checkpoint
    (e.g. the full Wan2.2 VAE as the Matrix-Game reference does for its LightVAE students).
    """
    if vae_type not in VAE_TYPES:
        raise ValueError(f"load_vae: vae_type must be one of {VAE_TYPES}, got {vae_type!r}.")
    where = str(source) if not isinstance(source, Mapping) else "<state dict>"
    sd = read_state_dict(source)
    if vae_type != "wan":
        sd = _drop_named_keys(sd, where)
    n_diffusers = sum(is_diffusers_key(k) for k in sd)
    if n_diffusers:
        logger.info("%s: converting %d diffusers-style keys to Wan2.2 names", where, n_diffusers)
    sd = diffusers_to_wan(sd)
    if encoder_source is not None:
        enc_where = str(encoder_source) if not isinstance(encoder_source, Mapping) else "<encoder state dict>"
        enc_sd = diffusers_to_wan(_drop_named_keys(read_state_dict(encoder_source), enc_where))
        taken = {k: v for k, v in enc_sd.items() if k.startswith(("encoder.", "conv1."))}
        if not taken:
            raise CheckpointMismatchError(f"encoder_source {enc_where} has no encoder.* / conv1.* weights.")
        replaced = sum(k in sd for k in taken)
        sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "conv1."))}
        sd.update(taken)
        logger.info("Encoder weights (%d tensors, %d replaced) taken from %s", len(taken), replaced, enc_where)
        where = f"{where} + encoder from {enc_where}"

    base = config if config is not None else WanVAEConfig.preset("wan2.2")
    cfg = infer_config(sd, base)
    pruning = 1.0 - cfg.decoder_conv1_channels / base.decoder_conv1_channels
    if vae_type == "wan" and (cfg.enc_dim, cfg.dec_dim) != (base.enc_dim, base.dec_dim):
        raise CheckpointMismatchError(
            f"{where}: encoder/decoder widths {cfg.enc_dim}/{cfg.dec_dim} differ from the configured "
            f"{base.enc_dim}/{base.dec_dim} (decoder pruning {pruning:.2f}); this looks like a pruned LightVAE. "
            "Pass vae_type='mg_lightvae', 'mg_lightvae_v2' or 'auto'."
        )
    if vae_type in LIGHTVAE_NOMINAL_PRUNING and abs(pruning - LIGHTVAE_NOMINAL_PRUNING[vae_type]) > 1e-6:
        logger.warning(
            "%s: vae_type %s usually has decoder pruning %.2f but these weights have %.4f; using the weights' widths.",
            where, vae_type, LIGHTVAE_NOMINAL_PRUNING[vae_type], pruning,
        )
    logger.info(
        "Loading VAE from %s: type %s, enc_dim %d, dec_dim %d (decoder pruning %.4f), z_dim %d, %d res blocks",
        where, vae_type, cfg.enc_dim, cfg.dec_dim, pruning, cfg.z_dim, cfg.num_res_blocks,
    )
    with torch.device("meta"):
        model = WanVAE(cfg)
    _check_fit(model, sd, where)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
