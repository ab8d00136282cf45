"""QuPath GeoJSON: nuclei label maps to detection FeatureCollections and back, exactly.

Pathologists look at nuclei in QuPath, which reads and writes GeoJSON (RFC 7946 structure,
pixel coordinates). One image gives one `FeatureCollection`; each nucleus is one `Feature`:

    {"type": "Feature", "id": "<uuid5 of image name + instance id>",
     "geometry": {"type": "Polygon" | "MultiPolygon", "coordinates": ...},
     "properties": {"objectType": "detection",
                    "classification": {"name": "epithelial", "color": [0, 80, 255]},
                    "inst_id": 12, "measurements": {"inst_id": 12}}}

- **Coordinates** are QuPath's: x = column, y = row, pixel (row r, column c) covers the
  square [c, c+1] x [r, r+1]. Outlines come from scikit-image's marching squares
  (`find_contours` at level 0.5 on the instance mask, foreground 8-connected), so every
  vertex lies on a pixel edge (coordinates are multiples of 0.5) and corners are cut by 45°
  chamfers. Collinear vertices are dropped (exactly: the coordinates are exact in binary).
- **Why this outline**: no pixel centre ever lies on it, so filling "pixels whose centre is
  inside" (how QuPath and `skimage.draw.polygon` rasterise) gives back exactly the exported
  pixels. The polygon's area is the pixel count minus 1/8 px per convex corner.
- **Holes**: a nucleus with background (or another nucleus) inside it is a Polygon with
  interior rings; rasterising fills the exterior and clears the holes, so the round trip is
  exact for these too.
- **Multi-part nuclei** (an instance id on several 8-connected pieces, e.g. a crop that cut a
  nucleus in two): one MultiPolygon, so the instance keeps one id and one class.
- Exterior rings are counter-clockwise and holes clockwise in (x, y) numbers (RFC 7946's
  right-hand rule; QuPath does not care).
- **Classes**: the class scheme's name for `classification.name`, the colour of
  `diffmix seg infer` overlays for `color`; class 0 (a prediction without class) is written
  without `classification` (QuPath's "unclassified").
- **Instance id**: `inst_id` and `measurements.inst_id` (QuPath keeps measurements when it
  re-exports, and drops unknown properties), so ids survive a trip through QuPath.

Reading (`read_geojson`, `geojson_to_maps`) accepts what QuPath writes: a FeatureCollection,
a bare Feature, or a JSON list of Features (QuPath 0.2); measurements as an object (0.4+) or
a list of {name, value} (0.3). `cell` objects use their `nucleusGeometry`. Only `detection`
and `cell` objects are nuclei by default (a hand-drawn tissue `annotation` would otherwise
become one giant nucleus); features without `objectType` (plain GeoJSON) count as nuclei.
Overlapping nuclei (possible in QuPath, not in a label map): pixels go to the feature that
comes later in the file. Features without `inst_id` get the next free ids in file order;
features sharing an `inst_id` are parts of one nucleus and must share its class.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours

from diffmix.data.io import IMAGE_SUFFIXES, read_dataset, read_image, write_dataset
from diffmix.data.labels import labels_to_maps, read_dataset_json, read_mat_labels
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP, CONTOUR_COLOURS, ClassScheme, get_scheme
from diffmix.errors import DataError, PairingError
from diffmix.runs import atomic_write_text

#: Namespace of the deterministic feature ids (uuid5 of "NAME/INST_ID"): same labels, same bytes.
FEATURE_NAMESPACE = uuid.UUID("5f0c7d1e-2b9a-4c61-9a53-3f4d2e8b7a10")

#: QuPath object types read as nuclei by default.
NUCLEUS_OBJECT_TYPES = ("detection", "cell")

Ring = list[list[float]]


def class_colour(class_id: int) -> list[int]:
    """RGB of a class id: the colour `diffmix seg infer` draws its contours in."""
    return list(CONTOUR_COLOURS[int(class_id) % len(CONTOUR_COLOURS)])


# --------------------------------------------------------------------------- label map -> polygons


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring (first == last) without vertices on the segment of their neighbours."""
    pts = ring[:-1]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    kept = pts[cross != 0]  # exact: every coordinate is a multiple of 0.5
    return np.concatenate([kept, kept[:1]])


