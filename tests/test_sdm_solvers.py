"""Solvers and schedules (diffmix.sdm.solvers) and guidance as a denoiser wrapper (sampler.guided).

Per solver: an oracle that returns the true noise is integrated back to y0 exactly; on Gaussian
data, whose probability-flow ODE has a closed form, each solver converges at its order; with
s = 1 the guided denoiser IS the conditional pass. Schedules: the partial start is a slice, and
a pass budget on the time grid reproduces the official steps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmix.errors import ConfigError
from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.sampler import diffmix_sample, guided
from diffmix.sdm.settings import SOLVERS, SamplerSettings
from diffmix.sdm.solvers import (
    SOLVER_FUNCTIONS,
    Schedule,
    _lambda,
    _unipc_update,
    data_prediction,
    ddim_step,
    logsnr_uniform_schedule,
    noised_start,
    partial_start,
    respaced_schedule,
    sample_ddim,
    sample_dpmpp_2m,
    sampling_schedule,
    time_uniform_schedule,
)

DIFF = GaussianDiffusion.linear()
ACP = DIFF.alphas_cumprod
BUDGETS = (1, 2, 3, 5, 8, 10, 15, 20, 55)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ schedules


def test_partial_start_is_a_slice_of_the_respaced_schedule():
    full = respaced_schedule(DIFF, 100)
    assert len(full) == 100 and full.timesteps[:2] == (990, 980) and full.timesteps[-1] == 0
    assert full.alphas_cumprod[-1] == 1.0
    assert all(a == float(ACP[t]) for t, a in zip(full.timesteps, full.alphas_cumprod))  # respacing keeps abar
    part = partial_start(full, "0.55")
    assert part == full.last(55) and part.timesteps[0] == 540 and len(part) == 55  # spec 4: t = 540, 55 steps
    assert respaced_schedule(DIFF, 1000).timesteps[:3] == (999, 998, 997)  # steps == T: no respacing
    with pytest.raises(ValueError):
        full.last(0)


def test_pass_budget_grids():
    official = partial_start(respaced_schedule(DIFF, 100), "0.55")
    assert time_uniform_schedule(DIFF, 540, 55) == official  # 55 passes on the time grid ARE the official steps
    assert time_uniform_schedule(DIFF, 540, 3).timesteps == (540, 270, 0)
    assert time_uniform_schedule(DIFF, 540, 1).timesteps == (540,)
    for n in (2, 3, 5, 10, 55, 200, 541):
        grid = logsnr_uniform_schedule(DIFF, 540, n)
        assert len(grid) == n and grid.timesteps[0] == 540 and grid.timesteps[-1] == 0  # exact budget, distinct steps
    lam = [_lambda(a) for a in logsnr_uniform_schedule(DIFF, 540, 10).alphas_cumprod[:-1]]
    steps = np.diff(lam)
    assert steps.max() / steps.min() < 1.25  # evenly spaced in log-SNR up to rounding to integer steps
    lam_t = [_lambda(a) for a in time_uniform_schedule(DIFF, 540, 10).alphas_cumprod[:-1]]
    assert np.diff(lam_t)[-1] / np.diff(lam_t)[0] > 5  # the time grid races through log-SNR at the end
    for make in (time_uniform_schedule, logsnr_uniform_schedule):
        with pytest.raises(ConfigError, match="do not fit"):
            make(DIFF, 540, 542)
    # settings pick the grid: the official slice without a budget, the solver's own grid with one
    assert sampling_schedule(DIFF, SamplerSettings()) == official
    assert sampling_schedule(DIFF, SamplerSettings(passes=55)) == official
    assert sampling_schedule(DIFF, SamplerSettings(solver="unipc", passes=10)) == logsnr_uniform_schedule(DIFF, 540, 10)
    assert sampling_schedule(DIFF, SamplerSettings(steps=10, passes=3)).timesteps == (400, 200, 0)  # start of ddim10


def test_schedule_validation():
    with pytest.raises(ValueError, match="end at 1.0"):
        Schedule((5,), (0.5, 0.9))
    with pytest.raises(ValueError, match="descending"):
        Schedule((1, 5), (0.9, 0.5, 1.0))
    with pytest.raises(ValueError, match="N >= 1"):
        Schedule((), (1.0,))


# ------------------------------------------------------------------------------ oracles


def _true_noise(y0: torch.Tensor):
    """A denoiser that returns the exact noise of x relative to y0 at step t."""

    def denoise(x, t):
        a = float(ACP[t])
        return (x - math.sqrt(a) * y0) / math.sqrt(1.0 - a)

    return denoise


@pytest.mark.parametrize("solver", SOLVERS)
def test_true_noise_oracle_recovers_y0(solver):
    gen = torch.Generator().manual_seed(0)
    y0 = torch.rand(2, 3, 8, 8, generator=gen) * 1.8 - 0.9
    noise = torch.randn(y0.shape, generator=gen)
    fn = SOLVER_FUNCTIONS[solver]
    for spacing in ("time", "logsnr"):
        for n in BUDGETS:
            schedule = sampling_schedule(DIFF, SamplerSettings(solver=solver, passes=n, spacing=spacing))
            calls = []

            def counted(x, t, _d=_true_noise(y0)):
                calls.append(t)
                return _d(x, t)

            out = fn(counted, noised_start(y0, noise, schedule), schedule)
            assert len(calls) == n == len(schedule)  # one denoiser call per pass
            assert (out - y0).abs().max() < 1e-5, (spacing, n)
    y64 = y0.double()
    out = fn(_true_noise(y64), noised_start(y64, noise.double(), respaced_schedule(DIFF, 100)), respaced_schedule(DIFF, 100))
    assert (out - y64).abs().max() < 1e-12  # from t = 990, in float64


def _gaussian(mu: float = 0.1, s: float = 0.3):
    """Pixels ~ N(mu, s^2): the exact denoiser and the ODE's closed form x_t = alpha mu + sqrt(alpha^2 s^2 + sigma^2) z."""

    def eps(x, t):
        a = float(ACP[t])
        d = mu + math.sqrt(a) * s * s / (a * s * s + 1.0 - a) * (x - math.sqrt(a) * mu)
        return (x - math.sqrt(a) * d) / math.sqrt(1.0 - a)

    z = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4 - 2
    a0, a_end = float(ACP[540]), float(ACP[0])
    x_start = math.sqrt(a0) * mu + math.sqrt(a0 * s * s + 1.0 - a0) * z
    # the schedule's last call is at t = 0 and returns the data prediction there, from the exact x_0
    exact = mu + math.sqrt(a_end) * s * s * z / math.sqrt(a_end * s * s + 1.0 - a_end)
    return eps, x_start, exact


