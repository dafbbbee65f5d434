"""kNN-over-patch-features scoring vs UniNet's WDM (and both combined), on a split with masks.

    python -m benchmarks.knn_compare --data ../shared/data --split-csv ../shared/data/splits/magnetic_tile.csv \
        [--run RUN] [--backbone tf_efficientnet_lite0 --image-size 256] [--coreset 0.1] --json out.json

Without ``--run``: the plain-backbone kNN baseline (PatchCore-style, ImageNet features, same backbone
and resolution as UniNet). With ``--run``: kNN over the run's domain-adapted patch features, the
run's WDM scores, and the two combined — each scorer z-normalised by its scores on the run's
validation normals (never on test labels) and summed. With ``--run`` the group, split, input size and tiling
are the run's, read from its config (``--group``, ``--tile`` and ``--image-size`` may be left out; one that
contradicts the run is refused). Prints and writes JSON: ``setup`` (the flags, the backbone and, with ``--run``,
its weights), the metrics, and each test image's scores (``scores``, in the file only).

``--index-kinds flat,ivfpq,hnsw`` (untiled sets) also puts the same coreset memory bank into each FAISS
index kind and reports, over every test patch as a query: recall@1 against the flat index, query time
per 1,000 patches, serialised size, build time, and the kNN metrics that index gives.
``--knn-features plain`` (with ``--run``): the kNN uses the ImageNet backbone's patches while WDM comes
from the run, so the combined scorer pairs UniNet with the plain PatchCore-style baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np

import uninet_feat  # noqa: F401
from uninet_feat import metrics
from uninet_feat.config import DEFAULT_CONFIG, load_config
from uninet_feat.downstream import KNNScorer, search
from uninet_feat.downstream.index import is_gpu_index
from uninet_feat.extract import Extractor
from uninet_feat.runs import load_samples, train_val_samples
from uninet_feat.scorers import per_sample_max, zscore


def _eval(labels, scores, masks, maps, test) -> dict:
    """Pooled metrics, then the same per defect label (each label vs all test normals), as `evaluate`."""
    from uninet_feat.evaluate import per_label_metrics
    out = {"image_auroc": metrics.image_auroc(labels, scores)}
    has_masks = masks is not None and masks.any()
    if has_masks:
        out["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        out["aupro"] = metrics.aupro(masks, maps)
        w = metrics.within_image_auroc(masks, maps)
        if w is not None:
            out["within_image_auroc"], out["within_image_n"] = w
    defect_labels = sorted({s.label for s in test if not s.is_normal})
    if len(defect_labels) > 1:
        res = {"maps": maps, "masks": masks} if has_masks else {}
        out["per_label"] = per_label_metrics(test, labels, np.asarray(scores), res, has_masks, defect_labels)
    return out


def _wdm_maps(ex, samples, image_size: int) -> np.ndarray:
    """UniNet's own pixel maps, the kind the run evaluates (``pixel_map``: smoothed by default)."""
    import torch
    from uninet_feat.data.dataset import ImageDataset
    ds = ImageDataset(samples, image_size=image_size, mean=ex.backbone.mean, std=ex.backbone.std)
    from uninet_feat.runs import model_device
    dev = model_device(ex.model)
    with torch.no_grad():
        return np.concatenate([ex.model.predict(b["image"].to(dev))[0].cpu().numpy()
                               for b in torch.utils.data.DataLoader(ds, batch_size=8)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--split-csv")
    ap.add_argument("--group", help="without --run: one group of the data (default: all); with --run: the run's")
    ap.add_argument("--run")
    ap.add_argument("--backbone", default=DEFAULT_CONFIG["backbone"])
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=None,
                    help=f"without --run: default {DEFAULT_CONFIG['image_size']}; with --run: the run's")
    ap.add_argument("--coreset", type=float, default=0.1, help="memory-bank fraction (the index command's default; 1.0 = all)")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--tile", type=int, default=None,
                    help="tile large images (e.g. 256 for AITEX strips); image scores only. With --run: the run's")
    ap.add_argument("--knn-features", choices=("run", "plain"), default="run",
                    help="with --run: kNN over the run's adapted patches (run) or the ImageNet backbone's (plain)")
    ap.add_argument("--index-kinds", default="flat",
                    help="comma list starting with flat, e.g. flat,ivfpq,hnsw: compare FAISS index kinds (untiled)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.index_kinds.split(",") if k.strip()]
    if kinds[:1] != ["flat"]:
        ap.error("--index-kinds must start with flat (the reference) and needs untiled images")
    if a.run:
        ex = Extractor(run=a.run, patches=a.knn_features == "run")
        _take_runs_input(ap, a, ex.cfg)   # --group/--tile/--image-size: the run's (a contradicting flag is refused)
    else:
        a.image_size = a.image_size or DEFAULT_CONFIG["image_size"]
        ex = Extractor(backbone=a.backbone, weights=a.weights, image_size=a.image_size, patches=True, tile=a.tile)
    if len(kinds) > 1 and a.tile:
        ap.error("--index-kinds must start with flat (the reference) and needs untiled images")
    kex = ex   # the kNN's patch features; WDM scores always come from ``ex``
    if a.run and a.knn_features == "plain":   # the plain backbone at the run's input size and tiling
        kex = Extractor(backbone=ex.cfg["backbone"], weights=a.weights, image_size=a.image_size, patches=True,
                        tile=a.tile)
    # with a run: its own data selection and training / validation split (group, split_hash, val_split,
    # val_fraction, seed), so the kNN memory holds exactly the run's training normals, the test set is the run's
    # and the z-scores use the run's validation normals
    cfg = load_config(None, {"data": a.data, "split_csv": a.split_csv, "group": a.group},
                      base=_split_keys(ex.cfg) if a.run else None)
    samples = load_samples(cfg)
    fit, val = train_val_samples(samples, cfg)
    test = [s for s in samples if s.split == "test"]
    if a.run and not val:   # the combined score is z-scored on them: a traceback after all the scoring before
        ap.error(f"--run {a.run} has no validation normals (val_fraction 0), which the combined score is "
                 "standardised on: compare without --run (the kNN alone), or a run trained with --val-fraction > 0")
    t0 = time.time()
    tr = kex.extract(fit)
    knn = KNNScorer(kind="flat", k=a.k, coreset_ratio=a.coreset).fit(tr["patches"].astype(np.float32))
    t_fit = time.time() - t0
    te = kex.extract(test)
    run_out = (lambda s, out: out if kex is ex else ex.extract(s))   # the run's own pass, for WDM scores
    if ex.cfg.get("tile"):
        return _tiled(a, ex, kex, knn, te, test, val, t_fit, run_out)
    hw = int(np.sqrt(te["patches"].shape[1]))
    size = (a.image_size, a.image_size)
    kmaps, kscores = knn.score_maps(te["patches"].astype(np.float32), (hw, hw), size)
    labels = np.array([0 if s.is_normal else 1 for s in test])
    from uninet_feat.data.dataset import ImageDataset
    has_masks = any(s.mask is not None for s in test)
    masks = None
    if has_masks:
        ds = ImageDataset(test, image_size=a.image_size)
        masks = np.stack([ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))])
    res = {"image_size": a.image_size, "coreset": a.coreset, "n_memory": int(knn.index.ntotal),
           "knn_features": a.knn_features if a.run else "plain",
           "fit_seconds": round(t_fit, 1), "knn": _eval(labels, kscores, masks, kmaps, test)}
    if len(kinds) > 1:
        res["index_kinds"] = _index_kinds(knn, te["patches"].astype(np.float32), kinds, (hw, hw), size,
                                          lambda m, sc: _eval(labels, sc, masks, m, test))
    per_image = {"knn": kscores}
    if a.run:
        wscores, wmaps = run_out(test, te)["scores"], _wdm_maps(ex, test, a.image_size)
        res["wdm"] = _eval(labels, wscores, masks, wmaps, test)
        # combined: each scorer z-normalised on the validation normals (images and pixels), then summed
        va = kex.extract(val)
        vkmaps, vk = knn.score_maps(va["patches"].astype(np.float32), (hw, hw), size)
        vwmaps = _wdm_maps(ex, val, a.image_size)
        comb_scores = zscore(kscores, vk) + zscore(wscores, run_out(val, va)["scores"])
        comb_maps = zscore(kmaps, vkmaps) + zscore(wmaps, vwmaps)
        res["combined"] = {**_eval(labels, comb_scores, masks, comb_maps, test),
                           "rule": "z-score of each scorer on validation normals (image scores; map pixels), summed"}
        per_image.update(wdm=wscores, combined=comb_scores)
    return _finish(res, test, per_image, a, ex)


