"""Thresholds from the run's validation normals only, never from test labels.

``train`` scores the held-out validation normals once and writes ``calibration.json``: their image
scores, the default threshold (their 0.99 quantile) and the overlays' colour scale. ``evaluate`` and
``predict`` flag an image when its score is above a threshold chosen by one of three rules:
``--threshold VALUE`` as given; ``--max-fpr F``: the lowest threshold that flags at most a fraction F
of the validation normals; neither: the run's default. ``calibration.json`` belongs to ``model.pt``:
``evaluate --checkpoint`` scores another epoch's model on the same validation normals and takes its
threshold and colour scale from those scores instead (kept in memory, not written).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .io import atomic_write_text

DEFAULT_RULE = "0.99 quantile of validation-normal image scores (no test labels used)"


def calibrate(model, val, cfg: dict, out: Path, quiet: bool = True) -> dict:
    """Score the validation normals and write ``out/calibration.json``; returns its content."""
    cal = calibration(model, val, cfg, quiet)
    atomic_write_text(Path(out) / "calibration.json", json.dumps(cal, indent=2))
    return cal


def calibration(model, val, cfg: dict, quiet: bool = True) -> dict:
    """The content of ``calibration.json`` for ``model`` on the validation normals ``val``, not written."""
    from .evaluate import score_samples
    from .overlay import MapRangeSample
    pixels = MapRangeSample(len(val))            # maps streamed through, not held
    res = score_samples(model, val, cfg, quiet=quiet, on_map=lambda _, m, __: pixels.add(m))
    s = np.asarray(res["scores"], dtype=np.float64)
    cal = {"n_val_normals": int(len(s)), "mean": float(s.mean()), "std": float(s.std()),
           "quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.5", "0.9", "0.95", "0.99", "1.0")},
           "threshold": float(np.quantile(s, 0.99)), "threshold_rule": DEFAULT_RULE,
           "val_scores": sorted(float(v) for v in s),
           "map_range": pixels.result(), "map_range_pixel_map": model.cfg["pixel_map"],
           "map_range_rule": "overlay colour scale: median and 0.999 quantile of validation-normal map pixels"}
    return cal


def validation_normals(cfg: dict) -> list:
    """The run's held-out validation normals: the same seeded split as in training."""
    from .runs import load_samples, train_val_samples
    return train_val_samples(load_samples(cfg), cfg)[1]


def recalibrate(run, data: str | None = None, split_csv: str | None = None, quiet: bool = True) -> dict:
    """Re-score a run's validation normals (the same seeded split as in training) into calibration.json:
    for runs written before the scores were kept, or whose data moved (``data``/``split_csv``)."""
    from .checkpoint import build_from_checkpoint
    from .runs import run_path, set_threads
    model, ckpt = build_from_checkpoint(run_path(run, "model.pt"))
    cfg = dict(ckpt["config"])
    if data:
        cfg["data"], cfg["split_csv"] = data, split_csv
    set_threads(cfg)
    val = validation_normals(cfg)
    if not val:
        raise BadInputError("the run has no validation normals (val_fraction 0)", path=run,
                            fix="choose a threshold with --threshold VALUE")
    return calibrate(model, val, cfg, Path(run), quiet)   # score_samples puts the model in eval mode


def threshold_at_fpr(val_scores, max_fpr: float) -> float:
    """The lowest threshold with at most ``floor(max_fpr · n)`` validation normals strictly above it."""
    s = np.sort(np.asarray(val_scores, dtype=np.float64))[::-1]
    return float(s[min(int(math.floor(max_fpr * len(s) + 1e-9)), len(s) - 1)])


def check_threshold_flags(threshold: float | None, max_fpr: float | None) -> None:
    """Refuse bad ``--threshold`` / ``--max-fpr`` values before any scoring."""
    if threshold is not None and max_fpr is not None:
        raise BadInputError("give --threshold or --max-fpr, not both", fix="drop one of them")
    if threshold is not None and not math.isfinite(threshold):
        raise BadInputError(f"--threshold must be a finite number, got {threshold}")
    if max_fpr is not None and not 0.0 <= max_fpr < 1.0:
        raise BadInputError(f"--max-fpr must be in [0, 1), got {max_fpr}", fix="e.g. --max-fpr 0.05")


def resolve_threshold(run, threshold: float | None = None, max_fpr: float | None = None, cal: dict | None = None,
                      source: str = "calibration.json", scores: str = "validation normals"):
    """(threshold or None, rule) for ``run``; see the module docstring.

    ``cal``: a `calibration` dict to use instead of the run's ``calibration.json`` (e.g. that of another
    epoch's model, or another scorer's); ``source`` names it in errors, ``scores`` its values in the rule."""
    check_threshold_flags(threshold, max_fpr)
    if threshold is not None:
        return float(threshold), "given (--threshold)"
    path = Path(run) / "calibration.json"
    if cal is None:
        cal = json.loads(path.read_text()) if path.exists() else None
    else:
        path = source
    if max_fpr is None:
        return (cal["threshold"], cal.get("threshold_rule", DEFAULT_RULE)) if cal else (None, "none: no calibration")
    if cal is None or "val_scores" not in cal:
        raise BadInputError("the run has no validation-normal scores to choose a threshold on", path=path,
                            fix=f"run `uninet-feat calibrate --run {run}` (older runs did not keep them), "
                                "or pass --threshold VALUE")
    n = len(cal["val_scores"])
    if 0 < max_fpr * n < 1:
        warnings.warn(f"--max-fpr {max_fpr}: only {n} validation normals, so the lowest false-positive rate "
                      f"they resolve is 1/{n}; the threshold is their highest score", stacklevel=2)
    return (threshold_at_fpr(cal["val_scores"], max_fpr),
            f"at most {max_fpr:g} of the {n} {scores} above it (--max-fpr)")
