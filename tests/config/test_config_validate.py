"""Cross-field validation: chunk divisibility, sink/window fit, SP sizes, LoRA vs merged checkpoints, exclusions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from longlive.config import ConfigError, load_config

BASE = {
    "model_kwargs": {"model_name": "Wan2.2-TI2V-5B", "num_frame_per_block": 8, "local_attn_size": 32},
    "data": {"image_or_video_shape": [1, 128, 48, 44, 80]},
    "inference": {"sink_size": 8, "multi_shot_sink": True},
}


def _cfg(tmp_path: Path, **sections) -> Path:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _error(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, list(overrides))
    msg = str(exc.value)
    assert str(path) in msg
    return msg


def test_base_is_valid(tmp_path):
    cfg = load_config(_cfg(tmp_path))
    assert cfg.num_chunks == 16


def test_frames_not_multiple_of_chunk(tmp_path):
    msg = _error(_cfg(tmp_path, inference={"num_output_frames": 100}))
    assert "'inference.num_output_frames'" in msg and "not a multiple of the chunk size" in msg and "96 or 104" in msg
    msg = _error(_cfg(tmp_path, data={"image_or_video_shape": [1, 20, 48, 44, 80]}))
    assert "'data.image_or_video_shape'" in msg and "20 latent frames" in msg


def test_shape_must_have_five_entries_and_match_model(tmp_path):
    msg = _error(_cfg(tmp_path, data={"image_or_video_shape": [1, 128, 48, 44]}))
    assert "'data.image_or_video_shape'" in msg and "5 positive integers" in msg
    msg = _error(_cfg(tmp_path, model_kwargs={"model_name": "tiny"}, data={"image_or_video_shape": [1, 128, 16, 44, 80]}))
    assert "'data.image_or_video_shape'" in msg and "latent channels C=16" in msg


def test_sink_must_be_whole_chunks(tmp_path):
    msg = _error(_cfg(tmp_path, inference={"sink_size": 4}))
    assert "'inference.sink_size'" in msg and "multiple of the chunk size 8" in msg
    msg = _error(_cfg(tmp_path, model_kwargs={"sink_size": 3}))
    assert "'model_kwargs.sink_size'" in msg


def test_window_must_be_whole_chunks_or_global(tmp_path):
    msg = _error(_cfg(tmp_path, model_kwargs={"local_attn_size": 20}))
    assert "'model_kwargs.local_attn_size'" in msg and "-1 (global attention)" in msg
    msg = _error(_cfg(tmp_path, inference={"local_attn_size": 0}))
    assert "'inference.local_attn_size'" in msg
    assert load_config(_cfg(tmp_path, model_kwargs={"local_attn_size": -1})).local_attn_size == -1


def test_window_must_hold_sink_pin_and_new_chunk(tmp_path):
    # 2 chunks cannot hold sink (1) + shot pin (1) + new chunk (1).
    msg = _error(_cfg(tmp_path, model_kwargs={"local_attn_size": 16}))
    assert "'model_kwargs.local_attn_size'" in msg and "= 3 chunks" in msg and "at least 24" in msg
    assert "pinned shot chunk" in msg
    # Without the multi-shot pin 2 chunks are enough.
    assert load_config(_cfg(tmp_path, model_kwargs={"local_attn_size": 16},
                            inference={"multi_shot_sink": False})).local_attn_size == 16
    # Window from inference overrides model_kwargs and is reported under its own name.
    msg = _error(_cfg(tmp_path, inference={"local_attn_size": 16, "sink_size": 16}))
    assert "'inference.local_attn_size'" in msg and "at least 32" in msg
    assert load_config(_cfg(tmp_path, model_kwargs={"local_attn_size": 24})).local_attn_size == 24


def test_sequence_parallel_sizes(tmp_path):
    msg = _error(_cfg(tmp_path, sp_size=3))
    assert "'sp_size'" in msg and "frames per chunk (8)" in msg
    msg = _error(_cfg(tmp_path, sp_size=16))
    assert "'sp_size'" in msg and "number of attention heads (24" in msg
    msg = _error(_cfg(tmp_path, sp_size=2, model_num_heads=3))
    assert "'sp_size'" in msg and "heads (3" in msg
    assert load_config(_cfg(tmp_path, sp_size=4)).sp_size == 4
    msg = _error(_cfg(tmp_path, infra={"sequence_parallel_size": 5}))
    assert "'infra.sequence_parallel_size'" in msg
    msg = _error(_cfg(tmp_path, infra={"sequence_parallel_size": 4}, data={"image_or_video_shape": [1, 48, 48, 44, 80]}))
    assert "'data.image_or_video_shape'" in msg and "4 x 8 = 32" in msg


def test_sp_inference_rejects_unsupported_features(tmp_path):
    msg = _error(_cfg(tmp_path, sp_size=4, i2v=True, inference={"independent_first_frame": True}))
    assert "'i2v'" in msg and "sequence-parallel" in msg


def test_fp4_all_to_all_needs_the_fp4_cache_and_a_slot_reading_backend(tmp_path):
    msg = _error(_cfg(tmp_path, sp_size=4, inference={"kv_quant_comm": True}))
    assert "'inference.kv_quant_comm'" in msg and "kv_quant: true" in msg
    msg = _error(_cfg(tmp_path, sp_size=4, inference={"kv_quant": True, "kv_quant_comm": True, "kv_quant_backend": "triton"}))
    assert "'inference.kv_quant_comm'" in msg and "kv_quant_backend: cuda or pytorch" in msg


def test_lora_without_adapter_and_random_weights_conflicts(tmp_path):
    msg = _error(_cfg(tmp_path, checkpoints={"lora_ckpt": "/path/to/lora.pt"}))
    assert "'checkpoints.lora_ckpt'" in msg and "adapter" in msg
    msg = _error(_cfg(tmp_path, checkpoints={"generator_ckpt": "/path/to/gen.pt", "random_weights": True}))
    assert "'checkpoints.random_weights'" in msg


def test_exclusive_and_required_flags(tmp_path):
    msg = _error(_cfg(tmp_path, fp8_quant=True, model_quant=True))
    assert "'fp8_quant'" in msg and "mutually exclusive" in msg
    msg = _error(_cfg(tmp_path, i2v=True))
    assert "'inference.independent_first_frame'" in msg


def test_training_frame_fields(tmp_path):
    msg = _error(_cfg(tmp_path, training={"num_training_frames": 30}, evaluation={"num_frames": [16, 20]}))
    assert "'training.num_training_frames'" in msg and "'evaluation.num_frames'" in msg


def test_placeholders_are_fine_until_used(tmp_path):
    cfg = load_config(_cfg(tmp_path, checkpoints={"generator_ckpt": "/path/to/gen.pt"}, data={"data_path": "/path/to/p"}))
    assert cfg.checkpoints.generator_ckpt == "/path/to/gen.pt"


@pytest.mark.parametrize("fmt", ["longlive_generator_merged_lora", "longlive_generator_merged_bf16"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_lora_with_merged_checkpoint_is_an_error(tmp_path, fmt, suffix):
    gen = tmp_path / f"merged{suffix}"
    if suffix == ".pt":
        torch.save({"generator": {"model.x": torch.zeros(2)}, "checkpoint_format": fmt}, gen)
    else:
        save_file({"model.x": torch.zeros(2)}, str(gen), metadata={"checkpoint_format": fmt})
    lora = tmp_path / "lora.pt"
    torch.save({"generator_lora": {}}, lora)
    path = _cfg(tmp_path, checkpoints={"generator_ckpt": str(gen), "lora_ckpt": str(lora)},
                adapter={"type": "lora", "rank": 4, "alpha": 4})
    msg = _error(path)
    assert "'checkpoints.generator_ckpt'" in msg and fmt in msg and "applied twice" in msg
    # Removing the LoRA (as the message says) makes it valid.
    assert load_config(path, ["checkpoints.lora_ckpt=null", "adapter=null"]).checkpoints.lora_ckpt is None


def test_nvfp4_checkpoint_needs_model_quant_without_te(tmp_path):
    gen = tmp_path / "model_4o6.pt"
    torch.save({"generator": {}, "checkpoint_format": "longlive_generator_nvfp4"}, gen)
    msg = _error(_cfg(tmp_path, checkpoints={"generator_ckpt": str(gen)}))
    assert "model_quant is false" in msg
    msg = _error(_cfg(tmp_path, checkpoints={"generator_ckpt": str(gen)}, model_quant=True,
                      model_quant_use_transformer_engine=True))
    assert "model_quant_use_transformer_engine" in msg
    ok = load_config(_cfg(tmp_path, checkpoints={"generator_ckpt": str(gen)}, model_quant=True))
    assert ok.model_quant
    legacy = tmp_path / "te.pt"
    torch.save({"generator": {}, "checkpoint_format": "longlive_generator_te_nvfp4"}, legacy)
    assert "unsupported TransformerEngine" in _error(_cfg(tmp_path, checkpoints={"generator_ckpt": str(legacy)}))


def test_several_validation_problems_reported_together(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(tmp_path, sp_size=3, inference={"sink_size": 4, "num_output_frames": 100}))
    assert len(exc.value.issues) >= 3
