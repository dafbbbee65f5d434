"""`uninet-feat predict`: a batch of images → WDM score and flag, kNN and combined scores, an ensemble's score,
head predictions and defect descriptors per image; CSV, JSON, summary and heatmap overlays of flagged images."""
from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .calibration import applied_tile_norm
from .normals import KIND_LOOK_FILES
from .data.tiling import tile_score_reducer
from .featstore import aggregate_tiles, head_columns
from .io import SCRATCH, atomic_write_bytes, atomic_write_csv, atomic_write_text
from .runs import ready_to_score, samples_of


def predict_cmd(run, data, out, knn=None, heads=(), split_csv=None, overlays=True, quiet=False,
                text=None, threshold=None, max_fpr=None, skip_bad=False, flag_by=None, heatmap=None,
                group=None, ensemble=(), save_maps=False, pixel_threshold=None) -> dict:
    """Per image: WDM score and flag, kNN score, head probabilities / defect type; CSV, JSON, overlays.

    Returns the summary written to ``summary.json`` with the per-image ``rows`` added.

    ``data`` is a folder (every image under it; a labelled layout keeps its labels, anything else is
    scored with label ``''``, unknown) or one image file.

    An image is flagged when its ``flag_by`` score (``wdm``, or with ``knn``: ``knn`` / ``combined``) is
    above the threshold chosen on that score: ``threshold`` as given, ``max_fpr`` on the run's validation
    normals, else their 0.99 quantile (WDM: the run's calibrated default); a run of several groups with enough
    validation normals in each flags each image by its group's threshold on that score (``group_thresholds`` in
    the summary, ``group_thresholds_score`` naming the score; `thresholds.thresholds_by_group`). ``heatmap``:
    the map drawn in the overlays of flagged images, WDM's or (with ``knn``) the kNN patch distances or the
    combined map (`scorers.combined_map`: both in their validation-normal range units, summed). ``group``: the
    group of every image (a multi-class run's position offsets, `tile_norm: position`, are per group; a run of
    several groups flags by that group's threshold).
    ``save_maps``: also every image's WDM pixel map and defect mask (`_write_maps`); ``pixel_threshold``: the map
    value above which a pixel is defect in those masks (default: the validation normals' 0.999 pixel quantile).

    ``ensemble``: more runs of the same config (other seeds) scored on the same images; ``ensemble_score`` is the
    mean of ``run``'s and their WDM scores (`ensemble.py`), flagged above the mean of their default thresholds
    (per group when every run has its own per group; or ``threshold``), and is then the default ``flag_by`` and
    ``heatmap`` (the mean of the runs' maps in their range units, coloured 0..1: a typical normal pixel .. a rare
    one)."""
    from .thresholds import check_threshold_flags, pooled_for_unknown_groups, resolve_thresholds
    from .extract import Extractor
    from .scorers import SCORES, check_built_from, flag_threshold, knn_scores, knn_setup, reference
    from .overlay import calibrated_range
    from .scoring import image_score_kind, pixel_map_kind
    from .data.images import read_size
    from .descriptors import spot_summary
    from . import ensemble as ens
    ensemble = [str(r) for r in ensemble]
    if pixel_threshold is not None and not save_maps:
        raise BadInputError("--pixel-threshold sets the defect masks of --save-maps, which was not given",
                            fix="add --save-maps, or drop --pixel-threshold")
    if pixel_threshold is not None and not np.isfinite(pixel_threshold):
        raise BadInputError(f"--pixel-threshold must be a finite number, got {pixel_threshold}",
                            fix="drop it for the run's default, or give a number such as 0.5")
    flag_by = flag_by or ("ensemble" if ensemble else "wdm")
    by_group = None   # {group: threshold}: a run of several groups flags each image by its group's (any score)
    heatmap = heatmap or ("ensemble" if ensemble else "wdm")
    if flag_by not in SCORES + ("ensemble",) or heatmap not in SCORES + ("ensemble",):
        raise BadInputError(f"unknown --flag-by {flag_by!r} or --heatmap {heatmap!r}",
                            fix=f"--flag-by and --heatmap: one of {', '.join(SCORES)}, ensemble")
    # the error names only the options that need what is missing (the other may be a default)
    wants = {need: " and ".join(f"--{o} {v}" for o, v in (("flag-by", flag_by), ("heatmap", heatmap)) if v in vals)
             for need, vals in (("knn", ("knn", "combined")), ("ensemble", ("ensemble",)))}
    if knn is None and wants["knn"]:
        raise BadInputError(f"{wants['knn']} need{'' if ' and ' in wants['knn'] else 's'} a kNN index",
                            fix="pass --knn DIR (built by `uninet-feat index`)")
    if not ensemble and wants["ensemble"]:
        raise BadInputError(f"{wants['ensemble']}: an ensemble's scores and maps need more runs than --run",
                            fix="pass --ensemble RUN_B [RUN_C ...] (the same config trained with other seeds)")
    if flag_by == "wdm":
        # bad flags fail before any scoring; a run of several groups flags each image by its group's threshold
        # with --ensemble the run is a member too, whose warnings name it: the same text, said once
        threshold, rule, by_group = resolve_thresholds(run, threshold, max_fpr, group, name_run=bool(ensemble))
    elif flag_by == "ensemble":
        check_threshold_flags(threshold, max_fpr)
        if max_fpr is not None:
            raise BadInputError("--max-fpr does not apply to --flag-by ensemble: each run has its own validation "
                                "normals (the split follows the seed), so no normal set is unseen by all of them",
                                fix="drop --max-fpr (the default is the mean of the runs' thresholds), pass "
                                    "--threshold T in WDM score units (e.g. the mean of each run's `predict --max-fpr F` "
                                    "threshold, in its summary.json)")
    else:
        check_threshold_flags(threshold, max_fpr)
    members = ens.load_members([run, *ensemble], group=group, skip_bad=skip_bad) if ensemble else None
    if flag_by == "ensemble":   # per group: the mean of the runs' group thresholds when every run has them
        threshold, rule, by_group = ((float(threshold), "given (--threshold)", None) if threshold is not None
                                     else ens.default_thresholds(members, group))
    if heatmap == "ensemble" and overlays and any(m.rng is None for m in members):   # before anything is written
        bad = next(m.run for m in members if m.rng is None)
        raise BadInputError("--heatmap ensemble needs each run's validation-normal map range", path=bad,
                            fix=f"run `uninet-feat calibrate --run {bad}`, or --heatmap wdm")
    names = [Path(os.path.abspath(hd)).name for hd in heads]   # `--head .`: the folder's own name
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:   # a head's columns are named by its folder: one would overwrite the other's
        raise BadInputError(f"two --head folders are named {twice!r}, and a head's columns ({twice}_prediction, "
                            f"{twice}_confidence) are named by its folder", fix="rename one of the folders")
    if heads:   # LightGBM and scikit-learn are imported only for a head
        from .downstream import Head
    loaded = {hd: Head.load(hd) for hd in heads}
    for hd, head in loaded.items():
        if not text and any("clip_" in n for n in head.feature_names):
            raise BadInputError("this head was trained on text-similarity columns (clip_*)", path=hd,
                                fix="pass --text (with the same prompt file as at extraction)")
    ex = Extractor(run=run, text=text, skip_bad=skip_bad)
    if group is not None:   # a run of one group refuses another, as Detector and evaluate do (a copy: only the check)
        ready_to_score(ex.model, {**ex.cfg, "channels_last": False}, group, skip_bad, threads=False)
    scorer, kex = knn_setup(knn, ex, skip_bad) if knn is not None else (None, None)
    head_cols = {}   # each head's columns among this version's
    for hd, head in loaded.items():
        check_built_from(head.source, Path(hd) / "head.json", ex, "head")
        was, now = (head.source or {}).get("text"), ex.source.get("text") or {}
        if any("clip_" in n for n in head.feature_names) and was is not None:
            if {k: was.get(k) for k in ("normal", "defect")} != {k: now.get(k) for k in ("normal", "defect")}:
                raise BadInputError("this head was trained on text columns of other prompts than --text gives now",
                                    path=Path(hd) / "head.json",
                                    fix="pass --text with the prompt file used at extraction (head.json's source.text "
                                        "lists its sentences)")
            if was.get("weights_sha256") and was["weights_sha256"] != now.get("weights_sha256"):   # older: no hash
                raise BadInputError(f"this head's text columns came from a CLIP file with sha256 "
                                    f"{str(was['weights_sha256'])[:12]}; the run's weights file now has "
                                    f"{str(now.get('weights_sha256'))[:12]} (replaced or edited), so its text tower "
                                    "gives other columns", path=Path(hd) / "head.json",
                                    fix="restore the CLIP file the features were extracted with, or extract again "
                                        "and retrain the head")
        head_cols[hd] = _head_columns(head, head_columns(ex.vector_names), hd, ex.run_dir, ex.cfg)
    if split_csv:
        samples = samples_of(data, split_csv, mask_pattern=ex.cfg.get("mask_pattern"))
    else:   # a new batch: any image under data (or data itself), unlabelled unless its layout has labels
        from .data.layouts import batch_groups, discover_batch
        from .calibration import run_group_names
        samples = discover_batch(data, ex.cfg.get("mask_pattern"))
        if group is None:   # DIR/<group>/... for a run of several groups: each image its folder's group
            samples = batch_groups(samples, data, run_group_names(ex.run_dir, ex.model.cfg))
    from dataclasses import replace
    from .data.layouts import without_predict_outputs   # this --out's and earlier predicts' overlays and maps
    samples = without_predict_outputs(samples, data, out)   # are not a new batch (warned); other images are
    if not samples:
        raise BadInputError("every image under --data is a predict output (overlays/, maps/)", path=data,
                            fix="give --data the folder of the batch's own images")
    _refuse_out_in_a_data_set(out, data, split_csv, samples, ex.cfg, ex.run_dir)   # before anything is scored
    _warn_other_colour_kind(ex.run_dir, samples)
    # absolute paths (the CSV and JSON rows are read from other folders); no mask: a bad one is not a bad image
    samples = [replace(s, path=Path(os.path.abspath(s.path)), mask=None, group=s.group if group is None else group)
               for s in samples]
    # the scoring pass's WDM maps of the images whose maps are written (--save-maps: all; overlays: those flagged by
    # WDM above a threshold known now), so that they are not decoded and run through the model a second time
    wdm_overlays = (overlays and flag_by == "wdm" and threshold is not None and heatmap in ("wdm", "combined")
                    and (heatmap == "combined" or calibrated_range(ex.run_dir, pixel_map_kind(ex.model.cfg))))
    # (without the run's map range the overlays share one scale over a second pass: nothing to hold for them)
    lowest = min([threshold, *(by_group or {}).values()]) if threshold is not None else None   # any group's
    held = (_HeldMaps(samples, lambda score: save_maps or (wdm_overlays and score > lowest))
            if (save_maps or wdm_overlays) and not ex.cfg.get("tile") else None)
    # with the run's own patches for the kNN, they are scored batch by batch and only their scores kept; the pass
    # is saved part by part under OUT/.partial, so a killed predict run again redoes at most one part
    partial = Path(os.path.abspath(out)) / SCRATCH
    knn_key = _knn_key(knn) if knn is not None else None
    res = ex.extract(samples, patch_fn=scorer.score_patches if scorer is not None and kex is None else None,
                     map_fn=held, parts=partial / "run", key=knn_key if kex is None else None)
    resumed = res["resumed"]
    keys = [str(samples[i].path) for i in res["index"]]
    X, order = aggregate_tiles(res["vectors"], res["scores"], keys)
    reduce = tile_score_reducer(ex.cfg.get("tile_score", "max"))   # as calibration scored the threshold's normals
    first = {path: samples[int(res["index"][idx[0]])] for path, idx in order}
    # split and group as the data's layout gives them (a category folder: its train and test normals told apart)
    rows = [{"path": path, "label": first[path].label, "split": first[path].split, "group": first[path].group,
             "wdm_score": float(reduce(res["scores"][idx]))} for path, idx in order]
    for row, x, (_, idx) in zip(rows, X, order):   # X: [top tile's vector, mean]; the names read the top tile
        # the model's square input squashed the image (untiled) or the top tile's image part (a tile past the
        # image's edge is measured on that part, `Extractor._unpadded_shapes`): its spot's shape is stretched back
        hw = _top_tile_part(res, idx, row["path"]) if ex.cfg.get("tile") else read_size(row["path"])
        row.update(spot_summary(x, ex.vector_names, hw))
        row.update({n: float(v) for n, v in zip(ex.vector_names, x) if n.startswith("clip_")})   # --text
    summary_extra, ref = {}, None
    if members is not None:
        summary_extra = _add_ensemble_scores(rows, members, samples, quiet, group)
    if scorer is not None:
        per_image, patch_scores, kres = knn_scores(scorer, kex or ex, samples, res if kex is None else None,
                                                   parts=partial / "knn", key=knn_key)
        resumed += kres["resumed"] if kex is not None else 0
        knn_of = dict(zip((str(x.path) for x in samples), per_image))
        for row in rows:
            row["knn_score"] = float(knn_of[row["path"]])
        summary_extra |= {"knn_index": str(knn),
                          "knn_features": "this run" if ex.patches is True else "plain backbone"}
        ref = reference(run, ex.cfg, scorer, kex or ex, ex, paired=flag_by == "combined")
        if ref is not None:
            for r, c in zip(rows, ref.combine([r["knn_score"] for r in rows], [r["wdm_score"] for r in rows])):
                r["combined_score"] = float(c)
            summary_extra["combined_rule"] = (f"z-score of the kNN and of the WDM score on the run's {ref.n} "
                                              f"validation normals, summed")
    if flag_by in ("knn", "combined"):
        threshold, rule, by_group = flag_threshold(flag_by, ref, threshold, max_fpr, group)
    wdm_range = calibrated_range(ex.run_dir, pixel_map_kind(ex.model.cfg)) if heatmap == "combined" else None
    if heatmap == "combined" and overlays and (ref is None or wdm_range is None):   # before anything is written
        raise BadInputError("--heatmap combined needs the run's validation normals: "
                            + ("see the warning" if ref is None else "calibration.json has no WDM map range"),
                            fix=f"fix what it names (`uninet-feat calibrate --run {run}`), or --heatmap wdm / knn")
    pooled_for_unknown_groups([r["group"] for r in rows], by_group)   # a plain folder's images have no group
    for r in rows:
        t = by_group.get(r["group"], threshold) if by_group else threshold   # the image's group's, if known
        r["flagged"] = None if t is None else bool(r[f"{flag_by}_score"] > t)   # None: no rule
    for hd, head in loaded.items():
        Xh = X[:, head_cols[hd]]
        proba, pred = head.predict_proba(Xh), head.predict(Xh)
        name = Path(os.path.abspath(hd)).name
        types_only = bool((head.source or {}).get("defects_only"))   # a defect-type head (--defects-only)
        for row, p, c in zip(rows, proba, pred):
            unflagged = types_only and row["flagged"] is False   # a normal image has no defect type
            row[f"{name}_prediction"] = "" if unflagged else str(c)
            # the predicted class's probability: a binary head predicts by its own threshold, not p.max()'s 0.5
            row[f"{name}_confidence"] = None if unflagged else float(p[head.classes.index(str(c))])
    out = Path(os.path.abspath(out))   # the rows name overlays and maps by absolute path, readable from anywhere
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:   # the same columns whether or not anything is flagged
        r["overlay"] = ""
    # one name per image for its overlay and its map and mask, chosen among all the batch's images (before a
    # re-run's results are removed: a failure here leaves them)
    names = {p: n.removesuffix("_overlay.png")
             for p, n in _overlay_names([s.path for s in samples], Path(data)).items()}
    earlier = _earlier_outputs(out, names)   # read before the predictions.csv that names them is removed
    for old in ("summary.json", "predictions.csv", "predictions.json"):   # a re-run's: gone before the files they
        (out / old).unlink(missing_ok=True)   # name are, so a stop part-way leaves none describing other files
    for old in earlier:   # a re-run's overlays and maps: only this run's flagged images have one
        old.unlink(missing_ok=True)
    if save_maps:
        summary_extra |= _write_maps(ex, samples, rows, out / "maps", names, pixel_threshold, held)
    atomic_write_csv(out / "predictions.csv", rows)
    atomic_write_text(out / "predictions.json", json.dumps(rows, indent=1))
    summary = {"n_images": len(rows), "flag_by": flag_by,
               "n_flagged": None if threshold is None else sum(r["flagged"] for r in rows),
               "threshold": threshold, "threshold_rule": rule, "heatmap": heatmap,
               **({"group_thresholds": by_group, "group_thresholds_score": flag_by} if by_group else {}),
               "wdm_pixel_map": pixel_map_kind(ex.model.cfg), "wdm_image_score": image_score_kind(ex.model.cfg),
               "skipped": res["skipped"],
               **({"tile_norm": applied_tile_norm(ex.model)} if ex.cfg.get("tile") else {}),
               **({"resumed_items": resumed} if resumed else {}), **summary_extra}
    if overlays and any(r["flagged"] for r in rows):
        if heatmap == "knn":
            _write_knn_overlays(samples, rows, patch_scores, kres, ref, out / "overlays", names)
        elif heatmap == "ensemble":
            _write_ensemble_overlays(members, samples, rows, out / "overlays", names)
        elif heatmap == "combined":
            summary["heatmap_range"] = _write_combined_overlays(ex, samples, rows, patch_scores, kres, ref, wdm_range,
                                                                out / "overlays", names, held=held)
        else:   # outlined: the defect mask's edge (--save-maps' pixel threshold)
            outline = pixel_threshold if pixel_threshold is not None else default_pixel_threshold(ex.run_dir, ex.model)
            _write_overlays(ex, samples, rows, out / "overlays", names, held=held, outline=outline)
        atomic_write_csv(out / "predictions.csv", rows)        # again, with each flagged row's overlay
        atomic_write_text(out / "predictions.json", json.dumps(rows, indent=1))
    # last: the mark of a finished predict (written before the overlays, it looked finished while they were drawn,
    # the rows naming none of them yet; an audit, session 53)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    shutil.rmtree(partial, ignore_errors=True)   # everything is written: nothing left to resume
    if resumed and not quiet:
        print(f"resumed: {resumed} item(s) scored by a killed predict into {out} were reused, not scored again")
    return {**summary, "rows": rows}


