"""`diffmix --help` and usage errors start without the heavy libraries (torch, scipy)."""

from __future__ import annotations

import subprocess
import sys


def test_cli_import_pulls_no_torch_or_scipy():
    code = "import sys, diffmix.cli; print(sorted(m for m in ('torch', 'scipy', 'matplotlib') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_lazy_package_exports_still_resolve():
    from diffmix.data import CONSEP, read_dataset
    from diffmix.maps import balance_dataset
    from diffmix.metrics import type_stats

    assert CONSEP.num_classes == 4 and callable(read_dataset) and callable(balance_dataset) and callable(type_stats)
    import diffmix.data

    try:
        diffmix.data.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
