"""Exponential moving average of the trainable parameters, in fp32, sharded like the parameters.

Under FSDP2 each rank keeps the EMA of its own parameter shards (no gather to one host, unlike the
reference's full CPU copy, spec 5.7); `state_dict()` returns the sharded tensors for the checkpoint
and `full_state()` gathers them for export.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow = decay * shadow + (1 - decay) * param."""
        params = dict(model.named_parameters())
        shadows = [_local(s) for s in self.shadow.values()]
        current = [_local(params[n]).float() for n in self.shadow]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, s in self.shadow.items():
                _local(s).copy_(_local(state[n]))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `model` (e.g. for evaluation); restored on exit."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            backup = {n: _local(params[n]).detach().clone() for n in self.shadow}
            for n, s in self.shadow.items():
                _local(params[n]).copy_(_local(s))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, b in backup.items():
                    _local(params[n]).copy_(b)
