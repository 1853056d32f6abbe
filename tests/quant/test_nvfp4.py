"""Tests of the NVFP4 reference implementation (longlive.quant.nvfp4)."""

from __future__ import annotations

import pytest
import torch

from longlive.quant import nvfp4 as nv

ALL_RULES = ["static_6", "static_4", "mse", "mae", "abs_max"]
GRID = list(nv.E2M1_VALUES)


def _codes(q: nv.NVFP4Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return q.codes()[:rows, :cols]


def _element_scales(q: nv.NVFP4Tensor) -> torch.Tensor:
    """float32 block scale of every element, [rows, cols]."""
    rows, cols = q.shape
    return q.scale_matrix().float().repeat_interleave(16, dim=1)[:rows, :cols]


# ------------------------------------------------------------------------------------------------
# Element coding


def test_every_e2m1_value_and_its_negative_round_trip() -> None:
    x = torch.tensor([GRID + [-v for v in GRID]], dtype=torch.float32)
    q = nv.quantize(x, "static_6")
    expected = list(range(8)) + [0] + list(range(9, 16))  # -0.0 gets code 0
    assert _codes(q)[0].tolist() == expected
    torch.testing.assert_close(nv.dequantize(q), x, rtol=1e-6, atol=0)


def test_round_half_even_ties_and_saturation() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert nv.round_to_e2m1_codes(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert nv.round_to_e2m1_codes(-ties).tolist() == [0, 10, 10, 12, 12, 14, 14]
    just_above = torch.nextafter(ties, torch.full_like(ties, 10.0))
    assert nv.round_to_e2m1_codes(just_above).tolist() == [1, 2, 3, 4, 5, 6, 7]
    big = torch.tensor([6.0, 6.5, 7.0, 8.0, 1e6, -7.0, -1e30])
    assert nv.round_to_e2m1_codes(big).tolist() == [7, 7, 7, 7, 7, 15, 15]


def test_negative_zero_and_small_negatives_get_code_zero() -> None:
    x = torch.tensor([-0.0, -0.1, -0.25, 0.0, 0.1])
    assert nv.round_to_e2m1_codes(x).tolist() == [0, 0, 0, 0, 0]
    assert nv.stochastic_round_to_e2m1_codes(x, torch.zeros_like(x)).tolist() == [0, 0, 0, 0, 0]


def test_stochastic_rounding_stays_on_grid_and_saturates() -> None:
    a = torch.tensor([7.0, 100.0, -9.0, 6.0, 5.999])
    for u in (0.0, 0.5, 0.9999999):
        codes = nv.stochastic_round_to_e2m1_codes(a, torch.full_like(a, u))
        assert codes[:4].tolist() == [7, 7, 15, 7]
        assert codes[4].item() in (6, 7)


def test_quantize_hits_exact_ties_and_subnormal() -> None:
    # amax 5.25 makes decode = 5.25 / 2688 = 2^-9 exact; block max 3.0 gives scale 256 so the
    # scaled values are exactly 2*x and the ties below are exact ties.
    tie_x = [0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5]  # scaled: 0.25 0.75 ... 5
    row = [5.25] + [0.0] * 15 + tie_x + [-v for v in tie_x] + [3.0, 0.25]
    x = torch.tensor([row])
    q = nv.quantize(x, "static_6")
    assert q.scale_matrix()[0, 1].float().item() == 256.0
    assert nv.tensor_scales(q.amax, "static_6").decode.item() == 2.0**-9
    expected = [0, 2, 2, 4, 4, 6, 6, 0, 10, 10, 12, 12, 14, 14, 7, 1]
    assert _codes(q)[0, 16:].tolist() == expected
    assert nv.dequantize(q)[0, 31].item() == 0.25  # subnormal E2M1 0.5 * scale 0.5


def test_zero_blocks_and_all_zero_tensor() -> None:
    x = torch.zeros(20, 48)
    x[3, 17] = 2.0
    q = nv.quantize(x, "mse")
    scales = q.scale_matrix().float()
    assert scales[3, 1] > 0
    assert int((scales != 0).sum()) == 1
    assert int((_codes(q) != 0).sum()) == 1
    for rule in ALL_RULES:
        qz = nv.quantize(torch.zeros(5, 40), rule)
        assert qz.amax.item() == 0.0
        assert int(qz.values.count_nonzero()) == 0
        assert int(qz.scale_factors.view(torch.uint8).count_nonzero()) == 0
        out = nv.dequantize(qz)
        assert torch.equal(out, torch.zeros(5, 40))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad: float) -> None:
    x = torch.randn(4, 32)
    x[1, 2] = bad
    x[3, 0] = bad
    with pytest.raises(ValueError, match=r"shape \(4, 32\).*2 of 128 values are not finite"):
        nv.quantize(x)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown NVFP4 scale rule"):
        nv.quantize(torch.randn(2, 16), "static_5")
    with pytest.raises(ValueError, match="2-D"):
        nv.quantize(torch.randn(16))
    with pytest.raises(TypeError, match="floating"):
        nv.quantize(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="Generator"):
        nv.quantize(torch.randn(2, 16), round="stochastic")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nv.quantize(torch.randn(2, 16), round="stochastic", uniform=torch.ones(2, 16))
    with pytest.raises(ValueError, match="shape"):
        nv.quantize(torch.randn(2, 16), round="stochastic", uniform=torch.rand(2, 17))


# ------------------------------------------------------------------------------------------------
# Packing and layout


def test_nibble_order() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = nv.pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(nv.unpack_e2m1(packed), codes)
    # through quantize: x = [0.5, 1, ...] at scale 1 gives codes 1, 2 -> byte 0x21
    x = torch.tensor([[0.5, 1.0] + [0.0] * 13 + [6.0]])
    assert nv.quantize(x).values[0, 0].item() == 0x21


@pytest.mark.parametrize(
    "row,col",
    [(0, 0), (1, 0), (0, 1), (31, 3), (32, 0), (33, 2), (127, 3), (128, 0), (130, 5), (255, 7), (200, 6)],
)
def test_blocked_scale_index_matches_spec_formula(row: int, col: int) -> None:
    rows, scols = 256, 8
    s = torch.arange(rows * scols, dtype=torch.float32).reshape(rows, scols)
    flat = nv.pack_scale_factors(s)
    tile = (row // 128) * (scols // 4) + col // 4
    spec_index = (tile * 32 + row % 32) * 16 + (row % 128 // 32) * 4 + col % 4
    assert nv.blocked_scale_index(row, col, scols) == spec_index
    assert flat[spec_index].item() == s[row, col].item()


def test_blocked_scale_layout_is_a_bijection_and_round_trips() -> None:
    rows, scols = 384, 12
    idx = torch.tensor([nv.blocked_scale_index(r, c, scols) for r in range(rows) for c in range(scols)])
    assert torch.equal(idx.sort().values, torch.arange(rows * scols))
    s = torch.randn(rows, scols).to(torch.float8_e4m3fn)
    flat = nv.pack_scale_factors(s)
    assert torch.equal(flat.view(torch.uint8)[idx], s.reshape(-1).view(torch.uint8))
    back = nv.unpack_scale_factors(flat, rows, scols)
    assert torch.equal(back.view(torch.uint8), s.view(torch.uint8))
    with pytest.raises(ValueError, match="padded"):
        nv.pack_scale_factors(torch.zeros(100, 4))


def test_padding_and_storage_shapes() -> None:
    q = nv.quantize(torch.randn(130, 70))
    assert q.shape == (130, 70)
    assert q.padded_shape == (256, 128)
    assert q.values.shape == (256, 64)
    assert q.scale_factors.shape == (256 * 8,)
    assert q.metadata.tolist() == [130, 70, 256, 128]
    assert nv.dequantize(q).shape == (130, 70)


# ------------------------------------------------------------------------------------------------
# Accuracy and scale rules

ERROR_BOUNDS = {"static_6": 0.105, "static_4": 0.11, "mse": 0.095, "mae": 0.095, "abs_max": 0.097}


@pytest.mark.parametrize("rule", ALL_RULES)
def test_quantize_dequantize_relative_error(rule: str) -> None:
    x = torch.randn(256, 256)
    rel = ((nv.dequantize(nv.quantize(x, rule)) - x).norm() / x.norm()).item()
    assert 0.05 < rel < ERROR_BOUNDS[rule]  # measured: 0.095 0.098 0.087 0.088 0.089
    rel2d = ((nv.dequantize(nv.quantize(x, rule, block_2d=True)) - x).norm() / x.norm()).item()
    assert 0.05 < rel2d < 0.135  # measured 0.111 .. 0.128
    if rule in nv.FOUR_OVER_SIX_RULES:
        static = ((nv.dequantize(nv.quantize(x, "static_6")) - x).norm() / x.norm()).item()
        assert rel < static


def test_dequantize_dtypes() -> None:
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    q = nv.quantize(x, "mse")
    ref = nv.dequantize(q, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert nv.dequantize(q, dtype).dtype == dtype
        assert torch.equal(nv.dequantize(q, dtype), ref.to(dtype))
    assert torch.equal(nv.fake_quantize(x, "mse"), ref.to(torch.bfloat16))


def _brute_force_candidate(block: torch.Tensor, k: torch.Tensor, dec: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Scale and float64 dequantized block of one candidate, rounding by argmin over the grid."""
    bmax = block.abs().max()
    sb = float(torch.clamp(bmax * k, max=448.0).to(torch.float8_e4m3fn).float())
    scale = torch.tensor(sb, dtype=torch.float32) * dec
    xs = block.double() / scale.double()
    grid = torch.tensor(GRID, dtype=torch.float64)
    mag = grid[(xs.abs()[:, None] - grid[None, :]).abs().argmin(dim=1)]
    return sb, torch.sign(xs) * mag * scale.double()


@pytest.mark.parametrize("rule", ["mse", "mae", "abs_max"])
def test_four_over_six_picks_the_lower_error_candidate(rule: str) -> None:
    x = torch.randn(12, 160) * torch.rand(12, 1) * 3
    q = nv.quantize(x, rule)
    ts = nv.tensor_scales(q.amax, rule)
    scales = q.scale_matrix().float()
    deq = nv.dequantize(q).double()
    picked = {6: 0, 4: 0}
    for r in range(12):
        for b in range(10):
            block = x[r, b * 16 : (b + 1) * 16]
            sb6, d6 = _brute_force_candidate(block, ts.block_encode, ts.decode)
            sb4, d4 = _brute_force_candidate(block, ts.block_encode_four, ts.decode)
            diff6, diff4 = d6 - block.double(), d4 - block.double()
            if rule == "mse":
                e6, e4 = float((diff6**2).sum()), float((diff4**2).sum())
            elif rule == "mae":
                e6, e4 = float(diff6.abs().sum()), float(diff4.abs().sum())
            else:
                e6, e4 = float(diff6.abs().max()), float(diff4.abs().max())
            chosen = scales[r, b].item()
            if abs(e6 - e4) <= 1e-6 * max(e6, e4):
                assert chosen in (sb6, sb4)  # near tie: either is acceptable
                continue
            want, want_deq = (sb4, d4) if e4 < e6 else (sb6, d6)
            picked[4 if e4 < e6 else 6] += 1
            assert chosen == want, (r, b, e6, e4)
            torch.testing.assert_close(deq[r, b * 16 : (b + 1) * 16], want_deq, rtol=1e-6, atol=1e-9)
    assert picked[4] > 5 and picked[6] > 5, picked


def test_stochastic_rounding_is_unbiased() -> None:
    n_draws = 4000
    base = torch.randn(1, 64)
    x = base.repeat(n_draws, 1)
    gen = torch.Generator().manual_seed(123)
    q = nv.quantize(x, "static_6", round="stochastic", generator=gen)
    deq = nv.dequantize(q).double()
    scale = (_element_scales(q)[0] * nv.tensor_scales(q.amax, "static_6").decode).double()
    xs = base[0].double() / scale
    free = xs.abs() <= 6.0  # saturated block maxima (scale rounded down) are clamped, not unbiased
    step = torch.where(xs.abs() < 2, 0.5, torch.where(xs.abs() < 4, 1.0, 2.0))
    stderr = scale * step / 2 / n_draws**0.5  # an upper bound on the std of the mean
    err = (deq.mean(0) - base[0].double()).abs()
    assert free.sum() > 50
    assert bool((err[free] < 5 * stderr[free]).all()), (err / stderr)[free].max()
    torch.testing.assert_close(deq[:, ~free].abs(), (6 * scale[~free]).expand(n_draws, -1), rtol=1e-6, atol=0)
    # nearest rounding of the same data is biased by far more than the stochastic mean error
    near_err = (nv.dequantize(nv.quantize(base)).double()[0] - base[0].double()).abs()
    assert err[free].mean() < near_err[free].mean() / 5


def test_stochastic_rounding_is_reproducible() -> None:
    x = torch.randn(32, 64)
    a = nv.quantize(x, "mse", round="stochastic", generator=torch.Generator().manual_seed(7))
    b = nv.quantize(x, "mse", round="stochastic", generator=torch.Generator().manual_seed(7))
    u = torch.rand(32, 64, generator=torch.Generator().manual_seed(7))
    c = nv.quantize(x, "mse", round="stochastic", uniform=u)
    assert torch.equal(a.values, b.values) and torch.equal(a.values, c.values)


@pytest.mark.parametrize("rule", ["static_6", "mse", "abs_max"])
def test_2d_blocks_quantize_w_and_wt_identically(rule: str) -> None:
    w = torch.randn(48, 80) * torch.rand(48, 1)
    qw = nv.quantize(w, rule, block_2d=True)
    qt = nv.quantize(w.T.contiguous(), rule, block_2d=True)
    assert torch.equal(_codes(qw), _codes(qt).T)
    assert torch.equal(_element_scales(qw), _element_scales(qt).T)
    assert torch.equal(nv.dequantize(qw), nv.dequantize(qt).T)
    # every 16x16 tile has a single scale
    tiles = _element_scales(qw)[:48, :80].reshape(3, 16, 5, 16)
    assert bool((tiles == tiles[:, :1, :, :1]).all())


# ------------------------------------------------------------------------------------------------
# Hadamard transform


def test_hadamard_round_trip_and_orthogonality() -> None:
    h = nv.hadamard_matrix()
    torch.testing.assert_close(h @ h.T, torch.eye(16), rtol=0, atol=1e-6)
    x = torch.randn(10, 64)
    y = nv.hadamard_transform(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(nv.inverse_hadamard_transform(y), x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        nv.hadamard_transform(torch.randn(3, 20))
    with pytest.raises(ValueError, match=r"\+-1"):
        nv.hadamard_matrix(signs=(1,) * 15 + (2,))


def test_hadamard_cancels_in_a_product() -> None:
    a = torch.randn(8, 64)
    b = torch.randn(12, 64)
    torch.testing.assert_close(
        nv.hadamard_transform(a) @ nv.hadamard_transform(b).T, a @ b.T, rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# Compact checkpoint buffers


def test_compact_state_dict_round_trip() -> None:
    from safetensors.torch import load, save

    w = torch.randn(128, 192, dtype=torch.bfloat16)
    q = nv.quantize(w, "mse")
    sd = q.to_state_dict()
    assert sorted(sd) == [
        "quantized_weight_amax",
        "quantized_weight_metadata",
        "quantized_weight_scale_factors",
        "quantized_weight_values",
    ]
    assert sd["quantized_weight_values"].dtype == torch.uint8
    assert sd["quantized_weight_values"].shape == (128, 96)
    assert sd["quantized_weight_scale_factors"].dtype == torch.float8_e4m3fn
    assert sd["quantized_weight_scale_factors"].shape == (128 * 192 // 16,)
    assert sd["quantized_weight_amax"].dtype == torch.float32 and sd["quantized_weight_amax"].shape == (1,)
    assert sd["quantized_weight_metadata"].dtype == torch.int32
    assert sd["quantized_weight_metadata"].tolist() == [128, 192, 128, 192]
    loaded = load(save({f"blocks.0.ffn.0.{k}": v for k, v in sd.items()}))
    sub = {k.removeprefix("blocks.0.ffn.0."): v for k, v in loaded.items()}
    q2 = nv.NVFP4Tensor.from_state_dict(sub, rule="mse")
    assert torch.equal(nv.dequantize(q2, torch.bfloat16), nv.dequantize(q, torch.bfloat16))
    with pytest.raises(KeyError, match="quantized_weight_amax"):
        nv.NVFP4Tensor.from_state_dict({k: v for k, v in sub.items() if "amax" not in k}, rule="mse")
    bad = dict(sub, quantized_weight_values=sub["quantized_weight_values"][:, :10])
    with pytest.raises(ValueError, match="values must be uint8"):
        nv.NVFP4Tensor.from_state_dict(bad, rule="mse")


def test_quantize_with_a_larger_tensors_amax_equals_quantizing_inside_it():
    """Rows of a tensor quantized alone with the whole tensor's amax get the codes and scales they get
    inside it (what sequence-parallel ranks rely on when each quantizes its part of a chunk)."""
    from longlive.quant.nvfp4 import quantize, tensor_amax

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    x[50, 3] = 9.0  # the amax lives in the second half
    whole = quantize(x, "mse")
    part = quantize(x[:32], "mse", amax=tensor_amax(x))
    assert torch.equal(part.values[:32], whole.values[:32])
    assert torch.equal(part.scale_matrix()[:32].view(torch.uint8), whole.scale_matrix()[:32].view(torch.uint8))
    assert not torch.equal(quantize(x[:32], "mse").scale_matrix()[:32].view(torch.uint8),
                           whole.scale_matrix()[:32].view(torch.uint8))
    with pytest.raises(ValueError, match="below the tensor's own"):
        quantize(x, "mse", amax=torch.tensor([1.0]))
