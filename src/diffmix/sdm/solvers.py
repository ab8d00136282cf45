"""Solvers of the reverse diffusion from a partial start: DDIM, DPM-Solver++(2M), UniPC; and their schedules.

In the k-diffusion shape: a `Schedule` is the list of noise levels to visit, a solver is one
short function `sample_x(denoiser, x, schedule)` with no hidden state, and the network reaches
a solver only as a `Denoiser`, `(x, t) -> eps`, the (guided) noise prediction at network step t
(`diffmix.sdm.sampler.guided` builds it). Solvers know nothing of labels, guidance or files.

Notation: abar = alphas_cumprod at a point, alpha = sqrt(abar), sigma = sqrt(1 - abar),
lambda = log(alpha / sigma) (half the log-SNR). Every solver works on the DATA prediction
x0 = clip((x - sigma eps) / alpha, -1, 1): spec 4's `clip_denoised` is the static threshold the
official DDIM applies, and DPM-Solver++ / UniPC are written in data prediction so that the same
clipping keeps guided (s > 1) samples in range (Lu et al. 2022, sec. 4; Zhao et al. 2023).

The last noisy point of a DiffMix schedule is t = 0 and the schedule ends at clean data
(abar = 1, spec 4's abar_{-1} := 1): the final step returns the data prediction at t = 0, in
every solver. With N noisy points a solver makes exactly N denoiser calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from diffmix.errors import ConfigError
from diffmix.sdm.settings import start_index

Denoiser = Callable[[Tensor, int], Tensor]
"""(x (B, C, H, W), network step t) -> predicted noise eps, shaped and typed like x."""


class _Diffusion(Protocol):  # what the schedule builders read of a `GaussianDiffusion`
    alphas_cumprod: Any
    timesteps: Any
    num_timesteps: int

    def respace(self, spacing: str) -> Any: ...


@dataclass(frozen=True)
class Schedule:
    """The noise levels a solver visits, noisiest first, ending at clean data.

    timesteps: the network step at each of the N noisy points (strictly descending).
    alphas_cumprod: abar at each noisy point, then 1.0 for the clean end (N + 1 floats).
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.timesteps or len(self.alphas_cumprod) != len(self.timesteps) + 1:
            raise ValueError("a schedule needs N >= 1 timesteps and N + 1 alphas_cumprod")
        if self.alphas_cumprod[-1] != 1.0 or not all(0.0 < a < 1.0 for a in self.alphas_cumprod[:-1]):
            raise ValueError("alphas_cumprod must lie in (0, 1) at noisy points and end at 1.0")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"timesteps must be strictly descending, got {self.timesteps[:8]}...")

    def __len__(self) -> int:
        """N: the number of noisy points, i.e. of denoiser calls."""
        return len(self.timesteps)

    def last(self, n: int) -> "Schedule":
        """The n least noisy points (and the clean end): a partial start is a slice."""
        if not 1 <= n <= len(self):
            raise ValueError(f"cannot keep {n} of {len(self)} points")
        return Schedule(self.timesteps[len(self) - n :], self.alphas_cumprod[len(self) - n :])


def respaced_schedule(diffusion: _Diffusion, steps: int) -> Schedule:
    """The full "ddim<steps>" schedule of `diffusion` (spec 4 respacing), noisiest first.

    Its abar are the diffusion's own at the kept steps (`GaussianDiffusion.respace`); with
    steps == T the schedule is used as it is.
    """
    spaced = diffusion.respace(f"ddim{steps}") if steps != diffusion.num_timesteps else diffusion
    ts = [int(t) for t in spaced.timesteps][::-1]
    acp = [float(a) for a in spaced.alphas_cumprod][::-1]
    return Schedule(tuple(ts), tuple(acp) + (1.0,))


def partial_start(schedule: Schedule, start_fraction: Any) -> Schedule:
    """spec 4's `ddim_percent`: keep the floor(N * start_fraction) least noisy points of an
    N-point schedule (55 of ddim100: t = 540, 530, ..., 0)."""
    return schedule.last(start_index(len(schedule), start_fraction) + 1)


