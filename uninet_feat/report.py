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
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .charts import escape as _esc, hist_svg, operating_point, pr_svg, roc_svg
from .data.images import oriented_size
from .data.layouts import is_normal_label
from .io import atomic_write_text


_METRIC_NAMES = [
    ("image_auroc", "Image AUROC"),
    ("image_auroc_interval", "Image AUROC, 95 % interval"),
    ("pixel_auroc", "Pixel AUROC"),
    ("pixel_auroc_interval", "Pixel AUROC, 95 % interval (images resampled)"),
    ("aupro", "AUPRO (FPR ≤ 0.3)"),
    ("aupro_interval", "AUPRO, 95 % interval (images resampled)"),
    ("within_image_auroc", "Pixel AUROC within each defective image (mean)"),
    ("pixel_auroc_vs_normal_images", "Pixel AUROC against normal images alone"),
    ("pixel_auroc_vs_normal_images_interval", "Pixel AUROC against normal images alone, 95 % interval"),
    ("aupro_vs_normal_images", "AUPRO against normal images alone (FPR ≤ 0.3)"),
    ("aupro_vs_normal_images_interval", "AUPRO against normal images alone, 95 % interval"),
    ("image_ap", "Image AP"),
    ("ap", "AP"),
    ("f1_max", "Image F1-max"),
    ("f1", "F1"),
    ("mean_image_auroc", "Mean image AUROC over groups"),
    ("mean_image_auroc_interval", "Mean image AUROC, 95 % interval"),
]
_GROUP_KEYS = ["image_auroc", "image_auroc_interval", "pixel_auroc", "pixel_auroc_interval", "aupro", "aupro_interval",
               "within_image_auroc", "pixel_auroc_vs_normal_images", "aupro_vs_normal_images", "image_ap", "f1_max"]
_SKIP_KEYS = {"per_group", "per_label", "at_threshold", "threshold", "n_test", "n_defect", "group_thresholds",
              "threshold_set_on_test_images",
              "within_image_n"}

TOP_K = 8


# ----------------------------------------------------------------------------------------- helpers
def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)) and len(v) == 2:   # an interval
        return f"{_fmt(v[0], 3)} – {_fmt(v[1], 3)}"
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
    """True/False, or None for unknown: None, a blank or NaN cell (numpy and pandas read an empty cell as NaN,
    which ``bool`` made True: every image flagged)."""
    if v is None:
        return None
    if isinstance(v, str):
        s = v.strip().lower()
        return None if s in ("", "nan") else s in ("1", "true", "yes", "y")
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return bool(v)


def _norm_rows(rows) -> list[dict]:
    out = []
    for r in rows or []:
        d = dict(r)
        d["path"] = str(d.get("path", ""))
        d["label"] = str(d.get("label", ""))
        d["group"] = "" if d.get("group") is None else str(d.get("group"))
        known = _to_bool(d.get("is_defect"))
        # unknown: from the label, by the project's rule (case, spaces, "free"); a blank label is a normal image's
        d["is_defect"] = known if known is not None else not (d["label"].strip() == "" or is_normal_label(d["label"]))
        d["score"] = _to_float(d.get("score"))
        d["flagged"] = _to_bool(d.get("flagged"))
        own = d.get("pixel_auroc")   # evaluate's: the image's own pixel AUROC ("" for a normal image)
        d["pixel_auroc"] = None if own in (None, "") else _to_float(own)
        out.append(d)
    return out


