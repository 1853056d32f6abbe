"""The speed ceiling of one steady-state chunk: the model's matrix products and attention calls alone,
each timed with the best kernel PyTorch offers on this device, turned into an upper bound on FPS.

The accounting is that of `benchmarks/h200_ceiling.py` (docs/benchmarks.md), for any preset and
shape: per layer, six `[tokens, dim] x [dim, dim]` products (self-attention q, k, v, o; cross-attention
q, o; the cross-attention K/V of the text are computed once per prompt), the two FFN products, self-attention
of the chunk's queries over the KV window (the fastest of cuDNN, FlashAttention and memory-efficient SDPA
that runs) and cross-attention over the text tokens; a chunk costs (steps + 1 refresh) forwards of every layer.
Everything else (norms, modulation, RoPE, kernel launches, host work) counts as zero, so no implementation
reaches it. With `--quant fp8` the eight products use `torch._scaled_mm` (row-wise scales), where it runs.
Under Ulysses sequence parallelism each rank multiplies 1/N of the tokens and attends with 1/N of the heads;
communication counts as zero too.

Two figures: the burst ceiling times each call alone, a few in a row (what `benchmarks/h200_ceiling.py`
does); the sustained ceiling runs the whole chunk's sequence of those calls (layers x forwards) back to
back, as a generation does. On a board that reaches its power limit under a long run (the H200 at
700 W lowers its SM clock), the sustained figure is the one a generation can approach.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..models.wan import WanConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CeilingShape:
    """What one rank computes for one chunk forward."""

    tokens: int  # query tokens of the chunk (this rank's share under SP)
    kv_tokens: int  # keys of the window the chunk attends to (the whole window: Ulysses splits heads)
    heads: int  # attention heads on this rank
    head_dim: int
    dim: int
    ffn_dim: int
    text_len: int
    layers: int
    forwards: int  # denoising steps + 1 refresh

    @classmethod
    def for_chunk(cls, cfg: WanConfig, *, tokens_per_frame: int, chunk_frames: int, window_frames: int, steps: int,
                  sp_size: int = 1) -> "CeilingShape":
        tokens = chunk_frames * tokens_per_frame
        if tokens % sp_size or cfg.num_heads % sp_size:
            raise ValueError(f"ceiling: {tokens} tokens and {cfg.num_heads} heads must both split over sp_size={sp_size}")
        return cls(tokens=tokens // sp_size, kv_tokens=window_frames * tokens_per_frame, heads=cfg.num_heads // sp_size,
                   head_dim=cfg.head_dim, dim=cfg.dim, ffn_dim=cfg.ffn_dim, text_len=cfg.text_len,
                   layers=cfg.num_layers, forwards=steps + 1)


def time_call(fn: Callable[[], Any], device: torch.device, iters: int = 20, warmup: int = 5) -> float:
    """Mean seconds per call of `fn`: CUDA events on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters / 1e3