def _refuse_out_in_a_data_set(out, data, split_csv, samples, run_cfg: dict, run_dir) -> None:
    """Refuse an ``out`` that is, or lies inside, a data set read by its folder layout: ``data`` when it is a labelled
    layout (a normal folder: label folders or MVTec-style; ``samples`` are its images as predict found them), or the
    run's own training data (a run trained from a folder, not a split CSV). Why: predict writes images there,
    ``overlays/*_overlay.png`` and with --save-maps ``maps/*_mask.png``, and `train`, `evaluate`, `ensemble`,
    `calibrate` and `extract` read such a folder by its layout: `--out D/test/pred` made the overlays test images
    of a defect label ``pred``, scored silently by a later `evaluate`. Layouts now leave a predict output folder's
    images out (`layouts.without_predict_outputs`, warned), but a data set is still no place for outputs (other
    tools read it, and a folder without predictions.csv, e.g. a killed first run's, is not known as one). A
    folder of unlabelled images (a new batch) may still hold ``out``: predict and `extract --batch` leave out its
    outputs there (session 34), and nothing reads such a folder by labels. ``data`` inside ``out`` is refused only
    when ``out`` is itself a labelled data set (`--data D/hole --out D` put overlays/ beside D's labels)."""
    here = Path(os.path.realpath(out))
    sets = []
    if not split_csv and Path(data).is_dir() and any(s.label for s in samples):
        sets.append((data, "--data is a labelled data set (a normal folder beside its labels)"))
    trained_on = run_cfg.get("data")   # absolute in a new run; an older run's as typed, relative to a folder
    if trained_on and not run_cfg.get("split_csv") and os.path.isabs(trained_on):   # now unknown: not compared
        sets.append((trained_on, f"{run_dir} was trained on it"))
    if here in Path(os.path.realpath(data)).parents and _labelled_layout(here):   # only then: a walk of --out
        sets.append((here, "a labelled data set that holds --data"))
    for folder, why in sets:
        root = Path(os.path.realpath(folder))
        if here == root or root in here.parents:
            place = "is" if here == root else "lies inside"
            raise BadInputError(f"--out {place} the data set {root} ({why}): predict's overlays and masks written "
                                "there would be read as images of that data set by `train`, `evaluate` and "
                                "`calibrate`", path=out,
                                fix=f"give --out a folder outside it, e.g. --out {root.parent / (root.name + '_predict')}")


