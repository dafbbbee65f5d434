"""A run's calibration, from its validation normals only, never from test labels.

``train`` scores the held-out validation normals once and writes ``calibration.json``: their image
scores, the default threshold (their 0.99 quantile; the rules that flag images are in `thresholds`), the
overlays' colour scale, the pixel map's levels and units, and tile offsets. ``calibration.json`` belongs to ``model.pt``:
``evaluate --checkpoint`` scores another epoch's model on the same validation normals and takes its
threshold and colour scale from those scores instead (kept in memory, not written).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import BadInputError
from .io import atomic_write_text
from .normals import (check_given_normals, check_not_trained_on, moved_split_csv, normals_record, trained_groups,
                      validation_normals)
from .thresholds import DEFAULT_RULE, few_normals_warning, group_thresholds

NEIGHBOURS_FILE = "tile_neighbours.npz"   # tile_norm: neighbours — the training tiles it compares with


def calibrate(model, val, cfg: dict, out: Path, quiet: bool = True, map_levels=None, map_norm=None,
              tile_norm=None, image_score=None) -> dict:
    """Score the validation normals and write ``out/calibration.json``; returns its content.

    ``tile_norm``: "position" (tiled images: each tile's score less the training normals' median at its place,
    `positions.py`), "none", or None to keep the run's (offsets already on ``model``, else ``cfg``'s). The
    offsets come after the pixel map is chosen (a map of other units than the score's gets offsets measured on it,
    `positions.tile_offsets`) and before the validation normals are scored, so that the validation scores, the
    threshold and the map's range are position-corrected too.

    ``map_levels``: the levels of the pixel map — "all", "auto", a list, or None to keep ``model.cfg``'s (the
    run's current choice). ``map_norm``: "none", "range" (each map in its validation-normal range units,
    `map_ranges`), "auto", or None to keep the run's. Either "auto": chosen on synthetic defects
    (`choose_pixel_map`). ``image_score``: "wdm" (the method), "map" (the WDM's top-k of that pixel map), "auto"
    (`choose_image_score`, after the pixel map) or None to keep the run's. Set on ``model``, recorded in the file."""
    n = len(model.channels)
    tile_norm = _resolve_tile_norm(model, cfg, tile_norm)   # refused before any scoring
    if map_levels is None:
        map_levels = model.cfg.get("map_levels") or "all"
    if map_norm is None:
        map_norm = "range" if model.cfg.get("map_norm") else "none"
    map_norm = parse_map_norm(map_norm)
    image_score = parse_image_score(model.cfg.get("image_score") or "wdm" if image_score is None else image_score)
    ranges = map_ranges(model, val, cfg) if map_norm != "none" else None   # fresh: the model or data may have changed
    choice, synthetic = None, {}   # the synthetic set and its model pass, shared by the two choices
    if "auto" in (map_levels, map_norm):
        choice = choose_pixel_map(model, val, cfg, map_levels, map_norm, ranges, quiet, synthetic)
        levels, norm = choice["levels"], choice["norm"]
    else:
        levels, norm = parse_map_levels(map_levels, n), map_norm
    model.cfg["map_levels"] = levels
    model.cfg["map_norm"] = ranges if norm == "range" else None
    score_choice = None
    if image_score == "auto":   # of the pixel map just chosen; before the offsets and thresholds, which are its
        score_choice = choose_image_score(model, val, cfg, synthetic)
        image_score = score_choice["image_score"]
    model.cfg["image_score"] = image_score
    offsets = _position_offsets(model, cfg, tile_norm)   # of this pixel map: its own offsets when it needs them
    cal = calibration(model, val, cfg, quiet)
    given = cfg.get("calibration_normals")
    given_normals_rule(cal, given)
    few_normals_warning(cal["n_val_normals"], cfg.get("val_fraction"), given,
                        from_data=bool(cal.get("val_from_data")))
    if choice is not None:
        cal["pixel_map_choice"] = choice
    cal["image_score"] = image_score
    if score_choice is not None:
        cal["image_score_choice"] = score_choice
    cal.update(normals_record(cfg))
    if cfg.get("calibrate_choices"):
        cal["calibrate_choices"] = cfg["calibrate_choices"]
    if offsets is not None:
        near = offsets.pop("neighbours", None)
        if near is not None:   # the tiles' scores and contexts beside calibration.json, written first; their
            near.save(Path(out) / NEIGHBOURS_FILE)   # digest pairs the two (a kill between them: refused on load)
            offsets["file"] = NEIGHBOURS_FILE
            offsets["tile_neighbours_sha256"] = near.digest()
        cal["tile_offsets"] = offsets
    if (Path(out) / "model.pt").exists():   # which model.pt it belongs to: a later one makes it stale
        from .featstore import file_sha256
        cal["model_sha256"] = file_sha256(Path(out) / "model.pt")
    atomic_write_text(Path(out) / "calibration.json", json.dumps(cal, indent=2))
    if not (offsets or {}).get("file"):   # a run switched off neighbours: its tiles' file no longer applies (removed
        (Path(out) / NEIGHBOURS_FILE).unlink(missing_ok=True)   # after the json, so a kill between keeps a pair)
    return cal


def given_normals_rule(cal: dict, given) -> dict:
    """``cal`` (`calibration`'s) says so when its normals are ``given`` (`calibrate --normals`), the user's normal
    images rather than the held-out split: `evaluate` counts test images among them, and the rule names them."""
    if given:
        cal["calibration_normals"] = given
        if cal.get("threshold_rule") == DEFAULT_RULE:
            cal["threshold_rule"] = f"0.99 quantile of the image scores of the normals in {given} (no test labels used)"
    return cal


def _resolve_tile_norm(model, cfg: dict, tile_norm) -> str:
    """``tile_norm`` checked, or for None the run's: calibration.json's when it was applied (the key is then set),
    else ``cfg``'s."""
    from .positions import parse_tile_norm
    if tile_norm is None:
        tile_norm = (_tile_norm_of(model.cfg["tile_offsets"], model.cfg.get("tile_neighbours"))
                     if "tile_offsets" in model.cfg else cfg.get("tile_norm", "none"))
    return parse_tile_norm(tile_norm, cfg.get("tile"))


def _position_offsets(model, cfg: dict, tile_norm) -> dict | None:
    """Set (or clear) ``model.cfg["tile_offsets"]`` for ``tile_norm`` (and ``["tile_map_offsets"]``, those of a
    pixel map of other units than the score's: set the model's pixel map first); the offsets' record, or None."""
    from .positions import tile_offsets
    from .runs import load_samples, train_val_samples
    tile_norm = _resolve_tile_norm(model, cfg, tile_norm)
    model.cfg["tile_offsets"] = model.cfg["tile_neighbours"] = None   # the reference normals are scored plain
    model.cfg["tile_map_offsets"] = model.cfg["tile_own"] = None
    if tile_norm == "none":
        return None
    fit, val = train_val_samples(load_samples(cfg), cfg)   # every training normal: 1 validation strip is no median;
    normals = [s for s in fit + val if s.is_normal]        # a supervised run's labelled defects would raise it
    rec = tile_offsets(model, normals, cfg, neighbours=tile_norm == "neighbours", own=True)
    model.cfg["tile_offsets"] = rec["offsets"]
    model.cfg["tile_map_offsets"] = rec.get("map_offsets")
    model.cfg["tile_sizes"] = rec.get("image_sizes")
    model.cfg["tile_neighbours"] = rec.get("neighbours")
    model.cfg["tile_own"] = rec.pop("own", None)   # in memory only: a validation normal's own tiles left out
    return rec


def _tile_norm_of(offsets, neighbours) -> str:
    return "none" if not offsets else "neighbours" if neighbours is not None else "position"


def applied_tile_norm(model) -> str:
    """The tile scoring a model was given (its calibration's, which `calibrate --tile-norm` may have changed
    since the run's config.yaml was written): what reports and summaries must state."""
    return _tile_norm_of(model.cfg.get("tile_offsets"), model.cfg.get("tile_neighbours"))


def parse_map_levels(v, n_levels: int):
    """"all" / None → None (every level); "2,3" or [2, 3] → [2, 3], checked against ``n_levels``."""
    if v is None or v == "all":
        return None
    def level(x) -> int:   # a whole number, as written: not a bool, and 2.5 is not level 2
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise ValueError(x)
        return int(x)
    items = [v] if isinstance(v, int) else v.replace(" ", "").split(",") if isinstance(v, str) else v
    try:   # a config's `map_levels: 3` is one level
        levels = sorted({level(x) for x in items if x != ""})
    except (TypeError, ValueError):
        levels = []
    if not levels or levels[0] < 1 or levels[-1] > n_levels:
        raise BadInputError(f"map levels must be all, auto or levels among 1..{n_levels} (e.g. 2,3), got {v!r}",
                            fix=f"e.g. --map-levels auto, or --map-levels 2,{n_levels}")
    return None if len(levels) == n_levels else levels


def parse_map_norm(v) -> str:
    """"none" (the method: raw maps summed), "range" or "auto"; anything else is refused."""
    if v not in ("none", "range", "auto"):
        raise BadInputError(f"map_norm must be none, range or auto, got {v!r}", fix="e.g. --map-norm auto")
    return v


@torch.no_grad()
def map_ranges(model, val, cfg: dict) -> list[list[float]]:
    """[median, 0.999 quantile] of each of the 2L anomaly maps over all validation-normal pixels, at the map's
    own resolution: the units of ``map_norm: range`` (0 = a typical normal pixel, 1 = a rare one)."""
    from .runs import eval_batches, make_dataset, model_device
    from .scoring import anomaly_maps
    model.eval()
    pixels = None
    for _, x in eval_batches(make_dataset(val, cfg, model.source), cfg, model_device(model)):
        out = model(x)
        maps = anomaly_maps(out.teachers, out.students)
        pixels = pixels or [[] for _ in maps]
        for k, m in enumerate(maps):
            pixels[k].append(m.float().cpu().numpy().ravel())
    ranges = [[float(np.median(v)), float(np.quantile(v, 0.999))] for v in map(np.concatenate, pixels)]
    bad = [k for k, (lo, hi) in enumerate(ranges) if not (np.isfinite(lo) and np.isfinite(hi))]
    if bad:
        raise BadInputError(f"anomaly maps {bad} are not finite on the validation normals", fix="retrain the run")
    return ranges


PIXEL_MAP_MARGIN = 0.005
PIXEL_MAP_RULE = ("pixel AUROC on the validation normals and synthetic defective copies of them (selection.py); "
                  f"the method's map (all levels, raw) unless another beats it by more than {PIXEL_MAP_MARGIN}, "
                  f"then of those within {PIXEL_MAP_MARGIN} of the best the one with most levels, raw before range")


def synthetic_pass(model, val, cfg: dict, shared: dict | None = None):
    """(`selection.SyntheticValidation` of the validation normals, its `level_maps` for ``model``), made once
    and kept in ``shared`` (a dict, empty at first) when given: `calibrate` chooses the pixel map and then the
    image score on the same set, and one model pass over it serves both (it was two sets and two passes)."""
    from .runs import make_dataset
    from .selection import SyntheticValidation
    if shared:
        return shared["set"], shared["maps"]
    sv = SyntheticValidation.from_config(make_dataset(val, cfg, model.source), cfg)
    maps = sv.level_maps(model, cfg.get("eval_batch_size", 8), bool(cfg.get("channels_last")))
    if shared is not None:
        shared.update(set=sv, maps=maps)
    return sv, maps


def choose_pixel_map(model, val, cfg: dict, map_levels="auto", map_norm="auto", ranges=None,
                     quiet: bool = True, shared: dict | None = None) -> dict:
    """Which levels' maps the pixel map sums, and whether each map is first put in its validation-normal
    range units, chosen without labels.

    Why: the levels' maps differ in scale and in how well they localise, and their plain sum lets the
    noisiest set the map. Two width-4 magnetic-tile models (20 and 100 epochs): synthetic pixel AUROC 0.931 /
    0.962 with all levels raw, 0.949 / 0.969 in range units, which this rule chose; on the test masks P-AUROC
    0.715 → 0.756 and 0.772 → 0.799 (AUPRO 0.476 → 0.502, 0.487 → 0.503).
    Every candidate (each subset when ``map_levels`` is "auto", else the given levels; raw and range units when
    ``map_norm`` is "auto", else the given one) is scored on `selection.SyntheticValidation` (the validation
    normals and defective copies with exact masks), and `pick_pixel_map` takes one: the base (all levels, or
    the given ones; raw, or the given norm) unless a candidate beats it by more than PIXEL_MAP_MARGIN.
    ``shared``: as for `synthetic_pass`."""
    from itertools import combinations

    from .selection import parse_kinds
    if not val:
        raise BadInputError("choosing the pixel map needs validation normals, and this run kept none (val_fraction 0)",
                            fix="use --map-levels all --map-norm none, or a list of levels such as 2,3")
    n = len(model.channels)
    every = tuple(range(1, n + 1))
    if map_levels == "auto":
        subsets, base_levels = [c for r in range(1, n + 1) for c in combinations(every, r)], every
    else:
        base_levels = tuple(parse_map_levels(map_levels, n) or every)
        subsets = [base_levels]
    norms = ["none", "range"] if map_norm == "auto" else [map_norm]
    if "range" in norms and ranges is None:
        ranges = map_ranges(model, val, cfg)
    candidates = {(s, nm): (list(s), ranges if nm == "range" else None) for s in subsets for nm in norms}
    sv, maps = synthetic_pass(model, val, cfg, shared)
    scores = sv.pixel_auroc_of(model, candidates, maps=maps)
    levels, norm = pick_pixel_map(scores, (base_levels, "none" if map_norm == "auto" else map_norm))
    return {"levels": None if levels == every else list(levels), "norm": norm, "rule": PIXEL_MAP_RULE,
            "synthetic_kinds": list(parse_kinds(cfg.get("synthetic_kinds"))), "synthetic_skipped": sv.skipped,
            "synthetic_pixel_auroc": {_label(k): v for k, v in scores.items()}}


IMAGE_SCORE_RULE = ("image AUROC on the validation normals and synthetic defective copies of them (selection.py): "
                    f"the method's WDM of all maps unless the pixel map's own score beats it by more than "
                    f"{PIXEL_MAP_MARGIN}")


def parse_image_score(v) -> str:
    """"wdm", "map" or "auto"; anything else is refused."""
    from .scoring import IMAGE_SCORES
    if v not in IMAGE_SCORES:
        raise BadInputError(f"image_score must be wdm, map or auto, got {v!r}", fix="e.g. --image-score auto")
    return v


def choose_image_score(model, val, cfg: dict, shared: dict | None = None) -> dict:
    """Whether the image score is the WDM of all maps (the method) or the same top-k mean of the model's chosen
    pixel map (``image_score: map``), chosen without labels on `selection.SyntheticValidation`.

    Why: the WDM sums all 2L maps, including the levels the pixel-map choice left out as noisy, so it can rank
    images by maps that localise nothing. On magnetic tile (session 44, docs/results.md) the rule chose the map in
    all six runs scored; test image AUROC rose by 0.002-0.020 one-class and by 0.048-0.071 with defect masks in
    training (`--supervised`), whose WDM falls most. The WDM is kept unless the map's score beats it by more than
    PIXEL_MAP_MARGIN; a pixel map of all levels, raw, is the WDM's own and is not scored. ``shared``: as for
    `synthetic_pass`."""
    from .scoring import pixel_map_chosen
    from .selection import parse_kinds
    if not pixel_map_chosen(model.cfg):
        return {"image_score": "wdm", "rule": "the pixel map is all levels, raw: its score is the WDM's"}
    if not val:
        raise BadInputError("choosing the image score needs validation normals, and this run kept none "
                            "(val_fraction 0)", fix="use --image-score wdm (the method) or map")
    sv, maps = synthetic_pass(model, val, cfg, shared)
    scores = sv.image_auroc_of(model, maps=maps)
    wdm, mp = scores["wdm"], scores["map"]
    pick = "map" if mp > wdm + PIXEL_MAP_MARGIN or (wdm != wdm and mp == mp) else "wdm"   # NaN: as pick_pixel_map
    return {"image_score": pick, "rule": IMAGE_SCORE_RULE, "synthetic_image_auroc": scores,
            "synthetic_kinds": list(parse_kinds(cfg.get("synthetic_kinds"))), "synthetic_skipped": sv.skipped}


def _label(key) -> str:
    levels, norm = key
    return ",".join(map(str, levels)) + ("" if norm == "none" else f" {norm}")


def pick_pixel_map(scores: dict, base, margin: float = PIXEL_MAP_MARGIN):
    """The (levels, norm) key of ``scores`` ({(levels tuple, "none"|"range"): pixel AUROC}) to use.

    Differences within ``margin`` are taken as noise of the synthetic set, between any two candidates: ``base``
    is kept when it is within ``margin`` of the best; otherwise, of the candidates within ``margin`` of the
    best (and more than ``margin`` above ``base``), the one nearest the method: most levels, then raw maps.
    NaN scores never win, and a NaN base loses to any scored candidate."""
    scored = {k: v for k, v in scores.items() if v == v}
    if not scored:
        return base
    top = max(scored.values())
    base_score = scores.get(base, float("nan"))
    if base_score >= top - margin:   # False for a NaN base
        return base
    pool = [k for k, v in scored.items() if v >= top - margin and not v <= base_score + margin]
    return max(pool, key=lambda k: (len(k[0]), k[1] == "none", scored[k]))


def checkpoint_offsets(model, run, cfg: dict) -> dict | None:
    """Position offsets for another epoch's model of ``run`` (`evaluate --checkpoint`): calibration.json's
    offsets belong to model.pt, so when the run scores tiles by position (its calibration.json has offsets,
    or without one its config says ``tile_norm: position``) they are taken again from this model's scores of
    the training normals. Sets ``model.cfg["tile_offsets"]``; returns the record, or None."""
    cal = saved_calibration(run)
    if cal is None:
        tile_norm = cfg.get("tile_norm", "none")
    else:
        rec = cal.get("tile_offsets") or {}
        tile_norm = "none" if not rec.get("offsets") else rec.get("mode", "position")
    return _position_offsets(model, cfg, tile_norm)


def saved_calibration(run) -> dict | None:
    """The run's calibration.json, or None when it is missing or unreadable (an unreadable one is reported
    where its threshold is read)."""
    path = Path(run) / "calibration.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        return None


def run_group_names(run_dir, model_cfg: dict) -> set:
    """The groups a run knows by name: those it trained on and calibrated (calibration.json) and those its position
    offsets are for."""
    cal = saved_calibration(run_dir) or {}
    return ({*(cal.get("trained_groups") or ()), *(cal.get("group_thresholds") or {}),
             *(model_cfg.get("tile_offsets") or {})} - {""})


def needs_calibration(cfg: dict) -> list[str]:
    """The settings of a run's config that only its calibration.json carries out (written after the last epoch):
    scored without it, the image scores (tile offsets) or the pixel map would silently be other ones."""
    need = [f"tile_norm: {cfg['tile_norm']}"] if cfg.get("tile_norm", "none") != "none" else []
    need += [f"{k}: auto" for k in ("map_levels", "map_norm") if cfg.get(k) == "auto"]
    return need + ([f"image_score: {cfg['image_score']}"] if cfg.get("image_score", "wdm") != "wdm" else [])


def apply_calibration(model, run, model_path, cfg: dict | None = None) -> None:
    """Give ``model`` the run's calibrated pixel map (levels, range units) and tile offsets when ``model_path`` is
    its model.pt (they were chosen for that model; another epoch's model keeps all levels, raw). With the run's
    ``cfg``, a missing or unreadable calibration.json that the config relies on (`needs_calibration`) is an error:
    a training stopped after its last epoch but before calibrating leaves such a run; so is one calibrated for
    another model.pt (``model_sha256``: a resumed training stopped between its new model.pt and calibrating), and a
    tile_neighbours.npz of another calibration (``tile_neighbours_sha256``: a calibrate stopped between the two)."""
    if Path(model_path).resolve() != (Path(run) / "model.pt").resolve():
        return
    cal = saved_calibration(run)
    if cal is None:
        need = needs_calibration(cfg or {})
        if need:
            state = "is unreadable" if (Path(run) / "calibration.json").exists() else "is missing"
            raise BadInputError(f"the run's calibration.json {state}, and its config ({', '.join(need)}) needs it to "
                                "score as trained: training writes it after the last epoch, so the run stopped "
                                "before that or the file was removed", path=run,
                                fix=f"`uninet-feat calibrate --run {run}` (re-scores the validation normals), or "
                                    f"`uninet-feat train --out {run} --resume`")
        return
    if cfg is not None and cal.get("model_sha256"):   # files written before session 22 do not say
        from .featstore import file_sha256
        if file_sha256(model_path) != cal["model_sha256"]:
            raise BadInputError("the run's calibration.json belongs to another model.pt (its threshold, tile "
                                "offsets and pixel map were chosen for that model): model.pt was replaced after "
                                "calibrating, or a training that wrote a new one stopped before calibrating it",
                                path=run, fix=f"`uninet-feat calibrate --run {run}`")
    model.cfg["map_levels"] = cal.get("map_levels") or None
    model.cfg["map_norm"] = cal.get("map_norm") or None
    model.cfg["image_score"] = cal.get("image_score") or "wdm"   # files written before session 44: the WDM
    rec = cal.get("tile_offsets") or {}
    model.cfg["tile_offsets"] = rec.get("offsets")
    model.cfg["tile_map_offsets"] = rec.get("map_offsets")   # a pixel map of other units than the score's
    model.cfg["tile_sizes"] = rec.get("image_sizes")   # None in files written before session 24: not checked
    model.cfg["tile_neighbours"] = model.cfg["tile_own"] = None   # each normal's own tiles: the calibration's only
    if rec.get("offsets") and rec.get("mode") == "neighbours":
        from .positions import Neighbours
        try:
            near = Neighbours.load(Path(run) / rec.get("file", NEIGHBOURS_FILE))
        except BadInputError:
            if cfg is not None:
                raise
            return   # `recalibrate` (no cfg) writes the tiles anew, the fix that error names
        if cfg is not None and rec.get("tile_neighbours_sha256") not in (None, near.digest()):   # older: not said
            raise BadInputError("the run's tile_neighbours.npz is not the one its calibration.json was made with "
                                "(its training tiles were written by a calibrate stopped before calibration.json, or "
                                "the file was replaced): its offsets and threshold belong to other tiles",
                                path=Path(run) / rec.get("file", NEIGHBOURS_FILE),
                                fix=f"`uninet-feat calibrate --run {run}`")
        model.cfg["tile_neighbours"] = near
    from .scoring import map_in_score_units
    if cfg is not None and rec.get("offsets") and not rec.get("map_offsets") and not map_in_score_units(model.cfg):
        levels = model.cfg["map_levels"]
        what = (f"levels {','.join(map(str, levels))}, " if levels else "") + \
            ("range units" if model.cfg["map_norm"] else "raw")
        warnings.warn(f"{run}: its pixel map ({what}) is not in the image score's units, and "
                      "its calibration.json (written before tile maps had offsets in their own units) has tile "
                      "offsets in score units only: the tiles' maps are left as they are, not less their place's "
                      "offset, and the calibrated colour scale and pixel threshold (taken on maps shifted by score "
                      f"offsets) are not used. Fix: `uninet-feat calibrate --run {run}`")


def calibration_fingerprint(run, model) -> dict:
    """What a run's calibration is named by where features or scores made with it are kept (a feature store's
    manifest, predict's resumable parts): ``calibration_sha256``, the sha256 of its calibration.json (None without
    one), and, when ``model`` scores tiles by their neighbours (`apply_calibration` loaded them), ``tile_neighbours_
    sha256``: the digest of those training tiles (`Neighbours.digest`, of their content). Why the second: they are
    kept beside calibration.json in `NEIGHBOURS_FILE`, which names that file but not its content, so a
    re-calibration could change the tiles a score is taken against and leave calibration.json's bytes as they were.
    A run without neighbours gets the one key it always had, so its stores' fingerprints are unchanged."""
    from .featstore import file_sha256
    cal = Path(run) / "calibration.json"
    out = {"calibration_sha256": file_sha256(cal) if cal.exists() else None}
    near = model.cfg.get("tile_neighbours") if model.cfg.get("tile_offsets") else None
    if near is not None:
        out["tile_neighbours_sha256"] = near.digest()
    return out


def calibration(model, val, cfg: dict, quiet: bool = True) -> dict:
    """The content of ``calibration.json`` for ``model`` on the validation normals ``val``, not written."""
    from .evaluate import score_samples
    from .overlay import MapRangeSample
    from .scoring import pixel_map_kind
    pixels = MapRangeSample(len(val))            # maps streamed through, not held
    res = score_samples(model, val, cfg, quiet=quiet, on_map=lambda _, m, __: pixels.add(m))
    s = np.asarray(res["scores"], dtype=np.float64)
    bad = [str(res["samples"][i].path) for i in np.flatnonzero(~np.isfinite(s))]
    if bad:   # a NaN sorts last and becomes the threshold (nothing flagged), an inf one flags nothing either
        raise BadInputError(f"{len(bad)} validation normal(s) scored NaN or infinite (e.g. {bad[0]}), so no threshold "
                            "can be set on them", path=bad[0],
                            fix="check the model: a training that diverged has NaN weights (train again, e.g. with a "
                                "lower --lr); else check those images")
    order = np.argsort(s, kind="stable")       # val_paths[i] scored val_scores[i]: which normal sets the threshold
    cal = {"n_val_normals": int(len(s)), "val_fraction": cfg.get("val_fraction"), "mean": float(s.mean()), "std": float(s.std()),
           "quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.5", "0.9", "0.95", "0.99", "1.0")},
           "threshold": float(np.quantile(s, 0.99)), "threshold_rule": DEFAULT_RULE,
           "val_scores": [float(v) for v in s[order]],
           "val_paths": [str(Path(res["samples"][i].path).resolve()) for i in order],
           "map_range": pixels.result(), "map_range_pixel_map": pixel_map_kind(model.cfg),
           "map_levels": model.cfg.get("map_levels"), "map_norm": model.cfg.get("map_norm"),
           "map_range_rule": "overlay colour scale: median and 0.999 quantile of validation-normal map pixels",
           # how many are the data's own validation split (`val_split: group` or `data`), which --val-fraction
           # does not draw
           "val_from_data": sum(x.split == "val" for x in res["samples"]),
           "skipped": list(res["skipped"])}   # unreadable validation normals left out (--skip-bad): the threshold
    groups = [res["samples"][i].group for i in order]   # rests on the others
    trained = trained_groups(cfg)   # a group the split left no validation normal of has none to set its own
    if len(set(groups) | set(trained)) > 1:   # one model for several groups: each group's own (`group_thresholds`)
        cal["val_groups"] = groups
        cal["trained_groups"] = trained
        cal["group_thresholds"] = group_thresholds(None, cal=cal, warn=False)   # None: too few per group
    return cal


