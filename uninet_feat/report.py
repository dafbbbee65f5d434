"""One self-contained HTML report of an evaluation: metrics, ROC/PR curves, score histograms,
the worst false positives / false negatives with their heatmap overlays, and a per-image table.

Self-contained means: no network, no external scripts or stylesheets, no links to local files.
Charts are inline SVG drawn here; images are downscaled thumbnails embedded as base64 PNG data URIs,
so the file can be mailed or archived alone. The file is written atomically.

    from uninet_feat.evaluate import evaluate
    from uninet_feat.report import write_report
    rep = evaluate("runs/line1", quiet=True)
    write_report("runs/line1/report.html", rep, rep["_rows"], threshold=rep["threshold"],
                 overlays={path: png_path, ...}, config=cfg)
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .data.images import oriented, oriented_size
from .io import atomic_write_text

NORMAL_COLOR = "#2b6cb0"   # blue
DEFECT_COLOR = "#d1495b"   # red
THRESH_COLOR = "#2f855a"   # green

_METRIC_NAMES = [
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO (FPR ≤ 0.3)"),
    ("image_ap", "Image AP"),
    ("ap", "AP"),
    ("f1_max", "Image F1-max"),
    ("f1", "F1"),
    ("mean_image_auroc", "Mean image AUROC over groups"),
]
_GROUP_KEYS = ["image_auroc", "pixel_auroc", "aupro", "image_ap", "f1_max"]
_SKIP_KEYS = {"per_group", "per_label", "at_threshold", "threshold", "n_test", "n_defect"}

TOP_K = 8


# ----------------------------------------------------------------------------------------- helpers
def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _esc(v)
    if not math.isfinite(f):
        return "—"
    return f"{f:.{digits}f}" if abs(f) >= 10 ** -digits or f == 0 else f"{f:.3g}"


def _to_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _to_bool(v) -> bool | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y")
    return bool(v)


def _norm_rows(rows) -> list[dict]:
    out = []
    for r in rows or []:
        d = dict(r)
        d["path"] = str(d.get("path", ""))
        d["label"] = str(d.get("label", ""))
        d["group"] = "" if d.get("group") is None else str(d.get("group"))
        d["is_defect"] = bool(_to_bool(d.get("is_defect")) if d.get("is_defect") is not None
                              else d["label"] not in ("good", "normal", "ok", ""))
        d["score"] = _to_float(d.get("score"))
        d["flagged"] = _to_bool(d.get("flagged"))
        out.append(d)
    return out


def _thumb_uri(src, max_w: int, max_h: int, max_bytes: int = 100_000) -> str | None:
    """A PNG data URI of ``src`` (a file path or a uint8 array) fitted into max_w × max_h.

    A thumbnail whose full-colour PNG exceeds ``max_bytes`` (noisy textures compress badly) is stored
    with a 256-colour palette instead, which keeps ~50 overlays well under 10 MB."""
    try:
        if isinstance(src, np.ndarray):
            img = Image.fromarray(src)
        else:
            with Image.open(src) as f:
                img = oriented(f).convert("RGB")   # upright, as its map (load_image) is
        img = img.convert("RGB")
        img.thumbnail((max_w, max_h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        if len(data) > max_bytes:
            buf = io.BytesIO()
            img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG")
            data = min(data, buf.getvalue(), key=len)
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(t: float, ticks: list[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    dec = 0
    while dec < 6 and abs(step * 10 ** dec - round(step * 10 ** dec)) > 1e-6:
        dec += 1
    return f"{t:.{dec}f}"


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
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(self.px(xs), self.py(ys)))
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

    def vline(self, x, color, label=None, dash="6,4"):
        def draw():
            X = float(self.px(x))
            return (f'<line x1="{X:.1f}" x2="{X:.1f}" y1="{self.mt}" y2="{self.h - self.mb}" '
                    f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
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
               f'viewBox="0 0 {w} {h}" role="img" aria-label="{_esc(self.title)}">',
               f'<text x="{w / 2:.0f}" y="18" text-anchor="middle" class="ctitle">{_esc(self.title)}</text>']
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
                   f'{_esc(self.xlabel)}</text>')
        out.append(f'<text transform="translate(16,{(mt + h - mb) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                   f'class="alabel">{_esc(self.ylabel)}</text>')
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
            out.append(f'<text x="{x + 20}" y="{y}" class="legend">{_esc(label)}</text>')
        out.append("</svg>")
        return "\n".join(out)


# ----------------------------------------------------------------------------------------- charts
def _operating_point(labels, flags):
    if flags is None:
        return None
    tp = int(np.sum(flags & labels))
    fp = int(np.sum(flags & ~labels))
    fn = int(np.sum(~flags & labels))
    tn = int(np.sum(~flags & ~labels))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "tpr": tp / (tp + fn) if tp + fn else None, "fpr": fp / (fp + tn) if fp + tn else None,
            "precision": tp / (tp + fp) if tp + fp else None}


def _roc_svg(labels, scores, op) -> str:
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


def _pr_svg(labels, scores, op) -> str:
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


def _hist_svg(labels, scores, threshold) -> str:
    vals = scores[np.isfinite(scores)]
    lo, hi = float(vals.min()), float(vals.max())
    if threshold is not None and math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
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
    if threshold is not None and math.isfinite(threshold):
        c.vline(threshold, THRESH_COLOR, label=f"threshold {threshold:.4g}")
    return c.svg("chart hist")


# ----------------------------------------------------------------------------------------- sections
def _metrics_table(metrics: dict, op, threshold, n, n_def) -> str:
    rows = []
    for key, name in _METRIC_NAMES:
        if key in metrics and metrics[key] is not None:
            rows.append((name, _fmt(metrics[key])))
    for key, v in metrics.items():
        if key.startswith("_") or key in _SKIP_KEYS or key in dict(_METRIC_NAMES):
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            rows.append((key, _fmt(v)))
    rows.append(("Test images (normal / defect)", f"{n} ({n - n_def} / {n_def})"))
    rows.append(("Threshold (from validation normals)" if threshold is not None else "Threshold",
                 _fmt(threshold, 6) if threshold is not None else "— (none)"))
    if op is not None:
        rows.append(("Defects flagged at threshold (recall)", f"{_fmt(op['tpr'], 3)} ({op['tp']} / {op['tp'] + op['fn']})"))
        rows.append(("Normals flagged at threshold (FPR)", f"{_fmt(op['fpr'], 3)} ({op['fp']} / {op['fp'] + op['tn']})"))
    elif isinstance(metrics.get("at_threshold"), dict):
        for k, v in metrics["at_threshold"].items():
            rows.append((k.replace("_", " "), _fmt(v, 3)))
    body = "".join(f"<tr><th>{_esc(a)}</th><td class='num'>{b}</td></tr>" for a, b in rows)
    out = f"<div class='mtables'><div><h3>All test images</h3><table class='metrics'>{body}</table></div>"
    for key, title, col, extra in (("per_group", "Per group", "group", []),
                                   ("per_label", "Per defect label (vs all test normals)", "label",
                                    ["n", "defect_pixel_share"])):
        per = metrics.get(key)
        if not (isinstance(per, dict) and per):
            continue
        keys = [k for k in _GROUP_KEYS + extra if any(k in (v or {}) for v in per.values())]
        names = {**dict(_METRIC_NAMES), "n": "images", "defect_pixel_share": "share of defect pixels"}
        head = "".join(f"<th>{_esc(names.get(k, k))}</th>" for k in keys)
        trs = "".join(f"<tr><th>{_esc(g)}</th>" + "".join(f"<td class='num'>{_fmt((v or {}).get(k))}</td>"
                                                           for k in keys) + "</tr>"
                      for g, v in sorted(per.items()))
        out += (f"<div><h3>{_esc(title)}</h3><table class='metrics pergroup'><tr><th>{col}</th>{head}</tr>"
                f"{trs}</table></div>")
    return out + "</div>"


def _colour_key(overlay_range=None) -> str:
    """A small inline SVG colour bar of the overlays' default colormap (inferno), low → high."""
    from .overlay import _INFERNO_ANCHORS
    stops = "".join(f'<stop offset="{i / (len(_INFERNO_ANCHORS) - 1):.2f}" stop-color="#{c}"/>'
                    for i, c in enumerate(_INFERNO_ANCHORS))
    lo, hi = ("low", "high") if overlay_range is None else (f"{overlay_range[0]:.3g}", f"{overlay_range[1]:.3g}")
    return (f"<span class='ckey'>{_esc(lo)} <svg width='120' height='12' style='vertical-align:middle'>"
            f"<defs><linearGradient id='inferno'>{stops}</linearGradient></defs>"
            f"<rect width='120' height='12' fill='url(#inferno)'/></svg> {_esc(hi)}</span>")


