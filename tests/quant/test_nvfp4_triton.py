"""Triton NVFP4 kernels vs the reference, bit for bit, under the Triton CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, and setting it in the pytest process would
leak into other tests, so the kernels run in one child process (this file executed as a script)
that reports a JSON summary; the tests below assert on it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

RESULT_TAG = "NVFP4_TRITON_RESULTS "

# name -> (rows, cols, data kind, input dtype, rule, round, (block_rows, block_cols) or None = defaults)
QUANT_CASES: dict[str, tuple[int, int, str, str, str, str, tuple[int, int] | None]] = {
    "static6_nearest_small": (3, 16, "wide", "float32", "static_6", "nearest", None),
    "static6_nearest_odd_shape": (130, 200, "wide", "float32", "static_6", "nearest", (64, 128)),
    "static6_bf16_in": (64, 128, "wide", "bfloat16", "static_6", "nearest", (32, 128)),
    "static6_bf16_even": (128, 128, "wide", "bfloat16", "static_6", "nearest", (16, 64)),
    "static6_bf16_odd_cols": (5, 33, "wide", "bfloat16", "static_6", "nearest", None),
    "static6_fp16_in": (20, 80, "gauss", "float16", "static_6", "nearest", None),
    "mse_float64_in": (9, 48, "wide", "float64", "mse", "nearest", None),
    "static6_fp32_even": (128, 64, "wide", "float32", "static_6", "nearest", (16, 64)),
    "mse_stochastic_bf16_even": (128, 128, "wide", "bfloat16", "mse", "stochastic", (32, 128)),
    "static4_nearest": (40, 96, "wide", "float32", "static_4", "nearest", (64, 64)),
    "mse_nearest": (100, 80, "wide", "float32", "mse", "nearest", None),
    "mse_nearest_bf16_in": (128, 128, "gauss", "bfloat16", "mse", "nearest", (128, 64)),
    "mae_nearest": (50, 64, "wide", "float32", "mae", "nearest", (64, 64)),
    "abs_max_nearest": (50, 64, "wide", "float32", "abs_max", "nearest", (64, 64)),
    "static6_stochastic": (60, 72, "wide", "float32", "static_6", "stochastic", (64, 128)),
    "mse_stochastic": (60, 72, "wide", "float32", "mse", "stochastic", None),
    "abs_max_stochastic": (33, 48, "gauss", "float16", "abs_max", "stochastic", (64, 64)),
    "exact_ties": (1, 32, "ties", "float32", "static_6", "nearest", None),
    "all_zero_mse": (7, 40, "zero", "float32", "mse", "nearest", (128, 64)),
}


def _data(rows: int, cols: int, kind: str, dtype: str, seed: int) -> torch.Tensor:
    """Test inputs: 'wide' spans 1e-7..1e2 across 16-blocks (E4M3-subnormal scales) with zero blocks."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        tie_x = [0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5]
        x = torch.tensor([[5.25] + [0.0] * 15 + tie_x + [-v for v in tie_x] + [3.0, 0.25]])
    elif kind == "zero":
        x = torch.zeros(rows, cols)
    else:
        x = torch.randn(rows, cols, generator=g)
        if kind == "wide":
            nb = -(-cols // 16)
            mag = 10.0 ** (torch.rand(rows, nb, generator=g) * 9 - 7)
            mag[torch.rand(rows, nb, generator=g) < 0.1] = 0.0
            x = x * mag.repeat_interleave(16, dim=1)[:, :cols]
    return x.to(getattr(torch, dtype))


def _child() -> dict[str, object]:
    """Run every kernel check under the interpreter; returns a JSON-able summary.

    Needs the module globals set up in the __main__ block (triton imported in interpret mode).
    """
    out: dict[str, object] = {}
    # float32 -> E4M3 / bfloat16 rounding helpers on every E4M3 value, midpoint, and neighbours
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    p = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros_like(mids)),
                   torch.nextafter(mids, torch.full_like(mids, 500.0)),
                   torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 448,
                   10.0 ** (torch.rand(2000, generator=torch.Generator().manual_seed(1)) * 6 - 5)])
    p = p.clamp(max=448.0).contiguous()
    code = torch.empty(p.numel(), dtype=torch.int32)
    val = torch.empty_like(p)
    bf = torch.empty(p.numel(), dtype=torch.int16)
    _probe[(triton.cdiv(p.numel(), 1024),)](p, code, val, bf, p.numel(), BLOCK=1024)
    ref8 = p.to(torch.float8_e4m3fn)
    out["e4m3_codes"] = bool(torch.equal(code, ref8.view(torch.uint8).to(torch.int32)))
    out["e4m3_values"] = bool(torch.equal(val, ref8.float()))
    bf_in = torch.cat([p, -p, torch.randn(2000) * 1e3])
    bf_out = torch.empty(bf_in.numel(), dtype=torch.int16)
    _probe[(triton.cdiv(bf_in.numel(), 1024),)](bf_in, torch.empty(bf_in.numel(), dtype=torch.int32),
                                               torch.empty_like(bf_in), bf_out, bf_in.numel(), BLOCK=1024)
    high = torch.randint(0, 0x7F7F, (500,), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    ties = (high << 16 | 0x8000).view(torch.float32)  # exactly halfway between two bfloat16 values
    bf_ties = torch.empty(500, dtype=torch.int16)
    _probe[(1,)](ties, torch.empty(500, dtype=torch.int32), torch.empty_like(ties), bf_ties, 500, BLOCK=512)
    out["bf16_rounding"] = bool(torch.equal(bf_out, bf_in.to(torch.bfloat16).view(torch.int16))) and bool(
        torch.equal(bf_ties, ties.to(torch.bfloat16).view(torch.int16)))

    # E2M1 rounding helpers: every grid value and midpoint, their float32 neighbours, values just
    # below each binade edge, beyond the saturation point, and random values; uniforms include the
    # largest float32 below 1 (where a * inv_step + u can round up into the next binade)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([7.0, 8.0, 100.0, 1e-30])])
    a = torch.cat([points, torch.nextafter(points, torch.zeros_like(points)),
                   torch.nextafter(points, torch.full_like(points, 1e3)),
                   torch.rand(4000, generator=torch.Generator().manual_seed(3)) * 7]).abs()
    us = torch.tensor([0.0, 0.25, 0.5, 0.75, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))])
    a2 = a.repeat(len(us)).contiguous()
    u2 = us.repeat_interleave(len(a)).contiguous()
    k_near = torch.empty(a2.numel(), dtype=torch.int32)
    k_sto = torch.empty_like(k_near)
    r_near, r_sto = torch.empty_like(a2), torch.empty_like(a2)
    _probe_e2m1[(triton.cdiv(a2.numel(), 1024),)](a2, u2, k_near, r_near, k_sto, r_sto, a2.numel(), BLOCK=1024)
    ref_near = nv.round_to_e2m1_codes(a2).to(torch.int32)
    ref_sto = nv.stochastic_round_to_e2m1_codes(a2, u2).to(torch.int32)
    lut = torch.tensor(nv.E2M1_VALUES)
    out["e2m1_nearest"] = bool(torch.equal(k_near, ref_near)) and bool(torch.equal(r_near, lut[ref_near.long()]))
    out["e2m1_stochastic"] = bool(torch.equal(k_sto, ref_sto)) and bool(torch.equal(r_sto, lut[ref_sto.long()]))
    ac = a2.clamp(max=6.0)
    inv_step = torch.where(ac < 2, 2.0, torch.where(ac < 4, 1.0, 0.5))
    n = (ac * inv_step + u2).to(torch.int32)
    out["e2m1_stochastic_binade_carry_seen"] = int((n > torch.where(ac < 4, 4, 3)).sum())
    # signed codes packed 8 per int32 as the quantize kernel makes them (the sign in the rounding
    # addition, garbage above each nibble): every magnitude with both signs in every nibble, values
    # that round to 0 with both signs, and -0.0
    g = torch.Generator().manual_seed(4)
    xs = (torch.rand(4096, 8, generator=g) * 7).where(torch.rand(4096, 8, generator=g) < 0.9, torch.tensor(0.2))
    xs[:16] = torch.tensor(nv.E2M1_VALUES)[torch.arange(16).remainder(8)][:, None]
    xs = xs * torch.where(torch.rand(4096, 8, generator=g) < 0.5, -1.0, 1.0)
    xs[:16, ::2] = -xs[:16, ::2]
    xs[16:24, ::2] = -0.0
    xs = xs.to(torch.bfloat16).float()  # the same values in both kernels' inputs
    k = nv.round_to_e2m1_codes(xs.abs()).to(torch.int32)
    ref_codes = (k + 8 * ((xs < 0) & (k > 0)).to(torch.int32)).to(torch.uint8)
    ref_words = nv.pack_e2m1(ref_codes).view(torch.int32).reshape(-1)
    words = torch.empty(4096, dtype=torch.int32)
    _probe_sign[(4096 // 128,)](xs.contiguous(), words, BLOCK=128, WORDS=False)
    words16 = torch.empty(4096, dtype=torch.int32)
    _probe_sign[(4096 // 128,)](xs.to(torch.bfloat16).view(torch.int16).contiguous().view(torch.int32),
                                words16, BLOCK=128, WORDS=True)
    out["signed_codes"] = bool(torch.equal(words, ref_words)) and bool(torch.equal(words16, ref_words))

    for i, (name, (rows, cols, kind, dtype, rule, rnd, block)) in enumerate(QUANT_CASES.items()):
        br, bc = block or (None, None)
        x = _data(rows, cols, kind, dtype, seed=i)
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(100 + i)) if rnd == "stochastic" else None
        qr = nv.quantize(x, rule, round=rnd, uniform=u)
        qt = nt.quantize_triton(x, rule, round=rnd, uniform=u, block_rows=br, block_cols=bc)
        deq = {}
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            a, b = nt.dequantize_triton(qr, dt, block_rows=br, block_cols=bc), nv.dequantize(qr, dt)
            deq[str(dt)] = bool(torch.equal(a, b)) and not bool(torch.isnan(a).any())
        out[name] = {
            "values": bool(torch.equal(qt.values, qr.values)),
            "value_mismatches": int((qt.values != qr.values).sum()),
            "scales": bool(torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8))),
            "amax": bool(torch.equal(qt.amax, qr.amax)),
            "metadata": bool(torch.equal(qt.metadata, qr.metadata)),
            "dequant": deq,
        }
    x = _data(20, 48, "wide", "bfloat16", seed=99)
    qr = nv.quantize(x, "mse")
    qt = nt.quantize_triton(x, "mse", validate=False, amax=qr.amax.clone())
    out["given_amax"] = bool(torch.equal(qt.values, qr.values)) and bool(
        torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8)))
    bad = torch.randn(4, 32)
    bad[0, 0] = float("nan")
    try:
        nt.quantize_triton(bad)
        out["rejects_nan"] = False
    except ValueError as exc:
        out["rejects_nan"] = "1 of 128 values are not finite" in str(exc)
    return out




