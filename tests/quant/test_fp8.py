"""Row-wise FP8 W8A8 linears: quantization numerics by hand, error bounds, Wan conversion (spec 3.7), errors.

bf16 references are computed in fp32 from bf16-rounded tensors: bf16 GEMMs crash this CI CPU's oneDNN.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longlive.models.wan.config import WanConfig
from longlive.models.wan.model import WanModel
from longlive.quant.filters import FP8_KEPT_BF16, ModuleFilter
from longlive.quant.fp8 import E4M3_MAX, Float8Linear, convert_to_fp8, quantize_rowwise, scaled_mm_emulated, to_e4m3_saturated

TINY = WanConfig.preset("tiny")
# Measured on CPU (seeds 0-4): one linear 3.50-3.69 % relative Frobenius error (fp32 and bf16 inputs, K 64..3072);
# the tiny Wan denoiser output 0.56-0.60 %. Bounds sit a bit above.
LINEAR_REL_BOUND = 0.045
TINY_WAN_REL_BOUND = 0.01


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _e4m3_nearest(v: float) -> float:
    """Round one value to e4m3 by hand: nearest point of the finite grid, ties to the even code, saturating at 448."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double().tolist()  # codes 0..126, 0..448
    a = min(abs(v), E4M3_MAX)
    best = min(range(len(grid)), key=lambda c: (abs(grid[c] - a), c % 2))
    return math.copysign(grid[best], v) if grid[best] else 0.0


def _hand_quantize(x: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """Per-row scale = max|row| / 448 (1 for a zero row) and the e4m3 codes of row / scale, in Python floats."""
    rows, scales = [], []
    for row in x.double().tolist():
        amax = max(abs(v) for v in row)
        s = float(torch.tensor(amax / E4M3_MAX, dtype=torch.float32)) if amax > 0 else 1.0
        scales.append(s)
        rows.append([_e4m3_nearest(v / s) for v in row])
    return rows, scales


def _linear(k: int, n: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    bound = math.sqrt(6.0 / (k + n))  # the Wan block initialisation
    nn.init.uniform_(lin.weight, -bound, bound)
    if bias:
        nn.init.normal_(lin.bias, 0.0, 0.02)
    return lin


def _wan_inputs(cfg: WanConfig = TINY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_dim, 4, 4, 6, generator=g)
    t = torch.rand(2, 4, generator=g) * 1000
    return x, t, torch.randn(2, 10, cfg.text_dim, generator=g)


# ------------------------------------------------------------------ quantization numerics
def test_e4m3_cast_saturates_instead_of_nan():
    t = torch.tensor([500.0, -1e6, 470.0, -460.0, 448.0, float("inf"), -float("inf"), 17.0, 19.0, 2**-10, 3 * 2**-10])
    got = to_e4m3_saturated(t).double().tolist()
    assert got == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0, -448.0, 16.0, 20.0, 0.0, 2**-8]
    assert got == [_e4m3_nearest(v) for v in t.double().tolist()]


def test_quantize_rowwise_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g) * torch.tensor([1.0, 1e-3, 50.0, 1.0, 1.0, 1.0])[:, None]
    x[3] = 0.0  # all-zero row: scale 1, codes 0
    x[4] = -x[4].abs()  # all negative: the row max maps to -448
    x[5, :8] = torch.tensor([448.0, 17.0, 19.0, -17.0, 2**-10, 3 * 2**-10, -448.0, 0.5])  # scale exactly 1: ties
    x[5, 8:] = 0.25
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 32)
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    ref_q, ref_scale = _hand_quantize(x)
    assert scale[:, 0].tolist() == ref_scale
    assert q.double().tolist() == ref_q
    assert scale[3].item() == 1.0 and scale[5].item() == 1.0 and not q[3].double().any()
    assert q[5, :8].double().tolist() == [448.0, 16.0, 20.0, -16.0, 0.0, 2**-8, -448.0, 0.5]
    nonzero = [0, 1, 2, 4, 5]
    assert q[nonzero].double().abs().amax(dim=1).tolist() == [E4M3_MAX] * 5  # each row's max lands on 448
    assert q[4].double().min().item() == -E4M3_MAX
    assert q.double().abs().max().item() <= E4M3_MAX


def test_quantize_rowwise_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rowwise(torch.ones(2, 3, 16))


