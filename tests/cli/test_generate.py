"""`longlive generate` / `longlive export merge-lora` end to end on CPU with the tiny config."""
import json
from pathlib import Path

import pytest
import torch

from longlive.cli.main import main
from longlive.config import ConfigError
from longlive.io.video import probe_video
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.lora import apply_lora, lora_state_dict
from longlive.models.wan.state_dict import save_generator
from longlive.io.checkpoint import write_torch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.image_or_video_shape=[1,16,48,2,2]", "model_kwargs.local_attn_size=16", "inference.sink_size=0"]


def _prompts_file(tmp_path, lines):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_tiny_config_writes_multishot_video(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--config", TINY, "--output-folder", str(out), "--no-progress", "inference.streaming_vae=true"]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["0000-tiny_multishot-seed0.mp4"]
    info = probe_video(videos[0])
    assert info.num_frames == 1 + 4 * (32 - 1) and info.fps == 24
    sidecar = (out / "0000-tiny_multishot-seed0.prompts.txt").read_text().splitlines()
    assert sidecar[0].startswith("[0] ") and "The scene transitions." in sidecar[1]


def test_prompts_are_split_over_ranks_without_loss(tmp_path, monkeypatch):
    prompts = _prompts_file(tmp_path, ["a red ball", "a blue cube", "a green cone"])
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["generate", "--config", TINY, "--output-folder", str(tmp_path / "o"), "--no-progress",
                     f"data.data_path={prompts}", "inference.save_latents_only=true", *SMALL]) == 0
    names = sorted(p.name for p in (tmp_path / "o").glob("*.pt"))
    assert len(names) == 3 and [n[:5] for n in names] == ["0000-", "0001-", "0002-"]
    assert [n.rsplit("-seed", 1)[1] for n in names] == ["0.pt", "1.pt", "2.pt"]
    lat = torch.load(sorted((tmp_path / "o").glob("*.pt"))[0], weights_only=True)["latents"]
    assert lat.shape == (1, 16, 48, 2, 2)  # reference layout [B, F, C, H, W]


def _lora_setup(tmp_path):
    torch.manual_seed(0)
    base = WanModel(WanConfig.preset("tiny"))
    base_path = save_generator(base, tmp_path / "base.pt")
    lora = apply_lora(WanModel(WanConfig.preset("tiny")), rank=4, alpha=8)
    sd = {k: torch.randn_like(v) * 0.05 for k, v in lora_state_dict(lora).items()}
    write_torch({"generator_lora": sd, "critic_lora": {}, "step": 10}, tmp_path / "lora.pt")
    cfg = tmp_path / "lora.yaml"
    cfg.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("random_weights: true", "random_weights: false")
                   + "\nadapter:\n  type: lora\n  rank: 4\n  alpha: 8\n  dropout: 0.0\n")
    return base_path, tmp_path / "lora.pt", cfg


def test_merged_lora_equals_runtime_lora(tmp_path):
    base, lora, cfg = _lora_setup(tmp_path)
    prompts = _prompts_file(tmp_path, ["a red ball rolls"])
    common = ["--no-progress", "inference.save_latents_only=true", f"data.data_path={prompts}", *SMALL]
    assert main(["generate", "--config", str(cfg), "--output-folder", str(tmp_path / "rt"), *common,
                 f"checkpoints.generator_ckpt={base}", f"checkpoints.lora_ckpt={lora}"]) == 0
    assert main(["export", "merge-lora", "--config", str(cfg), "--output-path", str(tmp_path / "merged.pt"),
                 "--generator-ckpt", str(base), "--lora-ckpt", str(lora), "--dtype", "fp32"]) == 0
    meta = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert meta["checkpoint_format"] == "longlive_generator_merged_lora" and meta["merged_lora"] is True
    assert main(["generate", "--config", str(cfg), "--output-folder", str(tmp_path / "mg"), *common,
                 f"checkpoints.generator_ckpt={tmp_path / 'merged.pt'}", "adapter=null"]) == 0
    assert main(["generate", "--config", str(cfg), "--output-folder", str(tmp_path / "base"), *common,
                 f"checkpoints.generator_ckpt={base}", "adapter=null"]) == 0
    load = lambda d: torch.load(next((tmp_path / d).glob("*.pt")), weights_only=True)["latents"]
    runtime, merged, plain = load("rt"), load("mg"), load("base")
    assert (runtime - merged).abs().max() < 1e-4
    assert (runtime - plain).abs().max() > 1e-3  # the LoRA changes the output
    with pytest.raises(ConfigError, match="applied twice"):
        main(["generate", "--config", str(cfg), "--output-folder", str(tmp_path / "x"), *common,
              f"checkpoints.generator_ckpt={tmp_path / 'merged.pt'}", f"checkpoints.lora_ckpt={lora}"])


def test_shipped_demo_model_generates_the_readme_video(tmp_path):
    """The README's main command: the committed synth checkpoint loads strictly and makes the 3-shot demo."""
    out = tmp_path / "demo"
    assert main(["generate", "--config", str(ROOT / "configs" / "demo.yaml"), "--output-folder", str(out), "--no-progress"]) == 0
    video = out / "0000-synth_demo-seed0.mp4"
    info = probe_video(video)
    assert info.num_frames == 1 + 4 * (48 - 1) and info.fps == 24 and (info.width, info.height) == (64, 64)
    sidecar = (out / "0000-synth_demo-seed0.prompts.txt").read_text().splitlines()
    assert sum("The scene transitions." in line for line in sidecar) == 2  # three shots
