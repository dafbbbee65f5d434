"""Heatmap overlays and the self-contained HTML report (no model needed: synthetic maps and rows)."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uninet_feat.overlay import MASK_COLOR, colormap, heatmap_overlay
from uninet_feat.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def _lum(rgb):
    rgb = np.asarray(rgb, np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# ---------------------------------------------------------------------------------------- overlay
def test_colormap_luminance_increases():
    lut = colormap("inferno")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    lum = _lum(lut)
    assert np.all(np.diff(lum) > -0.5)          # (numerically) monotonic: dark → bright
    assert lum[-1] - lum[0] > 200
    assert colormap("jet").shape == (256, 3)


def test_overlay_shape_dtype_and_hot_vs_cold():
    img = np.full((40, 60), 0.5, np.float32)            # grey image, any size
    amap = np.zeros((10, 15), np.float32)                # evaluated resolution, smaller
    amap[1:4, 1:4] = 1.0                                 # hot spot top-left
    out = heatmap_overlay(img, amap, vmin=0.0, vmax=1.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    hot, cold = out[8, 8].astype(int), out[30, 50].astype(int)
    assert tuple(cold) == (128, 128, 128)                # a cold pixel is the grey image itself
    assert hot[0] > cold[0] + 50 and hot[0] - hot[2] > 100   # the hot one is coloured: red-orange on grey


def _tile(h=64, w=64):
    """A cream glaze with blue printed rows and a terracotta band: a colour image with a hue of its own."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (236, 224, 196)
    img[::8] = (60, 90, 200)
    img[:, 40:46] = (190, 90, 60)
    return img


def test_a_low_map_leaves_a_colour_image_as_it_is_and_a_hot_one_shows_the_heat_and_the_stain():
    """The colour was blended at 50 % over every pixel: a cream tile came out dark olive, and a stain's own colour
    was lost under the tint. Now the weight grows with the map: clear in the lowest 30 % of the scale, at most
    half heat colour at the top, where the stain still shows at half its own contrast."""
    from uninet_feat.overlay import heat_colours
    img = _tile()
    rng = np.random.default_rng(0)
    low = rng.uniform(0.0, 0.6, (16, 16)).astype(np.float32)   # a normal map: median-ish to 0.6 of the scale
    out = heatmap_overlay(img, low, vmin=0.0, vmax=1.0)
    assert abs(_lum(out).mean() - _lum(img).mean()) < 3     # the old blend: 206 → 103 here
    assert np.abs(out.astype(int) - img).mean(axis=(0, 1)).max() < 4   # no tint of any channel either
    old = heatmap_overlay(img, low, vmin=0.0, vmax=1.0, clear_below=None)
    assert _lum(img).mean() - _lum(old).mean() > 60          # the look before: everything darkened
    big = np.asarray(Image.fromarray(low, mode="F").resize((64, 64), Image.Resampling.BILINEAR))
    want = 0.5 * img + 0.5 * colormap("inferno")[np.clip(np.round(big * 255), 0, 255).astype(int)]
    assert np.abs(old - np.floor(want + 0.5)).max() <= 1       # exactly the old flat blend
    stain = img.copy()
    stain[20:30, 10:30] = (150, 140, 230)                  # a lavender stain on the cream, same brightness-ish
    hot = np.zeros((64, 64), np.float32)
    hot[16:34, 6:34] = 5.0                                 # the map far above the normals' top, around the stain
    out = heatmap_overlay(stain, hot, vmin=0.0, vmax=1.0).astype(int)
    top = heat_colours(1.0).astype(int)
    assert np.abs(out[25, 20] - (stain[25, 20] + top) / 2).max() <= 1      # half image, half heat
    assert np.abs(out[18, 20] - (stain[18, 20] + top) / 2).max() <= 1      # the cream beside it, same heat
    contrast_in, contrast_out = stain[25, 20].astype(int) - stain[18, 20], out[25, 20] - out[18, 20]
    assert np.abs(contrast_out - contrast_in / 2).max() <= 1   # the stain's own colour difference, at half
    assert (out[50, 50] == stain[50, 50]).all()            # outside the hot region: the image


