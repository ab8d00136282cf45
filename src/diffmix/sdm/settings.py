"""Sampler settings: one frozen value shared by config, synthesis, manifests and training previews.

Every default of the DiffMix sampler is written here once. The start time and guidance are
spec 4's (`--timestep_respacing ddim100 --s 1.5 --ddim_percent 55`, eta 0); the solver is
UniPC with 5 guided passes (`DEFAULTS`), chosen on the quality-vs-cost curve of
docs/solvers.md; the official DDIM loop (`OFFICIAL`, 55 passes) is one option away. The start
fraction is parsed once, exactly, into a `fractions.Fraction`, so "0.55" is 11/20 everywhere
and no float product can floor the start index to the wrong side. This module imports neither
torch nor numpy: configs and CLIs can name the defaults without paying for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

from diffmix.errors import ConfigError

SOLVERS: tuple[str, ...] = ("ddim", "dpmpp-2m", "unipc")
# The grid a `passes` budget is laid on, per solver: DDIM keeps its official time-uniform grid
# (55 passes from t = 540 ARE the official steps); the multistep solvers take log-SNR-uniform
# points, on which their extrapolation is well conditioned (docs/solvers.md).
SPACINGS: tuple[str, ...] = ("time", "logsnr")
DEFAULT_SPACING: dict[str, str] = {"ddim": "time", "dpmpp-2m": "logsnr", "unipc": "logsnr"}
#: The solver a run gets when none is named (CLI, experiment configs, `synthesize`): UniPC, the
#: fewest passes at DDIM-55's fidelity and sharpness (docs/solvers.md, 192 CoNSeP patches).
DEFAULT_SOLVER = "unipc"
#: Guided passes a solver runs when none are asked for: per solver, the fewest budget of the
#: 192-patch curve whose label fidelity (PQ, type accuracy, F1_d) and image sharpness all lie
#: within 2 sd of three DDIM-55 runs (UniPC 5, DPM-Solver++(2M) 10). None: every respaced
#: step from the start, which for DDIM is the official run (55 passes).
DEFAULT_PASSES: dict[str, int | None] = {"ddim": None, "dpmpp-2m": 10, "unipc": 5}


def parse_fraction(value: str | float | Fraction) -> Fraction:
    """An exact fraction from decimal text ("0.55" -> 11/20), "p/q", a float (via its shortest
    repr, so 0.55 -> 11/20 too) or a Fraction; ConfigError for anything else."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"start_fraction {value!r} is not a number")
    try:
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"start_fraction {value!r} is not a number") from None


def fraction_text(value: Fraction) -> str:
    """The canonical text of a fraction: its exact decimal when it has one ("0.55", "1"),
    else "p/q". What manifests and run identities record, so equal values read equal."""
    num, den = value.numerator, value.denominator
    twos = fives = 0
    d = den
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{num}/{den}"
    digits = max(twos, fives)
    scaled = num * 10**digits // den
    if digits == 0:
        return str(scaled)
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**digits)
    return f"{sign}{whole}.{frac:0{digits}d}".rstrip("0").rstrip(".")


def start_index(steps: int, start_fraction: str | float | Fraction) -> int:
    """Index of the first DDIM step: floor(steps * start_fraction) - 1, in exact integers.

    spec 4: ddim_percent 55 of 100 steps gives n = 55, start index 54 (original t = 540). The
    official code multiplies floats (100 * 0.29 = 28.999... would floor to 28 steps, not 29).
    """
    frac = parse_fraction(start_fraction)
    if not 0 < frac <= 1:
        raise ConfigError(f"start_fraction must be in (0, 1], got {fraction_text(frac)}")
    if steps < 1:
        raise ConfigError(f"the sampler needs at least one step, got {steps}")
    n = (steps * frac.numerator) // frac.denominator
    if n < 1:
        raise ConfigError(f"start_fraction {fraction_text(frac)} of {steps} steps leaves no step to run")
    return n - 1


