"""What every trainer shares: process groups, seeds and RNG streams, the data stream with its resume
position, sharded model construction, and the model-weight sources of a training config."""
from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from longlive.config import Config, ConfigError
from longlive.config.paths import require_path
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.state_dict import check_state_dict, load_state_dict
from longlive.parallel.fsdp import load_full_state, shard_model
from longlive.parallel.mesh import ParallelContext

log = logging.getLogger(__name__)


def resolve_seed(cfg: Config, ctx: ParallelContext) -> int:
    """`logging.seed`, or (0) a random seed drawn on rank 0 and broadcast, as the reference does."""
    seed = cfg.logging.seed
    if seed == 0:
        t = torch.tensor([random.SystemRandom().randrange(1, 2**31 - 1) if ctx.is_main else 0], dtype=torch.long)
        if ctx.device.type == "cuda":
            t = t.to(ctx.device)
        dist.broadcast(t, src=0)
        seed = int(t.item())
        log.info("logging.seed is 0: using random seed %d", seed)
    return seed


@dataclass
class RngStreams:
    """`shared`: identical on the ranks of one SP group (timesteps, noise, step-level decisions);
    `local`: per rank. Both are CPU generators whose states go into the checkpoint."""

    shared: torch.Generator
    local: torch.Generator

    @classmethod
    def create(cls, seed: int, ctx: ParallelContext) -> "RngStreams":
        shared = torch.Generator().manual_seed(seed * 1_000_003 + ctx.dp_rank)
        local = torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + ctx.rank)
        return cls(shared, local)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shared": self.shared.get_state(), "local": self.local.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shared.set_state(state["shared"])
        self.local.set_state(state["local"])


