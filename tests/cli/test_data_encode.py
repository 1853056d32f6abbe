"""`longlive data encode`: tiny synthetic videos -> latent files -> LatentDataset, resumable, failures counted."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from longlive.cli.main import main
from longlive.config import load_config
from longlive.data.latent_dataset import LatentDataset
from longlive.data.synthetic import write_synthetic_video_dataset
from longlive.data.video_dataset import MultiVideoConcatDataset
from longlive.pipelines.inference import build_vae


def tiny_config(tmp_path, data_path):
    path = tmp_path / "tiny_data.yaml"
    path.write_text(yaml.safe_dump({
        "model_kwargs": {"model_name": "tiny", "num_frame_per_block": 2},
        "data": {"data_path": str(data_path), "image_or_video_shape": [1, 4, 48, 2, 2], "max_chunks_per_shot": 1},
        "inference": {"vae_type": "tiny"},
        "checkpoints": {"random_weights": True},
        "logging": {"seed": 0},
    }))
    return str(path)


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_encode_round_trip_resume_and_failures(tmp_path, capsys):
    root = tmp_path / "videos"
    # 3 videos of 12 frames each: chunk 0 (5 frames) and chunk 1 (8 frames) come from different videos.
    write_synthetic_video_dataset(root, num_samples=3, videos_per_sample=3, frames_per_video=12, size=(32, 32))
    (root / "video" / "sample_002" / "0.mp4").write_bytes(b"broken")
    config = tiny_config(tmp_path, root)
    out = tmp_path / "latents"

    assert main(["data", "encode", "--config", config, "--out", str(out), "--limit", "1", "--no-progress"]) == 0
    assert summary(capsys) == {"written": 1, "skipped_existing": 0, "failed": 0, "total": 1, "out": str(out)}

    assert main(["data", "encode", "--config", config, "--out", str(out), "--no-progress"]) == 1  # sample_002 fails
    assert summary(capsys) == {"written": 1, "skipped_existing": 1, "failed": 1, "total": 3, "out": str(out)}
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.safetensors", "sample_001.safetensors"]

    cfg = load_config(config)
    latents = LatentDataset.from_config(cfg, root=out)
    videos = MultiVideoConcatDataset.from_config(cfg, train=False, seed=0)
    vae = build_vae(cfg, torch.device("cpu"), torch.float32)
    for i in range(2):
        item, source = latents[i], videos.load_sample(i)
        assert item["name"] == source["name"] == f"sample_{i:03d}"
        assert item["latents"].shape == (48, 4, 2, 2) and item["latents"].dtype == torch.bfloat16
        assert item["prompts"] == source["prompts"] and item["prompts"][1].startswith("The scene transitions. ")
        assert item["num_valid_latent_frames"] == 4
        expected = vae.encode(source["frames"][None].float())[0].to(torch.bfloat16)
        assert torch.equal(item["latents"], expected)  # same tiny VAE weights (seeded), same frames

    stamp = (out / "sample_000.safetensors").stat().st_mtime_ns
    assert main(["data", "encode", "--config", config, "--out", str(out), "--no-progress"]) == 1
    assert summary(capsys)["skipped_existing"] == 2
    assert (out / "sample_000.safetensors").stat().st_mtime_ns == stamp


def test_encode_needs_an_action(tmp_path):
    with pytest.raises(SystemExit):
        main(["data"])