def with_calibration_normals(cfg: dict, run) -> dict:
    """``cfg`` with ``calibration_normals`` from the run's calibration.json (set by `calibrate --normals`)."""
    cal = saved_calibration(run)
    if cal and cal.get("calibration_normals"):
        cfg["calibration_normals"] = cal["calibration_normals"]
    return cfg


# What `calibrate` can be told to choose; ``calibrate_choices`` in calibration.json keeps what it was told, so that a
# calibration of a later model.pt (`train --resume --epochs N`, or `calibrate` of a stale file) makes the same
# choices, not config.yaml's: the resumed training undid `calibrate --tile-norm none --map-levels 3` without a word
# (an audit, session 53). Values as given ("auto" stays "auto": chosen anew for the new model).
CHOICE_KEYS = ("map_levels", "map_norm", "image_score", "tile_norm", "synthetic_kinds")


def calibrate_choices(run, anchors: bool = False) -> dict:
    """The choices `calibrate` was given for the run (calibration.json's ``calibrate_choices``), {} when none.
    ``anchors``: also ``"_over"``, the run config's value of each when `calibrate` was told it (`current_choices`)."""
    got = (saved_calibration(run) or {}).get("calibrate_choices")
    if not isinstance(got, dict):
        return {}
    out = {k: v for k, v in got.items() if k in CHOICE_KEYS}
    if anchors and isinstance(got.get("_over"), dict):
        out["_over"] = dict(got["_over"])
    return out


