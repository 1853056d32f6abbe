"""Reference PyTorch implementation of the NVFP4 format (spec 7.1, 7.2, 7.6).

NVFP4 = E2M1 element codes (two per byte), one E4M3 scale per 16 elements (1x16 blocks, or 16x16
tiles for weights) and one FP32 per-tensor amax. This module is the numerical definition that the
Triton kernels in :mod:`longlive.quant.nvfp4_triton` reproduce bit for bit; the exact order of
floating-point operations is part of the contract and is written down in ``docs/nvfp4.md``.

Order of operations (all float32, every step one IEEE round-to-nearest-even operation):

1. ``amax = max|x|`` over the whole tensor (inf/NaN rejected).
2. Per tensor, with ``(E, S)`` = (E2M1_max, E4M3_max) of the rule:
   ``k = S / amax`` (block max -> E); for four-over-six also ``k4 = (S*E/4) / amax`` (block max -> 4);
   ``dec = amax / (E*S)``. Divisions are tensor/tensor divisions (never a reciprocal multiply).
3. Per block: ``sb = e4m3_rne(min(bmax * k, 448))`` (0 where ``bmax == 0``);
   ``scale = sb * dec``; ``inv = 1 / scale`` (0 where ``scale`` is below the smallest normal float32);
   ``xs = x * inv`` (multiplication by the reciprocal, as the reference does).
4. Nearest rounding compares ``|xs|`` with the midpoints (ties to the even code), saturating at 6.
5. Dequantization: ``x_hat = (value(code) * sb) * dec``, then cast to the output dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

ScaleRule = Literal["static_6", "static_4", "mse", "mae", "abs_max"]
RoundStyle = Literal["nearest", "stochastic"]

BLOCK_SIZE = 16
"""Elements per scale block along the last dimension (1x16), or tile side for 2-D blocks."""
ROW_PAD = 128
"""Rows are padded to a multiple of this (one 128x4 tile of the blocked scale layout)."""
COL_PAD = 64
"""Columns are padded to a multiple of this (4 scale columns of the blocked scale layout)."""

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of E2M1 codes 0..7 (code = s*8 + e*2 + m); codes 8..15 are the negatives."""
E4M3_MAX = 448.0
FLOAT32_MIN_NORMAL = 2.0**-126

RULE_MAXIMA: dict[str, tuple[float, float]] = {
    "static_6": (6.0, 448.0),
    "static_4": (4.0, 448.0),
    "mse": (6.0, 256.0),
    "mae": (6.0, 256.0),
    "abs_max": (6.0, 256.0),
}
"""(E2M1_max, E4M3_max) used in the per-tensor scale of each rule (spec 7.1 / 7.2)."""
FOUR_OVER_SIX_RULES = ("mse", "mae", "abs_max")

# Midpoints between consecutive E2M1 magnitudes. A midpoint is rounded up when the upper neighbour
# has an even mantissa bit (">="), down otherwise (">"): round-half-to-even on the E2M1 grid.
_NEAREST_THRESHOLDS: tuple[tuple[float, bool], ...] = (
    (0.25, False),  # 0 | 0.5   -> tie to 0
    (0.75, True),  # 0.5 | 1   -> tie to 1
    (1.25, False),  # 1 | 1.5   -> tie to 1
    (1.75, True),  # 1.5 | 2   -> tie to 2
    (2.5, False),  # 2 | 3     -> tie to 2
    (3.5, True),  # 3 | 4     -> tie to 4
    (5.0, False),  # 4 | 6     -> tie to 4
)

DEFAULT_RHT_SIGNS: tuple[int, ...] = (1, -1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1, 1, 1, -1, -1)
"""Fixed +-1 sign vector of the random Hadamard transform (chosen once; part of the format)."""


def rule_maxima(rule: str) -> tuple[float, float]:
    """Return (E2M1_max, E4M3_max) of a scale rule; raises ValueError for unknown names."""
    try:
        return RULE_MAXIMA[rule]
    except KeyError:
        raise ValueError(
            f"unknown NVFP4 scale rule {rule!r}; expected one of {sorted(RULE_MAXIMA)}"
        ) from None


