"""Procedural woven fabric with realistic defects: the built-in data set for the demo and for fast tests.

Why a yarn-level model and not noise textures: an anomaly detector trained on fabric must learn the regular
interlacing of warp (vertical) and weft (horizontal) threads, so the images render every thread with its own
width/brightness jitter, which yarn is on top at each crossing (the weave matrix), cylinder shading across a
yarn, the dip where it bends under, twist striations and hairiness, then a slight rotation/skew, a lighting
gradient, optical blur and sensor noise. Defects are image-space edits sized from the thread pitch estimated
from the image itself, so ``add_defect`` works on any image (also real ones) and each returns its region's mask:
nothing outside it changes, and a few pixels inside it may keep their value (a flat or dark image can keep all).
Only numpy/scipy/PIL; a 256x256 image renders in a few milliseconds (vectorised, no per-pixel loops).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..errors import BadInputError
from ..io import atomic_write

WEAVES = ("plain", "twill", "patterned")
DEFECTS = ("hole", "broken_yarn", "slub", "knot", "stain", "missing_pick", "oil_line")


def weave_matrix(weave: str, rng: np.random.Generator) -> np.ndarray:
    """Bool (ny, nx) repeat: True where the warp lies on top. Twill/patterned variants are drawn from ``rng``."""
    if weave == "plain":
        return np.array([[True, False], [False, True]])
    if weave == "twill":  # 2/1, 3/1 or 2/2, S or Z diagonal
        over, n = [(2, 3), (3, 4), (2, 4)][rng.integers(3)]
        j, i = np.mgrid[:n, :n]
        return ((i + rng.choice([-1, 1]) * j) % n) < over
    if weave == "patterned":  # dobby-like repeats: diamond, herringbone, or a damask check of satin blocks
        kind, k = rng.integers(3), int(rng.choice([4, 6, 8]))
        j, i = np.mgrid[:2 * k, :2 * k]
        if kind == 0:
            return ((np.abs(i - k) + np.abs(j - k)) % 4) < 2
        if kind == 1:
            return ((np.where((i // k) % 2 == 0, i, -i) + j) % 4) < 2
        j, i = np.mgrid[:10, :10]
        sat = (i + 2 * j) % 5 == 0  # 5-end weft-faced satin; its inverse is warp-faced
        return sat ^ (((i // 5) + (j // 5)) % 2 == 0)
    raise BadInputError(f"unknown weave {weave!r}", fix=f"use one of {WEAVES}")


def fabric_params(weave: str, rng: np.random.Generator, size=256, color: bool = False) -> dict:
    """The structure of one production line: weave repeat, pitch, cover, yarn colours, exposure.

    Images of one category share these (drawn once per weave); phase, jitter and lighting vary per image.
    """
    s = min(_hw(size))
    pitch = max(4.0, s / rng.uniform(20, 30))
    c = 3 if color else 1
    base = rng.uniform(0.25, 0.75, c) if color else np.array([rng.uniform(0.55, 0.8)])
    # Warp and weft yarns usually differ (count, twist, sizing): this is what makes the interlacing visible.
    weft = base * (1 + rng.choice([-1, 1]) * rng.uniform(0.12, 0.3)) * rng.uniform(0.92, 1.08, c)
    warp_pal, weft_pal = base[None], np.clip(weft, 0.05, 1)[None]
    warp_seq = weft_seq = np.zeros(1, int)
    if weave == "patterned":  # striped/checked colour sequence (mild in grey, like dyed yarn contrast)
        other = rng.uniform(0.2, 0.9, c) if color else base * rng.choice([0.6, 1.3])
        warp_pal = weft_pal = np.stack([base, np.clip(other, 0, 1)])
        a, b = rng.integers(3, 9, 2)
        warp_seq = weft_seq = np.r_[np.zeros(a, int), np.ones(b, int)]
    return dict(matrix=weave_matrix(weave, rng),
                pitch=(pitch * rng.uniform(0.85, 1.15), pitch * rng.uniform(0.85, 1.15)),
                cover=tuple(rng.uniform(0.75, 0.95, 2)), warp_palette=warp_pal, weft_palette=weft_pal,
                warp_seq=warp_seq, weft_seq=weft_seq, background=rng.uniform(0.03, 0.1),
                gain=rng.uniform(0.55, 0.95), jitter=rng.uniform(0.03, 0.07), twist=rng.uniform(0.03, 0.08),
                hair=rng.uniform(0.05, 0.12), dip=rng.uniform(0.3, 0.5),
                rotation=0.4, noise=0.012)  # rotation: max degrees; noise: sensor sigma in [0,1] units


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def _threads(coord, pitch, cover, jitter, rng):
    """Per pixel: thread index, position across the thread in [0,1), that thread's cover (yarn width/pitch)."""
    lo, hi = float(coord.min()) - 2 * pitch, float(coord.max()) + 2 * pitch
    n = int((hi - lo) / (0.6 * pitch)) + 4
    steps = pitch * np.clip(1 + jitter * rng.standard_normal(n), 0.6, 1.4)
    edges = (lo - rng.uniform(0, pitch) + np.r_[0, np.cumsum(steps)]).astype(np.float32)
    idx = np.searchsorted(edges, coord, side="right") - 1
    covers = np.clip(cover * (1 + jitter * rng.standard_normal(n)), 0.5, 0.98).astype(np.float32)
    return idx, (coord - edges[idx]) / steps.astype(np.float32)[idx], covers[idx]


