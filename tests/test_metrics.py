"""Metrics: fast pixel AUROC / AUPRO against sklearn and a slow literal reference, plus edge cases."""
import time
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from uninet_feat import metrics as M
from uninet_feat.errors import BadInputError


def blobs(seed, n=4, size=24, empty=(1,), levels=None):
    """Masks with several blobs per image (images in `empty` have none) and maps that half-find them.

    `levels` quantises the maps so many pixels tie (exercising tie handling).
    """
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5))
    masks = smooth > np.quantile(smooth, 0.9)
    masks[list(empty)] = False
    maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size))
    if levels:
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


# ----------------------------------------------------------------------------- image metrics
def test_image_metrics_match_sklearn_and_brute_force_f1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.4 * labels, 1)           # ties
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    f1, thr = M.f1_max(labels, scores)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        best = max(best, 2 * tp / (pred.sum() + labels.sum()))
    assert f1 == pytest.approx(best)
    pred = scores >= thr                                          # threshold reproduces the F1
    assert 2 * np.sum(pred & (labels == 1)) / (pred.sum() + labels.sum()) == pytest.approx(f1)
    assert 0 < M.image_ap(labels, scores) <= 1


@pytest.mark.parametrize("levels", [None, 4])
def test_auroc_bootstrap_equals_sklearn_on_each_resample(levels):
    """Each resample's AUROC from draw counts against the plain way: the resample built as lists of images and
    scored by scikit-learn (ties included), over blocks of the counts the bootstrap draws."""
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(9, int), np.ones(14, int)]
    scores = rng.normal(size=23) + labels
    if levels:
        scores = np.round(scores * levels) / levels
    pos, neg = scores[labels == 1], scores[labels == 0]
    got, want = [], []
    for d, n in M.bootstrap_counts(14, 9, 200, seed=7, chunk=64):
        assert d.shape[1] == 14 and n.shape[1] == 9 and (d.sum(1) == 14).all() and (n.sum(1) == 9).all()
        got.append(M.auroc_of_counts(pos, neg, d, n))
        want += [roc_auc_score(np.r_[np.zeros(9), np.ones(14)], np.r_[np.repeat(neg, n[b]), np.repeat(pos, d[b])])
                 for b in range(len(d))]
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-12)
    boot = M.image_auroc_bootstrap(labels, scores, n_boot=200, seed=7)
    assert boot.shape == (200,) and boot.std() > 0.02   # resamples of 23 images really move the figure
    np.testing.assert_allclose(boot[:64], np.asarray(want[:64]), atol=1e-12)   # the same first block


def test_auroc_interval_contains_the_figure_narrows_with_data_and_repeats_by_seed():
    rng = np.random.default_rng(0)
    def sample(n0, n1):
        labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
        return labels, rng.normal(size=n0 + n1) + 1.2 * labels
    small, large = sample(6, 7), sample(600, 700)   # AITEX-sized against magnetic-tile-sized and more
    widths = []
    for labels, scores in (small, large):
        lo, hi = M.interval(M.image_auroc_bootstrap(labels, scores))
        assert lo <= M.image_auroc(labels, scores) <= hi
        widths.append(hi - lo)
    assert widths[0] > 0.25 and widths[1] < 0.06
    labels, scores = small
    same = M.image_auroc_bootstrap(labels, scores, seed=1)
    np.testing.assert_array_equal(same, M.image_auroc_bootstrap(labels, scores, seed=1))
    assert not np.array_equal(same, M.image_auroc_bootstrap(labels, scores, seed=2))
    assert M.interval(M.image_auroc_bootstrap([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])) == [1.0, 1.0]
    with pytest.raises(ValueError, match="only normal"):
        M.image_auroc_bootstrap([0, 0], [0.1, 0.2])


