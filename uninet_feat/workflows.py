"""The downstream commands: extract → index → train-head (and zero-shot); predict is `predict.py`."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .data.layouts import is_normal_label
from .errors import BadInputError
from .featstore import CALIBRATION_KEYS, FeatureStore, head_columns, without_twin_half
from .io import SCRATCH, atomic_write_csv, atomic_write_text
from .runs import samples_of
from .scorers import abs_path, paths_sha


def _check_sizes(image_size, tile) -> None:
    """--image-size / --tile of the commands that take them without a run config: 0 or a negative size meant the
    default silently, or a torch traceback (``--tile 0`` is extract's way to say untiled)."""
    from .config import check_numbers
    check_numbers({"image_size": image_size, "tile": tile or None})


def extract_cmd(data, out, run=None, split_csv=None, group=None, backbone=None, weights="imagenet",
                image_size=None, tile=None, patches=False, shard="0/1", shard_size=256, quiet=False,
                validate=False, text=None, skip_bad=False, batch=False, mean=None, std=None) -> dict:
    """``batch``: ``data`` read as predict reads a new batch (`layouts.discover_batch`); a folder that holds images
    but no training layout (no label folders) is read so without it."""
    from .extract import Extractor
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise BadInputError(f"--shard {shard} must be i/n with 0 <= i < n", fix="e.g. --shard 0/2 and --shard 1/2 "
                                                                                 "in two processes; 0/1 for all")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise BadInputError(f"--shard-size must be an integer >= 1, got {shard_size!r}", fix="e.g. --shard-size 256")
    _check_sizes(image_size, tile)
    if run is not None and (backbone is not None or weights != "imagenet"):
        raise BadInputError("--backbone/--weights choose plain features; with --run the run's own model is used",
                            path=run, fix="drop --backbone/--weights, or drop --run for plain backbone features")
    # [distributed] under torchrun (RANK/WORLD_SIZE set) the default --shard becomes rank/world_size;
    # a barrier at the end lets rank 0 report (and validate) the finished store.
    from .distributed import env_rank_world, init_from_env
    import torch
    from .runs import pick_device
    dd, device, (rank, world) = None, pick_device(), env_rank_world() or (0, 1)
    if shard == "0/1" and world > 1:
        dd = init_from_env(device="cpu")   # for the closing barrier only: gloo
        i, n = dd.rank, dd.world_size
    elif world > 1:   # every rank took the one shard given: the same shards extracted world times, the others none
        raise BadInputError(f"--shard {shard} under torchrun's {world} processes: each takes its rank's share "
                            "itself, and a --shard given to all of them makes each extract the same shards (an "
                            "audit, session 53)", fix="drop --shard under torchrun, or run `uninet-feat extract "
                                                     "--shard i/n` processes without torchrun")
    if device.type == "cuda" and device.index is None and world > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))   # one GPU per process
        device = torch.device("cuda", local % torch.cuda.device_count())
    ex = Extractor(run=run, backbone=backbone, weights=weights, image_size=image_size, tile=tile, patches=patches,
                   text=text, skip_bad=skip_bad, device=device, mean=mean, std=std)
    # with a run, its own split (an older run's config lacks split_hash: the legacy one), so the store's
    # `train` rows are the images the run trained on
    from .calibration import run_group_names
    samples = _batch_or_layout(data, split_csv, group, (ex.cfg.get("split_hash") or "path") if run else None,
                               batch, ex.cfg.get("mask_pattern"),
                               bool(ex.cfg.get("label_split_folders", False)) if run else None,
                               run_group_names(ex.run_dir, ex.model.cfg) if run else ())
    store = ex.extract_to(samples, out, shard_size=shard_size, shard=(i, n), quiet=quiet)
    complete = store is not None
    if dd is not None:
        dd.close()  # barrier: every rank's shards are written; the last one to finish wrote `complete`
        complete = (Path(out) / "complete").exists()
    m = json.loads((Path(out) / "manifest.json").read_text(encoding="utf-8"))
    res = {"features": str(out), "n_items": m["n_items"], "n_shards": m["n_shards"],
           "dim": len(m["vector_names"]), "complete": complete, "skipped": m.get("skipped", [])}
    if dd is not None:
        res["shard"] = f"{i}/{n}"
    if validate and complete and (dd is None or dd.is_main):
        from .distributed import validate_store
        # the store records absolute paths; the images skip_bad left out are no missing ones
        exp = sorted({os.path.abspath(s.path) for s in samples} - {os.path.abspath(p) for p in res["skipped"]})
        res["validation"] = validate_store(out, expected_paths=exp)
    return res