def _rings(mask: np.ndarray, x0: int, y0: int) -> list[np.ndarray]:
    """Closed rings (x, y) of one 8-connected component: the exterior first, then the holes."""
    padded = np.pad(mask.astype(np.float64), 1)
    # foreground 8-connected ('high'), background 4-connected: a hole is a 4-connected
    # background region, the same rule scipy.ndimage.binary_fill_holes uses by default.
    contours = find_contours(padded, 0.5, fully_connected="high")
    rings = []
    for c in contours:
        xy = np.stack([c[:, 1] - 1 + x0 + 0.5, c[:, 0] - 1 + y0 + 0.5], axis=1)
        if not np.array_equal(xy[0], xy[-1]):  # padding closes every contour; be safe
            xy = np.concatenate([xy, xy[:1]])
        rings.append(_drop_collinear(xy))
    areas = [abs(_signed_area(r)) for r in rings]
    order = np.argsort(areas)[::-1]
    rings = [rings[i] for i in order]
    exterior, holes = rings[0], rings[1:]
    # RFC 7946: exterior counter-clockwise, holes clockwise (positive / negative shoelace area)
    if _signed_area(exterior) < 0:
        exterior = exterior[::-1]
    holes = [h[::-1] if _signed_area(h) > 0 else h for h in holes]
    return [exterior, *holes]


def _as_coords(ring: np.ndarray) -> Ring:
    return [[_num(x), _num(y)] for x, y in ring.tolist()]


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def instance_geometry(mask: np.ndarray, x0: int = 0, y0: int = 0) -> dict[str, Any]:
    """GeoJSON geometry of one nucleus mask (HxW bool, placed at column x0, row y0).

    One 8-connected piece gives a Polygon (exterior + hole rings), several a MultiPolygon.
    """
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    polygons = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        piece = labels[sl] == k
        polygons.append([_as_coords(r) for r in _rings(piece, x0 + sl[1].start, y0 + sl[0].start)])
    if n == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def maps_to_geojson(
    inst_map: np.ndarray, type_map: np.ndarray, scheme: ClassScheme, name: str = ""
) -> dict[str, Any]:
    """The QuPath detection FeatureCollection of one image's labels (module docstring).

    inst_map, type_map: HxW int label maps (merged class ids of `scheme`). Features are in
    increasing instance id order.
    """
    inst = np.asarray(inst_map)
    types = np.asarray(type_map)
    if inst.ndim != 2 or types.shape != inst.shape:
        raise DataError(f"{name}: inst_map {inst.shape} and type_map {types.shape} must be the same HxW")
    features = []
    inst_ids = np.unique(inst)
    inst_ids = inst_ids[inst_ids > 0]
    # boxes of a compact relabelling (find_objects allocates one slot per id up to the max)
    compact = np.searchsorted(inst_ids, inst).astype(np.int64) + 1
    compact[inst == 0] = 0
    for k, sl in enumerate(ndimage.find_objects(compact), start=1):
        idx = int(inst_ids[k - 1])
        mask = compact[sl] == k
        cls_values = np.unique(types[sl][mask])
        if cls_values.size != 1:
            raise DataError(f"{name}: instance {idx} has classes {cls_values.tolist()}, expected one")
        cls = int(cls_values[0])
        props: dict[str, Any] = {"objectType": "detection"}
        if cls > 0:
            if cls not in scheme.classes:
                raise DataError(f"{name}: instance {idx} has class {cls}, not in scheme {scheme.name!r}")
            props["classification"] = {"name": scheme.class_name(cls), "color": class_colour(cls)}
        props["inst_id"] = idx
        props["measurements"] = {"inst_id": idx}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(FEATURE_NAMESPACE, f"{name}/{idx}")),
            "geometry": instance_geometry(mask, sl[1].start, sl[0].start),
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically (compact, one feature per line)."""
    lines = ",\n".join(json.dumps(f, separators=(",", ":")) for f in collection["features"])
    text = '{"type":"FeatureCollection","features":[\n' + lines + "\n]}\n"
    atomic_write_text(Path(path), text)


# --------------------------------------------------------------------------- validation


def _position(p: Any) -> bool:
    return (
        isinstance(p, list)
        and len(p) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
    )


def _ring_problem(ring: Any) -> str | None:
    if not isinstance(ring, list) or len(ring) < 4:
        return "a linear ring needs at least 4 positions"
    if not all(_position(p) for p in ring):
        return "a position is not an array of at least 2 finite numbers"
    if ring[0] != ring[-1]:
        return "a linear ring is not closed (first position != last)"
    return None


def geometry_problem(geometry: Any) -> str | None:
    """Why a Polygon/MultiPolygon geometry breaks RFC 7946's structure (None when it is fine)."""
    if not isinstance(geometry, dict):
        return "geometry is not an object"
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coords]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            return "MultiPolygon coordinates are not an array"
        polygons = coords
    else:
        return f"geometry type {kind!r} is not an area (Polygon or MultiPolygon)"
    for poly in polygons:
        if not isinstance(poly, list) or not poly:
            return "a polygon needs at least its exterior ring"
        for ring in poly:
            problem = _ring_problem(ring)
            if problem:
                return problem
    return None


