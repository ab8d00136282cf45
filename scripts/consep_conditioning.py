"""Does the SDM follow the map? On enlarging-map patches (nuclei moved), mean luminance of the
synthetic image where the map put a nucleus on original background (A) vs where the map left
background on an original nucleus (B); the original image's luminance on the same pixels for
reference. Following the map: synthetic A darker than B. Copying y0: synthetic A brighter, like the original."""
import json, sys
import numpy as np
from diffmix.data.io import read_dataset
from diffmix.data.patches import grid_patches
from diffmix.synth.manifest import read_manifest

synth_dir, train_dir = sys.argv[1], sys.argv[2]
syn = read_dataset(synth_dir)
train = {s.name: s for s in read_dataset(train_dir)}
recs = {r["name"]: r for r in read_manifest(synth_dir)["patches"]}
cache = {}
acc = {k: [] for k in ("syn_A", "syn_B", "syn_C", "syn_D", "org_A", "org_B", "org_C", "org_D")}
lum = lambda im: im.astype(float) @ np.array([0.299, 0.587, 0.114])
for s in syn:
    r = recs[s.name]
    src = r["source_image"]
    if src not in cache:
        cache[src] = grid_patches(train[src], s.image.shape[0], s.image.shape[0])
    o = cache[src][r["patch_index"]]
    new, old = s.inst_map > 0, o.inst_map > 0
    sets = {"A": new & ~old, "B": ~new & old, "C": new & old, "D": ~new & ~old}
    ls, lo = lum(s.image), lum(o.image)
    for k, m in sets.items():
        if m.any():
            acc["syn_" + k].append(ls[m].mean()); acc["org_" + k].append(lo[m].mean())
out = {k: (round(float(np.mean(v)), 1), len(v)) for k, v in acc.items()}
print(json.dumps(out))
