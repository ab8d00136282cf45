"""Balancing parameters: one frozen value shared by balancing maps, GradMix, their CLIs and the experiment.

Every default of the balancing plan (spec 6a: 80 % of the eligible targets, a 30-px centroid
border, a dilated target at least 2.3x the source's area) is written here once. The type lives
apart from `diffmix.maps.balance` (which re-exports it) because it imports neither numpy nor
scipy: the CLI names its defaults in `--help` without paying for the maps' libraries.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from diffmix.errors import ConfigError


@dataclass(frozen=True)
class BalanceParams:
    """How the balancing plan is drawn (spec 6a). Validated on construction; immutable.

    minor_class: the class created (spec: 1 for CoNSeP and GLySAC); None = the dataset scheme's
        minor class, filled in by `resolved`.
    fraction: share of the eligible non-minor nuclei drawn as targets.
    border: centroid exclusion in px (targets and sources closer to an edge are not eligible).
    area_ratio: the dilated target must be at least this many times the source's area.
    seed: drives every draw; None = the run's seed (synthesis, experiment), filled by `resolved`.
    target_distribution: {class id: proportion}, the minor class only (swaps only turn other
        classes into it): limits the number of swaps (`balance_dataset`); None = the paper's plan.

    Numbers are kept as given (30 stays an int, 30.0 a float): reports and run identities record
    them, and folders written before this type existed must keep their bytes.
    """

    minor_class: int | None = None
    fraction: float = 0.8  # spec 6a: 80 % of the eligible targets
    border: float = 30  # spec 6a: centroids within 30 px of an edge are not eligible
    area_ratio: float = 2.3  # spec 6a: `size_1 >= 2.3 * size_2`
    seed: int | None = None
    target_distribution: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if self.minor_class is not None:
            if not _is_number(self.minor_class) or int(self.minor_class) != self.minor_class or self.minor_class < 1:
                raise ConfigError(f"minor class must be a class id >= 1, got {self.minor_class!r}")
        for name in ("fraction", "border", "area_ratio"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in [0, 1], got {self.fraction}")
        if not self.border >= 0:
            raise ConfigError(f"border must be >= 0 px, got {self.border}")
        if not self.area_ratio > 0:
            raise ConfigError(f"area ratio must be positive, got {self.area_ratio}")
        if self.seed is not None and (not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.target_distribution is not None:
            # parsed once (JSON keys are text); frozen, so set through object.__setattr__
            object.__setattr__(self, "target_distribution", _distribution(self.target_distribution, self.minor_class))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BalanceParams":
        """The parameters of a mapping (a config's `balance`, `--balance` JSON); ConfigError for
        an unknown name, listing the allowed ones."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown name(s) {unknown}; allowed: {allowed}")
        return cls(**dict(data))

    def resolved(self, minor_class: int, seed: int) -> "BalanceParams":
        """These parameters with an unset minor class and seed taken from the dataset's scheme
        and the run (set values win: a config's `balance.seed` overrides the run's seed)."""
        return dataclasses.replace(
            self,
            minor_class=minor_class if self.minor_class is None else self.minor_class,
            seed=seed if self.seed is None else self.seed,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _distribution(dist: Mapping[Any, Any], minor_class: int | None) -> dict[int, float]:
    """{class id: proportion} with int keys and float values; only the minor class may be set."""
    try:
        out = {int(k): float(v) for k, v in dict(dist).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"target distribution {dist!r}: expected {{class id: proportion}}") from None
    if minor_class is None:  # checked again once `resolved` knows the class
        return out
    extra = sorted(set(out) - {minor_class})
    if extra:
        raise ConfigError(
            f"target distribution can only set the minor class {minor_class}: balancing swaps turn "
            f"other classes into it, so classes {extra} cannot be steered independently"
        )
    if minor_class not in out:
        raise ConfigError(f"target distribution must give a proportion for the minor class {minor_class}")
    p = out[minor_class]
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"target proportion must be in [0, 1], got {p}")
    return out
