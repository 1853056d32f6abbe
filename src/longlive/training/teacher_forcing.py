"""The teacher-forcing objective of stage-1 AR training (spec 5.1, 5.4), on one rank's shard.

Every chunk of a video gets its own training timestep; the model sees the clean video as context
and predicts the flow velocity `eps - x0` of the noised copy, chunk-causally. Under sequence
parallelism (`longlive.parallel.sequence`) each rank computes the loss of its own noisy frames; the
local losses are normalised by the GLOBAL number of loss-bearing frames, so they sum over the
group to exactly the single-device loss (whatever the layout, masked or not: spec 9.2 item 11).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longlive.diffusion.schedule import TrainingSchedule
from longlive.parallel.sequence import SequenceParallel, SequenceShard


def device_normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise made on `device` by a generator there, seeded with one draw of the CPU
    `generator`: as reproducible as that generator's (checkpointed) state, and identical on ranks that
    share it, but without drawing a whole video of noise on the host and copying it over (37.7M values,
    ~0.2 s of CPU and a 151 MB copy per step of the synth AR recipe; the GPU did ~0.08 s of work)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device, dtype=dtype)


@dataclass
class StepDraw:
    """The random draws of one step, identical on every rank of an SP group (shared generator)."""

    t_index: torch.Tensor  # [B, chunks] training-timestep indices, one per chunk
    noise: torch.Tensor  # [B, C, F, H, W] for the whole video


@dataclass
class TFResult:
    loss: torch.Tensor  # this rank's share of the batch loss (shares sum to the loss)
    frame_loss: torch.Tensor  # [B, F_noisy] weighted per-frame MSE (detached)
    noisy: tuple[int, int]  # global noisy frame range of this rank
    t_index: torch.Tensor  # [B, F_noisy] per-frame timestep indices
    latent_error: torch.Tensor | None  # x0_pred - x0 on the noisy frames (for error recycling)
    noise_error: torch.Tensor | None  # (v_pred - target) * (1 - sigma)


class TeacherForcing:
    """Draws timesteps and noise, builds this rank's `[clean; noisy]` inputs and computes the loss."""

    def __init__(self, schedule: TrainingSchedule, num_frames: int, chunk_frames: int,
                 sp: SequenceParallel | None = None, i2v: bool = False) -> None:
        if num_frames % chunk_frames:
            raise ValueError(f"{num_frames} latent frames are not whole chunks of {chunk_frames}")
        self.schedule = schedule
        self.num_frames, self.chunk_frames = num_frames, chunk_frames
        self.num_chunks = num_frames // chunk_frames
        self.sp = sp
        self.i2v = i2v

    @property
    def shard(self) -> SequenceShard:
        if self.sp is not None:
            return self.sp.shard
        return SequenceShard((0, self.num_frames), (0, self.num_frames))

    def draw(self, latent_shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> StepDraw:
        """Per-chunk timestep indices and whole-video noise `latent_shape` = [B, C, F, H, W]."""
        b = latent_shape[0]
        t_index = self.schedule.sample_indices((b, self.num_chunks), generator=generator)
        return StepDraw(t_index.to(device), device_normal(latent_shape, generator, device))

    def loss_weights_count(self, batch: int, valid_frames: torch.Tensor | None) -> torch.Tensor:
        """Number of loss-bearing frames of the whole batch (padding and the I2V image frame excluded)."""
        valid = torch.full((batch,), self.num_frames) if valid_frames is None else valid_frames.cpu().clamp(max=self.num_frames)
        count = valid.sum() - (batch if self.i2v else 0)
        return count.clamp(min=1)

    def __call__(self, model, x0: torch.Tensor, context: torch.Tensor, draw: StepDraw, *, frame_offset: int = 0,
                 valid_frames: torch.Tensor | None = None, corrupt: Any = None, keep_errors: bool = False) -> TFResult:
        """Loss of this rank's shard.

        `x0` holds latent frames [frame_offset, frame_offset + x0.shape[2]) of the video (the whole video,
        or just this rank's frames under balanced SP); `context` is `[B, chunks, L, D]` (one prompt per chunk)
        or `[B, 1, L, D]`. `corrupt(x0, noise, t_index, chunk_positions) -> (x0_in, noise_in, context)` applies
        error recycling to the given frames (per-chunk timestep indices and global chunk positions; spec 5.5).
        """
        shard, f_chunk = self.shard, self.chunk_frames
        held = [r for r in (shard.clean, shard.noisy) if r[1] > r[0]]
        lo, hi = min(r[0] for r in held), max(r[1] for r in held)
        if frame_offset > lo or frame_offset + x0.shape[2] < hi:
            raise ValueError(f"this rank needs latent frames [{lo}, {hi}) but was given [{frame_offset}, {frame_offset + x0.shape[2]})")
        b, device = x0.shape[0], x0.device

        def frames(t: torch.Tensor, rng: tuple[int, int]) -> torch.Tensor:
            if rng[1] <= rng[0]:
                return t[:, :, :0]
            return t[:, :, rng[0] - frame_offset : rng[1] - frame_offset]

        noise = draw.noise[:, :, frame_offset : frame_offset + x0.shape[2]]
        t_frame_index = draw.t_index.repeat_interleave(f_chunk, dim=1)  # [B, F]
        x0_in, noise_in, ctx_src = x0, noise, x0
        if corrupt is not None:
            first = frame_offset // f_chunk
            chunks = torch.arange(first, first + x0.shape[2] // f_chunk)
            x0_in, noise_in, ctx_src = corrupt(x0, noise, draw.t_index[:, chunks.to(draw.t_index.device)], chunks)

        n0, n1 = shard.noisy
        idx = t_frame_index[:, n0:n1]
        sigma = self.schedule.sigmas.to(device)[idx]  # [B, Fn]
        timesteps = self.schedule.timesteps.to(device)[idx]
        s5 = sigma[:, None, :, None, None].to(x0.dtype)
        x_noisy_clean, eps = frames(x0_in, shard.noisy), frames(noise_in, shard.noisy)
        x_t = (1 - s5) * x_noisy_clean + s5 * eps
        target = eps - frames(x0, shard.noisy)
        clean_x = frames(ctx_src, shard.clean)
        clean_t = torch.zeros(b, shard.clean_frames, device=device)
        if self.i2v:  # frame 0 is the conditioning image: clean in both copies, t = 0
            if n0 == 0 and n1 > 0:
                x_t = x_t.clone()
                x_t[:, :, 0] = x0[:, :, 0 - frame_offset]
                timesteps = timesteps.clone()
                timesteps[:, 0] = 0
            if shard.clean[0] == 0 and shard.clean_frames:
                clean_x = clean_x.clone()
                clean_x[:, :, 0] = x0[:, :, 0 - frame_offset]

        if context.shape[1] > 1 and self.sp is not None:
            context = context[:, shard.chunk_slots(f_chunk)]
        attention = None
        positions = shard.frame_positions(device)
        if self.sp is not None:
            tokens_per_frame = (x0.shape[3] // model.config.patch_size[1]) * (x0.shape[4] // model.config.patch_size[2])
            attention = self.sp.attention(tokens_per_frame, device)
        v = model(x_t, timesteps, context, chunk_frames=f_chunk, clean_x=clean_x, clean_t=clean_t,
                  frame_positions=positions, attention=attention)

        per_frame = (v.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, Fn]
        weight = self.schedule.weights.to(device)[idx]
        frame_ids = torch.arange(n0, n1, device=device)
        valid = torch.full((b,), self.num_frames, device=device) if valid_frames is None else valid_frames.to(device)
        mask = frame_ids[None, :] < valid[:, None]
        if self.i2v:
            mask = mask & (frame_ids[None, :] != 0)
        weighted = per_frame * weight * mask
        loss = weighted.sum() / self.loss_weights_count(b, valid_frames).to(device)
        latent_error = noise_error = None
        if keep_errors:
            with torch.no_grad():
                v64, xt64, s64 = v.double(), x_t.double(), sigma.double()[:, None, :, None, None]
                x0_pred = xt64 - s64 * v64
                latent_error = (x0_pred - frames(x0, shard.noisy).double()).float()
                noise_error = ((v64 - target.double()) * (1 - s64)).float()
        return TFResult(loss, weighted.detach(), shard.noisy, idx, latent_error, noise_error)
