"""The experiment report: a Table-1 layout, class-distribution charts, a sample grid, fidelity.

Writes `report.md`, a self-contained `report.html` (figures embedded as base64 PNG, also kept
as files under `figures/`) and `results.json`. Pure presentation: every number comes from the
`results` dict the experiment measured. Table 1 and the headline intervals have one block per
downstream network (`results["networks"]`, in `results["downstream"]` order), as the paper's
Table 1 has a HoVer-Net and a SONNET block.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from diffmix.data.schemes import ClassScheme
from diffmix.maps.conditioning import instance_edges
from diffmix.runs import atomic_path, atomic_write_text, write_json
from diffmix.stats import format_interval

ARM_LABELS = {
    "baseline": "Baseline",
    "gradmix": "GradMix",
    "diffmix_b": "DiffMix-B",
    "diffmix_e": "DiffMix-E",
    "diffmix": "DiffMix",
}
SEG_COLUMNS = [("dice", "Dice"), ("aji", "AJI"), ("dq", "DQ"), ("sq", "SQ"), ("pq", "PQ"), ("acc", "Acc")]
# A fixed colour per class id (0 = background): readable on white, distinct for up to 6 classes.
CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 159, 0], [0, 114, 178], [0, 158, 115], [204, 121, 167], [213, 94, 0], [86, 180, 233]],
    dtype=np.uint8,
)


#: The other datasets' headline numbers (`ExperimentConfig.extra_metrics`), after Table 1's own
#: columns when the runs have them: PanNuke's bPQ and mPQ, CoNIC's mPQ+.
EXTRA_COLUMNS = [("bpq", "bPQ"), ("mpq", "mPQ"), ("mpq_plus", "mPQ+")]


def table_columns(scheme: ClassScheme, extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(key, header) of every Table-1 column: segmentation metrics, Acc, F per class, then the
    `extra` keys of EXTRA_COLUMNS (in that order)."""
    return (SEG_COLUMNS + [(f"f1_{c}", f"F {scheme.class_name(c)}") for c in scheme.class_ids]
            + [(k, h) for k, h in EXTRA_COLUMNS if k in extra])


def fold_row(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten one fold's evaluation (mean instance metrics + type stats, and PanNuke / CoNIC
    numbers when it has them) into table keys; an undefined PanNuke value is left out."""
    row = {k: float(metrics["mean"][k]) for k in ("dice", "aji", "dq", "sq", "pq")}
    row["acc"] = float(metrics["type"]["acc"])
    for cls, value in metrics["type"]["f1"].items():
        row[f"f1_{int(cls)}"] = float(value)
    for key in ("bpq", "mpq"):
        value = (metrics.get("pannuke") or {}).get(key)
        if value is not None:
            row[key] = float(value)
    if "conic" in metrics:
        row["mpq_plus"] = float(metrics["conic"]["mpq_plus"])
    return row


def _block_columns(results: Mapping[str, Any], scheme: ClassScheme) -> list[tuple[str, str]]:
    extra = {k for r in results["arms"].values() for k in r["summary"]["mean"]}
    return table_columns(scheme, [k for k, _ in EXTRA_COLUMNS if k in extra])


def summarise(folds: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for a single fold) of every column."""
    keys = sorted({k for f in folds for k in f})
    mean = {k: float(np.mean([f[k] for f in folds if k in f])) for k in keys}
    std = {
        k: float(np.std([f[k] for f in folds if k in f], ddof=1)) if sum(k in f for f in folds) > 1 else 0.0
        for k in keys
    }
    return {"mean": mean, "std": std}


def best_per_column(summary: Mapping[str, Mapping[str, Mapping[str, float]]], keys: Sequence[str]) -> dict[str, set[str]]:
    """Arms holding the highest mean per column (ties all marked; a column where every arm
    has the same value marks none, since nothing is best there)."""
    best: dict[str, set[str]] = {}
    for key in keys:
        values = {arm: s["mean"].get(key) for arm, s in summary.items() if s["mean"].get(key) is not None}
        if not values:
            continue
        top = max(values.values())
        marked = {arm for arm, v in values.items() if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)}
        if len(marked) < len(values) or len(values) == 1:
            best[key] = marked
    return best


