"""Synthetic data: the block-coded video dataset writer, and the learnable latent dataset."""
from __future__ import annotations

import json
import math

import pytest
import torch

from longlive.data.synthetic import (
    SyntheticLatentDataset,
    SyntheticVocabulary,
    read_frame_codes,
    synthetic_caption,
    write_synthetic_video_dataset,
)
from longlive.data.video_dataset import collate_samples
from longlive.io.video import probe_video, read_video

P = "The scene transitions. "


def test_video_dataset_writer_layout_and_frame_codes(tmp_path):
    folders = write_synthetic_video_dataset(tmp_path, num_samples=2, videos_per_sample=2, frames_per_video=[7, 12],
                                            fps=30.0, size=(32, 48), seed=1)
    assert folders == [tmp_path / "video" / "sample_000", tmp_path / "video" / "sample_001"]
    for s in range(2):
        for k, n in enumerate([7, 12]):
            path = tmp_path / "video" / f"sample_{s:03d}" / f"{k}.mp4"
            info = probe_video(path)
            assert (info.num_frames, info.fps, info.height, info.width) == (n, 30.0, 32, 48)
            assert read_frame_codes(read_video(path)) == [(s, k, i) for i in range(n)]
            cap = json.loads((tmp_path / "caption" / f"sample_{s:03d}" / f"{k}.json").read_text())
            assert cap == {"caption": synthetic_caption(s, k)}
    with pytest.raises(ValueError, match="frames_per_video has 1 entries"):
        write_synthetic_video_dataset(tmp_path / "bad", 1, 2, [5])


def test_latents_are_deterministic_and_keyed_like_the_real_datasets():
    a = SyntheticLatentDataset(8, (16, 8, 4, 6), frames_per_chunk=2, seed=3, max_shots=3)
    b = SyntheticLatentDataset(8, (16, 8, 4, 6), frames_per_chunk=2, seed=3, max_shots=3)
    c = SyntheticLatentDataset(8, (16, 8, 4, 6), frames_per_chunk=2, seed=4, max_shots=3)
    item = a[5]
    assert set(item) == {"latents", "prompts", "num_valid_latent_frames", "name", "index", "skipped"}
    assert item["latents"].shape == (16, 8, 4, 6) and item["latents"].dtype == torch.float32
    assert len(item["prompts"]) == 4 and item["num_valid_latent_frames"] == 8 and item["index"] == 5
    assert item["skipped"] == [] and item["name"] == "synthetic_000005"
    assert torch.equal(item["latents"], b[5]["latents"]) and item["prompts"] == b[5]["prompts"]
    assert not torch.equal(item["latents"], c[5]["latents"])
    batch = collate_samples([a[0], a[1]])
    assert batch["latents"].shape == (2, 16, 8, 4, 6) and len(batch["prompts"]) == 2


def test_prompts_describe_shots_with_scene_cut_prefix():
    ds = SyntheticLatentDataset(20, (8, 12, 4, 4), frames_per_chunk=2, seed=0, max_shots=3)
    vocab = ds.vocabulary
    seen_multi = False
    for i in range(len(ds)):
        shots, prompts = ds.shots(i), ds[i]["prompts"]
        assert sum(s.num_chunks for s in shots) == 6 and shots[0].first_chunk == 0
        seen_multi |= len(shots) > 1
        for j, shot in enumerate(shots):
            text = vocab.prompt(shot.colour, shot.width, shot.direction)
            expected = [P + text if j > 0 else text] + [text] * (shot.num_chunks - 1)
            assert prompts[shot.first_chunk : shot.first_chunk + shot.num_chunks] == expected
    assert seen_multi
    assert vocab.prompt(0, 1, 2) == "narrow red stripes moving up"


def _rank(m: torch.Tensor, rtol: float = 1e-4) -> int:
    """Numerical rank from the eigenvalues of the small Gram matrix (SVD of wide matrices is slow on CPU)."""
    ev = torch.linalg.eigvalsh(m.double() @ m.double().T).clamp(min=0).sqrt()
    return int((ev > rtol * ev.max()).sum())


def test_each_shot_is_a_low_rank_wave_named_by_its_prompt():
    ds = SyntheticLatentDataset(12, (8, 8, 6, 10), frames_per_chunk=4, seed=1)
    directions = {}
    for i in range(len(ds)):
        (shot,) = ds.shots(i)
        x = ds[i]["latents"]
        # channels: one loading vector per colour word (rank 1 over C); time: cos/sin (rank 2 over F).
        assert _rank(x.reshape(8, -1)) == 1
        assert _rank(x.permute(1, 0, 2, 3).reshape(8, -1)) == 2
        direction = ds.vocabulary.directions[shot.direction]
        dim = 3 if direction in ("left", "right") else 2  # varies along x for left/right, along y for up/down
        flat = x.std(dim=5 - dim)  # the other spatial axis
        assert float(flat.max()) < 1e-5
        loading = x.reshape(8, -1)[:, x.reshape(8, -1).abs().sum(0).argmax()]
        directions.setdefault(shot.colour, []).append(loading / loading.norm())
    for vectors in directions.values():  # the same colour word gives the same channel direction
        for v in vectors[1:]:
            assert math.isclose(abs(float(v @ vectors[0])), 1.0, rel_tol=1e-5)


def test_motion_direction_matches_the_prompt():
    # Phase advances by 2*pi/4 per frame; with one cycle over 8 columns a shift of 2 columns per frame.
    vocab = SyntheticVocabulary(colours=("red",), widths=(("narrow", 1.0),), directions=("left", "right"))
    ds = SyntheticLatentDataset(16, (4, 4, 2, 8), frames_per_chunk=2, seed=0, vocabulary=vocab, frames_per_cycle=4)
    for i in range(len(ds)):
        x = ds[i]["latents"]
        shift = -2 if ds.shots(i)[0].direction == 0 else 2  # left: content moves to lower x
        torch.testing.assert_close(x[:, 1], torch.roll(x[:, 0], shifts=shift, dims=-1), atol=1e-5, rtol=0)


def test_full_5b_geometry_item():
    ds = SyntheticLatentDataset(2, (48, 96, 44, 80), frames_per_chunk=8, seed=0, max_shots=4)
    x = ds[1]["latents"]
    assert x.shape == (48, 96, 44, 80) and torch.isfinite(x).all()
    assert 0.5 < float(x.std()) < 1.5 and len(ds[1]["prompts"]) == 12


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        SyntheticLatentDataset(1, (4, 5, 2, 2), frames_per_chunk=2)
    with pytest.raises(IndexError):
        SyntheticLatentDataset(1, (4, 4, 2, 2), frames_per_chunk=2)[1]
