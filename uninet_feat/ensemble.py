"""Seed ensembles: several runs of one config scored on one test split, their scores averaged.

Why: on AITEX's small test sets (6 normal and 7-31 defective strips per fabric) the training seed alone moves a
fabric's strip AUROC by up to 0.43 and the mean over fabrics between 0.849 and 0.940 (docs/results.md). Averaging
runs that differ only in their seed is the usual cure for that variance.

- image score: the plain mean of the runs' image scores, flagged above the mean of their default thresholds (each
  from the run's own validation normals, ``calibration.json``). Runs of one config share one score scale (on AITEX
  the seeds' normal tile scores agree to 2 %), so no rescaling is needed. Until session 20 each score was divided
  by its run's threshold instead; with one validation strip per fabric that threshold is one strip's
  position-corrected score, near zero (0.011-0.044 on fabric_03), so the run with the smallest threshold
  outvoted the others 3-4 to 1, and a threshold at or below 0 would have flipped a run's sign. A warning names
  a run whose normal score level (`normal_level`) differs from the first run's by more than 25 %;
- pixel map: in the run's validation-normal range units (`scorers.range_units`: 0 a typical normal pixel, 1 a
  rare one; well conditioned, each range comes from every validation-normal pixel), when every run's
  calibration has that range for its kind of map; otherwise no pixel metrics.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError
from .io import atomic_write_csv, atomic_write_text

RULE = ("mean of the runs' image scores > mean of their default thresholds (each from that run's validation "
        "normals)")
SCALE_TOLERANCE = 0.25   # relative difference of normal score level (`normal_level`) that gets a warning


@dataclass
class Member:
    """One run of an ensemble, ready to score: its model (calibration applied), config, default threshold, the
    validation-normal range of its pixel map (None when its calibration has none), `normal_level` and, for a run
    of several groups with enough validation normals in each, its thresholds per group (`group_thresholds`)."""
    run: str
    model: object
    cfg: dict
    threshold: float
    rng: tuple | None
    level: float | None = None
    by_group: dict | None = None
    trained_cfg: dict | None = None   # the run's own config (its split: what it trained on)
    split: dict | None = None   # its model.pt's `runs.split_digest` (None: a model saved before it was kept)

    def scores(self, samples, quiet: bool = True, on_map=None) -> dict:
        """{path: image score} of ``samples``; ``on_map(sample, map in range units)`` per finished map."""
        from .evaluate import score_samples
        from .scorers import range_units
        add = None if on_map is None else (lambda s, m, mask: on_map(s, range_units(m, self.rng), mask))
        res = score_samples(self.model, samples, self.cfg, keep_maps=False, quiet=quiet, on_map=add)
        return {str(x.path): float(v) for x, v in zip(res["samples"], res["scores"])}


# what must match between members so that they score the same images the same way
_SAME = ("image_size", "tile", "tile_score")


def load_member(run, data=None, split_csv=None, group=None, skip_bad: bool = False, like: Member | None = None
                ) -> Member:
    """A run as an ensemble `Member`; refused without a default threshold (its scores would have no common
    unit) or when it tiles or sizes images otherwise than ``like`` (the first member)."""
    from .calibration import load_run, saved_calibration
    from .thresholds import group_thresholds, resolve_threshold
    from .overlay import calibrated_range
    from .runs import ready_to_score
    from .scoring import pixel_map_kind
    run = str(run)
    model, ckpt, cfg = load_run(run, data, split_csv)
    model = ready_to_score(model, cfg, group, skip_bad)
    cal = saved_calibration(run)   # read once for the threshold, the map range and the normal level
    threshold, _ = resolve_threshold(run, cal=cal, name_run=True)   # its warnings say which member they are of
    if threshold is None:
        raise BadInputError("the run has no threshold to put its scores in a common unit", path=run,
                            fix=f"run `uninet-feat calibrate --run {run}` (it needs validation normals)")
    if like is not None:
        diff = [k for k in _SAME if cfg.get(k) != like.cfg.get(k)]
        if diff:
            raise BadInputError(f"{run} scores images otherwise than {like.run} ("
                                + ", ".join(f"{k} {cfg.get(k)} vs {like.cfg.get(k)}" for k in diff) + ")",
                                path=run, fix="ensemble runs of one config that differ only in their seed")
    return Member(run, model, cfg, float(threshold), calibrated_range(run, pixel_map_kind(model.cfg), cal),
                  normal_level(model, cal), group_thresholds(run, cal=cal, name_run=True),
                  dict(ckpt["config"]), ckpt.get("split"))


def normal_level(model, cal: dict | None) -> float | None:
    """The typical plain WDM score of the run's normals, its score scale: the median of its tile-position offsets
    (training normals' tiles) when it has them, else of its validation normals' image scores. Not the threshold
    (one AITEX strip's corrected score, near 0) nor the pixel-map range (its levels and units are chosen per run:
    two magnetic-tile seeds got maps whose normal medians differ fivefold while their scores agree within 5 %).
    ``cal``: the run's calibration.json as a dict (None: no validation scores)."""
    offsets = model.cfg.get("tile_offsets")
    vals = [v for table in offsets.values() for v in table.values()] if offsets else (cal or {}).get("val_scores")
    return float(np.median(vals)) if vals else None


def load_members(runs, data=None, split_csv=None, group=None, skip_bad: bool = False) -> list[Member]:
    """Every run as a `Member` (at least two), checked against the first; warns when their scales differ."""
    if len(runs) < 2:
        raise BadInputError("an ensemble needs at least two runs", fix="pass --runs RUN_A RUN_B ...")
    real = [str(Path(r).resolve()) for r in runs]
    twice = next((r for i, r in enumerate(runs) if real[i] in real[:i]), None)
    if twice is not None:   # one run twice is one model with double weight, reported as an ensemble
        raise BadInputError("the same run is given twice", path=twice, fix="pass runs of one config trained with "
                                                                           "other seeds, each once")
    from .featstore import file_sha256
    shas = [file_sha256(Path(r) / "model.pt") if (Path(r) / "model.pt").is_file() else r for r in runs]
    if len(set(shas)) < len(shas):
        warnings.warn("two of these runs hold the same model.pt (the same config and seed?): the ensemble averages "
                      "copies of one model (fix: train the others with other --seed values)")
    first = load_member(runs[0], data, split_csv, group, skip_bad)
    members = [first] + [load_member(r, data, split_csv, group, skip_bad, like=first) for r in runs[1:]]
    _warn_other_training_data(members)
    from .calibration import applied_tile_norm
    from .scoring import image_score_kind
    modes = {m.run: applied_tile_norm(m.model) for m in members}
    if len(set(modes.values())) > 1:   # a position-corrected score beside a plain one: not one scale
        warnings.warn(f"these runs score tiles differently ({', '.join(f'{r}: {v}' for r, v in modes.items())}): "
                      "the ensemble averages scores of different kinds (fix: `uninet-feat calibrate --run RUN "
                      "--tile-norm MODE` to give them one)")
    scored = {m.run: image_score_kind(m.model.cfg) for m in members}
    if len(set(scored.values())) > 1:   # the WDM of all maps beside a score of one chosen map: not one scale
        which = ", ".join(f"{r}: {v}" for r, v in scored.items())
        warnings.warn(f"these runs take their image scores from different maps ({which}): the ensemble averages "
                      "scores of different kinds (fix: `uninet-feat calibrate --run RUN --image-score wdm` for each, "
                      "the method's score)")
    for m in members[1:]:
        if first.level and m.level is not None and abs(m.level / first.level - 1) > SCALE_TOLERANCE:
            warnings.warn(f"{m.run}: its normals' typical score ({m.level:.4g}) differs from {first.run}'s "
                          f"({first.level:.4g}) by more than {SCALE_TOLERANCE:.0%}; the ensemble averages raw "
                          "scores, so the larger-scale run weighs more (ensemble runs of one config, other seeds)")
    return members


# config keys that do not change what a run learns (or that `_warn_other_training_data` names as its data)
_NOT_SETTINGS = {"seed", "threads", "device", "data", "split_csv", "group", "mask_pattern", "split_hash", "val_split",
                 "label_split_folders",
                 "cache_images", "grad_checkpointing", "step_in_backward", "keep_every", "eval_batch_size",
                 "channels_last", "skip_bad", "map_levels", "map_norm", "image_score", "pixel_map",
                 "tile_norm"}


def _warn_other_training_data(members: list[Member]) -> None:
    """Name a run trained on other data than the first (its data folder, split file or group, or the number of
    normals it trained and validated on): its scores are in another model's units, not another seed's. Warned, not
    refused: a data folder may have moved (predict and Detector users pass their own images; evaluate's ensemble
    also refuses other test images)."""
    first = members[0]

    def what(m):
        c, split = m.trained_cfg or {}, m.split or {}
        real = lambda p: p and os.path.realpath(os.path.expanduser(str(p)))  # noqa: E731 (`../d` and /abs/d: one)
        return {"data": real(c.get("data")), "split_csv": real(c.get("split_csv")), "group": c.get("group"),
                "training normals": (split["n_fit"] + split["n_val"]) if "n_fit" in split else None}
    mine = what(first)
    for m in members[1:]:
        theirs = what(m)
        diff = [k for k in mine if mine[k] is not None and theirs[k] is not None and mine[k] != theirs[k]
                or k == "group" and mine[k] != theirs[k]]
        if diff:
            warnings.warn(f"{m.run} was trained on other data than {first.run} ("
                          + ", ".join(f"{k} {theirs[k]} vs {mine[k]}" for k in diff) + "): an ensemble averages "
                          "runs of one config and data that differ only in their seed (fix: pass such runs)")
        a, b = first.trained_cfg or {}, m.trained_cfg or {}
        other = sorted(k for k in set(a) | set(b) if k not in _NOT_SETTINGS and a.get(k) != b.get(k))
        if other:   # another recipe (epochs, lr, width, ...): not a seed ensemble, and its scale may still agree
            warnings.warn(f"{m.run} was trained with other settings than {first.run} ("
                          + ", ".join(f"{k} {b.get(k)} vs {a.get(k)}" for k in other) + "): an ensemble averages "
                          "runs of one config that differ only in their seed (fix: pass such runs)")


def default_threshold(members: list[Member]) -> float:
    """The ensemble's default threshold: the mean of its runs' own (`RULE`)."""
    return float(np.mean([m.threshold for m in members]))


GROUP_RULE = ("mean of the runs' image scores > mean of the runs' thresholds of the image's group (each run's "
              "`group_thresholds`, from its validation normals)")


def default_thresholds(members: list[Member], group: str | None = None):
    """(threshold, rule, by_group): `default_threshold`, and for runs of several groups that each have thresholds per
    group, per group the mean of the runs' (`thresholds.pick_group`: ``group``'s alone when given). Why: the runs'
    normal scores sit at another level in each group, as one run's do, so the mean of pooled thresholds passes the
    lower groups' defects. When any run has none per group (too few validation normals: it warned) the pooled mean."""
    from .thresholds import pick_group
    bys = [m.by_group for m in members]
    by = None
    if all(bys):
        common = set.intersection(*(set(b) for b in bys))
        by = {g: float(np.mean([b[g] for b in bys])) for g in sorted(common)} or None
    return pick_group(default_threshold(members), RULE, by, group, GROUP_RULE)


def member_thresholds(members: list[Member], group: str | None = None) -> dict:
    """{run: the threshold it brings to `default_thresholds`' mean}: with ``group``, its threshold of that group
    where every run has one (the mean is then of those), else its pooled one."""
    mine = group is not None and all(m.by_group and group in m.by_group for m in members)
    return {m.run: m.by_group[group] if mine else m.threshold for m in members}


def _accumulate(maps: dict, run: str):
    """on_map that adds each map (range units) into ``maps`` ({path: [sum, mask]}), refusing other sizes."""
    def add(sample, m, mask):
        acc = maps.setdefault(str(sample.path), [0.0, mask])
        if np.shape(acc[0]) not in ((), m.shape):
            raise BadInputError(f"{run} maps {sample.path} at {m.shape[1]}x{m.shape[0]}, an earlier run at "
                                f"{acc[0].shape[1]}x{acc[0].shape[0]}", path=run,
                                fix="ensemble runs of one image size and tiling (e.g. one config, other seeds)")
        acc[0] = acc[0] + m
    return add


def mean_maps(members: list[Member], samples, on_map, chunk: int = 8) -> None:
    """``on_map(sample, mean of the members' maps in their range units)`` for each of ``samples``, a few
    images at a time, so memory holds ``chunk`` maps whatever the count (predict's ensemble overlays)."""
    missing = [m.run for m in members if m.rng is None]
    if missing:
        raise BadInputError("an ensemble heatmap needs each run's validation-normal map range", path=missing[0],
                            fix=f"run `uninet-feat calibrate --run {missing[0]}`")
    for i in range(0, len(samples), chunk):
        part, maps = samples[i:i + chunk], {}
        for m in members:
            m.scores(part, on_map=_accumulate(maps, m.run))
        for s in part:
            if str(s.path) in maps:   # not skipped as unreadable
                on_map(s, maps[str(s.path)][0] / len(members))


ENSEMBLE_CHUNK = 64   # test images scored by every run before their mean maps are reduced


def evaluate_ensemble(runs, data=None, split_csv=None, json_path=None, csv_path=None, group=None,
                      quiet: bool = False, skip_bad: bool = False, pixel_budget=None) -> dict:
    """Score each run on the test split and report the ensemble's image metrics (and pixel metrics when the test
    images have masks, exact within ``pixel_budget`` map pixels as evaluate's, else binned), its recall and
    false-positive rate at its default threshold (per group for runs of several groups, `default_thresholds`), and
    each run's own image AUROC."""
    from .evaluate import (PIXEL_BUDGET, _PixelSink, _at_threshold, _metrics, _threshold_set_on_test,
                           check_pixel_budget, group_metrics, pixel_auroc_column, print_report, report_console)
    from . import metrics
    from .runs import load_test_samples
    check_pixel_budget(pixel_budget)
    runs = [str(r) for r in runs]
    members = load_members(runs, data, split_csv, group, skip_bad)
    from .data.dataset import drop_unusable_masks, picture_masks
    test = picture_masks(load_test_samples(members[0].cfg), skip_bad)   # before scoring, as evaluate
    for m in members[1:]:
        if [str(x.path) for x in load_test_samples(m.cfg)] != [str(x.path) for x in test]:
            raise BadInputError(f"{m.run} scored other test images than {runs[0]} (an ensemble compares one image "
                                "across runs)", path=m.run, fix="pass runs trained on the same data, split and group")
    from .predict import _warn_other_colour_kind
    _warn_other_colour_kind(runs[0], test)   # grey images for colour runs, or the other way (as evaluate and predict)
    trained_on = None
    if data is not None or split_csv is not None:   # another test set: images some run trained on (as evaluate)
        from .normals import warn_test_images_trained_on
        trained_on = {m.run: warn_test_images_trained_on(test, m.trained_cfg, data, m.run) for m in members}
    if skip_bad:   # as evaluate: a mask that cannot be used leaves alone, its image is still scored (the
        test = drop_unusable_masks(test)   # dataset's check left the whole image out of the image metrics too)
    masked = any(x.mask is not None for x in test)   # without masks no pixel metric: keep no maps
    pixels = masked and all(m.rng is not None for m in members)
    sink = _PixelSink(test, PIXEL_BUDGET if pixel_budget is None else int(pixel_budget)) if pixels else None
    if sink is None:
        per_run = [m.scores(test, quiet) for m in members]
    else:   # a few images at a time through every run: their mean maps go to the sink (kept within the budget,
        per_run = [{} for _ in members]   # binned past it), so no image's map waits for the last run
        for i in range(0, len(test), ENSEMBLE_CHUNK):
            part, maps = test[i:i + ENSEMBLE_CHUNK], {}
            for d, m in zip(per_run, members):
                d.update(m.scores(part, on_map=_accumulate(maps, m.run)))
            for x in part:
                if str(x.path) in maps:   # not skipped as unreadable
                    sink(x, maps[str(x.path)][0] / len(runs), maps[str(x.path)][1])
    by_path = {str(x.path): x for x in test}
    samples = [by_path[k] for k in per_run[0]]       # without images skipped as unreadable (--skip-bad)
    raw = [np.array([d[str(x.path)] for x in samples]) for d in per_run]
    scores = np.mean(raw, axis=0)
    thr, rule, by_group = default_thresholds(members, group)   # per group: the mean of the runs' group thresholds
    from .thresholds import pooled_for_unknown_groups, thresholds_of
    pooled_for_unknown_groups([x.group for x in samples], by_group)
    per_image = thresholds_of([x.group for x in samples], thr, by_group)
    labels = np.array([0 if x.is_normal else 1 for x in samples])
    # a member calibrated on test normals (`calibrate --normals`) makes its share of the threshold optimistic
    shared = {m.run: n for m in members if (n := _threshold_set_on_test(m.run, samples, range_units=True))}
    has_masks = sink is not None and any(x.mask is not None for x in samples)
    if not pixels and masked:
        bare = [m.run for m in members if m.rng is None]
        warnings.warn(f"{', '.join(bare)}: calibration.json has no map range for the pixel map, so the ensemble "
                      f"reports image metrics only. Fix: `uninet-feat calibrate --run {bare[0]}`"
                      f"{' (and the others named)' if len(bare) > 1 else ''}")
    res, unmasked = {}, []
    if has_masks:
        res = {**sink.result(samples), "pixel_ok": [x.is_normal or x.mask is not None for x in samples]}
        unmasked = [str(x.path) for x, ok in zip(samples, res["pixel_ok"]) if not ok]
        if unmasked:   # as evaluate: a defect image without a mask (none, or its mask left out) is not all normal
            warnings.warn(f"{len(unmasked)} defect image(s) have no mask and are left out of the pixel metrics "
                          f"(e.g. {unmasked[0]}); add their masks to include them")
    both = 0 < labels.sum() < len(labels)
    report = {"runs": runs, "n_test": len(samples), "n_defect": int(labels.sum()),
              **_metrics(labels, scores, res, has_masks), "threshold": thr, "threshold_rule": rule,
              **({"group_thresholds": by_group} if by_group else {}),
              **({"pixel_metrics": "exact" if res.get("pixel_stats") is None else
                  f"binned: {sink.pixels} map pixels over the budget"} if has_masks else {}),
              **({"pixel_metrics_without": len(unmasked)} if unmasked else {}),
              **({"test_images_trained_on": trained_on} if trained_on is not None else {}),
              "run_thresholds": member_thresholds(members, group),
              **({"run_group_thresholds": {m.run: m.by_group for m in members}} if by_group else {}),
              "at_threshold": _at_threshold(labels, scores > per_image),
              **({"threshold_set_on_test_images": shared} if shared else {}),
              "per_run_image_auroc": {r: metrics.image_auroc(labels, s) if both else None
                                      for r, s in zip(runs, raw)}}
    report.update(group_metrics([x.group for x in samples], labels, scores, {}, False))
    rows = [{"path": str(x.path), "group": x.group, "label": x.label, "is_defect": int(y), "score": f"{s:.9g}",
             "flagged": bool(s > t), **{f"score_{k}": f"{v[j]:.9g}" for k, v in enumerate(raw)}}
            for j, (x, y, s, t) in enumerate(zip(samples, labels, scores, per_image))]
    if has_masks:   # each image's own pixel AUROC of the mean map, as evaluate's CSV has it for one run's
        pixel_auroc_column(rows, res)
    if csv_path:
        atomic_write_csv(csv_path, rows)
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if not quiet:
        print_report({**report, "epoch": None})
        report_console().print(f"ensemble of {len(runs)} runs; each run alone, image AUROC: " + ", ".join(
            f"{r} {v:.4f}" if v is not None else f"{r} -" for r, v in report["per_run_image_auroc"].items()))
    return report
