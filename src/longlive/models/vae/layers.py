"""Building blocks of the Wan2.2 VAE: causal 3-D convolutions with an explicit feature cache.

Every temporal convolution runs in streaming form: the frames it needs from the past come from a
`FeatureCache` passed in by the caller, so encoding and decoding work chunk by chunk with state
that the caller owns (no module attributes change during a forward). Parameter names follow the
original Wan2.2 `vae2_2.py` layout (`residual.0/2/3/6`, `shortcut`, `resample.1`, `time_conv`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

log = logging.getLogger(__name__)

# Marks the slot of a temporal up-sampler that has seen the first latent of its stream: the first
# latent is not up-sampled in time (1 latent -> 1 frame), later ones are (1 latent -> 2 frames).
_FIRST_STEP_DONE = "first-step-done"


class FeatureCache:
    """Tail frames of every cached temporal convolution of one causal stream.

    Slots are taken in call order; `start_step()` rewinds the cursor before each network call, so
    the same slot always belongs to the same convolution.
    """

    def __init__(self) -> None:
        self._slots: list[torch.Tensor | str | None] = []
        self._cursor = 0

    def start_step(self) -> None:
        """Rewind the cursor before running the network on the next piece of the stream."""
        self._cursor = 0

    def take(self) -> tuple[int, torch.Tensor | str | None]:
        """The next slot index and what it holds (None for a convolution not yet run)."""
        index = self._cursor
        self._cursor += 1
        if index == len(self._slots):
            self._slots.append(None)
        return index, self._slots[index]

    def put(self, index: int, value: torch.Tensor | str) -> None:
        """Store the tail kept for slot `index`."""
        self._slots[index] = value

    def reset(self) -> None:
        """Forget the stream (drop every cached tensor)."""
        self._slots.clear()
        self._cursor = 0

    def __len__(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        """Bytes held by cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._slots if isinstance(t, torch.Tensor))


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded only towards the past in time, with optional streaming state."""

    channels_last = False  # set by WanVAE.to_channels_last(): inputs are made channels-last (NDHWC)
    row_split = None  # set by WanVAE.split_rows(): this rank decodes a band of rows (parallel/vae_decode.py)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pad_t, pad_h, pad_w = self.padding
        self.past_frames = 2 * pad_t  # frames of history the kernel needs
        # the symmetric spatial zero padding stays inside the convolution (no padded copy of the input);
        # time is padded towards the past only, with the stream's cached frames or zeros
        self.padding = (0, pad_h, pad_w)

    def _run(self, x: torch.Tensor, past: torch.Tensor | None, bias: bool = True, pad_rows: int | None = None) -> torch.Tensor:
        pad_t = self.past_frames
        if past is not None and pad_t > 0:
            x = torch.cat([past.to(x.device), x], dim=2)
            pad_t -= past.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        if self.channels_last:  # a no-op when the input already is (the usual case on CUDA)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        b = self.bias if bias else None
        if pad_rows is None and self.row_split is not None:  # the row padding comes from the neighbouring bands
            return self.row_split.conv(x, self.padding[1], lambda t, pad: self._conv_rows(t, pad, b))
        return self._conv_rows(x, self.padding[1] if pad_rows is None else pad_rows, b)

    def _conv_rows(self, x: torch.Tensor, pad_rows: int, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution with `pad_rows` zero rows (time already padded, columns as configured)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(x, self.weight, bias, self.stride, (0, pad_rows, self.padding[2]), self.dilation, self.groups)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None, bias: bool = True,
                pad_rows: int | None = None) -> torch.Tensor:
        """Convolve `x`; with a cache, the stream's previous frames replace the zero padding. `bias=False`
        leaves the bias out (the caller adds it); `pad_rows` pads the rows with that many zeros instead of
        the configured padding (or, in a row-split decode, the neighbours' rows)."""
        if cache is None or self.past_frames == 0:
            return self._run(x, None, bias, pad_rows)
        index, past = cache.take()
        assert past is None or isinstance(past, torch.Tensor)
        tail = x[:, :, -self.past_frames:]
        if past is not None and tail.shape[2] < self.past_frames:
            tail = torch.cat([past[:, :, tail.shape[2] - self.past_frames:].to(x.device), tail], dim=2)
        out = self._run(x, past, bias, pad_rows)
        cache.put(index, tail.clone())
        return out


class RMSNorm(nn.Module):
    """RMS normalisation over channels (dim 1), computed in fp32 for low-precision inputs."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.gamma, self.scale)


def _rms(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    normed = F.normalize(x.float() if low_precision else x, dim=1).to(x.dtype)
    return normed * scale * gamma


class NearestUpsample2x(nn.Module):
    """2x nearest-exact spatial up-sampling. It only copies values, so any dtype gives the same result;
    on CPU it runs in fp32 (bf16 nearest is not supported everywhere), on CUDA in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            out = F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")
        else:
            out = F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)  # some kernels return NCHW for one image
        return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for a 4-D (5-D) tensor stored so, else the default format."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).permute(0, 2, 1, 3, 4)


