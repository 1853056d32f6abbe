"""Model conversion for NVFP4: which config fields select what, module swaps, compact checkpoints.

Training (`infra.model_quant` for stage 1; `infra.<role>_quant` for the DMD networks) keeps master
weights and quantizes them every forward, or materialises frozen bases; inference (`model_quant`)
materialises 1x16-block weights after any LoRA has been merged. The compact checkpoint is the model's
state dict after `materialize` (spec 7.6): biases, unquantized layers, and the four
`quantized_weight_*` buffers of every quantized linear.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .filters import ModuleFilter, nvfp4_filter, replace_module, selected_linears
from .linear import NVFP4Linear, NVFP4Recipe, backend_status

log = logging.getLogger(__name__)


def inference_recipe(cfg: Any) -> NVFP4Recipe:
    """The inference recipe of a config's top-level `model_quant_*` fields (1x16 weight blocks)."""
    return NVFP4Recipe.from_rules(cfg.model_quant_scale_rule, cfg.model_quant_activation_scale_rule,
                                  cfg.model_quant_weight_scale_rule, cfg.model_quant_gradient_scale_rule, weight_2d=False)


def inference_filter(cfg: Any) -> ModuleFilter:
    return nvfp4_filter(cfg.model_quant_filtered_modules, cfg.model_quant_use_default_filtered_modules)


def training_recipe(cfg: Any, role: str | None = None) -> NVFP4Recipe:
    """Stage 1 (`role=None`: `model_quant_*`) or a DMD role's (`infra.<role>_quant_*`) training recipe."""
    if role is None:
        return NVFP4Recipe.from_rules(cfg.model_quant_scale_rule, cfg.model_quant_activation_scale_rule,
                                      cfg.model_quant_weight_scale_rule, cfg.model_quant_gradient_scale_rule)
    infra = cfg.infra
    base = getattr(infra, f"{role}_quant_scale_rule") or cfg.model_quant_scale_rule
    return NVFP4Recipe.from_rules(base, getattr(infra, f"{role}_quant_activation_scale_rule"),
                                  getattr(infra, f"{role}_quant_weight_scale_rule"),
                                  getattr(infra, f"{role}_quant_gradient_scale_rule"))


def training_filter(cfg: Any, role: str | None = None) -> ModuleFilter:
    if role is None:
        return inference_filter(cfg)
    infra = cfg.infra
    return nvfp4_filter(getattr(infra, f"{role}_quant_filtered_modules"),
                        getattr(infra, f"{role}_quant_use_default_filtered_modules"),
                        source=f"infra.{role}_quant_filtered_modules")


def _check_no_lora(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if wrapped:
        raise ValueError(f"quantization needs the LoRA merged first ({len(wrapped)} LoRA layers, e.g. {wrapped[0]}); "
                         "merge it (merge_lora: true / `longlive export merge-lora`) before quantizing")


def quantize_model(model: nn.Module, recipe: NVFP4Recipe, keep: ModuleFilter, *, backend: str = "emulated",
                   materialize: bool = False, transposed: bool = False) -> list[str]:
    """Swap every selected `nn.Linear` for an NVFP4 layer in place; returns the converted names.

    `materialize` quantizes the weights now and drops the masters (inference, frozen DMD bases).
    """
    _check_no_lora(model)
    if backend == "transformer_engine":
        return _to_transformer_engine(model, recipe, keep)
    ok, why = backend_status(backend)
    if not ok:
        raise RuntimeError(f"NVFP4 backend {backend!r} is not available: {why}")
    if backend == "weight_only" and not materialize:
        raise ValueError("the weight_only NVFP4 backend stores packed weights: use it with materialize=True (inference)")
    names = []
    for name, linear in list(selected_linears(model, keep)):
        layer = NVFP4Linear.from_linear(linear, recipe, backend)
        if materialize:
            layer.materialize(transposed=transposed)
        replace_module(model, name, layer)
        names.append(name)
    kept = sum(1 for _, m in model.named_modules() if type(m) is nn.Linear)
    log.info("NVFP4 (%s%s): %d linears quantized, %d kept in high precision", backend,
             ", materialised" if materialize else "", len(names), kept)
    if not names:
        raise ValueError("NVFP4: the filter keeps every linear layer; nothing would be quantized")
    return names


def prepare_compact_model(model: nn.Module, recipe: NVFP4Recipe, keep: ModuleFilter, backend: str = "emulated") -> list[str]:
    """Convert the architecture to empty materialised layers, ready to load a compact checkpoint (strict)."""
    names = []
    for name, linear in list(selected_linears(model, keep)):
        layer = NVFP4Linear.from_linear(linear, recipe, backend)
        layer.prepare_materialized(device=linear.weight.device)
        replace_module(model, name, layer)
        names.append(name)
    return names


def compact_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized weights' buffers, bytes the same weights take in BF16)."""
    packed = dense = 0
    for m in model.modules():
        if isinstance(m, NVFP4Linear) and m.materialized:
            q = m.quantized_weight()
            packed += q.values.numel() + q.scale_factors.numel() + 4 + 16
            dense += 2 * m.in_features * m.out_features
    return packed, dense


# ---------------------------------------------------------------------- TransformerEngine (Blackwell)
class TransformerEngineLinear(nn.Module):
    """A `te.Linear` run under TE's NVFP4 block-scaling recipe (spec 7.5); weights copied from a BF16 linear."""

    def __init__(self, linear: nn.Linear, recipe: NVFP4Recipe) -> None:
        super().__init__()
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import NVFP4BlockScaling

        self.inner = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               params_dtype=torch.bfloat16, device=linear.weight.device)
        with torch.no_grad():
            self.inner.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)
        self.te_recipe = NVFP4BlockScaling()
        self._autocast = getattr(te, "autocast", None)
        self._fp8_autocast = getattr(te, "fp8_autocast", None)
        if recipe.weight_rule != "static_6" or recipe.activation_rule != "static_6":
            log.warning("TransformerEngine implements static_6 NVFP4 only; rules %s/%s are not reproduced",
                        recipe.activation_rule, recipe.weight_rule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._autocast is not None:
            with self._autocast(enabled=True, recipe=self.te_recipe):
                return self.inner(x)
        with self._fp8_autocast(enabled=True, fp8_recipe=self.te_recipe):
            return self.inner(x)


def _to_transformer_engine(model: nn.Module, recipe: NVFP4Recipe, keep: ModuleFilter) -> list[str]:
    ok, why = backend_status("transformer_engine")
    if not ok:
        raise RuntimeError(f"NVFP4 backend 'transformer_engine' is not available: {why}")
    names = []
    for name, linear in list(selected_linears(model, keep)):
        replace_module(model, name, TransformerEngineLinear(linear, recipe))
        names.append(name)
    log.info("NVFP4 (transformer_engine): %d linears", len(names))
    return names


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (NVFP4Linear, TransformerEngineLinear))]


__all__ = ["compact_nbytes", "inference_filter", "inference_recipe", "prepare_compact_model", "quantize_model",
           "quantized_names", "training_filter", "training_recipe", "TransformerEngineLinear"]
