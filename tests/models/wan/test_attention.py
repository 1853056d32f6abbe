"""The mask rule, its dense and flex_attention forms, and the GPU backends."""
import warnings

import pytest
import torch

from longlive.models.wan import WanConfig, WanModel
from longlive.models.wan.attention import ChunkLayout, masked_attention, sdpa


def test_teacher_forcing_mask_matches_spec_rules():
    lay = ChunkLayout.teacher_forcing(num_frames=4, chunk_frames=2, tokens_per_frame=1)
    m = lay.dense_mask()
    n = 4  # clean tokens 0..3 (chunks 0,0,1,1), noisy tokens 4..7
    for q in range(2 * n):
        for k in range(2 * n):
            cq, ck = (q % n) // 2, (k % n) // 2
            q_noisy, k_noisy = q >= n, k >= n
            if not q_noisy:
                want = (not k_noisy) and ck <= cq
            else:
                want = ((not k_noisy) and ck < cq) or (k_noisy and ck == cq)
            assert bool(m[q, k]) == want, (q, k)
    assert m.diagonal().all()


def test_flex_block_mask_equals_dense_mask_forward():
    lay = ChunkLayout.teacher_forcing(num_frames=6, chunk_frames=2, tokens_per_frame=24)  # 288 tokens: >1 flex block
    q, k, v = (torch.randn(1, 288, 2, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = masked_attention(q, k, v, lay.block_mask())
    dense = masked_attention(q, k, v, lay.dense_mask())
    assert (flex - dense).abs().max() < 1e-5


@pytest.mark.parametrize("frames,chunk,tokens_per_frame,permute", [
    (16, 8, 110, False),  # 3520 tokens, tiles straddle chunks
    (8, 2, 37, False),    # 592 tokens: the last tile is partial
    (24, 8, 16, True),    # a shuffled token order (sequence-parallel natural layouts)
])
def test_block_mask_is_built_without_the_dense_mask_and_equals_create_block_mask(frames, chunk, tokens_per_frame, permute):
    from torch.nn.attention.flex_attention import create_block_mask

    lay = ChunkLayout.teacher_forcing(frames, chunk, tokens_per_frame)
    if permute:
        perm = torch.randperm(lay.chunk.numel())
        lay = ChunkLayout(lay.chunk[perm], lay.noisy[perm])
    n = lay.chunk.numel()
    dense = lay.dense_mask()
    ref = create_block_mask(lambda b, h, q, k: dense[q, k], None, None, n, n, device="cpu")
    mine = lay.block_mask(rows_per_pass=256)  # several passes
    assert torch.equal(mine.to_dense(), ref.to_dense())
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(mine.kv_num_blocks, ref.kv_num_blocks)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_backends_match_fp32_reference():
    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    model = WanModel(cfg).cuda().eval()
    x = torch.randn(1, cfg.in_dim, 16, 16, 16, device="cuda")
    t = torch.rand(1, 16, device="cuda") * 1000
    c = torch.randn(1, 2, 10, cfg.text_dim, device="cuda")
    gpu_flex = model(x, t, c, chunk_frames=8, clean_x=x.flip(2), clean_t=torch.zeros_like(t))
    cpu_dense = model.cpu()(x.cpu(), t.cpu(), c.cpu(), chunk_frames=8, clean_x=x.flip(2).cpu(), clean_t=torch.zeros_like(t).cpu())
    assert (gpu_flex.cpu() - cpu_dense).abs().max() < 2e-3
    qb, kb, vb = (torch.randn(1, 7040, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sdpa(qb.float(), kb.float(), vb.float())
    assert ((sdpa(qb, kb, vb).float() - ref).norm() / ref.norm()) < 1e-2