def test_e2m1_rounding_helpers_match_the_reference(interpreter_results: dict) -> None:
    assert interpreter_results["e2m1_nearest"]
    assert interpreter_results["e2m1_stochastic"]
    assert interpreter_results["e2m1_stochastic_binade_carry_seen"] > 0  # the case the minimum guards
    assert interpreter_results["signed_codes"]


def test_e4m3_and_bf16_bit_rounding_match_torch(interpreter_results: dict) -> None:
    assert interpreter_results["e4m3_codes"]
    assert interpreter_results["e4m3_values"]
    assert interpreter_results["bf16_rounding"]


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_triton_quantize_and_dequantize_bit_exact(interpreter_results: dict, case: str) -> None:
    r = interpreter_results[case]
    assert r["values"], r
    assert r["scales"] and r["amax"] and r["metadata"], r
    assert all(r["dequant"].values()), r


def test_triton_wrapper_rejects_nan_and_accepts_given_amax(interpreter_results: dict) -> None:
    assert interpreter_results["rejects_nan"]
    assert interpreter_results["given_amax"]


def test_cpu_tensor_without_interpreter_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from longlive.quant import nvfp4_triton as nt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        nt.quantize_triton(torch.randn(4, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["static_6", "mse", "mae", "abs_max"])
@pytest.mark.parametrize("rnd", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape, dtype", [((300, 520), "bfloat16"), ((256, 1024), "bfloat16"),
                                          ((77, 130), "float16"), ((128, 192), "float32")])
