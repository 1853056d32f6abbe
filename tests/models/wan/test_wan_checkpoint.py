"""Every DiT checkpoint layout of spec 1.4 round-trips; bad checkpoints fail loudly."""
import json

import pytest
import torch

from longlive.io.checkpoint import CheckpointError, read_checkpoint, write_torch
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.state_dict import (MERGED_FORMAT, load_config, load_state_dict, load_weights, save_folder,
                                            save_generator, to_diffusers)

TINY = WanConfig.preset("tiny")


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(5)
    return WanModel(TINY)


def _fresh():
    torch.manual_seed(99)
    return WanModel(TINY)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_folder_round_trip(source, tmp_path, layout):
    folder = save_folder(source, tmp_path / layout, TINY, layout=layout, max_shard_bytes=20_000)
    assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, read through the index
    assert load_config(folder) == TINY
    model = _fresh()
    load_weights(model, folder)
    assert _same(model, source)


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_generator_file_round_trip_with_metadata(source, tmp_path, name):
    path = save_generator(source, tmp_path / name, metadata={"checkpoint_format": MERGED_FORMAT, "merged_lora": True})
    sd, meta = load_state_dict(path)
    assert meta["checkpoint_format"] == MERGED_FORMAT
    model = _fresh()
    load_weights(model, path)
    assert _same(model, source)


def test_longlive_training_checkpoint_layouts(source, tmp_path):
    sd = source.state_dict()
    ema = {f"model._fsdp_wrapped_module.{k}": v * 2 for k, v in sd.items()}
    train = {"generator": {f"model.{k}": v for k, v in sd.items()}, "generator_ema": ema,
             "generator_optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
             "step": 600}
    write_torch(train, tmp_path / "model.pt")
    m = _fresh()
    load_weights(m, tmp_path / "model.pt")
    assert _same(m, source)
    load_weights(m, tmp_path / "model.pt", use_ema=True)
    assert torch.equal(m.state_dict()["head.head.weight"], sd["head.head.weight"] * 2)
    write_torch({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "m2.pt")
    load_weights(m, tmp_path / "m2.pt")
    assert _same(m, source)
    write_torch(to_diffusers(sd), tmp_path / "diffusers.pth")  # a bare diffusers-layout dict
    load_weights(m, tmp_path / "diffusers.pth")
    assert _same(m, source)


def test_partial_or_wrong_checkpoint_names_keys(source, tmp_path):
    sd = dict(source.state_dict())
    sd.pop("blocks.1.ffn.0.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["head.head.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_weights(_fresh(), sd)
    msg = str(err.value)
    assert "1 missing keys: blocks.1.ffn.0.weight" in msg
    assert "1 unexpected keys: blocks.0.extra.weight" in msg
    assert "head.head.bias: checkpoint (3,) vs model (192,)" in msg


def test_special_checkpoints_are_explained(tmp_path, source):
    write_torch({"generator_lora": {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 2)}, "step": 1}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="LoRA checkpoint"):
        load_weights(_fresh(), tmp_path / "lora.pt")
    write_torch({"generator": {"model.blocks.0.ffn.0.quantized_weight_values": torch.zeros(2, dtype=torch.uint8)}}, tmp_path / "q.pt")
    with pytest.raises(CheckpointError, match="compact NVFP4 checkpoint"):
        load_weights(_fresh(), tmp_path / "q.pt")
    write_torch({"generator": {}, "checkpoint_format": "longlive_generator_te_nvfp4"}, tmp_path / "te.pt")
    with pytest.raises(CheckpointError, match="legacy TE NVFP4"):
        load_weights(_fresh(), tmp_path / "te.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(_fresh(), tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="use_ema is set"):
        load_weights(_fresh(), {"generator": source.state_dict()}, use_ema=True)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"generator": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pt")


def test_meta_model_loads_by_assignment(source, tmp_path):
    path = save_generator(source, tmp_path / "g.safetensors")
    with torch.device("meta"):
        model = WanModel(TINY)
    load_weights(model, path)
    assert not any(p.is_meta for p in model.parameters())
    assert _same(model, source)


def test_config_json_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"dim": 64,\n "num_heads": }')
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 2"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_dict(), "num_head": 2}))
    with pytest.raises(ValueError, match="unknown Wan config keys \\['num_head'\\]"):
        load_config(tmp_path)