def _outcome(r, threshold=None) -> str:
    """TP / FP / TN / FN at the threshold (``r["_flag"]``, set by write_report), or "—" without one."""
    f = r.get("_flag")
    if f is None:
        return "—"
    return ("TP" if f else "FN") if r["is_defect"] else ("FP" if f else "TN")


def _cards(rows, overlays, threshold, kind) -> str:
    if not rows:
        return f"<p class='note'>No {'normal' if kind == 'fp' else 'defect'} images in the test set.</p>"
    cards = []
    for rank, r in enumerate(rows, 1):
        src = overlays.get(r["path"]) if overlays else None
        img = ""
        if src is not None:
            wide = _aspect(src) > 3
            uri = _thumb_uri(src, 1280 if wide else 360, 160 if wide else 360)
            img = (f"<img class='ov' src='{uri}' alt='overlay of {_esc(Path(r['path']).name)}' loading='lazy'>"
                   if uri else "<div class='noimg'>overlay unreadable</div>")
        elif overlays:
            wide = False
            img = "<div class='noimg'>no overlay</div>"
        else:
            wide, img = False, ""
        oc = _outcome(r, threshold)
        cards.append(
            f"<figure class='card{' wide' if wide else ''}' data-path='{_esc(r['path'])}'>{img}<figcaption>"
            f"<b>#{rank}</b> <span class='fname' title='{_esc(r['path'])}'>{_esc(Path(r['path']).name)}</span><br>"
            f"score <b>{_fmt(r['score'])}</b> · label {_esc(r['label']) or '—'}"
            f"{' · group ' + _esc(r['group']) if r['group'] else ''} · "
            f"<span class='oc oc-{oc}'>{oc}</span></figcaption></figure>")
    return "<div class='cards'>" + "".join(cards) + "</div>"


