"""Loading configs: shipped files, reference-style placements, legacy names, overrides, type errors."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from longlive.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
)
from longlive.config.schema import FLATTENED_SECTIONS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
EXPECTED = {
    "configs/inference.yaml", "configs/inference_i2v.yaml", "configs/inference_sp.yaml",
    "configs/fp8/inference_fp8.yaml", "configs/nvfp4/inference_nvfp4.yaml", "configs/train_ar.yaml",
    "configs/train_dmd.yaml", "configs/nvfp4/train_ar_nvfp4.yaml", "configs/nvfp4/train_dmd_nvfp4_step4.yaml",
    "configs/tiny.yaml",
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def _write(tmp_path: Path, data, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _flatten_reference_style(raw: dict) -> dict:
    """What the reference's normalize_config produces: flattened sections, legacy evaluation names."""
    out: dict = {}
    for key, value in raw.items():
        if key in FLATTENED_SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                assert k not in out, k
                out[k] = v
        elif key == "evaluation":
            out["generate_interval"] = value["interval"]
            out["vis_interval"] = value["interval"]
            nf = value["num_frames"]
            out["inference_num_frames"] = nf[0] if isinstance(nf, list) else nf
            out["vis_video_lengths"] = nf if isinstance(nf, list) else [nf]
            out["vis_ema"] = value["use_ema"]
            rest = {k: v for k, v in value.items() if k not in ("interval", "num_frames", "use_ema")}
            if rest:
                out["evaluation"] = rest
        else:
            out[key] = value
    # training.save_interval goes by its legacy name
    if "save_interval" in out:
        out["log_iters"] = out.pop("save_interval")
    return out


def test_all_expected_configs_are_shipped():
    assert EXPECTED <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.source == name
    assert cfg.latent_frames % cfg.frames_per_chunk == 0
    dumped = tmp_path / "dump.yaml"
    dump_config(cfg, dumped)
    again = load_config(dumped)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_style_flattened_yaml_loads_to_same_config(name, tmp_path):
    raw = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    flat = _flatten_reference_style(copy.deepcopy(raw))
    path = _write(tmp_path, flat)
    assert load_config(path) == load_config(name)


def test_shipped_values_match_reference_appendix():
    cfg = load_config("configs/inference.yaml")
    assert cfg.model_kwargs.model_name == "Wan2.2-TI2V-5B" and cfg.model_preset == "wan2.2-ti2v-5b"
    assert cfg.data.image_or_video_shape == [1, 128, 48, 44, 80]
    assert (cfg.inference.sampling_steps, cfg.sink_size, cfg.local_attn_size) == (4, 8, 32)
    assert cfg.inference.multi_shot_sink and cfg.inference.multi_shot_rope_offset == 8
    assert cfg.inference.vae_device is None  # not the reference's "cuda:2"
    assert cfg.adapter is not None and cfg.adapter.rank == 128 and cfg.adapter.alpha == 128
    sp = load_config("configs/inference_sp.yaml")
    assert (sp.sp_size, sp.dp_size, sp.auto_sp_remainder, sp.num_heads) == (4, 1, False, 24)
    nv = load_config("configs/nvfp4/inference_nvfp4.yaml")
    assert nv.latent_frames == 384 and nv.inference.kv_quant and nv.model_quant and not nv.merge_lora
    assert nv.model_quant_use_transformer_engine and nv.torch_compile == "auto" and nv.torch_compile_min_samples == 2
    fp8 = load_config("configs/fp8/inference_fp8.yaml")
    assert fp8.fp8_quant and fp8.latent_frames == 8 and fp8.torch_compile_min_samples == 3
    ar = load_config("configs/train_ar.yaml")
    assert ar.infra.sequence_parallel_size == 4 and ar.infra.vae_halo_latents == 28
    assert ar.training.error_recycling.enabled and ar.training.error_recycling.num_buckets == 50
    assert ar.training.save_interval > 1 and ar.evaluation.interval > 1
    assert ar.teacher_forcing and ar.local_attn_size == -1
    dmd = load_config("configs/nvfp4/train_dmd_nvfp4_step4.yaml")
    assert dmd.infra.generator_quant and not dmd.infra.fake_score_quant
    assert dmd.infra.real_score_quant_filtered_modules == dmd.infra.generator_quant_filtered_modules
    assert dmd.data.chunks_per_shot == 2 and dmd.training.batch_size == 2 and dmd.adapter.dtype == "bfloat16"
    assert not dmd.teacher_forcing
    tiny = load_config("configs/tiny.yaml")
    assert tiny.model_preset == "tiny" and tiny.checkpoints.random_weights and tiny.checkpoints.generator_ckpt is None


