"""Wan2.2-TI2V-5B folder resolution: complete folders resolve; incomplete ones raise one error listing all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longlive.io.model_folder import ModelFolderError, resolve_wan_model_folder

BLOB = b"\0" * 2048


def _make_folder(root: Path, sharded: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "ti2v", "dim": 3072}))
    if sharded:
        shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        for s in shards:
            (root / s).write_bytes(BLOB)
        weight_map = {f"blocks.{i}.w": shards[i % 3] for i in range(6)}
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        (root / "diffusion_pytorch_model.safetensors").write_bytes(BLOB)
    (root / "Wan2.2_VAE.pth").write_bytes(BLOB)
    (root / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(BLOB)
    tok = root / "google" / "umt5-xxl"
    tok.mkdir(parents=True)
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "spiece.model").write_bytes(BLOB)
    return root


@pytest.mark.parametrize("sharded", [True, False])
def test_complete_folder_resolves(tmp_path: Path, sharded: bool) -> None:
    root = _make_folder(tmp_path / "Wan2.2-TI2V-5B", sharded)
    paths = resolve_wan_model_folder(root)
    assert paths.dit_folder == root and paths.dit_config == root / "config.json"
    assert len(paths.dit_weights) == (3 if sharded else 1)
    assert all(p.is_file() for p in paths.dit_weights)
    assert (paths.dit_index is not None) == sharded
    assert paths.vae == root / "Wan2.2_VAE.pth"
    assert paths.text_encoder == root / "models_t5_umt5-xxl-enc-bf16.pth"
    assert paths.tokenizer == root / "google" / "umt5-xxl"


def test_partial_folder_lists_every_problem_once(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "m")
    (root / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    (root / "Wan2.2_VAE.pth").unlink()
    (root / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid x\n")
    (root / "google" / "umt5-xxl" / "spiece.model").unlink()
    with pytest.raises(ModelFolderError) as info:
        resolve_wan_model_folder(root)
    err = info.value
    assert len(err.problems) == 4
    text = str(err)
    for needle in ("00002-of-00003.safetensors", "Wan2.2_VAE.pth", "Git LFS pointer", "spiece.model",
                   "4 problem(s)", "nothing is fetched"):
        assert needle in text


def test_missing_index_empty_file_and_component_choice(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "m")
    (root / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (root / "config.json").write_text("")
    with pytest.raises(ModelFolderError, match="(?s)empty DiT config.*shard index is missing"):
        resolve_wan_model_folder(root)
    paths = resolve_wan_model_folder(root, components=("vae", "tokenizer"))
    assert paths.dit_config is None and paths.text_encoder is None and paths.vae is not None
    with pytest.raises(ValueError, match="unknown model component"):
        resolve_wan_model_folder(root, components=("unet",))
    with pytest.raises(ModelFolderError, match="does not exist"):
        resolve_wan_model_folder(tmp_path / "nope")
