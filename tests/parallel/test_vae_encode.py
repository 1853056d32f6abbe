"""Distributed chunk-halo VAE encoding (spec 5.3): gloo on CPU with 2 and 4 processes.

Each world size is launched once (this file run as a script, one process per rank, a FileStore
rendezvous in a temp dir, so no port can clash); the workers run every scenario and save their
results, which the tests compare against single-process encodes.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longlive.models.vae import WanVAE, WanVAEConfig, encode_halo_window, halo_window, sp_halo_windows
from longlive.parallel.vae_encode import broadcast_object, encode_sharded

F = 48  # latent frames; 1 + 4(F-1) = 189 raw frames
HEIGHT, WIDTH = 32, 16  # latents 2x1 with the tiny preset (spatial stride 16)
# Tiny preset (1 res block per stage): latent k depends on raw frames >= 4(k-20), so a halo of 19
# latents reproduces the full encode exactly and 18 misses frames that still matter (by ~1e-6).
TINY_EXACT_HALO = 19
VAE_SEED = 7
# the multi-process tests share one launch per world size (a few seconds of process start-up each)
SLOW = pytest.mark.slow
META = {"prompts": ["a cat", "a dog"], "num_valid_latent_frames": [48, 40], "idx": 3}


def make_vae() -> WanVAE:
    """The same tiny random-weight VAE in every process (default init from a fixed seed)."""
    torch.manual_seed(VAE_SEED)
    return WanVAE(WanVAEConfig.preset("tiny")).eval()


def make_video(seed: int, latent_frames: int = F, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = 1 + 4 * (latent_frames - 1)
    return (torch.rand(batch, 3, t, HEIGHT, WIDTH, generator=gen) * 2 - 1).to(dtype)


# --------------------------------------------------------------------------------------------- worker side
def _attempt(fn):
    try:
        return fn()
    except Exception as exc:  # recorded and asserted on by the tests
        return f"{type(exc).__name__}: {exc}"


def _worker(out_dir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    vae = make_vae()
    world_group = dist.group.WORLD
    last = world - 1
    res: dict[str, object] = {}

    def enc(frames, src, halo, latent_frames=F, group=world_group):
        return encode_sharded(vae, frames, latent_frames=latent_frames, halo_latents=halo, group=group, src=src)

    # frames only on the source rank; everyone else passes None
    res["exact"] = enc(make_video(1) if rank == 0 else None, 0, TINY_EXACT_HALO)
    res["short_src_last"] = enc(make_video(2) if rank == last else None, last, 4)
    # non-source ranks hold some other tensor: it is ignored (and never sent or read)
    decoy = torch.zeros(1, 3, 5, 16, 16)
    res["decoy"] = enc(make_video(3) if rank == 0 else decoy, 0, 4)
    res["bf16"] = enc(make_video(4, dtype=torch.bfloat16) if rank == 0 else None, 0, 2)
    # errors: every rank must raise (no rank left waiting in recv)
    res["indivisible"] = _attempt(lambda: enc(make_video(5, F + 1) if rank == 0 else None, 0, 4, latent_frames=F + 1))
    res["wrong_t"] = _attempt(lambda: enc(make_video(6)[:, :, :-4] if rank == 0 else None, 0, 4))
    res["src_none"] = _attempt(lambda: enc(None, 0, 4))
    res["bad_src"] = _attempt(lambda: enc(None, world, 4))
    res["after_errors"] = enc(make_video(7) if rank == 0 else None, 0, 4)  # the group still works

    res["meta"] = broadcast_object(META if rank == last else None, world_group, src=last)
    res["meta_no_group"] = broadcast_object({"rank": rank})

    if world == 4:  # two SP groups of two: group ranks differ from global ranks
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = groups[rank // 2]
        gsrc = 1  # group rank 1 = global rank 1 and 3
        holder = dist.get_rank(mine) == gsrc
        res["sub"] = enc(make_video(10 + rank // 2, 16) if holder else None, gsrc, 3, latent_frames=16, group=mine)
        res["sub_meta"] = broadcast_object({"group": rank // 2} if holder else None, mine, src=gsrc)
    if world == 2:  # SP groups of one rank: no SP, every rank encodes its own whole clip
        groups = [dist.new_group([0]), dist.new_group([1])]
        res["single"] = enc(make_video(20 + rank, 4), 0, 4, latent_frames=4, group=groups[rank])

    dist.barrier()
    torch.save(res, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- test side
@pytest.fixture(scope="module", params=[2, 4], ids=["sp2", "sp4"])
def run(request, tmp_path_factory, launch_workers):
    world = request.param
    results, logs = launch_workers(__file__, world, tmp_path_factory.mktemp(f"sp{world}"))
    return world, results, logs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread for every test here (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return make_vae()


def _reference(vae: WanVAE, video: torch.Tensor, sp: int, halo: int, latent_frames: int = F) -> list[torch.Tensor]:
    return [encode_halo_window(vae, video[:, :, w.raw_start : w.raw_end], w)
            for w in sp_halo_windows(latent_frames, sp, halo, video.shape[2])]


@SLOW
@pytest.mark.parametrize("key,seed,halo,dtype", [
    ("exact", 1, TINY_EXACT_HALO, torch.float32),
    ("short_src_last", 2, 4, torch.float32),
    ("decoy", 3, 4, torch.float32),
    ("bf16", 4, 2, torch.bfloat16),
    ("after_errors", 7, 4, torch.float32),
])
def test_each_rank_equals_single_process_halo_encode(run, vae, key, seed, halo, dtype) -> None:
    world, results, _ = run
    ref = _reference(vae, make_video(seed, dtype=dtype), world, halo)
    for rank in range(world):
        got = results[rank][key]
        assert got.shape == (2, 48, F // world, HEIGHT // 16, WIDTH // 16)
        assert torch.equal(got, ref[rank]), f"{key}: rank {rank} differs from the single-process encode"


@SLOW
def test_large_halo_concatenation_equals_full_encode(run, vae) -> None:
    world, results, _ = run
    full = vae.encode(make_video(1))
    windows = sp_halo_windows(F, world, TINY_EXACT_HALO)
    assert windows[-1].pseudo_prefix == 1 and windows[-1].raw_start > 0  # a real halo window, not the clip start
    assert torch.equal(torch.cat([results[r]["exact"] for r in range(world)], dim=2), full)
    # a short halo is only approximate (rank 0 always starts at frame 0, so it stays exact)
    short = vae.encode(make_video(2))
    got = torch.cat([results[r]["short_src_last"] for r in range(world)], dim=2)
    per = F // world
    assert torch.equal(got[:, :, :per], short[:, :, :per])
    assert not torch.equal(got, short)
    assert (got - short).abs().max() < 0.5


def test_tiny_preset_exact_halo_bound(vae) -> None:
    """The tiny preset's receptive field: a halo of 19 latents is exact (fp64 and fp32), 18 is not."""
    video = make_video(11, latent_frames=30, batch=1)
    exact = halo_window(29, 30, TINY_EXACT_HALO, video.shape[2])
    short = halo_window(29, 30, TINY_EXACT_HALO - 1, video.shape[2])
    assert exact.raw_start > 0 and exact.pseudo_prefix == 1
    # fp64 and un-normalised, so that no rounding can hide a dependence
    vae64 = make_vae().double()
    video64 = video.double()
    full = vae64.encode_raw(video64)[:, :, 29:]
    for window, equal in ((exact, True), (short, False)):
        got = vae64.encode_raw(video64[:, :, window.raw_start : window.raw_end])[:, :, window.drop :]
        assert torch.equal(got, full) is equal
    full32 = vae.encode(video)[:, :, 29:]
    assert torch.equal(encode_halo_window(vae, video[:, :, exact.raw_start : exact.raw_end], exact), full32)


