"""A finished run as an in-process scorer: ``Detector(run).score(paths)`` → each image's score, flag, map and mask.

Why: a line's software that scores every new image wants the model loaded once and answers in memory;
``uninet-feat predict`` pays the imports and the model build on every call (5–8 s of a small batch on 2 cores)
and writes files. The rules are predict's and evaluate's: the run's threshold (or one given), its tile rule and
position offsets, its chosen pixel map, and the top of the validation normals' map range as the pixel threshold.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# modes Pillow writes to PNG as they are; the others go to TIFF, which also holds 32-bit "I" (PNG cannot: a
# conversion to fit it would clip the values) and "I;16L" (no PNG writer)
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})


_PIXELS_FIX = "pass uint8 or uint16 pixels as (H, W), (H, W, 3) or (H, W, 4), or a file path"


def _frame_file(image, path: Path, k: int):
    """(file to score, name for the result): a path as it is (name None: the path), or an in-memory image — a uint8
    / uint16 numpy array (H, W), (H, W, 3) or (H, W, 4), or a PIL image, e.g. a camera frame — written losslessly
    to ``path`` (PNG; a TIFF beside it for modes PNG cannot hold, e.g. CMYK or 32-bit "I"), so it is read exactly
    as a file of the same pixels would be, and named ``<image k>``. Colour arrays are RGB (OpenCV's BGR must be
    reversed first: ``frame[..., ::-1]``); a 16-bit colour array is read as a 16-bit colour file is, at 8 bits (its
    high byte). A PIL image is taken upright, as its file: its EXIF orientation is applied. A torch tensor is read
    as its array; one of shape (C, H, W) with C 1, 3 or 4 and W not (torchvision.io.decode_image's) is taken
    channels first."""
    from PIL import Image

    from .errors import BadInputError
    if isinstance(image, (str, os.PathLike)):
        return image, None
    if _is_tensor(image):
        import torch
        if image.layout != torch.strided or image.dtype not in (torch.uint8, torch.uint16):   # .numpy(): a TypeError
            raise BadInputError(f"image {k}: a {image.dtype} tensor ({image.layout}) of shape {tuple(image.shape)} "
                                "is not an image this reads", fix=_PIXELS_FIX)
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 3, 4):
            image = image.permute(1, 2, 0)   # channels first, as torch holds images: to an array's (H, W, C)
        image = image.numpy()
    if isinstance(image, Image.Image):
        # as `load_image` reads the file it came from: upright (a file's EXIF orientation, which a PNG written
        # here would not carry), and in a lossless container that holds its mode (PNG cannot hold CMYK, YCbCr, ...)
        if 0 in image.size:   # PIL cannot write it: "convert it first" was no fix
            raise BadInputError(f"image {k}: a PIL image of size {image.size} has no pixels",
                                fix="pass an image of at least 1x1 pixels")
        image = _upright(image, k)
        target = path if image.mode in _PNG_MODES else path.with_suffix(".tif")
        try:
            image.save(target, **({"compress_level": 1} if target == path else {}))
        except (OSError, ValueError) as e:   # a mode neither container holds (HSV, La, I;16N, ...)
            # integer pixels: convert('RGB' / 'L') would clip them to 8 bits, which is not how their file reads
            fix = ("pass the file's path, or its pixels as a numpy array, np.asarray(image), when they fit 16 bits"
                   if image.mode.startswith("I") else "convert it first, e.g. image.convert('RGB') (or 'L' for grey)")
            raise BadInputError(f"image {k}: a PIL image of mode {image.mode} cannot be scored ({e})",
                                fix=fix) from None
        return target, f"<image {k}>"
    _check_image_kind(image, f"image {k}")
    a = np.asarray(image)
    if a.dtype.byteorder not in ("=", "|") and a.dtype.kind == "u":   # np.frombuffer(raw, ">u2") of a camera buffer
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in (np.uint8, np.uint16) or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise BadInputError(f"image {k}: a {a.dtype} array of shape {a.shape} is not an image this reads",
                            fix=_PIXELS_FIX)
    if a.size == 0:   # PIL cannot write it (a raw ValueError)
        raise BadInputError(f"image {k}: an array of shape {a.shape} has no pixels",
                            fix="pass an image of at least 1x1 pixels")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint16 and a.ndim == 3:   # PIL has no 16-bit colour mode: such a file reads as its high byte
        from .data.images import few_bits_colour_note
        a = (a >> 8).astype(np.uint8)
        few_bits_colour_note(f"<image {k}>", a)
    Image.fromarray(a).save(path, compress_level=1)
    return path, f"<image {k}>"


def _readable(path) -> bool:
    """Whether ``path`` passes the up-front check scoring gives every image (`check_image`), quietly."""
    from .data.images import MIN_SIDE, check_image
    from .errors import BadInputError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check_image(path, MIN_SIDE)
        except BadInputError:
            return False
    return True


@contextlib.contextmanager
def _named_frames(names: dict):
    """Errors and warnings raised inside name in-memory images by ``names`` ({temporary file: ``<image k>``}), as
    the caller knows them, not by their temporary files, gone by the time the caller reads them. The warnings are
    caught and re-emitted renamed, from where they were raised, so the caller's filters still apply to them."""
    if not names:
        yield
        return
    from .errors import BadInputError

    def renamed(text):
        for f, name in names.items():
            text = text.replace(f, name)
        return text
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except BadInputError as e:
        err = BadInputError(renamed(e.reason), path=None if e.path is None else names.get(e.path, renamed(e.path)),
                            fix=e.fix and renamed(e.fix))
        err.__dict__.update({k: v for k, v in vars(e).items() if k not in vars(err)})   # e.g. of_mask
        raise err from None
    finally:   # before the error, which points at them ("see the warnings above")
        by_file = {getattr(m, "__file__", None): m for m in list(sys.modules.values())} if caught else {}
        for w in caught:   # from the module that raised it, so a caller's filter by module="uninet_feat" holds
            mod = by_file.get(w.filename)   # None: the module is named from the file, as warnings does
            warnings.warn_explicit(renamed(str(w.message)), w.category, w.filename, w.lineno,
                                   module=mod.__name__ if mod else None,
                                   registry=vars(mod or sys.modules[__name__]).setdefault("__warningregistry__", {}))


def _is_tensor(x) -> bool:
    import torch
    return isinstance(x, torch.Tensor)


def _check_image_kind(image, what) -> None:
    """Refuse what is no image (None, a number, encoded bytes) with its fix, not as a TypeError or a 0-d array."""
    from .errors import BadInputError
    if isinstance(image, (bytes, bytearray, memoryview)):
        raise BadInputError(f"{what}: encoded image bytes cannot be scored as they are",
                            fix="decode them first, e.g. PIL.Image.open(io.BytesIO(data)), or pass the file's path")
    if image is None or not (hasattr(image, "__array__") or hasattr(image, "__array_interface__")):
        raise BadInputError(f"{what}: a {type(image).__name__} is not an image",
                            fix="pass file paths, numpy arrays, torch tensors or PIL images (or a list of them)")


def _upright(image, k: int):
    """A PIL image as a viewer shows it, as `load_image` reads its file. Not `ImageOps.exif_transpose`: it decodes
    an image not yet decoded through PIL's memory map, which scrambles an uncompressed L / P / I;16 / RGBA / CMYK
    TIFF with a quarter turn (orientation 5-8: mapped at its upright size), and on a decoded TIFF it cannot know
    the turn PIL already made. So one not yet decoded is decoded by `images._decode` (as a file is); one decoded
    already gets only the turn PIL left pending, and a TIFF decoded by that memory map is refused, not scored."""
    from PIL import Image

    from .data.images import _decode, _stored_size, _UPRIGHT, orientation, oriented, oriented_size
    from .errors import BadInputError
    name = f"<image {k}>"
    if getattr(image, "tile", None) and getattr(image, "fp", None) is None:   # `with Image.open(p) as im:` left
        raise BadInputError(f"{name}: the PIL image was closed before its pixels were read (a bare AssertionError in "
                            "PIL before session 52)", fix="pass the file's path, or call image.load() inside the "
                                                          "`with Image.open(...)` block before it closes")
    if getattr(image, "tile", None) and getattr(image, "fp", None) is not None:   # opened, not yet decoded
        filename = getattr(image, "filename", "")
        try:
            _decode(image, name)
        except BadInputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadInputError(f"{name}: cannot decode the PIL image ({type(e).__name__}: {e})",
                                fix="pass the file's path, or re-export the file") from None
        finally:
            image.filename = filename   # `_decode` cleared it to keep PIL from mapping the file: the caller's again
        out = oriented(image)
    else:
        turn = orientation(image)   # what PIL left in its tags: it turns a TIFF as it decodes it and drops the tag
        if image.format == "TIFF":  # (older PIL kept it, and the stored size): as `_decode`, a quarter turn then
            w, h = _stored_size(image)
            turn = turn if turn >= 5 and image.size == (w, h) != (h, w) else 1
        out = image.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else image
        file = getattr(image, "filename", "")
        if image.format == "TIFF" and file and os.path.isfile(file) and image.tell() == 0:
            try:
                with Image.open(file) as head:   # the header alone: the size the file shows upright
                    want, quarter = oriented_size(head), orientation(head) >= 5
            except (OSError, ValueError):
                want, quarter = out.size, False
            if quarter and out.size != want:
                raise BadInputError(f"{name} was decoded by PIL at {out.size[0]}x{out.size[1]} px, not the "
                                    f"{want[0]}x{want[1]} px its header gives with its orientation tag (PIL's memory "
                                    "map of an uncompressed TIFF with a quarter turn scrambles its rows)", path=file,
                                    fix="pass the file's path, or the image as Image.open returns it (before .load())")
    if out is not image:   # a turned copy: its tag no longer applies (as exif_transpose leaves it)
        out.info.pop("exif", None)
    return out


@dataclass(frozen=True)
class Region:
    """One defect region of a `Detection`'s mask (8-connected, as AUPRO counts regions), in the image's pixels."""
    x: int          # left column of its bounding box
    y: int          # top row
    width: int
    height: int
    area: int       # its pixels
    peak: float     # the highest map value in it


@dataclass
class Detection:
    path: str
    score: float                  # the image score, WDM or image_score's (a tiled image's by its tile rule, offsets)
    flagged: bool | None          # score > threshold; None when there is no threshold
    map: np.ndarray | None        # float32 (H, W) pixel map at the image's own size (``maps=True``)
    mask: np.ndarray | None       # bool (H, W): map > pixel threshold (None without one, or without maps)

    def regions(self, min_area: int = 1) -> list[Region]:
        """The mask's regions of at least ``min_area`` pixels, the hottest first: where a line's software draws
        boxes or sorts parts out; [] without a mask."""
        if self.mask is None or not self.mask.any():
            return []
        from scipy import ndimage
        lab, n = ndimage.label(self.mask, structure=np.ones((3, 3), dtype=int))
        idx = np.arange(1, n + 1)
        areas = ndimage.sum_labels(self.mask, lab, idx)
        peaks = ndimage.maximum(self.map, lab, idx)
        out = [Region(int(sl[1].start), int(sl[0].start), int(sl[1].stop - sl[1].start),
                      int(sl[0].stop - sl[0].start), int(a), float(pk))
               for sl, a, pk in zip(ndimage.find_objects(lab), areas, peaks) if a >= min_area]
        return sorted(out, key=lambda r: -r.peak)


KIND_LOOKS = 64   # a Detector compares this many of its first images' colour kind with the run's


class Detector:
    """``Detector(run, threshold=None, max_fpr=None, pixel_threshold=None, device=None, group=None, skip_bad=False)``.

    ``run``: a run folder or its model.pt, as ``--run``. ``threshold`` / ``max_fpr``: as predict's flags
    (default: the run's, from its validation normals).
    ``device``: `runs.pick_device` (None: the CPU, as torch's; "auto": a CUDA GPU when torch sees one). ``group``:
    the group of every image (a multi-group run's position offsets are per group; a run trained on one group
    refuses another). ``skip_bad``: an unreadable image gets a `Detection` with a NaN score (warned) instead of
    stopping the call. torch's thread count is left as the host process set it."""

    def __init__(self, run, threshold: float | None = None, max_fpr: float | None = None,
                 pixel_threshold: float | None = None, device=None, group: str | None = None,
                 skip_bad: bool = False):
        import math

        from .calibration import load_run
        from .thresholds import pooled_for_unknown_groups, resolve_thresholds
        from .errors import BadInputError
        from .predict import default_pixel_threshold
        from .runs import ready_to_score, run_folder, run_path
        if pixel_threshold is not None and not math.isfinite(pixel_threshold):
            raise BadInputError(f"pixel_threshold must be a finite number, got {pixel_threshold}")
        self.run = run_path(run_folder(run, "Detector(run)"), "model.pt").parent   # folder or model.pt, as --run
        import torch
        with torch.random.fork_rng(devices=[]):   # the rebuild's random init, replaced by the run's weights, must
            model, _, self.cfg = load_run(self.run, device=device)   # not advance the caller's RNG
        # group checked now (a run of one group refuses another), skip_bad as asked; threads as the host set them
        self.model = ready_to_score(model, self.cfg, group, skip_bad, threads=False)
        # a run of several groups: ``group``'s own threshold; without one the pooled threshold, the groups' own in
        # ``group_thresholds`` (the images of a call carry no group)
        self.threshold, self.threshold_rule, self.group_thresholds = resolve_thresholds(self.run, threshold, max_fpr,
                                                                                        group)
        if self.group_thresholds:   # the images of a call carry no group: said once, here
            pooled_for_unknown_groups([""], self.group_thresholds, count=False)
        if pixel_threshold is None:
            pixel_threshold = default_pixel_threshold(self.run, self.model)
        self.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
        self.group = group
        from .predict import trained_colour_kind
        self._trained_kind = trained_colour_kind(self.run)   # images of the other kind are named once per Detector,
        self._kind_looks = KIND_LOOKS   # looked for among its first KIND_LOOKS images: a wrong camera or run shows at
                                        # once, and a line's frames are not decoded twice for it for ever

    def score(self, images, maps: bool = True) -> list[Detection]:
        """One `Detection` per image in ``images``, in order: file paths, or in-memory images (uint8 / uint16 numpy
        arrays (H, W), (H, W, 3), (H, W, 4), torch tensors of those shapes or (C, H, W) — channels first when C is
        1, 3 or 4 and W is not —, or PIL images: camera frames; named ``<image k>``), or one of them. A 4-D array or
        tensor is a batch of such images.
        ``maps=False`` skips the maps (and masks). Every map of the list is held in the result: for long lists,
        `iter_score`."""
        return list(self.iter_score(images, maps))

    def iter_score(self, images, maps: bool = True, chunk: int = 64):
        """`score` as a generator, ``chunk`` images at a time: memory stays that of one chunk's maps however
        many images (a 4096x256 strip's map is 4 MB). A generator or other iterator of images (a camera's frames)
        is read a chunk at a time, so an endless one yields as it goes."""
        from PIL import Image

        from .errors import BadInputError
        if isinstance(images, np.ndarray) and images.ndim == 1 and images.dtype.kind in "UO":
            images = images.tolist()   # paths as a numpy array (a pandas column's .values): a list of them
        array = isinstance(images, np.ndarray) or _is_tensor(images)   # 4-D: a batch, iterated as a list
        if isinstance(images, (str, os.PathLike, Image.Image)) or (array and images.ndim != 4) or \
                isinstance(images, (bytes, bytearray, memoryview)) or not hasattr(images, "__iter__"):
            images = [images]   # one image (a PIL image is iterable, by rows: it was read as a list of them; a
                                # tensor by its first dim); None, a number, bytes: refused as one by `_frame_file`
        step = max(1, int(chunk))
        if not (array or isinstance(images, (list, tuple))):   # a generator (camera frames): ``chunk`` at a time,
            from itertools import islice                         # not read to its end (an endless one never was)
            it, i = iter(images), 0
            while part := list(islice(it, step)):
                yield from self._score(part, maps, i)
                i += len(part)
            if not i:
                raise BadInputError("no images to score", fix="pass at least one image path")
            return
        images = list(images)
        if not images:
            raise BadInputError("no images to score", fix="pass at least one image path")
        for i in range(0, len(images), step):
            yield from self._score(images[i:i + step], maps, i)

    def overlay(self, detection: Detection, image=None, alpha: float = 0.5) -> np.ndarray:
        """uint8 (H, W, 3): ``detection``'s map over its image, as predict draws its overlays (the colour scale of the
        run's validation normals, the defect mask's region outlined in light blue). ``image``: the frame it was
        scored from, for in-memory images (``<image k>``), whose temporary file is gone; one of another size than
        the map is refused."""
        from .errors import BadInputError
        from .overlay import display_range, heatmap_overlay
        from .scoring import pixel_map_kind
        if detection.map is None and not np.isfinite(detection.score):   # skip_bad's NaN row: nothing was scored
            raise BadInputError(f"{detection.path}: the image could not be read, so skip_bad skipped it and there is "
                                "no map to draw", fix="re-export the image (or leave it out) and score it again")
        if detection.map is None:
            raise BadInputError(f"{detection.path}: scored with maps=False, so there is no map to draw",
                                fix="score it with maps=True (the default)")
        if image is None:
            if detection.path.startswith("<image "):
                raise BadInputError(f"{detection.path} was an in-memory image", fix="pass it: overlay(d, image=frame)")
            image = detection.path
        vmin, vmax = display_range(self.run, [detection.map], pixel_map_kind(self.model.cfg))
        import tempfile
        with tempfile.TemporaryDirectory(prefix="uninet-feat-frames-") as tmp:   # the pixels it was scored from
            f = os.fspath(image) if isinstance(image, (str, os.PathLike)) else str(
                _frame_file(image, Path(tmp) / "frame.png", 0)[0])
            from .data.images import read_size
            size = read_size(f)
            if size != tuple(detection.map.shape):   # the map was stretched over it: a plausible, wrong picture
                raise BadInputError(f"{detection.path} was scored at {detection.map.shape[0]}x{detection.map.shape[1]}"
                                    f" (HxW), the image given is {size[0]}x{size[1]}",
                                    fix="pass the image (frame) it was scored from")
            return heatmap_overlay(f, detection.map, vmin=vmin, vmax=vmax, alpha=alpha, threshold=self.pixel_threshold)

    def _score(self, images, maps: bool, first: int = 0) -> list[Detection]:
        """Paths scored where they are; in-memory images (`_frame_file`) through a temporary folder."""
        import tempfile
        with tempfile.TemporaryDirectory(prefix="uninet-feat-frames-") as tmp:
            files = [_frame_file(p, Path(tmp) / f"{first + k:06d}.png", first + k) for k, p in enumerate(images)]
            names = {os.path.abspath(f): name for f, name in files if name is not None}
            with _named_frames(names):
                dets = self._score_files([f for f, _ in files], maps, names)
        return [Detection(name or d.path, d.score, d.flagged, d.map, d.mask) for d, (_, name) in zip(dets, files)]

    def _score_files(self, images, maps: bool, names: dict | None = None) -> list[Detection]:
        from .data.layouts import Sample
        from .evaluate import score_samples
        from .predict import map_at_image_size
        samples = [Sample(Path(os.path.abspath(p)), "", "", None, self.group or "") for p in images]
        if self._trained_kind is not None and self._kind_looks > 0:   # as predict does; said once
            from .predict import _warn_other_colour_kind
            looked = samples[:self._kind_looks]
            self._kind_looks -= len(looked)
            if _warn_other_colour_kind(self.run, looked, trained=self._trained_kind, names=names):
                self._kind_looks = 0
        got: dict[str, np.ndarray] = {}

        def keep(s, m, _mask):   # each finished map at the image's own size, as predict --save-maps writes it
            got[str(s.path)] = map_at_image_size(s.path, m)

        from .errors import BadInputError
        try:
            res = score_samples(self.model, samples, self.cfg, keep_maps=False, on_map=keep if maps else None)
        except BadInputError:
            # skip_bad: `check_samples` still refuses a set of which no image reads, and images are scored a chunk
            # at a time, so one bad image alone (or a chunk of them) stopped the call and every chunk after it.
            # Each was warned of already: NaN scores, as for a bad image among readable ones.
            if not self.cfg.get("skip_bad") or any(_readable(s.path) for s in samples):
                raise
            res = {"samples": [], "scores": []}
        scored = {str(s.path): float(v) for s, v in zip(res["samples"], res["scores"])}
        out = []
        for s in samples:   # in the caller's order; an image skipped as unreadable (skip_bad) has a NaN score
            v, m = scored.get(str(s.path), float("nan")), got.get(str(s.path))
            hot = None if m is None or self.pixel_threshold is None else m > np.float32(self.pixel_threshold)
            flag = None if self.threshold is None or v != v else bool(v > self.threshold)
            out.append(Detection(str(s.path), v, flag, m, hot))
        return out
