"""Stage-1 training: tune the Wan2.2 DiT into a chunk-level AR model by teacher forcing (spec 5).

One step: each SP group reads one batch (its root rank decodes the video; every rank VAE-encodes
only its chunk-halo window, or precomputed latents are read), the prompts are encoded, the
teacher-forcing loss of this rank's shard is computed (optionally with recycled errors), gradients
are reduced by FSDP2 and AdamW steps. Checkpoints (sharded, atomic) and evaluation run at their own
intervals; a run started on a logdir with checkpoints resumes exactly where the newest one ends.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longlive.config import Config, ConfigError
from longlive.diffusion.schedule import TrainingSchedule
from longlive.parallel.mesh import ParallelContext, init_parallel
from longlive.parallel.sequence import SequenceParallel
from longlive.training.checkpoint import CheckpointManager, ModelOptimizerState, read_manifest
from longlive.training.ema import EMA
from longlive.training.error_recycling import ErrorRecycler
from longlive.training.runtime import (BatchStream, RngStreams, build_sharded_model, dataset_from_config,
                                       export_generator, resolve_seed, run_training)
from longlive.training.teacher_forcing import TeacherForcing

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    start_step: int
    end_step: int
    losses: dict[int, float]  # step -> global loss
    skipped_samples: int
    seconds_per_step: float
    peak_memory_gib: float | None
    checkpoints: list[str]


def check_training_config(cfg: Config) -> None:
    """Refuse configurations this trainer cannot run, naming the field."""
    if cfg.algorithm.trainer != "diffusion":
        raise ConfigError(f"{cfg.source}: algorithm.trainer is {cfg.algorithm.trainer!r}; the AR trainer runs 'diffusion'")
    if not cfg.teacher_forcing:
        raise ConfigError(f"{cfg.source}: algorithm.teacher_forcing is false; stage-1 AR training is teacher forcing")
    if cfg.fp8_quant:
        raise ConfigError(f"{cfg.source}: fp8_quant is an inference option (FP8 PTQ); AR training quantizes with model_quant (NVFP4)")
    if cfg.infra.sp_layout == "plain" and cfg.training.error_recycling.enabled:
        raise ConfigError(f"{cfg.source}: training.error_recycling needs infra.sp_layout: balanced (the plain layout "
                          "splits a chunk's clean and noisy copies over different ranks)")
    shape = cfg.data.image_or_video_shape
    if len(shape) != 5:
        raise ConfigError(f"{cfg.source}: data.image_or_video_shape must be [B, F, C, H, W], got {shape}")


class ARTrainer:
    """Teacher-forcing trainer; `run()` trains to `training.max_iters` and returns a summary."""

    def __init__(self, cfg: Config, logdir: str | Path, *, auto_resume: bool = True, save: bool = True,
                 evaluate: bool = True, ctx: ParallelContext | None = None, text_encoder: Any = None,
                 max_steps: int | None = None, model: torch.nn.Module | None = None) -> None:
        """`ctx`, `text_encoder` and an already sharded `model` can be passed in (benchmarks reuse one model)."""
        check_training_config(cfg)
        self.cfg, self.logdir = cfg, Path(logdir)
        self.save_enabled, self.eval_enabled = save, evaluate
        self.ctx = ctx or init_parallel(cfg.infra.sequence_parallel_size, cfg.infra.sharding_strategy)
        ctx = self.ctx
        self.max_steps = max_steps  # stop after this many steps in this process (tests, benchmarks)
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.checkpoints = CheckpointManager(self.logdir, cfg.training.max_checkpoints)
        self.resume_path = self.checkpoints.latest() if auto_resume else None
        # a resumed run keeps its seed (with logging.seed 0 the seed was drawn at random): data order,
        # synthetic data and evaluation noise depend on it
        self.seed = self._checkpoint_seed(self.resume_path) if self.resume_path else resolve_seed(cfg, ctx)
        self.rng = RngStreams.create(self.seed, ctx)
        self.dtype = torch.bfloat16 if cfg.infra.mixed_precision else torch.float32

        _, frames, channels, height, width = (int(s) for s in cfg.data.image_or_video_shape)
        self.latent_frames, self.latent_hw, self.channels = frames, (height, width), channels
        self.model = model if model is not None else build_sharded_model(cfg, ctx, self.seed)
        self.sp = None
        if ctx.sp_size > 1:
            self.sp = SequenceParallel(ctx.sp_group, frames, cfg.frames_per_chunk, cfg.infra.sp_layout,
                                       num_heads=self.model.config.num_heads)
        self.objective = TeacherForcing(TrainingSchedule(cfg.model_kwargs.timestep_shift, cfg.algorithm.num_train_timestep),
                                        frames, cfg.frames_per_chunk, sp=self.sp, i2v=cfg.i2v)
        t = cfg.training
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
                                           betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                           foreach=True)
        self.ema: EMA | None = None

        self.dataset, collate, self.data_kind = dataset_from_config(cfg, self.seed)
        self.raw_video = self.data_kind in ("videos", "procedural")  # pixels: the VAE encodes them
        load_here = ctx.is_sp_root or not self.raw_video
        workers = cfg.data.num_workers if ctx.device.type == "cuda" else 0
        self.stream = BatchStream(self.dataset, t.batch_size, ctx.dp_rank, ctx.dp_size, self.seed,
                                  num_workers=workers, load=load_here, collate=collate)
        self.vae = None
        if self.raw_video:
            from longlive.pipelines.inference import build_vae

            self.vae = build_vae(cfg, ctx.device, self.dtype).requires_grad_(False)
        if text_encoder is None:
            from longlive.pipelines.inference import build_text_encoder

            text_encoder = build_text_encoder(cfg, self.model.config, ctx.device, self.dtype)
            if hasattr(text_encoder, "offload_after_encode"):
                text_encoder.offload_after_encode = False  # keep it resident: it runs every step
        self.text_encoder = text_encoder

        er = cfg.training.error_recycling
        self.recycler = ErrorRecycler(
            er, chunk_shape=(channels, height, width), num_chunks_total=frames // cfg.frames_per_chunk,
            frames_per_chunk=cfg.frames_per_chunk, num_train_timesteps=cfg.algorithm.num_train_timestep,
            sp_rank=ctx.sp_rank if self.sp else 0, sp_size=ctx.sp_size if self.sp else 1,
            gather=self._warmup_gather if ctx.world_size > 1 else None, device=ctx.device)
        self.step = 0
        self.skipped_samples = 0

    # ------------------------------------------------------------------ collectives
    def _warmup_gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather along dim 0 over the DP group (position bucketing) or the world (spec 5.5)."""
        group = self.ctx.dp_group if self.cfg.training.error_recycling.enable_position_bucketing else None
        world = dist.get_world_size(group)
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"train": ModelOptimizerState(self.model, self.optimizer)}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def _per_rank(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "rng": self.rng.state_dict(), "data": self.stream.state_dict(),
                "recycler": self.recycler.state_dict(), "skipped_samples": self.skipped_samples}

    def _maybe_start_ema(self) -> None:
        t = self.cfg.training
        if self.ema is None and t.ema_weight is not None and self.step >= t.ema_start_step:
            self.ema = EMA(self.model, t.ema_weight)
            log.info("EMA started at step %d (decay %s)", self.step, t.ema_weight)

    def _checkpoint_seed(self, path: Path) -> int:
        from longlive.training.checkpoint import rank_file_name

        return int(torch.load(path / rank_file_name(self.ctx.rank), map_location="cpu", weights_only=True)["seed"])

    def resume(self, path: Path | None = None) -> bool:
        """Restore model, optimizer, EMA, step, RNG, data position and error buffers from `path` (default: newest)."""
        path = path or self.checkpoints.latest()
        if path is None:
            return False
        manifest = read_manifest(path)
        self.step = int(manifest["step"])
        self._maybe_start_ema()
        per_rank = self.checkpoints.load(path, self._state(), per_rank_keys=("rng", "data", "recycler"))
        self.seed = int(per_rank["seed"])
        self.rng.load_state_dict(per_rank["rng"])
        self.stream.load_state_dict(per_rank["data"])
        self.recycler.load_state_dict(per_rank["recycler"])
        self.skipped_samples = int(per_rank.get("skipped_samples", 0))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self) -> Path:
        step = self.step

        def export(folder: Path) -> None:
            export_generator(folder, self.model, self.ema, step)

        return self.checkpoints.save(step, self._state(), per_rank=self._per_rank(),
                                     export=export if self.cfg.training.export_generator else None)

    # ------------------------------------------------------------------ one step
    def _latents(self, batch: dict[str, Any] | None) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """This rank's clean latents `[B, C, F', H, W]`, their first global frame, and the batch metadata."""
        ctx, sp = self.ctx, self.sp
        if not self.raw_video:
            latents = batch["latents"].to(ctx.device, torch.float32)
            meta = {k: batch[k] for k in ("prompts", "num_valid_latent_frames", "skipped")}
            if sp is not None and sp.layout == "balanced":
                lo, hi = sp.shard.noisy
                return latents[:, :, lo:hi], lo, meta
            return latents, 0, meta
        from longlive.parallel.vae_encode import broadcast_object, encode_sharded

        group = ctx.sp_group if sp is not None else None
        meta = None
        if ctx.is_sp_root:
            meta = {k: batch[k] for k in ("prompts", "num_valid_latent_frames", "skipped")}
        if group is not None:
            meta = broadcast_object(meta, group=group, src=0)
        frames = batch["frames"].to(ctx.device, self.vae.dtype) if ctx.is_sp_root else None
        with torch.no_grad():
            local = encode_sharded(self.vae, frames, latent_frames=self.latent_frames,
                                   halo_latents=self.cfg.infra.vae_halo_latents, group=group, src=0).float()
        if sp is None:
            return local, 0, meta
        if sp.layout == "balanced":
            return local, sp.shard.noisy[0], meta
        full = torch.empty((ctx.sp_size, *local.shape), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, local.contiguous(), group=group)
        return torch.cat(full.unbind(0), dim=2), 0, meta

    def _micro_step(self) -> torch.Tensor:
        ctx, obj, cfg = self.ctx, self.objective, self.cfg
        batch = self.stream.next()
        x0, offset, meta = self._latents(batch)
        self.skipped_samples += sum(len(s) for s in meta["skipped"])
        valid = torch.as_tensor(meta["num_valid_latent_frames"]).reshape(-1)
        with torch.no_grad():
            context = self.text_encoder.encode_chunks(meta["prompts"]).to(ctx.device, self.dtype)
        b = x0.shape[0]
        draw = obj.draw((b, self.channels, self.latent_frames, *self.latent_hw), self.rng.shared, ctx.device)
        corrupted = {}

        def corrupt(x0_local, noise, t_index, chunk_positions):
            out = self.recycler.corrupt(x0_local, noise, t_index, chunk_positions, self.step, self.rng.shared, self.rng.local)
            corrupted["clean_step"] = out.clean_step
            return out.x0_in, out.noise_in, out.context

        res = obj(self.model, x0, context, draw, frame_offset=offset, valid_frames=valid,
                  corrupt=corrupt if self.recycler.enabled else None, keep_errors=self.recycler.enabled)
        # FSDP averages gradients over all dp x sp ranks; the SP shares must add up, hence x sp.
        scale = (ctx.sp_size if self.sp is not None else 1) / cfg.training.gradient_accumulation_steps
        (res.loss * scale).backward()
        if self.recycler.enabled:
            f_chunk = cfg.frames_per_chunk
            n0, n1 = res.noisy
            chunks = torch.arange(n0 // f_chunk, n1 // f_chunk)
            chunk_valid = (chunks[None, :] * f_chunk < valid[:, None])
            self.recycler.store(res.latent_error, res.noise_error, draw.t_index[:, chunks.to(draw.t_index.device)].cpu(),
                                chunks, self.step, self.rng.shared, self.rng.local,
                                clean_step=corrupted.get("clean_step", False), chunk_valid=chunk_valid)
        return res.loss.detach()

    def train_step(self) -> dict[str, float]:
        """One optimizer step (with gradient accumulation); returns the logged scalars."""
        t0 = time.perf_counter()
        self.model.train()
        loss = torch.zeros((), device=self.ctx.device)
        for _ in range(self.cfg.training.gradient_accumulation_steps):
            loss += self._micro_step()
        loss /= self.cfg.training.gradient_accumulation_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_grad_norm_generator)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._maybe_start_ema()
        if self.ema is not None:
            self.ema.update(self.model)
        # global loss: SP shares add up, DP replicas average
        dist.all_reduce(loss)
        loss = loss / self.ctx.dp_size
        scalars = {"loss": float(loss), "grad_norm": float(grad_norm), "seconds_per_step": time.perf_counter() - t0,
                   "skipped_samples": float(self.skipped_samples)}
        if not math.isfinite(scalars["loss"]):
            raise FloatingPointError(f"step {self.step}: the loss is {scalars['loss']}; stopping (check the learning "
                                     "rate, the data and the weights)")
        return scalars

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[Path]:
        """Generate the evaluation prompts with the model (EMA weights when evaluation.use_ema)."""
        from contextlib import nullcontext

        from longlive.training.evaluation import evaluate_generator

        use_ema = self.cfg.evaluation.use_ema and self.ema is not None
        self.model.eval()
        try:
            with (self.ema.applied(self.model) if use_ema else nullcontext()):
                return evaluate_generator(self.model, self.cfg, text_encoder=self.text_encoder, step=self.step,
                                          seed=self.seed, out_root=self.logdir, device=self.ctx.device, dtype=self.dtype,
                                          is_main=self.ctx.is_main, vae=self._eval_vae, tag={"ema": use_ema})
        finally:
            self.model.train()

    def _eval_vae(self):
        """The VAE for evaluation videos (the training VAE, or built on first use on rank 0)."""
        if self.vae is None:
            from longlive.pipelines.inference import build_vae

            self.vae = build_vae(self.cfg, self.ctx.device, self.dtype).requires_grad_(False)
        return self.vae

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainSummary:
        """Train to `training.max_iters` (or `max_steps` more steps), resuming first unless auto_resume was off."""
        losses: dict[int, float] = {}
        res = run_training(self, lambda step, scalars: losses.__setitem__(step, scalars["loss"]))
        if self.skipped_samples:
            log.warning("%d training sample(s) could not be read and were skipped (see the warnings above)", self.skipped_samples)
        return TrainSummary(res.start_step, self.step, losses, self.skipped_samples, res.seconds_per_step,
                            res.peak_memory_gib, res.checkpoints)
