"""Tiled inference: exact stitching geometry, no seams, same nuclei as a whole-image pass,
and the `infer_folder` run folder (CoNSeP .mat + overlay, resume, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmix.data.io import read_image, read_mat_labels, write_image, write_mat_labels
from diffmix.errors import CheckpointError, ConfigError, DataError, RunFolderError
from diffmix.metrics import evaluate_folders, instance_metrics
from diffmix.seg.infer import infer_folder, infer_images, predict_image, tile_plan
from diffmix.seg.postproc import postprocess
from diffmix.seg.targets import make_targets

torch.set_num_threads(1)


def disk_label_map(h: int, w: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Touching elliptic nuclei (radius 4-10 px, later ones take only free pixels), classes 1..4."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    k = 0
    for _ in range(3 * n):
        if k == n:
            break
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(4, 10, 2)
        y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, h)
        x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, w)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & (inst[y0:y1, x0:x1] == 0)
        if disk.sum() < 40 or disk.sum() < 0.85 * np.pi * ry * rx:
            continue
        k += 1
        inst[y0:y1, x0:x1][disk] = k
    types = rng.integers(1, 5, size=k + 1)
    types[0] = 0
    return inst, types[inst].astype(np.int32)


def coord_image(h: int, w: int) -> np.ndarray:
    """An RGB image whose pixels spell their own (y, x) coordinate (y, x < 4096)."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([yy & 255, xx & 255, (yy >> 8) * 16 + (xx >> 8)], axis=-1).astype(np.uint8)


class LookupNet(nn.Module):
    """Deterministic fake network: decodes each pixel's coordinate and looks up fixed maps.

    A per-pixel function of the input, so any output pixel that lands in the wrong place
    after stitching shows up as a wrong value. Emits the ideal maps of a label map.
    """

    def __init__(self, inst_map: np.ndarray, type_map: np.ndarray, crop_margin: int = 0, input_size=None):
        super().__init__()
        t = make_targets(inst_map, type_map, min_hv_area=0)
        sign = 2.0 * t["np"] - 1.0  # +-1: probabilities 1 - 1e-7 and 1e-7 after the softmax
        self.np_logits = torch.from_numpy(np.stack([-8.0 * sign, 8.0 * sign]).astype(np.float32))
        self.hv = torch.from_numpy(t["hv"])
        self.tp_logits = torch.from_numpy(8.0 * np.eye(5, dtype=np.float32)[t["tp"]].transpose(2, 0, 1))
        self.crop_margin = crop_margin
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        code = torch.round(images * 255).long()
        y = code[:, 0] + 256 * (code[:, 2] // 16)
        x = code[:, 1] + 256 * (code[:, 2] % 16)
        m = self.crop_margin
        if m:
            y, x = y[:, m:-m, m:-m], x[:, m:-m, m:-m]
        return {k: getattr(self, a)[:, y, x].permute(1, 0, 2, 3) for k, a in (("np", "np_logits"), ("hv", "hv"), ("tp", "tp_logits"))}

    def full_maps(self):
        return (
            torch.softmax(self.np_logits, 0)[1].numpy(),
            self.hv.numpy(),
            torch.softmax(self.tp_logits, 0).numpy(),
        )


class RandomConvNet(nn.Module):
    """A randomly initialised fully convolutional net (zero 'same' padding, a stride-2 stage,
    ~10 px receptive-field radius) added to an identity path that reads ideal maps painted
    into the image (`maps_image`). The random part makes every output depend on its
    neighbourhood, so tile-edge outputs differ from a whole-image pass; the identity part
    keeps the nuclei meaningful, so post-processing finds real instances."""

    crop_margin = 0
    input_size = None

    def __init__(self, seed: int = 0, amplitude: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2 + 2 + 5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.1))
        self.amplitude = amplitude

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.c1(images - 0.5))
        x = F.relu(self.c2(F.avg_pool2d(x, 2)))
        x = F.relu(self.c3(x))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        r = torch.tanh(self.head(torch.tanh(self.c4(x)))) * self.amplitude
        code = torch.round(images * 255)
        types = torch.round(code[:, 0] / 40).long()
        sign = (types > 0).float() * 2 - 1
        np_logits = torch.stack([-6 * sign, 6 * sign], 1) + 2 * r[:, :2]
        hv = code[:, 1:] / 127.5 - 1 + 0.15 * r[:, 2:4]
        tp_logits = 6 * F.one_hot(types, 5).permute(0, 3, 1, 2).float() + 2 * r[:, 4:]
        return {"np": np_logits, "hv": hv, "tp": tp_logits}