def _aspect(src) -> float:
    if isinstance(src, np.ndarray):
        return src.shape[1] / max(src.shape[0], 1)
    try:
        with Image.open(src) as f:
            w, h = oriented_size(f)
            return w / max(h, 1)
    except OSError:
        return 1.0


def _table(rows, overlays, threshold, max_rows) -> str:
    order = sorted(rows, key=lambda r: (-r["score"] if math.isfinite(r["score"]) else math.inf))
    shown = order[:max_rows]
    trs = []
    for i, r in enumerate(shown, 1):
        src = overlays.get(r["path"]) if overlays else None
        uri = _thumb_uri(src, 200, 64) if src is not None else None
        th = f"<img class='thumb' src='{uri}' alt='' loading='lazy'>" if uri else ""
        oc = _outcome(r, threshold)
        flag = "—" if oc == "—" else ("yes" if oc in ("TP", "FP") else "no")
        trs.append(f"<tr><td class='num'>{i}</td><td title='{_esc(r['path'])}'>{_esc(Path(r['path']).name)}</td>"
                   f"<td>{_esc(r['group'])}</td><td>{_esc(r['label'])}</td><td>{'defect' if r['is_defect'] else 'normal'}</td>"
                   f"<td class='num' data-v='{r['score'] if math.isfinite(r['score']) else ''}'>{_fmt(r['score'])}</td>"
                   f"<td>{flag}</td><td class='oc oc-{oc}'>{oc}</td><td>{th}</td></tr>")
    note = (f"<p class='note'>Showing the {max_rows} highest-scoring of {len(rows)} images.</p>"
            if len(rows) > max_rows else "")
    head = "".join(f"<th onclick='sortTable(this)'>{h}</th>" for h in
                   ("#", "image", "group", "label", "truth", "score", "flagged", "outcome", "overlay"))
    return f"{note}<table class='rows' id='rows'><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1a202c;font-size:14px}
