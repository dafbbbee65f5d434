"""A finished run as an in-process scorer: ``Detector(run).score(paths)`` → each image's score, flag, map and mask.

Why: a line's software that scores every new image wants the model loaded once and answers in memory;
``uninet-feat predict`` pays the imports and the model build on every call (5–8 s of a small batch on 2 cores)
and writes files. The rules are predict's and evaluate's: the run's threshold (or one given), its tile rule and
position offsets, its chosen pixel map, and the top of the validation normals' map range as the pixel threshold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Detection:
    path: str
    score: float                  # the WDM image score (a tiled image's by the run's tile rule and offsets)
    flagged: bool | None          # score > threshold; None when there is no threshold
    map: np.ndarray | None        # float32 (H, W) pixel map at the image's own size (``maps=True``)
    mask: np.ndarray | None       # bool (H, W): map > pixel threshold (None without one, or without maps)


class Detector:
    """``Detector(run, threshold=None, max_fpr=None, pixel_threshold=None, device=None, group=None, skip_bad=False)``.

    ``threshold`` / ``max_fpr``: as predict's flags (default: the run's, from its validation normals).
    ``device``: `runs.pick_device` (None: the CPU, as torch's; "auto": a CUDA GPU when torch sees one). ``group``:
    the group of every image (a multi-group run's position offsets are per group; a run trained on one group
    refuses another). ``skip_bad``: an unreadable image gets a `Detection` with a NaN score (warned) instead of
    stopping the call. torch's thread count is left as the host process set it."""

    def __init__(self, run, threshold: float | None = None, max_fpr: float | None = None,
                 pixel_threshold: float | None = None, device=None, group: str | None = None,
                 skip_bad: bool = False):
        import math

        from .calibration import load_run, resolve_threshold
        from .errors import BadInputError
        from .overlay import calibrated_range
        from .runs import ready_to_score, run_path
        from .scoring import pixel_map_kind
        if pixel_threshold is not None and not math.isfinite(pixel_threshold):
            raise BadInputError(f"pixel_threshold must be a finite number, got {pixel_threshold}")
        self.run = run_path(run, "model.pt").parent
        model, _, self.cfg = load_run(self.run, device=device)
        # group checked now (a run of one group refuses another), skip_bad as asked; threads as the host set them
        self.model = ready_to_score(model, self.cfg, group, skip_bad, threads=False)
        self.threshold, self.threshold_rule = resolve_threshold(self.run, threshold, max_fpr)
        if pixel_threshold is None:
            rng = calibrated_range(self.run, pixel_map_kind(self.model.cfg))
            pixel_threshold = rng[1] if rng is not None else None
        self.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
        self.group = group

    def score(self, images, maps: bool = True) -> list[Detection]:
        """One `Detection` per image file in ``images`` (paths, or one path), in order. ``maps=False`` skips the
        maps (and masks). Every map of the list is held in the result: for long lists, `iter_score`."""
        return list(self.iter_score(images, maps))

    def iter_score(self, images, maps: bool = True, chunk: int = 64):
        """`score` as a generator, ``chunk`` images at a time: memory stays that of one chunk's maps however
        many images (a 4096x256 strip's map is 4 MB)."""
        from .errors import BadInputError
        images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if not images:
            raise BadInputError("no images to score", fix="pass at least one image path")
        step = max(1, int(chunk))
        for i in range(0, len(images), step):
            yield from self._score(images[i:i + step], maps)

    def _score(self, images, maps: bool) -> list[Detection]:
        from PIL import Image

        from .data.images import read_size
        from .data.layouts import Sample
        from .evaluate import score_samples
        from .overlay import _resize_float
        samples = [Sample(Path(os.path.abspath(p)), "", "", None, self.group or "") for p in images]
        got: dict[str, np.ndarray] = {}

        def keep(s, m, _mask):   # each finished map at the image's own size, as predict --save-maps writes it
            got[str(s.path)] = _resize_float(np.asarray(m, np.float32), read_size(s.path),
                                             Image.Resampling.BILINEAR)

        res = score_samples(self.model, samples, self.cfg, keep_maps=False, on_map=keep if maps else None)
        scored = {str(s.path): float(v) for s, v in zip(res["samples"], res["scores"])}
        out = []
        for s in samples:   # in the caller's order; an image skipped as unreadable (skip_bad) has a NaN score
            v, m = scored.get(str(s.path), float("nan")), got.get(str(s.path))
            hot = None if m is None or self.pixel_threshold is None else m > np.float32(self.pixel_threshold)
            flag = None if self.threshold is None or v != v else bool(v > self.threshold)
            out.append(Detection(str(s.path), v, flag, m, hot))
        return out
