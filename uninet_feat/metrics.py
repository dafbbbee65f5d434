"""Anomaly-detection metrics: image AUROC / AP / F1-max, pixel AUROC and AUPRO.

Image metrics are small (one score per image), so scikit-learn does the work. Pixel metrics see
10^7-10^8 pixels, so they avoid anything quadratic or per-threshold: pixel AUROC and AUPRO both
sort the normal-pixel scores once and look defect-pixel scores up in them with `searchsorted`
(ties enter together because `side="left"` counts every pixel scoring >= t at once).

Every function raises `BadInputError` (a `ValueError`) for inputs a metric is undefined on: one
class only, NaN/Inf scores, mismatched shapes.
"""
import math
import warnings

import numpy as np
from scipy import ndimage

from .errors import BadInputError

__all__ = ["image_auroc", "image_auroc_bootstrap", "interval", "image_ap", "f1_max", "pixel_auroc", "aupro",
           "aupro_reference", "pixel_bootstrap", "bootstrap_histograms", "PixelStats", "score_keys",
           "evaluate_maps"]

N_BOOT = 2000       # bootstrap resamples behind an interval
LEVEL = 0.95
INTERVAL_RULE = (f"{LEVEL:.0%} percentile interval of {N_BOOT} stratified bootstrap resamples of the test images "
                 "(normals and defects each drawn with replacement, their counts kept; seeded)")
PIXEL_INTERVAL_RULE = (f"{LEVEL:.0%} percentile interval of 1000 bootstrap resamples of the test images (those with "
                       "and without defect pixels each drawn with replacement; seeded), scored on 4096 score bins")


# ----------------------------------------------------------------------------- input checks
def _finite(name: str, a) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "float"):   # a torch tensor: bfloat16 has no numpy dtype
        a = a.detach().cpu()
        a = a.float() if not a.is_floating_point() or a.element_size() < 4 else a
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        raise BadInputError(f"{name} must be numbers, got an array of {a.dtype}")
    if np.issubdtype(a.dtype, np.integer):   # float32 would merge integers above 2**24 into ties
        a = a.astype(np.float64)
    elif not np.issubdtype(a.dtype, np.floating) or a.dtype == np.float16:
        a = a.astype(np.float32)
    bad = a.size - np.count_nonzero(np.isfinite(a))
    if bad:
        raise BadInputError(f"{name} contains {bad} non-finite value(s) (NaN/Inf) out of {a.size}",
                            fix="check the model output / score computation for NaN or overflow")
    return a


def _binary(name: str, a) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):   # a torch tensor, perhaps on a GPU (np.asarray: a TypeError)
        a = a.detach().cpu()
    a = np.asarray(a)
    if a.dtype != np.bool_:
        bad = a.size - np.count_nonzero((a == 0) | (a == 1))
        if bad:
            raise BadInputError(f"{name} must be 0/1 or boolean; {bad} value(s) are neither")
        a = a != 0
    return a


def _image_inputs(labels, scores):
    labels, scores = _binary("labels", labels).ravel(), _finite("scores", scores).ravel()
    if labels.shape != scores.shape:
        raise BadInputError(f"labels has {labels.size} entries but scores has {scores.size}")
    n_def = int(labels.sum())
    if n_def in (0, labels.size):
        only = "defect (1)" if n_def else "normal (0)"
        raise BadInputError(f"labels contain only {only} images ({labels.size}); the metric needs both classes",
                            fix="evaluate on a test set with normal and defective images")
    return labels, scores


def _pixel_inputs(masks, maps):
    """(per-image 2-D masks, flat bool masks, flat float maps) from (N, H, W) arrays, or from lists of
    2-D arrays whose sizes may differ between images (full-size maps of tiled images)."""
    if isinstance(masks, (list, tuple)) or isinstance(maps, (list, tuple)):
        if len(masks) != len(maps):
            raise BadInputError(f"{len(masks)} masks but {len(maps)} maps")
        per = [_binary("masks", m) for m in masks]
        flat = [_finite("maps", a) for a in maps]
        for i, (m, a) in enumerate(zip(per, flat)):
            if m.shape != a.shape or m.ndim != 2:
                raise BadInputError(f"image {i}: mask {m.shape} and map {a.shape} must be the same (H, W)")
        fm = np.concatenate([m.ravel() for m in per]) if per else np.zeros(0, bool)
        fa = np.concatenate([a.ravel() for a in flat]) if flat else np.zeros(0, np.float32)
    else:
        per, fa = _binary("masks", masks), _finite("maps", maps)
        if per.shape != fa.shape or per.ndim != 3:
            raise BadInputError(f"masks {per.shape} and maps {fa.shape} must both be (N, H, W)")
        fm, fa = per.reshape(-1), fa.reshape(-1)
    n_def = int(np.count_nonzero(fm))
    if n_def in (0, fm.size):
        only = "defect" if n_def else "normal"
        raise BadInputError(f"masks contain only {only} pixels; pixel metrics need both",
                            fix="include images with annotated defects (and normal pixels)")
    return per, fm, fa


