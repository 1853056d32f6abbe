"""Row-wise dynamic FP8 (W8A8, e4m3) linear layers for Hopper inference (spec 3.7).

`convert_to_fp8(model)` swaps the selected `nn.Linear` layers for `Float8Linear`: the weight is
quantized once to e4m3 with one fp32 scale per output row; each call quantizes the activation with
one fp32 scale per token (row) and runs `torch._scaled_mm` (CUDA, compute capability >= 8.9).
Elsewhere the same quantization is followed by an fp32 emulation of the GEMM, so CPU tests check
the numerics of the GPU path. Inference only: the layer has no backward.

`_scaled_mm` rules (torch/_meta_registrations.py `_check_scaled_mm_sizes`, ATen `_scaled_mm_out_cuda`):
operand a row-major [M, K], operand b column-major [K, N], K and N multiples of 16, M free (the
CUTLASS row-wise kernel pads its scale vector itself, so no row padding is done here); row-wise
scales are fp32 and contiguous, scale_a [M, 1] and scale_b [1, N]; the output is bf16 or fp16 and a
bias must have the output's dtype.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .filters import FP8_KEPT_BF16, ModuleFilter, replace_module, selected_linears

logger = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
GEMM_ALIGNMENT = 16  # K and N of `_scaled_mm` must be multiples of this
_GEMM_OUT_DTYPES = (torch.bfloat16, torch.float16)


def to_e4m3_saturated(t: torch.Tensor) -> torch.Tensor:
    """Cast to float8_e4m3fn, clamping to +-448 first (older torch casts turn values >= 480 into NaN)."""
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor to e4m3 with one fp32 scale per row: scale = rowmax|x| / 448, 1 for all-zero rows.

    Returns `(q [M, K] e4m3, scale [M, 1] fp32)` with `x ~= q * scale`.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D tensor [rows, cols], got shape {tuple(x.shape)}")
    scale = x.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowing) rows: no 0/0
    return to_e4m3_saturated(x / scale), scale


def scaled_mm_emulated(x8: torch.Tensor, scale_x: torch.Tensor, w8: torch.Tensor, scale_w: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 emulation of the row-wise `_scaled_mm` epilogue: cast(w_scale * (x_scale * (x8 @ w8^T)) + bias).

    `x8` [M, K] and `w8` [N, K] e4m3, `scale_x` [M, 1], `scale_w` [1, N]; products of e4m3 values are exact in fp32.
    """
    acc = x8.float() @ w8.float().t()
    out = acc * scale_x * scale_w
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _fp8_gemm_available(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on `device`: CUDA (not ROCm) with compute capability >= 8.9."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= (8, 9)


class Float8Linear(nn.Module):
    """`nn.Linear` replacement with an e4m3 weight (per-row fp32 scales) and dynamic per-token e4m3 activations.

    Buffers: `weight_fp8` [out, in] row-major, whose `.t()` is the column-major [in, out] second operand of
    `_scaled_mm` (a view, no copy per call); `weight_scale` [1, out] fp32 (scale_b); `bias` as given or None.
    `use_scaled_mm` says which GEMM runs: `_scaled_mm` where the weights live on an FP8-capable GPU, else the emulation.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 fast_accum: bool = True) -> None:
        super().__init__()
        out_features, in_features = weight_fp8.shape
        _check_features(in_features, out_features, "Float8Linear")
        if weight_fp8.dtype != E4M3 or weight_scale.dtype != torch.float32 or weight_scale.shape != (1, out_features):
            raise ValueError(f"Float8Linear needs an e4m3 weight [out, in] and fp32 scales [1, out]; got "
                             f"{weight_fp8.dtype} {tuple(weight_fp8.shape)} and {weight_scale.dtype} {tuple(weight_scale.shape)}")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"Float8Linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.in_features, self.out_features, self.fast_accum = in_features, out_features, fast_accum
        self.register_buffer("weight_fp8", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        self.register_buffer("bias", bias)
        self.use_scaled_mm = _fp8_gemm_available(weight_fp8.device)  # re-decided on every device move (`_apply`)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = True) -> "Float8Linear":
        """Quantize `linear` once, on its device (meta included); `fast_accum` is `_scaled_mm`'s `use_fast_accum`
        (TorchAO's inference default is True)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Float8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_features(linear.in_features, linear.out_features, "Float8Linear.from_linear")
        w8, scale = quantize_rowwise(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w8, scale.reshape(1, -1), bias, fast_accum=fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "Float8Linear is inference-only and has no backward, but it was called on a tensor that requires "
                "grad with grad mode on; run it under torch.no_grad()/torch.inference_mode(), or train the BF16 model")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Float8Linear expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x8, scale_x = quantize_rowwise(x.reshape(-1, self.in_features))
        if self.use_scaled_mm:  # a plain bool, so no device query (or host sync) inside a compiled forward
            if x.dtype not in _GEMM_OUT_DTYPES:
                raise ValueError(f"Float8Linear on {x.device} takes bf16 or fp16 activations (the FP8 GEMM writes "
                                 f"that dtype), got {x.dtype}; cast the model and its inputs to bf16")
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = torch._scaled_mm(x8.contiguous(), self.weight_fp8.t(), scale_a=scale_x, scale_b=self.weight_scale,
                                   bias=bias, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        else:
            out = scaled_mm_emulated(x8, scale_x, self.weight_fp8, self.weight_scale, self.bias, x.dtype)
        return out.reshape(*lead, self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Float8Linear":
        """Follow device moves, but keep the e4m3 weight and fp32 scales when the model is cast (`model.to(bf16)`)."""
        kept = {name: self._buffers[name] for name in ("weight_fp8", "weight_scale")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self.use_scaled_mm = _fp8_gemm_available(self.weight_fp8.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 rowwise (e4m3 weight with per-row scales, dynamic per-token activation scales), "
                f"fast_accum={self.fast_accum}, gemm={'_scaled_mm' if self.use_scaled_mm else 'fp32 emulation'}")


def _check_features(in_features: int, out_features: int, where: str) -> None:
    if in_features <= 0 or out_features <= 0 or in_features % GEMM_ALIGNMENT or out_features % GEMM_ALIGNMENT:
        raise ValueError(f"{where}: in_features={in_features} and out_features={out_features} must be positive "
                         f"multiples of {GEMM_ALIGNMENT} (torch._scaled_mm constraint); keep this layer in high precision")


def _reject_lora(model: nn.Module) -> None:
    """Raise if `model` holds PEFT LoRA layers: their base linears would be quantized under live adapters."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft installed there can be no PEFT layers
        return
    names = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if names:
        raise ValueError(
            f"convert_to_fp8: the model has {len(names)} PEFT LoRA layers (first: {names[0]!r}); merge the adapters "
            "into the base weights before FP8 quantization (longlive.models.wan.lora.merge_lora)")


def convert_to_fp8(model: nn.Module, keep: ModuleFilter | None = None, fast_accum: bool = True) -> list[str]:
    """Replace, in place, each plain `nn.Linear` with in/out features multiples of 16 that `keep` does not match
    by a `Float8Linear`; `keep` defaults to FP8_KEPT_BF16. Returns the converted module names."""
    _reject_lora(model)
    if keep is None:
        keep = ModuleFilter.from_list(FP8_KEPT_BF16, "FP8_KEPT_BF16")
    chosen = list(selected_linears(model, keep, multiple_of=GEMM_ALIGNMENT))
    for name, linear in chosen:
        replace_module(model, name, Float8Linear.from_linear(linear, fast_accum=fast_accum))
    remaining = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    by_filter = [name for name in remaining if keep.matches(name)]
    by_shape = [name for name in remaining if not keep.matches(name)]
    absent = sorted(keep.names - {name for name, _ in model.named_modules()})
    device = next((t.device for t in model.buffers() if t.dtype == E4M3), None)
    if device is None or device.type == "meta":
        gemm = "none converted" if device is None else "chosen when the weights are materialized (meta)"
    elif _fp8_gemm_available(device):
        gemm = "torch._scaled_mm"
    else:
        gemm = f"fp32 emulation on {device} (no FP8 GEMM there: numerics only, slower than BF16)"
    logger.info("FP8: converted %d linear layers to row-wise W8A8; kept %d in high precision (%d by the filter: %s; "
                "%d with features not multiples of %d: %s); GEMM: %s", len(chosen), len(remaining), len(by_filter),
                by_filter, len(by_shape), GEMM_ALIGNMENT, by_shape, gemm)
    if absent:
        logger.warning("FP8: %d kept-layer names match no module of this model: %s", len(absent), absent)
    return [name for name, _ in chosen]


__all__ = ["E4M3_MAX", "Float8Linear", "convert_to_fp8", "quantize_rowwise", "scaled_mm_emulated", "to_e4m3_saturated"]
