"""`longlive export`: inference checkpoints from a trained generator (and its DMD LoRA).

    longlive export merge-lora --config configs/inference.yaml --output-path merged.pt \
        [--generator-ckpt base.pt] [--lora-ckpt lora.pt] [--dtype bf16|fp32]
    longlive export nvfp4 --config configs/nvfp4/inference_nvfp4.yaml --output-path model_4o6.pt \
        --backend fouroversix|transformer_engine [--generator-ckpt base.pt] [--lora-ckpt lora.pt]

merge-lora writes `{generator, checkpoint_format: longlive_generator_merged_lora, ...}` (spec 1.4), or
a safetensors file with the same metadata in its header when the path ends in `.safetensors`.
nvfp4 always merges the LoRA first when one is given (the reference's export silently skipped it
unless `merge_lora: true`), then writes either the compact NVFP4 checkpoint of spec 7.6
(`fouroversix`, `checkpoint_format: longlive_generator_nvfp4`, about 9/16 byte per quantized weight)
or merged BF16 weights that TransformerEngine quantizes at load (`transformer_engine`,
`longlive_generator_merged_bf16`). Afterwards remove `lora_ckpt` and the `adapter` section from the
inference config.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("longlive.export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("merge-lora", help="merge a LoRA checkpoint into the generator (BF16 by default)")
    m.add_argument("--config", required=True)
    m.add_argument("--output-path", required=True)
    m.add_argument("--generator-ckpt", help="overrides checkpoints.generator_ckpt")
    m.add_argument("--lora-ckpt", help="overrides checkpoints.lora_ckpt")
    m.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    m.add_argument("--device", default="cpu")
    n = sub.add_parser("nvfp4", help="merge the LoRA (if any) and write an NVFP4 inference checkpoint")
    n.add_argument("--config", required=True, help="inference config: checkpoints, adapter and model_quant_* rules")
    n.add_argument("--output-path", required=True)
    n.add_argument("--backend", required=True, choices=("fouroversix", "transformer_engine"),
                   help="fouroversix: compact materialised NVFP4; transformer_engine: merged BF16")
    n.add_argument("--generator-ckpt", help="overrides checkpoints.generator_ckpt")
    n.add_argument("--lora-ckpt", help="overrides checkpoints.lora_ckpt")
    n.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="where to quantize (CUDA uses the Triton kernels; same bytes as on CPU)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    return _merge_lora(args) if args.what == "merge-lora" else _nvfp4(args)


def _nvfp4(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..models.wan.state_dict import NVFP4_FORMAT, TE_FORMAT, save_generator
    from ..pipelines.inference import build_generator
    from ..quant.convert import compact_nbytes, inference_filter, inference_recipe, quantize_model
    from ..quant.linear import spec_dtypes

    overrides = ["model_quant=false", "fp8_quant=false", "merge_lora=true"]
    if args.generator_ckpt:
        overrides.append(f"checkpoints.generator_ckpt={args.generator_ckpt}")
    if args.lora_ckpt:
        overrides.append(f"checkpoints.lora_ckpt={args.lora_ckpt}")
    cfg = load_config(args.config, overrides)
    if not cfg.checkpoints.generator_ckpt:
        raise SystemExit(f"{args.config}: export nvfp4 needs checkpoints.generator_ckpt (or --generator-ckpt)")
    if cfg.checkpoints.lora_ckpt and cfg.adapter is None:
        raise SystemExit(f"{args.config}: a LoRA checkpoint is given but the config has no `adapter` section (rank, alpha)")
    merged = bool(cfg.checkpoints.lora_ckpt)
    model = build_generator(cfg, torch.device(args.device), torch.bfloat16)
    recipe = inference_recipe(load_config(args.config))
    meta = {"checkpoint_version": 1, "source_generator_ckpt": str(cfg.checkpoints.generator_ckpt),
            "source_lora_ckpt": str(cfg.checkpoints.lora_ckpt) if merged else None, "merged_lora": merged,
            "model_name": cfg.model_kwargs.model_name}
    if args.backend == "fouroversix":
        names = quantize_model(model, recipe, inference_filter(load_config(args.config)), materialize=True)
        packed, dense = compact_nbytes(model)
        meta.update(checkpoint_format=NVFP4_FORMAT, quantization={
            "weight_scale_rule": recipe.weight_rule, "activation_scale_rule": recipe.activation_rule,
            "block": "1x16", "quantized_linears": len(names)})
        log.info("NVFP4: %d linears, %.2f GB packed instead of %.2f GB in BF16", len(names), packed / 1e9, dense / 1e9)
    else:
        meta.update(checkpoint_format=TE_FORMAT, dtype="bfloat16")
    meta = {k: v for k, v in meta.items() if v is not None}
    path = save_generator(spec_dtypes(model.state_dict()), Path(args.output_path), metadata=meta)
    log.info("wrote %s (%s%s)", path, meta["checkpoint_format"], ", LoRA merged" if merged else "")
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..models.wan.state_dict import MERGED_FORMAT, save_generator
    from ..pipelines.inference import build_generator

    overrides = ["merge_lora=true"]
    if args.generator_ckpt:
        overrides.append(f"checkpoints.generator_ckpt={args.generator_ckpt}")
    if args.lora_ckpt:
        overrides.append(f"checkpoints.lora_ckpt={args.lora_ckpt}")
    cfg = load_config(args.config, overrides)
    if cfg.adapter is None or not cfg.checkpoints.lora_ckpt:
        raise SystemExit(f"{args.config}: merge-lora needs an `adapter` section and checkpoints.lora_ckpt (or --lora-ckpt)")
    if not cfg.checkpoints.generator_ckpt:
        raise SystemExit(f"{args.config}: merge-lora needs checkpoints.generator_ckpt (or --generator-ckpt)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_generator(cfg, torch.device(args.device), torch.float32).to(dtype)
    path = save_generator(model, Path(args.output_path), metadata={
        "checkpoint_format": MERGED_FORMAT, "source_generator_ckpt": str(cfg.checkpoints.generator_ckpt),
        "source_lora_ckpt": str(cfg.checkpoints.lora_ckpt), "model_name": cfg.model_kwargs.model_name,
        "dtype": str(dtype).replace("torch.", ""), "merged_lora": True})
    log.info("wrote merged generator %s", path)
    return 0
