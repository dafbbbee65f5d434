"""Edge cases of the HTML report's rows and its chart ticks (no model needed: synthetic rows)."""
import re

import numpy as np

from uninet_feat.report import write_report


def test_nan_flags_are_unknown_not_all_flagged(tmp_path):
    """numpy/pandas read an empty ``flagged`` cell as NaN, which ``bool`` made True: every image flagged."""
    nan = float("nan")
    rows = [dict(path="/d/a.png", label="good", is_defect=0, score=0.1, flagged=nan),
            dict(path="/d/b.png", label="good", is_defect=0, score=0.2, flagged=np.float32(nan)),
            dict(path="/d/c.png", label="hole", is_defect=1, score=0.9, flagged=nan)]
    t = open(write_report(tmp_path / "r.html", rows=rows), encoding="utf-8").read()
    blank = open(write_report(tmp_path / "b.html", rows=[dict(r, flagged="") for r in rows]), encoding="utf-8").read()
    assert re.findall(r"<td class='oc oc-(\w+)'", t) == re.findall(r"<td class='oc oc-(\w+)'", blank) == []
    assert "(FPR)" not in t
    t = open(write_report(tmp_path / "t.html", rows=rows, threshold=0.5), encoding="utf-8").read()
    assert re.findall(r"<td class='oc oc-(\w+)'", t) == ["TP", "TN", "TN"]   # the threshold's, not NaN's


def test_without_is_defect_the_label_is_read_by_the_projects_normal_rule(tmp_path):
    """The report's own case-sensitive list called 'Good', 'free' and ' ok' defects (`layouts.is_normal_label`)."""
    rows = [{"path": "/d/a.png", "label": "Good", "score": 0.1}, {"path": "/d/b.png", "label": "free", "score": 0.2},
            {"path": "/d/c.png", "label": " ok", "score": 0.15}, {"path": "/d/d.png", "label": "hole", "score": 0.9},
            {"path": "/d/e.png", "label": "good", "is_defect": float("nan"), "score": 0.3}]
    t = open(write_report(tmp_path / "r.html", rows=rows, threshold=0.5), encoding="utf-8").read()
    assert "5 test images (4 normal, 1 defect)" in t
    assert sorted(re.findall(r"<td>(normal|defect)</td>", t)) == ["defect"] + ["normal"] * 4


def test_tick_labels_of_a_tiny_score_span_differ():
    """A step below ~5e-6 was given no decimals: labels '0', '1', '1', '1' (or '1000000' thrice near 1e6)."""
    from uninet_feat.charts import _nice_ticks, _tick_label, hist_svg
    s = (np.float32(0.5) + np.arange(6, dtype=np.float32) * np.float32(6e-8)).astype(np.float64)
    svg = hist_svg(np.array([0, 0, 0, 1, 1, 1], bool), s, None)
    xt = re.findall(r'text-anchor="middle" class="tick">([^<]*)', svg)
    assert len(xt) >= 3 and len(set(xt)) == len(xt) and all(x.startswith("0.5000") for x in xt), xt
    for lo, hi in ((1e6, 1e6 + 3e-7), (0.5, 0.5 + 5e-13), (-1e-7, 1e-7), (0.1234, 0.1234 + 4e-6)):
        t = _nice_ticks(lo, hi)
        got = [_tick_label(v, t) for v in t]
        assert len(t) >= 3 and len(set(got)) == len(got), (lo, got)
        assert np.allclose([float(g) for g in got], t, rtol=0, atol=(t[1] - t[0]) / 100)
    assert [_tick_label(v, t) for t in ([0, 0.2, 0.4],) for v in t] == ["0.0", "0.2", "0.4"]   # as before
    t = _nice_ticks(0.3, 0.31)
    assert [_tick_label(v, t) for v in t] == ["0.3000", "0.3025", "0.3050", "0.3075", "0.3100"]
    t = _nice_ticks(0, 100)
    assert [_tick_label(v, t) for v in t] == ["0", "20", "40", "60", "80", "100"]


