"""The five-arm experiment end to end on a micro config, plus its pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmix.config import build_config, dump_config
from diffmix.data.schemes import CONSEP
from diffmix.errors import ConfigError, RunFolderError
from diffmix.pipeline.experiment import (
    ARMS,
    ExperimentConfig,
    arm_epochs,
    arm_seg_config,
    fold_splits,
    load_experiment_config,
    split_epochs,
)
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
    assert results["downstream"] == ["hovernet"] and list(results["networks"]) == ["hovernet"]
    block = results["networks"]["hovernet"]
    assert list(block["arms"]) == list(ARMS)
    for arm, r in block["arms"].items():
        assert len(r["folds"]) == 2
        for key in ("dice", "aji", "dq", "sq", "pq", "acc", "f1_1", "f1_2", "f1_3", "f1_4"):
            assert 0.0 <= r["summary"]["mean"][key] <= 1.0, (arm, key)
    assert set(results["fidelity"]) == {"DiffMix-B maps", "DiffMix-E maps", "GradMix"}
    # every synthetic pool is cut at the same 6 grid positions (GradMix included)
    pools = {k: sorted(p.name for p in (out / "synth" / k / "Labels").iterdir()) for k in ("balance", "enlarge", "gradmix")}
    assert len(pools["gradmix"]) == 6 and pools["gradmix"] == pools["balance"] == pools["enlarge"]
    # two seeds of one fold: separate runs with their own training seed; HoVer-Net alone keeps
    # the folder layout it had before `downstream` existed (seg/<arm>, eval/<arm>)
    assert sorted(p.name for p in (out / "seg" / "baseline").iterdir()) == ["fold0-seed0", "fold0-seed1"]
    assert (out / "eval" / "baseline" / "fold0-seed1.json").is_file()
    iv = block["intervals"]
    assert iv["n_runs"] == 2 and iv["metrics"] == ["f1_1", "pq"]
    assert set(iv["differences"]) == {"diffmix - baseline", "diffmix - gradmix", "diffmix_b - baseline", "gradmix - baseline"}
    d = iv["differences"]["diffmix - baseline"]["pq"]
    means = {a: block["arms"][a]["summary"]["mean"]["pq"] for a in ("diffmix", "baseline")}
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
    assert json.dumps(again["networks"], sort_keys=True) == json.dumps(results["networks"], sort_keys=True)
    other = ExperimentConfig.model_validate({**MICRO, "seed": 1})
    with pytest.raises(RunFolderError, match="different run"):
        run_experiment(other, out, device="cpu", progress=False)


#: Two downstream networks on the micro toy data (issue 14 item 3): the small HoVer-style net and
#: a narrow SONNET, baseline and GradMix arms only (no SDM to train), one fold, one seed.
TWO_NETWORKS = {
    **{k: v for k, v in MICRO.items() if k not in ("utility", "seeds", "epochs", "sdm")},
    "name": "two-networks",
    "seeds": 1,
    "arms": ["baseline", "gradmix"],
    "epochs": {"baseline": 2, "gradmix": 1},
    "downstream": ["hovernet", "sonnet"],
    "seg": {**MICRO["seg"], "networks": {"sonnet": {
        "preset": "sonnet-cpu-tiny",
        # SONNET's 50/25/25-style phases of the preset (1/4/1) are stretched to the arm's epochs
        "overrides": {"samples_per_epoch": 4, "batch_size": 2, "batch_size_phase2": 2},
        "epochs": {"baseline": 6, "gradmix": 3},
        "infer_overlap": 0,
    }}},
}


def test_split_epochs_keeps_the_presets_proportions() -> None:
    assert split_epochs(100, [50, 25, 25]) == [50, 25, 25]
    assert split_epochs(75, [50, 25, 25]) == [37, 19, 19]  # 37.5/18.75/18.75: remainders .75 first
    assert split_epochs(50, [50, 25, 25]) == [25, 13, 12]  # a tie goes to the earlier phase
    assert split_epochs(6, [1, 4, 1]) == [1, 4, 1] and split_epochs(3, [1, 4, 1]) == [1, 2, 0]
    assert all(sum(split_epochs(t, [50, 25, 25])) == t for t in range(0, 130))
    with pytest.raises(ConfigError, match="no epochs"):
        split_epochs(10, [0, 0])
    # SONNET's lr step (1e-5 after epoch 25 of 50) stays at half of the stretched phase 1
    cfg = arm_seg_config("sonnet", {}, 50, seed=4)
    assert [(p.epochs, p.lr_step_epochs, p.batch_size) for p in cfg.phases] == [(25, 12, 8), (13, None, 4), (12, None, 4)]
    assert cfg.seed == 4 and cfg.phases[2].self_guided
    # HoVer-Net keeps its half / half shorthand (its run identities do not change)
    hover = arm_seg_config("hovernet-fast", {}, 75, seed=0)
    assert (hover.phase1_epochs, hover.phase2_epochs, hover.phases) == (37, 38, None)


def test_downstream_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown downstream network\(s\) \['unet'\]; known: hovernet, sonnet"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "downstream": ["hovernet", "unet"]})
    with pytest.raises(ConfigError, match="downstream lists a network twice"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "downstream": ["sonnet", "sonnet"]})
    with pytest.raises(ConfigError, match="unknown network 'sonet' in seg.networks; known: hovernet, sonnet"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "seg": {"networks": {"sonet": {"preset": "sonnet"}}}})
    with pytest.raises(ConfigError, match="seg.preset / seg.overrides, not seg.networks.hovernet"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "seg": {"networks": {"hovernet": {"preset": "cpu-tiny"}}}})
    with pytest.raises(ConfigError, match="infer_overlap must be even"):
        build_config(ExperimentConfig, "experiment", None, {**TWO_NETWORKS, "seg": {"networks": {"sonnet": {
            "preset": "sonnet-cpu-tiny", "infer_overlap": 3}}}})
    with pytest.raises(ConfigError, match=r"seg.networks.sonnet.epochs has no entry for arms \['gradmix'\]"):
        build_config(ExperimentConfig, "experiment", None, {**TWO_NETWORKS, "seg": {"networks": {"sonnet": {
            "preset": "sonnet-cpu-tiny", "epochs": {"baseline": 2}}}}})
    # the default (HoVer-Net alone) is left out of config.yaml: older run folders keep their identity
    assert "downstream" not in dump_config(ExperimentConfig.model_validate(MICRO))
    assert "networks" not in dump_config(ExperimentConfig.model_validate(MICRO))["seg"]
    assert dump_config(ExperimentConfig.model_validate(TWO_NETWORKS))["downstream"] == ["hovernet", "sonnet"]
    two = ExperimentConfig.model_validate({**TWO_NETWORKS, "seg": MICRO["seg"]})
    assert two.network("sonnet").preset == "sonnet"  # a network without an entry: its paper preset


def test_two_networks_end_to_end_with_one_table_block_each(tmp_path: Path) -> None:
    """`downstream: [hovernet, sonnet]` on toy data: each network is trained and evaluated per
    arm in its own folders, results.json holds both, and the report prints two Table 1 blocks
    and two interval tables. Inputs are checked before anything is written: a SONNET entry
    whose preset is not a SONNET is refused."""
    from diffmix.pipeline.experiment import run_experiment

    out = tmp_path / "exp"
    wrong = ExperimentConfig.model_validate({**TWO_NETWORKS, "seg": {**TWO_NETWORKS["seg"],
                                              "networks": {"sonnet": {"preset": "cpu-tiny"}}}})
    with pytest.raises(ConfigError, match="seg.networks.sonnet: preset 'cpu-tiny' builds a 'small' network, which is not SONNET"):
        run_experiment(wrong, out, device="cpu", progress=False)
    assert not out.exists()

    cfg = ExperimentConfig.model_validate(TWO_NETWORKS)
    results, paths = run_experiment(cfg, out, device="cpu", progress=False)
    assert results["downstream"] == ["hovernet", "sonnet"] and list(results["networks"]) == ["hovernet", "sonnet"]
    for name, block in results["networks"].items():
        assert list(block["arms"]) == ["baseline", "gradmix"]
        for r in block["arms"].values():
            assert len(r["folds"]) == 1 and 0.0 <= r["summary"]["mean"]["pq"] <= 1.0
        assert set(block["intervals"]["differences"]) == {"gradmix - baseline"}
        for arm in ("baseline", "gradmix"):
            assert (out / "seg" / name / arm / "fold0" / "final.safetensors").is_file()
            assert (out / "eval" / name / arm / "fold0.json").is_file()
    assert results["networks"]["sonnet"]["preset"] == "sonnet-cpu-tiny"
    # the SONNET runs trained their own schedule: the preset's 1/4/1 phases stretched to 6 and 3 epochs
    import yaml

    for arm, epochs in (("baseline", [1, 4, 1]), ("gradmix", [1, 2, 0])):
        run = yaml.safe_load((out / "seg" / "sonnet" / arm / "fold0" / "config.yaml").read_text())
        assert run["config"]["model"]["arch"] == "sonnet"
        assert [p["epochs"] for p in run["config"]["phases"]] == epochs
    hover = yaml.safe_load((out / "seg" / "hovernet" / "baseline" / "fold0" / "config.yaml").read_text())
    assert hover["config"]["model"]["arch"] == "small" and hover["config"]["phase1_epochs"] == 1
    assert results["fidelity_network"] == "hovernet" and "GradMix" in results["fidelity"]

    saved = json.loads(paths["json"].read_text())
    assert list(saved["networks"]) == ["hovernet", "sonnet"]
    md = paths["md"].read_text()
    table1 = md.split("## Table 1")[1].split("\n## ")[0]
    assert "### HoVer-Net (preset cpu-tiny)" in table1 and "### SONNET (preset sonnet-cpu-tiny)" in table1
    assert table1.count("| Baseline |") == 2 and table1.count("| GradMix |") == 2
    headline = md.split("## Headline")[1].split("\n## ")[0]
    assert headline.count("GradMix − Baseline") == 2 and "### SONNET (preset sonnet-cpu-tiny)" in headline
    assert "SONNET (preset sonnet-cpu-tiny), baseline, fold 0" not in md  # fidelity is the first network's
    assert "HoVer-Net (preset cpu-tiny), baseline, fold 0" in md
    html = paths["html"].read_text()
    assert html.count("<h3>HoVer-Net (preset cpu-tiny)</h3><table>") == 2
    assert html.count("<h3>SONNET (preset sonnet-cpu-tiny)</h3><table>") == 2
    from diffmix.pipeline.report import rare_class_summary

    lines = rare_class_summary(results)  # what `diffmix experiment` prints: one part per network
    heads = [i for i, line in enumerate(lines) if line.endswith("):")]
    assert [lines[i] for i in heads] == ["HoVer-Net (preset cpu-tiny):", "SONNET (preset sonnet-cpu-tiny):"]
    assert sum(line.startswith("Baseline ") for line in lines) == 2
    # a re-run finds both networks' runs cached and reports the same numbers
    stages = (out / "stages.jsonl").read_text()
    assert stages.count('"network": "sonnet"') == 4  # 2 arms x (train + eval)
    again, _ = run_experiment(cfg, out, device="cpu", progress=False)
    assert (out / "stages.jsonl").read_text() == stages
    assert json.dumps(again["networks"], sort_keys=True) == json.dumps(results["networks"], sort_keys=True)


def test_extra_metrics_follow_the_scheme_unless_given() -> None:
    from diffmix.data.schemes import PANNUKE, ClassScheme

    cfg = ExperimentConfig.model_validate(MICRO)
    lizard = ClassScheme("Lizard", {i + 1: n for i, n in enumerate(["neutrophil", "epithelial", "lymphocyte",
                                                                     "plasma", "eosinophil", "connective"])},
                         {i: i for i in range(1, 7)}, minor_class=1)
    assert cfg.extra_metrics_for(CONSEP) == [] and cfg.extra_metrics_for(PANNUKE) == ["pannuke"]
    assert cfg.extra_metrics_for(lizard) == ["conic"]
    none = ExperimentConfig.model_validate({**MICRO, "extra_metrics": []})
    assert none.extra_metrics_for(PANNUKE) == [] and dump_config(none)["extra_metrics"] == []
    assert "extra_metrics" not in dump_config(cfg)  # the default keeps older run folders' identity
    with pytest.raises(ConfigError, match="extra_metrics lists a metric twice"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "extra_metrics": ["conic", "conic"]})
    with pytest.raises(ConfigError, match="extra_metrics.0"):
        build_config(ExperimentConfig, "experiment", None, {**MICRO, "extra_metrics": ["mpq"]})


def test_pannuke_and_conic_metrics_in_the_experiment_report(tmp_path: Path) -> None:
    """`extra_metrics: [pannuke, conic]`: every run's evaluation carries PanNuke's mPQ/bPQ and
    CoNIC's mPQ+, Table 1 shows them after its own columns, and on these toy predictions bPQ is
    the mean PQ exactly (every test image has nuclei, one tissue: diffmix.metrics.panoptic)."""
    from diffmix.pipeline.experiment import run_experiment

    cfg = ExperimentConfig.model_validate({
        **{k: v for k, v in MICRO.items() if k not in ("utility", "seeds", "epochs", "sdm")},
        "name": "field-metrics", "arms": ["baseline"], "epochs": {"baseline": 2}, "fidelity": False,
        "extra_metrics": ["pannuke", "conic"],
    })
    out = tmp_path / "exp"
    results, paths = run_experiment(cfg, out, device="cpu", progress=False)
    evaluation = json.loads((out / "eval" / "baseline" / "fold0.json").read_text())
    assert {"pannuke", "conic"} <= set(evaluation)
    row = results["networks"]["hovernet"]["arms"]["baseline"]["folds"][0]
    assert row["bpq"] == pytest.approx(row["pq"], abs=1e-12)
    assert row["bpq"] == pytest.approx(evaluation["pannuke"]["bpq"]) and row["mpq"] == pytest.approx(evaluation["pannuke"]["mpq"])
    # mPQ+ is the mean of the per-class PQ pooled over the test images, each class's true
    # nuclei all counted once (TP + FN)
    per_class = {int(c): v for c, v in evaluation["conic"]["per_class"].items()}
    assert row["mpq_plus"] == pytest.approx(sum(v["pq"] for v in per_class.values()) / len(CONSEP.class_ids))
    from diffmix.data.io import read_dataset

    test = read_dataset(out / "data" / "test")
    true_counts = {c: sum(t == c for s in test for t in s.inst_types().values()) for c in CONSEP.class_ids}
    assert {c: v["tp"] + v["fn"] for c, v in per_class.items()} == true_counts
    md = paths["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Arm | Dice"))
    assert header.endswith("| F spindle | bPQ | mPQ | mPQ+ |")
    assert "mPQ+ is CoNIC's" in md and "bPQ and mPQ are PanNuke's" in md
    assert "<th>mPQ+</th>" in paths["html"].read_text()


def test_logit_adjusted_evaluation_uses_each_runs_own_training_prior(tmp_path: Path) -> None:
    """seg.logit_adjust: the evaluation divides out the prior of the run's own mix; a checkpoint
    written before the prior was recorded gets it recounted from the same mix, identically."""
    from diffmix.pipeline.experiment import Experiment, run_experiment
    from diffmix.checkpoints import load_checkpoint, save_checkpoint

    spec = {**TWO_NETWORKS, "name": "logit-adjust", "downstream": ["hovernet"],
            "seg": {**MICRO["seg"], "logit_adjust": 1.0}}
    cfg = ExperimentConfig.model_validate(spec)
    assert "logit_adjust" not in dump_config(ExperimentConfig.model_validate(MICRO))["seg"]
    assert dump_config(cfg)["seg"]["logit_adjust"] == 1.0
    out = tmp_path / "exp"
    results, _ = run_experiment(cfg, out, device="cpu", progress=False)
    assert set(results["networks"]["hovernet"]["arms"]) == {"baseline", "gradmix"}
    assert "post-hoc logit adjustment" in (out / "report.md").read_text()  # the reader is told
    exp = Experiment(cfg, out, progress=False)
    for arm in ("baseline", "gradmix"):
        ckpt = out / "seg" / arm / "fold0" / "final.safetensors"
        state, meta = load_checkpoint(ckpt)
        old = tmp_path / f"{arm}-old.safetensors"
        save_checkpoint(old, state, {k: v for k, v in meta.items() if k != "type_prior"})
        assert exp.type_prior(arm, 0, old) == pytest.approx(meta["type_prior"], rel=1e-12)
    # each arm's own mix: GradMix's patches change the class fractions
    priors = {arm: load_checkpoint(out / "seg" / arm / "fold0" / "final.safetensors")[1]["type_prior"]
              for arm in ("baseline", "gradmix")}
    assert priors["gradmix"] != pytest.approx(priors["baseline"], rel=1e-3)
    with pytest.raises(Exception, match="greater than or equal"):
        ExperimentConfig.model_validate({**spec, "seg": {**MICRO["seg"], "logit_adjust": -1}})


def test_gradmix_follows_the_balance_settings(tmp_path: Path) -> None:
    """GradMix and DiffMix-B share one balancing plan: the experiment's `synthesis.balance`
    reaches GradMix too (it used to run with the defaults, so the two arms balanced differently
    as soon as a user set them). On 64-px toy tiles the default 30-px border leaves no swap;
    MICRO's 8-px border does, and GradMix's labels are then exactly the balancing maps'."""
    import numpy as np

    from diffmix.data.patches import grid_patches
    from diffmix.maps.balance import BalanceParams, balance_dataset
    from diffmix.pipeline.experiment import Experiment

    spec = {**MICRO, "arms": ["baseline", "gradmix"], "synthesis": {**MICRO["synthesis"], "max_patches": None}}
    exp = Experiment(ExperimentConfig.model_validate(spec), tmp_path / "exp", progress=False)
    train, _ = exp.datasets()
    gradmix = {p.name: p for p in exp.synthetic("gradmix")}
    params = BalanceParams(minor_class=train.scheme.minor_class, seed=0, **spec["synthesis"]["balance"])
    maps, report = balance_dataset(train.samples, params)
    expected = {p.name: p for img in maps for p in grid_patches(img, 32, 32)}
    assert report.accepted_swaps > 0
    assert set(gradmix) == set(expected)
    for name, p in expected.items():
        assert np.array_equal(gradmix[name].type_map, p.type_map), name
    minor = train.scheme.minor_class
    original = sum(int((p.type_map == minor).sum()) for img in train for p in grid_patches(img, 32, 32))
    assert sum(int((p.type_map == minor).sum()) for p in gradmix.values()) > original


