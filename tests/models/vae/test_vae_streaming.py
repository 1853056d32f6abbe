"""Streaming decode: chunk by chunk equals a one-shot decode bit for bit, with bounded state."""
from __future__ import annotations

import pytest
import torch

from longlive.models.vae import WanVAEConfig


def _latents(n: int, b: int = 1, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 48, n, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", [[1, 2, 3], [2, 2, 2, 2], [1, 1, 1, 1, 1], [3, 1, 2], [6]])
def test_streaming_equals_full_decode_exactly(pattern: list[int], vh) -> None:
    vae = vh.random_vae(seed=7)
    z = _latents(sum(pattern))
    full = vae.decode(z)
    assert full.shape == (1, 3, 1 + 4 * (sum(pattern) - 1), 32, 48)

    dec = vae.stream_decoder()
    pieces, start = [], 0
    for i, n in enumerate(pattern):
        piece = dec.decode_chunk(z[:, :, start : start + n])
        assert piece.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        assert piece.dtype == full.dtype and piece.device == full.device
        pieces.append(piece)
        start += n
    assert torch.equal(torch.cat(pieces, dim=2), full)


def test_streaming_bf16_equal_and_batched(vh) -> None:
    vae = vh.random_vae(seed=8).to(torch.bfloat16)
    z = _latents(4, b=2, seed=1)
    full = vae.decode(z)
    assert full.dtype == torch.bfloat16
    dec = vae.stream_decoder()
    streamed = torch.cat([dec.decode_chunk(z[:, :, :1]), dec.decode_chunk(z[:, :, 1:])], dim=2)
    assert torch.equal(streamed, full)


def test_reset_starts_a_new_video_and_state_stays_bounded(vh) -> None:
    vae = vh.random_vae(seed=9)
    z = _latents(6, seed=2)
    dec = vae.stream_decoder()
    first = dec.decode_chunk(z[:, :, :2])
    sizes = []
    for k in range(2, 6):
        dec.decode_chunk(z[:, :, k : k + 1])
        sizes.append((len(dec.cache), dec.cache.nbytes()))
    assert len(set(sizes)) == 1, f"feature cache changed size between steady-state chunks: {sizes}"
    assert dec.latents_seen == 6
    dec.reset()
    assert dec.latents_seen == 0 and len(dec.cache) == 0
    assert torch.equal(dec.decode_chunk(z[:, :, :2]), first)


def test_stream_rejects_shape_changes_and_bad_input(vh) -> None:
    vae = vh.random_vae()
    dec = vae.stream_decoder()
    dec.decode_chunk(_latents(1))
    with pytest.raises(ValueError, match="reset"):
        dec.decode_chunk(_latents(1, h=3))
    with pytest.raises(ValueError, match="latents"):
        dec.decode_chunk(torch.zeros(1, 16, 1, 2, 3))
    assert dec.frames_for(2) == 8
    assert vae.stream_decoder().frames_for(2) == 5


def test_encode_shapes_and_input_checks(vh) -> None:
    vae = vh.random_vae()
    z = vae.encode(vh.smooth_video(2, 13, 16, 32))
    assert z.shape == (2, 48, 4, 1, 2)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="divisible by 16"):
        vae.encode(torch.zeros(1, 3, 5, 24, 16))


def test_config_presets_and_validation() -> None:
    full = WanVAEConfig.preset("wan2.2")
    assert (full.z_dim, full.enc_dim, full.dec_dim, full.decoder_conv1_channels) == (48, 160, 256, 1024)
    assert (full.temporal_stride, full.spatial_stride) == (4, 16)
    assert WanVAEConfig.preset("tiny").spatial_stride == 16
    with pytest.raises(ValueError, match="preset"):
        WanVAEConfig.preset("wan2.1")
    with pytest.raises(ValueError, match="mean"):
        WanVAEConfig(z_dim=16)


@pytest.mark.gpu
def test_streaming_equals_full_decode_on_cuda_bf16(vh) -> None:
    vae = vh.random_vae(seed=10).to(device="cuda", dtype=torch.bfloat16)
    z = _latents(5, h=4, w=6).to("cuda")
    full = vae.decode(z)
    dec = vae.stream_decoder()
    streamed = torch.cat([dec.decode_chunk(z[:, :, :2]), dec.decode_chunk(z[:, :, 2:])], dim=2)
    assert streamed.device.type == "cuda" and streamed.dtype == torch.bfloat16
    assert torch.equal(streamed, full)


def _channels_last_check(vae, z: torch.Tensor, fuse: bool = False) -> tuple[float, int, int]:
    """Streamed decode with `to_channels_last()` (and `fuse_decoder_norms()`) vs the default layout:
    (relative error, convolutions that saw a channels-last input, convolutions run)."""
    import copy

    ref = vae.stream_decoder()
    want = torch.cat([ref.decode_chunk(z[:, :, :2]), ref.decode_chunk(z[:, :, 2:])], dim=2).float()
    cl = copy.deepcopy(vae).to_channels_last()
    if fuse:
        cl.fuse_decoder_norms()
    seen = []

    def recording(conv):  # what the convolution op itself receives
        def run(x, weight, bias):
            fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
            seen.append(x.is_contiguous(memory_format=fmt) and (x.shape[1] == 1 or not x.is_contiguous()))
            return type(conv)._conv_forward(conv, x, weight, bias)
        return run

    for name, m in cl.decoder.named_modules():  # (the middle attention's 1x1 convolutions are not covered)
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)) and ".to_qkv" not in name and ".proj" not in name:
            m._conv_forward = recording(m)
    dec = cl.stream_decoder()
    got = torch.cat([dec.decode_chunk(z[:, :, :2]), dec.decode_chunk(z[:, :, 2:])], dim=2).float()
    return float((got - want).norm() / want.norm()), sum(seen), len(seen)


def test_channels_last_decode_matches_the_default_layout(vh) -> None:
    vae = vh.random_vae(seed=11)
    rel, channels_last, convs = _channels_last_check(vae, _latents(4, h=4, w=6, seed=3))
    assert rel < 1e-5, rel
    assert convs > 0 and channels_last == convs  # no layer falls back to the default layout


def test_rms_silu_is_the_norm_then_silu(vh) -> None:
    from longlive.models.vae.layers import RMSNorm, rms_silu

    norm = RMSNorm(16, images=False)
    norm.gamma.data = torch.rand(16, 1, 1, 1) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 16, 3, 4, 5).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        n = norm.to(dtype)
        assert torch.equal(rms_silu(x, n.gamma, n.scale), torch.nn.functional.silu(n(x)))


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_channels_last_decode_on_cuda_bf16(vh, fuse: bool) -> None:
    vae = vh.random_vae(seed=12).to(device="cuda", dtype=torch.bfloat16)
    rel, channels_last, convs = _channels_last_check(vae, _latents(5, h=4, w=6).to("cuda"), fuse=fuse)
    assert rel < 1e-2, rel
    assert convs > 0 and channels_last == convs
