"""The experiment report as a reader opens it: rendered in headless Chromium (issue 15 item 5).

Chromium is Debian's `chromium` package (`.ci/run` installs it); without it these tests skip.
The report is built from a hand-made `results` dict shaped like a 3-fold CoNSeP experiment's
(five arms, intervals, utility, fidelity, both figures), so no experiment has to run. The
screenshot is kept beside the report as `report.png`. For a real run folder,
`DIFFMIX_RUN_REPORTS=RUN/report.html pytest tests/test_report_browser.py` runs the same checks
(and `python tests/browser.py RUN/report.html` only renders and prints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from browser import chromium, render
from diffmix.data.schemes import CONSEP
from diffmix.pipeline.report import (
    ARM_LABELS,
    class_distribution_figure,
    class_legend,
    label_rgb,
    sample_grid_figure,
    summarise,
    write_report,
)

needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; .ci/run does it)"
)

ARMS = ["baseline", "gradmix", "diffmix_b", "diffmix_e", "diffmix"]


def _iv(estimate: float, half: float = 0.04) -> dict[str, float]:
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half, "n_boot": 2000, "level": 0.95}


def hand_made_results() -> dict[str, Any]:
    """Results of the shape `Experiment.run` returns, every number made up."""
    rng = np.random.default_rng(0)
    arms = {}
    for i, arm in enumerate(ARMS):
        folds = [{"dice": 0.80 + 0.01 * i, "aji": 0.50, "dq": 0.60, "sq": 0.75, "pq": 0.45 + 0.005 * i,
                  "acc": 0.70, "f1_1": 0.10 + 0.03 * i, "f1_2": 0.50, "f1_3": 0.55, "f1_4": 0.40}
                 for _ in range(3)]
        folds = [{k: v + float(rng.normal(0, 0.01)) for k, v in f.items()} for f in folds]
        arms[arm] = {"folds": folds, "summary": summarise(folds)}
    metrics = ["f1_1", "pq"]
    intervals = {
        "metrics": metrics, "n_runs": 3, "n_images": 14,
        "arms": {a: {"f1_1": _iv(0.10 + 0.03 * i), "pq": _iv(0.45 + 0.005 * i)} for i, a in enumerate(ARMS)},
        "differences": {pair: {"f1_1": _iv(0.12, 0.08), "pq": _iv(0.02, 0.03)}
                        for pair in ("diffmix - baseline", "diffmix - gradmix", "diffmix_b - baseline",
                                     "gradmix - baseline")},
    }
    scores = ["acc", "macro_f1", "f1_1", "f1_2", "f1_3", "f1_4"]
    pools = ["real", "real, class-balanced", "real + DiffMix-B", "real + DiffMix-E", "real + GradMix"]
    utility = {
        "arms": {p: {"intervals": {m: _iv(0.5 + 0.01 * j) for m in scores}} for j, p in enumerate(pools)},
        "differences": {p: {m: _iv(0.01, 0.02) for m in scores} for p in pools[1:]},
        "settings": {"steps": 300, "crop": 32}, "n_test": {1: 40, 2: 900, 3: 1200, 4: 700}, "seeds": [0, 1, 2],
    }
    fidelity = {name: {"n_images": 120, "pq": 0.41, "acc": 0.66, "f1": {"1": 0.2, "2": 0.5, "3": 0.6, "4": 0.4}}
                for name in ("DiffMix-B maps", "DiffMix-E maps", "GradMix")}
    # two downstream networks, as the paper's Table 1 (SONNET's numbers shifted a little)
    sonnet_arms = {}
    for arm, r in arms.items():
        folds = [{k: v - 0.02 for k, v in f.items()} for f in r["folds"]]
        sonnet_arms[arm] = {"folds": folds, "summary": summarise(folds)}
    networks = {"hovernet": {"label": "HoVer-Net", "preset": "hovernet-fast", "arms": arms, "intervals": intervals},
                "sonnet": {"label": "SONNET", "preset": "sonnet", "arms": sonnet_arms, "intervals": intervals}}
    return {"name": "hand-made", "dataset": "/data/consep", "folds": 3, "seeds": 1, "n_test_images": 14,
            "downstream": ["hovernet", "sonnet"], "networks": networks, "utility": utility, "fidelity": fidelity,
            "fidelity_network": "hovernet"}


def hand_made_figures(out: Path) -> dict[str, Path]:
    from diffmix.data.toy import generate_toy_sample

    counts = {"original": {1: 120, 2: 2400, 3: 3600, 4: 2100},
              "balancing maps": {1: 900, 2: 2300, 3: 3300, 4: 2000},
              "enlarging maps": {1: 130, 2: 2500, 3: 3900, 4: 2300},
              "GradMix": {1: 260, 2: 2400, 3: 3500, 4: 2100}}
    rows = []
    for r in range(2):
        s = generate_toy_sample(64, np.random.default_rng(r), f"toy{r}")
        labels = label_rgb(s.inst_map, s.type_map)
        rows.append([("original", s.image), ("balancing map", labels), ("DiffMix-B", s.image),
                     ("enlarging map", labels), ("DiffMix-E", s.image), ("GradMix", s.image)])
    return {"class_distribution": class_distribution_figure(counts, CONSEP, out / "figures" / "class_distribution.png"),
            "samples": sample_grid_figure(rows, out / "figures" / "samples.png", legend=class_legend(CONSEP))}


def check_report(report: Path, arms: list[str], width: int = 1280) -> dict[str, Any]:
    """Render `report` at `width` CSS px, keep the screenshot beside it (`report.png` at 1280 px,
    `report-<width>.png` otherwise) and assert what a reader needs."""
    png = report.with_name("report.png" if width == 1280 else f"report-{width}.png")
    seen = render(report, png, width=width)
    assert seen["errors"] == []
    assert "Table 1" in seen["headings"]
    table1 = next(t for t in seen["tables"] if t["after"] == "Table 1")
    assert table1["rows"][0][:2] == ["Arm", "Dice"] and [r[0] for r in table1["rows"][1:]] == [ARM_LABELS[a] for a in arms]
    assert seen["images"], "the report shows no figure"
    for image in seen["images"]:
        assert image["complete"] and min(image["natural"]) > 0, f"figure {image['alt']} did not load"
        assert min(image["shown"]) > 0
    # Nothing pushes the page sideways (a wide table scrolls inside its own box) and no number
    # or interval is broken over two lines.
    assert seen["page_width"] <= seen["viewport"]
    assert [t["wrapped_cells"] for t in seen["tables"]] == [0] * len(seen["tables"])
    assert png.stat().st_size > 0
    return seen


@needs_chromium
def test_report_in_chromium(tmp_path: Path) -> None:
    paths = write_report(tmp_path, hand_made_results(), CONSEP, hand_made_figures(tmp_path),
                         ["Instance metrics are per-image means over the test set."])
    seen = check_report(paths["html"], ARMS)
    assert len(seen["images"]) == 2
    headline = "Headline: paired differences with 95% intervals"
    assert [t["after"] for t in seen["tables"]] == ["Table 1", "Table 1", headline, headline,
                                                     "Utility: does a synthetic set's nuclei help type real nuclei?",
                                                     "Label fidelity"]
    # At a laptop's 1280 px every table of a 4-class scheme is seen whole, without scrolling.
    for table in seen["tables"]:
        assert table["content_width"] <= table["shown_width"], table["after"]
    # In a 900-px window the widest tables scroll sideways; the page itself does not.
    narrow = check_report(paths["html"], ARMS, width=900)
    assert any(t["content_width"] > t["shown_width"] for t in narrow["tables"])


def test_class_legend_matches_label_colours() -> None:
    """The sample grid's legend names each class in the colour label_rgb paints it."""
    inst = np.kron(np.arange(1, 5, dtype=np.int32)[None, :], np.ones((5, 5), np.int32))  # four 5x5 nuclei
    rgb = label_rgb(inst, inst)  # nucleus i has class i
    legend = class_legend(CONSEP)
    assert [name for name, _ in legend] == ["miscellaneous", "inflammatory", "epithelial", "spindle"]
    assert [tuple(int(v) for v in rgb[2, 2 + 5 * i]) for i in range(4)] == [colour for _, colour in legend]
    assert len(set(colour for _, colour in legend)) == 4


