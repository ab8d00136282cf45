"""The CLI starts light: `diffmix --help` without numpy/scipy/torch, torch-free commands without
torch, and imports at module top everywhere except deliberately lazy ones in CLI modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffmix"

#: The CLI modules: every area's `cli.py`, and `_cli.py`, the helper they share.
CLI_MODULES = ("cli.py", "_cli.py")

#: Function-level imports allowed outside the CLI modules: {(module path, imported module): why}.
#: Keep it tiny; every entry needs a reason a top-level import cannot serve (an optional
#: dependency, a cycle that cannot be removed). It is empty: none is needed today.
LAZY_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}

#: Modules that must import without torch: the torch-free commands run on them, and `diffmix
#: --help` must not pay for torch (docs/architecture.md lists them).
TORCH_FREE_MODULES = [
    "diffmix.cli", "diffmix.errors", "diffmix.config", "diffmix.runs", "diffmix.seeds", "diffmix.stats",
    "diffmix.data.labels", "diffmix.data.sample", "diffmix.data.schemes", "diffmix.data.io",
    "diffmix.data.patches", "diffmix.data.toy", "diffmix.data.geojson",
    "diffmix.maps.params", "diffmix.maps.balance", "diffmix.maps.enlarge", "diffmix.maps.gradmix",
    "diffmix.metrics.instance", "diffmix.metrics.classification", "diffmix.metrics.evaluate",
    "diffmix.metrics.panoptic", "diffmix.metrics.compat",
    "diffmix.sdm.settings", "diffmix.synth.jobs", "diffmix.synth.labels", "diffmix.synth.manifest",
    "diffmix.pipeline.intervals",
    "diffmix.seg.targets", "diffmix.seg.postproc", "diffmix.seg.augment", "diffmix.seg.sonnet.targets",
    "diffmix.seg.sonnet.postproc",
]


def _run(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE.parent)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_cli_import_pulls_no_heavy_library():
    code = ("import sys, diffmix.cli; "
            "print(sorted(m for m in ('numpy', 'scipy', 'torch', 'matplotlib', 'pydantic') if m in sys.modules))")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_torch_free_modules_import_without_torch():
    code = ("import importlib, sys\n"
            f"for name in {TORCH_FREE_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, name + ' imports torch'\n"
            "print('ok')")
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement inside a function of `path`."""
    found: list[tuple[int, str]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, True)
            elif isinstance(child, ast.Import) and in_function:
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and in_function:
                found.append((child.lineno, "." * child.level + (child.module or "")))
            else:
                walk(child, in_function)

    walk(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def test_imports_are_at_module_top_outside_cli_modules():
    """Library modules import at their top; only the CLI modules import inside their
    command bodies, on purpose, so that `--help` and each command start with what they use."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in CLI_MODULES:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _function_level_imports(path):
            if (rel, module) not in LAZY_IMPORTS_ALLOWED:
                offenders.append(f"{rel}:{line} imports {module} inside a function")
    assert not offenders, "\n".join(offenders)
    # the check sees what it must: a function-level import in a CLI module is found
    assert _function_level_imports(PACKAGE / "data" / "cli.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_library_code_knows_nothing_of_typer():
    users = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if p.name not in CLI_MODULES and "typer" in {m.split(".")[0] for _, m in _imports(p)}]
    assert users == []


# `diffmix.cli.main(args)`, then torch must still be absent: the command ran without it.
_NO_TORCH_AFTER = """
import sys
from diffmix.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, f"the command imported {loaded[:3]}"
print("torch-free")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64-px toy tiles, written by `toy-data` itself (without torch)."""
    root = tmp_path_factory.mktemp("torchfree")
    res = _run(_NO_TORCH_AFTER, "toy-data", str(root / "toy"), "--n-images", "2", "--size", "64", "--seed", "3")
    assert res.returncode == 0 and "torch-free" in res.stdout, res.stderr
    return root


@pytest.mark.parametrize("args", [
    ["inspect", "{toy}"],
    ["evaluate", "--pred", "{toy}", "--true", "{toy}", "--pannuke", "--conic"],
    ["maps", "balance", "{toy}", "{out}", "--border", "8"],
    ["maps", "enlarge", "{toy}", "{out}", "--patch", "32", "--stride", "32", "--no-overlap"],
    ["gradmix", "{toy}", "{out}", "--border", "8"],
    ["export", "geojson", "{toy}", "{out}"],
], ids=lambda a: " ".join(w for w in a if not w.startswith(("{", "-")) and not w.isdigit()))
def test_torch_free_commands_never_import_torch(tiny: Path, args: list[str], tmp_path: Path):
    words = [w.format(toy=tiny / "toy", out=tmp_path / "out") for w in args]
    res = _run(_NO_TORCH_AFTER, *words)
    assert res.returncode == 0, res.stderr
    assert "torch-free" in res.stdout


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
