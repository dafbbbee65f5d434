"""Which images are a run's normals: its validation split, or normal images given to calibrate on, and the checks
that none of them is an image the run trained on (a trained-on image scores lower than a new one, so a threshold set
on it flags more new normals than it says), nor a defect image by its layout.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .errors import BadInputError

KIND_LOOK_FILES = 16   # colour files decoded to see whether they hold grey pictures (a run's normals, a batch)


def normals_record(cfg: dict) -> dict:
    """From the headers of the run's normals (training and validation): ``image_kinds``, how many are grey and
    colour files, which `predict` and `Detector` compare new images with (a run trained on grey has no meaning on
    colour, and the validation normals alone may all be of one kind when the training mixed both), and
    ``colour_files_looked``: of up to `KIND_LOOK_FILES` colour files (spread over them) decoded, how many hold
    grey pictures (a grey line saved as RGB is a grey run); for a tiled run ``image_sizes``, their distinct
    [h, w], the size `export-model` builds a tiled graph for. Empty when the data is gone."""
    from .data.images import colour_kinds, grey_content, read_size
    from .runs import load_samples, train_val_samples
    try:
        fit, val = train_val_samples(load_samples(cfg), cfg)
    except (BadInputError, OSError):
        return {}
    normals = [s.path for s in fit + val if s.is_normal]
    kinds = colour_kinds(normals)
    out = {"image_kinds": {k: len(v) for k, v in kinds.items()}} if any(kinds.values()) else {}
    colour = kinds["colour"]
    if colour:
        looks = [grey_content(p) for p in colour[::-(-len(colour) // KIND_LOOK_FILES)]]
        out["colour_files_looked"] = {"looked": sum(g is not None for g in looks), "grey": sum(bool(g) for g in looks)}
    if cfg.get("tile"):
        sizes = set()
        for p in normals:
            try:
                sizes.add(tuple(read_size(p)))
            except (BadInputError, OSError):
                continue
        out["image_sizes"] = sorted(list(v) for v in sizes)
    return out


def trained_groups(cfg: dict) -> list:
    """The groups of the run's training normals (validation split included); [] when its data is not readable."""
    from .runs import load_samples
    try:
        return sorted({s.group for s in load_samples(cfg) if s.split == "train" and s.is_normal})
    except (BadInputError, OSError):
        return []


def validation_normals(cfg: dict) -> list:
    """The run's validation normals: the same seeded split as in training, or the normal images the run was
    calibrated on instead (``calibration_normals``, `calibrate --normals`)."""
    if cfg.get("calibration_normals"):
        return given_normals(cfg["calibration_normals"], cfg)
    from .runs import load_samples, train_val_samples
    return train_val_samples(load_samples(cfg), cfg)[1]


def given_normals(folder, cfg: dict) -> list:
    """Every image under ``folder`` (or that one image) as a validation normal of the group the folder's layout gives
    it (e.g. ``DIR/<group>/train/good``), or when it gives none the run's one group; for a run of one ungrouped
    category every image is of it (``DIR/bottle/train/good``: a folder, not a group). Refused: images of a group the
    run was not trained on (`group:` a name or a list, else the groups of its training normals) and, for a run of
    several groups, images of none; a folder
    that is gone (named as the run's calibration normals, with the ways back), and images its layout marks as
    defects (a defect label folder such as ``test/crack/``, or a mask beside the image): taken for normals, they
    would raise the threshold above defects (an all-zero mask, as magnetic tile's MT_Free has, is a normal's)."""
    from dataclasses import replace
    from .data.layouts import discover_batch
    if not Path(folder).exists():
        raise BadInputError("the normal images this run is calibrated on (`calibrate --normals`) are gone", path=folder,
                            fix="put them back, or calibrate again: `uninet-feat calibrate --run RUN --normals DIR` "
                                "(their new place), or `--normals split` (the held-out validation split)")
    from .data.images import load_mask
    from .data.layouts import without_predict_outputs   # a predict's overlays there are heatmaps, not normals
    found = without_predict_outputs(discover_batch(folder, cfg.get("mask_pattern")), folder)   # its masks too
    bad = [s for s in found if (s.label and not s.is_normal) or (s.mask is not None and load_mask(s.mask).any())]
    if bad:
        why = "a defect mask beside it" if bad[0].mask is not None else f"label {bad[0].label!r}"
        raise BadInputError(f"{len(bad)} of the {len(found)} images here are defect images by their layout (e.g. "
                            f"{bad[0].path}: {why}), not normals", path=folder,
                            fix="pass a folder of normal images only (e.g. test/good, not test)")
    run_groups = cfg.get("group")   # a name, or a list of them (`group: [A, B]`); None: every group of the data
    named = [run_groups] if isinstance(run_groups, str) and run_groups else list(run_groups or [])
    trained = named or trained_groups(cfg)   # a run of every group of its data: the groups its normals were of
    if trained == [""]:   # a run of one ungrouped category: a layout's group here (DIR/bottle/train/good) is a
        return [replace(s, split="val", label="good", mask=None, group="") for s in found]   # folder, not a group
    other = [s for s in found if s.group and trained and s.group not in trained]
    if other:   # another group's normals would set this group's threshold (or the pooled one, alone)
        names = sorted({s.group for s in other})
        raise BadInputError(f"{len(other)} of the {len(found)} images here are of group(s) {', '.join(names)} by "
                            f"their layout (e.g. {other[0].path}), and the run was trained on group(s) "
                            f"{', '.join(trained)} only: their scores would set its threshold", path=folder,
                            fix=(f"pass group {trained[0]}'s normals only (e.g. {Path(folder) / trained[0]}, or a "
                                 "folder of them not laid out by group)" if len(trained) == 1 else
                                 f"pass normals of groups {', '.join(trained)} only, laid out by group") +
                                ", or calibrate a run trained on the other groups")
    only = trained[0] if len(trained) == 1 else None   # group-less images are the run's one group's
    if only is None and trained and any(not s.group for s in found):   # several groups: whose normal each is, unknown
        loose = next(s for s in found if not s.group)
        raise BadInputError(f"the run was trained on groups {', '.join(trained)}, and images here are of no group "
                            f"(e.g. {loose.path}): which group's threshold each sets is unknown", path=folder,
                            fix="pass a folder laid out by group (DIR/<group>/..., e.g. "
                                f"{Path(folder) / trained[0] / 'good'})")
    return [replace(s, split="val", label="good", mask=None, group=s.group or only) for s in found]