def test_a_grey_image_keeps_its_grey_where_the_map_is_low_and_the_ramp_is_smooth():
    from uninet_feat.overlay import heat_weight
    g = np.random.default_rng(1).integers(40, 90, (48, 48), dtype=np.uint8)   # a dark grey tile (magnetic-tile-like)
    ramp = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (48, 1))      # the map rises left to right
    out = heatmap_overlay(g, ramp, vmin=0.0, vmax=1.0).astype(int)
    left = out[:, :12]                                      # t < 0.25: untouched
    assert (left == g[:, :12, None]).all()
    right = out[:, -4:]                                     # t near 1: coloured, brighter than the dark tile
    assert (right[..., 0] - right[..., 2]).mean() > 60 and _lum(right).mean() > g[:, -4:].mean() + 30
    w = heat_weight(np.linspace(0, 1, 101))
    assert w[0] == 0 and w[30] == 0 and w[-1] == pytest.approx(0.5) and np.all(np.diff(w) >= 0)
    with pytest.raises(ValueError):
        heat_weight(0.5, clear_below=1.0)


def test_fixed_scale_gives_comparable_colours():
    img = np.zeros((32, 32, 3), np.uint8)
    a = np.full((8, 8), 0.6, np.float32)
    b = a.copy()
    b[0, 0] = 5.0                                        # a different map range
    oa = heatmap_overlay(img, a, vmin=0.0, vmax=1.0, alpha=1.0)
    ob = heatmap_overlay(img, b, vmin=0.0, vmax=1.0, alpha=1.0)
    assert np.array_equal(oa[20, 20], ob[20, 20])        # same value → same colour
    auto = heatmap_overlay(img, b, alpha=1.0)            # own min/max: 0.6 is now near the bottom
    assert _lum(auto[20, 20]) < _lum(oa[20, 20])


def test_mask_outline_and_threshold_contour():
    img = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    out = heatmap_overlay(img, amap, vmin=0, vmax=1, mask=mask)
    assert tuple(out[20, 30]) == MASK_COLOR and tuple(out[39, 30]) == MASK_COLOR   # edges
    assert tuple(out[30, 30]) != MASK_COLOR and tuple(out[5, 5]) != MASK_COLOR    # inside / outside
    amap[10:20, 10:20] = 1.0
    cont = heatmap_overlay(img, amap, vmin=0, vmax=1, threshold=0.5, contour_color=(1, 2, 3))
    assert (cont == np.array([1, 2, 3], np.uint8)).all(-1).sum() > 20
    # a mask at another resolution is resampled; a thin defect survives downscaling
    thin = np.zeros((256, 256), bool)
    thin[100, 50:200] = True
    out = heatmap_overlay(img, amap, vmin=0, vmax=1, mask=thin)
    assert (out == np.array(MASK_COLOR, np.uint8)).all(-1).sum() > 10


def test_wide_strip_downscale_keeps_aspect_and_writes_png(tmp_path, write_image):
    p = write_image("strip.png", size=(256, 4096))
    amap = np.random.default_rng(0).random((16, 256)).astype(np.float32)
    out_png = tmp_path / "ov" / "strip_overlay.png"
    out = heatmap_overlay(p, amap, out_png, vmin=0, vmax=1, max_width=1024)
    assert out.shape == (64, 1024, 3)
    assert np.array_equal(np.asarray(Image.open(out_png)), out)
    assert sorted(x.name for x in out_png.parent.iterdir()) == ["strip_overlay.png"]   # no temp files left
    full = heatmap_overlay(p, amap, vmin=0, vmax=1)
    assert full.shape == (256, 4096, 3)


def test_overlay_rejects_bad_map():
    with pytest.raises(ValueError):
        heatmap_overlay(np.zeros((8, 8)), np.zeros((2, 3, 4)))


def test_overlay_of_a_one_pixel_high_image_keeps_its_maps_and_masks_height():
    """np.squeeze took the (1, 1, 300) map of a 1×300 image (a Detector map, batch axis kept) to (300,): refused."""
    img, ramp = np.full((1, 300), 128, np.uint8), np.linspace(0, 1, 300, dtype=np.float32)
    want = heatmap_overlay(img, ramp[None], vmin=0, vmax=1)
    np.testing.assert_array_equal(heatmap_overlay(img, ramp[None, None], vmin=0, vmax=1), want)
    np.testing.assert_array_equal(heatmap_overlay(img.T, ramp[None, :, None], vmin=0, vmax=1),
                                  heatmap_overlay(img.T, ramp[:, None], vmin=0, vmax=1))
    ring = heatmap_overlay(img, np.zeros((1, 300)), vmin=0, vmax=1, mask=np.ones((1, 1, 300), bool))
    assert (ring == MASK_COLOR).all(-1).any()                                  # the (1, 1, 300) mask is drawn
    assert heatmap_overlay(np.zeros((8, 8)), np.ones((8, 8, 1)), vmin=0, vmax=1).shape == (8, 8, 3)   # (H, W, 1)