def _streaks(shape, sigma, rng):
    """Unit-variance noise smoothed anisotropically (e.g. hairiness along a yarn)."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-8)


def render_fabric(size=(256, 256), weave: str = "plain", rng: np.random.Generator | None = None,
                  color: bool = False, **params) -> np.ndarray:
    """A woven fabric image, uint8 (H,W) or (H,W,3). ``params`` override ``fabric_params`` (pass one
    category's params to every image of that category, so only phase, jitter and lighting vary)."""
    rng = np.random.default_rng(rng)
    h, w = _hw(size)
    p = fabric_params(weave, rng, (h, w), color)
    p.update(params)
    py, px = (p["pitch"], p["pitch"]) if np.isscalar(p["pitch"]) else p["pitch"]
    m = np.asarray(p["matrix"], bool)
    ny, nx = m.shape
    th = np.deg2rad(rng.uniform(-1, 1) * p["rotation"])
    y = (np.arange(h, dtype=np.float32) - h / 2)[:, None]
    x = (np.arange(w, dtype=np.float32) - w / 2)[None]
    u = x * np.float32(np.cos(th)) + y * np.float32(np.sin(th) + rng.uniform(-0.004, 0.004))  # + skew
    v = y * np.float32(np.cos(th)) - x * np.float32(np.sin(th))
    for c, other, n in ((u, y, h), (v, x, w)):  # threads are not perfectly straight: gentle waviness
        wave = np.sin(other * np.float32(2 * np.pi / rng.uniform(0.3, 1) / n) + np.float32(rng.uniform(0, 7)))
        c += np.float32(rng.uniform(0.2, 0.6)) * wave
    iu, tu, cu = _threads(u, px, p["cover"][0], p["jitter"], rng)
    jv, tv, cv = _threads(v, py, p["cover"][1], p["jitter"], rng)
    si, sj = rng.integers(nx), rng.integers(ny)
    # One small table per weave cell: warp on top, and whether the top yarn goes under at its previous /
    # next cell along its length (there it dips). Looked up once per pixel through the thread indices.
    cell = ((np.arange(jv.max() + 1) + sj) % ny * nx)[jv] + ((np.arange(iu.max() + 1) + si) % nx)[iu]
    mp, mn = np.roll(m, 1, 0), np.roll(m, -1, 0)
    code = (m | (np.where(m, ~mp, np.roll(m, 1, 1)) << 1) | (np.where(m, ~mn, np.roll(m, -1, 1)) << 2)).astype(np.uint8)
    code = code.ravel()[cell]
    up, under_prev, under_next = (code & 1) > 0, (code & 2) > 0, (code & 4) > 0
    t_across, t_along, cov = np.where(up, tu, tv), np.where(up, tv, tu), np.where(up, cu, cv)
    d = np.float32(p["dip"])
    along = 1 - d * under_prev * np.clip(1 - t_along / 0.35, 0, 1) ** 2 \
        - d * under_next * np.clip(1 - (1 - t_along) / 0.35, 0, 1) ** 2
    cross = np.sqrt(np.clip(1 - ((t_across - 0.5) / (cov / 2)) ** 2, 0, 1))  # cylinder across the yarn
    pos = np.where(up, v / np.float32(py), u / np.float32(px))  # along the yarn, in pitches
    twist = np.sin(np.float32(2 * np.pi) * (pos / np.float32(0.45) + 1.2 * t_across))
    # Fibre streaks: 4 lanes per yarn, smooth along it (a small table, looked up per pixel).
    n_lane = 4 * (max(iu.max(), jv.max()) + 2)
    lanes = ndi.gaussian_filter1d(rng.standard_normal((2, n_lane, int(max(h, w) / min(px, py) * 4) + 8)), 1.5, axis=-1)
    lanes = (lanes / lanes.std()).astype(np.float32)
    idx = np.where(up, iu, jv) * 4 + np.minimum(t_across * 4, 3).astype(np.int64)
    hair = lanes[up.astype(np.int64), idx, ((pos - pos.min()) * 4).astype(np.int64)]
    # Per-thread colour (stripe sequence) times a per-thread brightness jitter (yarn lots differ).
    tabs = []
    for n, shift, pal, seq in ((iu.max() + 1, si, p["warp_palette"], p["warp_seq"]),
                               (jv.max() + 1, sj, p["weft_palette"], p["weft_seq"])):
        seq = np.asarray(seq)
        tab = np.asarray(pal, np.float32)[seq[(np.arange(n) + shift) % len(seq)]]
        tabs.append(tab * (1 + 0.6 * p["jitter"] * rng.standard_normal((n, 1))).astype(np.float32))
    float_jit = 1 + 0.05 * rng.standard_normal((iu.max() + 1, jv.max() + 1)).astype(np.float32)  # each float differs
    top = cross ** 0.7 * along * (1 + p["twist"] * twist + p["hair"] * hair) * float_jit[iu, jv]
    # Where the top yarn leaves a gap, the bottom yarn shows in shadow; between both, the dark background.
    bot_cross = np.sqrt(np.clip(1 - ((np.where(up, tv, tu) - 0.5) / (np.where(up, cv, cu) / 2)) ** 2, 0, 1))
    bot_cross[cross > 0] = 0
    bot = 0.5 * bot_cross ** 0.7
    on_warp, on_weft = np.where(up, top, bot), np.where(up, bot, top)  # weights of the two yarn colours
    bg = np.float32(p["background"]) * ((cross == 0) & (bot_cross == 0))
    img = on_warp[..., None] * tabs[0][iu] + on_weft[..., None] * tabs[1][jv] + bg[..., None]
    ramp = rng.uniform(-0.15, 0.15) * x / w + rng.uniform(-0.15, 0.15) * y / h
    f = rng.uniform(1, 4, (2, 2)) * 2 * np.pi
    blotch = np.cos(f[0, 0] * y / h + rng.uniform(0, 7)) * np.cos(f[0, 1] * x / w + rng.uniform(0, 7))
    light = (1 + ramp + rng.uniform(0.01, 0.04) * blotch) * np.float32(p["gain"])  # uneven illumination
    img = img * light[..., None]
    for axis in (0, 1):  # optics: a 3-tap blur (sigma ~0.7 px)
        img = ndi.correlate1d(img, np.array([0.25, 0.5, 0.25], np.float32), axis=axis, mode="nearest")
    img += np.float32(p["noise"]) * rng.standard_normal((h, w, 1), dtype=np.float32)  # sensor (luminance) noise
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out if color else out[..., 0]


# ----------------------------------------------------------------------------------------------- defects
def _pitch(g: np.ndarray, axis: int) -> float:
    """Thread pitch along ``axis`` (0: rows = weft pitch) from the spectrum of the high-passed mean profile."""
    prof = g.mean(axis=1 - axis)
    prof = prof - ndi.gaussian_filter1d(prof, 12)
    spec = np.abs(np.fft.rfft(prof * np.hanning(len(prof))))
    per = len(prof) / np.maximum(np.arange(len(spec)), 1e-9)
    spec[(per < 3) | (per > min(32, len(prof) / 10))] = 0  # longer periods are colour stripes, not yarns
    return float(per[spec.argmax()]) if spec.any() else 8.0


def _snap(g, pos, lo, hi, pitch):
    """Centre (column) of the bright thread nearest ``pos``, from the column profile over rows lo:hi."""
    a, b = max(0, int(pos - pitch)), min(g.shape[1], int(pos + pitch) + 1)
    rows = g[lo:hi] if hi > lo else g   # an image 1-2 px tall leaves no rows between lo and hi: the whole column
    prof = ndi.gaussian_filter1d(rows[:, a:b].mean(0), max(pitch / 5, 0.5))
    near = np.abs(np.arange(a, b) - pos) <= pitch / 2
    return float(a + np.argmax(np.where(near, prof, -np.inf)))


def _curve_dist(shape, y0, x0, ang, length, reach, rng):
    """Distance of each pixel to a wandering strand that starts at (y0, x0) heading ``ang`` (inf beyond reach)."""
    n = max(8, int(length))
    a = ang + np.cumsum(rng.normal(0, 0.12, n)) + rng.uniform(-0.05, 0.05) * np.arange(n)
    py, px = y0 + np.cumsum(np.sin(a)) * length / n, x0 + np.cumsum(np.cos(a)) * length / n
    dist = np.full(shape, np.inf)
    r = int(reach) + 2
    y_lo, y_hi = max(0, int(min(py.min(), y0)) - r), min(shape[0], int(max(py.max(), y0)) + r + 1)
    x_lo, x_hi = max(0, int(min(px.min(), x0)) - r), min(shape[1], int(max(px.max(), x0)) + r + 1)
    if y_hi <= y_lo or x_hi <= x_lo:   # the strand wandered off a small image: no pixel is near it
        return dist
    yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
    dist[y_lo:y_hi, x_lo:x_hi] = np.sqrt((yy[..., None] - py) ** 2 + (xx[..., None] - px) ** 2).min(-1)
    return dist


def _defect(f, kind, rng):
    """The edit in float [0,1] (H,W,C) on a frame whose vertical axis runs along the chosen thread."""
    h, w, _ = f.shape
    g = f.mean(-1)
    py, px = _pitch(g, 0), _pitch(g, 1)
    p = (py + px) / 2
    y, x = np.mgrid[:h, :w].astype(np.float64)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    bright = np.percentile(f.reshape(-1, f.shape[-1]), 90, axis=0)  # the colour of a lit yarn
    if kind == "hole":  # cut yarn ends stick into it: warp ends at top/bottom, weft ends at the sides
        ry = min(p * rng.uniform(1.2, 2.8), 0.12 * min(h, w))
        rx = min(ry * rng.uniform(0.7, 1.4), 0.15 * min(h, w))
        dy, dx = (y - cy) / ry, (x - cx) / rx
        r0 = np.hypot(dy, dx) + 1e-6
        r_out = r0 + 0.1 * _streaks((h, w), p, rng)  # irregular outline of the damaged area

        def ends(coord, pitch):  # per thread a random end length, rounded like a yarn tip
            t = coord / pitch + rng.uniform(0, 1)
            k = np.floor(t).astype(int)
            tip = np.sqrt(np.clip(1 - (2 * (t - k) - 1) ** 2 / 0.7, 0, 1))
            return rng.uniform(0, 1, k.max() - k.min() + 1)[k - k.min()] * (0.4 + 0.6 * tip)
        r = r_out + 0.7 * p / min(ry, rx) * ((dy / r0) ** 2 * ends(x[:1], px) + (dx / r0) ** 2 * ends(y[:, :1], py))
        hole, mask = r < 1, r_out < 1
        dark = rng.uniform(0.02, 0.08) * (1 + 0.3 * rng.standard_normal((h, w)))[..., None]
        out = np.where(hole[..., None], dark, np.where(mask[..., None], f * 0.85, f))  # loosened yarn ends
        return out, mask
    if kind == "missing_pick":  # a weft row missing: bare warp shows as a line of vertical stripes
        yc = _snap(g.T, rng.uniform(0.15, 0.85) * h, 0, w, py)  # a weft centre row
        mask = np.broadcast_to((np.abs(y - yc) < py * rng.uniform(0.45, 0.6)), (h, w)).copy()
        warp = ndi.gaussian_filter1d(f, py, axis=0)
        mean = warp.mean(axis=1, keepdims=True)
        bare = np.clip(mean + 1.8 * (warp - mean), 0, 1) * rng.choice([rng.uniform(0.55, 0.75), 1.3])
        return np.where(mask[..., None], bare, f), mask
    if kind == "stain":
        rr = min(h, w) * rng.uniform(0.06, 0.14)
        r = np.hypot((y - cy) / rr, (x - cx) / (rr * rng.uniform(0.6, 1.6))) + 0.18 * _streaks((h, w), rr / 2, rng)
        alpha = np.clip((1.15 - r) / 0.5, 0, 1) ** 1.5 * rng.uniform(0.3, 0.55)
        if f.shape[-1] == 3:
            out = f * (1 - alpha[..., None] * np.array([0.5, 0.8, 1.0]))
        elif rng.random() < 0.7:
            out = f * (1 - alpha[..., None])
        else:
            out = f + alpha[..., None] * (1 - f) * 0.8
        return out, alpha > 0.05  # visible threshold: >5 % change of the local brightness
    # Thread-aligned kinds: work in a frame where the thread is vertical (transpose for a weft thread).
    weft = rng.random() < 0.5
    if weft:
        f, g, y, x, (h, w), (py, px), (cy, cx) = (f.transpose(1, 0, 2), g.T, x.T, y.T, (w, h),
                                                  (px, py), (cx, cy))
    out, mask = f.copy(), None
    if kind == "broken_yarn":
        length = min(py * rng.uniform(2, 5), h)   # a gap longer than a small image started above it (crashed)
        y0 = float(np.clip(cy - length / 2, 0, h - length))
        xc = _snap(g, cx, int(y0), int(y0 + length) + 1, px)
        gap = (np.abs(x - xc) < px * 0.45) & (y >= y0) & (y <= y0 + length)
        under = ndi.gaussian_filter1d(f, px * 1.5, axis=1)  # crossing yarns only: horizontal weft stripes
        mean = under.mean(axis=0, keepdims=True)
        under = np.clip(mean + 1.8 * (under - mean), 0, 1) * rng.uniform(0.45, 0.7)
        out = np.where(gap[..., None], under, f)
        end = y0 + (length if rng.random() < 0.5 else 0)
        ang = (-np.pi / 2 if end > y0 else np.pi / 2) + rng.choice([-1, 1]) * rng.uniform(0.3, 1.2)
        dist = _curve_dist((h, w), end, xc, ang, py * rng.uniform(2, 4.5), px * 0.3, rng)
        strand = dist < px * 0.3
        shade = np.sqrt(np.clip(1 - (dist / (px * 0.3)) ** 2, 0, 1))[..., None]
        out = np.where(strand[..., None], bright * (0.5 + 0.6 * shade), out)
        mask = gap | strand
    elif kind in ("slub", "knot"):
        xc = _snap(g, cx, max(0, int(cy - 2 * py)), int(cy + 2 * py) + 1, px)
        if kind == "slub":
            a, b = py * rng.uniform(1.5, 4), px * rng.uniform(0.7, 1.1)
        else:
            a = p * rng.uniform(0.8, 1.5)
            b = a * rng.uniform(0.75, 1.0)
        across = (x - xc) / b * (1 + 0.15 * np.sin((y - cy) / py * 3))
        r = np.hypot((y - cy) / a, across)
        mask = r < 1
        alpha = (np.clip((1 - r) * 4 + 0.15, 0, 1) * mask)[..., None]
        tone = bright * (rng.uniform(1.1, 1.35) if rng.random() < 0.7 else rng.uniform(0.35, 0.6))
        if kind == "slub":
            tex = 0.12 * np.sin(2 * np.pi * ((y - cy) / (0.5 * py) + across)) + 0.1 * _streaks((h, w), (2.5, 0.5), rng)
            shade = np.sqrt(np.clip(1 - across ** 2, 0, 1)) * (1 + tex)  # a thick yarn: twist and fibres
        else:
            shade = np.sqrt(np.clip(1 - r ** 2, 0, 1)) + 0.3 * ((x - xc) / b + (y - cy) / a)
            shadow = (np.hypot((y - cy - 0.3 * a) / (1.15 * a), (x - xc - 0.3 * b) / (1.15 * b)) < 1) & ~mask
            out = np.where(shadow[..., None], f * 0.6, out)
            mask = mask | shadow
        out = out * (1 - alpha) + alpha * tone * np.clip(0.3 + 0.7 * shade, 0, 1.4)[..., None]
    elif kind == "oil_line":  # machine oil soaked along one warp (or weft) yarn: long, dark, soft-edged
        y0, y1 = sorted(rng.uniform(-0.3, 1.3, 2) * h)
        y0 = min(max(0.0, y0), 0.65 * h)
        y1 = min(float(h), max(y1, y0 + 0.35 * h))
        xc = _snap(g, cx, int(y0), int(y1), px) + rng.uniform(0.5, 2) * np.sin(2 * np.pi * y / rng.uniform(80, 300))
        taper = np.clip(np.minimum(y - y0, y1 - y) / 6, 0, 1)
        alpha = np.exp(-((x - xc) / (px * rng.uniform(0.35, 0.7))) ** 4) * taper * rng.uniform(0.35, 0.6)
        out = f * (1 - alpha[..., None] * np.array([0.85, 0.92, 1.0])[: f.shape[-1]])
        mask = alpha > 0.05
    else:
        raise BadInputError(f"unknown defect {kind!r}", fix=f"use one of {DEFECTS}")
    return (out.transpose(1, 0, 2), mask.T) if weft else (out, mask)


def add_defect(img: np.ndarray, kind: str, rng: np.random.Generator | None = None):
    """(defective uint8 image, bool mask of the defect's region: every changed pixel lies in it, a few inside it may
    keep their value); ``img`` is (H,W) or (H,W,3) uint8."""
    rng = np.random.default_rng(rng)
    f = np.asarray(img, np.float64)[..., None] if img.ndim == 2 else np.asarray(img, np.float64)
    out, mask = _defect(f / 255.0, kind, rng)
    out = np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
    mask = np.asarray(mask, bool)
    out = np.where(mask[..., None], out, f.astype(np.uint8))  # nothing outside the mask changes
    return (out[..., 0] if img.ndim == 2 else out), mask


# ----------------------------------------------------------------------------------------------- data set
def _write_atomic(path: Path, data: bytes) -> None:
    """A crash never leaves a half-written PNG or CSV; the file gets the mode open() would give it."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_fabric_dataset(root, n_train: int = 40, n_test_good: int = 10, n_test_defect: int = 20, size=256,
                        weaves=WEAVES, seed: int = 0, layout: str = "mvtec", color: bool = False,
                        defects=DEFECTS) -> dict:
    """Write an MVTec-layout data set (one category per weave) plus ``manifest.csv``; same bytes per seed.

    ``n_test_defect`` images per weave cycle through ``defects``. Files already under ``root`` that this call
    does not write are left alone (the manifest lists only this call's files). Returns a summary dict.
    """
    if layout != "mvtec":
        raise BadInputError(f"unknown layout {layout!r}", fix="use layout='mvtec'")
    bad = [w for w in weaves if w not in WEAVES] + [d for d in defects if d not in DEFECTS]
    if bad or not weaves or not defects:
        raise BadInputError(f"unknown or no weaves/defects: {bad}", fix=f"weaves from {WEAVES}, defects from {DEFECTS}")
    if min(_hw(size)) < 16:   # 0 was a ZeroDivisionError; below 16 px some defects changed no pixel at all
        raise BadInputError(f"image size {size} is too small for woven fabric and its defects", fix="--size 16 or more")
    root = Path(root)
    rows, summary = [], {"root": str(root), "seed": seed, "size": size, "categories": {}}
    for wi, weave in enumerate(weaves):
        params = fabric_params(weave, np.random.default_rng([seed, wi, 0]), size, color)
        counts = {"train": n_train, "test_good": n_test_good}
        for split, n, code in (("train", n_train, 1), ("test", n_test_good, 2), ("test", n_test_defect, 3)):
            for k in range(n):
                rng = np.random.default_rng([seed, wi, code, k])
                img = render_fabric(size, weave, rng, color, **params)
                label, mask_rel = "good", ""
                if code == 3:
                    label = defects[k % len(defects)]
                    clean = img
                    for _ in range(8):   # an edit that changed no pixel would be a defect label on a clean image
                        img, mask = add_defect(clean, label, rng)
                        if (img != clean).any():
                            break
                    else:
                        raise BadInputError(f"{weave}: a {label} edit changed no pixel of image {k} in 8 draws",
                                            fix="a larger --size, or another --seed")
                    mask_rel = f"{weave}/ground_truth/{label}/{k:03d}_mask.png"
                    _write_atomic(root / mask_rel, _png(mask.astype(np.uint8) * 255))
                    counts[label] = counts.get(label, 0) + 1
                rel = f"{weave}/{split}/{label}/{k:03d}.png"
                _write_atomic(root / rel, _png(img))
                rows.append((rel, split, label, mask_rel, weave))
        summary["categories"][weave] = counts
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\r\n")   # as every CSV the commands write (docs/usage.md)
    wr.writerow(["path", "split", "label", "mask", "group"])
    wr.writerows(rows)
    _write_atomic(root / "manifest.csv", buf.getvalue().encode())
    summary.update(n_images=len(rows), manifest=str(root / "manifest.csv"))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uninet_feat.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (MVTec layout + manifest.csv)")
    for name, default, what in (("--n-train", 40, "training normals per weave"),
                                ("--n-test-good", 10, "normal test images per weave"),
                                ("--n-test-defect", 20, "defective test images per weave, cycling through the defects"),
                                ("--size", 256, "side of each square image in pixels")):
        ap.add_argument(name, type=int, default=default, help=f"{what} (default {default})")
    ap.add_argument("--weaves", default=",".join(WEAVES),
                    help=f"comma-separated subset of {','.join(WEAVES)} (default all: the counts are per weave)")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    ap.add_argument("--color", action="store_true", help="colour images (default grey)")
    a = ap.parse_args(argv)
    try:
        s = make_fabric_dataset(a.out, a.n_train, a.n_test_good, a.n_test_defect, a.size,
                                tuple(w for w in a.weaves.split(",") if w), a.seed, color=a.color)
    except BadInputError as e:   # one line, as uninet-feat says it (a traceback before)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
