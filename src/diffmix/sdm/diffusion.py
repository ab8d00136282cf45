"""Gaussian diffusion maths of SDM: linear schedule, posterior, learned-range variance, hybrid loss, respacing.

spec 3: linear betas 1e-4..0.02 over T=1000, epsilon prediction, LEARNED_RANGE variance
(frac = (v+1)/2 interpolates log beta_t and the clipped log posterior variance), hybrid loss
MSE(eps) + VLB in bits/dim with the predicted mean detached (decoder NLL at t=0), uniform t.
spec 4: respacing keeps a subset of the original steps with alphas_cumprod unchanged there,
and the network always sees the ORIGINAL step.

Every per-step quantity is computed once, in float64 numpy, when a `GaussianDiffusion` is made
(the guided-diffusion habit: one schedule, paper names, one gather helper). Tensors handed in
are indexed by *schedule index* `t` in 0..num_timesteps-1; `timesteps[t]` is the original step
the network is given (identity when not respaced).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import torch

from diffmix.errors import ConfigError

LN2 = math.log(2.0)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """float64 (T,) linear beta schedule (spec 3: 1e-4..0.02, T=1000; `noise_schedule linear`).

    guided-diffusion scales the end points by 1000/T so other T keep the same total noise; for
    T=1000 this is the plain linspace.
    """
    if num_timesteps < 1:
        raise ConfigError(f"diffusion needs at least one step, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: str | int | Sequence[int]) -> list[int]:
    """The original steps a respaced schedule keeps, ascending.

    `spacing`:
      - "ddimN": every stride-th step from 0 with the integer stride giving exactly N steps
        (spec 4: "ddim100" over T=1000 keeps 0, 10, ..., 990);
      - an int N or the string "N": N steps spread evenly over 0..T-1 (first and last kept);
      - a sequence of ints: exactly those original steps.
    """
    if isinstance(spacing, str):
        text = spacing.strip()
        m = re.fullmatch(r"ddim(\d+)", text)
        if m:
            wanted = int(m.group(1))
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(f"respacing {spacing!r}: no integer stride gives exactly {wanted} of {num_timesteps} steps")
        if text.isdigit():
            spacing = int(text)
        else:
            raise ConfigError(f"respacing {spacing!r}: expected 'ddimN', an integer or a list of steps")
    if isinstance(spacing, (int, np.integer)):
        count = int(spacing)
        if not 1 <= count <= num_timesteps:
            raise ConfigError(f"respacing to {count} steps: must be between 1 and {num_timesteps}")
        if count == 1:
            return [0]
        # Integer arithmetic: step i sits at round(i * (T-1) / (count-1)), half up.
        return [(2 * i * (num_timesteps - 1) + (count - 1)) // (2 * (count - 1)) for i in range(count)]
    steps = sorted({int(s) for s in spacing})
    if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ConfigError(f"respacing steps must lie in 0..{num_timesteps - 1}, got {list(spacing)[:8]}...")
    return steps


def _gather(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] as float32 on t's device, shaped (B, 1, ..., 1) to broadcast against an ndim tensor."""
    out = torch.from_numpy(arr).to(device=t.device)[t.long()].float()
    return out.reshape(out.shape + (1,) * (ndim - out.dim()))


