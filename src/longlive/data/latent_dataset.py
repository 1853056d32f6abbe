"""Pre-encoded training clips written by `longlive data encode` (`LatentDataset`).

Each sample is `<root>/<name>.safetensors` with the tensor "latents" `[C, F, H, W]` (bf16) and header
metadata holding JSON "prompts" (one per chunk), "num_valid_latent_frames" and "source". Items
have the keys of `MultiVideoConcatDataset` items with "latents" in place of "frames".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from longlive.data.video_dataset import (
    DatasetError,
    SampleReadError,
    natural_key,
    load_with_fallback,
)

if TYPE_CHECKING:
    from longlive.config.schema import Config

logger = logging.getLogger(__name__)

LATENT_FORMAT = "longlive_latents_v1"
LATENT_KEY = "latents"


def latent_metadata(prompts: Sequence[str], num_valid_latent_frames: int, source: str, **extra: Any) -> dict[str, str]:
    """Safetensors header metadata of one encoded sample (every value JSON-encoded)."""
    meta = {"format": LATENT_FORMAT, "prompts": list(prompts), "num_valid_latent_frames": int(num_valid_latent_frames),
            "source": str(source), **extra}
    return {k: json.dumps(v) for k, v in meta.items()}


def read_latent_file(path: Path, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(latents [C, F, H, W], decoded metadata) of one file; unreadable or malformed files raise SampleReadError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
            if LATENT_KEY not in f.keys():
                raise SampleReadError(path, f"no '{LATENT_KEY}' tensor (tensors: {sorted(f.keys())[:5]})")
            latents = f.get_tensor(LATENT_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SampleReadError(path, f"cannot read the safetensors file ({exc})") from exc
    meta: dict[str, Any] = {}
    for key in ("prompts", "num_valid_latent_frames", "source"):
        if key not in raw:
            raise SampleReadError(path, f"metadata has no '{key}' (keys: {sorted(raw)}); re-encode with `longlive data encode`")
        try:
            meta[key] = json.loads(raw[key])
        except json.JSONDecodeError as exc:
            raise SampleReadError(path, f"metadata '{key}' is not JSON ({exc.msg})") from exc
    for key, value in raw.items():
        if key not in meta:
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                meta[key] = value
    prompts = meta["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise SampleReadError(path, "metadata 'prompts' must be a JSON list of strings")
    if not isinstance(meta["num_valid_latent_frames"], int):
        raise SampleReadError(path, "metadata 'num_valid_latent_frames' must be an integer")
    if latents.dim() != 4:
        raise SampleReadError(path, f"'{LATENT_KEY}' must be [C, F, H, W], got shape {tuple(latents.shape)}")
    return (latents if dtype is None else latents.to(dtype)), meta


class LatentDataset(torch.utils.data.Dataset):
    """Encoded clips of a folder: item "latents" [C, F, H, W], "prompts", "num_valid_latent_frames",
    "name", "index", "skipped". Shapes are checked against `latent_shape` (C, F, H, W) when given.

    A file that cannot be read is skipped with a warning (listed in "skipped" of the next item); a
    file of the wrong shape or prompt count raises, since it was encoded for another configuration.
    """

    def __init__(self, root: str | Path, *, latent_shape: Optional[Sequence[int]] = None,
                 frames_per_chunk: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: latent folder not found (cwd: {Path.cwd()}); create it with `longlive data encode`")
        self.files = sorted((p for p in self.root.glob("*.safetensors") if not p.name.startswith(".")),
                            key=lambda p: natural_key(p.stem))
        if not self.files:
            raise DatasetError(f"{self.root}: no *.safetensors latent files; create them with `longlive data encode`")
        if latent_shape is not None and len(latent_shape) != 4:
            raise ValueError(f"latent_shape must be (C, F, H, W), got {tuple(latent_shape)}")
        self.latent_shape = tuple(int(s) for s in latent_shape) if latent_shape is not None else None
        self.frames_per_chunk = frames_per_chunk
        self.dtype = dtype
        self.epoch = 0

    @classmethod
    def from_config(cls, cfg: "Config", *, root: str | Path | None = None,
                    dtype: Optional[torch.dtype] = None) -> "LatentDataset":
        """Latents of `data.data_path` checked against `data.image_or_video_shape` [B, F, C, H, W]."""
        if root is None:
            from longlive.config.paths import require_path

            root = require_path(cfg, "data.data_path", kind="dir")
        _, f, c, h, w = (int(s) for s in cfg.data.image_or_video_shape)
        return cls(root, latent_shape=(c, f, h, w), frames_per_chunk=cfg.frames_per_chunk, dtype=dtype)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch (kept for the common dataset interface)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_with_fallback(self.load_sample, int(index), len(self), str(self.root))

    def load_sample(self, index: int) -> dict[str, Any]:
        """Item `index` without falling back to other files (unreadable file: SampleReadError)."""
        path = self.files[index]
        latents, meta = read_latent_file(path, self.dtype)
        self._check(path, latents, meta)
        return {
            "latents": latents,
            "prompts": meta["prompts"],
            "num_valid_latent_frames": meta["num_valid_latent_frames"],
            "name": path.stem,
            "index": int(index),
            "skipped": [],
        }

    def _check(self, path: Path, latents: torch.Tensor, meta: Mapping[str, Any]) -> None:
        shape = tuple(latents.shape)
        if self.latent_shape is not None and shape != self.latent_shape:
            raise DatasetError(f"{path}: latents have shape {shape} (C, F, H, W) but the config expects {self.latent_shape} "
                               "(data.image_or_video_shape); re-encode with this config or fix the config")
        frames = shape[1]
        if self.frames_per_chunk:
            chunks = frames // self.frames_per_chunk
            if frames % self.frames_per_chunk or len(meta["prompts"]) != chunks:
                raise DatasetError(f"{path}: {len(meta['prompts'])} prompt(s) for {frames} latent frames; expected one per "
                                   f"chunk of {self.frames_per_chunk} ({frames / self.frames_per_chunk:g})")
        valid = meta["num_valid_latent_frames"]
        if not 1 <= valid <= frames:
            raise DatasetError(f"{path}: num_valid_latent_frames={valid} is outside [1, {frames}]")
