"""Our WanVAE equals diffusers' AutoencoderKLWan (the oracle) given the same weights, in both key layouts.

Tolerances (fp32, CPU): encode max |diff| <= 1e-5 (observed 0), decode max |diff| <= 1e-5
(observed ~1e-6, from the normalise/denormalise round trip of the latents).
"""
from __future__ import annotations

import pytest
import torch

from longlive.models.vae import WanVAEConfig, diffusers_to_wan, load_vae, wan_to_diffusers

pytest.importorskip("diffusers")

ATOL = 1e-5
CFG = WanVAEConfig.preset("tiny")
CFG_2RES = CFG.replace(num_res_blocks=2, enc_dim=4, dec_dim=4)  # the real block count, smaller widths


def _oracle_mu(dvae, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dvae.encode(video).latent_dist.mode()


def _oracle_decode(dvae, raw_latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dvae.decode(raw_latents).sample


@pytest.mark.parametrize("cfg", [CFG, CFG_2RES], ids=["tiny", "two-res-blocks"])
def test_diffusers_weights_load_into_ours_and_match(cfg: WanVAEConfig, vh) -> None:
    dvae = vh.randomize_(vh.diffusers_vae(cfg), seed=1)
    ours = load_vae(dvae.state_dict(), "wan", config=cfg)

    video = vh.smooth_video(1, 9, 32, 48)
    mu_ref = _oracle_mu(dvae, video)
    mu = ours.encode_raw(video)
    assert mu.shape == (1, 48, 3, 2, 3)
    assert torch.allclose(mu, mu_ref, atol=ATOL, rtol=0)
    # normalised latents = (mu - mean) / std, per channel
    mean = torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(ours.encode(video), (mu_ref - mean) / std, atol=1e-4, rtol=0)

    raw = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    ref = _oracle_decode(dvae, raw)
    out = ours.decode((raw - mean) / std)
    assert out.shape == ref.shape == (1, 3, 9, 32, 48)
    assert (out.abs() < 1).float().mean() > 0.2, "outputs nearly all clamped: the comparison would be vacuous"
    assert (out - ref).abs().max().item() <= ATOL


def test_our_weights_convert_to_diffusers_and_load_strictly(vh) -> None:
    ours = vh.random_vae(CFG, seed=3)
    dvae = vh.diffusers_vae(CFG)
    result = dvae.load_state_dict(wan_to_diffusers(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    video = vh.smooth_video(2, 5, 16, 32, seed=4)
    assert torch.allclose(ours.encode_raw(video), _oracle_mu(dvae, video), atol=ATOL, rtol=0)
    z = torch.randn(2, 48, 2, 1, 2, generator=torch.Generator().manual_seed(5))
    ref = _oracle_decode(dvae, ours.denormalize(z))
    assert (ours.decode(z) - ref).abs().max().item() <= ATOL


def test_key_conversion_round_trips_and_covers_every_key(vh) -> None:
    for cfg in (CFG, CFG_2RES):
        ours_sd = vh.random_vae(cfg).state_dict()
        diff_sd = vh.diffusers_vae(cfg).state_dict()
        converted = wan_to_diffusers(ours_sd)
        assert set(converted) == set(diff_sd)
        assert all(converted[k].shape == diff_sd[k].shape for k in diff_sd)
        back = diffusers_to_wan(converted)
        assert set(back) == set(ours_sd)
        assert all(back[k] is ours_sd[k] for k in ours_sd)
