"""NVFP4 linear layers: one module, several backends (spec 7.3-7.6).

`NVFP4Linear` is an `nn.Linear` (so PEFT LoRA and FSDP2 treat it as one) whose matmul runs in NVFP4:

- backend `emulated` (any device): W4A4 with the exact NVFP4 numerics of `longlive.quant.nvfp4`.
  Forward: the activation is quantized per call (1x16 blocks, activation rule, nearest), the weight
  from the master (weight rule, 16x16 tiles when `weight_2d`), both dequantized to the compute dtype
  and multiplied; the bias is added in high precision. Backward (spec 7.4): dgrad = Q_sr(dY) x Q(W)^T,
  wgrad = Q_sr(RHT(dY^T)) x Q(RHT(X_q^T))^T with the random Hadamard transform along the token
  (reduction) dimension and stochastic rounding for gradients; the FP4 activation (codes, scales,
  amax) is what is saved for backward. Master weights stay in the parameter.
- backend `weight_only` (any device; the Hopper memory path): the weight is stored materialised as
  packed NVFP4 (4.5 bits per weight) and dequantized on the fly; activations stay BF16 (W4A16).
- backends `transformer_engine` / `fouroversix`: native NVFP4 GEMMs; they need the package and a
  GPU with NVFP4 units (compute capability 10.x). `backend_status()` says why one is unavailable.

`materialize()` drops the master weight and keeps the compact buffers of spec 7.6
(`quantized_weight_values / _scale_factors / _amax / _metadata`), which are what `state_dict()` writes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4 as nv

log = logging.getLogger(__name__)

BACKENDS = ("emulated", "weight_only", "transformer_engine", "fouroversix")
QUANT_BUFFERS = ("values", "scale_factors", "amax", "metadata")
"""Suffixes of the compact-checkpoint buffers `quantized_weight_<suffix>`."""


@dataclass(frozen=True)
class NVFP4Recipe:
    """Scale rules and rounding of one quantized network (spec 7.4 / 7.8)."""

    activation_rule: str = "static_6"
    weight_rule: str = "static_6"
    gradient_rule: str = "static_6"
    weight_2d: bool = True
    """One scale per 16x16 weight tile, so W and W^T quantize identically (training)."""
    stochastic_gradients: bool = True
    wgrad_hadamard: bool = True

    def __post_init__(self) -> None:
        for field in ("activation_rule", "weight_rule", "gradient_rule"):
            nv.rule_maxima(getattr(self, field))

    @staticmethod
    def from_rules(scale_rule: str, activation: str | None = None, weight: str | None = None,
                   gradient: str | None = None, **kwargs: bool) -> "NVFP4Recipe":
        """The reference's resolution: each specific rule defaults to `scale_rule`."""
        return NVFP4Recipe(activation or scale_rule, weight or scale_rule, gradient or scale_rule, **kwargs)

    def for_inference(self) -> "NVFP4Recipe":
        """Inference quantizes weights in 1x16 blocks (spec 7.6)."""
        return replace(self, weight_2d=False)


def backend_status(backend: str, device: torch.device | None = None) -> tuple[bool, str]:
    """(available, reason) of an NVFP4 backend on `device` (default: the current CUDA device, else CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown NVFP4 backend {backend!r}; expected one of {BACKENDS}")
    if backend in ("emulated", "weight_only"):
        return True, "runs on any device"
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return False, f"{backend} needs a CUDA GPU with NVFP4 units (compute capability 10.x); running on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return False, (f"{backend} needs NVFP4 tensor cores (Blackwell, compute capability 10.x); "
                       f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use backend 'emulated' (same numerics) "
                       f"or 'weight_only' (packed FP4 weights, BF16 activations)")
    module = "transformer_engine.pytorch" if backend == "transformer_engine" else "fouroversix"
    try:
        __import__(module)
    except ImportError as exc:
        return False, f"{backend}: cannot import {module} ({exc})"
    if backend == "fouroversix":
        return False, ("fouroversix: its GEMM API differs between releases and is not wired into this build; "
                       "backend 'emulated' reproduces its numerics and checkpoint layout")
    return True, "available"


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def quantize_2d(x: torch.Tensor, rule: str, *, block_2d: bool = False, stochastic: bool = False) -> nv.NVFP4Tensor:
    """NVFP4-quantize a 2-D tensor: Triton kernels on CUDA (1x16 blocks), the reference otherwise.

    Stochastic rounding draws its uniforms from the default generator of x's device (the trainers seed it).
    """
    uniform = torch.rand(x.shape, dtype=torch.float32, device=x.device) if stochastic else None
    rnd = "stochastic" if stochastic else "nearest"
    if _use_triton(x) and not block_2d:
        from .nvfp4_triton import quantize_triton

        return quantize_triton(x, rule, round=rnd, uniform=uniform)
    return nv.quantize(x, rule, block_2d=block_2d, round=rnd, uniform=uniform)


def dequantize_2d(q: nv.NVFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _use_triton(q.values) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        from .nvfp4_triton import dequantize_triton

        return dequantize_triton(q, dtype)
    return nv.dequantize(q, dtype)


def fake_quantize_2d(x: torch.Tensor, rule: str, dtype: torch.dtype | None = None, **kwargs: bool) -> torch.Tensor:
    return dequantize_2d(quantize_2d(x, rule, **kwargs), dtype or x.dtype)


def _pad_rows16(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of 16 (the Hadamard groups); zeros add nothing to a product."""
    pad = -t.shape[-1] % nv.BLOCK_SIZE
    return F.pad(t, (0, pad)) if pad else t


