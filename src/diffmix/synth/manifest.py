"""The manifest of a synthetic dataset folder: one record per patch, written, read and merged.

While a run is going, each finished patch has its own record in `manifest.d/NAME.json`,
written after the patch's files (so a record means a complete patch); at the end rank 0
merges them into `manifest.json` with the run's config, provenance and per-kind totals. A
record says where a patch comes from (source image, offset, map kind), its noise seed, the
sampler settings, the checkpoint's sha256, and the nuclei per class before and after the edit.
`source_images` answers, from the records (or, for the folders without a manifest, from what
wrote them), which training image each sample of a derived folder comes from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffmix.data.io import Dataset
from diffmix.data.patches import split_patch_name
from diffmix.errors import DataError
from diffmix.runs import atomic_write_text, read_json, write_json
from diffmix.synth.jobs import MAP_KINDS, OWN, PatchJob

MANIFEST = "manifest.json"
RECORDS_DIR = "manifest.d"  # per-patch records of an unfinished run, merged into MANIFEST
FORMAT = "diffmix-synth-manifest"
FORMAT_VERSION = 1


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hex SHA-256 over every sample's name, image and label arrays (in dataset order).

    Identifies the source data in the run config, so a folder started from other images is
    never resumed with these (paths can move; contents are what matters).
    """
    h = hashlib.sha256()
    for s in dataset.samples:
        h.update(s.name.encode() + b"\0" + repr(s.shape).encode())
        for arr in (s.image, s.inst_map, s.type_map):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def str_keys(counts: Mapping[int, int]) -> dict[str, int]:
    """Per-class counts with the JSON form of their keys."""
    return {str(k): int(v) for k, v in counts.items()}


def add_counts(total: dict[int, int], counts: Mapping[Any, int]) -> None:
    """Add per-class counts (keys may be JSON strings, as records hold them) into `total`."""
    for k, v in counts.items():
        total[int(k)] = total.get(int(k), 0) + int(v)


def patch_record(
    job: PatchJob,
    *,
    sampler: Mapping[str, Any],
    checkpoint_sha256: str,
    counts_before: Mapping[int, int],
    counts_after: Mapping[int, int],
    edit: Mapping[str, int],
) -> dict[str, Any]:
    """The manifest record of one finished patch (`sampler` as `synthesize` records it)."""
    return {
        "name": job.name,
        "image": f"Images/{job.name}.png",
        "labels": f"Labels/{job.name}.mat",
        "source_image": job.source,
        "source_index": job.image_index,
        "patch_index": job.patch_index,
        "offset": list(job.offset),
        "size": list(job.size) if job.whole else job.size[0],
        "map_kind": job.kind,
        "seed": job.seed,
        "sampler": dict(sampler),
        "checkpoint_sha256": checkpoint_sha256,
        "class_counts_before": str_keys(counts_before),
        "class_counts": str_keys(counts_after),
        "edit": dict(edit),
    }


def record_path(out: Path, name: str) -> Path:
    return out / RECORDS_DIR / f"{name}.json"


