"""Triton kernels for the anomaly map + WDM (semantics and torch reference in ``wdm``).

1. ``_cos_max``: per level, 1 - cos over channels and the per-image map maximum in one pass over the features
   (channel loop in registers, block max via float atomic_max: max is order-free, so still deterministic).
   All K maps are written into one flat (N, sum h_k w_k) buffer, so step 2 reads them with one table.
2. ``_upsample_sum``: one pass over the (N, H, W) output; each pixel gathers its 4 bilinear neighbours
   (align_corners=True) from every map and sums them, so the K upsampled maps never exist in memory.
3. ``_blur_axis``: one separable pass of the scipy Gaussian (2r+1 taps) with the 'reflect' index folded in
   the kernel (period 2n, so it repeats for maps narrower than the radius); run along H, then along W.
The top-k mean stays torch sort + cumsum + gather (``wdm.topk_mean``). Block sizes are untuned (no GPU here).
Interpreter mode (TRITON_INTERPRET=1) is read when this module is imported, so it must be set before that.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .wdm import EPS, gaussian_radius, gaussian_taps

try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton without knobs
    import os
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _cos_max(T, S, OUT, MAX, C, P, t_sn, t_sc, t_sp, s_sn, s_sc, s_sp, o_sn, m_sn, eps,
             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = rp < P
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    tt = tl.zeros([BLOCK_P], dtype=tl.float32)
    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        m2 = (rc < C)[:, None] & mp[None, :]
        t = tl.load(T + n * t_sn + rc[:, None] * t_sc + rp[None, :] * t_sp, mask=m2, other=0.0).to(tl.float32)
        s = tl.load(S + n * s_sn + rc[:, None] * s_sc + rp[None, :] * s_sp, mask=m2, other=0.0).to(tl.float32)
        dot += tl.sum(t * s, axis=0)
        tt += tl.sum(t * t, axis=0)
        ss += tl.sum(s * s, axis=0)
    d = 1.0 - dot / (tl.maximum(tl.sqrt(tt), eps) * tl.maximum(tl.sqrt(ss), eps))
    tl.store(OUT + n * o_sn + rp, d, mask=mp)
    tl.atomic_max(MAX + n * m_sn, tl.max(tl.where(mp, d, float("-inf")), axis=0))


@triton.jit
def _upsample_sum(FLAT, IDX, SCALE, OUT, K, H, W, f_sn, o_sn, BLOCK: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < H * W
    y = r // W
    x = r % W
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = FLAT + n * f_sn
    for k in range(K):
        off = tl.load(IDX + 3 * k)
        h = tl.load(IDX + 3 * k + 1)
        w = tl.load(IDX + 3 * k + 2)
        sy = y.to(tl.float32) * tl.load(SCALE + 2 * k)
        sx = x.to(tl.float32) * tl.load(SCALE + 2 * k + 1)
        y0 = tl.minimum(sy.to(tl.int32), h - 1)  # sy >= 0, so truncation is floor
        x0 = tl.minimum(sx.to(tl.int32), w - 1)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        p = base + off
        v00 = tl.load(p + y0 * w + x0, mask=mask, other=0.0)
        v01 = tl.load(p + y0 * w + x1, mask=mask, other=0.0)
        v10 = tl.load(p + y1 * w + x0, mask=mask, other=0.0)
        v11 = tl.load(p + y1 * w + x1, mask=mask, other=0.0)
        acc += (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    tl.store(OUT + n * o_sn + r, acc, mask=mask)


@triton.jit
def _blur_axis(X, TAPS, OUT, H, W, x_sn, x_sh, x_sw, o_sn, R, AXIS: tl.constexpr, TAPS_N: tl.constexpr,
               BLOCK: tl.constexpr):
    """One separable pass: out[n, y, x] = sum_j taps[j] * x[n, reflect(y + j - R), x] (AXIS 0) or along x
    (AXIS 1). Pixels are numbered row-major in both passes, so neighbouring lanes touch neighbouring columns."""
    n = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < H * W
    y = e // W
    x = e % W
    if AXIS == 0:
        a = y
        L = H
    else:
        a = x
        L = W
    period = 2 * L
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(TAPS_N):
        i = a + (j - R)
        i = ((i % period) + period) % period  # non-negative whatever the sign convention of %
        i = tl.where(i >= L, period - 1 - i, i)
        if AXIS == 0:
            ptr = X + n * x_sn + i * x_sh + x * x_sw
        else:
            ptr = X + n * x_sn + y * x_sh + i * x_sw
        acc += tl.load(TAPS + j) * tl.load(ptr, mask=mask, other=0.0)
    tl.store(OUT + n * o_sn + e, acc, mask=mask)


def _ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError("triton WDM kernels got a CPU tensor but TRITON_INTERPRET=1 was not set before "
                           "uninet_feat.kernels.wdm_triton was imported; use backend='torch' on CPU")


def cos_maps(teacher_feats, student_feats, block_p: int = 128, block_c: int = 32):
    """(maps: K (N, h_k, w_k) views, maxima (N, K), flat (N, sum h_k w_k) buffer, sizes) for ``upsample_sum``."""
    t0 = teacher_feats[0]
    _check_device(t0)
    n, dev = t0.shape[0], t0.device
    sizes = [tuple(t.shape[-2:]) for t in teacher_feats]
    offs = [0]
    for h, w in sizes:
        offs.append(offs[-1] + h * w)
    flat = torch.empty(n, offs[-1], dtype=torch.float32, device=dev)
    maxima = torch.full((n, len(sizes)), float("-inf"), dtype=torch.float32, device=dev)
    with _ctx(t0):
        for k, (t, s) in enumerate(zip(teacher_feats, student_feats)):
            t, s = t.flatten(2), s.flatten(2)  # a view for NCHW and channels_last alike
            c, p = t.shape[1], t.shape[2]
            out = flat[:, offs[k]:offs[k + 1]]
            grid = (triton.cdiv(p, block_p), n)
            _cos_max[grid](t, s, out, maxima[:, k:], c, p, *t.stride(), *s.stride(), flat.stride(0),
                           maxima.stride(0), EPS, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    maps = [flat[:, offs[k]:offs[k + 1]].view(n, h, w) for k, (h, w) in enumerate(sizes)]
    return maps, maxima, flat, sizes


@functools.lru_cache(maxsize=64)
def _table(sizes: tuple, out_size: tuple, device: torch.device):
    """(offsets/sizes int32 (K, 3), align_corners scales fp32 (K, 2)) on ``device``; cached so repeated calls
    do no host-to-device copy. src = dst * (in - 1) / (out - 1), and 0 for a single output row/column (torch)."""
    hh, ww = out_size
    offs = [0]
    for h, w in sizes:
        offs.append(offs[-1] + h * w)
    idx = torch.tensor([[offs[k], h, w] for k, (h, w) in enumerate(sizes)], dtype=torch.int32)
    scale = torch.tensor([[(h - 1) / (hh - 1) if hh > 1 else 0.0, (w - 1) / (ww - 1) if ww > 1 else 0.0]
                          for h, w in sizes], dtype=torch.float32)
    return idx.to(device), scale.to(device)


def upsample_sum(flat: torch.Tensor, sizes, out_size, block: int = 1024) -> torch.Tensor:
    """A (N, H, W) fp32 from a flat (N, sum h_k w_k) buffer holding the K maps of ``sizes`` back to back."""
    _check_device(flat)
    hh, ww = out_size
    idx, scale = _table(tuple(sizes), (hh, ww), flat.device)
    n = flat.shape[0]
    out = torch.empty(n, hh, ww, dtype=torch.float32, device=flat.device)
    with _ctx(flat):
        grid = (triton.cdiv(hh * ww, block), n)
        _upsample_sum[grid](flat, idx, scale, out, len(sizes), hh, ww, flat.stride(0), out.stride(0),
                            BLOCK=block, num_warps=4)
    return out


def upsample_sum_maps(maps, out_size) -> torch.Tensor:
    """``upsample_sum`` for a list of maps (one small concatenation of the native-size maps)."""
    flat = torch.cat([m.float().flatten(1) for m in maps], 1)
    return upsample_sum(flat, [tuple(m.shape[-2:]) for m in maps], out_size)


def gaussian_blur(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, block: int = 1024) -> torch.Tensor:
    """(N, H, W) scipy-'reflect' Gaussian: a pass along H into a scratch buffer, then along W."""
    _check_device(x)
    r = gaussian_radius(sigma, truncate)
    taps = gaussian_taps(sigma, truncate, x.device, torch.float32)
    x = x.float()
    n, h, w = x.shape
    tmp = torch.empty(n, h, w, dtype=torch.float32, device=x.device)
    out = torch.empty_like(tmp)
    grid = (triton.cdiv(h * w, block), n)
    with _ctx(x):
        for axis, src, dst in ((0, x, tmp), (1, tmp, out)):
            _blur_axis[grid](src, taps, dst, h, w, *src.stride(), dst.stride(0), r, AXIS=axis, TAPS_N=2 * r + 1,
                             BLOCK=block)
    return out