class BatchStream:
    """The batches of one data-parallel rank in a reproducible order, resumable at any batch.

    Epoch e visits a permutation of the dataset seeded by (seed, e); DP rank r takes every dp-th item
    (the remainder is dropped, as DistributedSampler(drop_last) does). `load=False` advances the
    position without reading anything (SP ranks whose group root reads the batch).
    """

    def __init__(self, dataset, batch_size: int, dp_rank: int, dp_size: int, seed: int, *,
                 num_workers: int = 0, load: bool = True, collate=None) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.load, self.collate = num_workers, load, collate
        per_rank = len(dataset) // dp_size
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the training dataset has {len(dataset)} samples, fewer than data-parallel ranks x "
                              f"batch size = {dp_size} x {batch_size}; add data or lower training.batch_size")
        self.epoch, self.position = 0, 0
        self._iter: Iterator | None = None
        unused = len(dataset) - self.batches_per_epoch * batch_size * dp_size
        if unused and dp_rank == 0:
            log.info("%d of %d samples are left out of each epoch (a different %d each epoch): the rest fills whole "
                     "batches of %d on %d data-parallel rank(s)", unused, len(dataset), unused, batch_size, dp_size)

    def _indices(self) -> list[int]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches_per_epoch * self.batch_size * self.dp_size][self.dp_rank :: self.dp_size]
        return mine[self.position * self.batch_size :].tolist()

    def _open(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        subset = torch.utils.data.Subset(self.dataset, self._indices())
        loader = torch.utils.data.DataLoader(subset, batch_size=self.batch_size, shuffle=False, drop_last=True,
                                             num_workers=self.num_workers, collate_fn=self.collate,
                                             prefetch_factor=1 if self.num_workers else None,
                                             persistent_workers=False)
        self._iter = iter(loader)

    def next(self) -> dict[str, Any] | None:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None
        batch = None
        if self.load:
            if self._iter is None:
                self._open()
            batch = next(self._iter)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._iter = int(state["epoch"]), int(state["position"]), None


def initial_weights(cfg: Config, wan_cfg: WanConfig, seed: int, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """Full starting weights (rank 0 only): `checkpoints.generator_ckpt`, else the Wan2.2 DiT in
    `checkpoints.wan_model_dir`, else random weights when `checkpoints.random_weights` says so."""
    ck = cfg.checkpoints
    if ck.random_weights:
        if ck.generator_ckpt:
            raise ConfigError(f"{cfg.source}: checkpoints.random_weights is true but generator_ckpt is also set; choose one")
        torch.manual_seed(seed)
        with torch.device(device):  # on the GPU a 5B init takes seconds instead of minutes
            model = WanModel(wan_cfg)
        return model.state_dict(), "random initialisation (checkpoints.random_weights: true)"
    if ck.generator_ckpt:
        path = require_path(cfg, "checkpoints.generator_ckpt", kind="any")
    else:
        from longlive.io.model_folder import resolve_wan_model_folder

        path = resolve_wan_model_folder(require_path(cfg, "checkpoints.wan_model_dir", kind="dir"), components=("dit",)).dit_folder
    sd, _ = load_state_dict(path)
    with torch.device("meta"):
        check_state_dict(WanModel(wan_cfg), sd, str(path))
    return sd, str(path)


def build_sharded_model(cfg: Config, ctx: ParallelContext, seed: int, *, weights: dict[str, torch.Tensor] | None = None) -> WanModel:
    """The DiT on the meta device, sharded with FSDP2, then filled from rank 0's full weights."""
    wan_cfg = WanConfig.preset(cfg.model_preset)
    with torch.device("meta"):
        model = WanModel(wan_cfg)
    if cfg.model_quant:  # NVFP4 training (spec 7.4): fp32 masters stay in the parameters, same state-dict keys
        from longlive.quant.convert import quantize_model, training_filter, training_recipe

        quantize_model(model, training_recipe(cfg), training_filter(cfg))
    shard_model(model, ctx, mixed_precision=cfg.infra.mixed_precision,
                gradient_checkpointing=cfg.infra.gradient_checkpointing, compile_blocks=cfg.infra.compile_blocks)
    model.to_empty(device=ctx.device)
    full = None
    if ctx.is_main:
        if weights is None:
            weights, source = initial_weights(cfg, wan_cfg, seed, ctx.device)
            log.info("generator weights: %s", source)
        full = {k: v.float() for k, v in weights.items()}
    load_full_state(model, full, ctx)
    del full
    return model


def dataset_from_config(cfg: Config, seed: int):
    """The training dataset selected by `data.dataset_type` (and its collate function)."""
    from longlive.data.video_dataset import collate_samples

    kind = cfg.data.dataset_type
    if kind == "auto":
        kind = "videos" if cfg.data.load_raw_video else "latents"
    if kind == "synthetic":
        from longlive.data.synthetic import SyntheticLatentDataset

        _, f, c, h, w = cfg.data.image_or_video_shape
        return SyntheticLatentDataset(cfg.data.synthetic_samples, (c, f, h, w), cfg.frames_per_chunk, seed=seed,
                                      scene_cut_prefix=cfg.inference.scene_cut_prefix), collate_samples, kind
    if kind == "procedural":
        from longlive.data.procedural_clips import ProceduralClipDataset

        return ProceduralClipDataset.from_config(cfg, seed), collate_samples, kind
    if cfg.data.data_path is None:
        raise ConfigError(f"{cfg.source}: data.data_path is not set (training {kind})")
    if kind == "latents":
        from longlive.data.latent_dataset import LatentDataset

        return LatentDataset.from_config(cfg), collate_samples, kind
    from longlive.data.video_dataset import MultiVideoConcatDataset

    return MultiVideoConcatDataset.from_config(cfg, train=True, seed=seed), collate_samples, kind


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logdir_path(logdir: str | Path) -> Path:
    path = Path(logdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--logdir {path} exists and is not a directory")
    return path


def open_logger(cfg: Config, logdir: Path, rank: int, start_step: int):
    """The run's TrainLogger: progress bar, TensorBoard (`logging.tensorboard`), wandb (`logging.use_wandb`)."""
    from longlive.training.logger import TrainLogger

    lg = cfg.logging
    wandb = None
    if lg.use_wandb:
        wandb = {"project": lg.wandb_project, "entity": lg.wandb_entity, "key": lg.wandb_key, "host": lg.wandb_host}
    return TrainLogger(logdir, rank=rank, total_steps=cfg.training.max_iters, start_step=start_step,
                       tensorboard=lg.tensorboard, wandb=wandb, log_interval=lg.log_interval, config_dict=cfg.to_dict())


@dataclass
class LoopResult:
    start_step: int
    seconds_per_step: float  # mean over the steps after the first (which includes compilation)
    peak_memory_gib: float | None
    checkpoints: list[str]


def _out_of_time(max_minutes: float | None, started: float, ctx: ParallelContext) -> bool:
    """True once `max_minutes` have passed; rank 0's clock decides for every rank (they stop together)."""
    if max_minutes is None:
        return False
    late = time.monotonic() - started >= max_minutes * 60
    if ctx.world_size > 1 and dist.is_initialized():
        flag = torch.tensor([float(late)], device=ctx.device)
        dist.broadcast(flag, src=0)
        late = bool(flag.item())
    return late


def run_training(trainer: Any, record: Any) -> LoopResult:
    """The loop both trainers share: resume, then step / log / gc / evaluate / save to `training.max_iters`
    (or `trainer.max_steps` more steps). `record(step, scalars)` keeps what the trainer reports."""
    cfg, ctx, t = trainer.cfg, trainer.ctx, trainer.cfg.training
    if trainer.resume_path is not None:
        trainer.resume(trainer.resume_path)
    start = trainer.step
    stop = t.max_iters if trainer.max_steps is None else min(t.max_iters, start + trainer.max_steps)
    times: list[float] = []
    saved: list[str] = []
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    started = time.monotonic()
    with open_logger(cfg, trainer.logdir, ctx.rank, start) as logger:
        while trainer.step < stop:
            if _out_of_time(t.max_minutes, started, ctx):
                log.info("training.max_minutes=%g reached after %d steps of this run: stopping at step %d",
                         t.max_minutes, trainer.step - start, trainer.step)
                if trainer.save_enabled and trainer.step > start and trainer.step % t.save_interval:
                    saved.append(str(trainer.save()))
                break
            scalars = trainer.train_step()
            record(trainer.step, scalars)
            times.append(scalars["seconds_per_step"])
            logger.log(trainer.step, scalars)
            if trainer.step % t.gc_interval == 0:
                gc.collect()
            if trainer.eval_enabled and cfg.evaluation.interval and trainer.step % cfg.evaluation.interval == 0:
                trainer.evaluate()
            if trainer.save_enabled and (trainer.step % t.save_interval == 0 or trainer.step == t.max_iters):
                saved.append(str(trainer.save()))
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    steady = times[1:] or times
    return LoopResult(start, sum(steady) / max(len(steady), 1), peak, saved)


def export_generator(folder: Path, model: torch.nn.Module, ema: Any, step: int) -> None:
    """Write `generator.safetensors` (and `generator_ema.safetensors` with an EMA) in bf16 for inference
    (collective: gathers the shards)."""
    from longlive.training.checkpoint import export_full_state

    meta = {"step": str(step), "checkpoint_format": "longlive_generator", "dtype": "bfloat16"}
    export_full_state(dict(model.state_dict()), folder / "generator.safetensors", metadata=meta, dtype=torch.bfloat16)
    if ema is not None:
        export_full_state(ema.state_dict(), folder / "generator_ema.safetensors", metadata={**meta, "ema": "true"},
                          dtype=torch.bfloat16)
