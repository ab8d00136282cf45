"""GPU check: the paper-size SDM on one accelerator, in under five minutes, as one JSON file.

For a session that is lent a GPU (issue 13 item 4): one script that measures what the paper
configuration (`paper-consep` preset: 652,256,518 parameters, 256-px crops, batch 16) costs on
the device, in bf16 autocast and in fp32:

- training: seconds per `diffmix.sdm.train.train_step` + EMA update (what `train_sdm` runs per
  step), for the preset's checkpointing (`use_checkpoint: true`, as the authors train) and, in
  bf16, `selective` and none; peak memory; an out-of-memory batch is recorded and halved;
- synthesis: patches/s of `diffmix_sample` per solver (default: every solver the sampler offers,
  `diffmix.sdm.settings.SOLVERS`) at its number of guided passes (DDIM: the official 55;
  others `--passes`); peak memory;
- FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (one training step as executed,
  recomputation included; the model FLOPs 3 x forward; one and two guided passes), achieved
  FLOP/s and its fraction of the device's dense peak from a small datasheet table (`PEAK_TFLOPS`;
  "unknown" for other devices). In fp32 the convolutions run as TF32 when
  `torch.backends.cudnn.allow_tf32` is on (torch's default), so that peak is used and said.

A time budget (`--budget-s`, default 270 s) is checked before every measurement: what would not
fit is recorded as skipped, never started; the JSON is rewritten after every measurement, so a
run killed from outside still leaves what it measured. Without CUDA the same code runs at a
tiny size on the CPU (`--size tiny`; what the test suite runs).

On a lent H200 (the device tool; its image has torch but not pydantic): carry wheels of
pydantic, pydantic-core, annotated-types and typing-inspection for CPython 3.12 in `.whl`, then

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

    python benchmarks/gpu_check.py [--size auto|paper|tiny] [--solvers ddim,dpmpp-2m,unipc]
        [--passes 10] [--dtypes bf16,fp32] [--budget-s 270] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffmix.sdm.diffusion import GaussianDiffusion
from diffmix.sdm.sampler import diffmix_sample
from diffmix.sdm.settings import SOLVERS, SamplerSettings
from diffmix.sdm.train import ema_update, make_optimizer, resolve_train_config, train_step
from diffmix.sdm.unet import UNetConfig, UNetModel, count_parameters

# Dense (no sparsity) datasheet peaks in TFLOP/s per device; matched by substring of the CUDA
# device name, first match wins (so "H100 PCIe" before "H100"). "tf32" is the tensor-core rate
# fp32 convolutions get under cudnn.allow_tf32, "fp32" the plain CUDA-core rate.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.2, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
)

DTYPES = {"bf16": torch.bfloat16, "fp32": None}

# The tiny CPU size: every block kind of the SDM U-Net (plain, SPADE, up/down, attention, skip
# convs) at 16 px, checkpointed like the paper preset, so the whole check runs in seconds.
TINY = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_head_channels=32, label_nc=6, use_checkpoint=True)


def mode_name(mode: bool | str) -> str:
    """The report's name of a `use_checkpoint` value."""
    return {True: "full", False: "none"}.get(mode, str(mode))  # type: ignore[arg-type]


def peak_tflops(name: str) -> dict[str, float] | str:
    """The datasheet peaks of a device by name, or "unknown"."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return dict(peaks)
    return "unknown"


class OutOfTime(Exception):
    """The hard stop: the budget plus a margin has passed (SIGALRM)."""


class Budget:
    """Seconds left until the deadline; measurements ask before they start."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Device:
    """Synchronisation, timing and peak memory of one device (CUDA or the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """Peak memory allocated since `reset_peak` (CUDA); None on the CPU (no per-phase peak)."""
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def describe_device(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": dev.type, "torch": torch.__version__}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_gib=round(props.total_memory / 2**30, 2),
                    multiprocessors=props.multi_processor_count,
                    cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                    matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
        info["peak_tflops"] = peak_tflops(props.name)
    else:
        info.update(name="cpu", threads=torch.get_num_threads(), peak_tflops="unknown")
    return info


def _peak_for(device_info: dict, dtype: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s, which one) for a dtype: bf16; fp32 uses the TF32 rate when cuDNN may."""
    peaks = device_info.get("peak_tflops")
    if not isinstance(peaks, dict):
        return None, None
    if dtype == "bf16":
        return peaks["bf16"] * 1e12, "bf16"
    key = "tf32" if device_info.get("cudnn_allow_tf32") else "fp32"
    return peaks[key] * 1e12, key


