"""Data layer: reading the real patches, round trips, every error path, patches, schemes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from diffmix.cli import main
from diffmix.data import CONSEP, GLYSAC, NucleiSample, get_scheme, read_dataset, scan_dataset, write_dataset
from diffmix.data.io import read_image, read_mat_labels, write_hovernet_npy, write_image, write_mat_labels
from diffmix.data.patches import augment, crop, dihedral, grid_offsets, grid_patches, random_crop
from diffmix.data.sample import remap_ids
from diffmix.data.schemes import scheme_from_yaml
from diffmix.errors import ClassSchemeError, DataError, PairingError


def make_sample(name: str = "s", size: int = 32, seed: int = 0, num_classes: int | None = 4) -> NucleiSample:
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    for i, (y, x) in enumerate([(4, 4), (4, 20), (20, 8), (22, 22)], start=1):
        inst[y : y + 6, x : x + 6] = i
        types[y : y + 6, x : x + 6] = 1 + (i % 4)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return NucleiSample(image, inst, types, name, num_classes)


def write_raw_consep(root: Path, samples: list[NucleiSample], raw_types: dict[str, np.ndarray] | None = None) -> Path:
    """A raw (unmerged, no dataset.json) CoNSeP-layout folder."""
    for s in samples:
        write_image(root / "Images" / f"{s.name}.png", s.image)
        tm = raw_types[s.name] if raw_types else s.type_map
        write_mat_labels(root / "Labels" / f"{s.name}.mat", s.inst_map, tm)
    return root


# ---------------------------------------------------------------- real data


def test_real_patches_read(shared_data: Path) -> None:
    ds = read_dataset(shared_data / "real_he_labeled", "consep")
    assert ds.names == ["patch1", "patch2", "patch3"]
    assert sum(len(s.inst_ids()) for s in ds) == 125
    assert all(s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8 for s in ds)
    # raw ids {2,3,5}, {1}, {1,2,3,5} -> merged 5 -> 4 (spindle)
    present = [set(s.inst_types().values()) for s in ds]
    assert present == [{2, 3, 4}, {1}, {1, 2, 3, 4}]
    # the stored centroids agree with the mask moments (x, y order)
    raw = read_mat_labels(shared_data / "real_he_labeled" / "patch1.mat")
    ours = np.array(list(ds[0].inst_centroids().values()))
    assert np.allclose(ours, raw["inst_centroid"], atol=1.0)


def test_real_roundtrip(shared_data: Path, tmp_path: Path) -> None:
    ds = read_dataset(shared_data / "real_he_labeled")
    out = write_dataset(tmp_path / "out", ds.samples, ds.scheme, {"source": "test"})
    back = read_dataset(out)
    for a, b in zip(ds, back):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.inst_map, b.inst_map)
        assert np.array_equal(a.type_map, b.type_map)
    mat = scipy.io.loadmat(out / "Labels" / "patch2.mat")
    n = len(ds[1].inst_ids())
    assert mat["inst_type"].shape == (n, 1)
    assert mat["inst_centroid"].shape == (n, 2)


# ---------------------------------------------------------------- round trips


def test_roundtrip_exact_and_nx1(tmp_path: Path) -> None:
    samples = [make_sample("a", seed=1), make_sample("b", seed=2)]
    out = write_dataset(tmp_path / "ds", samples, CONSEP, {"k": 1})
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["merged"] is True and meta["scheme"]["name"] == "consep"
    back = read_dataset(out)
    for a, b in zip(samples, back):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.inst_map, b.inst_map)
        assert np.array_equal(a.type_map, b.type_map)
    mat = scipy.io.loadmat(out / "Labels" / "a.mat")
    assert mat["inst_type"].shape == (4, 1)
    assert mat["inst_type"][:, 0].tolist() == [2, 3, 4, 1]
    assert np.allclose(mat["inst_centroid"][0], [6.5, 6.5])  # (x, y) of the block at rows 4..9, cols 4..9


def test_raw_merge_applied_once(tmp_path: Path) -> None:
    s = make_sample("a")
    raw = np.array([0, 1, 2, 4, 7])[s.type_map]  # raw CoNSeP: 4 malignant epithelial, 7 endothelial
    root = write_raw_consep(tmp_path / "raw", [s], {"a": raw})
    merged = read_dataset(root, "consep")
    expected = s.type_map  # 4 -> 3 epithelial, 7 -> 4 spindle
    assert np.array_equal(merged[0].type_map, expected)
    out = write_dataset(tmp_path / "merged", merged.samples, merged.scheme)
    again = read_dataset(out, "consep")  # same scheme: read as merged, no second merge
    assert np.array_equal(again[0].type_map, expected)
    with pytest.raises(ClassSchemeError, match=str(out)) as err:
        read_dataset(out, "glysac")
    assert "twice" in str(err.value)


def test_hovernet_npy_and_flat_layouts(tmp_path: Path) -> None:
    s = make_sample("p")
    write_hovernet_npy(tmp_path / "npy" / "p.npy", s)
    arr = np.load(tmp_path / "npy" / "p.npy")
    assert arr.shape == (32, 32, 5)
    ds = read_dataset(tmp_path / "npy")
    assert np.array_equal(ds[0].image, s.image) and np.array_equal(ds[0].type_map, s.type_map)
    flat = tmp_path / "flat"
    write_image(flat / "q.png", s.image)
    np.save(flat / "q.npy", np.stack([s.inst_map, s.type_map]))
    assert np.array_equal(read_dataset(flat)[0].inst_map, s.inst_map)


def test_glysac_tif(tmp_path: Path) -> None:
    s = make_sample("g")
    write_image(tmp_path / "Images" / "g.tif", s.image)
    raw = s.type_map.copy()
    raw[raw == 4] = 10  # raw GLySAC 10 -> merged 1 (misc)
    write_mat_labels(tmp_path / "Labels" / "g.mat", s.inst_map, raw)
    ds = read_dataset(tmp_path, "glysac")
    assert np.array_equal(ds[0].image, s.image)
    assert np.array_equal(ds[0].type_map, GLYSAC.merge_type_map(raw))


def test_pannuke(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).round()
    masks = np.zeros((2, 16, 16, 6))
    masks[0, 2:5, 2:5, 0] = 7  # neoplastic
    masks[0, 8:12, 8:12, 3] = 7  # dead, same id in another channel: a distinct nucleus
    masks[1, 1:4, 1:4, 4] = 3  # epithelial
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    folder = tmp_path / "Fold 1"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    np.save(folder / "images" / "images.npy", images)
    np.save(folder / "masks" / "masks.npy", masks)
    ds = read_dataset(tmp_path)
    assert ds.scheme.name == "pannuke" and len(ds) == 2
    assert ds[0].inst_types() == {1: 1, 2: 4}
    assert ds[1].inst_types() == {1: 5}
    assert ds.class_counts() == {1: 1, 2: 0, 3: 0, 4: 1, 5: 1}


# ---------------------------------------------------------------- errors name the file


def test_missing_pair_lists_names(tmp_path: Path) -> None:
    root = write_raw_consep(tmp_path, [make_sample("a"), make_sample("b")])
    (root / "Labels" / "b.mat").unlink()
    write_image(root / "Images" / "c.png", make_sample("c").image)
    with pytest.raises(PairingError, match="images without labels: b, c"):
        read_dataset(root)
    (root / "Images" / "b.png").unlink()
    (root / "Images" / "c.png").unlink()
    write_mat_labels(root / "Labels" / "z.mat", make_sample().inst_map, make_sample().type_map)
    with pytest.raises(PairingError, match="labels without images: z"):
        read_dataset(root)


def test_folder_of_mat_labels_alone_is_unpaired_not_a_crash(tmp_path: Path) -> None:
    # a flat folder of .mat labels without images was taken for HoVer-Net .npy patches and
    # ended in an AssertionError (a traceback from `diffmix inspect`)
    s = make_sample("a")
    write_mat_labels(tmp_path / "a.mat", s.inst_map, s.type_map)
    with pytest.raises(PairingError, match="labels without images: a"):
        read_dataset(tmp_path)
    res = subprocess.run([sys.executable, "-m", "diffmix", "inspect", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {tmp_path}: labels without images: a"


def test_npy_labels_without_their_image_name_the_file(tmp_path: Path) -> None:
    s = make_sample("a")
    np.save(tmp_path / "a.npy", np.stack([s.inst_map, s.type_map]))  # 2xHxW: labels only
    with pytest.raises(DataError, match=r"a\.npy: holds labels only and no image"):
        read_dataset(tmp_path)
    ds, problems = scan_dataset(tmp_path)
    assert len(ds) == 0 and len(problems) == 1 and "a.npy: holds labels only" in problems[0]


def test_shape_mismatch_names_file(tmp_path: Path) -> None:
    s = make_sample("a")
    write_image(tmp_path / "Images" / "a.png", s.image[:20])
    write_mat_labels(tmp_path / "Labels" / "a.mat", s.inst_map, s.type_map)
    with pytest.raises(DataError, match=r"a\.mat.*does not match"):
        read_dataset(tmp_path)


def test_float_inst_map_names_file(tmp_path: Path) -> None:
    s = make_sample("a")
    write_image(tmp_path / "Images" / "a.png", s.image)
    inst = s.inst_map.astype(float)
    inst[0, 0] = 0.5
    (tmp_path / "Labels").mkdir()
    scipy.io.savemat(tmp_path / "Labels" / "a.mat", {"inst_map": inst, "type_map": s.type_map})
    with pytest.raises(DataError, match=r"a\.mat: inst_map has non-integer values"):
        read_dataset(tmp_path)


def test_unknown_class_id_names_file(tmp_path: Path) -> None:
    s = make_sample("a")
    raw = s.type_map.copy()
    raw[raw == 2] = 9  # not a CoNSeP class
    write_raw_consep(tmp_path, [s], {"a": raw})
    with pytest.raises(ClassSchemeError, match=r"a\.mat: raw class ids \[9\]"):
        read_dataset(tmp_path, "consep")


def test_corrupt_mat_names_file(tmp_path: Path) -> None:
    s = make_sample("a")
    write_image(tmp_path / "Images" / "a.png", s.image)
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "a.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match=r"a\.mat: corrupt"):
        read_dataset(tmp_path)


def test_instance_with_two_classes_names_file(tmp_path: Path) -> None:
    s = make_sample("a")
    types = s.type_map.copy()
    types[4, 4] = 1 if types[4, 5] != 1 else 2
    write_raw_consep(tmp_path, [s], {"a": types})
    with pytest.raises(DataError, match=r"a\.mat: .*more than one class"):
        read_dataset(tmp_path)


def test_sample_validation_messages() -> None:
    s = make_sample("x")
    with pytest.raises(DataError, match="x: type_map shape"):
        NucleiSample(s.image, s.inst_map, s.type_map[:10], "x")
    with pytest.raises(DataError, match="x: image has dtype float64"):
        NucleiSample(s.image.astype(float), s.inst_map, s.type_map, "x")
    with pytest.raises(DataError, match=r"x: class ids \[4\] outside"):
        NucleiSample(s.image, s.inst_map, s.type_map, "x", num_classes=3)
    with pytest.raises(DataError, match="negative"):
        NucleiSample(s.image, -s.inst_map, s.type_map, "x")


def test_write_refuses_nonempty(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_dataset(tmp_path / "out", [make_sample()], CONSEP)
    assert (tmp_path / "out" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_inspect_collects_all_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good, bad1, bad2 = make_sample("good"), make_sample("bad1"), make_sample("bad2")
    write_raw_consep(tmp_path, [good, bad1, bad2])
    (tmp_path / "Labels" / "bad1.mat").write_bytes(b"junk")
    raw = bad2.type_map.copy()
    raw[raw == 2] = 11
    write_mat_labels(tmp_path / "Labels" / "bad2.mat", bad2.inst_map, raw)
    ds, problems = scan_dataset(tmp_path, "consep")
    assert ds.names == ["good"] and len(problems) == 2
    with pytest.raises(SystemExit) as ex:
        main(["inspect", str(tmp_path)])
    assert ex.value.code == 1
    out = capsys.readouterr().out
    assert "bad1.mat: corrupt" in out and "bad2.mat: raw class ids [11]" in out


def test_cli_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["inspect", str(tmp_path / "nope")])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope: dataset folder not found" in err and "Traceback" not in err


# ---------------------------------------------------------------- schemes


def test_schemes() -> None:
    assert CONSEP.merge_type_map(np.arange(8)).tolist() == [0, 1, 2, 3, 3, 4, 4, 4]
    assert GLYSAC.merge_type_map(np.arange(11)).tolist() == [0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1]
    assert get_scheme("pannuke").num_classes == 5 and CONSEP.minor_class == GLYSAC.minor_class == 1
    with pytest.raises(ClassSchemeError, match="unknown class scheme 'foo'"):
        get_scheme("foo")


def test_yaml_scheme(tmp_path: Path) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nclasses: {1: tumour, 2: other}\nmerge: {1: [1, 3], 2: [2]}\nminor_class: 2\n")
    sch = scheme_from_yaml(p)
    assert sch.merge_type_map(np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 1]
    assert get_scheme(str(p)).minor_class == 2
    p.write_text("classes: {1: a}\nmerge: {1: [1], 2: [1]}\nminor_class: 1\n")
    with pytest.raises(ClassSchemeError, match="mine.yaml"):
        scheme_from_yaml(p)


# ---------------------------------------------------------------- patches


def test_grid_spec_offsets() -> None:
    offs = grid_offsets(1000, 1000)
    assert len(offs) == 100
    assert offs[:3] == [(0, 0), (0, 76), (0, 152)] and offs[10] == (76, 0) and offs[-1] == (684, 684)


def test_grid_patches_remapped() -> None:
    rng = np.random.default_rng(0)
    inst = np.zeros((100, 100), np.int32)
    for i in range(1, 40):
        y, x = rng.integers(0, 95, 2)
        inst[y : y + 5, x : x + 5] = i * 7
    types = np.where(inst > 0, 2, 0).astype(np.int32)
    s = NucleiSample(np.zeros((100, 100, 3), np.uint8), inst, types, "img")
    patches = grid_patches(s, 40, 30)
    assert len(patches) == 9 and patches[4].name == "img_004"
    for p in patches:
        ids = p.inst_ids()
        assert ids.tolist() == list(range(1, len(ids) + 1))
    p4 = patches[4]
    assert np.array_equal(p4.inst_map > 0, inst[30:70, 30:70] > 0)


def test_random_crop_covers_all_offsets() -> None:
    image = np.zeros((6, 6, 3), np.uint8)
    image[:, :, 0] = np.arange(6)[:, None]  # row index
    image[:, :, 1] = np.arange(6)[None, :]  # column index
    inst = np.arange(1, 37, dtype=np.int32).reshape(6, 6)
    s = NucleiSample(image, inst, np.ones_like(inst), "r")
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(300):
        c = random_crop(s, 4, rng)
        assert c.image.shape == (4, 4, 3) and c.inst_ids().tolist() == list(range(1, 17))
        offsets.add((int(c.image[0, 0, 0]), int(c.image[0, 0, 1])))
    # every top-left offset 0..2 on both axes is drawn (the official off-by-one is fixed)
    assert offsets == {(y, x) for y in range(3) for x in range(3)}


def test_augmentations_are_groups() -> None:
    s = make_sample("a")
    six = [augment(s, k) for k in range(6)]
    assert len({p.image.tobytes() for p in six}) == 6
    assert np.array_equal(six[1].inst_map, np.rot90(s.inst_map, 1))
    assert np.array_equal(six[4].image, s.image[:, ::-1])
    assert np.array_equal(six[5].image, s.image[::-1])
    eight = [dihedral(s, k) for k in range(8)]
    assert len({p.image.tobytes() for p in eight}) == 8
    for p in eight:  # labels follow the image: same instances, same classes
        assert sorted(p.inst_types().items()) == sorted(s.inst_types().items())


def test_crop_out_of_bounds() -> None:
    with pytest.raises(DataError, match="leaves"):
        crop(make_sample("a"), 20, 0, 16)


def test_remap_ids() -> None:
    out = remap_ids(np.array([[0, 5, 5], [9, 0, 2**31 - 1]]))
    assert out.tolist() == [[0, 1, 1], [2, 0, 3]]
    assert out.dtype == np.int32


def test_read_image_variants(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (4, 5, 3)
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png")[0, 0].tolist() == [7, 7, 7]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        read_image(tmp_path / "bad.png")
