"""diffmix.synth / `diffmix synthesize`: plan, y0, label maps, manifest, exact resume after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmix.checkpoints import save_checkpoint
from diffmix.cli import main
from diffmix.data.io import read_dataset, write_dataset
from diffmix.data.patches import crop, grid_offsets
from diffmix.data.sample import remap_ids
from diffmix.data.schemes import CONSEP
from diffmix.data.toy import generate_toy_samples
from diffmix.errors import CheckpointError, ConfigError, DataError, RunFolderError
from diffmix.maps.balance import BalanceParams, balance_dataset
from diffmix.sdm.settings import SamplerSettings
from diffmix.sdm.unet import UNetConfig, build_unet
from diffmix.maps.enlarge import enlarge_dataset
from diffmix.seeds import patch_seed
from diffmix.synth.jobs import PatchJob, plan_jobs
from diffmix.synth.labels import LabelMaps
from diffmix.synth.manifest import MANIFEST, RECORDS_DIR
from diffmix.synth.run import chunks, synthesize

REPO = Path(__file__).resolve().parents[1]
SCHEME = CONSEP.merged()
# 2 toy tiles of 96 px, dense enough that balancing makes a few swaps with border 4 (checked
# below); toy nuclei fill 32-px patches, so enlarging there uses no frame and +-3 px shifts
# (spec: a 32-px frame and shifts in [-15, 14] at 256 px)
TOY = dict(n_images=2, size=96, seed=1, rare_fraction=0.15, density=12.0)
BALANCE = {"border": 4}
ENLARGE = {"frame": 0, "shift_range": [-3, 2], "keep_prob": 0.5}
# a few DDIM steps on 32-px patches keep every run to seconds on 2 shared cores
FAST_SAMPLER = SamplerSettings(steps=4, start_fraction="0.5", guidance_scale=1.5)
FAST = dict(patch=32, stride=32, sampler=FAST_SAMPLER, progress=False)
UNGUIDED = {**FAST, "sampler": replace(FAST_SAMPLER, guidance_scale=1.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _unet_config(label_nc: int = 6) -> UNetConfig:
    # one level, no downsampling: the cheapest SDM U-Net (SPADE decoder, middle attention)
    return UNetConfig(image_size=32, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(), num_head_channels=32, label_nc=label_nc)


def _save_unet(path: Path, *, randomise: bool, label_nc: int = 6) -> Path:
    cfg = _unet_config(label_nc)
    torch.manual_seed(0)
    model = build_unet(cfg)
    if randomise:  # every layer (the output conv is zero-initialised) so the net matters
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
    state = model.state_dict()
    save_checkpoint(path, {"model": state, "ema": state}, {"unet_config": cfg.model_dump(mode="json"), "num_classes": 4})
    return path


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "toy"
    write_dataset(root, generate_toy_samples(**TOY), SCHEME, provenance={"test": "synth"})
    return root


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    return _save_unet(tmp_path_factory.mktemp("ckpt") / "random.safetensors", randomise=True)


@pytest.fixture(scope="module")
def zero_ckpt(tmp_path_factory) -> Path:
    """Default init: the output conv is zero, so the network predicts eps = 0 exactly."""
    return _save_unet(tmp_path_factory.mktemp("ckpt") / "zero.safetensors", randomise=False)


def _files(out: Path) -> dict[str, bytes]:
    return {f"{d}/{p.name}": p.read_bytes() for d in ("Images", "Labels") for p in sorted((out / d).iterdir())}


def _assert_same_patches(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:  # images and labels, byte for byte (.mat headers carry no write time)
        assert fa[name] == fb[name], name


def _run_cli(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def _no_leftovers(out: Path) -> None:
    assert not (out / RECORDS_DIR).exists()
    hidden = [p for d in ("Images", "Labels") for p in (out / d).iterdir() if p.name.startswith(".")]
    assert hidden == []


# --------------------------------------------------------------------------- plan


def test_patch_seed_depends_on_each_part_only():
    s = patch_seed(0, "img", 3, "balance")
    assert s == patch_seed(0, "img", 3, "balance")
    assert 0 <= s < 2**63
    others = {patch_seed(1, "img", 3, "balance"), patch_seed(0, "img2", 3, "balance"),
              patch_seed(0, "img", 4, "balance"), patch_seed(0, "img", 3, "enlarge")}
    assert s not in others and len(others) == 4


def test_plan_jobs_grid_names_and_spread(toy_dir):
    ds = read_dataset(toy_dir)
    jobs = plan_jobs(ds, "balance", patch=32, stride=32, seed=5)
    assert len(jobs) == 2 * 9
    assert [j.name for j in jobs[:3]] == ["toy_000_000", "toy_000_001", "toy_000_002"]
    assert jobs[4].offset == (32, 32) and jobs[4].patch_index == 4
    assert jobs[9].source == "toy_001" and jobs[9].image_index == 1 and jobs[9].offset == (0, 0)
    assert jobs[9].seed == patch_seed(5, "toy_001", 0, "balance")
    # spec 5 grid: 256 at 76 on 1000 px = 10 x 10 offsets
    assert len(grid_offsets(1000, 1000)) == 100
    both = plan_jobs(ds, "both", patch=32, stride=32, seed=5, max_patches=4)
    assert [j.kind for j in both] == ["balance"] * 4 + ["enlarge"] * 4
    assert [j.name for j in both[:4]] == ["toy_000_000_balance", "toy_000_004_balance",
                                          "toy_001_000_balance", "toy_001_004_balance"]
    assert {j.source for j in both[4:]} == {"toy_000", "toy_001"}
    with pytest.raises(ConfigError, match="--maps"):
        plan_jobs(ds, "gradmix")
    with pytest.raises(DataError, match="smaller than"):
        plan_jobs(ds, "balance", patch=128)


def test_enlarge_maps_are_those_of_enlarge_dataset(toy_dir):
    """Synthesis makes enlarging maps patch by patch; they must equal the whole-grid function's."""
    ds = read_dataset(toy_dir)
    labels = LabelMaps(ds, ["enlarge"], 3, {}, ENLARGE)
    ref = enlarge_dataset(ds.samples, patch=32, stride=32, seed=3, **ENLARGE)
    jobs = plan_jobs(ds, "enlarge", patch=32, stride=32, seed=3)
    assert [j.name for j in jobs] == [r.name for r in ref]
    moved = 0
    for job, r in zip(jobs, ref):
        inst, types, info = labels.custom(job)
        np.testing.assert_array_equal(inst, r.inst_map)
        np.testing.assert_array_equal(types, r.type_map)
        moved += info["moved"]
        assert info["movable"] + info["frozen"] == len(np.unique(remap_ids(
            ds.samples[job.image_index].inst_map[job.offset[0]:job.offset[0] + 32, job.offset[1]:job.offset[1] + 32]))) - 1
    assert moved > 0


