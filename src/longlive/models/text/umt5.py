"""UMT5-XXL encoder construction and loading (Hugging Face folder or Wan's original `.pth`).

The model itself is `transformers.UMT5EncoderModel`; Wan's `models_t5_umt5-xxl-enc-bf16.pth` only
differs in key names, so loading it is a rename (ecosystem notes, section 3). Nothing is ever
fetched from a hub: every path must exist locally and transformers runs with `local_files_only`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from transformers import UMT5Config, UMT5EncoderModel

logger = logging.getLogger(__name__)

# umT5-XXL encoder geometry (Wan `umt5_xxl(encoder_only=True)`, spec 1.1 / ecosystem 1.3).
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_ff=10240,
    num_heads=64,
    d_kv=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)

# Wan T5Encoder key (per block) -> transformers UMT5 key (per block).
_WAN_BLOCK_KEYS: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Run the body with the Hugging Face hub switched off, restoring the previous state after.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the module constant is set as well as
    the environment; together with `local_files_only=True` no network access can happen.
    """
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_const = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_const
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def umt5_xxl_config(**overrides: Any) -> UMT5Config:
    """Build the umT5-XXL encoder config; `overrides` (e.g. a tiny geometry for tests) win."""
    unknown = sorted(set(overrides) - set(UMT5_XXL))
    if unknown:
        raise ValueError(
            f"unknown UMT5 config override(s) {unknown}; allowed keys: {sorted(UMT5_XXL)}"
        )
    return UMT5Config(**{**UMT5_XXL, **overrides})


def wan_t5_to_hf(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename a Wan `T5Encoder` state dict to `UMT5EncoderModel` keys (tensors are not copied).

    Raises with the offending keys listed if any key is not part of the Wan encoder layout.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = tensor
            out["encoder.embed_tokens.weight"] = tensor
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif (m := _WAN_BLOCK.match(key)) and m.group(2) in _WAN_BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_KEYS[m.group(2)]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) are not part of Wan's UMT5 encoder layout, e.g. "
            f"{unknown[:5]}; expected `token_embedding.weight`, `blocks.<i>.*`, `norm.weight` "
            "(models_t5_umt5-xxl-enc-bf16.pth) or a Hugging Face UMT5 encoder folder"
        )
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (safetensors, or torch zip with weights_only and mmap)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # re-raised with the file named and what to check
        raise RuntimeError(
            f"could not read text-encoder checkpoint {path}: {exc}. Expected Wan's "
            "models_t5_umt5-xxl-enc-bf16.pth (a torch zip state dict) or a .safetensors file."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    return state


def _check_keys(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one error naming missing, unexpected and mis-shaped keys (clearer than strict load)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(hf_state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in hf_state and tuple(hf_state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match the UMT5 encoder config "
            f"(layers={model.config.num_layers}, d_model={model.config.d_model}): "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"shape mismatches {shapes[:3]} ({len(shapes)}). Pass matching `config_overrides` "
            "or the right checkpoint."
        )


def load_umt5_encoder(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> UMT5EncoderModel:
    """Load the UMT5 encoder from a local HF folder or a Wan/HF-keyed `.pth`/`.safetensors` file.

    The file path builds the umT5-XXL config (plus `config_overrides`) on the meta device and assigns
    the checkpoint tensors, so the 5.7 B weights are never materialised twice.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"text encoder not found at {path}: give a local Hugging Face UMT5 encoder folder or "
            "Wan's models_t5_umt5-xxl-enc-bf16.pth (nothing is downloaded at run time)"
        )
    if path.is_dir():
        if config_overrides:
            raise ValueError(f"config_overrides only apply to a checkpoint file; {path} is a folder with its own config.json")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json; expected a Hugging Face UMT5 encoder folder")
        with hub_offline():
            model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        logger.info("loaded UMT5 encoder from folder %s", path)
        return model.to(device).eval().requires_grad_(False)

    raw = _read_state_dict(path)
    if "token_embedding.weight" in raw:
        hf_state = wan_t5_to_hf(raw, source=str(path))
    else:
        hf_state = dict(raw)
        if "shared.weight" in hf_state and "encoder.embed_tokens.weight" not in hf_state:
            hf_state["encoder.embed_tokens.weight"] = hf_state["shared.weight"]
    config = umt5_xxl_config(**dict(config_overrides or {}))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _check_keys(model, hf_state, str(path))
    model.load_state_dict(hf_state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie after assign (one copy)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info(
        "loaded UMT5 encoder from %s (%d layers, d_model %d, %s, %s)",
        path, config.num_layers, config.d_model, dtype, device,
    )
    return model
