"""Finding samples (image, split, label, mask, group) in the folder layouts people actually have.

Supported, tried in this order:
  (a) a CSV manifest ``path,split,label[,mask][,group|fabric|category]``, paths relative to ``root``
      (e.g. ``shared/data/splits/magnetic_tile.csv``, ``aitex.csv``);
  (b) MVTec-style ``root/train/good/*``, ``root/test/<defect>/*``, ``root/ground_truth/<defect>/<stem>_mask.png``,
      or the same one level deeper per category, ``root/<category>/train/good/*`` (group = category);
      ``ground_truth/<label>/`` holds the TEST images' masks; a ``train/`` (``validation/``) image's is found beside
      it or in ``ground_truth/train/<label>/`` (``ground_truth/validation/<label>/``), never in the test images'
      folder: MVTec numbering restarts per folder (``train/good/000.png`` and ``test/good/000.png`` are two images);
  (c) plain ``root/<label>/*`` (split ``''``), or ``root/<group>/<label>/*`` (e.g. ``aitex/fabric_00/good``);
      a split folder first below a label folder gives its images that split (``good/train/``, ``hole/test/``).

Label folders and nesting (why: people file new images by date, ``good/2024-05-01/``, and expect them used):
- A label folder's images are collected recursively; its subfolders are storage, not labels
  (``good/day1/a.png`` is label ``good``), and a split-named one (``train``, ``test``, ``val``...) also names the
  split of the images under it. Folders named like masks (``ground_truth``, ``masks``, ``mask``,
  ``gt``) and hidden ones are never searched for images.
- In (b) the label folders are ``<split>/<label>``. In (c) the first level under ``root`` holds the label
  folders when any of its folders is named like a normal label (``good``/``normal``/``ok``/``free``) or holds
  images directly; then every folder there is a label (``root/hole/day1/*`` is label ``hole``). Otherwise
  the first level holds groups, and each group's subfolders are its label folders.
- A folder that would mix the two (``root/good/*`` beside ``root/fab_0/good/*``, or the same inside a group) is
  an error, not a guess. Split and mask folders match in any case (``Train/``, ``Ground_Truth/``: Windows);
  ``__MACOSX`` and other archivers' or NAS boxes' folders are passed over.
- A mask is found for one image only: one found for two is an error (a flat ``ground_truth/crack/`` for
  ``test/crack/day1/`` and ``day2/``), and ``ground_truth/<label>/<subfolder>/`` is searched first.
- ``validation/`` (``val`` CSV rows) is kept as split ``val``: `runs.train_val_samples` takes its normals as
  the validation normals.
- What is still not used, images directly in ``root``, in ``root/train`` or in a category folder of (b), a folder
  beside the split folders of (b), or masks in a mask folder nothing reads (``masks/``, ``gt/``: masks are read
  from ``ground_truth/``, beside their images, by ``mask_pattern`` or a CSV's mask column), is named in one
  warning per folder instead of being dropped silently.

Normal vs defect: the label is kept exactly as written; a sample is normal when its label is, case-
insensitively, one of ``good``, ``normal``, ``ok``, ``free`` (the magnetic-tile data set calls its
normal class *Free*; its CSV labels those rows ``good``). Every other label is a defect type.

Order is sorted by path string, so the same data gives the same sample list on every machine.
"""
from __future__ import annotations

import csv
import functools
import io
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from .images import IMAGE_EXTENSIONS

NORMAL_LABELS = frozenset({"good", "normal", "ok", "free"})
SPLITS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val", "": ""}
MASK_DIRS = frozenset({"ground_truth", "masks", "mask", "gt"})
_LAYOUTS = ("a CSV manifest (--split-csv) with columns path,split,label[,mask][,group]; "
            "MVTec-style ROOT[/<category>]/train/good/*, ROOT[/<category>]/test/<defect>/*; "
            "or plain ROOT[/<group>]/<label>/* with label `good` for normal images")


@dataclass
class Sample:
    """One image. ``split`` is 'train' | 'test' | 'val' | '' (layout has none); ``group`` is '' or a category."""

    path: Path
    split: str = ""
    label: str = "good"
    mask: Path | None = None
    group: str = ""

    @property
    def is_normal(self) -> bool:
        return is_normal_label(self.label)


def is_normal_label(label: str) -> bool:
    """A label of normal images (`NORMAL_LABELS`, case and surrounding spaces aside)."""
    return label.strip().lower() in NORMAL_LABELS


