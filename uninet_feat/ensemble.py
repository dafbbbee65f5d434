"""Seed ensembles: several runs scored on one test split, each in its own normal units, averaged.

Why: on AITEX's small test sets (6 normal and 7-31 defective strips per fabric) the training seed alone moves a
fabric's strip AUROC by up to 0.43 and the mean over fabrics between 0.849 and 0.940 (docs/results.md). Averaging
runs that differ only in their seed is the usual cure for that variance. The runs are put in one unit without
labels first, so that a run whose scores are larger does not outvote the others:

- image score: over the run's default threshold (from its own validation normals, ``calibration.json``), so 1 is
  each run's threshold, and the ensemble flags an image when the mean is above 1;
- pixel map: in the run's validation-normal range units (`scorers.range_units`: 0 a typical normal pixel, 1 a
  rare one), when every run's calibration has that range for its kind of map; otherwise no pixel metrics.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from .errors import BadInputError
from .io import atomic_write_csv, atomic_write_text

RULE = "mean over the runs of (image score / that run's threshold from its validation normals) > 1"


def _score_run(run, data, split_csv, group, skip_bad: bool, quiet: bool, maps: dict | None):
    """(samples, scores over the run's threshold) of ``run`` on its test split; adds each image's map in the run's
    range units to ``maps`` ({path: [sum, mask]}) unless ``maps`` is None. Returns False for the maps when the test
    images have no masks or the run has no calibrated range for its maps."""
    from .calibration import load_run, resolve_threshold
    from .evaluate import score_samples
    from .overlay import calibrated_range
    from .runs import set_threads, load_test_samples
    from .scorers import range_units
    from .scoring import pixel_map_kind
    model, _, cfg = load_run(run, data, split_csv)
    if group is not None:
        cfg["group"] = group
    cfg["skip_bad"] = bool(skip_bad)
    set_threads(cfg)
    threshold, _ = resolve_threshold(run)
    if threshold is None:
        raise BadInputError("the run has no threshold to put its scores in a common unit", path=run,
                            fix=f"run `uninet-feat calibrate --run {run}` (it needs validation normals)")
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    test = load_test_samples(cfg)
    masked = any(s.mask is not None for s in test)   # without masks no pixel metric: keep no maps
    rng = calibrated_range(run, pixel_map_kind(model.cfg)) if maps is not None and masked else None

    def add(sample, m, mask):
        acc = maps.setdefault(str(sample.path), [0.0, mask])
        if np.shape(acc[0]) not in ((), m.shape):
            raise BadInputError(f"{run} maps {sample.path} at {m.shape[1]}x{m.shape[0]}, an earlier run at "
                                f"{acc[0].shape[1]}x{acc[0].shape[0]}", path=run,
                                fix="ensemble runs of one image size and tiling (e.g. one config, other seeds)")
        acc[0] = acc[0] + range_units(m, rng)

    res = score_samples(model, test, cfg, keep_maps=False, quiet=quiet, on_map=add if rng is not None else None)
    return res["samples"], np.array(res["scores"]) / float(threshold), rng is not None


def evaluate_ensemble(runs, data=None, split_csv=None, json_path=None, csv_path=None, group=None,
                      quiet: bool = False, skip_bad: bool = False) -> dict:
    """Score each run on the test split and report the ensemble's image metrics (and pixel metrics when the test
    images have masks), its recall and false-positive rate at 1, and each run's own image AUROC."""
    from .evaluate import _at_threshold, _metrics, _subset_metrics, print_report
    from . import metrics
    runs = [str(r) for r in runs]
    if len(runs) < 2:
        raise BadInputError("an ensemble needs at least two runs", fix="pass --runs RUN_A RUN_B ...")
    maps: dict | None = {}
    samples, scaled = None, []
    for run in runs:
        got, s, mapped = _score_run(run, data, split_csv, group, skip_bad, quiet, maps)
        if samples is None:
            samples = got
        elif [str(x.path) for x in got] != [str(x.path) for x in samples]:
            raise BadInputError(f"{run} scored other test images than {runs[0]} (an ensemble compares one image "
                                "across runs)", path=run, fix="pass runs trained on the same data, split and group")
        if not mapped and maps is not None:
            maps = None   # a run without a calibrated map range: image metrics only
        scaled.append(s)
    scores = np.mean(scaled, axis=0)
    labels = np.array([0 if x.is_normal else 1 for x in samples])
    has_masks = maps is not None and any(x.mask is not None for x in samples)
    if maps is None and any(x.mask is not None for x in samples):
        warnings.warn("a run's calibration.json has no map range for its pixel map: the ensemble reports image "
                      "metrics only (run `uninet-feat calibrate --run RUN` on it)")
    res = {}
    if has_masks:
        keys = [str(x.path) for x in samples]
        res = {"maps": [maps[k][0] / len(runs) for k in keys], "masks": [maps[k][1] for k in keys],
               "pixel_ok": [x.is_normal or x.mask is not None for x in samples]}
    both = 0 < labels.sum() < len(labels)
    report = {"runs": runs, "n_test": len(samples), "n_defect": int(labels.sum()),
              **_metrics(labels, scores, res, has_masks), "threshold": 1.0, "threshold_rule": RULE,
              "at_threshold": _at_threshold(labels, scores > 1.0),
              "per_run_image_auroc": {r: metrics.image_auroc(labels, s) if both else None
                                      for r, s in zip(runs, scaled)}}
    groups = sorted({x.group for x in samples})
    if len(groups) > 1:
        report["per_group"] = {g: _subset_metrics([j for j, x in enumerate(samples) if x.group == g], labels,
                                                  scores, {}, False) for g in groups}
    rows = [{"path": str(x.path), "group": x.group, "label": x.label, "is_defect": int(y), "score": f"{s:.6g}",
             "flagged": int(s > 1.0), **{f"score_{k}": f"{v[j]:.6g}" for k, v in enumerate(scaled)}}
            for j, (x, y, s) in enumerate(zip(samples, labels, scores))]
    if csv_path:
        atomic_write_csv(csv_path, rows)
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if not quiet:
        from rich.console import Console
        print_report({**report, "epoch": None})
        Console().print(f"ensemble of {len(runs)} runs; each run alone, image AUROC: " + ", ".join(
            f"{r} {v:.4f}" if v is not None else f"{r} -" for r, v in report["per_run_image_auroc"].items()))
    return report
