"""Time the pieces of one 5B DiT block at the steady-state chunk shape, each in the layouts the block
could use (speed issue: which change pays before it is made).

- attention of the chunk's 7040 queries over the 28160-token window, q head-major contiguous (the
  ceiling's layout) vs q as the `[B, S, H, D]` projection output seen through a transpose (the block's
  layout), with the output's copy back to `[B, S, H*D]` for the o projection;
- q, k, v as three products vs one fused `[dim, 3*dim]` product;
- the FFN's first product then GELU(tanh) vs cuBLASLt's fused GELU epilogue (`torch._addmm_activation`);
- the text K/V products of cross-attention (computed every call vs once per chunk).

    python benchmarks/block_ops.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longlive.pipelines.ceiling import time_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=7040)
    p.add_argument("--window", type=int, default=28160)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    s, w, h, d = args.tokens, args.window, args.heads, args.head_dim
    dim = h * d
    g = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *size: torch.randn(*size, generator=g, device=dev).to(bf)  # noqa: E731
    t = lambda fn: time_call(fn, dev, iters=30, warmup=5) * 1e3  # noqa: E731
    res: dict[str, float] = {}

    k, v = rand(1, h, w, d), rand(1, h, w, d)
    q_bshd = rand(1, s, h, d)
    q_bhsd = q_bshd.transpose(1, 2).contiguous()

    def attn(q):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    res["attn_q_contiguous_ms"] = t(lambda: attn(q_bhsd))
    res["attn_q_transposed_ms"] = t(lambda: attn(q_bshd.transpose(1, 2)))
    res["attn_q_transposed_out_flat_ms"] = t(lambda: attn(q_bshd.transpose(1, 2)).transpose(1, 2).flatten(2))
    res["attn_q_contiguous_out_flat_ms"] = t(lambda: attn(q_bhsd).transpose(1, 2).flatten(2))
    out = attn(q_bshd.transpose(1, 2))
    res["attn_out_strides"] = list(out.stride())

    x = rand(s, dim)
    wq, wk, wv = rand(dim, dim), rand(dim, dim), rand(dim, dim)
    bq, bk, bv = rand(dim), rand(dim), rand(dim)
    wqkv, bqkv = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
    res["qkv_three_ms"] = t(lambda: (F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)))
    res["qkv_fused_ms"] = t(lambda: F.linear(x, wqkv, bqkv))
    res["dim_x_dim_nobias_ms"] = t(lambda: x @ wq.t())

    w1, b1 = rand(args.ffn, dim), rand(args.ffn)
    w2, b2 = rand(dim, args.ffn), rand(dim)
    hid = rand(s, args.ffn)
    res["ffn1_ms"] = t(lambda: F.linear(x, w1, b1))
    res["ffn1_gelu_ms"] = t(lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"))
    res["ffn1_gelu_epilogue_ms"] = t(lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True))
    ref = F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh")
    fused = torch._addmm_activation(b1, x, w1.t(), use_gelu=True).float()
    plain = F.gelu(F.linear(x, w1, b1), approximate="tanh").float()
    res["gelu_epilogue_rel_err"] = ((fused - ref).norm() / ref.norm()).item()
    res["gelu_separate_rel_err"] = ((plain - ref).norm() / ref.norm()).item()
    res["ffn2_ms"] = t(lambda: F.linear(hid, w2, b2))

    ctx = rand(args.text, dim)
    res["cross_kv_ms"] = t(lambda: (F.linear(ctx, wk, bk), F.linear(ctx, wv, bv)))
    qx = rand(1, h, s, d)
    kt, vt = rand(1, h, args.text, d), rand(1, h, args.text, d)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        res["cross_attn_ms"] = t(lambda: F.scaled_dot_product_attention(qx, kt, vt))
    # one pass of elementwise work over the chunk's activations, for scale
    a = rand(s, dim)
    res["copy_bf16_chunk_ms"] = t(lambda: a.clone())
    res["copy_bf16_hidden_ms"] = t(lambda: hid.clone())
    for key, val in res.items():
        print(f"{key:36s} {val}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
