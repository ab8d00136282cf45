"""QuPath GeoJSON export/import: exact polygons, holes, multi-part nuclei, the CLI, real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmix.data.geojson import (
    feature_collection_problems,
    geojson_to_maps,
    instance_geometry,
    maps_to_geojson,
)
from diffmix.data.io import read_dataset, write_dataset
from diffmix.data.sample import NucleiSample
from diffmix.data.schemes import CONSEP
from diffmix.errors import DataError

DIFFMIX = Path(sys.executable).parent / "diffmix"
SCHEME = CONSEP.merged()


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(DIFFMIX), *args], capture_output=True, text=True, env=env, timeout=300)


def shoelace(ring) -> float:
    xy = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """32x32 maps: a 2x2 square (id 3, class 1), a one-pixel nucleus (id 70, class 2), a ring
    with a hole holding another nucleus (ids 5 and 6), a nucleus in two pieces (id 9), and a
    diagonal staircase (id 11, 8-connected only)."""
    inst = np.zeros((32, 32), np.int32)
    types = np.zeros((32, 32), np.int32)

    def put(iid, cls, mask):
        inst[mask] = iid
        types[mask] = cls

    m = np.zeros_like(inst, bool); m[1:3, 1:3] = True; put(3, 1, m)
    m = np.zeros_like(inst, bool); m[5, 5] = True; put(70, 2, m)
    m = np.zeros_like(inst, bool); m[10:17, 10:17] = True; m[12:15, 12:15] = False; put(5, 3, m)
    m = np.zeros_like(inst, bool); m[13, 13] = True; put(6, 4, m)
    m = np.zeros_like(inst, bool); m[20:23, 2:5] = True; m[20:23, 8:10] = True; put(9, 4, m)
    m = np.zeros_like(inst, bool); m[[25, 26, 27], [25, 26, 27]] = True; put(11, 2, m)
    return inst, types


def by_id(collection) -> dict[int, dict]:
    return {f["properties"]["inst_id"]: f for f in collection["features"]}


def test_polygons_by_hand():
    inst, types = hand_made()
    fc = maps_to_geojson(inst, types, SCHEME, "hand")
    assert feature_collection_problems(json.loads(json.dumps(fc))) == []
    f = by_id(fc)
    assert sorted(f) == [3, 5, 6, 9, 11, 70]  # ids kept, gaps and all
    # the 2x2 square covering [1,3]x[1,3]: an octagon through the edge midpoints, area 4 - 4/8
    sq = f[3]["geometry"]
    assert sq["type"] == "Polygon" and len(sq["coordinates"]) == 1
    ring = sq["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 9
    assert sorted(map(tuple, ring[:-1])) == sorted(
        [(1.5, 1), (2.5, 1), (3, 1.5), (3, 2.5), (2.5, 3), (1.5, 3), (1, 2.5), (1, 1.5)]
    )
    assert shoelace(ring) == 3.5  # counter-clockwise in (x, y) numbers (RFC 7946)
    # one pixel at row 5, column 5: a diamond of area 1/2
    dot = f[70]["geometry"]["coordinates"][0]
    assert sorted(map(tuple, dot[:-1])) == [(5, 5.5), (5.5, 5), (5.5, 6), (6, 5.5)]
    # the ring: exterior + one clockwise hole
    ring5 = f[5]["geometry"]
    assert ring5["type"] == "Polygon" and len(ring5["coordinates"]) == 2
    assert shoelace(ring5["coordinates"][0]) == 49 - 0.5 and shoelace(ring5["coordinates"][1]) == -(9 - 0.5)
    # two pieces: one MultiPolygon, one id, one class
    two = f[9]
    assert two["geometry"]["type"] == "MultiPolygon" and len(two["geometry"]["coordinates"]) == 2
    # the staircase is 8-connected: one polygon
    assert f[11]["geometry"]["type"] == "Polygon"
    assert f[3]["properties"]["classification"] == {"name": "miscellaneous", "color": [255, 0, 0]}
    assert f[3]["properties"]["objectType"] == "detection"
    assert f[3]["properties"]["measurements"] == {"inst_id": 3}


def test_round_trip_exact_with_holes_and_parts():
    inst, types = hand_made()
    fc = json.loads(json.dumps(maps_to_geojson(inst, types, SCHEME, "hand")))
    back_inst, back_types, counts = geojson_to_maps(fc["features"], inst.shape, SCHEME)
    assert np.array_equal(back_inst, inst) and np.array_equal(back_types, types)
    assert counts == {"nuclei": 6, "skipped": 0, "empty": 0}
    # feature order does not matter: the hole keeps the inner nucleus whatever comes first
    back2, _, _ = geojson_to_maps(fc["features"][::-1], inst.shape, SCHEME)
    assert np.array_equal(back2, inst)


def test_random_blobs_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        inst = np.zeros((24, 24), np.int32)
        for iid in rng.choice(np.arange(1, 400), size=4, replace=False):
            inst[rng.random((24, 24)) < 0.08] = iid  # scattered, holes, many parts
        types = np.where(inst > 0, inst % 4 + 1, 0).astype(np.int32)
        fc = json.loads(json.dumps(maps_to_geojson(inst, types, SCHEME)))
        assert feature_collection_problems(fc) == []
        back, back_types, _ = geojson_to_maps(fc["features"], inst.shape, SCHEME)
        assert np.array_equal(back, inst) and np.array_equal(back_types, types)


def test_instance_geometry_offsets():
    mask = np.ones((1, 2), bool)
    geom = instance_geometry(mask, x0=10, y0=20)
    assert sorted(map(tuple, geom["coordinates"][0][:-1])) == [(10, 20.5), (10.5, 20), (10.5, 21), (11.5, 20), (11.5, 21), (12, 20.5)]


def test_reading_what_qupath_writes():
    square = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]
    inner = [[[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]]
    feats = [
        # QuPath 0.3 measurements list, no inst_id property
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"objectType": "detection", "classification": {"name": "Epithelial", "color": [1, 2, 3]},
                        "measurements": [{"name": "inst_id", "value": 7}]}},
        # a tissue annotation: skipped by default
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
         "properties": {"objectType": "annotation"}},
        # a cell: its nucleusGeometry is the nucleus; drawn later, it wins the overlap
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"objectType": "cell", "classification": {"name": "spindle"},
                        "nucleusGeometry": {"type": "Polygon", "coordinates": inner}}},
        # plain GeoJSON without objectType: a nucleus with the next free id
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[6, 6], [8, 6], [8, 8], [6, 8], [6, 6]]]},
         "properties": {"classification": {"name": "inflammatory"}}},
    ]
    inst, types, counts = geojson_to_maps(feats, (10, 10), SCHEME)
    assert counts == {"nuclei": 3, "skipped": 1, "empty": 0}
    expect = np.zeros((10, 10), np.int32)
    expect[0:4, 0:4] = 7
    expect[1:3, 1:3] = 8  # the cell, id max+1 in file order
    expect[6:8, 6:8] = 9
    assert np.array_equal(inst, expect)
    assert types[0, 0] == 3 and types[1, 1] == 4 and types[6, 6] == 2
    with_annotations, _, counts = geojson_to_maps(
        feats, (10, 10), SCHEME, object_types=("detection", "cell", "annotation"), default_class=1
    )
    assert counts["skipped"] == 0 and with_annotations[1, 8] > 0 and with_annotations[8, 1] == 0


def test_user_errors_name_the_feature():
    poly = {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 0]]]}
    cases = [
        ({"geometry": poly, "properties": {"classification": {"name": "tumour"}}}, "class 'tumour' is not in scheme"),
        ({"geometry": poly, "properties": {}}, "no classification"),
        ({"geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {"classification": {"name": "spindle"}}},
         "'Point' is not an area"),
        ({"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 1]]]},
          "properties": {"classification": {"name": "spindle"}}}, "not closed"),
        ({"geometry": poly, "properties": {"classification": {"name": "spindle"}, "inst_id": 1.5}}, "inst_id 1.5"),
    ]
    for feat, message in cases:
        with pytest.raises(DataError, match=message) as err:
            geojson_to_maps([{"type": "Feature", **feat}], (4, 4), SCHEME, where="x.geojson")
        assert "x.geojson feature 0" in str(err.value)
    two = [{"type": "Feature", "geometry": poly, "properties": {"classification": {"name": n}, "inst_id": 4}}
           for n in ("spindle", "epithelial")]
    with pytest.raises(DataError, match="parts of nucleus 4 have different classes"):
        geojson_to_maps(two, (4, 4), SCHEME)
    assert feature_collection_problems({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]}) \
        == ["feature 0: geometry is not an object"]
    assert feature_collection_problems([]) == ['top level is not {"type": "FeatureCollection"}']


# ------------------------------------------------------------------------- the CLI


def hand_dataset(tmp_path: Path) -> Path:
    inst, types = hand_made()
    image = np.full((32, 32, 3), 200, np.uint8)
    sample = NucleiSample(image, inst, types, "hand", 4)
    return write_dataset(tmp_path / "ds", [sample], SCHEME, {"source": "test"})


def test_cli_export_import_round_trip(tmp_path):
    ds = hand_dataset(tmp_path)
    proc = run("export", "geojson", str(ds), str(tmp_path / "gj"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 GeoJSON file(s), 6 nuclei" in proc.stdout
    fc = json.loads((tmp_path / "gj" / "hand.geojson").read_text())
    assert feature_collection_problems(fc) == []
    proc = run("import", "geojson", str(tmp_path / "gj" / "hand.geojson"), str(ds / "Images" / "hand.png"), str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    a, b = read_dataset(ds)[0], read_dataset(tmp_path / "back")[0]
    assert b.name == "hand" and np.array_equal(a.inst_map, b.inst_map) and np.array_equal(a.type_map, b.type_map)
    assert json.loads((tmp_path / "back" / "dataset.json").read_text())["provenance"]["source"] == "geojson"


def test_cli_failures(tmp_path):
    ds = hand_dataset(tmp_path)
    proc = run("export", "geojson", str(tmp_path / "nope"), str(tmp_path / "gj"))
    assert proc.returncode == 2 and "nope: folder not found" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    proc = run("export", "geojson", str(ds), str(tmp_path / "full"))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert run("export", "geojson", str(ds), str(tmp_path / "gj")).returncode == 0
    gj = tmp_path / "gj" / "hand.geojson"
    fc = json.loads(gj.read_text())
    for f in fc["features"]:
        f["properties"]["classification"]["name"] = "Tumor"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "hand.geojson").write_text(json.dumps(fc))
    proc = run("import", "geojson", str(tmp_path / "bad"), str(ds), str(tmp_path / "out"))
    assert proc.returncode == 2 and "class 'Tumor' is not in scheme 'consep'" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
    proc = run("import", "geojson", str(tmp_path / "bad"), str(ds), str(tmp_path / "out"), "--scheme", "glysac")
    assert proc.returncode == 2 and "not in scheme 'glysac'" in proc.stderr
    (tmp_path / "bad" / "other.geojson").write_text(json.dumps(fc))
    proc = run("import", "geojson", str(tmp_path / "bad"), str(ds), str(tmp_path / "out"))
    assert proc.returncode == 2 and "no image for GeoJSON files other" in proc.stderr
    (tmp_path / "junk.geojson").write_text("{not json")
    proc = run("import", "geojson", str(tmp_path / "junk.geojson"), str(ds / "Images" / "hand.png"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a readable JSON file" in proc.stderr and "Traceback" not in proc.stderr
    for f in fc["features"]:
        del f["properties"]["classification"]
    (tmp_path / "plain.geojson").write_text(json.dumps(fc))
    args = ["import", "geojson", str(tmp_path / "plain.geojson"), str(ds / "Images" / "hand.png"), str(tmp_path / "out")]
    proc = run(*args)
    assert proc.returncode == 2 and "no classification" in proc.stderr
    proc = run(*args, "--default-class", "inflammatory")
    assert proc.returncode == 0, proc.stderr
    assert set(np.unique(read_dataset(tmp_path / "out")[0].type_map)) == {0, 2}


def test_real_patches_and_consep_tiles_round_trip(shared_data, tmp_path):
    """Exact round trip through the CLI on the real labelled patches and on real CoNSeP tiles."""
    from conftest import consep_tiles

    real = read_dataset(shared_data / "real_he_labeled", "consep")
    tiles = consep_tiles("train", every=54)
    for label, samples in (("real", real.samples), ("consep", tiles)):
        src = write_dataset(tmp_path / f"{label}_ds", samples, SCHEME, {"source": "test"})
        proc = run("export", "geojson", str(src), str(tmp_path / f"{label}_gj"))
        assert proc.returncode == 0, proc.stderr
        for f in (tmp_path / f"{label}_gj").iterdir():
            assert feature_collection_problems(json.loads(f.read_text())) == [], f
        proc = run("import", "geojson", str(tmp_path / f"{label}_gj"), str(src), str(tmp_path / f"{label}_back"))
        assert proc.returncode == 0, proc.stderr
        back = read_dataset(tmp_path / f"{label}_back")
        assert back.names == sorted(s.name for s in samples)
        for s in samples:
            b = back.by_name(s.name)
            assert np.array_equal(b.inst_map, s.inst_map), s.name
            assert np.array_equal(b.type_map, s.type_map), s.name
    assert sum(len(s.inst_ids()) for s in real) == 125
