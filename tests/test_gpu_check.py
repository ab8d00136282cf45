"""benchmarks/gpu_check.py at its tiny CPU size: the same code paths a lent GPU runs, in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark

gpu_check = load_benchmark("gpu_check")
FAST = ["--size", "tiny", "--device", "cpu", "--ddim-passes", "3", "--passes", "2", "--repeats", "1"]


def test_tiny_run_measures_every_setting(tmp_path, one_thread, capsys) -> None:
    out = tmp_path / "check.json"
    report = gpu_check.main(FAST + ["--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed == json.loads(json.dumps(report))
    assert report["complete"] and report["errors"] == [] and report["skipped"] == []
    assert report["device"]["type"] == "cpu" and report["size"] == "tiny"
    assert report["parameters"] > 1e6

    # training: bf16 at the preset's (full) checkpointing, selective and none; fp32 at full
    assert set(report["train"]) == {"bf16", "fp32"}
    assert set(report["train"]["bf16"]) == {"full", "selective", "none"} and set(report["train"]["fp32"]) == {"full"}
    for dtype, modes in report["train"].items():
        for mode, r in modes.items():
            assert r["batch"] == 2 and r["oom_at_batch"] == [] and r["use_checkpoint"] == mode
            assert r["seconds_per_step"] > 0 and r["steps_per_s"] == pytest.approx(1 / r["seconds_per_step"], rel=1e-3)
            assert all(v == v and abs(v) < 100 for v in r["loss"])  # finite mse, vb, loss
            assert r["model_flops_per_step"] == 3 * 2 * report["flops"]["forward_per_sample"]["flops"]
            assert r["achieved_tflops"] > 0
    bf16 = report["train"]["bf16"]
    # executed FLOPs: full recomputation redoes the forward of the checkpointed blocks (most of
    # the network), selective only its label convs and small skips, none nothing
    assert bf16["full"]["executed_vs_model_flops"] > 0.2
    assert 0 < bf16["selective"]["executed_vs_model_flops"] < 0.05
    assert bf16["none"]["executed_vs_model_flops"] <= 0

    # synthesis: every solver the sampler offers, in both dtypes, finite output
    from diffmix.sdm.settings import SOLVERS

    for dtype in ("bf16", "fp32"):
        assert set(report["sample"][dtype]) == set(SOLVERS)
        for solver, r in report["sample"][dtype].items():
            assert r["output_finite"] and r["patches"] == 2
            assert r["passes"] == (3 if solver == "ddim" else 2)
            assert r["patches_per_s"] == pytest.approx(2 / r["seconds"], rel=1e-3)
            flops = report["flops"]["sampling"]
            assert r["flops"] == flops["first_pass"] + (r["passes"] - 1) * flops["per_later_pass"]
    # a guided pass: the encoder once, the decoder on the cond + null rows. The first pass also
    # computes the label map's SPADE modulations (more than a plain forward of the batch, less
    # than two); later passes reuse them and cost less than one forward
    fwd = report["flops"]["forward_per_sample"]["flops"] * 2
    flops = report["flops"]["sampling"]
    assert 0 < flops["per_later_pass"] < fwd < flops["first_pass"] < 2 * fwd


def test_budget_skips_instead_of_overrunning(tmp_path, one_thread) -> None:
    report = gpu_check.main(FAST + ["--budget-s", "0.001", "--dtypes", "bf16", "--out", str(tmp_path / "c.json")])
    assert not report["complete"] and report["errors"] == []
    assert report["train"] == {} and report["sample"] == {}
    assert {s["why"] for s in report["skipped"]} == {"time budget"}
    assert json.loads((tmp_path / "c.json").read_text())["skipped"] == report["skipped"]


def test_out_of_memory_is_recorded_and_the_batch_halved(monkeypatch, one_thread) -> None:
    args = gpu_check.parse_args(FAST + ["--train-batch", "8"])
    check = gpu_check.Check(args)
    check.build()
    real = check._train_once

    def fake(dtype, mode, batch):
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(dtype, mode, batch)

    monkeypatch.setattr(check, "_train_once", fake)
    r = check.train("fp32", False, 8)
    assert r["oom_at_batch"] == [8, 4] and r["batch"] == 2 and "error" not in r
    assert check.report["errors"] == []  # an OOM is a measurement, not an error

    monkeypatch.setattr(check, "_train_once", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    r = check.train("fp32", False, 8)
    assert r["error"] == "out of memory" and r["oom_at_batch"] == [8, 4, 2]

    monkeypatch.setattr(check, "_train_once", lambda *a: (_ for _ in ()).throw(ValueError("broken")))
    r = check.train("fp32", False, 8)
    assert r["error"] == "ValueError: broken" and check.report["errors"][-1]["error"] == "ValueError: broken"


def test_device_peaks_and_arguments() -> None:
    assert gpu_check.peak_tflops("NVIDIA H200")["bf16"] == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe")["bf16"] == pytest.approx(756.0)
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3")["bf16"] == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB")["tf32"] == pytest.approx(156.0)
    assert gpu_check.peak_tflops("Some Future GPU") == "unknown"
    info = {"peak_tflops": gpu_check.peak_tflops("NVIDIA H200"), "cudnn_allow_tf32": True}
    assert gpu_check._rates(989.4e12, 2.0, info, "bf16") == {"achieved_tflops": 494.7, "fraction_of_peak": 0.5,
                                                           "peak_used": "bf16"}
    assert gpu_check._rates(494.7e12, 1.0, info, "fp32")["peak_used"] == "tf32"
    assert gpu_check._rates(1e12, 1.0, {"peak_tflops": "unknown"}, "bf16") == {"achieved_tflops": 1.0}
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--solvers", "ddim,euler"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtypes", "fp16"])
    from diffmix.sdm.settings import SOLVERS

    assert gpu_check.parse_args([]).solvers == list(SOLVERS)  # new solvers drop in
