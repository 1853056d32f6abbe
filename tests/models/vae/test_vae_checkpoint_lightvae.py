"""Loading VAE weights: files, strictness, and pruned LightVAE checkpoints (widths from the weights)."""
from __future__ import annotations

import logging
import pickle

import pytest

from longlive.io.checkpoint import CheckpointError
import torch

from longlive.models.vae import (
    CheckpointMismatchError,
    WanVAEConfig,
    load_vae,
    read_state_dict,
    save_vae,
    wan_to_diffusers,
)

BASE = WanVAEConfig.preset("tiny")  # unpruned widths 8/8; LightVAE-style pruning halves them


def _lightvae_file(tmp_path, vh, pruned_dim: int = 4):
    """A pruned tiny VAE saved like a LightVAE student: diffusers-style names, distillation heads, wrapped."""
    student = vh.random_vae(BASE.replace(enc_dim=pruned_dim, dec_dim=pruned_dim), seed=21)
    sd = wan_to_diffusers(student.state_dict())
    sd["dynamic_feature_projection_heads.0.weight"] = torch.randn(4, 4)
    sd["dynamic_feature_projection_heads.0.bias"] = torch.randn(4)
    path = tmp_path / "MG-LightVAE.pth"
    torch.save({"generator": sd}, path)
    return student, path


def test_lightvae_loads_with_inferred_width_and_round_trips(tmp_path, vh, caplog) -> None:
    student, path = _lightvae_file(tmp_path, vh)
    with caplog.at_level(logging.INFO, logger="longlive.models.vae.checkpoint"):
        vae = load_vae(path, "mg_lightvae", config=BASE)
    assert (vae.config.enc_dim, vae.config.dec_dim) == (4, 4)
    assert "dynamic_feature_projection_heads." in caplog.text and "dropping 2" in caplog.text
    assert "usually has decoder pruning" not in caplog.text  # 8 -> 4 channels is mg_lightvae's nominal 0.5
    for k, v in student.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k

    video = vh.smooth_video(1, 5, 32, 32)
    z = vae.encode(video)  # LightVAE encodes too (the reference cannot)
    assert z.shape == (1, 48, 2, 2, 2)
    out = vae.decode(z)
    assert out.shape == video.shape
    assert torch.equal(z, student.encode(video)) and torch.equal(out, student.decode(z))

    for name in ("resaved.safetensors", "resaved.pth"):
        save_vae(vae, tmp_path / name)
        again = load_vae(tmp_path / name, "auto", config=BASE)
        assert torch.equal(again.encode(video), z) and torch.equal(again.decode(z), out)
    save_vae(vae, tmp_path / "diffusers.safetensors", layout="diffusers")
    assert torch.equal(load_vae(tmp_path / "diffusers.safetensors", "mg_lightvae", config=BASE).decode(z), out)


def test_lightvae_v2_nominal_rate_mismatch_warns_and_wan_type_refuses(tmp_path, vh, caplog) -> None:
    _, path = _lightvae_file(tmp_path, vh)
    with caplog.at_level(logging.WARNING, logger="longlive.models.vae.checkpoint"):
        vae = load_vae(path, "mg_lightvae_v2", config=BASE)
    assert vae.config.dec_dim == 4 and "usually has decoder pruning 0.75" in caplog.text
    with pytest.raises(CheckpointMismatchError, match="pruned LightVAE"):
        load_vae(path, "wan", config=BASE)


def test_decoder_only_lightvae_takes_encoder_from_full_vae(vh) -> None:
    student = vh.random_vae(BASE.replace(enc_dim=4, dec_dim=4), seed=22)
    teacher = vh.random_vae(BASE, seed=23)
    decoder_only = {k: v for k, v in wan_to_diffusers(student.state_dict()).items()
                    if not k.startswith(("encoder.", "quant_conv."))}
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_vae(decoder_only, "mg_lightvae", config=BASE)
    vae = load_vae(decoder_only, "mg_lightvae", config=BASE, encoder_source=teacher.state_dict())
    assert (vae.config.enc_dim, vae.config.dec_dim) == (8, 4)
    video = vh.smooth_video(1, 5, 16, 16)
    assert torch.equal(vae.encode(video), teacher.encode(video))
    z = torch.randn(1, 48, 2, 1, 1)
    assert torch.equal(vae.decode(z), student.decode(z))


def test_partial_or_foreign_checkpoints_fail_naming_keys(vh) -> None:
    sd = vh.random_vae(BASE).state_dict()
    partial = {k: v for k, v in sd.items() if k != "decoder.head.2.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\).*decoder\.head\.2\.weight"):
        load_vae(partial, "wan", config=BASE)
    extra = dict(sd, **{"decoder.extra_head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\).*decoder\.extra_head\.weight"):
        load_vae(extra, "auto", config=BASE)
    bad_shape = dict(sd, **{"decoder.head.0.gamma": torch.ones(3, 1, 1, 1)})
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_vae(bad_shape, "wan", config=BASE)
    with pytest.raises(CheckpointMismatchError, match="z_dim"):
        load_vae(sd, "wan", config=BASE.replace(z_dim=4, latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4))
    with pytest.raises(ValueError, match="vae_type"):
        load_vae(sd, "lightvae")


class _NotATensor:
    def __reduce__(self):  # executing this on load would be arbitrary code execution
        return (print, ("pickle executed",))


def test_files_are_read_safely(tmp_path, vh, capsys) -> None:
    vae = vh.random_vae(BASE)
    save_vae(vae, tmp_path / "vae.pth")
    assert set(read_state_dict(tmp_path / "vae.pth")) == set(vae.state_dict())
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _NotATensor()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(evil)
    assert "pickle executed" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_vae(tmp_path / "missing.pth")
    (tmp_path / "vae.bin2").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix"):
        read_state_dict(tmp_path / "vae.bin2")
    with pytest.raises(ValueError, match="not tensors"):
        read_state_dict({"a": 1})


def test_loaded_dtype_and_device(vh) -> None:
    vae = load_vae(vh.random_vae(BASE).state_dict(), "wan", config=BASE, dtype=torch.bfloat16, device="cpu")
    assert vae.dtype == torch.bfloat16 and not any(p.requires_grad for p in vae.parameters())
    out = vae.decode(torch.randn(1, 48, 2, 1, 1))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 5, 16, 16)


@pytest.mark.parametrize("wrappers", [[], ["state_dict"], ["gen_model"], ["state_dict", "gen_model", "generator"]])
def test_known_checkpoint_wrappers_are_unwrapped(tmp_path, vh, wrappers: list[str]) -> None:
    sd = vh.random_vae(BASE).state_dict()
    obj: dict = dict(sd)
    for name in reversed(wrappers):
        obj = {name: obj, "step": torch.tensor(3)}  # siblings of the wrapper are ignored
    torch.save(obj, tmp_path / "wrapped.pth")
    loaded = read_state_dict(tmp_path / "wrapped.pth")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
