"""Heatmap overlays: an anomaly map coloured and blended over its image, optionally saved as PNG.

The colour scale is fixed by ``vmin``/``vmax``. Pass the **same** values for every image of a data
set (e.g. ``vmin=0`` and ``vmax`` = a high quantile of the validation normals' maps, or the
normals' score range) so that a colour means the same anomaly level in every overlay. Left at
``None`` they default to this map's own min/max: every overlay then has a hot spot somewhere, even a
perfectly normal image — fine for a quick look, misleading for comparison.

`display_range` gives that scale for a trained run: from the validation normals' median pixel
to their 0.999-quantile pixel, written by ``train`` into ``calibration.json`` (``map_range``).

The colour is laid over the image with a weight that grows with the map value (`heat_weight`): none in
the lowest ``clear_below`` (0.3) of the scale, rising smoothly to ``alpha`` (0.5) at its top. A normal
image therefore shows nearly untouched, in its own colours and brightness, and only what exceeds the
normals is tinted, half image and half heat colour at most, so a stain's own colour still shows
through. The heat colours are inferno's black → purple → red → orange (its pale-yellow end is left out:
it vanishes on cream, white or light-grey images). Until session 28 the colour was blended at 50 % over
every pixel (``clear_below=None`` still draws that), which halved the brightness of the whole image
and tinted every colour picture.

No matplotlib at run time: the colormaps are small built-in tables (``colormap(name)``).
Very wide images (4096×256 fabric strips) keep their aspect ratio; ``max_width`` downscales the
output (image, map, mask all resampled to the output size).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write_bytes

# 11 evenly spaced anchors of the "inferno" perceptual colormap (black → purple → orange → pale yellow);
# the 256-entry table is interpolated between them. Luminance increases monotonically.
_INFERNO_ANCHORS = ["000004", "160b39", "420a68", "6a176e", "932667", "bc3754",
                    "dd513a", "f37819", "fca50a", "f6d746", "fcffa4"]

PNG_LEVEL = 1                     # zlib level of written overlays (lossless at any level)
BLEND_PIXELS = 1 << 18            # pixels blended at a time: a large overlay needs no full-size float copies

MASK_COLOR = (0, 255, 0)          # ground-truth outline: green
CONTOUR_COLOR = (0, 200, 255)     # threshold contour: light blue
CLEAR_BELOW = 0.3                 # the lowest 30 % of the colour scale leaves the image untouched
INFERNO_TOP = 0.75                # overlays use inferno up to its orange (0.75), not its pale-yellow end


def colormap(name: str = "inferno") -> np.ndarray:
    """A (256, 3) uint8 lookup table: ``inferno`` (perceptual, default) or ``jet``."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "inferno":
        anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _INFERNO_ANCHORS], np.float64)
        pos = np.linspace(0.0, 1.0, len(anchors))
        lut = np.stack([np.interp(x, pos, anchors[:, c]) for c in range(3)], 1)
    elif name == "jet":
        lut = 255.0 * np.clip(np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2),
                                        1.5 - np.abs(4 * x - 1)], 1), 0.0, 1.0)
    else:
        raise ValueError(f"unknown colormap {name!r}; use 'inferno' or 'jet'")
    return np.round(lut).astype(np.uint8)


def apply_colormap(values: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """Map values to uint8 RGB (..., 3); values outside [vmin, vmax] are clipped, NaN counts as vmin."""
    v = np.nan_to_num(np.asarray(values, np.float64), nan=vmin, posinf=vmax, neginf=vmin)
    span = vmax - vmin
    t = (v - vmin) / span if span > 0 else np.zeros_like(v)
    idx = np.clip(np.round(t * 255), 0, 255).astype(np.int64)
    return colormap(cmap)[idx]


def heat_weight(t, alpha: float = 0.5, clear_below: float | None = CLEAR_BELOW) -> np.ndarray:
    """The colour's weight over the image at scale position ``t`` (0 = vmin, 1 = vmax; clipped): 0 up to
    ``clear_below``, rising smoothly (smoothstep) to ``alpha`` at 1; ``clear_below=None``: ``alpha`` everywhere."""
    t = np.clip(np.asarray(t, np.float32), 0.0, 1.0)
    if clear_below is None:
        return np.full_like(t, alpha)
    if not 0.0 <= clear_below < 1.0:
        raise ValueError(f"clear_below must be in [0, 1) or None, got {clear_below}")
    r = np.clip((t - clear_below) / (1.0 - clear_below), 0.0, 1.0)
    return (alpha * r * r * (3.0 - 2.0 * r)).astype(np.float32)


def heat_colours(t, cmap: str = "inferno") -> np.ndarray:
    """uint8 (..., 3): the overlay's colour at scale position ``t`` (clipped to [0, 1]): inferno up to
    `INFERNO_TOP` (orange), or the whole of ``jet``."""
    top = INFERNO_TOP if cmap == "inferno" else 1.0
    return apply_colormap(np.clip(np.asarray(t, np.float64), 0.0, 1.0) * top, 0.0, 1.0, cmap)


def _as_rgb_uint8(image) -> np.ndarray:
    """A path or an array (H,W) / (H,W,1|3|4), uint8 / uint16 / bool / float in [0,1] → uint8 (H,W,3). A file is
    decoded in its own 8- or 16-bit mode (`picture_8bit`: 3 bytes a pixel, not the 36 of a float decode and its
    conversion), through `load_image` only for 32-bit and float files; the same pixels either way."""
    if isinstance(image, (str, Path)):
        from .data.images import load_image, picture_8bit
        pic = picture_8bit(image)
        a = np.asarray(pic) if pic is not None else load_image(image)
    else:
        a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H,W), (H,W,1), (H,W,3) or (H,W,4), got {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        out = a
    elif a.dtype == np.bool_:
        out = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        out = np.clip(a.astype(np.float64) / np.iinfo(a.dtype).max * 255 + 0.5, 0, 255).astype(np.uint8)
    else:
        out = np.clip(np.nan_to_num(a.astype(np.float64)) * 255 + 0.5, 0, 255).astype(np.uint8)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def _resize_float(a: np.ndarray, size_hw: tuple[int, int], resample) -> np.ndarray:
    h, w = size_hw
    if a.shape == (h, w):
        return a.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F").resize((w, h), resample),
                      np.float32)


