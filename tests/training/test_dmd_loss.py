"""DMD loss math (spec 6.4, 6.5) against direct computations written out here, on fixed random tensors."""
import math

import pytest
import torch

from longlive.training.dmd import (
    critic_flow_loss,
    dmd_generator_loss,
    dmd_gradient,
    sample_dmd_timesteps,
    x0_from_velocity,
)

B, C, F, H, W = 2, 3, 8, 4, 5
CHUNK = 4


def _tensors(seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, F, H, W, generator=g, dtype=dtype) for _ in range(4)]


# ---------------------------------------------------------------- timesteps

def test_timesteps_shape_range_and_clamping_hit_both_ends():
    t = sample_dmd_timesteps(2000, 50, torch.Generator().manual_seed(0), per_chunk=True)
    assert t.shape == (2000, 50) and t.dtype == torch.float32
    assert float(t.min()) == 20.0 and float(t.max()) == 980.0  # both clamps reached with 100k draws
    assert bool(((t >= 20) & (t <= 980)).all())


def test_timesteps_are_shifted_integers():
    # Without clamping, each value must be 1000*5u/(1+4u) for some u = k/1000, k in 0..999.
    t = sample_dmd_timesteps(64, 4, torch.Generator().manual_seed(3), per_chunk=True, min_step=0, max_step=1000)
    grid = torch.tensor([1000 * 5 * (k / 1000) / (1 + 4 * k / 1000) for k in range(1000)], dtype=torch.float64)
    dist = (t.double()[..., None] - grid).abs().min(-1).values
    assert float(dist.max()) < 1e-3
    # shift 1 leaves the integer draws untouched
    t1 = sample_dmd_timesteps(64, 4, torch.Generator().manual_seed(3), per_chunk=True, shift=1.0, min_step=0, max_step=1000)
    assert torch.equal(t1, t1.round()) and float(t1.min()) >= 0 and float(t1.max()) <= 999


def test_timesteps_shift_moves_mass_up():
    t = sample_dmd_timesteps(20000, 1, torch.Generator().manual_seed(1), per_chunk=False)
    # E[1000*5u/(1+4u)] = 1250*(1 - ln5/4) ~ 747 for u ~ U[0,1]; unshifted mean would be ~500
    expected = 1250 * (1 - math.log(5) / 4)
    assert abs(float(t.mean()) - expected) < 15
    assert float(t.mean()) > 650
    t1 = sample_dmd_timesteps(20000, 1, torch.Generator().manual_seed(1), per_chunk=False, shift=1.0)
    assert abs(float(t1.mean()) - 500) < 15


def test_timesteps_shared_vs_per_chunk():
    shared = sample_dmd_timesteps(16, 4, torch.Generator().manual_seed(5), per_chunk=False)
    assert torch.equal(shared, shared[:, :1].expand(16, 4))
    assert len(set(shared[:, 0].tolist())) > 1  # samples differ
    per = sample_dmd_timesteps(16, 4, torch.Generator().manual_seed(5), per_chunk=True)
    assert not torch.equal(per, per[:, :1].expand(16, 4))


def test_timesteps_deterministic_and_only_from_generator():
    state = torch.get_rng_state()
    a = sample_dmd_timesteps(4, 4, torch.Generator().manual_seed(42), per_chunk=True)
    b = sample_dmd_timesteps(4, 4, torch.Generator().manual_seed(42), per_chunk=True)
    c = sample_dmd_timesteps(4, 4, torch.Generator().manual_seed(43), per_chunk=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG was not used
    # consecutive calls on one generator advance it
    g = torch.Generator().manual_seed(42)
    assert not torch.equal(sample_dmd_timesteps(4, 4, g, per_chunk=True), sample_dmd_timesteps(4, 4, g, per_chunk=True))


def test_timesteps_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match="min_step"):
        sample_dmd_timesteps(1, 1, g, per_chunk=False, min_step=500, max_step=100)
    with pytest.raises(ValueError, match="num_chunks"):
        sample_dmd_timesteps(1, 0, g, per_chunk=False)


# ---------------------------------------------------------------- DMD gradient