def _head_sha256(path, n: int = 1 << 16) -> str:
    """sha256 of a file's first ``n`` bytes: tells apart most same-sized files (a line's fixed-size BMPs or raw TIFFs)
    without reading them whole."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def same_files(paths, pool) -> list[str]:
    """Those of ``paths`` that are files of ``pool``: the same file (symlinks resolved) or a byte copy of one (same
    size, then the same first 64 KiB, then the same sha256; a pool file is read only when a path has its size and
    head: a line's fixed-size files, BMP or raw TIFF, all share one size)."""
    from .featstore import file_sha256
    known = {str(Path(t).resolve()) for t in pool}
    same = [str(v) for v in paths if str(Path(v).resolve()) in known]
    sizes, by_size = {}, {}
    for t in pool:
        try:
            sizes.setdefault(Path(t).stat().st_size, []).append(t)
        except OSError:
            continue
    heads: dict = {}   # size -> {head sha256: [pool files]}
    for v in paths:
        if str(v) in same:
            continue
        try:
            size = Path(v).stat().st_size
            if size not in sizes:
                continue
            if size not in heads:
                heads[size] = {}
                for t in sizes[size]:
                    heads[size].setdefault(_head_sha256(t), []).append(t)
            key = (size, _head_sha256(v))
            alike = heads[size].get(key[1])
            if not alike:
                continue
            if key not in by_size:
                by_size[key] = {file_sha256(t) for t in alike}
            if file_sha256(v) in by_size[key]:
                same.append(str(v))
        except OSError:
            continue
    return same


def check_given_normals(val: list, cfg: dict, folder) -> None:
    """Refuse normals to calibrate on that the run trained on (by path, or by the file's bytes: a copy):
    a trained-on image scores lower than a new one, so the threshold would flag more new normals than it says."""
    from .runs import load_samples, train_val_samples
    if not val:
        raise BadInputError("no images to calibrate on", path=folder, fix="pass a folder of normal images")
    try:
        fit = train_val_samples(load_samples(cfg), cfg)[0]
    except BadInputError as e:
        raise BadInputError(f"the run's training images are not readable to check that these normals are not among "
                            f"them ({e})", path=cfg.get("data"),
                            fix="pass --data (and --split-csv) where the run's training data is now") from e
    same = same_files([v.path for v in val], [t.path for t in fit])
    if same:
        raise BadInputError(f"{len(same)} of these normals are images the run was trained on (e.g. {same[0]}): they "
                            "score lower than new normals, so a threshold set on them would flag more new normals "
                            "than it says", path=folder,
                            fix="calibrate on normal images the run never saw (new production, or the test "
                                "normals only when you no longer report test figures at the threshold)")


def check_not_trained_on(val: list, trained_cfg: dict, split_csv, data=None, run=None) -> None:
    """Refuse validation normals drawn from another split CSV that the run trained on (``trained_cfg``: the run's
    own config, whose split says what it trained on, read under ``data`` when its data moved there): a CSV with more
    training rows draws some of the old ones. Warn when some are the run's own test images: its test figures at
    that threshold are then optimistic (`evaluate` counts them), as with `--normals` given test normals."""
    try:
        samples, fit = own_split(trained_cfg, data, run)
    except (BadInputError, OSError) as e:   # said: the threshold may rest on training images
        why = f"{e.path}: {e.reason}" if isinstance(e, BadInputError) and e.path else getattr(e, "reason", e)
        warnings.warn(f"{run}: could not check that the validation normals {split_csv} draws are not images the run "
                      f"was trained on, since its own data is not readable ({why}). Fix: pass --data where the run's "
                      "training data is now, or calibrate on normals it never saw (`uninet-feat calibrate --run RUN "
                      "--normals DIR`)")
        return
    same = same_files([v.path for v in val], [t.path for t in fit])
    if same:
        raise BadInputError(f"{len(same)} of the {len(val)} validation normals this split draws are images the run was "
                            f"trained on (e.g. {same[0]}): they score lower than new normals, so the threshold would "
                            "flag more new normals than it says", path=split_csv,
                            fix="calibrate with the run's own split (drop --split-csv), or on normals it never saw: "
                                "`uninet-feat calibrate --run RUN --normals DIR`")
    tested = same_files([v.path for v in val], [t.path for t in samples if t.split == "test"])
    if tested:
        warnings.warn(f"{len(tested)} of the {len(val)} validation normals {split_csv} draws are test images of the "
                      f"run's own split (e.g. {tested[0]}): recall and false-positive rate at a threshold set on them "
                      "are optimistic on that test set (`evaluate` counts them). Fix: calibrate with the run's own "
                      "split (drop --split-csv), or on normals it never saw (`uninet-feat calibrate --run RUN "
                      "--normals DIR`)")


def own_split(trained_cfg: dict, data=None, run=None) -> tuple[list, list]:
    """(samples, training images) of the run's own split (``trained_cfg``: its config), read under ``data`` when
    its data moved there (its split CSV with it, as `recalibrate` moves the run's own)."""
    from .runs import load_samples, train_val_samples
    own = dict(trained_cfg)
    if data:
        own["data"] = data
        if own.get("split_csv"):
            own["split_csv"] = moved_split_csv(own["split_csv"], trained_cfg["data"], data, run)
    samples = load_samples(own)
    return samples, train_val_samples(samples, own)[0]


def warn_test_images_trained_on(test: list, trained_cfg: dict, data=None, run=None, own: bool = False) -> int | None:
    """How many of ``test`` (another split's or layout's test images; ``own``: the run's own split's, where a byte copy
    of a training image filed among the test images goes unseen by the split) the run trained on, warned when any:
    every figure on them is optimistic (a trained image scores like the normals it learnt). None when the run's own
    data cannot be read to tell (warned)."""
    try:
        try:   # where it trained, when still there (``data`` may be another layout of the same files)
            fit = own_split(trained_cfg)[1]
        except (BadInputError, OSError):
            if not data:
                raise
            fit = own_split(trained_cfg, data, run)[1]   # its data moved under ``data``
    except (BadInputError, OSError) as e:
        warnings.warn(f"{run}: could not check the test images against the images the run trained on ({e}). Fix: "
                      "pass --data where the run's training data is now")
        return None
    same = same_files([s.path for s in test], [t.path for t in fit])
    if same:
        fix = ("remove the copies from the test images (or from training) and train again" if own else
               "a split whose test images the run never saw (its own: drop --split-csv)")
        warnings.warn(f"{run}: {len(same)} of the {len(test)} test images are images the run trained on"
                      f"{' (byte copies of its training images)' if own else ''} (e.g. {same[0]}): every figure on "
                      f"them is optimistic. Fix: {fix}")
    return len(same)


def moved_split_csv(own_csv, old_root, new_root, run) -> str:
    """The run's split CSV for its data now under ``new_root``: the file itself where it still is, else the same
    path below the new root when it lay below the old one; else refused, naming it (the layout's own split would
    hold other validation normals, training images among them)."""
    own = Path(own_csv)
    if own.is_file():
        return str(own)
    try:
        moved = Path(new_root) / own.relative_to(Path(old_root))
    except ValueError:
        moved = None
    if moved is not None and moved.is_file():
        return str(moved)
    raise BadInputError(f"the run was trained with the split CSV {own}, which is gone"
                        + (f" (and not at {moved} below --data either)" if moved is not None else ""), path=run,
                        fix="pass --split-csv where it is now: without it the data's own layout would choose other "
                            "validation normals than the run held out")