def _outline(region: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``region`` that touch its outside (4-neighbourhood; the image border counts as
    outside), grown inwards/outwards to about ``thickness`` pixels."""
    p = np.pad(region, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = region & ~interior
    for _ in range(thickness - 1):
        q = np.pad(edge, 1, constant_values=False)
        edge = q[1:-1, 1:-1] | q[:-2, 1:-1] | q[2:, 1:-1] | q[1:-1, :-2] | q[1:-1, 2:]
    return edge


def map_range(maps, max_pixels: int = 1 << 22) -> list[float]:
    """[median pixel, 0.999-quantile pixel] over validation-normal maps: the overlays' colour scale.

    Exact up to ``max_pixels`` pixels in all; above that, every k-th pixel of each map (k the same for
    all maps), so a large validation set does not need a concatenated copy of all its maps."""
    total = sum(int(np.size(m)) for m in maps)
    k = max(1, -(-total // max_pixels))
    return robust_range(np.concatenate([np.asarray(m, np.float32).ravel()[::k] for m in maps]))


class MapRangeSample:
    """`map_range` over maps streamed in one at a time (``add``), holding only the pixels it uses.

    k comes from the first map's size times ``n_maps`` (the expected count), so for maps of one size
    the result equals `map_range` of the whole list."""

    def __init__(self, n_maps: int, max_pixels: int = 1 << 22):
        self.n_maps, self.max_pixels, self.k, self.parts = max(1, n_maps), max_pixels, None, []

    def add(self, m) -> None:
        a = np.asarray(m, np.float32).ravel()
        if self.k is None:
            self.k = max(1, -(-(self.n_maps * a.size) // self.max_pixels))
        self.parts.append(a[::self.k].copy())

    def result(self) -> list[float]:
        return robust_range(np.concatenate(self.parts))


def robust_range(flat: np.ndarray) -> list[float]:
    """[median, 0.999 quantile] of the finite values: the colour scale of a scorer's validation-normal pixels
    (WDM maps here, kNN patch scores in `scorers.reference`), and the unit of `scorers.range_units`."""
    flat = flat[np.isfinite(flat)]
    lo, hi = float(np.quantile(flat, 0.5)), float(np.quantile(flat, 0.999))
    return [lo, max(hi, lo + 1e-6)]


def calibrated_range(run_dir, pixel_map: str | None = None, cal: dict | None = None):
    """(vmin, vmax) from the run's calibration ``map_range`` (or ``cal``'s) when present and computed on
    the same kind of ``pixel_map``; else None."""
    path = Path(run_dir) / "calibration.json" if run_dir is not None else None
    if cal is None and path is not None and path.exists():
        from .io import read_json
        cal = read_json(path, f"re-create it: `uninet-feat calibrate --run {run_dir}`")
    c = cal
    r = c.get("map_range") if c else None
    if r and (pixel_map is None or c.get("map_range_pixel_map", "raw") == pixel_map):
        return float(r[0]), float(r[1])
    return None


def display_range(run_dir, maps=None, pixel_map: str | None = None, cal: dict | None = None
                  ) -> tuple[float, float]:
    """Colour scale for a run's overlays: `calibrated_range` when there is one, else from the median to the largest
    value of ``maps`` (predict and `Detector.overlay` pass one map: each image on its own scale, the same pixels
    from both). Why not from 0: a WDM map is 2.5-4 on normal pixels, so every pixel was near the top of the scale
    and every overlay looked hot (an audit, session 53). ``cal``: a calibration dict used instead of the run's
    ``calibration.json``."""
    r = calibrated_range(run_dir, pixel_map, cal)
    if r is not None:
        return r
    vals = [np.asarray(m, dtype=np.float64).ravel() for m in maps] if maps else []
    vals = np.concatenate(vals) if vals else np.zeros(1)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = float(np.median(vals)), float(vals.max())
    return lo, max(hi, lo + 1e-6)


def _drop_unit_axes(a: np.ndarray) -> np.ndarray:
    """``a`` with size-1 axes dropped from the front, then the back, while it has more than 2: (1, 1, H, W) and
    (H, W, 1) are (H, W). Why not np.squeeze: it also dropped a size-1 height or width, so the (1, 1, 300) map of a
    1×300 image became (300,) and was refused."""
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def heatmap_overlay(image_path_or_array, anomaly_map, out_path=None, vmin: float | None = None,
                    vmax: float | None = None, alpha: float = 0.5, mask=None, threshold: float | None = None,
                    max_width: int | None = None, cmap: str = "inferno",
                    mask_color=MASK_COLOR, contour_color=CONTOUR_COLOR,
                    clear_below: float | None = CLEAR_BELOW) -> np.ndarray:
    """Colour ``anomaly_map`` and lay it over the image, more opaque where the map is higher; returns uint8 (H, W, 3).

    - ``anomaly_map`` (h, w) at any resolution (e.g. the evaluated 256×256, or a stitched full-size
      map) is resized bilinearly to the output size.
    - ``vmin``/``vmax``: the colour scale; fix them across a data set (see the module docstring).
    - ``alpha``: weight of the colour at the top of the scale (0 = image only, 1 = colour only).
    - ``clear_below``: the fraction of the scale below which the image is left untouched; above it the
      colour's weight rises smoothly to ``alpha`` (`heat_weight`), in `heat_colours`. None: ``alpha`` over
      every pixel in the whole colormap, the look before session 28 (which darkened the whole image).
    - ``mask``: ground-truth defect mask (bool array of any size, or a mask file path); its outline is
      drawn in ``mask_color``. Thin defects survive downscaling (any coverage counts).
    - ``threshold``: if given, the outline of ``map > threshold`` (a defect mask's rule) in ``contour_color``.
    - ``max_width``: downscale so the width is at most this, keeping the aspect ratio (wide strips).
    - ``out_path``: if given, the PNG is written atomically.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if vmin is not None and vmax is not None and float(vmax) < float(vmin):   # drew nothing: every pixel below vmin
        raise ValueError(f"vmax ({vmax}) is below vmin ({vmin}): the colour scale runs from vmin up to vmax")
    img = _as_rgb_uint8(image_path_or_array)
    amap = _drop_unit_axes(np.asarray(anomaly_map, dtype=np.float32))
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (h, w), got shape {np.shape(anomaly_map)}")
    H, W = img.shape[:2]
    if max_width is not None and W > max_width:
        oh, ow = max(1, round(H * max_width / W)), int(max_width)
        img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.Resampling.BOX))
        H, W = oh, ow
    finite = amap[np.isfinite(amap)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    amap = np.nan_to_num(amap, nan=lo, posinf=hi, neginf=lo)
    m = _resize_float(amap, (H, W), Image.Resampling.BILINEAR)
    span = hi - lo
    out = np.empty_like(img)
    rows = max(1, BLEND_PIXELS // W)   # the blend's float arrays (~40 B/px) for a strip of rows at a time
    for y in range(0, H, rows):
        ms = m[y:y + rows]
        t = (ms - lo) / span if span > 0 else np.zeros_like(ms)
        # the flat blend (clear_below=None) keeps its whole colormap, as drawn before session 28
        colour = (heat_colours(t, cmap) if clear_below is not None else apply_colormap(ms, lo, hi, cmap)
                  ).astype(np.float32)
        w = heat_weight(t, alpha, clear_below)[..., None]
        out[y:y + rows] = np.clip((1.0 - w) * img[y:y + rows].astype(np.float32) + w * colour + 0.5, 0, 255)
    thickness = int(np.clip(round(math.sqrt(H * W) / 150), 1, 4))  # wide strips get a visible line
    if threshold is not None:
        out[_outline(m > threshold, thickness)] = contour_color
    if mask is not None:
        if isinstance(mask, (str, Path)):
            from .data.images import load_mask
            mask = load_mask(mask)
        mk = _drop_unit_axes(np.asarray(mask))
        if mk.ndim != 2:
            raise ValueError(f"mask must be 2-D (h, w), got shape {np.shape(mask)}")
        mk = _resize_float(mk.astype(np.float32) > 0, (H, W), Image.Resampling.BOX) > 0 \
            if mk.shape != (H, W) else mk > 0
        out[_outline(mk, thickness)] = mask_color
    if out_path is not None:
        buf = io.BytesIO()
        # zlib level 1: the same pixels (PNG is lossless) in about a fifth of the encode time of PIL's default 6,
        # files about 10 % larger (magnetic-tile overlays: 6 against 28 ms, 108 against 97 KiB)
        Image.fromarray(out).save(buf, format="PNG", compress_level=PNG_LEVEL)
        atomic_write_bytes(out_path, buf.getvalue())
    return out
