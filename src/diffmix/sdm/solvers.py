"""Solvers of the reverse diffusion from a partial start (DDIM, the official one) and their schedules.

In the k-diffusion shape: a `Schedule` is the list of noise levels to visit, a solver is one
short function `sample_x(denoiser, x, schedule)` with no hidden state, and the network reaches
a solver only as a `Denoiser`, `(x, t) -> eps`, the (guided) noise prediction at network step t
(`diffmix.sdm.sampler.guided` builds it). Solvers know nothing of labels, guidance or files.

Notation: abar = alphas_cumprod at a point, alpha = sqrt(abar), sigma = sqrt(1 - abar),
lambda = log(alpha / sigma) (half the log-SNR). Every solver works on the DATA prediction
x0 = clip((x - sigma eps) / alpha, -1, 1): spec 4's `clip_denoised` is the static threshold the
official DDIM applies; few-step solvers that sit beside it use the same data prediction.

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
    from diffmix.sdm.settings import start_index

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


def sampling_schedule(diffusion: _Diffusion, settings: Any) -> Schedule:
    """The schedule of a `SamplerSettings` run: the partial start of ddim<steps>, or, when
    `settings.passes` is set, that many time-uniform points from the same start time."""
    official = partial_start(respaced_schedule(diffusion, settings.steps), settings.start_fraction)
    if settings.passes is None:
        return official
    return time_uniform_schedule(diffusion, official.timesteps[0], settings.passes)


def noised_start(y0: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """y0 noised once to the schedule's first point: sqrt(abar) y0 + sqrt(1 - abar) noise (spec 4)."""
    a = schedule.alphas_cumprod[0]
    return math.sqrt(a) * y0 + math.sqrt(1.0 - a) * noise


def data_prediction(x: Tensor, eps: Tensor, abar: float) -> Tensor:
    """x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar), -1, 1): spec 4 step 3."""
    return ((x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------ DDIM


def sample_ddim(
    denoiser: Denoiser, x: Tensor, schedule: Schedule, *, eta: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """DDIM (spec 4 steps 3-5): x0 clipped, eps re-derived from the clipped x0, then
    x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'); the last step (to
    abar' = 1) returns x0. Step noise z comes from `generator` (CPU when None).

    The operations and their order are the official ones, so results match its sampler bit
    for bit on the same inputs (scalars are float64 Python floats, as guided-diffusion's numpy).
    """
    acp = schedule.alphas_cumprod
    last = len(schedule) - 1
    for k, t in enumerate(schedule.timesteps):
        a, a_prev = acp[k], acp[k + 1]
        eps = denoiser(x, t)
        x0 = data_prediction(x, eps, a)
        eps = (x / math.sqrt(a) - x0) / math.sqrt(1.0 / a - 1.0)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and k < last:
            device = "cpu" if generator is None else generator.device
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
            x = x + sigma * z.to(x.device)
    return x


SOLVER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
}
