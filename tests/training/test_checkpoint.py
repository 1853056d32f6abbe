"""Training checkpoints: exact round trips, FSDP2 sharded save/load on 2 gloo ranks, atomicity,
pruning, per-rank state and the full-model export read back by `load_weights`.

The 2-rank cases run this file as a script in one pair of processes (see `_worker` at the bottom)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longlive.io.checkpoint import CheckpointError
from longlive.training.checkpoint import (
    CheckpointManager,
    ModelOptimizerState,
    export_full_state,
    read_manifest,
)


# ------------------------------------------------------------------------------------------ helpers
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def _train(model, opt, sched, ema, gen, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randn(8, 3, generator=gen)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].mul_(0.9).add_(p.detach().float(), alpha=0.1)
        losses.append(loss.item())
    return losses


def _setup(seed: int):
    model = _mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ema = {k: v.detach().clone().float() for k, v in model.named_parameters()}
    return model, opt, sched, ema


def _flat(obj, prefix=""):
    """Nested dict/list of tensors and numbers -> {path: value}."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj.detach().clone() if isinstance(obj, torch.Tensor) else obj
    return out


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------ single process
def test_round_trip_is_exact_and_training_continues_identically(tmp_path):
    model, opt, sched, ema = _setup(0)
    gen = torch.Generator().manual_seed(123)
    _train(model, opt, sched, ema, gen, 3)
    manager = CheckpointManager(tmp_path, max_checkpoints=3)
    state = {"train": ModelOptimizerState(model, opt), "sched": sched, "ema": ema}
    path = manager.save(3, state, per_rank={"rng": gen.get_state(), "data_position": 24})
    assert path == tmp_path / "checkpoint_000003" and manager.latest() == path
    manifest = read_manifest(path)
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and "rank_00000.pt" in manifest["files"]
    saved = {"model": _flat(model.state_dict()), "optim": _flat(opt.state_dict()), "ema": _flat(ema),
             "sched": _flat(sched.state_dict())}
    expected_losses = _train(model, opt, sched, ema, gen, 4)

    model2, opt2, sched2, ema2 = _setup(seed=99)  # different weights, empty optimizer state
    for v in ema2.values():
        v.zero_()
    state2 = {"train": ModelOptimizerState(model2, opt2), "sched": sched2, "ema": ema2}
    per_rank = CheckpointManager(tmp_path, max_checkpoints=3).load(path, state2, per_rank_keys=("rng", "data_position"))
    _assert_same(saved["model"], _flat(model2.state_dict()))
    _assert_same(saved["optim"], _flat(opt2.state_dict()))
    _assert_same(saved["ema"], _flat(ema2))
    _assert_same(saved["sched"], _flat(sched2.state_dict()))
    assert per_rank["data_position"] == 24
    gen2 = torch.Generator()
    gen2.set_state(per_rank["rng"])
    assert _train(model2, opt2, sched2, ema2, gen2, 4) == expected_losses


def test_failed_save_keeps_previous_checkpoint_and_partial_is_cleaned(tmp_path, caplog):
    model, opt, sched, ema = _setup(0)
    manager = CheckpointManager(tmp_path, max_checkpoints=5)
    state = {"train": ModelOptimizerState(model, opt), "ema": ema}
    first = manager.save(1, state, per_rank={"pos": 1})

    def broken_export(folder: Path):
        (folder / "half_written.bin").write_bytes(b"\0" * 10)
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        manager.save(2, state, per_rank={"pos": 2}, export=broken_export)
    partial = tmp_path / "checkpoint_000002.partial"
    assert partial.is_dir() and not (tmp_path / "checkpoint_000002").exists()
    assert manager.latest() == first
    with pytest.raises(CheckpointError, match="checkpoint_000002.partial.*manifest"):
        manager.load(partial, state)

    with caplog.at_level("WARNING", logger="longlive.training.checkpoint"):
        again = CheckpointManager(tmp_path, max_checkpoints=5)
    assert not partial.exists()
    assert "checkpoint_000002.partial" in caplog.text
    assert again.latest() == first


