"""Paths used by a run: placeholders error only when used, explicit random weights, checkpoint format peeking."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from longlive.config import (
    ConfigError,
    is_placeholder,
    load_config,
    peek_checkpoint_format,
    require_path,
    resolve_generator_weights,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg_file(tmp_path: Path, checkpoints: dict, extra: dict | None = None) -> Path:
    data = {"checkpoints": checkpoints, **(extra or {})}
    path = tmp_path / "paths.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_is_placeholder():
    assert is_placeholder("/path/to/longlive2/generator.pt")
    assert not is_placeholder("/data/generator.pt") and not is_placeholder(None)


def test_require_path_placeholder_names_file_and_field(tmp_path):
    path = _cfg_file(tmp_path, {"generator_ckpt": "/path/to/longlive2/generator.pt"})
    cfg = load_config(path)  # loading is fine
    with pytest.raises(ConfigError) as exc:
        require_path(cfg, "checkpoints.generator_ckpt")
    msg = str(exc.value)
    assert str(path) in msg and "'checkpoints.generator_ckpt'" in msg and "placeholder" in msg


def test_require_path_shipped_config_placeholder():
    cfg = load_config(REPO / "configs/inference.yaml")
    with pytest.raises(ConfigError, match=r"inference\.yaml: field 'checkpoints\.lora_ckpt' is still the placeholder"):
        require_path(cfg, "checkpoints.lora_ckpt")


def test_require_path_unset_missing_and_kind(tmp_path):
    cfg = load_config(_cfg_file(tmp_path, {"generator_ckpt": str(tmp_path / "nope.pt")}))
    with pytest.raises(ConfigError, match=r"'checkpoints\.generator_ckpt'.*does not exist"):
        require_path(cfg, "checkpoints.generator_ckpt")
    with pytest.raises(ConfigError, match=r"'checkpoints\.lora_ckpt' is not set"):
        require_path(cfg, "checkpoints.lora_ckpt")
    with pytest.raises(ConfigError, match="no such config field"):
        require_path(cfg, "checkpoints.nothing")
    real = tmp_path / "gen.pt"
    torch.save({"generator": {}}, real)
    cfg = load_config(_cfg_file(tmp_path, {"generator_ckpt": str(real)}))
    assert require_path(cfg, "checkpoints.generator_ckpt", kind="file") == real
    cfg = load_config(_cfg_file(tmp_path, {"generator_ckpt": str(tmp_path)}))
    with pytest.raises(ConfigError, match="expected a file"):
        require_path(cfg, "checkpoints.generator_ckpt", kind="file")


def test_require_path_names_override(tmp_path):
    cfg = load_config(_cfg_file(tmp_path, {}), ["checkpoints.generator_ckpt=/path/to/x.pt"])
    with pytest.raises(ConfigError, match=r"override 'checkpoints\.generator_ckpt=/path/to/x\.pt'"):
        require_path(cfg, "checkpoints.generator_ckpt")


def test_random_weights_must_be_explicit(tmp_path):
    cfg = load_config(_cfg_file(tmp_path, {"generator_ckpt": None}))
    with pytest.raises(ConfigError) as exc:
        resolve_generator_weights(cfg)
    assert "random_weights: true" in str(exc.value) and "'checkpoints.generator_ckpt'" in str(exc.value)
    cfg = load_config(_cfg_file(tmp_path, {"random_weights": True}))
    assert resolve_generator_weights(cfg) is None
    tiny = load_config(REPO / "configs/tiny.yaml")
    assert resolve_generator_weights(tiny) is None
    real = tmp_path / "gen.pt"
    torch.save({"generator": {}}, real)
    assert resolve_generator_weights(load_config(_cfg_file(tmp_path, {"generator_ckpt": str(real)}))) == real


def test_peek_checkpoint_format(tmp_path):
    pt = tmp_path / "a.pt"
    torch.save({"generator": {"w": torch.ones(3)}, "checkpoint_format": "longlive_generator_merged_lora"}, pt)
    assert peek_checkpoint_format(pt) == "longlive_generator_merged_lora"
    plain = tmp_path / "b.pt"
    torch.save({"model.w": torch.ones(3)}, plain)
    assert peek_checkpoint_format(plain) is None
    legacy = tmp_path / "c.pt"
    torch.save({"checkpoint_format": "longlive_generator_nvfp4"}, legacy, _use_new_zipfile_serialization=False)
    assert peek_checkpoint_format(legacy) == "longlive_generator_nvfp4"
    st = tmp_path / "d.safetensors"
    save_file({"w": torch.ones(3)}, str(st), metadata={"checkpoint_format": "longlive_generator_merged_bf16"})
    assert peek_checkpoint_format(st) == "longlive_generator_merged_bf16"
    st2 = tmp_path / "e.safetensors"
    save_file({"w": torch.ones(3)}, str(st2))
    assert peek_checkpoint_format(st2) is None


class _NotAllowed:
    pass


def test_peek_rejects_unsafe_pickles(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"obj": _NotAllowed()}, bad)
    with pytest.raises(ConfigError, match="weights_only=True"):
        peek_checkpoint_format(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        peek_checkpoint_format(junk)
