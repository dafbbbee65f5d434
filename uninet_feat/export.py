"""Exported features: what a trained UniNet gives to FAISS and LightGBM.

Per image (or per tile of a large image):
* an **image vector** — for each level l: the DFS-pooled target-teacher features and the DFS-pooled
  student features (C_l each), then four statistics (mean, std, max, 0.99-quantile) of each of the
  level's two anomaly maps, then the WDM image score. A head therefore sees both what the image
  looks like (domain-adapted features) and how anomalous it is. Then the defect descriptors
  (`descriptors`): per level the target-teacher features pooled by that level's anomaly map, and the
  shape of the pixel map's hot region; `Extractor` appends the hot spot's place in the whole image.
  DFS pooling: v_c = Σ_hw softmax_hw(P_c) · X_c · (θ_c + g_c) — the same spatial selection and the
  same learned θ that DFS applies during training, turned into a pooling.
* optional **patch vectors** — on the level-2 grid: θ-weighted teacher features of levels 2 and 3
  (level 3 upsampled), 3×3 locally averaged (PatchCore's neighbourhood aggregation), for kNN search.
Without a trained run (``backbone_features``) the vectors come from the plain backbone with θ ≡ 1
and no map statistics, so adapted and plain features can be compared on equal terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .descriptors import PLACE_NAMES, SHAPE_NAMES, hot_region_shape, map_pool

MAP_STATS = ("mean", "std", "max", "q99")


def dfs_pool(x: torch.Tensor, prior: torch.Tensor, theta) -> torch.Tensor:
    """(N,C,H,W) → (N,C): attention pooling by the prior's spatial softmax, scaled by θ + g."""
    prior = prior.float()
    attn = torch.softmax(prior.flatten(2), -1)
    g = prior.clamp(min=0).mean((2, 3))
    th = theta.view(1, -1) if torch.is_tensor(theta) else theta
    return (x.float().flatten(2) * attn).sum(-1) * (th + g)


def _map_stats(m: torch.Tensor) -> torch.Tensor:
    f = m.flatten(1)
    return torch.stack([f.mean(1), f.std(1), f.amax(1), torch.quantile(f, 0.99, dim=1)], 1)


def patch_vectors(feats: list[torch.Tensor], thetas) -> torch.Tensor:
    """Level-2 grid patch vectors (N, h*w, C2+C3) from teacher maps [l1, l2, l3]."""
    f2, f3 = feats[1].float(), feats[2].float()
    t2, t3 = thetas[1], thetas[2]
    if torch.is_tensor(t2):
        f2, f3 = f2 * t2.view(1, -1, 1, 1), f3 * t3.view(1, -1, 1, 1)
    f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    p = F.avg_pool2d(torch.cat([f2, f3], 1), 3, 1, 1, count_include_pad=False)
    return p.flatten(2).transpose(1, 2).contiguous()


def _teacher_pooled(out, thetas) -> list[torch.Tensor]:
    """Per level (N, C_l): the DFS-pooled target-teacher features."""
    L = out.n_levels
    return [dfs_pool(out.teachers[L + l], out.teachers[L + l], thetas[l]) for l in range(L)]


def teacher_context(model, out) -> torch.Tensor:
    """(N, ΣC_l): each level's DFS-pooled target-teacher features, the image vector's ``l*_teacher_*`` columns —
    what an image or tile looks like, for comparing it with normal tiles that look alike (``tile_norm:
    neighbours``)."""
    return torch.cat(_teacher_pooled(out, [model.dfs.theta(l) for l in range(out.n_levels)]), 1)


@torch.no_grad()
def uninet_features(model, x: torch.Tensor, patches: bool | str = False) -> dict:
    """Image vectors (N, D), WDM scores (N,), pixel maps (N,H,W) and optionally patch vectors: the adapted
    target teacher's (``patches=True``), or ``"source"``: the frozen source teacher's, which equal the plain
    backbone's (``backbone_features``) when the run kept its ImageNet weights, at no extra pass."""
    from .scoring import anomaly_maps
    model.eval()
    out = model(x)
    L = out.n_levels
    maps = anomaly_maps(out.teachers, out.students)
    pix, score = model.score_maps(maps, tuple(x.shape[-2:]))
    thetas = [model.dfs.theta(l) for l in range(L)]
    pooled = _teacher_pooled(out, thetas)
    parts = []
    for l in range(L):
        parts.append(pooled[l])
        parts.append(dfs_pool(out.students[l], out.teachers[l], thetas[l]))
        parts.append(_map_stats(maps[l]))
        parts.append(_map_stats(maps[L + l]))
    parts.append(score.view(-1, 1).float())
    spots = [map_pool(out.teachers[L + l], maps[l] + maps[L + l]) for l in range(L)]
    parts += spots
    parts += [spots[l] - out.teachers[L + l].float().mean((2, 3)) for l in range(L)]   # `l*_spotdiff_*`
    parts.append(hot_region_shape(pix))
    res = {"vectors": torch.cat(parts, 1), "scores": score, "maps": pix, "context": torch.cat(pooled, 1)}
    if patches == "source":
        res["patches"] = patch_vectors(out.teachers[:L], [1.0] * L)
    elif patches:
        res["patches"] = patch_vectors(out.teachers[L:], thetas)
    if patches:
        res["patch_grid"] = tuple(out.teachers[1].shape[-2:])
    return res


@torch.no_grad()
def backbone_features(backbone, x: torch.Tensor, patches: bool = False) -> dict:
    """The same vectors from the plain backbone (θ ≡ 1, no anomaly maps): the comparison baseline."""
    backbone.eval()
    feats = backbone(x)
    vec = torch.cat([dfs_pool(f, f, 1.0) for f in feats], 1)
    res = {"vectors": vec, "scores": None, "maps": None}
    if patches:
        res["patches"] = patch_vectors(feats, [1.0] * len(feats))
        res["patch_grid"] = tuple(feats[1].shape[-2:])
    return res


def vector_names(channels, adapted: bool = True) -> list[str]:
    """Column names of the image vector, in order (written into the feature-store manifest)."""
    names = []
    for l, c in enumerate(channels, 1):
        if adapted:
            names += [f"l{l}_teacher_{i}" for i in range(c)] + [f"l{l}_student_{i}" for i in range(c)]
            names += [f"l{l}_mapS_{s}" for s in MAP_STATS] + [f"l{l}_mapT_{s}" for s in MAP_STATS]
        else:
            names += [f"l{l}_feat_{i}" for i in range(c)]
    if not adapted:
        return names
    names.append("wdm_score")
    for l, c in enumerate(channels, 1):
        names += [f"l{l}_mapattn_{i}" for i in range(c)]
    for l, c in enumerate(channels, 1):
        names += [f"l{l}_spotdiff_{i}" for i in range(c)]
    return names + list(SHAPE_NAMES) + list(PLACE_NAMES)