# ----------------------------------------------------------------------------- image level
def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of per-image scores (1 = defect, higher score = more anomalous)."""
    labels, scores = _image_inputs(labels, scores)
    from sklearn.metrics import roc_auc_score   # here: scoring (predict, Detector) needs no scikit-learn (~0.9 s)
    return float(roc_auc_score(labels, scores))


def image_auroc_bootstrap(labels, scores, n_boot: int = N_BOOT, seed=0) -> np.ndarray:
    """``n_boot`` image AUROCs of stratified bootstrap resamples of the test set: how far the figure could move
    with other test images like these. Why: AITEX has 6 normal and 7-31 defective test strips per fabric, where
    one strip more or less in order moves the AUROC by up to 1/42, so a figure without its spread cannot say
    whether it meets a target. Exact (ties count ½) and linear in the test set's size per resample."""
    _check_n_boot(n_boot)
    labels, scores = _image_inputs(labels, scores)
    pos, neg = scores[labels].astype(np.float64), scores[~labels].astype(np.float64)
    return np.concatenate([auroc_of_counts(pos, neg, d, n) for d, n in bootstrap_counts(pos.size, neg.size, n_boot,
                                                                                         seed)])


def _check_n_boot(n_boot) -> None:
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1):
        raise BadInputError(f"n_boot must be an integer >= 1, got {n_boot!r}", fix="e.g. n_boot=1000")


def bootstrap_counts(n_pos: int, n_neg: int, n_boot: int, seed=0, chunk: int = 250):
    """Blocks (d, n) of at most ``chunk`` resamples: how often each defect (d, (k, n_pos)) and each normal
    (n, (k, n_neg)) is drawn, each from its own stream of ``seed``, so a block holds only k x (n_pos + n_neg)."""
    rd, rn = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        yield (rd.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=k),
               rn.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=k))


def auroc_of_counts(pos, neg, d, n) -> np.ndarray:
    """AUROC of each resample that draws defect i d[b, i] times and normal j n[b, j] times: the count-weighted
    share of (defect, normal) pairs in order, ties ½, from the normals' cumulative counts in score order."""
    order = np.argsort(neg, kind="stable")
    cum = np.concatenate([np.zeros((n.shape[0], 1)), np.cumsum(n[:, order], axis=1, dtype=np.float64)], axis=1)
    lo, hi = np.searchsorted(neg[order], pos, "left"), np.searchsorted(neg[order], pos, "right")
    below = cum[:, lo]
    return (d * (below + 0.5 * (cum[:, hi] - below))).sum(1) / (pos.size * neg.size)


def interval(draws, level: float = LEVEL) -> list[float]:
    """[low, high]: the central ``level`` percentile interval of bootstrap ``draws``."""
    draws = np.asarray(draws, np.float64)
    if draws.size == 0:
        raise BadInputError("no bootstrap draws to take an interval of", fix="resample at least once (n_boot >= 1)")
    a = (1 - level) / 2
    return [float(v) for v in np.quantile(draws, [a, 1 - a])]


def image_ap(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, step-wise as in scikit-learn)."""
    labels, scores = _image_inputs(labels, scores)
    from sklearn.metrics import average_precision_score
    return float(average_precision_score(labels, scores))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 = 2PR/(P+R) over all thresholds, and that threshold (defect iff score >= threshold).

    The threshold is returned so a caller can choose it on *validation* data and then apply it to
    test data; picking it on test labels would report an optimistic F1.
    """
    labels, scores = _image_inputs(labels, scores)
    from sklearn.metrics import precision_recall_curve
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]       # the last point (P=1, R=0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