def time_uniform_schedule(diffusion: _Diffusion, t_start: int, passes: int) -> Schedule:
    """`passes` points evenly spaced in network steps from t_start down to 0 (rounded half up,
    in integers), then clean data. For the points of a ddimN slice (evenly spaced from 0) and
    the same count this IS that slice: 55 passes from 540 visit 540, 530, ..., 0."""
    t_start = int(t_start)
    if passes < 1:
        raise ConfigError(f"passes must be >= 1, got {passes}")
    if passes > t_start + 1:
        raise ConfigError(f"{passes} passes do not fit between t = {t_start} and 0 ({t_start + 1} network steps)")
    if passes == 1:
        ts = [t_start]
    else:
        ts = [(2 * k * t_start + (passes - 1)) // (2 * (passes - 1)) for k in range(passes - 1, -1, -1)]
    acp = diffusion.alphas_cumprod
    return Schedule(tuple(ts), tuple(float(acp[t]) for t in ts) + (1.0,))


def logsnr_uniform_schedule(diffusion: _Diffusion, t_start: int, passes: int) -> Schedule:
    """`passes` points evenly spaced in lambda = log(alpha / sigma) from t_start down to t = 0,
    each at the network step nearest to its lambda, then clean data.

    The multistep solvers extrapolate the data prediction from the previous step with the ratio
    r = h_prev / h of successive lambda steps. On a time-uniform grid lambda races up near t = 0
    (linear betas: lambda(60) = 1.6, lambda(0) = 4.6), so the last steps take r ~ 0.2 and
    amplify the extrapolation error; on this grid r = 1 up to rounding (Lu et al. 2022 recommend
    it for such solvers). Where two points would round to one step (near t = 0 a step spans a
    large lambda) they are pushed apart, so the grid has exactly `passes` distinct steps.
    """
    t_start = int(t_start)
    if passes < 1:
        raise ConfigError(f"passes must be >= 1, got {passes}")
    if passes > t_start + 1:
        raise ConfigError(f"{passes} passes do not fit between t = {t_start} and 0 ({t_start + 1} network steps)")
    acp = [float(a) for a in diffusion.alphas_cumprod[: t_start + 1]]
    lam = [_lambda(a) for a in acp]  # decreasing in t
    if passes == 1:
        ts = [t_start]
    else:
        ts = []
        for k in range(passes):
            target = lam[t_start] + (lam[0] - lam[t_start]) * k / (passes - 1)
            # nearest step by lambda: lam is monotone, so bisect on it (descending in t)
            lo, hi = 0, t_start
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if lam[mid] < target else (mid, hi)
            ts.append(lo if abs(lam[lo] - target) <= abs(lam[hi] - target) else hi)
        ts[0], ts[-1] = t_start, 0
        for k in range(passes - 2, -1, -1):  # strictly descending: push collisions upwards...
            ts[k] = max(ts[k], ts[k + 1] + 1)
        for k in range(1, passes):  # ...and below the start (fits: passes <= t_start + 1)
            ts[k] = min(ts[k], ts[k - 1] - 1)
    return Schedule(tuple(ts), tuple(acp[t] for t in ts) + (1.0,))


SPACINGS: dict[str, Callable[[_Diffusion, int, int], Schedule]] = {
    "time": time_uniform_schedule,
    "logsnr": logsnr_uniform_schedule,
}


def sampling_schedule(diffusion: _Diffusion, settings: Any) -> Schedule:
    """The schedule of a `SamplerSettings` run: the partial start of ddim<steps>, or, when
    `settings.passes` is set, that many points from the same start time on the grid named by
    `settings.spacing` ("time" or "logsnr")."""
    official = partial_start(respaced_schedule(diffusion, settings.steps), settings.start_fraction)
    if settings.passes is None:
        return official
    return SPACINGS[settings.spacing](diffusion, official.timesteps[0], settings.passes)


def noised_start(y0: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """y0 noised once to the schedule's first point: sqrt(abar) y0 + sqrt(1 - abar) noise (spec 4)."""
    a = schedule.alphas_cumprod[0]
    return math.sqrt(a) * y0 + math.sqrt(1.0 - a) * noise


def data_prediction(x: Tensor, eps: Tensor, abar: float) -> Tensor:
    """x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar), -1, 1): spec 4 step 3."""
    return ((x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)).clamp(-1.0, 1.0)


def _lambda(abar: float) -> float:
    return 0.5 * (math.log(abar) - math.log1p(-abar))


# ------------------------------------------------------------------------------------ DDIM


def ddim_sigma(a: float, a_prev: float, eta: float) -> float:
    """DDIM's step noise scale eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')."""
    return eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)


def ddim_step(x: Tensor, eps: Tensor, a: float, a_prev: float, *, sigma: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM step from abar = a to abar' = a_prev (spec 4 steps 3-5): x0 clipped, eps
    re-derived from the clipped x0, x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps, plus
    sigma * noise when noise is given. To abar' = 1 it returns x0.

    The operations and their order are the official ones, so results match its sampler bit
    for bit on the same inputs (scalars are float64 Python floats, as guided-diffusion's numpy).
    """
    x0 = data_prediction(x, eps, a)
    eps = (x / math.sqrt(a) - x0) / math.sqrt(1.0 / a - 1.0)
    x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    if noise is not None:
        x = x + sigma * noise.to(x.device)
    return x


def sample_ddim(
    denoiser: Denoiser, x: Tensor, schedule: Schedule, *, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """DDIM over a schedule: one `ddim_step` per point, step noise (eta > 0) drawn from
    `generator` (CPU when None) at every step but the last, as the official sampler does."""
    acp = schedule.alphas_cumprod
    last = len(schedule) - 1
    for k, t in enumerate(schedule.timesteps):
        a, a_prev = acp[k], acp[k + 1]
        eps = denoiser(x, t)
        sigma = ddim_sigma(a, a_prev, eta)
        z = None
        if sigma > 0 and k < last:
            device = "cpu" if generator is None else generator.device
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
        x = ddim_step(x, eps, a, a_prev, sigma=sigma, noise=z)
    return x


# ------------------------------------------------------------------------ DPM-Solver++(2M)


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: Schedule) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, multistep second order.

    From s to t with h = lambda_t - lambda_s:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, where D = x0_s on the first step
    and D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h after it (the data
    prediction extrapolated linearly in lambda to the middle of the step). The step into the
    last noisy point (t = 0) is first order ("lower order final", as DPM-Solver++ and diffusers
    do for short schedules): lambda(0) lies far beyond its neighbours (linear betas: 4.6 vs 2.9
    at t = 10), so r = h_prev / h is small there and the extrapolation would amplify errors.
    The final step to clean data (lambda = inf) returns x0 at t = 0, as DDIM does.
    """
    acp = schedule.alphas_cumprod
    last = len(schedule) - 1
    prev: Tensor | None = None
    h_prev = 0.0
    for k, t in enumerate(schedule.timesteps):
        a, a_next = acp[k], acp[k + 1]
        x0 = data_prediction(x, denoiser(x, t), a)
        if k == last:
            return x0
        h = _lambda(a_next) - _lambda(a)
        # (1 + 1/(2r)) x0 - 1/(2r) prev with 1/(2r) = h / (2 h_prev); first order into t = 0
        d = x0 if prev is None or k == last - 1 else x0 + (0.5 * h / h_prev) * (x0 - prev)
        x = math.sqrt((1.0 - a_next) / (1.0 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * d
        prev, h_prev = x0, h
    return x


# ------------------------------------------------------------------------------------ UniPC


def sample_unipc(denoiser: Denoiser, x: Tensor, schedule: Schedule) -> Tensor:
    """UniPC with a second-order predictor and corrector (Zhao et al. 2023), data prediction,
    B(h) = e^h - 1 (their choice for guided sampling).

    From s to t (h = lambda_t - lambda_s), with x0_s just computed and x0_p one point earlier:
    base = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s (the DDIM / first-order step);
    predictor UniP-2: x_t = base - alpha_t B(h) * 1/2 * D_p, D_p = (x0_p - x0_s) / r_p,
    r_p = (lambda_p - lambda_s) / h (UniP-1 = base on the first step; UniP-2 equals
    DPM-Solver++(2M); first order into t = 0, as there). After the next call gives x0_t at that x_t, the corrector UniC replaces
    x_t by base - alpha_t B(h) (rho_p D_p + rho_t (x0_t - x0_s)), rho from the order conditions
    [1 1; r_p 1] rho = [b_1, b_2] (rho_t = 1/2 at first order). x0_t is not recomputed (no
    extra call); the last point's correction is moot, since the final step returns x0 at t = 0.
    """
    acp = schedule.alphas_cumprod
    last = len(schedule) - 1
    step: tuple[Any, ...] | None = None  # the previous step: (x_s, x0_s, x0_p, r_p, h, a_s, a_t)
    x0_prev: Tensor | None = None
    lam_prev = 0.0
    for k, t in enumerate(schedule.timesteps):
        a = acp[k]
        x0 = data_prediction(x, denoiser(x, t), a)
        if k == last:
            return x0
        if step is not None:  # UniC: correct the point just reached, with the x0 just computed
            x = _unipc_update(*step, x0_t=x0)
        a_next = acp[k + 1]
        lam, lam_next = _lambda(a), _lambda(a_next)
        h = lam_next - lam
        second = x0_prev is not None and k < last - 1  # lower order final, as DPM-Solver++(2M)
        r_p = (lam_prev - lam) / h if second else None
        step = (x, x0, x0_prev if second else None, r_p, h, a, a_next)
        x = _unipc_update(*step, x0_t=None)
        x0_prev, lam_prev = x0, lam
    return x


def _unipc_update(
    x_s: Tensor, x0_s: Tensor, x0_p: Tensor | None, r_p: float | None, h: float, a_s: float, a_t: float,
    *, x0_t: Tensor | None,
) -> Tensor:
    """One UniPC update from s to t: the predictor when x0_t is None, else the corrector."""
    hh = -h  # data prediction integrates e^{-lambda}
    phi_1 = math.expm1(hh)
    b_h = phi_1  # B(h) = e^h - 1 in the data-prediction sign convention ("bh2")
    alpha_t = math.sqrt(a_t)
    base = math.sqrt((1.0 - a_t) / (1.0 - a_s)) * x_s - alpha_t * phi_1 * x0_s
    d_p = None if x0_p is None else (x0_p - x0_s) / r_p
    if x0_t is None:  # predictor
        return base if d_p is None else base - alpha_t * b_h * 0.5 * d_p
    d_t = x0_t - x0_s
    if d_p is None:  # first-order corrector: rho_t = 1/2
        return base - alpha_t * b_h * 0.5 * d_t
    phi_2 = phi_1 / hh - 1.0
    phi_3 = phi_2 / hh - 0.5
    b1, b2 = phi_2 / b_h, 2.0 * phi_3 / b_h
    rho_p = (b1 - b2) / (1.0 - r_p)
    rho_t = b1 - rho_p
    return base - alpha_t * b_h * (rho_p * d_p + rho_t * d_t)


SOLVER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
}
