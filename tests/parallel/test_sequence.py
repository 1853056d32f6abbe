"""Sequence-parallel teacher forcing (spec 5.2) equals the single-process objective.

World sizes 2 and 4 run once each (this file as a script, one process per rank, gloo with a
FileStore rendezvous); every rank computes its share of the loss and its gradients for the balanced
and the plain layout, the shares are summed over the group, and the tests compare them with the
single-process teacher-forcing forward on the same inputs.
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

from longlive.diffusion.schedule import TrainingSchedule
from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.attention import ChunkLayout
from longlive.parallel.sequence import SequenceParallel, shard_sequence
from longlive.training.teacher_forcing import TeacherForcing

FRAMES, CHUNK, B, C, H, W = 16, 2, 2, 48, 4, 4  # 8 chunks
VALID = torch.tensor([16, 11])  # sample 1 is padded after 11 latent frames
CONFIG = dataclasses.replace(WanConfig.preset("tiny"), num_heads=4)


def make_model() -> WanModel:
    torch.manual_seed(3)
    return WanModel(CONFIG)


def make_inputs(per_chunk_prompts: bool):
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(B, C, FRAMES, H, W, generator=gen)
    prompts = FRAMES // CHUNK if per_chunk_prompts else 1
    context = torch.randn(B, prompts, 7, CONFIG.text_dim, generator=gen)
    tf = TeacherForcing(TrainingSchedule(), FRAMES, CHUNK)
    draw = tf.draw((B, C, FRAMES, H, W), torch.Generator().manual_seed(5), torch.device("cpu"))
    return x0, context, draw


def single_process(per_chunk_prompts: bool, i2v: bool = False):
    model = make_model()
    x0, context, draw = make_inputs(per_chunk_prompts)
    tf = TeacherForcing(TrainingSchedule(), FRAMES, CHUNK, i2v=i2v)
    res = tf(model, x0, context, draw, valid_frames=VALID)
    res.loss.backward()
    return res.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


SCENARIOS = [("balanced", True, False), ("balanced", False, False), ("plain", True, False), ("balanced", True, True)]


# --------------------------------------------------------------------------------------------- worker side
def _worker(out_dir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    for layout, per_chunk, i2v in SCENARIOS:
        model = make_model()
        x0, context, draw = make_inputs(per_chunk)
        sp = SequenceParallel(dist.group.WORLD, FRAMES, CHUNK, layout, num_heads=CONFIG.num_heads)
        tf = TeacherForcing(TrainingSchedule(), FRAMES, CHUNK, sp=sp, i2v=i2v)
        if layout == "balanced":  # a balanced rank needs only its own frames
            lo, hi = sp.shard.noisy
            res = tf(model, x0[:, :, lo:hi], context, draw, frame_offset=lo, valid_frames=VALID)
        else:
            res = tf(model, x0, context, draw, valid_frames=VALID)
        res.loss.backward()
        loss = res.loss.detach().clone()
        dist.all_reduce(loss)
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[n] = g
        results[(layout, per_chunk, i2v)] = (loss, grads)
    if rank == 0:
        torch.save(results, out_dir / "results.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def sp_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"sp{world}")
    procs = [subprocess.Popen([sys.executable, __file__, str(out)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world)}) for r in range(world)]
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [0] * world, f"workers exited with {codes}"
    return torch.load(out / "results.pt")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: f"{s[0]}-{'chunkprompts' if s[1] else 'oneprompt'}{'-i2v' if s[2] else ''}")
def test_sequence_parallel_loss_and_gradients_equal_single_process(sp_results, scenario):
    layout, per_chunk, i2v = scenario
    ref_loss, ref_grads = single_process(per_chunk, i2v)
    loss, grads = sp_results[scenario]
    # fp32 on CPU; the only difference is summation order across ranks
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------- layouts
def test_balanced_shards_hold_both_copies_of_their_chunks():
    shards = shard_sequence(96, 8, 4, "balanced")
    assert [(s.clean, s.noisy) for s in shards] == [((24 * r, 24 * r + 24),) * 2 for r in range(4)]
    assert shards[1].chunk_slots(8) == [3, 4, 5, 3, 4, 5]


def test_plain_shards_split_the_clean_noisy_sequence_contiguously():
    shards = shard_sequence(96, 8, 4, "plain")
    assert [(s.clean, s.noisy) for s in shards] == [((0, 48), (0, 0)), ((48, 96), (0, 0)), ((96, 96), (0, 48)), ((96, 96), (48, 96))]
    mixed = shard_sequence(24, 8, 3, "plain")  # 48 frames over 3 ranks: rank 1 holds clean chunk 2 + noisy chunk 0
    assert (mixed[1].clean, mixed[1].noisy) == ((16, 24), (0, 8))


@pytest.mark.parametrize("layout,frames,sp,match", [
    ("balanced", 96, 5, "multiple of sequence_parallel_size x frames per chunk"),
    ("plain", 12, 2, "not whole chunks"),
    ("ring", 96, 4, "unknown sequence-parallel layout"),
])
def test_bad_shard_geometry_is_a_clear_error(layout, frames, sp, match):
    with pytest.raises(ValueError, match=match):
        shard_sequence(frames, 8, sp, layout)


@pytest.mark.parametrize("layout", ["balanced", "plain"])
def test_gathered_layout_mask_is_the_teacher_forcing_mask_permuted(layout):
    """The natural (rank-ordered) mask equals the [clean; noisy] mask of spec 2.2 under the token permutation."""
    frames, chunk, tpf, sp = 24, 4, 3, 3
    shards = shard_sequence(frames, chunk, sp, layout)
    ref = ChunkLayout.teacher_forcing(frames, chunk, tpf).dense_mask()
    # index of each gathered token in the [clean; noisy] sequence
    order = []
    for s in shards:
        for rng, base in ((s.clean, 0), (s.noisy, frames)):
            for f in range(*rng):
                order.extend((base + f) * tpf + i for i in range(tpf))
    order = torch.tensor(order)
    parts = [s.layout(chunk, tpf) for s in shards]
    natural = ChunkLayout(torch.cat([p.chunk for p in parts]), torch.cat([p.noisy for p in parts])).dense_mask()
    assert torch.equal(natural, ref[order][:, order])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
