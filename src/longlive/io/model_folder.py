"""Resolve and validate the component paths of a downloaded Wan2.2-TI2V-5B folder.

Layout (Hugging Face `Wan-AI/Wan2.2-TI2V-5B`): DiT `config.json` + `diffusion_pytorch_model*.safetensors`
(sharded with `diffusion_pytorch_model.safetensors.index.json`), `Wan2.2_VAE.pth`,
`models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer folder `google/umt5-xxl/`. Everything missing is
reported in one error, so a user fixes the download once; nothing is fetched at run time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

DIT_CONFIG = "config.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "Wan2.2_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
COMPONENTS = ("dit", "vae", "text_encoder", "tokenizer")
_LFS_POINTER = b"version https://git-lfs"


class ModelFolderError(FileNotFoundError):
    """A model folder lacks files; `problems` lists each one (what and where)."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"Wan2.2-TI2V-5B model folder {root} is incomplete ({len(problems)} problem(s)):\n{lines}\n"
            f"Download the whole folder first, e.g. `huggingface-cli download Wan-AI/Wan2.2-TI2V-5B "
            f"--local-dir {root}`; nothing is fetched at run time."
        )


@dataclass(frozen=True)
class WanModelPaths:
    """Validated paths of the Wan2.2-TI2V-5B components (None for components not requested)."""

    root: Path
    dit_config: Path | None
    dit_weights: tuple[Path, ...]
    dit_index: Path | None
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None

    @property
    def dit_folder(self) -> Path:
        """Folder holding the DiT `config.json` and safetensors (the root of the download)."""
        return self.root


def _file_problem(path: Path, what: str) -> str | None:
    """Describe why `path` is not a usable weight/config file, or None when it is."""
    if not path.is_file():
        return f"missing {what}: {path}"
    size = path.stat().st_size
    if size == 0:
        return f"empty {what} (interrupted download?): {path}"
    if size < 1024:
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                return f"{what} is a Git LFS pointer, not the file (run `git lfs pull`): {path}"
    return None


def _resolve_dit(root: Path, problems: list[str]) -> tuple[Path, tuple[Path, ...], Path | None]:
    config = root / DIT_CONFIG
    if (p := _file_problem(config, "DiT config")) is not None:
        problems.append(p)
    else:
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"DiT config is not valid JSON ({exc}): {config}")

    index = root / DIT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"DiT shard index is unreadable or has no `weight_map` ({exc!r}): {index}")
            return config, (), index
        paths = tuple(root / name for name in shards)
        problems.extend(p for path in paths if (p := _file_problem(path, "DiT weight shard")) is not None)
        return config, paths, index

    single = root / DIT_SINGLE
    if single.is_file():
        if (p := _file_problem(single, "DiT weights")) is not None:
            problems.append(p)
        return config, (single,), None
    shards_present = sorted(root.glob("diffusion_pytorch_model-*.safetensors"))
    if shards_present:
        problems.append(f"DiT shards present ({len(shards_present)}) but the shard index is missing: {index}")
    else:
        problems.append(f"missing DiT weights: {single} (or shards with {DIT_INDEX})")
    return config, tuple(shards_present), None


def _resolve_tokenizer(folder: Path, problems: list[str]) -> None:
    if not folder.is_dir():
        problems.append(f"missing tokenizer folder: {folder}")
        return
    if not (folder / "tokenizer_config.json").is_file():
        problems.append(f"missing tokenizer file: {folder / 'tokenizer_config.json'}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        problems.append(f"missing tokenizer vocabulary: {folder / 'tokenizer.json'} or {folder / 'spiece.model'}")


def resolve_wan_model_folder(
    root: str | os.PathLike[str], components: Iterable[str] = COMPONENTS
) -> WanModelPaths:
    """Return the paths of the requested components under `root`, or raise one `ModelFolderError`.

    `components` picks among "dit", "vae", "text_encoder", "tokenizer" (e.g. training from cached
    text embeddings needs no text encoder).
    """
    root = Path(root).expanduser()
    wanted = set(components)
    if unknown := sorted(wanted - set(COMPONENTS)):
        raise ValueError(f"unknown model component(s) {unknown}; choose from {list(COMPONENTS)}")
    if not root.is_dir():
        raise ModelFolderError(root, [f"model folder does not exist or is not a folder: {root}"])

    problems: list[str] = []
    dit_config, dit_weights, dit_index = None, (), None
    if "dit" in wanted:
        dit_config, dit_weights, dit_index = _resolve_dit(root, problems)
    vae = root / VAE_FILE if "vae" in wanted else None
    if vae is not None and (p := _file_problem(vae, "VAE weights")) is not None:
        problems.append(p)
    t5 = root / T5_FILE if "text_encoder" in wanted else None
    if t5 is not None and (p := _file_problem(t5, "UMT5 text-encoder weights")) is not None:
        problems.append(p)
    tokenizer = root / TOKENIZER_DIR if "tokenizer" in wanted else None
    if tokenizer is not None:
        _resolve_tokenizer(tokenizer, problems)

    if problems:
        raise ModelFolderError(root, problems)
    paths = WanModelPaths(root, dit_config, dit_weights, dit_index, vae, t5, tokenizer)
    logger.info("resolved Wan2.2-TI2V-5B folder %s (%s; %d DiT weight file(s))",
                root, ", ".join(sorted(wanted)), len(dit_weights))
    return paths