def test_overlay_refuses_a_colour_scale_upside_down():
    """vmax below vmin drew nothing at all (every pixel below vmin), silently."""
    m = np.zeros((8, 8))
    m[2:4, 2:4] = 10
    with pytest.raises(ValueError, match=r"vmax \(1\) is below vmin \(5\)"):
        heatmap_overlay(np.full((32, 32), 128, np.uint8), m, vmin=5, vmax=1)


# ----------------------------------------------------------------------------------------- report
def _rows(n_normal=12, n_defect=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_normal):
        rows.append({"path": f"/data/good/n{i:02d}.png", "group": "a" if i % 2 else "b", "label": "good",
                     "is_defect": 0, "score": f"{rng.uniform(0, 0.5):.6g}"})
    for i in range(n_defect):
        rows.append({"path": f"/data/hole/d{i:02d}.png", "group": "a", "label": "hole", "is_defect": 1,
                     "score": f"{rng.uniform(0.3, 1.0):.6g}"})
    for r in rows:
        r["flagged"] = int(float(r["score"]) > 0.4)
    return rows


def _overlays(tmp_path, rows):
    ovs = {}
    for i, r in enumerate(rows):
        img = np.full((48, 48), 0.5, np.float32)
        amap = np.zeros((12, 12), np.float32)
        amap[i % 12, (3 * i) % 12] = 1.0
        heatmap_overlay(img, amap, tmp_path / "ov" / f"{i}.png", vmin=0, vmax=1)
        ovs[r["path"]] = tmp_path / "ov" / f"{i}.png"
    return ovs


METRICS = {"n_test": 18, "n_defect": 6, "image_auroc": 0.912345, "image_ap": 0.8765, "f1_max": 0.8125,
           "pixel_auroc": 0.955555, "aupro": 0.871234, "threshold": 0.4,
           "per_group": {"a": {"image_auroc": 0.9321}, "b": {"image_auroc": 0.8888}}, "mean_image_auroc": 0.91}


def _section(text, sid):
    start = text.index(f"<section id='{sid}'>")
    return text[start:text.index("</section>", start)]