def _reference_gradient(x, fake, cond, uncond, s, chunk):
    x, fake, cond, uncond = (t.double() for t in (x, fake, cond, uncond))
    real = cond + s * (cond - uncond)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for k in range(x.shape[2] // chunk):
            sl = slice(k * chunk, (k + 1) * chunk)
            denom = (x[b, :, sl] - real[b, :, sl]).abs().sum() / x[b, :, sl].numel()
            out[b, :, sl] = (fake[b, :, sl] - real[b, :, sl]) / denom
    return out


def test_dmd_gradient_matches_loops():
    x, fake, cond, uncond = _tensors(1)
    grad = dmd_gradient(x, fake, cond, uncond, 3.0, CHUNK)
    assert grad.dtype == torch.float64 and grad.shape == x.shape and not grad.requires_grad
    torch.testing.assert_close(grad, _reference_gradient(x, fake, cond, uncond, 3.0, CHUNK), rtol=1e-12, atol=1e-12)
    # normalisation is per chunk: one chunk per sample gives a different answer
    whole = dmd_gradient(x, fake, cond, uncond, 3.0, F)
    torch.testing.assert_close(whole, _reference_gradient(x, fake, cond, uncond, 3.0, F), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(whole, grad)


def test_dmd_gradient_cfg_form_and_no_guidance():
    x, fake, cond, uncond = _tensors(2)
    g0 = dmd_gradient(x, fake, cond, None, 0.0, CHUNK)
    torch.testing.assert_close(g0, _reference_gradient(x, fake, cond, cond, 0.0, CHUNK))
    torch.testing.assert_close(dmd_gradient(x, fake, cond, uncond, 0.0, CHUNK), g0)
    with pytest.raises(ValueError, match="guidance_scale"):
        dmd_gradient(x, fake, cond, None, 3.0, CHUNK)


def test_dmd_gradient_nan_guard():
    x, fake, cond, _ = _tensors(3, dtype=torch.float64)
    # chunk 1 of sample 0: real == x, so the normaliser is 0 -> 0/0 (fake == real) and x/0 (fake != real)
    cond = cond.clone()
    cond[0, :, CHUNK:2 * CHUNK] = x[0, :, CHUNK:2 * CHUNK]
    fake = fake.clone()
    fake[0, :, CHUNK:2 * CHUNK] = x[0, :, CHUNK:2 * CHUNK]
    fake[0, 0, CHUNK, 0, 0] += 1.0  # one element of 1/0 = inf
    grad = dmd_gradient(x, fake, cond, None, 0.0, CHUNK)
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[0, :, CHUNK:2 * CHUNK] == 0).all())
    ref = _reference_gradient(x, fake, cond, cond, 0.0, CHUNK)
    assert bool(torch.isnan(ref[0, :, CHUNK:2 * CHUNK]).any())  # the unguarded formula does give NaN
    # other chunks are untouched
    torch.testing.assert_close(grad[0, :, :CHUNK], ref[0, :, :CHUNK])
    torch.testing.assert_close(grad[1], ref[1])


def test_dmd_gradient_shape_errors():
    x, fake, cond, uncond = _tensors(4)
    with pytest.raises(ValueError, match="whole chunks"):
        dmd_gradient(x, fake, cond, uncond, 3.0, 3)
    with pytest.raises(ValueError, match="fake_x0"):
        dmd_gradient(x, fake[:, :, :4], cond, uncond, 3.0, CHUNK)


# ---------------------------------------------------------------- generator loss

def test_generator_loss_value_and_autograd_gradient():
    x, fake, cond, uncond = _tensors(5)
    grad = dmd_gradient(x, fake, cond, uncond, 3.0, CHUNK)
    xr = x.clone().requires_grad_(True)
    loss = dmd_generator_loss(xr, grad)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, 0.5 * (grad ** 2).sum() / grad.numel(), rtol=1e-12, atol=0)
    loss.backward()
    torch.testing.assert_close(xr.grad.double(), grad / grad.numel(), rtol=1e-6, atol=1e-12)


def test_generator_loss_mask_excludes_frames():
    x, fake, cond, uncond = _tensors(6)
    grad = dmd_gradient(x, fake, cond, uncond, 3.0, CHUNK)
    mask = torch.ones(B, F, dtype=torch.bool)
    mask[:, 0] = False  # I2V: the image frame
    mask[1, 5] = False
    xr = x.clone().requires_grad_(True)
    loss = dmd_generator_loss(xr, grad, mask)
    total, count = 0.0, 0
    for b in range(B):
        for f in range(F):
            if mask[b, f]:
                total += float((grad[b, :, f] ** 2).sum())
                count += grad[b, :, f].numel()
    assert count == (2 * F - 3) * C * H * W
    assert abs(float(loss.detach()) - 0.5 * total / count) < 1e-12
    loss.backward()
    expected = grad / count * mask[:, None, :, None, None]
    torch.testing.assert_close(xr.grad.double(), expected, rtol=1e-6, atol=1e-12)
    assert bool((xr.grad[:, :, 0] == 0).all()) and bool((xr.grad[1, :, 5] == 0).all())
    # changing excluded frames of x does not change the loss
    x2 = x.clone()
    x2[:, :, 0] += 100.0
    torch.testing.assert_close(dmd_generator_loss(x2, grad, mask), loss.detach())


