"""Scoring a set of images with a trained run, and honest evaluation on the test split.

Image score = WDM (method §6) on the whole image, or — for tiled large images such as 4096×256
fabric strips — the maximum (``tile_score: max``) or mean of the tiles' WDM scores, with the tiles'
pixel maps stitched back into a full-size map. Every image is scored on its own: nothing is
smoothed across test samples (the official code's leak, method §8.1). The threshold used for
flags comes from the run's validation normals (``calibration.json``), never from test labels.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import metrics
from .data.tiling import tile_score_reducer
from .calibration import checkpoint_offsets, load_run
from .errors import BadInputError
from .io import atomic_write_csv, atomic_write_text
from .positions import check_places, corrected, tile_map_shift
from .runs import eval_batches, load_test_samples, make_dataset, model_device, ready_to_score
from .scoring import image_score_kind, pixel_map_kind
from .thresholds import check_threshold_flags, pooled_for_unknown_groups, resolve_thresholds, thresholds_of

# Pixels of maps evaluate keeps for exact pixel metrics (one sort of all of them): 2^28 is 1 GiB of float32 maps and
# 256 MiB of masks, about 4 GiB at the sort's peak, which fits the 16 GB machines the tool is used on and holds every
# test set measured so far (MVTec's 1,725 test images at 256 px are 113 M pixels, magnetic tile's 666 at 128 px 11 M).
# Past it the maps are binned as they are scored (`metrics.PixelStats`): memory then grows with the bins an image
# fills, not with its pixels.
PIXEL_BUDGET = 1 << 28


@torch.no_grad()
def score_samples(model, samples, cfg: dict, keep_maps: bool = True, quiet: bool = True, on_map=None) -> dict:
    """Scores (and optionally pixel maps and masks) for every sample, batched.

    Tiled images: a full-size map is stitched as soon as the image's last tile is scored (its tiles
    are then freed) and paired with the full-size mask read from the mask file, so pixel metrics are
    at native resolution. ``on_map(sample, map, mask)``: called with each finished map instead of keeping it,
    so memory stays flat however many images (``keep_maps`` is then implied and ``maps`` is None)."""
    from .data import load_mask, stitch
    model.eval()
    ds = make_dataset(samples, cfg, model.source)
    tiled = bool(cfg.get("tile"))
    want_maps = keep_maps or on_map is not None
    grids = {i: g for i, g, _ in ds.tile_index} if tiled and want_maps else {}
    n = len(samples)
    offsets = model.cfg.get("tile_offsets") if tiled else None   # tile_norm: position (positions.py)
    near = model.cfg.get("tile_neighbours") if offsets else None    # tile_norm: neighbours
    hw = {i: (g.h, g.w) for i, g, _ in ds.tile_index} if offsets else {}   # each image's size, for `corrected`
    check_places(offsets, model.cfg.get("tile_sizes"), ds)   # every image's places before the first batch
    tile_scores: dict[int, list[float]] = {}
    tile_maps: dict[int, list[np.ndarray]] = {}
    maps, masks = [None] * n, [None] * n

    def finish(idx, m, mask):
        if on_map is not None:
            on_map(samples[idx], m, mask)
        else:
            maps[idx], masks[idx] = m, mask

    def full_mask(idx):
        s, g = samples[idx], grids[idx]
        return load_mask(s.mask, size=(g.h, g.w), image_path=s.path) if s.mask is not None \
            else np.zeros((g.h, g.w), dtype=bool)

    with Progress(TextColumn("score"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=quiet) as prog:
        task = prog.add_task("score", total=len(ds))
        for batch, x in eval_batches(ds, cfg, model_device(model)):
            pix, score, *ctx = (t.cpu() for t in model.predict(x, context=near is not None))
            for j, idx in enumerate(batch["index"].tolist()):
                tile_scores.setdefault(idx, []).append(corrected(float(score[j]), batch["tile"][j], offsets,
                                                                 samples[idx], ctx[0][j].numpy() if ctx else None,
                                                                 near, model.cfg.get("tile_sizes"), hw.get(idx),
                                                                 model.cfg.get("tile_own")))
                if not want_maps:
                    continue
                m = pix[j]
                if not tiled:
                    finish(idx, m.numpy().astype(np.float32), batch["mask"][j, 0].numpy() > 0.5)
                    continue
                th, tw = int(batch["tile"][j, 2]), int(batch["tile"][j, 3])
                if tuple(m.shape) != (th, tw):
                    m = torch.nn.functional.interpolate(m[None, None], (th, tw), mode="bilinear",
                                                        align_corners=False)[0, 0]
                # tile_norm position / neighbours: the tile's map less its place's offset (the one its score got,
                # or in a map of other units the map's own), so the map shows what the score is (a defect unusual
                # for its place), not the edge that is hot on every strip
                shift = tile_map_shift(model.cfg, float(score[j]), tile_scores[idx][-1], batch["tile"][j],
                                       samples[idx], ctx[0][j].numpy() if ctx else None, hw.get(idx)) \
                    if offsets else 0.0
                tile_maps.setdefault(idx, []).append(m.numpy().astype(np.float32) - np.float32(shift))
                if len(tile_maps[idx]) == grids[idx].n:
                    finish(idx, stitch(np.stack(tile_maps.pop(idx)), grids[idx]), full_mask(idx))
            prog.update(task, advance=len(x))
    reduce = tile_score_reducer(cfg.get("tile_score", "max"))
    missing = [str(samples[i].path) for i in range(n) if i not in tile_scores]
    if missing:  # only with skip_bad: drop them from the evaluation, loudly
        warnings.warn(f"{len(missing)} unreadable image(s) left out of scoring: {missing[:5]}")
    if tile_maps:
        raise RuntimeError(f"tiles missing for {[str(samples[i].path) for i in tile_maps][:5]}")
    keep = [i for i in range(n) if i in tile_scores]
    scores = [float(reduce(tile_scores[i])) for i in keep]
    kept = keep_maps and on_map is None
    return {"samples": [samples[i] for i in keep], "scores": scores, "skipped": missing,
            "maps": [maps[i] for i in keep] if kept else None,
            "masks": [masks[i] for i in keep] if kept else None}


def evaluate(run: str | Path, data: str | None = None, split_csv: str | None = None, json_path=None,
             csv_path=None, group=None, quiet: bool = False, overrides: dict | None = None,
             report_path=None, checkpoint=None, skip_bad: bool = False, knn=None, pixel_budget=None) -> dict:
    """Evaluate a run on the test split of ``data`` (default: the data it was trained on).

    ``checkpoint``: another model file of the run than ``model.pt`` — ``checkpoint.pt`` (the last epoch)
    or ``epochs/epoch_NNN.pt`` (``keep_every``) — to report how a model of another epoch does. Its
    threshold and overlay colours come from its own scores on the run's validation normals, and, when the
    run scores tiles by place (`tile_norm: position`), its position offsets from its own scores of the
    training normals, because ``calibration.json`` holds model.pt's. Its pixel map keeps all levels, raw.

    ``skip_bad``: leave unreadable test images out (warned, listed in the report's ``skipped``) instead of
    stopping with an error that names them all.

    ``knn``: a kNN index folder (`uninet-feat index`) scored beside WDM, and their combination as `predict`
    computes it: image metrics of both under ``scorers`` and per-image columns in the CSV.

    ``pixel_budget``: map pixels kept for exact pixel metrics (default `PIXEL_BUDGET`); beyond it the maps are
    binned as they are scored and the pixel figures are those of the binned scores (``pixel_metrics`` says which)."""
    from .config import check_numbers   # --threads 0 was dropped for torch's count, -1 a RuntimeError traceback
    check_numbers({"threads": (overrides or {}).get("threads")})
    check_pixel_budget(pixel_budget)
    if knn is not None and checkpoint is not None:
        raise BadInputError("--knn combines with model.pt's calibration; it cannot go with --checkpoint",
                            path=checkpoint, fix="drop one of --knn / --checkpoint")
    model, ckpt, cfg = load_run(run, data, split_csv, checkpoint)   # the run's pixel-map levels (model.pt only)
    if checkpoint:
        _check_same_run(run, checkpoint, ckpt["config"])
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if cfg.get("pixel_map"):   # the pixel map is an evaluation choice: a trained run can report either
        model.cfg["pixel_map"] = cfg["pixel_map"]
    # the run's validation normals are its own seeded split of the groups it trained on: `--group G` of a run of
    # several groups picks G's test images, not another split made over G's normals alone (half of them trained on)
    run_group = cfg.get("group")
    model = ready_to_score(model, cfg, group, skip_bad)
    split_cfg = {**cfg, "group": run_group}
    other = checkpoint is not None and Path(checkpoint).resolve() != (Path(run) / "model.pt").resolve()
    cal = None   # None: the run's calibration.json, which belongs to model.pt
    if other:    # another epoch's model: threshold and colours from its own scores on the validation normals
        check_threshold_flags(cfg.get("threshold"), cfg.get("max_fpr"))   # before scoring the validation normals
        uses_split = cfg.get("threshold") is None or report_path or cfg.get("tile")   # its normals or offsets
        own_cfg = _own_split_cfg(split_cfg, dict(ckpt["config"]), data, split_csv, run, check=bool(uses_split))
        if own_cfg is split_cfg and (split_csv is not None or data is not None):   # the run's own split is gone:
            from .normals import check_not_trained_on, validation_normals            # the given one's, checked
            check_not_trained_on(validation_normals(own_cfg), dict(ckpt["config"]), split_csv, data, run)
        checkpoint_offsets(model, run, own_cfg)   # its own position offsets (of every group the run scores)
        if cfg.get("threshold") is None or report_path:   # a given threshold and no report need none
            cal = _checkpoint_calibration(model, own_cfg, checkpoint)
    # fails before scoring; a run of several groups flags each test image by its group's threshold
    threshold, rule, by_group = resolve_thresholds(run, cfg.get("threshold"), cfg.get("max_fpr"), group, cal=cal,
                                                   source=f"validation normals of {checkpoint}")
    if other and cal and cfg.get("threshold") is None:
        rule += f" — scored with {checkpoint}, not {Path(run) / 'model.pt'}"
    from .data.dataset import drop_unusable_masks, picture_masks
    test = picture_masks(load_test_samples(cfg), skip_bad)   # before scoring: one error naming every such mask
    from .predict import _warn_other_colour_kind
    _warn_other_colour_kind(run, test)   # grey images for a colour run, or the other way (as predict and Detector)
    if skip_bad:   # a mask that does not fit leaves alone: its image is still scored
        test = drop_unusable_masks(test)
    # another split or layout: its test images may be trained ones; the run's own: byte copies of training images
    from .normals import warn_test_images_trained_on
    own = data is None and split_csv is None
    trained_on = warn_test_images_trained_on(test, dict(ckpt["config"]), data, run, own=own)
    if own and not trained_on:   # the JSON names the count where it is news: another split's, or copies found
        trained_on = None
    has_masks = any(s.mask is not None for s in test)
    prep = _knn_prepare(run, knn, split_cfg, test, skip_bad, pixel_map_kind(model.cfg)) if knn is not None else None
    budget = PIXEL_BUDGET if pixel_budget is None else int(pixel_budget)
    sink = _PixelSink(test, budget, extra=prep["extra"] if prep else None) if has_masks else None
    res = score_samples(model, test, cfg, keep_maps=has_masks, quiet=quiet, on_map=sink)
    test = res["samples"]
    if sink is not None:
        res.update(sink.result(test))
    labels = np.array([0 if s.is_normal else 1 for s in test])
    scores = np.array(res["scores"])
    report = {"n_test": len(test), "n_defect": int(labels.sum()), "epoch": ckpt.get("epoch"),
              "pixel_map": pixel_map_kind(model.cfg), "image_score": image_score_kind(model.cfg),
              "skipped": res["skipped"]}
    from .featstore import file_sha256
    scored = Path(checkpoint) if other else Path(run) / "model.pt"
    # what was measured: two evaluations written to the same files can be told apart (an audit, session 53)
    report["source"] = {"run": str(Path(run).resolve()), "model": str(scored.resolve()),
                        "model_sha256": file_sha256(scored), "data": str(cfg.get("data")),
                        "split_csv": None if cfg.get("split_csv") is None else str(cfg["split_csv"]),
                        "knn": None if knn is None else str(Path(knn).resolve())}
    if trained_on is not None:
        report["test_images_trained_on"] = trained_on
    if sink is not None:
        report["pixel_metrics"] = ("exact" if res.get("pixel_stats") is None else
                                   f"binned: {sink.pixels} map pixels over the budget of {budget} "
                                   f"(scores in {res['pixel_stats'].bits}-bit bins, metrics.PixelStats)")
    if cfg.get("tile"):   # the calibration's, which `calibrate --tile-norm` changes without touching config.yaml
        from .calibration import applied_tile_norm
        report["tile_norm"] = cfg["tile_norm"] = applied_tile_norm(model)
    if has_masks:   # a defect image without a mask is not "all normal pixels": keep it out of pixel metrics
        res["pixel_ok"] = [s.is_normal or s.mask is not None for s in test]
        unmasked = [str(s.path) for s, ok in zip(test, res["pixel_ok"]) if not ok]
        if unmasked:
            report["pixel_metrics_without"] = len(unmasked)
            warnings.warn(f"{len(unmasked)} defect image(s) have no mask and are left out of the pixel metrics "
                          f"(e.g. {unmasked[0]}); add their masks to include them")
        blank = [s for s, a in zip(test, res["mask_any"]) if not s.is_normal and s.mask is not None and not a]
        from .data.images import load_mask
        empty = [str(s.path) for s in blank if not load_mask(s.mask).any()]   # the file itself, not its resize
        if empty:   # kept (as before): their pixels count as normal ones, which is what such a mask says
            report["defect_masks_without_defect_pixels"] = len(empty)
            warnings.warn(f"{len(empty)} defect image(s) have a mask with no defect pixel (e.g. {empty[0]}): their "
                          "pixels count as normal ones in the pixel metrics. Fix: correct those masks, or remove them "
                          "to leave the images out of the pixel metrics")
        if len(blank) > len(empty):   # a defect smaller than one pixel of the evaluated size
            report["defect_masks_lost_at_image_size"] = len(blank) - len(empty)
            warnings.warn(f"{len(blank) - len(empty)} defect mask(s) lose every defect pixel when resized to the "
                          f"evaluated size (image_size {cfg['image_size']}): those defects count as normal pixels "
                          "there. Fix: a larger --image-size, or --tile, to localise defects that small")
    if "selection" in ckpt:
        report["selection"] = ckpt["selection"]
    report.update(_metrics(labels, scores, res, has_masks))
    report.update(group_metrics([s.group for s in test], labels, scores, res, has_masks))
    defect_labels = sorted({s.label for s in test if not s.is_normal})
    if len(defect_labels) > 1 and (labels == 0).any():
        report["per_label"] = per_label_metrics(test, labels, scores, res, has_masks, defect_labels)
    report["threshold"], report["threshold_rule"] = threshold, rule
    if by_group:
        report["group_thresholds"] = by_group
    pooled_for_unknown_groups([s.group for s in test], by_group)   # e.g. --data of other groups: warned
    per_image = thresholds_of([s.group for s in test], threshold, by_group)   # NaN: no threshold, nothing flagged
    # a threshold set on normals (model.pt's, or another checkpoint's on the same ones), not a given --threshold
    shared = _threshold_set_on_test(run, test, other) if threshold is not None and cfg.get("threshold") is None else 0
    if shared:
        report["threshold_set_on_test_images"] = shared
    if threshold is not None:
        report["at_threshold"] = _at_threshold(labels, scores > per_image)
    rows = [{"path": str(s.path), "group": s.group, "label": s.label, "is_defect": int(l), "score": f"{sc:.9g}",
             "flagged": "" if threshold is None else bool(sc > t)}
            for s, l, sc, t in zip(test, labels, scores, per_image)]
    if has_masks:
        pixel_auroc_column(rows, res)
    if knn is not None:
        report["scorers"] = _second_scorer(prep, cfg, test, labels, scores, rows, res, group)
    for prev in (csv_path, json_path, report_path):   # an earlier evaluation's files, gone before the first new one:
        if prev:                                      # a kill between the writes leaves none beside the new ones
            Path(prev).unlink(missing_ok=True)
    if csv_path:
        atomic_write_csv(csv_path, rows)
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2))
    if not quiet:
        print_report(report)
    report["_rows"] = rows
    if report_path:
        write_html_report(report_path, report, model, cfg, test, labels, scores, run_dir=run, cal=cal)
    return report


def check_pixel_budget(budget) -> None:
    """A negative ``--pixel-budget`` was taken as 0 (every map binned) without a word: refused before any image
    is read."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise BadInputError(f"--pixel-budget must be an integer >= 0 (map pixels kept for exact P-AUROC / AUPRO; 0 "
                            f"bins every map as it is scored), got {budget!r}",
                            fix=f"drop it for the default {PIXEL_BUDGET}, or --pixel-budget 0 for flat memory")


class _PixelSink:
    """``on_map`` of `score_samples` for evaluate: keeps maps and masks while their pixels fit ``budget`` (the exact
    metrics, as before), and at the first map past it bins those kept and then every map as it comes into
    `metrics.PixelStats` entries, freeing the maps. ``extra(i, map)``: other maps of image ``i`` made from the WDM
    map ({name: map}, the kNN and combined maps), binned beside it on the streamed path only."""

    def __init__(self, samples, budget: int, extra=None):
        self.at = {id(s): i for i, s in enumerate(samples)}   # score_samples hands back these very objects
        self.budget, self.extra, self.pixels = budget, extra, 0
        self.kept, self.any, self.binned, self.origin = {}, {}, None, {}

    def __call__(self, sample, m, mask) -> None:
        i = self.at[id(sample)]
        self.pixels += m.size
        self.any[i] = bool(np.any(mask))
        if self.binned is None and self.pixels <= self.budget:
            self.kept[i] = (m, mask)
            return
        if self.binned is None:   # the first map past the budget: the kept ones are binned and let go
            self.binned = {}
            for j, (a, k) in self.kept.items():
                self._bin(j, a, k)
            self.kept = {}
        self._bin(i, m, mask)

    def _bin(self, i, m, mask) -> None:
        for name, a in {"wdm": m, **(self.extra(i, m) if self.extra else {})}.items():
            if name not in self.origin:
                self.origin[name] = _bin_origin(a)
            st = metrics.PixelStats(origin=self.origin[name])
            st.add(mask, a)
            self.binned.setdefault(name, {})[i] = st.images[0]

    def result(self, samples) -> dict:
        """``maps`` and ``masks`` (exact) or ``pixel_stats`` (and, with ``extra``, ``extra_stats``) in the order of
        ``samples`` (score_samples' kept ones), and ``mask_any``: whether each mask has a defect pixel."""
        order = [self.at[id(s)] for s in samples]
        out = {"mask_any": [self.any[i] for i in order]}
        if self.binned is None:
            return {**out, "maps": [self.kept[i][0] for i in order], "masks": [self.kept[i][1] for i in order]}
        stats = {}
        for name, per in self.binned.items():
            if any(i not in per for i in order):   # an image the kNN pass skipped (a file changed between the two
                continue                           # passes): no kNN map to pair with it, as on the exact path
            stats[name] = metrics.PixelStats(origin=self.origin[name])
            stats[name].images = [per[i] for i in order]
        return {**out, "maps": None, "masks": None, "pixel_stats": stats.pop("wdm"), "extra_stats": stats}


def _bin_origin(a) -> float:
    """What a kind of map is binned less of (`metrics.PixelStats`): its first map's median when that lies over 8
    spreads (1st to 99th percentile) from 0, else 0. Why: bins are 2^-11 of their value wide, so maps near 1000 with a
    spread of 0.1 would share a few bins; but less an origin inside their range, maps near 0 would fill far more of the
    fine bins around it (more memory per map), so only maps far from 0 are shifted."""
    lo, med, hi = np.percentile(a, [1, 50, 99])
    return float(med) if abs(med) > 8 * (hi - lo) else 0.0


def _knn_prepare(run, knn, cfg: dict, test, skip_bad: bool, map_kind: str) -> dict:
    """The kNN side of `_second_scorer`, made before the WDM maps are scored: the kNN scores of ``test`` (the
    index's own feature space, as predict makes them), the combined score's reference, and ``extra``, which makes an
    image's kNN and combined maps from its WDM map for `_PixelSink` when the maps are not kept."""
    from .extract import Extractor
    from .overlay import calibrated_range
    from .scorers import combined_map, knn_scores, knn_setup, reference, test_images_in_bank
    ex = Extractor(run=run, skip_bad=skip_bad)
    scorer, kex = knn_setup(knn, ex, skip_bad)
    in_bank = test_images_in_bank(scorer.source, test)
    if in_bank:   # e.g. an index of an `extract --batch` store built before `index` held the run's test images out
        warnings.warn(f"{len(in_bank)} of the {len(test)} test images are in the kNN index's memory bank (e.g. "
                      f"{in_bank[0]}): they score about 0 against themselves, so the kNN and combined figures are "
                      f"optimistic. Fix: rebuild the index with `uninet-feat index --features F --run {run} --out "
                      f"{knn}`, which leaves the run's test images out")
    per_image, patch_scores, r = knn_scores(scorer, kex or ex, test)   # as predict: the highest patch score
    tiled = bool((kex or ex).cfg.get("tile"))
    ref = reference(run, cfg, scorer, kex or ex, ex, paired=True)
    wdm_range = calibrated_range(run, map_kind)
    row = np.full(len(test), -1)
    row[np.asarray(r["index"], dtype=int)] = np.arange(len(r["index"]))   # untiled: one item per image

    def extra(i, m) -> dict:
        if tiled or row[i] < 0:
            return {}
        from .downstream.knn import upsample_scores
        k = upsample_scores(patch_scores[row[i]][None], r["patch_grid"], m.shape)[0]
        out = {"knn": k}
        if ref is not None and wdm_range is not None:
            out["combined"] = combined_map(m, k, wdm_range, ref.knn_range)
        return out

    return {"knn": knn, "in_bank": in_bank, "ex": ex, "per_image": per_image, "patch_scores": patch_scores, "r": r,
            "tiled": tiled, "ref": ref, "wdm_range": wdm_range, "at": {id(s): i for i, s in enumerate(test)},
            "extra": extra}


def _second_scorer(prep: dict, cfg: dict, test, labels, wdm, rows, res: dict, group=None) -> dict:
    """kNN scores of the test images (`_knn_prepare`) and the combined score: their image metrics, the kNN map's
    pixel metrics when masks exist and images are not tiled (the patch-grid distances upsampled to the WDM map's
    size) and of the combined map (`scorers.combined_map`, when calibration.json has the WDM maps' validation range
    for this kind of pixel map), recall and false-positive rate at each one's own threshold (``max_fpr`` of, else
    the 0.99 quantile of, its validation-normal scores, as predict ``--flag-by`` sets it: per group for a run of
    several groups, ``group``'s alone with ``--group``, `scorers.flag_threshold`), and ``knn_score`` /
    ``combined_score`` in ``rows``. On the streamed path (maps not kept) the maps were binned as they were scored."""
    from .scorers import combined_map, flag_threshold
    ex, r, ref, wdm_range = prep["ex"], prep["r"], prep["ref"], prep["wdm_range"]
    per_image = prep["per_image"][[prep["at"][id(s)] for s in test]]   # the images score_samples kept
    kmaps = None
    if res.get("maps") is not None and not prep["tiled"]:
        from .downstream.knn import upsample_scores
        # each image's grid at its own WDM map's size (a tiled run's maps are each image's native size), found by
        # its sample: the maps are in ``test``'s (kept) order, the kNN rows in the extraction's
        row = {int(i): j for j, i in enumerate(r["index"])}   # untiled: one row per image
        rows_of = [row.get(prep["at"][id(s)]) for s in test]
        if None not in rows_of:   # else an image the kNN pass skipped and WDM's kept: no kNN map to pair with it
            kmaps = [upsample_scores(prep["patch_scores"][j][None], r["patch_grid"], w.shape)[0]
                     for j, w in zip(rows_of, res["maps"])]
    scored = {"knn_score": per_image}
    out = {"knn_index": str(prep["knn"]), "knn_features": "this run" if ex.patches is True else "plain backbone",
           # test images in the bank (warned), None: an index that does not record its images
           "knn_test_images_in_bank": None if prep["in_bank"] is None else len(prep["in_bank"])}
    if ref is not None:
        scored["combined_score"] = ref.combine(per_image, wdm)
        out["combined_rule"] = f"z-score of the kNN and of the WDM score on the run's {ref.n} validation normals, summed"
    pixel_maps = {}
    if kmaps is not None:
        pixel_maps["knn"] = kmaps
        if ref is not None and wdm_range is not None:
            pixel_maps["combined"] = [combined_map(w, k, wdm_range, ref.knn_range)
                                      for w, k in zip(res["maps"], pixel_maps["knn"])]
    binned = res.get("extra_stats") or {}
    if "combined" in pixel_maps or "combined" in binned:
        out["combined_map_rule"] = ("WDM and kNN maps, each as (map - median) / (0.999 quantile - median) of "
                                    "its validation-normal pixels, summed")
    for name, v in scored.items():
        key = name.replace("_score", "")
        pix = ({"maps": pixel_maps[key], "masks": res["masks"], "pixel_ok": res.get("pixel_ok")}
               if key in pixel_maps else
               {"pixel_stats": binned[key], "pixel_ok": res.get("pixel_ok")} if key in binned else {})
        out[key] = _metrics(labels, v, pix, bool(pix))
        if ref is not None:
            t, rule, by = flag_threshold(key, ref, max_fpr=cfg.get("max_fpr"), group=group)
            groups = [s.group for s in test]
            pooled_for_unknown_groups(groups, by)
            out[key].update(threshold=t, threshold_rule=rule, **({"group_thresholds": by} if by else {}),
                            at_threshold=_at_threshold(labels, v > thresholds_of(groups, t, by)))
        for row, x in zip(rows, v):
            row[name] = f"{x:.9g}"
    return out


def _threshold_set_on_test(run, test, other_model: bool = False, range_units: bool = False) -> int:
    """How many test images are among the normals the run's threshold was set on (`calibrate --normals` given the
    test normals, or `calibrate --split-csv` whose validation rows are test images, say); warned: recall and
    false-positive rate at that threshold are then optimistic, and so are the pixel figures of model.pt when its
    pixel map's range units or label-free choice were taken on them, and the image figures when the image score
    was chosen on them (``other_model``: another epoch's model,
    whose map is all levels, raw; ``range_units``: the maps are taken in the run's range units whatever its config,
    as an ensemble's are)."""
    from .calibration import saved_calibration
    from .normals import same_files
    cal = saved_calibration(run) or {}
    shared = same_files([s.path for s in test], cal.get("val_paths", []))   # also copies: `cp test/good/* DIR`
    if shared:
        given = cal.get("calibration_normals")
        on = [] if other_model else [w for w, k in (("range units", "map_norm"), ("choice", "pixel_map_choice"))
                                     if cal.get(k) or (k == "map_norm" and range_units)]
        # the image score rests on them when it was chosen on them, or is taken from a map whose units or levels were
        chosen = not other_model and ("synthetic_image_auroc" in (cal.get("image_score_choice") or {}) or
                                      (cal.get("image_score") == "map" and bool(on)))
        image = ("AUROC and AP rest on those normals too, the image score being chosen on them" if chosen else
                 "AUROC and AP do not use it")
        pixel = (f"{image}; the pixel figures rest on those normals too, the pixel map's "
                 f"{' and '.join(on)} being taken on them" if on else
                 f"{image}; the pixel figures do not use it" if chosen else "AUROC, AP and the pixel figures do not "
                 "use it")
        where = given or "the validation normals it was calibrated with: its own split, or the val rows of a split CSV"
        warnings.warn(f"{len(shared)} test image(s) are among the normals the run's threshold was set on "
                      f"({where}; e.g. {shared[0]}): "
                      f"recall and false-positive rate at that threshold are optimistic ({pixel}). Fix: `uninet-feat "
                      f"calibrate --run {run} --normals` a folder without test images"
                      + ("" if given else ", or without --split-csv (its own split)") + ", or --threshold / --max-fpr")
    return len(shared)


def _at_threshold(labels, pred) -> dict:
    return {"recall_defect": float(pred[labels == 1].mean()) if labels.any() else None,
            "false_positive_rate": float(pred[labels == 0].mean()) if (labels == 0).any() else None}


def _own_split_cfg(split_cfg: dict, trained_cfg: dict, data, split_csv, run, check: bool = True) -> dict:
    """The run's own split for another epoch's model (its validation normals, its training normals' offsets): a
    --split-csv or --data given for the test images would redraw them, some from images the run trained on.
    ``split_cfg`` itself when the run's own split is gone (moved without its CSV). With ``check``, refused when the
    data gained or lost training images since (the split recorded in model.pt, or checkpoint.pt of a run still
    training)."""
    own = split_cfg
    if split_csv is not None or data is not None:
        from .normals import moved_split_csv
        own = {**split_cfg, "data": data or trained_cfg["data"], "split_csv": trained_cfg.get("split_csv")}
        if own["split_csv"] and data:
            try:
                own["split_csv"] = moved_split_csv(trained_cfg["split_csv"], trained_cfg["data"], data, run)
            except BadInputError:
                return split_cfg
    saved = next((p for p in (Path(run) / "model.pt", Path(run) / "checkpoint.pt") if p.is_file()), None)
    if check and saved is not None:
        import torch
        from .runs import check_split, load_samples, train_val_samples
        # only its split record is read: mapped, the weights stay on disk
        record = torch.load(saved, map_location="cpu", weights_only=True, mmap=True)
        check_split(record, *train_val_samples(load_samples(own), own), own["data"], run)
    return own


def _checkpoint_calibration(model, cfg: dict, checkpoint) -> dict:
    """`calibration` of another epoch's model on the run's validation normals (not written: calibration.json
    stays model.pt's); {} when the run kept no validation normals."""
    from .calibration import calibration, given_normals_rule
    from .normals import validation_normals
    val = validation_normals(cfg)
    if not val:
        if cfg.get("max_fpr") is not None:
            raise BadInputError("--max-fpr needs validation normals and this run kept none (val_fraction 0)",
                                path=checkpoint, fix="pass --threshold VALUE")
        return {}
    return given_normals_rule(calibration(model, val, cfg), cfg.get("calibration_normals"))


def write_html_report(path, report: dict, model, cfg: dict, test, labels, scores, top_k: int = 8,
                      run_dir=None, cal: dict | None = None) -> Path:
    """HTML report with overlays of the worst false positives / negatives (maps recomputed for those only): the
    ground-truth mask outlined in green, the model's defect region (map above the pixel threshold, the top of the
    validation normals' map range, as predict --save-maps marks it) in light blue."""
    from .overlay import calibrated_range, display_range, heatmap_overlay
    from .report import write_report
    normal = [i for i in np.argsort(-scores) if labels[i] == 0][:top_k]
    defect = [i for i in np.argsort(scores) if labels[i] == 1][:top_k]
    own = {i: float(r["pixel_auroc"]) for i, r in enumerate(report["_rows"]) if r.get("pixel_auroc", "") != ""}
    missed = sorted(own, key=own.get)[:top_k]   # the report's "defects the heatmap misses"
    pick = list(dict.fromkeys(normal + defect + missed))
    overlays, vmin, vmax = {}, None, None
    if pick:
        res = score_samples(model, [test[i] for i in pick], cfg, keep_maps=True)
        vmin, vmax = display_range(run_dir, res["maps"], pixel_map_kind(model.cfg), cal=cal)
        top = calibrated_range(run_dir, pixel_map_kind(model.cfg), cal)   # None: no pixel threshold, no outline
        for s, m in zip(res["samples"], res["maps"]):
            overlays[str(s.path)] = heatmap_overlay(s.path, m, vmin=vmin, vmax=vmax, mask=s.mask, max_width=1024,
                                                    threshold=None if top is None else top[1])
    summary = {k: v for k, v in report.items() if not k.startswith("_")}
    return write_report(path, summary, report["_rows"], threshold=report.get("threshold"), overlays=overlays,
                        title=f"uninet-feat evaluation: {cfg.get('data')}", config=cfg,
                        overlay_range=None if vmin is None else (float(vmin), float(vmax)))


def pixel_auroc_column(rows, res) -> None:
    """Each CSV row's ``pixel_auroc``: its image's own pixel AUROC, which defects the heatmap misses (the report
    shows them); empty for an image without both defect and normal pixels or without a mask (``res["pixel_ok"]``).
    ``res``: the rows' maps and masks, or their binned ``pixel_stats``, in the rows' order (evaluate's and
    ensemble's alike)."""
    own = (res["pixel_stats"].image_pixel_aurocs() if res.get("pixel_stats") is not None
           else metrics.image_pixel_aurocs(res["masks"], res["maps"]))
    for row, v, ok in zip(rows, own, res["pixel_ok"]):
        row["pixel_auroc"] = "" if v is None or not ok else f"{v:.6g}"


# what makes a checkpoint a model of a given run: same network input and the same data and split. border_pad is
# part of the input (the mirrored context the weights learnt beside the image) and `train --resume` keeps the
# checkpoint's, so a model of another pad is of another run, whose figures would pass for this run's epochs
_SAME_RUN_KEYS = ("backbone", "levels", "image_size", "tile", "border_pad", "data", "split_csv", "group", "seed",
                  "val_fraction", "split_hash", "val_split", "label_split_folders")
_SAME_RUN_DEFAULTS = {"border_pad": 0, "label_split_folders": False}   # what a config written before the key existed meant
# and the same training: a model of another width, MEM, DFS, loss or recipe is another run's, even on the same
# split (its figures would pass for one of this run's epochs); a key a config lacks takes its default
_SAME_TRAINING_KEYS = ("weights", "mem", "dfs", "temperature", "lam", "margin", "decoder_depths", "width",
                       "bottleneck_stride", "stop_grad", "denoise", "denoise_kinds", "lr", "lr_target",
                       "weight_decay", "batch_size", "mean", "std")   # mean/std: the input it learnt on


def _check_same_run(run, checkpoint, ckpt_cfg: dict) -> None:
    """Refuse ``--checkpoint`` from another run: its stored config would silently swap the data, the split
    and the calibration for those of the run it came from."""
    import yaml
    path = Path(run) / "config.yaml"
    try:
        run_cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return   # an older or hand-made run folder without its config: nothing to compare against
    run_cfg, ckpt_cfg = ({**_SAME_RUN_DEFAULTS, **c} for c in (run_cfg, ckpt_cfg))
    from .config import DEFAULT_CONFIG
    trained = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in {**DEFAULT_CONFIG, **c}.items()
                if k in _SAME_TRAINING_KEYS} for c in (ckpt_cfg, run_cfg)]
    diff = [(k, ckpt_cfg.get(k), run_cfg.get(k)) for k in _SAME_RUN_KEYS
            if k in run_cfg and run_cfg.get(k) != ckpt_cfg.get(k)]
    diff += [(k, trained[0][k], trained[1][k]) for k in _SAME_TRAINING_KEYS if trained[0][k] != trained[1][k]]
    if diff:
        raise BadInputError(f"not a model of the run {run}: " + ", ".join(f"{k} {a!r} vs {b!r}" for k, a, b in diff),
                            path=checkpoint, fix=f"pass a model from {run} (checkpoint.pt or epochs/epoch_NNN.pt), "
                                                 "or --run the folder this checkpoint came from")