class GaussianDiffusion:
    """A diffusion schedule and every quantity derived from it (float64 numpy arrays).

    Made from `alphas_cumprod` (not betas) so that a respaced schedule holds *exactly* the
    original alphas_cumprod at its kept steps; `betas` are given for the unrespaced schedule so
    that they are the configured values bit for bit.
    """

    def __init__(
        self,
        alphas_cumprod: np.ndarray,
        timesteps: Sequence[int] | None = None,
        betas: np.ndarray | None = None,
        original_num_timesteps: int | None = None,
    ) -> None:
        acp = np.asarray(alphas_cumprod, dtype=np.float64)
        if acp.ndim != 1 or not (np.all(acp > 0) and np.all(acp <= 1)):
            raise ConfigError("alphas_cumprod must be a 1-D array in (0, 1]")
        self.alphas_cumprod = acp
        self.num_timesteps = len(acp)
        self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.betas = np.asarray(betas, dtype=np.float64) if betas is not None else 1.0 - acp / self.alphas_cumprod_prev
        self.timesteps = np.asarray(list(timesteps) if timesteps is not None else range(len(acp)), dtype=np.int64)
        self.original_num_timesteps = original_num_timesteps or self.num_timesteps

        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
        # spec 3: the posterior variance is 0 at t=0; its log uses the t=1 value there.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - acp)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "GaussianDiffusion":
        """The SDM/DiffMix schedule (spec 3)."""
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        return cls(np.cumprod(1.0 - betas), betas=betas)

    def respace(self, spacing: str | int | Sequence[int]) -> "GaussianDiffusion":
        """A schedule over a subset of this one's steps (spec 4 `SpacedDiffusion`).

        Its betas are rebuilt as 1 - abar[tau_i]/abar[tau_{i-1}], i.e. its alphas_cumprod are this
        schedule's at the kept steps; `timesteps` maps its indices to the original steps.
        """
        keep = space_timesteps(self.num_timesteps, spacing)
        return GaussianDiffusion(
            self.alphas_cumprod[keep],
            timesteps=self.timesteps[keep],
            original_num_timesteps=self.original_num_timesteps,
        )

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original steps (int64, t's device) the network must see for schedule indices `t`."""
        return torch.from_numpy(self.timesteps).to(t.device)[t.long()]

    # -- forward process ---------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _gather(self.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
        variance = _gather(1.0 - self.alphas_cumprod, t, x_start.dim())
        log_variance = _gather(np.log(1.0 - self.alphas_cumprod), t, x_start.dim())
        return mean, variance.expand_as(x_start), log_variance.expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; all (B, C, H, W), t (B,) indices."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        nd = x_t.dim()
        mean = _gather(self.posterior_mean_coef1, t, nd) * x_start + _gather(self.posterior_mean_coef2, t, nd) * x_t
        variance = _gather(self.posterior_variance, t, nd).expand_as(x_t)
        log_variance = _gather(self.posterior_log_variance_clipped, t, nd).expand_as(x_t)
        return mean, variance, log_variance

    # -- reverse process ---------------------------------------------------------------------
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        nd = x_t.dim()
        return _gather(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        nd = x_t.dim()
        return (_gather(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, nd
        )

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a (B, 2C, H, W) output [eps, v] with LEARNED_RANGE variance.

        spec 3: v is read raw, frac = (v+1)/2, log sigma^2 = frac log beta_t + (1-frac) log beta~_t
        (beta~ clipped at t=0). Returns mean, variance, log_variance, pred_xstart, eps.
        """
        c = x_t.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(f"learned-range output needs {2 * c} channels, got {model_output.shape[1]}")
        eps, v = model_output[:, :c], model_output[:, c:]
        nd = x_t.dim()
        min_log = _gather(self.posterior_log_variance_clipped, t, nd)
        max_log = _gather(np.log(self.betas), t, nd)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # -- loss --------------------------------------------------------------------------------
    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """(B,) VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = kl.flatten(1).mean(1) / LN2
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.flatten(1).mean(1) / LN2
        return torch.where(t == 0, nll, kl)

    def losses_from_output(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss terms (each (B,), float32) from a network output already computed.

        spec 3: loss = mean (eps - eps_hat)^2 + L_vb, with L_vb taken on [eps_hat.detach(), v] so
        it trains only the variance head (lambda = 0.001 of the full VLB at T=1000). Works on
        float32 copies so a bf16/fp16 forward does not degrade the loss.
        """
        c = x_start.shape[1]
        model_output = model_output.float()
        eps = model_output[:, :c]
        frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
        mse = (noise.float() - eps).pow(2).flatten(1).mean(1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Noise x_start to step index t, run `model(x_t, original_t, cond)`, return the loss terms."""
        x_t = self.q_sample(x_start, t, noise)
        return self.losses_from_output(model(x_t, self.model_timesteps(t), cond), x_start, x_t, t, noise)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by guided-diffusion's decoder NLL."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of 8-bit data x in [-1, 1] under a Gaussian binned to 2/255.

    The edge bins extend to -inf / +inf, as in guided-diffusion (Ho et al. 2020, Eq. 13).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )
