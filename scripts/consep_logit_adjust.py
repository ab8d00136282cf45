"""Evaluate trained baseline segmenters of validation experiments with and without post-hoc
logit adjustment (tau = 1; docs/study.md, amendment of 2026-11-30 evening).

Usage: consep_logit_adjust.py CONFIG.yaml OUT [CONFIG.yaml OUT ...]
For every finished run under OUT/seg/baseline/, the prior is the pixel fraction of each type in
that run's training mix (the original grid patches), and the adjusted evaluation is written to
OUT/eval-la/baseline/<run>.json. Prints miscellaneous F1 and PQ per run, plain and adjusted."""
import json
import sys
from pathlib import Path

from diffmix.metrics import evaluate_samples
from diffmix.pipeline.experiment import Experiment, fold_splits, load_experiment_config
from diffmix.runs import write_json
from diffmix.seg.data import Source
from diffmix.seg.infer import segment_image
from diffmix.seg.models import load_segmenter
from diffmix.seg.train import FINAL_NAME, mix_type_prior

TAU = 1.0
args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2]):
    exp = Experiment(load_experiment_config(config), out, progress=False)
    train, test = exp.datasets()
    names = fold_splits(train.names, exp.cfg.folds, exp.cfg.seed)[0]
    prior = mix_type_prior([Source(exp.original_patches(names))], train.scheme.num_classes, 0)
    for run in sorted((Path(out) / "seg" / "baseline").iterdir()):
        plain_path = Path(out) / "eval" / "baseline" / f"{run.name}.json"
        if not (run / FINAL_NAME).is_file() or not plain_path.is_file():
            continue  # still training or being evaluated
        path = Path(out) / "eval-la" / "baseline" / f"{run.name}.json"
        if not path.exists():
            model, _ = load_segmenter(run / FINAL_NAME)
            preds = []
            for sample in test:
                inst, types, _ = segment_image(model, sample.image, batch_size=exp.cfg.seg.infer_batch_size,
                                               type_prior=prior, logit_adjust=TAU)
                preds.append((inst, types))
            result = evaluate_samples([(s.inst_map, s.type_map) for s in test], preds, test.scheme.class_ids,
                                      names=test.names)
            result["logit_adjust"] = {"tau": TAU, "prior": prior}
            write_json(path, result)
        plain = json.loads(plain_path.read_text())
        adj = json.loads(path.read_text())
        print(json.dumps({"config": config, "run": run.name,
                          "plain": {"f_misc": plain["type"]["f1"]["1"], "pq": plain["mean"]["pq"]},
                          "adjusted": {"f_misc": adj["type"]["f1"]["1"], "pq": adj["mean"]["pq"]}}), flush=True)