# --------------------------------------------------------------------------- outputs


def test_y0_is_the_original_patch(toy_dir, zero_ckpt, tmp_path):
    """With eps = 0 and a start at t = 0 the sampler returns y0 + 0.01 noise: the original crop."""
    ds = read_dataset(toy_dir)
    out = tmp_path / "near"
    synthesize(ds, zero_ckpt, out, maps="balance", patch=32, stride=32,
               sampler=SamplerSettings(steps=10, start_fraction="0.1"), batch_size=5, balance_kwargs=BALANCE,
               progress=False)
    synth = read_dataset(out)
    assert len(synth) == 18
    for s in synth:
        src, idx = s.name.rsplit("_", 1)
        y, x = grid_offsets(96, 96, 32, 32)[int(idx)]
        original = ds.by_name(src).image[y : y + 32, x : x + 32].astype(int)
        diff = np.abs(s.image.astype(int) - original)
        assert diff.max() <= 8 and diff.mean() < 1.5, s.name
    # from t = 540 the same net returns clip(y0 + 4.3 noise): far from the original
    far = tmp_path / "far"
    synthesize(ds, zero_ckpt, far, maps="balance", patch=32, stride=32,
               sampler=SamplerSettings(steps=10, start_fraction="0.55", guidance_scale=1.0), batch_size=2,
               max_patches=2, balance_kwargs=BALANCE, progress=False)
    s = read_dataset(far).by_name("toy_001_000")
    assert np.abs(s.image.astype(int) - ds.by_name("toy_001").image[:32, :32].astype(int)).mean() > 40