def _labelled_layout(folder: Path) -> bool:
    """Whether ``folder`` is a labelled layout as predict reads one (`layouts.discover_batch`: a normal folder, label
    folders or MVTec-style), from its file names alone; a folder it cannot read as one is not."""
    from .data.layouts import discover_batch
    try:
        with warnings.catch_warnings():   # its notes (unused images, PNGs beside images) are not this check's
            warnings.simplefilter("ignore")
            return any(s.label for s in discover_batch(folder))
    except BadInputError:
        return False


def _knn_key(knn) -> dict:
    """What a kNN pass's saved parts depend on beyond the images and the extractor: the index, by its knn.json
    (which pins index.faiss by sha256) and the index file's size and times."""
    from .featstore import file_sha256, file_stamp
    d = Path(knn)
    st = (d / "index.faiss").stat() if (d / "index.faiss").is_file() else None
    return {"knn_json": file_sha256(d / "knn.json"), "index": file_stamp(st) if st else None}


def trained_colour_kind(run_dir: Path, n_ref: int = 20, n_look: int = 4) -> str | None:
    """"grey" or "colour": the one kind of image the run was trained on; None when it had both or nobody can tell.
    From calibration.json's ``image_kinds`` (every training normal's header, counted since session 27), else from
    the headers of up to ``n_ref`` of its validation normals (older runs). Colour files holding grey pictures count
    as grey: from ``colour_files_looked`` (since session 28), else from up to ``n_look`` of the validation
    normals' colour files, decoded (a grey line saved as RGB is a grey run; a run whose colour files held both is
    one of both kinds)."""
    from .data.images import colour_kind, grey_content
    try:
        cal = json.loads((Path(run_dir) / "calibration.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cal.get("image_kinds"):
        ref = {k for k, n in cal["image_kinds"].items() if n}
    else:
        ref = {colour_kind(p) for p in cal.get("val_paths", [])[:n_ref]} - {None}
    if "colour" in ref:
        looked = cal.get("colour_files_looked")
        if looked is None:   # older runs: a few of the validation normals' colour files
            colour = [p for p in cal.get("val_paths", [])[:n_ref] if colour_kind(p) == "colour"][:n_look]
            looks = [g for g in map(grey_content, colour) if g is not None]
            looked = {"looked": len(looks), "grey": sum(looks)}
        if looked["grey"]:
            ref.add("grey")
            if looked["grey"] == looked["looked"]:   # every colour file looked into held a grey picture
                ref.discard("colour")
    return ref.pop() if len(ref) == 1 else None   # none readable (moved), or a run trained on both kinds


def _warn_other_colour_kind(run_dir: Path, samples, n_look: int = KIND_LOOK_FILES, trained: str | None = None,
                            names: dict | None = None) -> bool:
    """Warn when the batch holds colour images and the run was trained on grey ones, or the other way round:
    the model never saw such inputs, and its scores carry no meaning there (they were given silently). The run's
    kind: `trained_colour_kind` (or ``trained``). Colour files are looked into (``n_look`` of them, spread over the
    batch): for a grey-trained run, grey pictures saved as RGB or RGBA are not named (such a tile scored exactly as
    its grey original, and was named); for a colour-trained run, they are (a colour camera switched to grey output
    was scored silently, session 28). Returns whether it warned of images of the other kind. ``names``: {path:
    name to show} (a `Detector`'s in-memory frames are ``<image k>``, not their temporary files)."""
    from .data.images import colour_kind, grey_content
    trained = trained or trained_colour_kind(run_dir)
    if trained is None:
        return False
    kinds = {str(s.path): colour_kind(s.path) for s in samples}
    other = [p for p, k in kinds.items() if k not in (None, trained)]

    def show(paths):   # the first three, by the names the caller knows them by
        return ", ".join((names or {}).get(p, p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    if trained == "colour":   # a grey picture in a colour file is still grey
        said = bool(other)
        if other:
            warnings.warn(f"{len(other)} of {len(samples)} images are grey ({show(other)}); the run was trained on "
                          "colour images, so its scores there carry no meaning. Fix: train a run on grey images of "
                          "this line", stacklevel=2)
        colour = [p for p, k in kinds.items() if k == "colour"]
        looked = {p: grey_content(p) for p in colour[::-(-len(colour) // n_look)]} if colour else {}
        grey = [p for p, g in looked.items() if g]
        if grey:
            rest = len(colour) - len(looked)
            more = f"; {rest} more colour file(s) were not looked into" if rest else ""
            warnings.warn(f"{len(grey)} of the {len(looked)} colour files looked into (of {len(samples)} images) hold "
                          f"grey pictures, every pixel's R = G = B ({show(grey)}){more}: a camera set to grey "
                          "output? The run was trained on colour images, so its scores there carry no meaning. Fix: "
                          "set the camera back to colour; if the line is grey now, train a run on its grey images",
                          stacklevel=2)
        return said or bool(grey)
    unlooked = []
    if other:   # colour files of a grey-trained run: grey pictures in them are what the run was trained on
        looked = {p: grey_content(p) for p in other[::-(-len(other) // n_look)]}   # spread over the batch
        unlooked = [p for p in other if p not in looked]
        other = [p for p, grey in looked.items() if not grey]
        if not other:
            if unlooked:
                warnings.warn(f"{len(unlooked)} colour file(s) of {len(samples)} were not looked into; the "
                              f"{len(looked)} looked into hold grey pictures, as the run was trained on. Fix: none "
                              "if they all do; else score colour ones with a run trained on colour images",
                              stacklevel=2)
            return False
    if other:
        more = f"; {len(unlooked)} more colour file(s) were not looked into" if unlooked else ""
        warnings.warn(f"{len(other)} of {len(samples)} images are colour ({show(other)}){more}; the run was trained "
                      "on grey images, so its scores there carry no meaning. Fix: train a run on colour images of "
                      "this line", stacklevel=2)
    return bool(other)


def _add_ensemble_scores(rows, members, samples, quiet: bool, group=None) -> dict:
    """Each row's ``ensemble_score`` (the mean of the runs' WDM scores) and the runs' own ``ensemble_score_K``;
    the first run's scores are the rows' ``wdm_score`` (the same model's), the others are scored here. Returns
    the summary's ensemble entries (each run's threshold: its ``group``'s when the ensemble flags by that)."""
    per = [{r["path"]: r["wdm_score"] for r in rows}]
    per += [m.scores(_by_path(samples, rows), quiet) for m in members[1:]]
    for r in rows:
        vals = [d[r["path"]] for d in per]
        r["ensemble_score"] = float(np.mean(vals))
        r.update({f"ensemble_score_{k}": float(v) for k, v in enumerate(vals)})
    from .ensemble import RULE, member_thresholds
    return {"ensemble_runs": [m.run for m in members], "ensemble_rule": RULE,
            "ensemble_run_thresholds": list(member_thresholds(members, group).values())}


def _write_ensemble_overlays(members, samples, rows, folder: Path, names: dict) -> None:
    """Overlays of flagged images' ensemble maps (`ensemble.mean_maps`: the mean of the runs' maps in their
    validation-normal range units), coloured 0..1, the range every run's own overlays are coloured on; ``names``:
    each image's output name (`_overlay_names`' stem)."""
    from .ensemble import mean_maps
    from .overlay import heatmap_overlay
    by_path = {r["path"]: r for r in rows}
    flagged = [s for s, r in zip(_by_path(samples, rows), rows) if r["flagged"]]

    def write(s, m):
        by_path[str(s.path)]["overlay"] = str(folder / f"{names[str(s.path)]}_overlay.png")
        heatmap_overlay(s.path, m, folder / f"{names[str(s.path)]}_overlay.png", vmin=0.0, vmax=1.0, mask=None)
    mean_maps(members, flagged, write)


HELD_MAP_BYTES = 256 << 20   # at most this much of the scoring pass's maps is kept for the outputs drawn from them


class _HeldMaps:
    """`Extractor.extract`'s ``map_fn``: keeps the scoring pass's WDM pixel map (float32, the model input's size) of
    each image whose score ``want``s it, up to ``max_bytes`` in all. The overlays and ``--save-maps`` draw those
    maps instead of decoding the image and running the model on it again (a second pass over every written map:
    about a third of a 200-image predict's time with overlays, half of it with --save-maps); an image whose map
    was not kept (past the budget, a tiled run, a flag other than WDM's) is scored again, as before."""

    def __init__(self, samples, want, max_bytes: int | None = None):
        self.paths, self.want = [str(s.path) for s in samples], want
        self.max_bytes = HELD_MAP_BYTES if max_bytes is None else max_bytes
        self.maps, self.nbytes = {}, 0

    def __call__(self, i: int, m: np.ndarray, score: float) -> None:
        if self.want(score) and self.nbytes + m.nbytes <= self.max_bytes:
            self.maps[self.paths[i]], self.nbytes = m, self.nbytes + m.nbytes

    def get(self, path):
        return self.maps.get(str(path))


def _maps_of(ex, samples, held, use) -> None:
    """Calls ``use(sample, map)`` for each of ``samples``: with the map ``held`` kept (`_HeldMaps`), else with the
    one a second scoring pass makes (only over those), each as it is finished."""
    from .evaluate import score_samples
    rest = []
    for s in samples:
        m = held.get(s.path) if held is not None else None
        if m is None:
            rest.append(s)
        else:
            use(s, m)
    if rest:
        score_samples(ex.model, rest, ex.cfg, on_map=lambda s, m, _: use(s, m))


def default_pixel_threshold(run_dir, model) -> float | None:
    """The pixel threshold of defect masks when none is given: the top of the validation normals' map range
    (`PIXEL_RULE`) of the run's kind of pixel map; None when the run has none."""
    from .overlay import calibrated_range
    from .scoring import pixel_map_kind
    rng = calibrated_range(run_dir, pixel_map_kind(model.cfg))
    return None if rng is None else rng[1]


def map_at_image_size(path, m) -> np.ndarray:
    """A float32 pixel map at the size of the image file ``path`` (bilinear), as maps and masks are given out."""
    from PIL import Image

    from .data.images import read_size
    from .overlay import _resize_float
    return _resize_float(np.asarray(m, np.float32), read_size(path), Image.Resampling.BILINEAR)


def _write_overlays(ex, samples, rows, folder: Path, names: dict, transform=None, fixed=None, held=None,
                    outline=None) -> None:
    """Heatmap overlays for flagged images, colours fixed to the validation normals' pixel range.

    Each overlay is written as its map is finished (none are held); a run without that range (no validation
    normals) colours each from its own map's median to its maximum, as `Detector.overlay` does. ``names``:
    each image's output name (`_overlay_names`' stem, the same as its map's) keeping its folders
    (``spot__000_overlay.png``), so MVTec-style sets whose files are named 000.png in every folder do not
    overwrite each other; the row gets ``overlay``.
    ``transform(sample, map)``: the map drawn instead of WDM's, on the colour scale ``fixed`` (vmin, vmax).
    ``held``: the scoring pass's maps (`_HeldMaps`); only flagged images without one are scored again.
    ``outline``: a pixel threshold whose region (map above it: the defect mask) is outlined in light blue."""
    from .overlay import calibrated_range, display_range, heatmap_overlay
    by_path = {r["path"]: r for r in rows}
    flagged = [s for s, r in zip(_by_path(samples, rows), rows) if r["flagged"]]

    def write(s, m, vmin, vmax):
        out = folder / f"{names[str(s.path)]}_overlay.png"
        heatmap_overlay(s.path, transform(s, m) if transform else m, out, vmin=vmin, vmax=vmax, mask=None,
                        threshold=outline)
        by_path[str(s.path)]["overlay"] = str(out)

    from .scoring import pixel_map_kind
    pm = pixel_map_kind(ex.model.cfg)
    fixed = fixed or calibrated_range(ex.run_dir, pm)
    if fixed is not None:
        _maps_of(ex, flagged, held, lambda s, m: write(s, m, *fixed))
        return
    # no normal scale: each overlay on its own map's (as `Detector.overlay` draws it), said once
    warnings.warn(f"{ex.run_dir}: the run has no validation-normal map range, so each overlay is coloured from its "
                  "own map's median to its maximum: hot regions show within an image, not how hot against normal "
                  f"images. Fix: `uninet-feat calibrate --run {ex.run_dir} --normals DIR` with normal images")
    _maps_of(ex, flagged, held,   # the scale of the map at the image's size, as Detector's map is: the same pixels
             lambda s, m: write(s, m, *display_range(ex.run_dir, [map_at_image_size(s.path, m)], pm)))


PIXEL_RULE = "0.999 quantile of the validation normals' pixel-map values (about 1 normal pixel in 1,000 above it)"


def _top_tile_part(res: dict, idx, path) -> tuple[int, int] | None:
    """(height, width) in image pixels of the image's part of its top tile (`featstore.aggregate_tiles`' pick: the
    highest-scoring one), whose hot-spot shape the vector holds; None without scores. Why: a tiled run's angle and
    elongation were read as if every tile were square and whole, 58 degrees for a 45-degree streak in a 40 x 64
    image scored in 64-pixel tiles."""
    from .data.images import read_size
    s = res["scores"][idx]
    if not np.isfinite(s).any():
        return None
    y, x, th, tw = (int(v) for v in res["tile"][idx[int(np.nanargmax(s))]])
    h, w = read_size(path)
    return min(th, h - y), min(tw, w - x)


def _earlier_outputs(out: Path, names: dict) -> list[Path]:
    """The overlays, maps and masks that an earlier predict into ``out`` wrote (its predictions.csv names them), and
    those under the names this run writes (``names``; also a killed run's, whose csv was already gone): removed
    before this run writes its own. Why: every ``*_overlay.png``, ``*.npy`` and ``*_mask.png`` in OUT/overlays and
    OUT/maps was removed, a user's own masks and arrays there too. Only files in those two folders are taken."""
    import csv
    files = set()
    try:
        with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                files |= {Path(row[c]) for c in ("overlay", "map", "defect_mask") if row.get(c)}
    except (OSError, UnicodeDecodeError, csv.Error):   # none, or not readable: the names below only
        pass
    for n in names.values():
        files |= {out / "overlays" / f"{n}_overlay.png", out / "maps" / f"{n}.npy", out / "maps" / f"{n}_mask.png"}
    return sorted(p for p in files if p.parent in (out / "overlays", out / "maps") and p.is_file())


def _write_maps(ex, samples, rows, folder: Path, names: dict, pixel_threshold=None, held=None) -> dict:
    """Every image's WDM pixel map (the run's chosen map, as the overlays show it) at the image's own size, tiles
    stitched, as float16 ``NAME.npy``; and ``NAME_mask.png`` (255 = defect) where it is above the pixel
    threshold. Why: a line's software wants the map's values and a defect region, not only a picture of
    flagged images. ``names``: each image's name, its overlay's stem. The threshold is ``pixel_threshold``, else
    the top of the validation normals' map range (`overlay.calibrated_range`, computed on normals only); without
    either no masks are written (warned).
    Maps are written as they are finished (none are held), or from the scoring pass's maps that ``held``
    (`_HeldMaps`) kept, within its memory budget. Each row gets ``map``, ``defect_mask`` and
    ``defect_fraction`` (its share of pixels above the threshold); returns the summary's entries."""
    from PIL import Image
    from .io import atomic_write
    from .scoring import pixel_map_kind
    if pixel_threshold is not None:
        rule = "given (--pixel-threshold)"
    else:
        pixel_threshold = default_pixel_threshold(ex.run_dir, ex.model)
        rule = PIXEL_RULE if pixel_threshold is not None else None
        if pixel_threshold is None:
            warnings.warn(f"{ex.run_dir}: no validation-normal map range, so no defect masks are written (maps "
                          f"are). Fix: pass --pixel-threshold VALUE, or `uninet-feat calibrate --run {ex.run_dir}`")
    by_path = {r["path"]: r for r in rows}
    folder.mkdir(parents=True, exist_ok=True)

    def write(s, m):
        row, name = by_path[str(s.path)], names[str(s.path)]
        # the mask is the float32 map above the threshold, as Detector.mask and the overlay's outline; saved float16
        m = map_at_image_size(s.path, m)
        def save(tmp):
            with open(tmp, "wb") as f:   # a file object: numpy would add ".npy" to a bare name
                np.save(f, m.astype(np.float16))
        atomic_write(folder / f"{name}.npy", save)
        row["map"], row["defect_mask"], row["defect_fraction"] = str(folder / f"{name}.npy"), "", None
        if pixel_threshold is not None:
            hot = m > np.float32(pixel_threshold)
            buf = io.BytesIO()
            Image.fromarray(hot.astype(np.uint8) * 255).save(buf, format="PNG")
            atomic_write_bytes(folder / f"{name}_mask.png", buf.getvalue())
            row["defect_mask"], row["defect_fraction"] = str(folder / f"{name}_mask.png"), float(hot.mean())

    _maps_of(ex, _by_path(samples, rows), held, write)
    return {"maps": str(folder), "pixel_threshold": pixel_threshold, "pixel_threshold_rule": rule,
            "map_units": f"WDM pixel map ({pixel_map_kind(ex.model.cfg)}), float16, the image's size"}


def _write_knn_overlays(samples, rows, patch_scores, kres, ref, folder: Path, names: dict) -> None:
    """Overlays of flagged images' kNN maps (`scorers.knn_map`, native size, tiles stitched), coloured on the
    validation normals' patch-score range (median .. 0.999 quantile), else 0 .. the largest flagged score."""
    from .data.images import read_size
    from .overlay import heatmap_overlay
    from .scorers import knn_map
    pos = {str(s.path): i for i, s in enumerate(samples)}
    flagged = [r for r in rows if r["flagged"]]
    lo, hi = ref.knn_range if ref is not None else (0.0, max(max(r["knn_score"] for r in flagged), 1e-6))
    for r in flagged:
        r["overlay"] = str(folder / f"{names[r['path']]}_overlay.png")
        heatmap_overlay(r["path"], knn_map(patch_scores, kres, pos[r["path"]], size=read_size(r["path"])),
                        r["overlay"], vmin=lo, vmax=hi)


def _write_combined_overlays(ex, samples, rows, patch_scores, kres, ref, wdm_range, folder: Path, names: dict,
                             held=None):
    """Overlays of flagged images' combined maps (WDM's map and the kNN map at its size, each in its
    validation-normal range units, summed), coloured on the combined map's own validation-normal range
    (`scorers.combined_range`), which is returned."""
    from .data.images import read_size
    from .scorers import combined_map, combined_range, knn_map
    lo, hi = combined_range(ex.model, ex.cfg, ref, wdm_range)
    pos = {str(s.path): i for i, s in enumerate(samples)}
    # the kNN map cut to the image's native size, then resized to the WDM map's (an untiled run's is the model's)
    _write_overlays(ex, samples, rows, folder, names, fixed=(lo, hi), held=held, transform=lambda s, m: combined_map(
        m, knn_map(patch_scores, kres, pos[str(s.path)], m.shape, size=read_size(s.path)), wdm_range, ref.knn_range))
    return [lo, hi]


NAME_BYTES = 200   # of an output name: the file system's 255 less the longest suffix added here and a temp file's


def _overlay_names(paths, root=None, suffix: str = "_overlay.png") -> dict:
    """Unique output file names: the path below ``root`` (else the parent folder and name) joined by '__', and
    ``suffix`` (``suffix`` "" gives the stem, for several files each). A name too long for the file system, or
    taken by another image, gets ``~`` and 8 hex digits of a hash of the image's path instead of its tail: the
    rule's own names never end so, and the rows' ``overlay`` / ``map`` columns name the file either way."""
    import hashlib
    names, used = {}, set()
    for p in map(Path, paths):
        try:
            parts = p.resolve().relative_to(Path(root).resolve()).with_suffix("").parts if root is not None else None
        except ValueError:
            parts = None
        stem = "__".join(parts or (p.parent.name, p.stem)).replace(" ", "_")
        name = f"{stem}{suffix}"
        raw = "utf-8", "surrogateescape"   # a file name's own bytes: not UTF-8 ones were a UnicodeEncodeError
        if name in used or len(name.encode(*raw)) > NAME_BYTES:
            tag = "~" + hashlib.sha1(str(p).encode(*raw)).hexdigest()[:8]
            room = NAME_BYTES - len((tag + suffix).encode())
            name = stem.encode(*raw)[:room].decode("utf-8", "ignore") + tag + suffix
        used.add(name)
        names[str(p)] = name
    return names


def _by_path(samples, rows):
    d = {str(s.path): s for s in samples}
    return [d[r["path"]] for r in rows]


def _head_columns(head, cols: list, where, run, cfg: dict) -> list:
    """The positions of a head's columns among this version's ``cols``, found by name: a head trained on an older
    feature schema (version 2: no `l*_spotdiff_*`) keeps working, since every column it knows is still made."""
    from .scorers import rebuild_fix
    names = head.feature_names
    unnamed = names == [f"f{i}" for i in range(len(names))]   # `train_head` without feature_names
    if unnamed and len(names) == len(cols):
        return list(range(len(cols)))
    if unnamed:   # no name to find: its refusal would name f0 as a column this version does not make
        raise BadInputError(f"this head was trained on unnamed columns of width {len(names)} (f0 ... "
                            f"f{len(names) - 1}), while this run makes {len(cols)} named columns: which of them the "
                            "head's are is not known", path=Path(where) / "head.json",
                            fix=f"train the head again on this run's features: {rebuild_fix(run, cfg, 'head', where)}")
    pos = {n: j for j, n in enumerate(cols)}
    missing = [n for n in names if n not in pos]
    if not missing:
        return [pos[n] for n in names]
    raise BadInputError(f"this head was trained on {len(names)} feature columns, {len(missing)} of which this version "
                        f"does not make from this run (e.g. {missing[0]}: features of another layout or backbone)",
                        path=Path(where) / "head.json",
                        fix=f"re-extract and retrain: {rebuild_fix(run, cfg, 'head', where)}")