def test_reference_trap_values_are_accepted_as_legacy(tmp_path):
    path = _write(tmp_path, {
        "training": {"log_iters": 1},
        "evaluation": {"interval": 1, "num_frames": 16},
        "inference": {"vae_device": "cuda:2"},
    })
    cfg = load_config(path)
    assert cfg.training.save_interval == 1 and cfg.evaluation.interval == 1
    assert cfg.evaluation.num_frames == [16]
    assert cfg.inference.vae_device == "cuda:2"


def test_defaults_avoid_reference_traps():
    cfg = config_from_dict({})
    assert cfg.inference.vae_device is None
    assert cfg.training.save_interval > 1 and cfg.evaluation.interval > 1
    assert cfg.training.save_interval != cfg.evaluation.interval or cfg.training.save_interval > 1
    assert cfg.checkpoints.random_weights is False


def test_key_accepted_in_any_flattened_section_or_top_level():
    a = config_from_dict({"data": {"chunks_per_shot": 2}, "inference": {"sink_size": 8}})
    b = config_from_dict({"training": {"chunks_per_shot": 2}, "sink_size": 8})
    c = config_from_dict({"chunks_per_shot": 2, "checkpoints": {"sink_size": 8}})
    assert a == b == c
    assert a.data.chunks_per_shot == 2 and a.inference.sink_size == 8
    d = config_from_dict({"infra": {"model_quant": True}, "inference": {"kv_quant": True}})
    assert d.model_quant and d.inference.kv_quant
    e = config_from_dict({"model_name": "tiny", "num_frame_per_block": 8, "data": {"image_or_video_shape": [1, 8, 48, 4, 4]}})
    assert e.model_kwargs.model_name == "tiny" and e.model_preset == "tiny"
    f = config_from_dict({"model": {"name": "tiny", "kwargs": {"local_attn_size": 24}},
                          "data": {"image_or_video_shape": [1, 8, 48, 4, 4]}})
    assert f.model_kwargs.local_attn_size == 24 and f.model_preset == "tiny"