def maps_image(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """RGB image carrying ideal maps: R = 40 x class, G/B = HV mapped to 0..255."""
    hv = make_targets(inst_map, type_map, min_hv_area=0)["hv"]
    rgb = [40 * type_map, np.round((hv[0] + 1) * 127.5), np.round((hv[1] + 1) * 127.5)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def he_like_image(inst_map: np.ndarray, seed: int, noise: float = 12.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty(inst_map.shape + (3,), np.float32)
    img[:] = (230, 170, 200)
    img[inst_map > 0] = (90, 50, 140)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def big():
    inst, types = disk_label_map(1000, 1000, 1400, seed=1)
    return inst, types


# --------------------------------------------------------------------------- geometry


def test_tile_plan_covers_the_image():
    pad, offsets, keep = tile_plan((1000, 1000), crop_margin=95, tile=(270, 270), overlap=0)
    assert keep == (80, 80) and pad[0] == 95 and pad[2] == 95  # hover_net: step 80, pad 95
    assert len(offsets) == 13 * 13
    pad, offsets, keep = tile_plan((300, 470), crop_margin=0, tile=(256, 256), overlap=64)
    assert keep == (192, 192) and len(offsets) == 2 * 3
    assert pad == (32, 2 * 192 - 300 + 32, 32, 3 * 192 - 470 + 32)
    with pytest.raises(ConfigError, match="even"):
        tile_plan((64, 64), crop_margin=0, tile=(64, 64), overlap=3)
    with pytest.raises(ConfigError, match="leaves nothing"):
        tile_plan((64, 64), crop_margin=0, tile=(64, 64), overlap=64)
    with pytest.raises(ConfigError, match="too small"):
        tile_plan((64, 64), crop_margin=40, tile=(64, 64), overlap=0)


@pytest.mark.parametrize(
    "margin,input_size,tile,overlap",
    [
        (0, None, 256, None),  # 'same' net, default overlap 64
        (0, None, 96, 0),  # side by side
        (0, None, None, None),  # whole image in one pass
        (46, 256, None, None),  # HoVer-Net fast: 256 -> 164
        (95, 270, None, None),  # HoVer-Net original: 270 -> 80
        (95, 270, 270, 20),
    ],
)
def test_stitching_places_every_output_pixel(margin, input_size, tile, overlap):
    inst, types = disk_label_map(300, 470, 300, seed=2)
    net = LookupNet(inst, types, margin, input_size)
    np_prob, hv, tp = predict_image(net, coord_image(300, 470), tile=tile, overlap=overlap, batch_size=5)
    want_np, want_hv, want_tp = net.full_maps()
    assert np_prob.shape == (300, 470) and hv.shape == (2, 300, 470) and tp.shape == (5, 300, 470)
    np.testing.assert_array_equal(hv, want_hv)
    np.testing.assert_allclose(np_prob, want_np, atol=1e-6)
    np.testing.assert_allclose(tp, want_tp, atol=1e-6)


def test_image_smaller_than_the_context():
    inst, types = disk_label_map(60, 40, 8, seed=3)
    net = LookupNet(inst, types, 95, 270)
    np_prob, hv, _ = predict_image(net, coord_image(60, 40))
    np.testing.assert_array_equal(hv, net.hv.numpy())


def test_very_large_image_is_tiled_automatically():
    inst, types = disk_label_map(2100, 60, 120, seed=10)
    net = LookupNet(inst, types)
    seen = []
    forward = net.forward
    net.forward = lambda x: (seen.append(tuple(x.shape)), forward(x))[1]
    _, hv, _ = predict_image(net, coord_image(2100, 60), batch_size=8)
    np.testing.assert_array_equal(hv, net.hv.numpy())
    assert seen == [(3, 3, 1024, 1024)]  # 2100 > WHOLE_IMAGE_MAX: 3 tiles of 1024, kept 768


def test_tiled_equals_whole_on_1000px_with_ideal_maps(big):
    inst, types = big
    net = LookupNet(inst, types)
    image = coord_image(1000, 1000)
    whole = postprocess(*predict_image(net, image, tile=None))
    tiled = postprocess(*predict_image(net, image, tile=256, batch_size=8))
    assert whole[0].max() > 1000
    assert instance_metrics(whole[0], tiled[0])["pq"] >= 0.99
    np.testing.assert_array_equal(whole[0], tiled[0])
    np.testing.assert_array_equal(whole[1], tiled[1])
    # and the nuclei are the true ones (ideal-map round trip on a 1000^2 image)
    assert instance_metrics(inst, tiled[0])["pq"] >= 0.95


def test_tiled_equals_whole_with_random_conv_net(big):
    inst, types = big
    image = maps_image(inst, types)
    net = RandomConvNet(seed=0).eval()
    whole_maps = predict_image(net, image, tile=None)
    tiled_maps = predict_image(net, image, tile=256, batch_size=8)
    for w, t in zip(whole_maps, tiled_maps):
        assert np.abs(w - t).max() < 1e-5  # no seams: every kept pixel had full context
    whole, tiled = postprocess(*whole_maps)[0], postprocess(*tiled_maps)[0]
    assert whole.max() > 1000 and instance_metrics(inst, whole)["pq"] > 0.8
    assert instance_metrics(whole, tiled)["pq"] >= 0.99
    # the margin is what removes the seams: side-by-side tiles of a 'same' net differ
    seamed = predict_image(net, image, tile=256, overlap=0, batch_size=8)
    assert np.abs(seamed[1] - whole_maps[1]).max() > 1e-2


def test_tiled_equals_whole_with_small_hover_net():
    models = pytest.importorskip("diffmix.seg.models")
    torch.manual_seed(0)
    net = models.SmallHoverNet(num_classes=4, width=4, depth=3).eval()
    inst, _ = disk_label_map(256, 320, 100, seed=5)
    image = he_like_image(inst, seed=6)
    whole = predict_image(net, image)
    tiled = predict_image(net, image, tile=128, overlap=32, batch_size=6)
    for w, t in zip(whole, tiled):
        assert np.abs(w - t).max() < 1e-4
    # a model left in training mode is run in eval mode (no batch statistics) and restored
    net.train()
    again = predict_image(net, image, tile=128, overlap=32, batch_size=6)
    assert net.training
    np.testing.assert_array_equal(again[1], tiled[1])


def test_predict_errors():
    net = LookupNet(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), 95, 270)
    with pytest.raises(ConfigError, match="270-px tiles"):
        predict_image(net, coord_image(8, 8), tile=256)
    with pytest.raises(DataError, match="uint8"):
        predict_image(net, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="batch_size"):
        predict_image(net, coord_image(8, 8), batch_size=0)

    class Wrong(nn.Module):
        crop_margin, input_size = 0, None

        def forward(self, x):
            return {"np": x[:, :2], "hv": x[:, :2, :-1], "tp": x}

    with pytest.raises(CheckpointError, match="'hv' has shape"):
        predict_image(Wrong(), coord_image(32, 32), tile=32, overlap=0)


# --------------------------------------------------------------------------- run folder


def make_folders(tmp_path):
    inst, types = disk_label_map(200, 260, 60, seed=7)
    images, truth = tmp_path / "images", tmp_path / "truth" / "Labels"
    crops = {"a": (slice(0, 150), slice(0, 200)), "b": (slice(40, 200), slice(100, 260))}
    for name, (ys, xs) in crops.items():
        img = coord_image(200, 260)[ys, xs]
        write_image(images / f"{name}.png", img)
        from diffmix.data.sample import remap_ids

        write_mat_labels(truth / f"{name}.mat", remap_ids(inst[ys, xs]), types[ys, xs])
    return LookupNet(inst, types), images, truth.parent


def test_infer_images_writes_consep_mat_overlay_and_resumes(tmp_path):
    net, images, truth = make_folders(tmp_path)
    out = tmp_path / "pred"
    summary = infer_images(net, images, out, tile=64, progress=False, keep_unmarked=True)
    assert summary["done"] == 2 and summary["skipped"] == 0 and summary["nuclei"] > 20
    for name, shape in (("a", (150, 200)), ("b", (160, 160))):
        raw = scipy.io.loadmat(out / "Labels" / f"{name}.mat")
        n = int(raw["inst_map"].max())
        assert raw["inst_map"].shape == shape and raw["inst_map"].dtype == np.int32
        ids = np.unique(raw["inst_map"])
        assert ids[ids > 0].tolist() == list(range(1, n + 1))  # contiguous
        assert raw["inst_type"].shape == (n, 1) and raw["inst_centroid"].shape == (n, 2)
        labels = read_mat_labels(out / "Labels" / f"{name}.mat")
        ys, xs = np.nonzero(labels["inst_map"] == 1)
        np.testing.assert_allclose(labels["inst_centroid"][0], (xs.mean(), ys.mean()))  # (x, y)
        assert set(labels["inst_type"].tolist()) <= {1, 2, 3, 4}
        overlay = read_image(out / "Overlay" / f"{name}.png")
        assert overlay.shape == shape + (3,)
        assert np.count_nonzero(np.any(overlay != read_image(images / f"{name}.png"), axis=-1)) > 100
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    # `diffmix evaluate` reads the run folder directly: ideal maps give near-perfect scores
    res = evaluate_folders(out, truth, class_ids=(1, 2, 3, 4))
    assert res["mean"]["pq"] >= 0.95 and res["type"]["acc"] == 1.0

    # resume: nothing redone; a half-done image (mat without overlay) is redone
    mtime = (out / "Labels" / "a.mat").stat().st_mtime_ns
    (out / "Overlay" / "b.png").unlink()
    again = infer_images(net, images, out, tile=64, progress=False, keep_unmarked=True, batch_size=1)
    assert (again["done"], again["skipped"]) == (1, 1)
    assert (out / "Labels" / "a.mat").stat().st_mtime_ns == mtime
    assert (out / "Overlay" / "b.png").is_file()
    # other settings on the same folder are refused, not mixed
    with pytest.raises(RunFolderError, match="different run"):
        infer_images(net, images, out, tile=96, progress=False, keep_unmarked=True)


def test_infer_images_errors(tmp_path):
    net = LookupNet(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        infer_images(net, tmp_path / "empty", tmp_path / "o1", progress=False)
    with pytest.raises(DataError, match="not a folder"):
        infer_images(net, tmp_path / "missing", tmp_path / "o2", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image"):
        infer_images(net, tmp_path / "bad", tmp_path / "o3", progress=False)
    assert not list((tmp_path / "o3").rglob("*.mat"))
    with pytest.raises(CheckpointError, match="not found"):
        infer_folder(tmp_path / "nope.safetensors", tmp_path / "bad", tmp_path / "o4")
    if not torch.cuda.is_available():
        (tmp_path / "x.safetensors").write_bytes(b"0")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            infer_folder(tmp_path / "x.safetensors", tmp_path / "bad", tmp_path / "o5", device="cuda")


def test_infer_folder_from_a_checkpoint(tmp_path):
    models = pytest.importorskip("diffmix.seg.models")
    from diffmix.checkpoints import save_checkpoint

    torch.manual_seed(0)
    model = models.build_segmenter({"arch": "small", "num_classes": 4, "width": 4, "depth": 2})
    ckpt = tmp_path / "final.safetensors"
    save_checkpoint(
        ckpt,
        {"model": model.state_dict()},
        {"kind": "seg", "num_classes": 4, "model": model.config.model_dump(), "preset": "test"},
    )
    inst, _ = disk_label_map(96, 80, 20, seed=8)
    write_image(tmp_path / "img" / "Images" / "t1.png", he_like_image(inst, 9))
    summary = infer_folder(ckpt, tmp_path / "img", tmp_path / "out", tile=64, progress=False)
    assert summary["done"] == 1
    labels = read_mat_labels(tmp_path / "out" / "Labels" / "t1.mat")
    assert labels["inst_map"].shape == (96, 80)
    # the same checkpoint again on the same folder resumes
    assert infer_folder(ckpt, tmp_path / "img", tmp_path / "out", tile=64, progress=False)["skipped"] == 1
    # the CLI command runs the same function
    from typer.testing import CliRunner

    from diffmix.cli import app

    args = ["seg", "infer", str(ckpt), str(tmp_path / "img"), str(tmp_path / "cli"), "--tile", "64", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 image(s) segmented" in result.output
    np.testing.assert_array_equal(
        read_mat_labels(tmp_path / "cli" / "Labels" / "t1.mat")["inst_map"], labels["inst_map"]
    )
