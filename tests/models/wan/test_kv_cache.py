"""KV cache rules (rolling window, sink, multi-shot pin, RoPE offset) against a literal token-level
simulation of the reference's shifting buffer (spec 2.3-2.6), over hundreds of chunks."""
import random

import pytest
import torch

from longlive.models.wan import KVCache, WanConfig, WanModel
from longlive.models.wan.rope import apply_rope, rope_cos_sin


class ReferenceCache:
    """Spec 2.3/2.5 arithmetic on a token buffer holding chunk ids (the reference moves data on roll)."""

    def __init__(self, capacity, chunk_tokens, sink_tokens, multi_shot_sink):
        self.C, self.T, self.sink = capacity, chunk_tokens, sink_tokens
        self.global_sink = sink_tokens if multi_shot_sink else 0
        self.pins = multi_shot_sink and sink_tokens > 0
        self.buf = [None] * capacity
        self.global_end = self.local_end = 0
        self.pinned_start, self.pinned_len = -1, 0

    def forward(self, current_start, chunk_id):
        n = self.T
        current_end = current_start + n
        if current_end > self.global_end and n + self.local_end > self.C:
            if self.pinned_start >= 0:
                floating = self.pinned_start != self.global_sink
                s_eff = self.global_sink if floating else self.global_sink + self.pinned_len
            else:
                floating, s_eff = False, max(self.global_sink, self.sink)
            evicted = n + self.local_end - self.C
            rolled = self.local_end - evicted - s_eff
            self.buf[s_eff:s_eff + rolled] = self.buf[s_eff + evicted:s_eff + evicted + rolled]
            if floating:
                self.pinned_start -= evicted
            self.local_end = self.local_end + (current_end - self.global_end) - evicted
            start = self.local_end - n
        else:
            start = self.local_end + (current_end - self.global_end) - n
            self.local_end += current_end - self.global_end
        self.buf[start:start + n] = [chunk_id] * n
        self.global_end = max(self.global_end, current_end)

    def recache(self, current_start):
        self.local_end, self.global_end, self.pinned_start = self.global_sink, current_start, -1

    def pin(self):
        if self.pins:
            self.pinned_start, self.pinned_len = self.local_end - self.T, min(self.sink, self.T)

    def attended(self):
        out = []
        for c in self.buf[: self.local_end]:
            if not out or out[-1] != c:
                out.append(c)
        return out

    def pinned_chunk(self):
        return None if self.pinned_start < 0 else self.buf[self.pinned_start]


CASES = [  # (window chunks, sink chunks, multi_shot_sink, shot_clean_recache)
    (4, 1, True, False), (4, 1, False, False), (4, 0, False, False), (6, 2, True, False),
    (3, 1, True, False), (5, 1, True, True), (4, 2, False, False), (7, 1, True, False),
]


@pytest.mark.parametrize("window,sink,multi,recache", CASES)
def test_cache_rules_match_reference_over_long_runs(window, sink, multi, recache):
    rng = random.Random(window * 100 + sink * 10 + multi)
    chunk_frames, tpf = 8, 3
    cache = KVCache(num_layers=1, batch_size=1, num_heads=1, head_dim=2, tokens_per_frame=tpf, chunk_frames=chunk_frames,
                    window_frames=window * chunk_frames, sink_frames=sink * chunk_frames, multi_shot_sink=multi,
                    rope_offset_per_shot=8, shot_clean_recache=recache, dtype=torch.float32)
    ref = ReferenceCache(window * chunk_frames * tpf, chunk_frames * tpf, sink * chunk_frames * tpf, multi)
    shots = 0
    for k in range(300):  # 2400 latent frames: well past the 1024-entry RoPE table of the reference
        cut = k > 0 and rng.random() < 0.15
        cache.begin_chunk(k * chunk_frames, scene_cut=cut)
        ref.forward(k * chunk_frames * tpf, k)
        for _ in range(rng.randint(1, 3)):  # denoising steps re-run the same chunk (overwrite)
            ref.forward(k * chunk_frames * tpf, k)
        assert cache.attended_chunks() == ref.attended(), f"chunk {k}"
        cache.prepare_refresh()
        if cut and recache:
            ref.recache(k * chunk_frames * tpf)
        ref.forward(k * chunk_frames * tpf, k)  # clean refresh
        assert cache.attended_chunks() == ref.attended(), f"refresh of chunk {k}"
        cache.end_chunk()
        if cut:
            ref.pin()
            shots += 1
        assert cache.pinned_chunk() == ref.pinned_chunk()
        assert cache.shot_index() == shots
        pos = cache.frame_positions()
        expected = torch.arange(k * 8, k * 8 + 8, dtype=torch.float64) + 8 * shots
        assert torch.equal(pos[0], expected)  # the cut chunk itself already uses the new shot's offset
        if k > 3 * window and not recache:
            assert len(cache.attended_chunks()) == window
            assert cache.attended_chunks()[:sink] == list(range(sink))


