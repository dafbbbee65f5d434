"""Inline SVG charts for the HTML report (`report.py`): ROC, precision–recall and score histograms.

Drawn here rather than with matplotlib so that a report needs no plotting stack and stays one
self-contained file: every chart is a few kilobytes of SVG text, no raster, no external assets.
"""
from __future__ import annotations

import html
import math
import os

import numpy as np

NORMAL_COLOR = "#2b6cb0"   # blue
DEFECT_COLOR = "#d1495b"   # red
THRESH_COLOR = "#2f855a"   # green


def display_text(x) -> str:
    """``x`` as text a UTF-8 page can hold: a file name that is not UTF-8 (Linux bytes ``caf\\xe9.png``, which Python
    holds as a lone surrogate) shown with its odd bytes as ``\\xe9``. Why: writing the page stopped on such a name
    (UnicodeEncodeError), after every image had been scored."""
    s = str(x)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return os.fsencode(s).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:   # a surrogate no file name gives
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def escape(x) -> str:
    return html.escape(display_text(x), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    if start + step == start:   # a range of a few ulps: the step is lost in the sum, which looped for ever
        return [lo]
    ticks = []
    for i in range(4 * n + 2):   # counted, not summed: bounded whatever the rounding
        t = start + i * step
        if t > hi + step * 1e-6:
            break
        ticks.append(round(t, max(12, 3 - math.floor(math.log10(step)))))   # noise off; a step below 1e-12 kept
    return ticks


def _tick_label(t: float, ticks: list[float]) -> str:
    """``t`` with as many decimals as the tick step needs: from the step's magnitude (a fixed tolerance and cap
    gave a step below ~5e-6 no decimals, labels '0', '1', '1', '1'), one more for a step such as 2.5e-8."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    if not (math.isfinite(step) and step > 0):
        step = 1.0
    mag = math.floor(math.log10(step))
    lead = step / 10 ** mag   # 1, 2, 2.5 or 5 (`_nice_ticks`), give or take the float noise of large tick values
    dec = max(0, -mag + (abs(lead - round(lead)) > 0.01))
    return f"{t:.{dec}f}"


def _thin(X, Y, width):
    """The vertices of a polyline in pixels (``X``, ``Y``) that a chart ``width`` pixels wide can show: above
    4 × ``width`` of them, in each run of vertices within one pixel column only the first, the last, the lowest and
    the highest, in their order. Why: a curve of 100k test images kept one vertex per image, a 2.4 MB PR chart; the
    thinned one differs by less than a pixel across and not at all up and down, ends and steps kept."""
    X, Y = np.asarray(X, float), np.asarray(Y, float)
    if X.size <= 4 * width:
        return X, Y
    col = np.floor(X)
    start = np.r_[0, np.flatnonzero(col[1:] != col[:-1]) + 1]
    end = np.r_[start[1:] - 1, X.size - 1]
    run = np.repeat(np.arange(start.size), np.diff(np.r_[start, X.size]))
    order = np.lexsort((Y, run))   # within each run by height; the runs stay where they are
    keep = np.unique(np.r_[start, end, order[start], order[end]])
    return X[keep], Y[keep]


class _Chart:
    """A minimal SVG chart: axes, ticks, grid, axis labels, title and a legend above the plot.

    Drawing calls are recorded and rendered in ``svg()``, once the legend's height (and so the
    plot area) is known."""

    LEGEND_Y0, LEGEND_ROW = 38, 17

    def __init__(self, title, xlabel, ylabel, xlim, ylim, w=400, h=360, xticks=None, yticks=None):
        self.w, self.h = w, h
        self.ml, self.mr, self.mt, self.mb = 62, 18, 50, 50
        self.x0, self.x1 = xlim
        self.y0, self.y1 = ylim
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xticks = xticks if xticks is not None else _nice_ticks(self.x0, self.x1)
        self.yticks = yticks if yticks is not None else _nice_ticks(self.y0, self.y1)
        self.parts: list = []   # callables -> svg text
        self.legend: list[tuple[str, str, str]] = []  # (label, colour, kind)

    def px(self, x):
        return self.ml + (np.asarray(x, float) - self.x0) / (self.x1 - self.x0) * (self.w - self.ml - self.mr)

    def py(self, y):
        return self.h - self.mb - (np.asarray(y, float) - self.y0) / (self.y1 - self.y0) * (self.h - self.mt - self.mb)

    def polyline(self, xs, ys, color, width=2.0, dash=None, label=None):
        def draw():
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(*_thin(self.px(xs), self.py(ys), self.w)))
            d = f' stroke-dasharray="{dash}"' if dash else ""
            return (f'<polyline class="curve" points="{pts}" fill="none" stroke="{color}" '
                    f'stroke-width="{width}"{d} stroke-linejoin="round"/>')
        self.parts.append(draw)
        if label:
            self.legend.append((label, color, "dash" if dash else "line"))

    def rect(self, x0, x1, y0, y1, color, opacity=0.4):
        def draw():
            X0, X1 = float(self.px(x0)), float(self.px(x1))
            Y0, Y1 = float(self.py(y1)), float(self.py(y0))
            return (f'<rect x="{X0:.1f}" y="{Y0:.1f}" width="{max(X1 - X0, 0.5):.1f}" '
                    f'height="{max(Y1 - Y0, 0):.1f}" fill="{color}" fill-opacity="{opacity}"/>')
        self.parts.append(draw)

    def point(self, x, y, color, label=None):
        self.parts.append(lambda: f'<circle cx="{float(self.px(x)):.1f}" cy="{float(self.py(y)):.1f}" r="5" '
                                  f'fill="{color}" stroke="white" stroke-width="1.5"/>')
        if label:
            self.legend.append((label, color, "point"))

    def vline(self, x, color, label=None, dash="6,4", tip=None):
        def draw():
            X = float(self.px(x))
            t = f"<title>{escape(tip)}</title>" if tip else ""
            return (f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{self.mt}" y2="{self.h - self.mb}" '
                    f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}">{t}</line>')
        self.parts.append(draw)
        if label:
            self.legend.append((label, color, "dash"))

    def legend_entry(self, label, color, kind="box"):
        self.legend.append((label, color, kind))

    def _legend_layout(self):
        """Entries placed left to right, wrapping to new rows; returns [(x, y, entry)], rows."""
        out, x, row = [], self.ml, 0
        for e in self.legend:
            ew = 24 + 6.9 * len(e[0])
            if x > self.ml and x + ew > self.w - self.mr:
                x, row = self.ml, row + 1
            out.append((x, self.LEGEND_Y0 + row * self.LEGEND_ROW, e))
            x += ew + 14
        return out, (row + 1 if self.legend else 0)

    def svg(self, css_class: str) -> str:
        layout, nrows = self._legend_layout()
        self.mt = self.LEGEND_Y0 + max(nrows - 1, 0) * self.LEGEND_ROW + 14
        w, h, ml, mr, mt, mb = self.w, self.h, self.ml, self.mr, self.mt, self.mb
        out = [f'<svg class="{css_class}" width="{w}" height="{h}" '
               f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(self.title)}">',
               f'<text x="{w / 2:.0f}" y="18" text-anchor="middle" class="ctitle">{escape(self.title)}</text>']
        for t in self.xticks:
            X = float(self.px(t))
            out.append(f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{mt}" y2="{h - mb}" class="grid"/>')
            out.append(f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{h - mb}" y2="{h - mb + 5}" class="axis"/>')
            out.append(f'<text x="{X:.1f}" y="{h - mb + 18}" text-anchor="middle" class="tick">'
                       f'{_tick_label(t, self.xticks)}</text>')
        for t in self.yticks:
            Y = float(self.py(t))
            out.append(f'<line x1="{ml}" x2="{w - mr}" y1="{Y:.1f}" y2="{Y:.1f}" class="grid"/>')
            out.append(f'<line x1="{ml - 5}" x2="{ml}" y1="{Y:.1f}" y2="{Y:.1f}" class="axis"/>')
            out.append(f'<text x="{ml - 8}" y="{Y + 4:.1f}" text-anchor="end" class="tick">'
                       f'{_tick_label(t, self.yticks)}</text>')
        # data, clipped to the plot area by a nested viewport
        out.append(f'<svg x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" overflow="hidden">'
                   f'<g transform="translate({-ml},{-mt})">')
        out.extend(p() for p in self.parts)
        out.append("</g></svg>")
        out.append(f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" class="frame"/>')
        out.append(f'<text x="{(ml + w - mr) / 2:.0f}" y="{h - 10}" text-anchor="middle" class="alabel">'
                   f'{escape(self.xlabel)}</text>')
        out.append(f'<text transform="translate(16,{(mt + h - mb) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                   f'class="alabel">{escape(self.ylabel)}</text>')
        for x, y, (label, color, kind) in layout:
            if kind == "box":
                out.append(f'<rect x="{x}" y="{y - 9}" width="14" height="10" fill="{color}" fill-opacity="0.55" '
                           f'stroke="{color}"/>')
            elif kind == "point":
                out.append(f'<circle cx="{x + 7}" cy="{y - 4}" r="4.5" fill="{color}"/>')
            else:
                d = ' stroke-dasharray="4,3"' if kind == "dash" else ""
                out.append(f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                           f'stroke-width="2.5"{d}/>')
            out.append(f'<text x="{x + 20}" y="{y}" class="legend">{escape(label)}</text>')
        out.append("</svg>")
        return "\n".join(out)


def operating_point(labels, flags):
    if flags is None:
        return None
    tp = int(np.sum(flags & labels))
    fp = int(np.sum(flags & ~labels))
    fn = int(np.sum(~flags & labels))
    tn = int(np.sum(~flags & ~labels))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "tpr": tp / (tp + fn) if tp + fn else None, "fpr": fp / (fp + tn) if fp + tn else None,
            "precision": tp / (tp + fp) if tp + fp else None}


def roc_svg(labels, scores, op) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc_score(labels, scores)
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    c = _Chart("ROC curve (image level)", "false positive rate (normals flagged)",
               "true positive rate (defects flagged)", (0, 1), (0, 1), xticks=ticks, yticks=ticks)
    c.polyline([0, 1], [0, 1], "#999999", width=1.2, dash="4,4")
    c.polyline(fpr, tpr, DEFECT_COLOR, width=2.5, label=f"ROC, AUC = {auc:.4f}")
    if op is not None:
        c.point(op["fpr"], op["tpr"], THRESH_COLOR, label="at threshold")
    c.legend_entry("chance", "#999999", "dash")
    return c.svg("chart roc")


def pr_svg(labels, scores, op) -> str:
    from sklearn.metrics import average_precision_score, precision_recall_curve
    prec, rec, _ = precision_recall_curve(labels, scores)
    ap = average_precision_score(labels, scores)
    r, p = rec[::-1], prec[::-1]  # recall ascending
    xs, ys = [r[0]], [p[0]]
    for i in range(1, len(r)):
        xs += [r[i - 1], r[i]]
        ys += [p[i], p[i]]
    prevalence = float(np.mean(labels))
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    c = _Chart("Precision–recall curve (defect = positive)", "recall (defects flagged)", "precision",
               (0, 1), (0, 1.02), xticks=ticks, yticks=ticks)
    c.polyline([0, 1], [prevalence, prevalence], "#999999", width=1.2, dash="4,4")
    c.polyline(xs, ys, NORMAL_COLOR, width=2.5, label=f"PR, AP = {ap:.4f}")
    if op is not None and op["precision"] is not None and op["tpr"] is not None:
        c.point(op["tpr"], op["precision"], THRESH_COLOR, label="at threshold")
    c.legend_entry(f"defect share {prevalence:.2f}", "#999999", "dash")
    return c.svg("chart pr")


GROUP_COLORS = (THRESH_COLOR, "#805ad5", "#dd6b20", "#319795", "#975a16", "#d53f8c", "#4a5568", "#38a169")
MAX_LEGEND_GROUPS = 8


def hist_svg(labels, scores, threshold, group_thresholds=None) -> str:
    """``group_thresholds`` ({group: threshold}, a run that flags each image at its group's): one line per group,
    labelled "threshold g: t" (past `MAX_LEGEND_GROUPS` groups, on hovering); ``threshold`` then is the one of
    images of no known group, drawn only when given. Why: the pooled line alone was drawn, a value that flagged no
    image."""
    vals = scores[np.isfinite(scores)]
    lo, hi = float(vals.min()), float(vals.max())
    lines = []   # (threshold, label)
    for g, t in (group_thresholds or {}).items():
        if t is not None and math.isfinite(float(t)):
            lines.append((float(t), f"threshold {g}: {float(t):.4g}"))
    if threshold is not None and math.isfinite(threshold):
        lines.append((threshold, f"threshold {'other groups: ' if lines else ''}{threshold:.4g}"))
    for t, _ in lines:
        lo, hi = min(lo, t), max(hi, t)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    nbins = int(np.clip(np.sqrt(len(vals)) * 1.5, 10, 40))
    edges = np.linspace(lo, hi, nbins + 1)
    fr = {}
    for name, sel in (("normal", ~labels), ("defect", labels)):
        v = scores[sel & np.isfinite(scores)]
        if v.size:
            cnt, _ = np.histogram(v, edges)
            fr[name] = (cnt / v.size, v.size)
    ymax = max((f.max() for f, _ in fr.values()), default=1.0)
    c = _Chart("Image score histogram", "image anomaly score", "fraction of the class's images",
               (lo - pad, hi + pad), (0, ymax * 1.08))
    for name, color in (("normal", NORMAL_COLOR), ("defect", DEFECT_COLOR)):
        if name not in fr:
            continue
        f, n = fr[name]
        for i, v in enumerate(f):
            if v > 0:
                c.rect(edges[i], edges[i + 1], 0, v, color, 0.42)
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(f, 2)
        c.polyline(np.r_[edges[0], xs, edges[-1]], np.r_[0, ys, 0], color, width=1.5)
        c.legend_entry(f"{name} (n={n})", color, "box")
    for i, (t, name) in enumerate(lines):
        c.vline(t, GROUP_COLORS[i % len(GROUP_COLORS)], label=name if len(lines) <= MAX_LEGEND_GROUPS else None,
                tip=name)
    if len(lines) > MAX_LEGEND_GROUPS:
        c.legend_entry(f"{len(lines)} thresholds, one per group (hover a line)", THRESH_COLOR, "dash")
    return c.svg("chart hist")
