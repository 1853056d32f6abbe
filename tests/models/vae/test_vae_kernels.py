"""The decoder's Triton kernels (`longlive.models.vae.kernels`: RMS norm + SiLU, with a convolution's bias
and into a slice of rows; bias + residual add) against the eager ops they replace, and a residual block
with them against the eager block: under the Triton interpreter on CPU (a child process run by the
`interpreter_results` fixture) and on CUDA."""
from __future__ import annotations

import json
import os

import pytest
import torch

from longlive.models.vae import kernels
from longlive.models.vae.layers import FeatureCache, ResidualBlock, rms_silu

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


def _steps(got: torch.Tensor, want: torch.Tensor) -> int:
    return int((got.float().view(torch.int32) - want.float().view(torch.int32)).abs().max()) >> 16


def _bias_cases(c: int, device: str) -> dict:
    """The norm with a bias and into a slice of rows of a larger tensor; bias + residual add."""
    g = torch.Generator().manual_seed(100 + c)
    cl = torch.channels_last_3d
    x = (3 * torch.randn(2, c, 3, 5, 7, generator=g)).to(device, torch.bfloat16).contiguous(memory_format=cl)
    h = torch.randn(2, c, 3, 5, 7, generator=g).to(device, torch.bfloat16).contiguous(memory_format=cl)
    bias = torch.randn(c, generator=g).to(device, torch.bfloat16)
    gamma = (torch.rand(c, 1, 1, 1, generator=g) + 0.5).to(device, torch.bfloat16)
    want = rms_silu(x + bias.view(1, c, 1, 1, 1), gamma, c**0.5)
    big = torch.full((2, c, 3, 9, 7), 7.0, dtype=torch.bfloat16, device=device).contiguous(memory_format=cl)
    kernels.rms_silu_channels_last(x, gamma, c**0.5, bias=bias, out=big[..., 2:7, :])
    added = kernels.bias_residual_add(x.clone(), bias, h)
    return {"bias_steps": _steps(kernels.rms_silu_channels_last(x, gamma, c**0.5, bias=bias), want),
            "slice_steps": _steps(big[..., 2:7, :], want),
            "outside_kept": bool((big[..., :2, :] == 7).all() and (big[..., 7:, :] == 7).all()),
            "add_steps": _steps(added, (x + bias.view(1, c, 1, 1, 1)) + h),
            "add_channels_last": added.is_contiguous(memory_format=cl)}


def _block_case(device: str) -> dict:
    """A residual block (channel change: a shortcut conv) with the kernels against the eager block."""
    torch.manual_seed(5)
    block = ResidualBlock(16, 32).eval().to(device, torch.bfloat16)
    for m in block.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            m.channels_last = True
    x = torch.randn(1, 16, 2, 6, 5, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        eager = block(x, FeatureCache())
        block.fused_norms = True
        fused = block(x, FeatureCache())
    d = (fused.float() - eager.float()).abs()
    return {"max_rel": float(d.max() / eager.float().abs().max()), "shape": list(fused.shape),
            "channels_last": fused.is_contiguous(memory_format=torch.channels_last_3d)}


def _child() -> dict:
    out = {str(c): _case(c, "cpu") for c in CHANNELS}
    out.update({f"bias{c}": _bias_cases(c, "cpu") for c in CHANNELS})
    out["block"] = _block_case("cpu")
    return out


@pytest.mark.parametrize("c", CHANNELS)
def test_kernel_equals_the_eager_norm_and_silu(interpreter_results: dict, c: int) -> None:
    r = interpreter_results[str(c)]
    assert r["max_steps"] == 0 and r["channels_last"], r  # bit-exact under the interpreter


@pytest.mark.parametrize("c", CHANNELS)
def test_bias_and_row_slices_equal_the_eager_ops(interpreter_results: dict, c: int) -> None:
    r = interpreter_results[f"bias{c}"]
    assert r["bias_steps"] == 0 and r["slice_steps"] == 0 and r["add_steps"] == 0, r  # bit-exact
    assert r["outside_kept"] and r["add_channels_last"], r  # a slice is written and nothing else


def test_fused_residual_block_equals_the_eager_block(interpreter_results: dict) -> None:
    # on the CPU the eager convolution adds its bias before rounding to bf16, the fused block after it
    # (as cuDNN's separate bias add does on the GPU); a bf16 step there passes through the second conv
    r = interpreter_results["block"]
    assert r["max_rel"] < 1e-2 and r["shape"] == [1, 32, 2, 6, 5] and r["channels_last"], r


def test_supported_inputs_and_errors() -> None:
    x = torch.randn(1, 8, 2, 3, 4).to(torch.bfloat16)
    assert not kernels.supported(x.contiguous(memory_format=torch.channels_last_3d).float())
    assert not kernels.supported(x)  # not channels-last (and, without the interpreter, not CUDA)
    with pytest.raises(ValueError, match="needs a bfloat16 channels-last 5-D tensor"):
        kernels.rms_silu_channels_last(x, torch.ones(8), 1.0)
    with pytest.raises(ValueError, match="bias_residual_add: needs bfloat16 channels-last"):
        kernels.bias_residual_add(x, torch.ones(8), x)


@pytest.mark.gpu
@pytest.mark.parametrize("c", CHANNELS + [1024])
def test_kernel_on_cuda(c: int) -> None:
    pytest.importorskip("triton")
    r = _case(c, "cuda")
    assert r["max_steps"] <= 1 and r["equal_fraction"] > 0.99 and r["channels_last"], r  # exp and sum order
    b = _bias_cases(c, "cuda")
    assert b["bias_steps"] <= 1 and b["slice_steps"] <= 1 and b["add_steps"] == 0 and b["outside_kept"], b


@pytest.mark.gpu
def test_fused_residual_block_on_cuda() -> None:
    pytest.importorskip("triton")
    r = _block_case("cuda")  # cuDNN adds the bias in a separate pass too: the norm's exp and sum order
    assert r["max_rel"] < 1e-2 and r["channels_last"], r


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does this)")
    print(RESULT_TAG + json.dumps(_child()), flush=True)