def test_report_self_contained_with_metrics_charts_and_worst_cases(tmp_path):
    rows = _rows()
    ovs = _overlays(tmp_path, rows)
    top_normal = max((r for r in rows if not r["is_defect"]), key=lambda r: float(r["score"]))
    del ovs[top_normal["path"]]                                                 # one image without overlay
    out = write_report(tmp_path / "rep" / "report.html", METRICS, rows, threshold=0.4, overlays=ovs,
                       title="T<est>", config={"backbone": "x", "epochs": 3})
    text = out.read_text()
    assert out == tmp_path / "rep" / "report.html"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]      # atomic: no temp files
    # self-contained: nothing fetched, no external scripts / styles / links
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)""", text, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert "<link" not in text.lower() and "@import" not in text
    assert "T&lt;est&gt;" in text                                               # escaped title
    assert "green outline = ground-truth" in text and "light-blue outline = the model" in text   # both keyed
    # metrics
    for v in ("0.9123", "0.9556", "0.8712", "0.8765", "0.8125", "0.9321", "0.8888"):
        assert v in text, v
    # charts
    for cls in ("chart roc", "chart pr", "chart hist"):
        assert f'<svg class="{cls}"' in text
    assert text.count("<polyline") >= 5 and "false positive rate" in text and "threshold 0.4" in text
    # embedded images are data URIs
    srcs = re.findall(r"<img[^>]*\bsrc='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # worst FP = highest-scoring normals, in order; worst FN = lowest-scoring defects
    normals = sorted((r for r in rows if not r["is_defect"]), key=lambda r: -float(r["score"]))
    fp = _section(text, "worst-fp")
    listed = re.findall(r"data-path='([^']*)'", fp)
    assert listed == [r["path"] for r in normals[:8]]
    defects = sorted((r for r in rows if r["is_defect"]), key=lambda r: float(r["score"]))
    assert re.findall(r"data-path='([^']*)'", _section(text, "worst-fn")) == [r["path"] for r in defects[:6]]
    assert fp.count("<img") == 7 and fp.count("no overlay") == 1
    # per-image table and config
    assert _section(text, "images").count("<tr>") == len(rows) + 1
    assert "<details>" in text and "&quot;epochs&quot;: 3" in text


def test_report_names_the_figures_against_normal_images_overall_and_per_label(tmp_path):
    """evaluate's `pixel_auroc_vs_normal_images` / `aupro_vs_normal_images` (session 48) are named in the report's
    metrics, and per label where the labels have them: before, the per-label table left them out."""
    per_label = {"crack": {"n": 3, "image_auroc": 0.97, "pixel_auroc": 0.9451, "pixel_auroc_vs_normal_images": 0.9675,
                           "aupro_vs_normal_images": 0.8649},
                 "hole": {"n": 3, "image_auroc": 0.95, "pixel_auroc": 0.9667}}
    metrics = {**METRICS, "pixel_auroc_vs_normal_images": 0.965112, "aupro_vs_normal_images": 0.866045,
               "aupro_vs_normal_images_interval": [0.8362, 0.8922], "per_label": per_label}
    text = write_report(tmp_path / "r.html", metrics, _rows(), threshold=0.4).read_text()
    top = text[text.index("<h3>All test images</h3>"):text.index("</table>", text.index("<h3>All test images</h3>"))]
    assert "Pixel AUROC against normal images alone" in top and "0.9651" in top and "0.8660" in top
    assert "AUPRO against normal images alone, 95 % interval" in top
    lab = text[text.index("<h3>Per defect label"):]
    lab = lab[:lab.index("</table>")]
    assert "<th>Pixel AUROC against normal images alone</th>" in lab and "0.9675" in lab and "0.8649" in lab


def test_the_report_states_the_thresholds_own_rule_and_a_threshold_set_on_test_images(tmp_path):
    """The report said "from validation normals" for a given --threshold too, and showed a threshold set on test
    normals as a bare `threshold_set_on_test_images` row (an audit, session 52)."""
    given = {**METRICS, "threshold_rule": "given (--threshold)", "threshold_set_on_test_images": 6}
    top = write_report(tmp_path / "r.html", given, _rows(), threshold=0.4).read_text()
    top = top[top.index("<h3>All test images</h3>"):top.index("</table>", top.index("<h3>All test images</h3>"))]
    assert "Threshold (given (--threshold))" in top and "from validation normals" not in top
    assert "include 6 test image(s): recall and false-positive rate at it are optimistic" in top
    assert "<th>threshold_set_on_test_images</th>" not in top
    plain = write_report(tmp_path / "p.html", {**METRICS, "threshold_rule": "0.99 quantile of validation-normal image "
                                               "scores (no test labels used)"}, _rows(), threshold=0.4).read_text()
    assert "Threshold (0.99 quantile of validation-normal image scores (no test labels used))" in plain
    assert "optimistic" not in plain


def test_report_single_class_no_overlays_no_threshold(tmp_path):
    rows = [r for r in _rows() if not r["is_defect"]]
    for r in rows:
        del r["flagged"]
    out = write_report(tmp_path / "one.html", {"n_test": len(rows), "n_defect": 0}, rows)
    text = out.read_text()
    assert "Only normal images" in text and "chart roc" not in text and "chart pr" not in text
    assert '<svg class="chart hist"' in text
    assert "No heatmap overlays were given" in text and "<img" not in text
    assert "Defects flagged at threshold" not in text                          # no threshold given
    assert "No defect images" in text


def test_report_from_evaluate_dict_and_empty(tmp_path):
    rep = dict(METRICS, _rows=_rows())
    text = write_report(tmp_path / "r.html", rep).read_text()     # rows and threshold from the dict
    assert "chart roc" in text and "threshold 0.4" in text
    text = write_report(tmp_path / "e.html", {}, []).read_text()
    assert "No scored images" in text


def test_report_size_stays_reasonable(tmp_path, write_image):
    rows = _rows(40, 10)
    ovs = {}
    for i, r in enumerate(rows):                 # noisy 512×512 overlays compress badly: the worst case
        p = write_image(f"img{i}.png", size=(400, 400))
        amap = np.random.default_rng(i).random((32, 32)).astype(np.float32)
        ovs[r["path"]] = heatmap_overlay(p, amap, vmin=0, vmax=1)      # arrays are accepted too
    out = write_report(tmp_path / "big.html", METRICS, rows, overlays=ovs)
    assert out.stat().st_size < 10e6


def _load_screenshot():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_screenshot_is_not_blank(tmp_path):
    shot = _load_screenshot()
    if shot.find_chromium() is None:
        pytest.skip("chromium not installed (/usr/bin/chromium); install with "
                    "`apt-get update && apt-get install -y chromium` to run the screenshot check")
    rows = _rows()
    html = write_report(tmp_path / "report.html", METRICS, rows, overlays=_overlays(tmp_path, rows))
    png = shot.screenshot(html, tmp_path / "shot.png", width=1200, height=1400)
    a = np.asarray(Image.open(png).convert("L"), np.float64)
    assert a.shape == (1400, 1200)
    assert a.std() > 10, "screenshot looks blank"
    assert not list(tmp_path.glob(".shot.png*"))


def test_report_without_threshold_shows_no_outcomes(tmp_path):
    rows = _rows()
    for r in rows:
        r["flagged"] = 0                       # what evaluate writes when the run has no threshold
    text = write_report(tmp_path / "r.html", {"image_auroc": 0.5}, rows).read_text()
    assert "oc oc-FN" not in text and "oc oc-TN" not in text and "Defects flagged" not in text
    assert "— (none)" in text


def test_report_thumbnails_of_16_bit_images_are_scaled_not_clipped_white(tmp_path):
    """A 16-bit grey frame (values 1000..3000 of 65535) went through PIL's RGB conversion, which clips at 255:
    the report showed it all white. It is decoded as the model reads it (`load_image`), a file as an array."""
    import base64
    import io
    ramp = np.tile(np.linspace(1000, 3000, 96), (48, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    want = ramp / 65535 * 255   # 3.9 .. 11.7 of 255: a dark frame
    rows = _rows(2, 1)
    ovs = {rows[0]["path"]: tmp_path / "g16.png", rows[1]["path"]: ramp}
    text = write_report(tmp_path / "r.html", METRICS, rows, overlays=ovs).read_text()
    srcs = re.findall(r"<img[^>]*\bsrc='data:image/png;base64,([^']*)'", text)
    assert len(srcs) >= 2
    for s in srcs:
        a = np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("L"), np.float64)
        assert a.max() < 20 and abs(a.mean() - want.mean()) < 1.5, (a.min(), a.max())   # was 255 everywhere


def test_report_shows_the_knn_and_combined_scorers_with_their_own_thresholds(tmp_path):
    """`evaluate --knn --report`: the kNN and combined flags have thresholds of their own (per group for a run of
    several groups); the report showed WDM's alone."""
    sc = {"knn_features": "plain backbone",
          "knn": {"image_auroc": 0.9401, "pixel_auroc": 0.8502, "aupro": 0.7331, "within_image_auroc": 0.8614,
                  "pixel_auroc_vs_normal_images": 0.9685, "aupro_vs_normal_images": 0.9228, "threshold": 1.2345,
                  "at_threshold": {"recall_defect": 0.75, "false_positive_rate": 0.0312}},
          "combined": {"image_auroc": 0.9644, "threshold": None, "group_thresholds": {"plain": 2.5, "twill": 3.75},
                       "at_threshold": {"recall_defect": 0.8, "false_positive_rate": 0.05}}}
    text = write_report(tmp_path / "r.html", {**METRICS, "scorers": sc}, _rows()).read_text()
    part = _section(text, "metrics")
    assert "Other scorers (plain backbone features)" in part
    knn = part[part.index("<th>knn</th>"):].split("</tr>")[0]
    assert [c for c in re.findall(r"<td class='num'>([^<]*)</td>", knn)] == [
        "0.9401", "0.8502", "0.7331", "0.8614", "0.9685", "0.9228", "1.2345", "0.750", "0.031"]
    comb = part[part.index("<th>combined</th>"):].split("</tr>")[0]
    assert "plain 2.5000, twill 3.7500" in comb and "0.9644" in comb and "0.050" in comb
    assert "Other scorers" not in write_report(tmp_path / "w.html", METRICS, _rows()).read_text()