def current_choices(choices: dict, cfg: dict) -> dict:
    """``choices`` (`calibrate_choices` with anchors) less those whose config value changed since `calibrate` was
    told them: the config's newer value is then the run's (a resume given --map-levels 2 after `calibrate
    --map-levels 3`); without the key's anchor (an older record) the choice stands. No ``"_over"`` in the result."""
    over = choices.get("_over") or {}
    return {k: v for k, v in choices.items() if k != "_over"
            and not (k in over and cfg.get(k) != over[k])}


def _record_choices(kept: dict, asked: dict, cfg: dict) -> dict:
    """The record `calibrate` keeps: ``kept`` (with anchors) updated by ``asked`` (the flags given now), each new
    one anchored to the run config's value now."""
    over = dict(kept.get("_over") or {})
    over.update({k: cfg.get(k) for k in asked})
    rec = {**{k: v for k, v in kept.items() if k != "_over"}, **asked}
    return {**rec, "_over": {k: v for k, v in over.items() if k in rec}} if rec else {}


def load_run(run, data: str | None = None, split_csv: str | None = None, model_path=None,
             calibrated: bool = True, device=None):
    """(model with the run's calibration applied, its checkpoint, its config with the data moved to ``data`` /
    ``split_csv`` when given; ``split_csv`` alone is read over the run's own data root): what every command that
    scores with a finished run starts from. ``model_path``: another model file of the run than model.pt. ``calibrated=False`` (for `recalibrate`) accepts a run whose
    config needs a calibration.json it lacks. The model is put on ``device`` (`runs.pick_device`; None: the
    CPU in the library, the command's --device in a command), whatever device it was trained on."""
    from .checkpoint import build_from_checkpoint
    from .runs import pick_device, run_path
    path = Path(model_path) if model_path else run_path(run, "model.pt")
    model, ckpt = build_from_checkpoint(path)
    cfg = with_calibration_normals(dict(ckpt["config"]), run)   # `calibrate --normals`: those are its normals
    if cfg.get("mem") == "multiscale":   # scoring only: the paper's MEM folded into one 7x7 conv per block
        model.eval().reparameterize()
    apply_calibration(model, run, path, cfg if calibrated else None)
    model.to(pick_device(device))
    if data and not split_csv and cfg.get("split_csv"):   # read by its layout (another test set): said, since a
        warnings.warn(f"{run}: trained with the split CSV {cfg['split_csv']}; --data {data} without --split-csv "
                      "is read by its own layout, so its test split is not the run's. Fix, to keep the run's split "
                      f"over data that moved: --split-csv {cfg['split_csv']}", stacklevel=2)   # moved folder
    if data or split_csv:   # --split-csv alone: another CSV over the run's own data root (it was ignored)
        cfg["data"], cfg["split_csv"] = data or cfg["data"], split_csv
    return model, ckpt, cfg