def test_balance_labels_counts_and_manifest(toy_dir, random_ckpt, tmp_path):
    ds = read_dataset(toy_dir)
    balanced, report = balance_dataset(ds.samples, BalanceParams(minor_class=1, seed=7, **BALANCE))
    assert report.accepted_swaps >= 1
    out = tmp_path / "bal"
    rep = synthesize(toy_dir, random_ckpt, out, maps="balance", seed=7, batch_size=18,
                     balance_kwargs=BALANCE, **UNGUIDED)
    assert rep.n_patches == rep.n_written == 18 and rep.n_skipped == 0
    assert rep.patches_per_second > 0
    assert rep.map_reports["balance"]["accepted_swaps"] == report.accepted_swaps
    synth = read_dataset(out)
    assert synth.scheme.name == SCHEME.name and synth.meta["merged"] is True
    before = {c: 0 for c in SCHEME.class_ids}
    after = {c: 0 for c in SCHEME.class_ids}
    for j in plan_jobs(ds, "balance", patch=32, stride=32, seed=7):
        y, x = j.offset
        orig = crop(ds.samples[j.image_index], y, x, 32)
        custom = crop(balanced[j.image_index], y, x, 32)
        got = synth.by_name(j.name)
        np.testing.assert_array_equal(got.inst_map, remap_ids(custom.inst_map))
        np.testing.assert_array_equal(got.type_map, custom.type_map)
        for c, n in orig.class_counts().items():
            before[c] += n
        for c, n in custom.class_counts().items():
            after[c] += n
    assert rep.class_counts_before["balance"] == before
    assert rep.class_counts_after["balance"] == after
    assert after[1] > before[1]  # the swaps made more minor-class nuclei
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["n_patches"] == 18
    assert manifest["class_counts_after"]["balance"] == {str(c): n for c, n in after.items()}
    rec = manifest["patches"][4]
    assert rec["name"] == "toy_000_004" and rec["source_image"] == "toy_000"
    assert rec["offset"] == [32, 32] and rec["map_kind"] == "balance"
    assert rec["seed"] == patch_seed(7, "toy_000", 4, "balance")
    assert rec["sampler"] == {"steps": 4, "start_fraction": "0.5", "guidance_scale": 1.0, "eta": 0.0, "weights": "auto"}
    import hashlib

    assert rec["checkpoint_sha256"] == hashlib.sha256(random_ckpt.read_bytes()).hexdigest()
    assert manifest["provenance"]["checkpoint_sha256"] == rec["checkpoint_sha256"]
    _no_leftovers(out)
    # a finished folder re-run does nothing and keeps its files
    files = _files(out)
    again = synthesize(toy_dir, random_ckpt, out, maps="balance", seed=7, batch_size=3,
                       balance_kwargs=BALANCE, **UNGUIDED)
    assert again.n_written == 0 and again.n_skipped == 18
    assert again.class_counts_after == rep.class_counts_after
    assert _files(out) == files
    # the same folder with other settings is refused, not overwritten
    with pytest.raises(RunFolderError, match="different run"):
        synthesize(toy_dir, random_ckpt, out, maps="balance", seed=8, balance_kwargs=BALANCE, **FAST)


# --------------------------------------------------------------------------- resume


KILL_SCRIPT = """
import sys
from diffmix.cli import main
main(sys.argv[1:])
"""


def _synth_args(toy_dir: Path, ckpt: Path, out: Path) -> list[str]:
    return ["synthesize", str(toy_dir), str(ckpt), str(out), "--maps", "both", "--patch", "32",
            "--stride", "32", "--steps", "4", "--start-fraction", "0.5", "--batch-size", "2",
            "--seed", "3", "--max-patches", "5", "--balance", json.dumps(BALANCE),
            "--enlarge", json.dumps(ENLARGE), "--quiet"]


