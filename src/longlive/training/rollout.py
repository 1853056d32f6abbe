"""On-policy rollout of the student for DMD ("backward simulation", spec 6.3).

The student generates a clip chunk by chunk exactly as at inference (KV cache, the same FlowUniPC
schedule, sink / multi-shot pin and RoPE offset driven by EACH sample's own scene cuts), but each
chunk stops at a random exit step k: steps before k run without gradient, and the chunk's output is
the student's x0 prediction at step k, WITH gradient. The clean refresh that writes the chunk into
the KV cache runs on the detached output, exactly clean (t = 0), so no gradient crosses chunks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from longlive.diffusion.samplers import make_sampler
from longlive.models.wan import KVCache
from longlive.pipelines.chunked import ChunkedOptions

Velocity = Callable[..., torch.Tensor]


def rollout(model: Velocity, config, noise: torch.Tensor, prompt_embeds: torch.Tensor, *, options: ChunkedOptions,
            exit_step: int | Sequence[int], scene_cuts: Sequence[Sequence[bool]] | None = None,
            image_latent: torch.Tensor | None = None, grad: bool = True) -> torch.Tensor:
    """Student clip `[B, C, F, H, W]` from `noise`; differentiable at each chunk's exit step when `grad`.

    `model(x, t, context, kv_cache=...)` is the student (a WanModel or a role wrapper around one), and
    `model.refresh_cache(x, t, context, kv_cache=...)` its clean refresh;
    `exit_step` is one step index for every chunk (same_step_across_blocks) or one per chunk.
    """
    b, c, f, h, w = noise.shape
    n = options.chunk_frames
    if f % n:
        raise ValueError(f"rollout: {f} latent frames are not whole chunks of {n}")
    chunks = f // n
    exits = [int(exit_step)] * chunks if isinstance(exit_step, int) else [int(e) for e in exit_step]
    if len(exits) != chunks or not all(0 <= e < options.sampling_steps for e in exits):
        raise ValueError(f"rollout: exit steps {exits} must be {chunks} values in [0, {options.sampling_steps})")
    if grad and options.local_attn_size != -1 and options.local_attn_size < f:
        raise ValueError(f"rollout: a {f}-frame rollout with gradient needs a KV window covering it (got "
                         f"{options.local_attn_size} frames): exit-step forwards read earlier chunks' slots again in backward")
    if prompt_embeds.shape[:2] != (b, chunks):
        raise ValueError(f"rollout: prompt_embeds {tuple(prompt_embeds.shape)} must be [B={b}, chunks={chunks}, L, D]")
    cuts = [[False] * chunks for _ in range(b)] if scene_cuts is None else [list(map(bool, row)) for row in scene_cuts]
    if len(cuts) != b or any(len(row) != chunks for row in cuts):
        raise ValueError(f"rollout: scene_cuts must be [B={b}][chunks={chunks}]")
    cache = KVCache.for_model(config, batch_size=b, latent_height=h, latent_width=w, chunk_frames=n,
                              window_frames=options.local_attn_size, sink_frames=options.sink_size,
                              multi_shot_sink=options.multi_shot_sink, rope_offset_per_shot=options.multi_shot_rope_offset,
                              t_scale=options.t_scale, shot_clean_recache=options.shot_clean_recache, max_frames=f,
                              dtype=noise.dtype, device=noise.device)
    sampler = make_sampler(options.sampler, options.sampling_steps, options.timestep_shift)
    timesteps = sampler.timesteps.tolist()
    zeros_t = torch.zeros(b, n, device=noise.device)
    outputs = []
    for k in range(chunks):
        start = k * n
        cache.begin_chunk(start, [row[k] for row in cuts])
        x = noise[:, :, start : start + n]
        sampler.reset()
        clamp = image_latent is not None and k == 0
        out = None
        for i, t in enumerate(timesteps[: exits[k] + 1]):
            tt = torch.full((b, n), float(t), device=noise.device)
            if clamp:
                x = torch.cat([image_latent.to(x.dtype), x[:, :, 1:]], dim=2)
                tt[:, 0] = 0
            last = i == exits[k]
            with torch.set_grad_enabled(grad and last):
                v = model(x, tt, prompt_embeds[:, k], kv_cache=cache)
                if last:
                    out = sampler.x0(v, x)
                else:
                    x = sampler.step(v, x)
        if clamp:
            out = torch.cat([image_latent.to(out.dtype), out[:, :, 1:]], dim=2)
        with torch.no_grad():
            cache.prepare_refresh()
            model.refresh_cache(out.detach(), zeros_t, prompt_embeds[:, k], kv_cache=cache)
            cache.end_chunk()
        outputs.append(out)
    return torch.cat(outputs, dim=2)