def _norm_group(g):
    """A config's group as a sorted list (None: every group)."""
    if g is None or g == "" or g == []:
        return None
    return sorted([g] if isinstance(g, str) else g)


def _take_runs_input(ap, a, run_cfg: dict) -> None:
    """Fill --group, --tile and --image-size from the run's config; refuse a flag that contradicts the run: the
    kNN bank and the test set would silently differ from the images the run trained on and `evaluate` scores."""
    run_tile = run_cfg.get("tile") or None
    bad = []
    if a.group is not None and _norm_group(a.group) != _norm_group(run_cfg.get("group")):
        bad.append(f"--group {a.group} (the run's: {run_cfg.get('group')})")
    if a.tile is not None and (a.tile or None) != run_tile:
        bad.append(f"--tile {a.tile} (the run's: {run_tile})")
    if a.image_size is not None and a.image_size != int(run_cfg["image_size"]):
        bad.append(f"--image-size {a.image_size} (the run's: {run_cfg['image_size']})")
    # the run's split CSV: without it the layout drew another split, whose "test" images the run trained on and
    # whose training images (the kNN bank) held the run's test images, without a word (an audit, session 53)
    run_csv = run_cfg.get("split_csv")
    same_data = os.path.abspath(a.data) == os.path.abspath(str(run_cfg.get("data")))
    if a.split_csv is not None and not _same_csv(a.split_csv, run_csv, moved=not same_data):
        bad.append(f"--split-csv {a.split_csv} (the run's: {run_csv})")
    elif a.split_csv is None and run_csv:
        if same_data:
            a.split_csv = run_csv
        else:
            bad.append(f"--data {a.data} without --split-csv (the run trained with --split-csv {run_csv} over "
                       f"{run_cfg.get('data')}: give it, moved with the data)")
    if bad:
        ap.error(f"{', '.join(bad)} contradicts --run {a.run}: with --run the group, split, tiling and input size are "
                 "the run's; drop these flags")
    g = run_cfg.get("group")
    a.group = g if g not in ("", []) else None
    a.tile, a.image_size = run_tile, int(run_cfg["image_size"])