def feature_collection_problems(obj: Any) -> list[str]:
    """Every way `obj` is not an RFC 7946 FeatureCollection of Polygon/MultiPolygon features."""
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        return ['top level is not {"type": "FeatureCollection"}']
    feats = obj.get("features")
    if not isinstance(feats, list):
        return ['"features" is not an array']
    problems = []
    for k, f in enumerate(feats):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            problems.append(f"feature {k}: not {{\"type\": \"Feature\"}}")
            continue
        if "id" in f and not isinstance(f["id"], (str, int, float)):
            problems.append(f"feature {k}: id is neither a string nor a number")
        if not isinstance(f.get("properties"), (dict, type(None))):
            problems.append(f"feature {k}: properties is neither an object nor null")
        problem = geometry_problem(f.get("geometry"))
        if problem:
            problems.append(f"feature {k}: {problem}")
    return problems


# --------------------------------------------------------------------------- polygons -> label map


def read_geojson(path: str | Path) -> list[dict[str, Any]]:
    """The features of a GeoJSON file as QuPath writes it (FeatureCollection, Feature or list)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: GeoJSON file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise DataError(f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of Features")
    if not isinstance(feats, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in feats):
        raise DataError(f"{path}: \"features\" must be an array of Feature objects")
    return feats


def _measurement(props: Mapping[str, Any], key: str) -> Any:
    meas = props.get("measurements")
    if isinstance(meas, dict):
        return meas.get(key)
    if isinstance(meas, list):  # QuPath 0.3: [{"name": ..., "value": ...}]
        for m in meas:
            if isinstance(m, dict) and m.get("name") == key:
                return m.get("value")
    return None


def _feature_id(props: Mapping[str, Any], where: str) -> int | None:
    value = props.get("inst_id", _measurement(props, "inst_id"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value < 2**31:
        raise DataError(f"{where}: inst_id {value!r} is not an integer in 1..2**31-1")
    return int(value)


def _feature_class(props: Mapping[str, Any], scheme: ClassScheme, default_class: int | None, where: str) -> int:
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else (cls if isinstance(cls, str) else None)
    if name is None:
        if default_class is None:
            raise DataError(f"{where}: nucleus has no classification; give a default class for unclassified nuclei")
        return default_class
    by_name = {v.lower(): k for k, v in scheme.classes.items()}
    if str(name).lower() not in by_name:
        raise DataError(
            f"{where}: class {name!r} is not in scheme {scheme.name!r} "
            f"(known: {', '.join(scheme.classes.values())})"
        )
    return by_name[str(name).lower()]


def _fill(out: np.ndarray, polygons: Sequence[Sequence[Ring]], value: int) -> None:
    """Set to `value` every pixel whose centre is inside a polygon (and outside its holes)."""
    h, w = out.shape
    for poly in polygons:
        region = np.zeros((h, w), dtype=bool)
        for k, ring in enumerate(poly):
            xy = np.asarray(ring, dtype=np.float64)
            # pixel centres are at (c + 0.5, r + 0.5): skimage tests integer (r, c) points
            rr, cc = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(h, w))
            region[rr, cc] = k == 0  # exterior fills, holes clear
        out[region] = value


def geojson_to_maps(
    features: Iterable[Mapping[str, Any]],
    shape: tuple[int, int],
    scheme: ClassScheme,
    *,
    default_class: int | None = None,
    object_types: Sequence[str] = NUCLEUS_OBJECT_TYPES,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(inst_map int32, type_map int32, counts) of an image of `shape` from GeoJSON features.

    counts: {"nuclei", "skipped": features of other object types, "empty": nuclei that cover
    no pixel centre}. Rules in the module docstring; every user mistake is a DataError naming
    the feature.
    """
    h, w = shape
    feats = list(features)
    ids: list[int | None] = []
    classes: list[int] = []
    geoms: list[list[list[Ring]]] = []
    skipped = 0
    for k, f in enumerate(feats):
        at = f"{where} feature {k}" if where else f"feature {k}"
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise DataError(f"{at}: properties is not an object")
        kind = props.get("objectType")
        if kind is not None and kind not in object_types:
            skipped += 1
            continue
        geometry = props.get("nucleusGeometry") if kind == "cell" and props.get("nucleusGeometry") else f.get("geometry")
        problem = geometry_problem(geometry)
        if problem:
            raise DataError(f"{at}: {problem}")
        polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        ids.append(_feature_id(props, at))
        classes.append(_feature_class(props, scheme, default_class, at))
        geoms.append(polys)
    given = {i for i in ids if i is not None}
    next_id = max(given, default=0) + 1
    cls_of: dict[int, int] = {}
    inst = np.zeros((h, w), dtype=np.int32)
    types = np.zeros((h, w), dtype=np.int32)
    for k, (iid, cls, polys) in enumerate(zip(ids, classes, geoms)):
        if iid is None:
            iid, next_id = next_id, next_id + 1
        if cls_of.setdefault(iid, cls) != cls:
            raise DataError(f"{where}: parts of nucleus {iid} have different classes ({cls_of[iid]} and {cls})")
        region = np.zeros((h, w), dtype=np.int32)
        _fill(region, polys, 1)
        on = region > 0
        inst[on] = iid
        types[on] = cls
    present = set(np.unique(inst).tolist()) - {0}
    return inst, types, {"nuclei": len(cls_of), "skipped": skipped, "empty": len(set(cls_of) - present)}


