"""Safe reading and atomic writing of checkpoint files.

Untrusted files never run code: safetensors are preferred, and `.pt`/`.pth`/`.bin` files are read
with `torch.load(weights_only=True)`. Sharded safetensors folders (with an `*.index.json`) are
read through their weight map. Writes go to a temporary file in the same folder and are renamed
into place, so a crash never leaves a file that looks complete.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def read_checkpoint(path: str | os.PathLike, mmap: bool = True) -> tuple[Any, dict[str, str]]:
    """Read a checkpoint file or safetensors folder. Returns (object, safetensors header metadata)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_safetensors_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if mmap and "mmap" in str(exc):  # old zip format without mmap support
                obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {exc}") from exc
        except Exception as exc:  # pickle.UnpicklingError for non-weights objects, etc.
            raise CheckpointError(
                f"{path}: refused or unreadable with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
                "Checkpoints may only contain tensors, numbers, strings and containers."
            ) from exc
        return obj, {}
    raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors, {sorted(_TORCH_SUFFIXES)} or a folder")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def _read_safetensors_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several safetensors index files {[p.name for p in indexes]}; keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{indexes[0]}: not a valid safetensors index (needs a 'weight_map'): {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {indexes[0].name} are missing: {missing}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files (and no index) in this folder")
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name in files:
        tensors, m = _read_safetensors(folder / name)
        dup = set(tensors) & set(out)
        if dup:
            raise CheckpointError(f"{folder / name}: keys also present in another shard: {sorted(dup)[:5]}")
        out.update(tensors)
        meta.update(m)
    return out, meta


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Atomically write a safetensors file; metadata values are stored as strings (JSON for non-strings)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tmp = _atomic_target(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_torch(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically `torch.save` an object made of tensors, numbers, strings and containers."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