def _same_csv(given: str, run_csv, moved: bool) -> bool:
    """Whether ``given`` is the run's split CSV: the same file, or its bytes (a copy moved with the data); with the
    data ``moved`` and the run's file no longer there, taken as the user's word (it was refused whatever it was, and
    the fix for moved data asked for it; a review, session 53)."""
    if run_csv is None:
        return False
    if os.path.abspath(given) == os.path.abspath(str(run_csv)):
        return True
    try:
        with open(given, "rb") as f, open(run_csv, "rb") as g:
            return f.read() == g.read()
    except OSError:
        return moved and os.path.isfile(given)


def _split_keys(run_cfg: dict) -> dict:
    """The keys of a run's config that choose its samples and their split (an older run's config without
    split_hash / val_split meant the legacy ``path`` hash and ``drawn`` validation split)."""
    out = {k: run_cfg[k] for k in ("val_fraction", "seed", "mask_pattern") if k in run_cfg}
    out.update(group=run_cfg.get("group"), split_hash=run_cfg.get("split_hash") or "path",
               val_split=run_cfg.get("val_split") or "drawn")
    return out


def _index_kinds(knn, patches, kinds, grid, size, evaluate) -> dict:
    """Each FAISS kind over ``knn``'s memory bank (the same coreset, so only the index differs): recall@1 of
    the nearest normal patch against flat's, query ms per 1k test patches, bytes, build s, kNN metrics."""
    bank = knn.index.reconstruct_n(0, knn.index.ntotal)
    queries = patches.reshape(-1, patches.shape[-1])
    out, ref = {}, None
    for kind in kinds:
        t0 = time.perf_counter()
        sc = KNNScorer(kind=kind, k=knn.k, coreset_ratio=None, seed=knn.seed, device=knn.device).fit(bank)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, nn = search(sc.index, queries, 1)
        query_s = time.perf_counter() - t0
        ref = nn[:, 0] if ref is None else ref
        maps, scores = sc.score_maps(patches, grid, size)
        out[kind] = {"recall@1": float((nn[:, 0] == ref).mean()), "n_queries": len(queries),
                     "query_ms_per_1k": round(1e6 * query_s / len(queries), 3), "build_s": round(build_s, 2),
                     "bytes": int(faiss.serialize_index(
                         faiss.index_gpu_to_cpu(sc.index) if is_gpu_index(sc.index) else sc.index).nbytes),
                     **{k: v for k, v in evaluate(maps, scores).items() if k != "per_label"}}
    return out


