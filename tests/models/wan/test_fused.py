"""Work cached inference saves, each against what it replaces: the fused norm + RoPE + cache-write kernel
(`longlive.models.wan.fused`) against the PyTorch ops, `WanModel.refresh_cache` against a full refresh
forward, and `WanModel.text_kv` (cross-attention K/V once per prompt) against the raw text.

The Triton checks run in a child process under TRITON_INTERPRET=1 (the `interpreter_results` fixture runs
this file as a script); the GPU test repeats the model check at the 5B head layout on CUDA.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from longlive.models.wan import KVCache, WanConfig, WanModel
from longlive.models.wan.model import RMSNorm, TextKV
from longlive.models.wan.rope import apply_rope, rope_cos_sin

RESULT_TAG = "FUSED_KERNEL_RESULTS "

# name -> (heads, head_dim, q/k norm, one RoPE table per sample, rotate q)
KERNEL_CASES = {
    "h3_d32_norm": (3, 32, True, True, True),  # 96 channels: a masked, non-power-of-two row
    "h2_d32_no_norm": (2, 32, False, False, True),
    "h2_d64_cache_only": (2, 64, True, False, False),
    "h4_d32_norm": (4, 32, True, True, True),  # packed for sequence parallelism in 2 groups of 2 heads
}


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps between two bf16 tensors of the same signs (0: identical)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    if ((ia < 0) != (ib < 0)).any():  # sign flips only around zero; count them as far apart
        return 1 << 15
    return int((ia - ib).abs().max())


def _pack_parts(heads: int) -> int:
    """Head groups of the send-buffer check: 1 head per group (3 heads), all in one (2), 2 groups of 2 (4)."""
    return {2: 1, 3: 3, 4: 2}[heads]


def _kernel_case(heads: int, head_dim: int, norm: bool, per_sample_rope: bool, rotate_q: bool,
                 device: str = "cpu") -> dict:
    from longlive.models.wan.fused import norm_rope_pack, norm_rope_store

    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    cfg = WanConfig(dim=heads * head_dim, ffn_dim=64, freq_dim=32, text_dim=32, num_heads=heads, num_layers=1,
                    in_dim=4, out_dim=4, text_len=8)
    b, frames, hh, ww, hd = 2, 2, 2, 3, heads * head_dim
    s = frames * hh * ww
    qkv = (3 * torch.randn(b, s, 3 * hd, generator=g)).to(device, torch.bfloat16)  # q, k, v: strided rows of one tensor
    q, k, v = qkv.split(hd, dim=-1)
    nq, nk = RMSNorm(hd, cfg.eps).to(device), RMSNorm(hd, cfg.eps).to(device)
    nq.weight.data = torch.randn(hd, generator=g).to(device, torch.bfloat16)
    nk.weight.data = torch.randn(hd, generator=g).to(device, torch.bfloat16)
    pos = torch.tensor([[3.0, 4.0], [20.5, 21.5]] if per_sample_rope else [[3.0, 4.0]], dtype=torch.float64, device=device)
    cos, sin = rope_cos_sin(cfg, pos, hh, ww)
    cache_k = torch.full((b, heads, 3 * s, head_dim), 7.0, dtype=torch.bfloat16, device=device)  # 3 slots; write the middle one
    cache_v = cache_k.clone()
    out = norm_rope_store(q if rotate_q else None, k, v, nq.weight if norm else None, nk.weight if norm else None,
                          cfg.eps, cos, sin, cache_k[:, :, s : 2 * s], cache_v[:, :, s : 2 * s])
    shape = (b, s, heads, head_dim)
    ref_q = apply_rope((nq(q) if norm else q).reshape(shape), cos, sin)
    ref_k = apply_rope((nk(k) if norm else k).reshape(shape), cos, sin).transpose(1, 2)
    outside = torch.cat([cache_k[:, :, :s], cache_k[:, :, 2 * s :], cache_v[:, :, :s], cache_v[:, :, 2 * s :]], dim=2)
    # the sequence-parallel send buffer [parts, B, S, 3, H/parts, D]: the same values, packed by head group
    parts = _pack_parts(heads)
    send = norm_rope_pack(q, k, v, nq.weight if norm else None, nk.weight if norm else None, cfg.eps, cos, sin,
                          head_dim, parts)
    q_rot = norm_rope_store(q, k, v, nq.weight if norm else None, nk.weight if norm else None, cfg.eps, cos, sin,
                            cache_k[:, :, s : 2 * s], cache_v[:, :, s : 2 * s])
    packed = torch.stack([q_rot, cache_k[:, :, s : 2 * s].transpose(1, 2), v.reshape(shape)], dim=2)
    packed = packed.view(b, s, 3, parts, heads // parts, head_dim).permute(3, 0, 1, 2, 4, 5)
    return {
        "pack_shape": list(send.shape),
        "pack_equal": bool(torch.equal(send, packed)),
        "q_none": out is None,
        "q_ulps": _bf16_ulps(out, ref_q) if out is not None else None,
        "q_equal_fraction": float((out == ref_q).float().mean()) if out is not None else None,
        "k_ulps": _bf16_ulps(cache_k[:, :, s : 2 * s], ref_k),
        "v_exact": bool(torch.equal(cache_v[:, :, s : 2 * s], v.reshape(shape).transpose(1, 2))),
        "outside_untouched": bool((outside == 7.0).all()),
    }


def _run_chunks(model: WanModel, fused: bool, chunks: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Velocities of a few cached chunks (window 2 chunks + sink, a scene cut), with the refresh; and the cache."""
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    model.fused_kernels = fused
    cache = KVCache.for_model(cfg, batch_size=2, latent_height=4, latent_width=6, chunk_frames=2, window_frames=6,
                              sink_frames=2, multi_shot_sink=True, rope_offset_per_shot=4, dtype=torch.bfloat16,
                              device=next(model.parameters()).device)
    dev = cache.device
    x = torch.randn(2, cfg.in_dim, 2 * chunks, 4, 6, generator=g).to(dev, torch.bfloat16)
    ctx = torch.randn(2, 5, cfg.text_dim, generator=g).to(dev, torch.bfloat16)
    outs = []
    with torch.no_grad():
        for c in range(chunks):
            cache.begin_chunk(2 * c, scene_cut=c == 2)
            xc = x[:, :, 2 * c : 2 * c + 2]
            outs.append(model(xc, torch.full((2, 2), 700.0, device=dev), ctx, kv_cache=cache))
            cache.prepare_refresh()
            model.refresh_cache(xc, torch.zeros(2, 2, device=dev), ctx, kv_cache=cache)
            cache.end_chunk()
    return torch.cat(outs, dim=2).float(), cache.k.float(), cache.v.float()