def test_group_metrics_give_each_group_its_interval_and_the_mean_one_from_averaged_draws():
    """The mean over groups (AITEX's four fabrics) gets the interval of the mean, narrower than the groups' own
    on average: each group is resampled on its own seeded stream and the draws are averaged."""
    from uninet_feat.evaluate import group_metrics
    rng = np.random.default_rng(5)
    groups = ["a"] * 13 + ["b"] * 18 + ["c"] * 37
    labels = np.array([0] * 6 + [1] * 7 + [0] * 6 + [1] * 12 + [0] * 6 + [1] * 31)
    scores = rng.normal(size=labels.size) + 1.5 * labels
    out = group_metrics(groups, labels, scores, {}, False)
    draws = []
    for k, g in enumerate("abc"):
        idx = [i for i, x in enumerate(groups) if x == g]
        draws.append(M.image_auroc_bootstrap(labels[idx], scores[idx], seed=[0, k + 1]))
        assert out["per_group"][g]["image_auroc"] == M.image_auroc(labels[idx], scores[idx])
        assert out["per_group"][g]["image_auroc_interval"] == M.interval(draws[-1])
    assert out["mean_image_auroc"] == pytest.approx(np.mean([out["per_group"][g]["image_auroc"] for g in "abc"]))
    assert out["mean_image_auroc_interval"] == M.interval(np.mean(draws, axis=0))
    width = lambda v: v[1] - v[0]  # noqa: E731
    assert width(out["mean_image_auroc_interval"]) < np.mean([width(out["per_group"][g]["image_auroc_interval"])
                                                              for g in "abc"])
    assert group_metrics(["a"] * len(labels), labels, scores, {}, False) == {}


@pytest.mark.parametrize("levels", [None, 6])
def test_binned_pixel_figures_equal_the_exact_metrics_of_the_resampled_images(levels):
    """Weights are draw counts: the binned figures of weights w equal the exact pixel AUROC and AUPRO of the
    image list with image i repeated w[i] times (to binning, < 0.005), for the sample itself too; images of
    different sizes, regions touching the border, ties."""
    masks, maps = blobs(4, n=10, size=40, empty=(1, 6), levels=levels)
    masks, maps = list(masks), list(maps)
    masks[3], maps[3] = masks[3][:, :25], maps[3][:, :25]          # another size
    h = M.pixel_histograms(masks, maps)
    w = np.array([np.ones(10), [2, 0, 1, 3, 0, 1, 1, 0, 2, 0], [0, 1, 0, 0, 4, 1, 0, 2, 1, 1]])
    auroc, apro = M.binned_pixel_figures(w, h)
    for row, a, p in zip(w.astype(int), auroc, apro):
        rep_m = [m for m, k in zip(masks, row) for _ in range(k)]
        rep_a = [x for x, k in zip(maps, row) for _ in range(k)]
        assert a == pytest.approx(M.pixel_auroc(rep_m, rep_a), abs=5e-3)
        assert p == pytest.approx(M.aupro(rep_m, rep_a), abs=5e-3)
    assert len(set(np.round(auroc, 6))) == 3   # the resamples really differ


def test_pixel_bootstrap_keeps_defect_images_repeats_by_seed_and_brackets_the_figure():
    masks, maps = blobs(2, n=16, size=32, empty=(0, 3, 9))
    masks, maps = list(masks), list(maps)
    d = M.pixel_bootstrap(masks, maps, n_boot=300, seed=4, chunk=128)
    assert d["pixel_auroc"].shape == d["aupro"].shape == (300,)
    for key, exact in (("pixel_auroc", M.pixel_auroc(masks, maps)), ("aupro", M.aupro(masks, maps))):
        lo, hi = M.interval(d[key])
        assert lo < exact < hi and hi - lo > 0.01
    again = M.pixel_bootstrap(masks, maps, n_boot=300, seed=4)   # other blocks, same draws
    np.testing.assert_allclose(again["pixel_auroc"], d["pixel_auroc"], atol=1e-12)
    assert not np.allclose(M.pixel_bootstrap(masks, maps, n_boot=300, seed=5)["aupro"], d["aupro"])


def test_image_errors_single_class_and_nan():
    with pytest.raises(ValueError, match="only normal"):
        M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only defect"):
        M.f1_max([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"scores contains 2 non-finite"):
        M.image_ap([0, 1, 1], [np.nan, 0.2, np.inf])
    with pytest.raises(ValueError, match="0/1"):
        M.image_auroc([0, 2], [0.1, 0.2])



def test_integer_and_bfloat16_scores_keep_their_order():
    """Integer scores went through float32, which merges integers above 2**24 into ties (0.75 for 0.875); a torch
    bfloat16 tensor was a TypeError from numpy; text is named."""
    import torch
    big = np.array([2**24, 2**24 + 1, 2**24 + 1, 2**24 + 2], np.int64)
    assert M.image_auroc([0, 0, 1, 1], big) == pytest.approx(roc_auc_score([0, 0, 1, 1], big)) == 0.875
    s = torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=torch.bfloat16)
    assert M.image_auroc([0, 1, 0, 1], s) == 1.0
    assert M.pixel_auroc(np.array([[[0, 1], [0, 1]]]), s.view(1, 2, 2)) == 1.0
    with pytest.raises(BadInputError, match="scores must be numbers"):
        M.image_auroc([0, 1], ["a", "b"])


