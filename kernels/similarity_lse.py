"""Row log-sum-exp of the per-image similarity matrix, the hot path of UniNet's contrastive loss.

For image n, z_ij = <s_i, t_j> * inv_t over all positions i, j, and ``lse[n, i] = logsumexp_j z_ij``.
The caller builds L_SC = mean(lse - z_ii), p_ii = exp(z_ii - lse), margins, ... from ``lse`` and the cheap
diagonal, so any upstream gradient on ``lse`` must work. The naive form materialises (N, HW, HW) fp32 logits
(512 MiB at N=8, HW=4096, several copies live at once); the chunked and Triton forms never do.

Shift. Instead of a running max we subtract a per-row *upper bound* m_i = inv_t * |s_i| * max_j |t_j|
(Cauchy-Schwarz), which is exactly inv_t for unit rows, so no exp can overflow even for unnormalised input.
The largest term of a row is >= exp(-2 m_i) relative to the shift; fp32 keeps that normal while 2 m_i < 87,
i.e. for unit rows whenever T > ~0.023 (T = 0.1 gives exp(-20) ~ 2e-9, harmless). Past that (`bound_is_safe`)
a whole row could underflow to lse = -inf, so the chunked form subtracts each row's own maximum instead (one
more pass over the chunk's logits) and the dispatcher sends such inputs to it, not to Triton. Backward
recomputes P_ij = exp(z_ij - lse_i) <= 1 from the saved lse, so it needs no shift at all.

Gradients: with g_i = dL/dlse_i, dL/dz_ij = g_i P_ij, ds_i = inv_t sum_j g_i P_ij t_j and
dt_j = inv_t sum_i g_i P_ij s_i. Accumulation is fp32 (fp64 for fp64 input, for gradcheck); lse is returned
in that dtype and gradients in the input dtype.
"""
from __future__ import annotations

import warnings

import torch

from ._dispatch import requested_backend, resolve_backend

CHUNK_BYTES = 16 << 20  # logits per chunk; 8-32 MiB measured flat on CPU, smaller costs loop overhead
# auto on a CUDA tensor in fp32 takes the naive form while its (N, HW, HW) logits stay within this many elements
# (1 GiB; the backward holds about three such matrices). On an H200 (session 49, fwd+bwd, N=8) cuBLAS's fp32
# matmul beat the Triton kernel's IEEE-fp32 dot at UniNet's level shapes: 0.46 / 0.36 / 6.9 ms against 1.04 / 1.24
# / 33 ms at HW, C = 1024, 40 / 256, 112 / 4096, 256, and 3.4 against 3.2 ms at 4096, 24. Larger matrices keep
# Triton (no logits held), and so do bf16 / fp16 inputs (1.7 ms against 7.0 ms naive at 4096, 256).
NAIVE_MAX_ELEMENTS = 1 << 28


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64: the accumulation and output dtype of lse."""
    return torch.promote_types(dtype, torch.float32)


def row_shift(s: torch.Tensor, t: torch.Tensor, inv_t: float) -> torch.Tensor:
    """(N, HW) upper bound of each row's logits; equals inv_t for unit rows (see module docstring)."""
    cd = compute_dtype(s.dtype)
    t_max = torch.linalg.vector_norm(t, dim=-1, dtype=cd).amax(-1, keepdim=True)
    return torch.linalg.vector_norm(s, dim=-1, dtype=cd).mul_(t_max).mul_(inv_t)


# 2·max shift below which the bound shift cannot underflow a whole row (exp(-87) is fp32's smallest normal)
SAFE_SPAN = {torch.float32: 80.0, torch.float64: 700.0}


def bound_is_safe(shift: torch.Tensor) -> bool:
    """Whether the upper-bound shift keeps every row's largest term representable (see the module docstring)."""
    return 2 * float(shift.max()) < SAFE_SPAN.get(shift.dtype, 80.0) if shift.numel() else True


