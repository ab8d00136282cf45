"""SDM training: config and presets, counter-based items, EMA, kill -9 resume, 2-process DDP, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffmix.cli import main
from diffmix.errors import ConfigError
from diffmix.sdm.data import NUM_AUGMENTATIONS, item_indices, training_batch
from diffmix.sdm.train import (
    SDMTrainConfig,
    ema_rate_at,
    ema_update,
    resolve_train_config,
    sample_grid,
    train_sdm,
)
from diffmix.sdm.unet import UNetConfig, UNetModel, build_unet, count_parameters

# A U-Net small enough for CI: 16-px crops, two levels, attention on the 8x8 level.
TINY_UNET = {
    "image_size": 16,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "num_head_channels": 32,
}
LOSS_KEYS = ("step", "phase", "lr", "mse", "vb", "loss")


def _tiny_cfg(**kw) -> dict:
    base = {
        "unet": dict(TINY_UNET),
        "crop_size": 16,
        "batch_size": 2,
        "phase1_steps": 8,
        "phase2_steps": 4,
        "checkpoint_every": 4,
        "keep_checkpoints": 5,
        "sample_every": 0,
        "ema_warmup": True,
        "seed": 3,
    }
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from diffmix.data.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", n_images=2, size=32, seed=0)


@pytest.fixture()
def one_thread():
    """CPU kernels with one thread give the same bits in this process and in the subprocesses."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


# -- config ----------------------------------------------------------------------------------


def test_presets_resolve_with_dataset_label_channels():
    tiny = resolve_train_config("cpu-tiny", None, 4)
    assert tiny.unet.label_nc == 6 and tiny.crop_size == 32 and tiny.batch_size == 16
    # design.md calibration: ~4.9 M parameters
    assert count_parameters(build_unet(tiny.unet, "meta")) == pytest.approx(4.9e6, rel=0.02)
    assert resolve_train_config("cpu-tiny", None, 3).unet.label_nc == 5
    consep = resolve_train_config("paper-consep", {"phase1_steps": 10}, 4)
    assert consep.phase1_steps == 10 and consep.phase1_lr == 1e-4 and consep.phase2_lr == 2e-5
    assert consep.phase2_label_drop == 0.2 and consep.ema_rate == 0.9999 and not consep.ema_warmup
    assert count_parameters(build_unet(consep.unet, "meta")) == 652_256_518
    glysac = resolve_train_config("paper-glysac", None, 3)
    assert count_parameters(build_unet(glysac.unet, "meta")) == 652_198_918


def test_config_errors():
    with pytest.raises(ConfigError, match="label_nc"):
        resolve_train_config("paper-consep", None, 3)  # GLySAC data with the CoNSeP preset
    with pytest.raises(ConfigError, match="bach_size"):
        resolve_train_config("cpu-tiny", {"bach_size": 4}, 4)
    with pytest.raises(ConfigError, match="crop_size"):
        resolve_train_config("cpu-tiny", {"crop_size": 30}, 4)
    with pytest.raises(ConfigError, match="unknown sdm preset"):
        resolve_train_config("paper-pannuke", None, 4)


# -- items -----------------------------------------------------------------------------------