# ----------------------------------------------------------------------------- pixel AUROC
@pytest.mark.parametrize("levels", [None, 4, 20])
def test_pixel_auroc_matches_sklearn_with_ties(levels):
    masks, maps = blobs(1, levels=levels)
    expect = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(expect, abs=1e-12)
    assert M.pixel_auroc(masks, maps, chunk=7) == pytest.approx(expect, abs=1e-12)  # chunked path


def test_pixel_errors():
    masks, maps = blobs(2)
    bad = maps.copy()
    bad[0, 0, :3] = np.nan
    with pytest.raises(ValueError, match=r"maps contains 3 non-finite"):
        M.pixel_auroc(masks, bad)
    with pytest.raises(ValueError, match=r"maps contains 3 non-finite"):
        M.aupro(masks, bad)
    with pytest.raises(ValueError, match="only normal pixels"):
        M.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        M.pixel_auroc(masks, maps[:, :-1])


def test_pixel_metrics_take_images_of_different_sizes():
    """Full-size maps of tiled images differ in size between images: lists of 2-D arrays are pooled as
    one set of pixels, regions stay per image. Two images placed side by side (masks clear of the
    seam) are the same pixels and regions, so every figure must match the single joined image."""
    (ma, pa), (mb, pb) = blobs(11, n=1, size=24, empty=()), blobs(12, n=1, size=40, empty=())
    ma, pa, mb, pb = ma[0], pa[0], mb[0, :24], pb[0, :24]          # 24x24 and 24x40
    for m in (ma, mb):
        m[:, [0, -1]] = False
    joined_m, joined_a = np.hstack([ma, mb])[None], np.hstack([pa, pb])[None]
    assert M.pixel_auroc([ma, mb], [pa, pb]) == pytest.approx(M.pixel_auroc(joined_m, joined_a), abs=1e-12)
    assert M.aupro([ma, mb], [pa, pb]) == pytest.approx(M.aupro(joined_m, joined_a), abs=1e-12)
    assert M.aupro([ma, mb], [pa, pb]) != pytest.approx(M.aupro(joined_m, joined_a[:, :, ::-1]), abs=1e-3)
    with pytest.raises(ValueError, match=r"image 1: mask \(24, 40\) and map \(24, 39\)"):
        M.pixel_auroc([ma, mb], [pa, pb[:, :-1]])
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        M.aupro([ma, mb], [pa])


# ----------------------------------------------------------------------------- AUPRO
@pytest.mark.parametrize("seed,levels,limit", [(3, None, 0.3), (4, 5, 0.3), (5, 30, 0.3),
                                               (6, None, 1.0), (7, 10, 0.05), (8, 3, 0.3)])
def test_aupro_exact_equals_literal_reference(seed, levels, limit):
    masks, maps = blobs(seed, levels=levels, empty=(1, 3))
    n_regions = sum(ndimage.label(m, np.ones((3, 3)))[1] for m in masks)
    assert n_regions > 2                                          # several regions, two defect-free images
    ref = M.aupro_reference(masks, maps, fpr_limit=limit, num_thresholds=None)  # every distinct score
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)


def test_the_bootstrap_against_normal_images_draws_no_image_it_does_not_count():
    """A defective image whose mask is empty has no pixel counted against normal images alone (its normal counts
    removed, no defect pixel). Resampled among the normal images, a draw of it alone had no normal pixel: NaN
    pixel-AUROC draws (an interval [nan, nan]) and AUPRO draws of 0.0, seen on a test set of 1 normal image. Such an
    image now leaves the draws: they are the draws without it, and finite."""
    masks, maps = blobs(5, n=3, empty=(1, 2))   # image 0 defective, 1 an empty-mask defect image, 2 normal
    flags = np.array([False, False, True])
    h = M.normal_images_histograms(M.pixel_histograms(list(masks), list(maps)), flags)
    draws = M.bootstrap_histograms(h, n_boot=400, seed=1)
    assert all(np.isfinite(d).all() for d in draws.values())
    assert draws["aupro"].min() > 0
    keep = [0, 2]
    alone = M.bootstrap_histograms(M.normal_images_histograms(
        M.pixel_histograms([masks[i] for i in keep], [maps[i] for i in keep]), flags[keep]), n_boot=400, seed=1)
    for k in draws:
        np.testing.assert_allclose(draws[k], alone[k], atol=5e-3)   # same draws; bin edges from other pixels
    pooled = M.pixel_histograms(list(masks), list(maps))   # pooled, every image counts: the draws as before
    g = M.bootstrap_histograms(pooled, n_boot=50, seed=1)
    assert np.isfinite(g["pixel_auroc"]).all() and len(np.unique(g["pixel_auroc"])) > 1


