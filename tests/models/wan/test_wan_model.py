"""WanModel: config/presets, key layout, diffusers equivalence, and the execution modes agreeing."""
import dataclasses
import time

import pytest
import torch

from longlive.models.wan import KVCache, WanConfig, WanModel
from longlive.models.wan.state_dict import from_diffusers, to_diffusers

TINY = WanConfig.preset("tiny")


def _model(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return WanModel(cfg).eval()


def _inputs(b=2, f=16, h=4, w=6, prompts=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, TINY.in_dim, f, h, w, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    shape = (b, 10, TINY.text_dim) if prompts is None else (b, prompts, 10, TINY.text_dim)
    return x, t, torch.randn(shape, generator=g)


def expected_5b_keys():
    keys = {f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "head.head") for p in ("weight", "bias")}
    keys.add("head.modulation")
    for i in range(30):
        b = f"blocks.{i}"
        keys.add(f"{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            keys |= {f"{b}.{attn}.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"}
        keys |= {f"{b}.norm3.weight", f"{b}.norm3.bias"}
        keys |= {f"{b}.ffn.{n}.{p}" for n in (0, 2) for p in ("weight", "bias")}
    return keys


def test_5b_preset_on_meta_has_spec_keys_and_5b_params():
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = WanModel(WanConfig.preset("wan2.2-ti2v-5b"))
    assert time.perf_counter() - t0 < 1.0  # "well under a second": includes no real init work
    sd = model.state_dict()
    assert set(sd) == expected_5b_keys()
    assert tuple(sd["blocks.0.modulation"].shape) == (1, 6, 3072)
    assert tuple(sd["head.modulation"].shape) == (1, 2, 3072)
    assert tuple(sd["patch_embedding.weight"].shape) == (3072, 48, 1, 2, 2)
    assert tuple(sd["head.head.weight"].shape) == (192, 3072)
    assert tuple(sd["time_projection.1.weight"].shape) == (18432, 3072)
    n = sum(p.numel() for p in model.parameters())
    assert 4.95e9 < n < 5.05e9
    blocks = sum(p.numel() for k, p in model.named_parameters() if k.startswith("blocks") and p.dim() == 2)
    assert 4.90e9 < blocks < 4.92e9  # the 300 block linears (spec 1.1: ~4.91 B)


def test_presets_and_config_parsing():
    cfg = WanConfig.preset("Wan2.2-TI2V-5B")
    assert cfg.head_dim == 128 and cfg.rope_split == (22, 21, 21)
    assert TINY.rope_split == (6, 5, 5)
    with pytest.raises(ValueError, match="Did you mean 'tiny'"):
        WanConfig.preset("tinny")
    orig = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "ti2v", "dim": 3072, "num_heads": 24,
            "num_layers": 30, "in_dim": 48, "out_dim": 48, "text_len": 512, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256}
    assert WanConfig.from_dict(orig) == cfg
    assert WanConfig.from_dict(cfg.to_diffusers_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Wan config keys \\['dimm'\\]"):
        WanConfig.from_dict({"dimm": 3})


def test_bidirectional_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = _model()
    ref = diffusers.WanTransformer3DModel(**{k: v for k, v in TINY.to_diffusers_dict().items() if not k.startswith("_") and k != "text_len"}).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    x, t, c = _inputs(f=5)
    t[:, 0] = 0  # I2V-style first frame
    c[:, :, 7:] = 0
    with torch.no_grad():
        y = ours(x, t, c)
        tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
        ctx = torch.nn.functional.pad(c, (0, 0, 0, TINY.text_len - c.shape[1]))  # diffusers does not pad itself
        y_ref = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), ctx).sample
    assert y.shape == x.shape
    assert (y - y_ref).abs().max() < 1e-4
    # and back: diffusers weights load into ours (key conversion the other way)
    ours2 = WanModel(TINY).eval()
    ours2.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    with torch.no_grad():
        assert torch.equal(ours2(x, t, c), y)


def test_timesteps_must_be_per_frame():
    model = _model()
    x, t, c = _inputs(f=8)
    with pytest.raises(ValueError, match="one timestep per latent frame"):
        model(x, t[:, 0], c)