def test_killed_run_resumes_to_the_exact_bytes(toy_dir, random_ckpt, tmp_path, capsys):
    ref = tmp_path / "ref"
    _run_cli([*_synth_args(toy_dir, random_ckpt, ref), "--json", str(tmp_path / "ref.json")])
    assert len(list((ref / "Images").iterdir())) == 10
    # the sampler that ran is named: the default solver, its budget capped at the 2 steps from the start
    assert "sampler: unipc, 2 guided passes (logsnr grid) from index 1 of 4 steps" in capsys.readouterr().out
    summary = json.loads((tmp_path / "ref.json").read_text())
    assert summary["n_written"] == 10 and summary["maps"] == ["balance", "enlarge"]
    assert summary["class_counts_after"]["balance"]["1"] > summary["class_counts_before"]["balance"]["1"]

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *_synth_args(toy_dir, random_ckpt, out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / RECORDS_DIR
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if records.is_dir() and len(list(records.glob("*.json"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(records.glob("*.json")))
    assert 3 <= done < 10 and not (out / MANIFEST).exists()

    # a torn state on top: a patch whose files exist but whose record does not (killed between
    # the label write and the record write), with a wrong image, and a stale temporary file
    victim = sorted(records.glob("*.json"))[0]
    name = victim.stem
    victim.unlink()
    (out / "Images" / f"{name}.png").write_bytes(b"not a png")
    (out / "Images" / f".{name}.x1y2.tmp.png").write_bytes(b"half")

    _run_cli(_synth_args(toy_dir, random_ckpt, out))
    _assert_same_patches(ref, out)
    _no_leftovers(out)
    m_ref = json.loads((ref / MANIFEST).read_text())
    m_out = json.loads((out / MANIFEST).read_text())
    assert m_out["patches"] == m_ref["patches"]
    assert len(m_out["patches"]) == 10 and len({r["name"] for r in m_out["patches"]}) == 10
    assert m_out["class_counts_after"] == m_ref["class_counts_after"]
    assert set(m_out["class_counts_after"]) == {"balance", "enlarge"}
    assert m_out["map_reports"]["enlarge"]["totals"]["moved"] > 0
    assert m_out["map_reports"]["balance"]["accepted_swaps"] >= 1
    kinds = [r["map_kind"] for r in m_out["patches"]]
    assert kinds == ["balance"] * 5 + ["enlarge"] * 5
    assert all(r["name"].endswith("_" + r["map_kind"]) for r in m_out["patches"])
    # the saved enlarge labels are enlarge_dataset's maps at the same grid positions
    ds = read_dataset(toy_dir)
    ref_maps = {r.name: r for r in enlarge_dataset(ds.samples, patch=32, stride=32, seed=3, **ENLARGE)}
    synth = read_dataset(out)
    for r in m_out["patches"][5:]:
        got = synth.by_name(r["name"])
        want = ref_maps[r["name"][: -len("_enlarge")]]
        np.testing.assert_array_equal(got.inst_map, want.inst_map)
        np.testing.assert_array_equal(got.type_map, want.type_map)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    finished = [r for r in log if r.get("event") == "done"]
    assert len(finished) == 1  # the killed run never got there
    assert finished[0]["written"] == 10 - done + 1 and finished[0]["skipped"] == done - 1


@pytest.mark.slow  # two torch processes + the launcher: ~10-25 s on 2 shared cores
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this python")
def test_torchrun_two_processes_split_the_patches(toy_dir, random_ckpt, tmp_path):
    args = ["--maps", "balance", "--patch", "32", "--stride", "32", "--steps", "2", "--start-fraction", "0.5",
            "--batch-size", "1", "--seed", "4", "--max-patches", "4", "--balance", json.dumps(BALANCE),
            "--device", "cpu", "--quiet"]
    ref = tmp_path / "one"
    _run_cli(["synthesize", str(toy_dir), str(random_ckpt), str(ref), *args])
    out = tmp_path / "two"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    script = tmp_path / "run_cli.py"
    script.write_text(KILL_SCRIPT)
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script),
         "synthesize", str(toy_dir), str(random_ckpt), str(out), *args],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_patches(ref, out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted({r["rank"] for r in log if "rank" in r}) == [0, 1]
    assert sum(r["patches"] for r in log if "rank" in r) == 4
    done = [r for r in log if r.get("event") == "done"]
    assert done[-1]["world_size"] == 2 and done[-1]["written"] == 4
    assert json.loads((out / MANIFEST).read_text())["patches"] == json.loads((ref / MANIFEST).read_text())["patches"]


# --------------------------------------------------------------------------- errors


def test_cli_user_errors_exit_2(toy_dir, random_ckpt, tmp_path, capsys):
    base = ["synthesize", str(toy_dir), str(random_ckpt)]
    cases = [
        (["--maps", "gradmix"], "--maps"),
        (["--maps", "balance", "--patch", "200"], "smaller than"),
        (["--maps", "balance", "--start-fraction", "1.5"], "start_fraction"),
        (["--maps", "balance", "--balance", "[1]"], "JSON object"),
    ]
    for k, (extra, msg) in enumerate(cases):
        with pytest.raises(SystemExit) as exc:
            main([*base, str(tmp_path / f"o{k}"), *extra])
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["synthesize", str(tmp_path / "nope"), str(random_ckpt), str(tmp_path / "o"), "--maps", "balance"])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err


def test_checkpoint_must_fit_the_scheme(toy_dir, tmp_path):
    glysac_like = _save_unet(tmp_path / "k3.safetensors", randomise=False, label_nc=5)
    with pytest.raises(CheckpointError, match="5 label channels"):
        synthesize(toy_dir, glysac_like, tmp_path / "o", maps="balance", **FAST)
    with pytest.raises(CheckpointError, match="not found"):
        synthesize(toy_dir, tmp_path / "missing.safetensors", tmp_path / "o2", maps="balance", **FAST)


def test_real_patches_from_shared_data(shared_data, random_ckpt, tmp_path):
    """Real CoNSeP-layout H&E (raw classes merged once by the reader) through both map kinds."""
    ds = read_dataset(shared_data / "real_he_labeled", "consep")
    out = tmp_path / "real"
    rep = synthesize(ds, random_ckpt, out, maps="both", patch=64, stride=96,
                     sampler=SamplerSettings(steps=2, start_fraction="0.5"), batch_size=4, max_patches=2, seed=1,
                     enlarge_kwargs={"frame": 8, "shift_range": [-4, 3]}, progress=False)
    assert rep.n_patches == 4 and rep.n_written == 4
    assert rep.dataset_class_counts == ds.class_counts()
    synth = read_dataset(out)  # dataset.json: merged, so the reader does not merge again
    assert synth.scheme.name == ds.scheme.name and len(synth) == 4
    manifest = json.loads((out / MANIFEST).read_text())
    for rec in manifest["patches"]:
        s = synth.by_name(rec["name"])
        assert s.image.shape == (64, 64, 3) and rec["size"] == 64
        assert rec["source_image"] in ds.names and rec["offset"][0] % 96 == 0
        counts = {str(c): n for c, n in s.class_counts().items()}
        assert {k: v for k, v in rec["class_counts"].items() if v} == counts


def test_patch_results_do_not_depend_on_batching(toy_dir, random_ckpt, tmp_path):
    """Per-patch generators: eta = 0 batches differ at most by float rounding of batched convs;
    eta > 0 (step noise too) runs patches alone, so any batch size gives the same bytes."""
    common = dict(maps="balance", seed=9, max_patches=3, balance_kwargs=BALANCE, **{**FAST, "sampler": None})
    runs = {}
    for name, eta, bs in (("b3", 0.0, 3), ("b1", 0.0, 1), ("eta_b3", 0.5, 3), ("eta_b1", 0.5, 1)):
        synthesize(toy_dir, random_ckpt, tmp_path / name, batch_size=bs,
                   **{**common, "sampler": replace(FAST_SAMPLER, eta=eta)})
        runs[name] = {s.name: s.image.astype(int) for s in read_dataset(tmp_path / name)}
    assert sorted(runs["b3"]) == sorted(runs["b1"]) and len(runs["b3"]) == 3
    for n in runs["b3"]:
        assert np.abs(runs["b3"][n] - runs["b1"][n]).max() <= 1
        np.testing.assert_array_equal(runs["eta_b3"][n], runs["eta_b1"][n])
        assert not np.array_equal(runs["eta_b3"][n], runs["b3"][n])  # eta adds step noise
    _assert_same_patches(tmp_path / "eta_b3", tmp_path / "eta_b1")


def test_own_maps_resynthesise_each_image_under_its_own_labels(toy_dir, random_ckpt, tmp_path):
    """Map kind "own": grid patches keep their original labels (ids renumbered per patch); with
    patch=None whole images keep theirs, ids and all, and are named after the image (sdm sample)."""
    ds = read_dataset(toy_dir)
    rep = synthesize(toy_dir, random_ckpt, tmp_path / "grid", maps="own", max_patches=4, **FAST)
    assert rep.class_counts_before["own"] == rep.class_counts_after["own"] and rep.n_written == 4
    synth = read_dataset(tmp_path / "grid")
    for j in plan_jobs(ds, "own", patch=32, stride=32, max_patches=4):
        orig = crop(ds.samples[j.image_index], *j.offset, 32)
        got = synth.by_name(j.name)
        np.testing.assert_array_equal(got.inst_map, orig.inst_map)
        np.testing.assert_array_equal(got.type_map, orig.type_map)
        assert not np.array_equal(got.image, orig.image)
    whole = synthesize(toy_dir, random_ckpt, tmp_path / "whole", maps="own", patch=None, batch_size=2,
                       **{k: v for k, v in FAST.items() if k not in ("patch", "stride")})
    assert whole.n_written == len(ds)
    synth = read_dataset(tmp_path / "whole")
    assert synth.names == ds.names
    for got, orig in zip(synth, ds):
        np.testing.assert_array_equal(got.inst_map, orig.inst_map)  # not renumbered: nothing was cut
    manifest = json.loads((tmp_path / "whole" / MANIFEST).read_text())
    assert manifest["config"]["patch"] is None and manifest["patches"][0]["size"] == [96, 96]
    assert manifest["patches"][0]["seed"] == patch_seed(0, "toy_000", 0, "own")


def test_batches_of_whole_images_share_one_size():
    def job(name, size):
        return PatchJob(name, name, 0, 0, (0, 0), "own", 0, size, True)

    jobs = [job("a", (32, 32)), job("b", (32, 32)), job("c", (64, 32)), job("d", (32, 32)), job("e", (32, 32)),
            job("f", (32, 32))]
    assert [[j.name for j in c] for c in chunks(jobs, 2)] == [["a", "b"], ["c"], ["d", "e"], ["f"]]


def test_package_exports_resolve_from_their_modules():
    """`diffmix.synth` keeps every name it exported as one module; each now lives in its own."""
    import importlib

    import diffmix.synth as pkg

    for name, module in pkg._EXPORTS.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name), name
    assert set(pkg.__all__) <= set(pkg._EXPORTS)
    with pytest.raises(AttributeError, match="no_such_name"):
        pkg.no_such_name  # noqa: B018