def test_a_run_of_several_groups_draws_each_groups_threshold_not_the_pooled_one(tmp_path):
    """The histogram drew the pooled threshold alone (images of no known group), a value that flags no image of a
    run whose images are flagged at their groups' thresholds."""
    rows = [{"path": f"/x/{g}/{i}.png", "group": g, "label": "bad" if i >= 2 else "good", "is_defect": int(i >= 2),
             "score": s + off, "flagged": s + off > t}
            for g, t, off in (("a", 1.0, 0.0), ("b", 5.0, 1.0)) for i, s in enumerate([0.5, 0.9, 1.5, 4.0, 6.0])]
    m = {"threshold": 9.0, "group_thresholds": {"a": 1.0, "b": 5.0}}
    hist = lambda t: t[t.index('<svg class="chart hist"'):]   # noqa: E731
    h = hist(open(write_report(tmp_path / "r.html", m, rows), encoding="utf-8").read())
    assert re.findall(r'class="legend">(threshold[^<]*)', h) == ["threshold a: 1", "threshold b: 5"]
    assert len(re.findall(r'stroke-dasharray="6,4"><title>', h)) == 2
    oc = lambda t: re.findall(r"<td class='oc oc-(\w+)'", t)   # noqa: E731
    unflagged = [{k: v for k, v in r.items() if k != "flagged"} for r in rows]   # flags from the thresholds
    assert oc(open(write_report(tmp_path / "u.html", m, unflagged), encoding="utf-8").read()) == \
        oc(open(tmp_path / "r.html", encoding="utf-8").read())
    rows.append({"path": "/x/c/0.png", "group": "c", "label": "good", "is_defect": 0, "score": 2.0, "flagged": 0})
    h = hist(open(write_report(tmp_path / "c.html", m, rows), encoding="utf-8").read())   # c: the pooled one
    assert re.findall(r'class="legend">(threshold[^<]*)', h) == ["threshold a: 1", "threshold b: 5",
                                                                 "threshold other groups: 9"]
    h = hist(open(write_report(tmp_path / "p.html", {"threshold": 9.0}, rows), encoding="utf-8").read())
    assert re.findall(r'class="legend">(threshold[^<]*)', h) == ["threshold 9"]   # one threshold: as before


def test_a_file_name_that_is_not_utf8_is_shown_with_its_odd_byte_escaped(tmp_path):
    """Linux allows b"caf\\xe9.png" (Python's str holds a lone surrogate): writing the report stopped on it with a
    UnicodeEncodeError, after every image had been scored."""
    import os
    odd = os.fsdecode(b"/d/caf\xe9.png")
    rows = [dict(path=odd, label=os.fsdecode(b"d\xe9faut"), group=os.fsdecode(b"l\xefne"), is_defect=1, score=0.9),
            dict(path="/d/b.png", label="good", is_defect=0, score=0.1)]
    t = open(write_report(tmp_path / "r.html", {"per_group": {rows[0]["group"]: {"image_auroc": 1.0}}}, rows,
                          threshold=0.5), encoding="utf-8").read()
    assert "title='/d/caf\\xe9.png'>caf\\xe9.png</td>" in t and "d\\xe9faut" in t and "l\\xefne" in t


def _curve(svg, colour):
    pts = re.search(rf'<polyline class="curve" points="([^"]*)" fill="none" stroke="{colour}"', svg).group(1)
    return np.array([[float(v) for v in p.split(",")] for p in pts.split()])


def _distance_to(line, pts):
    """Each point's distance to the polyline ``line`` (pixels)."""
    a, b = line[:-1][None], line[1:][None]
    p = pts[:, None]
    ab = b - a
    u = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(a + u[..., None] * ab - p, axis=-1).min(1)


def test_roc_and_pr_charts_of_100k_images_keep_what_a_pixel_shows_not_a_vertex_per_image(monkeypatch):
    """One vertex per test image: 100k images made a 2.4 MB precision-recall chart. Thinned per pixel column, the
    curve keeps its ends, passes through the operating point and stays within a pixel of every vertex."""
    from uninet_feat import charts
    rng = np.random.default_rng(0)
    lab = rng.random(100_000) < 0.3
    sc = rng.normal(0, 1, lab.size) + lab
    op = charts.operating_point(lab, sc > 1.5)
    thin = {k: f(lab, sc, op) for k, f in (("roc", charts.roc_svg), ("pr", charts.pr_svg))}
    monkeypatch.setattr(charts, "_thin", lambda X, Y, w: (X, Y), raising=False)
    full = {k: f(lab, sc, op) for k, f in (("roc", charts.roc_svg), ("pr", charts.pr_svg))}
    for k, colour in (("roc", charts.DEFECT_COLOR), ("pr", charts.NORMAL_COLOR)):
        got, want = _curve(thin[k], colour), _curve(full[k], colour)
        assert len(want) > 20_000 and len(got) <= 4 * 400 and len(thin[k]) < 60_000, (k, len(got), len(thin[k]))
        np.testing.assert_array_equal(got[[0, -1]], want[[0, -1]])
        dot = re.search(r'<circle cx="([^"]*)" cy="([^"]*)"', thin[k])
        assert _distance_to(got, np.array([[float(dot[1]), float(dot[2])]]))[0] <= 0.75
        assert _distance_to(got, want[rng.choice(len(want), 3000)]).max() <= 1.0
