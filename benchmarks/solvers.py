"""Benchmark: few-step solvers against the official DDIM-55, same start, on trained SDMs (JSON).

Issue 13 item 2. For each case (an SDM checkpoint, the dataset it was trained on, optionally a
segmenter trained on that real data) it makes the DiffMix-B synthetic set that `diffmix
synthesize --maps balance` makes, `--patches` grid patches spread over the images, once per
solver and guided-pass budget, all from the official start (t = 540 of 1000: `--steps 100
--start-fraction 0.55`) and the SAME per-patch start noise (seeds.patch_seed of run seed 0), and
reports per solver and budget:

- `mean_abs_diff_to_ddim55` / `psnr_to_ddim55`: grey levels (0-255) and PSNR of the uint8
  images against DDIM-55 from the same noise (the official sampler's output);
- `fidelity`: a real-data segmenter's PQ, type accuracy and F1 against the maps the patches
  were made for (`diffmix fidelity`), when a segmenter is given;
- `sharpness`: mean variance of the Laplacian of the grey patches (a focus measure: too few
  solver steps over-smooth, which label fidelity does not see);
- `seconds_per_patch`: the sampler alone (`diffmix_sample` on a batch of `--time-batch`
  patches, no I/O), and `wall_seconds_per_patch` of the whole synthesize call.

Run-to-run noise of DDIM-55: the reference is also made with run seeds 1 and 2 (other start
noise, the same balancing maps: `balance.seed` is pinned), giving the seed-to-seed image distance
and the fidelity and sharpness spreads (mean, sd) that a cheaper setting must stay within: a
row "matches" when PQ, Acc, F1_d and sharpness each lie within 2 sd of the reference mean (or
within its range when the sd is 0). `fewest_matching` is the row with the fewest passes that matches. With tens of
patches that flag mostly measures the segmenter's counting noise (docs/solvers.md): read it
with the image distances. `--spacings time,logsnr` runs every solver on both pass grids.

Without --case (`make bench`) it runs a smoke case in seconds: two toy tiles and an untrained,
randomised small U-Net (no segmenter), which exercises every path but measures nothing.

    python benchmarks/solvers.py --case name=demo,sdm=RUN/sdm/ckpt.safetensors,data=TOY_TRAIN,segmenter=SEG.safetensors,guidance=1.5,keep_unmarked=1 \
        [--case ...] [--patches 12] [--budgets 3,5,8,10,15,20,55] [--solvers ddim,dpmpp-2m,unipc] [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffmix.data.io import read_dataset
from diffmix.runs import atomic_write_text
from diffmix.sdm.settings import DEFAULTS, SOLVERS, SamplerSettings, fraction_text

METRICS = ("pq", "acc", "f1_d")  # label fidelity statistics a cheaper setting must match
IMAGE_METRICS = ("sharpness",)  # and image statistics (fidelity does not see blur)


def parse_case(text: str) -> dict[str, Any]:
    """`name=demo,sdm=...,data=...[,segmenter=...][,guidance=1.5][,scheme=consep][,keep_unmarked=1]`."""
    case: dict[str, Any] = dict(item.split("=", 1) for item in text.split(","))
    missing = {"name", "sdm", "data"} - set(case)
    if missing:
        raise SystemExit(f"--case {text!r}: missing {sorted(missing)}")
    case["guidance"] = float(case.get("guidance", DEFAULTS.guidance_scale))
    case["keep_unmarked"] = case.get("keep_unmarked", "0") in ("1", "true", "yes")
    return case


def _images(folder: Path) -> dict[str, np.ndarray]:
    ds = read_dataset(folder)
    return {s.name: s.image.astype(np.float64) for s in ds}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean |a - b| in grey levels and PSNR (dB, per patch, averaged) over the patches of both."""
    names = sorted(set(a) & set(b))
    mad = [float(np.abs(a[n] - b[n]).mean()) for n in names]
    mse = [float(((a[n] - b[n]) ** 2).mean()) for n in names]
    psnr = [10 * math.log10(255.0**2 / m) for m in mse if m > 0]
    # identical images have no PSNR: None (strict JSON has no Infinity)
    return {"mean_abs_diff": round(statistics.fmean(mad), 3),
            "psnr": round(statistics.fmean(psnr), 2) if len(psnr) == len(mse) else None}


def _sharpness(images: dict[str, np.ndarray]) -> float:
    """Mean over patches of the variance of the Laplacian of the grey image (a standard focus
    measure): an ODE solver integrated in too few steps returns over-smoothed images, which a
    segmenter scored against the label maps may not notice."""
    from scipy import ndimage

    values = [float(ndimage.laplace(im.mean(axis=-1)).var()) for im in images.values()]
    return round(statistics.fmean(values), 3)


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _fidelity(folder: Path, case: dict[str, Any]) -> dict[str, Any] | None:
    if not case.get("segmenter"):
        return None
    from diffmix.fidelity import label_fidelity

    res = label_fidelity(folder, case["segmenter"], device="cpu", batch_size=8, progress=False,
                         keep_unmarked=case["keep_unmarked"])
    out = {k: round(float(res[k]), 4) for k in ("pq", "dq", "sq", "dice", "aji", "acc", "f1_d")}
    out["f1"] = {str(k): round(float(v), 4) for k, v in res["f1"].items()}
    return out