def test_pruning_keeps_newest(tmp_path):
    model, opt, _, _ = _setup(0)
    manager = CheckpointManager(tmp_path, max_checkpoints=2)
    state = {"train": ModelOptimizerState(model, opt)}
    for step in (10, 20, 30, 40, 50):
        manager.save(step, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000040", "checkpoint_000050"]
    assert manager.latest() == tmp_path / "checkpoint_000050"
    # saving a step again replaces it completely
    with torch.no_grad():
        model[0].weight.add_(1.0)
    manager.save(50, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000040", "checkpoint_000050"]
    target = _mlp(5)
    manager.load(manager.latest(), {"train": ModelOptimizerState(target)})
    assert torch.equal(target[0].weight, model[0].weight)


def test_load_refusals(tmp_path, caplog):
    model, opt, _, _ = _setup(0)
    manager = CheckpointManager(tmp_path, max_checkpoints=2)
    state = {"train": ModelOptimizerState(model, opt)}
    path = manager.save(7, state, per_rank={"rng": torch.Generator().get_state()})

    with pytest.raises(CheckpointError, match="no manifest.json"):
        manager.load(tmp_path, state)
    with pytest.raises(CheckpointError, match="required per-rank entries \\['buffers'\\]"):
        manager.load(path, state, per_rank_keys=("rng", "buffers"))

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = 4  # as if written by 4 ranks
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"checkpoint_000007: written by 4 ranks but this run has 1"):
        manager.load(path, state, per_rank_keys=("rng",))
    with caplog.at_level("WARNING", logger="longlive.training.checkpoint"):
        assert manager.load(path, state) == {}
    assert "not restored" in caplog.text

    (path / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="missing or have another size"):
        manager.load(path, state)

    with pytest.raises(TypeError, match=r"per_rank\['sampler'\] is a Generator"):
        manager.save(8, state, per_rank={"sampler": torch.Generator()})
    assert manager.latest() == path
    with pytest.raises(ValueError, match="max_checkpoints"):
        CheckpointManager(tmp_path, max_checkpoints=0)


def test_export_full_state_single_process_dtype(tmp_path):
    from longlive.models.wan import WanConfig, WanModel
    from longlive.models.wan.state_dict import load_state_dict, load_weights

    model = WanModel(WanConfig.preset("tiny"))
    out = export_full_state(model.state_dict(), tmp_path / "gen.safetensors", metadata={"step": 3}, dtype=torch.bfloat16)
    sd, meta = load_state_dict(out)
    assert meta["step"] == "3"
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k
    fresh = WanModel(WanConfig.preset("tiny"))
    load_weights(fresh, out)
    assert torch.equal(fresh.blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------ 2 processes
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every 2-rank scenario in one pair of processes (process start-up dominates the cost)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp), str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        pytest.fail("2-rank worker timed out:\n" + "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outputs)))
    report = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    return tmp


def test_fsdp2_sharded_save_load_two_ranks(two_ranks):
    tmp_path = two_ranks / "fsdp_checkpoint"
    logdir = tmp_path / "logdir"
    path = CheckpointManager(logdir, max_checkpoints=2).latest()
    assert path == logdir / "checkpoint_000002"
    manifest = read_manifest(path)
    assert manifest["world_size"] == 2
    assert {"rank_00000.pt", "rank_00001.pt", "model.safetensors", ".metadata"} <= set(manifest["files"])
    # Reload the 2-rank sharded checkpoint into one plain process (DCP reshards); its per-rank state
    # cannot be mapped to one rank, so asking for it is refused.
    model = _mlp(42)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(logdir, max_checkpoints=2)
    with pytest.raises(CheckpointError, match="written by 2 ranks but this run has 1"):
        manager.load(path, {"train": ModelOptimizerState(model, opt)}, per_rank_keys=("rng",))
    assert manager.load(path, {"train": ModelOptimizerState(model, opt)}) == {}
    full = torch.load(tmp_path / "full_state.pt", weights_only=True)
    _assert_same(full["model"], _flat(model.state_dict()))
    _assert_same(full["optim_state"], _flat(opt.state_dict()["state"]))


def test_export_full_state_fsdp2_tiny_wan_two_ranks(two_ranks):
    tmp_path = two_ranks / "export_wan"
    from longlive.models.wan import WanConfig, WanModel
    from longlive.models.wan.state_dict import load_weights

    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["generator.safetensors"]
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    model = WanModel(WanConfig.preset("tiny"))
    meta = load_weights(model, tmp_path / "export" / "generator.safetensors")
    assert meta["step"] == "5"
    _assert_same(reference, _flat(model.state_dict()))


# ------------------------------------------------------------------------------------------ worker
def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def _worker_fsdp_checkpoint(tmp: Path, rank: int, mesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _mlp(42)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1000 + rank)  # per-rank data
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}  # DTensor shards
    for _ in range(2):
        loss = F.mse_loss(model(torch.randn(4, 6, generator=gen)), torch.randn(4, 3, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(0.9).add_(v, alpha=0.1)

    def snapshot():
        return {"model": {k: _full(v) for k, v in model.state_dict().items()},
                "optim": {f"{k}.{n}": _full(t) for k, s in ModelOptimizerState(model, opt).state_dict()["optimizer"]["state"].items() for n, t in s.items()},
                "ema": {k: _full(v) for k, v in ema.items()}}

    before = snapshot()
    manager = CheckpointManager(tmp / "logdir", max_checkpoints=2)
    state = {"train": ModelOptimizerState(model, opt), "ema": ema}
    per_rank = {"rng": gen.get_state(), "position": 10 * rank + 3, "buffers": {"latents": [torch.randn(2, 3)]}}
    manager.save(1, state, per_rank=per_rank)
    path = manager.save(2, state, per_rank=per_rank,
                        export=lambda d: export_full_state(model.state_dict(), d / "model.safetensors", metadata={"step": 2}))
    assert path.name == "checkpoint_000002" and manager.latest() == path

    with torch.no_grad():  # perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for s in opt.state.values():
            s["exp_avg"].zero_()
            s["exp_avg_sq"].fill_(3.0)
        for v in ema.values():
            v.zero_()
    assert not torch.equal(_full(model[0].weight), before["model"]["0.weight"])

    loaded = manager.load(path, state, per_rank_keys=("rng", "position", "buffers"))
    after = snapshot()
    for part in before:
        _assert_same(before[part], after[part])
    assert loaded["position"] == 10 * rank + 3
    assert torch.equal(loaded["rng"], gen.get_state())
    assert torch.equal(loaded["buffers"]["latents"][0], per_rank["buffers"]["latents"][0])
    if rank == 0:  # optimizer state keyed like a plain optimizer's (parameter index, not name)
        index = {name: i for i, (name, _) in enumerate(_mlp(0).named_parameters())}
        plain_optim = {f"{index[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": t for k, t in before["optim"].items()}
        torch.save({"model": before["model"], "optim_state": plain_optim}, tmp / "full_state.pt")


def _worker_export_wan(tmp: Path, rank: int, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    from longlive.models.wan import WanConfig, WanModel

    torch.manual_seed(7)
    model = WanModel(WanConfig.preset("tiny"))
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    from torch.distributed.tensor import DTensor

    assert all(isinstance(v, DTensor) for v in model.state_dict().values())
    out = export_full_state(model.state_dict(), tmp / "export" / "generator.safetensors", metadata={"step": 5})
    assert out == tmp / "export" / "generator.safetensors" and out.is_file()
    if rank == 0:
        torch.save(reference, tmp / "reference.pt")


def _worker(tmp: Path, rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for name, scenario in (("fsdp_checkpoint", _worker_fsdp_checkpoint), ("export_wan", _worker_export_wan)):
            (tmp / name).mkdir(exist_ok=True)
            scenario(tmp / name, rank, mesh)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