@pytest.mark.parametrize("solver, order", [("ddim", 1.0), ("dpmpp-2m", 1.8), ("unipc", 1.8)])
def test_gaussian_data_convergence_order(solver, order):
    eps, x_start, exact = _gaussian()
    errors = []
    for n in (10, 20, 40):
        schedule = sampling_schedule(DIFF, SamplerSettings(solver=solver, passes=n))
        errors.append((SOLVER_FUNCTIONS[solver](eps, x_start, schedule) - exact).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(rates) > order * 0.85, (errors, rates)
    if solver != "ddim":  # a second-order solver beats DDIM at the same budget by far
        ddim = sample_ddim(eps, x_start, sampling_schedule(DIFF, SamplerSettings(passes=10)))
        assert errors[0] < 0.2 * (ddim - exact).abs().max().item()


def test_first_order_steps_are_ddim():
    """DPM-Solver++'s first step (no history) is DDIM's step with the clipped x0 (Lu et al. 2022)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    schedule = Schedule((500, 300), (float(ACP[500]), float(ACP[300]), 1.0))
    seen = []

    def stop_after_one(x_in, t):
        seen.append(x_in)
        if len(seen) == 2:
            raise StopIteration
        return eps

    for fn in (sample_ddim, sample_dpmpp_2m, SOLVER_FUNCTIONS["unipc"]):
        seen.clear()
        with pytest.raises(StopIteration):
            fn(stop_after_one, x, schedule)
        if fn is sample_ddim:
            ddim_next = seen[1]
        else:
            torch.testing.assert_close(seen[1], ddim_next, atol=1e-12, rtol=0)


def test_unipc_corrector_is_exact_for_data_predictions_linear_in_lambda():
    """UniC-2's coefficients solve the order conditions: for x0(lambda) = c0 + c1 lambda its
    update equals the exact solution of the data-prediction ODE,
    x_t = (sigma_t / sigma_s) x_s + alpha_t * integral_0^h e^{u - h} x0(lambda_s + u) du."""
    c0, c1 = torch.tensor([0.3]), torch.tensor([-0.2])
    t_p, t_s, t_t = 700, 500, 300
    a_p, a_s, a_t = (float(ACP[t]) for t in (t_p, t_s, t_t))
    lp, ls, lt = _lambda(a_p), _lambda(a_s), _lambda(a_t)
    h = lt - ls
    x_s = torch.tensor([0.7])
    m = {k: c0 + c1 * lam for k, lam in (("p", lp), ("s", ls), ("t", lt))}
    got = _unipc_update(x_s, m["s"], m["p"], (lp - ls) / h, h, a_s, a_t, x0_t=m["t"])
    integral = c0 * (1 - math.exp(-h)) + c1 * (ls * (1 - math.exp(-h)) + h - 1 + math.exp(-h))
    exact = math.sqrt((1 - a_t) / (1 - a_s)) * x_s + math.sqrt(a_t) * integral
    torch.testing.assert_close(got, exact, atol=1e-12, rtol=0)


def test_ddim_step_by_hand():
    """spec 4 steps 3-5 on numbers: abar 0.25 -> 0.64, so sqrt = 0.5 -> 0.8, sqrt(1 - abar') = 0.6."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    # unclipped: x0 = (0.5 - sqrt(0.75) 0.2) / 0.5, eps comes back unchanged, x' = 0.8 x0 + 0.6 eps
    x0 = (0.5 - math.sqrt(0.75) * 0.2) / 0.5
    assert ddim_step(t(0.5), t(0.2), 0.25, 0.64).item() == pytest.approx(0.8 * x0 + 0.6 * 0.2, abs=1e-15)
    # clipped: x0 = 2.67 -> 1, eps re-derived from the clipped x0: (0.9 / 0.5 - 1) / sqrt(3)
    assert ddim_step(t(0.9), t(-0.5), 0.25, 0.64).item() == pytest.approx(0.8 + 0.6 * 0.8 / math.sqrt(3), abs=1e-15)
    # the last step (abar' = 1) returns x0 itself; step noise adds sigma * z
    assert ddim_step(t(0.9), t(-0.5), 0.25, 1.0).item() == 1.0
    assert ddim_step(t(0.5), t(0.2), 0.25, 0.64, sigma=0.3, noise=t(2.0)).item() == pytest.approx(
        0.8 * x0 + math.sqrt(0.36 - 0.09) * 0.2 + 0.6, abs=1e-15)


def test_data_prediction_is_clipped():
    x = torch.tensor([[[[5.0]]]])
    assert data_prediction(x, torch.zeros_like(x), 0.5).item() == 1.0  # spec 4 step 3: clip to [-1, 1]


# ------------------------------------------------------------------------------ guidance


def _net(seed: int):
    torch.manual_seed(seed)
    conv_x = torch.nn.Conv2d(3, 6, 3, padding=1)
    conv_y = torch.nn.Conv2d(5, 6, 3, padding=1)
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return torch.tanh(conv_x(x) + conv_y(y) + t.view(-1, 1, 1, 1) / 1000.0)

    return model, calls


def test_guided_denoiser_combines_the_pair():
    model, calls = _net(0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    cond = (torch.rand(2, 5, 8, 8, generator=gen) > 0.5).float()
    t = torch.full((2,), 300)
    with torch.no_grad():
        eps_c, eps_u = model(x, t, cond)[:, :3], model(x, t, torch.zeros_like(cond))[:, :3]
        calls.clear()
        got = guided(model, cond, 2.5)(x, 300)
        assert calls == [4]  # one call of the stacked [cond; null] batch
        torch.testing.assert_close(got, eps_u + 2.5 * (eps_c - eps_u), atol=1e-6, rtol=0)
        calls.clear()
        assert torch.equal(guided(model, cond, 1.0)(x, 300), eps_c)  # s = 1: the conditional pass alone
        assert calls == [2]


@pytest.mark.parametrize("solver", SOLVERS)
def test_guidance_one_is_the_conditional_pass(solver):
    """With s = 1 a solver run equals the same solver on the conditional network alone, bit for bit."""
    model, calls = _net(1)
    gen = torch.Generator().manual_seed(4)
    y0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    cond = (torch.rand(2, 5, 8, 8, generator=gen) > 0.5).float()
    noise = torch.randn(y0.shape, generator=gen)
    settings = SamplerSettings(solver=solver, guidance_scale=1.0, passes=5)
    with torch.no_grad():
        got = diffmix_sample(model, y0, cond, settings, noise=noise)
        assert calls == [2] * 5  # no null-label pass
        schedule = sampling_schedule(DIFF, settings)

        def conditional(x, t):
            return model(x, torch.full((2,), t), cond)[:, :3]

        want = SOLVER_FUNCTIONS[solver](conditional, noised_start(y0, noise, schedule), schedule)
        guided_run = diffmix_sample(model, y0, cond, SamplerSettings(solver=solver, guidance_scale=1.5, passes=5), noise=noise)
    assert torch.equal(got, want)
    assert not torch.allclose(got, guided_run, atol=1e-3)  # and s > 1 does change it


@pytest.mark.parametrize("solver", ["dpmpp-2m", "unipc"])
def test_unet_fast_path_serves_every_solver(solver):
    """The U-Net's own `conditioned` pair (shared encoder, cached SPADEs) gives the generic result."""
    from diffmix.sdm.unet import UNetConfig, UNetModel

    torch.manual_seed(0)
    model = UNetModel(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(8,), num_head_channels=32, label_nc=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(5)
    y0 = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    cond = torch.cat([torch.nn.functional.one_hot(torch.randint(0, 4, (1, 16, 16), generator=gen), 4)
                      .permute(0, 3, 1, 2).float(), torch.zeros(1, 1, 16, 16)], 1)
    noise = torch.randn(y0.shape, generator=gen)
    settings = SamplerSettings(solver=solver, passes=4)
    with torch.no_grad():
        fast = diffmix_sample(model, y0, cond, settings, noise=noise)
        slow = diffmix_sample(lambda x, t, y: model(x, t, y), y0, cond, settings, noise=noise)
    assert (fast - y0).abs().mean() > 1e-2
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
