"""The loss math of DMD distillation (spec 6.4, 6.5): timestep draws, the DMD gradient and both losses.

Pure tensor functions, no models: the trainer runs the student, teacher and critic and hands their
x0 predictions here. Latents are `[B, C, F, H, W]`; a chunk is `chunk_frames` consecutive frames;
per-frame quantities (sigma, masks) are `[B, F]`. Convention (`longlive.diffusion.schedule`):
x_t = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, so x0 = x_t - sigma v.
"""
from __future__ import annotations

import torch

from longlive.diffusion.schedule import shift_sigma

__all__ = [
    "sample_dmd_timesteps",
    "dmd_gradient",
    "dmd_generator_loss",
    "critic_flow_loss",
    "x0_from_velocity",
]


def sample_dmd_timesteps(batch: int, num_chunks: int, generator: torch.Generator, *, per_chunk: bool,
                         shift: float = 5.0, num_train_timesteps: int = 1000, min_step: float = 20,
                         max_step: float = 980, device: torch.device | str | None = None) -> torch.Tensor:
    """DMD timesteps `[B, num_chunks]` (float32): t ~ U{0..N-1}, shifted N*shift*u/(1+(shift-1)u), u = t/N, clamped.

    One draw per sample repeated over its chunks (T2V), or one per chunk (`per_chunk`, I2V); spec 6.4 step 1.
    Randomness comes only from `generator` (drawn on its device, then moved to `device`).
    """
    if batch < 1 or num_chunks < 1:
        raise ValueError(f"sample_dmd_timesteps: batch and num_chunks must be >= 1, got {batch} and {num_chunks}")
    if shift <= 0:
        raise ValueError(f"sample_dmd_timesteps: shift must be > 0, got {shift}")
    if num_train_timesteps < 1:
        raise ValueError(f"sample_dmd_timesteps: num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if min_step > max_step:
        raise ValueError(f"sample_dmd_timesteps: min_step {min_step} > max_step {max_step}")
    n = num_train_timesteps
    columns = num_chunks if per_chunk else 1
    t = torch.randint(0, n, (batch, columns), generator=generator, device=generator.device)
    u = t.to(torch.float64) / n
    shifted = (n * shift_sigma(u, shift)).clamp(min_step, max_step)
    shifted = shifted.expand(batch, num_chunks).contiguous()
    return shifted.to(device=device if device is not None else shifted.device, dtype=torch.float32)


def _check_latent(name: str, x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must be a latent [B, C, F, H, W], got shape {tuple(x.shape)}")


def _per_frame(name: str, value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar, per-sample `[B]` or per-frame `[B, F]` quantity as float64 broadcastable to `x` [B, C, F, H, W]."""
    v = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    b, f = x.shape[0], x.shape[2]
    if v.dim() == 0:
        return v
    if v.dim() == 1 and v.shape[0] == b:
        return v.reshape(b, 1, 1, 1, 1)
    if v.dim() == 2 and tuple(v.shape) == (b, f):
        return v.reshape(b, 1, f, 1, 1)
    raise ValueError(f"{name} must be a scalar, [B] = [{b}] or [B, F] = [{b}, {f}], got shape {tuple(v.shape)}")


def _masked_mean(sq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `sq` [B, C, F, H, W] over all elements, or over the elements of the frames where `mask` [B, F] is True."""
    if mask is None:
        return sq.mean()
    b, c, f, h, w = sq.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, f):
        raise ValueError(f"mask must be a bool [B, F] = [{b}, {f}] tensor, got {mask.dtype} {tuple(mask.shape)}")
    frames = int(mask.sum())
    if frames == 0:
        raise ValueError("mask selects no frame: the loss would average over nothing")
    keep = mask.to(sq.device).reshape(b, 1, f, 1, 1)
    return torch.where(keep, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sum() / (frames * c * h * w)


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_cond_x0: torch.Tensor,
                 real_uncond_x0: torch.Tensor | None, guidance_scale: float, chunk_frames: int) -> torch.Tensor:
    """DMD direction (float64, no grad): (fake - real) / mean|x - real| per sample and chunk, real = c + s(c - u).

    The mean runs over (C, chunk frames, H, W); NaN/inf (e.g. 0/0 where real == x) become 0 (spec 6.4 steps 4-5).
    `real_uncond_x0` may be None only when `guidance_scale` is 0.
    """
    for name, t in (("x", x), ("fake_x0", fake_x0), ("real_cond_x0", real_cond_x0)):
        _check_latent(name, t)
        if t.shape != x.shape:
            raise ValueError(f"dmd_gradient: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}")
    if real_uncond_x0 is None:
        if guidance_scale != 0:
            raise ValueError(f"dmd_gradient: real_uncond_x0 is None but guidance_scale is {guidance_scale}")
    elif real_uncond_x0.shape != x.shape:
        raise ValueError(f"dmd_gradient: real_uncond_x0 has shape {tuple(real_uncond_x0.shape)}, x has {tuple(x.shape)}")
    b, c, f, h, w = x.shape
    if chunk_frames < 1 or f % chunk_frames:
        raise ValueError(f"dmd_gradient: {f} latent frames are not whole chunks of {chunk_frames} frames")
    with torch.no_grad():
        x64, fake, cond = x.double(), fake_x0.double(), real_cond_x0.double()
        real = cond if real_uncond_x0 is None else cond + guidance_scale * (cond - real_uncond_x0.double())
        k = f // chunk_frames
        scale = (x64 - real).abs().reshape(b, c, k, chunk_frames, h, w).mean(dim=(1, 3, 4, 5))  # [B, K]
        scale = scale.repeat_interleave(chunk_frames, dim=1).reshape(b, 1, f, 1, 1)
        grad = (fake - real) / scale
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_generator_loss(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mean((x - stopgrad(x - grad))^2) in float64; its gradient w.r.t. x is grad / numel (spec 6.4 step 6).

    `mask` [B, F] bool (True = frame counts, e.g. False for the I2V image frame) averages over those frames only.
    """
    _check_latent("x", x)
    if grad.shape != x.shape:
        raise ValueError(f"dmd_generator_loss: grad has shape {tuple(grad.shape)}, x has {tuple(x.shape)}")
    x64 = x.double()
    target = (x64 - grad.double()).detach()
    return 0.5 * _masked_mean((x64 - target) ** 2, mask)


def critic_flow_loss(x_t: torch.Tensor, fake_x0: torch.Tensor, x: torch.Tensor, noise: torch.Tensor,
                     sigma: torch.Tensor | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Critic flow loss mean(((x_t - fake_x0)/sigma - (noise - x))^2), float64, unweighted (spec 6.5).

    `sigma` is per frame [B, F], per sample [B] or a scalar, all > 0; `mask` as in `dmd_generator_loss`.
    Only `fake_x0` (the critic's prediction) receives gradient; x_t, x and noise are treated as constants.
    """
    for name, t in (("x_t", x_t), ("fake_x0", fake_x0), ("x", x), ("noise", noise)):
        _check_latent(name, t)
        if t.shape != x_t.shape:
            raise ValueError(f"critic_flow_loss: {name} has shape {tuple(t.shape)}, x_t has {tuple(x_t.shape)}")
    s = _per_frame("sigma", sigma, x_t)
    if not bool((s > 0).all()):
        raise ValueError(f"critic_flow_loss: sigma must be > 0 everywhere (v = (x_t - x0)/sigma), got min {float(s.min())}")
    v = (x_t.detach().double() - fake_x0.double()) / s
    target = noise.detach().double() - x.detach().double()
    return _masked_mean((v - target) ** 2, mask)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - sigma * v, computed in float64 and returned in the dtype of (x_t, v); sigma scalar, [B] or [B, F].

    Converts the velocity output of every score network (student, teacher, critic) to an x0 prediction.
    """
    _check_latent("x_t", x_t)
    if v.shape != x_t.shape:
        raise ValueError(f"x0_from_velocity: v has shape {tuple(v.shape)}, x_t has {tuple(x_t.shape)}")
    s = _per_frame("sigma", sigma, x_t)
    return (x_t.double() - s * v.double()).to(torch.result_type(x_t, v))
