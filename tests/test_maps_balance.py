"""Balancing maps (spec 6a): hand-computed swaps, a full-image oracle, the issue-4 invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from diffmix.data.sample import NucleiSample
from diffmix.errors import ConfigError
from diffmix.maps.balance import BalanceParams, allocate_quota, balance_dataset, balance_plan, paste_window


def ellipse_dataset(n_images: int = 3, size: int = 120, seed: int = 0, cell: int = 20, touching: bool = True) -> list[NucleiSample]:
    """Random ellipses on a jittered grid; ~15% minor (class 1), thin ones.

    With `touching`, major ellipses may reach into neighbouring cells (drawn only on
    background), so many nuclei touch, as in real tissue; otherwise none overlap.
    """
    rng = np.random.default_rng(seed)
    out = []
    cells = size // cell
    for n in range(n_images):
        inst = np.zeros((size, size), np.int32)
        types = np.zeros((size, size), np.int32)
        nid = 0
        for r in range(cells):
            for c in range(cells):
                cls = int(rng.choice(4, p=[0.15, 0.25, 0.3, 0.3])) + 1
                if cls == 1:  # thin and sometimes long, so pastes can reach past their target
                    a, b = rng.uniform(1.0, 2.5), rng.uniform(2.0, 8.0)
                else:
                    a, b = rng.uniform(1.5, 8.0), rng.uniform(1.5, 8.0)
                th = rng.uniform(0, np.pi)
                ext = int(math.ceil(max(a, b))) + 1
                if touching and cls != 1:
                    ext = 3
                cy = rng.uniform(r * cell + ext, (r + 1) * cell - ext)
                cx = rng.uniform(c * cell + ext, (c + 1) * cell - ext)
                yy, xx = np.mgrid[0:size, 0:size]
                u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
                v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
                inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
                inside &= inst == 0  # drawn around earlier nuclei: they touch, never overlap
                if inside.any():
                    nid += 1
                    inst[inside] = nid
                    types[inside] = cls
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out.append(NucleiSample(image, inst, types, f"img{n}", 4))
    return out


def oracle(samples, seed, minor=1, fraction=0.8, border=30, ratio=2.3):
    """spec 6a written plainly with full-image masks (plus this project's two documented guards)."""
    outs = []
    seqs = np.random.SeedSequence(seed).spawn(len(samples))

    def info(s):
        ids = [i for i in np.unique(s.inst_map) if i > 0]
        rows = []
        for i in ids:
            ys, xs = np.nonzero(s.inst_map == i)
            rows.append((int(i), ys.mean(), xs.mean(), len(ys), int(s.type_map[ys[0], xs[0]])))
        return rows

    tabs = [info(s) for s in samples]
    for t, s in enumerate(samples):
        h, w = s.shape
        rng = np.random.default_rng(seqs[t])
        ok = lambda r: not (r[1] < border or r[1] > h - border or r[2] < border or r[2] > w - border)  # noqa: E731
        rows = tabs[t]
        cand = []
        for c in sorted({r[4] for r in rows if ok(r)} - {minor}):
            cand += [k for k, r in enumerate(rows) if ok(r) and r[4] == c]
        cand = np.array(cand, dtype=np.int64)
        picked = list(rng.choice(cand, int(fraction * len(cand)), replace=False)) if int(fraction * len(cand)) else []
        picked.sort(key=lambda k: rows[k][3])
        others = [j for j in range(len(samples)) if j != t]
        order = [t] + [others[k] for k in rng.permutation(len(others))]
        pool = [(j, r) for j in order for r in tabs[j] if ok(r) and r[4] == minor]
        used = [False] * len(pool)
        out = s.inst_map.copy()
        for k in picked:
            tid = rows[k][0]
            dil = ndi.binary_dilation(s.inst_map == tid, iterations=2)
            a1 = dil.sum()
            p = next((p for p, (j, r) in enumerate(pool) if not used[p] and a1 >= ratio * r[3]), None)
            if p is None:
                continue
            j, r = pool[p]
            m = samples[j].inst_map == r[0]
            ys, xs = np.nonzero(m)
            crop = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            r0 = math.floor(float(np.round(rows[k][1])) - crop.shape[0] / 2)
            c0 = math.floor(float(np.round(rows[k][2])) - crop.shape[1] / 2)
            paste = np.zeros((h, w), bool)
            for y, x in zip(*np.nonzero(crop)):
                if 0 <= r0 + y < h and 0 <= c0 + x < w:
                    paste[r0 + y, c0 + x] = True
            if not paste.any():
                continue
            hit = out[paste & (out != 0) & (out != tid)]
            if any((out == i).sum() == (hit == i).sum() for i in np.unique(hit)):
                continue
            out[out == tid] = 0
            out[paste] = tid
            used[p] = True
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def data():
    return ellipse_dataset()


@pytest.fixture(scope="module")
def balanced(data):
    return balance_dataset(data, BalanceParams(minor_class=1, seed=7))


def test_matches_plain_full_image_oracle(data, balanced):
    result, report = balanced
    assert report.accepted_swaps > 10
    for got, want in zip(result, oracle(data, seed=7)):
        assert np.array_equal(got.inst_map, want)


def test_minor_count_rises_by_exactly_the_swaps(data, balanced):
    result, report = balanced
    before = {c: sum(s.class_counts().get(c, 0) for s in data) for c in range(1, 5)}
    after = {c: sum(s.class_counts().get(c, 0) for s in result) for c in range(1, 5)}
    assert after[1] - before[1] == report.accepted_swaps
    assert sum(after.values()) == sum(before.values())  # no nucleus vanishes
    assert report.class_counts_before == before and report.class_counts_after == after
    # each instance has exactly one class: NucleiSample validated it; swapped ones are minor
    _, plans, _ = balance_plan(data, BalanceParams(minor_class=1, seed=7))
    for s, swaps in zip(result, plans):
        types = s.inst_types()
        assert all(types[sw.target_id] == 1 for sw in swaps)


def test_other_nuclei_change_only_under_pasted_sources(data, balanced):
    result, report = balanced
    _, plans, _ = balance_plan(data, BalanceParams(minor_class=1, seed=7))
    total_lost = 0
    for orig, new, swaps in zip(data, result, plans):
        targets = {sw.target_id for sw in swaps}
        pasted = np.zeros(orig.shape, bool)
        for sw in swaps:
            r, c = sw.paste_origin
            ph, pw = sw.paste_mask.shape
            pasted[r : r + ph, c : c + pw] |= sw.paste_mask
        for i in orig.inst_ids():
            if i in targets:
                continue
            before, after = orig.inst_map == i, new.inst_map == i
            assert not np.any(after & ~before)  # never grows or moves
            lost = before & ~after
            assert not np.any(lost & ~pasted)  # only pixels a paste covered
            total_lost += int(lost.sum())
        # pasted pixels of each target: its final mask lies inside its paste; later pastes may
        # cover some of it, and the report counts those too
        for sw in swaps:
            r, c = sw.paste_origin
            ph, pw = sw.paste_mask.shape
            own = np.zeros(orig.shape, bool)
            own[r : r + ph, c : c + pw] = sw.paste_mask
            assert np.array_equal(new.inst_map == sw.target_id, own & (new.inst_map == sw.target_id))
            assert (new.inst_map == sw.target_id).any()
            total_lost += int(sw.paste_mask.sum() - (new.inst_map == sw.target_id).sum())
    assert report.overwritten_pixels == total_lost
    assert report.overwritten_pixels > 0  # the fixture does exercise overwriting


def test_hand_computed_swap_first_fit_and_paste_geometry():
    inst0 = np.zeros((90, 90), np.int32)
    types0 = np.zeros((90, 90), np.int32)
    inst0[40:50, 40:50] = 1  # target, class 2, centroid (44.5, 44.5)
    types0[40:50, 40:50] = 2
    inst0[60:70, 60:70] = 2  # minor but too big: 100 px, 2.3 * 100 > dilated 10x10 area (184)
    types0[60:70, 60:70] = 1
    inst1 = np.zeros((90, 90), np.int32)
    types1 = np.zeros((90, 90), np.int32)
    inst1[50:53, 30:35] = 5  # minor 3x5 = 15 px: fits (184 >= 34.5)
    types1[50:53, 30:35] = 1
    inst1[35:37, 35:37] = 6  # minor 4 px, also fits but comes later in id order
    types1[35:37, 35:37] = 1
    img = np.zeros((90, 90, 3), np.uint8)
    samples = [NucleiSample(img, inst0, types0, "a", 4), NucleiSample(img, inst1, types1, "b", 4)]
    out, report = balance_dataset(samples, BalanceParams(minor_class=1, fraction=1.0, seed=0))
    assert ndi.binary_dilation(inst0 == 1, iterations=2).sum() == 184
    # np.round(44.5) = 44 (half to even); rows floor(44 - 1.5) = 42..44, cols floor(44 - 2.5) = 41..45
    expected = np.zeros((90, 90), np.int32)
    expected[42:45, 41:46] = 1
    expected[60:70, 60:70] = 2
    assert np.array_equal(out[0].inst_map, expected)
    assert out[0].inst_types() == {1: 1, 2: 1}
    # image b has no non-minor nucleus: untouched
    assert np.array_equal(out[1].inst_map, inst1)
    assert report.accepted_swaps == 1
    rec = report.per_image[0]
    assert rec["sources_from_other_images"] == 1 and rec["sources_from_this_image"] == 0
    assert paste_window(44.5, 3) == 42 and paste_window(45.5, 3) == 44 and paste_window(0.4, 5) == -3


def test_each_source_used_once_per_image_but_again_in_another():
    def square_image(name):
        inst = np.zeros((100, 100), np.int32)
        types = np.zeros((100, 100), np.int32)
        inst[35:45, 35:45], types[35:45, 35:45] = 1, 3
        inst[55:65, 55:65], types[55:65, 55:65] = 2, 3
        return inst, types

    i0, t0 = square_image("a")
    i1, t1 = square_image("b")
    i0[50:52, 40:42], t0[50:52, 40:42] = 3, 1  # the only minor nucleus of the dataset
    img = np.zeros((100, 100, 3), np.uint8)
    samples = [NucleiSample(img, i0, t0, "a", 4), NucleiSample(img, i1, t1, "b", 4)]
    _, report = balance_dataset(samples, BalanceParams(minor_class=1, fraction=1.0, seed=3))
    assert [r["accepted_swaps"] for r in report.per_image] == [1, 1]
    assert [r["skipped_no_source"] for r in report.per_image] == [1, 1]


def test_pastes_are_clipped_at_the_border_instead_of_crashing():
    # a tall thin minor source (70 x 1) pasted at a target centroid 31 px from the top
    inst_t = np.zeros((100, 100), np.int32)
    types_t = np.zeros((100, 100), np.int32)
    inst_t[25:38, 40:53], types_t[25:38, 40:53] = 1, 2  # centroid y = 31
    inst_s = np.zeros((100, 100), np.int32)
    types_s = np.zeros((100, 100), np.int32)
    inst_s[15:85, 50], types_s[15:85, 50] = 4, 1  # area 70; dilated target area 13*13+... >= 161
    img = np.zeros((100, 100, 3), np.uint8)
    samples = [NucleiSample(img, inst_t, types_t, "t", 4), NucleiSample(img, inst_s, types_s, "s", 4)]
    out, report = balance_dataset(samples, BalanceParams(minor_class=1, fraction=1.0, seed=0))
    assert report.accepted_swaps == 1
    # rows floor(31 - 35) = -4 .. 65 clipped to 0 .. 65, column floor(46 - 0.5) = 45
    expected = np.zeros((100, 100), np.int32)
    expected[0:66, 45] = 1
    assert np.array_equal(out[0].inst_map, expected)
    # a huge nucleus near the corner is simply ineligible or clipped, never a crash
    big = np.zeros((100, 100), np.int32)
    big[0:70, 0:70] = 1
    btypes = (big > 0).astype(np.int32) * 3
    out, _ = balance_dataset([NucleiSample(img, big, btypes, "big", 4)] + samples,
                             BalanceParams(minor_class=1, fraction=1.0, seed=0))
    assert out[0].inst_map.shape == (100, 100)


def test_same_seed_same_bytes_different_seed_differs(data):
    a, _ = balance_dataset(data, BalanceParams(minor_class=1, seed=11))
    b, _ = balance_dataset(data, BalanceParams(minor_class=1, seed=11))
    c, _ = balance_dataset(data, BalanceParams(minor_class=1, seed=12))
    assert all(x.inst_map.tobytes() == y.inst_map.tobytes() and x.type_map.tobytes() == y.type_map.tobytes()
               for x, y in zip(a, b))
    assert any(x.inst_map.tobytes() != y.inst_map.tobytes() for x, y in zip(a, c))
    # images are the originals, untouched
    assert all(x.image is y.image or np.array_equal(x.image, y.image) for x, y in zip(a, data))


def test_target_distribution_sets_the_number_of_swaps(data):
    full, rep_full = balance_dataset(data, BalanceParams(minor_class=1, seed=5))
    n = sum(rep_full.class_counts_before.values())
    m = rep_full.class_counts_before[1]
    goal = (m + rep_full.accepted_swaps // 2) / n
    part, rep = balance_dataset(data, BalanceParams(minor_class=1, seed=5, target_distribution={1: goal}))
    assert rep.accepted_swaps == round(goal * n) - m
    assert rep.class_counts_after[1] == round(goal * n)
    assert rep.requested == {1: goal}
    assert rep.achieved[1] == pytest.approx(round(goal * n) / n)
    # each image keeps a prefix of its faithful plan
    _, plans_full, _ = balance_plan(data, BalanceParams(minor_class=1, seed=5))
    _, plans_part, _ = balance_plan(data, BalanceParams(minor_class=1, seed=5, target_distribution={1: goal}))
    for pf, pp in zip(plans_full, plans_part):
        assert [s.target_id for s in pp] == [s.target_id for s in pf[: len(pp)]]
    # asking for less than there is makes no swap; more than possible makes all of them
    _, rep_low = balance_dataset(data, BalanceParams(minor_class=1, seed=5, target_distribution={1: 0.0}))
    assert rep_low.accepted_swaps == 0
    _, rep_high = balance_dataset(data, BalanceParams(minor_class=1, seed=5, target_distribution={1: 1.0}))
    assert rep_high.accepted_swaps == rep_full.accepted_swaps and rep_high.achieved[1] < 1.0
    with pytest.raises(ConfigError, match="only set the minor class"):
        balance_dataset(data, BalanceParams(minor_class=1, target_distribution={1: 0.3, 2: 0.2}, seed=0))


def test_allocate_quota_hand_computed():
    assert allocate_quota(5, [4, 4, 2]) == [2, 2, 1]
    assert allocate_quota(3, [1, 1, 1, 1]) == [1, 1, 1, 0]  # ties go to the lower index
    assert allocate_quota(20, [4, 4, 2]) == [4, 4, 2]
    assert allocate_quota(-3, [4, 4]) == [0, 0]
    assert allocate_quota(7, [10, 0, 4]) == [5, 0, 2]


def test_bad_parameters_raise_config_error(data):
    with pytest.raises(ConfigError, match="minor class 5"):
        balance_dataset(data, BalanceParams(minor_class=5, seed=0))
    with pytest.raises(ConfigError, match="fraction"):
        balance_dataset(data, BalanceParams(minor_class=1, fraction=1.5, seed=0))
    assert balance_dataset(data, BalanceParams(minor_class=1, fraction=0.0, seed=0))[1].accepted_swaps == 0


def test_real_patches(shared_data):
    from diffmix.data.io import read_dataset

    ds = read_dataset(shared_data / "real_he_labeled", "consep")
    out, report = balance_dataset(ds.samples, BalanceParams(minor_class=1, seed=0, border=20))
    for a, b in zip(ds.samples, out):
        assert np.array_equal(a.image, b.image)
    after = report.class_counts_after
    assert after[1] - report.class_counts_before[1] == report.accepted_swaps > 0
    assert sum(after.values()) == sum(report.class_counts_before.values())


@pytest.mark.parametrize("neighbour_width, accepted", [(1, 0), (2, 1)])
def test_a_paste_never_erases_a_whole_nucleus(neighbour_width, accepted):
    inst_t = np.zeros((90, 90), np.int32)
    types_t = np.zeros((90, 90), np.int32)
    inst_t[40:50, 40:50], types_t[40:50, 40:50] = 1, 2  # target, centroid (44.5, 44.5) -> 44
    inst_t[43, 40 - neighbour_width : 40], types_t[43, 40 - neighbour_width : 40] = 2, 3
    inst_s = np.zeros((90, 90), np.int32)
    types_s = np.zeros((90, 90), np.int32)
    inst_s[50, 30:39], types_s[50, 30:39] = 7, 1  # 1x9 source: pasted on row 43, cols 39..47
    img = np.zeros((90, 90, 3), np.uint8)
    samples = [NucleiSample(img, inst_t, types_t, "t", 4), NucleiSample(img, inst_s, types_s, "s", 4)]
    out, report = balance_dataset(samples, BalanceParams(minor_class=1, fraction=1.0, seed=0))
    rec = report.per_image[0]
    assert rec["accepted_swaps"] == accepted and rec["skipped_would_erase"] == 1 - accepted
    assert rec["overwritten_pixels"] == accepted and rec["overwritten_nuclei"] == accepted
    assert (out[0].inst_map == 2).sum() == neighbour_width - accepted
    if accepted:
        assert np.array_equal(np.nonzero(out[0].inst_map == 1), (np.full(9, 43), np.arange(39, 48)))
    else:
        assert np.array_equal(out[0].inst_map, inst_t)


def test_images_without_nuclei_or_sources_pass_through():
    empty = NucleiSample(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.int32), np.zeros((64, 64), np.int32), "e", 4)
    inst = np.zeros((64, 64), np.int32)
    inst[30:36, 30:36] = 1
    only_major = NucleiSample(np.zeros((64, 64, 3), np.uint8), inst, inst * 3, "m", 4)
    out, report = balance_dataset([empty, only_major], BalanceParams(minor_class=1, fraction=1.0, seed=0))
    assert report.accepted_swaps == 0 and report.per_image[1]["skipped_no_source"] == 1
    assert np.array_equal(out[1].inst_map, inst) and np.array_equal(out[1].type_map, inst * 3)


def test_balance_params_defaults_and_validation():
    """BalanceParams: the spec 6a defaults written once, numbers kept as given, every bad value a
    ConfigError at construction, unknown names refused, unset minor class and seed resolved."""
    d = BalanceParams()
    assert (d.minor_class, d.fraction, d.border, d.area_ratio, d.seed, d.target_distribution) == (None, 0.8, 30, 2.3, None, None)
    assert type(d.border) is int and type(BalanceParams(border=8.0).border) is float  # recorded as given
    for kwargs, message in [
        ({"fraction": 1.5}, r"fraction must be in \[0, 1\], got 1.5"),
        ({"fraction": -0.1}, r"fraction must be in \[0, 1\]"),
        ({"fraction": "0.5"}, "fraction must be a number, got '0.5'"),
        ({"border": -1}, "border must be >= 0 px, got -1"),
        ({"border": float("nan")}, "border must be >= 0 px"),
        ({"area_ratio": 0}, "area ratio must be positive, got 0"),
        ({"area_ratio": True}, "area_ratio must be a number"),
        ({"minor_class": 0}, "minor class must be a class id >= 1, got 0"),
        ({"minor_class": "misc"}, "minor class must be a class id >= 1, got 'misc'"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"minor_class": 1, "target_distribution": {1: 0.3, 2: 0.2}}, r"can only set the minor class 1: .* classes \[2\]"),
        ({"minor_class": 1, "target_distribution": {}}, "must give a proportion for the minor class 1"),
        ({"minor_class": 1, "target_distribution": {1: 1.5}}, r"target proportion must be in \[0, 1\], got 1.5"),
        ({"target_distribution": {"misc": 0.3}}, "expected {class id: proportion}"),
    ]:
        with pytest.raises(ConfigError, match=message):
            BalanceParams(**kwargs)
    # a config's mapping: JSON text keys parsed once; unknown names listed with the allowed ones
    assert BalanceParams.from_json({"target_distribution": {"1": 0.3}}).target_distribution == {1: 0.3}
    with pytest.raises(ConfigError, match=r"unknown name\(s\) \['fractoin'\]; allowed: \['minor_class', 'fraction'"):
        BalanceParams.from_json({"fractoin": 0.5})
    # unset minor class and seed come from the scheme and the run; set ones win
    r = BalanceParams(border=8).resolved(minor_class=1, seed=7)
    assert (r.minor_class, r.seed, r.border) == (1, 7, 8)
    assert BalanceParams(minor_class=2, seed=3).resolved(1, 7) == BalanceParams(minor_class=2, seed=3)
    with pytest.raises(ConfigError, match="only set the minor class 1"):  # checked once the class is known
        BalanceParams(target_distribution={2: 0.3}).resolved(1, 0)


def test_balancing_needs_a_resolved_minor_class_and_seed(data):
    for params in (BalanceParams(seed=0), BalanceParams(minor_class=1)):
        with pytest.raises(ConfigError, match=r"needs the minor class and the seed.*params.resolved"):
            balance_dataset(data, params)
    with pytest.raises(ConfigError, match="takes a BalanceParams, got dict"):
        balance_plan(data, {"minor_class": 1, "seed": 0})
    # the report records the numbers as given (run identities and provenance keep their bytes)
    _, report = balance_dataset(data, BalanceParams(minor_class=1, seed=0, border=8))
    assert report.params == {"minor_class": 1, "fraction": 0.8, "border": 8, "area_ratio": 2.3, "seed": 0,
                             "target_distribution": None}
    assert json.dumps(report.to_json()["params"]).count('"border": 8,') == 1