def _copies_of(paths, items) -> list[str]:
    """Store items that look like copies of ``paths`` (the same file name and size at another path)."""
    def key(p):
        try:
            return os.path.basename(p), os.path.getsize(p)
        except OSError:
            return None
    want = {key(p) for p in paths} - {None}
    return [it["path"] for it in items if key(it["path"]) in want]


def _batch_or_layout(data, split_csv, group, split_hash, batch: bool, mask_pattern=None,
                     label_split_folders=None, run_groups=()) -> list:
    """The samples to extract: a training layout's (`samples_of`), or a new batch's as predict reads it (``batch``,
    or a folder of images without label folders, where the layout finds none): the features of the images
    `predict` flagged, for `cluster`. A batch takes ``group`` (every image), else, for a run of several
    ``run_groups``, each image its ``DIR/<group>/`` folder's, as predict reads it (a run scored by position offsets
    per group could not extract a batch at all: --group was refused with --batch; an audit, session 52)."""
    from dataclasses import replace
    from .data.layouts import batch_groups, discover_batch, without_predict_outputs
    if batch:
        if split_csv:
            raise BadInputError("--batch reads every image under --data, unlabelled: it takes no --split-csv",
                                fix="drop --batch, or drop --split-csv")
        found = without_predict_outputs(discover_batch(data, mask_pattern), data)
        return [replace(s, group=group) for s in found] if group else batch_groups(found, data, run_groups)
    try:
        return samples_of(data, split_csv, group, split_hash, mask_pattern, label_split_folders)
    except BadInputError as e:
        if split_csv or group or not Path(data).is_dir() or "no images found" not in e.reason:
            raise
        found = without_predict_outputs(discover_batch(data, mask_pattern), data)
        if not found:
            raise
        return batch_groups(found, data, run_groups)


def zero_shot_step(bb) -> int:
    """What a zero-shot image side must be a multiple of: the ViT's patch alone. Zero-shot builds no feature pyramid,
    whose coarsest stride `size_multiple` also counts (112 for patch 14, which refused ViT-H-14-378 at its 378 px)."""
    return getattr(bb, "patch_size", None) or getattr(bb, "size_multiple", 1)


INDEX_DEFAULTS = {"coreset": 0.1, "k": 1}   # a patch-level bank's: the share of patches kept, the neighbours scored