def _attention_backends(device: torch.device) -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return [("default", None)]
    return [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def _sdpa(q, k, v, backend):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def check_quant(quant: str, device: torch.device) -> None:
    """Refuse a ceiling that cannot be measured on `device`, before any work is done."""
    if quant not in ("none", "fp8"):
        raise ValueError(f"ceiling: quant must be none or fp8, got {quant!r}")
    if quant == "fp8":
        from ..quant.fp8 import _fp8_gemm_available

        if not _fp8_gemm_available(device):
            raise ValueError(f"ceiling: --quant fp8 needs torch._scaled_mm (CUDA, compute capability >= 8.9); {device} has none")


def measure_ceiling(shape: CeilingShape, device: torch.device, dtype: torch.dtype = torch.bfloat16, quant: str = "none",
                    pixel_frames_per_chunk: int = 32, timer: Callable[[Callable[[], Any]], float] | None = None
                    ) -> dict[str, Any]:
    """Time the chunk's products and attention on `device` and return the ceiling (seconds and FPS), burst
    and sustained. `timer(fn) -> seconds per call` defaults to `time_call` on `device` (for the sustained
    chunk, 3 calls after 1 warm-up)."""
    sustained_timer = timer or (lambda fn: time_call(fn, device, iters=3, warmup=1))
    timer = timer or (lambda fn: time_call(fn, device))
    check_quant(quant, device)
    s = shape
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *size: torch.randn(*size, generator=g, device=device).to(dtype)  # noqa: E731
    x, h = rand(s.tokens, s.dim), rand(s.tokens, s.ffn_dim)
    w, w1, w2 = rand(s.dim, s.dim), rand(s.ffn_dim, s.dim), rand(s.dim, s.ffn_dim)
    report: dict[str, Any] = {"shape": asdict(s), "quant": quant, "dtype": str(dtype).removeprefix("torch.")}
    if quant == "fp8":
        from ..quant.fp8 import quantize_rowwise

        (x8, sx), (h8, sh) = quantize_rowwise(x), quantize_rowwise(h)
        (w8, sw), (w18, sw1), (w28, sw2) = quantize_rowwise(w), quantize_rowwise(w1), quantize_rowwise(w2)

        def mm(a, sa, b, sb):  # b [N, K] row-major: b.t() is the column-major operand; scale_b [1, N]
            sb = sb.t().contiguous()
            return lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=dtype, use_fast_accum=True)

        gemm_dd, gemm_ffn1, gemm_ffn2 = mm(x8, sx, w8, sw), mm(x8, sx, w18, sw1), mm(h8, sh, w28, sw2)
    else:
        gemm_dd, gemm_ffn1, gemm_ffn2 = (lambda: x @ w.t()), (lambda: x @ w1.t()), (lambda: h @ w2.t())
    t_dd, t_ffn1, t_ffn2 = timer(gemm_dd), timer(gemm_ffn1), timer(gemm_ffn2)
    linear = 6 * t_dd + t_ffn1 + t_ffn2
    flops_linear = 2 * s.tokens * s.dim * (6 * s.dim + 2 * s.ffn_dim)

    q = rand(1, s.heads, s.tokens, s.head_dim)
    k, v = rand(1, s.heads, s.kv_tokens, s.head_dim), rand(1, s.heads, s.kv_tokens, s.head_dim)
    kt = rand(1, s.heads, s.text_len, s.head_dim)
    attention: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, backend in _attention_backends(device):
        try:
            attention[name] = timer(lambda: _sdpa(q, k, v, backend))
        except RuntimeError as exc:  # this backend does not run here (shape, dtype, GPU)
            errors[name] = str(exc).splitlines()[0][:160]
    if not attention:
        raise RuntimeError(f"ceiling: no attention backend ran on {device}: {errors}")
    if errors:  # told, not only kept in the JSON: the ceiling is the best of those that ran
        log.info("ceiling: attention backends that did not run here: %s", errors)
    best = min(attention, key=attention.get)
    t_self = attention[best]
    best_backend = dict(_attention_backends(device))[best]
    t_cross = timer(lambda: _sdpa(q, kt, kt, best_backend))
    layer = linear + t_self + t_cross
    chunk = layer * s.layers * s.forwards
    # the same calls in a layer's order, for every layer of every forward of a chunk
    layer_calls = [gemm_dd] * 3 + [lambda: _sdpa(q, k, v, best_backend), gemm_dd, gemm_dd,
                                   lambda: _sdpa(q, kt, kt, best_backend), gemm_dd, gemm_ffn1, gemm_ffn2]

    def whole_chunk() -> None:
        for _ in range(s.layers * s.forwards):
            for call in layer_calls:
                call()

    sustained = sustained_timer(whole_chunk)
    report.update({
        "gemm_seconds": {"dim_x_dim": t_dd, "ffn1": t_ffn1, "ffn2": t_ffn2},
        "linear_tflops": flops_linear / linear / 1e12,
        "self_attention_seconds": attention, "self_attention_backend": best,
        "self_attention_tflops": 4 * s.tokens * s.kv_tokens * s.heads * s.head_dim / t_self / 1e12,
        "unavailable_backends": errors,
        "cross_attention_seconds": t_cross,
        "layer_seconds": layer,
        "chunk_seconds": chunk,
        "fps": pixel_frames_per_chunk / chunk,
        "sustained_chunk_seconds": sustained,
        "sustained_fps": pixel_frames_per_chunk / sustained,
    })
    return report
