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
