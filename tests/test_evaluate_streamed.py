"""Pixel metrics past evaluate's pixel budget: maps binned as they are scored (metrics.PixelStats) give the exact
figures within TOL, keep no map, and evaluate says which path computed them."""
import gc
import tracemalloc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from uninet_feat import metrics as M
from uninet_feat.evaluate import _metrics, _PixelSink, group_metrics, per_label_metrics

from _tiny import register_tiny, run_with_plain_index, write_texture_set

# 20-bit keys leave 11 mantissa bits: every score moves by under 2^-11 of its octave, so pixels swap order only
# inside a bin. Measured: under 1e-5 on these sets, 2e-6 on magnetic tile; the bound leaves room without hiding a
# wrong count (a lost region or a mis-ordered bin moves these figures by 1e-2 or more).
TOL = 1e-3


def _set(seed=0, n=12, levels=None):
    """Maps of several sizes (a tiled image's full size differs from the others), negative values, images without
    a defect pixel, several 8-connected regions per defect image; ``levels``: many exact ties."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        h, w = (24, 40) if i % 3 == 0 else (32, 32)
        m = np.zeros((h, w), bool)
        if i % 2:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                m[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = True
        a = rng.normal(-0.2, 1.0, (h, w)) + 1.2 * m * rng.random((h, w))
        if levels:
            a = np.round(a * levels) / levels
        masks.append(m)
        maps.append(a.astype(np.float32))
    return masks, maps


def _stats(masks, maps, bits=M.KEY_BITS):
    st = M.PixelStats(bits)
    for m, a in zip(masks, maps):
        st.add(m, a)
    return st


def test_score_keys_keep_the_order_of_scores_and_zero_is_one_key():
    a = np.array([-np.inf, -3e8, -2.0, -1.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 1.0001, 7.5, 3e8], np.float32)
    k = M.score_keys(a, 32)
    assert np.all(np.diff(k.astype(np.int64)) >= 0) and k[5] == k[6]
    assert np.all(np.diff(M.score_keys(a).astype(np.int64)) >= 0)   # truncated: still monotone
    assert M.score_keys(np.float32(1.0)) == M.score_keys(np.float32(1.0004)) != M.score_keys(np.float32(1.001))


@pytest.mark.parametrize("levels", [None, 8])
def test_binned_pooled_figures_match_the_exact_ones(levels):
    masks, maps = _set(1, levels=levels)
    st = _stats(masks, maps)
    exact_auc, exact_pro = M.pixel_auroc(masks, maps), M.aupro(masks, maps)
    assert st.pixel_auroc() == pytest.approx(exact_auc, abs=TOL)
    assert st.aupro() == pytest.approx(exact_pro, abs=TOL)
    if levels:   # scores on a coarse grid: every bin holds one score, so the figures are the exact ones
        assert st.pixel_auroc() == pytest.approx(exact_auc, abs=1e-12)
        assert st.aupro() == pytest.approx(exact_pro, abs=1e-12)
    coarse = _stats(masks, maps, bits=9)   # octaves only: the figures move past TOL (it is not too loose to see it)
    assert max(abs(coarse.pixel_auroc() - exact_auc), abs(coarse.aupro() - exact_pro)) > TOL or levels
    with pytest.raises(ValueError, match="only normal pixels"):
        _stats([m & False for m in masks], maps).pixel_auroc()


def test_binned_bootstrap_uses_the_same_draws_and_lands_near_the_exact_interval():
    masks, maps = _set(2, n=16)
    exact = M.pixel_bootstrap(masks, maps, n_boot=300, seed=3)
    binned = M.bootstrap_histograms(_stats(masks, maps).histograms(), n_boot=300, seed=3)
    for k in ("pixel_auroc", "aupro"):   # the same resamples, bins a little apart: draws near one another
        assert np.abs(binned[k] - exact[k]).max() < 0.01
        assert M.interval(binned[k]) == pytest.approx(M.interval(exact[k]), abs=0.005)


def test_subsets_per_label_per_group_and_unmasked_defects_match_the_exact_path():
    masks, maps = _set(4, n=18)
    groups = ["A" if i < 9 else "B" for i in range(18)]
    kinds = ["good" if not m.any() else ("x" if i % 4 == 1 else "y") for i, m in enumerate(masks)]
    test = [SimpleNamespace(label=k, is_normal=k == "good", group=g) for k, g in zip(kinds, groups)]
    labels = np.array([0 if s.is_normal else 1 for s in test])
    scores = np.array([a.max() for a in maps])
    ok = [True] * 18
    ok[3] = False   # a defect image without a mask: out of the pixel metrics on both paths
    exact = {"maps": maps, "masks": masks, "pixel_ok": ok}
    binned = {"pixel_stats": _stats(masks, maps), "maps": None, "masks": None, "pixel_ok": ok}
    figures = [(_metrics(labels, scores, exact, True), _metrics(labels, scores, binned, True))]
    ge, gb = group_metrics(groups, labels, scores, exact, True), group_metrics(groups, labels, scores, binned, True)
    figures += [(ge["per_group"][g], gb["per_group"][g]) for g in "AB"]
    pe, pb = (per_label_metrics(test, labels, scores, r, True, ["x", "y"]) for r in (exact, binned))
    figures += [(pe[k], pb[k]) for k in "xy"]
    for e, b in figures:
        assert e.keys() == b.keys() and "aupro" in e and "aupro_vs_normal_images" in e
        for k in ("pixel_auroc", "aupro", "pixel_auroc_vs_normal_images", "aupro_vs_normal_images"):
            assert b[k] == pytest.approx(e[k], abs=TOL)
        for k in ("pixel_auroc_interval", "aupro_interval", "pixel_auroc_vs_normal_images_interval",
                  "aupro_vs_normal_images_interval"):
            assert b[k] == pytest.approx(e[k], abs=0.01)
        assert b["image_auroc"] == e["image_auroc"]
    assert pb["x"]["defect_pixel_share"] == pe["x"]["defect_pixel_share"]
    everything = _metrics(labels, scores, {**binned, "pixel_ok": None}, True)   # ok[3] does change the figure
    assert max(abs(everything[k] - figures[0][1][k]) for k in ("pixel_auroc", "aupro")) > TOL


def test_figures_against_normal_images_take_the_normal_labels_not_the_empty_masks():
    """A defective image whose mask is empty (4 on magnetic tile) counts its pixels as normal ones in the pooled
    figures, as evaluate warns, but it is not a normal image: `pixel_auroc_vs_normal_images` and
    `aupro_vs_normal_images` leave it out, on the exact and the streamed path alike; a normal label whose mask holds
    a defect is neither."""
    masks, maps = _set(5, n=12)
    labels = np.array([0 if not m.any() else 1 for m in masks])
    labels[2] = 1                      # an image with an empty mask, labelled defective
    scores = np.array([a.max() for a in maps])
    normal = labels == 0
    want = (M.pixel_auroc(masks, maps, negatives=normal), M.aupro(masks, maps, negatives=normal))
    assert want[0] != pytest.approx(M.pixel_auroc(masks, maps, negatives="normal_images"), abs=1e-6)
    for res in ({"maps": maps, "masks": masks}, {"pixel_stats": _stats(masks, maps), "maps": None, "masks": None}):
        out = _metrics(labels, scores, res, True)
        assert out["pixel_auroc_vs_normal_images"] == pytest.approx(want[0], abs=TOL)
        assert out["aupro_vs_normal_images"] == pytest.approx(want[1], abs=TOL)
        lo, hi = out["aupro_vs_normal_images_interval"]
        assert lo <= out["aupro_vs_normal_images"] + 0.01 and hi >= out["aupro_vs_normal_images"] - 0.01
    odd = labels.copy()
    odd[1] = 0                         # a "normal" image whose mask marks a defect: not a normal image either
    out = _metrics(odd, scores, {"maps": maps, "masks": masks}, True)
    assert out["pixel_auroc_vs_normal_images"] == pytest.approx(want[0], abs=1e-12)
    only_defects = {"maps": [maps[i] for i in range(12) if labels[i]], "masks": [masks[i] for i in range(12) if labels[i]]}
    assert "aupro_vs_normal_images" not in _metrics(labels[labels == 1], scores[labels == 1], only_defects, True)


def test_sink_stays_exact_within_the_budget_and_keeps_no_map_past_it():
    masks, maps = _set(5, n=10)
    samples = [SimpleNamespace(i=i) for i in range(10)]
    fits = _PixelSink(samples, budget=sum(a.size for a in maps))
    for i in reversed(range(10)):   # in any order (tiled images finish out of order)
        fits(samples[i], maps[i], masks[i])
    got = fits.result(samples[1:])   # the first one skipped (unreadable)
    assert "pixel_stats" not in got and all(a is b for a, b in zip(got["maps"], maps[1:]))
    assert got["mask_any"] == [bool(m.any()) for m in masks[1:]]

    streams = _PixelSink(samples, budget=3 * 32 * 32)   # past it at the 4th image or so: the kept ones binned too
    refs = []
    for s, m, a in zip(samples, masks, maps):
        a = a.copy()
        refs.append(weakref.ref(a))
        streams(s, a, m)
        del a
    gc.collect()
    assert all(r() is None for r in refs), "a map outlived its binning"
    got = streams.result(samples)
    assert got["maps"] is None and len(got["pixel_stats"]) == 10
    assert got["pixel_stats"].aupro() == pytest.approx(M.aupro(masks, maps), abs=TOL)


def test_streamed_memory_does_not_grow_with_the_maps():
    """200 maps of 256 px (52 MB) through the sink: the exact path holds them all, the streamed one holds the bins."""
    rng = np.random.default_rng(0)
    samples = [SimpleNamespace(i=i) for i in range(200)]
    yy = np.linspace(0, 1, 256, dtype=np.float32)

    def peak(budget):
        sink = _PixelSink(samples, budget)
        tracemalloc.start()
        for i, s in enumerate(samples):   # smooth maps (as the Gaussian-smoothed ones are) of 65,536 pixels each
            m = np.zeros((256, 256), bool)
            m[100:120, 30:90] = i % 2 == 1
            a = (np.add.outer(yy, yy * rng.random()) + rng.random() + m).astype(np.float32)
            sink(s, a, m)
            del a, m
        out = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out, sink

    exact, _ = peak(1 << 28)
    streamed, sink = peak(1)
    assert exact > 200 * 256 * 256 * 5 and streamed < exact / 4, (exact, streamed)
    assert sink.binned and not sink.kept
    held = sum(x.nbytes for e in sink.binned["wdm"].values() for x in e[:3] if x is not None)
    assert held < 200 * 256 * 256 * 5 / 6   # keys and counts of the bins each map fills, not its pixels (5 bytes
    # each): these maps span 1-2 octaves, up to 4,096 bins of 2^-11 of an octave


# ----------------------------------------------------------------------------- end to end, a tiny trained run
@pytest.fixture(scope="module")
def run_knn(tmp_path_factory):
    register_tiny()
    root = tmp_path_factory.mktemp("streamed")
    data = write_texture_set(root / "tex", n_train=6, n_good=4, n_bad=4)
    run, knn, _, _ = run_with_plain_index(root, data)
    manifest = ["path,split,label,mask"]   # two defect labels, one image without its mask
    manifest += [f"{p.relative_to(data)},train,good," for p in sorted((data / "train/good").glob("*.png"))]
    manifest += [f"{p.relative_to(data)},test,good," for p in sorted((data / "test/good").glob("*.png"))]
    for i, p in enumerate(sorted((data / "test/spot").glob("*.png"))):
        mask = "" if i == 3 else f"ground_truth/spot/{p.stem}_mask.png"
        manifest.append(f"{p.relative_to(data)},test,{'crack' if i < 2 else 'hole'},{mask}")
    (data / "m.csv").write_text("\n".join(manifest) + "\n")
    return run, knn, data


def test_evaluate_past_the_budget_reports_the_exact_figures_within_tolerance(run_knn, tmp_path):
    from uninet_feat.evaluate import evaluate
    run, knn, data = run_knn
    kw = dict(data=str(data), split_csv=str(data / "m.csv"), quiet=True, knn=knn)
    with pytest.warns(UserWarning, match="1 defect image"):
        exact = evaluate(run, **kw)
    with pytest.warns(UserWarning, match="1 defect image"):
        streamed = evaluate(run, pixel_budget=1, report_path=tmp_path / "r.html", **kw)
    with pytest.warns(UserWarning, match="1 defect image"):
        midway = evaluate(run, pixel_budget=5 * 64 * 64, **kw)   # kept maps binned when the 6th arrives
    assert exact["pixel_metrics"] == "exact"
    for rep in (streamed, midway):
        assert rep["pixel_metrics"].startswith(f"binned: {8 * 64 * 64} map pixels over the budget")
        assert rep["pixel_metrics_without"] == 1
        scopes = [(exact, rep), (exact["scorers"]["knn"], rep["scorers"]["knn"]),
                  (exact["scorers"]["combined"], rep["scorers"]["combined"])]
        scopes += [(exact["per_label"][k], rep["per_label"][k]) for k in ("crack", "hole")]
        for e, b in scopes:
            for k in ("pixel_auroc", "aupro", "within_image_auroc"):
                assert b[k] == pytest.approx(e[k], abs=TOL), k
            assert b["within_image_n"] == e["within_image_n"] >= 1
            for k in ("pixel_auroc_interval", "aupro_interval"):
                assert b[k] == pytest.approx(e[k], abs=0.02), k
        assert rep["image_auroc"] == exact["image_auroc"]
        strip = lambda rows: [{k: v for k, v in r.items() if k != "pixel_auroc"} for r in rows]  # noqa: E731
        assert strip(rep["_rows"]) == strip(exact["_rows"])
        own = [(r["pixel_auroc"], e["pixel_auroc"]) for r, e in zip(rep["_rows"], exact["_rows"])]
        assert [b == "" for b, _ in own] == [e == "" for _, e in own] and any(b for b, _ in own)
        assert all(abs(float(b) - float(e)) <= TOL for b, e in own if b)   # each image's own, from its histogram
    assert "data:image/png;base64" in (tmp_path / "r.html").read_text()   # its overlays re-score the few it shows


def test_maps_far_from_zero_keep_their_resolution_less_the_sinks_origin():
    """Bins are 2^-11 of their value wide: maps near 1000 with a spread of 0.1 binned as they are would share a
    few bins; `_PixelSink` bins them less the first map's median, and the figures stay the exact ones."""
    masks, maps = _set(3)
    far = [np.float32(1000.0) + np.float32(0.05) * a for a in maps]
    exact = (M.pixel_auroc(masks, far), M.aupro(masks, far))
    plain = _stats(masks, far)
    assert abs(plain.pixel_auroc() - exact[0]) > 5 * TOL   # what binning at the raw value loses
    samples = [SimpleNamespace(i=i) for i in range(len(far))]
    sink = _PixelSink(samples, budget=0)
    for s, m, a in zip(samples, masks, far):
        sink(s, a, m)
    st = sink.result(samples)["pixel_stats"]
    assert st.origin == pytest.approx(float(np.median(far[0])))
    near = _PixelSink(samples, budget=0)   # maps about 0 are binned as they are (origin 0)
    for s, m, a in zip(samples, masks, maps):
        near(s, a, m)
    assert near.result(samples)["pixel_stats"].origin == 0.0
    assert st.pixel_auroc() == pytest.approx(exact[0], abs=TOL) and st.aupro() == pytest.approx(exact[1], abs=TOL)


