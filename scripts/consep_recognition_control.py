"""Recognition with a shape-only control: does the synthetic image carry the map's class, or only
the mask's shape? A real-data class-balanced utility classifier (3 seeds) types the nuclei of
(a) real test images, (b) DiffMix-B synthetic patches under their balancing maps, (c) the ORIGINAL
patch pixels under the same balancing maps (shape from the map, appearance from the original
nucleus: what the classifier can tell from the mask alone), (d) GradMix patches (real misc pixels
pasted). Per-class recall, mean over seeds."""
import json, sys
import numpy as np
from diffmix.data.io import read_dataset
from diffmix.data.patches import grid_patches
from diffmix.synth.manifest import read_manifest
from diffmix.utility import UtilitySettings, nucleus_crops, train_classifier, predict, confusion_per_image

out_dir, train_dir, test_dir = sys.argv[1:4]
train, test = read_dataset(train_dir), read_dataset(test_dir)
bal = read_dataset(f"{out_dir}/synth/balance")
gm = read_dataset(f"{out_dir}/synth/gradmix")
recs = {r["name"]: r for r in read_manifest(f"{out_dir}/synth/balance")["patches"]}
by_name = {s.name: s for s in train}
cache, orig_under_map = {}, []
for s in bal:
    r = recs[s.name]
    if r["source_image"] not in cache:
        cache[r["source_image"]] = grid_patches(by_name[r["source_image"]], 64, 64)
    o = cache[r["source_image"]][r["patch_index"]]
    orig_under_map.append(s.replace(image=o.image))
settings = UtilitySettings(steps=600, width=12, crop=32)
real = nucleus_crops(train.samples, 32)
sets = {"real test": nucleus_crops(test.samples, 32), "DiffMix-B synthetic": nucleus_crops(bal.samples, 32),
        "original pixels under the balancing maps": nucleus_crops(orig_under_map, 32),
        "GradMix": nucleus_crops(gm.samples, 32)}
conf = {k: np.zeros((4, 4), np.int64) for k in sets}
for seed in (0, 1, 2):
    m = train_classifier(real, 4, settings, seed, balanced=True)
    for k, c in sets.items():
        conf[k] += confusion_per_image(c, predict(m, c), 4).sum(0)
res = {}
for k, c in conf.items():
    n = c.sum(1)
    res[k] = {"recall": {i + 1: (round(float(c[i, i] / n[i]), 3) if n[i] else None) for i in range(4)},
              "n": {i + 1: int(n[i] // 3) for i in range(4)}}
print(json.dumps(res, indent=1))