def test_report_shows_the_defects_the_heatmap_misses_lowest_pixel_auroc_first(tmp_path):
    """evaluate's rows carry each defective image's own pixel AUROC: the report lists the lowest (the defects whose
    map is hot elsewhere, whatever their image score) and shows the column; rows without it show neither."""
    rows = _rows()
    own = {}
    for k, r in enumerate(r for r in rows if r["is_defect"]):
        own[r["path"]] = [0.9, 0.35, 0.99, 0.6, 0.5, 0.8][k]
    for r in rows:
        r["pixel_auroc"] = f"{own[r['path']]:.6g}" if r["path"] in own else ""
    text = write_report(tmp_path / "r.html", METRICS, rows, overlays=_overlays(tmp_path, rows), top_k=3).read_text()
    part = _section(text, "worst-loc")
    names = re.findall(r"class='fname' title='([^']+)'", part)
    want = sorted(own, key=own.get)[:3]
    assert names == want and "pixel AUROC in the image 0.350" in part and "<img class='ov'" in part
    assert "<th onclick='sortTable(this)' data-num=1>pixel AUROC</th>" in _section(text, "images")
    plain = write_report(tmp_path / "p.html", METRICS, _rows()).read_text()
    assert "worst-loc" not in plain and "pixel AUROC</th>" not in plain