def _model_check(cfg: WanConfig, device: str) -> dict:
    from longlive.models.wan import fused

    torch.manual_seed(0)
    model = WanModel(cfg).to(device, torch.bfloat16).eval()
    calls = []
    original = fused.norm_rope_store

    def counting(*args, **kwargs):
        calls.append(args[0] is None)
        return original(*args, **kwargs)

    fused.norm_rope_store = counting
    try:
        out_f, k_f, v_f = _run_chunks(model, fused=True)
    finally:
        fused.norm_rope_store = original
    out_p, k_p, v_p = _run_chunks(model, fused=False)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"launches": len(calls), "cache_only_launches": sum(calls), "out_rel": rel(out_f, out_p),
            "k_rel": rel(k_f, k_p), "v_rel": rel(v_f, v_p), "layers": cfg.num_layers}


def _child() -> dict:
    out = {name: _kernel_case(*case) for name, case in KERNEL_CASES.items()}
    # bf16 GEMMs crash some CPUs (oneDNN's AMX path under virtualisation): this process multiplies bf16 in
    # fp32 and rounds, for both paths alike
    import torch.nn.functional as F

    linear = F.linear
    F.linear = lambda x, w, b=None: linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    out["model"] = _model_check(WanConfig.preset("tiny"), "cpu")
    return out


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_the_pytorch_norm_and_rope(interpreter_results: dict, case: str) -> None:
    r = interpreter_results[case]
    rotate_q = KERNEL_CASES[case][4]
    assert r["q_none"] is not rotate_q
    if rotate_q:
        assert r["q_ulps"] <= 1, r  # only the mean's summation order differs from PyTorch
        assert r["q_equal_fraction"] > 0.99, r
    assert r["k_ulps"] <= 1, r
    assert r["v_exact"] and r["outside_untouched"], r
    heads, head_dim = KERNEL_CASES[case][:2]
    parts = _pack_parts(heads)
    assert r["pack_shape"] == [parts, 2, 12, 3, heads // parts, head_dim] and r["pack_equal"], r


def test_model_with_the_fused_kernel_matches_the_pytorch_path(interpreter_results: dict) -> None:
    r = interpreter_results["model"]
    chunks, forwards_per_chunk = 4, 2  # one denoising step + the refresh
    assert r["launches"] == chunks * forwards_per_chunk * r["layers"], r
    assert r["cache_only_launches"] == chunks, r  # the refresh's last layer writes K/V and skips q
    assert r["out_rel"] < 1e-3 and r["k_rel"] < 1e-3 and r["v_rel"] < 1e-3, r  # 0.0 measured


@torch.no_grad()
@pytest.mark.parametrize("kv_quant", [False, True])
def test_refresh_cache_writes_what_a_full_refresh_forward_writes(kv_quant: bool) -> None:
    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, 10, 4, 4, generator=g)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    kw = dict(batch_size=1, latent_height=4, latent_width=4, chunk_frames=2, window_frames=6, sink_frames=2,
              multi_shot_sink=True, rope_offset_per_shot=4, dtype=torch.float32, kv_quant=kv_quant,
              kv_quant_backend="pytorch")
    caches = [KVCache.for_model(cfg, **kw) for _ in range(2)]
    velocities = [[], []]
    for c in range(5):  # the window (3 chunks) fills and rolls
        for i, cache in enumerate(caches):
            cache.begin_chunk(2 * c, scene_cut=c == 2)
            xc, t0 = x[:, :, 2 * c : 2 * c + 2], torch.zeros(1, 2)
            velocities[i].append(model(xc, torch.full((1, 2), 600.0), ctx, kv_cache=cache))
            cache.prepare_refresh()
            if i == 0:
                assert model(xc, t0, ctx, kv_cache=cache) is not None
            else:
                assert model.refresh_cache(xc, t0, ctx, kv_cache=cache) is None
            cache.end_chunk()
    state = lambda c: [c.k, c.v] if not kv_quant else [c.fp4.k_values, c.fp4.v_values, c.fp4.k_scales]  # noqa: E731
    for a, b in zip(state(caches[0]), state(caches[1])):
        assert torch.equal(a, b)
    for a, b in zip(*velocities):
        assert torch.equal(a, b)


