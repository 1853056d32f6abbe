"""Sequence-parallel cached inference through the fused kernel: q/k norm, RoPE and the all-to-all's send
buffer in one launch (`fused.norm_rope_pack`, `UlyssesGroup.attend_projections`).

Two gloo ranks under TRITON_INTERPRET=1 generate a bf16 video (rolling window, sink, multi-shot cuts)
and must equal one process generating it on the same fused kernels; every layer of every forward,
the refresh's cache-only last layer included, must go through the pack.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longlive.models.wan import WanConfig, WanModel
from longlive.pipelines.chunked import ChunkedOptions, generate_latents

CONFIG = dataclasses.replace(WanConfig.preset("tiny"), num_heads=4)
B, C, F, H, W, CHUNK = 2, 48, 20, 4, 4, 4  # 5 chunks of 4 frames, 2 samples
OPTIONS = ChunkedOptions(sampling_steps=2, chunk_frames=CHUNK, local_attn_size=12, sink_size=4, multi_shot_sink=True,
                         multi_shot_rope_offset=8.0)
CUTS = [[False, False, True, False, True]] * 2


def _generate(sp, device: str = "cpu") -> torch.Tensor:
    torch.manual_seed(7)
    model = WanModel(CONFIG).to(device, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, C, F, H, W, generator=g).to(device, torch.bfloat16)
    prompts = torch.randn(B, F // CHUNK, 5, CONFIG.text_dim, generator=g).to(device, torch.bfloat16)
    return generate_latents(model, noise, prompts, options=OPTIONS, scene_cuts=CUTS, sequence_parallel=sp).cpu()


def _worker(out_dir: Path) -> None:
    import torch.nn.functional as F_

    from longlive.models.wan import fused
    from longlive.parallel.sequence import UlyssesGroup

    cuda = os.environ.get("SP_FUSED_DEVICE") == "cuda"  # NCCL on one GPU per rank, else gloo on CPU
    if not cuda:  # bf16 GEMMs crash some CPUs (oneDNN's AMX path under virtualisation): fp32 and round
        linear = F_.linear
        F_.linear = lambda x, w, b=None: linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    calls = {"pack": 0, "store": 0}
    pack, store = fused.norm_rope_pack, fused.norm_rope_store

    def counting_pack(*a, **k):
        calls["pack"] += 1
        return pack(*a, **k)

    def counting_store(*a, **k):
        calls["store"] += 1
        return store(*a, **k)

    fused.norm_rope_pack, fused.norm_rope_store = counting_pack, counting_store
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{out_dir / 'store'}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    out = _generate(UlyssesGroup(dist.group.WORLD, world, rank), device)
    result = {"latents": out, "packs": calls["pack"], "sp_stores": calls["store"]}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:  # the same video in one process, on the same (single-GPU) fused kernel
        result["reference"] = _generate(None, device)
        result["stores"] = calls["store"]
    torch.save(result, out_dir / f"rank{rank}.pt")


def _check(results: list[dict], exact: bool) -> None:
    r0, r1 = results
    forwards = (F // CHUNK) * (OPTIONS.sampling_steps + 1)  # the steps and the refresh of every chunk
    for r in results:
        assert r["packs"] == forwards * CONFIG.num_layers and r["sp_stores"] == 0, r
    assert r0["stores"] == forwards * CONFIG.num_layers  # the reference took the single-process fused kernel
    assert torch.equal(r0["latents"], r1["latents"])
    ref = r0["reference"].float()
    assert not torch.equal(ref[:, :, :CHUNK], ref[:, :, -CHUNK:])  # not a degenerate video
    if exact:
        torch.testing.assert_close(r0["latents"].float(), ref, rtol=0, atol=0)
    else:  # cuBLAS may round a product over one rank's tokens differently from one over all of them
        assert float((r0["latents"].float() - ref).norm() / ref.norm()) < 1e-2


def test_sp_fused_pack_generates_what_one_process_does(launch_workers, tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results, _ = launch_workers(__file__, 2, tmp_path, timeout=300)
    _check(results, exact=True)


@pytest.mark.gpu
def test_sp_fused_pack_over_nccl_on_two_gpus(launch_workers, tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    monkeypatch.setenv("SP_FUSED_DEVICE", "cuda")
    results, _ = launch_workers(__file__, 2, tmp_path, timeout=300)
    _check(results, exact=False)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