def _cell(mean: float | None, std: float | None, n_folds: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if n_folds > 1 else f"{mean:.3f}"


def network_blocks(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(title, block) of every downstream network in the results, in the experiment's order;
    a block holds that network's "arms" (per-run rows and summary) and "intervals"."""
    nets = results.get("networks") or {}
    order = list(results.get("downstream") or nets)
    return [(network_title(name, nets[name]), nets[name]) for name in order if name in nets]


def network_title(name: str, block: Mapping[str, Any]) -> str:
    """"HoVer-Net (preset cpu-tiny)": the network and the segmenter preset it was trained with
    (a CPU preset is a small stand-in, which the reader must see)."""
    label = block.get("label", name)
    return f"{label} (preset {block['preset']})" if block.get("preset") else str(label)


def table1_markdown(results: Mapping[str, Any], scheme: ClassScheme) -> str:
    """Table 1 of one network: `results` is its block (or anything with "arms")."""
    cols = _block_columns(results, scheme)
    summary = {arm: r["summary"] for arm, r in results["arms"].items()}
    best = best_per_column(summary, [k for k, _ in cols])
    lines = ["| Arm | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    for arm, r in results["arms"].items():
        cells = []
        for key, _ in cols:
            text = _cell(r["summary"]["mean"].get(key), r["summary"]["std"].get(key), len(r["folds"]))
            cells.append(f"**{text}**" if arm in best.get(key, set()) else text)
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1_html(results: Mapping[str, Any], scheme: ClassScheme) -> str:
    """Table 1 of one network as HTML (`table1_markdown`)."""
    cols = _block_columns(results, scheme)
    summary = {arm: r["summary"] for arm, r in results["arms"].items()}
    best = best_per_column(summary, [k for k, _ in cols])
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    rows = []
    for arm, r in results["arms"].items():
        cells = []
        for key, _ in cols:
            text = html.escape(_cell(r["summary"]["mean"].get(key), r["summary"]["std"].get(key), len(r["folds"])))
            cells.append(f"<td class='best'>{text}</td>" if arm in best.get(key, set()) else f"<td>{text}</td>")
        rows.append(f"<tr><th>{html.escape(ARM_LABELS.get(arm, arm))}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>Arm</th>{head}</tr>{''.join(rows)}</table>"


def _metric_name(key: str, scheme: ClassScheme) -> str:
    if key.startswith("f1_"):
        return f"F {scheme.class_name(int(key[3:]))}"
    return {"pq": "PQ", "acc": "Acc", "macro_f1": "macro F1"}.get(key, key)


def interval_rows(results: Mapping[str, Any], scheme: ClassScheme) -> tuple[list[str], list[list[str]]]:
    """The headline table of one network (`results` is its block): each arm's rare-class F and
    PQ, then the paired differences, each with its 95% bootstrap interval over test images and
    runs (pipeline.intervals)."""
    iv = results.get("intervals")
    if not iv:
        return [], []
    metrics = iv["metrics"]
    header = ["Arm / difference"] + [f"{_metric_name(m, scheme)} [95% CI]" for m in metrics]
    rows = [[ARM_LABELS.get(a, a)] + [format_interval(v[m]) for m in metrics] for a, v in iv["arms"].items()]
    for pair, v in iv["differences"].items():
        a, b = pair.split(" - ")
        rows.append([f"{ARM_LABELS.get(a, a)} − {ARM_LABELS.get(b, b)}"] + [format_interval(v[m], True) for m in metrics])
    return header, rows


def utility_rows(results: Mapping[str, Any], scheme: ClassScheme) -> tuple[list[str], list[list[str]]]:
    """Utility classifier (diffmix.utility): per-class F1 on the real test nuclei for each
    training pool, then the paired differences against real only, with 95% intervals."""
    u = results.get("utility")
    if not u:
        return [], []
    metrics = ["acc", "macro_f1"] + [f"f1_{c}" for c in scheme.class_ids]
    header = ["Training nuclei"] + [_metric_name(m, scheme) for m in metrics]
    rows = [[arm] + [format_interval(r["intervals"][m]) for m in metrics] for arm, r in u["arms"].items()]
    rows += [[f"({arm}) − real"] + [format_interval(d[m], True) for m in metrics] for arm, d in u["differences"].items()]
    return header, rows


def recognition_rows(results: Mapping[str, Any], scheme: ClassScheme) -> tuple[list[str], list[list[str]]]:
    """Per-class recall of the real-data utility classifier on real test and synthetic nuclei."""
    rec = (results.get("utility") or {}).get("recognition")
    if not rec:
        return [], []
    header = ["Nuclei"] + [f"recall {scheme.class_name(c)} (n)" for c in scheme.class_ids]
    rows = []
    for label, r in rec["sets"].items():
        cells = []
        for c in scheme.class_ids:
            v, n = r["recall"].get(str(c), r["recall"].get(c)), r["n"].get(str(c), r["n"].get(c))
            cells.append("-" if v is None else f"{v:.3f} ({n})")
        rows.append([label] + cells)
    return header, rows


def fidelity_rows(results: Mapping[str, Any], scheme: ClassScheme) -> tuple[list[str], list[list[str]]]:
    header = ["Synthetic set", "images", "PQ", "Acc"] + [f"F {scheme.class_name(c)}" for c in scheme.class_ids]
    rows = []
    for name, fid in results.get("fidelity", {}).items():
        f1 = {int(k): v for k, v in fid.get("f1", {}).items()}
        rows.append(
            [name, str(fid.get("n_images", "")), f"{fid['pq']:.3f}", f"{fid['acc']:.3f}"]
            + [f"{f1[c]:.3f}" if c in f1 else "-" for c in scheme.class_ids]
        )
    return header, rows


def class_distribution_figure(counts: Mapping[str, Mapping[int, int]], scheme: ClassScheme, path: Path) -> Path:
    """Grouped bars: nuclei per class for the original labels and each custom map kind."""
    sets = list(counts)
    classes = list(scheme.class_ids)
    width = 0.8 / max(1, len(sets))
    # Sets in greys, dark (original) to light: hues belong to the classes in the label maps.
    shades = matplotlib.colormaps["Greys"](np.linspace(0.85, 0.25, len(sets))) if sets else []
    fig = Figure(figsize=(11, 3.9))
    axes = fig.subplots(1, 2)
    for ax, normalise in zip(axes, (False, True)):
        for i, name in enumerate(sets):
            c = counts[name]
            total = sum(c.values()) or 1
            values = [c.get(k, 0) / total if normalise else c.get(k, 0) for k in classes]
            xs = np.arange(len(classes)) + (i - (len(sets) - 1) / 2) * width
            ax.bar(xs, values, width, label=name, color=shades[i], edgecolor="black", linewidth=0.5)
        ax.set_xticks(np.arange(len(classes)))
        ax.set_xticklabels([scheme.class_name(k) for k in classes])
        ax.set_ylabel("share of nuclei" if normalise else "nuclei")
        ax.set_title("class proportions" if normalise else "class counts")
    # One legend for both panels, above them, where it cannot cover a bar.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=max(1, len(sets)), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save_figure(fig, path)


def label_rgb(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """A label map as an RGB picture: class colours on white, instance edges dark."""
    out = np.full(inst_map.shape + (3,), 255, dtype=np.uint8)
    fg = inst_map > 0
    out[fg] = CLASS_COLOURS[np.clip(type_map[fg], 0, len(CLASS_COLOURS) - 1)]
    out[instance_edges(inst_map) & fg] = (40, 40, 40)
    return out


def class_legend(scheme: ClassScheme) -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, RGB) of each class as `label_rgb` colours it: the label maps' legend."""
    return [(scheme.class_name(c), tuple(int(v) for v in CLASS_COLOURS[min(c, len(CLASS_COLOURS) - 1)]))
            for c in scheme.class_ids]


def sample_grid_figure(
    rows: Sequence[Sequence[tuple[str, np.ndarray | None]]],
    path: Path,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> Path:
    """One row per example, one column per (title, RGB image); None cells are left blank.
    `legend` ((name, RGB) pairs, e.g. `class_legend`) is drawn under the grid."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    legend_h = 0.6 if legend else 0.0  # inches under the grid for the legend and its title
    fig = Figure(figsize=(2.1 * n_cols, 2.35 * n_rows + legend_h))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            image = row[c][1] if c < len(row) else None
            if image is None:
                ax.axis("off")
            else:
                # A thin frame, not axis("off"): a label map on white shows where its tile ends.
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("#999999")
            if r == 0 and c < len(row):
                ax.set_title(row[c][0], fontsize=10)
    if legend:
        handles = [Patch(facecolor=np.asarray(rgb) / 255, edgecolor=(40 / 255,) * 3, label=name) for name, rgb in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=10,
                   title="classes in the label maps", title_fontsize=10)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1), h_pad=1.0)
    return _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> Path:
    """Render with Agg into `path`. Figures are `matplotlib.figure.Figure` objects, not pyplot's:
    no global backend switch or figure registry, so nothing is left open and importing this
    module changes nothing for a caller who uses pyplot."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'/>"


def _table_md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>")


#: A report table: (subtitle or None, header, rows).
Table = tuple[str | None, list[str], list[list[str]]]


def _sections(results: Mapping[str, Any], scheme: ClassScheme) -> list[tuple[str, str, list[Table]]]:
    """(title, explanation, tables) of every section after Table 1 that has content."""
    out: list[tuple[str, str, list[Table]]] = []
    blocks = network_blocks(results)
    ivs = [(title, b) for title, b in blocks if b.get("intervals")]
    if ivs:
        iv = ivs[0][1]["intervals"]
        out.append(("Headline: paired differences with 95% intervals",
                    f"Bootstrap over the {iv['n_images']} test images and the {iv['n_runs']} runs per arm "
                    "(folds x seeds), paired: both arms see the same resampled images, run r of one arm is "
                    "paired with run r of the other (same fold and segmenter seed). An interval that excludes "
                    "0 is a difference beyond test-image and run-to-run noise.",
                    [(title, *interval_rows(b, scheme)) for title, b in ivs]))
    h, r = utility_rows(results, scheme)
    if r:
        u = results["utility"]
        out.append(("Utility: does a synthetic set's nuclei help type real nuclei?",
                    f"A nucleus classifier ({u['settings']['steps']} steps, {u['settings']['crop']}-px crops of "
                    "image + the nucleus's mask) trained on the training images' nuclei, alone or with a synthetic "
                    f"set's, scored on all {sum(u['n_test'].values())} test nuclei; mean over {len(u['seeds'])} "
                    "seeds with 95% intervals over test images and seeds. 'real, class-balanced' draws real nuclei "
                    "with equal class probability: the prior shift of extra rare-class labels without new pixels.",
                    [(None, h, r)]))
    h, r = recognition_rows(results, scheme)
    if r:
        out.append(("Recognition: do synthetic nuclei look like their class?",
                    f"The '{results['utility']['recognition']['classifier']}' utility classifier (real nuclei only) "
                    "types each set's nuclei; the share of each class's nuclei it types as that class (recall), "
                    "beside the same classifier on real test nuclei. Synthetic nuclei as recognisable as real ones "
                    "score like the real test row; nuclei that do not show their map's class score near chance.",
                    [(None, h, r)]))
    h, r = fidelity_rows(results, scheme)
    if r:
        net, nets = results.get("fidelity_network"), results.get("networks") or {}
        which = f"{network_title(net, nets[net])}, " if net in nets else ""
        out.append(("Label fidelity",
                    f"A segmenter trained on real data only ({which}baseline, fold 0) is scored against the label "
                    "maps the synthetic images were generated for.", [(None, h, r)]))
    return out


def write_report(
    out: Path,
    results: Mapping[str, Any],
    scheme: ClassScheme,
    figures: Mapping[str, Path],
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write report.md, report.html and results.json into `out`; returns their paths."""
    out = Path(out)
    title = f"DiffMix experiment: {results.get('name', '')}".strip()
    n_folds = results.get("folds", "")
    n_seeds = results.get("seeds", 1)
    intro = (f"folds: {n_folds}; seeds: {n_seeds}; test images: {results.get('n_test_images', '')}. "
             "Mean ± std over runs (folds x seeds)")
    sections = _sections(results, scheme)
    blocks = network_blocks(results)
    md = [f"# {title}", ""]
    md += [f"Dataset: `{results.get('dataset', '')}` (scheme {scheme.name}); {intro}; best per column in bold.", ""]
    md += ["## Table 1", ""]
    for name, block in blocks:
        md += [f"### {name}", "", table1_markdown(block, scheme), ""]
    for head, text, tables in sections:
        md += [f"## {head}", "", text, ""]
        for sub, header, rows in tables:
            md += ([f"### {sub}", ""] if sub else []) + _table_md(header, rows) + [""]
    for key, caption in (("class_distribution", "Class distribution before/after each map kind"),
                         ("samples", "Samples: original | its labels | balancing map | DiffMix-B | enlarging map | DiffMix-E | GradMix")):
        if key in figures:
            md += [f"## {caption}", "", f"![{key}]({Path(figures[key]).relative_to(out).as_posix()})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    report_md = out / "report.md"
    atomic_write_text(report_md, "\n".join(md))

    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Dataset: <code>{html.escape(str(results.get('dataset', '')))}</code> (scheme {html.escape(scheme.name)}); "
             f"{html.escape(intro)}; best per column highlighted.</p>",
             "<h2>Table 1</h2>"]
    for name, block in blocks:
        parts.append(f"<h3>{html.escape(name)}</h3>{table1_html(block, scheme)}")
    for head, text, tables in sections:
        parts.append(f"<h2>{html.escape(head)}</h2><p>{html.escape(text)}</p>")
        for sub, header, rows in tables:
            parts.append((f"<h3>{html.escape(sub)}</h3>" if sub else "") + _table_html(header, rows))
    for key, caption in (("class_distribution", "Class distribution before/after each map kind"),
                         ("samples", "Samples: original | its labels | balancing map | DiffMix-B | enlarging map | DiffMix-E | GradMix")):
        if key in figures:
            parts.append(f"<h2>{html.escape(caption)}</h2>{_embed(Path(figures[key]))}")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    # A table wider than the page (intervals, many classes, a narrow window) scrolls inside its
    # own box instead of pushing the page sideways or wrapping a number across two lines.
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;display:block;width:max-content;max-width:100%;overflow-x:auto}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right;font-size:13px;white-space:nowrap;"
             "font-variant-numeric:tabular-nums}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
             "td.best{font-weight:bold;background:#e6f4ea}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    report_html = out / "report.html"
    atomic_write_text(report_html, page)
    results_json = out / "results.json"
    write_json(results_json, results)
    return {"md": report_md, "html": report_html, "json": results_json}


def rare_class_summary(results: Mapping[str, Any]) -> list[str]:
    """What `diffmix experiment` and `demo` print: per downstream network, one line per arm (the
    rare (minor) class F1, mean ± std over runs, PQ and Acc), then the paired differences with
    their 95% intervals."""
    scheme = ClassScheme.from_json(results["scheme"])
    key = f"f1_{scheme.minor_class}"
    lines = []
    blocks = network_blocks(results)
    for title, block in blocks:
        if len(blocks) > 1:
            lines.append(f"{title}:")
        for arm, r in block["arms"].items():
            m, s = r["summary"]["mean"], r["summary"]["std"]
            lines.append(
                f"{ARM_LABELS.get(arm, arm):<10} F {scheme.class_name(scheme.minor_class)} "
                f"{m.get(key, float('nan')):.3f} ± {s.get(key, 0.0):.3f}   PQ {m['pq']:.3f}   Acc {m['acc']:.3f}"
            )
        iv = block.get("intervals") or {}
        for pair, d in iv.get("differences", {}).items():
            a, b = pair.split(" - ")
            parts = []
            for metric in iv["metrics"]:
                name = "F " + scheme.class_name(scheme.minor_class) if metric.startswith("f1_") else metric.upper()
                parts.append(f"{name} {format_interval(d[metric], signed=True)}")
            lines.append(f"{ARM_LABELS.get(a, a)} − {ARM_LABELS.get(b, b)}: " + "   ".join(parts) + "  (95% CI)")
    return lines