def test_balance_settings_validate_into_balance_params_and_reach_gradmix_whole(tmp_path: Path) -> None:
    """`synthesis.balance` is BalanceParams fields: a typo or bad value is a config error naming
    where; config.yaml keeps exactly what was written (run identity); and every field reaches
    GradMix, `seed` and `minor_class` included (passed beside the experiment's own seed and the
    scheme's minor class, they used to crash GradMix with "multiple values for keyword argument")."""
    import numpy as np

    from diffmix.data.patches import grid_patches
    from diffmix.maps.balance import BalanceParams, balance_dataset
    from diffmix.pipeline.experiment import Experiment

    for balance, message in [({"fractoin": 0.5}, r"synthesis.balance: unknown name\(s\) \['fractoin'\]"),
                             ({"border": -2}, "synthesis.balance: border must be >= 0 px, got -2")]:
        with pytest.raises(ConfigError, match=message):
            build_config(ExperimentConfig, "experiment", None, {**MICRO, "synthesis": {**MICRO["synthesis"], "balance": balance}})
    balance = {"area_ratio": 1.0, "seed": 3, "border": 8, "minor_class": 1}
    spec = {**MICRO, "arms": ["baseline", "gradmix"],
            "synthesis": {**MICRO["synthesis"], "max_patches": None, "balance": balance}}
    cfg = ExperimentConfig.model_validate(spec)
    assert list(dump_config(cfg)["synthesis"]["balance"].items()) == list(balance.items())  # as written, in order
    assert dump_config(ExperimentConfig.model_validate(MICRO))["synthesis"]["balance"] == MICRO["synthesis"]["balance"]
    assert "balance" in dump_config(ExperimentConfig.model_validate({k: v for k, v in MICRO.items() if k != "synthesis"}))["synthesis"]
    exp = Experiment(cfg, tmp_path / "exp", progress=False)
    train, _ = exp.datasets()
    assert cfg.synthesis.balance_params(train.scheme.minor_class, cfg.seed) == BalanceParams(**balance)
    gradmix = {p.name: p for p in exp.synthetic("gradmix")}
    maps, report = balance_dataset(train.samples, BalanceParams(**balance))
    other_seed, _ = balance_dataset(train.samples, BalanceParams(**{**balance, "seed": cfg.seed}))
    expected = {p.name: p for img in maps for p in grid_patches(img, 32, 32)}
    assert report.accepted_swaps > 0 and set(gradmix) == set(expected)
    for name, p in expected.items():
        assert np.array_equal(gradmix[name].type_map, p.type_map), name
    assert any(not np.array_equal(a.inst_map, b.inst_map) for a, b in zip(maps, other_seed))  # the seed mattered