# --------------------------------------------------------------------------- folders


def _export_sources(src: Path, scheme: str | Path | ClassScheme | None) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], ClassScheme]:
    """(name, inst_map, type_map) of every image of a dataset or prediction folder + its scheme."""
    if not src.is_dir():
        raise DataError(f"{src}: folder not found")
    has_images = any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in src.iterdir())
    if has_images or (src / "Images").is_dir() or any(src.rglob("masks.npy")):
        ds = read_dataset(src, scheme)
        return [(s.name, s.inst_map, s.type_map) for s in ds], ds.scheme
    # a prediction folder (`diffmix seg infer` OUT, or its Labels/): merged labels, no images
    labels = src / "Labels" if (src / "Labels").is_dir() else src
    files = sorted(labels.glob("*.mat"))
    if not files:
        raise DataError(f"{src}: neither a dataset folder (Images/ + Labels/) nor a folder of .mat labels")
    if scheme is not None:
        resolved = get_scheme(scheme).merged()
    else:
        meta = read_dataset_json(src) or read_dataset_json(labels)
        resolved = ClassScheme.from_json(meta["scheme"]) if meta and "scheme" in meta else CONSEP.merged()
    out = []
    for f in files:
        inst, types = labels_to_maps(read_mat_labels(f), str(f))
        out.append((f.name.split(".")[0], inst, types))
    return out, resolved


