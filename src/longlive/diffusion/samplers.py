"""Few-step flow samplers: FlowUniPC (the reference's inference solver, spec 3.2) and Euler.

Both are stateful over one chunk: create (or `reset()`) per chunk, then for each of `timesteps`
evaluate the model at the current sample and call `step(velocity, sample)`. Coefficients are
computed in float64 from the fp32 sigmas; tensor arithmetic stays in the latent dtype.
"""
from __future__ import annotations

import math

import torch

from .schedule import SamplingSchedule, sampling_schedule


class _FlowSampler:
    def __init__(self, num_steps: int, shift: float = 5.0, schedule: SamplingSchedule | None = None) -> None:
        self.schedule = schedule or sampling_schedule(num_steps, shift)
        self._sigmas = [float(s) for s in self.schedule.sigmas]
        self.reset()

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def step_index(self) -> int:
        return self._step

    def reset(self) -> None:
        self._step = 0

    def sigma(self, index: int | None = None) -> float:
        return self._sigmas[self._step if index is None else index]

    def x0(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 estimate at the current step: x_t - sigma * v."""
        return sample - self.sigma() * velocity

    def _check(self) -> None:
        if self._step >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__}: all {self.num_steps} steps are done; call reset() for the next chunk")


class FlowEulerSampler(_FlowSampler):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i."""

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check()
        i = self._step
        self._step += 1
        return sample + (self._sigmas[i + 1] - self._sigmas[i]) * velocity


def _lambda(sigma: float) -> float:
    """log-SNR of flow matching: log(1 - sigma) - log(sigma) (+inf at sigma = 0)."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


class FlowUniPCSampler(_FlowSampler):
    """UniPC multistep (bh2, order 2, x0 prediction, UniC corrector after the first step, lower order
    at the final step) on flow sigmas. The last step goes to sigma = 0 and returns the x0 estimate."""

    def reset(self) -> None:
        super().reset()
        self._m: list[torch.Tensor] = []  # x0 estimates m_0 .. m_i (last two kept)
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check()
        i = self._step
        m_i = sample - self._sigmas[i] * velocity
        if i > 0:  # UniC corrector of the sample predicted at the previous step
            sample = self._corrector(m_i, i, self._last_order)
        self._m = (self._m + [m_i])[-3:]
        order = min(2, self.num_steps - i, i + 1)
        self._last_sample, self._last_order = sample, order
        self._step += 1
        return self._predictor(sample, i, order)

    def _coeffs(self, s_to: float, s_from: float):
        lam_to, lam_from = _lambda(s_to), _lambda(s_from)
        h = lam_to - lam_from
        phi = math.expm1(-h)  # h*phi_1(h) and B(h) for bh2 (x0 prediction uses hh = -h)
        return h, phi, 1.0 - s_to

    def _predictor(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        s_from, s_to = self._sigmas[i], self._sigmas[i + 1]
        h, phi, alpha_to = self._coeffs(s_to, s_from)
        m0 = self._m[-1]
        out = (s_to / s_from) * x - (alpha_to * phi) * m0
        if order == 2:
            r = (_lambda(self._sigmas[i - 1]) - _lambda(s_from)) / h
            d1 = (self._m[-2] - m0) / r
            out = out - (alpha_to * phi * 0.5) * d1
        return out

    def _corrector(self, m_new: torch.Tensor, i: int, order: int) -> torch.Tensor:
        s_from, s_to = self._sigmas[i - 1], self._sigmas[i]
        h, phi, alpha_to = self._coeffs(s_to, s_from)
        m0 = self._m[-1]
        x = self._last_sample
        out = (s_to / s_from) * x - (alpha_to * phi) * m0
        if order == 1:
            return out - (alpha_to * phi * 0.5) * (m_new - m0)
        hh = -h
        g1 = phi / hh - 1.0
        g2 = g1 / hh - 0.5
        r = (_lambda(self._sigmas[i - 2]) - _lambda(s_from)) / h
        b0, b1 = g1 / phi, 2.0 * g2 / phi
        # [[1, 1], [r, 1]] @ [rho0, rho1] = [b0, b1]
        rho0 = (b0 - b1) / (1.0 - r)
        rho1 = b0 - rho0
        d1 = (self._m[-2] - m0) / r
        return out - (alpha_to * phi) * (rho0 * d1 + rho1 * (m_new - m0))


SAMPLERS = {"unipc": FlowUniPCSampler, "euler": FlowEulerSampler}


def make_sampler(name: str, num_steps: int, shift: float = 5.0) -> _FlowSampler:
    """A sampler by name (`unipc` as in the reference, or `euler`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](num_steps, shift)
