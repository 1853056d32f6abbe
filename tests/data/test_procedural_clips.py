"""`data.dataset_type: procedural`: the data-synth world rendered in memory equals the video dataset on a synth folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longlive.config import load_config
from longlive.data.procedural import write_procedural_dataset
from longlive.data.procedural_clips import ProceduralClipDataset
from longlive.data.video_dataset import MultiVideoConcatDataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "synth" / "train_ar.yaml"
SHAPE = "data.image_or_video_shape=[1,16,192,8,8]"  # 2 chunks, 32x32 pixels


def test_items_equal_the_video_dataset_on_the_same_synth_folder(tmp_path):
    write_procedural_dataset(tmp_path, samples=6, seed=1000, frames=97, height=32, width=32, eval_prompts=0)
    procedural = ProceduralClipDataset.from_config(load_config(CONFIG, [SHAPE]), seed=7)
    videos = MultiVideoConcatDataset.from_config(
        load_config(CONFIG, [SHAPE, "data.dataset_type=videos", f"data.data_path={tmp_path}"]), train=True, seed=7)
    cuts = 0
    for i in range(6):
        a, b = procedural[i], videos[i]
        assert a["prompts"] == b["prompts"] and a["num_valid_latent_frames"] == b["num_valid_latent_frames"] == 16
        assert a["frames"].shape == b["frames"].shape == (3, 61, 32, 32) and a["frames"].dtype == torch.float16
        # H.264 (crf 10, edges of 32x32 shapes) is the only difference; another sample differs far more
        assert (a["frames"].float() - b["frames"].float()).abs().mean() < 0.06
        assert (a["frames"].float() - videos[(i + 1) % 6]["frames"].float()).abs().mean() > 0.15
        cuts += any(p.startswith("The scene transitions.") for p in a["prompts"])
    assert cuts >= 1


def test_items_are_deterministic_per_epoch_and_starts_vary_across_epochs():
    ds = ProceduralClipDataset.from_config(load_config(CONFIG, [SHAPE]), seed=3)
    first = [ds[i]["frames"] for i in range(4)]
    assert all(torch.equal(x, ds[i]["frames"]) for i, x in enumerate(first))
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i]["frames"]) for i, x in enumerate(first))


def test_shots_shorter_than_a_chunk_are_refused():
    with pytest.raises(ValueError, match="procedural_shot_frames=20"):
        ProceduralClipDataset.from_config(load_config(CONFIG, [SHAPE, "data.procedural_shot_frames=20"]), seed=0)