class _NVFP4MatMul(torch.autograd.Function):
    """y = Q(x) Q(W)^T with the quantized backward of spec 7.4 (see module docstring)."""

    @staticmethod
    def forward(ctx, x2, weight, layer: "NVFP4Linear"):
        r = layer.recipe
        qx = quantize_2d(x2, r.activation_rule)
        w = layer.dequantized_weight(x2.dtype)
        ctx.layer, ctx.qx, ctx.dtype = layer, qx, x2.dtype
        ctx.weight_given = weight is not None
        return dequantize_2d(qx, x2.dtype) @ w.t()

    @staticmethod
    def backward(ctx, grad_out):
        layer, r, dtype = ctx.layer, ctx.layer.recipe, ctx.dtype
        g = grad_out.to(dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq = fake_quantize_2d(g, r.gradient_rule, stochastic=r.stochastic_gradients)
            grad_x = gq @ layer.dequantized_weight_t(dtype).t()
        if ctx.weight_given and ctx.needs_input_grad[1]:
            x_hat = dequantize_2d(ctx.qx, dtype)
            gt, xt = _pad_rows16(g.t()), _pad_rows16(x_hat.t())
            if r.wgrad_hadamard:
                gt, xt = nv.hadamard_transform(gt.float()).to(dtype), nv.hadamard_transform(xt.float()).to(dtype)
            gtq = fake_quantize_2d(gt, r.gradient_rule, stochastic=r.stochastic_gradients)
            xtq = fake_quantize_2d(xt, r.activation_rule)
            grad_w = (gtq.float() @ xtq.float().t()).to(layer.weight.dtype)
        ctx.layer = ctx.qx = None
        return grad_x, grad_w, None


class NVFP4Linear(nn.Linear):
    """An `nn.Linear` computed in NVFP4 by one of `BACKENDS` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: NVFP4Recipe = NVFP4Recipe(),
                 backend: str = "emulated", device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if backend not in ("emulated", "weight_only"):
            raise ValueError(f"NVFP4Linear runs the 'emulated' and 'weight_only' backends; for {backend!r} use "
                             f"quantize_model(..., backend={backend!r}), which checks its availability")
        if in_features % nv.BLOCK_SIZE:
            raise ValueError(f"NVFP4Linear: in_features={in_features} is not a multiple of {nv.BLOCK_SIZE}")
        self.recipe, self.backend = recipe, backend
        self.materialized = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: NVFP4Recipe, backend: str = "emulated") -> "NVFP4Linear":
        """Wrap an existing linear, sharing its parameters (works on the meta device)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe, backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    # ------------------------------------------------------------------ materialised (compact) weights
    def materialize(self, transposed: bool = False) -> None:
        """Quantize the master weight with the weight rule, keep only the compact buffers, drop the master.

        `transposed` also keeps Q(W^T) for dgrad when weights use 1x16 blocks (LoRA training on a frozen
        FP4 base); with 16x16 tiles Q(W)^T already is Q(W^T)."""
        if self.materialized:
            return
        w = self.weight.detach()
        q = quantize_2d(w, self.recipe.weight_rule, block_2d=self.recipe.weight_2d)
        self._set_quantized(q)
        if transposed and not self.recipe.weight_2d:
            qt = quantize_2d(w.t().contiguous(), self.recipe.weight_rule)
            for name, t in _internal_buffers(qt).items():
                self.register_buffer(f"_wt_{name}", t, persistent=False)
        del self.weight
        self.register_parameter("weight", None)

    def prepare_materialized(self, device=None) -> None:
        """Turn into an empty materialised layer (buffers of the right shapes) to `load_state_dict` into."""
        prow, pcol = nv.padded_shape(self.out_features, self.in_features)
        device = device if device is not None else (self.bias.device if self.bias is not None else self.weight.device)
        empty = nv.NVFP4Tensor(
            values=torch.zeros(prow, pcol // 2, dtype=torch.uint8, device=device),
            scale_factors=torch.zeros(prow * pcol // 16, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn),
            amax=torch.zeros(1, dtype=torch.float32, device=device),
            metadata=torch.tensor([self.out_features, self.in_features, prow, pcol], dtype=torch.int32, device="cpu"),
            rule=self.recipe.weight_rule,
        )
        self._set_quantized(empty)
        del self.weight
        self.register_parameter("weight", None)

    def _set_quantized(self, q: nv.NVFP4Tensor) -> None:
        rows, cols = q.shape
        if (rows, cols) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight {rows}x{cols} does not fit a {self.out_features}x{self.in_features} linear")
        for name, t in _internal_buffers(q).items():
            self.register_buffer(f"quantized_weight_{name}", t.to(q.values.device))
        self.materialized = True

    @property
    def qweight(self) -> torch.Tensor | None:
        """The packed weight codes (PEFT reads a quantized base layer's device from `qweight`)."""
        return self.quantized_weight_values if self.materialized else None

    def quantized_weight(self, transposed: bool = False) -> nv.NVFP4Tensor:
        prefix = "_wt" if transposed else "quantized_weight"
        b = {n: getattr(self, f"{prefix}_{n}") for n in QUANT_BUFFERS}
        return nv.NVFP4Tensor(b["values"], b["scale_factors"].view(torch.float8_e4m3fn), b["amax"].view(torch.float32),
                              b["metadata"], rule=self.recipe.weight_rule)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Q(W) in `dtype`, from the compact buffers or (emulated training) from the master weight."""
        if self.materialized:
            return dequantize_2d(self.quantized_weight(), dtype)
        return fake_quantize_2d(self.weight.detach().to(dtype), self.recipe.weight_rule, block_2d=self.recipe.weight_2d)

    def dequantized_weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        """Q(W^T) in `dtype` (dgrad operand): Q(W)^T with 16x16 tiles, else W^T quantized along out_features."""
        if self.recipe.weight_2d:
            return self.dequantized_weight(dtype).t()
        if self.materialized:
            if not hasattr(self, "_wt_values"):
                raise RuntimeError("NVFP4Linear: gradient through a materialised 1x16-block weight needs "
                                   "materialize(transposed=True)")
            return dequantize_2d(self.quantized_weight(transposed=True), dtype)
        return fake_quantize_2d(self.weight.detach().t().contiguous().to(dtype), self.recipe.weight_rule)

    # ------------------------------------------------------------------ state dict
    # In memory (and in the state dict, so that gloo/NCCL broadcasts and DCP handle them) the scale
    # factors and amax are kept as uint8 / int32 bit patterns; `spec_dtypes` gives the spec-7.6 dtypes
    # for files, and loading accepts either.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.materialized:
            for name, dt in (("scale_factors", torch.uint8), ("amax", torch.int32)):
                key = f"{prefix}quantized_weight_{name}"
                if key in state_dict and state_dict[key].dtype != dt:
                    state_dict[key] = state_dict[key].view(dt)
            meta = state_dict.get(f"{prefix}quantized_weight_metadata")
            want = [self.out_features, self.in_features, *nv.padded_shape(self.out_features, self.in_features)]
            if meta is not None and meta.tolist() != want:
                error_msgs.append(f"{prefix}quantized_weight_metadata {meta.tolist()} does not match this layer ({want})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.backend == "weight_only":
            out = x2 @ self.dequantized_weight(x2.dtype).t()
        else:
            weight = None if self.materialized else self.weight
            out = _NVFP4MatMul.apply(x2, weight, self)
        if self.bias is not None:
            out = (out.float() + self.bias.float()).to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"{super().extra_repr()}, nvfp4 {self.backend}, act={r.activation_rule}, weight={r.weight_rule}"
                f"{' 2d' if r.weight_2d else ''}, grad={r.gradient_rule}{', materialized' if self.materialized else ''}")


def _internal_buffers(q: nv.NVFP4Tensor) -> dict[str, torch.Tensor]:
    """The four buffers in dtypes that `Module.to(dtype)` leaves alone (e4m3 / fp32 kept as bit patterns)."""
    return {"values": q.values, "scale_factors": q.scale_factors.view(torch.uint8),
            "amax": q.amax.view(torch.int32), "metadata": q.metadata.to(q.values.device)}


def spec_dtypes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the compact buffers in the file dtypes of spec 7.6 (e4m3 scales, fp32 amax); no copies."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("quantized_weight_scale_factors") and v.dtype == torch.uint8:
            out[k] = v.view(torch.float8_e4m3fn)
        elif k.endswith("quantized_weight_amax") and v.dtype == torch.int32:
            out[k] = v.view(torch.float32)
    return out


def is_quantized_key(key: str) -> bool:
    return any(key.endswith(f"quantized_weight_{n}") for n in QUANT_BUFFERS)


__all__ = ["BACKENDS", "NVFP4Linear", "NVFP4Recipe", "backend_status", "dequantize_2d", "fake_quantize_2d",
           "is_quantized_key", "quantize_2d", "spec_dtypes"]