def _sampler_seconds(model, diffusion, batch, settings: SamplerSettings) -> float:
    """Seconds per patch of the sampler alone on one batch (y0, cond, noise)."""
    from diffmix.sdm.sampler import diffmix_sample

    y0, cond, noise = batch
    with torch.inference_mode():
        t0 = time.perf_counter()
        diffmix_sample(model, y0, cond, settings, noise=noise, diffusion=diffusion)
        return (time.perf_counter() - t0) / y0.shape[0]


def _timing_batch(folder: Path, n: int):
    """y0 / label maps / noise of the first n patches of a synthetic folder (content does not
    change the cost; shapes and the label pair do)."""
    from diffmix.maps.conditioning import condition_batch
    from diffmix.sdm.data import stack_samples

    ds = read_dataset(folder)
    y0, inst, types = stack_samples(ds.samples[:n])
    cond = condition_batch(inst, types, ds.scheme.num_classes)
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0))
    return y0.contiguous(), cond, noise


def run_case(case: dict[str, Any], args: argparse.Namespace, work: Path,
             partial: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """One case's reference and rows; `partial(result)` after each row, so a long run that is
    stopped keeps what it measured (with `--work`, a re-run resumes the reference sets)."""
    from diffmix.sdm.convert import load_sdm
    from diffmix.sdm.solvers import sampling_schedule
    from diffmix.synth import synthesize

    data = read_dataset(case["data"], case.get("scheme"))
    base = SamplerSettings(steps=args.steps, start_fraction=args.start_fraction, guidance_scale=case["guidance"])
    model, diffusion = load_sdm(case["sdm"], "cpu")
    t_start = sampling_schedule(diffusion, base).timesteps[0]

    def make(tag: str, settings: SamplerSettings, seed: int) -> tuple[Path, float]:
        out = work / case["name"] / tag
        rep = synthesize(data, case["sdm"], out, maps="balance", patch=args.patch, stride=args.patch, sampler=settings,
                         batch_size=args.batch_size, seed=seed, device="cpu", max_patches=args.patches,
                         progress=False, balance_kwargs={"seed": 0})
        return out, rep.seconds / max(rep.n_written, 1)

    print(f"[{case['name']}] DDIM-55 references", file=sys.stderr, flush=True)
    refs = [make(f"ddim55_seed{s}", base, s) for s in range(args.reference_seeds)]
    ref_images = [_images(p) for p, _ in refs]
    timing = _timing_batch(refs[0][0], args.time_batch)
    ref_fid = [_fidelity(p, case) for p, _ in refs]
    result: dict[str, Any] = {
        "name": case["name"], "sdm": str(case["sdm"]), "data": str(case["data"]),
        "segmenter": case.get("segmenter"), "guidance_scale": case["guidance"], "start_t": int(t_start),
        "patches": len(ref_images[0]), "patch": args.patch, "maps": "balance",
        "reference": {
            "solver": "ddim", "passes": base.num_passes,
            "seconds_per_patch": round(_sampler_seconds(model, diffusion, timing, base), 4),
            "wall_seconds_per_patch": round(refs[0][1], 4),
            "seed_to_seed": [_distance(ref_images[0], im) for im in ref_images[1:]],
            "fidelity_per_seed": ref_fid,
            "sharpness_per_seed": [_sharpness(im) for im in ref_images],
        },
        "rows": [],
    }
    if ref_fid[0] is not None:
        result["reference"]["fidelity_spread"] = {m: _spread([f[m] for f in ref_fid]) for m in METRICS}
    result["reference"]["sharpness_spread"] = _spread(result["reference"]["sharpness_per_seed"])

    rows = [(solver, spacing, passes) for solver in args.solvers for spacing in (args.spacings or [None])
            for passes in args.budgets]
    for solver, spacing, passes in rows:
        settings = SamplerSettings(steps=args.steps, start_fraction=args.start_fraction,
                                   guidance_scale=case["guidance"], solver=solver, passes=passes, spacing=spacing)
        row: dict[str, Any] = {"solver": solver, "passes": passes, "spacing": settings.spacing}
        if solver == "ddim" and settings.spacing == "time" and passes == base.num_passes:  # the reference itself
            row.update(seconds_per_patch=result["reference"]["seconds_per_patch"],
                       wall_seconds_per_patch=result["reference"]["wall_seconds_per_patch"],
                       mean_abs_diff_to_ddim55=0.0, psnr_to_ddim55=None, fidelity=ref_fid[0],
                       sharpness=result["reference"]["sharpness_per_seed"][0])
            folder = None
        else:
            print(f"[{case['name']}] {solver} {settings.spacing} {passes} passes", file=sys.stderr, flush=True)
            folder, wall = make(f"{solver}_{settings.spacing}_{passes}", settings, 0)
            images = _images(folder)
            row.update(seconds_per_patch=round(_sampler_seconds(model, diffusion, timing, settings), 4),
                       wall_seconds_per_patch=round(wall, 4),
                       **{f"{k}_to_ddim55": v for k, v in _distance(ref_images[0], images).items()},
                       fidelity=_fidelity(folder, case), sharpness=_sharpness(images))
        row["sharpness_within_reference"] = _within(row["sharpness"], result["reference"]["sharpness_spread"])
        if "fidelity_spread" in result["reference"]:
            row["fidelity_within_reference"] = all(
                _within(row["fidelity"][m], result["reference"]["fidelity_spread"][m]) for m in METRICS)
            row["matches_reference"] = row["fidelity_within_reference"] and row["sharpness_within_reference"]
        result["rows"].append(row)
        partial(result)
        if folder is not None:
            shutil.rmtree(folder)
    matching = [r for r in result["rows"] if r.get("matches_reference")]
    if matching:
        best = min(matching, key=lambda r: (r["passes"], r["mean_abs_diff_to_ddim55"]))
        result["fewest_matching"] = {k: best[k] for k in ("solver", "passes", "spacing", "seconds_per_patch",
                                                          "mean_abs_diff_to_ddim55")}
        result["fewest_matching"]["speedup_vs_ddim55"] = round(
            result["reference"]["seconds_per_patch"] / best["seconds_per_patch"], 2)
    return result


def smoke_case(work: Path) -> dict[str, Any]:
    """Toy tiles and a randomised small SDM U-Net saved as a checkpoint: the no-argument run."""
    from diffmix.data.io import write_dataset
    from diffmix.data.schemes import CONSEP
    from diffmix.data.toy import generate_toy_samples
    from diffmix.checkpoints import save_checkpoint
    from diffmix.sdm.unet import UNetConfig, build_unet

    data = work / "toy"
    if not data.exists():  # a --work folder keeps it from an earlier run (same seed, same data)
        write_dataset(data, generate_toy_samples(2, 64, 0), CONSEP.merged(), {"generator": "solvers smoke"})
    cfg = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                     num_head_channels=32, label_nc=6)
    torch.manual_seed(0)
    model = build_unet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    ckpt = work / "random.safetensors"
    save_checkpoint(ckpt, {"model": model.state_dict()}, {"unet_config": cfg.model_dump(mode="json")})
    return {"name": "smoke (untrained U-Net, toy tiles)", "sdm": str(ckpt), "data": str(data), "guidance": 1.5,
            "keep_unmarked": False}


