"""`diffmix sdm sample`: the synthesis path with each image's own labels as the map kind.

It shares everything with `diffmix synthesize` (model loader, schedule from the checkpoint,
per-patch noise rule, run folder and manifest), so these tests check what is particular to it
and the one bug the separate road had: a schedule that ignored the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmix.checkpoints import save_checkpoint
from diffmix.cli import main
from diffmix.data.io import read_dataset, write_dataset
from diffmix.data.schemes import CONSEP
from diffmix.data.toy import generate_toy_samples
from diffmix.sdm.unet import UNetConfig, UNetModel, build_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path: Path, diffusion_steps: int | None) -> Path:
    """A randomised one-level SDM U-Net saved as `sdm train` saves it (train_config in the
    metadata when `diffusion_steps` is given; an imported file has none)."""
    cfg = UNetConfig(image_size=32, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                     attention_resolutions=(), num_head_channels=32, label_nc=6)
    torch.manual_seed(0)
    model = build_unet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    meta = {"unet_config": cfg.model_dump(mode="json"), "num_classes": 4}
    if diffusion_steps is not None:
        meta["train_config"] = {"diffusion_steps": diffusion_steps}
    state = model.state_dict()
    save_checkpoint(path, {"model": state, "ema": state}, meta)
    return path


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("maps") / "maps"
    write_dataset(root, generate_toy_samples(n_images=2, size=32, seed=3), CONSEP.merged())
    return root


def _seen_timesteps(monkeypatch) -> list[int]:
    """Every network step the U-Net is called with, whatever path the sampler takes."""
    seen: list[int] = []
    forward, guided = UNetModel.forward, UNetModel.forward_guided

    def spy_forward(self, x, t, y, **kw):
        seen.extend(int(v) for v in t.unique())
        return forward(self, x, t, y, **kw)

    def spy_guided(self, x, t, y, **kw):
        seen.extend(int(v) for v in t.unique())
        return guided(self, x, t, y, **kw)

    monkeypatch.setattr(UNetModel, "forward", spy_forward)
    monkeypatch.setattr(UNetModel, "forward_guided", spy_guided)
    return seen


def test_sample_honours_a_checkpoint_trained_with_fewer_diffusion_steps(maps, tmp_path, monkeypatch):
    """A T = 50 SDM never saw t >= 50: ddim10 of ITS schedule keeps 0, 5, ..., 45, and 55% of it
    starts at index 4, t = 20. (The old `sdm sample` respaced a 1000-step schedule: t = 400.)"""
    ckpt = _checkpoint(tmp_path / "t50.safetensors", diffusion_steps=50)
    seen = _seen_timesteps(monkeypatch)
    main(["sdm", "sample", str(ckpt), "--maps", str(maps), "--out", str(tmp_path / "out"), "--steps", "10",
          "--solver", "ddim", "--no-progress", "--device", "cpu"])
    assert sorted(set(seen), reverse=True) == [20, 15, 10, 5, 0]
    assert len(read_dataset(tmp_path / "out")) == 2


def test_sample_of_an_imported_checkpoint_uses_the_official_schedule(maps, tmp_path, monkeypatch):
    """Without a training config (an imported authors' file) the schedule is spec 3's T = 1000."""
    ckpt = _checkpoint(tmp_path / "imported.safetensors", diffusion_steps=None)
    seen = _seen_timesteps(monkeypatch)
    main(["sdm", "sample", str(ckpt), "--maps", str(maps), "--out", str(tmp_path / "out"), "--steps", "10",
          "--solver", "ddim", "--no-progress", "--device", "cpu"])
    assert sorted(set(seen), reverse=True) == [400, 300, 200, 100, 0]


def test_solver_and_passes_from_the_cli_reach_the_manifest(maps, tmp_path, monkeypatch):
    """`--solver unipc --passes 3`: three guided passes on the log-SNR grid from the usual start
    (t = 400 for ddim10 at 55%), recorded in every patch record and the run identity."""
    ckpt = _checkpoint(tmp_path / "ckpt.safetensors", diffusion_steps=1000)
    seen = _seen_timesteps(monkeypatch)
    out = tmp_path / "out"
    args = ["sdm", "sample", str(ckpt), "--maps", str(maps), "--out", str(out), "--steps", "10", "--no-progress",
            "--device", "cpu", "--solver", "unipc", "--passes", "3"]
    main(args)
    assert sorted(set(seen), reverse=True)[0] == 400 and len(set(seen)) == 3 and 0 in seen
    manifest = json.loads((out / "manifest.json").read_text())
    want = {"steps": 10, "start_fraction": "0.55", "guidance_scale": 1.5, "eta": 0.0, "solver": "unipc",
            "passes": 3, "spacing": "logsnr", "weights": "auto"}
    assert manifest["config"]["sampler"] == want and all(r["sampler"] == want for r in manifest["patches"])
    main(args)  # the same settings resume (nothing to do) ...
    with pytest.raises(SystemExit) as exc:  # ... other solver settings are another run
        main(args[:-2] + ["--passes", "4"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # eta is DDIM's
        main(["sdm", "sample", str(ckpt), "--maps", str(maps), "--out", str(tmp_path / "x"), "--solver", "dpmpp-2m",
              "--eta", "0.5", "--no-progress"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
