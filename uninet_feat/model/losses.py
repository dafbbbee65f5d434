"""UniNet's training loss for one (teacher, DFS-weighted student) pair, summed over pairs by the caller.

With unit rows ŝ_i (student) and t̂_i (teacher) at the HW positions of one image and level,
z_ij = ŝ_i·t̂_j / T and LSE_i = logsumexp_j z_ij:
    L_cos = mean(1 − ŝ_i·t̂_i)                    cosine distillation
    L_SC  = mean(LSE_i − z_ii)                    similarity-contrastive (InfoNCE over positions)
    L_M   = mean(1 − p_ii),  p_ii = exp(z_ii − LSE_i)    margin for normal rows
    L_Ma  = mean(relu(p_ii − margin/2))           margin for abnormal rows (supervised)
    L     = λ·L_cos + (1 − λ)·L_SC + L_M + L_Ma,   λ = 0.7
This is the official loss in its streaming form (method notes §4, §10): the HW×HW similarity
matrix is never built here — ``uninet_feat.kernels.similarity_lse`` computes LSE in tiles.

Supervision selects rows: ``normal`` is a (N, HW) bool map of normal positions (from image labels
or from pixel masks resized to the level). Normal rows get L_SC and L_M, abnormal rows L_Ma.
L_cos uses every position of images without masks (as the official code does for image labels)
but skips masked defect pixels, which it would otherwise pull toward reconstruction — a
deliberate difference from the official pixel path, which crashes. Empty row sets add 0 (the
official code silently reused the previous level's value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → unit rows (N, HW, C), computed in fp32."""
    return F.normalize(x.float().flatten(2).transpose(1, 2), dim=-1, eps=1e-12)


def _wmean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return x.mean()
    w = w.to(x.dtype)
    return (x * w).sum() / w.sum().clamp(min=1.0)


def pair_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0, lam: float = 0.7,
              normal: torch.Tensor | None = None, cos_weight: torch.Tensor | None = None,
              margin: float = 1.0, stop_grad: bool = False, backend: str | None = None) -> dict:
    """Loss terms for one pair. Returns a dict with ``loss`` and its detached components."""
    from uninet_feat.kernels import similarity_lse

    if stop_grad:
        teacher = teacher.detach()
    s_hat, t_hat = _rows(student), _rows(teacher)
    cos = (s_hat * t_hat).sum(-1)
    z_ii = cos / temperature
    lse = similarity_lse(s_hat, t_hat, 1.0 / temperature, backend=backend)
    p_ii = torch.exp(z_ii - lse)
    w_n = None if normal is None else normal.float()
    l_cos = _wmean(1 - cos, cos_weight)
    l_sc = _wmean(lse - z_ii, w_n)
    l_m = _wmean(1 - p_ii, w_n)
    l_ma = cos.new_zeros(())
    if normal is not None and (~normal).any():
        l_ma = _wmean(F.relu(p_ii - margin / 2), (~normal).float())
    loss = lam * l_cos + (1 - lam) * l_sc + l_m + l_ma
    return {"loss": loss, "cos": l_cos.detach(), "sc": l_sc.detach(), "margin": l_m.detach(),
            "margin_abnormal": l_ma.detach()}


def pair_loss_reference(student, teacher, temperature=2.0, lam=0.7, eps=1e-8):
    """The official unsupervised formula, materialising the HW×HW matrix (tests only).

    ``eps`` is the official 1e-8 in the row sum and the log; ``eps=0`` gives the exact loss.
    """
    s_hat, t_hat = _rows(student), _rows(teacher)
    cos = F.cosine_similarity(s_hat, t_hat, dim=-1)
    z = torch.exp(torch.bmm(s_hat, t_hat.transpose(1, 2)) / temperature)
    p = torch.diagonal(z / (z.sum(-1, keepdim=True) + eps), dim1=1, dim2=2)
    return lam * (1 - cos).mean() + (1 - lam) * (-torch.log(p + eps)).mean() + F.relu(1 - p).mean()


def row_weights(labels: torch.Tensor | None, masks: torch.Tensor | None, size: tuple[int, int],
                has_mask: torch.Tensor | None = None):
    """Normal-row map and cosine weights at one level's resolution.

    ``labels`` (N,) 1 = defect image; ``masks`` (N,1,H,W) defect pixels; ``has_mask`` (N,) bool says
    which images carry a real mask (others fall back to their image label; None with ``masks``: every image
    does — the masks were passed over in silence before).
    A level position counts as defect when any defect pixel falls inside it (adaptive max-pool).
    Returns (normal (N,HW) bool or None when everything is normal, cos_weight (N,HW) or None).
    """
    if labels is None or not bool((labels > 0).any()):
        return None, None
    n = labels.shape[0]
    hw = size[0] * size[1]
    normal = (labels == 0).view(n, 1).expand(n, hw).clone()
    cos_w = torch.ones(n, hw, device=labels.device)
    if masks is not None and has_mask is None:
        has_mask = torch.ones(n, dtype=torch.bool, device=labels.device)
    if masks is not None and has_mask is not None and bool(has_mask.any()):
        pooled = F.adaptive_max_pool2d(masks.float(), size).flatten(1) > 0.5
        m = has_mask.view(n, 1)
        normal = torch.where(m, ~pooled, normal)
        cos_w = torch.where(m, (~pooled).float(), cos_w)
    return normal, cos_w