@needs_chromium
def test_render_reports_broken_pages(tmp_path: Path) -> None:
    """The checks have teeth: a missing figure, a broken one and a script error are all seen."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><h2>Table 1</h2><table><tr><td>1"
                    "</td></tr></table><img alt='gone' src='gone.png'><img alt='bad' src='data:image/png;base64,AAAA'>"
                    "<script>console.error('boom'); null.x;</script></body></html>")
    seen = render(page, tmp_path / "broken.png")
    assert [i["natural"] for i in seen["images"]] == [[0, 0], [0, 0]]
    assert any("ERR_FILE_NOT_FOUND" in e for e in seen["errors"])
    assert any("console.error: boom" in e for e in seen["errors"])
    assert any("TypeError" in e for e in seen["errors"])


def _run_reports() -> list[Path | None]:
    paths = [Path(p) for p in os.environ.get("DIFFMIX_RUN_REPORTS", "").split(os.pathsep) if p]
    return paths or [None]


@needs_chromium
@pytest.mark.parametrize("report", _run_reports())
def test_real_run_report(report: Path | None) -> None:
    """Real experiments' reports named in $DIFFMIX_RUN_REPORTS (os.pathsep-separated), e.g. a
    finished run folder's `report.html`; its `report.png` is written beside it."""
    if report is None:
        pytest.skip("DIFFMIX_RUN_REPORTS names no real run's report.html")
    results = json.loads(report.with_name("results.json").read_text())
    # one block per downstream network (older results.json: the arms at the top level)
    block = next(iter(results["networks"].values())) if "networks" in results else results
    arms = list(block["arms"])
    check_report(report, arms)