def _metrics(labels, scores, res, has_masks, seed=0, scope: str = "the test set") -> dict:
    """Image metrics (I-AUROC with its bootstrap interval, I-AP, F1-max) and, with masks, P-AUROC and AUPRO with
    theirs (`metrics.pixel_bootstrap`, resampling images: 1.1 s for magnetic tile's 666 test maps)."""
    out = {}
    if labels.min() == labels.max():   # the pixel metrics below still have normal pixels in defective images
        warnings.warn(f"{scope} has only {'defective' if labels.min() else 'normal'} images; its image metrics are "
                      "skipped")
    else:
        out["image_auroc"] = metrics.image_auroc(labels, scores)
        out["image_auroc_interval"] = metrics.interval(metrics.image_auroc_bootstrap(labels, scores, seed=seed))
        out["image_ap"] = metrics.image_ap(labels, scores)
        out["f1_max"] = float(metrics.f1_max(labels, scores)[0])
    ok = res.get("pixel_ok")   # only normals and masked defects have known pixel labels
    normal = labels == 0 if ok is None else (labels == 0)[np.asarray(ok, bool)]
    if has_masks and res.get("pixel_stats") is not None:   # streamed: the maps were binned as they were scored
        st = res["pixel_stats"] if ok is None else res["pixel_stats"].subset(np.flatnonzero(ok))
        if st.defect_pixels().any():
            out["pixel_auroc"], out["aupro"] = st.pixel_auroc(), st.aupro()
            h = st.histograms()
            _pixel_intervals(out, metrics.bootstrap_histograms(h, seed=seed))
            _within(out, st.within_image_auroc())
            normal = normal & (st.defect_pixels() == 0)   # a normal label with a defect in its mask: neither
            if normal.any():
                _vs_normal_images(out, st.pixel_auroc(normal), st.aupro(negatives=normal), h, normal, seed)
    elif has_masks and res.get("maps") is not None:
        m, a = res["masks"], res["maps"]   # lists of 2-D arrays (tiled images may differ in size) or arrays
        if ok is not None:
            m, a = [x for x, k in zip(m, ok) if k], [x for x, k in zip(a, ok) if k]
        if any(np.any(x) for x in m):
            out["pixel_auroc"] = metrics.pixel_auroc(m, a)
            out["aupro"] = metrics.aupro(m, a)
            h = metrics.pixel_histograms(list(m), list(a), seed=seed)   # what pixel_bootstrap bins
            _pixel_intervals(out, metrics.bootstrap_histograms(h, seed=seed))
            _within(out, metrics.within_image_auroc(m, a))
            normal = normal & ~np.array([np.any(x) for x in m])   # a normal label with a defect in its mask
            if normal.any():
                _vs_normal_images(out, metrics.pixel_auroc(m, a, negatives=normal),
                                  metrics.aupro(m, a, negatives=normal), h, normal, seed)
    return out