def test_from_linear_weight_is_quantized_per_output_row():
    lin = _linear(32, 48, seed=0)
    with torch.no_grad():
        lin.weight[7] = 0.0
        lin.weight[9] *= 1e-4
    layer = Float8Linear.from_linear(lin)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_fp8.shape == (48, 32)
    assert layer.weight_fp8.is_contiguous() and layer.weight_fp8.t().stride() == (1, 32)  # column-major [K, N]
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (1, 48)
    ref_q, ref_scale = _hand_quantize(lin.weight.detach())
    assert layer.weight_fp8.double().tolist() == ref_q
    assert layer.weight_scale[0].tolist() == ref_scale
    assert layer.weight_scale[0, 7].item() == 1.0
    torch.testing.assert_close(layer.bias, lin.bias, rtol=0, atol=0)
    assert "fp8 rowwise" in repr(layer) and not layer.use_scaled_mm and "gemm=fp32 emulation" in repr(layer)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_hand_dequantized_matmul_with_batch_dims(bias: bool):
    lin = _linear(64, 32, seed=1, bias=bias)
    layer = Float8Linear.from_linear(lin)
    x = torch.randn(2, 3, 5, 64)
    x[0, 1, 2] = 0.0  # a zero token
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 3, 5, 32) and out.dtype == torch.float32
    qx, sx = _hand_quantize(x.reshape(-1, 64))
    qw, sw = _hand_quantize(lin.weight.detach())
    xd = torch.tensor(qx, dtype=torch.float64) * torch.tensor(sx, dtype=torch.float64)[:, None]
    wd = torch.tensor(qw, dtype=torch.float64) * torch.tensor(sw, dtype=torch.float64)[:, None]
    ref = xd @ wd.t() + (lin.bias.detach().double() if bias else 0.0)
    torch.testing.assert_close(out.reshape(-1, 32).double(), ref, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(out[0, 1, 2], lin.bias.detach(), rtol=0, atol=0)  # zero token -> exactly the bias


def test_scaled_mm_emulated_applies_scales_then_bias():
    x8 = torch.tensor([[1.0, 2.0], [0.5, -4.0]]).to(torch.float8_e4m3fn)
    w8 = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]]).to(torch.float8_e4m3fn)
    sx, sw = torch.tensor([[2.0], [0.5]]), torch.tensor([[1.0, 10.0, 0.25]])
    bias = torch.tensor([1.0, 0.0, -1.0])
    out = scaled_mm_emulated(x8, sx, w8, sw, bias, torch.float32)
    assert out.tolist() == [[3.0, 80.0, -2.0], [1.25, -15.0, -0.5]]


