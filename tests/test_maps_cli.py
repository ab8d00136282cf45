"""`diffmix maps balance|enlarge` and `diffmix gradmix`: dataset folders in, dataset folders out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmix.cli import main
from diffmix.data.io import read_dataset, write_dataset
from diffmix.data.schemes import CONSEP, GLYSAC
from diffmix.errors import ConfigError
from diffmix.maps.balance import BalanceParams, balance_dataset
from diffmix.maps.cli import parse_distribution, resolve_class
from diffmix.maps.enlarge import enlarge_dataset
from diffmix.maps.gradmix import gradmix_dataset

from test_maps_balance import ellipse_dataset


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("maps") / "train"
    rng = np.random.default_rng(0)
    samples = [s.replace(image=rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)) for s in ellipse_dataset(seed=2)]
    write_dataset(root, samples, CONSEP, {"kind": "test"})
    return root


def test_resolve_class_names_prefixes_and_ids():
    assert resolve_class(CONSEP, "misc") == 1
    assert resolve_class(CONSEP, "Inflammatory") == 2
    assert resolve_class(CONSEP, "3") == 3
    assert resolve_class(GLYSAC, "lymph") == 2
    with pytest.raises(ConfigError, match="unknown class 'tumour'"):
        resolve_class(CONSEP, "tumour")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_class(CONSEP, "7")
    assert parse_distribution(CONSEP, ["misc=0.25"]) == {1: 0.25}
    assert parse_distribution(CONSEP, ["1=0.25,spindle=0.3"]) == {1: 0.25, 4: 0.3}
    assert parse_distribution(CONSEP, []) is None
    with pytest.raises(ConfigError, match="CLASS=PROPORTION"):
        parse_distribution(CONSEP, ["misc"])
    with pytest.raises(ConfigError, match="twice"):
        parse_distribution(CONSEP, ["misc=0.2,1=0.3"])


def test_balance_command_writes_merged_folder_with_provenance(dataset_dir, tmp_path, capsys):
    out = tmp_path / "bal"
    assert run(["maps", "balance", str(dataset_dir), str(out), "--seed", "3", "--target-distribution", "misc=0.3"]) == 0
    ds = read_dataset(dataset_dir)
    want, report = balance_dataset(ds.samples, BalanceParams(minor_class=1, seed=3, target_distribution={1: 0.3}))
    got = read_dataset(out)
    assert [s.name for s in got] == [s.name for s in want]
    for g, w, orig in zip(got, want, ds.samples):
        assert np.array_equal(g.inst_map, w.inst_map) and np.array_equal(g.type_map, w.type_map)
        assert np.array_equal(g.image, orig.image)  # label-only maps keep the original image
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["merged"] is True
    prov = meta["provenance"]
    assert prov["seed"] == 3 and prov["params"]["fraction"] == 0.8 and prov["params"]["target_distribution"] == {"1": 0.3}
    assert prov["report"]["accepted_swaps"] == report.accepted_swaps
    assert "maps balance" in prov["command"]
    text = capsys.readouterr().out
    assert f"{report.accepted_swaps} swaps" in text and "requested class 1 share 30.00%" in text


def test_enlarge_command(dataset_dir, tmp_path):
    out = tmp_path / "enl"
    assert run(["maps", "enlarge", str(dataset_dir), str(out), "--patch", "64", "--stride", "28", "--no-overlap", "--seed", "2"]) == 0
    got = read_dataset(out)
    want = enlarge_dataset(read_dataset(dataset_dir).samples, patch=64, stride=28, seed=2, no_overlap=True)
    # offsets {0, 28, 56}: 9 patches per 120-px image
    assert len(got) == len(want) == 27
    assert all(np.array_equal(g.inst_map, w.inst_map) and np.array_equal(g.image, w.image) for g, w in zip(got, want))
    prov = json.loads((out / "dataset.json").read_text())["provenance"]
    assert prov["params"]["no_overlap"] is True and prov["seed"] == 2


def test_gradmix_command(dataset_dir, tmp_path):
    out = tmp_path / "gm"
    assert run(["gradmix", str(dataset_dir), str(out), "--seed", "1"]) == 0
    got = read_dataset(out)
    want, _ = gradmix_dataset(read_dataset(dataset_dir).samples, BalanceParams(minor_class=1, seed=1))
    assert all(np.array_equal(g.image, w.image) and np.array_equal(g.inst_map, w.inst_map) for g, w in zip(got, want))
    assert json.loads((out / "dataset.json").read_text())["provenance"]["kind"] == "gradmix"


def test_user_errors_exit_2_with_one_line(dataset_dir, tmp_path, capsys):
    assert run(["maps", "balance", str(dataset_dir), str(tmp_path / "x"), "--minor-class", "tumour"]) == 2
    assert "unknown class 'tumour'" in capsys.readouterr().err
    assert run(["maps", "balance", str(dataset_dir), str(tmp_path / "y"), "--target-distribution", "spindle=0.5"]) == 2
    assert "only set the minor class" in capsys.readouterr().err
    assert run(["maps", "balance", str(tmp_path / "missing"), str(tmp_path / "z")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_gradmix_command_takes_the_balancing_options_of_maps_balance(dataset_dir, tmp_path):
    """`diffmix gradmix --border --area-ratio` (run as a user runs it) balance as `maps balance`
    does, and both commands' balancing options are one definition: same names, defaults, help."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import typer

    from diffmix.cli import app

    out = tmp_path / "gm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "diffmix", "gradmix", str(dataset_dir), str(out), "--border", "12",
                          "--area-ratio", "1.5", "--seed", "1"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    samples = read_dataset(dataset_dir).samples
    want, report = gradmix_dataset(samples, BalanceParams(minor_class=1, border=12.0, area_ratio=1.5, seed=1))
    default, _ = gradmix_dataset(samples, BalanceParams(minor_class=1, seed=1))
    got = read_dataset(out)
    assert all(np.array_equal(g.image, w.image) and np.array_equal(g.inst_map, w.inst_map) for g, w in zip(got, want))
    assert any(not np.array_equal(w.inst_map, d.inst_map) for w, d in zip(want, default))  # the options matter here
    prov = json.loads((out / "dataset.json").read_text())["provenance"]
    assert prov["params"]["border"] == 12.0 and prov["params"]["area_ratio"] == 1.5
    assert prov["report"]["accepted_swaps"] == report.accepted_swaps
    assert "--border 12.0 --area-ratio 1.5 --seed 1" in prov["command"]

    group = typer.main.get_command(app)
    gradmix_params = {p.name: p for p in group.commands["gradmix"].params}
    balance_params = {p.name: p for p in group.commands["maps"].commands["balance"].params}
    for name in ("minor_class", "fraction", "border", "area_ratio", "target_distribution", "seed"):
        a, b = gradmix_params[name], balance_params[name]
        assert (a.opts, a.default, a.help) == (b.opts, b.default, b.help), name
    defaults = BalanceParams()
    assert (balance_params["fraction"].default, balance_params["border"].default,
            balance_params["area_ratio"].default) == (defaults.fraction, defaults.border, defaults.area_ratio)
