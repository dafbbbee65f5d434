"""Anomaly maps and UniNet's Weighted Decision Mechanism (method §6), batched and device-resident.

The official code scores one image at a time with 6 host syncs, a CPU scipy blur and a CPU top-k. Here every
step is a tensor op over the whole batch, so evaluation never leaves the device:

1. M_k = 1 - cos over channels of each (teacher, student) pair, eps 1e-8 per norm as F.cosine_similarity.
2. A = sum_k bilinear_upsample(M_k -> out_size, align_corners=True): the unsmoothed pixel map.
3. k per image from the native-resolution maxima (``wdm_k``); data-dependent, so no python branch on it.
4. S = Gaussian blur of A with scipy semantics (sigma 4, truncate 4 -> 33 taps, border 'reflect' =
   half-sample symmetric, repeated for maps narrower than the radius); score = mean of the top-k of S,
   via one descending sort, an fp64 cumsum and a gather at k-1 (k differs per image).

Backends: ``torch`` (any device) and ``triton`` (``wdm_triton``: fused 1-cos+max, fused upsample+sum of all K
maps, separable blur). Auto picks Triton for CUDA tensors; env UNINET_KERNELS=triton|torch forces one.
The top-k stays a torch sort in both; a histogram/radix select (k <= 1310 of 65,536) is future work.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import resolve_backend as _shared_resolve

EPS = 1e-8


def resolve(tensor: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch' for an op on ``tensor`` (argument > env UNINET_KERNELS > auto, as ``_dispatch``
    decides for every kernel; its 'chunked' and 'naive' are this module's torch path)."""
    return "triton" if _shared_resolve(tensor, backend) == "triton" else "torch"


def _triton():
    from . import wdm_triton  # lazy: triton is optional and TRITON_INTERPRET is read at its import
    return wdm_triton


def _size(out_size) -> tuple[int, int]:
    h, w = (out_size, out_size) if isinstance(out_size, int) else out_size
    return int(h), int(w)


# ----------------------------------------------------------------------------------------------- torch path
def cos_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) pair -> (N, h, w) fp32 map 1 - cos; fp32 even for bf16 features (the maps are tiny)."""
    return 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1, eps=EPS)


def map_maxima(maps) -> torch.Tensor:
    """(N, K) maxima of each map at its native resolution."""
    _check_maps(maps)
    return torch.stack([m.flatten(1).amax(1) for m in maps], 1)


def wdm_k(maxima: torch.Tensor, out_size, alpha: float = 0.01, beta: float = 3e-5):
    """(k LongTensor (N,), w float64 (N,)) from the (N, K) map maxima.

    q = softmax(m); keep m_k with q_k > mean(q); w = max(alpha * mean(kept), beta); k = floor(H*W*w) in [1, H*W].
    When nothing is kept, all maxima are equal (up to rounding), so all are kept: the limit of the rule, instead
    of the NaN an empty mean would give. fp64 so the floor() agrees with the numpy reference.
    """
    h, w_ = _size(out_size)
    m = maxima.double()
    q = torch.softmax(m, dim=1)
    keep = q > q.mean(1, keepdim=True)
    keep = keep | ~keep.any(1, keepdim=True)
    w = ((m * keep).sum(1) / keep.sum(1)).mul_(alpha).clamp_(min=beta)
    k = torch.floor(w * (h * w_)).long().clamp_(1, h * w_)
    return k, w


def upsample_sum(maps, out_size) -> torch.Tensor:
    """A = sum_k bilinear(M_k -> out_size, align_corners=True), (N, H, W) fp32; no smoothing (pixel metrics)."""
    size = _size(out_size)
    same: dict = {}   # bilinear upsampling is linear: maps of one size (a level's two pairs) are summed first,
    for m in maps:    # which halves the upsampling, the costliest step of the CPU path
        key = tuple(int(v) for v in m.shape[-2:])   # spatial only: the batch may be symbolic (ONNX export)
        same[key] = m.float() if key not in same else same[key] + m.float()
    a = None
    for m in same.values():
        u = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        a = u if a is None else a.add_(u)
    return a


def gaussian_radius(sigma: float, truncate: float) -> int:
    """scipy.ndimage.gaussian_filter's radius: int(truncate * sigma + 0.5) (16 for sigma 4)."""
    return int(float(truncate) * float(sigma) + 0.5)


@functools.lru_cache(maxsize=16)
def _taps64(sigma: float, truncate: float) -> torch.Tensor:
    r = gaussian_radius(sigma, truncate)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return phi / phi.sum()