def discover(root, split_csv=None, mask_pattern: str | None = None, label_splits: bool = True) -> list[Sample]:
    """All samples under ``root`` (or listed in ``split_csv``, relative to ``root``), sorted by path.

    ``mask_pattern`` (e.g. ``"{stem}_mask.png"`` or ``"../masks/{stem}.png"``), relative to the image's
    folder, with fields {stem} {name} {label} {group}, replaces the default mask search. ``label_splits``: a label
    folder's split-named subfolders (``good/train/``) give their images' split; False, as runs trained before
    session 52 read them, leaves it to be drawn.
    """
    check_mask_pattern(mask_pattern)
    if split_csv:
        samples = _from_csv(Path(split_csv), Path(root) if root else Path(split_csv).parent, mask_pattern)
    else:
        root = Path(root)
        if not root.is_dir():
            raise BadInputError("data folder not found" if not root.exists() else "not a folder", path=root,
                                fix="pass the folder that holds the images (or the root a --split-csv is relative to)")
        seen: dict = {}   # this call's folder lookups (`_any_case`)
        samples = _from_mvtec(root, mask_pattern, seen) or _from_plain(root, mask_pattern, seen, label_splits)
        samples = _without_masks_as_images(samples, root)
        samples = without_predict_outputs(samples, root)   # overlays and masks of a predict run into the data
        if root.resolve().name.lower() in SPLITS and root.resolve().name and \
                any(d.name.lower() in ("train", "test") for d in _subdirs(root.resolve().parent)) and \
                {s.split for s in samples} == {""}:
            _warn_unused(root, f"this looks like one split folder of an MVTec-style category, read as a folder of "
                               f"label folders (its own train/validation/test split is drawn from it); pass the "
                               f"category folder, {root.resolve().parent}, to use its train/ and test/")
        loose = _images(root)
        if samples and loose:
            _warn_unused(root, f"{len(loose)} image(s) directly in this folder are not used "
                               "(move them into a label folder such as good/)")
    if not samples:
        loose = " (images directly in ROOT are not used: move them into ROOT/good/)" \
            if not split_csv and _images(Path(root)) else ""
        raise BadInputError(f"no images found under {root}; expected layouts: {_LAYOUTS}{loose}",
                            path=split_csv or root, fix="check the path and the folder layout")
    if not split_csv:   # a CSV's rows were compared by real path as they were read, with their line numbers
        _check_one_file_each(samples, root)
        _check_one_image_per_mask(samples, root)
    return sorted(samples, key=lambda s: str(s.path))


def _check_one_image_per_mask(samples, where) -> None:
    """Refuse one mask path found for two images: ``test/crack/day1/0001.png`` and ``day2/0001.png`` beside a flat
    ``ground_truth/crack/0001_mask.png`` would both take it, and one of them would be scored against the other's
    defect with no word (same-sized masks pass every other check)."""
    # lexical: masks deduplicated into symlinks to one file are each image's own
    twice = _first_repeat((os.path.abspath(s.mask), s) for s in sorted(samples, key=lambda s: str(s.path))
                          if s.mask is not None)
    if twice:
        a, b = twice
        raise BadInputError(f"{b.mask} was found as the mask of both {a.path} and {b.path}", path=where,
                            fix="give each image its own mask: mirror the images' subfolders in its mask folder "
                                "(ground_truth/<label>/<subfolder>/<stem>_mask.png; an MVTec-style train/ image's "
                                "under ground_truth/train/<label>/), or rename the images apart")


def _first_repeat(keyed):
    """The first two items of ``(key, item)`` pairs that share a key, or None."""
    first: dict = {}
    for key, item in keyed:
        if key in first:
            return first[key], item
        first[key] = item
    return None


MASK_FIELDS = dict(stem="x", name="x.png", label="crack", group="g")


def check_mask_pattern(pattern: str | None) -> None:
    """Refuse a ``mask_pattern`` that cannot be filled for every image (``{Stem}``, ``{}``, ``{stem:d}``): a
    traceback at the first image otherwise."""
    if not pattern:
        return
    try:
        str(pattern).format(**MASK_FIELDS)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise BadInputError(f"mask_pattern {pattern!r} cannot be filled in ({type(e).__name__}: {e})",
                            fix="use only the fields {stem} {name} {label} {group}, e.g. {stem}_mask.png or "
                                "../masks/{label}/{stem}.png (double a literal brace: {{ }})") from None


def _check_one_file_each(samples, where) -> None:
    """Refuse one file reached by two paths (symlinks, ``..``): it would be one image under two labels or splits,
    e.g. a training normal and a test defect."""
    twice = _first_repeat((os.path.realpath(s.path), s) for s in samples)
    if twice:
        a, b = twice
        raise BadInputError(f"{a.path} and {b.path} are the same file ({os.path.realpath(b.path)}): one image would "
                            "be used twice, possibly under two labels or in training and test", path=where,
                            fix="keep one path to each image (remove the symlink or the duplicate)")


def batch_groups(samples, root, groups) -> list[Sample]:
    """A new batch laid out by group, ``DIR/<group>/...``, scored by a run of several ``groups``: each image of no
    group under a folder so named takes that group (its threshold and position offsets). The folders of a batch are
    storage to `discover_batch`, so such images kept group '' and were flagged at the pooled threshold, whose
    warning advised this very layout (an audit, session 52)."""
    from dataclasses import replace
    names = set(groups) - {""}
    if len(names) < 2:
        return samples
    out = []
    for s in samples:
        try:
            parts = Path(os.path.relpath(s.path, root)).parts
        except ValueError:   # another drive (Windows)
            parts = ()
        out.append(replace(s, group=parts[0]) if not s.group and len(parts) > 1 and parts[0] in names else s)
    return out