# ----------------------------------------------------------------------------- pixel level
NEGATIVES = ("all", "normal_images")
NORMAL_IMAGES_RULE = ("defect pixels against the pixels of the normal images alone: the defective images' other "
                      "pixels are left out (the pooled figure counts them as normal pixels too)")


def normal_image_flags(per, negatives) -> np.ndarray | None:
    """Per image, whether its pixels are the normal class of a figure (`_negatives`); None for ``all``."""
    if isinstance(negatives, str):
        if negatives not in NEGATIVES:
            raise BadInputError(f"negatives must be one of {NEGATIVES} or one bool per image, got {negatives!r}")
        if negatives == "all":
            return None
        flags = np.array([not np.any(m) for m in per])
    else:
        flags = np.asarray(negatives, bool).ravel()
        if flags.size != len(per):
            raise BadInputError(f"negatives: {flags.size} flags for {len(per)} images", fix="one bool per image")
        if any(np.any(m) for m, f in zip(per, flags) if f):
            raise BadInputError("negatives: an image marked normal has defect pixels", fix="mark normal images only")
    if not flags.any():
        raise BadInputError("no normal image: figures against normal images need some",
                            fix="include normal images in the test set")
    return flags


def _negatives(per, masks, negatives) -> np.ndarray:
    """The flat bool selection of the pixels a figure counts as normal: every non-defect pixel (``all``, the
    standard), or the pixels of the normal images alone: ``normal_images`` (the images without a defect pixel) or
    one bool per image (evaluate's normal labels: a defective image whose mask is empty is not a normal image). Why:
    on magnetic tile the defective images' other pixels score well above the normal images' for the plain kNN and
    UniNet alike (session 48), and the pooled figure cannot tell that from false alarms on good parts."""
    flags = normal_image_flags(per, negatives)
    if flags is None:
        return ~masks
    return np.concatenate([np.full(np.size(m), f) for m, f in zip(per, flags)])


def pixel_auroc(masks, maps, chunk: int = 1 << 22, negatives="all") -> float:
    """ROC AUC over all pixels of (N, H, W) masks and maps (or lists of 2-D ones of any sizes), exact, in
    O(n log n) and ~1 copy of memory. ``negatives``: which pixels are the normal class (`NEGATIVES`; `_negatives`).

    AUROC equals P(defect score > normal score) + 0.5 P(equal) (Mann-Whitney U). We sort the normal
    scores once and, for each defect score, count normals below it (`searchsorted` left) and at or
    below it (right); their mean counts ties as one half, exactly like the trapezoidal ROC. No
    (n,) int64 argsort or float64 rank array is built, which is what makes 10^8 pixels fit.
    """
    per, masks, maps = _pixel_inputs(masks, maps)
    neg = np.sort(maps[_negatives(per, masks, negatives)])
    pos = np.sort(maps[masks])                             # sorted queries make searchsorted faster
    twice_u = 0                                            # Python int: never overflows
    for s in range(0, pos.size, chunk):
        q = pos[s:s + chunk]
        twice_u += int(np.searchsorted(neg, q, "left").sum()) + int(np.searchsorted(neg, q, "right").sum())
    return twice_u / (2.0 * pos.size * neg.size)


def image_pixel_aurocs(masks, maps) -> list[float | None]:
    """Each image's own pixel AUROC, None for an image without both defect and normal pixels (a normal image)."""
    if len(masks) != len(maps):   # zip cut the longer one short: a figure over the first images only
        raise BadInputError(f"{len(masks)} masks but {len(maps)} maps", fix="pass one map per mask, in the same order")
    out = []
    for m, a in zip(masks, maps):
        m, a = _binary("masks", m), _finite("maps", a)
        out.append(pixel_auroc(m[None], a[None]) if m.any() and not m.all() else None)
    return out


def within_image_auroc(masks, maps) -> tuple[float, int] | None:
    """(mean over images, number of images) of each image's own pixel AUROC (`image_pixel_aurocs`), over the images
    that hold both defect and normal pixels; None when none does.

    Why: pixel AUROC pools every image's pixels, so it mixes two questions: is a normal image's map low (which the
    image score already answers), and, inside a defective image, is the defect where the map is hot. This answers the
    second one alone, the one an engineer looking at a flagged part's heatmap asks. On magnetic tile (session 30) a
    perfect image-level gate would have raised the pooled figure only from 0.790 to 0.825: the gap is inside images."""
    return mean_of(image_pixel_aurocs(masks, maps))


