"""Anomaly maps and the WDM image score (method §6): the public API used by the model, evaluation and export.

Thin wrappers over ``uninet_feat.kernels.wdm``: everything is batched and stays on the input's device (no
per-image loop, no host sync), with a Triton backend on CUDA (env UNINET_KERNELS=auto|triton|torch).
``wdm_score_reference`` is the per-image numpy/scipy spec, as the official code computes it; tests compare
the batched paths against it.
"""
from __future__ import annotations

import numpy as np
import torch

from uninet_feat.kernels import wdm as _wdm

ALPHA, BETA = 0.01, 3e-5  # method defaults: w = max(ALPHA * mean(kept maxima), BETA)


def anomaly_maps(teacher_feats, student_feats, backend: str | None = None) -> list[torch.Tensor]:
    """K maps M_k = 1 - cos over channels, (N, h_k, w_k) fp32, from equal-shape (N, C_k, h_k, w_k) pairs."""
    return _wdm.anomaly_maps(list(teacher_feats), list(student_feats), backend)


def anomaly_map(maps, out_size, backend: str | None = None) -> torch.Tensor:
    """Pixel map A (N, H, W): the sum of the maps upsampled bilinearly (align_corners=True); not smoothed."""
    return _wdm.anomaly_map(list(maps), out_size, backend)


def wdm_weights(maps, alpha: float, beta: float, out_size):
    """(k LongTensor (N,), w float64 (N,)): how many top pixels of the blurred map each image's score averages."""
    return _wdm.wdm_k(_wdm.map_maxima(list(maps)), out_size, alpha, beta)


def gaussian_blur_scipy(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0,
                        backend: str | None = None) -> torch.Tensor:
    """Batched scipy.ndimage.gaussian_filter(x[i], sigma, truncate=truncate, mode='reflect') for (N, H, W)."""
    return _wdm.gaussian_blur_scipy(x, sigma, truncate, backend)


def wdm_score(maps, out_size, alpha: float = ALPHA, beta: float = BETA, backend: str | None = None,
              smoothed: bool = False):
    """(pixel map (N, H, W), image score (N,)): the score is the mean of the top-k of the blurred pixel map.

    ``smoothed=False`` returns the unsmoothed sum A (the official pixel map); ``True`` returns the σ=4
    blurred S that the score is taken from (RD4AD's convention; the heatmap then shows what was scored).
    """
    if not smoothed:
        return _wdm.wdm_from_maps(list(maps), out_size, alpha, beta, backend)
    maps = list(maps)
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    k, _ = _wdm.wdm_k(_wdm.map_maxima(maps), size, alpha, beta)
    s = gaussian_blur_scipy(anomaly_map(maps, size, backend), 4.0, 4.0, backend)
    return s, _wdm.topk_mean(s, k)


def level_pixel_map(maps, levels, out_size, smoothed: bool = True, backend: str | None = None,
                    norm=None) -> torch.Tensor:
    """The pixel map of ``levels`` only (1-based, None = all; both pairs of each level, so 2 maps per level),
    summed as `anomaly_map` sums all, then σ=4 blurred when ``smoothed``: what ``map_levels`` shows and evaluates.

    ``norm``: one (median, 0.999 quantile) pair per map, of its validation-normal pixels (``map_norm: range``):
    each map is put in those units, (M - median) / (q999 - median), before the sum, so that every map counts
    on its own normal scale instead of the noisiest one setting the sum."""
    maps = list(maps)
    n_levels = len(maps) // 2
    levels = range(1, n_levels + 1) if levels is None else levels
    bad = [lv for lv in levels if not 1 <= int(lv) <= n_levels]
    if bad or not levels:
        raise ValueError(f"map levels must be a non-empty subset of 1..{n_levels}, got {list(levels)}")
    if norm is not None and len(norm) != len(maps):
        raise ValueError(f"map_norm has {len(norm)} ranges for {len(maps)} maps")
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    keep = {int(lv) for lv in levels}
    idx = [k for k in range(len(maps)) if k % n_levels + 1 in keep]
    if norm is None:
        sel = [maps[k] for k in idx]
    else:
        sel = [(maps[k] - float(norm[k][0])) / max(float(norm[k][1]) - float(norm[k][0]), 1e-12) for k in idx]
    a = anomaly_map(sel, size, backend)
    return gaussian_blur_scipy(a, 4.0, 4.0, backend) if smoothed else a


def level_map_score(maps, levels, out_size, norm=None, alpha: float = ALPHA, beta: float = BETA,
                    backend: str | None = None) -> torch.Tensor:
    """(N,) the WDM score of the pixel map of ``levels`` in ``norm``'s units (`level_pixel_map`), not of all maps
    raw: the mean of the top-k of its σ=4 blurred map, k the image's WDM k (`wdm_weights`, from all maps). Of all
    levels raw it is the WDM score itself. What a tile's map is shifted by under ``tile_norm: position`` when the
    run's pixel map is not in the image score's units (`positions.tile_offsets`)."""
    maps = list(maps)
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    return map_topk_score(maps, level_pixel_map(maps, levels, size, True, backend, norm), alpha, beta)