def test_item_stream_covers_epochs_and_splits_ranks():
    n = 18
    # two ranks x batch 3 x 3 steps = one epoch: every item exactly once, ranks disjoint
    seen = np.concatenate([item_indices(n, s, 3, seed=1, rank=r, world_size=2) for s in range(3) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(n))
    assert np.array_equal(item_indices(n, 5, 4, 1), item_indices(n, 5, 4, 1))
    assert not np.array_equal(item_indices(n, 0, 6, 1), item_indices(n, 0, 6, 2))
    # fewer items than a batch: the stream runs over epoch ends
    assert len(item_indices(6, 0, 16, 0)) == 16


def test_training_batch_is_deterministic(toy):
    from diffmix.data.io import read_dataset

    samples = read_dataset(toy).samples
    a = training_batch(samples, step=7, batch_size=4, crop_size=16, seed=0)
    b = training_batch(samples, step=7, batch_size=4, crop_size=16, seed=0)
    c = training_batch(samples, step=7, batch_size=4, crop_size=16, seed=0, rank=1, world_size=2)
    assert a.image.shape == (4, 3, 16, 16) and a.image.dtype == torch.float32
    assert a.inst_map.dtype == torch.int32 and a.type_map.dtype == torch.int64
    assert a.image.min() >= -1 and a.image.max() <= 1
    assert torch.equal(a.image, b.image) and torch.equal(a.inst_map, b.inst_map)
    assert not torch.equal(a.image, c.image)
    assert a.items.max() < NUM_AUGMENTATIONS * len(samples)
    # instance ids are contiguous per crop (patches.crop remaps them)
    for inst in a.inst_map:
        ids = torch.unique(inst[inst > 0])
        assert torch.equal(ids, torch.arange(1, len(ids) + 1, dtype=ids.dtype))


# -- EMA -------------------------------------------------------------------------------------


def test_ema_update_and_warmup():
    model = torch.nn.Linear(2, 1)
    ema = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 0.25))
    cfg = SDMTrainConfig(unet=UNetConfig(**TINY_UNET), crop_size=16)
    assert ema_rate_at(cfg, 0) == 0.9999 and ema_rate_at(cfg, 10**6) == 0.9999
    warm = cfg.model_copy(update={"ema_warmup": True})
    assert ema_rate_at(warm, 0) == pytest.approx(0.1) and ema_rate_at(warm, 90) == pytest.approx(0.91)
    assert ema_rate_at(warm, 10**6) == 0.9999


# -- sample grid -----------------------------------------------------------------------------


def test_sample_grid_layout():
    from diffmix.sdm.diffusion import GaussianDiffusion

    torch.manual_seed(0)
    model = UNetModel(UNetConfig(**TINY_UNET, label_nc=6))
    y0 = torch.zeros(2, 3, 16, 16)
    inst = torch.zeros(2, 16, 16, dtype=torch.int32)
    inst[1, 4:8, 4:8] = 1
    types = (inst > 0).long() * 2
    from diffmix.sdm.settings import SamplerSettings

    grid = sample_grid([model, model], y0, inst, types, 4, settings=SamplerSettings(steps=10, start_fraction="0.5"),
                       seed=0, diffusion=GaussianDiffusion.linear())
    scale = 128 // 16
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 16 * scale + 2, 4 * 16 * scale + 3 * 2, 3)
    # row 0 shows tile 1's label map (rolled): a class-2 square with white edges
    label0 = grid[: 16 * scale, : 16 * scale]
    assert (label0 == 255).all(-1).any() and (label0 != 0).any()
    # y0 column is mid-grey (0 -> 128)
    assert (grid[: 16 * scale, 16 * scale + 2 : 32 * scale + 2] == 128).all()


# -- training runs ---------------------------------------------------------------------------


def _load_toy(toy):
    from diffmix.data.io import read_dataset

    return read_dataset(toy)