def mean_of(per) -> tuple[float, int] | None:
    """(mean, count) of the values of ``per`` that are not None; None when there is none."""
    vals = [v for v in per if v is not None]
    return (float(np.mean(vals)), len(vals)) if vals else None


def _regions(masks: np.ndarray) -> np.ndarray:
    """Global region id (0..R-1) of every defect pixel, in `maps[masks]` order; 8-connected per image."""
    ids, offset = [], 0
    for m in masks:
        if not m.any():   # no region (a normal image): labelling it adds nothing
            continue
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        ids.append(lab[m] - 1 + offset)
        offset += n
    return np.concatenate(ids) if ids else np.zeros(0, int)


def _area_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Normalised area under PRO(FPR) from 0 to `limit`; points ordered by decreasing threshold."""
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    j = int(np.searchsorted(fpr, limit, "left"))           # first point at or beyond the limit
    if j == fpr.size:                                      # curve ends before the limit: stay flat
        fpr, pro, j = np.append(fpr, limit), np.append(pro, pro[-1]), fpr.size
    x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
    y_lim = y0 + (limit - x0) / (x1 - x0) * (y1 - y0)
    x, y = np.append(fpr[:j], limit), np.append(pro[:j], y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit)


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None, negatives="all") -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit` (in [0, 1]).

    PRO(t) is the mean over ground-truth regions (8-connected components of each mask) of the
    fraction of the region scoring >= t; FPR(t) is the fraction of normal pixels scoring >= t.
    The curve is integrated with the trapezoid rule from FPR 0 to exactly `fpr_limit` (the last
    segment is interpolated there) -- the standard MVTec normalisation, not a min-max rescale.

    Why not binarise the maps at each threshold and label the result: that is O(T * n) and must
    subsample thresholds. Instead regions are labelled once, and every defect pixel carries the
    weight 1 / (R * |its region|), so PRO(t) is just the total weight of defect pixels >= t. After
    one sort of each pixel class, PRO and FPR at *every* distinct score come from `searchsorted`
    plus a cumulative sum; equal scores enter together. Only the normals needed to reach
    `fpr_limit` are sorted (found with an O(n) partition).

    `num_thresholds`: evaluate only at that many evenly spaced thresholds from max to min score
    (the classic approximation) instead of every distinct score. `negatives`: the pixels FPR counts (`_negatives`).
    """
    if not 0 < fpr_limit <= 1:
        raise BadInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    per_image, masks, maps = _pixel_inputs(masks, maps)
    neg = maps[_negatives(per_image, masks, negatives)]
    pos = maps[masks]
    n_normal = neg.size
    region = _regions(per_image)
    weight = 1.0 / (np.bincount(region)[region] * (region.max() + 1.0))
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    tail = np.append(np.cumsum(weight[order][::-1])[::-1], 0.0)   # tail[i] = weight of pos[i:]

    if num_thresholds is None:
        # Normals beyond the first ceil(limit*n)+1 can only matter past fpr_limit: leave them unsorted.
        k = min(neg.size, math.ceil(fpr_limit * neg.size) + 1)
        v = np.partition(neg, neg.size - k)[neg.size - k]     # k-th largest normal score
        neg = np.sort(neg[neg >= v])
        thr = np.unique(np.concatenate([neg, pos[np.searchsorted(pos, v, "left"):]]))[::-1]
    else:
        thr = np.linspace(max(neg.max(), pos[-1]), min(neg.min(), pos[0]), num_thresholds)
        neg = np.sort(neg)
    fpr = (neg.size - np.searchsorted(neg, thr, "left")) / n_normal
    pro = tail[np.searchsorted(pos, thr, "left")]
    return min(1.0, max(0.0, _area_to(fpr, pro, fpr_limit)))