def write_record(out: Path, record: Mapping[str, Any]) -> None:
    """Write one patch's record (atomic); call it after the patch's files are complete."""
    atomic_write_text(record_path(out, record["name"]), json.dumps(record, indent=1) + "\n")


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The `manifest.json` of a synthetic dataset folder, or None when there is none yet."""
    path = Path(out) / MANIFEST
    manifest = read_json(path, "manifest")
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a diffmix synthesis manifest")
    return manifest


#: Folders without a manifest whose samples' sources are known from what wrote them
#: (dataset.json provenance "kind"): grid patches named `patch_name(image, index)`, or whole
#: images under their source's name. GradMix folders are grid patches when the experiment cut
#: them (provenance "patch"), whole images from `diffmix gradmix`.
GRID_KINDS: tuple[str, ...] = ("enlarging-maps",)
WHOLE_KINDS: tuple[str, ...] = ("balancing-maps",)


def source_images(dataset: Dataset) -> dict[str, str]:
    """The training image each sample of a derived dataset was made from, by sample name.

    A synthetic set (`diffmix synthesize`, `sdm sample`) answers from its manifest records,
    merged or not yet merged; a sample without a record is a DataError (the folder was changed
    after synthesis). A GradMix or label-maps folder has no manifest: its provenance says
    whether it holds grid patches (named `<image>_<index>`) or whole images (named as their
    source). Any other folder is a DataError: nothing says where its samples come from.
    """
    root = dataset.root
    if root is None:
        raise DataError("a dataset without a folder (a subset) has no record of its samples' source images")
    if (root / MANIFEST).exists() or (root / RECORDS_DIR).is_dir():
        records = known_records(root)
        missing = [n for n in dataset.names if n not in records]
        if missing:
            raise DataError(
                f"{root}: {len(missing)} sample(s) have no record in {MANIFEST} (e.g. {missing[:5]}), so their "
                "source images are unknown; was the folder changed after synthesis?"
            )
        return {n: str(records[n]["source_image"]) for n in dataset.names}
    provenance = (dataset.meta or {}).get("provenance") or {}
    kind = provenance.get("kind")
    if kind in GRID_KINDS or (kind == "gradmix" and provenance.get("patch") is not None):
        return {n: split_patch_name(n)[0] for n in dataset.names}
    if kind in WHOLE_KINDS or kind == "gradmix":
        return {n: n for n in dataset.names}
    raise DataError(
        f"{root}: no {MANIFEST} and not a GradMix or label-maps folder (dataset.json provenance kind "
        f"{kind!r}), so the source image of its samples is unknown"
    )


def known_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished patch's record: the merged manifest plus records not merged yet."""
    records: dict[str, dict[str, Any]] = {}
    manifest = read_manifest(out)
    if manifest is not None:
        for rec in manifest.get("patches", []):
            records[rec["name"]] = rec
    folder = out / RECORDS_DIR
    if folder.is_dir():
        for p in sorted(folder.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # cannot happen with atomic writes; redo the patch if it does
            records[rec["name"]] = rec
    return records


def is_done(out: Path, name: str, records: Mapping[str, Any]) -> bool:
    """A patch is done when its record exists and so do its image and labels."""
    return (
        name in records
        and (out / "Images" / f"{name}.png").is_file()
        and (out / "Labels" / f"{name}.mat").is_file()
    )


def _order_key(jobs: Sequence[PatchJob]) -> Callable[[Mapping[str, Any]], tuple]:
    # planned patches in plan order, then those of earlier runs by kind, source and index
    position = {j.name: i for i, j in enumerate(jobs)}

    def key(rec: Mapping[str, Any]) -> tuple:
        kind = rec.get("map_kind", "")
        kinds = (*MAP_KINDS, OWN)
        kind_rank = kinds.index(kind) if kind in kinds else len(kinds)
        return (0, position[rec["name"]], "") if rec["name"] in position else (
            1, kind_rank, str(rec.get("source_image")), int(rec.get("patch_index", 0)), rec["name"])

    return key


def merge_manifest(
    out: Path,
    jobs: Sequence[PatchJob],
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    map_reports: Mapping[str, Any],
) -> dict[str, Any]:
    """Merge every per-patch record into `manifest.json` (atomic), then drop the merged records.

    Every planned patch must have a record by now (all ranks passed the barrier); patches of
    earlier runs with another `max_patches` stay listed, since their files are in the folder.
    """
    records = known_records(out)
    missing = [j.name for j in jobs if not is_done(out, j.name, records)]
    if missing:
        raise DataError(f"{out}: {len(missing)} planned patches were not written (e.g. {missing[:5]})")
    patches = sorted(records.values(), key=_order_key(jobs))
    totals_before: dict[str, dict[int, int]] = {}
    totals_after: dict[str, dict[int, int]] = {}
    edits: dict[str, dict[str, int]] = {}
    for rec in patches:
        add_counts(totals_before.setdefault(rec["map_kind"], {}), rec["class_counts_before"])
        add_counts(totals_after.setdefault(rec["map_kind"], {}), rec["class_counts"])
        for key, n in (rec.get("edit") or {}).items():
            kind_edits = edits.setdefault(rec["map_kind"], {})
            kind_edits[key] = kind_edits.get(key, 0) + int(n)
    map_reports = {k: dict(v) for k, v in map_reports.items()}
    for kind, totals in edits.items():  # e.g. enlarge: nuclei frozen / movable / moved
        map_reports.setdefault(kind, {})["totals"] = totals
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": dict(config),
        "provenance": dict(provenance),
        "n_patches": len(patches),
        "class_counts_before": {k: str_keys(v) for k, v in totals_before.items()},
        "class_counts_after": {k: str_keys(v) for k, v in totals_after.items()},
        "map_reports": dict(map_reports),
        "patches": patches,
    }
    write_json(out / MANIFEST, manifest)
    folder = out / RECORDS_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()
    return manifest
