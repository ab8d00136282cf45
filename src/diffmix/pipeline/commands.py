"""`diffmix experiment` and `diffmix demo`: the five-arm experiment from a config, and the demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from diffmix.errors import ConfigError
from diffmix.pipeline.report import ARM_LABELS


def rare_class_summary(results: dict[str, Any]) -> list[str]:
    """Per downstream network, one line per arm: the rare (minor) class F1, mean ± std over
    runs, PQ and Acc; then the paired differences with their 95% intervals."""
    from diffmix.data.schemes import ClassScheme
    from diffmix.pipeline.report import network_blocks
    from diffmix.stats import format_interval

    scheme = ClassScheme.from_json(results["scheme"])
    key = f"f1_{scheme.minor_class}"
    lines = []
    blocks = network_blocks(results)
    for title, block in blocks:
        if len(blocks) > 1:
            lines.append(f"{title}:")
        for arm, r in block["arms"].items():
            m, s = r["summary"]["mean"], r["summary"]["std"]
            lines.append(
                f"{ARM_LABELS.get(arm, arm):<10} F {scheme.class_name(scheme.minor_class)} "
                f"{m.get(key, float('nan')):.3f} ± {s.get(key, 0.0):.3f}   PQ {m['pq']:.3f}   Acc {m['acc']:.3f}"
            )
        iv = block.get("intervals") or {}
        for pair, d in iv.get("differences", {}).items():
            a, b = pair.split(" - ")
            parts = []
            for metric in iv["metrics"]:
                name = "F " + scheme.class_name(scheme.minor_class) if metric.startswith("f1_") else metric.upper()
                parts.append(f"{name} {format_interval(d[metric], signed=True)}")
            lines.append(f"{ARM_LABELS.get(a, a)} − {ARM_LABELS.get(b, b)}: " + "   ".join(parts) + "  (95% CI)")
    return lines


def run_demo(
    out: Path, *, data: Path | None = None, scheme: str | None = None, device: str | None = None,
    seed: int = 0, progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The `demo` experiment preset on the built-in toy data, or on a user's dataset folder."""
    from diffmix.pipeline.experiment import load_experiment_config, run_experiment

    overrides: dict[str, Any] = {"seed": seed}
    if data is not None:
        overrides["data"] = {"train": str(data), "scheme": scheme, "toy": None}
    elif scheme is not None:
        raise ConfigError("--scheme goes with --data (the toy data uses merged CoNSeP classes)")
    cfg = load_experiment_config("demo", overrides)
    return run_experiment(cfg, out, device=device, progress=progress)


def register(app: typer.Typer) -> None:
    """Add `experiment` and `demo` to the main `diffmix` app."""

    @app.command("experiment")
    def experiment_cmd(
        config: str = typer.Argument(..., help="Experiment YAML, or a preset: demo, paper-consep, paper-glysac."),
        out: Path = typer.Argument(..., help="Run folder; re-running on it does only what is missing."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        quiet: bool = typer.Option(False, help="No progress bars."),
    ) -> None:
        """The paper's five arms (baseline, GradMix, DiffMix-B, DiffMix-E, DiffMix) over k folds -> report."""
        from diffmix.pipeline.experiment import load_experiment_config, run_experiment

        t0 = time.perf_counter()
        results, paths = run_experiment(load_experiment_config(config), out, device=device, progress=not quiet)
        typer.echo("\n".join(rare_class_summary(results)))
        typer.echo(f"report: {paths['html']} ({time.perf_counter() - t0:.0f} s)")

    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo_run"), help="Run folder (re-running resumes)."),
        data: Optional[Path] = typer.Option(None, help="Run on this dataset folder instead of the toy data."),
        scheme: Optional[str] = typer.Option(None, help="Class scheme of --data (consep, glysac, pannuke, YAML)."),
        device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda if available)."),
        seed: int = typer.Option(0, help="Seed of every stage."),
        quiet: bool = typer.Option(False, help="No progress bars."),
    ) -> None:
        """Toy data -> cpu-tiny SDM -> maps -> synthesis -> five arms -> report, on a laptop CPU."""
        t0 = time.perf_counter()
        results, paths = run_demo(out, data=data, scheme=scheme, device=device, seed=seed, progress=not quiet)
        typer.echo("")
        typer.echo("\n".join(rare_class_summary(results)))
        if data is None:
            from diffmix.pipeline.experiment import TOY_CAVEAT

            typer.echo(TOY_CAVEAT)
        typer.echo(f"report: {paths['html'].resolve()} ({time.perf_counter() - t0:.0f} s)")