def _within(value: float, spread: dict[str, float]) -> bool:
    if spread["sd"] > 0:
        return abs(value - spread["mean"]) <= 2 * spread["sd"]
    return spread["min"] <= value <= spread["max"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=None, type=parse_case,
                    help="name=...,sdm=CKPT,data=DATASET[,segmenter=CKPT][,guidance=S][,scheme=NAME][,keep_unmarked=1]")
    ap.add_argument("--patches", type=int, default=12, help="grid patches per set, spread over the images")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=DEFAULTS.steps, help="with --start-fraction: the start time (official: 100)")
    ap.add_argument("--start-fraction", default=fraction_text(DEFAULTS.start_fraction))
    ap.add_argument("--budgets", default="3,5,8,10,15,20,55", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--solvers", default=",".join(SOLVERS), type=lambda s: s.split(","))
    ap.add_argument("--spacings", default=None, type=lambda s: s.split(","),
                    help="grids to try for every solver (default: each solver's own, SamplerSettings.spacing)")
    ap.add_argument("--reference-seeds", type=int, default=3, help="DDIM-55 runs with other start noise")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--time-batch", type=int, default=2, help="patches in the sampler-only timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here (rewritten after every row)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the synthetic sets here (default: a temporary folder); a re-run resumes the DDIM-55 references")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"benchmark": "solvers", "threads": torch.get_num_threads(),
              "start": {"steps": args.steps, "start_fraction": args.start_fraction},
              "budgets": args.budgets, "cases": []}

    def write(partial_case: dict[str, Any] | None = None) -> None:
        if args.out is not None:
            cases = report["cases"] + ([partial_case] if partial_case is not None else [])
            atomic_write_text(args.out, json.dumps({**report, "cases": cases}, indent=1) + "\n")

    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diffmix-solvers-")))
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        if args.case is None:  # `make bench`: a seconds-long smoke run of every path
            args.case = [smoke_case(work)]
            args.patches, args.budgets, args.reference_seeds, args.patch = 2, [3, 5], 2, 32
            report["budgets"] = args.budgets
        for case in args.case:
            report["cases"].append(run_case(case, args, work, partial=write))
    write()
    text = json.dumps(report, indent=1)
    print(text)


if __name__ == "__main__":
    main()
