"""Position-aware tile scores for tiled images: each tile compared with normal tiles at the same place.

Why: a strip's score is the highest of its tiles' WDM scores, but tiles at some places score high on every
normal strip — the selvage and lit edge of an AITEX strip. Measured on fabric_04 (`runs/ax20_04`): tiles 0-1
score 3.4-4.4 on every training strip, the middle tiles 1.9-2.5, so the left edge set every strip's score and a
defect in the middle had to beat the edge. With ``tile_norm: position`` a tile's score becomes its WDM score
minus the median score of the run's training normals' tiles at that position (``offsets``, per group — a
multi-class run's fabrics differ in where their edges are — and per tile top-left corner "y,x"), so a strip is
scored by the tile that is most unusual *for where it is*. Only training normals are used; the offsets are
computed after training and kept in calibration.json. A run of one group applies its offsets to any image of
its size (a new batch has no group); a run of several needs each image's group.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import BadInputError

RULE = ("tile score minus the median WDM score of the run's training normals' tiles at the same position "
        "(top-left corner); the image score is the highest corrected tile score")


def parse_tile_norm(v, tile) -> str:
    """"none" (plain tile scores, default) or "position", which needs tiled images."""
    if v not in ("none", "position"):
        raise BadInputError(f"tile_norm must be none or position, got {v!r}", fix="e.g. --tile-norm position")
    if v == "position" and not tile:
        raise BadInputError("tile_norm: position compares tiles by their place in a tiled image, but tile is not set",
                            fix="set tile (e.g. --tile 256) or tile_norm: none")
    return v


def key(box) -> str:
    return f"{int(box[0])},{int(box[1])}"


@torch.no_grad()
def tile_offsets(model, samples, cfg: dict) -> dict:
    """Per group and tile position, the median WDM score of ``samples`` (normal images), and the share of their
    tile-score variance that group and position explain (``position_r2``: near 1 when places differ consistently)."""
    from .runs import eval_batches, make_dataset
    model.eval()
    per: dict[tuple[str, str], list[float]] = {}
    for batch, x in eval_batches(make_dataset(samples, cfg, model.source), cfg):
        _, s = model.predict(x)
        for i, box, v in zip(batch["index"].tolist(), batch["tile"].tolist(), s.float().tolist()):
            per.setdefault((samples[i].group, key(box)), []).append(v)
    if not per:
        raise BadInputError("no normal tiles to take position offsets from", fix="use tile_norm: none")
    offsets: dict[str, dict[str, float]] = {}
    for (g, k), v in per.items():
        offsets.setdefault(g, {})[k] = float(np.median(v))
    vals = [np.asarray(v, np.float64) for v in per.values()]
    allv = np.concatenate(vals)
    if not np.isfinite(allv).all():
        raise BadInputError("WDM scores of the training normals are not finite", fix="retrain the run")
    total = ((allv - allv.mean()) ** 2).sum()
    within = sum(((v - v.mean()) ** 2).sum() for v in vals)
    n = {g: sum(s.group == g for s in samples) for g in offsets}
    return {"offsets": offsets, "n_images": n, "position_r2": float(1 - within / total) if total > 0 else 0.0,
            "rule": RULE}


def corrected(score: float, box, offsets: dict | None, sample) -> float:
    """``score`` less the offset of the tile at ``box`` of ``sample`` (its group's); unchanged without offsets."""
    if not offsets:
        return score
    table = offsets.get(sample.group) or (next(iter(offsets.values())) if len(offsets) == 1 else None)
    if table is None:
        raise BadInputError(f"no position offsets for group {sample.group!r}: the run's normals came from groups "
                            f"{sorted(offsets)}", path=sample.path,
                            fix="give the images' group (`predict --group G`, or a --split-csv with a group "
                                "column), or `uninet-feat calibrate --run RUN --tile-norm none`")
    k = key(box)
    if k not in table:
        raise BadInputError(f"a tile at y,x = {k} has no position offset: the run's normals were tiled at "
                            f"{len(table)} other places", path=sample.path,
                            fix="score images of the training images' size, or `uninet-feat calibrate --run RUN "
                                "--tile-norm none`")
    return score - table[k]
