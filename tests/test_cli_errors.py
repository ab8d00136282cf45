"""Hostile inputs through the real CLI: every user mistake ends in one `error:` line and exit 2.

Each case runs `python -m diffmix ...` in a subprocess, as a user would, and checks the
contract of design.md: exit code 2, exactly one line on stderr, starting `error: ` and naming
the file or option at fault, no traceback, and nothing written where the output would go (no
half-made run folder that the corrected command would then refuse as "a different run").
The inputs are tiny (96-px toy tiles, a one-level U-Net, a 4-channel segmenter) so the whole
suite is bounded by interpreter start-up, about 3 s a case on 2 shared cores; the cases run
concurrently, one per core (`ran`).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml

from diffmix.checkpoints import save_checkpoint
from diffmix.data.io import write_dataset
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP
from diffmix.data.toy import generate_toy_samples
from diffmix.sdm.unet import UNetConfig, build_unet

REPO = Path(__file__).resolve().parents[1]
SCHEME = CONSEP.merged()
BIG_ID = 2**31 - 1
SEG_TINY = {
    "model": {"arch": "small", "width": 4, "depth": 2},
    "patch_size": 32,
    "phase1_epochs": 1,
    "phase2_epochs": 1,
    "batch_size": 4,
    "batch_size_phase2": 4,
    "samples_per_epoch": 8,
}
SDM_TINY = {
    "unet": {"image_size": 32, "model_channels": 32, "channel_mult": [1], "num_res_blocks": 1,
             "attention_resolutions": [], "num_head_channels": 32},
    "crop_size": 32, "batch_size": 2, "phase1_steps": 2, "phase2_steps": 1, "checkpoint_every": 1,
    "sample_every": 0, "diffusion_steps": 20, "sample_steps": 10,
}


def diffmix(*args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m diffmix ARGS` with one thread, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "diffmix", *[str(a) for a in args]],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one stderr line `error: ...` holding every needle, no traceback; returns the line."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _tree(path: Path) -> dict[str, int]:
    """Every file under `path` with its size (to see that a failed command wrote nothing)."""
    if path.is_file():
        return {".": path.stat().st_size}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """The shared inputs of every case, made in-process (seconds), read-only afterwards."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    p: dict[str, Path] = {"root": root}
    samples = generate_toy_samples(n_images=2, size=96, seed=1, rare_fraction=0.15, density=12.0)
    p["toy"] = write_dataset(root / "toy", samples, SCHEME, provenance={"test": "hostile"})

    # 95-px maps: not divisible by 2, the downsampling of a two-level U-Net
    odd = [NucleiSample(s.image[:95, :95], s.inst_map[:95, :95], s.type_map[:95, :95], s.name, 4) for s in samples]
    p["odd"] = write_dataset(root / "odd", odd, SCHEME, provenance={"test": "odd"})

    # one nucleus labelled 2**31-1: a lookup table indexed by id would need 16 GiB
    s0 = samples[0]
    inst = s0.inst_map.copy()
    top = int(inst.max())
    inst[inst == top] = BIG_ID
    p["bigid"] = write_dataset(root / "bigid", [s0.replace(inst_map=inst)], SCHEME, provenance={"test": "big id"})

    for name, mult in (("sdm1", (1,)), ("sdm2", (1, 2))):
        cfg = UNetConfig(image_size=32, model_channels=32, channel_mult=mult, num_res_blocks=1,
                         attention_resolutions=(), num_head_channels=32, label_nc=6)
        torch.manual_seed(0)
        state = build_unet(cfg).state_dict()
        p[name] = root / f"{name}.safetensors"
        save_checkpoint(p[name], {"model": state, "ema": state}, {"unet_config": cfg.model_dump(mode="json"), "num_classes": 4})

    from diffmix.seg.train import resolve_config, train_segmenter

    seg_yaml = root / "seg.yaml"
    seg_yaml.write_text(yaml.safe_dump(SEG_TINY))
    p["seg_yaml"] = seg_yaml
    p["seg"] = train_segmenter(str(p["toy"]), root / "segrun", resolve_config(seg_yaml), progress=False, num_threads=1)
    p["sdm_yaml"] = root / "sdm.yaml"
    p["sdm_yaml"].write_text(yaml.safe_dump(SDM_TINY))
    p["sdm_crop128"] = root / "sdm_crop128.yaml"
    p["sdm_crop128"].write_text(yaml.safe_dump({**SDM_TINY, "crop_size": 128}))

    # experiment configs with one mistake each: caught before the run folder exists
    exp = {"name": "hostile", "data": {"train": str(p["toy"]), "test": str(p["toy"])}, "folds": 1,
           "sdm": {"preset": str(p["sdm_yaml"])}, "seg": {"preset": str(seg_yaml)},
           "synthesis": {"patch": 32, "stride": 32, "steps": 2, "start_fraction": "0.5"}}
    mistakes = {
        "exp_missing_train": {"data": {"train": str(root / "no_such_dataset"), "test": str(p["toy"])}},
        "exp_seg_typo": {"seg": {"preset": str(seg_yaml), "overrides": {"batch_sise": 2}}},
        "exp_negative_epochs": {"epochs": {"baseline": -2, "gradmix": 1, "diffmix_b": 1, "diffmix_e": 1, "diffmix": 1}},
        "exp_missing_ckpt": {"sdm": {"checkpoint": str(root / "no_such.safetensors")}},
        "exp_sdm_typo": {"sdm": {"preset": str(p["sdm_yaml"]), "overrides": {"phase1_stepz": 3}}},
        "exp_balance_typo": {"synthesis": {**exp["synthesis"], "balance": {"fractoin": 0.5}}},
        "exp_bad_start": {"synthesis": {**exp["synthesis"], "start_fraction": "1.5"}},
        "exp_unknown_network": {"downstream": ["hovernet", "sonet"]},
        "exp_network_not_sonnet": {"downstream": ["hovernet", "sonnet"],
                                   "seg": {"preset": str(seg_yaml), "networks": {"sonnet": {"preset": str(seg_yaml)}}}},
    }
    for key, change in mistakes.items():
        p[key] = root / f"{key}.yaml"
        p[key].write_text(yaml.safe_dump({**exp, **change}))

    p["file"] = root / "a_file.txt"
    p["file"].write_text("not a folder\n")
    p["empty"] = root / "empty.safetensors"
    p["empty"].write_bytes(b"")
    p["pickle"] = root / "pickled.pt"
    with open(p["pickle"], "wb") as fh:  # a pickle of a class: torch.load(weights_only=True) refuses it
        pickle.dump({"weights": Path("x")}, fh)

    # a dataset whose image is a 16-bit greyscale PNG: it used to be clipped to white and
    # "segmented" to 0 nuclei by seg infer, and trained on by sdm train
    from PIL import Image

    p["g16"] = write_dataset(root / "g16", samples[:1], SCHEME, provenance={"test": "16-bit"})
    for png in (p["g16"] / "Images").iterdir():
        png.unlink()
    Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7 % 65535).astype(np.uint16)).save(
        p["g16"] / "Images" / f"{samples[0].name}.png")

    p["scheme_typo"] = root / "scheme_typo.yaml"
    # `mrege` (merge) used to be ignored: raw classes 3 and 4 then failed as "not in scheme"
    p["scheme_typo"].write_text("name: mine\nclasses: {1: a, 2: b}\nmrege: {1: [1, 3], 2: [2, 4]}\nminor_class: 1\n")
    p["bad_yaml"] = root / "bad.yaml"
    p["bad_yaml"].write_text("unet:\n  image_size: 32\n model_channels: [1, 2\n")
    p["seg_typo"] = root / "seg_typo.yaml"
    p["seg_typo"].write_text(yaml.safe_dump({**SEG_TINY, "phase1_epocs": 1}))

    # evaluate: a ground truth with a NaN centroid
    nan_true = root / "nan_true"
    nan_true.mkdir()
    nan_pred = root / "nan_pred"
    nan_pred.mkdir()
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 1
    inst[9:13, 9:13] = 2
    scipy.io.savemat(nan_true / "img_a.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]]),
                                              "inst_centroid": np.array([[3.5, 3.5], [np.nan, 10.5]])})
    scipy.io.savemat(nan_pred / "img_a.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]]),
                                              "inst_centroid": np.array([[3.5, 3.5], [10.5, 10.5]])})
    p["nan_true"], p["nan_pred"] = nan_true, nan_pred
    return p


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A command line (with {placeholders} for `w` paths and {out}) and what its error names."""

    id: str
    args: str
    needles: tuple[str, ...]
    out: str = "{out}"  # where the command would write: must not exist afterwards


_OUT = "{out}"
_SYNTH = "synthesize {toy} {sdm1} {out} --maps balance --patch 32 --stride 32 --steps 2 --start-fraction 0.5 --quiet"
_INFER = "seg infer {seg} {toy} {out} --no-progress"
_SDM_TRAIN = "sdm train {toy} {out} --preset {sdm_yaml} --no-progress"
_SEG_TRAIN = "seg train {out} --train {toy} --preset {seg_yaml} --no-progress"

CASES = [
    # ---- the argument parser (typer's vendored click): usage errors
    Case("unknown-command", "sdm trian", ("diffmix sdm", "No such command 'trian'", "train")),
    Case("unknown-top-command", "frobnicate", ("No such command 'frobnicate'",)),
    Case("unknown-option", _INFER + " --tiles 3", ("diffmix seg infer", "No such option: --tiles", "--tile")),
    Case("missing-argument", "seg infer", ("diffmix seg infer", "Missing argument")),
    Case("missing-option", "synthesize {toy} {sdm1} {out}", ("Missing option '--maps'",)),
    Case("missing-evaluate-option", "evaluate --pred {nan_pred}", ("Missing option '--true'",)),
    Case("not-an-int", _INFER + " --batch-size x", ("'--batch-size'",)),
    Case("not-an-int-sdm", _SDM_TRAIN + " --steps 1.5", ("'--steps'",)),
    Case("below-min", "toy-data {out} --size 10", ("'--size'",)),
    Case("inspect-no-args", "inspect", ("Missing argument",)),
    Case("demo-scheme-without-data", "demo --out {out} --scheme consep", ("--scheme goes with --data",)),
    # ---- devices this machine does not have, or that do not exist
    Case("sdm-train-cuda", _SDM_TRAIN + " --device cuda", ("device 'cuda'", "CUDA is not available")),
    Case("sdm-train-gpu0", _SDM_TRAIN + " --device gpu0", ("device 'gpu0'", "not a device name")),
    Case("seg-train-cuda", _SEG_TRAIN + " --device cuda", ("device 'cuda'", "CUDA is not available")),
    Case("seg-train-gpu0", _SEG_TRAIN + " --device gpu0", ("device 'gpu0'",)),
    Case("seg-infer-cuda", _INFER + " --device cuda:1", ("device 'cuda:1'",)),
    Case("synth-cuda", _SYNTH + " --device cuda", ("device 'cuda'",)),
    Case("synth-tpu", _SYNTH + " --device tpu", ("device 'tpu'",)),
    Case("fidelity-gpu0", "fidelity {toy} --segmenter {seg} --device gpu0 --quiet", ("device 'gpu0'",), out=""),
    Case("sdm-sample-cuda", "sdm sample {sdm1} --maps {toy} --out {out} --device cuda --no-progress", ("device 'cuda'",)),
    # ---- output paths that cannot be written
    Case("infer-out-is-file", "seg infer {seg} {toy} {file} --no-progress", ("a_file.txt", "is a file"), out=""),
    Case("sdm-train-out-is-file", "sdm train {toy} {file} --preset {sdm_yaml}", ("a_file.txt", "is a file"), out=""),
    Case("seg-train-out-is-file", "seg train {file} --train {toy} --preset {seg_yaml}", ("a_file.txt",), out=""),
    Case("synth-out-is-file", "synthesize {toy} {sdm1} {file} --maps balance", ("a_file.txt",), out=""),
    Case("toy-data-out-is-file", "toy-data {file}", ("a_file.txt", "is a file"), out=""),
    Case("balance-out-under-file", "maps balance {toy} {file}/sub", ("a_file.txt is a file",), out=""),
    Case("enlarge-out-under-file", "maps enlarge {toy} {file}/sub --patch 32 --stride 32", ("a_file.txt is a file",), out=""),
    Case("gradmix-out-under-file", "gradmix {toy} {file}/sub", ("a_file.txt is a file",), out=""),
    Case("sdm-sample-out-is-file", "sdm sample {sdm1} --maps {toy} --out {file} --no-progress", ("a_file.txt",), out=""),
    Case("sdm-import-dst-under-file", "sdm import {pickle} {file}/x.safetensors", ("a_file.txt is a file",), out=""),
    Case("sdm-import-pickle", "sdm import {pickle} {out}", ("pickled.pt", "weights_only=True")),
    Case("evaluate-json-under-file", "evaluate --pred {nan_pred} --true {nan_pred} --json {file}/r.json",
         ("a_file.txt is a file",), out=""),
    Case("evaluate-json-is-folder", "evaluate --pred {nan_pred} --true {nan_pred} --json {toy}", ("is a folder",), out=""),
    Case("fidelity-json-under-file", "fidelity {toy} --segmenter {seg} --json {file}/r.json --quiet",
         ("a_file.txt is a file",), out=""),
    Case("synth-json-under-file", _SYNTH + " --json {file}/r.json", ("a_file.txt is a file",)),
    Case("experiment-out-is-file", "experiment demo {file} --quiet", ("a_file.txt", "is a file"), out=""),
    # ---- options and configs validated before the run folder is made
    Case("synth-balance-typo", _SYNTH + " --balance '{{\"fractoin\": 0.5}}'", ("unknown name(s) ['fractoin']", "fraction")),
    Case("synth-balance-bad-value", _SYNTH + " --balance '{{\"fraction\": 2}}'", ("fraction must be in [0, 1]",)),
    Case("synth-balance-not-object", _SYNTH + " --balance '[1]'", ("--balance", "JSON object")),
    Case("synth-enlarge-typo", _SYNTH.replace("balance", "enlarge") + " --enlarge '{{\"keep\": 1}}'", ("unknown name(s) ['keep']",)),
    Case("synth-max-patches-0", _SYNTH + " --max-patches 0", ("max_patches must be >= 1",)),
    Case("synth-max-patches-neg", _SYNTH + " --max-patches -3", ("max_patches must be >= 1",)),
    Case("synth-zero-byte-ckpt", "synthesize {toy} {empty} {out} --maps balance --patch 32 --stride 32 --quiet",
         ("empty.safetensors",)),
    Case("synth-pickle-ckpt", "synthesize {toy} {pickle} {out} --maps balance --patch 32 --stride 32 --quiet",
         ("pickled.pt", "sdm import")),
    Case("synth-patch-too-big", "synthesize {toy} {sdm1} {out} --maps balance --patch 256 --quiet", ("96x96", "smaller than the 256-px patch")),
    Case("synth-patch-odd-for-unet", "synthesize {toy} {sdm2} {out} --maps balance --patch 33 --stride 33 --quiet",
         ("patch size 33", "divisible by 2")),
    Case("synth-bad-fraction", _SYNTH.replace("--start-fraction 0.5", "--start-fraction 1.5"), ("1.5",)),
    Case("sdm-sample-odd-maps", "sdm sample {sdm2} --maps {odd} --out {out} --steps 2 --start-fraction 0.5 --no-progress",
         ("not divisible by 2", "95x95")),
    Case("seg-infer-batch-0", _INFER + " --batch-size 0", ("batch_size must be >= 1",)),
    Case("seg-infer-tile-0", _INFER + " --tile 0", ("tile must be >= 1",)),
    Case("seg-infer-overlap-odd", _INFER + " --overlap 3", ("overlap must be an even number",)),
    Case("seg-infer-16bit", "seg infer {seg} {g16} {out} --no-progress", ("Images/toy_000.png", "16-bit")),
    Case("seg-infer-missing-ckpt", "seg infer {root}/nope.safetensors {toy} {out}", ("nope.safetensors", "not found")),
    Case("seg-infer-pickle-ckpt", "seg infer {pickle} {toy} {out}", ("pickled.pt",)),
    Case("seg-infer-sdm-ckpt", "seg infer {sdm1} {toy} {out}", ("sdm1.safetensors", "not a diffmix segmenter")),
    Case("seg-train-typo-config", "seg train {out} --train {toy} --preset {seg_typo}", ("phase1_epocs",)),
    Case("seg-train-negative-epochs", _SEG_TRAIN + " --epochs -1", ("phase1_epochs",)),
    Case("seg-train-batch-too-big", _SEG_TRAIN + " --batch-size 64", ("no full batch of 64",)),
    Case("seg-train-pretrained-small", _SEG_TRAIN + " --pretrained {pickle}", ("model.pretrained",)),
    Case("seg-train-pickled-pretrained",
         "seg train {out} --train {toy} --preset hovernet-fast --pretrained {pickle} --epochs 1 --samples-per-epoch 4 "
         "--batch-size 1 --no-progress", ("pickled.pt", "not a readable weights file")),
    Case("sdm-train-bad-yaml", "sdm train {toy} {out} --preset {bad_yaml}", ("bad.yaml", "not valid YAML at line")),
    Case("sdm-train-16bit", "sdm train {g16} {out} --preset {sdm_yaml}", ("Images/toy_000.png", "16-bit")),
    Case("sdm-train-crop-too-big", "sdm train {toy} {out} --preset {sdm_crop128}", ("smaller than the 128-px training crop",)),
    Case("sdm-train-unknown-preset", "sdm train {toy} {out} --preset nosuch", ("unknown sdm preset 'nosuch'",)),
    Case("inspect-scheme-typo", "inspect {toy} --scheme {scheme_typo}", ("scheme_typo.yaml", "unknown key(s) ['mrege']"), out=""),
    Case("inspect-scheme-bad-yaml", "inspect {toy} --scheme {root}/bad.yaml", ("bad.yaml", "line 3"), out=""),
    Case("evaluate-unknown-class", "evaluate --pred {toy}/Labels --true {toy} --classes 1,9", ("--classes", "[9]"), out=""),
    Case("evaluate-unknown-class-labels-folder", "evaluate --pred {toy}/Labels --true {toy}/Labels --classes 1,9",
         ("--classes", "[9]", "dataset.json"), out=""),
    Case("evaluate-nan-centroid", "evaluate --pred {nan_pred} --true {nan_true}", ("img_a.mat", "NaN"), out=""),
    Case("experiment-missing-config", "experiment {root}/nope.yaml {out} --quiet", ("nope",)),
    Case("experiment-missing-train", "experiment {exp_missing_train} {out} --quiet", ("no_such_dataset",)),
    Case("experiment-seg-typo", "experiment {exp_seg_typo} {out} --quiet", ("arm baseline", "batch_sise")),
    Case("experiment-negative-epochs", "experiment {exp_negative_epochs} {out} --quiet", ("arm baseline", "phase1_epochs")),
    Case("experiment-missing-sdm-checkpoint", "experiment {exp_missing_ckpt} {out} --quiet", ("no_such.safetensors",)),
    Case("experiment-sdm-typo", "experiment {exp_sdm_typo} {out} --quiet", ("phase1_stepz",)),
    Case("experiment-balance-typo", "experiment {exp_balance_typo} {out} --quiet", ("fractoin",)),
    Case("experiment-bad-start-fraction", "experiment {exp_bad_start} {out} --quiet", ("start_fraction",)),
    Case("experiment-unknown-network", "experiment {exp_unknown_network} {out} --quiet",
         ("'sonet'", "known: hovernet, sonnet")),
    Case("experiment-network-not-sonnet", "experiment {exp_network_not_sonnet} {out} --quiet",
         ("seg.networks.sonnet", "which is not SONNET")),
    Case("experiment-bad-device", "experiment {exp_seg_typo} {out} --quiet --device gpu0", ("gpu0",)),
    Case("demo-bad-device", "demo --out {out} --quiet --device gpu0", ("gpu0",)),
]


_CASE_TEST = "test_user_mistake_is_one_error_line_and_writes_nothing"


def _inputs_tree(w: dict[str, Path]) -> dict[str, dict[str, int]]:
    return {k: _tree(v) for k, v in w.items() if k in ("file", "toy", "root")}


@pytest.fixture(scope="module")
def ran(w: dict[str, Path], tmp_path_factory, request) -> dict:
    """Every selected case run at once, a worker per core (each command is a one-thread
    subprocess that mostly waits on interpreter and torch start-up, so this halves the file's
    time on 2 cores). Per case: its result and placeholders; plus the inputs' trees before."""
    import shlex

    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", None) == _CASE_TEST}
    jobs = []
    for case in CASES:
        if case.id in selected:
            cwd = tmp_path_factory.mktemp(case.id)
            fields = {k: str(v) for k, v in w.items()} | {"out": str(cwd / "out")}
            jobs.append((case.id, shlex.split(case.args.format(**fields)), cwd, fields))
    before = _inputs_tree(w)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = pool.map(lambda job: diffmix(*job[1], cwd=job[2]), jobs)
        by_case = {job[0]: (res, job[3]) for job, res in zip(jobs, results)}
    return {"cases": by_case, "inputs_before": before}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_mistake_is_one_error_line_and_writes_nothing(case: Case, ran: dict) -> None:
    res, fields = ran["cases"][case.id]
    assert_user_error(res, *(n.format(**fields) for n in case.needles))
    if case.out:
        out = Path(case.out.format(**fields))
        assert not out.exists(), sorted(_tree(out))


