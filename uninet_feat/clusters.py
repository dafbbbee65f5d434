"""`uninet-feat cluster`: candidate defect types among flagged images, to name instead of labelling each image.

The flow it serves: ``predict`` flags images of a new batch; ``extract --run RUN --batch`` gives their vectors;
``cluster`` groups the flagged ones by their defect descriptors (`downstream.cluster`) and writes a contact sheet
of each cluster's most typical images; the engineer names the clusters in ``labels.csv`` (merging two is giving them
one name, dropping a row is blanking its label) and ``train-head --labels labels.csv`` learns the named types.

Only the defect descriptors of each image's top tile are clustered by default (``--columns descriptors``): how the
hottest spot's features differ from its own tile's mean, the hot region's shape and its place in the image. The
pooled image vector mostly describes the product's own look and the image's lighting, in which a defect is a few
per cent of the pixels.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .charts import escape as _esc   # the report's: a file name that is not UTF-8 shown escaped
from .descriptors import PLACE_NAMES, SHAPE_NAMES
from .errors import BadInputError
from .featstore import FeatureStore, head_columns
from .io import atomic_write_csv, atomic_write_text

_SHAPE_PLACE = "|".join(SHAPE_NAMES + PLACE_NAMES)
_DESCRIPTOR = re.compile(r"^top_(l\d+_spotdiff_\d+|" + _SHAPE_PLACE + r")$")
_DESCRIPTOR_V2 = re.compile(r"^top_(l\d+_mapattn_\d+|" + _SHAPE_PLACE + r")$")   # a schema-2 store's
SHEET_PER_CLUSTER = 12
TRUTHY = {"1", "true", "yes", "y"}


def descriptor_columns(names) -> list[int]:
    """Indices of the top tile's defect descriptors among a head's columns (`featstore.head_columns`): each level's
    spot difference (the hot spot's features less its tile's mean), the hot region's shape and its place. Chosen
    over the map-attended features themselves and over every column by `benchmarks.cluster_synthetic` (synthetic
    defect kinds, no real label): those group the images more by their lighting than by their defect."""
    if any("_spotdiff_" in n for n in names):
        return [j for j, n in enumerate(names) if _DESCRIPTOR.match(n)]
    cols = [j for j, n in enumerate(names) if _DESCRIPTOR_V2.match(n)]
    if cols:
        warnings.warn("these features predate the spot differences (feature schema 3), so the spots' own features "
                      "are clustered, which follow each image's lighting more; re-extract with this version for "
                      "clusters of what the defects are")
    return cols


def cluster_matrix(X: np.ndarray, names, columns: str, where=None) -> tuple[np.ndarray, list]:
    """(the columns of the image rows ``X`` (head columns ``names``) that are clustered, each one's block name):
    ``descriptors`` (`descriptor_columns`; blocks: each level's spot differences, the hot region's shape, its place
    in the image), or ``all`` (blocks: each named group of columns, ``top_l1_teacher`` and so on)."""
    if columns == "all":
        cols = list(range(len(names)))
    elif columns == "descriptors":
        cols = descriptor_columns(names)
        if not cols:
            raise BadInputError("this feature store has no defect descriptors (plain backbone features, or a "
                                "store of schema 1)", path=where,
                                fix="extract with --run RUN, or cluster every column with --columns all")
    else:
        raise BadInputError(f"unknown --columns {columns!r}", fix="--columns descriptors or all")
    return X[:, cols], [block_of(names[j]) for j in cols]


def block_of(name: str) -> str:
    """A column's block: its name without the channel number; the shape and place descriptors one block each."""
    bare = name.split("_", 1)[1] if name.startswith(("top_", "mean_")) else name
    side = name.split("_", 1)[0] if name.startswith(("top_", "mean_")) else ""
    if bare in SHAPE_NAMES:
        return f"{side}_shape"
    if bare in PLACE_NAMES:
        return f"{side}_place"
    return re.sub(r"_\d+$", "", name)


def read_path_table(path, column: str, what: str, lines: dict | None = None) -> dict:
    """{absolute path: ``column``'s value} of a CSV with a ``path`` column (``predictions.csv``, ``labels.csv``);
    a relative path is taken from the working folder, as the commands that wrote it were given it. Read as a
    spreadsheet may save it: a UTF-8 BOM, header names in any case or with spaces, extra columns. A file listed
    twice (by any spelling of its path, `windows_path`'s too) with two values is refused, naming both lines.
    ``lines``: filled with {path: its line}, for a caller that finds two paths to be one image later (the store's
    matching) to name both lines too."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} not found", path=path, fix="pass the CSV file itself")
    raw = path.read_bytes()

    def not_utf8(start):   # Excel's plain "CSV" on Windows is cp1252
        line = raw[:start].count(b"\n") + 1
        return BadInputError(f"line {line} is not UTF-8 (byte 0x{raw[start]:02x}): the CSV was saved in another "
                             "encoding", path=path, fix='save it as UTF-8 (Excel: "CSV UTF-8"), or convert it: '
                                                       "iconv -f cp1252 -t utf-8")
    try:
        text, odd = raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:   # or a Linux file name's own bytes, as predict and cluster write them: taken
        text, odd = raw.decode("utf-8-sig", "surrogateescape"), e.start   # where they are the path of a file here
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
    if odd is not None and any(_SURROGATE.search(c) for c in cols):
        raise not_utf8(odd)
    if "path" not in cols or column not in cols:
        raise BadInputError(f"{what} needs columns path and {column}; it has {', '.join(cols) or 'none'}",
                            path=path, fix=f"a CSV with a header line path,{column}")
    out, seen = {}, {}
    for row in reader:   # values stripped but the path: a file name may end in a space (it then named no file)
        row = {(k or "").strip().lower(): (v or "") if isinstance(v, str) else "" for k, v in row.items()}
        p, v = row.get("path", ""), row.get(column, "").strip()
        if odd is not None and any(_SURROGATE.search(x) for k, x in row.items() if k != "path" or
                                   not os.path.lexists(x)):   # bytes of another encoding, not a file's name
            raise not_utf8(odd)
        if not p.strip():
            continue
        if p != p.strip() and not os.path.lexists(p) and os.path.lexists(p.strip()):   # "a.png ,x" typed by hand
            p = p.strip()
        p = p if windows_absolute(p) else os.path.abspath(p)   # C:\\... is no path below the working folder
        key = same_file_key(windows_path(p))
        if key in seen and out[seen[key][1]] != v:
            was = out[seen[key][1]]
            raise BadInputError(f"line {reader.line_num}: {row['path']} is {column} {v!r} here and {was!r} on line "
                                f"{seen[key][0]}", path=path, fix="list every image once")
        seen.setdefault(key, (reader.line_num, p))
        out[seen[key][1]] = v
    if lines is not None:
        lines.update({p: n for n, p in seen.values()})
    return out


_SURROGATE = re.compile("[\udc80-\udcff]")   # a byte that is not UTF-8, as surrogateescape holds it


def windows_path(path: str) -> str:
    """``path`` with its backslashes read as / when it holds some and names no file here (a CSV written on Windows:
    ``batch\\img_001.png``); else ``path`` itself: on Linux ``a\\b.png`` can be a file of its own beside
    ``a/b.png``."""
    if "\\" not in path or os.path.lexists(path):
        return path
    return os.path.abspath(path.replace("\\", "/"))


_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\[^\\/]+[\\/])")   # C:\..., C:/..., \\server\...


def windows_absolute(path: str) -> bool:
    """Whether ``path`` is a Windows absolute path (``C:\\data\\x.png``, ``\\\\server\\share\\x.png``: predict run
    on Windows writes such) that names no file here; on Linux ``C:\\data`` would be read as a file name below the
    working folder."""
    return bool(_WINDOWS_ABSOLUTE.match(path)) and not os.path.lexists(path)


def _by_path_below_root(paths, recs) -> tuple[dict, str]:
    """({Windows absolute path: index of its image in ``recs``}, the store's folder): each path matched to the image
    whose path below the folder holding every store image it ends with (the longest such: ``day1\\a.png`` before
    ``a.png``), and kept only when what it has before that is the Windows folder most of them share, so that
    ``C:\\x\\other\\a.png`` is not taken for the store's ``a.png`` beside ``day1/`` (Windows folders case-folded)."""
    root = os.path.commonpath([os.path.dirname(r["path"]) for r in recs])
    below = {Path(os.path.relpath(r["path"], root)).parts: j for j, r in enumerate(recs)}
    got = {}
    for p in paths:
        parts = [x for x in re.split(r"[\\/]+", p) if x]
        k = next((k for k in range(1, len(parts)) if tuple(parts[k:]) in below), None)   # 1: never the drive
        if k is not None:
            got[p] = (below[tuple(parts[k:])], "/".join(parts[:k]).casefold())
    folders = [f for _, f in got.values()]
    # most paths first; in a tie the outer folder (its paths match more of the store's path), then by name: the same
    # images in every process (a set's order of strings changes with the hash seed)
    top = min(set(folders), key=lambda f: (-folders.count(f), f.count("/"), f)) if folders else None
    return {p: j for p, (j, f) in got.items() if f == top}, root


def unmatched_windows_paths(absent, source) -> tuple[str, str] | None:
    """(reason, fix) when ``absent`` (CSV paths found in no store row) holds Windows absolute paths, else None."""
    win = [p for p in absent if windows_absolute(p)]
    if not win:
        return None
    return (f"{len(win)} path(s) in {source} are Windows absolute paths that name no file here and end in no "
            f"feature-store image's path below the store's folder (first: {win[0]})",
            "write the CSV's paths relative to the data folder (e.g. test\\spot\\000.png) and run from that "
            "folder, or extract the images they name into the store")


def same_file_key(path) -> str:
    """What two spellings of one file share: its real path (a symlinked folder, a/../a), case-folded where the
    file system folds case (Windows)."""
    return os.path.normcase(os.path.realpath(path))


def store_rows(paths, recs, source=None) -> tuple[dict, list]:
    """({path: index of its record in ``recs``}, the paths not found): matched by absolute path, else by the file
    they name (`same_file_key`), so that predict run through a symlinked folder finds the store's images. A path
    that matches neither and holds backslashes (a CSV written on Windows: ``batch\\img_001.png``, which names no
    file here: `windows_path`) is matched with them read as /, said once in a warning naming ``source`` (the CSV).
    A Windows absolute path (``C:\\lines\\batch\\day1\\a.png``, as predict writes on Windows) is matched by its path
    below the store's folder (`_by_path_below_root`), said once too; one that still matches nothing stays absent,
    and the caller names it with `unmatched_windows_paths`'s fix."""
    where = {r["path"]: j for j, r in enumerate(recs)}
    real = None
    found, absent, slashed = {}, [], []
    for p in paths:
        j = where.get(p)
        if j is None:
            if real is None:
                real = {same_file_key(r["path"]): j for j, r in enumerate(recs)}
            j = real.get(same_file_key(p))
        q = windows_path(p) if j is None else p
        if q != p:
            j = where.get(q, real.get(same_file_key(q)))
            if j is not None:
                slashed.append(p)
        if j is None:
            absent.append(p)
        else:
            found[p] = j
    where_from = f" in {source}" if source else ""
    if slashed:
        warnings.warn(f"{len(slashed)} path(s){where_from} matched the feature store only "
                      f"with their backslashes read as / (a CSV written on Windows; first: {slashed[0]})")
    win = [p for p in absent if windows_absolute(p)]   # C:\\lines\\batch\\day1\\a.png: by day1/a.png below the root
    if win and recs:
        moved, root = _by_path_below_root(win, recs)
        if moved:
            found.update(moved)
            absent = [p for p in absent if p not in moved]
            first = next(iter(moved))
            warnings.warn(f"{len(moved)} Windows absolute path(s){where_from} name no file here and were matched by "
                          f"their path below the feature store's folder {root} (first: {first} -> "
                          f"{recs[moved[first]]['path']})")
    return found, absent


def _rows(recs, flagged) -> tuple[list[int], str]:
    """Which images to cluster: those flagged in predict's CSV, else every image not labelled normal."""
    if flagged is not None:
        table = read_path_table(flagged, "flagged", "predictions CSV")
        wanted = [p for p, v in table.items() if v.lower() in TRUTHY]
        if not wanted:   # it was "0 image(s) to cluster", as for flagged images missing from the store
            raise BadInputError(f"the predictions CSV flags no image (of {len(table)} rows)", path=flagged,
                                fix="flag more in predict (a lower --threshold, or --max-fpr F), or cluster every "
                                    "image not labelled normal (no --flagged)")
        found, absent = store_rows(wanted, recs, flagged)
        keep = sorted(set(found.values()))
        missing = len(absent)
        win = unmatched_windows_paths(absent, flagged)
        if wanted and not keep:
            raise BadInputError(f"none of the {len(wanted)} flagged images is in the feature store"
                                + (f": {win[0]}" if win else ""), path=flagged,
                                fix=win[1] if win else "extract the folder that predict scored (`uninet-feat extract "
                                                       "--run RUN --data SAME_FOLDER --batch --out F`), from the same "
                                                       "working folder")
        if missing:
            warnings.warn(f"{missing} of {len(wanted)} flagged images are not in the feature store and are left out "
                          + (f"({win[0]}; fix: {win[1]})" if win else
                             "(extract the same folder that predict scored to include them)"))
        return keep, f"flagged in {flagged}"
    keep = [j for j, r in enumerate(recs) if not r["is_normal"]]
    if not keep:
        raise BadInputError("every image in the feature store is labelled normal, so there is no defect to cluster",
                            fix="pass --flagged PRED/predictions.csv (from `uninet-feat predict`) to cluster the "
                                "images predict flagged")
    unlabelled = sum(not recs[j]["label"] for j in keep)
    if unlabelled:
        warnings.warn(f"{unlabelled} unlabelled images are clustered as defects (every image not labelled normal "
                      "is); pass --flagged PRED/predictions.csv to cluster only those predict flagged")
    return keep, "every image not labelled normal"


def _in_group(keep, recs, group, rule, where) -> tuple[list, str]:
    """``keep`` cut to ``group``'s images; without one, a warning when they are of several groups."""
    groups = sorted({recs[j].get("group") or "" for j in keep})
    if group is None:
        if len(groups) > 1:
            warnings.warn(f"the images to cluster are of {len(groups)} groups ({', '.join(map(repr, groups[:5]))}): "
                          "the clusters may split them by product before defect type; pass --group G for one "
                          "group's images")
        return keep, rule
    mine = [j for j in keep if (recs[j].get("group") or "") == group]
    if not mine:
        raise BadInputError(f"none of the {len(keep)} images to cluster is of group {group!r} (their groups: "
                            f"{', '.join(map(repr, groups[:5]))})", path=where, fix="pass one of those groups")
    return mine, f"{rule}, group {group}"


def _finite_rows(Xk, recs, where) -> np.ndarray:
    """Which rows of ``Xk`` (the clustered columns of images ``recs``) are finite. One image with NaN or Inf (a
    damaged file, a NaN in the model) stopped the whole run; such images are left out, named in a warning."""
    ok = np.isfinite(Xk).all(1)
    bad = [r["path"] for r, good in zip(recs, ok) if not good]
    if not bad:
        return ok
    fix = ("re-extract those images (a NaN vector comes from a NaN image or model); "
           "`uninet_feat.distributed.validate_store(FEATURES)` counts such vectors in a store")
    if len(bad) == len(recs):
        raise BadInputError(f"every one of the {len(bad)} images to cluster has NaN or infinite feature values "
                            f"(first: {bad[0]})", path=where, fix=fix)
    warnings.warn(f"{len(bad)} of {len(recs)} images to cluster have NaN or infinite feature values and are left "
                  f"out (clusters.json lists them, left_out_nonfinite): {', '.join(bad[:3])}"
                  f"{', ...' if len(bad) > 3 else ''}. Fix: {fix}")
    return ok


def cluster_cmd(features, out, flagged=None, k="auto", k_max: int = 10, columns: str = "descriptors", seed: int = 0,
                n_components: int = 16, sheet: bool = True, group: str | None = None) -> dict:
    """Cluster the images of a feature store; writes clusters.csv, labels.csv, clusters.json (with the settings)
    and sheet.html. Returns clusters.json's content. ``group``: that group's images only (a store of several
    products, whose defects the clusters would otherwise split by product first)."""
    from .downstream.cluster import cluster_vectors, label_agreement
    _keep_named_labels(Path(out) / "labels.csv")
    store = FeatureStore(features)
    X, recs = store.image_table()
    names = head_columns(store.manifest["vector_names"])
    keep, rule = _rows(recs, flagged)
    keep, rule = _in_group(keep, recs, group, rule, features)
    # in path order, not the store's: k-means++ starts and ties follow the rows' order, so the same images in two
    # stores (another shard size, a merged store) gave other clusters under one seed (an audit, session 53)
    keep = sorted(keep, key=lambda j: (str(recs[j]["path"]), j))
    X = X[keep]
    Xk, rk = cluster_matrix(X, names, columns, features)[0], [recs[j] for j in keep]
    ok = _finite_rows(Xk, rk, features)
    nonfinite = [r["path"] for r, good in zip(rk, ok) if not good]
    X, Xk, rk = X[ok], Xk[ok], [r for r, good in zip(rk, ok) if good]
    res = cluster_vectors(Xk, k=k, k_max=k_max, seed=seed, n_components=n_components)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = {i: n for ex in res.exemplars for n, i in enumerate(ex)}
    rows = [{"cluster": int(res.labels[i]), "rank": rank[i], "path": rk[i]["path"], "group": rk[i].get("group", ""),
             "label": rk[i]["label"], "score": rk[i]["score"], "distance": round(float(res.distance[i]), 6)}
            for ex in res.exemplars for i in ex]
    for old in ("sheet.html", "clusters.json", "clusters.csv"):   # a kill while the new ones are made leaves no
        (out / old).unlink(missing_ok=True)   # old one beside the new labels.csv (an old sheet would name its clusters
    # wrongly; an old clusters.csv would make the new labels.csv look edited to the next run: `_keep_named_labels`)
    atomic_write_csv(out / "labels.csv", [{"path": r["path"], "label": f"cluster_{r['cluster']}"} for r in rows])
    atomic_write_csv(out / "clusters.csv", rows)
    settings = {"features": str(features), "flagged": None if flagged is None else str(flagged), "k": k,
                "max_k": k_max, "columns": columns, "seed": seed, "group": group,
                "pca_components": n_components}
    summary = {"rows": rule, "n_images": len(rk), "n_columns": int(Xk.shape[1]),
               "pca_components": int(res.embedding.shape[1]), "explained_variance": res.explained_variance,
               "k": res.k, "k_rule": "given (--k)" if k != "auto" else "highest mean silhouette (no labels used)",
               "silhouettes": {str(kk): v for kk, v in res.silhouettes.items()},
               "sizes": [len(ex) for ex in res.exemplars],
               "exemplars": {str(c): [rk[i]["path"] for i in ex[:5]] for c, ex in enumerate(res.exemplars)},
               "settings": settings}
    if nonfinite:
        summary["left_out_nonfinite"] = nonfinite
    truth = [r["label"] for r in rk]
    if all(truth) and len(set(truth)) >= 2:   # a labelled data set: how the clusters match its labels (figures only)
        summary["agreement_with_labels"] = label_agreement(res, truth, seed=seed)
    atomic_write_text(out / "clusters.json", json.dumps(summary, indent=2))
    if sheet:
        top = X[:, :len(store.manifest["vector_names"])]   # each image's top-tile vector
        tile = (store.manifest.get("settings") or {}).get("tile")   # what a one-tile image's fractions are of
        atomic_write_text(out / "sheet.html", contact_sheet(rk, res, store.manifest["vector_names"], top, tile))
    return summary


def _keep_named_labels(path: Path) -> None:
    """Refuse to overwrite a labels.csv someone has edited: unless it holds what the last run wrote (each image of
    its clusters.csv as ``cluster_N``), with no clusters.csv beside it (a run killed before writing it) unless
    every label is some ``cluster_N``. Why: only a label other than ``cluster_N`` was seen, so rows deleted or two
    clusters merged by renaming one to the other (cluster_2 → cluster_0) were overwritten by the next run."""
    if not path.is_file():
        return
    try:
        table = read_path_table(path, "label", "labels CSV")
        rows = path.with_name("clusters.csv")
        wrote = ({p: f"cluster_{c}" for p, c in read_path_table(rows, "cluster", "clusters CSV").items()}
                 if rows.is_file() else None)
    except BadInputError:
        table, wrote = {"": "?"}, None   # not as cluster wrote it: edited
    edited = (table != wrote if wrote is not None
              else any(not re.fullmatch(r"cluster_\d+", v) for v in table.values()))
    if edited:
        raise BadInputError("this folder's labels.csv has been named or edited (not as the last run wrote it): "
                            "clustering again would overwrite it", path=path,
                            fix="choose another --out, or move labels.csv away first")


def _thumb(rec, box, spot: dict, tile=None) -> str | None:
    """The image (its top tile, for a tiled one) with a box of the hot region's size around its centroid.

    The hot region's fractions are of the model's input: the tile (``box``'s size; ``tile``, the store's tile
    setting, for an image of a tiled store cut into one tile), else the whole image. A tile of an image smaller
    than the tile runs past the image (padded, `tiling`): scaling by the cropped size misplaced the box."""
    from PIL import Image, ImageDraw
    from .data.images import load_image
    from .report import _thumb_uri
    try:   # decoded as the model reads it (upright; 16-bit scaled, where PIL's RGB conversion clips at 255)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # said at extraction already
            a = load_image(rec["path"], min_side=1)
    except (OSError, ValueError, BadInputError):
        return None
    img = Image.fromarray(np.round(a * 255).astype(np.uint8))
    if box is None and tile:   # one tile of a tiled store (image_table names none): at the origin, maybe padded
        th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
        box = (0, 0, th, tw)
    if box is not None:
        y, x, h, w = (int(v) for v in box)
        img = img.crop((x, y, min(x + w, img.width), min(y + h, img.height)))
        # the cropped part's size: a tile past the image's edge has its spot measured on the image's part
        # (`Extractor._unpadded_shapes`; the whole tile's size put the box outside the image)
    H, W = img.height, img.width
    if {"hot_cy", "hot_cx", "hot_bbox_h", "hot_bbox_w"} <= set(spot):
        cy, cx = spot["hot_cy"] * H, spot["hot_cx"] * W
        bh, bw = max(spot["hot_bbox_h"] * H, 6), max(spot["hot_bbox_w"] * W, 6)
        ImageDraw.Draw(img).rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=(90, 200, 255),
                                      width=max(1, round(min(img.size) / 100)))
    return _thumb_uri(np.asarray(img), 180, 180, max_bytes=40_000)


def contact_sheet(recs, res, names, top, tile=None) -> str:
    """One self-contained HTML page: per cluster, its most typical images first (closest to its centre).
    ``recs``: `FeatureStore.image_table` records (``top_tile``: the tile shown); ``top``: each image's top-tile
    vector, columns ``names``; ``tile``: the store's tile setting (None: untiled)."""
    want = {n: names.index(n) for n in ("hot_cy", "hot_cx", "hot_bbox_h", "hot_bbox_w") if n in names}
    parts = ["<!doctype html><meta charset='utf-8'><title>uninet-feat clusters</title><style>"
             "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;width:184px;"
             "vertical-align:top;font-size:11px;word-break:break-all}img{max-width:180px;max-height:180px}"
             "</style>", f"<h1>{res.k} clusters of {len(recs)} images</h1>",
             "<p>Each cluster's images closest to its centre come first; the blue box has the size of the hot "
             "region, around its centroid. Name the clusters in <code>labels.csv</code> (the same name merges "
             "clusters, a blank label drops an image), then <code>uninet-feat train-head --labels labels.csv"
             "</code>.</p>"]
    for c, ex in enumerate(res.exemplars):
        labels = sorted({recs[i]["label"] for i in ex if recs[i]["label"]})
        seen = f" (labels present: {_esc(', '.join(labels[:8]))})" if labels else ""
        parts.append(f"<h2>cluster_{c}: {len(ex)} image{'s' if len(ex) != 1 else ''}{seen}</h2>")
        for i in ex[:SHEET_PER_CLUSTER]:
            r = recs[i]
            uri = _thumb(r, r.get("top_tile"), {n: float(top[i][j]) for n, j in want.items()}, tile)
            img = f"<img src='{uri}'>" if uri else "<i>unreadable</i>"
            parts.append(f"<figure>{img}<figcaption>{_esc(Path(r['path']).name)}"
                         f"{' · ' + _esc(r['label']) if r['label'] else ''} · score {r['score']:.3g}"
                         "</figcaption></figure>")
    return "\n".join(parts)
