"""Seed ensembles: several runs scored on one test split, each image score divided by its run's threshold, averaged.

Why: on AITEX's small test sets (6 normal and 7-31 defective strips per fabric) the training seed alone moves a
fabric's strip AUROC by up to 0.43 and the mean over fabrics between 0.849 and 0.940 (docs/results.md). Averaging
runs that differ only in their seed is the usual cure for that variance. The runs' scores are put in one unit
without labels first: each run's default threshold (from its own validation normals, ``calibration.json``) is 1,
so a run whose scores are larger does not outvote the others. The ensemble flags an image when the mean is above 1.

Image level only: the runs' pixel maps are not averaged, so ``pixel_auroc`` / ``aupro`` are not reported.
"""
from __future__ import annotations

import numpy as np

from .errors import BadInputError
from .io import atomic_write_csv, atomic_write_text

RULE = "mean over the runs of (image score / that run's threshold from its validation normals) > 1"


def ensemble_scores(reports: dict) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(rows, labels, ensemble scores) from {run: `evaluate.evaluate` report}; refuses runs that scored different
    test images or have no threshold."""
    runs = list(reports)
    if len(runs) < 2:
        raise BadInputError("an ensemble needs at least two runs", fix="pass --runs RUN_A RUN_B ...")
    first = reports[runs[0]]["_rows"]
    key = [(r["path"], r["is_defect"]) for r in first]
    scaled = []
    for run in runs:
        rep = reports[run]
        if rep.get("threshold") is None:
            raise BadInputError("the run has no threshold to put its scores in a common unit", path=run,
                                fix=f"run `uninet-feat calibrate --run {run}` (it needs validation normals)")
        if [(r["path"], r["is_defect"]) for r in rep["_rows"]] != key:
            raise BadInputError(f"{run} scored other test images than {runs[0]} (an ensemble compares one image "
                                "across runs)", path=run, fix="pass runs trained on the same data, split and group")
        scaled.append(np.array([float(r["score"]) for r in rep["_rows"]]) / float(rep["threshold"]))
    scores = np.mean(scaled, axis=0)
    rows = [{"path": r["path"], "group": r["group"], "label": r["label"], "is_defect": r["is_defect"],
             "score": f"{s:.6g}", "flagged": int(s > 1.0),
             **{f"score_{i}": f"{x[j]:.6g}" for i, x in enumerate(scaled)}}
            for j, (r, s) in enumerate(zip(first, scores))]
    return rows, np.array([int(r["is_defect"]) for r in first]), scores


def evaluate_ensemble(runs, data=None, split_csv=None, json_path=None, csv_path=None, group=None,
                      quiet: bool = False, skip_bad: bool = False) -> dict:
    """Evaluate each run (`evaluate.evaluate`, its own calibration), then their ensemble; the report holds the
    ensemble's image metrics, its recall and false-positive rate at 1, and each run's image AUROC."""
    import json

    from .evaluate import _at_threshold, _metrics, evaluate
    reports = {str(r): evaluate(r, data, split_csv, group=group, quiet=True, skip_bad=skip_bad) for r in runs}
    rows, labels, scores = ensemble_scores(reports)
    report = {"runs": list(reports), "n_test": len(rows), "n_defect": int(labels.sum()),
              **_metrics(labels, scores, {}, False), "threshold": 1.0, "threshold_rule": RULE,
              "at_threshold": _at_threshold(labels, scores > 1.0),
              "per_run_image_auroc": {r: rep.get("image_auroc") for r, rep in reports.items()}}
    groups = sorted({r["group"] for r in rows})
    if len(groups) > 1:
        report["per_group"] = {g: _metrics(labels[idx], scores[idx], {}, False) for g in groups
                               for idx in [np.array([i for i, r in enumerate(rows) if r["group"] == g])]}
    if csv_path:
        atomic_write_csv(csv_path, rows)
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if not quiet:
        from .evaluate import print_report
        print_report({**report, "epoch": None})
    return report