main{max-width:1360px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:24px;margin:4px 0 2px} h2{font-size:18px;margin:26px 0 10px;border-bottom:2px solid #cbd5e0;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#4a5568;margin:0 0 8px}
section{background:#fff;border-radius:8px;padding:4px 18px 16px;margin-top:16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
table{border-collapse:collapse} th,td{padding:4px 10px;border-bottom:1px solid #e2e8f0;text-align:left}
table.metrics th{font-weight:600;color:#2d3748} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.pergroup th{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.mtables{display:flex;flex-wrap:wrap;gap:40px;align-items:flex-start}
svg.chart{background:#fff;border:1px solid #e2e8f0;border-radius:6px}
svg .ctitle{font-size:14px;font-weight:600;fill:#1a202c} svg .tick{font-size:11px;fill:#4a5568}
svg .alabel{font-size:12px;fill:#2d3748} svg .legend{font-size:12px;fill:#2d3748}
svg .grid{stroke:#edf2f7;stroke-width:1} svg .axis{stroke:#4a5568;stroke-width:1}
svg .frame{fill:none;stroke:#4a5568;stroke-width:1}
.note{color:#744210;background:#fefcbf;padding:6px 10px;border-radius:4px;display:inline-block}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.card{margin:0;background:#f7fafc;border:1px solid #e2e8f0;border-radius:6px;padding:8px}
.card.wide{grid-column:1/-1}
.card img.ov{width:100%;height:auto;display:block;border-radius:3px;image-rendering:auto}
.card figcaption{font-size:12.5px;margin-top:6px;line-height:1.5}
.card .fname{word-break:break-all}
.noimg{height:60px;display:flex;align-items:center;justify-content:center;color:#718096;background:#edf2f7;border-radius:3px}
.oc{font-weight:600} .oc-FP,.oc-FN{color:#c53030} .oc-TP,.oc-TN{color:#2f855a}
table.rows{width:100%;font-size:12.5px} table.rows th{cursor:pointer;background:#edf2f7;position:sticky;top:0}
table.rows img.thumb{max-height:32px;max-width:200px;display:block}
details{margin:10px 0} summary{cursor:pointer;font-weight:600}
pre{background:#1a202c;color:#e2e8f0;padding:12px;border-radius:6px;overflow:auto;font-size:12px}
.legendkey{font-size:12.5px;color:#4a5568}
"""

_JS = """
function sortTable(th){var t=th.closest('table'),b=t.tBodies[0],i=th.cellIndex,asc=th.dataset.asc!=='1';
th.dataset.asc=asc?'1':'0';var rs=Array.from(b.rows);rs.sort(function(a,c){var x=a.cells[i],y=c.cells[i];
var u=x.dataset.v!==undefined?parseFloat(x.dataset.v):parseFloat(x.textContent),
v=y.dataset.v!==undefined?parseFloat(y.dataset.v):parseFloat(y.textContent);
if(!isNaN(u)&&!isNaN(v))return asc?u-v:v-u;return asc?x.textContent.localeCompare(y.textContent):y.textContent.localeCompare(x.textContent);});
rs.forEach(function(r){b.appendChild(r);});}
"""


def write_report(out_html, metrics: dict | None = None, rows: list[dict] | None = None, threshold: float | None = None,
                 overlays: dict | None = None, title: str = "uninet-feat evaluation report",
                 config: dict | None = None, top_k: int = TOP_K, max_table_rows: int = 5000,
                 overlay_range: tuple[float, float] | None = None) -> Path:
    """Write one self-contained HTML report and return its path.

    - ``metrics``: the dict from ``evaluate`` (``image_auroc``, ``pixel_auroc``, ``aupro``, ``image_ap``,
      ``f1_max``, ``per_group`` ...); keys that are absent are simply not shown.
    - ``rows``: per-image records ``path, label, group, is_defect, score, flagged`` (``evaluate``'s
      ``_rows``; strings such as ``"0.123"`` / ``"1"`` are accepted). Default: ``metrics["_rows"]``.
    - ``threshold``: the image-score threshold (default ``metrics["threshold"]``); drawn on the
      histogram and as the operating point on the curves.
    - ``overlays``: ``{image path: overlay PNG path or uint8 array}``; embedded as downscaled
      thumbnails. Images without one are listed without a picture.
    - ``config``: the run config, shown in a collapsible block.
    - ``overlay_range``: the ``(vmin, vmax)`` the overlays were coloured with, printed on the colour key.
    Curves are skipped (with a note) when the rows hold only one class.
    """
    metrics = dict(metrics or {})
    if rows is None:
        rows = metrics.get("_rows") or []
    if threshold is None:
        threshold = metrics.get("threshold")
    threshold = None if threshold is None or not math.isfinite(_to_float(threshold)) else float(threshold)
    rows = _norm_rows(rows)
    overlays = {os.fspath(k) if isinstance(k, os.PathLike) else str(k): v for k, v in (overlays or {}).items()}

    labels = np.array([r["is_defect"] for r in rows], dtype=bool)
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    finite = np.isfinite(scores)
    n, n_def = len(rows), int(labels.sum())
    # Flags at the threshold: the rows' own ``flagged`` when every row has one (evaluate writes 0 for
    # all rows when the run has no threshold, so all-False flags without a threshold mean "none").
    row_flags = [r["flagged"] for r in rows]
    if rows and all(f is not None for f in row_flags) and (threshold is not None or any(row_flags)):
        flags = np.array(row_flags, dtype=bool)
    elif threshold is not None:
        flags = np.where(np.isfinite(scores), scores > threshold, False)
    else:
        flags = None
    for i, r in enumerate(rows):
        r["_flag"] = None if flags is None else bool(flags[i])
    op = _operating_point(labels, flags) if flags is not None and n else None

    # charts
    notes = []
    charts = []
    lf, sf = labels[finite], scores[finite]
    if (~finite).any():
        notes.append(f"{int((~finite).sum())} image(s) without a finite score are left out of the charts.")
    if sf.size and lf.any() and (~lf).any():
        opf = _operating_point(lf, flags[finite]) if flags is not None else None
        charts += [_roc_svg(lf, sf, opf), _pr_svg(lf, sf, opf)]
    elif sf.size:
        only = "defect" if lf.all() else "normal"
        notes.append(f"Only {only} images in the test set: ROC and precision–recall curves need both classes "
                     "and are skipped.")
    if sf.size:
        charts.append(_hist_svg(lf, sf, threshold))
    else:
        notes.append("No scored images: no charts.")

    normals = sorted([r for r in rows if not r["is_defect"] and math.isfinite(r["score"])],
                     key=lambda r: -r["score"])[:top_k]
    defects = sorted([r for r in rows if r["is_defect"] and math.isfinite(r["score"])],
                     key=lambda r: r["score"])[:top_k]

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{_esc(title)}</h1><p class='sub'>{n} test images ({n - n_def} normal, {n_def} defect) · "
             f"generated {now} · self-contained file (no network needed)</p>"]
    parts.append("<section id='metrics'><h2>Metrics</h2>" + _metrics_table(metrics, op, threshold, n, n_def)
                 + "</section>")
    parts.append("<section id='charts'><h2>Score distributions and curves</h2>"
                 + "".join(f"<p class='note'>{_esc(t)}</p> " for t in notes)
                 + "<div class='charts'>" + "".join(charts) + "</div>"
                 + "<p class='legendkey'>Histogram bars are normalised per class (each class sums to 1) so a "
                   "small defect set stays visible next to many normals.</p></section>")
    key = (f"Overlays: anomaly heatmap over the image {_colour_key(overlay_range)} (same colour scale for every "
           "image when the caller fixed vmin/vmax); green outline = ground-truth defect mask, where given.")
    if not overlays:
        key = "No heatmap overlays were given to this report."
    parts.append(f"<section id='worst-fp'><h2>Highest-scoring normal images (worst false positives, top {top_k})</h2>"
                 f"<p class='legendkey'>{key}</p>" + _cards(normals, overlays, threshold, "fp") + "</section>")
    parts.append(f"<section id='worst-fn'><h2>Lowest-scoring defect images (worst false negatives, top {top_k})</h2>"
                 + _cards(defects, overlays, threshold, "fn") + "</section>")
    parts.append("<section id='images'><h2>All images</h2><p class='legendkey'>Click a column header to sort. "
                 "Outcome at the threshold: TP/TN correct, FP = normal flagged, FN = defect missed.</p>"
                 + (_table(rows, overlays, threshold, max_table_rows) if rows else "<p class='note'>No rows.</p>")
                 + "</section>")
    cfg_text = json.dumps(config, indent=2, default=str, sort_keys=True) if config else None
    met_text = json.dumps({k: v for k, v in metrics.items() if not k.startswith("_")}, indent=2, default=str)
    parts.append("<section id='config'><h2>Run</h2>"
                 + (f"<details><summary>Run config</summary><pre>{_esc(cfg_text)}</pre></details>" if cfg_text
                    else "<p class='legendkey'>No config given.</p>")
                 + f"<details><summary>All metrics (JSON)</summary><pre>{_esc(met_text)}</pre></details></section>")
    parts.append(f"</main><script>{_JS}</script></body></html>")
    return atomic_write_text(out_html, "\n".join(parts))