def test_equal_duplicates_are_fine_conflicting_duplicates_fail(tmp_path):
    ok = _write(tmp_path, {"sink_size": 8, "inference": {"sink_size": 8}}, "ok.yaml")
    assert load_config(ok).inference.sink_size == 8
    bad = _write(tmp_path, {"sink_size": 0, "inference": {"sink_size": 8}}, "bad.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "inference.sink_size" in msg and "twice" in msg
    legacy = _write(tmp_path, {"log_iters": 5, "training": {"save_interval": 10}}, "legacy.yaml")
    with pytest.raises(ConfigError, match=r"training\.save_interval.*twice"):
        load_config(legacy)
    frames = _write(tmp_path, {"inference_num_frames": 16, "vis_video_lengths": [16, 32]}, "frames.yaml")
    assert load_config(frames).evaluation.num_frames == [16, 32]
    frames_bad = _write(tmp_path, {"inference_num_frames": 8, "evaluation": {"num_frames": 16}}, "frames_bad.yaml")
    with pytest.raises(ConfigError, match="evaluation.num_frames"):
        load_config(frames_bad)


@pytest.mark.parametrize("data, field, suggestion", [
    ({"inference": {"samplng_steps": 2}}, "inference.samplng_steps", "inference.sampling_steps"),
    ({"sampling_step": 2}, "sampling_step", "inference.sampling_steps"),
    ({"evaluation": {"intervall": 3}}, "evaluation.intervall", "evaluation.interval"),
    ({"adapter": {"rnak": 4}}, "adapter.rnak", "adapter.rank"),
    ({"model_kwargs": {"num_frames_per_block": 8}}, "model_kwargs.num_frames_per_block", "model_kwargs.num_frame_per_block"),
    ({"training": {"error_recycling": {"enabeld": True}}}, "training.error_recycling.enabeld",
     "training.error_recycling.enabled"),
])
def test_unknown_keys_name_file_field_and_closest_name(tmp_path, data, field, suggestion):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg and f"Did you mean '{suggestion}'" in msg


@pytest.mark.parametrize("data, field, expected", [
    ({"inference": {"sampling_steps": "four"}}, "inference.sampling_steps", "expected an integer"),
    ({"inference": {"sampling_steps": True}}, "inference.sampling_steps", "expected an integer"),
    ({"inference": {"multi_shot_sink": "yes"}}, "inference.multi_shot_sink", "expected true or false"),
    ({"data": {"image_or_video_shape": [1, "x", 48, 44, 80]}}, "data.image_or_video_shape", "item 1"),
    ({"data": {"image_or_video_shape": 128}}, "data.image_or_video_shape", "expected a list of integers"),
    ({"inference": {"vae_type": "vqgan"}}, "inference.vae_type", "choose one of"),
    ({"model_kwargs": {"model_name": "Wan2.1-T2V-14B"}}, "model_kwargs.model_name", "choose one of"),
    ({"training": {"lr": "fast"}}, "training.lr", "expected a number"),
    ({"training": {"error_recycling": {"clean_prob": 1.5}}}, "training.error_recycling.clean_prob", "maximum"),
    ({"inference": {"sampling_steps": 0}}, "inference.sampling_steps", "minimum"),
    ({"torch_compile": "sometimes"}, "torch_compile", "choose one of: true, false, 'auto'"),
    ({"torch_compile": 3}, "torch_compile", "expected true or false or a string"),
    ({"inference": "fast"}, "inference", "must be a mapping"),
    ({"adapter": [1, 2]}, "adapter", "must be a mapping"),
])
def test_wrong_types_name_file_and_field(tmp_path, data, field, expected):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg and expected in msg


def test_sci_notation_string_is_a_number(tmp_path):
    path = _write(tmp_path, "training:\n  lr: 1e-5\n")  # PyYAML reads this as a string
    assert load_config(path).training.lr == pytest.approx(1e-5)


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path, {"inference": {"sampling_steps": "x", "sink_size": "y"}, "bogus": 1})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert len(exc.value.issues) == 3
    assert all(str(path) in issue for issue in exc.value.issues)