def test_masks_are_checked():
    x, fake, _, _ = _tensors(7)
    with pytest.raises(ValueError, match="mask"):
        dmd_generator_loss(x, fake, torch.ones(B, F))  # not bool
    with pytest.raises(ValueError, match="no frame"):
        dmd_generator_loss(x, fake, torch.zeros(B, F, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        critic_flow_loss(x, fake, x, fake, 0.5, torch.ones(B, F - 1, dtype=torch.bool))


# ---------------------------------------------------------------- critic loss and x0 conversion

def _sigma(seed: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, F, generator=g) * 0.9 + 0.05


def test_critic_loss_matches_direct_computation():
    x, noise, fake_x0, _ = _tensors(9)
    sigma = _sigma()
    x_t = (1 - sigma[:, None, :, None, None]) * x + sigma[:, None, :, None, None] * noise
    loss = critic_flow_loss(x_t, fake_x0, x, noise, sigma)
    total = 0.0
    for b in range(B):
        for f in range(F):
            s = float(sigma[b, f])
            v = (x_t[b, :, f].double() - fake_x0[b, :, f].double()) / s
            total += float(((v - (noise[b, :, f].double() - x[b, :, f].double())) ** 2).sum())
    assert loss.dtype == torch.float64
    assert abs(float(loss) - total / x.numel()) < 1e-9 * max(1.0, total / x.numel())
    # masked: average over the kept frames only
    mask = torch.ones(B, F, dtype=torch.bool)
    mask[:, 0] = False
    masked = critic_flow_loss(x_t, fake_x0, x, noise, sigma, mask)
    total_m = 0.0
    for b in range(B):
        for f in range(1, F):
            v = (x_t[b, :, f].double() - fake_x0[b, :, f].double()) / float(sigma[b, f])
            total_m += float(((v - (noise[b, :, f].double() - x[b, :, f].double())) ** 2).sum())
    assert abs(float(masked) - total_m / (B * (F - 1) * C * H * W)) < 1e-9 * total_m


def test_critic_loss_zero_for_true_x0_and_per_sample_sigma():
    x, noise, fake_x0, _ = _tensors(10, dtype=torch.float64)
    sigma_b = torch.tensor([0.3, 0.8], dtype=torch.float64)
    s = sigma_b[:, None, None, None, None]
    x_t = (1 - s) * x + s * noise
    assert float(critic_flow_loss(x_t, x, x, noise, sigma_b)) < 1e-25  # v == noise - x
    # per-sample sigma equals the same sigma repeated per frame
    per_frame = sigma_b[:, None].expand(B, F)
    torch.testing.assert_close(critic_flow_loss(x_t, fake_x0, x, noise, sigma_b),
                               critic_flow_loss(x_t, fake_x0, x, noise, per_frame))


def test_critic_loss_gradient_only_to_prediction_and_sigma_guard():
    x, noise, fake_x0, _ = _tensors(11)
    sigma = _sigma()
    x_t = (1 - sigma[:, None, :, None, None]) * x + sigma[:, None, :, None, None] * noise
    pred = fake_x0.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    critic_flow_loss(x_t, pred, xr, noise, sigma).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert xr.grad is None
    bad = sigma.clone()
    bad[1, 3] = 0.0
    with pytest.raises(ValueError, match="sigma must be > 0"):
        critic_flow_loss(x_t, fake_x0, x, noise, bad)
    with pytest.raises(ValueError, match="sigma"):
        critic_flow_loss(x_t, fake_x0, x, noise, torch.full((B, F + 1), 0.5))


def test_x0_from_velocity():
    x0, noise, _, _ = _tensors(12)
    sigma = _sigma(13)
    x_t = (1 - sigma[:, None, :, None, None]) * x0 + sigma[:, None, :, None, None] * noise
    v = noise - x0
    out = x0_from_velocity(x_t, v, sigma)
    assert out.dtype == torch.float32
    expected = torch.empty_like(x_t, dtype=torch.float64)
    for b in range(B):
        for f in range(F):
            expected[b, :, f] = x_t[b, :, f].double() - float(sigma[b, f]) * v[b, :, f].double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)  # round trip
    # per-sample and scalar sigma
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma[:, 0]),
                               x0_from_velocity(x_t, v, sigma[:, :1].expand(B, F)))
    torch.testing.assert_close(x0_from_velocity(x_t, v, 0.5), (x_t.double() - 0.5 * v.double()).float())
    # bf16 in -> bf16 out, gradient flows to v
    vr = v.bfloat16().requires_grad_(True)
    out_bf = x0_from_velocity(x_t.bfloat16(), vr, sigma)
    assert out_bf.dtype == torch.bfloat16
    out_bf.float().sum().backward()
    assert vr.grad is not None
