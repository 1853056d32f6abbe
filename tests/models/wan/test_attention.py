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