def is_four_over_six(rule: str) -> bool:
    """True for the adaptive rules that choose between max->6 and max->4 per block (spec 7.2)."""
    rule_maxima(rule)
    return rule in FOUR_OVER_SIX_RULES


def padded_shape(rows: int, cols: int) -> tuple[int, int]:
    """Storage shape of a [rows, cols] tensor: rows to a multiple of 128, cols to a multiple of 64."""
    return -(-rows // ROW_PAD) * ROW_PAD, -(-cols // COL_PAD) * COL_PAD


# --------------------------------------------------------------------------------------------------
# Input checks and per-tensor scales


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    """Raise ValueError naming the shape and the count of inf/NaN values if ``x`` has any."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_bad = int(bad.sum())
        raise ValueError(
            f"NVFP4 quantization of {name} with shape {tuple(x.shape)} refused: {n_bad} of "
            f"{x.numel()} values are not finite ({n_nan} NaN, {n_bad - n_nan} inf); "
            "NVFP4 cannot represent them. Fix the producer of this tensor or skip quantization."
        )


def tensor_amax(x: torch.Tensor, name: str = "input", validate: bool = True) -> torch.Tensor:
    """float32 ``[1]`` amax = max|x|; with ``validate`` rejects inf/NaN (one host sync)."""
    amax = x.detach().abs().amax().to(torch.float32).reshape(1)
    if validate and not bool(torch.isfinite(amax).all()):
        check_finite(x, name)
    return amax


@dataclass(frozen=True)
class TensorScales:
    """Per-tensor float32 factors (each a [1] tensor on the data's device) shared with the kernels."""

    block_encode: torch.Tensor
    """k: block scale = bmax * k maps the block max to E2M1_max (6 or 4)."""
    block_encode_four: torch.Tensor | None
    """k4 for the four-over-six alternative (block max -> 4); None for static rules."""
    decode: torch.Tensor
    """amax / (E2M1_max * E4M3_max): x_hat = (value * block_scale) * decode."""


def tensor_scales(amax: torch.Tensor, rule: str) -> TensorScales:
    """Compute the per-tensor factors of ``rule`` from a float32 amax with tensor/tensor divisions."""
    e2m1_max, e4m3_max = rule_maxima(rule)
    amax = amax.to(torch.float32).reshape(1)

    def full(v: float) -> torch.Tensor:
        return torch.full_like(amax, v)

    k = full(e4m3_max) / amax
    k4 = full(e4m3_max * e2m1_max / 4.0) / amax if rule in FOUR_OVER_SIX_RULES else None
    dec = amax / full(e2m1_max * e4m3_max)
    return TensorScales(k, k4, dec)


# --------------------------------------------------------------------------------------------------
# Element coding


def round_to_e2m1_codes(xs: torch.Tensor) -> torch.Tensor:
    """Round scaled values to E2M1 codes (uint8 0..15), nearest with ties to even, saturating at 6.

    -0.0 and negatives that round to zero get code 0 (never the negative zero 8).
    """
    a = xs.abs()
    k = torch.zeros(xs.shape, dtype=torch.uint8, device=xs.device)
    for t, inclusive in _NEAREST_THRESHOLDS:
        k += (a >= t) if inclusive else (a > t)
    negative = (xs < 0) & (k > 0)
    return k + negative.to(torch.uint8) * 8


def stochastic_round_to_e2m1_codes(xs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Stochastically round scaled values to E2M1 codes with uniforms in [0, 1), saturating at 6.

    Magnitude m = floor(|xs|/step + u) * step with step 0.5 below 2, 1 in [2, 4), 2 from 4 on
    (equivalent to adding U(-0.5, 0.5) in step units then rounding); unbiased for |xs| <= 6.
    """
    a = xs.abs()
    a = torch.where(a > 6.0, torch.full_like(a, 6.0), a)
    inv_step = torch.where(a < 2.0, 2.0, torch.where(a < 4.0, 1.0, 0.5)).to(torch.float32)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(torch.float32)
    v = a * inv_step + uniform
    m = v.to(torch.int32).to(torch.float32) * step
    k = torch.zeros(xs.shape, dtype=torch.uint8, device=xs.device)
    for t in E2M1_VALUES[1:]:
        k += m >= t
    negative = (xs < 0) & (k > 0)
    return k + negative.to(torch.uint8) * 8


def e2m1_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes (any integer dtype, 0..15) to float32 values."""
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)
    return lut.to(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., n] (n even) into uint8 [..., n/2]: element 2j low nibble, 2j+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 [..., n/2] -> codes uint8 [..., n]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed E2M1 values must be uint8, got {packed.dtype}")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------------------------------
# Blocked ("swizzled") scale-factor layout (spec 7.1)


def blocked_scale_index(row: int, col: int, scale_cols: int) -> int:
    """Flat index of scale (row, col) in the blocked layout of a [rows_padded, scale_cols] matrix."""
    if scale_cols % 4:
        raise ValueError(f"scale_cols must be a multiple of 4, got {scale_cols}")
    tile = (row // 128) * (scale_cols // 4) + col // 4
    return (tile * 32 + row % 32) * 16 + (row % 128 // 32) * 4 + col % 4


def pack_scale_factors(scales: torch.Tensor) -> torch.Tensor:
    """Blocked layout of a [rows, scale_cols] scale matrix (rows % 128 == 0, scale_cols % 4 == 0)."""
    rows, scols = scales.shape
    if rows % 128 or scols % 4:
        raise ValueError(
            f"scale matrix shape {tuple(scales.shape)} must be padded to rows % 128 == 0 and "
            "scale_cols % 4 == 0 before blocking; use padded_shape()"
        )
    # row = rb*128 + r4*32 + r32, col = cb*4 + c4  ->  order (rb, cb, r32, r4, c4)
    t = scales.reshape(rows // 128, 4, 32, scols // 4, 4).permute(0, 3, 2, 1, 4)
    return t.reshape(-1)


def unpack_scale_factors(flat: torch.Tensor, rows: int, scale_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_scale_factors`: flat blocked scales -> [rows, scale_cols]."""
    if flat.numel() != rows * scale_cols:
        raise ValueError(
            f"blocked scale buffer has {flat.numel()} entries, expected {rows}x{scale_cols}"
        )
    if rows % 128 or scale_cols % 4:
        raise ValueError(f"padded scale shape ({rows}, {scale_cols}) must be multiples of (128, 4)")
    t = flat.reshape(rows // 128, scale_cols // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return t.reshape(rows, scale_cols)


# --------------------------------------------------------------------------------------------------
# Random Hadamard transform


def hadamard_matrix(
    signs: tuple[int, ...] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Orthogonal 16x16 ``diag(signs) @ H16 / 4`` (Sylvester Hadamard); its inverse is its transpose."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < BLOCK_SIZE:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    s = torch.as_tensor(DEFAULT_RHT_SIGNS if signs is None else signs, dtype=torch.float64)
    if s.shape != (BLOCK_SIZE,) or not bool((s.abs() == 1).all()):
        raise ValueError(f"Hadamard sign vector must be 16 values of +-1, got {s.tolist()}")
    return (s[:, None] * h / 4.0).to(dtype=dtype, device=device)


def _apply_groups(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"Hadamard transform needs the last dimension to be a multiple of 16, got {tuple(x.shape)}"
        )
    g = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    return (g @ m.to(dtype=x.dtype, device=x.device)).reshape(x.shape)


def hadamard_transform(x: torch.Tensor, signs: tuple[int, ...] | None = None) -> torch.Tensor:
    """Random Hadamard transform along the last dim in groups of 16: ``x_g @ (diag(s) H / 4)``.

    Applied to both operands along the reduction dim it cancels in ``A @ B.T`` (the matrix is orthogonal).
    """
    return _apply_groups(x, hadamard_matrix(signs, dtype=torch.float64).to(x.dtype))


def inverse_hadamard_transform(y: torch.Tensor, signs: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`hadamard_transform` (multiply each group by the transpose)."""
    return _apply_groups(y, hadamard_matrix(signs, dtype=torch.float64).T.contiguous().to(y.dtype))


# --------------------------------------------------------------------------------------------------
# Quantized tensor container and state-dict buffers (spec 7.6)


@dataclass
class NVFP4Tensor:
    """A quantized 2-D tensor in the compact layout of spec 7.6 (storage padded to 128 x 64)."""

    values: torch.Tensor
    """uint8 [padded_rows, padded_cols/2]; element 2j in the low nibble."""
    scale_factors: torch.Tensor
    """float8_e4m3fn [padded_rows * padded_cols / 16], blocked layout."""
    amax: torch.Tensor
    """float32 [1] per-tensor absolute maximum."""
    metadata: torch.Tensor
    """int32 [4] = (orig rows, orig cols, padded rows, padded cols), on the CPU."""
    rule: str
    """Scale rule; fixes the dequantization denominators (E2M1_max, E4M3_max)."""

    def __post_init__(self) -> None:
        rule_maxima(self.rule)
        self.metadata = self.metadata.to("cpu", torch.int32)
        if self.metadata.shape != (4,):
            raise ValueError(f"NVFP4 metadata must have 4 entries, got shape {tuple(self.metadata.shape)}")
        rows, cols, prow, pcol = self.metadata.tolist()
        if prow % ROW_PAD or pcol % COL_PAD or prow < rows or pcol < cols or min(rows, cols) < 0:
            raise ValueError(
                f"NVFP4 metadata {self.metadata.tolist()} is inconsistent: padded rows/cols must cover "
                "the original ones and be multiples of 128 / 64"
            )
        if self.values.dtype != torch.uint8 or tuple(self.values.shape) != (prow, pcol // 2):
            raise ValueError(
                f"NVFP4 values must be uint8 [{prow}, {pcol // 2}], got {self.values.dtype} "
                f"{tuple(self.values.shape)}"
            )
        if self.scale_factors.dtype != torch.float8_e4m3fn or self.scale_factors.shape != (prow * pcol // 16,):
            raise ValueError(
                f"NVFP4 scale factors must be float8_e4m3fn [{prow * pcol // 16}], got "
                f"{self.scale_factors.dtype} {tuple(self.scale_factors.shape)}"
            )
        if self.amax.dtype != torch.float32 or self.amax.shape != (1,):
            raise ValueError(f"NVFP4 amax must be float32 [1], got {self.amax.dtype} {tuple(self.amax.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """Original (unpadded) shape."""
        rows, cols = self.metadata[:2].tolist()
        return rows, cols

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Storage shape (rows % 128 == 0, cols % 64 == 0)."""
        prow, pcol = self.metadata[2:].tolist()
        return prow, pcol

    def codes(self) -> torch.Tensor:
        """Unpacked E2M1 codes, uint8 [padded_rows, padded_cols]."""
        return unpack_e2m1(self.values)

    def scale_matrix(self) -> torch.Tensor:
        """Block scales as a float8_e4m3fn [padded_rows, padded_cols/16] matrix (un-blocked)."""
        prow, pcol = self.padded_shape
        return unpack_scale_factors(self.scale_factors, prow, pcol // BLOCK_SIZE)

    def to_state_dict(self, prefix: str = "quantized_weight") -> dict[str, torch.Tensor]:
        """The four buffers ``<prefix>_values/_scale_factors/_amax/_metadata`` of spec 7.6."""
        return {
            f"{prefix}_values": self.values,
            f"{prefix}_scale_factors": self.scale_factors,
            f"{prefix}_amax": self.amax,
            f"{prefix}_metadata": self.metadata,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], rule: str, prefix: str = "quantized_weight"
    ) -> "NVFP4Tensor":
        """Rebuild from the four spec-7.6 buffers; ``rule`` comes from the config (not stored)."""
        names = [f"{prefix}_{n}" for n in ("values", "scale_factors", "amax", "metadata")]
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"NVFP4 state dict lacks {missing}; present keys: {sorted(state)[:8]}...")
        return cls(*(state[n] for n in names), rule=rule)


# --------------------------------------------------------------------------------------------------
# Quantize / dequantize


def _pairwise_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) as a fixed tree ((e0+e1)+(e2+e3))+...; bit-reproducible."""
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0]


def _block_error(diff: torch.Tensor, rule: str, order_invariant: bool) -> torch.Tensor:
    """Per-block error of a candidate (last dim = block elements) under a four-over-six rule."""
    if rule == "abs_max":
        return diff.abs().amax(-1)
    terms = diff * diff if rule == "mse" else diff.abs()
    if order_invariant:  # 16x16 tiles: same sum for W and W^T
        terms = terms.sort(dim=-1).values
    return _pairwise_sum(terms)


def _candidate(
    blocks: torch.Tensor,
    bmax: torch.Tensor,
    k: torch.Tensor,
    dec: torch.Tensor,
    uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize blocks [..., n] with block scale bmax*k; returns (codes, fp8 scales, dequantized)."""
    p = bmax * k
    p = torch.where(bmax > 0, p, torch.zeros_like(p))
    p = torch.clamp(p, max=E4M3_MAX)
    sb = p.to(torch.float8_e4m3fn)
    sbf = sb.to(torch.float32)
    scale = sbf * dec
    normal = scale >= FLOAT32_MIN_NORMAL
    one = torch.ones_like(scale)
    inv = torch.where(normal, one / torch.where(normal, scale, one), torch.zeros_like(scale))
    xs = blocks * inv[..., None]
    if uniform is None:
        codes = round_to_e2m1_codes(xs)
    else:
        codes = stochastic_round_to_e2m1_codes(xs, uniform)
    deq = (e2m1_codes_to_float(codes) * sbf[..., None]) * dec
    return codes, sb, deq


def _draw_uniform(
    x: torch.Tensor, generator: torch.Generator | None, uniform: torch.Tensor | None
) -> torch.Tensor:
    if uniform is not None:
        if tuple(uniform.shape) != tuple(x.shape):
            raise ValueError(
                f"stochastic rounding uniforms have shape {tuple(uniform.shape)}, expected {tuple(x.shape)}"
            )
        u = uniform.to(device=x.device, dtype=torch.float32)
        if not bool(((u >= 0) & (u < 1)).all()):
            raise ValueError("stochastic rounding uniforms must lie in [0, 1)")
        return u
    if generator is None:
        raise ValueError(
            "stochastic rounding needs an explicit torch.Generator or a pre-drawn `uniform` tensor "
            "so that results are reproducible"
        )
    return torch.rand(x.shape, generator=generator, dtype=torch.float32, device=generator.device)


def quantize(
    x: torch.Tensor,
    rule: ScaleRule | str = "static_6",
    block_2d: bool = False,
    round: RoundStyle | str = "nearest",
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> NVFP4Tensor:
    """Quantize a 2-D floating tensor to NVFP4 (reference implementation, any device).

    ``block_2d`` uses one scale per 16x16 tile (weights, so W and W^T quantize identically);
    stochastic rounding takes uniforms in [0, 1) of x's shape, given or drawn from ``generator``.
    ``amax`` (float32, one element) replaces the tensor's own amax in the per-tensor scale: x is then
    quantized as the part of a larger tensor with that amax would be (it must be >= max|x|).
    """
    rule_maxima(rule)
    if round not in ("nearest", "stochastic"):
        raise ValueError(f"round must be 'nearest' or 'stochastic', got {round!r}")
    if x.dim() != 2:
        raise ValueError(f"NVFP4 quantize expects a 2-D tensor, got shape {tuple(x.shape)}; reshape first")
    if not x.is_floating_point():
        raise TypeError(f"NVFP4 quantize expects a floating tensor, got {x.dtype}")
    rows, cols = x.shape
    prow, pcol = padded_shape(rows, cols)
    xf = x.detach().to(torch.float32)
    own = tensor_amax(xf)
    if amax is not None:
        amax = amax.detach().to(device=xf.device, dtype=torch.float32).reshape(1)
        if not bool(amax >= own):
            raise ValueError(f"NVFP4 quantize: the given amax {float(amax):.6g} is below the tensor's own {float(own):.6g}")
    else:
        amax = own
    amax_value = float(amax)
    if 0.0 < amax_value < 1e-30:
        logger.warning(
            "NVFP4: tensor of shape %s has amax %.3g; scales below the float32 normal range quantize to 0",
            tuple(x.shape), amax_value,
        )
    scales = tensor_scales(amax, rule)
    xp = torch.nn.functional.pad(xf, (0, pcol - cols, 0, prow - rows))
    u = None
    if round == "stochastic":
        u = _draw_uniform(xf, generator, uniform).to(xf.device)
        u = torch.nn.functional.pad(u, (0, pcol - cols, 0, prow - rows))

    scols = pcol // BLOCK_SIZE
    if block_2d:
        # tiles [prow/16, scols, 256], tile element (i, j) at index i*16 + j
        def to_blocks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(prow // 16, 16, scols, 16).permute(0, 2, 1, 3).reshape(prow // 16, scols, 256)

        def from_blocks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(prow // 16, scols, 16, 16).permute(0, 2, 1, 3).reshape(prow, pcol)
    else:
        def to_blocks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(prow, scols, BLOCK_SIZE)

        def from_blocks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(prow, pcol)

    blocks = to_blocks(xp)
    ub = to_blocks(u) if u is not None else None
    bmax = blocks.abs().amax(-1)
    codes, sb, deq = _candidate(blocks, bmax, scales.block_encode, scales.decode, ub)
    if scales.block_encode_four is not None:
        codes4, sb4, deq4 = _candidate(blocks, bmax, scales.block_encode_four, scales.decode, ub)
        err6 = _block_error(deq - blocks, rule, order_invariant=block_2d)
        err4 = _block_error(deq4 - blocks, rule, order_invariant=block_2d)
        pick4 = err4 < err6  # ties keep the max->6 candidate
        codes = torch.where(pick4[..., None], codes4, codes)
        sb = torch.where(pick4, sb4.view(torch.uint8), sb.view(torch.uint8)).view(torch.float8_e4m3fn)

    codes = from_blocks(codes)
    if block_2d:
        # one scale per 16x16 tile, stored once per 1x16 row block
        sb = sb.view(torch.uint8).repeat_interleave(16, dim=0).view(torch.float8_e4m3fn)
    metadata = torch.tensor([rows, cols, prow, pcol], dtype=torch.int32)
    return NVFP4Tensor(
        values=pack_e2m1(codes),
        scale_factors=pack_scale_factors(sb),
        amax=amax,
        metadata=metadata,
        rule=rule,
    )


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize to ``dtype`` [orig rows, orig cols]: ``(value * block_scale) * decode`` in float32."""
    rows, cols = q.shape
    prow, pcol = q.padded_shape
    dec = tensor_scales(q.amax, q.rule).decode
    vals = e2m1_codes_to_float(q.codes()).reshape(prow, pcol // BLOCK_SIZE, BLOCK_SIZE)
    sbf = q.scale_matrix().to(torch.float32)
    out = ((vals * sbf[..., None]) * dec).reshape(prow, pcol)
    return out[:rows, :cols].to(dtype)


def fake_quantize(x: torch.Tensor, rule: ScaleRule | str = "static_6", **kwargs: object) -> torch.Tensor:
    """Quantize then dequantize back to x's dtype (for numerics experiments and tests)."""
    return dequantize(quantize(x, rule, **kwargs), x.dtype)  # type: ignore[arg-type]


__all__ = [
    "BLOCK_SIZE",
    "COL_PAD",
    "DEFAULT_RHT_SIGNS",
    "E2M1_VALUES",
    "FOUR_OVER_SIX_RULES",
    "NVFP4Tensor",
    "ROW_PAD",
    "RULE_MAXIMA",
    "TensorScales",
    "blocked_scale_index",
    "check_finite",
    "dequantize",
    "e2m1_codes_to_float",
    "fake_quantize",
    "hadamard_matrix",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "is_four_over_six",
    "pack_e2m1",
    "pack_scale_factors",
    "padded_shape",
    "quantize",
    "round_to_e2m1_codes",
    "rule_maxima",
    "stochastic_round_to_e2m1_codes",
    "tensor_amax",
    "tensor_scales",
    "unpack_e2m1",
    "unpack_scale_factors",
]
