"""`longlive vae-halo`: print the chunk-halo VAE encoding window of every sequence-parallel rank.

Reads `infra.sequence_parallel_size`, `infra.vae_halo_latents` and `data.image_or_video_shape`
through the typed config (section or top-level placement); flags override them.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from longlive.models.vae.halo import sp_halo_windows

logger = logging.getLogger(__name__)

DEFAULT_HALO_LATENTS = 28  # reference default of infra.vae_halo_latents


class HaloConfigError(ValueError):
    """The command line lacks a value the halo windows need."""


def read_halo_settings(path: str | Path) -> dict[str, int | None]:
    """sp_size, halo_latents and latent_frames of a config, read through the typed schema
    (`infra.sequence_parallel_size`, `infra.vae_halo_latents`, `data.image_or_video_shape[1]`, with
    the reference's flattened placements accepted and the schema's defaults where a field is absent)."""
    from longlive.config import load_config

    cfg = load_config(path)
    return {"sp_size": cfg.infra.sequence_parallel_size, "halo_latents": cfg.infra.vae_halo_latents,
            "latent_frames": int(cfg.data.image_or_video_shape[1])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="training YAML (infra.sequence_parallel_size, infra.vae_halo_latents, data.image_or_video_shape)")
    parser.add_argument("--sp-size", type=int, help="sequence-parallel size (overrides the config)")
    parser.add_argument("--halo-latents", type=int, help=f"halo in latent frames (overrides the config; default {DEFAULT_HALO_LATENTS})")
    parser.add_argument("--latent-frames", type=int, help="latent frames F of a clip (overrides image_or_video_shape[1])")
    parser.add_argument("--raw-frames", type=int, help="raw frames T of a clip (default 4(F-1)+1)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # ConfigError, HaloConfigError and window-arithmetic errors: report, exit 2
        logger.error("%s", exc)
        return 2


def _run(args: argparse.Namespace) -> int:
    settings: dict[str, int | None] = {"sp_size": None, "halo_latents": None, "latent_frames": None}
    source = "command line"
    if args.config is not None:
        settings = read_halo_settings(args.config)
        source = str(args.config)
    for key in settings:
        flag = getattr(args, key)
        if flag is not None:
            settings[key] = flag
    if settings["halo_latents"] is None:
        logger.info("vae_halo_latents not set; using the reference default %d", DEFAULT_HALO_LATENTS)
        settings["halo_latents"] = DEFAULT_HALO_LATENTS
    where = f"config {args.config}" if args.config is not None else "the command line"
    if settings["sp_size"] is None:
        raise HaloConfigError(f"No sequence-parallel size in {where}: set infra.sequence_parallel_size or pass --sp-size.")
    if settings["latent_frames"] is None:
        raise HaloConfigError(f"No latent frame count in {where}: set data.image_or_video_shape or pass --latent-frames.")
    sp, halo, frames = settings["sp_size"], settings["halo_latents"], settings["latent_frames"]
    assert sp is not None and halo is not None and frames is not None
    raw = args.raw_frames if args.raw_frames is not None else 1 + 4 * (frames - 1)
    windows = sp_halo_windows(frames, sp, halo, raw)
    if args.json:
        print(json.dumps({
            "source": source, "sp_size": sp, "halo_latents": halo, "latent_frames": frames, "raw_frames": raw,
            "ranks": [{"rank": r, **w.as_dict()} for r, w in enumerate(windows)],
        }, indent=2))
        return 0
    print(f"sp_size {sp}, halo {halo} latents, {frames} latent frames, {raw} raw frames ({source})")
    print(f"{'rank':>4}  {'keep':>12}  {'halo_start':>10}  {'raw window':>12}  {'raw frames':>10}  {'drop':>4}")
    for r, w in enumerate(windows):
        print(f"{r:>4}  {f'[{w.keep_start}, {w.keep_end})':>12}  {w.halo_start:>10}  "
              f"{f'[{w.raw_start}, {w.raw_end})':>12}  {w.raw_frames:>10}  {w.drop:>4}")
    return 0