@dataclass(frozen=True)
class SamplerSettings:
    """How a patch is re-synthesised. Validated on construction; immutable.

    The field defaults are spec 4's official run (`OFFICIAL`: DDIM, every respaced step), what
    a manifest or config that names no solver recorded; what a user gets by naming nothing is
    `DEFAULTS` (`sampler_settings()`: UniPC, 5 passes).

    steps: length of the respaced schedule ("ddim<steps>" of the checkpoint's T); together with
        start_fraction it fixes the START TIME: index floor(steps * start_fraction) - 1 of that
        schedule (t = 540 of 1000 for the defaults), where y0 is noised once.
    start_fraction: a Fraction; decimal text and floats are parsed here, exactly, once.
    guidance_scale: the code-form s of eps_u + s (eps_c - eps_u) (paper s = code s - 1);
        guidance (two passes) runs only when s > 1, as in the official code.
    eta: DDIM's stochasticity (0: deterministic after the first noising); DDIM only.
    solver: "ddim" (the official sampler), "dpmpp-2m" (DPM-Solver++(2M)) or "unipc" (UniPC-2,
        B(h) = e^h - 1); all use the clipped data prediction (spec 4's clip_denoised).
    passes: guided network passes from the start time to t = 0; None = every respaced step
        from the start (55 for spec 4's schedule, the official run). The start time does not
        depend on it, so a few-pass run starts where the official one does.
    spacing: the grid of those passes, "time" (uniform in network steps) or "logsnr" (uniform
        in log(alpha / sigma)); set only with passes, default `DEFAULT_SPACING[solver]`.
    """

    steps: int = 100  # spec 4: --timestep_respacing ddim100
    start_fraction: Fraction = Fraction("0.55")  # spec 4: --ddim_percent 55
    guidance_scale: float = 1.5  # spec 4: --s 1.5 (code form)
    eta: float = 0.0  # spec 4: hard-coded 0
    solver: str = "ddim"
    passes: int | None = None
    spacing: str | None = None

    def __post_init__(self) -> None:
        # the one place the start fraction is parsed (frozen: set through object.__setattr__)
        object.__setattr__(self, "start_fraction", parse_fraction(self.start_fraction))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise ConfigError(f"steps must be an integer, got {self.steps!r}")
        start_index(self.steps, self.start_fraction)
        try:
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
            object.__setattr__(self, "eta", float(self.eta))
        except (TypeError, ValueError):
            raise ConfigError(f"guidance_scale and eta must be numbers, got {self.guidance_scale!r}, {self.eta!r}") from None
        if self.guidance_scale != self.guidance_scale or abs(self.guidance_scale) == float("inf"):
            raise ConfigError(f"guidance_scale must be finite, got {self.guidance_scale}")
        if not 0.0 <= self.eta < float("inf"):
            raise ConfigError(f"eta must be >= 0, got {self.eta}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}")
        if self.eta > 0 and self.solver != "ddim":
            raise ConfigError(f"eta > 0 is DDIM's; the {self.solver} solver is deterministic (eta 0)")
        if self.passes is not None and (isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1):
            raise ConfigError(f"passes must be a positive integer (or unset), got {self.passes!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ConfigError(f"spacing must be one of {', '.join(SPACINGS)}; got {self.spacing!r}")
        if self.passes is None and self.spacing is not None:
            raise ConfigError("spacing lays out a number of passes: set passes too (without it the run takes "
                              "every respaced step from the start)")
        if self.passes is not None and self.spacing is None:
            object.__setattr__(self, "spacing", DEFAULT_SPACING[self.solver])

    @property
    def start_index(self) -> int:
        """Index of the start time in the respaced schedule (54 for the defaults)."""
        return start_index(self.steps, self.start_fraction)

    @property
    def num_passes(self) -> int:
        """Guided network passes a patch costs (each one conditional + null-label pair)."""
        return self.passes if self.passes is not None else self.start_index + 1

    def to_json(self) -> dict[str, Any]:
        """What manifests and run identities record. `solver`, `passes` and `spacing` appear only
        when they differ from the official DDIM run, so folders made before they existed keep
        their bytes and still resume."""
        out: dict[str, Any] = {
            "steps": self.steps,
            "start_fraction": fraction_text(self.start_fraction),
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
        }
        if self.solver != "ddim":
            out["solver"] = self.solver
        if self.passes is not None:
            out["passes"] = self.passes
            out["spacing"] = self.spacing
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SamplerSettings":
        """The settings a manifest recorded (other keys, e.g. "weights", are ignored)."""
        keys = ("steps", "start_fraction", "guidance_scale", "eta", "solver", "passes", "spacing")
        return cls(**{k: data[k] for k in keys if k in data})

    def describe(self) -> str:
        """One line for logs and the CLI: solver, passes, start and guidance."""
        grid = f" ({self.spacing} grid)" if self.passes is not None else ""
        return (f"{self.solver}, {self.num_passes} guided passes{grid} from index {self.start_index} of "
                f"{self.steps} steps (start fraction {fraction_text(self.start_fraction)}), "
                f"guidance {self.guidance_scale:g}" + (f", eta {self.eta:g}" if self.eta else ""))


def default_passes(solver: str, steps: int, start_fraction: str | float | Fraction) -> int | None:
    """`solver`'s default budget on the schedule `steps` started at `start_fraction`:
    `DEFAULT_PASSES[solver]`, but never more passes than the respaced steps from the start (a
    10-step schedule from 55% has 5, a 4-step one 2), so the default never costs more than the
    official DDIM run on the same schedule. None (DDIM): every respaced step. An unknown
    solver gives None, for `SamplerSettings` to refuse."""
    budget = DEFAULT_PASSES.get(solver)
    return None if budget is None else min(budget, start_index(steps, start_fraction) + 1)


def sampler_settings(solver: str = DEFAULT_SOLVER, passes: int | None = None, **fields: Any) -> SamplerSettings:
    """The settings a user means by naming only what differs from the defaults: `solver`
    (default UniPC) with its default budget unless `passes` is given (`default_passes`); the
    other fields as in `SamplerSettings`. `--solver ddim` alone is therefore the official run."""
    if passes is None:
        passes = default_passes(solver, fields.get("steps", OFFICIAL.steps),
                                fields.get("start_fraction", OFFICIAL.start_fraction))
    return SamplerSettings(solver=solver, passes=passes, **fields)


#: spec 4 exactly: DDIM, 55 guided passes from t = 540 (the `SamplerSettings` field defaults,
#: which is also what a manifest without a `solver` key recorded).
OFFICIAL = SamplerSettings()
#: What a run gets when it names nothing: UniPC, 5 guided passes on the log-SNR grid, from the
#: official start time (t = 540) with the official guidance.
DEFAULTS = sampler_settings()