def _vs_normal_images(out: dict, auroc: float, apro: float, h: dict, normal, seed) -> None:
    """``pixel_auroc_vs_normal_images`` / ``aupro_vs_normal_images`` and their intervals (`metrics.NORMAL_IMAGES_RULE`;
    ``normal``: each image's normal label): the pooled figures' other half beside ``within_image_auroc``, so a reader
    tells false alarms on good parts from hot backgrounds of defective parts. A defective image whose mask is empty
    is not a normal image here (the pooled figures count its pixels as normal ones, as `evaluate` warns)."""
    draws = metrics.bootstrap_histograms(metrics.normal_images_histograms(h, normal), seed=seed)
    out["pixel_auroc_vs_normal_images"], out["aupro_vs_normal_images"] = auroc, apro
    _pixel_intervals(out, draws, "_vs_normal_images")


def _pixel_intervals(out: dict, draws: dict, suffix: str = "") -> None:
    """The pixel figures' intervals from `metrics.bootstrap_histograms` draws; None when no draw had a normal pixel,
    and how many draws had none (left out) when any."""
    for key in ("pixel_auroc", "aupro"):
        out[f"{key}{suffix}_interval"] = metrics.interval(draws[key]) if len(draws[key]) else None
    if draws.get("undefined_draws"):
        out[f"pixel{suffix}_undefined_draws"] = draws["undefined_draws"]