def discover_batch(path, mask_pattern: str | None = None) -> list[Sample]:
    """Images to score (``predict``): one image file, or every image under a folder, sorted by path.

    A new batch has no labels, so its samples get label ``''`` (unknown: neither normal nor a defect type)
    and no split. A folder in a labelled layout (MVTec-style, or label folders with a normal one such as
    ``good/``) keeps its labels and masks; images directly in it are added unlabelled. Without a normal
    folder the folder names are taken for storage (``day1/``, ``camera2/``), not labels.
    """
    check_mask_pattern(mask_pattern)
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise BadInputError(f"not an image file (known: {', '.join(IMAGE_EXTENSIONS)})", path=p,
                                fix="pass an image, or the folder that holds the images")
        return [Sample(p, "", "", None, "")]
    if not p.is_dir():
        raise BadInputError("data folder not found", path=p, fix="pass the folder (or image file) to score")
    seen: dict = {}   # this call's folder lookups (`_any_case`)
    samples = _from_mvtec(p, mask_pattern, seen) or _from_plain(p, mask_pattern, seen)
    if not any(s.is_normal for s in samples):   # no labelled layout: folders are storage
        samples = [Sample(s.path, "", "", s.mask, "") for s in samples]
    samples += [Sample(x, "", "", _find_mask(x, "", "", None, mask_pattern, seen), "") for x in _images(p)]
    samples = _without_masks_as_images(samples, p)
    beside = sorted(f.name for f in (_any_case(s.path.with_suffix(".png"), seen=seen) for s in samples
                                     if s.path.suffix.lower() != ".png") if f is not None)   # left out as a mask
    if beside:   # the magnetic-tile convention; in a batch of new images it may be a second image, so say it
        _warn_unused(p, f"{len(beside)} PNG file(s) beside a same-named image ({', '.join(beside[:3])}"
                        f"{', ...' if len(beside) > 3 else ''}) are taken for that image's mask, not scored "
                        "(rename or move them to score them)")
    if not samples:
        raise BadInputError("no images found in this folder or below it", path=p,
                            fix=f"put the images to score in it (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(samples, key=lambda s: str(s.path))


def _without_masks_as_images(samples, where) -> list:
    """``samples`` less those that are another sample's mask (by real path), warned with the count. Why: `_images`
    knows masks beside their images only by the default names (``*_mask.*``, ``x.png`` beside ``x.jpg``), so a
    ``mask_pattern`` such as ``{stem}_gt.png`` made every mask an image too: a training normal, a test defect, or a
    batch image to score."""
    # an image and a mask are one file only under one name, or through a symlink: real paths (a stat per folder
    # level; a third of the time of discovering 6,000 images) are looked up for those alone
    links = {str(s.path): os.path.realpath(s.path) for s in samples if os.path.islink(s.path)}
    names = {Path(s.path).name for s in samples} | {os.path.basename(r) for r in links.values()}
    masks = {os.path.realpath(s.mask) for s in samples if s.mask is not None
             and (Path(s.mask).name in names or os.path.islink(s.mask))}
    if not masks:
        return samples
    mask_names = {os.path.basename(m) for m in masks}
    kept, left = [], []
    for s in samples:
        p = str(s.path)
        real = links.get(p) or (os.path.realpath(p) if os.path.basename(p) in mask_names else None)
        own = s.mask is not None and real is not None and os.path.realpath(s.mask) == real   # a pattern naming itself
        (left if real in masks and not own else kept).append(s)
    if left:
        _warn_unused(where, f"{len(left)} file(s) found as images are other images' masks (e.g. {left[0].path}): "
                            "left out as images, kept as masks")
    return kept


PREDICT_OUTPUT_FOLDERS = ("overlays", "maps", ".partial")   # what predict writes images (and parts) into


def _predict_folder(d: Path) -> bool:
    """Whether ``d`` holds a predict's outputs: a finished one's predictions.csv and summary.json, or the records a
    predict writes before its first output (config.yaml's ``command: predict``), which a stopped one leaves beside
    its overlays and masks (summary.json is written last: a predict stopped while drawing overlays left them to be
    scored as new images by the next predict, and taken as normals by `calibrate --normals`; an audit, session 53)."""
    if (d / "predictions.csv").is_file() and (d / "summary.json").is_file():
        return True
    try:
        text = (d / "config.yaml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(line.strip() == "command: predict" for line in text.splitlines())


def without_predict_outputs(samples, data, out=None) -> list:
    """``samples`` less predict's outputs among them: the images in the overlays/, maps/ and .partial/ of a predict
    output folder under ``data`` (`_predict_folder`) and of ``out`` (predict's own --out, which a killed first run
    left without them), warned with the count. Other images in such a folder are kept: `predict --data batch --out
    batch/day1` scores day1's own images."""
    root = Path(os.path.realpath(data))
    own = Path(os.path.realpath(out)) if out is not None else None
    is_output: dict = {}   # folder -> whether it is a predict output folder

    def output_part(d: Path) -> bool:
        if d.name not in PREDICT_OUTPUT_FOLDERS:
            return False
        if d.parent not in is_output:
            is_output[d.parent] = d.parent == own or _predict_folder(d.parent)
        return is_output[d.parent]

    kept, left, found = [], set(), {}   # found: each image folder's output part (or None), looked up once

    def part_of(folder: str):
        if folder not in found:
            d = Path(os.path.realpath(folder))
            while not output_part(d) and root in d.parents:   # up to --data, not above it
                d = d.parent
            found[folder] = d if output_part(d) else None
        return found[folder]

    for s in samples:
        d = part_of(str(Path(s.path).parent))
        if d is not None:
            left.add(str(d))
        else:
            kept.append(s)
    if left:
        warnings.warn(f"{len(samples) - len(kept)} image(s) in predict output folder(s) {', '.join(sorted(left)[:3])}"
                      " are left out (overlays and masks, not the batch)")
    return kept


def _images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, minus masks kept beside them (``x_mask.*`` beside an image ``x``, ``x.png``
    beside ``x.jpg``). A ``face_mask.png`` with no image ``face`` beside it is an image (a product photographed), not
    an orphan mask to drop without a word."""
    if not folder.is_dir():
        return []
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    left = sorted(p.name for p in entries if (p.suffix.lower() in IMAGE_EXTENSIONS and not p.exists())
                  or (p.suffix.lower() in OTHER_IMAGES and p.is_file()))
    if left:   # said, not dropped silently: another image type, or a broken / looping symlink named as an image
        _warn_unused(folder, f"{len(left)} file(s) not read ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): "
                             f"broken symlinks, or a type other than {', '.join(IMAGE_EXTENSIONS)} (convert to PNG)")
    non_png = {p.stem.lower() for p in files if p.suffix.lower() != ".png"}   # x.png beside X.JPG is its mask too
    stems = {p.stem.lower() for p in files}
    return sorted(p for p in files if not (p.stem.lower().endswith("_mask") and p.stem.lower()[:-5] in stems)
                  and not (p.suffix.lower() == ".png" and p.stem.lower() in non_png))


# Folders that archivers and NAS boxes add beside the data (a macOS zip's resource forks, Synology's thumbnails):
# never labels, groups or images.
SYSTEM_DIRS = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information"})


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name.lower() not in SYSTEM_DIRS)


def _images_under(folder: Path, pattern=None, _seen=None) -> list[Path]:
    """Images in the label folder ``folder`` and, recursively, its subfolders (storage, e.g. by date);
    mask folders are left out (named when nothing reads them: no ``pattern``), a symlink loop is followed once, and
    a symlink to a folder above it is not followed (warned): ``good/up -> ..`` would make every other label's
    images normal ones."""
    seen = _seen if _seen is not None else set()
    real = os.path.realpath(folder)
    if real in seen:
        return []
    seen.add(real)
    out = _images(folder)
    for d in _subdirs(folder):
        if d.name.lower() in MASK_DIRS:
            _warn_unread_masks(d, pattern)
            continue
        if d.is_symlink() and (real + os.sep).startswith(os.path.realpath(d) + os.sep):
            _warn_unused(d, f"a symlink to {os.path.realpath(d)}, a folder above it: not followed (its images "
                            "would take this folder's label)")
            continue
        out += _images_under(d, pattern, seen)
    return out


def _has_images(folder: Path) -> bool:
    """Whether any image lies anywhere under ``folder`` (stops at the first)."""
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x.lower() not in SYSTEM_DIRS]
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") for f in files):
            return True
    return False


def _warn_unread_masks(folder: Path, pattern) -> None:
    """Name a mask folder whose files nothing reads (``masks/``, ``gt/``, a ``ground_truth/`` where none is looked
    for, any mask folder inside a label folder): its images are never images, and without a ``mask_pattern`` no
    mask is looked for there, so evaluate left the pixel metrics out without a word."""
    if not pattern and _has_images(folder):
        _warn_unused(folder, "its masks are not read: masks are read only from ground_truth/<label>/ (beside the "
                             "label or split folders), beside their images (<stem>_mask.png), by mask_pattern, or "
                             "from a CSV's mask column (fix: move them into ground_truth/<label>/, or set "
                             "mask_pattern in a --config file)")


_WARNED: set[tuple[str, str]] = set()
_PROBING: list[list] = []   # `_from_mvtec`'s held warnings
OTHER_IMAGES = (".gif", ".heic", ".heif", ".jfif", ".jp2", ".pgm", ".ppm", ".pnm", ".ico", ".avif")


def _warn_unused(folder: Path, why: str) -> None:
    """Warn once per folder, reason and process that images in it are not used (a re-discovery stays quiet).
    While `_from_mvtec` probes a folder the warning waits: a folder it finds no sample in is read by
    `_from_plain`, and its images are used after all."""
    if _PROBING:
        _PROBING[-1].append((folder, why))
        return
    if (str(folder), why) not in _WARNED:
        _WARNED.add((str(folder), why))
        warnings.warn(f"{folder}: {why}", stacklevel=3)


def _find_mask(img: Path, label: str, group: str, gt_dir: Path | None, pattern: str | None,
               seen: dict | None = None, sub: str = "") -> Path | None:
    """Mask for ``img``: the explicit pattern, else ``<stem>_mask.png`` (or ``_mask`` in another image type, which
    `_images` leaves out as a mask too) / ``<stem>.png`` beside it, else ``gt_dir/<label>/<stem>_mask.png`` (or
    ``<stem>.png``), first in ``gt_dir/<label>/<sub>/`` when the image lies in a subfolder ``sub`` of its label
    folder (``test/crack/day2/0001.png`` → ``ground_truth/crack/day2/0001_mask.png``). ``seen``: the discovery
    call's lookups (`_any_case`)."""
    if pattern:
        cands = [img.parent / pattern.format(stem=img.stem, name=img.name, label=label, group=group)]
    else:
        names = _names_in(img.parent, False, seen)   # other types only when listed: no stat per type and image
        cands = [img.with_name(img.stem + "_mask" + ext) for ext in IMAGE_EXTENSIONS
                 if ext == ".png" or (img.stem + "_mask" + ext).lower() in names]
        if img.suffix.lower() != ".png":
            cands.append(img.with_suffix(".png"))
        if gt_dir is not None:
            key = ("label folder", str(gt_dir), label)   # looked for once per label folder, not once per image
            gl = seen.get(key) if seen is not None else None
            if gl is None:
                # test/Crack beside ground_truth/crack
                gl = _any_case(gt_dir / label, dirs=True, seen=seen) or gt_dir / label
                if seen is not None:
                    seen[key] = gl
            cands += [d / (img.stem + end) for d in ([gl / sub] if sub else []) + [gl] for end in ("_mask.png", ".png")]
    return next((c for c in (_any_case(c, seen=seen) for c in cands) if c is not None), None)


def _any_case(path: Path, dirs: bool = False, seen: dict | None = None) -> Path | None:
    """``path`` if it is a file (``dirs``: a folder), else the one such entry beside it whose name differs only in
    case (``x.PNG``, ``x_MASK.png``, ``ground_truth/Crack``: data copied from Windows or camera software), else None.

    ``seen``: a dict one discovery call keeps, so that each folder's listing is looked up (its state stat-ed) once
    in the call, not once per image (about 10 % of discovering 12,000 images); a new call looks again."""
    if path.is_dir() if dirs else path.is_file():
        return path
    found = _names_in(path.parent, dirs, seen).get(path.name.lower())
    return Path(path.parent) / found if found is not None else None


def _names_in(folder: Path, dirs: bool, seen: dict | None) -> dict:
    """`_lower_names` of ``folder``, looked up once per discovery call (``seen``)."""
    key = (str(folder), dirs)
    names = seen.get(key) if seen is not None else None
    if names is None:
        try:
            names = _lower_names(key[0], os.stat(folder).st_mtime_ns, dirs)
        except OSError:
            names = {}   # no such folder (or unreadable): no entry in it
        if seen is not None:
            seen[key] = names
    return names


@functools.lru_cache(maxsize=64)
def _lower_names(folder: str, _mtime_ns: int, dirs: bool = False) -> dict:
    """{lower-case name: name} of the files (``dirs``: the folders) in ``folder`` (names that collide in lower
    case left out: ambiguous); cached per folder state, so a folder of 10,000 images is listed once, not once per
    image. An entry that cannot be followed (a symlink loop) is passed over, not the whole folder."""
    seen: dict = {}
    with os.scandir(folder) as entries:
        for e in entries:
            try:
                kind = e.is_dir() if dirs else e.is_file()
            except OSError:
                continue
            if kind:
                seen.setdefault(e.name.lower(), []).append(e.name)
    return {k: v[0] for k, v in seen.items() if len(v) == 1}


def _warn_unmatched_masks(gt: Path, samples, more: str = "") -> None:
    """Name the files of a ``ground_truth/`` folder that no image took as its mask: a mask named or typed
    otherwise (``_gt.png``, ``.bmp``), or a label folder no test folder has, would leave those images out of the
    pixel metrics with no word, or all of them when none matches. ``more``: the layout's other mask folders."""
    if not gt.is_dir():
        return
    used = {os.path.realpath(s.mask) for s in samples if s.mask is not None}
    left = [Path(d) / f for d, _, files in sorted(os.walk(gt)) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS + OTHER_IMAGES) and not f.startswith(".")   # .gif: never read
            and os.path.realpath(Path(d) / f) not in used]
    if left:
        n_def = sum(not s.is_normal for s in samples)
        n_masked = sum(s.mask is not None and not s.is_normal for s in samples)
        _warn_unused(gt, f"{len(left)} file(s) match no image (e.g. {left[0].relative_to(gt)}); "
                         f"{n_masked} of {n_def} defect images have a mask. A mask is found as "
                         f"ground_truth/<label>/<stem>_mask.png or <stem>.png, <label> as in test/{more} (fix: "
                         "rename them, convert them to PNG, or set mask_pattern in a --config file)")


def _masks_folder(base: Path, seen: dict) -> Path:
    """``base/ground_truth`` in any case (``Ground_Truth/`` copied from Windows), else the name as written."""
    return _any_case(base / "ground_truth", dirs=True, seen=seen) or base / "ground_truth"


def _subfolder(p: Path, label_dir: Path) -> str:
    """The folder of image ``p`` below its label folder ('' when directly in it), where its mask is looked for
    first in ``ground_truth/<label>/``."""
    sub = os.path.relpath(p.parent, label_dir)
    return "" if sub == "." else sub


def _from_mvtec(root: Path, pattern, seen: dict | None = None) -> list[Sample]:
    """MVTec-style samples under ``root``, or [] when it is not that layout; its warnings only in the first case
    (``good/train/`` in a layout of label folders said its images were not used, and then they were)."""
    _PROBING.append([])
    try:
        out = _from_mvtec_probe(root, pattern, seen)
    finally:
        held = _PROBING.pop()
    for folder, why in held if out else ():
        _warn_unused(folder, why)
    return out


def _from_mvtec_probe(root: Path, pattern, seen: dict | None = None) -> list[Sample]:
    seen = {} if seen is None else seen   # the call's folder lookups (`_any_case`)

    def one(base: Path, group: str) -> list[Sample]:
        out = []
        gt = _masks_folder(base, seen)
        if group and _images(base):   # the root's own are named by `discover`
            _warn_unused(base, f"{len(_images(base))} image(s) directly in this category folder are not used "
                               f"(move them into {base.name}/train/good/ or {base.name}/test/<label>/)")
        for split_dir in _subdirs(base):
            split = SPLITS.get(split_dir.name.lower())
            if not split:
                if split_dir.name.lower() not in MASK_DIRS and _has_images(split_dir):
                    _warn_unused(split_dir, "not used: beside train/ and test/ only split folders "
                                            f"({', '.join(sorted(k for k in SPLITS if k))}) are read")
                elif split_dir.name.lower() in MASK_DIRS and split_dir != gt:
                    _warn_unread_masks(split_dir, pattern)
                continue
            if _images(split_dir):
                _warn_unused(split_dir, f"{len(_images(split_dir))} image(s) directly in this folder are not "
                                        f"used (move them into {split_dir.name}/good/ or {split_dir.name}/<defect>/)")
            # ground_truth/<label>/ holds the test images' masks; MVTec numbering restarts per folder, so a train/
            # image named as a test one (train/good/000.png, test/good/000.png) took that image's mask, or the
            # layout was refused as one mask for two images. Other splits: ground_truth/<split>/<label>/ only
            split_gt = gt if split == "test" else _any_case(gt / split_dir.name, dirs=True, seen=seen)
            for label_dir in _subdirs(split_dir):
                if label_dir.name.lower() in MASK_DIRS:   # test/ground_truth/: masks, never defect images
                    if _has_images(label_dir):
                        _warn_unused(label_dir, f"not read as images: a mask folder belongs beside "
                                                f"{split_dir.name}/, as {base.name or base}/ground_truth/<label>/")
                    continue
                for p in _images_under(label_dir, pattern):
                    out.append(Sample(p, split, label_dir.name, _find_mask(p, label_dir.name, group, split_gt,
                                                                           pattern, seen, _subfolder(p, label_dir)),
                                      group))
        if not pattern:
            _warn_unmatched_masks(gt, out, "; a train/ image's in ground_truth/train/<label>/")
        return out

    def has_splits(d: Path) -> bool:   # Train/ and TEST/ too (data copied from Windows): one() reads them so
        try:   # names first: a stat only for a folder so named, not for each image of a flat good/
            names = [n for n in os.listdir(d) if n.lower() in ("train", "test")]
        except OSError:
            return False
        return any((d / n).is_dir() for n in names)

    if has_splits(root):
        return one(root, "")
    if any(d.name.lower() in NORMAL_LABELS for d in _subdirs(root)):
        # a folder named like a normal label makes ROOT a layout of label folders (c), never of MVTec categories:
        # good/train/2024-01-01/ was read as category `good` with one label per date, every image a defect
        return []
    cats = [d for d in _subdirs(root) if has_splits(d)]
    if cats:
        for d in _subdirs(root):
            if d not in cats and d.name.lower() not in MASK_DIRS and _has_images(d):
                _warn_unused(d, "not used: beside category folders with train/ and test/, a folder without "
                                "them is not read")
            elif d.name.lower() in MASK_DIRS:   # each category's own ground_truth/ is read, not the root's
                _warn_unread_masks(d, pattern)
    return [s for d in cats for s in one(d, d.name)]


def _split_folder(p: Path, label_dir: Path, label_splits: bool = True) -> str:
    """The split an image's first subfolder below its label folder names (``good/train/a.png``, ``hole/Test/b.png``:
    a split filed under each label), else '' (drawn). Such folders were read as storage and the split drawn anew,
    sending a user's own test images into training."""
    sub = _subfolder(p, label_dir) if label_splits else ""
    return SPLITS.get(Path(sub).parts[0].lower(), "") if sub else ""


def _from_plain(root: Path, pattern, seen: dict | None = None, label_splits: bool = True) -> list[Sample]:
    """``root/<label>/**`` when any first-level folder is a label folder (a normal name, or images in it),
    else ``root/<group>/<label>/**``; see the module docstring. ``seen``: the call's folder lookups (`_any_case`)."""
    seen = {} if seen is None else seen
    firsts = [d for d in _subdirs(root) if d.name.lower() not in MASK_DIRS]

    def is_label(d: Path) -> bool:
        return d.name.lower() in NORMAL_LABELS or bool(_images(d))

    def one_layout(base: Path, label_dirs: list, group: str) -> None:
        """Refuse a label folder of ``base`` that holds a normal-named folder: a ROOT/<group>/<label>/ layout
        one level down, whose normals would be read as defects of the label (``lineA/good/`` beside
        ``lineA/cam2/good/``: cam2's normals become test defects). A folder that is a label only by the images
        directly in it (a stray ``fab0/loose.png`` beside ``fab0/good/``) is named with one of them: the error said
        fab0 made the layout one of labels, and never why."""
        first = next((d for d in label_dirs if d.name.lower() in NORMAL_LABELS), None) or \
            next((d for d in label_dirs if _images(d)), None)
        for d in label_dirs:
            inner = [x.name for x in _subdirs(d) if x.name.lower() in NORMAL_LABELS]
            if inner and d.name.lower() not in NORMAL_LABELS:
                kind = "a group of label folders" if group else "a ROOT/<label>/ layout"
                loose = _images(first) if first is not None and first.name.lower() not in NORMAL_LABELS else []
                fix = "use one layout: move the label folders into group folders, or give a --split-csv"
                if loose:
                    where = (f"{first} holds {len(loose)} image(s) directly (e.g. {loose[0].name}), so it counts as "
                             f"a label folder and makes {base} {kind}")
                    fix = f"move them into {first}/<label>/ (or remove them); or {fix}"
                else:
                    where = f"{first} makes {base} {kind}" if first is not None else \
                        f"{base} is a group of ROOT/<group>/<label>/"
                raise BadInputError(
                    f"{d} holds a `{inner[0]}` folder, as if it were a group (ROOT/<group>/<label>/), but {where}, "
                    f"where {d.name} would be one defect label and its `{inner[0]}` images defects", path=d, fix=fix)

    labels = [d for d in firsts if is_label(d)]
    gt = _masks_folder(root, seen) if labels else None   # a group layout reads each group's ground_truth/ only
    for d in _subdirs(root):
        if d.name.lower() in MASK_DIRS and d != gt:
            _warn_unread_masks(d, pattern)
    if labels:  # root/<label>/**
        one_layout(root, firsts, "")
        out = [Sample(p, _split_folder(p, d, label_splits), d.name,
                      _find_mask(p, d.name, "", gt, pattern, seen, _subfolder(p, d)), "")
               for d in firsts for p in _images_under(d, pattern)]
        if not pattern:
            _warn_unmatched_masks(gt, out)
        return out
    out = []
    for g in firsts:  # root/<group>/<label>/**
        lds = [ld for ld in _subdirs(g) if ld.name.lower() not in MASK_DIRS]
        one_layout(g, lds, g.name)
        gt, mine = _masks_folder(g, seen), []
        for ld in _subdirs(g):
            if ld.name.lower() in MASK_DIRS and ld != gt:
                _warn_unread_masks(ld, pattern)
        for ld in lds:
            mine += [Sample(p, _split_folder(p, ld, label_splits), ld.name,
                            _find_mask(p, ld.name, g.name, gt, pattern, seen, _subfolder(p, ld)), g.name)
                     for p in _images_under(ld, pattern)]
        if not pattern:
            _warn_unmatched_masks(gt, mine)
        out += mine
    return out


def _from_csv(csv_path: Path, root: Path, pattern) -> list[Sample]:
    if not csv_path.is_file():
        raise BadInputError("split CSV not found", path=csv_path, fix="check the --split-csv path")
    raw = csv_path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):   # Excel's "Unicode text", Notepad's "Unicode": not cp1252
        raise BadInputError("the CSV is saved as UTF-16", path=csv_path,
                            fix='save it as UTF-8 (Excel: "CSV UTF-8"), or convert it: iconv -f utf-16 -t utf-8')
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:   # Excel's plain "CSV" on Windows is cp1252: a traceback before
        line = raw[:e.start].count(b"\n") + 1
        raise BadInputError(f"line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}): the CSV was saved in another "
                            "encoding", path=csv_path, fix='save it as UTF-8 (Excel: "CSV UTF-8"), or convert it: '
                                                          "iconv -f cp1252 -t utf-8") from None
    header = text.split("\n", 1)[0]
    # Excel in many locales (German, French...) saves "CSV" separated by semicolons; tab-separated exports too
    sep = next((c for c in ";\t" if c in header and "," not in header), ",")
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        lacks = [c for c in ("path", "label") if c not in cols]
        if lacks:
            raise BadInputError(f"CSV header {reader.fieldnames} lacks the {' and '.join(f'`{c}`' for c in lacks)} "
                                f"column{'s' if len(lacks) > 1 else ''}", path=csv_path,
                                fix="first line must be e.g. path,split,label[,mask][,group]")
        group_col = next((c for c in ("group", "fabric", "category") if c in cols), None)
        out, seen, missing, blank_split, n_rows, mask_of = [], {}, [], {}, {}, {}
        # without a `split` column the split is drawn: a column that holds splits under another name (set, subset)
        # was ignored, and its test rows trained on
        split_like = {c: 0 for c in cols if c not in ("path", "label", "mask", "split", group_col)}
        for row in reader:
            line = reader.line_num
            if None in row:   # DictReader's key for fields beyond the header's
                name = {",": "comma", ";": "semicolon", "\t": "tab"}[sep]
                raise BadInputError(f"line {line} has {len(reader.fieldnames) + len(row[None])} fields, the header "
                                    f"{len(reader.fieldnames)} ({sep.join(reader.fieldnames)})", path=csv_path,
                                    fix=f"quote a path that holds a {name} (\"a{sep}b.png\"), and remove trailing "
                                        f"{name}s")
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                if any(row.values()):   # a labelled row whose path cell is empty was dropped without a word
                    raise BadInputError(f"line {line} has no path ({sep.join(v for v in row.values())})",
                                        path=csv_path, fix="fill in the image's path, or delete the row")
                continue
            for c in list(split_like):
                if row.get(c, "").lower() not in SPLITS:
                    del split_like[c]
                elif row.get(c):
                    split_like[c] += 1
            if any("\x00" in row.get(k, "") for k in ("path", "mask")):   # os.path would raise a bare ValueError
                raise BadInputError(f"line {line}: a path holds a NUL character", path=csv_path,
                                    fix="the CSV is damaged or binary: re-export it as plain UTF-8 text")
            g = row.get(group_col, "") if group_col else ""
            n_rows[g] = n_rows.get(g, 0) + 1
            if "split" in cols and not row.get("split"):
                blank_split.setdefault(g, []).append(line)
            split = SPLITS.get(row.get("split", "").lower())
            if split is None:
                raise BadInputError(f"line {line}: unknown split {row['split']!r}", path=csv_path,
                                    fix="use train, test, val (or leave it empty in every row)")
            if not row.get("label"):   # an empty cell would make a normal image a defect of label ''
                raise BadInputError(f"line {line}: {row['path']} has no label", path=csv_path,
                                    fix="give every row a label: `good` for normal images, else the defect type")
            p = root / row["path"]
            real = os.path.realpath(p)   # the file itself: a/../a/x.png or a symlink is the same image
            if real in seen:
                again = (f"already listed on line {seen[real][0]}" if seen[real][1] == row["path"] else
                         f"is the same file as line {seen[real][0]} ({seen[real][1]})")
                raise BadInputError(f"line {line}: {row['path']} {again}", path=csv_path,
                                    fix="list every image once (a duplicate can leak train into test)")
            seen[real] = (line, row["path"])
            if not p.is_file():
                missing.append((line, row["path"]))
                continue
            group = row.get(group_col, "") if group_col else ""
            if "mask" in cols:
                mask = root / row["mask"] if row.get("mask") else None
                if mask is not None and not mask.is_file():
                    missing.append((line, row["mask"]))
                elif mask is not None:   # one mask for two images: a copy-paste slip gives one image the other's
                    m_real = os.path.realpath(mask)   # defect pixels (folder layouts refuse it too)
                    if m_real in mask_of:
                        raise BadInputError(f"line {line}: {row['mask']} is already the mask of line "
                                            f"{mask_of[m_real][0]} ({mask_of[m_real][1]})", path=csv_path,
                                            fix="give each image its own mask file")
                    mask_of[m_real] = (line, row["path"])
            else:   # found by mask_pattern or beside the image: checked as the folder layouts check theirs
                mask = _find_mask(p, row["label"], group, None, pattern)
                m_key = os.path.abspath(mask) if mask is not None else None   # lexical: `_check_one_image_per_mask`
                if m_key in mask_of:
                    raise BadInputError(f"line {line}: {mask} was found as the mask of both {mask_of[m_key][1]} "
                                        f"(line {mask_of[m_key][0]}) and {row['path']}", path=csv_path,
                                        fix="give each image its own mask: a `mask` column naming each image's, or "
                                            "a mask_pattern that names one file per image (rename the images apart)")
                if m_key is not None:
                    mask_of[m_key] = (line, row["path"])
            out.append(Sample(p, split, row["label"], mask, group))
    named = [c for c, n in split_like.items() if n and "split" not in cols]
    if named:
        raise BadInputError(f"the CSV has no `split` column, and its `{named[0]}` column holds splits (train, test, "
                            "val): it would be ignored, each image's split drawn from its path, and test images "
                            "trained on", path=csv_path, fix=f"name the `{named[0]}` column `split` in the header "
                                                            "(path,split,label[,mask]), or remove it for a drawn split")
    # a row's image that is another row's mask (a listing of Imgs/ holding x.jpg and its mask x.png): trained on
    # as a normal, or scored as a defect, and used as a mask too; folder layouts leave such files out
    owner = {os.path.realpath(m): v for m, v in mask_of.items()}
    both = [(v, owner[real]) for real, v in seen.items() if real in owner and owner[real][0] != v[0]]
    if both:
        (line, rel), (m_line, m_rel) = min(both)
        more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
        raise BadInputError(f"line {line}: {rel} is the mask of line {m_line} ({m_rel}){more}: a mask is not an "
                            "image to train on or score", path=csv_path,
                            fix="remove the rows of mask files from the CSV (name masks in a `mask` column)")
    for g, blank in blank_split.items():   # a group all blank gets a drawn split (`runs.assign_splits`)
        if len(blank) < n_rows[g]:
            lines = ", ".join(map(str, blank[:5])) + (" ..." if len(blank) > 5 else "")
            raise BadInputError(f"{len(blank)} row(s) {f'of group {g} ' if g else ''}have no split (lines {lines}) "
                                "while others have one: they would be neither trained on nor tested", path=csv_path,
                                fix="give every row a split (train, test or val), or leave the column empty in every "
                                    "row (of a group) for a drawn split")
    if missing:
        first = "; ".join(f"line {ln}: {rel}" for ln, rel in missing[:5])
        raise BadInputError(f"{len(missing)} file(s) listed in the CSV not found under {root} ({first}"
                            f"{' ...' if len(missing) > 5 else ''})", path=csv_path,
                            fix="paths are relative to --data; fix the CSV or the --data root" + (
                                " (the paths use `\\`: write them with `/`)" if any("\\" in r for _, r in missing)
                                else ""))
    return out


def select(samples, split=None, group=None) -> list[Sample]:
    """Samples whose split / group is ``split`` / ``group`` (each a name or a list of names; None = any)."""
    def ok(value, want):
        if want is None:
            return True
        return value == want if isinstance(want, str) else value in want
    return [s for s in samples if ok(s.split, split) and ok(s.group, group)]


def split_train_val(samples, val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(rest, val): a seeded random ``val_fraction`` of the *training normals* only, and everything else.

    Validation comes from training normals because it only calibrates a threshold; taking it from
    test rows would leak. Samples are not modified or copied; at least one training normal is kept.
    """
    if not 0 <= val_fraction < 1:
        raise BadInputError(f"val_fraction {val_fraction} must be in [0, 1)", fix="e.g. 0.1")
    pool = sorted((s for s in samples if s.split == "train" and s.is_normal), key=lambda s: str(s.path))
    n_val = min(max(1, round(val_fraction * len(pool))), len(pool) - 1) if val_fraction > 0 and pool else 0
    val_ids = {id(s) for s in random.Random(seed).sample(pool, n_val)}
    return [s for s in samples if id(s) not in val_ids], [s for s in samples if id(s) in val_ids]