def _table_cells(text):
    """(header [(text, attrs)], body rows [[(text, attrs)]]) of the report's per-image table."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.head, self.body, self.cell = [], [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.body.append([])
            elif tag in ("th", "td"):
                self.cell = ["", dict(attrs), tag]

        def handle_data(self, data):
            if self.cell is not None:
                self.cell[0] += data

        def handle_endtag(self, tag):
            if tag in ("th", "td") and self.cell is not None:
                (self.head if self.cell[2] == "th" else self.body[-1]).append(tuple(self.cell[:2]))
                self.cell = None

    p = P()
    p.feed(_section(text, "images"))
    return p.head, [r for r in p.body if r]


def test_report_table_numeric_columns_carry_their_number_as_the_sort_key_and_none_as_empty(tmp_path):
    """The table sorted by each cell's shown text: a "—" (no finite score) or blank (a normal image's pixel AUROC)
    compared as text with the numbers beside it, so sorting interleaved them. Numeric columns now say so in their
    header (data-num) and each cell holds its number in full, or an empty key that the sort puts last both ways."""
    rows = _rows(4, 3)
    rows[1]["score"] = "nan"
    for k, r in enumerate(rows):
        r["pixel_auroc"] = f"{0.25 + 0.1 * k:.6g}" if r["is_defect"] else ""
    text = write_report(tmp_path / "r.html", METRICS, rows, threshold=0.4).read_text()
    head, body = _table_cells(text)
    names = [h for h, _ in head]
    numeric = {h for h, a in head if a.get("data-num") == "1"}
    assert numeric == {"#", "score", "pixel AUROC"} and "image" in names
    si, pi = names.index("score"), names.index("pixel AUROC")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(body) == len(rows)
    for n, row in enumerate(body, 1):
        src = by_name[row[1][0]]
        assert row[0][1]["data-sort"] == repr(float(n))
        score = float(src["score"])
        assert row[si][1]["data-sort"] == ("" if score != score else repr(score))
        assert row[pi][1]["data-sort"] == ("" if src["pixel_auroc"] == "" else repr(float(src["pixel_auroc"])))
    assert [c[1]["data-sort"] for c in (r[si] for r in body)].count("") == 1   # the NaN score: "—", no key
    assert sum(r[pi][1]["data-sort"] == "" for r in body) == 4                  # the normals


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="node is not installed")
def test_report_sort_puts_empty_keys_last_both_ways_and_numbers_by_value(tmp_path):
    """The page's own comparator (run in node): numbers by value, not as text ("10" after "9"), empty keys last
    ascending and descending; text columns by their text, empty last too."""
    import json
    import subprocess
    from uninet_feat.report import _JS
    keys = ["0.5", "", "10", "9", "-1", "", "2.5e-05"]
    script = _JS + f"""