def similarity_lse_naive(s_hat: torch.Tensor, t_hat: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Reference: the full (N, HW, HW) logits and torch.logsumexp; autograd does the backward."""
    cd = compute_dtype(s_hat.dtype)
    z = torch.bmm(s_hat.to(cd), t_hat.to(cd).transpose(1, 2)) * inv_t
    return torch.logsumexp(z, dim=-1)


def default_chunk(n: int, hw: int) -> int:
    """Query rows per chunk so one chunk's logits, for all n images at once, take about CHUNK_BYTES."""
    return max(1, min(hw, CHUNK_BYTES // (4 * max(1, n * hw))))


class _ChunkedLSE(torch.autograd.Function):
    """lse over query-row chunks; peak extra memory is one (N, chunk, HW) buffer in forward and backward."""

    @staticmethod
    def forward(ctx, s, t, inv_t, chunk):
        cd = compute_dtype(s.dtype)
        s32, t32 = s.to(cd), t.to(cd)  # no copy for fp32; bf16/fp16 accumulate in fp32
        n, hw, _ = s.shape
        rows = chunk or default_chunk(n, hw)
        shift = row_shift(s32, t32, inv_t)
        exact = not bound_is_safe(shift)   # a small T: each row's own max, or a row could underflow to -inf
        lse = torch.empty(n, hw, dtype=cd, device=s.device)
        buf = torch.empty(n * min(rows, hw) * hw, dtype=cd, device=s.device)
        tT = t32.transpose(1, 2)
        for a in range(0, hw, rows):
            b = min(a + rows, hw)
            z = buf[: n * (b - a) * hw].view(n, b - a, hw)
            if exact:
                torch.bmm(s32[:, a:b], tT, out=z).mul_(inv_t)
                shift[:, a:b] = z.amax(-1)
                z.sub_(shift[:, a:b, None])
            else:
                torch.baddbmm(shift[:, a:b, None].neg(), s32[:, a:b], tT, alpha=inv_t, out=z)
            lse[:, a:b] = z.exp_().sum(-1)
        logsum = lse.log_()   # each row's shift and the log of its shifted sum, kept apart: on the row-max path the
        ctx.save_for_backward(s, t, shift, logsum)   # backward recomputes z - max exactly as here (a fused z - lse
        ctx.inv_t, ctx.rows, ctx.exact = inv_t, rows, exact   # differs by ulps of a huge z, which exp made wrong)
        return logsum + shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, t, shift, logsum = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        if not (need_s or need_t):
            return None, None, None, None
        inv_t, rows = ctx.inv_t, ctx.rows
        cd = logsum.dtype
        s32, t32, g = s.to(cd), t.to(cd), g.to(cd)
        n, hw, _ = s.shape
        ds = torch.empty_like(s32) if need_s else None
        dt = torch.zeros_like(t32) if need_t else None
        buf = torch.empty(n * min(rows, hw) * hw, dtype=cd, device=s.device)
        tT = t32.transpose(1, 2)
        lse = None if ctx.exact else logsum + shift   # the forward's output, as it returned it
        for a in range(0, hw, rows):
            b = min(a + rows, hw)
            p = buf[: n * (b - a) * hw].view(n, b - a, hw)
            if ctx.exact:
                torch.bmm(s32[:, a:b], tT, out=p).mul_(inv_t).sub_(shift[:, a:b, None])
                p.sub_(logsum[:, a:b, None]).exp_()
            else:
                torch.baddbmm(lse[:, a:b, None].neg(), s32[:, a:b], tT, alpha=inv_t, out=p).exp_()
            p.mul_(g[:, a:b, None])  # g_i * P_ij = dL/dz_ij
            if need_s:
                ds[:, a:b] = torch.bmm(p, t32)
            if need_t:
                dt.baddbmm_(p.transpose(1, 2), s32[:, a:b])
        ds = ds.mul_(inv_t).to(s.dtype) if need_s else None
        dt = dt.mul_(inv_t).to(t.dtype) if need_t else None
        return ds, dt, None, None


def similarity_lse_chunked(s_hat, t_hat, inv_t: float, chunk: int | None = None) -> torch.Tensor:
    """Chunked torch path (CPU default); ``chunk`` = query rows per step, None = about CHUNK_BYTES of logits."""
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedLSE.apply(s_hat, t_hat, float(inv_t), None if chunk is None else int(chunk))


def _check(s_hat, t_hat, inv_t) -> None:
    if s_hat.dim() != 3 or s_hat.shape != t_hat.shape:
        raise ValueError(f"s_hat and t_hat must both be (N, HW, C) with equal shapes, got "
                         f"{tuple(s_hat.shape)} and {tuple(t_hat.shape)}")
    if s_hat.shape[1] == 0 or s_hat.shape[2] == 0:
        raise ValueError(f"s_hat and t_hat need HW >= 1 positions and C >= 1 channels, got {tuple(s_hat.shape)} "
                         "(a feature map with no positions: is the image smaller than the level's stride?)")
    if s_hat.dtype != t_hat.dtype or s_hat.device != t_hat.device:
        raise ValueError(f"s_hat and t_hat differ in dtype/device: {s_hat.dtype}/{s_hat.device} vs "
                         f"{t_hat.dtype}/{t_hat.device}")
    if not s_hat.is_floating_point():
        raise ValueError(f"s_hat must be floating point, got {s_hat.dtype}")
    if not 0 < float(inv_t) < float("inf"):   # T = 0 would make every logit infinite: NaN, silently
        raise ValueError(f"inv_t = 1/T must be finite and > 0, got {inv_t}")


def similarity_backend(s_hat: torch.Tensor, t_hat: torch.Tensor, backend: str | None = None) -> str:
    """The backend `similarity_lse` takes for these inputs before its Triton fallbacks: auto's Triton becomes
    naive for fp32 logits within `NAIVE_MAX_ELEMENTS` (faster there); a named backend is kept."""
    name = resolve_backend(s_hat, backend)
    if (name == "triton" and requested_backend(backend) == "auto" and s_hat.dtype == torch.float32
            and s_hat.shape[0] * s_hat.shape[1] * t_hat.shape[1] <= NAIVE_MAX_ELEMENTS):
        return "naive"
    return name


def similarity_lse(s_hat: torch.Tensor, t_hat: torch.Tensor, inv_t: float, backend: str | None = None,
                   *, chunk: int | None = None) -> torch.Tensor:
    """lse[n, i] = logsumexp_j (s_hat[n, i] . t_hat[n, j]) * inv_t, differentiable in both inputs.

    s_hat, t_hat: (N, HW, C), rows L2-normalised by the caller. Returns (N, HW) fp32 (fp64 for fp64 input).
    backend: 'naive' | 'torch'/'chunked' | 'triton' | 'auto' | None (env UNINET_KERNELS, then auto: chunked on
    the CPU; on CUDA naive for fp32 logits within `NAIVE_MAX_ELEMENTS`, else Triton; `similarity_backend`).
    chunk: query rows per step for the chunked backend only.
    Triton handles C <= 256 (UniNet level 1, the memory hog) in fp32/bf16/fp16; wider C or fp64 (a gradcheck,
    an fp64 debug run on a GPU) falls back to chunked (with a warning when triton was forced).
    """
    _check(s_hat, t_hat, inv_t)
    name = similarity_backend(s_hat, t_hat, backend)
    if name == "naive":
        return similarity_lse_naive(s_hat, t_hat, float(inv_t))
    if name == "chunked":
        return similarity_lse_chunked(s_hat, t_hat, inv_t, chunk)
    from .similarity_lse_triton import MAX_C, similarity_lse_triton  # lazy: CPU users never import triton
    why = (f"C={s_hat.shape[-1]} > {MAX_C} (cheap there: such levels have small HW)" if s_hat.shape[-1] > MAX_C
           else f"{s_hat.dtype}" if s_hat.dtype not in (torch.float32, torch.bfloat16, torch.float16) else None)
    if why is None and not bound_is_safe(row_shift(s_hat.detach(), t_hat.detach(), float(inv_t))):
        why = f"1/T = {float(inv_t):g} with these rows' norms (its upper-bound shift would underflow whole rows)"
    if why:
        if requested_backend(backend) == "triton":  # auto falls back silently
            warnings.warn(f"similarity_lse: no Triton kernel for {why}; using the chunked torch path", stacklevel=2)
        return similarity_lse_chunked(s_hat, t_hat, inv_t, chunk)
    return similarity_lse_triton(s_hat, t_hat, float(inv_t))