def test_overrides_apply_and_are_type_checked(tmp_path):
    cfg = load_config("configs/inference.yaml", ["inference.sampling_steps=2", "sink_size=16",
                                                 "data.image_or_video_shape=[1, 64, 48, 44, 80]",
                                                 "checkpoints.lora_ckpt=null", "adapter=null",
                                                 "inference.vae_device=cuda:1", "training.log_iters=7",
                                                 "inference.local_attn_size=48"])
    assert cfg.inference.sampling_steps == 2 and cfg.sink_size == 16 and cfg.latent_frames == 64
    assert cfg.checkpoints.lora_ckpt is None and cfg.adapter is None and not cfg.use_lora
    assert cfg.inference.vae_device == "cuda:1" and cfg.training.save_interval == 7
    assert cfg.origins["inference.sampling_steps"] == "override 'inference.sampling_steps=2'"
    # Overrides win over the file even when the file used another placement.
    cfg2 = load_config("configs/tiny.yaml", ["adapter.rank=4", "training.error_recycling.enabled=true"])
    assert cfg2.adapter is not None and cfg2.adapter.rank == 4 and cfg2.training.error_recycling.enabled

    with pytest.raises(ConfigError) as exc:
        load_config("configs/inference.yaml", ["inference.sampling_steps=two"])
    msg = str(exc.value)
    assert "configs/inference.yaml" in msg and "'inference.sampling_steps'" in msg
    assert "override 'inference.sampling_steps=two'" in msg and "expected an integer" in msg

    with pytest.raises(ConfigError, match=r"unknown field 'inference\.sampling_stpes'.*inference\.sampling_steps"):
        load_config("configs/inference.yaml", ["inference.sampling_stpes=2"])
    with pytest.raises(ConfigError, match="expected 'field.path=value'"):
        load_config("configs/inference.yaml", ["inference.sampling_steps"])


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = _write(tmp_path, "inference:\n  sampling_steps: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert str(bad) in str(exc.value) and "line" in str(exc.value)
    empty = _write(tmp_path, "", "empty.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    listy = _write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_model_name_mapping():
    assert config_from_dict({"model_kwargs": {"model_name": "Wan2.2-TI2V-5B"}}).model_preset == "wan2.2-ti2v-5b"
    tiny = config_from_dict({"model_kwargs": {"model_name": "tiny"}, "data": {"image_or_video_shape": [1, 8, 48, 4, 4]}})
    assert tiny.model_preset == "tiny" and tiny.num_heads == 2


def test_resolved_properties():
    cfg = config_from_dict({"model_kwargs": {"sink_size": 8, "local_attn_size": 32},
                            "inference": {"num_output_frames": 64}})
    assert (cfg.sink_size, cfg.local_attn_size, cfg.latent_frames, cfg.num_chunks) == (8, 32, 64, 8)
    cfg = config_from_dict({"algorithm": {"trainer": "score_distillation", "all_causal": False}})
    assert cfg.teacher_forcing is False and cfg.causal is False
    assert cfg.role_model_kwargs("real_score") is cfg.model_kwargs
    with pytest.raises(ValueError, match="unknown model role"):
        cfg.role_model_kwargs("critic")


REFERENCE_STYLE_DMD = """
infra:
  generator_quant: true
  generator_quant_filtered_modules: &f
  - head.head
  - re:.*norm_k$
  real_score_quant_filtered_modules: *f
model_kwargs: {model_name: Wan2.2-TI2V-5B, timestep_shift: 5.0, num_frame_per_block: 8, local_attn_size: 32, sink_size: 8}
checkpoints: {generator_ckpt: null, real_score_ckpt: null, fake_score_ckpt: null}
algorithm:
  trainer: score_distillation
  warp_denoising_step: false
  denoising_step_list: [1000, 946, 854, 681, 0]
training:
  log_iters: 50
  chunks_per_shot: 2
  min_num_training_frames: 32
  num_training_frames: 32
data:
  data_path: /path/to/longlive2/train_dataset_16to32s
  image_or_video_shape: [1, 32, 48, 44, 80]
inference:
  sampling_steps: 4
  sink_size: 8
  multi_shot_sink: true
  narrative_rope_phase_shift: 8
  vae_device: "cuda:2"
evaluation: {interval: 99999999999, num_frames: 32, use_ema: false, val_batch_size: 1, save_latents_only: true}
adapter: {type: lora, rank: 128, alpha: 128, dropout: 0.0, dtype: bfloat16, apply_to_critic: true, verbose: true}
logging: {seed: 0, wandb_key: null, wandb_entity: null, wandb_project: LongLive2-DMD-NVFP4}
"""


def test_reference_style_file_with_legacy_and_unused_keys(tmp_path, caplog):
    path = _write(tmp_path, REFERENCE_STYLE_DMD, "ref_dmd.yaml")
    with caplog.at_level("WARNING"):
        cfg = load_config(path)
    assert cfg.training.save_interval == 50 and cfg.data.chunks_per_shot == 2
    assert cfg.algorithm.denoising_step_list == [1000, 946, 854, 681, 0]
    assert cfg.infra.real_score_quant_filtered_modules == ["head.head", "re:.*norm_k$"]
    assert cfg.evaluation.interval == 99999999999 and cfg.origins["training.save_interval"] == "training.log_iters"
    assert "narrative_rope_phase_shift" in caplog.text and "vae_device" in caplog.text


def test_empty_sections_mean_defaults_and_null_adapter_means_no_lora(tmp_path):
    path = _write(tmp_path, "evaluation:\nmodel_kwargs:\ninference:\nadapter: null\n", "empty_sections.yaml")
    cfg = load_config(path)
    assert cfg.evaluation == config_from_dict({}).evaluation and cfg.adapter is None
    assert load_config(_write(tmp_path, "adapter: {}\n", "a.yaml")).adapter.rank == 128
