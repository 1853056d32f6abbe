"""Chunk-by-chunk AR generation: the denoising loop with the KV cache (spec 3.2-3.5).

For each chunk of `chunk_frames` latent frames: N sampler steps (each a DiT call at the chunk's
timestep, with CFG when guidance != 1), a clean refresh at t=0 that overwrites the chunk's K/V,
the shot pin and RoPE offset at scene cuts, then the chunk is handed to `on_chunk` (streaming
decode) and stored. Latents use the DiT layout `[B, C, F, H, W]` throughout.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..diffusion.samplers import make_sampler
from ..models.wan import KVCache, WanModel


@dataclass(frozen=True)
class ChunkedOptions:
    """Sampling and cache settings of one generation call (field names follow the `inference` config)."""

    sampling_steps: int = 4
    guidance_scale: float = 1.0
    chunk_frames: int = 8
    local_attn_size: int = 32  # window in latent frames; -1 = the whole video
    sink_size: int = 8
    multi_shot_sink: bool = True
    multi_shot_rope_offset: float = 8.0
    shot_clean_recache: bool = False
    t_scale: float = 1.0
    timestep_shift: float = 5.0
    sampler: str = "unipc"
    kv_quant: bool = False  # NVFP4 KV cache (spec 7.7)
    kv_quant_scale_rule: str = "mse"
    kv_quant_key_smoothing: str = "channel_mean"
    kv_quant_backend: str = "cuda"  # cuda: dequantize + cuDNN; triton: fused FP4 attention; pytorch: reference
    kv_quant_comm: bool = False  # sequence parallel + kv_quant: K/V cross the all-to-all as NVFP4


ChunkCallback = Callable[[int, torch.Tensor], None]


class PhaseTimer:
    """Seconds of named phases, one entry per occurrence (per chunk). On CUDA each phase is bracketed by
    events on the current stream (no synchronisation, so work on other streams, such as an asynchronous
    VAE decode, still overlaps); elsewhere by wall time. Disabled, it costs nothing."""

    def __init__(self, enabled: bool = True, device: torch.device | str | None = None) -> None:
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else None
        self._pending: dict[str, list] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device is not None and self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.setdefault(name, []).append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._pending.setdefault(name, []).append(time.perf_counter() - t0)

    @property
    def seconds(self) -> dict[str, list[float]]:
        """Per-phase durations in seconds (waits for the recorded events)."""
        out = {}
        for name, items in self._pending.items():
            vals = []
            for it in items:
                if isinstance(it, tuple):
                    it[1].synchronize()
                    vals.append(it[0].elapsed_time(it[1]) / 1000.0)
                else:
                    vals.append(it)
            out[name] = vals
        return out


@dataclass(frozen=True)
class ChunkTrace:
    """Cache state after a chunk, per sample: what the next chunk sees (for tests and debugging)."""

    chunk: int
    attended: list[list[int]]
    pinned: list[int | None]
    shot_index: list[int]
    first_frame_position: list[float]


@torch.no_grad()
def generate_latents(
    model: WanModel,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    options: ChunkedOptions = ChunkedOptions(),
    scene_cuts: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    negative_embeds: torch.Tensor | None = None,
    image_latent: torch.Tensor | None = None,
    on_chunk: ChunkCallback | None = None,
    trace: list["ChunkTrace"] | None = None,
    sequence_parallel: Any = None,
    timer: "PhaseTimer | None" = None,
) -> torch.Tensor:
    """Generate latents `[B, C, F, H, W]` from `noise` (same shape) and per-chunk prompt embeddings.

    prompt_embeds: `[B, num_chunks, L, text_dim]` (or `[B, L, text_dim]`: one prompt for all chunks).
    scene_cuts: `[B, num_chunks]` booleans (a chunk that starts a new shot); None = single shot.
    negative_embeds: `[B, L, text_dim]`, required when guidance_scale != 1 (a second KV cache is
    allocated only then). image_latent: `[B, C, 1, H, W]` for image-to-video (frame 0 clamped).
    trace: if a list is given, one `ChunkTrace` per chunk is appended (cache state after the chunk).
    sequence_parallel: a `longlive.parallel.sequence.UlyssesGroup`: every rank of the group calls this
    with the same inputs and gets the same latents, computing its share of every chunk (spec 4).
    timer: a `PhaseTimer` that records the seconds of each chunk's denoising steps ("dit") and refresh.
    """
    b, c, f, h, w = noise.shape
    n = options.chunk_frames
    if f % n:
        raise ValueError(f"the number of latent frames ({f}) must be a multiple of chunk_frames ({n})")
    num_chunks = f // n
    if prompt_embeds.dim() == 3:
        prompt_embeds = prompt_embeds[:, None].expand(-1, num_chunks, -1, -1)
    if prompt_embeds.shape[:2] != (b, num_chunks):
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} must be [B={b}, num_chunks={num_chunks}, L, D]")
    cuts = torch.zeros(b, num_chunks, dtype=torch.bool) if scene_cuts is None else torch.as_tensor(scene_cuts, dtype=torch.bool)
    if cuts.shape != (b, num_chunks):
        raise ValueError(f"scene_cuts {tuple(cuts.shape)} must be [B={b}, num_chunks={num_chunks}]")
    cut_rows = cuts.cpu().tolist()
    use_cfg = options.guidance_scale != 1.0
    if use_cfg and negative_embeds is None:
        raise ValueError(f"guidance_scale={options.guidance_scale} needs negative prompt embeddings")
    if image_latent is not None and tuple(image_latent.shape) != (b, c, 1, h, w):
        raise ValueError(f"image_latent {tuple(image_latent.shape)} must be [B, C, 1, H, W] = {(b, c, 1, h, w)}")

    cache_kw = dict(batch_size=b, latent_height=h, latent_width=w, chunk_frames=n, window_frames=options.local_attn_size,
                    sink_frames=options.sink_size, multi_shot_sink=options.multi_shot_sink,
                    rope_offset_per_shot=options.multi_shot_rope_offset, t_scale=options.t_scale,
                    shot_clean_recache=options.shot_clean_recache, max_frames=f, dtype=noise.dtype, device=noise.device,
                    kv_quant=options.kv_quant, kv_quant_rule=options.kv_quant_scale_rule,
                    key_smoothing=options.kv_quant_key_smoothing, kv_quant_backend=options.kv_quant_backend,
                    head_shards=1 if sequence_parallel is None else sequence_parallel.size,
                    kv_quant_group=None if sequence_parallel is None else sequence_parallel.group,
                    kv_quant_comm=options.kv_quant_comm and sequence_parallel is not None)
    caches = [KVCache.for_model(model.config, **cache_kw)]
    if use_cfg:
        caches.append(KVCache.for_model(model.config, **cache_kw))
    sampler = make_sampler(options.sampler, options.sampling_steps, options.timestep_shift)
    timesteps = sampler.timesteps.tolist()
    out = torch.empty_like(noise)
    zeros_t = torch.zeros(b, n, device=noise.device)

    sp = sequence_parallel
    timer = timer or PhaseTimer(enabled=False)

    # cross-attention K/V once per chunk (its denoising steps and refresh share them; the negative prompt's
    # once per video), not once per forward
    negative_kv = model.text_kv(negative_embeds) if use_cfg else None

    def velocity(x, t, text_kv):
        v = model(x, t, text_kv, kv_cache=caches[0], sequence_parallel=sp)
        if use_cfg:
            v_u = model(x, t, negative_kv, kv_cache=caches[1], sequence_parallel=sp)
            v = v_u + options.guidance_scale * (v - v_u)
        return v

    for k in range(num_chunks):
        start = k * n
        for cache in caches:
            cache.begin_chunk(start, [row[k] for row in cut_rows])
        x = noise[:, :, start : start + n]
        clamp = image_latent is not None and k == 0
        sampler.reset()
        with timer.phase("dit"):
            text_kv = model.text_kv(prompt_embeds[:, k])
            for t in timesteps:
                tt = torch.full((b, n), float(t), device=noise.device)
                if clamp:
                    x = torch.cat([image_latent.to(x.dtype), x[:, :, 1:]], dim=2)
                    tt[:, 0] = 0
                x = sampler.step(velocity(x, tt, text_kv), x)
            if clamp:
                x = torch.cat([image_latent.to(x.dtype), x[:, :, 1:]], dim=2)
        with timer.phase("refresh"):
            for cache in caches:
                cache.prepare_refresh()
            model.refresh_cache(x, zeros_t, text_kv, kv_cache=caches[0], sequence_parallel=sp)
            if use_cfg:
                model.refresh_cache(x, zeros_t, negative_kv, kv_cache=caches[1], sequence_parallel=sp)
            for cache in caches:
                cache.end_chunk()
        out[:, :, start : start + n] = x
        if on_chunk is not None:
            on_chunk(k, x)
        if trace is not None:
            cache = caches[0]
            trace.append(ChunkTrace(k, [cache.attended_chunks(i) for i in range(b)], [cache.pinned_chunk(i) for i in range(b)],
                                    [cache.shot_index(i) for i in range(b)], cache.frame_positions()[:, 0].tolist()))
    return out
