"""Segmenter training: config presets, data mixing, patch items, two phases, run folder, resume
after kill -9 (identical continuation), DDP under torchrun, CLI, and a learning floor on toy data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffmix.checkpoints import load_checkpoint
from diffmix.data.io import Dataset, write_dataset
from diffmix.data.schemes import CONSEP, GLYSAC
from diffmix.data.toy import generate_toy_samples
from diffmix.errors import ClassSchemeError, ConfigError, RunFolderError
from diffmix.seg.cli import parse_dataset_arg
from diffmix.seg.data import PatchItems, Source, mix_plan
from diffmix.seg.models import build_segmenter, load_segmenter
from diffmix.seg.train import LOG_NAME, SegTrainConfig, resolve_config, train_segmenter

SCHEME = CONSEP.merged()

TINY = {
    "model": {"arch": "small", "width": 4, "depth": 2},
    "patch_size": 32,
    "phase1_epochs": 1,
    "phase2_epochs": 2,
    "batch_size": 4,
    "batch_size_phase2": 4,
    "lr": 1.0e-3,
    "samples_per_epoch": 16,
    "seed": 3,
}


@pytest.fixture(scope="module")
def toy() -> Dataset:
    return Dataset(generate_toy_samples(4, 64, seed=5), SCHEME)


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory, toy) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy") / "train", toy.samples, SCHEME)


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- config


def test_presets_resolve_and_typos_are_errors():
    tiny = resolve_config("cpu-tiny")
    assert tiny.model.arch == "small" and tiny.phase1_epochs >= 1 and tiny.phase2_epochs >= 1
    for name, arch in (("hovernet-fast", "hovernet-fast"), ("hovernet-original", "hovernet-original")):
        cfg = resolve_config(name)
        # hovernet_notes 3: 50 + 50 epochs, Adam 1e-4, x0.1 at epoch 25, batch 16 then 4.
        assert cfg.model.arch == arch
        assert (cfg.phase1_epochs, cfg.phase2_epochs, cfg.lr, cfg.lr_gamma) == (50, 50, 1e-4, 0.1)
        assert (cfg.batch_size, cfg.batch_size_phase2, cfg.lr_step_fraction) == (16, 4, 0.5)
        assert cfg.freeze_encoder_phase1 and cfg.loss.msge == "paper"
        assert cfg.loss.hv_mse == 1.0  # PyTorch official weight (TF and MONAI use 2)
    with pytest.raises(ConfigError, match="phase1_epoch"):
        resolve_config("cpu-tiny", {"phase1_epoch": 3})
    with pytest.raises(ConfigError, match="unknown seg preset"):
        resolve_config("no-such-preset")


# --------------------------------------------------------------------------- data


def test_mix_plan_counts_and_scheme_check(toy):
    small = Dataset(toy.samples[:2], SCHEME)
    plan = mix_plan([Source(toy), Source(small, count=5)], seed=0)
    assert len(plan) == 4 + 5
    synth = [i for s, i in plan if s == 1]
    assert sorted(synth[:2]) == [0, 1]  # every sample before any repeat
    assert plan == mix_plan([Source(toy), Source(small, count=5)], seed=0)
    # a 64x64 sample holds 4 crops of 32 ('area'); an int fixes the number
    assert len(mix_plan([Source(toy)], 0, patch_size=32, crops="area")) == 16
    assert len(mix_plan([Source(toy)], 0, patch_size=48, crops="area")) == 4
    assert len(mix_plan([Source(toy)], 0, patch_size=32, crops=3)) == 12
    with pytest.raises(ConfigError, match="crops_per_sample"):
        mix_plan([Source(toy)], 0, patch_size=32, crops=0)
    other = Dataset([], GLYSAC.merged())
    with pytest.raises(ClassSchemeError, match="different class schemes"):
        PatchItems([Source(toy), Source(Dataset(toy.samples, GLYSAC.merged()))], 32)
    with pytest.raises(ConfigError, match="no samples"):
        mix_plan([Source(other)], 0)


def test_patch_items_are_pure_functions_of_seed_epoch_position(toy):
    items = PatchItems([Source(toy)], 40, crop_margin=6, seed=1, samples_per_epoch=10)
    a, b = items.item(0, 3), items.item(0, 3)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert a["image"].shape == (3, 40, 40) and a["image"].dtype == torch.float32
    assert a["np"].shape == a["tp"].shape == (28, 28) and a["hv"].shape == (2, 28, 28)
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert not torch.equal(items.item(1, 3)["image"], a["image"])
    # labels and image stay aligned under crop + dihedral: nuclei are where np says
    assert torch.equal(a["np"], (a["tp"] > 0).long())
    assert torch.all(a["hv"][:, a["np"] == 0] == 0)


def test_patch_items_without_augmentation_match_the_sample(toy):
    sample = toy.samples[0]
    items = PatchItems([Source(Dataset([sample], SCHEME))], 64, crop_margin=0, seed=0, augment=False)
    it = items.item(0, 0)
    assert np.array_equal(it["image"].numpy().transpose(1, 2, 0), sample.image / np.float32(255))
    assert np.array_equal(it["np"].numpy(), (sample.inst_map > 0).astype(np.int64))
    assert np.array_equal(it["tp"].numpy(), sample.type_map)


def test_small_sources_are_mirror_padded_with_background_labels(toy):
    sample = toy.samples[0]  # 64x64, a 256 patch for a 270 model in miniature
    items = PatchItems([Source(Dataset([sample], SCHEME))], 70, crop_margin=3, seed=0, augment=False)
    it = items.item(0, 0)
    img = it["image"].numpy().transpose(1, 2, 0)
    assert np.array_equal(img[3:67, 3:67], sample.image / np.float32(255))
    assert np.array_equal(img[2, 3:67], sample.image[1] / np.float32(255))  # reflect
    assert np.array_equal(it["np"].numpy(), (sample.inst_map > 0).astype(np.int64))  # 64x64 out


def test_rank_positions_split_like_distributed_sampler(toy):
    items = PatchItems([Source(toy)], 32, samples_per_epoch=7)
    r0, r1 = items.rank_positions(0, 0, 2), items.rank_positions(0, 1, 2)
    assert len(r0) == len(r1) == 4
    assert sorted(set(r0) | set(r1)) == list(range(7))
    assert items.rank_positions(0, 0, 1) == list(range(7))


# --------------------------------------------------------------------------- training


def test_two_phases_schedule_freezing_and_run_folder(toy, tmp_path):
    cfg = SegTrainConfig.model_validate({**TINY, "phase1_epochs": 2, "keep_checkpoints": 10})
    out = tmp_path / "run"
    final = train_segmenter(toy, out, cfg, preset="test", progress=False, num_threads=1)
    log = read_log(out)
    steps_per_epoch = 16 // 4
    assert [r["step"] for r in log] == list(range(1, 4 * steps_per_epoch + 1))
    assert [r["phase"] for r in log] == [1] * 8 + [2] * 8
    # StepLR x0.1 at half of each phase, a fresh Adam at phase 2 (hovernet_notes 3)
    assert [r["lr"] for r in log[::steps_per_epoch]] == pytest.approx([1e-3, 1e-4, 1e-3, 1e-4])
    assert all(np.isfinite(r["loss"]) for r in log)
    # phase 1 leaves the (frozen) encoder at its initial weights, phase 2 changes it
    torch.manual_seed(cfg.seed)
    init = build_segmenter({**cfg.model.model_dump(), "num_classes": 4}).state_dict()
    after_p1, _ = load_checkpoint(out / "ckpt_00000008.safetensors")
    last, meta = load_checkpoint(final)
    key_enc, key_dec = "stem.0.weight", "heads.np.out.weight"
    assert torch.equal(after_p1["model"][key_enc], init[key_enc])
    assert not torch.equal(after_p1["model"][key_dec], init[key_dec])
    assert not torch.equal(last["model"][key_enc], init[key_enc])
    assert meta["num_classes"] == 4 and meta["preset"] == "test" and meta["scheme"] == SCHEME.name
    model, _ = load_segmenter(final)
    assert model.num_classes == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["kind"] == "seg-train"
    # re-running a finished run returns its checkpoint without training again
    assert train_segmenter(toy, out, cfg, progress=False) == final
    assert len(read_log(out)) == len(log)
    with pytest.raises(RunFolderError, match="different run"):
        train_segmenter(toy, out, cfg.model_copy(update={"seed": 4}), progress=False)


def test_training_refuses_impossible_batches_and_wrong_patch_sizes(toy, tmp_path):
    with pytest.raises(ConfigError, match="no full batch"):
        train_segmenter(toy, tmp_path / "a", {**TINY, "batch_size": 32}, progress=False)
    with pytest.raises(ConfigError, match="256-px patches"):
        train_segmenter(toy, tmp_path / "b", {"model": {"arch": "hovernet-fast"}, "patch_size": 64}, progress=False)


def _cli_script(args: list[str]) -> list[str]:
    return [sys.executable, "-c", f"from diffmix.cli import main; main({args!r})"]


def test_resume_after_kill9_continues_identically(toy_folder, tmp_path):
    """kill -9 mid-run, re-run the same command: the JSONL losses equal an uninterrupted run's."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**TINY, "phase1_epochs": 2, "phase2_epochs": 4, "samples_per_epoch": 32,
                                      "checkpoint_every": 3}))
    common = ["--train", str(toy_folder), "--preset", str(preset), "--threads", "1", "--no-progress"]
    # The uninterrupted reference runs in this process (same thread count, same arithmetic).
    ref = tmp_path / "ref"
    train_segmenter(str(toy_folder), ref, resolve_config(preset), preset=str(preset), progress=False, num_threads=1)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_script(["seg", "train", str(out), *common]))
    log_path = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if log_path.exists() and len(log_path.read_text().splitlines()) >= 11:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final.safetensors").exists(), "the run finished before it could be killed"
    killed_at = len(read_log(out))
    # what a kill during a checkpoint or log write leaves: the resumed run must delete them
    (out / ".ckpt_00000099.k3j4h5g6.tmp.safetensors").write_bytes(b"half a checkpoint")
    (out / ".log.abcdefgh.tmp.jsonl").write_bytes(b"{")
    subprocess.run(_cli_script(["seg", "train", str(out), *common]), check=True, timeout=300)
    # every file but the log (wall-clock timings) is byte for byte the uninterrupted run's
    ref_files = sorted(p.name for p in ref.iterdir() if p.name != LOG_NAME)
    assert sorted(p.name for p in out.iterdir() if p.name != LOG_NAME) == ref_files
    for name in ref_files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = read_log(out), read_log(ref)
    assert killed_at < len(want) == 48
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert {k: v for k, v in a.items() if k != "sec"} == {k: v for k, v in b.items() if k != "sec"}
    wa, _ = load_checkpoint(out / "final.safetensors")
    wb, _ = load_checkpoint(ref / "final.safetensors")
    for k in wb["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k


def test_ddp_two_processes_under_torchrun(toy_folder, tmp_path):
    exe = Path(sys.executable).parent / "diffmix"
    if not exe.exists():
        pytest.skip("diffmix console script not installed in this environment")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**TINY, "phase1_epochs": 1, "phase2_epochs": 1}))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           str(exe), "seg", "train", "--train", str(toy_folder), str(out), "--preset", str(preset),
           "--threads", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(out)
    # 16 patches per epoch split over 2 ranks = 8 each = 2 steps of 4 per epoch, written once (rank 0)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    model, meta = load_segmenter(out / "final.safetensors")
    assert meta["num_classes"] == 4
    assert res.stdout.count("checkpoint:") == 1