var k={json.dumps(keys)};
function by(num,asc){{return k.slice().sort(function(a,b){{return cmpKeys(a,b,num,asc);}});}}
console.log(JSON.stringify([by(true,true),by(true,false),by(false,true)]));"""
    up, down, text = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True,
                                               check=True).stdout)
    assert up == ["-1", "2.5e-05", "0.5", "9", "10", "", ""]
    assert down == ["10", "9", "0.5", "2.5e-05", "-1", "", ""]
    assert text[-2:] == ["", ""] and text.index("10") < text.index("9")


def test_report_thumbnails_of_large_files_are_made_without_their_float_array(tmp_path):
    """A thumbnail of a file was made from `load_image`'s float32 array and an 8-bit copy via float64: 36 bytes a
    pixel (GBs for a 20000 x 20000 image) for a 360-px picture. PIL now reduces the file in its own 8- or 16-bit mode
    (a JPEG decoded at a fraction of its size): Python-side memory stays a few bytes a pixel at most, and the picture
    is the one the float path made (upright, 16-bit grey by its full range)."""
    import base64
    import io
    import tracemalloc
    from uninet_feat.data.images import load_image
    from uninet_feat.overlay import _as_rgb_uint8
    from uninet_feat.report import _thumb_uri
    h, w = 1200, 2000
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray((xx * 65535 // w).astype(np.uint16)).save(tmp_path / "big16.png")
    exif = Image.Exif()
    exif[0x0112] = 6   # stored sideways: shown turned a quarter
    Image.fromarray(rgb[:400, :600]).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    for name, per_pixel, close in (("big.png", 1, 0), ("big.jpg", 1, 1.0), ("big16.png", 8, 0), ("turned.jpg", 1, 1.0)):
        path = tmp_path / name
        n = Image.open(path).size[0] * Image.open(path).size[1]
        tracemalloc.start()
        uri = _thumb_uri(path, 360, 360, max_bytes=10 ** 9)   # full colour, as made
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert uri and peak < per_pixel * n + 2 ** 20, (name, peak / n)   # + the PNG and its text; float path: 36 B/px
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), np.float64)
        old = Image.fromarray(_as_rgb_uint8(load_image(path, min_side=1)))
        old.thumbnail((360, 360), Image.Resampling.LANCZOS)
        assert got.shape == np.asarray(old).shape, name
        assert np.abs(got - np.asarray(old, np.float64)).mean() <= close, name
    assert got.shape == (360, 240, 3)   # turned.jpg: upright


def test_overlays_of_files_are_the_float_paths_pixels_without_its_float_array(tmp_path, monkeypatch):
    """`heatmap_overlay` (predict's overlays, evaluate's report, `Detector.overlay`) read a file through `load_image`:
    float32, then float64 for the 8-bit conversion, and blended the whole picture in float32 arrays: 75 bytes a
    pixel at its peak. It now decodes the file in its own 8- or 16-bit mode (the same pixels for every mode and EXIF
    turn; 32-bit and float files still through `load_image`) and blends a strip of rows at a time (the same pixels as
    one strip): 6 bytes a pixel for evaluate's 500-px report overlay of a large file, 15 at full size."""
    import tracemalloc
    from uninet_feat.data.images import load_image
    from uninet_feat.overlay import _as_rgb_uint8, heatmap_overlay
    yy, xx = np.mgrid[0:60, 0:90]
    rgb = np.stack([xx * 255 // 90, yy * 255 // 60, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)
    grey16 = (xx * 65535 // 90 + (yy % 7) * 911).clip(0, 65535).astype(np.uint16)
    files = {"rgb.png": Image.fromarray(rgb), "grey.png": Image.fromarray(rgb[..., 0]),
             "la.png": Image.fromarray(rgb[..., :2].copy(), "LA"), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "p.png": Image.fromarray(rgb).quantize(17), "bit.png": Image.fromarray(rgb[..., 0] > 90),
             "g16.png": Image.fromarray(grey16), "g16.tif": Image.fromarray(grey16), "c.jpg": Image.fromarray(rgb),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "i32.tif": Image.fromarray(grey16.astype(np.int32) * 7)}
    for name, img in files.items():
        img.save(tmp_path / name)
    for turn in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = turn
        for ext in ("jpg", "tif"):
            Image.fromarray(rgb).save(tmp_path / f"turn{turn}.{ext}", exif=exif)
            files[f"turn{turn}.{ext}"] = None
    for name in files:
        want = _as_rgb_uint8(load_image(tmp_path / name, min_side=1))
        np.testing.assert_array_equal(_as_rgb_uint8(tmp_path / name), want, err_msg=name)
    h, w = 1500, 2000
    yy, xx = np.mgrid[0:h, 0:w]
    Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)).save(tmp_path / "big.png")
    amap = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    mask = np.zeros((h, w), bool)
    mask[100:900, 300:700] = True
    for max_width, shape, per_pixel in ((500, (375, 500, 3), 8), (None, (h, w, 3), 20)):
        tracemalloc.start()
        out = heatmap_overlay(tmp_path / "big.png", amap, vmin=0.0, vmax=1.0, max_width=max_width, mask=mask,
                              threshold=0.9)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.shape == shape and peak < per_pixel * h * w, (max_width, peak / (h * w))   # was 75 B/px
    monkeypatch.setattr("uninet_feat.overlay.BLEND_PIXELS", h * w)   # one strip: the same picture
    np.testing.assert_array_equal(heatmap_overlay(tmp_path / "big.png", amap, vmin=0.0, vmax=1.0, mask=mask,
                                                  threshold=0.9), out)


@pytest.mark.parametrize("ext", ["jpg", "bmp", "tif", "png"])
def test_report_thumbnail_of_a_file_that_already_fits_its_box(tmp_path, ext):
    """PIL's thumbnail() leaves a picture that already fits its box undecoded, and the file was closed before the
    picture was converted: a JPEG, BMP or TIFF overlay file of 64 px (the table's box is 200 x 64) stopped the whole
    report with an AssertionError from PIL. It is the picture the float path makes, and the report is written."""
    import base64
    import io
    from uninet_feat.data.images import load_image
    from uninet_feat.overlay import _as_rgb_uint8
    from uninet_feat.report import _thumb_uri
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx * 4, yy * 4, (xx + yy) % 256], -1).astype(np.uint8)
    for name, a in (("c", rgb), ("g", rgb[..., 0])):
        path = tmp_path / f"{name}.{ext}"
        Image.fromarray(a).save(path)
        for box in ((200, 64), (360, 360)):
            uri = _thumb_uri(path, *box, max_bytes=10 ** 9)
            assert uri, (path.name, box)
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
            np.testing.assert_array_equal(got, _as_rgb_uint8(load_image(path, min_side=1)))
    rows = _rows(2, 1)
    overlays = {r["path"]: tmp_path / f"c.{ext}" for r in rows}
    text = write_report(tmp_path / "r.html", METRICS, rows, overlays=overlays).read_text()
    assert "<img class='thumb' src='data:image/png;base64," in text and "overlay unreadable" not in text


