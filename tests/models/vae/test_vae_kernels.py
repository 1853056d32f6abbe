"""The decoder's fused RMS norm + SiLU Triton kernel (`longlive.models.vae.kernels`) against the eager ops
it replaces (`layers.rms_silu`): under the Triton interpreter on CPU (a child process run by the
`interpreter_results` fixture) and on CUDA."""
from __future__ import annotations

import json
import os

import pytest
import torch

from longlive.models.vae import kernels
from longlive.models.vae.layers import rms_silu

RESULT_TAG = "VAE_KERNEL_RESULTS "
CHANNELS = [16, 96, 128]  # 96: a masked, non-power-of-two row


def _case(c: int, device: str) -> dict:
    g = torch.Generator().manual_seed(c)
    x = (3 * torch.randn(1, c, 3, 5, 7, generator=g)).to(device, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    gamma = (torch.rand(c, 1, 1, 1, generator=g) + 0.5).to(device, torch.bfloat16)
    want = rms_silu(x, gamma, c**0.5)
    got = kernels.rms_silu_channels_last(x, gamma, c**0.5)
    steps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    return {"max_steps": int(steps.max()), "equal_fraction": float((got == want).float().mean()),
            "channels_last": got.is_contiguous(memory_format=torch.channels_last_3d)}


def _child() -> dict:
    return {str(c): _case(c, "cpu") for c in CHANNELS}


@pytest.mark.parametrize("c", CHANNELS)
def test_kernel_equals_the_eager_norm_and_silu(interpreter_results: dict, c: int) -> None:
    r = interpreter_results[str(c)]
    assert r["max_steps"] == 0 and r["channels_last"], r  # bit-exact under the interpreter


def test_supported_inputs_and_errors() -> None:
    x = torch.randn(1, 8, 2, 3, 4).to(torch.bfloat16)
    assert not kernels.supported(x.contiguous(memory_format=torch.channels_last_3d).float())
    assert not kernels.supported(x)  # not channels-last (and, without the interpreter, not CUDA)
    with pytest.raises(ValueError, match="needs a bfloat16 channels-last 5-D tensor"):
        kernels.rms_silu_channels_last(x, torch.ones(8), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("c", CHANNELS + [1024])
def test_kernel_on_cuda(c: int) -> None:
    pytest.importorskip("triton")
    r = _case(c, "cuda")
    assert r["max_steps"] <= 1 and r["equal_fraction"] > 0.99 and r["channels_last"], r  # exp and sum order


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does this)")
    print(RESULT_TAG + json.dumps(_child()), flush=True)