def test_a_pooled_draw_with_no_normal_pixel_is_left_out_and_counted():
    """No normal test image and a defect image whose mask covers it whole: a draw of that image alone has no normal
    pixel, so its pixel AUROC was NaN (the interval [nan, nan], and NaN in the JSON) and its AUPRO 0.0 (an audit,
    session 52). Such draws leave the draws and are counted; the others are as before."""
    rng = np.random.default_rng(0)
    whole, part = np.ones((8, 8), bool), np.zeros((8, 8), bool)
    part[2:4, 2:4] = True
    maps = [rng.random((8, 8)).astype(np.float32) for _ in range(2)]
    h = M.pixel_histograms([whole, part], maps)
    draws = M.bootstrap_histograms(h, n_boot=200)
    n = len(draws["pixel_auroc"])
    assert draws["undefined_draws"] == 200 - n and 20 < 200 - n < 100 and len(draws["aupro"]) == n
    assert np.isfinite(draws["pixel_auroc"]).all() and np.isfinite(draws["aupro"]).all()
    w = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[1]).multinomial(2, [0.5, 0.5], size=200)
    a, p = M.binned_pixel_figures(w.astype(float), h, 0.3)   # the same resamples, each scored
    ok = w[:, 1] > 0   # a draw holding the partly masked image has normal pixels
    np.testing.assert_array_equal(draws["pixel_auroc"], a[ok])
    np.testing.assert_array_equal(draws["aupro"], p[ok])
    assert M.bootstrap_histograms(M.pixel_histograms([part, ~whole], maps), n_boot=50)["undefined_draws"] == 0


@pytest.mark.parametrize("seed,levels", [(3, None), (4, 5), (8, 3)])
def test_figures_against_normal_images_leave_out_the_defective_images_other_pixels(seed, levels):
    """`negatives="normal_images"`: defect pixels against the defect-free images' pixels alone, for pixel AUROC (as
    sklearn on those pixels) and AUPRO (as the literal reference counting false positives there); exact and binned
    (`PixelStats`) alike, and its bootstrap (`normal_images_histograms`) as the exact figures of resampled images."""
    masks, maps = blobs(seed, n=6, levels=levels, empty=(1, 3))
    maps = maps + 0.3 * masks.any(axis=(1, 2))[:, None, None]   # the defective images' backgrounds run hot
    clean = ~masks.any(axis=(1, 2))
    neg = maps[clean].ravel()
    want = roc_auc_score(np.r_[np.ones(masks.sum()), np.zeros(neg.size)], np.r_[maps[masks], neg])
    got = M.pixel_auroc(masks, maps, negatives="normal_images")
    assert got == pytest.approx(want, abs=1e-12)
    assert got > M.pixel_auroc(masks, maps) + 0.05              # the pooled figure counts the hot backgrounds
    ref = M.aupro_reference(masks, maps, num_thresholds=None, negatives="normal_images")
    assert M.aupro(masks, maps, negatives="normal_images") == pytest.approx(ref, abs=1e-9)
    assert ref > M.aupro(masks, maps) + 0.02
    st = M.PixelStats()
    for m, a in zip(masks, maps):
        st.add(m, a)
    assert st.pixel_auroc("normal_images") == pytest.approx(got, abs=5e-3)
    assert st.aupro(negatives="normal_images") == pytest.approx(ref, abs=5e-3)
    h = M.normal_images_histograms(M.pixel_histograms(list(masks), list(maps)))
    w = np.array([[1, 1, 1, 1, 1, 1], [2, 0, 1, 3, 0, 1]])
    auroc, apro = M.binned_pixel_figures(w, h)
    for row, a, p in zip(w, auroc, apro):
        rep_m = np.stack([m for m, k in zip(masks, row) for _ in range(k)])
        rep_a = np.stack([x for x, k in zip(maps, row) for _ in range(k)])
        assert a == pytest.approx(M.pixel_auroc(rep_m, rep_a, negatives="normal_images"), abs=5e-3)
        assert p == pytest.approx(M.aupro(rep_m, rep_a, negatives="normal_images"), abs=5e-3)
    sparse_h = M.normal_images_histograms(st.histograms())   # the streamed path's (sparse) histograms
    assert M.binned_pixel_figures(w[:1], sparse_h)[0][0] == pytest.approx(got, abs=5e-3)
    # one bool per image (evaluate's normal labels): a defective image with an empty mask is not a normal image
    flags = clean.copy()
    flags[3] = False
    assert M.pixel_auroc(masks, maps, negatives=flags) == pytest.approx(roc_auc_score(
        np.r_[np.ones(masks.sum()), np.zeros(maps[flags].size)], np.r_[maps[masks], maps[flags].ravel()]), abs=1e-12)
    assert M.aupro(masks, maps, negatives=flags) != pytest.approx(ref, abs=1e-6)
    assert st.aupro(negatives=flags) == pytest.approx(M.aupro(masks, maps, negatives=flags), abs=5e-3)
    with pytest.raises(BadInputError, match="no normal image"):
        M.pixel_auroc(masks[[0, 2]], maps[[0, 2]], negatives="normal_images")
    with pytest.raises(BadInputError, match="negatives must be one of"):
        M.aupro(masks, maps, negatives="normals")
    with pytest.raises(BadInputError, match="5 flags for 6 images"):
        M.pixel_auroc(masks, maps, negatives=flags[:5])
    with pytest.raises(BadInputError, match="an image marked normal has defect pixels"):
        st.pixel_auroc(np.ones(6, bool))


