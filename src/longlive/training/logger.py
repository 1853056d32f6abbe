"""Training progress and scalar logging: a tqdm bar, TensorBoard and (optionally) wandb, on rank 0 only.

TensorBoard events go to `<logdir>/tensorboard`; a resumed run drops events a crashed run logged
after the resume step, so curves never double back. wandb is optional: asking for it without the
package installed is an error, never a silent no-op.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

log = logging.getLogger(__name__)

WANDB_FIELDS = ("project", "entity", "key", "host", "name")
_WANDB_ID_FILE = "wandb_run_id.txt"

__all__ = ["TrainLogger"]


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ValueError, ImportError):  # a module entry without a spec (or blocked with None)
        return package in sys.modules and sys.modules[package] is not None


_TENSORBOARD_MISSING = (
    "TensorBoard logging is enabled but the `tensorboard` package is not installed: install it with "
    "`pip install tensorboard`, or turn it off with `logging.tensorboard: false`"
)
_WANDB_MISSING = (
    "wandb logging is enabled (logging.use_wandb: true) but the `wandb` package is not installed: install "
    "it with `pip install wandb`, or turn it off with `logging.use_wandb: false`"
)


class TrainLogger:
    """Progress bar (step, loss, s/step) plus TensorBoard/wandb scalars every `log_interval` steps.

    Every rank constructs one (so a missing package fails on all ranks alike); only rank 0 writes.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        log_interval: int = 1,
        config_dict: Mapping[str, Any] | None = None,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        if wandb is not None:
            unknown = sorted(set(wandb) - set(WANDB_FIELDS))
            if unknown:
                raise ValueError(f"unknown wandb settings {unknown}; allowed: {list(WANDB_FIELDS)}")
        if tensorboard and not _installed("tensorboard"):
            raise ImportError(_TENSORBOARD_MISSING)
        if wandb is not None and not _installed("wandb"):
            raise ImportError(_WANDB_MISSING)
        self.logdir = Path(logdir)
        self.rank = rank
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.active = rank == 0
        self._writer = None
        self._wandb = None
        self._bar = None
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._closed = False
        if not self.active:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._writer = self._open_tensorboard(start_step, config_dict)
        if wandb is not None:
            self._wandb = self._open_wandb(dict(wandb), start_step, config_dict)
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         mininterval=0.5 if tty else 30.0)

    # ------------------------------------------------------------------ backends
    def _open_tensorboard(self, start_step: int, config_dict: Mapping[str, Any] | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"{_TENSORBOARD_MISSING} ({exc})") from exc
        # purge_step: events a previous (crashed) run logged after the checkpoint we resume from are dropped.
        writer = SummaryWriter(log_dir=str(self.logdir / "tensorboard"), purge_step=start_step + 1 if start_step > 0 else None)
        if config_dict is not None:
            text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
            writer.add_text("config", "```\n" + text + "\n```", global_step=start_step)
        log.info("TensorBoard events: %s", self.logdir / "tensorboard")
        return writer

    def _open_wandb(self, settings: dict[str, Any], start_step: int, config_dict: Mapping[str, Any] | None):
        try:
            wandb = importlib.import_module("wandb")
        except ImportError as exc:
            raise ImportError(f"{_WANDB_MISSING} ({exc})") from exc
        if settings.get("key") or settings.get("host"):
            login = {k: settings[k] for k in ("key", "host") if settings.get(k)}
            wandb.login(**login)
        # Keep one wandb run per logdir, so a resumed training continues the same curves.
        id_file = self.logdir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        run = wandb.init(project=settings.get("project"), entity=settings.get("entity"), name=settings.get("name"),
                         dir=str(self.logdir), config=dict(config_dict) if config_dict is not None else None,
                         id=run_id, resume="allow")
        new_id = getattr(run, "id", None)
        if new_id and new_id != run_id:
            id_file.write_text(str(new_id) + "\n")
        log.info("wandb run %s (project %s, starting at step %d)", new_id, settings.get("project"), start_step)
        return wandb

    # ------------------------------------------------------------------ logging
    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Advance the bar to `step`; every `log_interval` steps write `scalars` to TensorBoard/wandb."""
        if not self.active or self._closed:
            return
        now = time.perf_counter()
        values = {k: float(v) for k, v in scalars.items()}
        sec_per_step = (now - self._last_time) / (step - self._last_step) if step > self._last_step else None
        self._last_step, self._last_time = step, now
        postfix = {k.rsplit("/", 1)[-1]: f"{v:.4g}" for k, v in values.items() if k.rsplit("/", 1)[-1].endswith("loss")}
        if sec_per_step is not None:
            postfix["s/step"] = f"{sec_per_step:.2f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)
        if step % self.log_interval:
            return
        if sec_per_step is not None:
            values.setdefault("time/sec_per_step", sec_per_step)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            log.warning("step %d: non-finite scalars %s", step, {k: values[k] for k in bad})
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close every backend (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