def _within(out: dict, w) -> None:
    """``within_image_auroc`` (`metrics.within_image_auroc`) and over how many defective images, when any."""
    if w is not None:
        out["within_image_auroc"], out["within_image_n"] = w


def _subset_metrics(idx, labels, scores, res, has_masks, seed=0, scope: str = "the test set") -> dict:
    """``_metrics`` on the images ``idx`` only (maps and masks may be lists or stacked arrays, or ``pixel_stats``)."""
    pick = lambda key: [res[key][i] for i in idx] if res.get(key) is not None else None  # noqa: E731
    sub = {k: pick(k) for k in ("maps", "masks", "pixel_ok")}
    if res.get("pixel_stats") is not None:
        sub["pixel_stats"] = res["pixel_stats"].subset(idx)
    return _metrics(labels[idx], scores[idx], sub, has_masks, seed, scope)


def group_metrics(groups, labels, scores, res, has_masks) -> dict:
    """``per_group`` metrics and their ``mean_image_auroc`` when the images (``groups``: each one's) come from more
    than one group, else {}. The mean's interval comes from the groups' bootstrap draws averaged, each group
    resampled on its own stream (seed [0, k + 1]), so it is the spread of the mean itself."""
    names = sorted(set(groups))
    if len(names) < 2:
        return {}
    idx = {g: [i for i, x in enumerate(groups) if x == g] for g in names}
    per = {g: _subset_metrics(idx[g], labels, scores, res, has_masks, seed=[0, k + 1], scope=f"group {g}'s test set")
           for k, g in enumerate(names)}
    out = {"per_group": per}
    scored = [g for g in names if "image_auroc" in per[g]]
    if scored:
        out["mean_image_auroc"] = float(np.mean([per[g]["image_auroc"] for g in scored]))
        out["mean_image_auroc_groups"] = scored   # a group of one class has no AUROC: the mean is over the others
        draws = [metrics.image_auroc_bootstrap(labels[idx[g]], scores[idx[g]], seed=[0, names.index(g) + 1])
                 for g in scored]
        out["mean_image_auroc_interval"] = metrics.interval(np.mean(draws, axis=0))
    return out


