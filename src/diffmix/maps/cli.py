"""Commands of the `maps` area: `diffmix maps balance`, `diffmix maps enlarge`, `diffmix gradmix`.

Each reads a dataset folder, calls one function of `diffmix.maps`, and writes a dataset folder
(foundation format, `dataset.json` merged, with the parameters, seed and command in its
provenance). For the label-only maps (balance, enlarge) the images are the originals.

CLI convention: top-level `<name>_cmd` functions, `register(app)` only attaches them, library
modules imported inside the command bodies (see `diffmix.data.cli` and docs/architecture.md).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from diffmix._cli import add_group
from diffmix.errors import ConfigError
from diffmix.maps.params import BalanceParams

if TYPE_CHECKING:
    from diffmix.data.schemes import ClassScheme


def resolve_class(scheme: ClassScheme, token: str | int) -> int:
    """A merged class id from an id ("1") or a class name or unambiguous prefix ("misc").

    Names compare case-insensitively against `scheme.classes`; an exact name wins over prefixes.
    """
    text = str(token).strip()
    if text.lstrip("-").isdigit():
        cid = int(text)
        if cid not in scheme.classes:
            raise ConfigError(f"class {cid} is not one of scheme {scheme.name!r}'s classes {_listing(scheme)}")
        return cid
    low = text.lower()
    exact = [c for c, n in scheme.classes.items() if n.lower() == low]
    if exact:
        return exact[0]
    hits = [c for c, n in scheme.classes.items() if low and n.lower().startswith(low)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(f"unknown class {text!r} in scheme {scheme.name!r}: use one of {_listing(scheme)}")
    raise ConfigError(
        f"class {text!r} is ambiguous in scheme {scheme.name!r}: "
        f"{', '.join(f'{c}={scheme.classes[c]}' for c in hits)}"
    )


def _listing(scheme: ClassScheme) -> str:
    return ", ".join(f"{c}={n}" for c, n in sorted(scheme.classes.items()))


def parse_distribution(scheme: ClassScheme, items: list[str]) -> dict[int, float] | None:
    """`["misc=0.25"]` or `["1=0.25,2=0.3"]` -> {class id: proportion}; None when empty."""
    if not items:
        return None
    out: dict[int, float] = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"target distribution entry {part!r} must look like CLASS=PROPORTION (e.g. misc=0.25)")
            name, value = part.split("=", 1)
            cid = resolve_class(scheme, name)
            try:
                p = float(value)
            except ValueError:
                raise ConfigError(f"target distribution entry {part!r}: {value!r} is not a number") from None
            if cid in out:
                raise ConfigError(f"target distribution gives class {cid} twice")
            out[cid] = p
    return out or None


def _command(*words: Any) -> str:
    return "diffmix " + " ".join(shlex.quote(str(w)) for w in words if w is not None and w != "")


# The balancing options of `maps balance` and `gradmix`, one definition for both; defaults are
# BalanceParams's (the seed's is the CLI's: same seed, same bytes).
_DEFAULTS = BalanceParams()
MINOR_CLASS_OPTION = typer.Option(
    None, "--minor-class", help="Class to create: id or name (default: the scheme's minor class)."
)
FRACTION_OPTION = typer.Option(
    _DEFAULTS.fraction, "--fraction", help="Share of eligible non-minor nuclei drawn as targets (spec 6a: 0.8)."
)
BORDER_OPTION = typer.Option(float(_DEFAULTS.border), "--border", help="Centroid border exclusion in px (spec 6a: 30).")
AREA_RATIO_OPTION = typer.Option(
    _DEFAULTS.area_ratio, "--area-ratio", help="Dilated target area must be >= this x source area (spec 6a: 2.3)."
)
TARGET_DISTRIBUTION_OPTION = typer.Option(
    [], "--target-distribution",
    help="Requested minor-class share, e.g. misc=0.25 or 1=0.25: limits the number of swaps.",
)
SEED_OPTION = typer.Option(0, "--seed", help="Random seed: same seed, same bytes.")


def balance_params(
    scheme: ClassScheme,
    minor_class: Optional[str],
    fraction: float,
    border: float,
    area_ratio: float,
    target_distribution: list[str],
    seed: int,
) -> BalanceParams:
    """The BalanceParams of the balancing options (minor class by id or name, default the scheme's)."""
    minor = resolve_class(scheme, minor_class) if minor_class is not None else scheme.minor_class
    return BalanceParams(minor_class=minor, fraction=fraction, border=border, area_ratio=area_ratio, seed=seed,
                         target_distribution=parse_distribution(scheme, target_distribution))


def balance_words(params: BalanceParams) -> list[Any]:
    """The balancing options that reproduce `params`, as the recorded command lists them."""
    dist = params.target_distribution
    return ["--minor-class", params.minor_class, "--fraction", params.fraction, "--border", params.border,
            "--area-ratio", params.area_ratio, "--seed", params.seed,
            *(["--target-distribution", ",".join(f"{k}={v}" for k, v in dist.items())] if dist else [])]


def balance_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder of full-size training images."),
    out: Path = typer.Argument(..., help="Output dataset folder (must not exist or be empty)."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme for raw labels (consep, glysac, pannuke, YAML)."),
    minor_class: Optional[str] = MINOR_CLASS_OPTION,
    fraction: float = FRACTION_OPTION,
    border: float = BORDER_OPTION,
    area_ratio: float = AREA_RATIO_OPTION,
    target_distribution: list[str] = TARGET_DISTRIBUTION_OPTION,
    seed: int = SEED_OPTION,
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Balancing maps (GradMix labels, spec 6a); images are the originals, untouched."""
    from diffmix.data.io import read_dataset, write_dataset
    from diffmix.maps.balance import balance_dataset
    from diffmix.runs import check_output_folder

    check_output_folder(out)  # before the maps are computed, not at the write
    ds = read_dataset(dataset, scheme)
    params = balance_params(ds.scheme, minor_class, fraction, border, area_ratio, target_distribution, seed)
    samples, report = balance_dataset(ds.samples, params)
    cmd = _command("maps", "balance", dataset, out, *balance_words(params))
    provenance = dict(kind="balancing-maps", source=str(dataset), command=cmd, seed=seed,
                      params=report.params, report=report.to_json(), images="original")
    path = write_dataset(out, samples, ds.scheme, provenance, overwrite=overwrite)
    typer.echo(_summary("balancing maps", path, ds.scheme, report))

def enlarge_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder of full-size training images."),
    out: Path = typer.Argument(..., help="Output dataset folder of grid patches."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme for raw labels (consep, glysac, pannuke, YAML)."),
    patch: int = typer.Option(256, help="Patch size (spec 5: 256)."),
    stride: int = typer.Option(76, help="Grid stride (spec 5: 76)."),
    frame: int = typer.Option(32, help="Nuclei touching this border frame stay (spec 6b: 32)."),
    no_overlap: bool = typer.Option(
        False, "--no-overlap", help="Redraw shifts that would touch another nucleus (beyond the paper)."
    ),
    max_tries: int = typer.Option(10, help="Draws per nucleus in --no-overlap mode before it stays in place."),
    seed: int = typer.Option(0, help="Random seed: same seed, same bytes."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Enlarging maps (shifted nuclei, spec 6b) of every grid patch; images are the original patches."""
    from diffmix.data.io import read_dataset, write_dataset
    from diffmix.maps.enlarge import enlarge_dataset
    from diffmix.runs import check_output_folder

    check_output_folder(out)  # before the maps are computed, not at the write
    ds = read_dataset(dataset, scheme)
    samples = enlarge_dataset(ds.samples, patch=patch, stride=stride, seed=seed, no_overlap=no_overlap,
                              frame=frame, max_tries=max_tries)
    params = dict(patch=patch, stride=stride, frame=frame, shift_range=[-15, 14], keep_prob=0.3,
                  no_overlap=no_overlap, max_tries=max_tries, seed=seed)
    cmd = _command("maps", "enlarge", dataset, out, "--patch", patch, "--stride", stride, "--frame", frame,
                   "--no-overlap" if no_overlap else "", "--max-tries", max_tries, "--seed", seed)
    provenance = dict(kind="enlarging-maps", source=str(dataset), command=cmd, seed=seed, params=params,
                      images="original patches")
    path = write_dataset(out, samples, ds.scheme, provenance, overwrite=overwrite)
    typer.echo(f"enlarging maps: {len(samples)} patches of {len(ds)} images written to {path}")

def gradmix_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder of full-size training images."),
    out: Path = typer.Argument(..., help="Output dataset folder (GradMix images and labels)."),
    scheme: Optional[str] = typer.Option(None, help="Class scheme for raw labels (consep, glysac, pannuke, YAML)."),
    minor_class: Optional[str] = MINOR_CLASS_OPTION,
    fraction: float = FRACTION_OPTION,
    border: float = BORDER_OPTION,
    area_ratio: float = AREA_RATIO_OPTION,
    target_distribution: list[str] = TARGET_DISTRIBUTION_OPTION,
    seed: int = SEED_OPTION,
    inpaint: bool = typer.Option(True, help="Telea-inpaint each target first (original GradMix; off in the DiffMix copy)."),
    double_blend: bool = typer.Option(True, help="Apply the blend twice, as the official code does."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """GradMix baseline (spec 6a): balancing labels plus synthesised images."""
    from diffmix.data.io import read_dataset, write_dataset
    from diffmix.maps.gradmix import gradmix_dataset
    from diffmix.runs import check_output_folder

    check_output_folder(out)  # before the maps are computed, not at the write
    ds = read_dataset(dataset, scheme)
    params = balance_params(ds.scheme, minor_class, fraction, border, area_ratio, target_distribution, seed)
    samples, report = gradmix_dataset(ds.samples, params, inpaint=inpaint, double_blend=double_blend)
    cmd = _command("gradmix", dataset, out, *balance_words(params),
                   "--inpaint" if inpaint else "--no-inpaint",
                   "--double-blend" if double_blend else "--no-double-blend")
    provenance = dict(kind="gradmix", source=str(dataset), command=cmd, seed=seed, params=report.params,
                      report=report.to_json(), images="gradmix-synthesised")
    path = write_dataset(out, samples, ds.scheme, provenance, overwrite=overwrite)
    typer.echo(_summary("gradmix", path, ds.scheme, report))


def _summary(what: str, path: Path, scheme: ClassScheme, report: Any) -> str:
    before, after = report.class_counts_before, report.class_counts_after
    n = sum(after.values()) or 1
    lines = [f"{what}: {report.accepted_swaps} swaps over {len(report.per_image)} images, written to {path}"]
    for c in sorted(after):
        lines.append(f"  {c} {scheme.class_name(c):<16} {before.get(c, 0):>7} -> {after[c]:>7}  ({after[c] / n:.2%})")
    if report.requested:
        for c, p in report.requested.items():
            lines.append(f"  requested class {c} share {p:.2%}, achieved {report.achieved.get(c, 0.0):.2%}")
    lines.append(f"  pasted sources overwrote {report.overwritten_pixels} px of {report.overwritten_nuclei} other nuclei")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Attach the `maps` group (balance, enlarge) and the top-level `gradmix` to `app`."""
    add_group(app, "maps", "Custom label maps for DiffMix: balancing (GradMix labels) and enlarging (shifted nuclei).",
              {"balance": balance_cmd, "enlarge": enlarge_cmd})
    app.command("gradmix")(gradmix_cmd)
