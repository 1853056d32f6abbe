"""Flow-matching noise schedules (spec 3.2 and 5.1).

Convention: x_t = (1 - sigma) * x0 + sigma * eps, timestep t = 1000 * sigma, the model predicts the
velocity v = eps - x0, so x0 = x_t - sigma * v. `shift` warps sigma: s -> shift*s / (1 + (shift-1)*s).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def shift_sigma(sigma, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class SamplingSchedule:
    """Timesteps (int, given to the model) and sigmas (fp32, N+1 with the final 0) of an N-step sampler."""

    timesteps: torch.Tensor  # [N] int64
    sigmas: torch.Tensor  # [N + 1] float32, last = 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def sampling_schedule(num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> SamplingSchedule:
    """The FlowUniPC inference schedule: 4 steps -> t = 999, 937, 833, 624; 2 steps -> 999, 833.

    sigma_max is the largest sigma of the 1000-step base grid (0.999 rounded to fp32); the base
    sigmas are linspace(sigma_max, 0, N+1)[:-1] in float64, shifted, timesteps truncated to int.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)[::-1]
    sigma_max = float(np.float32(1.0 - alphas[0]))
    sigmas = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
    sigmas = shift_sigma(sigmas, shift)
    timesteps = torch.from_numpy((sigmas * num_train_timesteps).astype(np.int64))
    return SamplingSchedule(timesteps, torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)))


class TrainingSchedule:
    """The 1000-step flow-matching training schedule with shift (spec 5.1), its noising and loss weight.

    sigma_i = shift*s_i / (1 + (shift-1)*s_i), s_i = 1 - i/1000 (i = 0..999), t_i = 1000*sigma_i.
    The loss weight is a Gaussian bump exp(-2((t-500)/1000)^2) over the t_i, shifted to min 0 and
    scaled to mean 1, looked up at the nearest t_i.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        n = num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1)[:-1]
        self.num_train_timesteps = n
        self.sigmas = shift_sigma(s, shift)
        self.timesteps = self.sigmas * n
        y = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        y = y - y.min()
        self.weights = y * (n / y.sum())

    def index_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Index of the nearest schedule timestep for each entry of `timestep`."""
        ts = self.timesteps.to(timestep.device)
        return (timestep.float()[..., None] - ts).abs().argmin(-1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(timestep.device)[self.index_of(timestep)]

    def weight(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.weights.to(timestep.device)[self.index_of(timestep)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps; `timestep` broadcasts from the left over `[B, F]` latents `[B, F, ...]`."""
        sigma = self.sigma(timestep).to(x0.dtype)
        sigma = sigma.reshape(sigma.shape + (1,) * (x0.dim() - sigma.dim()))
        return (1 - sigma) * x0 + sigma * noise

    def sample_indices(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform timestep indices in [0, 1000)."""
        return torch.randint(0, self.num_train_timesteps, shape, generator=generator, device=device)