def index_cmd(features, out, kind="flat", level="patch", coreset=None, k=None, run=None, device="auto") -> dict:
    """Patch level: a kNN scorer over the training normals' patches (``coreset`` default 0.1, ``k`` default 1).
    Image level: a search index of every image row, which scores nothing. ``device``: where the coreset and
    the index are built (auto, cpu, cuda, cuda:N; `downstream.KNNScorer`).

    The validation normals of ``run`` (by default the run the features came from) stay out of the memory
    bank: a bank that holds them scores them 0, and predict standardises kNN scores on them. So do its test
    images: a store that does not mark them test (`extract --batch` of a label-folder set gives every image split
    "") would put its test normals in the bank, and `evaluate --knn` would score them 0. knn.json records both, and
    the bank's image paths (`scorers.test_images_in_bank`)."""
    from .downstream import KNNScorer, build_index, save_index
    if level == "image":   # these shape a memory bank of normals; an image index holds every row as it is
        given = [f"--{n} {v}" for n, v in (("coreset", coreset), ("k", k), ("run", run)) if v is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise BadInputError(f"{', '.join(given)} {verb} only at --level patch (the kNN scorer's memory bank); "
                                "an image-level index holds every image row and scores nothing",
                                fix="drop them, or use --level patch")
    coreset = INDEX_DEFAULTS["coreset"] if coreset is None else coreset
    k = INDEX_DEFAULTS["k"] if k is None else k
    store = FeatureStore(features)
    out = Path(out)
    if level == "patch":
        source = store.manifest.get("source") or {}
        if run is not None:   # given: not a run is refused (the warning below is for a run whose data moved)
            from .runs import run_path
            run_path(run, "model.pt")
        run = run or source.get("run")
        try:
            held_out, test = _held_out_paths(run) if run else (set(), None)
        except BadInputError as e:   # the run's data moved: the bank keeps every normal; predict won't z-score
            warnings.warn(f"cannot hold out the validation normals of {run} ({e}); predict will give no combined score")
            run, held_out, test = None, set(), None
        paths = [abs_path(it["path"]) for it in store.items]
        normal = np.array([it["is_normal"] and it["split"] in ("train", "") and p not in held_out
                           for it, p in zip(store.items, paths)])
        is_test = np.array([p in (test or ()) for p in paths], dtype=bool)
        n_test = int((normal & is_test).sum())
        if n_test:   # a store whose splits are not the run's (`extract --batch`: split "" for every image)
            warnings.warn(f"{n_test} of the run's test images in these features (e.g. "
                          f"{paths[int(np.flatnonzero(normal & is_test)[0])]}) are left out of the bank: "
                          f"they are {run}'s test split, which `evaluate --knn` scores")
        normal &= ~is_test
        if not normal.any():
            raise BadInputError("no normal training images in these features", path=features,
                                fix="extract features of a folder with normal (good) training images")
        patches = store.rows("patches", normal)   # shard by shard into one float32 array
        _refuse_nonfinite(patches, [paths[j] for j in np.flatnonzero(normal)], features, source)
        # the coreset's picks saved as it goes, and kept until the scorer is saved: a killed index run again
        # resumes its selection, also when killed while its index was built or written
        # under SCRATCH: its first save was the folder's first write, which put this command's config.yaml beside
        # the earlier index minutes before the new one (an audit, session 53)
        state = out / SCRATCH / "coreset_state.npz"
        if (out / ".coreset_state.npz").is_file() and not state.exists():   # a selection killed before that
            state.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / ".coreset_state.npz", state)
        scorer = KNNScorer(kind=kind, k=k, coreset_ratio=coreset, device=device).fit(
            patches, state=state, keep_state=True)
        # the source, the settings a plain-feature index needs for predict to extract matching patches, and
        # which validation normals were held out (predict's combined score needs them outside the bank)
        n_held = len(held_out & set(paths))
        copies = _copies_of(held_out, store.items) if run and held_out and not n_held else []
        if copies:   # the run's validation normals are in the bank under other paths: scored about 0 there
            warnings.warn(f"{len(copies)} of {run}'s {len(held_out)} validation normals are in these features under "
                          f"other paths (e.g. {copies[0]}: the same name and size), so they are in the bank and "
                          "predict will give no combined score with this index (fix: extract from the run's own data "
                          f"folder, or `uninet-feat calibrate --run {run} --data COPY` first, then extract and index)")
        held = ({"run": str(Path(run).resolve()), "paths_sha256": paths_sha(held_out), "n": n_held}
                if run and not copies else None)
        # the test images left out (n: those the store held), and the bank's images: evaluate --knn warns of any
        # of its test images among them, whatever run or store the index came from
        held_test = ({"run": str(Path(run).resolve()), "paths_sha256": paths_sha(test),   # n: images (not tiles)
                      "n": len({p for p, t in zip(paths, is_test) if t})}
                     if run and test is not None else None)
        bank = sorted({p for p, keep in zip(paths, normal) if keep})
        scorer.save(out, source={**source, "settings": store.manifest.get("settings"), "held_out_val": held,
                                 "held_out_test": held_test, "bank_images": bank})
        state.unlink(missing_ok=True)
        with contextlib.suppress(OSError):   # the scratch folder, when nothing else is in it
            state.parent.rmdir()
        return {"index": str(out), "level": level, "kind": kind, "n_memory": int(scorer.index.ntotal)}
    X, recs = store.image_table()
    _refuse_nonfinite(X, [r["path"] for r in recs], features, store.manifest.get("source"))   # names the images
    index = build_index(X, kind=kind, device=device)
    for old in ("ids.json", "knn.json"):   # a patch index's knn.json would describe this index wrongly
        (out / old).unlink(missing_ok=True)
    save_index(index, out / "index.faiss")
    atomic_write_text(out / "ids.json", json.dumps([r["path"] for r in recs]))
    return {"index": str(out), "level": level, "kind": kind, "n": len(recs)}


