"""The kNN and combined scorers beside a run's WDM, as `predict` and `evaluate --knn` use them.

A kNN index (`uninet-feat index`) holds normal patches: of the run's adapted target teacher, or of a plain
backbone (the PatchCore-style baseline). ``knn_setup`` pairs it with the run so that query patches come
from the same feature space. Everything that turns its distances into decisions is fitted on the run's
validation normals, never on test labels (`Reference`): the combined score standardises the kNN and WDM
scores on them, the kNN and combined thresholds are quantiles of their scores, and the kNN heatmap's
colour scale is their patch scores' median and 0.999 quantile, as the WDM overlays' scale is.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

SCORES = ("wdm", "knn", "combined")


def abs_path(path) -> str:
    """One spelling per file (a run may have saved a relative --data, a store an absolute one)."""
    return str(Path(path).absolute().resolve())


def paths_sha(paths) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def knn_setup(knn, ex, skip_bad: bool = False):
    """(scorer, kex) for the kNN index folder ``knn`` beside the run extractor ``ex``: an index over the run's
    adapted patches (checked to be this run's) sets ``ex.patches``; one over plain backbone patches uses the
    run's source teacher when it is that backbone, else ``kex``, an extractor of that backbone's patches."""
    from .downstream import KNNScorer
    from .downstream.index import faiss_gpus
    # the index goes where the run's model is (a --device cpu run keeps it off the GPUs, cuda:1 on that one), or on
    # the CPU where faiss sees no GPU (faiss-cpu, the default install, beside a CUDA torch), as `index --device auto`
    device = str(ex.device) if faiss_gpus("auto") is not None else "cpu"
    scorer, kex = KNNScorer.load(knn, device=device), None
    if _is_plain(scorer.source) and _same_plain_backbone(scorer.source, ex):
        ex.patches = "source"   # the run's frozen source teacher is that backbone: its patches, same pass
    elif _is_plain(scorer.source):
        kex = _plain_knn_extractor(scorer.source, Path(knn) / "knn.json", skip_bad)
    else:
        ex.patches = True
        check_built_from(scorer.source, Path(knn) / "knn.json", ex, "index")
    return scorer, kex


def test_images_in_bank(source, samples) -> list[str] | None:
    """Those of ``samples`` (test images) whose patches are in the index's bank: scored against themselves, about
    0, they flatter every kNN and combined figure. By path, from knn.json's ``bank_images`` (`index` records it);
    None for an index that does not record it (built before it did), which cannot tell."""
    bank = (source or {}).get("bank_images")
    if bank is None:
        return None
    bank = set(bank)
    return [str(s.path) for s in samples if abs_path(s.path) in bank]


def _is_plain(source) -> bool:
    """An index over plain backbone patches (extract without --run: the PatchCore-style baseline)."""
    return isinstance(source, dict) and source.get("run") is None and "backbone" in source


def _same_plain_backbone(source, ex) -> bool:
    """Whether the run's source teacher is the index's backbone (same configuration and named weights — a
    random init is never the same twice) at the same input size and tiling, and sees the image as it does: a run's
    ``border_pad`` feeds it the mirrored input, whose border patches are not the plain backbone's."""
    settings, cfg = source.get("settings") or {}, ex.cfg
    return (source["backbone"] == ex.backbone.config() and not getattr(ex.model, "border_pad", 0)
            and str(source.get("weights")) == str(cfg.get("weights")) and str(cfg.get("weights")) != "random"
            and settings.get("image_size") == cfg.get("image_size")
            and (settings.get("tile") or None) == (cfg.get("tile") or None))


def _plain_knn_extractor(source, meta_path: Path, skip_bad: bool):
    """The extractor that makes query patches matching an index over plain backbone patches."""
    from .extract import Extractor
    settings = source.get("settings")
    if not settings:
        raise BadInputError("this plain-feature index records no image size / tiling", path=meta_path,
                            fix="rebuild it with `uninet-feat index` from its feature store")
    ex = Extractor(backbone=source["backbone"]["name"], weights=source.get("weights", "imagenet"),
                   image_size=settings["image_size"], tile=settings.get("tile") or 0, patches=True,
                   skip_bad=skip_bad, **_given_normalisation(source["backbone"]))
    if source.get("weights_sha256") and source["weights_sha256"] != ex.source.get("weights_sha256"):
        raise BadInputError(f"the index's backbone weights file {source.get('weights')} had sha256 "
                            f"{str(source['weights_sha256'])[:12]}; the file there now has "
                            f"{str(ex.source.get('weights_sha256'))[:12]} (replaced or edited): its query patches "
                            "would not match the indexed ones", path=meta_path,
                            fix="put the weights file the features were extracted with back, or extract the "
                                "features and build the index again (uninet-feat extract, index)")
    from .config import _plain
    from .runs import _FROM_FILE_NAME
    was, now = source["backbone"], ex.backbone.config()
    differ = [k for k in _FROM_FILE_NAME if k in was and k in now and _plain(was[k]) != _plain(now[k])]
    if differ:   # e.g. a clip: file whose name now gives it QuickGELU: its query patches are not the index's
        raise BadInputError(f"the index's backbone was built with {', '.join(f'{k}={was[k]!r}' for k in differ)}, "
                            f"rebuilt now with {', '.join(f'{k}={now[k]!r}' for k in differ)}: its query patches "
                            "would not match the indexed ones", path=meta_path,
                            fix="extract the features and build the index again (uninet-feat extract, index)")
    return ex


def _given_normalisation(record: dict) -> dict:
    """The mean/std a plain-feature index's backbone record holds: the features were extracted with them (a clip:
    file's read from its name, or `extract --mean/--std`, which a rebuild from the name alone lost, so such an index
    was refused at every predict; an audit, session 52)."""
    if record.get("mean") is None or record.get("std") is None:
        return {}
    return {"mean": tuple(record["mean"]), "std": tuple(record["std"])}


def _yaml_of(folder) -> dict:
    """A command folder's config.yaml as a dict, {} when it is missing or unreadable."""
    from .io import read_yaml
    try:
        got = read_yaml(Path(folder) / "config.yaml", "")
    except (BadInputError, OSError):
        return {}
    return got if isinstance(got, dict) else {}


def rebuild_fix(run, cfg: dict, what: str, folder) -> str:
    """The two commands that rebuild ``what`` ("index" or "head", in ``folder``) from features of ``run``, runnable
    as written: the fix texts named `extract` without its required --data and `index` / `train-head` without --out,
    and a defect-type head's rebuild as a binary one (an audit, session 53). The images are those the old features
    were extracted from (the store's config.yaml, which ``folder``'s names), else the run's own; a head keeps its
    --task, --defects-only and --label-from."""
    had = _yaml_of(folder)
    store = _yaml_of(had["features"]) if had.get("features") else {}
    src = store if store.get("data") else {"data": cfg.get("data"), "split_csv": cfg.get("split_csv")}
    data = f"--data {src['data']}" + (f" --split-csv {src['split_csv']}" if src.get("split_csv") else "") \
        + (f" --group {src['group']}" if src.get("group") else "") + (" --batch" if src.get("batch") else "")
    if what == "index":
        return (f"`uninet-feat extract --run {run} {data} --patches --out F` (a new F), then "
                f"`uninet-feat index --features F --run {run} --out {folder}`")
    opts = f" --task {had['task']}" if had.get("task") else ""
    opts += " --defects-only" if had.get("defects_only") else ""
    opts += f" --label-from {had['label_from']}" if had.get("label_from") not in (None, "label") else ""
    return (f"`uninet-feat extract --run {run} {data} --out F` (a new F), then "
            f"`uninet-feat train-head --features F{opts} --out {folder}`")


def check_built_from(source, meta_path: Path, ex, what: str) -> None:
    """Refuse a kNN index or head built from features of another model than the run predict scores with, or (a head,
    whose source records the store's `featstore.CALIBRATION_KEYS`) of another calibration of it: its scores would be
    silently wrong. Files saved before the source was recorded are only warned about."""
    model = ex.run_dir / "model.pt"
    if source is None:
        warnings.warn(f"{meta_path}: records no source model, so it cannot be checked against {model}; "
                      f"rebuild the {what} from features of this run to have it checked")
        return
    if source.get("model_sha256") != ex.source["model_sha256"]:
        built = (f"features of {source.get('run')}/model.pt (sha256 {str(source.get('model_sha256'))[:12]})"
                 if source.get("run") else "plain backbone features (no run)")
        raise BadInputError(f"this {what} was built from {built}, not from {model} "
                            f"(sha256 {ex.source['model_sha256'][:12]})", path=meta_path,
                            fix=f"rebuild the {what} from features of this run: "
                                f"{rebuild_fix(ex.run_dir, ex.cfg, what, meta_path.parent)}")
    settings, cfg = source.get("settings") or {}, ex.cfg
    made = {"image_size": settings.get("image_size"), "tile": settings.get("tile") or None}
    runs_own = {"image_size": cfg.get("image_size"), "tile": cfg.get("tile") or None}
    if settings and made != runs_own:   # the same model at another size: other patch grids, other statistics
        raise BadInputError(f"this {what} was built from this run's features at image_size {made['image_size']}, "
                            f"tile {made['tile']}; the run scores at image_size {runs_own['image_size']}, tile "
                            f"{runs_own['tile']}", path=meta_path,
                            fix=f"rebuild it, extracting with no --image-size / --tile: "
                                f"{rebuild_fix(ex.run_dir, ex.cfg, what, meta_path.parent)}")
    from .featstore import CALIBRATION_KEYS
    cal = {k: source[k] for k in CALIBRATION_KEYS if k in source}   # none: saved before heads recorded them
    if cal:   # a `calibrate` since: other offsets and map features (the hot-region columns) than it was trained on
        from .calibration import calibration_fingerprint
        now = calibration_fingerprint(ex.run_dir, ex.model)
        if any(now.get(k) != v for k, v in cal.items()):
            was = str(cal.get("calibration_sha256"))[:12]
            raise BadInputError(f"this {what} was trained on features of {model} made with another calibration of "
                                f"the run (calibration.json sha256 {was}, now "
                                f"{str(now.get('calibration_sha256'))[:12]}; e.g. a `uninet-feat calibrate` since): "
                                "their score and map columns are not the ones predict makes now", path=meta_path,
                                fix=f"train the {what} again on features extracted with this calibration: "
                                    f"{rebuild_fix(ex.run_dir, ex.cfg, what, meta_path.parent)}")


def knn_scores(scorer, kex, samples, res=None, parts=None, key=None):
    """(image scores, patch scores, extraction): each sample's kNN score in ``samples`` order — the highest
    patch score over its tiles, NaN for an image the extraction skipped — and the (n_items, h*w) patch scores
    of ``res`` (an extraction with patches or patch scores already made, the run's own pass) or of
    ``kex.extract(samples)``, scored batch by batch so that no image's patches are kept (``parts``, ``key``:
    a resumable pass, `Extractor.extract`)."""
    res = res if res is not None else kex.extract(samples, patch_fn=scorer.score_patches, parts=parts, key=key)
    patch_scores = (res["patch_scores"] if "patch_scores" in res
                    else scorer.score_patches(res["patches"].astype(np.float32)))
    return per_sample_max(patch_scores.max(1), res["index"], len(samples)), patch_scores, res


def per_sample_max(item_scores, index, n: int) -> np.ndarray:
    """Item (tile) scores → the highest per sample, NaN for a sample without items (skipped)."""
    out = np.full(n, np.nan)
    np.fmax.at(out, np.asarray(index), np.asarray(item_scores, dtype=np.float64))
    return out


def per_sample_wdm(item_scores, index, n: int, rule: str = "max") -> np.ndarray:
    """Item (tile) WDM scores → each sample's by the run's ``tile_score`` rule, with the function calibration,
    evaluate and predict use, NaN for a sample without items (skipped)."""
    if rule == "max":
        return per_sample_max(item_scores, index, n)
    from .data.tiling import tile_score_reducer
    reduce, index, scores = tile_score_reducer(rule), np.asarray(index), np.asarray(item_scores)
    out = np.full(n, np.nan)
    for i in np.unique(index):   # the items of a sample in extraction order, as predict's rows take them
        out[i] = float(reduce(scores[index == i]))
    return out


def knn_map(patch_scores, res, i: int, shape=None, size=None) -> np.ndarray | None:
    """Sample ``i``'s kNN heatmap at its native size: each of its items' (tiles') patch grid upsampled
    bilinearly to the tile's box and placed there (overlaps averaged) — PatchCore's map, stitched — and cut to
    the image: ``size``, its (H, W) (default ``shape``). Tiles run past the edge of an image that is not a whole
    number of them (mirrored padding), and that padding's scores are not the image's. ``shape``: the map resized
    to that size (the WDM map's, to combine with it). An untiled run's WDM map is at the model's size, not the
    image's: pass ``size`` then, or the map is cut to ``shape``'s top-left corner of the image instead of resized.
    None for a sample the extraction skipped (no items)."""
    from .downstream.knn import upsample_scores
    items = np.flatnonzero(np.asarray(res["index"]) == i)
    if not len(items):
        return None
    boxes = np.asarray(res["tile"])[items]
    h, w = int((boxes[:, 0] + boxes[:, 2]).max()), int((boxes[:, 1] + boxes[:, 3]).max())
    acc, cnt = np.zeros((h, w)), np.zeros((h, w))
    for j, (y, x, th, tw) in zip(items, boxes.tolist()):
        acc[y:y + th, x:x + tw] += upsample_scores(patch_scores[j][None], res["patch_grid"], (th, tw))[0]
        cnt[y:y + th, x:x + tw] += 1
    size = size if size is not None else shape
    out = acc / np.maximum(cnt, 1)
    if size is not None:
        out = out[:size[0], :size[1]]
    if shape is not None and out.shape != tuple(shape):   # the cut map as a grid, bilinear as the patches were
        out = upsample_scores(out.reshape(1, -1), out.shape, tuple(shape))[0]
    return out.astype(np.float32)


def range_units(m, rng) -> np.ndarray:
    """A map in units of its validation-normal range: (m - median) / (0.999 quantile - median), so that 0 is
    a typical normal pixel and 1 a rare one, whatever the scorer's own scale."""
    lo, hi = float(rng[0]), float(rng[1])
    return (np.asarray(m, dtype=np.float32) - lo) / max(hi - lo, 1e-12)


def combined_map(wdm_map, knn_map_, wdm_range, knn_range) -> np.ndarray:
    """The combined pixel map: WDM's and the kNN's maps, each in `range_units` of its own validation-normal
    pixels, summed — the pixel counterpart of the combined image score (fitted on normals only)."""
    return range_units(wdm_map, wdm_range) + range_units(knn_map_, knn_range)


def combined_range(model, cfg: dict, ref: "Reference", wdm_range, max_pixels: int = 65536) -> tuple[float, float]:
    """Colour scale of the combined map: the median and 0.999 quantile of its pixels on the validation normals
    (the rule of the WDM and kNN overlays), from one WDM pass over them; at most ``max_pixels`` pixels per
    image, on a regular stride, so memory stays small however large the images."""
    from .data.images import read_size
    from .evaluate import score_samples
    from .overlay import robust_range
    pos = {str(x.path): i for i, x in enumerate(ref.val)}
    pixels = []

    def take(sample, m, _mask):   # cut to the image (its native size), then resized to the WDM map's
        k = knn_map(ref.val_patch_scores, ref.val_res, pos[str(sample.path)], m.shape, size=read_size(sample.path))
        if k is not None:
            c = combined_map(m, k, wdm_range, ref.knn_range).ravel()
            pixels.append(c[::max(1, -(-c.size // max_pixels))])
    score_samples(model, ref.val, cfg, on_map=take)
    return tuple(robust_range(np.concatenate(pixels)))


def zscore(v, ref) -> np.ndarray:
    """Standardise ``v`` by the mean and standard deviation of ``ref`` (the validation normals' scores)."""
    ref = np.asarray(ref, dtype=np.float64)
    return (np.asarray(v, dtype=np.float64) - ref.mean()) / (ref.std() + 1e-12)


@dataclass
class Reference:
    """The run's validation normals seen through a kNN index: what standardises and thresholds the kNN and
    combined scores and scales the kNN heatmap. ``wdm`` is calibration.json's scores (for the z-score);
    ``wdm_paired`` / ``combined`` are per image in ``knn``'s order (None unless asked for); ``val`` the
    validation normals with their patch scores and extraction (for `combined_range`); ``groups`` each scored
    normal's group in ``knn``'s order and ``trained_groups`` the run's (calibration.json's), for a run of several
    groups' thresholds per group (`flag_threshold`)."""
    n: int
    knn: np.ndarray
    wdm: np.ndarray
    knn_range: tuple[float, float]
    wdm_paired: np.ndarray | None = None
    val: list | None = None
    val_patch_scores: np.ndarray | None = None
    val_res: dict | None = None
    groups: list | None = None
    trained_groups: tuple = ()
    normals: dict | None = None   # where the normals came from (calibration.json's keys): the few-normals fix

    def combine(self, knn, wdm) -> np.ndarray:
        return zscore(knn, self.knn) + zscore(wdm, self.wdm)

    @property
    def combined(self) -> np.ndarray | None:
        return None if self.wdm_paired is None else self.combine(self.knn, self.wdm_paired)

    def val_scores(self, name: str) -> np.ndarray:
        return {"knn": self.knn, "combined": self.combined, "wdm": self.wdm}[name]


def reference(run, cfg: dict, scorer, kex, ex=None, paired: bool = False) -> Reference | None:
    """`Reference` of ``run``'s validation normals, or None with a warning when they, their calibrated WDM
    scores or an index that keeps them out of its bank are not at hand. ``paired``: also each validation
    normal's WDM score: calibration.json's (``val_paths``), else (written before those, or the data moved since)
    from the same pass when ``kex`` is the run's extractor, or one pass of ``ex``. Why calibration's: under
    ``tile_norm: neighbours`` it left each normal's own tiles out of its nearest ones, which a run loaded from disk
    cannot (tile_neighbours.npz keeps no tile sources): scored again, a normal's own tiles pulled it low (0.058 to
    0.005) and the combined threshold with it."""
    from .normals import validation_normals
    lost = "no combined score, kNN threshold or kNN colour scale"   # what every reason below costs
    try:
        cal = json.loads((Path(run) / "calibration.json").read_text(encoding="utf-8"))
        wv = np.asarray(cal["val_scores"], dtype=np.float64)
        val = validation_normals(cfg)
    except (OSError, KeyError, ValueError, BadInputError) as e:
        warnings.warn(f"{lost}: the run's validation normals are not available ({e}); "
                      f"run `uninet-feat calibrate --run {run}` (with --data where the data is now)")
        return None
    if len(val) < 2 or len(wv) < 2:
        warnings.warn(f"{lost}: the run has {len(val)} validation normal(s), too few to standardise by")
        return None
    held = (scorer.source or {}).get("held_out_val") or {}
    if held.get("paths_sha256") != paths_sha(abs_path(s.path) for s in val):
        warnings.warn(f"{lost}: this kNN index was not built with the validation normals of {run} "
                      f"held out (their kNN scores would be 0); rebuild it with `uninet-feat index --run {run} ...`")
        return None
    kv, patch_scores, res = knn_scores(scorer, kex, val)
    wp = None
    if paired:   # calibration's own scores; a normal it skipped (unreadable) has none, as a re-score gives it
        given = dict(zip(cal.get("val_paths") or (), wv))
        skipped = {abs_path(p) for p in cal.get("skipped") or ()}
        keys = [abs_path(s.path) for s in val]
        if given and all(k in given or k in skipped for k in keys):
            wp = np.array([given.get(k, np.nan) for k in keys])
    if paired and wp is None:
        w_res = res if kex is ex or ex is None else ex.extract(val)
        # each normal's WDM score as its row gets it (a tile_score: mean run takes the mean of its tiles)
        wp = per_sample_wdm(w_res["scores"], w_res["index"], len(val), cfg.get("tile_score", "max"))
    ok = np.isfinite(kv) & (np.isfinite(wp) if wp is not None else True)  # a skipped normal has no score
    from .overlay import robust_range
    return Reference(int(ok.sum()), kv[ok], wv, tuple(robust_range(patch_scores.ravel())),
                     wp[ok] if wp is not None else None, val, patch_scores,
                     {k: res[k] for k in ("index", "tile", "patch_grid")},   # not the patch vectors
                     [s.group for s, keep in zip(val, ok) if keep], tuple(cal.get("trained_groups") or ()),
                     {k: cal[k] for k in ("val_fraction", "calibration_normals", "val_from_data") if k in cal})


def flag_threshold(name: str, ref: Reference | None, threshold=None, max_fpr=None, group: str | None = None):
    """(threshold, rule, by_group) for flagging by the kNN or combined score: ``threshold`` as given, the lowest one
    that flags at most ``max_fpr`` of the validation normals, or their 0.99 quantile — WDM's rules, on this score.
    A run of several groups gets them per group as WDM does (`thresholds.thresholds_by_group` on this score's
    validation-normal values, same gate and warnings): their kNN and combined scores also sit at another level in
    each group. With ``group``, that group's threshold (`thresholds.pick_group`)."""
    from .thresholds import check_threshold_flags, group_rule, pick_group, resolve_threshold, thresholds_by_group
    check_threshold_flags(threshold, max_fpr)
    if ref is None and name == "combined":   # with --threshold too: there is no combined score to compare with it
        raise BadInputError("flagging by the combined score needs the run's validation normals (it sums the kNN "
                            "and WDM scores in their units; see the warning)",
                            fix="fix what the warning names, or flag by knn or wdm (--flag-by)")
    if threshold is not None:
        return float(threshold), "given (--threshold)", None
    if ref is None:
        raise BadInputError(f"flagging by the {name} score needs the run's validation normals (see the warning)",
                            fix="fix what the warning names, pass --threshold VALUE, or flag by wdm")
    vals = ref.val_scores(name)
    v = np.sort(vals)
    # the normals' origin as the run's calibration says it, so that the few-normals warning names the same fix as
    # WDM's (it advised `train --val-fraction 0.3` for a run at 0.4, or calibrated on --normals; an audit, session
    # 53) and, being the same text, is said once per command
    cal = {"threshold": float(np.quantile(v, 0.99)), "val_scores": v.tolist(), **(ref.normals or {}),
           "threshold_rule": f"0.99 quantile of the {len(v)} validation normals' {name} scores (no test labels used)"}
    by = (thresholds_by_group(vals, ref.groups, ref.trained_groups, max_fpr)
          if ref.groups is not None and len(ref.groups) == len(vals) else None)
    t, rule = resolve_threshold(".", None, max_fpr, cal=cal, source=f"{name} scores",
                                scores=f"validation normals' {name} scores")
    return pick_group(t, rule, by, group, group_rule(max_fpr, name))
