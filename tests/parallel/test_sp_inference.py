"""Sequence-parallel (Ulysses) cached inference equals single-process generation (spec 4).

World sizes 2 and 4 run this file as a script (one process per rank, gloo, FileStore rendezvous).
Every rank generates the same videos with `generate_latents(..., sequence_parallel=...)`: a rolling
window, a sink, multi-shot cuts (pins and RoPE offsets) and CFG; the test compares rank 0's latents
with the single-process result and checks that all ranks agree and the cache holds 1/sp of the heads.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longlive.models.wan import WanConfig, WanModel
from longlive.parallel.inference import plan_groups, sp_size_problem
from longlive.parallel.sequence import UlyssesGroup
from longlive.pipelines.chunked import ChunkedOptions, PhaseTimer, generate_latents

CONFIG = dataclasses.replace(WanConfig.preset("tiny"), num_heads=4)
B, C, F, H, W, CHUNK = 2, 48, 20, 4, 6, 4  # 5 chunks of 4 frames

SCENARIOS = {
    # rolling window of 3 chunks with a 1-chunk sink and multi-shot pins / RoPE offsets
    "multishot": (ChunkedOptions(sampling_steps=2, chunk_frames=CHUNK, local_attn_size=12, sink_size=4,
                                 multi_shot_sink=True, multi_shot_rope_offset=8.0), [[False, False, True, False, True],
                                                                                     [False, True, False, False, False]]),
    # classic sink, no cuts, classifier-free guidance (a second cache)
    "cfg": (ChunkedOptions(sampling_steps=2, chunk_frames=CHUNK, local_attn_size=8, sink_size=4, guidance_scale=3.0,
                           multi_shot_sink=False), None),
    # NVFP4 KV cache split by head: the per-chunk amax is reduced over the group, so it equals one process
    "fp4": (ChunkedOptions(sampling_steps=2, chunk_frames=CHUNK, local_attn_size=12, sink_size=4, kv_quant=True,
                           multi_shot_sink=True, multi_shot_rope_offset=8.0), [[False, False, True, False, True]] * 2),
    # ... and with K/V sent through the all-to-all as NVFP4 (the current chunk then sees its own K/V quantized)
    "fp4comm": (ChunkedOptions(sampling_steps=2, chunk_frames=CHUNK, local_attn_size=12, sink_size=4, kv_quant=True,
                               kv_quant_comm=True, multi_shot_sink=True, multi_shot_rope_offset=8.0),
                [[False, False, True, False, True]] * 2),
}


def make_inputs():
    torch.manual_seed(7)
    model = WanModel(CONFIG).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, C, F, H, W, generator=g)
    prompts = torch.randn(B, F // CHUNK, 5, CONFIG.text_dim, generator=g)
    negative = torch.randn(B, 5, CONFIG.text_dim, generator=g)
    return model, noise, prompts, negative


def run(name: str, sp: UlyssesGroup | None = None, timer: PhaseTimer | None = None) -> torch.Tensor:
    model, noise, prompts, negative = make_inputs()
    options, cuts = SCENARIOS[name]
    return generate_latents(model, noise, prompts, options=options, scene_cuts=cuts, negative_embeds=negative,
                            sequence_parallel=sp, timer=timer)


# --------------------------------------------------------------------------------------------- worker side
def _worker(out_dir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    sp = UlyssesGroup(dist.group.WORLD, world, rank)
    results = {}
    for name in SCENARIOS:
        timer = PhaseTimer()
        out = run(name, sp, timer)
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        results[name] = (out, all(torch.equal(gathered[0], g) for g in gathered), {k: len(v) for k, v in timer.seconds.items()})
    if rank == 0:
        torch.save(results, out_dir / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def sp_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"spinf{world}")
    procs = [subprocess.Popen([sys.executable, __file__, str(out)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world)}) for r in range(world)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * world, f"workers exited with {codes}"
    return world, torch.load(out / "results.pt")


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "fp4comm"])
def test_sp_generation_equals_single_process(sp_results, name):
    world, results = sp_results
    out, ranks_agree, phases = results[name]
    ref = run(name)
    assert ranks_agree, "ranks of one SP group returned different latents"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref[:, :, :CHUNK], ref[:, :, -CHUNK:])  # the video is not degenerate
    assert phases == {"dit": F // CHUNK, "refresh": F // CHUNK}


def test_fp4_all_to_all_stays_close_to_the_fp4_cache(sp_results):
    """FP4 K/V in the all-to-all quantizes the current chunk's own K/V too: close to, not equal to, the
    single-process FP4 KV cache (which attends to the current chunk in full precision)."""
    _, results = sp_results
    out, ranks_agree, _ = results["fp4comm"]
    ref = run("fp4")
    assert ranks_agree
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel
    full = run("multishot")  # the same video without FP4: FP4 communication adds little to FP4's own error
    assert rel < 2 * ((ref - full).norm() / full.norm()).item()


def test_sp_cache_holds_its_share_of_heads():
    from longlive.models.wan import KVCache

    full = KVCache.for_model(CONFIG, batch_size=1, latent_height=H, latent_width=W, chunk_frames=CHUNK, window_frames=8)
    half = KVCache.for_model(CONFIG, batch_size=1, latent_height=H, latent_width=W, chunk_frames=CHUNK, window_frames=8,
                             head_shards=2)
    assert half.num_heads == CONFIG.num_heads // 2 and half.nbytes * 2 == full.nbytes
    with pytest.raises(ValueError, match="head shards do not divide the 4 attention heads"):
        KVCache.for_model(CONFIG, batch_size=1, latent_height=H, latent_width=W, chunk_frames=CHUNK, head_shards=3)


def test_group_plans_and_clear_errors():
    assert plan_groups(8, 4, None, False, 24, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_groups(8, 4, 2, False, 24, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_groups(6, 4, None, True, 24, 8) == [[0, 1, 2, 3], [4, 5]]
    assert sp_size_problem(3, 24, 8) and "8 latent frames" in sp_size_problem(3, 24, 8)
    assert "24 attention heads" in sp_size_problem(16, 24, 16)
    with pytest.raises(ValueError, match="sp_size: 3 does not divide the 8 latent frames"):
        plan_groups(6, 3, None, False, 24, 8)
    with pytest.raises(ValueError, match=r"sp_size x dp_size = 4 x 1 = 4 processes, but torchrun started 8"):
        plan_groups(8, 4, 1, False, 24, 8)
    with pytest.raises(ValueError, match="does not divide the 6 processes"):
        plan_groups(6, 4, None, False, 24, 8)
    with pytest.raises(ValueError, match="last group of 3 ranks"):
        plan_groups(7, 4, None, True, 24, 8)


def test_jobs_are_spread_over_groups_without_loss():
    from longlive.parallel.inference import InferenceParallel

    groups = plan_groups(6, 2, None, False, 24, 8)
    jobs = list(range(7))
    shares = [InferenceParallel(g[0], 6, groups, i, None).my_jobs(jobs) for i, g in enumerate(groups)]
    assert sorted(j for s in shares for j in s) == jobs


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