@pytest.mark.parametrize("seed", [9, 10])
def test_aupro_close_to_many_threshold_reference(seed):
    masks, maps = blobs(seed)
    fast = M.aupro(masks, maps)
    assert M.aupro_reference(masks, maps, num_thresholds=1000) == pytest.approx(fast, abs=1e-3)
    # subsampled mode evaluates exactly the reference's thresholds
    assert M.aupro(masks, maps, num_thresholds=200) == pytest.approx(
        M.aupro_reference(masks, maps, num_thresholds=200), abs=1e-9)


def test_aupro_perfect_inverted_and_constant_maps():
    masks, _ = blobs(11)
    assert M.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert M.aupro(masks, (~masks).astype(np.float32)) == pytest.approx(0.0)
    # constant map: one threshold, curve (0,0)->(1,1); area to 0.3 is 0.3**2/2, normalised 0.15
    assert M.aupro(masks, np.zeros(masks.shape, np.float32)) == pytest.approx(0.15)


def test_aupro_hand_case_8_connectivity_and_interpolation():
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True                       # region A: diagonal neighbours, one region
    masks[0, 4, 4] = True                                         # region B
    maps = np.zeros((1, 6, 6), np.float32)
    maps[0, 1, 1] = maps[0, 4, 4] = 1.0                           # all of B, half of A, no normals
    # curve (0,0)->(0,0.75)->(1,1): PRO at FPR .3 is .825, area (.75+.825)/2*.3, normalised .7875
    # (4-connectivity would give 3 regions and 0.7167)
    assert M.aupro(masks, maps) == pytest.approx(0.7875)
    assert M.aupro_reference(masks, maps, num_thresholds=None) == pytest.approx(0.7875)