def test_source_images_come_from_records_or_provenance_never_from_a_guess(toy_dir, random_ckpt, tmp_path):
    """Which training image each sample of a derived folder comes from: a synthetic set's
    manifest records (a sample without one is an error, not a guess from its name); GradMix
    folders say in their provenance whether they hold grid patches or whole images."""
    from diffmix.data.patches import grid_patches
    from diffmix.synth.manifest import read_manifest, source_images

    out = tmp_path / "both"
    synthesize(toy_dir, random_ckpt, out, maps="both", max_patches=2, **FAST)
    src = source_images(read_dataset(out))
    records = read_manifest(out)["patches"]
    assert len(src) == 4 and src == {r["name"]: r["source_image"] for r in records}
    # names end in the map kind: the old name-based fallback read "toy_000_000_balance" as "toy_000_000"
    assert set(src.values()) == {"toy_000", "toy_001"}
    manifest = json.loads((out / MANIFEST).read_text())
    dropped = manifest["patches"].pop(0)["name"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"1 sample\(s\) have no record in manifest.json \(e.g. \['{dropped}'\]\)"):
        source_images(read_dataset(out))

    toy = read_dataset(toy_dir)
    grid = [p for img in toy for p in grid_patches(img, 32, 32)]
    write_dataset(tmp_path / "gm-grid", grid, SCHEME, {"kind": "gradmix", "seed": 0, "patch": 32, "stride": 32})
    assert source_images(read_dataset(tmp_path / "gm-grid")) == {p.name: p.name[:7] for p in grid}
    write_dataset(tmp_path / "gm-whole", toy.samples, SCHEME, {"kind": "gradmix", "seed": 0})
    assert source_images(read_dataset(tmp_path / "gm-whole")) == {"toy_000": "toy_000", "toy_001": "toy_001"}
    with pytest.raises(DataError, match="not a GradMix or label-maps folder"):
        source_images(toy)
    write_dataset(tmp_path / "gm-bad", [grid[0].replace(name="stray")], SCHEME, {"kind": "gradmix", "patch": 32})
    with pytest.raises(DataError, match="'stray' is not a grid patch name"):
        source_images(read_dataset(tmp_path / "gm-bad"))