def _refuse_nonfinite(rows, paths, features, source) -> None:
    """Refuse feature rows (one per path of ``paths``) that hold NaN or Inf, naming the store and their images: the
    model that extracted them gave NaN (a damaged model.pt or weights file), and the head's or index's own refusal
    named row numbers only. A block of rows at a time: a patch bank's mask at once would take a byte per value."""
    bad = []
    for s in range(0, len(rows), 256):
        block = np.asarray(rows[s:s + 256])
        bad.extend((s + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1))).tolist())
    if bad:
        names = list(dict.fromkeys(paths[j] for j in bad))   # an image's tiles once
        source = source or {}
        model = (f"{source['run']}/model.pt (restore it, or train the run again)" if source.get("run")
                 else f"--weights {source['weights']}" if source.get("weights") else "it")
        raise BadInputError(f"the features of {len(names)} image(s) contain NaN or Inf (first: "
                            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", path=features,
                            fix=f"the model that extracted them gives NaN: check {model}, then extract again into "
                                "a new --out")


def _labels_for(recs, task: str, label_from: str):
    if task == "binary":
        return np.array(["good" if r["is_normal"] else "defect" for r in recs])
    if label_from == "group/label":
        bare = next((r["path"] for r in recs if not r.get("group")), None)
        if bare is not None:
            raise BadInputError("--label-from group/label needs a group for every row, and this one has none "
                                "(a layout without groups, or a CSV without a group column)", path=bare,
                                fix="use --label-from label, or give the rows groups (root/<group>/<label>/*)")
        return np.array([f"{r['group']}/{r['label']}" for r in recs])
    return np.array([r["label"] for r in recs])


def _given_labels(X, recs, labels, features):
    """The rows ``labels`` (a CSV path,label) names, with its labels; every path must be in the store. An image it
    names twice (spellings only the store's matching tells apart) is one row; with two labels it is refused."""
    from .clusters import read_path_table, store_rows, unmatched_windows_paths
    lines: dict = {}
    table = read_path_table(labels, "label", "labels CSV", lines=lines)
    where, absent = store_rows(table, recs, labels)
    if absent:
        win = unmatched_windows_paths(absent, labels)
        raise BadInputError(f"{len(absent)} of the {len(table)} images in {labels} are not in the feature store "
                            f"(first: {absent[0]})" + (f": {win[0]}" if win else ""), path=features,
                            fix=win[1] if win else "pass the feature store the labels were made from (`uninet-feat "
                                                   "cluster --features`), or extract those images into it")
    first, keep = {}, []   # by store row: two spellings of one image (a Windows path in two cases) are one row,
    # not two (one in a CV fold, its copy training it), nor two labels
    for p, v in table.items():
        j = where[p]
        if j in first:
            q, w = first[j]
            if w != v:
                raise BadInputError(f"line {lines[p]}: {p} is label {v!r} here and {w!r} on line {lines[q]} ({q}): "
                                    f"both are the store's image {recs[j]['path']}", path=labels,
                                    fix="list every image once")
            continue   # the same image again, with the same label
        first[j] = (p, v)
        if v:
            keep.append((j, v))
    if not keep:
        raise BadInputError("every label in the file is blank", path=labels, fix="name the clusters in its label "
                                                                               "column (cluster_0 → e.g. hole)")
    spelt: dict = {}
    for _, v in keep:
        spelt.setdefault(" ".join(v.split()).casefold(), set()).add(v)
    alike = [sorted(names) for names in spelt.values() if len(names) > 1]
    if alike:   # two classes that are one type spelt twice: the head learns to tell apart what is not different
        warnings.warn(f"labels that differ only in case or spaces are different classes: "
                      f"{'; '.join(' / '.join(map(repr, a)) for a in alike[:3])}. Fix: spell each type one way "
                      f"in {labels}")
    idx = [j for j, _ in keep]
    return X[idx], [recs[j] for j in idx], np.array([v for _, v in keep])


