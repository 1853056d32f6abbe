"""Stage-1 AR trainer end to end on the tiny preset (CPU, gloo).

- a tiny run on synthetic data lowers its loss;
- FSDP2 + sequence parallel (2 ranks, balanced and plain) gives the single-process losses and weights;
- raw videos with chunk-halo VAE encoding under SP give the single-process losses;
- a run killed with SIGKILL and resumed continues the uninterrupted loss curve;
- evaluation writes latents; unreadable data stops the run with a named error.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longlive.config import ConfigError, load_config
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.state_dict import load_state_dict, load_weights
from longlive.training.ar_trainer import ARTrainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "train_ar_tiny.yaml"
QUIET = ["logging.tensorboard=false"]


def train_cli(logdir: Path, *overrides: str, nproc: int = 1, summary: Path | None = None, wait: bool = True,
              extra: tuple[str, ...] = ()):
    """`longlive train` on the tiny config, as one process or under torchrun (gloo on CPU)."""
    args = ["train", "--config", str(CONFIG), "--logdir", str(logdir), *extra, *overrides]
    if summary is not None:
        args += ["--summary-json", str(summary)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "longlive.cli.main", "--log-level", "WARNING", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "longlive.cli.main", "--log-level", "WARNING", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(summary.read_text()) if summary is not None else None


def losses(summary: dict) -> dict[int, float]:
    return {int(k): v for k, v in summary["losses"].items()}


def test_training_noise_is_drawn_on_the_device_from_the_cpu_stream():
    from longlive.training.teacher_forcing import device_normal

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = device_normal((2, 3, 4), g1, device)
        assert a.device.type == device and a.dtype == torch.float32
        assert torch.equal(a, device_normal((2, 3, 4), g2, device))  # same CPU state: same noise (SP ranks, resume)
        assert torch.equal(g1.get_state(), g2.get_state())  # one draw of the CPU stream each
        assert not torch.equal(device_normal((2, 3, 4), g1, device), a)  # the stream moved on
        x = device_normal((200_000,), torch.Generator().manual_seed(0), device, torch.bfloat16)
        assert x.dtype == torch.bfloat16 and abs(float(x.float().mean())) < 0.01 and abs(float(x.float().std()) - 1) < 0.01


# --------------------------------------------------------------------------------------------- learning
def test_tiny_run_on_synthetic_data_lowers_the_loss(tmp_path):
    cfg = load_config(CONFIG, ["training.max_iters=100", *QUIET])
    trainer = ARTrainer(cfg, tmp_path, save=False, evaluate=False)
    try:
        summary = trainer.run()
    finally:
        trainer.ctx.close()
    v = [summary.losses[i] for i in range(1, 101)]
    first, last = statistics.mean(v[:20]), statistics.mean(v[-20:])
    assert last < 0.85 * first, (first, last)


# --------------------------------------------------------------------------------------------- parallel
@pytest.mark.slow
@pytest.mark.parametrize("layout,sharding", [("balanced", "full"), ("plain", "full"), ("balanced", "hybrid_full")])
def test_fsdp_sequence_parallel_training_equals_single_process(tmp_path, layout, sharding):
    common = ["training.max_iters=3", "training.save_interval=3", "training.error_recycling.enabled=false", *QUIET]
    one = train_cli(tmp_path / "one", *common, summary=tmp_path / "one.json", extra=("--no-eval",))
    two = train_cli(tmp_path / "sp", *common, "infra.sequence_parallel_size=2", f"infra.sp_layout={layout}",
                    f"infra.sharding_strategy={sharding}", nproc=2, summary=tmp_path / "sp.json", extra=("--no-eval",))
    ref, got = losses(one), losses(two)
    assert ref.keys() == got.keys() == {1, 2, 3}
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5), (k, got[k], ref[k])
    # after three optimizer steps the (FSDP-gathered) weights agree too
    a, _ = load_state_dict(tmp_path / "one" / "checkpoint_000003" / "generator.safetensors")
    b, _ = load_state_dict(tmp_path / "sp" / "checkpoint_000003" / "generator.safetensors")
    for name in a:
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=0, atol=1e-2 * a[name].float().abs().max().item() + 1e-6)


@pytest.mark.slow
def test_raw_video_training_with_sharded_halo_encoding_equals_single_process(tmp_path):
    from longlive.data.synthetic import write_synthetic_video_dataset

    data = tmp_path / "videos"
    write_synthetic_video_dataset(data, num_samples=4, videos_per_sample=2, frames_per_video=70, size=(64, 64))
    common = ["training.max_iters=2", "training.error_recycling.enabled=false", "data.dataset_type=videos",
              f"data.data_path={data}", "data.load_raw_video=true", "infra.vae_halo_latents=28", *QUIET]
    one = train_cli(tmp_path / "one", *common, summary=tmp_path / "one.json", extra=("--no-eval", "--no-save"))
    two = train_cli(tmp_path / "sp", *common, "infra.sequence_parallel_size=2", nproc=2,
                    summary=tmp_path / "sp.json", extra=("--no-eval", "--no-save"))
    # a halo of 28 latents is exact for the tiny VAE, so each rank's latents equal the full-clip encode
    for k, v in losses(one).items():
        assert losses(two)[k] == pytest.approx(v, rel=1e-5)


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_killed_run_resumes_on_the_uninterrupted_loss_curve(tmp_path):
    common = ["training.max_iters=150", "training.save_interval=10", "training.max_checkpoints=2",
              "training.export_generator=false", *QUIET]
    ref = losses(train_cli(tmp_path / "ref", *common, summary=tmp_path / "ref.json", extra=("--no-eval",)))

    run = tmp_path / "killed"
    proc = train_cli(run, *common, wait=False, extra=("--no-eval",))
    deadline = time.time() + 300
    while not any(run.glob("checkpoint_0000[0-9]0")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in run.glob("checkpoint_*") if not p.name.endswith(".partial"))
    assert done, "the run was killed before its first checkpoint"
    resumed = losses(train_cli(run, *common, summary=tmp_path / "resumed.json", extra=("--no-eval",)))
    start = min(resumed) - 1
    assert 0 < start < 150, f"resumed at step {start}: the kill came too late to test anything"
    assert set(resumed) == set(range(start + 1, 151))
    for k, v in resumed.items():
        assert v == pytest.approx(ref[k], rel=1e-6, abs=1e-7), (k, v, ref[k])


# --------------------------------------------------------------------------------------------- outputs and errors
def test_evaluation_and_export_are_loadable(tmp_path):
    cfg = load_config(CONFIG, ["training.max_iters=2", "training.save_interval=2", "training.ema_start_step=1",
                               "evaluation.interval=2", *QUIET])
    trainer = ARTrainer(cfg, tmp_path, save=True, evaluate=True)
    try:
        trainer.run()
    finally:
        trainer.ctx.close()
    evals = sorted((tmp_path / "eval" / "step_000002").glob("*.pt"))
    assert len(evals) == 3  # one per line of the eval prompt file
    out = torch.load(evals[0], weights_only=True)
    assert out["latents"].shape == (1, 16, 48, 4, 4) and out["ema"] is True
    assert torch.isfinite(out["latents"]).all()
    trainer = ARTrainer(load_config(CONFIG, ["evaluation.save_latents_only=false", "evaluation.interval=1", *QUIET]),
                        tmp_path / "mp4", save=False, evaluate=True, max_steps=1)
    try:
        trainer.run()
    finally:
        trainer.ctx.close()
    from longlive.io.video import probe_video

    videos = sorted((tmp_path / "mp4" / "eval" / "step_000001").glob("*.mp4"))
    assert len(videos) == 3 and probe_video(videos[0]).num_frames == 1 + 4 * 15  # 16 latent frames
    ckpt = tmp_path / "checkpoint_000002"
    for name in ("generator.safetensors", "generator_ema.safetensors"):
        model = WanModel(WanConfig.preset("tiny"))
        load_weights(model, ckpt / name)  # strict: the inference side loads what training exports


def test_unreadable_training_videos_stop_the_run_with_a_named_error(tmp_path):
    from longlive.data.video_dataset import DatasetError

    for s in range(2):
        (tmp_path / "data" / "video" / f"s{s}").mkdir(parents=True)
        (tmp_path / "data" / "caption" / f"s{s}").mkdir(parents=True)
        (tmp_path / "data" / "video" / f"s{s}" / "0.mp4").write_bytes(b"not a video")
        (tmp_path / "data" / "caption" / f"s{s}" / "0.json").write_text('{"caption": "a cat"}')
    cfg = load_config(CONFIG, ["training.max_iters=1", "data.dataset_type=videos", f"data.data_path={tmp_path / 'data'}",
                               "inference.vae_type=tiny", *QUIET])
    trainer = ARTrainer(cfg, tmp_path / "run", save=False, evaluate=False)
    try:
        with pytest.raises(DatasetError, match="0.mp4"):
            trainer.run()
    finally:
        trainer.ctx.close()


def test_plain_layout_with_error_recycling_is_refused(tmp_path):
    cfg = load_config(CONFIG, ["infra.sp_layout=plain", *QUIET])
    with pytest.raises(ConfigError, match="error_recycling needs infra.sp_layout: balanced"):
        ARTrainer(cfg, tmp_path)


def test_resumed_run_keeps_the_random_seed_of_its_checkpoint(tmp_path):
    cfg = load_config(CONFIG, ["logging.seed=0", "training.max_iters=2", "training.save_interval=2",
                               "training.export_generator=false", *QUIET])
    first = ARTrainer(cfg, tmp_path, evaluate=False)
    try:
        first.run()
        seed = first.seed
    finally:
        first.ctx.close()
    again = ARTrainer(load_config(CONFIG, ["logging.seed=0", "training.max_iters=3", *QUIET]), tmp_path, evaluate=False)
    fresh = ARTrainer(load_config(CONFIG, ["logging.seed=0", *QUIET]), tmp_path / "other", evaluate=False)
    try:
        assert again.seed == seed and again.dataset.seed == seed
        assert fresh.seed != seed  # seed 0 draws a new random seed for a new run
    finally:
        again.ctx.close()


# --------------------------------------------------------------------------------------------- time limit, demo data
def test_max_minutes_stops_the_run_and_saves(tmp_path):
    cfg = load_config(CONFIG, ["training.max_iters=50", "training.max_minutes=0", *QUIET])
    trainer = ARTrainer(cfg, tmp_path / "zero", save=True, evaluate=False)
    try:
        assert trainer.run().losses == {}  # out of time before the first step
    finally:
        trainer.ctx.close()
    cfg = load_config(CONFIG, ["training.max_iters=50", "training.max_minutes=0.0005", "training.save_interval=1000",
                               *QUIET])  # 30 ms: a few steps, then a checkpoint at the step reached
    trainer = ARTrainer(cfg, tmp_path / "short", save=True, evaluate=False)
    try:
        steps = len(trainer.run().losses)
    finally:
        trainer.ctx.close()
    assert 1 <= steps < 50
    assert [p.name for p in (tmp_path / "short").glob("checkpoint_*")] == [f"checkpoint_{steps:06d}"]


def test_synth_preset_trains_on_the_procedural_world_with_the_patchify_vae(tmp_path):
    cfg = load_config(REPO / "configs" / "synth" / "train_ar.yaml", [
        "training.max_iters=2", "training.batch_size=1", "data.image_or_video_shape=[1,16,192,4,4]",
        "infra.mixed_precision=false", "training.error_recycling.buffer_warmup_iter=1", "data.num_workers=0",
        "training.max_minutes=null"])
    trainer = ARTrainer(cfg, tmp_path, save=False, evaluate=False)
    try:
        summary = trainer.run()
    finally:
        trainer.ctx.close()
    assert trainer.data_kind == "procedural" and trainer.raw_video
    assert len(summary.losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in summary.losses.values())