def gaussian_taps(sigma: float, truncate: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 2r+1 normalised taps, built in fp64 exactly as scipy's _gaussian_kernel1d."""
    return _taps64(float(sigma), float(truncate)).to(device=device, dtype=dtype)


def reflect_index(n: int, r: int, device=None) -> torch.Tensor:
    """Source index of padded positions -r .. n-1+r under scipy 'reflect' (d c b a | a b c d | d c b a).

    Period 2n, folded: correct however many times the border reflects (maps narrower than the radius).
    """
    i = torch.arange(-r, n + r, device=device).remainder_(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """(N, H, W) -> (N, H, W): scipy.ndimage.gaussian_filter(mode='reflect') per image, batched (two 1-D convs)."""
    r = gaussian_radius(sigma, truncate)
    if sigma <= 1e-15 or r == 0:  # scipy skips such axes
        return x.clone()
    n, h, w = x.shape
    taps = gaussian_taps(sigma, truncate, x.device, torch.float32)
    y = x.float().index_select(1, reflect_index(h, r, x.device))[:, None]
    y = F.conv2d(y, taps.view(1, 1, -1, 1))
    y = y.index_select(3, reflect_index(w, r, x.device))
    return F.conv2d(y, taps.view(1, 1, 1, -1))[:, 0]


def topk_mean(s: torch.Tensor, k: torch.Tensor, full_sort: bool | None = None) -> torch.Tensor:
    """(N,) mean of the k[n] largest values of s[n]: one sort, fp64 cumsum, gather at k-1 (no host sync).

    On CPU the values already live on the host, so reading k.max() syncs nothing, and topk(k.max()) is ~10x
    cheaper than the full sort (k <= 1310 of 65,536 at 256x256). Accelerators take the sync-free sort
    (``full_sort`` None = by device).
    """
    flat = s.flatten(1)
    if full_sort is None:   # a graph being exported or compiled cannot read k on the host either
        full_sort = s.device.type != "cpu" or torch.compiler.is_compiling()
    if full_sort:
        v = flat.sort(dim=1, descending=True).values
    else:
        v = flat.topk(int(k.max()) if k.numel() else 1, dim=1, sorted=True).values
    total = v.cumsum(1, dtype=torch.float64).gather(1, (k - 1)[:, None])[:, 0]
    return (total / k).to(s.dtype)


# ----------------------------------------------------------------------------------------------- dispatch
def anomaly_maps(teacher_feats, student_feats, backend: str | None = None) -> list[torch.Tensor]:
    """The K maps M_k, (N, h_k, w_k) fp32 each."""
    _check_pairs(teacher_feats, student_feats)
    if resolve(teacher_feats[0], backend) == "triton":
        return _triton().cos_maps(teacher_feats, student_feats)[0]
    return [cos_distance(t, s) for t, s in zip(teacher_feats, student_feats)]


def anomaly_map(maps, out_size, backend: str | None = None) -> torch.Tensor:
    """Summed pixel map A (N, H, W)."""
    _check_maps(maps)
    if resolve(maps[0], backend) == "triton":
        return _triton().upsample_sum_maps(maps, _size(out_size))
    return upsample_sum(maps, out_size)


def gaussian_blur_scipy(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0,
                        backend: str | None = None) -> torch.Tensor:
    """scipy-compatible Gaussian blur of an (N, H, W) batch."""
    if x.dim() != 3:
        raise ValueError(f"gaussian_blur_scipy expects (N, H, W), got {tuple(x.shape)}")
    if resolve(x, backend) == "triton" and gaussian_radius(sigma, truncate) > 0 and sigma > 1e-15:
        return _triton().gaussian_blur(x, sigma, truncate)
    return gaussian_blur(x, sigma, truncate)


def wdm_from_maps(maps, out_size, alpha: float = 0.01, beta: float = 3e-5, backend: str | None = None,
                  maxima: torch.Tensor | None = None):
    """(pixel map A (N, H, W), image score (N,)) from the K maps; ``maxima`` skips recomputing them."""
    _check_maps(maps)
    size = _size(out_size)
    name = resolve(maps[0], backend)
    k, _ = wdm_k(map_maxima(maps) if maxima is None else maxima, size, alpha, beta)
    a = anomaly_map(maps, size, name)
    return a, topk_mean(gaussian_blur_scipy(a, 4.0, 4.0, name), k)


def anomaly_map_wdm(teacher_feats, student_feats, out_size, alpha: float = 0.01, beta: float = 3e-5,
                    backend: str | None = None):
    """Features -> (pixel map (N, H, W), WDM image score (N,)); on Triton the maps and maxima come from one pass."""
    _check_pairs(teacher_feats, student_feats)
    name = resolve(teacher_feats[0], backend)
    if name == "triton":
        tr = _triton()
        maps, maxima, flat, sizes = tr.cos_maps(teacher_feats, student_feats)
        size = _size(out_size)
        k, _ = wdm_k(maxima, size, alpha, beta)
        a = tr.upsample_sum(flat, sizes, size)
        return a, topk_mean(tr.gaussian_blur(a, 4.0, 4.0), k)
    return wdm_from_maps(anomaly_maps(teacher_feats, student_feats, name), out_size, alpha, beta, name)


def _check_maps(maps) -> None:
    """The map-level entry points' input: K >= 1 maps (N, h_k, w_k) with one N and no empty map."""
    if len(maps) == 0:
        raise ValueError("need K >= 1 anomaly maps, got none")
    for i, m in enumerate(maps):
        if m.dim() != 3 or m.shape[0] != maps[0].shape[0] or (m.shape[0] and m[0].numel() == 0):
            raise ValueError(f"map {i}: every map must be (N, h, w) with the same N and h, w >= 1, got "
                             f"{[tuple(x.shape) for x in maps]}")


def _check_pairs(teacher_feats, student_feats) -> None:
    if len(teacher_feats) == 0 or len(teacher_feats) != len(student_feats):
        raise ValueError(f"need K >= 1 teacher/student pairs, got {len(teacher_feats)} and {len(student_feats)}")
    for i, (t, s) in enumerate(zip(teacher_feats, student_feats)):
        if t.dim() != 4 or t.shape != s.shape:
            raise ValueError(f"pair {i}: teacher and student must be equal (N, C, h, w), got "
                             f"{tuple(t.shape)} and {tuple(s.shape)}")
    devs = {x.device for x in (*teacher_feats, *student_feats)}
    if len(devs) > 1:   # the Triton path reads each pointer on the first one's device
        raise ValueError(f"every teacher/student map must be on one device, got {sorted(map(str, devs))}")
    n = teacher_feats[0].shape[0]   # the Triton path sizes its buffers from pair 0: another N read out of bounds
    if any(t.shape[0] != n or t.shape[-2] < 1 or t.shape[-1] < 1 for t in teacher_feats):
        raise ValueError(f"every pair must be (N, C, h, w) with the same N and h, w >= 1, got "
                         f"{[tuple(t.shape) for t in teacher_feats]}")