class Resample(nn.Module):
    """Spatial (x2 or /2) resampling, plus a causal temporal step for the '3d' modes.

    upsample3d: the first latent of a stream passes through unchanged in time; each later frame
    becomes two (channel halves of `time_conv`). downsample3d: the first frame passes through;
    later pairs of frames become one (stride-2 `time_conv` over [last cached frame, frames]).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")
    channels_last = False  # set by WanVAE.to_channels_last()
    row_split = None  # set by WanVAE.split_rows() (up-sampling modes only)

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        b = x.shape[0]
        if self.mode == "upsample3d":
            x = self._temporal_upsample(x, cache)
        if self.channels_last:  # frames of a channels-last 5-D tensor are channels-last images (a view)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.row_split is None:
            x = _batch_to_frames(self.resample(_frames_to_batch(x)), b)
        else:  # a band: nearest up-sampling is per row, the convolution takes its halo rows from the neighbours
            if not self.mode.startswith("upsample"):
                raise ValueError("Resample: a row-split decode has no down-sampling")
            up, conv = self.resample
            rows = lambda t, pad: F.conv2d(t, conv.weight, conv.bias, conv.stride, (pad, conv.padding[1]))  # noqa: E731
            x = _batch_to_frames(self.row_split.conv(up(_frames_to_batch(x)), conv.padding[0], rows), b)
        if self.mode == "downsample3d":
            x = self._temporal_downsample(x, cache)
        return x

    def _temporal_upsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        index, past = cache.take()
        if past is None:
            cache.put(index, _FIRST_STEP_DONE)
            return x
        past_frames = None if isinstance(past, str) else past
        tail = x[:, :, -2:]
        if past_frames is not None and tail.shape[2] < 2:
            tail = torch.cat([past_frames[:, :, -1:].to(x.device), tail], dim=2)
        y = self.time_conv._run(x, past_frames)
        cache.put(index, tail.clone())
        b, c2, t, h, w = y.shape
        # channels [0:c] give the even output frames, [c:2c] the odd ones (written into a tensor of y's
        # memory format, so a channels-last stream stays channels-last)
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
        out[:, :, 0::2] = y[:, : c2 // 2]
        out[:, :, 1::2] = y[:, c2 // 2 :]
        return out

    def _temporal_downsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        index, past = cache.take()
        tail = x[:, :, -1:].clone()
        if past is not None:
            assert isinstance(past, torch.Tensor)
            x = self.time_conv._run(torch.cat([past.to(x.device), x], dim=2), None)
        cache.put(index, tail)
        return x


def rms_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over channels (dim 1), the ops of `RMSNorm` then `nn.SiLU` in one function."""
    return F.silu(_rms(x, gamma, scale))