@pytest.mark.parametrize("levels", [None, 8])
def test_within_image_auroc_is_each_defect_images_own_auroc_averaged_binned_or_not(levels):
    """The mean over images with both kinds of pixel of sklearn's AUROC of that image alone; normal images (no
    defect pixel) and all-defect images are left out; the binned figure matches (exactly on a grid of ties)."""
    from sklearn.metrics import roc_auc_score
    masks, maps = _set(4, levels=levels)
    full = np.ones((8, 8), bool)
    masks, maps = masks + [full], maps + [np.zeros((8, 8), np.float32)]   # one class only: left out
    want = [roc_auc_score(m.ravel(), a.ravel()) for m, a in zip(masks, maps) if m.any() and not m.all()]
    mean, n = M.within_image_auroc(masks, maps)
    assert n == len(want) == 6 and mean == pytest.approx(np.mean(want), abs=1e-12)
    b_mean, b_n = _stats(masks, maps).within_image_auroc()
    assert b_n == n and b_mean == pytest.approx(mean, abs=1e-12 if levels else TOL)
    # pooled AUROC can move while this does not: lift every map of a normal image, each image's own order stays
    lifted = [a + (5.0 if not m.any() else 0.0) for m, a in zip(masks, maps)]
    assert M.within_image_auroc(masks, lifted)[0] == pytest.approx(mean, abs=1e-12)
    assert M.pixel_auroc(masks, lifted) < M.pixel_auroc(masks, maps) - 0.05
    # and it sees a map whose hot spot leaves the defect
    moved = [np.where(m, a.min(), a) for m, a in zip(masks, maps)]
    assert M.within_image_auroc(masks, moved)[0] < 0.2
    assert M.within_image_auroc([m & False for m in masks], maps) is None
    assert _stats([m & False for m in masks], maps).within_image_auroc() is None


def test_a_streamed_sink_leaves_out_the_knn_maps_when_the_knn_pass_skipped_an_image():
    """`evaluate --knn` on the streamed path bins each image's kNN map beside its WDM map; an image the kNN pass
    skipped (its file changed between the two passes) has none, and `result` raised a KeyError after all the
    scoring. Now the kNN figures are left out for the set, as on the exact path; the WDM figures stay."""
    masks, maps = _set(5, n=6)
    samples = [SimpleNamespace(i=i) for i in range(6)]
    sink = _PixelSink(samples, budget=0, extra=lambda i, m: {} if i == 2 else {"knn": m * 2})
    for s, m, a in zip(samples, masks, maps):
        sink(s, a, m)
    got = sink.result(samples)
    assert len(got["pixel_stats"].images) == 6 and got["extra_stats"] == {}
    whole = _PixelSink(samples, budget=0, extra=lambda i, m: {"knn": m * 2})
    for s, m, a in zip(samples, masks, maps):
        whole(s, a, m)
    assert len(whole.result(samples)["extra_stats"]["knn"].images) == 6
