"""`longlive eval quality`: spec checking, every variant generated and judged, the markdown table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from longlive.cli.main import main
from longlive.config import ConfigError
from longlive.eval.quality import QualitySpecError, load_spec, quality_markdown, run_quality
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.state_dict import save_generator

REPO = Path(__file__).resolve().parents[2]


def write_spec(tmp_path: Path, ckpt: Path, **extra) -> Path:
    spec = {"config": str(REPO / "configs" / "demo.yaml"),
            "dataset": {"seed": 3, "long_eval_prompts": 1, "long_eval_chunks": 4, "max_shot_chunks": 2,
                        "height": 32, "width": 32},
            "buckets": [0, 2],
            "variants": [{"name": "2 steps", "overrides": [f"checkpoints.generator_ckpt={ckpt}",
                                                           "inference.sampling_steps=2"]},
                         {"name": "2 steps, no sink", "overrides": [f"checkpoints.generator_ckpt={ckpt}",
                                                                    "inference.sampling_steps=2", "inference.sink_size=0"]}],
            **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def random_synth_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "synth.safetensors"
    save_generator(WanModel(WanConfig.preset("synth")), path, metadata={"checkpoint_format": "longlive_generator"})
    return path


def test_every_variant_is_generated_judged_and_tabled(tmp_path, random_synth_ckpt):
    spec = load_spec(write_spec(tmp_path, random_synth_ckpt))
    results = run_quality(spec, tmp_path / "work", device="cpu")
    assert [r["name"] for r in results] == ["2 steps", "2 steps, no sink"]
    for r in results:
        assert r["videos"] == 1 and r["chunks"] == 4 and len(r["drift"]) == 2
        assert 0.0 <= r["accuracy"]["all_correct"] <= 1.0
    assert len(list((tmp_path / "work" / "2_steps_no_sink").glob("*.mp4"))) == 1
    table = quality_markdown(results, command="longlive eval quality --spec s.yaml")
    assert "| 2 steps, no sink | 4 |" in table and "chunks 0-1" in table and "chunks 2-" in table


def test_cli_writes_the_markdown(tmp_path, random_synth_ckpt):
    out = tmp_path / "quality.md"
    assert main(["eval", "quality", "--spec", str(write_spec(tmp_path, random_synth_ckpt)), "--work",
                 str(tmp_path / "w"), "--markdown", str(out), "--device", "cpu"]) == 0
    assert out.read_text().count("| 2 steps") == 4  # two rows in each of the two tables


def test_bad_specs_and_missing_checkpoints_fail_before_generating(tmp_path, random_synth_ckpt):
    with pytest.raises(QualitySpecError, match="unknown keys.*'varients'"):
        load_spec(write_spec(tmp_path, random_synth_ckpt, varients=[]))
    missing = load_spec(write_spec(tmp_path, tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="checkpoints.generator_ckpt"):
        run_quality(missing, tmp_path / "work", device="cpu")
    assert not list((tmp_path / "work").glob("2_steps*"))


def test_evaluation_data_is_rewritten_when_the_spec_changes(tmp_path, random_synth_ckpt, caplog):
    spec = load_spec(write_spec(tmp_path, random_synth_ckpt))
    spec["variants"] = spec["variants"][:1]
    run_quality(spec, tmp_path / "work", device="cpu")
    first = (tmp_path / "work" / "data" / "prompts_long" / "long_000" / "0.json").read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="longlive.eval.quality"):
        run_quality(spec, tmp_path / "work", device="cpu")  # same arguments: the data is reused
    assert "writing the evaluation data" not in caplog.text
    spec["dataset"]["seed"] = 4
    with caplog.at_level("INFO", logger="longlive.eval.quality"):
        run_quality(spec, tmp_path / "work", device="cpu")
    assert "writing the evaluation data" in caplog.text
    assert (tmp_path / "work" / "data" / "prompts_long" / "long_000" / "0.json").read_text() != first