def export_geojson(src: str | Path, out: str | Path, scheme: str | Path | ClassScheme | None = None) -> dict[str, Any]:
    """Write `OUT/NAME.geojson` for every image of a dataset or prediction folder.

    src: a dataset folder (read with `read_dataset`, so raw classes are merged by `scheme`) or
    a folder of merged `.mat` labels such as `diffmix seg infer`'s run folder (scheme: given,
    else its dataset.json, else consep). OUT must not exist or be empty; it is built under a
    temporary name and renamed, so an error leaves nothing behind.
    Returns {"out", "images", "nuclei"}.
    """
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not empty; choose a new output folder")
    items, resolved = _export_sources(src, scheme)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    nuclei = 0
    try:
        for name, inst, types in items:
            collection = maps_to_geojson(inst, types, resolved, name)
            nuclei += len(collection["features"])
            write_geojson(tmp / f"{name}.geojson", collection)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "images": len(items), "nuclei": nuclei}


def _by_stem(path: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    if path.is_file():
        return {path.name.split(".")[0]: path}
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    if what == "image" and (path / "Images").is_dir():
        path = path / "Images"
    found = {f.name.split(".")[0]: f for f in sorted(path.iterdir()) if f.is_file() and f.name.lower().endswith(suffixes)}
    if not found:
        raise DataError(f"{path}: no {what} files ({', '.join(suffixes)})")
    return found


def import_geojson(
    geojson: str | Path,
    images: str | Path,
    out: str | Path,
    scheme: str | Path | ClassScheme = "consep",
    *,
    default_class: str | None = None,
    include_annotations: bool = False,
) -> dict[str, Any]:
    """Build a dataset folder from GeoJSON nuclei (as QuPath exports them) and their images.

    geojson: a `.geojson`/`.json` file or a folder of them; images: an image file or a folder
    (or a dataset root with Images/). One file and one image pair whatever their names (the
    sample is named after the image); folders pair by the name before the first dot.
    scheme: class names -> merged class ids; default_class: class name for unclassified nuclei.
    Returns {"out", "images", "nuclei", "skipped", "empty"}.
    """
    resolved = get_scheme(scheme).merged()
    default_id = None
    if default_class is not None:
        default_id = _feature_class({"classification": {"name": default_class}}, resolved, None, "--default-class")
    shapes = _by_stem(Path(geojson), (".geojson", ".json"), "GeoJSON")
    pictures = _by_stem(Path(images), IMAGE_SUFFIXES, "image")
    if len(shapes) == 1 and len(pictures) == 1 and Path(geojson).is_file() and Path(images).is_file():
        pairs = [(next(iter(pictures)), next(iter(shapes.values())), next(iter(pictures.values())))]
    else:
        missing = sorted(set(shapes) - set(pictures))
        if missing:
            raise PairingError(f"{images}: no image for GeoJSON files {', '.join(missing[:20])}")
        pairs = [(n, shapes[n], pictures[n]) for n in sorted(shapes)]
    kinds = (*NUCLEUS_OBJECT_TYPES, "annotation") if include_annotations else NUCLEUS_OBJECT_TYPES
    samples, totals = [], {"nuclei": 0, "skipped": 0, "empty": 0}
    for name, shape_path, image_path in pairs:
        image = read_image(image_path)
        inst, types, counts = geojson_to_maps(
            read_geojson(shape_path), image.shape[:2], resolved,
            default_class=default_id, object_types=kinds, where=str(shape_path),
        )
        for k in totals:
            totals[k] += counts[k]
        samples.append(NucleiSample(image, inst, types, name, resolved.num_classes))
    provenance = {"source": "geojson", "geojson": str(Path(geojson).resolve()), "images": str(Path(images).resolve())}
    write_dataset(out, samples, resolved, provenance)
    return {"out": str(out), "images": len(samples), **totals}