@pytest.mark.parametrize("shape", [(64, 128), (256, 512), (3072, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_vs_high_precision_linear(shape: tuple[int, int], dtype: torch.dtype):
    k, n = shape
    lin = _linear(k, n, seed=2).to(dtype)
    layer = Float8Linear.from_linear(lin)
    x = torch.randn(300, k).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    err = _rel(out, ref)
    assert 0.02 < err < LINEAR_REL_BOUND  # e4m3 rounding is visible, and bounded


# ------------------------------------------------------------------ module behaviour
def test_grad_mode_call_is_an_error():
    layer = Float8Linear.from_linear(_linear(32, 16, seed=0))
    x = torch.randn(4, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (4, 16)
    with torch.inference_mode():
        assert layer(x.detach()).shape == (4, 16)
    assert not layer(x.detach()).requires_grad  # grad mode on, input without grad: fine


def test_wrong_input_width_and_unaligned_features_are_errors():
    layer = Float8Linear.from_linear(_linear(32, 16, seed=0))
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        layer(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8Linear.from_linear(nn.Linear(20, 32))
    with pytest.raises(TypeError, match="nn.Linear"):
        Float8Linear.from_linear(nn.Conv1d(16, 16, 1))


def test_model_cast_keeps_fp8_weight_and_fp32_scales():
    layer = Float8Linear.from_linear(_linear(32, 16, seed=0))
    w8, scale = layer.weight_fp8.clone(), layer.weight_scale.clone()
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = layer(x)
    layer.to(torch.bfloat16)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_fp8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the model
    with torch.no_grad():
        out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 0.01


def test_state_dict_round_trip():
    layer = Float8Linear.from_linear(_linear(32, 16, seed=0))
    sd = layer.state_dict()
    assert set(sd) == {"weight_fp8", "weight_scale", "bias"} and sd["weight_fp8"].dtype == torch.float8_e4m3fn
    fresh = Float8Linear.from_linear(_linear(32, 16, seed=5))
    fresh.load_state_dict(sd)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_compiles_without_graph_breaks():
    layer = Float8Linear.from_linear(_linear(64, 32, seed=0))
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_scaled_mm_branch_matches_emulation_on_torch_cpu_kernel():
    """The `_scaled_mm` call as written (operand layout, scale shapes, bias dtype), run on torch's CPU kernel."""
    layer = Float8Linear.from_linear(_linear(64, 32, seed=0)).to(torch.bfloat16)
    x = torch.randn(3, 7, 64).bfloat16()  # M = 21, not a multiple of 16
    x8, sx = quantize_rowwise(x.reshape(-1, 64))
    try:
        torch._scaled_mm(x8, layer.weight_fp8.t(), sx, layer.weight_scale, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU row-wise _scaled_mm: {e}")
    with torch.no_grad():
        emu = layer(x)
        layer.use_scaled_mm = True
        out = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, emu, rtol=2**-7, atol=1e-3 * emu.float().abs().max().item())
    assert torch.equal(compiled, out)


# ------------------------------------------------------------------ model conversion
def test_convert_tiny_wan_keeps_the_six_and_stays_close(caplog):
    torch.manual_seed(0)
    model = WanModel(TINY).eval()
    x, t, c = _wan_inputs()
    with torch.no_grad():
        ref = model(x, t, c)
    with caplog.at_level(logging.INFO, logger="longlive.quant.fp8"):
        names = convert_to_fp8(model)
    assert len(names) == 10 * TINY.num_layers
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in names)
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == set(FP8_KEPT_BF16)
    assert "converted 20 linear layers" in caplog.text and "kept 6 in high precision" in caplog.text
    with torch.no_grad():
        out = model(x, t, c)
    err = _rel(out, ref)
    assert 0.001 < err < TINY_WAN_REL_BOUND
    assert convert_to_fp8(model) == []  # idempotent: Float8Linear is not a plain nn.Linear


def test_convert_skips_unaligned_and_filtered_layers():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 20), nn.Linear(20, 32), nn.Linear(32, 32))
    names = convert_to_fp8(model, keep=ModuleFilter.from_list(["re:4"]))
    assert names == ["0"]
    assert [type(m).__name__ for m in model] == ["Float8Linear", "GELU", "Linear", "Linear", "Linear"]


def test_convert_5b_on_meta_gives_300_fp8_and_6_kept():
    with torch.device("meta"):
        model = WanModel(WanConfig.preset("wan2.2-ti2v-5b"))
    names = convert_to_fp8(model)  # quantizes the meta weights (shapes and dtypes only)
    assert len(names) == 300 and all(n.startswith("blocks.") for n in names)
    fp8 = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert len(fp8) == 300
    assert {n for n, m in model.named_modules() if type(m) is nn.Linear} == set(FP8_KEPT_BF16)
    ffn0 = model.get_submodule("blocks.0.ffn.0")
    assert ffn0.weight_fp8.is_meta and ffn0.weight_fp8.dtype == torch.float8_e4m3fn
    assert ffn0.weight_fp8.shape == (14336, 3072) and ffn0.weight_scale.shape == (1, 14336)


def test_lora_model_must_be_merged_first():
    pytest.importorskip("peft")
    from longlive.models.wan.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = apply_lora(WanModel(TINY).eval(), rank=4, alpha=4.0)
    with pytest.raises(ValueError, match="merge_lora"):
        convert_to_fp8(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())  # nothing half-converted
    assert len(convert_to_fp8(merge_lora(model))) == 20


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_path_matches_emulation(fast_accum: bool):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with compute capability >= 8.9 (FP8 tensor cores)")
    dev = torch.device("cuda")
    sat = to_e4m3_saturated(torch.tensor([500.0, -1e6, float("inf")], device=dev)).double().tolist()
    assert sat == [448.0, -448.0, 448.0]
    lin = _linear(256, 512, seed=0).to(dev)  # fp32 bias: the FP8 path casts it to bf16
    layer = Float8Linear.from_linear(lin, fast_accum=fast_accum)
    assert layer.use_scaled_mm and "gemm=_scaled_mm" in repr(layer)
    for m in (1, 7, 16, 333, 2048):  # M need not be a multiple of 16
        x = torch.randn(m, 256, device=dev).bfloat16()
        with torch.no_grad():
            out = layer(x)
        x8, sx = quantize_rowwise(x)
        emu = scaled_mm_emulated(x8, sx, layer.weight_fp8, layer.weight_scale, layer.bias.bfloat16(), torch.bfloat16)
        assert out.dtype == torch.bfloat16 and out.shape == (m, 512)
        if fast_accum:
            assert _rel(out, emu) < 1e-2
        else:  # fp32 sums in another order, then one bf16 rounding each
            torch.testing.assert_close(out, emu, rtol=2**-7, atol=1e-3 * emu.float().abs().max().item())
    with torch.no_grad():
        x = torch.randn(3, 5, 256, device=dev).bfloat16()
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=2**-6, atol=1e-2)
        with pytest.raises(ValueError, match="bf16 or fp16"):
            layer(x.float())
