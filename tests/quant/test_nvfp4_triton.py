"""Triton NVFP4 kernels vs the reference, bit for bit, under the Triton CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, and setting it in the pytest process would
leak into other tests, so the kernels run in one child process (this file executed as a script)
that reports a JSON summary; the tests below assert on it. The interpreter runs the bit-arithmetic
twins of the hardware conversions; the GPU tests (``gpu`` marker) check the hardware path,
including an exhaustive comparison over every float32 bit pattern.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RESULT_TAG = "NVFP4_TRITON_RESULTS "

# name -> (rows, cols, data kind, input dtype, rule, round, tile options or None = defaults)
# tile options: block_rows, block_cols, num_warps, row_tiles, split_blocks (missing keys = defaults)
QUANT_CASES: dict[str, tuple[int, int, str, str, str, str, dict | None]] = {
    "static6_nearest_small": (3, 16, "wide", "float32", "static_6", "nearest", None),
    "static6_nearest_odd_shape": (130, 200, "wide", "float32", "static_6", "nearest", dict(block_rows=64)),
    "static6_bf16_in": (64, 128, "wide", "bfloat16", "static_6", "nearest", dict(block_rows=32)),
    "static6_bf16_aligned": (256, 128, "wide", "bfloat16", "static_6", "nearest", None),
    "static6_bf16_split": (256, 128, "wide", "bfloat16", "static_6", "nearest", dict(split_blocks=True)),
    "static6_bf16_tiles_gcd": (336, 64, "gauss", "bfloat16", "static_6", "nearest",
                               dict(block_rows=16, row_tiles=6)),
    "static6_bf16_wide_tile": (128, 512, "wide", "bfloat16", "static_6", "nearest",
                               dict(block_rows=8, block_cols=256, num_warps=8)),
    "static6_bf16_odd_cols": (33, 47, "wide", "bfloat16", "static_6", "nearest", None),
    "static6_fp16_in": (40, 96, "wide", "float16", "static_6", "nearest", dict(block_cols=32)),
    "static4_nearest": (40, 96, "wide", "float32", "static_4", "nearest", dict(block_rows=64, block_cols=64)),
    "mse_nearest": (100, 80, "wide", "float32", "mse", "nearest", None),
    "mse_nearest_bf16_in": (128, 128, "gauss", "bfloat16", "mse", "nearest", dict(block_rows=128, block_cols=64)),
    "mse_bf16_split_tiles": (256, 128, "wide", "bfloat16", "mse", "nearest",
                             dict(block_rows=32, row_tiles=2, split_blocks=True)),
    "mae_nearest": (50, 64, "wide", "float32", "mae", "nearest", dict(block_rows=64, block_cols=64)),
    "mae_bf16_split": (64, 64, "wide", "bfloat16", "mae", "nearest", dict(split_blocks=True)),
    "abs_max_nearest": (50, 64, "wide", "float32", "abs_max", "nearest", dict(block_rows=64, block_cols=64)),
    "abs_max_bf16_split": (64, 128, "gauss", "bfloat16", "abs_max", "nearest", dict(split_blocks=True)),
    "static6_stochastic": (60, 72, "wide", "float32", "static_6", "stochastic", dict(block_rows=64)),
    "static6_stochastic_bf16_odd": (31, 45, "wide", "bfloat16", "static_6", "stochastic", None),
    "mse_stochastic": (60, 72, "wide", "float32", "mse", "stochastic", None),
    "mse_stochastic_bf16_split": (128, 128, "wide", "bfloat16", "mse", "stochastic", dict(split_blocks=True)),
    "abs_max_stochastic": (33, 48, "gauss", "float16", "abs_max", "stochastic", dict(block_rows=64, block_cols=64)),
    "exact_ties": (1, 32, "ties", "float32", "static_6", "nearest", None),
    "exact_ties_bf16": (1, 32, "ties", "bfloat16", "mse", "nearest", None),
    "all_zero_mse": (7, 40, "zero", "float32", "mse", "nearest", dict(block_rows=128, block_cols=64)),
    "float64_in": (20, 48, "wide", "float64", "mse", "nearest", None),
}
DEQUANT_TILES = [None, dict(block_rows=16, row_tiles=3, split_blocks=False),
                 dict(block_rows=128, block_cols=64, num_warps=8)]
"""Tile options of dequantize_triton tried on every case (all padded widths are multiples of 64)."""


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


def _boundary_bit_ranges() -> list[tuple[int, int]]:
    """float32 bit-pattern windows for the interpreter's conversion check.

    Every pattern within 2^14 of each rounding boundary of E4M3 / E2M1 (and their negatives), plus
    the first and last 2048 patterns of every binade (all exponents, both signs).
    """
    def bits(v: float) -> int:
        return int(torch.tensor([v], dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF

    e4 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    points = [0.0, 2.0**-10, 2.0**-9, 2.0**-6, 448.0, 464.0] + [float(v) for v in (e4[1:] + e4[:-1]) / 2][::9]
    points += [0.25, 0.5, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0]
    ranges = []
    for v in points:
        for sign in (0, 1 << 31):
            b = bits(v) | sign
            ranges.append((max(b - (1 << 14), sign), b + (1 << 14)))
    for sign in (0, 1 << 31):
        for e in range(256):
            base = sign | (e << 23)
            ranges += [(base, base + 2048), (base + (1 << 23) - 2048, base + (1 << 23))]
    return ranges


def _child() -> dict[str, object]:
    """Run every kernel check under the interpreter; returns a JSON-able summary.

    Needs the module globals set up in the __main__ block (triton imported in interpret mode).
    """
    out: dict[str, object] = {}
    out["conversions"] = nt.verify_conversions("cpu", _boundary_bit_ranges(), chunk=1 << 20)

    # the per-block helpers other kernels build on (_candidate, _block_error) vs the reference's
    for rule_id, rule in ((1, "mse"), (2, "mae"), (3, "abs_max")):
        for stochastic in (False, True):
            x = _data(16, 64, "wide", "float32", seed=7 + rule_id)
            blocks = x.reshape(16, 4, 16)
            u = torch.rand(blocks.shape, generator=torch.Generator().manual_seed(rule_id))
            amax = x.abs().amax().reshape(1)
            sc = nv.tensor_scales(amax, rule)
            codes = torch.empty(blocks.shape, dtype=torch.int32)
            sb_code = torch.empty(16, 4, dtype=torch.int32)
            deq = torch.empty(blocks.shape)
            err = torch.empty(16, 4)
            _helper_probe[(1,)](blocks, u, sc.block_encode_four, sc.decode, codes, sb_code, deq, err,
                                RULE=rule_id, STOCHASTIC=stochastic, BLOCK_R=16, NB=4)
            bmax = blocks.abs().amax(-1)
            rc, rsb, rdeq = nv._candidate(blocks, bmax, sc.block_encode_four, sc.decode, u if stochastic else None)
            rerr = nv._block_error(rdeq - blocks, rule, order_invariant=False)
            out[f"helpers_{rule}_{'stochastic' if stochastic else 'nearest'}"] = {
                "codes": bool(torch.equal(codes, rc.to(torch.int32))),
                "scales": bool(torch.equal(sb_code, rsb.view(torch.uint8).to(torch.int32))),
                "deq": bool(torch.equal(deq.view(torch.int32), rdeq.view(torch.int32))),
                "err": bool(torch.equal(err.view(torch.int32), rerr.view(torch.int32))),
            }

    for i, (name, (rows, cols, kind, dtype, rule, rnd, tiles)) in enumerate(QUANT_CASES.items()):
        x = _data(rows, cols, kind, dtype, seed=i)
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(100 + i)) if rnd == "stochastic" else None
        qr = nv.quantize(x, rule, round=rnd, uniform=u)
        qt = nt.quantize_triton(x, rule, round=rnd, uniform=u, **(tiles or {}))
        deq = {}
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for j, dtiles in enumerate(DEQUANT_TILES):
                if j and dt != torch.bfloat16:
                    continue  # other tile shapes with the bf16 output only (time)
                a, b = nt.dequantize_triton(qr, dt, **(dtiles or {})), nv.dequantize(qr, dt)
                ok = bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8))) and not bool(torch.isnan(a).any())
                deq[f"{str(dt)[6:]}_{j}"] = ok
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
    xs = _data(40, 96, "wide", "float32", seed=98)[:, 8:88]  # row stride 96, offset 8: not a packed view
    qr = nv.quantize(xs, "static_6")
    qt = nt.quantize_triton(xs, "static_6")
    out["strided_input"] = bool(torch.equal(qt.values, qr.values)) and bool(
        torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8)))
    limit = nt._INT32_LIMIT
    nt._INT32_LIMIT = 0  # force the int64 indexing of tensors past 2^31 elements on a small one
    try:
        x = _data(130, 200, "wide", "bfloat16", seed=97)
        qr = nv.quantize(x, "mse")
        qt = nt.quantize_triton(x, "mse")
        out["index64"] = bool(torch.equal(qt.values, qr.values)) and bool(
            torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8))) and bool(
            torch.equal(nt.dequantize_triton(qr).view(torch.int16), nv.dequantize(qr, torch.bfloat16).view(torch.int16)))
    finally:
        nt._INT32_LIMIT = limit
    bad = torch.randn(4, 32)
    bad[0, 0] = float("nan")
    try:
        nt.quantize_triton(bad)
        out["rejects_nan"] = False
    except ValueError as exc:
        out["rejects_nan"] = "1 of 128 values are not finite" in str(exc)
    try:
        nt.quantize_triton(torch.randn(4, 32), hw_convert=True)
        out["rejects_hw_on_cpu"] = False
    except ValueError:
        out["rejects_hw_on_cpu"] = True
    try:
        nt.quantize_triton(torch.randn(4, 64), block_rows=48)
        out["rejects_bad_tile"] = False
    except ValueError as exc:
        out["rejects_bad_tile"] = "block_rows" in str(exc)
    return out


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, object]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    assert proc.returncode == 0 and lines, (
        f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1][len(RESULT_TAG):])


def test_conversion_helpers_match_torch_bit_for_bit(interpreter_results: dict) -> None:
    """E4M3 / bfloat16 / E2M1 rounding and decoding twins on every pattern near every boundary."""
    conv = interpreter_results["conversions"]
    assert conv["values"] > 2_000_000
    assert {k: v for k, v in conv.items() if k.endswith("_mismatches") and v} == {}


@pytest.mark.parametrize("case", ["mse", "mae", "abs_max"])
@pytest.mark.parametrize("rnd", ["nearest", "stochastic"])
def test_block_helpers_match_reference(interpreter_results: dict, case: str, rnd: str) -> None:
    r = interpreter_results[f"helpers_{case}_{rnd}"]
    assert all(r.values()), r


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_triton_quantize_and_dequantize_bit_exact(interpreter_results: dict, case: str) -> None:
    r = interpreter_results[case]
    assert r["values"], r
    assert r["scales"] and r["amax"] and r["metadata"], r
    assert r["dequant"] and all(r["dequant"].values()), r


def test_triton_wrapper_checks(interpreter_results: dict) -> None:
    assert interpreter_results["rejects_nan"]
    assert interpreter_results["given_amax"]
    assert interpreter_results["strided_input"]
    assert interpreter_results["index64"]
    assert interpreter_results["rejects_hw_on_cpu"]
    assert interpreter_results["rejects_bad_tile"]


def test_cpu_tensor_without_interpreter_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from longlive.quant import nvfp4_triton as nt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        nt.quantize_triton(torch.randn(4, 32))


GPU_TILES = [None, dict(split_blocks=True), dict(split_blocks=False), dict(block_rows=16, row_tiles=3),
             dict(block_rows=64, num_warps=8)]


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["static_6", "mse", "abs_max"])
@pytest.mark.parametrize("rnd", ["nearest", "stochastic"])
@pytest.mark.parametrize("tiles", range(len(GPU_TILES)))
def test_cuda_kernels_bit_exact(rule: str, rnd: str, tiles: int) -> None:
    pytest.importorskip("triton")
    from longlive.quant import nvfp4 as nv
    from longlive.quant import nvfp4_triton as nt

    opts = GPU_TILES[tiles] or {}
    for rows, cols in ((300, 520), (512, 256)):
        x = _data(rows, cols, "wide", "bfloat16", seed=3).cuda()
        u = torch.rand(x.shape, device="cuda") if rnd == "stochastic" else None
        qr = nv.quantize(x, rule, round=rnd, uniform=u)
        for hw in (False, None):
            qt = nt.quantize_triton(x, rule, round=rnd, uniform=u, hw_convert=hw, **opts)
            assert torch.equal(qt.values, qr.values)
            assert torch.equal(qt.scale_factors.view(torch.uint8), qr.scale_factors.view(torch.uint8))
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for hw in (False, None):
                got = nt.dequantize_triton(qr, dt, hw_convert=hw, **opts)
                assert torch.equal(got.view(torch.uint8), nv.dequantize(qr, dt).view(torch.uint8))


@pytest.mark.gpu
def test_cuda_conversions_exhaustive() -> None:
    """Hardware and bit-arithmetic conversions vs torch on every finite float32 pattern (2^32)."""
    pytest.importorskip("triton")
    from longlive.quant import nvfp4_triton as nt

    conv = nt.verify_conversions("cuda")
    assert conv["values"] > 4_000_000_000
    assert {k: v for k, v in conv.items() if k.endswith("_mismatches") and v} == {}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does this)")
    import triton
    import triton.language as tl

    from longlive.quant import nvfp4 as nv
    from longlive.quant import nvfp4_triton as nt

    @triton.jit
    def _helper_probe(x_ptr, u_ptr, k_ptr, dec_ptr, codes_ptr, sb_ptr, deq_ptr, err_ptr,
                      RULE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, NB: tl.constexpr):
        i = tl.arange(0, BLOCK_R)[:, None, None] * (NB * 16) + tl.arange(0, NB)[None, :, None] * 16
        offs = i + tl.arange(0, 16)[None, None, :]
        xb = tl.load(x_ptr + offs)
        u = tl.load(u_ptr + offs)
        bmax = tl.max(tl.abs(xb), axis=2)
        dec = tl.load(dec_ptr)
        codes, sb_code, deq = nt._candidate(xb, bmax, tl.load(k_ptr), dec, u, STOCHASTIC)
        tl.store(codes_ptr + offs, codes)
        tl.store(deq_ptr + offs, deq)
        so = tl.arange(0, BLOCK_R)[:, None] * NB + tl.arange(0, NB)[None, :]
        tl.store(sb_ptr + so, sb_code)
        tl.store(err_ptr + so, nt._block_error(deq - xb, RULE, BLOCK_R, NB))

    print(RESULT_TAG + json.dumps(_child()), flush=True)