def _rates(flops: float | None, seconds: float, device_info: dict, dtype: str) -> dict[str, Any]:
    if flops is None or seconds <= 0:
        return {}
    peak, which = _peak_for(device_info, dtype)
    out: dict[str, Any] = {"achieved_tflops": round(flops / seconds / 1e12, 3)}
    if peak:
        out.update(fraction_of_peak=round(flops / seconds / peak, 4), peak_used=which)
    return out


def randomised_model(config: UNetConfig, dev: torch.device, seed: int) -> UNetModel:
    """The U-Net built on the device with every weight perturbed: zero-initialised output convs
    would make the network output exactly 0, and GPUs run measurably faster on zeros."""
    torch.manual_seed(seed)
    with torch.device(dev):
        model = UNetModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def make_batch(b: int, size: int, label_nc: int, dev: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """x0 in [-1, 1], schedule indices t, noise, a one-hot + edge label map; on the device."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    cls = torch.randint(0, label_nc - 1, (b, size, size), generator=gen)
    edges = (torch.rand(b, 1, size, size, generator=gen) < 0.1).float()
    cond = torch.cat([F.one_hot(cls, label_nc - 1).permute(0, 3, 1, 2).float(), edges], 1)
    return tuple(v.to(dev) for v in (x0, t, noise, cond))


class Check:
    """The measurements, the budget and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        want_cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
        if args.device == "cuda" and not want_cuda:
            raise SystemExit("--device cuda: CUDA is not available")
        self.dev = torch.device("cuda" if want_cuda else "cpu")
        self.d = Device(self.dev)
        self.size = args.size if args.size != "auto" else ("paper" if want_cuda else "tiny")
        if self.size == "paper":
            preset = resolve_train_config("paper-consep", None, 4)
            self.config, self.crop = preset.unet, preset.crop_size
            self.train_batch = args.train_batch or preset.batch_size
            self.sample_batch = args.sample_batch or 8
        else:
            self.config, self.crop = TINY, TINY.image_size
            self.train_batch = args.train_batch or 2
            self.sample_batch = args.sample_batch or 2
        self.budget = Budget(args.budget_s)
        self.device_info = describe_device(self.dev)
        self.report: dict[str, Any] = {
            "check": "sdm gpu check",
            "device": self.device_info,
            "size": self.size,
            "config": self.config.model_dump(mode="json"),
            "parameters": None,
            "crop_size": self.crop,
            "budget_s": args.budget_s,
            "train": {},
            "sample": {},
            "flops": {},
            "skipped": [],
            "errors": [],
            "complete": False,
        }
        self.model: UNetModel | None = None
        self.unit_seconds: dict[str, float] = {}  # measured costs that size the later estimates
        self._forward_flops: dict[int, int] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def write(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.report["process_max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(self.report, indent=1))
            os.replace(tmp, out)

    def fits(self, name: str, estimate: float) -> bool:
        """Whether `estimate` seconds fit in what is left; records a skip when not."""
        if estimate <= self.budget.left():
            return True
        self.report["skipped"].append({"what": name, "estimated_s": round(estimate, 1),
                                       "left_s": round(self.budget.left(), 1), "why": "time budget"})
        return False

    def guarded(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement: an out-of-memory becomes a record, another error a record in
        `errors` (the rest of the check still runs); the JSON is rewritten either way."""
        result: dict[str, Any]
        try:
            result = fn()
        except OutOfTime:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is data for the report
            if _is_oom(exc):
                result = {"error": "out of memory", "message": str(exc).splitlines()[0][:300]}
            else:
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                self.report["errors"].append({"what": name, **result})
        self.d.free()
        self.d.reset_peak()
        return result

    # -- the pieces --------------------------------------------------------------------------
    def build(self) -> None:
        self.model = randomised_model(self.config, self.dev, self.args.seed)
        self.report["parameters"] = count_parameters(self.model)
        self.write()

    def forward_flops(self, batch: int) -> int:
        """FLOPs of one forward at `batch` (FlopCounterMode, no grad; counted once per batch)."""
        if batch not in self._forward_flops:
            x0, t, noise, cond = make_batch(batch, self.crop, self.config.label_nc, self.dev, self.args.seed)
            self.model.eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.model(x0, t, cond)
            self._forward_flops[batch] = counter.get_total_flops()
        return self._forward_flops[batch]

    def train(self, dtype: str, mode: bool | str, batch: int) -> dict[str, Any]:
        """Seconds per training step at `batch` (halved on out-of-memory, at most twice)."""
        record: dict[str, Any] = {"oom_at_batch": []}
        while True:
            result = self.guarded(f"train {dtype} {mode} batch {batch}", lambda: self._train_once(dtype, mode, batch))
            self.model.zero_grad(set_to_none=True)  # a failed step may have left gradients
            self.model.set_checkpointing(self.config.use_checkpoint)
            if result.get("error") == "out of memory" and batch > 1 and len(record["oom_at_batch"]) < 2:
                record["oom_at_batch"].append(batch)
                batch //= 2
                continue
            if result.get("error") == "out of memory":
                record["oom_at_batch"].append(batch)
            record.update(result)
            return record

    def _train_once(self, dtype: str, mode: bool | str, batch: int) -> dict[str, Any]:
        model = self.model
        model.train()
        model.set_checkpointing(mode)
        amp = DTYPES[dtype]
        diffusion = GaussianDiffusion.linear()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = make_optimizer(model.parameters(), 1e-4, 0.0)
        x0, t, noise, cond = make_batch(batch, self.crop, self.config.label_nc, self.dev, self.args.seed)

        def step() -> list[float]:
            stats, ok = train_step(model, opt, diffusion, x0, t, noise, cond, amp_dtype=amp)
            if ok:
                ema_update(ema, model, 0.9999)
            return stats.tolist()

        self.d.reset_peak()
        first, _ = self.d.timed(step)  # warm-up: allocator, cuDNN plans
        repeats = max(1, min(self.args.repeats, int((self.budget.left() - self.reserve()) / max(first, 1e-3))))
        times, stats = [], None
        for _ in range(repeats):
            seconds, stats = self.d.timed(step)
            times.append(seconds)
        per_step = sorted(times)[len(times) // 2]
        peak = self.d.peak_gib()
        with FlopCounterMode(display=False) as counter:  # one more step, counted as it executes
            step()
        executed = counter.get_total_flops()
        del ema, opt
        model.zero_grad(set_to_none=True)
        model.set_checkpointing(self.config.use_checkpoint)
        model_flops = 3 * self.forward_flops(batch)  # forward + backward (2x), no recomputation
        self.unit_seconds[f"train {dtype}"] = first
        out = {
            "batch": batch,
            "use_checkpoint": mode_name(mode),
            "steps_timed": len(times),
            "warmup_step_s": round(first, 6),
            "seconds_per_step": round(per_step, 6),
            "steps_per_s": round(1 / per_step, 4),
            "samples_per_s": round(batch / per_step, 3),
            "peak_memory_gib": peak,
            "loss": [round(v, 5) for v in stats],
            "executed_flops_per_step": executed,
            "model_flops_per_step": model_flops,
            # executed / (3 x forward) - 1: recomputation adds; the backward skips the input
            # gradients of the stem and label convs, so without checkpointing it is slightly < 0
            "executed_vs_model_flops": round(executed / model_flops - 1, 4) if model_flops else None,
        }
        out.update(_rates(executed, per_step, self.device_info, dtype))
        model_rates = _rates(model_flops, per_step, self.device_info, dtype)
        if model_rates:
            out["model_tflops"] = model_rates["achieved_tflops"]
            if "fraction_of_peak" in model_rates:
                out["model_flops_utilisation"] = model_rates["fraction_of_peak"]
        return out

    def pass_flops(self) -> dict[str, Any]:
        """FLOPs of a sampling run of one and of two guided passes: the first pass also computes
        the label map's SPADE modulations, later ones reuse them."""
        self.model.eval()
        x0, _, noise, cond = make_batch(self.sample_batch, self.crop, self.config.label_nc, self.dev, self.args.seed)
        flops = []
        for passes in (1, 2):
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                diffmix_sample(self.model, x0, cond, SamplerSettings(passes=passes), noise=noise)
            flops.append(counter.get_total_flops())
        return {"patches": self.sample_batch, "first_pass": flops[0], "per_later_pass": flops[1] - flops[0]}

    def run_flops(self, passes: int) -> int | None:
        f = self.report["flops"].get("sampling")
        if not isinstance(f, dict) or "first_pass" not in f:
            return None
        return f["first_pass"] + (passes - 1) * f["per_later_pass"]

    def passes_for(self, solver: str) -> int | None:
        """Passes per patch: DDIM the official run (None: 55 of ddim100 from 0.55) unless
        --ddim-passes, the other solvers --passes."""
        if solver == "ddim":
            return self.args.ddim_passes or None
        return self.args.passes

    def sample(self, dtype: str, solver: str) -> dict[str, Any]:
        model = self.model
        model.eval()
        amp = DTYPES[dtype]
        x0, _, noise, cond = make_batch(self.sample_batch, self.crop, self.config.label_nc, self.dev, self.args.seed)
        settings = SamplerSettings(solver=solver, passes=self.passes_for(solver))

        def run() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(self.dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                return diffmix_sample(model, x0, cond, settings, noise=noise)

        self.d.reset_peak()
        seconds, out = self.d.timed(run)
        finite = bool(torch.isfinite(out).all())
        flops = self.run_flops(settings.num_passes)
        result = {
            "patches": self.sample_batch,
            "passes": settings.num_passes,
            "seconds": round(seconds, 6),
            "seconds_per_pass": round(seconds / settings.num_passes, 7),
            "patches_per_s": round(self.sample_batch / seconds, 4),
            "peak_memory_gib": self.d.peak_gib(),
            "output_finite": finite,
            "flops": flops,
        }
        result.update(_rates(flops, seconds, self.device_info, dtype))
        self.unit_seconds[f"pass {dtype}"] = seconds / settings.num_passes
        return result

    def reserve(self) -> float:
        """Seconds kept back for what follows the current measurement (a rough share)."""
        return 0.1 * self.args.budget_s

    def warm_sampler(self, dtype: str) -> None:
        """One single-pass run: kernel selection and allocations out of the timed runs."""
        model = self.model
        model.eval()
        amp = DTYPES[dtype]
        x0, _, noise, cond = make_batch(self.sample_batch, self.crop, self.config.label_nc, self.dev, self.args.seed)
        seconds, _ = self.d.timed(lambda: self._one_pass(model, x0, cond, noise, amp))
        self.unit_seconds.setdefault(f"pass {dtype}", seconds)

    def _one_pass(self, model, x0, cond, noise, amp) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(self.dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            return diffmix_sample(model, x0, cond, SamplerSettings(passes=1), noise=noise)

    # -- the plan ------------------------------------------------------------------------------
    def estimate_train(self, dtype: str) -> float:
        """Warm-up + repeats + counted step + forward, from what was measured so far."""
        unit = self.unit_seconds.get(f"train {dtype}")
        if unit is None:
            unit = 3 * self.unit_seconds.get("train bf16", 0.0) if dtype == "fp32" else 0.0
        return unit * (self.args.repeats + 3)

    def estimate_sample(self, dtype: str, solver: str) -> float:
        unit = self.unit_seconds.get(f"pass {dtype}")
        if unit is None:
            unit = 3 * self.unit_seconds.get("pass bf16", 0.0) if dtype == "fp32" else 0.0
        return unit * SamplerSettings(solver=solver, passes=self.passes_for(solver)).num_passes

    def run(self) -> dict[str, Any]:
        args = self.args
        self.build()
        self.report["flops"]["forward_per_sample"] = self.guarded("forward flops", lambda: {"flops": self.forward_flops(1)})
        self.report["flops"]["sampling"] = self.guarded("pass flops", self.pass_flops)
        self.write()
        modes: dict[str, list[bool | str]] = {
            "bf16": [self.config.use_checkpoint, "selective", False],
            "fp32": [self.config.use_checkpoint],
        }
        # Most important first: bf16 at the preset's checkpointing, bf16 synthesis, fp32, then
        # the other checkpointing modes (each skipped when the budget says so).
        plan: list[Callable[[], None]] = []
        for dtype in args.dtypes:
            plan.append(lambda d=dtype: self._train_into(d, self.config.use_checkpoint))
            plan.append(lambda d=dtype: self._sample_into(d))
        for dtype in args.dtypes:
            for mode in dict.fromkeys(modes[dtype]):
                if mode != self.config.use_checkpoint:
                    plan.append(lambda d=dtype, m=mode: self._train_into(d, m))
        for action in plan:
            action()
            self.write()
        self.report["complete"] = not self.report["skipped"] and not self.report["errors"]
        self.write()
        return self.report

    def _train_into(self, dtype: str, mode: bool | str) -> None:
        name = f"train {dtype} checkpoint {mode_name(mode)}"
        if not self.fits(name, self.estimate_train(dtype)):
            return
        self.report["train"].setdefault(dtype, {})[mode_name(mode)] = self.train(dtype, mode, self.train_batch)

    def _sample_into(self, dtype: str) -> None:
        if not self.fits(f"sample {dtype} warm-up", self.unit_seconds.get(f"pass {dtype}", 0.0)):
            return
        warm = self.guarded(f"sample {dtype} warm-up", lambda: self.warm_sampler(dtype) or {})
        if "error" in warm:
            self.report["sample"].setdefault(dtype, {})["warm-up"] = warm
            return
        for solver in self.args.solvers:
            name = f"sample {dtype} {solver}"
            if self.fits(name, self.estimate_sample(dtype, solver)):
                self.report["sample"].setdefault(dtype, {})[solver] = self.guarded(name, lambda s=solver: self.sample(dtype, s))
                self.write()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("auto", "paper", "tiny"), default="auto",
                    help="auto: the paper config on CUDA, the tiny one on the CPU")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--solvers", default=",".join(SOLVERS),
                    help=f"comma-separated; default every solver of the sampler ({','.join(SOLVERS)})")
    ap.add_argument("--passes", type=int, default=10, help="guided passes per patch of the solvers other than DDIM")
    ap.add_argument("--ddim-passes", type=int, default=0, help="0: the official run (55 of ddim100 from 0.55)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--train-batch", type=int, default=0, help="0: the preset's (16 paper, 2 tiny)")
    ap.add_argument("--sample-batch", type=int, default=0, help="0: 8 paper, 2 tiny")
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per setting (at most)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="no measurement starts that would end after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (rewritten after every measurement)")
    args = ap.parse_args(argv)
    args.solvers = [s for s in args.solvers.split(",") if s]
    unknown = [s for s in args.solvers if s not in SOLVERS]
    if unknown:
        ap.error(f"unknown solver(s) {unknown}; the sampler offers {list(SOLVERS)}")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if any(d not in DTYPES for d in args.dtypes):
        ap.error(f"--dtypes takes {list(DTYPES)}")
    if args.passes < 1 or args.ddim_passes < 0 or args.repeats < 1 or args.budget_s <= 0:
        ap.error("--passes and --repeats must be >= 1, --ddim-passes >= 0 and --budget-s > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check = Check(args)

    def hard_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise OutOfTime()

    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:  # the backstop: a measurement that overruns its estimate by far
        signal.signal(signal.SIGALRM, hard_stop)
        signal.alarm(int(args.budget_s + 30))
    try:
        report = check.run()
    except OutOfTime:
        check.report["errors"].append({"what": "hard stop", "error": f"budget {args.budget_s} s + 30 s passed"})
        check.write()
        report = check.report
    finally:
        if use_alarm:
            signal.alarm(0)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if not report["errors"] else 1)