@pytest.mark.parametrize("ext", ["tif", "jpg", "png"])
def test_report_thumbnail_of_a_file_with_an_exif_turn_is_turned_once(tmp_path, ext):
    """PIL turns a TIFF upright as it decodes it (its size already upright, its orientation tag then dropped), which
    `load_image` follows; the thumbnail read the tag before the decode and turned the picture a second time (a
    quarter turn came out upside down and squeezed into the other box). Every EXIF orientation, 8- and 16-bit grey."""
    import base64
    import io
    from uninet_feat.data.images import load_image
    from uninet_feat.overlay import _as_rgb_uint8
    from uninet_feat.report import _thumb_uri
    yy, xx = np.mgrid[0:300, 0:500]
    pictures = {"c": np.stack([xx * 255 // 500, yy * 255 // 300, (xx // 50 + yy // 50) % 2 * 255], -1)
                .astype(np.uint8)}
    if ext != "jpg":
        pictures["g16"] = (xx * 65535 // 500 + (yy // 50) % 2 * 20000).clip(0, 65535).astype(np.uint16)
    for name, a in pictures.items():
        for turn in range(2, 9):
            exif = Image.Exif()
            exif[0x0112] = turn
            path = tmp_path / f"{name}{turn}.{ext}"
            Image.fromarray(a).save(path, exif=exif, **({"quality": 95} if ext == "jpg" else {}))
            uri = _thumb_uri(path, 360, 200, max_bytes=10 ** 9)
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), float)
            old = Image.fromarray(_as_rgb_uint8(load_image(path, min_side=1)))
            old.thumbnail((360, 200), Image.Resampling.LANCZOS)
            assert got.shape == np.asarray(old).shape, (path.name, got.shape)
            assert np.abs(got - np.asarray(old, float)).mean() <= 1.5, path.name


def test_chart_ticks_of_a_range_a_few_ulps_wide_end():
    """`t += step` with a step under half an ulp of t never moved: the tick list grew until memory ran out."""
    import math
    from uninet_feat.charts import _nice_ticks
    assert _nice_ticks(1.0, math.nextafter(1.0, 2.0)) == [1.0]
    assert _nice_ticks(1e6, 1e6 + 2.4e-10) == [1e6]
    assert _nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_the_console_table_prints_label_and_group_names_as_written(capsys):
    """rich read them as markup: 'scratch [minor]' lost its bracket, and a name with '[/]' was a MarkupError."""
    from uninet_feat.evaluate import print_report
    one = {"image_auroc": 0.9, "n": 3}
    print_report({"image_auroc": 0.9, "per_group": {"line [2]": dict(one)},
                  "per_label": {"scratch [minor]": dict(one), "hole [/]": dict(one)}})
    out = capsys.readouterr().out
    assert "label scratch [minor]" in out and "label hole [/]" in out and "line [2]" in out
