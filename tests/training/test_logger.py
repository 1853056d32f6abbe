"""TrainLogger: TensorBoard scalars at the log interval, rank-0-only output, resume purge, wandb calls
and clear errors for missing packages."""
from __future__ import annotations

import sys
import types

import pytest

from longlive.training.logger import TrainLogger


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir / "tensorboard"))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_follow_log_interval(tmp_path, capsys):
    with TrainLogger(tmp_path, rank=0, total_steps=10, start_step=0, log_interval=3,
                     config_dict={"training": {"lr": 1e-4}}) as logger:
        for step in range(1, 11):
            logger.log(step, {"train/loss": step * 0.5, "lr": 1e-3})
    acc, scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == [(3, 1.5), (6, 3.0), (9, 4.5)]
    assert [s for s, _ in scalars["lr"]] == [3, 6, 9]
    assert [s for s, _ in scalars["time/sec_per_step"]] == [3, 6, 9]
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert capsys.readouterr().out == ""  # no prints: the bar goes to stderr


def test_only_rank_zero_writes(tmp_path):
    with TrainLogger(tmp_path / "r1", rank=1, total_steps=5, start_step=0) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "r1").exists()


def test_resume_drops_events_logged_after_the_checkpoint(tmp_path):
    with TrainLogger(tmp_path, rank=0, total_steps=10, start_step=0) as logger:
        for step in range(1, 7):  # crashed after step 6; the checkpoint is at step 4
            logger.log(step, {"loss": float(step)})
    with TrainLogger(tmp_path, rank=0, total_steps=10, start_step=4) as logger:
        for step in range(5, 8):
            logger.log(step, {"loss": 10.0 * step})
    _, scalars = _scalars(tmp_path)
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install wandb.*logging\.use_wandb: false"):
        TrainLogger(tmp_path, rank=0, total_steps=5, start_step=0, wandb={"project": "p"})
    with pytest.raises(ImportError, match="pip install wandb"):  # every rank fails alike
        TrainLogger(tmp_path, rank=3, total_steps=5, start_step=0, wandb={"project": "p"})
    with pytest.raises(ValueError, match="unknown wandb settings \\['projekt'\\]"):
        TrainLogger(tmp_path, rank=0, total_steps=5, start_step=0, wandb={"projekt": "p"})


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"logging\.tensorboard: false"):
        TrainLogger(tmp_path, rank=0, total_steps=5, start_step=0)
    TrainLogger(tmp_path, rank=0, total_steps=5, start_step=0, tensorboard=False).close()  # the way out


def test_wandb_receives_scalars_and_keeps_one_run(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: calls.append(("login", kw))
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(id=kw["id"] or "run123")
    fake.log = lambda values, step: calls.append(("log", step, dict(values)))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings = {"project": "longlive", "entity": "team", "key": "k", "host": "https://wandb.example"}
    with TrainLogger(tmp_path, rank=0, total_steps=4, start_step=0, tensorboard=False, wandb=settings,
                     log_interval=2, config_dict={"a": 1}) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": float(step)})
    assert calls[0] == ("login", {"key": "k", "host": "https://wandb.example"})
    assert calls[1][0] == "init" and calls[1][1]["project"] == "longlive" and calls[1][1]["config"] == {"a": 1}
    assert [(c[1], c[2]["loss"]) for c in calls if c[0] == "log"] == [(2, 2.0), (4, 4.0)]
    assert calls[-1] == ("finish",)
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == "run123"
    calls.clear()
    TrainLogger(tmp_path, rank=0, total_steps=8, start_step=4, tensorboard=False, wandb=settings).close()
    assert calls[1][1]["id"] == "run123"  # a resumed run continues the same wandb run