def test_cli_train_with_extra_counts_and_errors(toy_folder, tmp_path, capsys):
    from diffmix.cli import main

    assert parse_dataset_arg("data/synth@12") == ("data/synth", 12)
    assert parse_dataset_arg(str(toy_folder)) == (str(toy_folder), None)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**TINY, "phase2_epochs": 1, "samples_per_epoch": None}))
    out = tmp_path / "cli"
    main(["seg", "train", "--train", str(toy_folder), "--extra", f"{toy_folder}@4", str(out),
          "--preset", str(preset), "--no-progress", "--threads", "1"])
    assert f"checkpoint: {out / 'final.safetensors'}" in capsys.readouterr().out
    # 4 originals + 4 extra = 8 samples of 64x64, 4 crops of 32x32 each ('area') = 32 patches
    # per epoch = 8 steps of 4, for 2 epochs
    assert len(read_log(out)) == 16
    sources = yaml.safe_load((out / "config.yaml").read_text())["sources"]
    assert [s["count"] for s in sources] == [None, 4]
    with pytest.raises(SystemExit) as exc:
        main(["seg", "train", "--train", str(tmp_path / "missing"), str(tmp_path / "x"), "--preset", "cpu-tiny"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["seg", "train", "--train", str(toy_folder), str(tmp_path / "y"), "--preset", "cpu-tiny",
              "--pretrained", str(tmp_path / "weights.tar")])
    assert exc.value.code == 2
    assert "HoVer-Net encoders only" in capsys.readouterr().err


def test_cli_infer_writes_consep_labels_for_a_trained_checkpoint(toy, toy_folder, tmp_path, capsys):
    """`diffmix seg infer` on a `seg train` checkpoint writes one CoNSeP .mat per image."""
    from diffmix.cli import main
    from diffmix.data.io import read_mat_labels

    final = train_segmenter(toy, tmp_path / "run", {**TINY, "phase1_epochs": 0, "phase2_epochs": 1},
                            progress=False, num_threads=1)
    out = tmp_path / "pred"
    main(["seg", "infer", str(final), str(toy_folder), str(out), "--no-progress"])
    assert "4 image(s) segmented" in capsys.readouterr().out
    mats = sorted((out / "Labels").glob("*.mat"))
    assert [m.stem for m in mats] == [s.name for s in toy.samples]
    labels = read_mat_labels(mats[0])
    assert labels["inst_map"].shape == toy.samples[0].inst_map.shape
    with pytest.raises(SystemExit) as exc:
        main(["seg", "infer", str(tmp_path / "none.safetensors"), str(toy_folder), str(tmp_path / "p2")])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- learning floor


def test_small_net_learns_toy_nuclei_far_above_chance(tmp_path):
    """A short (~15 CPU s) cpu-tiny-style run on toy tiles segments and classifies held-out tiles.

    Chance levels: an empty or random prediction has PQ ~0; always answering the majority class
    gives a type accuracy equal to its share (0.35 here). Measured with this seed (one thread):
    PQ 0.58, accuracy 0.59; the full cpu-tiny preset does much better (see the seg report).
    """
    from collections import Counter

    from diffmix.metrics import evaluate_samples
    from diffmix.seg.infer import segment_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = Dataset(generate_toy_samples(6, 128, seed=0), SCHEME)
        test = generate_toy_samples(4, 128, seed=99)
        cfg = resolve_config("cpu-tiny", {"model": {"width": 8}, "phase1_epochs": 1, "phase2_epochs": 6,
                                          "samples_per_epoch": 96, "lr": 1e-3, "seed": 0})
        final = train_segmenter(train, tmp_path / "run", cfg, progress=False)
        model, _ = load_segmenter(final)
        preds = [segment_image(model, s.image)[:2] for s in test]
    finally:
        torch.set_num_threads(threads)
    res = evaluate_samples([(s.inst_map, s.type_map) for s in test], preds, (1, 2, 3, 4))
    classes = Counter(
        int(np.bincount(s.type_map[s.inst_map == i]).argmax()) for s in test for i in np.unique(s.inst_map) if i
    )
    majority = max(classes.values()) / sum(classes.values())
    assert res["mean"]["pq"] > 0.4, res["mean"]
    assert res["type"]["acc"] > majority + 0.15, (res["type"], majority)