_EAGER_NORMS_TOLD: set[tuple] = set()


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> dropout -> causal conv, plus a 1x1x1 shortcut."""

    fused_norms = False  # set by WanVAE.fuse_decoder_norms(): each norm + SiLU pair as one kernel

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.training:
            h = self.shortcut(x)
            for layer in self.residual:
                x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
            return x + h
        split = self.residual[2].row_split
        if split is not None and x.shape[-2] >= self.residual[2].padding[1] + self.residual[6].padding[1]:
            return self._forward_band(x, cache, split)  # (thinner bands: an exchange per convolution, below)
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = self.shortcut(x)
        fused = self.fused_norms and kernels.supported(x)
        x = conv1(_norm_silu(x, norm1, self.fused_norms), cache, bias=not fused)
        x = conv2(_norm_silu(x, norm2, fused, conv1.bias if fused else None), cache, bias=not fused)
        return _add_residual(x, conv2.bias if fused else None, h)

    def _forward_band(self, x: torch.Tensor, cache: FeatureCache, split) -> torch.Tensor:
        """This rank's band of rows: one exchange of 2 rows with each neighbour for both convolutions
        (instead of one per convolution). The first norm runs on the band extended by those rows (zeros
        beyond the frame), both convolutions without row padding: the first gives the band plus one row on
        each side, whose rows beyond the frame are then zeroed (the second convolution's padding), the
        second exactly the band."""
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        p1, p2 = conv1.padding[1], conv2.padding[1]
        n = p1 + p2
        exchange = split.start_exchange(x, n)
        h = self.shortcut(x)
        top, bottom = exchange.wait()
        fused = self.fused_norms and kernels.supported(x)
        b, c, t, rows, w = x.shape
        if fused:  # the norm writes straight into the extended tensor: no padded copy
            ext = torch.empty((b, c, t, rows + 2 * n, w), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last_3d)
            kernels.rms_silu_channels_last(x, norm1.gamma, norm1.scale, out=ext[..., n : n + rows, :])
            for halo, part in ((top, ext[..., :n, :]), (bottom, ext[..., n + rows :, :])):
                if halo is None:
                    part.zero_()
                else:
                    kernels.rms_silu_channels_last(halo.contiguous(memory_format=torch.channels_last_3d), norm1.gamma,
                                                   norm1.scale, out=part)
        else:
            if self.fused_norms:
                _tell_eager(x)
            zeros = torch.zeros_like(x[..., :n, :])
            ext = torch.cat([zeros if top is None else top, x, zeros if bottom is None else bottom], dim=-2)
            ext = rms_silu(ext, norm1.gamma, norm1.scale)  # zero rows stay zero
        y = conv1(ext, cache, bias=not fused, pad_rows=0)  # rows + 2 * p2
        y = _norm_silu(y, norm2, fused, conv1.bias if fused else None)
        if top is None:
            y[..., :p2, :] = 0
        if bottom is None:
            y[..., y.shape[-2] - p2 :, :] = 0
        y = conv2(y, cache, bias=not fused, pad_rows=0)
        return _add_residual(y, conv2.bias if fused else None, h)


def _norm_silu(x: torch.Tensor, norm: RMSNorm, fused: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(norm(x + bias)): the Triton kernel when `fused` and it takes `x`, else the eager ops (said once when
    `fused` asked for the kernel); `bias` is a convolution's bias that was left out of it, or None."""
    if fused and kernels.supported(x):
        return kernels.rms_silu_channels_last(x, norm.gamma, norm.scale, bias=bias)
    if fused:
        _tell_eager(x)
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1, 1)
    return rms_silu(x, norm.gamma, norm.scale)


def _tell_eager(x: torch.Tensor) -> None:
    """Say once per kind of input that a fused block runs the eager norm (it is slower)."""
    kind = (x.device.type, x.dtype, x.is_contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else False)
    if kind not in _EAGER_NORMS_TOLD:
        _EAGER_NORMS_TOLD.add(kind)
        log.warning("fuse_decoder_norms: eager RMS norm + SiLU for %s %s input (channels-last: %s); the fused "
                    "kernel needs bfloat16 channels-last activations on CUDA and triton", *kind)


def _add_residual(x: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """(x + bias) + h, the bias (a convolution's, when it was left out) added in the same pass where the
    kernel applies."""
    if bias is None:
        return x + h
    h = h.contiguous(memory_format=torch.channels_last_3d)
    if kernels.supported(x) and kernels.supported(h):
        return kernels.bias_residual_add(x, bias, h)
    return (x + bias.view(1, -1, 1, 1, 1)) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, no cache)."""

    row_split = None  # set by WanVAE.split_rows(): attend over the whole frame, return this rank's band

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_split is None:
            return self._attend(x)
        full = self._attend(self.row_split.gather(x))
        return full[..., self.row_split.rows(full.shape[-2]), :].contiguous(memory_format=_memory_format(full))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_batch(x))
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        return x + _batch_to_frames(self.proj(y), b)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a down block: space/time-to-channel, then mean over channel groups."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if (in_channels * factor) % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels} channels x factor {factor} is not divisible by {out_channels}.")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group = in_channels * factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))  # zero frames in front up to a multiple of ft
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of an up block: repeat channels, then channel-to-space/time."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if (out_channels * factor) % in_channels:
            raise ValueError(f"DupUp3D: {out_channels} channels x factor {factor} is not divisible by {in_channels}.")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x
