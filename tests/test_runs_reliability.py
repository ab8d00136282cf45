"""runs.py reliability: output checks, temporaries of killed writes, checkpoint bytes, devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmix.checkpoints import (
    checkpoint_meta,
    load_checkpoint,
    load_state_strict,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffmix.distributed import resolve_device
from diffmix.errors import CheckpointError, ConfigError, OutputError
from diffmix.runs import atomic_write_text, check_output_file, check_output_folder, prepare_run_folder, remove_temporaries

REPO = Path(__file__).resolve().parents[1]


def test_output_checks_name_the_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="exists and is a file"):
        check_output_folder(blocker)
    with pytest.raises(OutputError, match=f"{blocker} is a file"):
        check_output_folder(blocker / "deeper" / "run")
    with pytest.raises(OutputError, match=f"{blocker} is a file"):
        check_output_file(blocker / "r.json")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    # what is fine: a new nested folder, an existing folder, a new file in a new folder
    assert check_output_folder(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    check_output_folder(tmp_path)
    check_output_file(tmp_path / "new" / "r.json")
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_output_checks_refuse_a_read_only_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.access is what decides (root passes chmod, so the refusal is simulated here; the
    subprocess test below checks a real read-only folder where the user is not root)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(OutputError, match="permission denied or read-only"):
        check_output_folder(tmp_path / "run")
    with pytest.raises(OutputError, match="permission denied or read-only"):
        check_output_file(tmp_path / "r.json")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_refuses_a_read_only_parent(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        res = subprocess.run([sys.executable, "-m", "diffmix", "toy-data", str(locked / "toy"), "--n-images", "1"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
        assert "read-only" in res.stderr and not (locked / "toy").exists()
    finally:
        locked.chmod(0o755)


def test_resume_removes_the_temporaries_of_killed_writes_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_run_folder(run, {"a": 1}, kind="test")
    (run / "sub").mkdir()
    stale = [run / ".ckpt_0000004.k3j4h5g6.tmp.safetensors", run / "sub" / ".x_001.ab12.tmp.png",
             run / ".log.abcdefgh.tmp.jsonl", run / ".config.tmp"]
    kept = [run / "ckpt_0000004.safetensors", run / ".hidden", run / "notes.tmp", run / "sub" / "x_001.png"]
    for p in stale + kept:
        p.write_bytes(b"x")
    _, resuming = prepare_run_folder(run, {"a": 1}, kind="test", clean=False)  # a rank other than 0
    assert resuming and all(p.exists() for p in stale)
    _, resuming = prepare_run_folder(run, {"a": 1}, kind="test")
    assert resuming
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert remove_temporaries(run) == []


def test_atomic_writes_leave_no_temporary_behind(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


_SAVE = """
import sys, torch
from diffmix.checkpoints import rng_state, save_checkpoint
torch.manual_seed(0)
state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, "rng": rng_state(),
         "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
save_checkpoint(sys.argv[1], state, {"step": 3, "phase": 1, "note": "same bytes"})
"""


def test_same_state_same_checkpoint_bytes_in_two_processes(tmp_path: Path) -> None:
    """safetensors keeps metadata in a hash map seeded per process: with two keys their order
    (and so the file) changed between runs; the Python and numpy RNGs are seeded per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / f"{name}.safetensors")], check=True, env=env,
                       timeout=120)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    state, meta = load_checkpoint(tmp_path / "a.safetensors")
    assert meta == {"step": 3, "phase": 1, "note": "same bytes"} == checkpoint_meta(tmp_path / "a.safetensors")
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert set(state["rng"]) <= {"torch", "cuda"}
    assert state["optimizer"]["state"][0]["step"].item() == 3.0


def test_checkpoints_of_earlier_versions_still_load(tmp_path: Path) -> None:
    """Earlier files: metadata under two keys, RNG state with python and numpy entries."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    old_rng = {"python": json.dumps([3, list(random.getstate()[1]), None]),
               "numpy": json.dumps(["MT19937", np.random.get_state()[1].tolist(), 624, 0, 0.0]),
               "torch": {"__tensor__": "state.rng.torch"}}
    structure = {"model": {"w": {"__tensor__": "state.model.w"}}, "rng": old_rng}
    save_file({"state.model.w": torch.ones(2), "state.rng.torch": torch.get_rng_state()}, str(tmp_path / "old.safetensors"),
              metadata={"diffmix_structure": json.dumps(structure), "diffmix_meta": json.dumps({"step": 7})})
    state, meta = load_checkpoint(tmp_path / "old.safetensors")
    assert meta == {"step": 7} == checkpoint_meta(tmp_path / "old.safetensors")
    assert torch.equal(state["model"]["w"], torch.ones(2))
    set_rng_state(state["rng"])  # python/numpy entries of old files are still restored
    set_rng_state(rng_state())


def test_weights_of_another_model_size_fail_in_one_line() -> None:
    small, big = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as err:
        load_state_strict(small, big.state_dict(), "big.safetensors", "the small model")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("big.safetensors: weights do not fit the small model")
    assert "3 tensor(s) of another shape" in msg and "2 unexpected (2.weight, 2.bias)" in msg
    assert "0.weight (16, 4) vs (8, 4)" in msg
    load_state_strict(small, small.state_dict(), "same.safetensors")


@pytest.mark.parametrize("device,needle", [
    ("gpu0", "not a device name"),
    ("cuda:x", "not a device name"),
    ("meta", "not meta"),
])
def test_devices_are_checked_against_this_machine(device: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error() -> None:
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(device)
