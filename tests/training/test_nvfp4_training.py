"""NVFP4 training on the tiny preset (CPU, emulated backend): stage 1 with `model_quant` and DMD with
quantized generator/teacher bases (`infra.<role>_quant`)."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from longlive.config import ConfigError, load_config
from longlive.quant.linear import NVFP4Linear
from longlive.training.ar_trainer import ARTrainer
from longlive.training.dmd_trainer import DMDTrainer

REPO = Path(__file__).resolve().parents[2]
QUIET = ["logging.tensorboard=false"]
AR_NVFP4 = ["model_quant=true", "model_quant_scale_rule=static_6", "model_quant_activation_scale_rule=mse",
            "model_quant_gradient_scale_rule=mse"]  # the rules of configs/nvfp4/train_ar_nvfp4.yaml


def _ar(tmp_path, *overrides):
    trainer = ARTrainer(load_config(REPO / "configs" / "train_ar_tiny.yaml", [*QUIET, *overrides]), tmp_path,
                        save=False, evaluate=False)
    try:
        return trainer, trainer.run()
    finally:
        trainer.ctx.close()


def test_nvfp4_stage1_training_learns_and_tracks_bf16(tmp_path):
    steps = ["training.max_iters=60"]
    trainer, q = _ar(tmp_path / "q", *steps, *AR_NVFP4)
    layers = [m for m in trainer.model.modules() if isinstance(m, NVFP4Linear)]
    assert len(layers) == 20 and all(m.weight is not None and not m.materialized for m in layers)  # masters kept
    _, ref = _ar(tmp_path / "r", *steps)
    vq = [q.losses[i] for i in range(1, 61)]
    vr = [ref.losses[i] for i in range(1, 61)]
    assert statistics.mean(vq[-15:]) < 0.85 * statistics.mean(vq[:15])  # it learns
    assert vq[0] == pytest.approx(vr[0], rel=0.1) and vq[0] != vr[0]  # same model, quantized matmuls
    assert statistics.mean(vq[-15:]) == pytest.approx(statistics.mean(vr[-15:]), rel=0.15)


def _dmd(tmp_path, *overrides, save=False, max_steps=None):
    trainer = DMDTrainer(load_config(REPO / "configs" / "train_dmd_tiny.yaml", [*QUIET, *overrides]), tmp_path,
                         save=save, max_steps=max_steps)
    try:
        return trainer, trainer.run()
    finally:
        trainer.ctx.close()


DMD_NVFP4 = ["infra.generator_quant=true", "infra.real_score_quant=true", "infra.fake_score_quant=false",
             "infra.generator_quant_scale_rule=mse", "infra.real_score_quant_scale_rule=mse"]


def test_nvfp4_dmd_shares_one_fp4_base_between_generator_and_teacher(tmp_path):
    common = ["training.max_iters=4", "training.save_interval=2"]
    trainer, summary = _dmd(tmp_path / "a", *common, *DMD_NVFP4, save=True)
    gen, teacher, critic = trainer.nets.roles
    assert gen.model is teacher.model and critic.model is not gen.model and len(trainer.nets.models) == 2
    fp4 = [m for m in gen.model.modules() if isinstance(m, NVFP4Linear)]
    assert len(fp4) == 20 and all(m.materialized and m.weight is None for m in fp4)  # frozen base: FP4 buffers only
    assert not any(isinstance(m, NVFP4Linear) for m in critic.model.modules())  # fake_score_quant: false
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.generator_losses.values())
    _, plain = _dmd(tmp_path / "b", *common)
    assert summary.critic_losses[1] != plain.critic_losses[1]
    assert summary.critic_losses[1] == pytest.approx(plain.critic_losses[1], rel=0.2)
    # resume from the step-2 checkpoint of a fresh run continues the same losses
    _dmd(tmp_path / "c", *common, *DMD_NVFP4, save=True, max_steps=2)
    _, resumed = _dmd(tmp_path / "c", *common, *DMD_NVFP4, save=True)
    assert resumed.start_step == 2
    for k, v in resumed.critic_losses.items():
        assert v == pytest.approx(summary.critic_losses[k], rel=1e-5)


def test_training_refuses_inference_only_quantization(tmp_path):
    with pytest.raises(ConfigError, match="fp8_quant"):
        ARTrainer(load_config(REPO / "configs" / "train_ar_tiny.yaml", [*QUIET, "fp8_quant=true"]), tmp_path)
