"""How far is a chunk-halo VAE encode (spec 5.3) from a full-sequence encode, per halo size?

Builds a random-weight VAE (default PyTorch init, seeded) with the Wan2.2 block structure at small
widths, encodes a smooth synthetic video once in full, then for each halo size encodes the raw
window of every sequence-parallel rank whose window does not start at frame 0 (those that do are
exact by construction) and compares the kept latents with the full encode.

    python benchmarks/vae_halo_error.py                      # markdown table
    python benchmarks/vae_halo_error.py --json out.json      # also write JSON
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from longlive.models.vae import WanVAE, WanVAEConfig, encode_halo_window, sp_halo_windows

logger = logging.getLogger("vae_halo_error")

STRUCTURES = {
    # same temporal structure as Wan2.2 (2 res blocks per level), narrow channels
    "wan2.2-narrow": WanVAEConfig.preset("wan2.2").replace(enc_dim=8, dec_dim=8),
    # the tests' tiny preset (1 res block per level)
    "tiny": WanVAEConfig.preset("tiny"),
}


def smooth_video(frames: int, size: int, seed: int) -> torch.Tensor:
    """A smooth moving pattern in [-1, 1], [1, 3, frames, size, size]."""
    gen = torch.Generator().manual_seed(seed)
    phase = torch.rand(1, 3, 1, 1, 1, generator=gen) * 6.28
    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1) * 0.15
    y = torch.linspace(0, 3.14, size).view(1, 1, 1, size, 1)
    x = torch.linspace(0, 3.14, size).view(1, 1, 1, 1, size)
    return 0.8 * torch.sin(phase + 2 * y + 3 * x + t) * torch.cos(x - 0.5 * t + y)


def measure(structure: str, latent_frames: int, sp: int, halos: list[int], size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    vae = WanVAE(STRUCTURES[structure]).eval()
    raw_frames = 1 + 4 * (latent_frames - 1)
    video = smooth_video(raw_frames, size, seed)
    full = vae.encode(video)
    rows = []
    for halo in halos:
        errs, first_errs, max_abs = [], [], 0.0
        windows = [w for w in sp_halo_windows(latent_frames, sp, halo, raw_frames) if w.raw_start > 0]
        if not windows:
            raise ValueError(f"halo {halo}: every window starts at frame 0 (trivially exact); use more latent frames")
        for w in windows:  # windows starting at frame 0 equal the full encode by construction
            kept = encode_halo_window(vae, video[:, :, w.raw_start : w.raw_end], w)
            ref = full[:, :, w.keep_start : w.keep_end]
            errs.append(((kept - ref).norm() / ref.norm()).item())
            first_errs.append(((kept[:, :, 0] - ref[:, :, 0]).norm() / ref[:, :, 0].norm()).item())
            max_abs = max(max_abs, (kept - ref).abs().max().item())
        rows.append({"halo_latents": halo, "ranks_compared": len(windows), "rel_err_mean": sum(errs) / len(errs), "rel_err_max": max(errs),
                     "first_kept_latent_rel_err_max": max(first_errs), "max_abs_err": max_abs})
        logger.info("halo %d: rel err mean %.3e", halo, rows[-1]["rel_err_mean"])
    return {"structure": structure, "config": {k: getattr(vae.config, k) for k in ("enc_dim", "num_res_blocks")},
            "latent_frames": latent_frames, "sp_size": sp, "size": size, "seed": seed, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--structure", choices=sorted(STRUCTURES), action="append",
                    help="VAE block structure (repeatable; default: both)")
    ap.add_argument("--latent-frames", type=int, default=96)
    ap.add_argument("--sp-size", type=int, default=2)
    ap.add_argument("--halos", default="0,1,2,4,8,12,16,20,24,26,27,28")
    ap.add_argument("--size", type=int, default=32, help="frame height = width in pixels (multiple of 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    halos = [int(h) for h in args.halos.split(",")]
    start = time.perf_counter()
    results = [measure(s, args.latent_frames, args.sp_size, halos, args.size, args.seed)
               for s in (args.structure or ["wan2.2-narrow", "tiny"])]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "commit": commit, "seconds": round(time.perf_counter() - start, 1)}
    for res in results:
        print(f"\n{res['structure']} (F={res['latent_frames']}, sp={res['sp_size']}, {res['size']}x{res['size']} px)")
        print("| halo (latents) | rel. error mean | rel. error max | first kept latent, max | max abs error |")
        print("|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            print(f"| {r['halo_latents']} | {r['rel_err_mean']:.2e} | {r['rel_err_max']:.2e} | "
                  f"{r['first_kept_latent_rel_err_max']:.2e} | {r['max_abs_err']:.2e} |")
    print(f"\n{json.dumps(meta)}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
