"""The chunked generation loop: equals teacher-forcing arithmetic, scene cuts drive pins and RoPE offsets."""
import pytest
import torch

from longlive.diffusion.samplers import FlowUniPCSampler
from longlive.models.wan import WanConfig, WanModel
from longlive.pipelines.chunked import ChunkedOptions, generate_latents

CFG = WanConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanModel(CFG).eval()


def _noise(b=1, f=24, seed=0):
    return torch.randn(b, CFG.in_dim, f, 4, 4, generator=torch.Generator().manual_seed(seed))


def _prompts(b=1, chunks=3, seed=1):
    return torch.randn(b, chunks, 8, CFG.text_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_generation_equals_sampling_with_teacher_forcing_context(model):
    """Each chunk is the UniPC solve of the TF velocity whose clean context is the generated chunks
    (refreshed at t=0): the KV cache, the refresh and the sampler compose exactly."""
    noise, prompts = _noise(), _prompts()
    opts = ChunkedOptions(sampling_steps=3, local_attn_size=-1, sink_size=0, multi_shot_sink=False)
    out = generate_latents(model, noise, prompts, options=opts)
    for k in range(3):
        sampler = FlowUniPCSampler(3)
        x = noise[:, :, 8 * k: 8 * k + 8]
        for t in sampler.timesteps.tolist():
            noisy = torch.zeros_like(noise)
            noisy[:, :, 8 * k: 8 * k + 8] = x
            tt = torch.full((1, 24), float(t))
            v = model(noisy, tt, prompts, chunk_frames=8, clean_x=out, clean_t=torch.zeros_like(tt))
            x = sampler.step(v[:, :, 8 * k: 8 * k + 8], x)
        assert (x - out[:, :, 8 * k: 8 * k + 8]).abs().max() < 1e-4


@torch.no_grad()
def test_scene_cuts_pin_chunks_and_offset_rope(model):
    trace = []
    cuts = [[False, False, True, False, False, True, False, False]]
    opts = ChunkedOptions(sampling_steps=2, local_attn_size=32, sink_size=8, multi_shot_sink=True, multi_shot_rope_offset=8)
    seen = []
    generate_latents(model, _noise(f=64), _prompts(chunks=8), options=opts, scene_cuts=cuts, trace=trace,
                     on_chunk=lambda k, x: seen.append((k, tuple(x.shape))))
    assert [s[0] for s in seen] == list(range(8)) and seen[0][1] == (1, CFG.in_dim, 8, 4, 4)
    assert [t.pinned[0] for t in trace] == [None, None, 2, 2, 2, 5, 5, 5]
    assert [t.shot_index[0] for t in trace] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [t.first_frame_position[0] for t in trace] == [8.0 * k + 8 * s for k, s in enumerate([0, 0, 1, 1, 1, 2, 2, 2])]
    assert trace[7].attended[0] == [0, 5, 6, 7]  # global sink + current shot's pinned first chunk + window
    assert trace[4].attended[0] == [0, 2, 3, 4]


@torch.no_grad()
def test_cfg_and_image_to_video(model):
    noise, prompts = _noise(), _prompts()
    neg = torch.randn(1, 8, CFG.text_dim)
    base = generate_latents(model, noise, prompts, options=ChunkedOptions(sampling_steps=2))
    same = generate_latents(model, noise, prompts, options=ChunkedOptions(sampling_steps=2), negative_embeds=neg)
    assert torch.equal(base, same)  # guidance 1: the negative prompt is not used, no second cache
    cfg = generate_latents(model, noise, prompts, options=ChunkedOptions(sampling_steps=2, guidance_scale=3.0), negative_embeds=neg)
    assert (cfg - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs negative prompt embeddings"):
        generate_latents(model, noise, prompts, options=ChunkedOptions(guidance_scale=3.0))
    image = torch.randn(1, CFG.in_dim, 1, 4, 4)
    i2v = generate_latents(model, noise, prompts, options=ChunkedOptions(sampling_steps=2), image_latent=image)
    assert torch.equal(i2v[:, :, :1], image)
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        generate_latents(model, _noise(f=12), _prompts(chunks=1))


@torch.no_grad()
def test_fp4_kv_cache_generation_tracks_the_full_precision_cache(model):
    """NVFP4 KV cache (spec 7.7): same cache rules (rolling window, sinks, pins, cuts, batch with different
    cuts), chunk 0 exact (it attends only to itself, unquantized), later chunks close to the BF16 cache."""
    cuts = [[False, False, True, False, False, False], [False, False, False, False, True, False]]
    noise, prompts = _noise(b=2, f=48), _prompts(b=2, chunks=6)
    common = dict(sampling_steps=2, local_attn_size=32, sink_size=8, multi_shot_sink=True, multi_shot_rope_offset=8)
    traces = {}
    outs = {}
    for name, extra in (("bf16", {}), ("fp4", dict(kv_quant=True)), ("fp4_plain", dict(kv_quant=True,
                                                                                         kv_quant_key_smoothing="none"))):
        traces[name] = []
        outs[name] = generate_latents(model, noise, prompts, options=ChunkedOptions(**common, **extra), scene_cuts=cuts,
                                      trace=traces[name])
    assert traces["fp4"] == traces["bf16"]
    assert traces["fp4"][5].attended == [[0, 2, 4, 5], [0, 3, 4, 5]]  # each sample's own pin and window
    ref, q = outs["bf16"], outs["fp4"]
    torch.testing.assert_close(q[:, :, :8], ref[:, :, :8], rtol=1e-5, atol=1e-5)
    err = float((q - ref).norm() / ref.norm())
    assert 0 < err < 0.01, err  # measured 0.0013 on the random tiny model (fp32)
    assert not torch.equal(outs["fp4_plain"], q)  # the key smoothing is in effect
