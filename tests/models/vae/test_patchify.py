"""The weight-free patchify VAE: exact inverse, Wan2.2 frame arithmetic, streaming, config selection."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longlive.config import ConfigError, load_config
from longlive.models.vae.patchify import PatchifyVAE, PatchifyVAEConfig
from longlive.pipelines.inference import build_vae

REPO = Path(__file__).resolve().parents[3]


def video(frames: int, h: int = 16, w: int = 24, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, frames, h, w, generator=torch.Generator().manual_seed(frames)) * 2 - 1


def test_encode_has_the_wan_geometry_and_decode_is_its_exact_inverse():
    vae = PatchifyVAE()
    x = video(1 + 4 * 15)
    z = vae.encode(x)
    assert z.shape == (2, 192, 16, 4, 6) and vae.config.z_dim == 192
    assert torch.equal(vae.decode(z), x)
    # every latent cell holds exactly its 4x4x4 block (frame 0 four times): a permutation of the pixels
    assert torch.equal(z[:, :, 1:].flatten().sort().values, x[:, :, 1:].flatten().sort().values)
    assert torch.equal(z[0, :, 0, 0, 0].reshape(3, 4, 4, 4)[:, 1], x[0, :, 0, :4, :4])


def test_frame_zero_decodes_to_the_mean_of_its_four_slots():
    vae = PatchifyVAE(PatchifyVAEConfig(spatial_stride=2))
    z = torch.zeros(1, vae.config.z_dim, 2, 3, 3)
    z.view(1, 3, 4, 2, 2, 2, 3, 3)[:, :, :, :, :, 0] = torch.arange(4.0).view(1, 1, 4, 1, 1, 1, 1) / 4
    out = vae.decode(z)
    assert out.shape == (1, 3, 5, 6, 6)
    assert torch.allclose(out[:, :, 0], torch.full_like(out[:, :, 0], 0.375))


def test_stream_decoder_chunks_concatenate_to_the_batch_decode():
    vae = PatchifyVAE()
    z = vae.encode(video(1 + 4 * 23))
    dec = vae.stream_decoder()
    parts = [dec.decode_chunk(z[:, :, i:i + 8]) for i in range(0, 24, 8)]
    assert [p.shape[2] for p in parts] == [29, 32, 32]
    assert torch.equal(torch.cat(parts, 2), vae.decode(z))
    dec.reset()
    assert dec.frames_for(8) == 29


def test_bad_inputs_name_the_problem():
    vae = PatchifyVAE()
    with pytest.raises(ValueError, match="divisible by 4"):
        vae.encode(video(5, h=18))
    with pytest.raises(ValueError, match="frame"):
        vae.encode(video(6))
    with pytest.raises(ValueError, match=r"\[B, 192"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))


def test_config_selects_patchify_and_refuses_a_mismatched_model():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    vae = build_vae(cfg, torch.device("cpu"), torch.float32)
    assert isinstance(vae, PatchifyVAE) and vae.dtype == torch.float32
    with pytest.raises(ConfigError, match="inference.vae_type.*192"):
        load_config(REPO / "configs" / "demo.yaml", ["inference.vae_type=tiny"])
    with pytest.raises(ConfigError, match="vae_type"):
        load_config(REPO / "configs" / "tiny.yaml", ["inference.vae_type=patchify"])