@torch.no_grad()
@pytest.mark.parametrize("prompts", [1, 2])
def test_text_kv_gives_the_forward_of_the_raw_text(prompts: int) -> None:
    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, prompts, 7, cfg.text_dim, generator=g)  # 7 tokens: padded to text_len inside
    x, t = torch.randn(2, cfg.in_dim, 4, 4, 4, generator=g), torch.full((2, 4), 300.0)
    kv = model.text_kv(text)
    assert isinstance(kv, TextKV) and len(kv.k) == cfg.num_layers
    assert kv.k[0].shape == (2, prompts, cfg.text_len, cfg.num_heads, cfg.head_dim)
    assert torch.equal(model(x, t, kv, chunk_frames=2), model(x, t, text, chunk_frames=2))
    caches = [KVCache.for_model(cfg, batch_size=2, latent_height=4, latent_width=4, chunk_frames=4, window_frames=8,
                                dtype=torch.float32) for _ in range(2)]
    for cache in caches:
        cache.begin_chunk(0)
    assert torch.equal(model(x, t, kv, kv_cache=caches[0]), model(x, t, text, kv_cache=caches[1]))
    n = caches[0].chunk_tokens  # the written slot (the others hold uninitialised memory)
    assert torch.equal(caches[0].k[:, :, :, :n], caches[1].k[:, :, :, :n])
    with pytest.raises(ValueError, match="TextKV of 2 layers and batch 2 does not fit this model"):
        model(x[:1], t[:1], kv, chunk_frames=2)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_fused_kernel_on_cuda_at_the_5b_head_layout() -> None:
    pytest.importorskip("triton")
    cfg = WanConfig(dim=3072, ffn_dim=256, freq_dim=32, text_dim=32, num_heads=24, num_layers=2, in_dim=48,
                    out_dim=48, text_len=16)
    r = _model_check(cfg, "cuda")
    assert r["launches"] == 4 * 2 * 2 and r["cache_only_launches"] == 4, r
    assert r["out_rel"] < 1e-2 and r["k_rel"] < 1e-2 and r["v_rel"] < 1e-2, r
    for name, case in KERNEL_CASES.items():  # the kernel cases too, on GPU tensors
        k = _kernel_case(*case, device="cuda")
        assert k["k_ulps"] <= 1 and k["v_exact"] and k["outside_untouched"], (name, k)
        assert k["q_none"] or k["q_ulps"] <= 1, (name, k)
        assert k["pack_equal"], (name, k)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does this)")
    print(RESULT_TAG + json.dumps(_child()), flush=True)