@pytest.mark.parametrize("limit,expect", [(0.25, 0.025 / 0.25), (0.35, 0.1 / 0.35), (1.0, 0.75)])
def test_aupro_hand_case_limit_between_normal_scores(limit, expect):
    # two 1-pixel regions scoring .8 and .7; ten normals at .95, .85, ..., .05
    maps = np.array([[[0.8, .95, .85, .75, .65, .55, .45, .35, .25, .15, .05, 0.7]]], np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[0, 0, [0, -1]] = True
    # curve: (.1,0) (.2,0) (.2,.5) (.3,.5) (.3,1) (.4,1) ... (1,1)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expect)
    assert M.aupro_reference(masks, maps, fpr_limit=limit, num_thresholds=None) == pytest.approx(expect)


# ----------------------------------------------------------------------------- evaluate_maps
def test_evaluate_maps_keys_and_skip_without_defect_pixels():
    masks, maps = blobs(12)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    out = M.evaluate_maps(labels, scores, masks, maps)
    assert set(out) == {"image_auroc", "image_ap", "f1_max", "pixel_auroc", "aupro"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in out.values())
    with pytest.warns(UserWarning, match="no test image has a defect pixel"):
        out = M.evaluate_maps(labels, scores, np.zeros_like(masks), maps)
    assert set(out) == {"image_auroc", "image_ap", "f1_max"}


# ----------------------------------------------------------------------------- scale
def test_pixel_metrics_on_2e7_pixels_stay_memory_sane():
    rng = np.random.default_rng(13)
    maps = rng.random((20, 1000, 1000), dtype=np.float32)       # 2e7 pixels, 80 MB
    masks = np.zeros(maps.shape, bool)
    masks[:, 100:160, 200:300] = True
    masks[::2, 500:520, 500:900] = True
    maps[masks] += 0.3
    start = time.perf_counter()
    tracemalloc.start()                                           # numpy reports its buffers here
    try:
        auc = M.pixel_auroc(masks, maps)
        pro = M.aupro(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if time.perf_counter() - start > 10:
        pytest.skip("machine too busy for the large-input check")
    assert 0.5 < auc < 1 and 0 < pro < 1
    assert peak < 6 * maps.nbytes, f"peak {peak / 2**20:.0f} MiB for {maps.nbytes / 2**20:.0f} MiB of maps"


def test_evaluate_maps_takes_maps_of_different_sizes_and_bootstraps_refuse_no_draws():
    """evaluate_maps took (N, H, W) masks only, though the pixel metrics it calls take lists of maps of different
    sizes (stitched tiled images): a numpy 'inhomogeneous shape' error. No draws: a BadInputError, not an
    IndexError or numpy's 'need at least one array to concatenate'."""
    rng = np.random.default_rng(0)
    maps = [rng.random((8, 8)), rng.random((8, 12))]
    masks = [np.zeros((8, 8), bool), np.zeros((8, 12), bool)]
    masks[1][2:4, 2:4] = True
    maps[1][2:4, 2:4] += 0.5
    got = M.evaluate_maps([0, 1], [0.1, 0.5], masks, maps)
    assert got["pixel_auroc"] == pytest.approx(M.pixel_auroc(masks, maps))
    assert got["aupro"] == pytest.approx(M.aupro(masks, maps))
    with pytest.warns(UserWarning, match="no test image has a defect pixel"):
        assert "aupro" not in M.evaluate_maps([0, 1], [0.1, 0.5], [np.zeros((8, 8), bool)] * 2, maps[:1] * 2)
    for call in (lambda: M.interval([]), lambda: M.image_auroc_bootstrap([0, 1], [0.0, 1.0], n_boot=0),
                 lambda: M.pixel_bootstrap(masks, maps, n_boot=0)):
        with pytest.raises(BadInputError, match="n_boot"):
            call()


def test_bootstrap_takes_the_maps_the_point_figures_take_and_within_image_refuses_unequal_lists():
    """pixel_bootstrap crashed on bfloat16 torch maps (pixel_auroc / aupro take them); within-image AUROC cut
    the longer of unequal mask and map lists short (zip) and gave a figure over the first images only."""
    import torch
    masks, maps = blobs(5, n=6, size=24, empty=(0,))
    tmaps = [torch.from_numpy(a).to(torch.bfloat16) for a in maps]
    d = M.pixel_bootstrap(list(masks), tmaps, n_boot=20, seed=1)
    ref = M.pixel_bootstrap(list(masks), [t.float().numpy() for t in tmaps], n_boot=20, seed=1)
    np.testing.assert_allclose(d["pixel_auroc"], ref["pixel_auroc"])
    with pytest.raises(BadInputError, match="6 masks but 5 maps"):
        M.within_image_auroc(list(masks), list(maps)[:5])


def test_labels_and_masks_as_device_tensors_are_taken_as_scores_are():
    """Scores and maps went through .cpu(), labels and masks through np.asarray: a CUDA tensor there raised
    "can't convert cuda:0 device type tensor to numpy". A tensor whose .numpy() refuses as a CUDA one's stands in."""
    import torch

    class OnDevice(torch.Tensor):
        def numpy(self, *a, **k):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def __array__(self, *a, **k):
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self, *a, **k):
            return torch.Tensor.cpu(self.as_subclass(torch.Tensor))
    dev = lambda t: t.as_subclass(OnDevice)   # noqa: E731
    labels, scores = torch.tensor([0, 1, 0, 1]), torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert M.image_auroc(dev(labels), dev(scores)) == 1.0
    masks, maps = blobs(3, n=3, size=16, empty=(0,))
    got = M.pixel_auroc(dev(torch.from_numpy(masks)), dev(torch.from_numpy(maps)))
    assert got == pytest.approx(M.pixel_auroc(masks, maps))