def map_topk_score(maps, smoothed_map: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """(N,) the mean of the top-k of ``smoothed_map`` (N, H, W), k each image's WDM k from all of ``maps``
    (`wdm_weights` at the map's size): the WDM's reduction applied to another map than the sum of all."""
    maps = list(maps)
    k, _ = _wdm.wdm_k(_wdm.map_maxima(maps), tuple(smoothed_map.shape[-2:]), alpha, beta)
    return _wdm.topk_mean(smoothed_map, k)


IMAGE_SCORES = ("wdm", "map", "auto")


def pixel_map_chosen(cfg: dict) -> bool:
    """Whether ``cfg``'s pixel map differs from the method's sum of all levels' maps, raw: some levels only
    (``map_levels``) or range units (``map_norm``). Only such a map has units and a score of its own."""
    return bool(cfg.get("map_levels") or cfg.get("map_norm"))


def map_in_score_units(cfg: dict) -> bool:
    """Whether the pixel map ``cfg`` makes is in the image score's units: the sum of all levels' maps, raw, as the
    WDM score is (smoothed or not: a blur keeps a constant), or any pixel map when the image score is taken from it
    (``image_score: map``). With ``map_levels`` (some levels only) or ``map_norm`` (range units) under the WDM score
    it is not, and a number in score units (a tile position's offset) means nothing on it."""
    return cfg.get("image_score") == "map" or not pixel_map_chosen(cfg)


def image_score_kind(cfg: dict) -> str:
    """"wdm" (the WDM of all maps, raw: also a map score of such a map), else "map: " and the pixel map's kind."""
    if cfg.get("image_score") != "map" or not pixel_map_chosen(cfg):
        return "wdm"
    return "map: " + pixel_map_kind({k: cfg.get(k) for k in ("map_levels", "map_norm")})


def pixel_map_kind(cfg: dict) -> str:
    """A name for the kind of pixel map ``cfg`` makes ("smoothed", "raw, levels 2,3", "smoothed, range units"):
    colour scales and ranges computed on one kind are not used for another. Under ``tile_norm: position`` /
    ``neighbours`` each tile's map is less its place's offset (`positions.tile_map_shift`): "tile offsets" when the
    map is in the score's units (the score's offsets), "tile offsets in map units" when it is not (offsets measured
    on the map, ``tile_map_offsets``); a map of other units without those (a calibration.json written before
    them) is not shifted, and named as a plain map."""
    levels = cfg.get("map_levels")
    kind = cfg.get("pixel_map", "smoothed")
    if levels:
        kind += f", levels {','.join(str(int(v)) for v in levels)}"
    if cfg.get("map_norm"):
        kind += ", range units"
    if not cfg.get("tile_offsets"):
        return kind
    if map_in_score_units(cfg):
        return kind + ", tile offsets"   # each tile less its place's offset
    return kind + ", tile offsets in map units" if cfg.get("tile_map_offsets") else kind


def wdm_score_reference(maps, out_size, alpha: float = ALPHA, beta: float = BETA):
    """Per-image numpy/scipy spec of ``wdm_score``: (pixel maps (N,H,W), scores (N,), k (N,)), numpy fp64.

    Independent of the torch code on purpose: upsampling by scipy map_coordinates (order 1 at align-corners
    coordinates), scipy gaussian_filter, np.partition. Slow; for tests and benchmarks only.
    """
    from scipy import ndimage

    hh, ww = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    arrs = [m.detach().cpu().double().numpy() for m in maps]
    pix, scores, ks = [], [], []
    for i in range(arrs[0].shape[0]):
        mx = np.array([a[i].max() for a in arrs])
        q = np.exp(mx - mx.max())
        q /= q.sum()
        kept = mx[q > q.mean()]
        kept = kept if kept.size else mx  # all maxima equal: keep all
        w = max(alpha * kept.mean(), beta)
        k = int(min(max(np.floor(hh * ww * w), 1), hh * ww))
        total = np.zeros((hh, ww))
        for a in arrs:
            h, w_ = a[i].shape
            ys = np.arange(hh) * ((h - 1) / (hh - 1) if hh > 1 else 0.0)
            xs = np.arange(ww) * ((w_ - 1) / (ww - 1) if ww > 1 else 0.0)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            total += ndimage.map_coordinates(a[i], [yy, xx], order=1, mode="nearest")
        s = ndimage.gaussian_filter(total, 4.0, truncate=4.0, mode="reflect")
        pix.append(total)
        scores.append(np.partition(s.ravel(), -k)[-k:].mean())
        ks.append(k)
    return np.stack(pix), np.array(scores), np.array(ks)