def _chunkwise(model, x, t, c, chunk=8, **cache_kw):
    b, _, f, h, w = x.shape
    cache = KVCache.for_model(TINY, batch_size=b, latent_height=h, latent_width=w, chunk_frames=chunk,
                              window_frames=-1, max_frames=f, dtype=torch.float32, **cache_kw)
    outs = []
    for s in range(0, f, chunk):
        cache.begin_chunk(s)
        ctx = c[:, s // chunk] if c.dim() == 4 else c
        outs.append(model(x[:, :, s:s + chunk], t[:, s:s + chunk], ctx, kv_cache=cache))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_sample_prediction_turns_the_head_output_into_the_same_velocity():
    """prediction="sample": the head's output is x0; forward returns (x_t - x0) / sigma in every mode, so
    x_t - sigma * v gives x0 back (sigma >= SAMPLE_MIN_SIGMA), and the config round-trips."""
    from longlive.models.wan.model import SAMPLE_MIN_SIGMA
    cfg = dataclasses.replace(TINY, prediction="sample")
    flow, sample = _model(), _model(cfg=cfg)  # same seed: same weights
    x, t, c = _inputs(f=16, prompts=2)
    t[0, :8] = 10.0  # sigma 0.01: the floor applies
    sigma = (t / 1000).clamp_min(SAMPLE_MIN_SIGMA)[:, None, :, None, None]
    x0 = flow(x, t, c, chunk_frames=8)  # the raw head output
    v = sample(x, t, c, chunk_frames=8)
    assert torch.allclose(v, (x - x0) / sigma, atol=1e-4, rtol=1e-5)
    assert torch.allclose((x - sigma * v)[1], x0[1], atol=1e-5)
    # the cached chunk mode converts too (one chunk, empty cache: the same as the first block-causal chunk)
    cache = KVCache.for_model(cfg, batch_size=2, latent_height=4, latent_width=6, window_frames=-1, max_frames=16,
                              dtype=torch.float32)
    cache.begin_chunk(0)
    assert torch.allclose(sample(x[:, :, :8], t[:, :8], c[:, 0], kv_cache=cache), v[:, :, :8], atol=1e-4, rtol=1e-5)
    assert WanConfig.from_dict(cfg.to_dict()) == cfg and WanConfig.from_dict(cfg.to_diffusers_dict()) == cfg
    assert "prediction" not in TINY.to_dict() and "prediction" not in TINY.to_diffusers_dict()
    assert WanConfig.preset("synth").prediction == "sample"
    with pytest.raises(ValueError, match="prediction='eps' must be 'flow' or 'sample'"):
        dataclasses.replace(TINY, prediction="eps")


@torch.no_grad()
def test_kv_cache_chunks_equal_block_causal_forward():
    model = _model()
    x, t, c = _inputs(f=24, prompts=3)
    full = model(x, t, c, chunk_frames=8)
    chunked = _chunkwise(model, x, t, c)
    assert (full - chunked).abs().max() < 1e-4
    # the mask matters: the bidirectional forward differs in the early chunks
    assert (model(x, t, c) - full)[:, :, :8].abs().max() > 1e-3


@torch.no_grad()
def test_teacher_forcing_noisy_half_equals_cached_inference():
    model = _model()
    x_noisy, t, c = _inputs(f=24, prompts=3)
    x_clean = torch.randn_like(x_noisy)
    clean_t = torch.zeros_like(t)
    tf = model(x_noisy, t, c, chunk_frames=8, clean_x=x_clean, clean_t=clean_t)
    b, _, f, h, w = x_noisy.shape
    cache = KVCache.for_model(TINY, batch_size=b, latent_height=h, latent_width=w, window_frames=-1, max_frames=f, dtype=torch.float32)
    outs = []
    for k, s in enumerate(range(0, f, 8)):
        cache.begin_chunk(s)
        outs.append(model(x_noisy[:, :, s:s + 8], t[:, s:s + 8], c[:, k], kv_cache=cache))
        model(x_clean[:, :, s:s + 8], clean_t[:, s:s + 8], c[:, k], kv_cache=cache)  # clean refresh
    assert (tf - torch.cat(outs, dim=2)).abs().max() < 1e-4


@torch.no_grad()
def test_per_chunk_prompts_route_to_their_chunk():
    model = _model()
    x, t, c = _inputs(f=16, prompts=2)
    base = model(x, t, c, chunk_frames=8)
    c2 = c.clone()
    c2[:, 1] = torch.randn_like(c2[:, 1])  # change only the second chunk's prompt
    out = model(x, t, c2, chunk_frames=8)
    assert torch.equal(out[:, :, :8], base[:, :, :8])  # block-causal: chunk 0 cannot see chunk 1's prompt
    assert (out[:, :, 8:] - base[:, :, 8:]).abs().max() > 1e-3


def test_teacher_forcing_backward_on_cpu():
    model = _model()
    x, t, c = _inputs(b=1, f=16, prompts=2)
    out = model(x, t, c, chunk_frames=8, clean_x=torch.randn_like(x), clean_t=torch.zeros_like(t))
    out.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_compiled_blocks_equal_eager_in_cached_inference():
    model = _model()
    x, t, c = _inputs(b=1, f=24, h=4, w=4, prompts=3)
    eager = _chunkwise(model, x, t, c)
    model.compile_blocks()
    compiled = _chunkwise(model, x, t, c)
    assert (eager - compiled).abs().max() < 1e-4
