"""Fused NVFP4-KV attention vs BF16 cuDNN SDPA vs "dequantize the cache, then cuDNN SDPA" (spec 7.7).

Default shapes are one 5B layer-chunk: B=1, Sq=7040 queries, H=24, D=128, 4 slots of 7040 tokens
(28160 keys: 3 FP4 slots + the current chunk in BF16). Times are medians of per-call CUDA events after
warm-up; TFLOP/s counts 4*Sq*Skeys*H*D. Prints JSON; also writes $OUT/fp4_kv_attention.json when OUT is set.

    python benchmarks/fp4_kv_attention.py              # about a minute on an H200
    python benchmarks/fp4_kv_attention.py --no-sweep   # default tile config only
    python benchmarks/fp4_kv_attention.py --device cpu --queries 64 --tokens 48 --heads 2 --iters 2  # smoke test
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from report import commit, emit  # noqa: E402
from longlive.quant import nvfp4 as nv  # noqa: E402
from longlive.quant.fp4_kv import AttentionKernelConfig, FP4KVStore, smoothing_mean  # noqa: E402

logger = logging.getLogger("fp4_kv_attention")

SWEEP = [  # (block_m, block_n, num_warps, num_stages); the first is the store's default
    AttentionKernelConfig(128, 128, 8, 3),
    AttentionKernelConfig(128, 64, 8, 2),
    AttentionKernelConfig(128, 128, 8, 2),
    AttentionKernelConfig(128, 64, 4, 3),
    AttentionKernelConfig(64, 64, 4, 3),
    AttentionKernelConfig(128, 32, 8, 3),
    AttentionKernelConfig(128, 128, 4, 2),
    AttentionKernelConfig(64, 128, 4, 3),
    AttentionKernelConfig(256, 64, 8, 2),
    AttentionKernelConfig(256, 64, 16, 2),
    AttentionKernelConfig(256, 128, 16, 2),
    AttentionKernelConfig(256, 128, 8, 2),
]


def time_calls(fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 3) -> dict[str, float]:
    """Median / min / max seconds per call over `iters` calls (CUDA events on CUDA, a wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters}


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs error, max abs error / max |ref|, and relative Frobenius error."""
    d = (out.float() - ref.float())
    return {"max_abs": float(d.abs().max()), "max_abs_over_max_ref": float(d.abs().max() / ref.float().abs().max()),
            "rel_fro": float(d.norm() / ref.float().norm())}


def _cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BF16 SDPA forced onto the cuDNN backend; q, k, v [B, H, S, D]. CPU smoke runs: float32 SDPA."""
    if q.device.type == "cpu":  # no cuDNN (and bf16 CPU kernels are not what is measured here)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BF16 SDPA forced onto PyTorch's FlashAttention-2 backend (CUDA only)."""
    if q.device.type == "cpu":
        raise RuntimeError("the FlashAttention backend is measured on CUDA only")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _guarded(name: str, fn: Callable[[], dict]) -> dict:
    """Run one measurement; a failure is recorded in the report instead of ending the run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the other measurements still run
        logger.error("%s failed: %s", name, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def run(args: argparse.Namespace) -> dict:
    """All measurements at the requested shapes; returns the report."""
    dev = torch.device(args.device)
    B, Sq, H, D, T, S = 1, args.queries, args.heads, args.head_dim, args.tokens, args.slots
    keys = S * T
    flops = 4.0 * B * Sq * keys * H * D
    g = torch.Generator(device=dev).manual_seed(0)
    # keys get per-channel offsets (as real post-RoPE keys have), values are Gaussian
    offset = args.key_offset * torch.randn(1, H, 1, D, generator=g, device=dev)
    ks = [(torch.randn(B, H, T, D, generator=g, device=dev) + offset).to(torch.bfloat16) for _ in range(S)]
    vs = [torch.randn(B, H, T, D, generator=g, device=dev).to(torch.bfloat16) for _ in range(S)]
    q = torch.randn(B, Sq, H, D, generator=g, device=dev).to(torch.bfloat16)
    q_hm = q.transpose(1, 2).contiguous()  # [B, H, Sq, D] for SDPA
    k_cur, v_cur = ks[-1], vs[-1]

    store = FP4KVStore(1, B, H, D, S, T, rule=args.rule, key_smoothing=args.smoothing, device=dev)
    for s in range(S):  # slot S-1 holds the current chunk too, as in the reference (fused attention skips it)
        store.write(0, [s], ks[s], vs[s])
    report: dict = {"shapes": {"B": B, "Sq": Sq, "H": H, "D": D, "chunk_tokens": T, "slots": S, "keys": keys,
                               "fp4_slots": S - 1, "rule": args.rule, "key_smoothing": args.smoothing,
                               "key_offset": args.key_offset},
                    "flops_per_call": flops}

    # write(): bit-exactness against the reference on the device, then time
    mean = smoothing_mean(ks[0], args.smoothing)
    km = (ks[0].float() - mean if mean is not None else ks[0])[0].reshape(H * T, D)
    qr = nv.quantize(km, args.rule)
    report["write_bit_exact"] = bool(
        torch.equal(store.k_values[0, 0, 0].reshape(H * T, D // 2), qr.values[: H * T, : D // 2])
        and torch.equal(store.k_scales[0, 0, 0].reshape(H * T, D // 16),
                        qr.scale_matrix()[: H * T, : D // 16].view(torch.uint8))
        and torch.equal(store.k_decode[0, 0, 0].reshape(1), nv.tensor_scales(qr.amax, args.rule).decode))
    report["write_one_layer_chunk"] = time_calls(lambda: store.write(0, [0], ks[0], vs[0]), args.iters, dev)
    chunk_bytes = 2 * B * H * T * D * 2  # bf16 K and V read
    report["write_one_layer_chunk"]["bf16_input_GBps"] = chunk_bytes / report["write_one_layer_chunk"]["median_s"] / 1e9

    def fused() -> torch.Tensor:
        return store.attention(0, q, k_cur, v_cur, S, [S - 1])

    def dequant_then_cudnn() -> torch.Tensor:
        k, v = store.dequantize(0, S)
        return _cudnn_sdpa(q_hm, k, v)

    k_all, v_all = torch.cat(ks, 2), torch.cat(vs, 2)
    timings: dict[str, dict] = {}

    def add(name: str, fn: Callable[[], object], attention: bool = True) -> None:
        def measure() -> dict:
            t = time_calls(fn, args.iters, dev)
            if attention:
                t["TFLOPs"] = flops / t["median_s"] / 1e12
            return t
        timings[name] = _guarded(name, measure)
        logger.info("%s: %s", name, timings[name])

    add("fused_fp4", fused)
    add("cudnn_bf16", lambda: _cudnn_sdpa(q_hm, k_all, v_all))
    add("flash_bf16", lambda: _flash_sdpa(q_hm, k_all, v_all))
    add("dequantize_then_cudnn", dequant_then_cudnn)
    add("dequantize_only", lambda: store.dequantize(0, S), attention=False)
    report["timings"] = timings

    # accuracy at full scale
    out_fused = fused()
    accuracy: dict[str, object] = {}
    exact = _guarded("cudnn_bf16", lambda: {"out": _cudnn_sdpa(q_hm, k_all, v_all)})
    if "out" not in exact:  # cuDNN unavailable: PyTorch's default BF16 backend
        exact = {"out": F.scaled_dot_product_attention(q_hm, k_all, v_all)}
    ref = exact["out"].transpose(1, 2)
    accuracy["fused_fp4_vs_exact_bf16"] = _errors(out_fused, ref)
    deq = _guarded("dequantize_then_cudnn", lambda: {"out": dequant_then_cudnn()})
    if "out" in deq:
        accuracy["reference_style_fp4_all_slots_vs_exact_bf16"] = _errors(deq["out"].transpose(1, 2), ref)
    # same keys as the fused kernel (3 FP4 slots + bf16 current chunk) through SDPA: checks the kernel itself
    kd, vd = store.dequantize(0, S - 1, torch.float32)
    kc = k_cur.float() - smoothing_mean(k_cur, "token_mean") if args.smoothing == "token_mean" else k_cur.float()
    same = F.scaled_dot_product_attention(q_hm.float(), torch.cat([kd, kc], 2), torch.cat([vd, v_cur.float()], 2))
    accuracy["fused_fp4_vs_float32_sdpa_same_keys"] = _errors(out_fused, same.transpose(1, 2))
    report["accuracy"] = accuracy

    report["memory"] = {"fp4_nbytes_per_layer": store.nbytes, "bf16_nbytes_per_layer": store.bf16_nbytes,
                        "ratio_bf16_over_fp4": store.bf16_nbytes / store.nbytes,
                        "fp4_GiB_30_layers": 30 * store.nbytes / 2**30,
                        "bf16_GiB_30_layers": 30 * store.bf16_nbytes / 2**30}

    if not args.no_sweep:
        sweep = []
        for cfg in SWEEP:
            store.attention_config = cfg

            def measure(cfg: AttentionKernelConfig = cfg) -> dict:
                err = _errors(fused(), same.transpose(1, 2))
                t = time_calls(fused, args.iters, dev)
                return {**t, "TFLOPs": flops / t["median_s"] / 1e12, "rel_fro_vs_same_keys": err["rel_fro"]}
            rec = {"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                   "num_stages": cfg.num_stages, **_guarded(f"sweep {cfg}", measure)}
            logger.info("sweep %s", rec)
            sweep.append(rec)
        report["sweep"] = sweep
        store.attention_config = AttentionKernelConfig()
    return report


def main() -> int:
    """Parse arguments, run on CUDA, print and save the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=7040, help="Sq (query tokens of the current chunk)")
    parser.add_argument("--tokens", type=int, default=7040, help="chunk_tokens (tokens per slot)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--slots", type=int, default=4, help="slots attended (the last one is the bf16 current chunk)")
    parser.add_argument("--rule", default="mse", help="NVFP4 scale rule")
    parser.add_argument("--smoothing", default="channel_mean", choices=["channel_mean", "token_mean", "none"])
    parser.add_argument("--key-offset", type=float, default=1.0, help="std of the per-channel key offsets")
    parser.add_argument("--iters", type=int, default=25, help="timed calls per measurement (median reported)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    parser.add_argument("--device", default="cuda", help="cuda; 'cpu' only smoke-tests this script (torch path, "
                        "tiny shapes advised, no cuDNN)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu" and not torch.cuda.is_available():
        logger.error("CUDA is not available; this benchmark needs a GPU (--device cpu only smoke-tests it)")
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    t0 = time.time()
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "commit": commit(),
        **run(args),
    }
    report["seconds_total"] = time.time() - t0
    emit(report, "fp4_kv_attention.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
