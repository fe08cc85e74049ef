"""Schedule, path and sampler conventions against the reference facts and diffusers."""
import math

import pytest
import torch

from l2p.flow import add_noise, flow_matching_loss, velocity_target, x0_from_velocity
from l2p.sampler import euler_sample, get_solver, guide, heun_sample
from l2p.schedule import sample_training_sigma, sampling_sigmas, training_sigmas


def test_sigmas_match_reference_table():
    want = torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0])
    assert torch.allclose(sampling_sigmas(8, 3.0), want, atol=1e-4)


@pytest.mark.parametrize("n,shift", [(8, 3.0), (30, 3.0), (50, 6.0), (9, 1.0)])
def test_sigmas_match_diffusers_scheduler(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    sch.sigma_min = 0.0  # Z-Image's pipeline passes sigmas linspace(1, 1/N, N), then the static shift
    base = torch.linspace(1.0, 1.0 / n, n).numpy()
    sch.set_timesteps(sigmas=base)
    assert torch.allclose(sampling_sigmas(n, shift), sch.sigmas.float(), atol=1e-6)
    assert torch.allclose(sampling_sigmas(n, shift)[:-1] * 1000, sch.timesteps.float(), atol=1e-3)


def test_training_grid_range_and_mean():
    g = training_sigmas(500)
    assert len(g) == 500 and g[0] == 1.0 and abs(float(g[-1]) - 0.00598) < 1e-4
    s = sample_training_sigma(200_000, torch.Generator().manual_seed(0))
    assert abs(float(s.mean()) - 0.68) < 0.01


def test_path_and_sign_conventions():
    x0, eps, s = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt = add_noise(x0, eps, s)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[3], eps[3])
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_velocity(xt, v, s), x0, atol=1e-6)
    # a perfect DiT outputs x0 − ε (the negated velocity) and has zero loss
    assert flow_matching_loss(x0 - eps, x0, eps) == 0


def test_guidance_convention_maps_to_diffusers():
    """L2P cfg_scale c equals diffusers guidance_scale g = c − 1."""
    vp, vn = torch.randn(5), torch.randn(5)
    c = 2.0
    diffusers_style = vp + (c - 1) * (vp - vn)
    assert torch.allclose(guide(vp, vn, c), diffusers_style)
    assert torch.equal(guide(vp, vn, 1.0), vp)


def test_guidance_norm_cap_scales_only_samples_past_the_cap():
    """Z-Image's cfg_normalization: ‖v‖ ≤ k·‖v_pos‖ per sample, direction kept; samples under it unchanged."""
    vp = torch.ones(2, 3, 4, 4)
    vn = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4) * 0.9])  # guided norms 3× and 1.2× ‖v_pos‖
    plain, capped = guide(vp, vn, 3.0), guide(vp, vn, 3.0, norm_cap=1.5)
    norms = torch.linalg.vector_norm(capped.flatten(1), dim=1) / torch.linalg.vector_norm(vp.flatten(1), dim=1)
    assert torch.allclose(norms, torch.tensor([1.5, 1.2]))
    assert torch.allclose(capped[0], plain[0] / 2) and torch.equal(capped[1], plain[1])


def test_euler_solves_linear_flow_exactly_and_reports_steps():
    """For data that is a single point, v = ε − x0 is exact and Euler lands on x0 in any number of steps."""
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    seen = []

    def v_fn(x, sigma):
        eps_hat = (x - (1 - sigma.view(-1, 1, 1, 1)) * x0) / sigma.view(-1, 1, 1, 1)
        return eps_hat - x0

    out = euler_sample(v_fn, noise, sampling_sigmas(5), callback=seen.append)
    assert torch.allclose(out, x0, atol=1e-5)
    assert [s.step for s in seen] == list(range(5)) and seen[0].sigma == 1.0
    assert all(torch.allclose(s.x0, x0, atol=1e-5) for s in seen)


def test_heun_is_second_order_and_ends_with_an_euler_step():
    """Heun halves its error 4× per halved step (Euler 2×); its last step to σ = 0 costs one call."""
    x1 = torch.randn(3, 5)

    def v_fn(x, sigma):  # dx/dσ = x: x(σ) = x1·exp(σ − 1)
        calls.append(float(sigma[0]))
        return x

    def error(solver, n):
        sig = torch.linspace(1.0, 0.2, n + 1)  # stop short of 0: every step of Heun is a corrected one
        return (solver(v_fn, x1, sig) - x1 * math.exp(-0.8)).abs().max().item()

    calls = []
    e_heun = [error(heun_sample, n) for n in (4, 8, 16)]
    e_euler = [error(euler_sample, n) for n in (4, 8, 16)]
    assert all(3.5 < a / b < 4.5 for a, b in zip(e_heun, e_heun[1:]))
    assert all(1.7 < a / b < 2.3 for a, b in zip(e_euler, e_euler[1:]))
    assert e_heun[0] < e_euler[-1]  # 4 Heun steps beat 16 Euler ones here
    calls.clear()
    seen = []
    heun_sample(v_fn, x1, sampling_sigmas(5), callback=seen.append)
    assert len(calls) == 9 and 0.0 not in calls  # 2n − 1: the step to σ = 0 is Euler
    assert [s.step for s in seen] == list(range(5)) and seen[-1].sigma_next == 0.0
    with pytest.raises(ValueError, match="known"):
        get_solver("rk4")
