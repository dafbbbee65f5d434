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


def calibrate(model, val, cfg: dict, out: Path, quiet: bool = True, map_levels=None) -> dict:
    """Score the validation normals and write ``out/calibration.json``; returns its content.

    ``map_levels``: the levels of the pixel map — "all", "auto" (`choose_map_levels`), a list, or None to
    keep ``model.cfg``'s (the run's current choice); set on ``model`` and recorded in the file."""
    choice = None
    if map_levels == "auto":
        choice = choose_map_levels(model, val, cfg, quiet)
        model.cfg["map_levels"] = choice["levels"]
    elif map_levels is not None:
        model.cfg["map_levels"] = parse_map_levels(map_levels, len(model.channels))
    cal = calibration(model, val, cfg, quiet)
    if choice is not None:
        cal["map_levels_choice"] = choice
    atomic_write_text(Path(out) / "calibration.json", json.dumps(cal, indent=2))
    return cal


def parse_map_levels(v, n_levels: int):
    """"all" / None → None (every level); "2,3" or [2, 3] → [2, 3], checked against ``n_levels``."""
    if v is None or v == "all":
        return None
    if isinstance(v, str):
        try:
            v = [int(x) for x in v.replace(" ", "").split(",") if x]
        except ValueError:
            v = None
    levels = sorted({int(x) for x in v}) if v else []
    if not levels or levels[0] < 1 or levels[-1] > n_levels:
        raise BadInputError(f"map levels must be all, auto or levels among 1..{n_levels} (e.g. 2,3), got {v!r}",
                            fix=f"e.g. --map-levels auto, or --map-levels 2,{n_levels}")
    return None if len(levels) == n_levels else levels


MAP_LEVELS_MARGIN = 0.005
MAP_LEVELS_RULE = ("pixel AUROC on the validation normals and synthetic defective copies of them (selection.py); "
                   f"all levels (the method) unless a subset beats them by more than {MAP_LEVELS_MARGIN}")


def choose_map_levels(model, val, cfg: dict, quiet: bool = True) -> dict:
    """Which levels' maps to sum into the pixel map, chosen without labels.

    Why: the deepest levels localise best on some lines and the finest level adds noise (the width-4
    magnetic-tile models: pixel AUROC on synthetic defects 0.958-0.960 with all levels, 0.965-0.967 with
    levels 2 + 3; on the test masks 0.767-0.771 and 0.802-0.805). Every non-empty subset
    is scored on `selection.SyntheticValidation` (the validation normals and defective copies with exact
    masks); the method's sum of all levels is kept unless a subset beats it by more than MAP_LEVELS_MARGIN."""
    from itertools import combinations

    from .runs import make_dataset
    from .selection import SyntheticValidation
    if not val:
        raise BadInputError("choosing map levels needs validation normals, and this run kept none (val_fraction 0)",
                            fix="use --map-levels all, or a list such as 2,3")
    n = len(model.channels)
    subsets = [list(c) for r in range(1, n + 1) for c in combinations(range(1, n + 1), r)]
    sv = SyntheticValidation(make_dataset(val, cfg, model.source), int(cfg.get("synthetic_copies", 2)), cfg["seed"])
    scores = sv.pixel_auroc_by_levels(model, subsets, cfg.get("eval_batch_size", 8), bool(cfg.get("channels_last")))
    return {"levels": pick_map_levels(scores, n), "rule": MAP_LEVELS_RULE,
            "synthetic_pixel_auroc": {",".join(map(str, k)): v for k, v in scores.items()}}


def pick_map_levels(scores: dict, n_levels: int, margin: float = MAP_LEVELS_MARGIN):
    """None (all levels) unless the best-scoring subset beats all levels by more than ``margin``; ties and
    NaN keep all. ``scores``: {tuple of levels: pixel AUROC}."""
    every = tuple(range(1, n_levels + 1))
    base = scores.get(every, float("nan"))
    best = max((k for k in scores if scores[k] == scores[k]), key=lambda k: (scores[k], len(k)), default=every)
    if best == every or scores[best] <= base + margin:   # False for a NaN base: any scored subset beats it
        return None
    return list(best)


def apply_calibration(model, run, model_path) -> None:
    """Give ``model`` the run's calibrated pixel-map levels when ``model_path`` is the run's model.pt (the
    levels were chosen for that model; another epoch's model keeps all levels)."""
    path = Path(run) / "calibration.json"
    if Path(model_path).resolve() != (Path(run) / "model.pt").resolve() or not path.exists():
        return
    try:
        levels = json.loads(path.read_text()).get("map_levels")
    except (OSError, ValueError):
        return   # an unreadable calibration is reported where its threshold is read
    model.cfg["map_levels"] = levels or None


def calibration(model, val, cfg: dict, quiet: bool = True) -> dict:
    """The content of ``calibration.json`` for ``model`` on the validation normals ``val``, not written."""
    from .evaluate import score_samples
    from .overlay import MapRangeSample
    from .scoring import pixel_map_kind
    pixels = MapRangeSample(len(val))            # maps streamed through, not held
    res = score_samples(model, val, cfg, quiet=quiet, on_map=lambda _, m, __: pixels.add(m))
    s = np.asarray(res["scores"], dtype=np.float64)
    cal = {"n_val_normals": int(len(s)), "mean": float(s.mean()), "std": float(s.std()),
           "quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.5", "0.9", "0.95", "0.99", "1.0")},
           "threshold": float(np.quantile(s, 0.99)), "threshold_rule": DEFAULT_RULE,
           "val_scores": sorted(float(v) for v in s),
           "map_range": pixels.result(), "map_range_pixel_map": pixel_map_kind(model.cfg),
           "map_levels": model.cfg.get("map_levels"),
           "map_range_rule": "overlay colour scale: median and 0.999 quantile of validation-normal map pixels"}
    return cal


def validation_normals(cfg: dict) -> list:
    """The run's held-out validation normals: the same seeded split as in training."""
    from .runs import load_samples, train_val_samples
    return train_val_samples(load_samples(cfg), cfg)[1]


def recalibrate(run, data: str | None = None, split_csv: str | None = None, quiet: bool = True,
                map_levels=None) -> dict:
    """Re-score a run's validation normals (the same seeded split as in training) into calibration.json:
    for runs written before the scores were kept, or whose data moved (``data``/``split_csv``), or to
    (re)choose the pixel map's levels (``map_levels``: "all", "auto", a list; None keeps the run's)."""
    from .checkpoint import build_from_checkpoint
    from .runs import run_path, set_threads
    path = run_path(run, "model.pt")
    model, ckpt = build_from_checkpoint(path)
    apply_calibration(model, run, path)
    cfg = dict(ckpt["config"])
    if data:
        cfg["data"], cfg["split_csv"] = data, split_csv
    set_threads(cfg)
    val = validation_normals(cfg)
    if not val:
        raise BadInputError("the run has no validation normals (val_fraction 0)", path=run,
                            fix="choose a threshold with --threshold VALUE")
    return calibrate(model, val, cfg, Path(run), quiet, map_levels)   # score_samples puts the model in eval mode


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