def test_resume_after_kill_matches_uninterrupted_run(toy, tmp_path, one_thread):
    data = _load_toy(toy)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(_tiny_cfg()))

    # uninterrupted reference run, in this process
    cfg = resolve_train_config(preset, None, data.scheme.num_classes)
    ref = train_sdm(data.samples, data.scheme.num_classes, tmp_path / "ref", cfg,
                    run_info={"dataset": str(Path(toy).resolve())}, progress=False)
    ref_log = _records(tmp_path / "ref")
    assert [r["step"] for r in ref_log] == list(range(1, 13))
    assert [r["phase"] for r in ref_log] == [1] * 8 + [2] * 4
    assert [r["lr"] for r in ref_log] == [1e-4] * 8 + [2e-5] * 4

    # the CLI in a subprocess, killed with SIGKILL right after its first checkpoint
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from diffmix.cli import main; main()", "sdm", "train", str(toy), str(run),
           "--preset", str(preset), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "ckpt_0000004.safetensors").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"training subprocess ended before its first checkpoint: {proc.communicate()[1][-2000:]!r}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; the test proved nothing"
    killed_at = len(_records(run))
    assert 4 <= killed_at < 12
    # what a kill during a checkpoint write leaves: the resumed run must delete it
    (run / ".ckpt_0000008.k3j4h5g6.tmp.safetensors").write_bytes(b"half a checkpoint")

    # re-running the same command resumes from the checkpoint (in-process, same CLI)
    main(["sdm", "train", str(toy), str(run), "--preset", str(preset), "--no-progress"])
    # every file but the log (wall-clock timings) is byte for byte the uninterrupted run's:
    # checkpoints hold no process-random RNG state and their metadata has one fixed order
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != "log.jsonl")
    assert sorted(p.name for p in run.iterdir() if p.name != "log.jsonl") == ref_files
    for name in ref_files:
        assert (run / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    got = _records(run)
    assert [r["step"] for r in got] == list(range(1, 13))  # no duplicated or missing records
    for a, b in zip(got, ref_log):
        assert {k: a[k] for k in LOSS_KEYS} == {k: b[k] for k in LOSS_KEYS}
    from diffmix.checkpoints import load_checkpoint

    s_ref, m_ref = load_checkpoint(tmp_path / "ref" / "ckpt_0000012.safetensors")
    s_run, m_run = load_checkpoint(run / "ckpt_0000012.safetensors")
    assert m_run["step"] == 12 and m_run["phase"] == 2 and m_run["ema_updates"] == 12
    for part in ("model", "ema"):
        for key, value in s_ref[part].items():
            assert torch.equal(value, s_run[part][key]), (part, key)
    # the loss fell from the first steps to the last ones (a real optimisation happened)
    assert np.mean([r["mse"] for r in ref_log[-4:]]) < np.mean([r["mse"] for r in ref_log[:4]])
    assert all(k in ref.model.state_dict() for k in s_ref["model"])

    # a re-run on a finished folder does nothing; a changed config is refused
    main(["sdm", "train", str(toy), str(run), "--preset", str(preset), "--no-progress"])
    assert len(_records(run)) == 12
    with pytest.raises(SystemExit) as exc:
        main(["sdm", "train", str(toy), str(run), "--preset", str(preset), "--steps", "9", "--no-progress"])
    assert exc.value.code == 2


DDP_WORKER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from diffmix.data.io import read_dataset
    from diffmix.distributed import cleanup, init_distributed
    from diffmix.sdm.train import resolve_train_config, train_sdm
    toy, out, preset = sys.argv[1:4]
    data = read_dataset(toy)
    cfg = resolve_train_config(preset, None, data.scheme.num_classes)
    res = train_sdm(data.samples, data.scheme.num_classes, out, cfg, progress=False)
    rank = init_distributed().rank
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
    cleanup()
    """
)


def test_ddp_two_gloo_ranks_keep_identical_weights(toy, tmp_path):
    from safetensors.torch import load_file

    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(_tiny_cfg(phase1_steps=3, phase2_steps=1, checkpoint_every=2)))
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(script), str(toy), str(out), str(preset)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = load_file(str(out / "rank0.safetensors"))
    w1 = load_file(str(out / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    # the weights moved away from the (shared) initialisation
    torch.manual_seed(3)
    init = UNetModel(UNetConfig(**TINY_UNET, label_nc=6)).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)
    # only rank 0 wrote the log; it holds the cross-rank mean of each step, 4 records
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]
    assert (out / "ckpt_0000004.safetensors").exists()


# -- sample command --------------------------------------------------------------------------


def test_sample_command_writes_dataset_with_the_maps(toy, tmp_path, one_thread):
    from diffmix.data.io import read_dataset

    data = read_dataset(toy)
    cfg = resolve_train_config(None, _tiny_cfg(phase1_steps=1, phase2_steps=0, crop_size=16), data.scheme.num_classes)
    res = train_sdm(data.samples, data.scheme.num_classes, tmp_path / "run", cfg, progress=False)
    args = ["sdm", "sample", str(res.checkpoint), "--maps", str(toy), "--steps", "10", "--no-progress", "--seed", "4"]
    main(args + ["--out", str(tmp_path / "a"), "--batch-size", "2"])
    main(args + ["--out", str(tmp_path / "b"), "--batch-size", "1"])
    a, b = read_dataset(tmp_path / "a"), read_dataset(tmp_path / "b")
    assert a.names == data.names
    for sa, sb, so in zip(a, b, data):
        assert np.array_equal(sa.inst_map, so.inst_map) and np.array_equal(sa.type_map, so.type_map)
        assert sa.image.shape == so.image.shape and not np.array_equal(sa.image, so.image)
        # per-patch noise: the batch size changes nothing beyond float rounding
        assert np.abs(sa.image.astype(int) - sb.image.astype(int)).max() <= 1
    provenance = json.loads((tmp_path / "a" / "dataset.json").read_text())["provenance"]
    assert provenance["generator"] == "diffmix sdm sample" and provenance["maps"] == ["own"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [r["name"] for r in manifest["patches"]] == data.names
    # the default sampler (UniPC, 5 passes) is written out in full
    assert manifest["patches"][0]["sampler"] == {"steps": 10, "start_fraction": "0.55", "guidance_scale": 1.5,
                                                 "eta": 0.0, "solver": "unipc", "passes": 5, "spacing": "logsnr",
                                                 "weights": "auto"}
    # the raw weights give a different (but equally labelled) dataset
    main(args + ["--out", str(tmp_path / "raw"), "--weights", "model"])
    raw = read_dataset(tmp_path / "raw")
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(raw, a))
    # a finished folder re-run resumes (nothing to do); other settings on it are refused
    before = {p.name: p.read_bytes() for p in (tmp_path / "a" / "Images").iterdir()}
    main(args + ["--out", str(tmp_path / "a")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "a" / "Images").iterdir()} == before
    with pytest.raises(SystemExit) as exc:
        main(args[:-1] + ["5", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    # maps with another number of classes do not fit the model's label channels
    from diffmix.data.io import write_dataset
    from diffmix.data.sample import NucleiSample
    from diffmix.data.schemes import GLYSAC

    three = [NucleiSample(s.image, s.inst_map, np.minimum(s.type_map, 3), s.name) for s in data]
    glysac = write_dataset(tmp_path / "glysac", three, GLYSAC.merged())
    bad = ["sdm", "sample", str(res.checkpoint), "--maps", str(glysac), "--out", str(tmp_path / "c"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 2
    assert not (tmp_path / "c").exists()


def test_import_command_then_sample(toy, tmp_path, one_thread):
    """`sdm import` turns an official-layout .pt state dict into a file `sdm sample` runs."""
    torch.manual_seed(0)
    model = UNetModel(UNetConfig(**TINY_UNET, label_nc=6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(model.state_dict(), tmp_path / "official.pt")
    main(["sdm", "import", str(tmp_path / "official.pt"), str(tmp_path / "imported.safetensors"),
          "--image-size", "16", "--num-head-channels", "32"])
    from diffmix.sdm.convert import load_sdm

    loaded, diffusion = load_sdm(tmp_path / "imported.safetensors")
    assert loaded.config.label_nc == 6 and diffusion.num_timesteps == 1000  # no training config: spec 3's T
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    main(["sdm", "sample", str(tmp_path / "imported.safetensors"), "--maps", str(toy), "--out", str(tmp_path / "s"),
          "--steps", "4", "--no-progress"])
    assert len(list((tmp_path / "s" / "Images").glob("*.png"))) == 2
    with pytest.raises(SystemExit) as exc:  # a bad weights choice is a user error
        main(["sdm", "sample", str(tmp_path / "imported.safetensors"), "--maps", str(toy), "--out",
              str(tmp_path / "t"), "--weights", "best", "--no-progress"])
    assert exc.value.code == 2
