"""Closed-form checks of the SDM diffusion maths (spec 3-4): schedule, q_sample, posterior, KL, NLL, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmix.errors import ConfigError
from diffmix.sdm.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion.linear()


def test_linear_schedule_values(diff):
    assert diff.num_timesteps == 1000
    assert diff.betas[0] == 1e-4 and diff.betas[-1] == 0.02
    assert diff.betas.dtype == np.float64
    np.testing.assert_allclose(diff.alphas_cumprod[540], np.prod(1 - linear_betas()[:541]), rtol=1e-14)
    # spec 4: abar_540 = 0.051068, sqrt = 0.2260, sqrt(1 - abar) = 0.9741
    assert round(diff.alphas_cumprod[540], 6) == 0.051068
    assert round(math.sqrt(diff.alphas_cumprod[540]), 4) == 0.2260
    assert round(math.sqrt(1 - diff.alphas_cumprod[540]), 4) == 0.9741


def test_q_sample_exact_and_moments(diff):
    t = torch.tensor([0, 540, 999])
    x0 = torch.full((3, 1, 1, 1), 0.7)
    assert torch.allclose(diff.q_sample(x0, t, torch.zeros_like(x0)).flatten(),
                          torch.tensor(0.7 * np.sqrt(diff.alphas_cumprod[[0, 540, 999]]), dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    tt = torch.full((n,), 300)
    xt = diff.q_sample(x0, tt, torch.randn(x0.shape, generator=gen)).flatten().double()
    a = diff.alphas_cumprod[300]
    # mean within ~5 standard errors, variance within 2 %
    assert abs(xt.mean().item() - 0.5 * math.sqrt(a)) < 5 * math.sqrt((1 - a) / n)
    assert abs(xt.var().item() / (1 - a) - 1) < 0.02
    mean, var, logvar = diff.q_mean_variance(x0[:2], tt[:2])
    assert torch.allclose(var, torch.full_like(var, 1 - a)) and torch.allclose(logvar, torch.log(var))


@pytest.mark.parametrize("t", [1, 10, 540, 999])
def test_posterior_matches_bayes(diff, t):
    """q(x_{t-1}|x_t,x_0) from the product of N(sqrt(abar_{t-1}) x0, 1-abar_{t-1}) and N(x_t; sqrt(alpha_t) x, beta_t)."""
    abar_prev = diff.alphas_cumprod[t - 1]
    beta = diff.betas[t]
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    x0v, xtv = 0.3, -0.8
    mean_ref = (math.sqrt(abar_prev) * x0v / (1 - abar_prev) + math.sqrt(1 - beta) * xtv / beta) / prec
    mean, var, logvar = diff.q_posterior_mean_variance(
        torch.full((1, 1, 2, 2), x0v, dtype=torch.float64), torch.full((1, 1, 2, 2), xtv, dtype=torch.float64), torch.tensor([t])
    )
    assert mean[0, 0, 0, 0].item() == pytest.approx(mean_ref, rel=1e-5, abs=1e-7)
    assert var[0, 0, 0, 0].item() == pytest.approx(1 / prec, rel=1e-5)
    assert logvar[0, 0, 0, 0].item() == pytest.approx(math.log(1 / prec), rel=1e-5)


def test_posterior_log_variance_clipped_at_t0(diff):
    assert diff.posterior_variance[0] == 0.0
    assert diff.posterior_log_variance_clipped[0] == math.log(diff.posterior_variance[1])
    assert diff.posterior_log_variance_clipped[5] == math.log(diff.posterior_variance[5])


def test_normal_kl_closed_form():
    m = torch.tensor([0.3, -1.0])
    lv = torch.tensor([0.1, -2.0])
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(2))
    # KL(N(0,1) || N(1, e)) = 0.5 * (1 + 1/e + 1/e - 1) ... = 0.5 (log e - 0 + (1 + 1)/e - 1)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0))
    assert kl.item() == pytest.approx(0.5 * (1 + 2 / math.e - 1), rel=1e-6)


def test_discretized_likelihood_sums_to_one():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.05)), (-0.3, math.log(0.5))]:
        ll = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert torch.exp(ll).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_learned_range_variance_ends(diff):
    t = torch.tensor([0, 500])
    x = torch.zeros(2, 3, 2, 2)
    for v, expected in [(1.0, np.log(diff.betas[[0, 500]])), (-1.0, diff.posterior_log_variance_clipped[[0, 500]])]:
        out = diff.p_mean_variance(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        got = out["log_variance"][:, 0, 0, 0].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # v = 0 is the midpoint in log space
    out = diff.p_mean_variance(torch.zeros(2, 6, 2, 2), x, t)
    mid = 0.5 * (np.log(diff.betas[[0, 500]]) + diff.posterior_log_variance_clipped[[0, 500]])
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].double().numpy(), mid, rtol=1e-6)


def test_training_losses_oracle_and_detached_mean(diff):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 3, 400, 999])
    v = torch.zeros(4, 3, 8, 8, requires_grad=True)
    eps = noise.clone().requires_grad_(True)

    seen_t = []

    def model(x_t, tt, cond):
        seen_t.append(tt.clone())
        return torch.cat([eps, v], 1)

    losses = diff.training_losses(model, x0, t, torch.zeros(4, 5, 8, 8), noise)
    assert torch.equal(seen_t[0], t)  # unrespaced: network sees the index itself
    assert torch.allclose(losses["mse"], torch.zeros(4))
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"][1:] >= 0).all()  # a KL
    losses["loss"].sum().backward()
    # the VLB term reaches only the variance head; with the exact noise the MSE gradient is 0
    assert torch.count_nonzero(eps.grad) == 0
    assert torch.count_nonzero(v.grad) > 0
    # t = 0 uses the decoder NLL in bits/dim
    x_t = diff.q_sample(x0, t, noise)
    out = diff.p_mean_variance(torch.cat([noise, v.detach()], 1), x_t, t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    assert losses["vb"][0].item() == pytest.approx(nll[0].mean().item() / math.log(2), rel=1e-5)


def test_space_timesteps_and_respaced_alphas(diff):
    keep = space_timesteps(1000, "ddim100")
    assert keep == list(range(0, 1000, 10))
    spaced = diff.respace("ddim100")
    assert spaced.num_timesteps == 100
    assert np.array_equal(spaced.alphas_cumprod, diff.alphas_cumprod[keep])  # exact, not approximate
    assert np.array_equal(spaced.timesteps, np.array(keep))
    assert spaced.model_timesteps(torch.tensor([54, 0, 99])).tolist() == [540, 0, 990]
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), spaced.alphas_cumprod, rtol=1e-12)
    # respacing a respaced schedule keeps original step numbers
    again = spaced.respace([0, 54, 99])
    assert again.timesteps.tolist() == [0, 540, 990]
    assert np.array_equal(again.alphas_cumprod, diff.alphas_cumprod[[0, 540, 990]])
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8]
    assert space_timesteps(10, [3, 1, 1]) == [1, 3]


@pytest.mark.parametrize("bad", ["ddim999", "fast", 0, [1000]])
def test_space_timesteps_errors(bad):
    with pytest.raises(ConfigError):
        space_timesteps(1000, bad)