@SLOW
def test_errors_raise_on_every_rank(run) -> None:
    world, results, _ = run
    for rank in range(world):
        r = results[rank]
        assert r["indivisible"].startswith("ValueError") and f"multiple of the sequence-parallel size ({world})" in r["indivisible"]
        assert f"latent_frames ({F + 1})" in r["indivisible"]
        assert r["bad_src"].startswith("ValueError") and f"src must be a group rank in [0, {world})" in r["bad_src"]
        if rank == 0:
            assert r["wrong_t"].startswith("ValueError")
            assert "latent_frames=48 needs T = 4(F-1)+1 = 189" in r["wrong_t"] and "T=185" in r["wrong_t"]
            assert "pass latent_frames=47" in r["wrong_t"]
            assert r["src_none"].startswith("ValueError") and "got None" in r["src_none"]
        else:
            assert r["wrong_t"].startswith("RuntimeError")
            assert "source rank (group rank 0, global rank 0) rejected the batch" in r["wrong_t"] and "T=185" in r["wrong_t"]
            assert r["src_none"].startswith("RuntimeError") and "frames=None" in r["src_none"]


@SLOW
def test_non_source_ranks_need_no_frames(run) -> None:
    """Frames live on one rank only (here the last one); decoy frames elsewhere are ignored with a warning."""
    world, results, logs = run
    # "short_src_last": only the last rank had the video; every other rank passed None and got its shard
    assert all(results[r]["short_src_last"].shape[2] == F // world for r in range(world))
    warned = [r for r in range(world) if "ignores the frames it was given" in logs[r]]
    assert warned == list(range(1, world))


@SLOW
def test_broadcast_object(run) -> None:
    world, results, _ = run
    for rank in range(world):
        assert results[rank]["meta"] == META
        assert results[rank]["meta_no_group"] == {"rank": rank}  # group None: no SP, returned unchanged
    if world == 4:
        assert [results[r]["sub_meta"] for r in range(4)] == [{"group": 0}] * 2 + [{"group": 1}] * 2


@SLOW
def test_subgroups_convert_group_ranks_to_global_ranks(run, vae) -> None:
    world, results, _ = run
    if world != 4:
        pytest.skip("subgroups of two need four processes")
    for g in range(2):
        ref = _reference(vae, make_video(10 + g, 16), 2, 3, latent_frames=16)
        for grank in range(2):
            assert torch.equal(results[2 * g + grank]["sub"], ref[grank])


@SLOW
def test_group_of_one_encodes_the_whole_clip(run, vae) -> None:
    world, results, _ = run
    if world != 2:
        pytest.skip("groups of one are built in the two-process run")
    for rank in range(2):
        assert torch.equal(results[rank]["single"], vae.encode(make_video(20 + rank, 4)))


def test_no_sp_encodes_whole_clip_and_checks_frames(vae) -> None:
    video = make_video(30, 4)
    assert torch.equal(encode_sharded(vae, video, latent_frames=4, halo_latents=2), vae.encode(video))
    with pytest.raises(ValueError, match=r"needs T = 4\(F-1\)\+1 = 13 raw frames, but frames has T=12.*trim or pad"):
        encode_sharded(vae, video[:, :, :12], latent_frames=4, halo_latents=2)
    with pytest.raises(ValueError, match="latent_frames=3 needs T = 4\\(F-1\\)\\+1 = 9 .* T=13 .*pass latent_frames=4"):
        encode_sharded(vae, video, latent_frames=3, halo_latents=2)
    with pytest.raises(ValueError, match="got None"):
        encode_sharded(vae, None, latent_frames=4, halo_latents=2)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        encode_sharded(vae, video[0], latent_frames=4, halo_latents=2)
    assert broadcast_object([1, 2]) == [1, 2]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
