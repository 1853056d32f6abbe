"""Paths used by a run: placeholder detection, existence checks, checkpoint format peeking.

Placeholders (`/path/to/...`) are allowed in a config until the path is actually used; the code
that uses a path asks for it through `require_path`, which fails with the file and field named.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, Optional

from longlive.config.errors import ConfigError
from longlive.config.schema import MERGED_CHECKPOINT_FORMATS, REJECTED_CHECKPOINT_FORMATS, Config

logger = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "/path/to/"


def is_placeholder(value: Any) -> bool:
    """True for the shipped configs' `/path/to/...` placeholders."""
    return isinstance(value, str) and value.strip().startswith(PLACEHOLDER_PREFIX)


def get_field(cfg: Config, dotted: str) -> Any:
    """Value of a canonical dotted field path such as `checkpoints.generator_ckpt`."""
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, part):
            raise ConfigError(f"{cfg.source or '<config>'}: no such config field '{dotted}' (asked for by the program).")
        node = getattr(node, part)
    return node


def _field_ref(cfg: Config, dotted: str) -> str:
    origin = cfg.origins.get(dotted)
    where = cfg.source or "<config>"
    if origin and origin != dotted:
        return f"{where}: field '{dotted}' (from {origin if origin.startswith('override') else repr(origin)})"
    return f"{where}: field '{dotted}'"


def require_path(cfg: Config, dotted: str, kind: str = "any") -> Path:
    """Return the path in field `dotted`, failing if unset, a `/path/to/...` placeholder, or missing.

    kind: "file", "dir" or "any" (either).
    """
    value = get_field(cfg, dotted)
    ref = _field_ref(cfg, dotted)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{ref} is not set but this run needs it. Set it in the config or pass '{dotted}=<path>'.")
    if not isinstance(value, str):
        raise ConfigError(f"{ref}: expected a path string, got {value!r}.")
    if is_placeholder(value):
        raise ConfigError(
            f"{ref} is still the placeholder {value!r}. Replace it with a real path in the config "
            f"or pass '{dotted}=<path>' on the command line."
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{ref}: {value!r} does not exist (cwd: {Path.cwd()}). Fix the path.")
    if kind == "file" and not path.is_file():
        raise ConfigError(f"{ref}: {value!r} is a directory, expected a file.")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{ref}: {value!r} is a file, expected a directory.")
    return path


def resolve_generator_weights(cfg: Config) -> Optional[Path]:
    """Generator checkpoint to load, or None when `checkpoints.random_weights: true` explicitly asks for random weights."""
    ckpt = cfg.checkpoints.generator_ckpt
    if cfg.checkpoints.random_weights:
        if ckpt is not None:
            raise ConfigError(
                f"{_field_ref(cfg, 'checkpoints.random_weights')} is true but checkpoints.generator_ckpt is also set "
                f"({ckpt!r}). Set one of them: remove generator_ckpt to use random weights, or random_weights: false."
            )
        logger.warning("checkpoints.random_weights is true: the generator keeps its random initialisation")
        return None
    if ckpt is None:
        raise ConfigError(
            f"{_field_ref(cfg, 'checkpoints.generator_ckpt')} is not set, so there are no generator weights. "
            f"Set it to a LongLive checkpoint, or set 'checkpoints.random_weights: true' to run with random weights "
            f"(tests and smoke runs only)."
        )
    return require_path(cfg, "checkpoints.generator_ckpt", kind="any")  # a file or a Wan/diffusers folder


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024 * 1024:
            raise ConfigError(f"{path}: safetensors header length {n} is implausible; the file is corrupt.")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: corrupt safetensors header ({exc}).") from exc
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def peek_checkpoint_format(path: str | Path) -> Optional[str]:
    """The `checkpoint_format` tag of a checkpoint (None if it has none), read without loading tensors.

    safetensors: header metadata. .pt/.pth: `torch.load(weights_only=True, mmap=True)` so tensors
    stay on disk.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        value = _safetensors_metadata(path).get("checkpoint_format")
        return str(value) if value is not None else None
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc).lower():
            raise ConfigError(f"{path}: cannot read the checkpoint safely ({exc}).") from exc
        # Legacy (non-zip) serialization cannot be memory-mapped.
        logger.debug("%s: legacy format, loading without mmap to read checkpoint_format", path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends from weights_only
        raise ConfigError(
            f"{path}: cannot read the checkpoint with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
            f"Only tensor/dict checkpoints are accepted."
        ) from exc
    if isinstance(obj, dict):
        value = obj.get("checkpoint_format")
        return str(value) if value is not None else None
    return None


def is_merged_checkpoint_format(fmt: Optional[str]) -> bool:
    """True if the format tag marks an export that already contains the LoRA weights."""
    return fmt in MERGED_CHECKPOINT_FORMATS


def check_generator_checkpoint(cfg: Config, path: Path) -> Optional[str]:
    """Cross-check a generator checkpoint's format tag against the config; returns the tag."""
    fmt = peek_checkpoint_format(path)
    ref = _field_ref(cfg, "checkpoints.generator_ckpt")
    if fmt in REJECTED_CHECKPOINT_FORMATS:
        raise ConfigError(
            f"{ref}: {str(path)!r} has checkpoint_format {fmt!r}, an unsupported TransformerEngine module export. "
            f"Re-export it as merged BF16 weights (backend transformer_engine) or as a FourOverSix NVFP4 checkpoint."
        )
    if is_merged_checkpoint_format(fmt) and cfg.checkpoints.lora_ckpt is not None and cfg.adapter is not None:
        raise ConfigError(
            f"{ref}: {str(path)!r} is a merged export (checkpoint_format {fmt!r}) that already contains the LoRA, "
            f"but checkpoints.lora_ckpt is also set, so the LoRA would be applied twice. Remove checkpoints.lora_ckpt "
            f"and the adapter section (or pass 'checkpoints.lora_ckpt=null adapter=null')."
        )
    if fmt == "longlive_generator_nvfp4":
        if not cfg.model_quant:
            raise ConfigError(
                f"{ref}: {str(path)!r} is a materialised NVFP4 (FourOverSix) checkpoint but model_quant is false. "
                f"Set 'model_quant: true'."
            )
        if cfg.model_quant_use_transformer_engine:
            raise ConfigError(
                f"{ref}: {str(path)!r} is a FourOverSix NVFP4 checkpoint; it cannot be loaded with "
                f"model_quant_use_transformer_engine: true. Set it to false."
            )
    return fmt
