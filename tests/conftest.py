"""Shared fixtures: the real H&E test data in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def one_thread():
    """torch on one thread for the test: small convs run fastest so, the machine is shared, and
    subprocess tests run with OMP_NUM_THREADS=1 too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as module `bench_<name>`."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip in a bare clone."""
    if not (SHARED_DATA / "real_he_labeled").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared is absent in this checkout)")
    return SHARED_DATA


def consep_tiles(split: str, every: int = 1) -> list:
    """Every `every`-th 256-px tile of the real CoNSeP copy in ../shared/data/consep as
    NucleiSample (classes already merged; read straight from its compact storage, so a test
    needs no assembled copy). Skips when the copy is absent."""
    import numpy as np
    import scipy.io as sio
    from PIL import Image

    from diffmix.data.sample import NucleiSample

    root = SHARED_DATA / "consep"
    if not (root / f"inst_{split}.npz").is_file():
        pytest.skip(f"real CoNSeP not found at {root} (../shared is absent in this checkout)")
    npz = np.load(root / f"inst_{split}.npz")
    out = []
    for name, inst in list(zip(npz["names"], npz["inst"]))[::every]:
        name = str(name)
        image = np.asarray(Image.open(root / "images" / split / f"{name}.jpg").convert("RGB"))
        types = sio.loadmat(root / "type_mat" / split / f"{name}.mat")["inst_type"].ravel().astype(np.int32)
        inst = inst.astype(np.int32)
        lut = np.zeros(int(inst.max()) + 1, np.int32)
        lut[np.unique(inst[inst > 0])] = types
        out.append(NucleiSample(image=image, inst_map=inst, type_map=lut[inst], name=name))
    return out
