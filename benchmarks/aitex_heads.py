"""Defect-type heads on AITEX: UniNet-adapted features vs plain backbone features, same folds.

    python -m benchmarks.aitex_heads --data ../shared/data --split-csv ../shared/data/splits/aitex.csv \
        --runs runs/aitex_fabric_00 runs/aitex_fabric_01 ... --json out.json

Adapted features of each fabric come from that fabric's one-class run (so a strip is described by
the model of its own line; or one multi-class run for all); plain features of each run from the same backbone
at the run's input size and tiling, with ImageNet weights (or the run's weights when they are a name such as
``random``; listed under ``plain_features``). Rows are the defective strips; labels are `fabric/defect code`
(``defect_type``) or the defect code alone across fabrics (``defect_code``); classes with fewer than 2 strips
are dropped; stratified CV (``--folds``, at most the largest class; a smaller class is tested in fewer folds, as in
`train_head`) with identical folds for both feature sets. Also a binary normal-vs-defect head on all
strips. ``--baselines`` adds, on the same folds and features, two reference classifiers from
scikit-learn (standardised logistic regression with balanced class weights, and 1-nearest-neighbour by
cosine): what the features allow beyond LightGBM's trees, which have only 1-9 training strips per class
here.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import uninet_feat  # noqa: F401
from uninet_feat.config import load_config
from uninet_feat.downstream import train_head
from uninet_feat.downstream.head import stratified_folds
from uninet_feat.extract import Extractor
from uninet_feat.featstore import aggregate_tiles
from uninet_feat.runs import load_samples


def table(ex, samples):
    r = ex.extract(samples)
    keys = [str(samples[i].path) for i in r["index"]]
    X, order = aggregate_tiles(r["vectors"], r["scores"], keys)
    return X, [k for k, _ in order]


def plain_settings(run_cfg: dict) -> tuple:
    """The plain-feature extractor for a run (as sorted items, a cache key): the run's backbone, input size, tiling
    and normalisation, with the run's weights when they are a name (imagenet, random), ImageNet's when they are a
    file (the source teacher's starting point is not a plain backbone's)."""
    from pathlib import Path
    w = run_cfg.get("weights") or "imagenet"
    named = isinstance(w, str) and "/" not in w and "\\" not in w and not Path(w).expanduser().is_file()
    mean, std = run_cfg.get("mean"), run_cfg.get("std")
    return tuple(sorted({"backbone": run_cfg["backbone"], "weights": w if named else "imagenet",
                         "image_size": int(run_cfg["image_size"]), "tile": run_cfg.get("tile") or None,
                         "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}.items()))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--split-csv", required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--baselines", action="store_true", help="also logistic regression and 1-NN, same folds")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    samples = load_samples(load_config(None, {"data": a.data, "split_csv": a.split_csv}))
    by_path = {str(s.path): s for s in samples}
    plain, plain_used = {}, []
    Xa, Xp, paths = [], [], []
    for run in a.runs:
        ex = Extractor(run=run)
        group = ex.cfg["group"]
        ss = [s for s in samples if group is None or s.group == group]   # a multi-class run: every fabric
        xa, ka = table(ex, ss)
        key = plain_settings(ex.cfg)
        if key not in plain:
            plain[key] = Extractor(**dict(key))
        plain_used.append({"run": str(run), **dict(key)})
        xp, kp = table(plain[key], ss)
        assert ka == kp
        Xa.append(xa); Xp.append(xp); paths += ka
    Xa, Xp = np.concatenate(Xa), np.concatenate(Xp)
    recs = [by_path[p] for p in paths]
    out = {}
    for task in ("defect_type", "defect_code", "binary"):
        if task != "binary":   # defect_type: fabric/code (per line); defect_code: the AITEX code across fabrics
            idx = [i for i, s in enumerate(recs) if not s.is_normal]
            y = np.array([f"{recs[i].group}/{recs[i].label}" if task == "defect_type" else recs[i].label
                          for i in idx])
            vals, cnt = np.unique(y, return_counts=True)
            ok = set(vals[cnt >= 2])
            keep = [j for j, v in enumerate(y) if v in ok]
            idx, y = [idx[j] for j in keep], y[keep]
        else:
            idx = list(range(len(recs)))
            y = np.array(["good" if s.is_normal else "defect" for s in recs])
        folds = stratified_folds(y, a.folds, seed=0)   # train_head's own folds, shared by both feature sets
        n_splits = len(folds)
        res = {}
        for name, X in (("adapted", Xa), ("plain", Xp)):
            r = train_head(X[idx], y, task="binary" if task == "binary" else "multiclass", cv=folds, seed=0)
            res[name] = {k: r.oof.get(k) for k in ("accuracy", "accuracy_interval", "macro_f1", "auroc") if k in r.oof}
            if a.baselines:
                res[name].update(_baselines(X[idx], y, folds))
        out[task] = {"n_rows": len(y), "n_classes": len(set(y)), "n_splits": n_splits, **res}
    out["plain_features"] = plain_used
    print(json.dumps(out, indent=2))
    if a.json:
        from uninet_feat.io import atomic_write_text   # a kill mid-write leaves the last result, not half of one
        atomic_write_text(a.json, json.dumps(out, indent=2))
    return out


def _baselines(X, y, folds) -> dict:
    """Out-of-fold accuracy / macro-F1 of two scikit-learn reference classifiers on the same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from uninet_feat.downstream.head import accuracy_interval
    models = {"logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced")),
              "nn1_cosine": KNeighborsClassifier(1, metric="cosine")}
    out = {}
    for name, m in models.items():
        pred = cross_val_predict(m, X, y, cv=folds)
        out[name] = {"accuracy": float(accuracy_score(y, pred)),
                     "accuracy_interval": accuracy_interval(int(np.sum(pred == y)), len(y)),
                     "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
    return out


if __name__ == "__main__":
    main()
