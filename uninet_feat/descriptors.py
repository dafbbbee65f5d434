"""Defect descriptors: what the anomaly map says about the defect itself, for defect-type heads.

Why: the pooled image vector describes a whole tile, in which a defect is a few per cent of the pixels;
a defect-type head then learns the tile's look more than the defect's. Fabric defect types differ in
shape and place (a broken end runs along the warp, a broken pick across it, a cut selvage sits at the
strip's edge, a nep is a small blob), and the map already outlines the defect. So each tile adds:

* **map-attended features** per level: the target teacher's features pooled with weights equal to that
  level's anomaly map in excess of its median (`map_pool`): what the most anomalous spot looks like;
* **spot differences** per level (feature schema 3): those less the plain mean of the same features over the
  tile, i.e. how the spot differs from the rest of its own image. Lighting or a capture session moves both
  alike, so the difference keeps the defect and drops much of the image (`uninet-feat cluster` groups by it);
* **the hot region's shape** (`hot_region_shape`) on the pixel map: the pixels at or above
  ``median + 0.5 · (max − median)``, weighted by their excess over the median: area fraction, weighted
  centroid (y, x) and bounding-box height and width (tile fractions), elongation ``1 − λ_min / λ_max`` of
  the weighted second moments, and the orientation as (cos 2φ, sin 2φ) (φ from the x axis, so a
  horizontal streak gives cos 2φ = 1 and a vertical one −1);
* **the spot's place in the image** (`image_place`): the centroid in whole-image fractions, from the
  tile's box (tiled strips: where along the strip; an untiled image: the tile centroid itself).

The half-way level is relative to each tile's own map, so the shape is scale-free (raw or range-unit maps
alike); a flat map gives the whole tile as its region, not a NaN, and a map whose maximum is also its median
(a plateau at the top over half the tile or more) gives that plateau, weighted evenly. "Median" is torch's: the
lower of the two middle values of an even count.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHAPE_NAMES = ("hot_area", "hot_cy", "hot_cx", "hot_bbox_h", "hot_bbox_w", "hot_elongation",
               "hot_cos2phi", "hot_sin2phi")
PLACE_NAMES = ("spot_y_image", "spot_x_image")


def _excess(m: torch.Tensor) -> torch.Tensor:
    """(N,H,W) → map less its per-map median, clipped at 0."""
    med = m.flatten(1).median(1).values.view(-1, 1, 1)
    return (m - med).clamp(min=0)


def map_pool(x: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w) features pooled with weights ∝ the map's excess over its median ((N,H,W), resized to h×w);
    uniform weights where the map is flat."""
    a = F.interpolate(amap.float()[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    w = _excess(a).flatten(1)
    s = w.sum(1, keepdim=True)
    w = torch.where(s > 0, w / s.clamp(min=1e-12), torch.full_like(w, 1.0 / w.shape[1]))
    return (x.float().flatten(2) * w[:, None]).sum(-1)


def hot_region_shape(pix: torch.Tensor) -> torch.Tensor:
    """(N,H,W) pixel maps → (N, 8) float32 descriptors, in the order of ``SHAPE_NAMES``. Computed in float64:
    the orientation of a nearly round region rests on small differences of second moments."""
    m = pix.double()
    n, h, w = m.shape
    flat = m.flatten(1)
    med = flat.median(1).values.view(-1, 1, 1)
    mx = flat.amax(1).view(-1, 1, 1)
    region = m >= med + 0.5 * (mx - med)
    wt = (m - med).clamp(min=0) * region
    # max == median with the map not flat (a plateau at the top over half the tile): no pixel exceeds the median,
    # so the region (the plateau) is weighted evenly; it was taken for a flat map, the whole tile
    even = wt.flatten(1).sum(1).view(-1, 1, 1) <= 0
    flat_map = mx <= flat.amin(1).view(-1, 1, 1)   # max == min: the whole tile, evenly
    wt = torch.where(even, region.to(wt.dtype), wt)
    wt = torch.where(flat_map, torch.ones_like(wt), wt)
    region = region | flat_map
    wt = wt / wt.flatten(1).sum(1).view(-1, 1, 1)
    ys = (torch.arange(h, dtype=m.dtype, device=m.device) + 0.5) / h
    xs = (torch.arange(w, dtype=m.dtype, device=m.device) + 0.5) / w
    cy = (wt.sum(2) * ys).sum(1)
    cx = (wt.sum(1) * xs).sum(1)
    dy, dx = ys.view(1, -1, 1) - cy.view(-1, 1, 1), xs.view(1, 1, -1) - cx.view(-1, 1, 1)
    syy, sxx, sxy = ((wt * a * b).flatten(1).sum(1) for a, b in ((dy, dy), (dx, dx), (dy, dx)))
    tr, det = syy + sxx, syy * sxx - sxy * sxy
    disc = ((tr * tr / 4 - det).clamp(min=0)).sqrt()
    lmax, lmin = tr / 2 + disc, (tr / 2 - disc).clamp(min=0)
    elong = torch.where(lmax > 0, 1 - lmin / lmax.clamp(min=1e-12), torch.zeros_like(lmax))
    phi = 0.5 * torch.atan2(2 * sxy, sxx - syy)
    rows, cols = region.any(2), region.any(1)
    bbox_h = (h - rows.float().argmax(1) - rows.flip(1).float().argmax(1)).float() / h
    bbox_w = (w - cols.float().argmax(1) - cols.flip(1).float().argmax(1)).float() / w
    area = region.flatten(1).float().mean(1)
    return torch.stack([area, cy, cx, bbox_h, bbox_w, elong, torch.cos(2 * phi), torch.sin(2 * phi)], 1).float()


def image_place(cy, cx, box, image_hw) -> tuple[float, float]:
    """Tile-relative centroid (cy, cx) of a tile at ``box`` = (y, x, h, w) → fractions of the image (H, W)."""
    y, x, th, tw = (float(v) for v in box)
    H, W = image_hw
    return min(1.0, (y + cy * th) / H), min(1.0, (x + cx * tw) / W)


def spot_summary(vector, names, tile_hw=None) -> dict:
    """A prediction row's description of its top tile's hot spot, from that tile's vector (``names``: its
    columns): place in the image (fractions), area (fraction of the tile), elongation, and angle in degrees
    (0 = horizontal, ±90 = vertical; positive = running down to the right, as image rows grow downwards).
    ``tile_hw``: the tile's size in image pixels (an untiled image's own): the vector's shape columns are measured
    on the model's square input, where a non-square tile is squashed, so its angle and elongation are those of the
    image only once the spot's second moments are stretched back to it."""
    v = dict(zip(names, (float(x) for x in vector)))
    phi = 0.5 * math.atan2(v["hot_sin2phi"], v["hot_cos2phi"])
    elong = v["hot_elongation"]
    if tile_hw is not None and tile_hw[0] != tile_hw[1]:
        # the moments up to scale (major axis 1, minor 1 - elongation, at phi), in pixels: x by W, y by H
        c, s, lo = math.cos(phi), math.sin(phi), 1.0 - elong
        h, w = (float(t) for t in tile_hw)
        sxx, syy, sxy = (c * c + lo * s * s) * w * w, (s * s + lo * c * c) * h * h, (1.0 - lo) * s * c * h * w
        phi = 0.5 * math.atan2(2 * sxy, sxx - syy)
        half, disc = (sxx + syy) / 2, math.sqrt(((sxx - syy) / 2) ** 2 + sxy * sxy)
        elong = 1 - max(half - disc, 0.0) / (half + disc) if half + disc > 0 else 0.0
    return {"spot_y": v["spot_y_image"], "spot_x": v["spot_x_image"], "spot_area": v["hot_area"],
            "spot_elongation": elong, "spot_angle_deg": round(math.degrees(phi), 1)}