def test_cut_chunk_pin_survives_until_next_cut():
    cache = KVCache(num_layers=1, batch_size=1, num_heads=1, head_dim=2, tokens_per_frame=1, chunk_frames=8,
                    window_frames=32, sink_frames=8, multi_shot_sink=True, rope_offset_per_shot=8, dtype=torch.float32)
    seen = []
    for k in range(12):
        cache.begin_chunk(8 * k, scene_cut=(k == 5))
        cache.end_chunk()
        seen.append(cache.attended_chunks())
    assert seen[5] == [0, 3, 4, 5]
    assert seen[6] == [0, 4, 5, 6]  # floating pin: older chunk 3 evicted first
    assert seen[7] == [0, 5, 6, 7]  # pin reached the front: protected from now on
    assert seen[11] == [0, 5, 10, 11]
    assert cache.frame_positions()[0, 0].item() == 8 * 11 + 8  # one cut -> offset 8


def test_invalid_sizes_are_rejected():
    kw = dict(num_layers=1, batch_size=1, num_heads=1, head_dim=2, tokens_per_frame=1, chunk_frames=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot hold the sink"):
        KVCache(window_frames=16, sink_frames=8, multi_shot_sink=True, **kw)
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        KVCache(window_frames=20, **kw)
    with pytest.raises(ValueError, match="sink_frames=4"):
        KVCache(window_frames=32, sink_frames=4, **kw)
    with pytest.raises(ValueError, match="needs max_frames"):
        KVCache(window_frames=-1, **kw)
    cache = KVCache(window_frames=32, **kw)
    with pytest.raises(ValueError, match="expected the chunk starting at frame 0"):
        cache.begin_chunk(8)


def test_rope_positions_past_1024_are_exact():
    cfg = WanConfig.preset("tiny")
    pos = torch.tensor([[3.0, 1023.0, 1024.0, 2047.5, 5000.0]], dtype=torch.float64)
    cos, sin = rope_cos_sin(cfg, pos, 2, 3)
    x = torch.randn(1, cos.shape[1], 1, cfg.head_dim, dtype=torch.float64)
    out = apply_rope(x.float(), cos, sin).double()
    # reference: complex multiplication per token with angles p * theta^(-j/n) per axis
    nt, nh, nw = cfg.rope_split
    for tok in range(cos.shape[1]):
        f, rem = divmod(tok, 6)
        hh, ww = divmod(rem, 3)
        ang = torch.cat([pos[0, f] * 10000.0 ** (-torch.arange(nt, dtype=torch.float64) / nt),
                         hh * 10000.0 ** (-torch.arange(nh, dtype=torch.float64) / nh),
                         ww * 10000.0 ** (-torch.arange(nw, dtype=torch.float64) / nw)])
        z = torch.view_as_complex(x[0, tok, 0].view(-1, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
        assert torch.allclose(torch.view_as_real(z).flatten(), out[0, tok, 0], atol=1e-5)


@torch.no_grad()
def test_batch_with_per_sample_cuts_equals_single_samples():
    """Rolling + sink + pins with different scene cuts per sample: each sample of the batch gets
    exactly what it gets when generated alone (per-sample slots, pins and RoPE offsets)."""
    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    cuts = [[k in (3, 7) for k in range(10)], [k in (5,) for k in range(10)]]
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, cfg.in_dim, 80, 2, 2, generator=g)
    ctx = torch.randn(2, 5, cfg.text_dim, generator=g)
    kw = dict(batch_size=None, latent_height=2, latent_width=2, window_frames=24, sink_frames=8, multi_shot_sink=True,
              rope_offset_per_shot=8, dtype=torch.float32)

    def run(idx):
        cache = KVCache.for_model(cfg, **{**kw, "batch_size": len(idx)})
        outs = []
        for k in range(10):
            s = 8 * k
            cache.begin_chunk(s, scene_cut=[cuts[i][k] for i in idx])
            x = xs[idx][:, :, s:s + 8]
            t = torch.full((len(idx), 8), 500.0)
            outs.append(model(x, t, ctx[idx], kv_cache=cache))
            model(x, torch.zeros_like(t), ctx[idx], kv_cache=cache)
            cache.end_chunk()
        return torch.cat(outs, dim=2)

    both = run([0, 1])
    assert (both[0:1] - run([0])).abs().max() < 1e-5
    assert (both[1:2] - run([1])).abs().max() < 1e-5
