"""MultiVideoConcatDataset: segments per chunk, 24 fps resampling, scene cuts, padding, determinism, failures."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from longlive.config import config_from_dict
from longlive.data.synthetic import frame_code_image, read_frame_codes
from longlive.data.video_dataset import (
    AllSamplesFailedError,
    DatasetError,
    MultiVideoConcatDataset,
    SourceVideo,
    collate_samples,
    frames_available,
    item_seed,
    plan_clip,
)
from longlive.io.video import resample_indices, save_video

P = "The scene transitions. "
L = 2  # latent frames per chunk
F = 8  # latent frames per clip -> 4 chunks, 1 + 4 * 7 = 29 raw frames (5 + 8 + 8 + 8)
SIZE = (32, 32)


def caption(sample: int, video: int) -> str:
    return f"s{sample} v{video}"


def write_sample(root: Path, sample: int, counts: list[int], fps: float = 24.0, captions: dict | None = None) -> None:
    """Videos k = 0.. of `counts` frames with block-coded frames (sample, k, frame) and their captions."""
    name = f"s{sample}"
    (root / "caption" / name).mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(counts):
        frames = np.stack([frame_code_image(sample, k, i, SIZE) for i in range(n)])
        save_video(frames, root / "video" / name / f"{k}.mp4", fps=fps, crf=10, preset="ultrafast", fsync=False)
        text = (captions or {}).get(k, caption(sample, k))
        if text is not None:
            (root / "caption" / name / f"{k}.json").write_text(json.dumps({"caption": text}), encoding="utf-8")


def dataset(root: Path, **kw) -> MultiVideoConcatDataset:
    kw.setdefault("train", False)
    return MultiVideoConcatDataset(root, latent_frames=kw.pop("latent_frames", F), frames_per_chunk=L,
                                   frame_size=SIZE, **kw)


def codes(item) -> list[tuple[int, int]]:
    """(video, source frame) of every frame of an item."""
    return [(v, f) for _, v, f in read_frame_codes(item["frames"])]


def test_chunks_fill_consecutive_videos_with_prefix_at_each_new_video(tmp_path):
    write_sample(tmp_path, 0, [13, 6, 40])  # video 1 is too short for an 8-frame chunk
    item = dataset(tmp_path)[0]
    assert item["frames"].shape == (3, 29, 32, 32) and item["frames"].dtype == torch.float16
    assert float(item["frames"].min()) >= -1 and float(item["frames"].max()) <= 1
    # chunk 0: 5 frames + chunk 1: 8 frames = all 13 frames of video 0; chunks 2-3 from video 2.
    assert codes(item) == [(0, i) for i in range(13)] + [(2, i) for i in range(16)]
    assert item["prompts"] == [caption(0, 0), caption(0, 0), P + caption(0, 2), caption(0, 2)]
    assert item["num_valid_latent_frames"] == F and item["name"] == "s0" and item["index"] == 0
    assert item["skipped"] == [] and "image" not in item


def test_30fps_source_is_resampled_to_24fps(tmp_path):
    write_sample(tmp_path, 0, [20, 30], fps=30.0)  # video 0: 16 frames at 24 fps < 5 + 8 + 8
    item = dataset(tmp_path)[0]
    expected = [(0, i) for i in resample_indices(20, 30.0, 24.0)[:13]] + [(1, i) for i in resample_indices(30, 30.0, 24.0)[:16]]
    assert codes(item) == expected
    assert [f for _, f in expected[:6]] == [0, 1, 2, 4, 5, 6]  # index stepping by 30/24 with rounding
    assert item["prompts"] == [caption(0, 0), caption(0, 0), P + caption(0, 1), caption(0, 1)]


def test_virtual_cut_skips_one_second_of_source_and_adds_the_prefix(tmp_path):
    write_sample(tmp_path, 0, [120], fps=30.0)
    item = dataset(tmp_path, max_chunks_per_shot=2)[0]
    # Chunks 0-1 from frame 0 (13 frames at 24 fps end before source frame 16); then skip 30 source frames.
    first = [(0, i) for i in resample_indices(120, 30.0, 24.0, start=0, count=13)]
    second = [(0, i) for i in resample_indices(120, 30.0, 24.0, start=16 + 30, count=16)]
    assert codes(item) == first + second
    assert item["prompts"] == [caption(0, 0), caption(0, 0), P + caption(0, 0), caption(0, 0)]


def test_padding_repeats_last_frame_and_prompt_and_counts_valid_latents(tmp_path, caplog):
    write_sample(tmp_path, 0, [18])  # 5 + 8 = 13 frames, then 5 left: one more whole latent (4 frames)
    with pytest.raises(AllSamplesFailedError, match="only 4 of 8 latent frames"):
        dataset(tmp_path)[0]
    with caplog.at_level(logging.INFO, logger="longlive.data.video_dataset"):
        item = dataset(tmp_path, allow_padding=True)[0]
    assert item["num_valid_latent_frames"] == 5
    assert codes(item)[:17] == [(0, i) for i in range(17)]
    assert torch.equal(item["frames"][:, 17:], item["frames"][:, 16:17].expand(-1, 12, -1, -1))
    assert item["prompts"] == [caption(0, 0)] * 4
    assert any("padded 12 of 29 frames" in r.getMessage() for r in caplog.records)
    with pytest.raises(AllSamplesFailedError, match="min_latent_frames"):
        dataset(tmp_path, allow_padding=True, min_latent_frames=6)[0]


def test_uniform_prompt_takes_the_whole_clip_from_one_video(tmp_path):
    write_sample(tmp_path, 0, [13, 40])
    item = dataset(tmp_path, uniform_prompt=True)[0]
    assert codes(item) == [(1, i) for i in range(29)]
    assert item["prompts"] == [caption(0, 1)] * 4
    for epoch in range(3):  # random starts are only where the clip fits inside one video
        ds = dataset(tmp_path, uniform_prompt=True, train=True, seed=5)
        ds.set_epoch(epoch)
        got = codes(ds[0])
        assert {v for v, _ in got} == {1} and [f for _, f in got] == list(range(got[0][1], got[0][1] + 29))


def test_random_start_is_a_function_of_seed_epoch_and_index(tmp_path):
    write_sample(tmp_path, 0, [60])
    write_sample(tmp_path, 1, [60])
    starts = []
    for epoch in range(6):
        a = dataset(tmp_path, train=True, seed=3)
        b = dataset(tmp_path, train=True, seed=3)
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        x, y = a[1], b[1]
        assert torch.equal(x["frames"], y["frames"]) and x["prompts"] == y["prompts"]
        got = codes(x)
        start = got[0][1]
        assert got == [(0, start + i) for i in range(29)] and 0 <= start <= 60 - 29
        starts.append(start)
    assert len(set(starts)) > 1  # the epoch changes the start
    assert item_seed(3, 0, 1) != item_seed(3, 1, 0) != item_seed(4, 0, 1)
    ev = dataset(tmp_path, train=False)
    ev.set_epoch(4)
    assert codes(ev[1])[0] == (0, 0)  # eval: deterministic start (video 0, frame 0)


def test_unreadable_samples_are_skipped_with_one_warning_each(tmp_path, caplog):
    for s in range(3):
        write_sample(tmp_path, s, [29])
    (tmp_path / "caption" / "s0" / "0.json").write_text("{not json", encoding="utf-8")
    video = tmp_path / "video" / "s1" / "0.mp4"
    video.write_bytes(video.read_bytes()[: len(video.read_bytes()) // 2])  # truncated: decoding fails
    ds = dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="longlive.data.video_dataset"):
        item = ds[0]
    assert item["name"] == "s2" and item["index"] == 2
    assert item["skipped"] == [str(tmp_path / "caption" / "s0" / "0.json"), str(video)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "0.json" in warnings[0] and "invalid JSON" in warnings[0] and str(video) in warnings[1]
    assert ds[2]["skipped"] == []


def test_all_samples_failing_raises_with_count_and_first_errors(tmp_path):
    for s in range(2):
        write_sample(tmp_path, s, [29])
        (tmp_path / "video" / f"s{s}" / "0.mp4").write_bytes(b"not a video")
    with pytest.raises(AllSamplesFailedError, match="all 2 samples failed") as info:
        dataset(tmp_path)[1]
    assert isinstance(info.value, RuntimeError)
    assert str(tmp_path / "video" / "s0" / "0.mp4") in str(info.value)


def test_videos_without_caption_are_ignored_with_a_logged_count(tmp_path, caplog):
    write_sample(tmp_path, 0, [29, 29, 29], captions={0: None, 1: "   "})
    with caplog.at_level(logging.WARNING, logger="longlive.data.video_dataset"):
        item = dataset(tmp_path)[0]
    assert codes(item) == [(2, i) for i in range(29)] and item["prompts"] == [caption(0, 2)] * 4
    assert any("2 video(s) not used" in r.getMessage() for r in caplog.records)


def test_construction_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "missing")):
        dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match=str(tmp_path / "video")):
        dataset(tmp_path)
    (tmp_path / "video").mkdir()
    (tmp_path / "caption").mkdir()
    with pytest.raises(DatasetError, match="no sample folders"):
        dataset(tmp_path)


def test_filter_invalid_folders_drops_samples_that_cannot_make_a_clip(tmp_path, caplog):
    write_sample(tmp_path, 0, [10])
    write_sample(tmp_path, 1, [29])
    assert len(dataset(tmp_path)) == 2
    with caplog.at_level(logging.WARNING):
        ds = dataset(tmp_path, filter_invalid_folders=True)
    assert ds.samples == ["s1"] and ds[0]["name"] == "s1"
    assert any("dropped 1 of 2" in r.getMessage() for r in caplog.records)


def test_from_config_geometry_return_image_and_collate(tmp_path):
    write_sample(tmp_path, 0, [29, 29])
    write_sample(tmp_path, 1, [29, 29])
    cfg = config_from_dict({
        "model_kwargs": {"model_name": "tiny", "num_frame_per_block": L},
        "data": {"data_path": str(tmp_path), "image_or_video_shape": [1, F, 48, 2, 2], "max_chunks_per_shot": 3},
        "inference": {"vae_type": "tiny"},
        "checkpoints": {"random_weights": True},
    })
    ds = MultiVideoConcatDataset.from_config(cfg, train=True, seed=1, return_image=True)
    assert (ds.frame_size, ds.latent_frames, ds.frames_per_chunk, ds.raw_frames) == ((32, 32), F, L, 29)
    assert ds.max_chunks_per_shot == 3 and ds.train and ds.seed == 1
    items = [ds[0], ds[1]]
    assert torch.equal(items[0]["image"], items[0]["frames"][:, 0])
    assert items[1]["prompts"] == [caption(1, 0)] * 3 + [P + caption(1, 1)]  # cut after 3 chunks: video 0 is used up
    batch = collate_samples(items)
    assert batch["frames"].shape == (2, 3, 29, 32, 32) and batch["image"].shape == (2, 3, 32, 32)
    assert batch["prompts"] == [items[0]["prompts"], items[1]["prompts"]]
    assert batch["num_valid_latent_frames"].tolist() == [F, F] and batch["index"].tolist() == [0, 1]
    assert batch["name"] == ["s0", "s1"] and batch["skipped"] == [[], []]


def test_frames_available_matches_resample_indices():
    for n, fps, start in [(20, 30.0, 0), (20, 30.0, 7), (100, 29.97, 3), (10, 15.0, 0), (5, 24.0, 5), (0, 24.0, 0)]:
        assert frames_available(SourceVideo(n, fps), start) == len(resample_indices(n, fps, 24.0, start))


def test_plan_partial_chunk_and_no_partial_past_a_virtual_cut():
    videos = [SourceVideo(19, 24.0)]
    plan = plan_clip(videos.__getitem__, 1, (0, 0), L, 4, partial=True)
    assert not plan.complete and plan.valid_latents == 5 and plan.runs[0].num_frames == 17
    plan = plan_clip(videos.__getitem__, 1, (0, 0), L, 4, max_chunks_per_shot=2, partial=True)
    assert plan.valid_latents == 4 and plan.raw_frames == 13  # chunk 2 was due a cut: no partial
