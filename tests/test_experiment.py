"""The five-arm experiment end to end on a micro config, plus its pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmix.config import build_config
from diffmix.data.schemes import CONSEP
from diffmix.errors import ConfigError, RunFolderError
from diffmix.pipeline.experiment import ARMS, ExperimentConfig, arm_epochs, fold_splits, load_experiment_config
from diffmix.pipeline.report import best_per_column, summarise, table1_markdown

MICRO = {
    "name": "micro",
    "seed": 0,
    "data": {"toy": {"n_train": 4, "n_test": 2, "size": 64, "seed": 3, "rare_fraction": 0.1}},
    "folds": 1,
    "seeds": 2,
    "sdm": {
        "preset": "cpu-tiny",
        "overrides": {"phase1_steps": 2, "phase2_steps": 1, "batch_size": 2, "checkpoint_every": 2,
                      "sample_every": 0,
                      "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [16]}},
    },
    # 64-px toy tiles hold few nuclei: a 30-px border and the 2.3x area rule would leave no swap,
    # so the micro run balances with an 8-px border and any smaller source.
    "synthesis": {"patch": 32, "stride": 32, "steps": 4, "batch_size": 16, "max_patches": 6,
                  "balance": {"border": 8, "area_ratio": 1.0}},
    "seg": {"preset": "cpu-tiny", "patch": 32, "stride": 32, "infer_batch_size": 4,
            "overrides": {"patch_size": 32, "batch_size": 4, "batch_size_phase2": 4, "samples_per_epoch": None,
                          "model": {"arch": "small", "width": 8, "depth": 2}}},
    "epochs": {"baseline": 2, "diffmix_b": 2, "diffmix_e": 2, "gradmix": 1, "diffmix": 1},
    "utility": {"steps": 2, "width": 4, "crop": 16, "seeds": 2},
    "sample_rows": 2,
}


def test_fold_splits() -> None:
    names = [f"img{i}" for i in range(7)]
    splits = fold_splits(names, 3, seed=0)
    assert len(splits) == 3
    held = [set(names) - set(s) for s in splits]
    assert set().union(*held) == set(names) and sum(len(h) for h in held) == 7  # each image held out once
    assert fold_splits(names, 3, seed=0) == splits
    assert fold_splits(names, 1, seed=0) == [sorted(names)]
    with pytest.raises(ConfigError, match="8 folds need at least 8"):
        fold_splits(names, 8, seed=0)


def test_arm_epochs_and_presets() -> None:
    assert arm_epochs(100) == {"phase1_epochs": 50, "phase2_epochs": 50}
    assert arm_epochs(75) == {"phase1_epochs": 37, "phase2_epochs": 38}
    paper = load_experiment_config("paper-consep")
    assert paper.folds == 5 and paper.synthesis.start_fraction == "0.55" and paper.synthesis.steps == 100
    assert paper.epochs == {"baseline": 100, "diffmix_b": 75, "diffmix_e": 75, "gradmix": 50, "diffmix": 50}
    with pytest.raises(ConfigError, match=r"epochs has no entry for arms \['gradmix', 'diffmix_b'"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "epochs": {"baseline": 1}})
    study = load_experiment_config("consep-cpu")  # docs/study.md: >= 3 seeds, equal steps per arm
    assert study.seeds >= 3 and study.utility is not None and study.folds == 1
    assert {"baseline", "gradmix", "diffmix"} <= set(study.arms)
    assert len({study.epochs[a] for a in study.arms}) == 1 and study.seg.overrides["samples_per_epoch"]
    assert study.sdm.preset == "consep-cpu" and study.synthesis.patch == study.seg.patch == 64
    with pytest.raises(ConfigError, match="exactly one of data.toy and data.train"):
        load_experiment_config("demo", {"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="unknown experiment preset 'nope'"):
        load_experiment_config("nope")


def test_summary_and_table() -> None:
    folds = [{"pq": 0.5, "acc": 0.8, "f1_1": 0.1}, {"pq": 0.7, "acc": 0.6, "f1_1": 0.3}]
    s = summarise(folds)
    assert s["mean"]["pq"] == pytest.approx(0.6) and s["std"]["pq"] == pytest.approx(0.1414213562)
    summary = {"baseline": s, "diffmix": summarise([{"pq": 0.6, "acc": 0.9, "f1_1": 0.2}] * 2)}
    best = best_per_column(summary, ["pq", "acc", "f1_1"])
    assert best == {"acc": {"diffmix"}}  # pq and f1_1 tie across every arm: nothing is best
    three = {**summary, "gradmix": summarise([{"pq": 0.1, "acc": 0.1, "f1_1": 0.1}])}
    assert best_per_column(three, ["pq"]) == {"pq": {"baseline", "diffmix"}}
    results = {"arms": {a: {"folds": folds, "summary": summary[a]} for a in summary}}
    md = table1_markdown(results, CONSEP)
    assert "| Baseline |" in md and "**0.850 ± 0.071**" not in md and "**0.900 ± 0.000**" in md
    assert "F miscellaneous" in md


def test_micro_experiment_all_arms(tmp_path: Path) -> None:
    from diffmix.pipeline.experiment import run_experiment

    cfg = ExperimentConfig.model_validate(MICRO)
    out = tmp_path / "exp"
    results, paths = run_experiment(cfg, out, device="cpu", progress=False)
    assert list(results["arms"]) == list(ARMS)
    for arm, r in results["arms"].items():
        assert len(r["folds"]) == 2
        for key in ("dice", "aji", "dq", "sq", "pq", "acc", "f1_1", "f1_2", "f1_3", "f1_4"):
            assert 0.0 <= r["summary"]["mean"][key] <= 1.0, (arm, key)
    assert set(results["fidelity"]) == {"DiffMix-B maps", "DiffMix-E maps", "GradMix"}
    # every synthetic pool is cut at the same 6 grid positions (GradMix included)
    pools = {k: sorted(p.name for p in (out / "synth" / k / "Labels").iterdir()) for k in ("balance", "enlarge", "gradmix")}
    assert len(pools["gradmix"]) == 6 and pools["gradmix"] == pools["balance"] == pools["enlarge"]
    # two seeds of one fold: separate runs with their own training seed
    assert sorted(p.name for p in (out / "seg" / "baseline").iterdir()) == ["fold0-seed0", "fold0-seed1"]
    iv = results["intervals"]
    assert iv["n_runs"] == 2 and iv["metrics"] == ["f1_1", "pq"]
    assert set(iv["differences"]) == {"diffmix - baseline", "diffmix - gradmix", "diffmix_b - baseline", "gradmix - baseline"}
    d = iv["differences"]["diffmix - baseline"]["pq"]
    means = {a: results["arms"][a]["summary"]["mean"]["pq"] for a in ("diffmix", "baseline")}
    assert d["estimate"] == pytest.approx(means["diffmix"] - means["baseline"])
    assert d["low"] <= d["estimate"] <= d["high"]
    assert list(results["utility"]["arms"]) == ["real", "real, class-balanced", "real + DiffMix-B",
                                                "real + DiffMix-E", "real + GradMix"]
    for name in ("report.md", "report.html", "results.json", "figures/class_distribution.png", "figures/samples.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "DiffMix-E" in html
    md = (out / "report.md").read_text()
    assert "paired differences with 95% intervals" in md and "DiffMix − Baseline" in md
    assert "Utility" in md and "(real + DiffMix-B) − real" in md
    assert "Recognition" in md and "| real test |" in md and "| DiffMix-B |" in md
    assert "cannot show whether DiffMix helps" in md  # the toy caveat (issue 10 item 5)
    counts = results["class_counts"]
    assert counts["balancing maps"][1] > counts["original"][1]  # balancing adds minor-class nuclei
    stages = (out / "stages.jsonl").read_text()
    # A re-run finds every stage cached: nothing is recomputed and the numbers are the same.
    again, _ = run_experiment(cfg, out, device="cpu", progress=False)
    assert (out / "stages.jsonl").read_text() == stages
    assert json.dumps(again["arms"], sort_keys=True) == json.dumps(results["arms"], sort_keys=True)
    other = ExperimentConfig.model_validate({**MICRO, "seed": 1})
    with pytest.raises(RunFolderError, match="different run"):
        run_experiment(other, out, device="cpu", progress=False)