def aupro_reference(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = 1000,
                    negatives: str = "all") -> float:
    """Slow, literal AUPRO for tests: binarise at each threshold, measure every region, integrate.

    `num_thresholds=None` uses every distinct score (exact); otherwise evenly spaced thresholds. `negatives`:
    "normal_images" counts false positives on the images without a defect pixel only.
    """
    from skimage.measure import label

    _pixel_inputs(masks, maps)                            # validation only: this reference needs (N, H, W)
    masks, maps = _binary("masks", masks), np.asarray(maps, dtype=np.float64)
    if num_thresholds is None:
        thresholds = np.unique(maps)[::-1]
    else:
        thresholds = np.linspace(maps.max(), maps.min(), num_thresholds)
    regions = []                                          # (image index, boolean region mask)
    for i, m in enumerate(masks):
        lab = label(m, connectivity=2)
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    normal = ~masks if negatives == "all" else np.broadcast_to(~masks.any(axis=(1, 2))[:, None, None], masks.shape)
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        pred = maps >= t
        fprs.append(np.logical_and(pred, normal).sum() / normal.sum())
        pros.append(np.mean([pred[i][r].sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    beyond = np.flatnonzero(~keep)
    if beyond.size:                                       # interpolate PRO where FPR crosses the limit
        b = beyond[0]
        x0, y0, x1, y1 = fprs[b - 1], pros[b - 1], fprs[b], pros[b]
        x.append(fpr_limit)
        y.append(y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0))
    return float(np.trapezoid(y, x) / fpr_limit)


def pixel_bootstrap(masks, maps, n_boot: int = 1000, seed=0, bins: int = 4096, fpr_limit: float = 0.3,
                    chunk: int = 250) -> dict:
    """{"pixel_auroc": draws, "aupro": draws} over ``n_boot`` bootstrap resamples of the test *images* (those with
    defect pixels and those without each drawn with replacement, their counts kept): how far the pooled pixel
    figures could move with other test images like these. Pixels of one image are not independent, so images,
    not pixels, are resampled.

    Why binned: each resample would otherwise re-sort 10^7-10^8 pixels. Every pixel is put once in one of
    ``bins`` score bins (edges at quantiles of a fixed sample of all pixels, so the bins are fine where the
    scores are dense); each image keeps its normal- and defect-pixel counts per bin and each defect region its
    share per bin (`pixel_histograms`), and a resample's figures are count-weighted sums of those
    (`binned_pixel_figures`). Thresholds then sit at bin edges: on the sample itself the binned figures differ
    from the exact ones by under 0.005 (tested)."""
    _check_n_boot(n_boot)
    return bootstrap_histograms(pixel_histograms(masks, maps, bins, seed), n_boot, seed, fpr_limit, chunk)


def bootstrap_histograms(h: dict, n_boot: int = 1000, seed=0, fpr_limit: float = 0.3, chunk: int = 250) -> dict:
    """`pixel_bootstrap`'s draws from per-image histograms ``h`` (`pixel_histograms`, or `PixelStats.histograms`
    when the maps were not kept). A draw with no normal pixel, whose figures do not exist (only defect images whose
    masks cover them whole: a test set without normal images), is left out and counted in ``undefined_draws``: it gave
    NaN pixel-AUROC draws, an interval of [nan, nan], and AUPRO draws of 0.0 (an audit, session 52)."""
    _check_n_boot(n_boot)
    has_defect = np.asarray(h["pos"].sum(1)).ravel() > 0
    normals_in = np.asarray(h["neg"].sum(1)).ravel()   # each image's normal pixels
    # an image with no pixel counted (`normal_images_histograms`' defect image with an empty mask) is left out of
    # the draws: resampled among the normal images, a draw of it alone had no normal pixel (NaN, 0.0 AUPRO draws)
    counted = has_defect | (normals_in > 0)
    groups = [np.flatnonzero(has_defect), np.flatnonzero(counted & ~has_defect)]
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)[1:]]   # a stream per group
    aurocs, apros, undefined = [], [], 0
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        w = np.zeros((k, len(has_defect)))
        for g, rng in zip(groups, rngs):
            if g.size:
                w[:, g] = rng.multinomial(g.size, np.full(g.size, 1 / g.size), size=k)
        a, p = binned_pixel_figures(w, h, fpr_limit)
        ok = w @ normals_in > 0
        undefined += int((~ok).sum())
        aurocs.append(a[ok])
        apros.append(p[ok])
    return {"pixel_auroc": np.concatenate(aurocs), "aupro": np.concatenate(apros), "undefined_draws": undefined}


def normal_images_histograms(h: dict, flags=None) -> dict:
    """``h`` (`pixel_histograms` or `PixelStats.histograms`) with the normal counts of the images that are not normal
    removed (``flags``: one bool per image, default the images without a defect pixel): the bootstrap of the figures
    against normal images alone (`NORMAL_IMAGES_RULE`)."""
    from scipy import sparse
    keep = (np.asarray(h["pos"].sum(1)).ravel() == 0) if flags is None else np.asarray(flags, bool).ravel()
    keep = keep.astype(np.float64)
    neg = sparse.diags_array(keep) @ h["neg"] if sparse.issparse(h["neg"]) else h["neg"] * keep[:, None]
    return {**h, "neg": neg}