def train_head_cmd(features, out, task="binary", label_from="label", defects_only=False, folds=5, seed=0,
                   min_class=2, threads=None, labels=None) -> dict:
    """LightGBM head on image rows, stratified CV report, final booster + label map saved. ``labels``: a CSV
    path,label (`uninet-feat cluster`'s labels.csv once named) whose labels replace the store's, for its images
    only (a blank label leaves an image out)."""
    from .downstream import train_head
    if defects_only and task == "binary":
        raise BadInputError("--defects-only leaves out the normal rows, so a binary (normal vs defect) head would "
                            "have one class", path=features,
                            fix="use --task multiclass with --defects-only (defect types), or drop --defects-only")
    store = FeatureStore(features)
    X, recs = store.image_table()
    if labels is not None:
        X, recs, y = _given_labels(X, recs, labels, features)
        normal = np.array([is_normal_label(v) for v in y])
        if task == "binary" and not normal.any():   # else a head of two defect types, typing every normal image
            raise BadInputError(f"--task binary is normal vs defect, and {labels} names no normal image (good, normal, "
                                f"ok, free): its labels ({', '.join(sorted(set(y))[:5])}) are defect types",
                                path=labels, fix="pass --task multiclass to learn the named defect types")
        if task == "binary":   # normal vs defect, as without --labels (`_labels_for`): every defect type is a defect
            y = np.where(normal, "good", "defect")
        if defects_only:   # the rows it labels normal are left out, as the store's are without --labels
            X, recs, y = X[~normal], [r for r, n in zip(recs, normal) if not n], y[~normal]
        # named defect types only (cluster's flagged images): predict gives its type to flagged images only
        if task == "multiclass":
            defects_only = defects_only or not normal.any()
    else:
        # an unlabelled image (`extract --batch`, loose images beside label folders) is neither class: as a
        # "defect" it would teach the head that unknown means defective, as "" a defect type named nothing
        unknown = [r["path"] for r in recs if not r["is_normal"] and not r.get("label")]
        if unknown:
            if len(unknown) == len(recs):
                raise BadInputError(f"none of the store's {len(recs)} images has a label (a batch extract)",
                                    path=features, fix="name them with --labels (a CSV path,label, e.g. `uninet-feat "
                                                       "cluster`'s labels.csv once named), or extract a labelled "
                                                       "layout (root/good/*, root/<defect>/*)")
            warnings.warn(f"{len(unknown)} unlabelled image(s) in {features} (e.g. {unknown[0]}) are left out of the "
                          "head. Fix: name them with --labels to train on them")
        keep = [j for j, r in enumerate(recs) if (r["is_normal"] or r.get("label"))
                and not (defects_only and r["is_normal"])]
        X, recs = X[keep], [recs[j] for j in keep]
        y = _labels_for(recs, task, label_from)
    seen = sum(r["is_normal"] and r.get("split") == "train" for r in recs)
    if task == "binary" and seen and (store.manifest.get("source") or {}).get("run"):
        warnings.warn(f"{seen} normal rows are from the run's training split: the run was fitted on most of them, so "
                      "they score lower than new normals would, and a normal-vs-defect head partly learns 'seen in "
                      "training'. Fix: extract normals the run did not train on (e.g. a --split-csv of test and "
                      "held-out rows) for a figure that carries over to new images")
    classes, counts = np.unique(y, return_counts=True)
    rare = set(classes[counts < min_class])
    if rare:  # a class with one example can be neither trained on nor tested in CV
        keep = [j for j, v in enumerate(y) if v not in rare]
        X, recs, y = X[keep], [recs[j] for j in keep], y[keep]
        left = sorted(set(y))
        dropped = ", ".join(f"{c} ({n})" for c, n in zip(classes, counts) if c in rare)
        if len(left) < 2:   # else train_head's "needs 2 classes" names neither the drop nor its fix
            raise BadInputError(f"classes with fewer than {min_class} images are left out ({dropped}), and "
                                f"{len(left)} class(es) remain ({', '.join(left) or 'none'}): a head needs 2",
                                path=labels if labels is not None else features,
                                fix=f"label at least {min_class} images of each class")
        warnings.warn(f"classes with fewer than {min_class} images are left out of the head: {dropped} (fix: label "
                      f"at least {min_class} images of each class to keep one)")
        # a lone normal row dropped: the head knows defect types only, so predict must type flagged images only
        # (it typed every image, the unflagged normals too; an audit, session 52)
        if task == "multiclass" and not any(is_normal_label(v) for v in y):
            defects_only = True
    _refuse_nonfinite(X, [r["path"] for r in recs], features, store.manifest.get("source"))   # the rows it trains on
    X, names = without_twin_half(X, head_columns(store.manifest["vector_names"]))
    res = train_head(X, y, task=task, n_splits=folds, seed=seed, feature_names=names, n_jobs=threads)
    out = Path(out)
    (out / "cv_report.json").unlink(missing_ok=True)   # a kill after the new head never leaves the old report beside it
    # defects_only: predict gives such a head's defect type to flagged images only
    # settings: predict checks size and tiling; the calibration keys: that no `calibrate` changed the features since
    cal = {k: store.manifest[k] for k in CALIBRATION_KEYS if k in store.manifest}
    res.head.save(out, source={**(store.manifest.get("source") or {}), **cal,
                               "settings": store.manifest.get("settings"), "defects_only": bool(defects_only)})
    summary = {**res.summary(), "n_rows": len(y), "n_columns": len(names), "dropped_rare_classes": sorted(rare),
               "threads": res.head.n_jobs,   # LightGBM's sums differ between thread counts: part of a reproduction
               "features": str(features), "label_from": label_from, "defects_only": defects_only,
               "labels": None if labels is None else str(labels)}
    atomic_write_text(out / "cv_report.json", json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _held_out_paths(run) -> tuple[set, set | None]:
    """Paths of ``run``'s validation normals (its own seeded split of its own data, or its `calibrate --normals`)
    and of its test images (that split's test images, as `runs.load_test_samples` takes them; none is no error
    here), None with a warning when its data cannot be read for them (its validation normals may still be)."""
    from .calibration import with_calibration_normals
    from .normals import validation_normals
    from .checkpoint import read_checkpoint
    from .runs import load_samples, run_path
    path = run_path(run, "model.pt")
    cfg = dict(read_checkpoint(path)["config"])
    val = {abs_path(s.path) for s in validation_normals(with_calibration_normals(dict(cfg), path.parent))}
    try:
        return val, {abs_path(s.path) for s in load_samples(cfg) if s.split == "test"}
    except BadInputError as e:
        warnings.warn(f"cannot hold out the test images of {run} ({e}): any among these features go into the bank, "
                      "and `evaluate --knn` cannot tell")
        return val, None


def zero_shot_cmd(data, out, backbone, weights, prompts=None, split_csv=None, group=None, image_size=None,
                  tile=None, patch_mode="tokens", quiet=False, skip_bad=False, device=None, mean=None,
                  std=None, quick_gelu: bool | None = None) -> dict:
    """Score images with CLIP text prompts alone (no training image): the VLM variant's cold start.

    Per image: P(defect) from the image embedding (``clip_image_score``, the score) and the patch-score
    max / mean / q99; tiled images take each column's max over tiles. Writes ``scores.csv`` / ``.json``,
    the resolved settings, and — when the test split's labels hold both normal and defective images —
    ``metrics.json`` (I-AUROC, I-AP, F1-max over those, as evaluate's; ``metrics_on`` counts them; nothing is
    tuned on them; a warning says why when the other split holds a class the test split lacks). ``skip_bad``:
    unreadable images are left out (warned, listed as ``skipped`` in the result and ``metrics.json``) instead of
    stopping with an error that names them all.
    ``quick_gelu``: the activation, where not the one the backbone reads from the weights file's name.
    ``image_size``: None takes the model's native size (224 for most, 256 / 240 / 336 / 378 for some): 224 for all
    scored those at another size than they learnt, their position embeddings interpolated (an audit, session 52).

    ``config.yaml`` records the mean/std used (a re-run with ``--config`` passes them back as ``--mean``/``--std``)
    and the weights file's absolute path as given, links not followed: the tags its folders name set the mean/std
    and QuickGELU (`clip.file_quick_gelu`), and the link's target (a hub cache's ``blobs/<hash>``) may name none.
    """
    import torch
    from rich.progress import track
    from .config import DEFAULT_CONFIG, save_run_config
    from .extract import Extractor
    from .metrics import f1_max, image_ap, image_auroc
    from .runs import create_normalised_backbone, make_dataset, pick_device
    from .vlm import TextScorer, prompts_from_mapping, seeded
    _check_sizes(image_size, tile)
    if not str(backbone).startswith("clip:"):   # before any weights load; it said "TextScorer needs ...", no fix
        raise BadInputError(f"zero-shot scores with CLIP's text prompts: --backbone {backbone} is not a clip: backbone",
                            fix="--backbone clip:ViT-B-16 (or another open_clip model) --weights FILE, the whole "
                                "open_clip checkpoint (both towers)")
    asked_device, device = device, pick_device(device)
    kw = {} if quick_gelu is None else {"quick_gelu": bool(quick_gelu)}
    with seeded():   # --weights random: the same towers (so scores) in every process, as extract's
        bb = create_normalised_backbone(backbone, weights, mean, std, **kw).eval()   # --mean/--std: a file's own
    if image_size is None:
        image_size = int(getattr(bb, "native_size", None) or 224)
    step = zero_shot_step(bb)
    if image_size % step:   # the model input (each tile is resized to it); TextScorer's message named tensors
        raise BadInputError(f"image size {image_size} is not a multiple of {step}, the patch grid of {backbone}",
                            fix=f"--image-size {max(step, image_size // step * step)} or "
                                f"{(image_size // step + 1) * step}")
    if isinstance(prompts, dict):   # --config's `prompts:` mapping (a zero-shot config.yaml records the sentences)
        try:   # checked and expanded as a prompt file: its object, templates and unknown keys were ignored
            prompts = prompts_from_mapping(prompts)
        except BadInputError as e:
            raise BadInputError(f"the --config file's `prompts:` mapping: {e.reason}", fix=e.fix) from e
        ts = TextScorer(bb, prompts["normal"], prompts["defect"], patch_mode=patch_mode).eval()
    else:
        ts = TextScorer(bb, prompt_file=prompts, patch_mode=patch_mode).eval()
    ts = ts.to(device)   # the prompts were embedded on the CPU, where the text tower stays
    try:
        samples = samples_of(data, split_csv, group)
    except BadInputError:   # one image, or a folder of unlabelled ones (as predict takes): scored, no metrics
        if split_csv or group:
            raise
        from .data.layouts import discover_batch, without_predict_outputs
        samples = without_predict_outputs(discover_batch(data), data)   # a predict's overlays are not the batch
        if not samples:
            raise BadInputError("every image under --data is a predict output (overlays/, maps/)", path=data,
                                fix="give --data the folder of the images to score")
    from dataclasses import replace   # no masks: scores need none, and a bad one is not a bad image
    samples = [replace(s, mask=None) for s in samples]
    from .runs import absolute_data_paths   # absolute, so that --config OUT/config.yaml re-runs from any folder
    cfg = absolute_data_paths({**DEFAULT_CONFIG, "data": str(data), "split_csv": split_csv, "group": group,
                               "backbone": backbone, "weights": str(weights), "image_size": image_size,
                               "tile": tile, "skip_bad": bool(skip_bad), "device": asked_device,   # as asked:
                               # the one it resolved to (cuda:0) would refuse a --config re-run on a CPU machine
                               "mean": list(bb.mean), "std": list(bb.std),   # those read from the file's name too
                               "quick_gelu": bool(getattr(bb, "quick_gelu", False))})   # a re-run takes it back
    # (a weights file as given, not link-resolved: a re-run reads the same tags from its name)
    ds = make_dataset(samples, cfg, bb)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    feats, index = [], []
    with torch.no_grad():
        for batch in track(loader, description="zero-shot", disable=quiet):
            feats.append(ts.features(batch["image"].to(device)).cpu().numpy())
            index.append(batch["index"].numpy())
    feats, index = np.concatenate(feats), np.concatenate(index)
    order = np.argsort(index, kind="stable")           # tiles of one image together, then max per image
    ids, starts = np.unique(index[order], return_index=True)
    rows = []
    for i, f in zip(ids.tolist(), np.maximum.reduceat(feats[order], starts)):
        s = samples[i]
        # as evaluate writes them: an absolute path, is_defect 1/0 ('' for an unlabelled image, neither)
        rows.append({"path": os.path.abspath(s.path), "label": s.label, "split": s.split,
                     "is_defect": "" if not s.label else int(not s.is_normal),
                     **{n: float(v) for n, v in zip(ts.feature_names, f)}})
    out = Path(out)
    save_run_config(out, {**cfg, "prompts": {"normal": ts.normal_prompts, "defect": ts.defect_prompts},
                          "patch_mode": patch_mode, "out": str(out.resolve())})   # `--config OUT/config.yaml` alone
    atomic_write_csv(out / "scores.csv", rows)
    atomic_write_text(out / "scores.json", json.dumps(rows, indent=1))
    res = {"n_images": len(rows), "out": str(out), "skipped": Extractor.skipped(samples, ds)}
    labelled = [r for r in rows if r["is_defect"] != ""]
    # the test split's, as evaluate's (comparable with a trained run's); '' is a batch's images (no split)
    test = [r for r in labelled if r["split"] in ("test", "")]
    y = np.array([r["is_defect"] for r in test], dtype=int)
    if 0 < y.sum() < len(y):   # n_images counts every scored image; these say which ones the figures are over
        res["metrics_on"] = {"split": "test", "n_normal": int(len(y) - y.sum()), "n_defect": int(y.sum())}
        for col in ("clip_image_score", "clip_patch_max"):
            sc = np.array([r[col] for r in test])
            res[col] = {"image_auroc": image_auroc(y, sc), "image_ap": image_ap(y, sc), "f1_max": f1_max(y, sc)}
        atomic_write_text(out / "metrics.json", json.dumps(res, indent=2))
    else:   # an earlier labelled run's metrics into this --out are not this batch's
        (out / "metrics.json").unlink(missing_ok=True)
        if {r["is_defect"] for r in labelled} == {0, 1}:   # labelled both ways, yet no metrics: it said nothing
            n_def = int(y.sum())
            warnings.warn(f"zero-shot: no metrics.json: the labels hold normal and defective images, but the test "
                          f"split, which the metrics are over (as evaluate's), holds {len(y) - n_def} normal and "
                          f"{n_def} defective: the data's layout put the others in the train split (a folder of label "
                          "folders puts about 1 normal image in 5 in the test split, by a hash of its path). Fix: "
                          "--split-csv with the images to score marked test, or an MVTec-style test/ folder "
                          "(test/good/, test/<defect>/)", stacklevel=2)
    return res
