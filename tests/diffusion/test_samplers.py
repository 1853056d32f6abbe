"""Flow schedules and samplers: exact spec numbers, exact x0 on a linear problem, diffusers' UniPC as oracle."""
import pytest
import torch

from longlive.diffusion.samplers import FlowEulerSampler, FlowUniPCSampler, make_sampler
from longlive.diffusion.schedule import TrainingSchedule, sampling_schedule

SPEC_50 = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890, 882, 873,
           863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584, 555, 522, 487, 448,
           405, 356, 302, 241, 172, 92]


def test_unipc_timesteps_and_sigmas_match_spec():
    s4 = sampling_schedule(4)
    assert s4.timesteps.tolist() == [999, 937, 833, 624]
    assert torch.allclose(s4.sigmas, torch.tensor([0.99980, 0.93727, 0.83306, 0.62469, 0.0]), atol=1e-5)
    s2 = sampling_schedule(2)
    assert s2.timesteps.tolist() == [999, 833]
    assert torch.allclose(s2.sigmas, torch.tensor([0.99980, 0.83306, 0.0]), atol=1e-5)
    assert sampling_schedule(50).timesteps.tolist() == SPEC_50
    assert s4.sigmas.dtype == torch.float32 and s4.timesteps.dtype == torch.int64


def test_training_schedule_matches_spec():
    ts = TrainingSchedule()
    assert ts.sigmas[0] == 1.0
    assert abs(ts.sigmas[999].item() - 0.00498) < 1e-5
    i = torch.tensor([0, 10, 500, 999])
    s = 1 - i / 1000
    assert torch.allclose(ts.sigmas[i], 5 * s / (1 + 4 * s), atol=1e-6)
    assert torch.allclose(ts.weights.mean(), torch.tensor(1.0)) and ts.weights.min() == 0
    # the weight peaks where t is closest to 500
    assert ts.timesteps[ts.weights.argmax()].sub(500).abs() < 3
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = ts.timesteps[torch.tensor([[5, 700, 999], [0, 1, 2]])]
    xt = ts.add_noise(x0, eps, t)
    sig = ts.sigmas[torch.tensor([[5, 700, 999], [0, 1, 2]])][..., None]
    assert torch.allclose(xt, (1 - sig) * x0 + sig * eps)


@pytest.mark.parametrize("cls", [FlowUniPCSampler, FlowEulerSampler])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 50])
def test_samplers_reach_exact_x0_on_linear_problem(cls, n):
    x0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    sampler = cls(n)
    x = (1 - sampler.sigma(0)) * x0 + sampler.sigma(0) * eps
    for _ in sampler.timesteps:
        v = eps - x0  # exact velocity of a point mass at x0 along the straight path
        x = sampler.step(v, x)
    assert (x - x0).abs().max() < 1e-9
    with pytest.raises(RuntimeError, match="call reset"):
        sampler.step(v, x)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 50])
def test_unipc_equals_diffusers_solver_on_nonlinear_problem(n):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=5.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    ref.set_timesteps(n)
    ours = FlowUniPCSampler(n)
    ref.sigmas, ref.timesteps = ours.schedule.sigmas.clone(), ours.timesteps.clone()  # same (spec) schedule

    def vel(x, t):
        return torch.tanh(x) * (t / 1000.0) + 0.3 * x

    a = b = torch.randn(3, 5, dtype=torch.float64)
    for t in ours.timesteps:
        a = ours.step(vel(a, float(t)), a)
        b = ref.step(vel(b, float(t)), t, b).prev_sample
    assert (a - b).abs().max() < 1e-6


def test_unipc_orders_and_final_step_is_x0():
    sampler = FlowUniPCSampler(4)
    x = torch.randn(3)
    orders = []
    for _ in sampler.timesteps:
        v = torch.randn(3)
        m = sampler.x0(v, x)
        x = sampler.step(v, x)
        orders.append(sampler._last_order)
    assert orders == [1, 2, 2, 1]
    assert torch.equal(x, m)  # last step to sigma 0 returns the final x0 estimate
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("dpm", 4)