def pixel_histograms(masks, maps, bins: int = 4096, seed=0) -> dict:
    """Per image the counts of normal ("neg") and defect ("pos") pixels in each score bin, per defect region
    (8-connected, as `aupro`) its share at or above each bin ("tail") and its image ("owner")."""
    per_image, _, flat = _pixel_inputs(masks, maps)   # validated; ``flat``: every pixel's score, once
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0])
    sample = flat if flat.size <= 1 << 21 else flat[rng.choice(flat.size, 1 << 21, replace=False)]
    edges = np.unique(np.quantile(sample.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    nb = edges.size + 1
    neg, pos = np.zeros((len(per_image), nb)), np.zeros((len(per_image), nb))   # filled in place: no int64 lists
    tail, owner = [], []                                                        # and float64 copies of them
    for i, (m, a) in enumerate(zip(per_image, maps)):
        a = _finite("maps", a)   # as _pixel_inputs read it (torch, bfloat16: np.asarray refused those)
        b = np.searchsorted(edges, np.asarray(a, np.float64).ravel(), "right")
        m = np.asarray(m).ravel()
        neg[i] = np.bincount(b[~m], minlength=nb)
        pos[i] = np.bincount(b[m], minlength=nb)
        if not m.any():   # no defect pixel, no region: not labelled (most test images are normals)
            continue
        lab, n = ndimage.label(m.reshape(np.shape(per_image[i])), structure=np.ones((3, 3), dtype=int))
        if n:   # every region's counts per bin in one pass: row r - 1 is region r
            c = np.bincount(lab.ravel()[m] * nb + b[m], minlength=(n + 1) * nb).reshape(n + 1, nb)[1:]
            tail.append(np.cumsum(c[:, ::-1], axis=1)[:, ::-1] / c.sum(1, keepdims=True))
            owner += [i] * n
    return {"neg": neg, "pos": pos,
            "tail": np.concatenate(tail) if tail else np.zeros((0, nb)), "owner": np.array(owner, dtype=int)}


def binned_pixel_figures(w, h: dict, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(pixel AUROC, AUPRO) of each row of image weights ``w`` (k, images) from `pixel_histograms` ``h`` (its
    "neg" / "pos" may be scipy sparse arrays)."""
    neg, pos = w @ h["neg"], w @ h["pos"]
    fpr = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1] / neg.sum(1, keepdims=True)   # normals at or above each bin
    wr = w[:, h["owner"]]
    if "tail" in h:
        pro = (wr @ h["tail"]) / wr.sum(1, keepdims=True)
    else:   # "share" (sparse): each region's share per bin; the tail sum after the weighting, not before
        pro = np.cumsum((wr @ h["share"])[:, ::-1], axis=1)[:, ::-1] / wr.sum(1, keepdims=True)
    apro = [min(1.0, max(0.0, _area_to(f[::-1], p[::-1], fpr_limit))) for f, p in zip(fpr, pro)]
    return _binned_auroc(neg, pos), np.array(apro)


def _binned_auroc(neg, pos) -> np.ndarray:
    """AUROC of binned counts (B, bins): defect pixels above every normal of lower bins, ½ against their own."""
    below = np.cumsum(neg, axis=1) - neg
    return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


# ----------------------------------------------------------------------------- streamed (maps not kept)
KEY_BITS = 20   # sign, exponent and 11 mantissa bits of a float32: bins 2^-11 of their octave wide (< 5e-4 relative)


def score_keys(a, bits: int = KEY_BITS) -> np.ndarray:
    """Order-preserving uint32 bin keys of float32 scores: the bit pattern with negatives' bits flipped (and the
    sign bit set on the others), so keys sort as the scores do, cut to its top ``bits``. Why: bins that need no
    score range in advance, so a map can be binned the moment it is made."""
    u = (np.asarray(a, np.float32) + np.float32(0)).view(np.uint32)   # + 0: -0.0 is +0.0, one key as one score
    u = np.where(u >> np.uint32(31), ~u, u | np.uint32(1 << 31))
    return u >> np.uint32(32 - bits)


class PixelStats:
    """Per image, the pixel statistics pixel AUROC, AUPRO and their image bootstrap need, taken from each map as it is
    scored so the maps need not be kept: a sparse histogram over `score_keys` bins (the keys present, normal and
    defect counts) and, per 8-connected defect region (as `aupro` labels them), its counts per key. The figures are
    then exact for the maps rounded down to their bins: ties within a bin count ½, as equal scores do."""

    def __init__(self, bits: int = KEY_BITS, origin: float = 0.0):
        if not 8 < bits <= 24:
            raise BadInputError(f"bits must be in 9..24, got {bits}")
        # origin: subtracted before binning (order unchanged): bins are 2^-11 of their value wide, so scores near
        # 1000 with a spread of 0.1 would share a few bins; less a typical score, they sit near 0 where bins are fine
        self.bits, self.origin, self.images = bits, float(origin), []   # per image: (keys, neg, pos, regions, shape)

    def __len__(self) -> int:
        return len(self.images)

    def add(self, mask, score_map) -> None:
        """Bins one image's map (2-D) against its mask; neither is kept."""
        a, m = _finite("maps", score_map), _binary("masks", mask)
        if m.shape != a.shape or m.ndim != 2:
            raise BadInputError(f"image {len(self)}: mask {m.shape} and map {a.shape} must be the same (H, W)")
        k = score_keys(a.ravel() - np.float32(self.origin), self.bits)
        if not m.any():
            keys, neg = np.unique(k, return_counts=True)
            self.images.append((keys.astype(np.uint32), neg.astype(np.uint32), None, None, m.shape))
            return
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))   # 0: normal pixels, r: region r
        u, c = np.unique(k.astype(np.int64) * (n + 1) + lab.ravel(), return_counts=True)
        key, reg = u // (n + 1), u % (n + 1)
        keys, inv = np.unique(key, return_inverse=True)
        d = reg > 0
        neg = np.bincount(inv[~d], c[~d], minlength=keys.size)
        pos = np.bincount(inv[d], c[d], minlength=keys.size)
        regions = ((reg[d] - 1).astype(np.int32), key[d].astype(np.uint32), c[d].astype(np.uint32), n)
        self.images.append((keys.astype(np.uint32), neg.astype(np.uint32), pos.astype(np.uint32), regions, m.shape))

    def subset(self, idx) -> "PixelStats":
        """The images ``idx`` only (their arrays shared, not copied)."""
        out = PixelStats(self.bits, self.origin)
        out.images = [self.images[i] for i in idx]
        return out

    def defect_pixels(self) -> np.ndarray:
        """Each image's number of defect pixels."""
        return np.array([0 if p is None else int(p.sum()) for _, _, p, _, _ in self.images], dtype=np.int64)

    def shapes(self) -> list:
        return [s for *_, s in self.images]

    def _pooled(self, negatives="all") -> tuple[np.ndarray, np.ndarray]:
        """Normal and defect counts of all images per key, dense over the 2^bits keys (8 MB each at 20 bits);
        ``negatives``: normal counts of every image, or of the normal images alone (`_negatives`)."""
        flags = normal_image_flags([p is not None and p.any() for _, _, p, _, _ in self.images], negatives)
        neg, pos = np.zeros(1 << self.bits), np.zeros(1 << self.bits)
        for i, (keys, n, p, _, _) in enumerate(self.images):   # keys are unique within an image: fancy-index adds
            if flags is None or flags[i]:
                neg[keys] += n
            if p is not None:
                pos[keys] += p
        n_def = int(pos.sum())
        if n_def == 0 or neg.sum() == 0:
            raise BadInputError(f"masks contain only {'defect' if n_def else 'normal'} pixels; pixel metrics need both",
                                fix="include images with annotated defects (and normal pixels)")
        return neg, pos

    def _regions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region id, key, count) of every region's keys over all images, ids 0..R-1."""
        rid, key, cnt, offset = [], [], [], 0
        for *_, r, _ in self.images:
            if r is not None:
                rid.append(r[0] + offset)
                key.append(r[1])
                cnt.append(r[2])
                offset += r[3]
        return np.concatenate(rid), np.concatenate(key), np.concatenate(cnt).astype(np.float64)

    def image_pixel_aurocs(self) -> list[float | None]:
        """`image_pixel_aurocs` of the binned maps: each image's AUROC from its own sparse histogram (its keys are
        sorted), ties within a key counting one half; None for an image without both kinds of pixel."""
        out = []
        for _, n, p, _, _ in self.images:
            if p is None or not n.sum() or not p.sum():
                out.append(None)
                continue
            n, p = n.astype(np.float64), p.astype(np.float64)
            below = np.cumsum(n) - n   # normal pixels in lower keys
            out.append(float((p * (below + 0.5 * n)).sum() / (p.sum() * n.sum())))
        return out

    def within_image_auroc(self) -> tuple[float, int] | None:
        """`within_image_auroc` of the binned maps."""
        return mean_of(self.image_pixel_aurocs())

    def pixel_auroc(self, negatives="all") -> float:
        neg, pos = self._pooled(negatives)
        return float(_binned_auroc(neg[None], pos[None])[0])

    def aupro(self, fpr_limit: float = 0.3, negatives="all") -> float:
        """`aupro` with a threshold at every key that holds a pixel (keys taken as scores)."""
        if not 0 < fpr_limit <= 1:
            raise BadInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        neg, pos = self._pooled(negatives)
        rid, key, cnt = self._regions()
        size = np.bincount(rid, cnt)
        share = np.bincount(key, cnt / (size[rid] * size.size), minlength=neg.size)   # PRO weight per key
        held = np.flatnonzero((neg > 0) | (pos > 0))[::-1]      # keys that hold a pixel, highest first
        fpr = np.cumsum(neg[held]) / neg.sum()
        pro = np.cumsum(share[held])
        return min(1.0, max(0.0, _area_to(fpr, pro, fpr_limit)))

    def histograms(self, bins: int = 4096) -> dict:
        """`pixel_histograms` of these images (sparse "neg" / "pos", per region "share" instead of "tail"): bin
        edges at quantiles of the pooled pixel counts over the keys, as `pixel_histograms` puts them at quantiles of
        the pixels' scores."""
        from scipy import sparse
        neg, pos = self._pooled()
        cum = np.cumsum(neg + pos)
        at = np.searchsorted(cum, np.linspace(0, 1, bins + 1)[1:-1] * cum[-1], "left")
        edges = np.unique(at)   # a key k is in bin searchsorted(edges, k, "right"), as scores are there
        nb = edges.size + 1
        rows, cols, nv, pv = [], [], [], []
        for i, (keys, n, p, _, _) in enumerate(self.images):
            b, inv = np.unique(np.searchsorted(edges, keys, "right"), return_inverse=True)
            rows.append(np.full(b.size, i))
            cols.append(b)
            nv.append(np.bincount(inv, n, minlength=b.size))
            pv.append(np.bincount(inv, p, minlength=b.size) if p is not None else np.zeros(b.size))
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        shape = (len(self), nb)
        h = {"neg": sparse.csr_array((np.concatenate(nv), (rows, cols)), shape=shape),
             "pos": sparse.csr_array((np.concatenate(pv), (rows, cols)), shape=shape)}
        rid, key, cnt = self._regions()
        size = np.bincount(rid, cnt)
        h["share"] = sparse.csr_array((cnt / size[rid], (rid, np.searchsorted(edges, key, "right"))),
                                      shape=(size.size, nb))   # duplicate (region, bin) entries are summed
        h["owner"] = np.concatenate([np.full(r[3], i) for i, (*_, r, _) in enumerate(self.images) if r is not None])
        return h


# ----------------------------------------------------------------------------- all at once
def evaluate_maps(labels, scores, masks=None, maps=None) -> dict:
    """Image metrics, plus pixel AUROC and AUPRO when masks (and maps) are given.

    Pixel metrics are skipped with a warning when no test image has a defect pixel (e.g. a test
    set annotated only at image level), rather than failing the whole evaluation.
    """
    out = {"image_auroc": image_auroc(labels, scores), "image_ap": image_ap(labels, scores),
           "f1_max": f1_max(labels, scores)[0]}
    if masks is None:
        return out
    if maps is None:
        raise BadInputError("masks were given but maps were not", fix="pass the anomaly maps as `maps`")
    per = [_binary("masks", m) for m in masks] if isinstance(masks, (list, tuple)) else [_binary("masks", masks)]
    if not any(m.any() for m in per):   # lists may hold masks of different sizes (stitched tiled images)
        warnings.warn("no test image has a defect pixel; pixel_auroc and aupro skipped")
        return out
    out["pixel_auroc"] = pixel_auroc(masks, maps)
    out["aupro"] = aupro(masks, maps)
    return out
