"""Stage-2 training: DMD distillation of the AR model into a few-step generator (spec 6).

Every step the critic (fake score) learns the flow of the student's own rollouts; every
`dfake_gen_update_ratio`-th step the student (generator) first takes a DMD step: its rollout is
noised and the teacher's and the critic's x0 predictions give the direction. With an `adapter`
section the generator and the critic are LoRA adapters; when the roles share base weights they
share one model (`training/roles.py`). Mesh, FSDP2, checkpoints, resume and logging are the AR
trainer's machinery.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from longlive.config import Config, ConfigError
from longlive.diffusion.schedule import TrainingSchedule
from longlive.io.checkpoint import CheckpointError
from longlive.models.wan.lora import PEFT_PREFIX, read_lora_checkpoint
from longlive.parallel.mesh import ParallelContext, init_parallel
from longlive.pipelines.inference import chunked_options
from longlive.training.checkpoint import CheckpointManager, rank_file_name
from longlive.training.dmd import critic_flow_loss, dmd_generator_loss, dmd_gradient, sample_dmd_timesteps, x0_from_velocity
from longlive.training.roles import DMDNetworks, Role, build_networks
from longlive.training.rollout import rollout
from longlive.training.runtime import BatchStream, RngStreams, export_generator, resolve_seed, run_training
from longlive.training.teacher_forcing import device_normal

log = logging.getLogger(__name__)


def check_dmd_config(cfg: Config) -> None:
    """Refuse what this trainer cannot run, naming the field."""
    if cfg.algorithm.trainer != "score_distillation":
        raise ConfigError(f"{cfg.source}: algorithm.trainer is {cfg.algorithm.trainer!r}; the DMD trainer runs 'score_distillation'")
    if not cfg.algorithm.backward_simulation:
        raise ConfigError(f"{cfg.source}: algorithm.backward_simulation: false (off-policy DMD) is not supported; "
                          "the shipped recipes use the on-policy rollout")
    if cfg.fp8_quant or cfg.model_quant:
        raise ConfigError(f"{cfg.source}: DMD quantizes its networks with infra.generator_quant / real_score_quant / "
                          "fake_score_quant; fp8_quant and model_quant are inference options here")
    if cfg.i2v:
        raise ConfigError(f"{cfg.source}: I2V DMD needs conditioning frames from a video dataset; not available yet")
    t = cfg.training
    n = cfg.frames_per_chunk
    if t.min_num_training_frames % n or t.num_training_frames % n or t.min_num_training_frames > t.num_training_frames:
        raise ConfigError(f"{cfg.source}: training.min_num_training_frames ({t.min_num_training_frames}) and "
                          f"num_training_frames ({t.num_training_frames}) must be whole chunks of {n}, min <= max")


@dataclass
class DMDSummary:
    start_step: int
    end_step: int
    generator_losses: dict[int, float]
    critic_losses: dict[int, float]
    seconds_per_step: float
    peak_memory_gib: float | None
    checkpoints: list[str]


class PromptDataset(torch.utils.data.Dataset):
    """Per-chunk prompts of a `.txt` file or a multi-shot folder (`MultiTextConcatDataset` semantics)."""

    def __init__(self, samples) -> None:
        if not samples:
            raise ConfigError("the DMD prompt data holds no prompts")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"prompts": list(s.prompts), "scene_cuts": list(s.scene_cuts), "name": s.name}


def _collate(items):
    return {k: [it[k] for it in items] for k in items[0]}


class _TrainState:
    """DCP Stateful over every trained model and both optimizers (frozen base weights not saved)."""

    def __init__(self, nets: DMDNetworks, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.nets, self.optimizers = nets, optimizers
        self.options = StateDictOptions(ignore_frozen_params=True)
        # loading: the frozen base is not in the checkpoint (DCP still loads every saved key)
        self.load_options = StateDictOptions(ignore_frozen_params=True, strict=False)

    def _pairs(self):
        pairs = []
        for i, model in enumerate(self.nets.models):
            opts = [opt for role, opt in self.optimizers.items()
                    if getattr(self.nets, role).model is model]
            pairs.append((i, model, opts))
        return pairs

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for i, model, opts in self._pairs():
            if not any(p.requires_grad for p in model.parameters()):
                continue
            msd, osd = get_state_dict(model, opts, options=self.options)
            out[f"model{i}"] = {"model": msd, "optim": osd}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, model, opts in self._pairs():
            key = f"model{i}"
            if key in state:
                set_state_dict(model, opts, model_state_dict=state[key]["model"], optim_state_dict=state[key]["optim"],
                               options=self.load_options)


class DMDTrainer:
    def __init__(self, cfg: Config, logdir: str | Path, *, auto_resume: bool = True, save: bool = True,
                 ctx: ParallelContext | None = None, text_encoder: Any = None, share_base: bool = True,
                 max_steps: int | None = None, evaluate: bool = True) -> None:
        check_dmd_config(cfg)
        self.cfg, self.logdir, self.save_enabled, self.max_steps = cfg, Path(logdir), save, max_steps
        self.eval_enabled, self._vae = evaluate, None
        self.ctx = ctx or init_parallel(1, cfg.infra.sharding_strategy)
        ctx = self.ctx
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.checkpoints = CheckpointManager(self.logdir, cfg.training.max_checkpoints)
        self.resume_path = self.checkpoints.latest() if auto_resume else None
        if self.resume_path is not None:
            self.seed = int(torch.load(self.resume_path / rank_file_name(ctx.rank), weights_only=True)["seed"])
        else:
            self.seed = resolve_seed(cfg, ctx)
        self.rng = RngStreams.create(self.seed, ctx)
        # decisions every rank must share (rollout length, exit step)
        self.common = torch.Generator().manual_seed(self.seed * 7919 + 1)
        self.dtype = torch.bfloat16 if cfg.infra.mixed_precision else torch.float32
        lora_init = {}
        if cfg.adapter is not None and cfg.checkpoints.lora_ckpt and self.resume_path is None:
            path = cfg.checkpoints.lora_ckpt
            lora_init["generator"], _ = read_lora_checkpoint(path, "generator")
            try:
                critic, _ = read_lora_checkpoint(path, "critic")
            except CheckpointError:
                critic = {}
            if critic:
                lora_init["critic"] = critic
            else:
                log.info("%s has no critic_lora weights; the critic adapter starts fresh", path)
        self.nets = build_networks(cfg, ctx, self.seed, share_base=share_base, lora_init=lora_init)
        t = cfg.training
        self.optimizers = {
            "generator": torch.optim.AdamW(self.nets.generator.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                           weight_decay=t.weight_decay),
            "critic": torch.optim.AdamW(self.nets.critic.parameters(), lr=t.lr_critic,
                                        betas=(t.beta1_critic, t.beta2_critic), weight_decay=t.weight_decay),
        }
        self.state = _TrainState(self.nets, self.optimizers)
        self.ema = None  # full fine-tuning only (spec 6.2: no EMA with LoRA)
        self.schedule = TrainingSchedule(cfg.model_kwargs.timestep_shift, cfg.algorithm.num_train_timestep)
        window = cfg.local_attn_size
        frames = t.num_training_frames
        rollout_window = -1 if window == -1 else min(window + t.slice_last_frames, frames)
        self.options = replace(chunked_options(cfg), local_attn_size=rollout_window, guidance_scale=1.0)
        if text_encoder is None:
            from longlive.pipelines.inference import build_text_encoder

            text_encoder = build_text_encoder(cfg, self.nets.generator.config, ctx.device, self.dtype)
            if hasattr(text_encoder, "offload_after_encode"):
                text_encoder.offload_after_encode = False
        self.text_encoder = text_encoder
        with torch.no_grad():
            self.negative = text_encoder.encode([cfg.inference.negative_prompt]).to(ctx.device, self.dtype)
        self.stream = self._prompt_stream(t.num_training_frames // cfg.frames_per_chunk)
        _, _, c, h, w = cfg.data.image_or_video_shape
        self.latent_chw = (int(c), int(h), int(w))
        self.step = 0

    # ------------------------------------------------------------------ data
    def _prompt_stream(self, num_chunks: int) -> BatchStream:
        from longlive.data.prompts import load_prompts

        if self.cfg.data.data_path is None:
            raise ConfigError(f"{self.cfg.source}: data.data_path (DMD prompts: .txt file or caption folder) is not set")
        samples = load_prompts(self.cfg.data.data_path, num_chunks, chunks_per_shot=self.cfg.data.chunks_per_shot,
                               scene_cut_prefix=self.cfg.inference.scene_cut_prefix,
                               mismatch=self.cfg.data.prompt_length_mismatch)
        return BatchStream(PromptDataset(samples), self.cfg.training.batch_size, self.ctx.rank, self.ctx.world_size,
                           self.seed, collate=_collate)

    # ------------------------------------------------------------------ scoring
    def _x0(self, role: Role, x_t: torch.Tensor, t_frames: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor,
            guidance: float = 0.0) -> torch.Tensor:
        """A score network's x0 prediction over the whole clip (block-causal, per-chunk prompts), with CFG c + s(c - u)."""
        n = self.cfg.frames_per_chunk
        cond = x0_from_velocity(x_t, role(x_t, t_frames, context, chunk_frames=n), sigma)
        if guidance == 0.0:
            return cond
        neg = self.negative.expand(x_t.shape[0], -1, -1)
        uncond = x0_from_velocity(x_t, role(x_t, t_frames, neg, chunk_frames=n), sigma)
        return cond + guidance * (cond - uncond)

    def _noised(self, x: torch.Tensor, chunks: int):
        b = x.shape[0]
        n = self.cfg.frames_per_chunk
        t = sample_dmd_timesteps(b, chunks, self.rng.local, per_chunk=False, shift=self.cfg.model_kwargs.timestep_shift,
                                 num_train_timesteps=self.cfg.algorithm.num_train_timestep).to(x.device)
        t_frames = t.repeat_interleave(n, dim=1)
        sigma = self.schedule.sigma(t_frames).to(x.device)  # nearest training-schedule sigma
        noise = device_normal(x.shape, self.rng.local, x.device, x.dtype)
        s = sigma[:, None, :, None, None].to(x.dtype)
        return (1 - s) * x.detach() + s * noise, t_frames, sigma, noise

    def _rollout(self, prompts_embeds: torch.Tensor, cuts, chunks: int, exit_step: int, grad: bool) -> torch.Tensor:
        b = prompts_embeds.shape[0]
        c, h, w = self.latent_chw
        noise = device_normal((b, c, chunks * self.cfg.frames_per_chunk, h, w), self.rng.local, self.ctx.device, self.dtype)
        return rollout(self.nets.generator, self.nets.generator.config, noise, prompts_embeds, options=self.options,
                       exit_step=exit_step, scene_cuts=cuts, grad=grad)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.training
        t0 = time.perf_counter()
        n = cfg.frames_per_chunk
        lo, hi = t.min_num_training_frames // n, t.num_training_frames // n
        chunks = int(torch.randint(lo, hi + 1, (1,), generator=self.common))
        exit_step = int(torch.randint(0, self.options.sampling_steps, (1,), generator=self.common))
        batch = self.stream.next()
        prompts = [p[:chunks] for p in batch["prompts"]]
        cuts = [c[:chunks] for c in batch["scene_cuts"]]
        with torch.no_grad():
            context = self.text_encoder.encode_chunks(prompts).to(self.ctx.device, self.dtype)
        scalars: dict[str, float] = {"chunks": float(chunks), "exit_step": float(exit_step)}
        gen_step = self.step % t.dfake_gen_update_ratio == 0
        if gen_step:
            x = self._rollout(context, cuts, chunks, exit_step, grad=True)
            x_t, t_frames, sigma, _ = self._noised(x, chunks)
            with torch.no_grad():
                fake = self._x0(self.nets.critic, x_t, t_frames, context, sigma, cfg.algorithm.fake_guidance_scale)
                real = self._x0(self.nets.teacher, x_t, t_frames, context, sigma, cfg.algorithm.real_guidance_scale)
                grad = dmd_gradient(x.detach(), fake, real, None, 0.0, n)
            loss = dmd_generator_loss(x, grad)
            loss.backward()
            scalars["generator_grad_norm"] = self._clip_and_step("generator", t.max_grad_norm_generator)
            self._update_ema(self.step + 1)
            scalars["generator_loss"] = self._global_mean(loss.detach())
        with torch.no_grad():
            x = self._rollout(context, cuts, chunks, exit_step, grad=False)
        x_t, t_frames, sigma, noise = self._noised(x, chunks)
        fake = self._x0(self.nets.critic, x_t, t_frames, context, sigma)
        closs = critic_flow_loss(x_t, fake, x, noise, sigma)
        closs.backward()
        scalars["critic_grad_norm"] = self._clip_and_step("critic", t.max_grad_norm_critic)
        scalars["critic_loss"] = self._global_mean(closs.detach())
        self.step += 1
        scalars["seconds_per_step"] = time.perf_counter() - t0
        for k in ("generator_loss", "critic_loss"):
            if k in scalars and not math.isfinite(scalars[k]):
                raise FloatingPointError(f"step {self.step}: {k} is {scalars[k]}; stopping")
        return scalars

    def _update_ema(self, step: int) -> None:
        from longlive.training.ema import EMA

        t = self.cfg.training
        if self.cfg.adapter is not None or t.ema_weight is None or step < t.ema_start_step:
            return
        if self.ema is None:
            self.ema = EMA(self.nets.generator.model, t.ema_weight)
            log.info("generator EMA started at step %d (decay %s)", step, t.ema_weight)
        else:
            self.ema.update(self.nets.generator.model)

    def _state_objects(self) -> dict[str, Any]:
        return {"train": self.state, **({"ema": self.ema} if self.ema is not None else {})}

    def _clip_and_step(self, role: str, max_norm: float) -> float:
        params = getattr(self.nets, role).parameters()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizers[role].step()
        self.optimizers[role].zero_grad(set_to_none=True)
        return float(norm)

    def _global_mean(self, value: torch.Tensor) -> float:
        v = value.float().reshape(1).to(self.ctx.device)
        dist.all_reduce(v)
        return float(v) / self.ctx.world_size

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> list[Path]:
        """The student (generator role) on the evaluation prompts with the `inference` sampling settings."""
        from longlive.training.evaluation import evaluate_generator

        def vae():
            if self._vae is None:
                from longlive.pipelines.inference import build_vae

                self._vae = build_vae(self.cfg, self.ctx.device, self.dtype).requires_grad_(False)
            return self._vae

        model = self.nets.generator.model
        model.eval()
        try:
            return evaluate_generator(self.nets.generator, self.cfg, text_encoder=self.text_encoder, step=self.step,
                                      seed=self.seed, out_root=self.logdir, device=self.ctx.device, dtype=self.dtype,
                                      is_main=self.ctx.is_main, vae=vae)
        finally:
            model.train()

    # ------------------------------------------------------------------ checkpoints
    def lora_checkpoint(self) -> dict[str, Any]:
        """`{generator_lora, critic_lora, step}` in the PEFT layout (collective: gathers DTensors)."""
        out: dict[str, Any] = {"step": self.step}
        for role, key in ((self.nets.generator, "generator_lora"), (self.nets.critic, "critic_lora")):
            if role.adapter is None:
                continue
            sd = {}
            for name, p in role.adapter_state().items():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                sd[PEFT_PREFIX + name.replace(f".{role.adapter}.", ".")] = full.detach().cpu()
            out[key] = sd
        return out

    def save(self) -> Path:
        from longlive.io.checkpoint import write_torch

        step = self.step

        def export(folder: Path) -> None:
            if self.cfg.adapter is not None:
                lora = self.lora_checkpoint()
                if self.ctx.is_main:
                    write_torch(lora, folder / "lora.pt")
            else:
                export_generator(folder, self.nets.generator.model, self.ema, step)

        per_rank = {"step": step, "seed": self.seed, "rng": self.rng.state_dict(), "common": self.common.get_state(),
                    "data": self.stream.state_dict()}
        per_rank["has_ema"] = self.ema is not None
        return self.checkpoints.save(step, self._state_objects(), per_rank=per_rank, export=export)

    def resume(self, path: Path) -> None:
        from longlive.training.checkpoint import read_manifest

        from longlive.training.ema import EMA

        self.step = int(read_manifest(path)["step"])
        has_ema = bool(torch.load(path / rank_file_name(self.ctx.rank), weights_only=True).get("has_ema", False))
        if has_ema:
            self.ema = EMA(self.nets.generator.model, self.cfg.training.ema_weight or 0.0)
        per_rank = self.checkpoints.load(path, self._state_objects(), per_rank_keys=("rng", "common", "data"))
        self.rng.load_state_dict(per_rank["rng"])
        self.common.set_state(per_rank["common"])
        self.stream.load_state_dict(per_rank["data"])
        log.info("resumed DMD from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ loop
    def run(self) -> DMDSummary:
        gen: dict[int, float] = {}
        crit: dict[int, float] = {}

        def record(step: int, scalars: dict[str, float]) -> None:
            if "generator_loss" in scalars:
                gen[step] = scalars["generator_loss"]
            crit[step] = scalars["critic_loss"]

        res = run_training(self, record)
        return DMDSummary(res.start_step, self.step, gen, crit, res.seconds_per_step, res.peak_memory_gib, res.checkpoints)