def recalibrate(run, data: str | None = None, split_csv: str | None = None, quiet: bool = True,
                map_levels=None, map_norm=None, synthetic_kinds=None, tile_norm=None, device=None,
                normals=None, warn_kinds: bool = True, image_score=None, choices: dict | None = None) -> dict:
    """Re-score a run's validation normals (the same seeded split as in training) into calibration.json:
    for runs written before the scores were kept, or whose data moved (``data``/``split_csv``), or to
    (re)choose the pixel map: ``map_levels`` ("all", "auto", a list) and ``map_norm`` ("none", "range", "auto");
    None keeps the run's; ``image_score`` ("wdm", "map", "auto"; None keeps the run's) likewise.
    ``synthetic_kinds``: the synthetic defects an "auto" choice is made on
    (`selection.parse_kinds`; None: the run's). ``tile_norm``: "position" / "none" (`positions.py`; None: the
    run's). ``normals``: a folder (or image) of normal images the run did not train on, scored instead of the
    held-out split from now on (thresholds, colour scale, pixel threshold, label-free choices, the kNN
    reference): more normals than a 10 % split holds, or today's production; "split" goes back to the held-out
    split; None keeps the run's. ``warn_kinds``: warn when an auto choice is made on the kinds the denoising
    student trains on (False for a resumed training, which warned already). The choices given here are kept in
    calibration.json (``calibrate_choices``, beside those given before), and later calibrations of a new model.pt
    make them again; ``choices``: the record to keep instead (a resumed training's, `train._kept_choices`)."""
    from .runs import set_threads
    from .selection import parse_kinds
    model, ckpt, cfg = load_run(run, None, split_csv, calibrated=False, device=device)
    if cfg.get("channels_last"):   # as training's model and evaluate's: its scores to the last bit, tiled ones too
        model = model.to(memory_format=torch.channels_last)
    asked = {"map_levels": map_levels, "map_norm": map_norm, "image_score": image_score, "tile_norm": tile_norm,
             "synthetic_kinds": synthetic_kinds}
    if choices is None:   # the record: what was told before (those still current), and what is asked now
        kept = calibrate_choices(run, anchors=True)
        now = current_choices(kept, cfg)
        choices = _record_choices({**now, "_over": kept.get("_over") or {}},
                                  {k: v for k, v in asked.items() if v is not None}, cfg)
    told = current_choices(choices, cfg)   # what `calibrate` was told that the config has not changed since
    if None in (map_levels, map_norm, image_score) and (saved_calibration(run) is None or _stale(run)):
        # no calibration.json (a first training stopped before calibrating), or one chosen for an earlier model.pt
        # (a resumed training stopped before calibrating its new one): what `calibrate` was told before, else the
        # run's config, chooses ("auto" included), as training would have
        own = {**cfg, **told}
        map_levels = own.get("map_levels", "all") if map_levels is None else map_levels
        map_norm = own.get("map_norm", "none") if map_norm is None else map_norm
        image_score = own.get("image_score", "wdm") if image_score is None else image_score
        tile_norm = told.get("tile_norm") if tile_norm is None else tile_norm
    if synthetic_kinds is None and "synthetic_kinds" in told:
        synthetic_kinds = told["synthetic_kinds"]
    if choices:
        cfg["calibrate_choices"] = choices
    if image_score is not None:
        parse_image_score(image_score)   # before any scoring
    if data:   # where the training data is now: the run's split CSV is kept (dropped, the layout's split drew
        old_root, own_csv = cfg["data"], cfg.get("split_csv")   # other validation normals, training images too)
        cfg["data"] = data
        if split_csv is None and own_csv:
            cfg["split_csv"] = moved_split_csv(own_csv, old_root, data, run)
    if synthetic_kinds is not None:
        cfg["synthetic_kinds"] = synthetic_kinds
    parse_kinds(cfg.get("synthetic_kinds"))   # bad values fail before any scoring
    if warn_kinds and "auto" in (map_levels, map_norm, image_score):   # chosen now, perhaps on kinds the student
        from .denoise import parse_denoise                               # learned to undo
        from .selection import warn_choices_on_trained_kinds
        warn_choices_on_trained_kinds({**cfg, "select": None}, map_levels, map_norm,
                                      parse_denoise(cfg.get("denoise")) > 0, image_score)
    if tile_norm is not None:
        from .positions import parse_tile_norm
        parse_tile_norm(tile_norm, cfg.get("tile"))
    set_threads(cfg)
    if normals == "split":
        cfg.pop("calibration_normals", None)
    elif normals is not None:
        if not Path(normals).exists():
            raise BadInputError("no such folder or image", path=normals, fix="pass a folder of normal images")
        cfg["calibration_normals"] = str(Path(normals).resolve())
    if split_csv is not None:   # read on its own first: a bad CSV was blamed on "the run's training images"
        from .runs import load_samples
        load_samples(cfg)
        if cfg.get("calibration_normals"):
            warnings.warn(f"--split-csv {split_csv}: its validation rows are not calibrated on, the run's normals "
                          f"in {cfg['calibration_normals']} are (`calibrate --normals`); it gives the training "
                          "images only (the copies check, position offsets). Fix, to calibrate on its validation "
                          "rows: add --normals split")
    val = validation_normals(cfg)
    if cfg.get("calibration_normals"):
        check_given_normals(val, cfg, cfg["calibration_normals"])
    elif split_csv is not None:   # another split draws other validation normals: the run may have trained on some
        check_not_trained_on(val, dict(ckpt["config"]), split_csv, data, run)
    else:   # its own split, drawn anew from the data as it is now: a normal added since reshuffles it
        from .runs import check_split, load_samples, train_val_samples
        check_split(ckpt, *train_val_samples(load_samples(cfg), cfg), cfg["data"], run)
    if not val:
        raise BadInputError("the run has no validation normals (val_fraction 0)", path=run,
                            fix="choose a threshold with --threshold VALUE")
    return calibrate(model, val, cfg, Path(run), quiet, map_levels, map_norm, tile_norm, image_score)   # eval mode


def _stale(run) -> bool:
    """Whether the run's calibration.json names another model.pt than the one there (``model_sha256``)."""
    from .featstore import file_sha256
    from .runs import run_path
    cal = saved_calibration(run) or {}
    return bool(cal.get("model_sha256")) and cal["model_sha256"] != file_sha256(run_path(run, "model.pt"))

