"""The Wan2.2 VAE: causal video encoder/decoder with 4x16x16 compression and a streaming decoder.

`WanVAE.encode` takes pixels in [-1, 1] and returns normalised latents; `WanVAE.decode` inverts it.
Decoding always runs one latent frame at a time through a `StreamingDecoder`, so a one-shot decode
and a chunked streaming decode execute the very same operations and agree bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from longlive.models.vae.config import WanVAEConfig, latent_frames_for_pixels
from longlive.models.vae.layers import (
    AttentionBlock,
    AvgDown3D,
    CausalConv3d,
    DupUp3D,
    FeatureCache,
    Resample,
    ResidualBlock,
    RMSNorm,
)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p], channel order (c, w_sub, h_sub) as in Wan2.2."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class DownBlock(nn.Module):
    """Residual blocks + optional down-sampler, with an averaging shortcut (Wan2.2 'Down_ResidualBlock')."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if spatial else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Residual blocks + optional up-sampler, with a duplicating shortcut (Wan2.2 'Up_ResidualBlock')."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = (
            DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if spatial else None
        )
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        main = x
        for layer in self.upsamples:
            main = layer(main, cache)
        if self.avg_shortcut is None:
            return main
        return main + self.avg_shortcut(x, first_chunk)


class Encoder3d(nn.Module):
    """Patchified pixels -> 2*z_dim channels (mean and log-variance), causal in time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.enc_dim * m for m in (1, *cfg.dim_mult)]
        levels = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(cfg.image_channels * cfg.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                      temporal=i < levels - 1 and cfg.temporal_downsample[i], spatial=i < levels - 1)
            for i in range(levels)
        ])
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top, images=False), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = _run_cached(self.middle, x, cache)
        return _run_cached(self.head, x, cache)


class Decoder3d(nn.Module):
    """z_dim latent channels -> patchified pixels, one latent frame per call with a feature cache."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dec_dim * m for m in (mult[-1], *mult[::-1])]
        levels = len(mult)
        temporal_upsample = cfg.temporal_downsample[::-1]
        top = dims[0]
        self.conv1 = CausalConv3d(cfg.z_dim, top, 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks,
                    temporal=i < levels - 1 and temporal_upsample[i], spatial=i < levels - 1)
            for i in range(levels)
        ])
        out = dims[-1]
        self.head = nn.Sequential(
            RMSNorm(out, images=False), nn.SiLU(),
            CausalConv3d(out, cfg.image_channels * cfg.patch_size**2, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run_cached(self.middle, x, cache)
        for block in self.upsamples:
            x = block(x, cache, first_chunk)
        return _run_cached(self.head, x, cache)


def _run_cached(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """Run a Sequential, giving the feature cache to the layers that have temporal state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (ResidualBlock, CausalConv3d)) else layer(x)
    return x


class WanVAE(nn.Module):
    """Wan2.2 VAE. Parameter names are the original `Wan2.2_VAE.pth` names.

    `conv1` maps encoder features to (mean, log-variance); `conv2` is the decoder's input projection.
    The VAE is frozen in this project: encode/decode run without autograd.
    """

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.channels_last = False  # see to_channels_last()

    def to_channels_last(self) -> "WanVAE":
        """Store convolution weights channels-last and decode in channels-last activations (NDHWC).

        cuDNN's fast convolutions work on channels-last tensors: with the default layout every decoder
        convolution converts its input and output (docs/vae.md). Same values as the default layout up to
        the convolution algorithms' summation order. Returns self."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            if isinstance(m, (CausalConv3d, Resample)):
                m.channels_last = True
        self.channels_last = True
        return self

    def split_rows(self, split) -> "WanVAE":
        """Decode a band of rows on this rank (`longlive.parallel.vae_decode.RowSplit`, or None to undo): the
        decoder's row-padded convolutions take halo rows from the neighbouring ranks and its attention sees
        whole frames, so the bands of all ranks together equal the one-process decode. Give each rank's
        decoder its band of the latent rows (`split.rows(h)`). Returns self."""
        for m in self.decoder.modules():
            if isinstance(m, (CausalConv3d, Resample, AttentionBlock)):
                m.row_split = split
        return self

    def fuse_decoder_norms(self) -> "WanVAE":
        """Run each RMS norm + SiLU pair of the decoder's residual blocks as one Triton kernel
        (`kernels.rms_silu_channels_last`) where the activations are bfloat16 channels-last on CUDA (see
        `to_channels_last`); the eager ops make about eight passes over activations of up to 32 frames at
        full resolution. Elsewhere the eager ops run. Returns self."""
        for m in self.decoder.modules():
            if isinstance(m, ResidualBlock):
                m.fused_norms = True
        return self

    # ----------------------------------------------------------------------------- normalisation
    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 mean/std of shape [1, z, 1, 1, 1] on `device` (kept out of the state dict and of `.to(dtype)`)."""
        if device not in self._stats:
            shape = (1, self.config.z_dim, 1, 1, 1)
            mean = torch.tensor(self.config.latent_mean, dtype=torch.float32).view(shape).to(device)
            std = torch.tensor(self.config.latent_std, dtype=torch.float32).view(shape).to(device)
            self._stats[device] = (mean, std)
        return self._stats[device]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latent mean -> normalised latent `(mu - mean) / std` (fp32 arithmetic, input dtype out)."""
        mean, std = self._latent_stats(mu.device)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw latent `z * std + mean` (fp32 arithmetic, input dtype out)."""
        mean, std = self._latent_stats(z.device)
        return (z.float() * std + mean).to(z.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # ----------------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] pixels in [-1, 1] -> normalised latents [B, z, 1+k, H/16, W/16].

        Frame 0 is encoded alone, then groups of 4 frames, carrying the causal conv caches.
        """
        return self.normalize(self.encode_raw(video))

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Like `encode` but returns the un-normalised latent mean (the original model's `mu`)."""
        cfg = self.config
        self._check_video(video)
        stride = cfg.temporal_stride
        x = patchify(video.to(device=self.device, dtype=self.dtype), cfg.patch_size)
        cache = FeatureCache()
        pieces = []
        bounds = [(0, 1)] + [(s, s + stride) for s in range(1, x.shape[2], stride)]
        for start, end in bounds:
            cache.start_step()
            pieces.append(self.encoder(x[:, :, start:end], cache))
        h = torch.cat(pieces, dim=2)
        return self.conv1(h)[:, : cfg.z_dim]

    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.config
        if video.dim() != 5 or video.shape[1] != cfg.image_channels:
            raise ValueError(
                f"WanVAE.encode expects video [B, {cfg.image_channels}, T, H, W]; got shape {tuple(video.shape)}."
            )
        latent_frames_for_pixels(video.shape[2], cfg.temporal_stride)  # raises on a bad frame count
        s = cfg.spatial_stride
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(
                f"WanVAE.encode needs H and W divisible by {s}; got {video.shape[3]}x{video.shape[4]}. "
                "Resize or crop the video first."
            )

    # ----------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, n, h, w] -> video [B, 3, 1+4(n-1), 16h, 16w] clamped to [-1, 1]."""
        return self.stream_decoder().decode_chunk(latents)

    def stream_decoder(self) -> "StreamingDecoder":
        """A fresh stateful decoder for one latent stream (see `StreamingDecoder`)."""
        return StreamingDecoder(self)

    def _decode_step(self, z: torch.Tensor, cache: FeatureCache, first: bool) -> torch.Tensor:
        """Decode ONE latent frame [B, z, 1, h, w] of a stream; returns clamped pixels."""
        cache.start_step()
        z = self.denormalize(z)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        x = self.conv2(z)
        out = self.decoder(x, cache, first_chunk=first)
        return unpatchify(out, self.config.patch_size).clamp_(-1.0, 1.0)


class StreamingDecoder:
    """Stateful chunk decoder: feed latent chunks of one video in order, get their pixel frames.

    The concatenation of all returned chunks equals `WanVAE.decode` of the whole latent video bit
    for bit. The first chunk of n latents gives 1 + 4(n-1) frames, later chunks 4n frames. Only the
    causal-conv feature caches are kept between calls, so memory does not grow with the video.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.cache = FeatureCache()
        self.latents_seen = 0
        self._geometry: tuple[int, int, int] | None = None  # (batch, h, w) of the stream

    def reset(self) -> None:
        """Start a new video: drop the caches."""
        self.cache.reset()
        self.latents_seen = 0
        self._geometry = None

    def frames_for(self, latent_frames: int) -> int:
        """Pixel frames the next `latent_frames` latents will decode to."""
        stride = self.vae.config.temporal_stride
        return stride * latent_frames - (stride - 1 if self.latents_seen == 0 else 0)

    def _start_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        vae, cfg = self.vae, self.vae.config
        if latents.dim() != 5 or latents.shape[1] != cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(
                f"StreamingDecoder.decode_chunk expects latents [B, {cfg.z_dim}, n>=1, h, w]; got {tuple(latents.shape)}."
            )
        geometry = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._geometry is not None and geometry != self._geometry:
            raise ValueError(
                f"StreamingDecoder: chunk batch/height/width {geometry} differ from the stream's {self._geometry}; "
                "call reset() before decoding a different video."
            )
        self._geometry = geometry
        return latents.to(device=vae.device, dtype=vae.dtype)

    def _steps(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(latents.shape[2]):
            frames = self.vae._decode_step(latents[:, :, i : i + 1], self.cache, first=self.latents_seen == 0)
            self.latents_seen += 1
            yield frames

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next chunk [B, z, n, h, w] of normalised latents -> [B, 3, frames, 16h, 16w]."""
        latents = self._start_chunk(latents)
        b, _, n, h, w = latents.shape
        cfg, s = self.vae.config, self.vae.config.spatial_stride
        out = torch.empty(b, cfg.image_channels, self.frames_for(n), h * s, w * s, dtype=self.vae.dtype, device=self.vae.device)
        pos = 0
        for frames in self._steps(latents):
            out[:, :, pos : pos + frames.shape[2]] = frames
            pos += frames.shape[2]
        return out

    @torch.no_grad()
    def iter_chunk(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode the next chunk like `decode_chunk`, yielding the frames of each latent frame [B, 3, f, 16h,
        16w] as soon as their work is issued (f = 1 for the stream's first latent, else 4), so a consumer can
        use the first frames while the rest decode. Their concatenation equals `decode_chunk`'s output.
        Consume it to the end: the stream's state advances one latent frame per piece."""
        yield from self._steps(self._start_chunk(latents))