def test_no_mistaken_command_wrote_into_its_inputs(ran: dict, w: dict[str, Path]) -> None:
    """The shared inputs (datasets, checkpoints, configs) are as they were before the cases."""
    after = _inputs_tree(w)
    changed = {k: sorted(set(after[k].items()) ^ set(ran["inputs_before"][k].items())) for k in after}
    assert not any(changed.values()), changed


# --------------------------------------------------------------------------- what works


def test_version_and_help() -> None:
    res = diffmix("--version")
    assert res.returncode == 0 and res.stdout.strip().startswith("diffmix ") and res.stderr == ""
    res = diffmix("sdm", "--help")
    assert res.returncode == 0 and "train" in res.stdout


def test_no_arguments_prints_help_not_an_error() -> None:
    res = diffmix()
    assert "Traceback" not in res.stderr and "Usage" in res.stdout + res.stderr


def test_balance_with_an_instance_id_of_2_31_minus_1(w: dict[str, Path], tmp_path: Path) -> None:
    """Used to be a MemoryError: lookup tables sized by the largest instance id."""
    out = tmp_path / "bal"
    res = diffmix("maps", "balance", w["bigid"], out, "--border", "4", "--seed", "1")
    assert res.returncode == 0, res.stderr
    from diffmix.data.io import read_dataset

    got = read_dataset(out).samples[0]
    src = read_dataset(w["bigid"]).samples[0]
    assert BIG_ID in np.unique(got.inst_map) or BIG_ID not in np.unique(src.inst_map)
    # every instance still has exactly one class, and it is the source's unless swapped
    for inst_id, cls in got.inst_types().items():
        assert cls in (src.inst_types()[inst_id], SCHEME.minor_class)


def test_json_is_written_where_asked(w: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "deep" / "er" / "r.json"
    res = diffmix("evaluate", "--pred", w["nan_pred"], "--true", w["nan_pred"], "--json", report)
    assert res.returncode == 0, res.stderr
    assert json.loads(report.read_text())["n_images"] == 1