def test_figures_take_datasets_not_the_experiment(tmp_path: Path) -> None:
    """`pipeline.figures` works on plain datasets (no Experiment, no import cycle): the row whose
    balancing map gained the most minor-class nuclei comes first, and both figures are written."""
    import subprocess
    import sys

    import numpy as np

    from diffmix.data.io import Dataset
    from diffmix.data.patches import grid_patches
    from diffmix.data.toy import generate_toy_samples
    from diffmix.pipeline.figures import make_figures, sample_rows

    code = "import sys, diffmix.pipeline.figures; print('diffmix.pipeline.experiment' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    scheme = CONSEP.merged()
    train = Dataset(generate_toy_samples(1, 64, 0), scheme)
    grid = grid_patches(train[0], 32, 32)
    minor = scheme.minor_class
    # the balancing "maps": patch 2 turned wholly minor-class, the others untouched
    balance = [p.replace(type_map=np.where(p.inst_map > 0, minor, 0).astype(np.int32)) if i == 2 else p
               for i, p in enumerate(grid)]
    assert any(c != minor for c in grid[2].inst_types().values())  # so patch 2 gains
    rows = sample_rows(train, {"balance": Dataset(balance, scheme), "gradmix": Dataset(grid[1:], scheme)},
                       patch=32, stride=32, n_rows=2)
    assert len(rows) == 2 and [label for label, _ in rows[0]] == [
        "original", "original labels", "balancing map", "DiffMix-B", "enlarging map", "DiffMix-E", "GradMix"]
    assert np.array_equal(rows[0][0][1], grid[2].image) and rows[0][4][1] is None  # no enlarge set given
    assert np.array_equal(rows[0][6][1], grid[2].image)  # GradMix's patch at the same place
    paths = make_figures(tmp_path / "figures", {"original": {"1": 3, "2": 5}}, scheme, rows)
    assert sorted(paths) == ["class_distribution", "samples"] and all(p.is_file() for p in paths.values())
    assert list(make_figures(tmp_path / "f2", {"original": {1: 3}}, scheme, [])) == ["class_distribution"]
