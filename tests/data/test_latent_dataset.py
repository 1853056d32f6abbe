"""LatentDataset: reading encoded clips, shape/prompt checks naming the file, skipping unreadable files."""
from __future__ import annotations

import logging

import pytest
import torch

from longlive.config import config_from_dict
from longlive.data.latent_dataset import LatentDataset, latent_metadata, read_latent_file
from longlive.data.video_dataset import AllSamplesFailedError, DatasetError, collate_samples
from longlive.io.checkpoint import write_safetensors

SHAPE = (48, 4, 2, 2)  # C, F, H, W


def write(path, latents=None, prompts=("a", "b"), valid=4, **meta):
    latents = torch.randn(SHAPE).to(torch.bfloat16) if latents is None else latents
    write_safetensors({"latents": latents}, path, metadata={**latent_metadata(list(prompts), valid, "src/" + path.stem), **meta})
    return latents


def test_reads_latents_prompts_and_metadata_in_natural_order(tmp_path):
    written = {name: write(tmp_path / f"{name}.safetensors", prompts=(name, name + "!"), valid=3)
               for name in ("s10", "s2", "s1")}
    ds = LatentDataset(tmp_path, latent_shape=SHAPE, frames_per_chunk=2)
    assert [p.stem for p in ds.files] == ["s1", "s2", "s10"]
    item = ds[2]
    assert item["name"] == "s10" and item["index"] == 2 and item["skipped"] == []
    assert item["latents"].dtype == torch.bfloat16 and torch.equal(item["latents"], written["s10"])
    assert item["prompts"] == ["s10", "s10!"] and item["num_valid_latent_frames"] == 3
    as_float = LatentDataset(tmp_path, dtype=torch.float32)[0]["latents"]
    assert as_float.dtype == torch.float32 and torch.equal(as_float, written["s1"].float())
    _, meta = read_latent_file(ds.files[0])
    assert meta["source"] == "src/s1" and meta["format"] == "longlive_latents_v1"
    batch = collate_samples([ds[0], ds[1]])
    assert batch["latents"].shape == (2, *SHAPE) and batch["num_valid_latent_frames"].tolist() == [3, 3]


def test_shape_and_prompt_count_mismatch_name_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    write(path, latents=torch.zeros(48, 6, 2, 2), prompts=("x", "y", "z"))
    with pytest.raises(DatasetError, match=r"a\.safetensors: latents have shape \(48, 6, 2, 2\)"):
        LatentDataset(tmp_path, latent_shape=SHAPE)[0]
    write(path, prompts=("x",))
    with pytest.raises(DatasetError, match=r"a\.safetensors: 1 prompt\(s\) for 4 latent frames"):
        LatentDataset(tmp_path, latent_shape=SHAPE, frames_per_chunk=2)[0]


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.safetensors").write_bytes(b"garbage")
    write_safetensors({"latents": torch.zeros(SHAPE)}, tmp_path / "b.safetensors")  # no metadata
    write(tmp_path / "c.safetensors")
    ds = LatentDataset(tmp_path, latent_shape=SHAPE)
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["name"] == "c"
    assert item["skipped"] == [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and "a.safetensors" in messages[0] and "no 'prompts'" in messages[1]
    (tmp_path / "c.safetensors").unlink()
    with pytest.raises(AllSamplesFailedError, match="all 2 samples failed"):
        LatentDataset(tmp_path)[1]


def test_from_config_and_construction_errors(tmp_path):
    with pytest.raises(DatasetError, match="latent folder not found"):
        LatentDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no \\*.safetensors"):
        LatentDataset(tmp_path)
    write(tmp_path / "x.safetensors")
    cfg = config_from_dict({
        "model_kwargs": {"model_name": "tiny", "num_frame_per_block": 2},
        "data": {"data_path": str(tmp_path), "image_or_video_shape": [1, 4, 48, 2, 2], "load_raw_video": False},
        "checkpoints": {"random_weights": True},
    })
    ds = LatentDataset.from_config(cfg)
    assert ds.latent_shape == SHAPE and ds.frames_per_chunk == 2 and ds[0]["latents"].shape == SHAPE