def per_label_metrics(test, labels, scores, res, has_masks, defect_labels) -> dict:
    """Each defect label against the test normals of the groups it occurs in (all of them when there are no
    groups), and its share of the defect pixels: against another group's normals a label's figure would
    measure how the groups differ. A label whose groups have no test normal gets no image metrics.

    Pixel AUROC pools pixels over the test set, so a label whose masks are large dominates it; the
    share tells a reader which label a low pooled figure comes from.
    """
    masks = res.get("masks") if has_masks else None   # a list (evaluate) or an array (benchmarks)
    if has_masks and masks is None and res.get("pixel_stats") is not None:
        masks = res["pixel_stats"].defect_pixels()   # streamed: each image's defect-pixel count (sums alike)
    total = sum(int(m.sum()) for m in masks) if masks is not None else 0
    per = {}
    for name in defect_labels:
        mine = [i for i, s in enumerate(test) if s.label == name]
        where = {test[i].group for i in mine}
        normal = [i for i, s in enumerate(test) if s.is_normal and s.group in where]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per[name] = {"n": len(mine), **_subset_metrics(normal + mine, labels, scores, res, has_masks)}
        if total:
            per[name]["defect_pixel_share"] = sum(int(masks[i].sum()) for i in mine) / total
    return per


def report_console() -> Console:
    """The console the metrics table is printed on: the terminal's width, or 160 columns when the output is a log
    file or a pipe (rich's 80 there cut the table's numbers to "0.974-0.…")."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_report(report: dict) -> None:
    console = report_console()
    sel = report.get("selection")
    epoch = f", model of epoch {report['epoch']}" if report.get("epoch") else ""
    if sel and sel.get("score") is None:   # select: synthetic found no finite validation score
        epoch += " (the last: no finite synthetic validation score)"
    elif sel:
        trained = sel.get("epochs_trained")   # best.pt, written while training, does not know it yet
        epoch += f" (chosen on synthetic validation{f', of {trained} trained' if trained else ''})"
    table = Table(title=f"uninet-feat evaluation{epoch}")
    table.add_column("scope")
    keys = ["image_auroc", "image_auroc_interval", "pixel_auroc", "pixel_auroc_interval", "aupro", "aupro_interval",
            "within_image_auroc", "image_ap", "f1_max"]
    keys = [k for k in keys if k != "within_image_auroc" or "within_image_auroc" in report]
    for k in keys:
        table.add_column("95 % interval" if k.endswith("_interval") else "within image" if k.startswith("within")
                         else k)
    rows = [("all", report)] + list(report.get("per_group", {}).items())
    rows += [(f"label {k}", v) for k, v in report.get("per_label", {}).items()]
    show = lambda v: "none" if v is None else f"{v[0]:.3f}-{v[1]:.3f}" if isinstance(v, list) else f"{v:.4f}"  # noqa: E731
    share = any("defect_pixel_share" in v for v in report.get("per_label", {}).values())
    if share:   # pooled pixel AUROC weighs labels by their pixels: which label a low figure comes from
        table.add_column("defect px")
    for name, r in rows:
        cells = [show(r[k]) if k in r else "-" for k in keys]
        table.add_row(escape(name), *cells,   # a label or group named 'scratch [minor]' is text, not markup
                      *([f"{r['defect_pixel_share']:.2f}" if "defect_pixel_share" in r else "-"] if share else []))
    console.print(table)
    if "mean_image_auroc" in report:
        lo, hi = report.get("mean_image_auroc_interval") or (float("nan"),) * 2
        over = report.get("mean_image_auroc_groups") or list(report.get("per_group", {}))
        left = sorted(set(report.get("per_group", {})) - set(over))
        console.print(f"mean image AUROC over {len(over)} groups {report['mean_image_auroc']:.4f} "
                      f"(95 % interval {lo:.3f}-{hi:.3f})"
                      + (f"; left out, one class only: {escape(', '.join(left))}" if left else ""))
    if "within_image_auroc" in report:
        console.print(f"within image: each defective image's own pixel AUROC (is the defect where its map is hot), "
                      f"mean over the {report['within_image_n']} with defect and normal pixels")
    if "pixel_auroc_vs_normal_images" in report:
        iv = lambda k: "{:.3f}-{:.3f}".format(*report[k + "_interval"]) if report[k + "_interval"] else "none"  # noqa: E731
        console.print(f"against normal images alone (the defective images' other pixels left out): pixel AUROC "
                      f"{report['pixel_auroc_vs_normal_images']:.4f} ({iv('pixel_auroc_vs_normal_images')}), AUPRO "
                      f"{report['aupro_vs_normal_images']:.4f} ({iv('aupro_vs_normal_images')})")
    rules = ([f"image_auroc {metrics.INTERVAL_RULE}"] if "image_auroc_interval" in report else []) + (
        [f"pixel_auroc and aupro {metrics.PIXEL_INTERVAL_RULE}"] if "aupro_interval" in report else [])
    if rules:
        console.print("intervals: " + "; ".join(rules))
    sc = report.get("scorers") or {}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name in ("knn", "combined"):
        if "image_auroc" in sc.get(name, {}):
            at, by = sc[name].get("at_threshold"), sc[name].get("group_thresholds")
            where = (f"its thresholds per group {', '.join(f'{g} {t:.4g}' for g, t in by.items())}" if by else
                     f"its threshold {sc[name].get('threshold', float('nan')):.4g}")
            console.print(f"{name} ({sc['knn_features']} features): " + ", ".join(
                f"{k} {sc[name][k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro", "within_image_auroc",
                                                   "pixel_auroc_vs_normal_images", "aupro_vs_normal_images",
                                                   "image_ap", "f1_max")
                if k in sc[name]) + (f"; at {where}: defect recall {fmt(at['recall_defect'])}, false-positive rate "
                                     f"{fmt(at['false_positive_rate'])}" if at else ""))
    if report.get("pixel_metrics"):
        console.print(f"pixel metrics: {report['pixel_metrics']}")
    if report.get("pixel_metrics_without"):
        console.print(f"pixel metrics leave out {report['pixel_metrics_without']} defect image(s) without a mask")
    at = report.get("at_threshold")
    if report.get("threshold") is None and "threshold_rule" in report:
        console.print(f"threshold: {report['threshold_rule']}")
    if at and report.get("group_thresholds"):
        each = ", ".join(f"{g} {t:.6g}" for g, t in report["group_thresholds"].items())
        console.print(f"thresholds per group {each} ({report['threshold_rule']}): defect recall "
                      f"{fmt(at['recall_defect'])}, false-positive rate {fmt(at['false_positive_rate'])}")
    elif at:
        console.print(f"threshold {report['threshold']:.6g} ({report['threshold_rule']}): defect recall "
                      f"{fmt(at['recall_defect'])}, false-positive rate {fmt(at['false_positive_rate'])}")