def test_cuda_kernels_bit_exact(rule: str, rnd: str, shape: tuple[int, int], dtype: str) -> None:
    """Masked (ragged) and mask-free (the tensor fills its padded shape) launches, every input kind."""
    pytest.importorskip("triton")
    from longlive.quant import nvfp4 as nv
    from longlive.quant import nvfp4_triton as nt

    x = _data(*shape, "wide", dtype, seed=3).cuda()
    u = torch.rand(x.shape, device="cuda") if rnd == "stochastic" else None
    qr = nv.quantize(x, rule, round=rnd, uniform=u)
    qt = nt.quantize_triton(x, rule, round=rnd, uniform=u)
    assert torch.equal(qt.values, qr.values)
    assert torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nt.dequantize_triton(qr, dt), nv.dequantize(qr, dt))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does this)")
    import triton
    import triton.language as tl

    from longlive.quant import nvfp4 as nv
    from longlive.quant import nvfp4_triton as nt

    @triton.jit
    def _probe(p_ptr, code_ptr, val_ptr, bf_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        p = tl.load(p_ptr + offs, mask=m, other=0.0)
        code, val = nt._e4m3_round(p)
        tl.store(code_ptr + offs, code, mask=m)
        tl.store(val_ptr + offs, val, mask=m)
        tl.store(bf_ptr + offs, nt._bf16_bits(p), mask=m)

    @triton.jit
    def _probe_e2m1(a_ptr, u_ptr, kn_ptr, rn_ptr, ks_ptr, rs_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=0.0)
        u = tl.load(u_ptr + offs, mask=m, other=0.0)
        k, r = nt._e2m1_round(a)
        tl.store(kn_ptr + offs, k, mask=m)
        tl.store(rn_ptr + offs, r, mask=m)
        k, r = nt._e2m1_round_stochastic(a, u)
        tl.store(ks_ptr + offs, k, mask=m)
        tl.store(rs_ptr + offs, r, mask=m)

    @triton.jit
    def _probe_sign(x_ptr, word_ptr, BLOCK: tl.constexpr, WORDS: tl.constexpr):
        """8 values per row -> one packed word, from float32 values or bfloat16 pairs in int32 words."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if WORDS:
            w = tl.load(x_ptr + rows[:, None] * 4 + tl.arange(0, 4)[None, :])
            xe = (w << 16).to(tl.float32, bitcast=True)
            xo = (w & -65536).to(tl.float32, bitcast=True)
            signs = nt._pair_signs(w)
        else:
            offs = rows[:, None] * 8 + 2 * tl.arange(0, 4)[None, :]
            xe = tl.load(x_ptr + offs)
            xo = tl.load(x_ptr + offs + 1)
            signs = nt._float_signs(xe, xo)
        ce, _ = nt._e2m1_round_bits(tl.abs(xe))
        co, _ = nt._e2m1_round_bits(tl.abs(xo))
        tl.store(word_ptr + rows, nt._clear_negative_zeros(nt._pack_half(ce, co, signs, BLOCK)))

    print(RESULT_TAG + json.dumps(_child()), flush=True)
