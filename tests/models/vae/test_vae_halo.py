"""Chunk-halo encoding windows (spec 5.3), the halo encode, and `longlive vae-halo`."""
from __future__ import annotations

import json

import pytest
import torch

from longlive.cli.main import main
from longlive.models.vae import encode_halo_window, halo_window, sp_halo_windows


def test_spec_example_f96_sp4_h28() -> None:
    windows = sp_halo_windows(latent_frames=96, sp_size=4, halo_latents=28)
    got = [(w.keep_start, w.keep_end, w.halo_start, w.raw_start, w.raw_end, w.drop) for w in windows]
    assert got == [
        (0, 24, 0, 0, 93, 0),
        (24, 48, 0, 0, 189, 24),
        (48, 72, 20, 76, 285, 29),
        (72, 96, 44, 172, 381, 29),
    ]
    assert [w.pseudo_prefix for w in windows] == [0, 0, 1, 1]
    assert all(w.encoded_latents - w.drop == 24 for w in windows)


@pytest.mark.parametrize("frames,sp,halo", [(96, 4, 28), (12, 3, 2), (8, 2, 0), (10, 5, 100), (7, 1, 3)])
def test_window_arithmetic_invariants(frames: int, sp: int, halo: int) -> None:
    raw = 1 + 4 * (frames - 1)
    for w in sp_halo_windows(frames, sp, halo, raw):
        # raw window length must be 1 + 4k and encode to exactly drop + keep latents
        assert (w.raw_frames - 1) % 4 == 0
        assert 1 + (w.raw_frames - 1) // 4 == w.encoded_latents
        assert w.halo_start == max(0, w.keep_start - halo)
        assert 0 <= w.raw_start < w.raw_end <= raw


def test_window_errors() -> None:
    with pytest.raises(ValueError, match="multiple of sp_size"):
        sp_halo_windows(10, 4, 2)
    with pytest.raises(ValueError, match="only 20"):
        halo_window(4, 8, 2, raw_frames=20)
    with pytest.raises(ValueError, match="keep_start"):
        halo_window(5, 5, 2, raw_frames=100)


def test_halo_encode_returns_kept_latents(vh) -> None:
    vae = vh.random_vae(seed=31)
    frames, sp, halo = 4, 2, 1
    video = vh.smooth_video(1, 1 + 4 * (frames - 1), 16, 16)
    full = vae.encode(video)
    kept = []
    for w in sp_halo_windows(frames, sp, halo):
        part = encode_halo_window(vae, video[:, :, w.raw_start : w.raw_end], w)
        assert part.shape == (1, 48, frames // sp, 1, 1)
        kept.append(part)
    # rank 0 sees the true start of the clip: identical to the full encode
    assert torch.equal(kept[0], full[:, :, :2])
    assert torch.cat(kept, 2).shape == full.shape
    w = sp_halo_windows(frames, sp, halo)[1]
    with pytest.raises(ValueError, match="raw frames"):
        encode_halo_window(vae, video[:, :, : w.raw_frames - 4], w)


def test_halo_covering_the_whole_prefix_is_exact(vh) -> None:
    vae = vh.random_vae(seed=32)
    video = vh.smooth_video(1, 1 + 4 * 3, 16, 16)
    w = halo_window(2, 4, halo_latents=2, raw_frames=video.shape[2])
    assert (w.raw_start, w.drop) == (0, 2)
    assert torch.equal(encode_halo_window(vae, video[:, :, w.raw_start : w.raw_end], w), vae.encode(video)[:, :, 2:])


def _yaml(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_cli_prints_windows(tmp_path, capsys) -> None:
    cfg = _yaml(tmp_path, "infra:\n  sequence_parallel_size: 4\n  vae_halo_latents: 28\ndata:\n  image_or_video_shape: [1, 96, 48, 44, 80]\n")
    assert main(["vae-halo", "--config", str(cfg)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "sp_size 4, halo 28 latents, 96 latent frames, 381 raw frames" in lines[0]
    assert lines[4].split() == ["2", "[48,", "72)", "20", "[76,", "285)", "209", "29"]

    assert main(["vae-halo", "--config", str(cfg), "--json", "--sp-size", "2", "--halo-latents", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["sp_size"], data["halo_latents"], data["raw_frames"]) == (2, 4, 381)
    assert data["ranks"][1] == {"rank": 1, "keep_start": 48, "keep_end": 96, "halo_start": 44, "raw_start": 172,
                                "raw_end": 381, "pseudo_prefix": 1, "drop": 5, "raw_frames": 209}


def test_cli_flat_keys_defaults_and_errors(tmp_path, capsys, caplog) -> None:
    flat = _yaml(tmp_path, "sequence_parallel_size: 2\nimage_or_video_shape: [1, 16, 48, 44, 80]\n")
    assert main(["vae-halo", "--config", str(flat), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["halo_latents"] == 28 and data["ranks"][1]["drop"] == 8

    assert main(["vae-halo", "--sp-size", "2", "--latent-frames", "8", "--raw-frames", "29", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["raw_frames"] == 29

    defaults = _yaml(tmp_path, "infra:\n  vae_halo_latents: 4\n")  # schema default: no sequence parallelism
    assert main(["vae-halo", "--config", str(defaults), "--latent-frames", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sp_size"] == 1
    uneven = _yaml(tmp_path, "sequence_parallel_size: 2\nimage_or_video_shape: [1, 8, 48, 44, 80]\n")
    assert main(["vae-halo", "--config", str(uneven)]) == 2
    assert str(uneven) in caplog.text and "each SP rank owns whole chunks" in caplog.text
    wrong = _yaml(tmp_path, "infra:\n  sequence_parallel_size: two\n")
    assert main(["vae-halo", "--config", str(wrong)]) == 2
    assert "field 'infra.sequence_parallel_size': expected an integer" in caplog.text
    assert main(["vae-halo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in caplog.text


def test_halo_of_27_latents_covers_the_wan22_encoder_receptive_field() -> None:
    """With the Wan2.2 block structure a latent depends on the frames of at most 27 earlier latents:
    a halo of 27 reproduces the full encode exactly, 26 does not (the reference uses 28)."""
    from longlive.models.vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.preset("wan2.2").replace(enc_dim=2, dec_dim=2)).eval()
    frames = 30
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 1 + 4 * (frames - 1), 16, 16, generator=gen) * 2 - 1
    full = vae.encode(video)[:, :, 29:]
    exact = halo_window(29, 30, halo_latents=27, raw_frames=video.shape[2])
    short = halo_window(29, 30, halo_latents=26, raw_frames=video.shape[2])
    assert exact.raw_start == 4 and exact.pseudo_prefix == 1  # a real halo window, not the clip start
    assert torch.equal(encode_halo_window(vae, video[:, :, exact.raw_start : exact.raw_end], exact), full)
    assert not torch.equal(encode_halo_window(vae, video[:, :, short.raw_start : short.raw_end], short), full)
