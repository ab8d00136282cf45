"""Run some stages of the consep-cpu experiment in this process (several processes share the
run folder, each on disjoint stages: 1-thread processes use 2 cores better than one 2-thread one).
Usage: consep_stages.py [--preset NAME] OUT synth KIND | seg ARM [ARM...] | train ARM [ARM...] | utility
(train: the segmenter runs without their evaluation)
(preset: consep-cpu unless given)."""
import sys
import diffmix.runs as runs
runs.remove_temporaries = lambda *a, **k: None  # another process may be writing in this folder
from diffmix.pipeline.experiment import Experiment, fold_splits, load_experiment_config

argv = sys.argv[1:]
preset = "consep-cpu"
if argv[:1] == ["--preset"]:
    preset, argv = argv[1], argv[2:]
out, what, *args = argv
exp = Experiment(load_experiment_config(preset), out, progress=False)
train, _ = exp.datasets()
if what == "synth":
    for kind in args:
        exp.synthetic(kind)
elif what in ("seg", "train"):
    names = fold_splits(train.names, exp.cfg.folds, exp.cfg.seed)[0]
    for arm in args:
        for s in range(exp.cfg.seeds):
            ckpt = exp.segmenter(arm, 0, names, s)
            if what == "seg":
                exp.evaluation(arm, 0, ckpt, s)
elif what == "utility":
    exp.utility()
print("done", what, args)
