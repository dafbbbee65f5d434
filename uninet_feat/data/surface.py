"""A generic synthetic defect for non-fabric surfaces: a region refilled with the image's own texture, changed.

Why: the synthetic validation set (`selection`) was built from fabric faults (holes, yarns, picks). On
ground or pressed surfaces (tiles, cells) a common fault is a patch or band whose texture differs in
direction or scale from the rest — magnetic tile's "uneven" class is such a band of different grinding.
``texture_patch`` makes one in the spirit of CutPaste / NSA: the same image, flipped or turned and
rescaled, shifted so the content comes from elsewhere, blended into a soft-edged band or blob. It uses
only the image itself, so its colours and brightness stay plausible; the defect is the texture change.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import BadInputError


def _changed_texture(f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """f (H, W, C) flipped or turned, rescaled by 0.5-0.8 or 1.25-2, cut to (H, W) at a random offset."""
    h, w, _ = f.shape
    t = f[::-1] if rng.random() < 0.5 else f[:, ::-1]
    if h == w and rng.random() < 0.5:
        t = t.transpose(1, 0, 2)   # a quarter turn: the texture's direction changes
    s = rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 2.0)
    t = ndi.zoom(np.ascontiguousarray(t), (s, s, 1), order=1, mode="reflect")
    while t.shape[0] < 2 * h or t.shape[1] < 2 * w:   # mirrored copies: no seams where they meet
        t = np.pad(t, ((0, max(0, min(t.shape[0], 2 * h - t.shape[0]))),
                       (0, max(0, min(t.shape[1], 2 * w - t.shape[1]))), (0, 0)), mode="symmetric")
    y0, x0 = rng.integers(0, t.shape[0] - h + 1), rng.integers(0, t.shape[1] - w + 1)
    return t[y0:y0 + h, x0:x0 + w]


def _region(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Soft weights in [0, 1]: a band across the image (half the time) or an irregular blob, centred anywhere.

    Why anywhere: a part's defects reach its edges (magnetic tile's breaks and frays), and a model's maps are
    weakest there (zero padding). Centres kept to the middle (0.2-0.8, until session 31) put 11 % of the mask
    pixels within 8 px of the border of a 128-px image, whose border holds 23 % of the area; centred anywhere,
    21 %, so label-free choices (`calibration`, `border_pad`) see the border as often as defects reach it."""
    y, x = np.mgrid[:h, :w].astype(np.float64)
    if rng.random() < 0.5:
        along_y = rng.random() < 0.5
        c, side = (rng.uniform(0, 1) * h, h) if along_y else (rng.uniform(0, 1) * w, w)
        half = rng.uniform(0.08, 0.2) * side
        d = np.abs((y if along_y else x) - c) / half
    else:
        cy, cx = rng.uniform(0, 1) * h, rng.uniform(0, 1) * w
        ry, rx = rng.uniform(0.1, 0.25) * h, rng.uniform(0.1, 0.25) * w
        d = np.hypot((y - cy) / ry, (x - cx) / rx)
    n = ndi.gaussian_filter(rng.standard_normal((h, w)), max(h, w) / 16)
    d = d + 0.15 * n / (n.std() + 1e-12)   # an irregular outline
    return np.clip((1.15 - d) / 0.3, 0, 1)


def texture_patch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image with a changed-texture region, bool mask of that region) of a uint8 (H, W, C) image."""
    f = img.astype(np.float64)
    a = _region(*f.shape[:2], rng)[..., None]
    out = f * (1 - a) + _changed_texture(f, rng) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), a[..., 0] > 0.5


_MAKERS = {"texture_patch": texture_patch}
SURFACE_DEFECTS = tuple(_MAKERS)


def add_surface_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(edited uint8 image, bool mask) for a surface defect ``kind``, as `data.synthetic.add_defect` for fabric."""
    if kind not in _MAKERS:
        raise BadInputError(f"unknown surface defect {kind!r}", fix=f"use one of {SURFACE_DEFECTS}")
    return _MAKERS[kind](img, rng)