def _tiled(a, ex, kex, knn, te, test, val, t_fit, run_out) -> dict:
    """Image-level comparison for tiled images (no masks): kNN, WDM and combined, highest tile each."""
    n, labels = len(test), np.array([0 if s.is_normal else 1 for s in test])

    def knn_images(out, n):
        return per_sample_max(knn.score_patches(out["patches"].astype(np.float32)).max(1), out["index"], n)

    ks = knn_images(te, n)
    res = {"image_size": a.image_size, "tile": ex.cfg["tile"], "coreset": a.coreset, "n_memory": int(knn.index.ntotal),
           "knn_features": a.knn_features if a.run else "plain", "fit_seconds": round(t_fit, 1),
           "knn": _eval(labels, ks, None, None, test)}
    per_image = {"knn": ks}
    if a.run:
        wte = run_out(test, te)
        ws = per_sample_max(wte["scores"], wte["index"], n)
        res["wdm"] = _eval(labels, ws, None, None, test)
        va = kex.extract(val)
        wva = run_out(val, va)
        vk, vw = knn_images(va, len(val)), per_sample_max(wva["scores"], wva["index"], len(val))
        comb = zscore(ks, vk) + zscore(ws, vw)
        res["combined"] = {**_eval(labels, comb, None, None, test),
                           "rule": "z-score of each scorer on validation normals (image scores), summed"}
        per_image.update(wdm=ws, combined=comb)
    return _finish(res, test, per_image, a, ex)


def _finish(res: dict, test, per_image: dict, a, ex) -> dict:
    """Add what was compared (``setup``: data, split, run, backbone, weights, k, ...), per test image its path and
    each scorer's image score (``scores``, for per-image study and cross-checks), print the summary and write the
    whole result as JSON (``a.json``)."""
    setup = {k: v for k, v in vars(a).items() if k != "json"}
    setup["backbone"] = ex.cfg["backbone"]   # with --run: the run's (--weights: the plain kNN's, --knn-features plain)
    if a.run:
        setup["run_weights"] = ex.cfg.get("weights")
    res = {"setup": setup, **res}
    res["scores"] = {"path": [str(s.path) for s in test],
                     **{k: [float(x) for x in v] for k, v in per_image.items()}}
    print(json.dumps({k: v for k, v in res.items() if k != "scores"}, indent=2))  # per-image scores: file only
    if a.json:
        from uninet_feat.io import atomic_write_text   # a kill mid-write leaves the last result, not half of one
        atomic_write_text(a.json, json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