def _thumb_uri(src, max_w: int, max_h: int, max_bytes: int = 100_000) -> str | None:
    """A PNG data URI of ``src`` (a file path or an image array) fitted into max_w × max_h.

    A file is read as the model reads it (upright, 16-bit scaled by its full range) but reduced by PIL in its own
    mode (`data.images.picture_8bit`; 32-bit and float files through `load_image`), an array as the overlays take one
    (`overlay._as_rgb_uint8`): PIL's own RGB conversion clips 16-bit values at 255, which showed a 16-bit camera
    frame all white. A thumbnail whose full-colour PNG exceeds ``max_bytes`` (noisy
    textures compress badly) is stored with a 256-colour palette instead, which keeps ~50 overlays well under
    10 MB."""
    from .data.images import load_image, picture_8bit
    from .overlay import _as_rgb_uint8
    try:
        img = None
        if not isinstance(src, np.ndarray):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # said when the image was scored
                img = picture_8bit(src, (max_w, max_h))
                src = load_image(src, min_side=1) if img is None else None
        if img is None:
            img = Image.fromarray(_as_rgb_uint8(src))
            img.thumbnail((max_w, max_h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        if len(data) > max_bytes:
            buf = io.BytesIO()
            img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG")
            data = min(data, buf.getvalue(), key=len)
    except (OSError, ValueError, Image.DecompressionBombError):   # BadInputError (an unreadable file) is a ValueError
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


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
    by_group = metrics.get("group_thresholds")
    if by_group:   # a run of several groups flags each image at its group's threshold
        rows.append(("Thresholds per group (from validation normals)",
                     ", ".join(f"{_esc(str(g))} {_fmt(t, 6)}" for g, t in by_group.items())))
    # the rule as evaluate states it: "from validation normals" was printed for a given --threshold too (an audit,
    # session 52)
    rule = str(metrics.get("threshold_rule") or "from validation normals")
    rows.append((f"Threshold ({rule})" + (", images of no known group" if by_group else "")
                 if threshold is not None else "Threshold",
                 _fmt(threshold, 6) if threshold is not None else "— (none)"))
    on_test = metrics.get("threshold_set_on_test_images")
    if on_test:
        rows.append(("Warning", f"the threshold was set on normals that include {int(on_test)} test image(s): recall "
                                "and false-positive rate at it are optimistic"))
    if op is not None:
        rows.append(("Defects flagged at threshold (recall)", f"{_fmt(op['tpr'], 3)} ({op['tp']} / {op['tp'] + op['fn']})"))
        rows.append(("Normals flagged at threshold (FPR)", f"{_fmt(op['fpr'], 3)} ({op['fp']} / {op['fp'] + op['tn']})"))
    elif isinstance(metrics.get("at_threshold"), dict):
        for k, v in metrics["at_threshold"].items():
            rows.append((k.replace("_", " "), _fmt(v, 3)))
    body = "".join(f"<tr><th>{_esc(a)}</th><td class='num'>{b}</td></tr>" for a, b in rows)
    out = f"<div class='mtables'><div><h3>All test images</h3><table class='metrics'>{body}</table></div>"
    for key, title, col, extra in (("per_group", "Per group", "group", []),
                                   ("per_label", "Per defect label (vs the test normals of its groups)", "label",
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
    return out + _scorers_table(metrics.get("scorers")) + "</div>"


def _scorers_table(sc) -> str:
    """`evaluate --knn`'s other scorers (kNN, combined): their metrics and each one's own threshold (per group for a
    run of several groups) with recall and false-positive rate there. Why: the report showed WDM's alone, so the
    kNN flag a line runs with `predict --flag-by knn` had no threshold or operating point anywhere but the console."""
    if not isinstance(sc, dict):
        return ""
    trs = []
    for name in ("knn", "combined"):
        v = sc.get(name)
        if not isinstance(v, dict) or "image_auroc" not in v:
            continue
        by, at = v.get("group_thresholds"), v.get("at_threshold") or {}
        thr = (", ".join(f"{_esc(str(g))} {_fmt(t, 4)}" for g, t in by.items()) if by else
               _fmt(v.get("threshold"), 4) if v.get("threshold") is not None else "—")
        cells = [_fmt(v.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro", "within_image_auroc",
                                          "pixel_auroc_vs_normal_images", "aupro_vs_normal_images")]
        cells += [thr, _fmt(at.get("recall_defect"), 3), _fmt(at.get("false_positive_rate"), 3)]
        trs.append(f"<tr><th>{name}</th>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>")
    if not trs:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("I-AUROC", "P-AUROC", "AUPRO", "P-AUROC within defective images",
                                            "P-AUROC against normal images", "AUPRO against normal images",
                                            "threshold (validation normals)",
                                            "defect recall", "false-positive rate"))
    feats = f" ({_esc(str(sc['knn_features']))} features)" if sc.get("knn_features") else ""
    return (f"<div><h3>Other scorers{feats}</h3><table class='metrics pergroup'><tr><th>scorer</th>{head}</tr>"
            + "".join(trs) + "</table></div>")


def _colour_key(overlay_range=None) -> str:
    """A small inline SVG colour bar of the overlays' default heat colours (inferno to orange), low → high, each
    as opaque as it is laid over the image relative to the top (clear over the lowest 30 %)."""
    import numpy as np

    from .overlay import heat_colours, heat_weight
    t = np.linspace(0.0, 1.0, 11)
    cols, ops = heat_colours(t), heat_weight(t, 1.0)
    stops = "".join(f'<stop offset="{x:.2f}" stop-color="#{c[0]:02x}{c[1]:02x}{c[2]:02x}" stop-opacity="{o:.2f}"/>'
                    for x, c, o in zip(t, cols, ops))
    lo, hi = ("low", "high") if overlay_range is None else (f"{overlay_range[0]:.3g}", f"{overlay_range[1]:.3g}")
    return (f"<span class='ckey'>{_esc(lo)} <svg width='120' height='12' style='vertical-align:middle'>"
            f"<defs><linearGradient id='inferno'>{stops}</linearGradient></defs>"
            f"<rect width='120' height='12' fill='url(#inferno)' stroke='#999'/></svg> {_esc(hi)}</span>")


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
            f"{' · pixel AUROC in the image ' + _fmt(r['pixel_auroc'], 3) if kind == 'loc' else ''}"
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


def _num_cell(v, text: str) -> str:
    """A numeric table cell whose sort key is explicit: ``data-sort`` holds the number itself (full precision) or is
    empty for none (None, NaN: shown as "—" or blank). Why: the sort read the shown text, so a "—" or blank cell
    compared as text with the numbers beside it, and the rows came out interleaved; `_JS` puts empty keys last."""
    f = None if v is None else _to_float(v)
    key = repr(f) if f is not None and math.isfinite(f) else ""
    return f"<td class='num' data-sort='{key}'>{text}</td>"


def _table(rows, overlays, threshold, max_rows) -> str:
    order = sorted(rows, key=lambda r: (-r["score"] if math.isfinite(r["score"]) else math.inf))
    shown = order[:max_rows]
    own = any(r.get("pixel_auroc") is not None for r in rows)   # evaluate with masks: each image's pixel AUROC
    trs = []
    for i, r in enumerate(shown, 1):
        src = overlays.get(r["path"]) if overlays else None
        uri = _thumb_uri(src, 200, 64) if src is not None else None
        th = f"<img class='thumb' src='{uri}' alt='' loading='lazy'>" if uri else ""
        oc = _outcome(r, threshold)
        flag = "—" if oc == "—" else ("yes" if oc in ("TP", "FP") else "no")
        pa = r.get("pixel_auroc")
        trs.append(f"<tr>{_num_cell(i, str(i))}<td title='{_esc(r['path'])}'>{_esc(Path(r['path']).name)}</td>"
                   f"<td>{_esc(r['group'])}</td><td>{_esc(r['label'])}</td><td>{'defect' if r['is_defect'] else 'normal'}</td>"
                   + _num_cell(r["score"], _fmt(r["score"]))
                   + (_num_cell(pa, "" if pa is None else _fmt(pa, 3)) if own else "")
                   + f"<td>{flag}</td><td class='oc oc-{oc}'>{oc}</td><td>{th}</td></tr>")
    note = (f"<p class='note'>Showing the {max_rows} highest-scoring of {len(rows)} images.</p>"
            if len(rows) > max_rows else "")
    numeric = {"#", "score", "pixel AUROC"}   # sorted by their cells' data-sort numbers, the others by their text
    head = "".join(f"<th onclick='sortTable(this)'{' data-num=1' if h in numeric else ''}>{h}</th>" for h in
                   ("#", "image", "group", "label", "truth", "score") + (("pixel AUROC",) if own else ())
                   + ("flagged", "outcome", "overlay"))
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
function cmpKeys(u,v,num,asc){var e=(u==='')-(v==='');if(e||u==='')return e;
if(num){u=parseFloat(u);v=parseFloat(v);return asc?u-v:v-u;}return asc?u.localeCompare(v):v.localeCompare(u);}
function sortTable(th){var t=th.closest('table'),b=t.tBodies[0],i=th.cellIndex,asc=th.dataset.asc!=='1',
num=th.dataset.num==='1';th.dataset.asc=asc?'1':'0';var rs=Array.from(b.rows);
rs.sort(function(a,c){var x=a.cells[i],y=c.cells[i];
return cmpKeys(num?x.dataset.sort:x.textContent.trim(),num?y.dataset.sort:y.textContent.trim(),num,asc);});
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
    # Flags at the threshold: the rows' own ``flagged`` when every row has one (CSVs of older versions wrote 0
    # for all rows when the run had no threshold, so all-False flags without a threshold mean "none"; evaluate now
    # leaves the column empty then).
    row_flags = [r["flagged"] for r in rows]
    by_group = {str(g): _to_float(t) for g, t in (metrics.get("group_thresholds") or {}).items()}
    if rows and all(f is not None for f in row_flags) and (threshold is not None or any(row_flags)):
        flags = np.array(row_flags, dtype=bool)
    elif threshold is not None:   # each image at its group's threshold, where the run has them (as evaluate flags)
        per = np.array([by_group.get(r["group"], threshold) for r in rows], dtype=np.float64)
        flags = np.where(np.isfinite(scores), scores > per, False)
    else:
        flags = None
    for i, r in enumerate(rows):
        r["_flag"] = None if flags is None else bool(flags[i])
    op = operating_point(labels, flags) if flags is not None and n else None

    # charts
    notes = []
    charts = []
    lf, sf = labels[finite], scores[finite]
    if (~finite).any():
        notes.append(f"{int((~finite).sum())} image(s) without a finite score are left out of the charts.")
    if sf.size and lf.any() and (~lf).any():
        opf = operating_point(lf, flags[finite]) if flags is not None else None
        charts += [roc_svg(lf, sf, opf), pr_svg(lf, sf, opf)]
    elif sf.size:
        only = "defect" if lf.all() else "normal"
        notes.append(f"Only {only} images in the test set: ROC and precision–recall curves need both classes "
                     "and are skipped.")
    if sf.size:   # a run of several groups: each group's threshold, the pooled one only for images of no known group
        present = {r["group"] for r, ok in zip(rows, finite) if ok}
        lines = {g: t for g, t in by_group.items() if g in present}
        charts.append(hist_svg(lf, sf, threshold if not by_group or present - set(by_group) else None, lines))
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
    scale = " (the same colour scale for every image)" if overlay_range is not None else ""
    key = (f"Overlays: anomaly heatmap over the image {_colour_key(overlay_range)}{scale}, clear where the map "
           "is low (the image's own colours) and up to half heat colour at the top; green outline = "
           "ground-truth defect mask, where given; light-blue outline = the model's defect region (the map above the "
           "run's pixel threshold, as `predict --save-maps` marks it), where the run has one.")
    if not overlays:
        key = "No heatmap overlays were given to this report."
    parts.append(f"<section id='worst-fp'><h2>Highest-scoring normal images (worst false positives, top {top_k})</h2>"
                 f"<p class='legendkey'>{key}</p>" + _cards(normals, overlays, threshold, "fp") + "</section>")
    parts.append(f"<section id='worst-fn'><h2>Lowest-scoring defect images (worst false negatives, top {top_k})</h2>"
                 + _cards(defects, overlays, threshold, "fn") + "</section>")
    missed = sorted([r for r in rows if r["is_defect"] and r.get("pixel_auroc") is not None
                     and math.isfinite(r["pixel_auroc"])], key=lambda r: r["pixel_auroc"])[:top_k]
    if missed:   # the image score may catch a defect whose heatmap points elsewhere: where to look at the maps
        parts.append(f"<section id='worst-loc'><h2>Defects the heatmap misses (lowest pixel AUROC inside the image, "
                     f"top {top_k})</h2><p class='legendkey'>Each defective image's own pixel AUROC: 1 when every "
                     "defect pixel is hotter than every other pixel of its image, 0.5 when the map does not tell "
                     "them apart.</p>" + _cards(missed, overlays, threshold, "loc") + "</section>")
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
