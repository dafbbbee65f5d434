"""Triton forward and backward of ``similarity_lse`` (FlashAttention-style: logits never reach HBM).

Forward: one program per (row block, image) loops over key blocks, tl.dot -> exp2(z - shift) -> row sum, with
the per-row upper-bound shift of ``similarity_lse.row_shift`` instead of an online max (one pass, no rescale).
Backward: two deterministic kernels, no atomics. One per row block loops over key blocks for ds, one per key
block loops over row blocks for dt; both recompute P = exp(z - lse) from the saved fp32 lse.
HW and C need not be multiples of the blocks (masked loads; C is padded to a power of two >= 16 for tl.dot).
fp32 dots use input_precision="ieee" (no TF32) so results match the torch paths to ~1e-6; bf16/fp16 inputs
use the native dot with fp32 accumulation. Block sizes are untuned (no GPU was available); they only keep
shared memory in bounds (all configs compile for sm_80/sm_90 at <= 100 KiB).
Interpreter mode (TRITON_INTERPRET=1) is read when this module is imported, so it must be set before that.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .similarity_lse import row_shift

try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton without knobs
    import os
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (interpreter + bf16/fp16 only) feeds exact fp32 copies, since the interpreter's dot
    multiplies bf16 bit patterns as uint16. Products of 16-bit floats are exact in fp32, so this matches a
    GPU tensor-core dot with fp32 accumulation up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _lse_fwd(S, T, SHIFT, LSE, HW, C, qk_scale, s_sn, s_sr, s_sc, t_sn, t_sr, t_sc, o_sn, o_sr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    mm, mc = rm < HW, rc < C
    s = tl.load(S + n * s_sn + rm[:, None] * s_sr + rc[None, :] * s_sc, mask=mm[:, None] & mc[None, :], other=0.0)
    m2 = tl.load(SHIFT + n * o_sn + rm * o_sr, mask=mm, other=0.0) * 1.4426950408889634  # log2 units
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, HW, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        mn = rn < HW
        t = tl.load(T + n * t_sn + rn[:, None] * t_sr + rc[None, :] * t_sc, mask=mn[:, None] & mc[None, :],
                    other=0.0)
        z2 = _mm(s, tl.trans(t), None, PREC, UPCAST) * qk_scale
        p = tl.exp2(z2 - m2[:, None])
        acc += tl.sum(tl.where(mn[None, :], p, 0.0), axis=1)
    lse = (m2 + tl.log2(acc)) * 0.6931471805599453
    tl.store(LSE + n * o_sn + rm * o_sr, lse, mask=mm)


@triton.jit
def _lse_bwd_ds(S, T, LSE, G, DS, HW, C, qk_scale, inv_t, s_sn, s_sr, s_sc, t_sn, t_sr, t_sc, o_sn, o_sr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    mm, mc = rm < HW, rc < C
    s_off = n * s_sn + rm[:, None] * s_sr + rc[None, :] * s_sc
    s = tl.load(S + s_off, mask=mm[:, None] & mc[None, :], other=0.0)
    l2 = tl.load(LSE + n * o_sn + rm * o_sr, mask=mm, other=0.0) * 1.4426950408889634
    g = tl.load(G + n * o_sn + rm * o_sr, mask=mm, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        mn = rn < HW
        t = tl.load(T + n * t_sn + rn[:, None] * t_sr + rc[None, :] * t_sc, mask=mn[:, None] & mc[None, :],
                    other=0.0)
        z2 = _mm(s, tl.trans(t), None, PREC, UPCAST) * qk_scale
        gp = tl.where(mn[None, :], tl.exp2(z2 - l2[:, None]) * g[:, None], 0.0)  # dL/dz, this tile
        acc = _mm(gp.to(t.dtype), t, acc, PREC, UPCAST)
    tl.store(DS + s_off, (acc * inv_t).to(DS.dtype.element_ty), mask=mm[:, None] & mc[None, :])


@triton.jit
def _lse_bwd_dt(S, T, LSE, G, DT, HW, C, qk_scale, inv_t, s_sn, s_sr, s_sc, t_sn, t_sr, t_sc, o_sn, o_sr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_C)
    mn, mc = rn < HW, rc < C
    t_off = n * t_sn + rn[:, None] * t_sr + rc[None, :] * t_sc
    t = tl.load(T + t_off, mask=mn[:, None] & mc[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        mm = rm < HW
        s = tl.load(S + n * s_sn + rm[:, None] * s_sr + rc[None, :] * s_sc, mask=mm[:, None] & mc[None, :],
                    other=0.0)
        l2 = tl.load(LSE + n * o_sn + rm * o_sr, mask=mm, other=0.0) * 1.4426950408889634
        g = tl.load(G + n * o_sn + rm * o_sr, mask=mm, other=0.0)
        zt2 = _mm(t, tl.trans(s), None, PREC, UPCAST) * qk_scale  # (keys, rows): transposed tile
        gpt = tl.where(mm[None, :], tl.exp2(zt2 - l2[None, :]) * g[None, :], 0.0)
        acc = _mm(gpt.to(s.dtype), s, acc, PREC, UPCAST)
    tl.store(DT + t_off, (acc * inv_t).to(DT.dtype.element_ty), mask=mn[:, None] & mc[None, :])


MAX_C = 256  # a (rows, C) tile must fit on chip; wider C (UniNet levels 2-3, HW <= 1024) uses the torch path


def _config(c: int, elem: int, block_m: int | None, block_n: int | None):
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps). Shared memory compiled for sm_80 stays <= ~100 KiB:
    fp32 C=64 66 KiB, C=128 (64x32) 89 KiB, C=256 (32x32) 100 KiB; bf16 C=256 (64x64) 97 KiB."""
    bc = max(16, triton.next_power_of_2(c))
    if elem >= 4:
        bm, bn, warps = (64, 64, 4) if bc <= 64 else (64, 32, 4) if bc <= 128 else (32, 32, 4)
    else:
        bm, bn, warps = (64, 64, 4) if bc <= 64 else (64, 64, 8)
    return block_m or bm, block_n or bn, bc, warps


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _TritonLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, inv_t, block_m, block_n):
        s, t = s.contiguous(), t.contiguous()
        n, hw, c = s.shape
        bm, bn, bc, warps = _config(c, s.element_size(), block_m, block_n)
        prec = "ieee" if s.dtype == torch.float32 else None
        upcast = INTERPRETED and s.dtype != torch.float32
        shift = row_shift(s, t, inv_t).contiguous()
        lse = torch.empty(n, hw, dtype=torch.float32, device=s.device)
        with _device_ctx(s):
            _lse_fwd[(triton.cdiv(hw, bm), n)](
                s, t, shift, lse, hw, c, inv_t * LOG2E, *s.stride(), *t.stride(), *lse.stride(),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, PREC=prec, UPCAST=upcast, num_warps=warps)
        ctx.save_for_backward(s, t, lse)
        ctx.inv_t, ctx.cfg, ctx.prec = inv_t, (bm, bn, bc, warps), (prec, upcast)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        s, t, lse = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        n, hw, c = s.shape
        bm, bn, bc, warps = ctx.cfg
        g = g.to(torch.float32).contiguous()  # upstream grads may be expanded (stride 0)
        args = (hw, c, ctx.inv_t * LOG2E, ctx.inv_t, *s.stride(), *t.stride(), *lse.stride())
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, PREC=ctx.prec[0], UPCAST=ctx.prec[1], num_warps=warps)
        ds = dt = None
        with _device_ctx(s):
            if need_s:
                ds = torch.empty_like(s)
                _lse_bwd_ds[(triton.cdiv(hw, bm), n)](s, t, lse, g, ds, *args, **meta)
            if need_t:
                dt = torch.empty_like(t)
                _lse_bwd_dt[(triton.cdiv(hw, bn), n)](s, t, lse, g, dt, *args, **meta)
        return ds, dt, None, None, None


def similarity_lse_triton(s_hat: torch.Tensor, t_hat: torch.Tensor, inv_t: float,
                          block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Triton path of ``similarity_lse``; block sizes (powers of two >= 16) are exposed for tests only."""
    if s_hat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton similarity_lse supports fp32/bf16/fp16, got {s_hat.dtype}; use backend='torch'")
    if s_hat.shape[-1] > MAX_C:
        raise ValueError(f"triton similarity_lse supports C <= {MAX_C}, got {s_hat.shape[-1]}; use backend='torch'")
    if not s_hat.is_cuda and not INTERPRETED:
        raise RuntimeError("triton similarity_lse got a CPU tensor but TRITON_INTERPRET=1 was not set before "
                           "uninet_feat.kernels.similarity_lse_triton was imported; use backend='torch'")
    return _TritonLSE.apply(s_hat, t_hat, float(inv_t), block_m, block_n)
