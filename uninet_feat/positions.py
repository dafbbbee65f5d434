"""Position-aware tile scores for tiled images: each tile compared with normal tiles at the same place.

Why: a strip's score is the highest of its tiles' WDM scores, but tiles at some places score high on every
normal strip — the selvage and lit edge of an AITEX strip. Measured on fabric_04 (`runs/ax20_04`): tiles 0-1
score 3.4-4.4 on every training strip, the middle tiles 1.9-2.5, so the left edge set every strip's score and a
defect in the middle had to beat the edge. With ``tile_norm: position`` a tile's score becomes its WDM score
minus the median score of the run's training normals' tiles at that position (``offsets``, per group — a
multi-class run's fabrics differ in where their edges are — and per tile top-left corner "y,x", or "WxH:y,x" in a
group whose training images come in several sizes, `key`), so a strip is scored by the tile that is most unusual
*for where it is*. Only training normals are used; the offsets are
computed after training and kept in calibration.json. A run of one group applies its offsets to any image of
its size (a new batch has no group); a run of several needs each image's group.

``tile_norm: neighbours`` (not in the method; session 21) takes the offset from the ``K_NEIGHBOURS`` training
tiles at the same position that look most like the tile (cosine of the DFS-pooled target-teacher features,
`export.teacher_context`, standardised per group) instead of all of them. Why: the place of a fabric's edge
drifts between strips — on AITEX fabric_00 6 of the 14 training strips have it near x 1133 and 8 near x 1233 —
so one median per position mixes two edges, and a cut edge is a small change beside the edge's own large score.
Measured in docs/results.md; the medians are still kept (``offsets``) for the ensemble's score scale.

A tile's pixel map is shifted down by the offset its score got (`tile_map_shift`), so that the map shows what the
score is. The offsets are in the image score's units (the WDM score: all levels' maps, raw), which are the map's
only when the run's pixel map is all levels raw; a map of some levels (``map_levels``) or in range units
(``map_norm``) has other units, and a score offset subtracted from it shifted it by a number of the wrong scale (an
edge tile's map moved by the score's edge-to-middle difference, several times its own). Such a run's calibration
also measures the offsets on its map (``map_offsets``: the median over the normals at each place of the map's own
WDM score, `scoring.level_map_score`; each neighbours' tile's one, ``map_scores``), and the map is shifted by those.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import BadInputError

LOO = ("; when the threshold is set, a validation normal (itself one of those normals) is compared with the other "
       "normals' tiles only (leave-one-out)")
RULE = ("tile score minus the median WDM score of the run's training-split normals' tiles (validation normals "
        "included) at the same position (top-left corner); the image score is the highest corrected tile score" + LOO)


MAP_RULE = ("each tile's pixel map less the median, over the run's training normals' tiles at the same position "
            "(under neighbours: the same nearest tiles), of the map's own WDM score (its levels and units; "
            "scoring.level_map_score): the pixel map is not in the image score's units")


K_NEIGHBOURS = 3
NEIGHBOURS_RULE = (f"tile score minus the median WDM score of the {K_NEIGHBOURS} training normals' tiles at the "
                   "same position (top-left corner) whose pooled target-teacher features are nearest (cosine, "
                   "standardised per group); the image score is the highest corrected tile score" + LOO)
MODES = ("none", "position", "neighbours")
MIN_PER_SIZE = 3   # training normals of one size in a group of several sizes, below which its offsets are warned of


def parse_tile_norm(v, tile) -> str:
    """"none" (plain tile scores, default), "position" or "neighbours", which need tiled images."""
    if v not in MODES:
        raise BadInputError(f"tile_norm must be one of {', '.join(MODES)}, got {v!r}",
                            fix="e.g. --tile-norm position")
    if v != "none" and not tile:
        raise BadInputError(f"tile_norm: {v} compares tiles by their place in a tiled image, but tile is not set",
                            fix="set tile (e.g. --tile 256) or tile_norm: none")
    return v


def key(box, hw=None) -> str:
    """A tile's place: "y,x" of its top-left corner; with its image's (h, w), "WxH:y,x". Why the size: the last
    tile of a row ends at the image's border, so in a group of strips 4096 and 3840 px wide the tile at x 3584 is
    an interior one of the first and the right-edge one of the second, and one median over both mixes in the very
    edge the offsets remove. Such a group's offsets are kept per size; a group of one size keeps plain "y,x"."""
    k = f"{int(box[0])},{int(box[1])}"
    return k if hw is None else f"{int(hw[1])}x{int(hw[0])}:{k}"


class Neighbours:
    """The training normals' tiles of each group: position keys, raw WDM scores and unit context vectors (after
    standardising with the group's ``mu``, ``sd``), for the neighbours' offset of a tile."""

    def __init__(self, groups: dict, sources: dict | None = None):
        """``groups``: {group: {"keys": (n,) str, "scores": (n,), "context": (n, D) raw, "mu": (D,), "sd": (D,)}}.
        ``sources``: {group: (n,) absolute image path of each row}, kept in memory only (not saved): the
        calibration that fits the tiles scores its validation normals, which are among them, leaving each image's
        own tiles out (`offset`'s ``exclude``)."""
        self.groups, self.sources = groups, sources or {}
        self._unit = {g: self._standard(t, t["context"]) for g, t in groups.items()}
        self._at = {g: {k: np.flatnonzero(t["keys"] == k) for k in np.unique(t["keys"]).tolist()}
                    for g, t in groups.items()}   # group → position key → its rows, found once, not per tile

    @staticmethod
    def _standard(t, c):
        z = (np.asarray(c, np.float64) - t["mu"]) / t["sd"]
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, per: dict, sources: dict | None = None) -> "Neighbours":
        """From {(group, key): [(score, context), ...]}, or [(score, context, map score), ...] (a pixel map of
        other units than the score's, `tile_offsets`): each tile's map score is then kept too (``map_scores``).
        ``sources``: {(group, key): [image path, ...]} beside ``per`` (`Neighbours.sources`)."""
        groups, src = {}, {}
        for g in sorted({g for g, _ in per}):
            rows = [(k, *item) for (gg, k), items in sorted(per.items()) if gg == g for item in items]
            if sources is not None:
                src[g] = np.array([os.path.abspath(str(p)) for (gg, k), ps in sorted(sources.items()) if gg == g
                                   for p in ps])
            ctx = np.stack([np.asarray(r[2], np.float64) for r in rows])
            groups[g] = {"keys": np.array([r[0] for r in rows]), "scores": np.array([r[1] for r in rows]),
                         "context": ctx, "mu": ctx.mean(0), "sd": ctx.std(0) + 1e-6}
            if all(len(r) > 3 for r in rows):
                groups[g]["map_scores"] = np.array([r[3] for r in rows], np.float64)
        return cls(groups, src)

    def offset(self, group: str, k: str, context, exclude=None) -> float:
        """The median score of the ``K_NEIGHBOURS`` tiles at place ``k`` most like ``context``. ``exclude``: an
        image path whose own tiles are left out when the tiles' sources are known (a validation normal scored by
        the calibration that fitted them: its own tile, cosine 1, was always among its nearest, pulling its score
        to 0 and the threshold below what new normals score)."""
        t = self.groups[group]
        at = self._at[group][k]
        src = self.sources.get(group)
        if exclude is not None and src is not None:
            others = at[src[at] != os.path.abspath(str(exclude))]
            at = others if len(others) else at   # an image that is the place's only normal keeps itself
        sims = self._unit[group][at] @ self._standard(t, context)
        nearest = at[np.argsort(-sims, kind="stable")[:K_NEIGHBOURS]]
        return float(np.median(t["scores"][nearest]))

    def for_maps(self) -> "Neighbours | None":
        """The same tiles with their map scores as their scores: `offset` then gives the median of the same nearest
        tiles' map scores, a tile map's offset in its own units; None when they were not kept (a map in the
        score's units needs none; a file written before them has none). Made once."""
        if not hasattr(self, "_maps"):
            ok = self.groups and all("map_scores" in t for t in self.groups.values())
            self._maps = Neighbours({g: {**t, "scores": t["map_scores"]} for g, t in self.groups.items()},
                                    self.sources) if ok else None
        return self._maps

    def digest(self) -> str:
        """A sha256 of the tiles' content (each group's fields: name, dtype, shape and bytes), not of the file's
        bytes: `save` writes a zip whose members carry the time of writing, so a re-calibration that gives the same
        tiles writes other bytes. What a feature store's calibration fingerprint names them by (`extract`)."""
        import hashlib
        import json
        h = hashlib.sha256()
        for g in sorted(self.groups):
            for name in sorted(self.groups[g]):
                a = np.ascontiguousarray(self.groups[g][name])
                h.update(json.dumps([g, name, a.dtype.str, list(a.shape)]).encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path) -> None:
        from .io import atomic_write
        arrays = {f"{g}|{name}": a for g, t in self.groups.items() for name, a in t.items()}
        def write(tmp):   # a file object: given a name without ".npz", numpy would write to another file
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        atomic_write(path, write)

    @classmethod
    def load(cls, path) -> "Neighbours":
        try:
            with np.load(path, allow_pickle=False) as z:
                groups: dict = {}
                for name in z.files:
                    g, field = name.rsplit("|", 1)
                    groups.setdefault(g, {})[field] = z[name]
            return cls(groups)
        except (OSError, ValueError, KeyError) as e:
            raise BadInputError(f"cannot read the neighbours' tiles ({type(e).__name__}: {e})", path=path,
                                fix="re-create it: `uninet-feat calibrate --run "
                                f"{Path(path).resolve().parent} --tile-norm neighbours`")


class OwnTiles:
    """Each training normal's own tile scores at each place, kept in memory by the calibration that measured the
    position offsets (never saved): the validation normals are among the normals those offsets are medians of, so
    scored against them a validation normal met its own tile in its place's median, pulling its score (and the
    threshold, the 0.99 quantile of those scores) below what a new normal scores. `offset` gives the median of
    the *other* normals' tiles, as `Neighbours.offset`'s ``exclude`` does for ``tile_norm: neighbours``."""

    def __init__(self, per: dict, sources: dict, map_per: dict | None = None):
        """``per`` / ``map_per``: {(group, key): [score, ...]} (the map's own scores: a pixel map of other units);
        ``sources``: {(group, key): [image path, ...]} in the same order."""
        self._rows = {gk: (np.array([os.path.abspath(str(p)) for p in sources[gk]]), np.asarray(v, np.float64),
                           None if map_per is None else np.asarray(map_per[gk], np.float64))
                      for gk, v in per.items()}

    def offset(self, group: str, k: str, path, maps: bool = False) -> float | None:
        """The median score (``maps``: map score) at place ``k`` of ``group``'s normals other than the image at
        ``path``; None when that image is not among them (a test or new image takes the saved median) or is the
        place's only normal, or when ``maps`` and no map scores were kept."""
        rows = self._rows.get((group, k))
        if rows is None or (maps and rows[2] is None):
            return None
        others = rows[0] != os.path.abspath(str(path))
        if others.all() or not others.any():
            return None
        return float(np.median(rows[2 if maps else 1][others]))


def _scores(model, x, context: bool, map_scores: bool):
    """(WDM scores, the pixel map's own scores or None, [context]) of the batch ``x``, as `UniNet.predict` scores
    it; the map's scores (`scoring.level_map_score` of the model's ``map_levels`` / ``map_norm``) with
    ``map_scores``."""
    if not map_scores:
        _, s, *c = (t.cpu() for t in model.predict(x, context=context))
        return s, None, c
    from .export import teacher_context
    from .scoring import anomaly_maps, level_map_score
    size = tuple(x.shape[-2:])
    out = model(x)   # in eval mode: `tile_offsets` put it there
    maps = anomaly_maps(out.teachers, out.students)
    _, s = model.score_maps(maps, size)
    ms = level_map_score(maps, model.cfg.get("map_levels"), size, model.cfg.get("map_norm"), model.cfg["alpha"],
                         model.cfg["beta"])
    return s.cpu(), ms.cpu(), [teacher_context(model, out).cpu()] if context else []


@torch.no_grad()
def tile_offsets(model, samples, cfg: dict, neighbours: bool = False, own: bool = False) -> dict:
    """Per group and tile position, the median WDM score of ``samples`` (normal images), and the share of their
    tile-score variance that group and position explain (``position_r2``: near 1 when places differ consistently).
    ``neighbours``: also each tile's score and context (`Neighbours`, under the record's ``"neighbours"`` key).
    When the model's pixel map is not in the score's units (``model.cfg``'s ``map_levels`` / ``map_norm``:
    `scoring.map_in_score_units`), also the median of the map's own scores (``map_offsets``, as ``offsets``; each
    neighbours' tile's one too), which `tile_map_shift` shifts its tiles' maps by: set the pixel map first.
    ``own`` (without ``neighbours``): also each image's own tile scores (`OwnTiles`, under ``"own"``), not JSON."""
    from .runs import eval_batches, make_dataset, model_device
    from .scoring import map_in_score_units
    model.eval()
    own_units = not map_in_score_units(model.cfg)
    per: dict[tuple[str, str], list[float]] = {}
    map_per: dict[tuple[str, str], list[float]] = {}
    ctx_per: dict[tuple[str, str], list] = {}
    src_per: dict[tuple[str, str], list] = {}
    ds = make_dataset(samples, cfg, model.source)
    sizes: dict[str, set] = {}
    for i, g, _ in ds.tile_index:   # the offsets hold for tiles of images of these sizes only (`corrected` checks)
        sizes.setdefault(samples[i].group, set()).add((g.h, g.w))
    hw = {i: (g.h, g.w) for i, g, _ in ds.tile_index}
    multi = {g for g, sz in sizes.items() if len(sz) > 1}   # groups keyed by size and place (`key`)
    per_size = Counter((samples[i].group, h, w) for i, (h, w) in hw.items() if samples[i].group in multi)
    for (g, h, w), n_img in sorted(per_size.items()):   # such a size's offsets are those few images' own tiles
        if n_img < MIN_PER_SIZE:
            warnings.warn(f"tile_norm: group {g!r} has only {n_img} training normal(s) {w}x{h} px (beside its other "
                          f"size(s)); that size's position offsets are the median of those images' own tiles, so "
                          f"they score about 0 by them (one image: exactly 0; a validation normal among them lowers "
                          f"the threshold) and new images of that size are compared with {n_img} normal(s). Fix: "
                          f"train on at least {MIN_PER_SIZE} normals of each size, or crop or leave out the {w}x{h} "
                          "images, or tile_norm: none")
    for batch, x in eval_batches(ds, cfg, model_device(model)):
        s, ms, c = _scores(model, x, neighbours, own_units)
        ms = ms.float().tolist() if ms is not None else [None] * len(s)
        for j, (i, box, v, mv) in enumerate(zip(batch["index"].tolist(), batch["tile"].tolist(), s.float().tolist(),
                                                ms)):
            k = key(box, hw[i] if samples[i].group in multi else None)
            per.setdefault((samples[i].group, k), []).append(v)
            if own_units:
                map_per.setdefault((samples[i].group, k), []).append(mv)
            src_per.setdefault((samples[i].group, k), []).append(samples[i].path)
            if neighbours:
                item = (v, c[0][j].numpy()) + ((mv,) if own_units else ())
                ctx_per.setdefault((samples[i].group, k), []).append(item)
    if not per:
        raise BadInputError("no normal tiles to take position offsets from", fix="use tile_norm: none")
    offsets: dict[str, dict[str, float]] = {}
    for (g, k), v in per.items():
        offsets.setdefault(g, {})[k] = float(np.median(v))
    vals = [np.asarray(v, np.float64) for v in per.values()]
    allv = np.concatenate(vals)
    if not np.isfinite(allv).all():
        raise BadInputError("WDM scores of the training normals are not finite", fix="retrain the run")
    if own_units and not np.isfinite(np.concatenate([np.asarray(v, np.float64) for v in map_per.values()])).all():
        raise BadInputError("the pixel map's scores of the training normals are not finite", fix="retrain the run")
    total = ((allv - allv.mean()) ** 2).sum()
    within = sum(((v - v.mean()) ** 2).sum() for v in vals)
    n = {g: sum(s.group == g for s in samples) for g in offsets}
    rec = {"offsets": offsets, "n_images": n, "position_r2": float(1 - within / total) if total > 0 else 0.0,
           "rule": RULE, "image_sizes": {g: sorted(list(v) for v in sz) for g, sz in sizes.items()}}
    if own_units:   # the map's own offsets (of the pixel map calibration.json records beside them)
        rec["map_offsets"] = {}
        for (g, k), v in map_per.items():
            rec["map_offsets"].setdefault(g, {})[k] = float(np.median(v))
        rec["map_offsets_rule"] = MAP_RULE
    if neighbours:
        rec |= {"mode": "neighbours", "k": K_NEIGHBOURS, "rule": NEIGHBOURS_RULE,
                "neighbours": Neighbours.fit(ctx_per, src_per)}
    elif own:
        rec["own"] = OwnTiles(per, src_per, map_per if own_units else None)
    from .scoring import image_score_kind
    if image_score_kind(model.cfg) != "wdm":   # the run's image score is its pixel map's (image_score: map)
        rec["rule"] = rec["rule"].replace("median WDM score", "median image score (the pixel map's, image_score: map)")
    if multi:   # a one-size run's record stays as it was
        rec["rule"] += (f"; per image size too (keys \"WxH:y,x\") in group(s) {sorted(multi)}, whose training "
                        "images come in several sizes")
    return rec


def corrected(score: float, box, offsets: dict | None, sample, context=None, neighbours: Neighbours | None = None,
              sizes: dict | None = None, hw=None, own: OwnTiles | None = None, maps: bool = False) -> float:
    """``score`` less the offset of the tile at ``box`` of ``sample`` (its group's); unchanged without offsets.
    With ``neighbours`` (and the tile's ``context``), the offset of its nearest training tiles at that place.
    ``sizes``: {group: [[h, w], ...]} of the training normals (``image_sizes`` of the offsets' record; None in
    records written before session 24) and ``hw`` the image's (h, w), as its dataset read it: an image of another
    size is refused, since a smaller one's mirror-padded tiles sit at the training tiles' places and would take
    offsets measured on full tiles; in a group of several training sizes ``hw`` also picks that size's offsets
    (`key`). ``own``: the offsets' normals' own tiles (`OwnTiles`, the calibration that measured them), so that
    one of those normals is taken against the others' median (``maps``: of map scores, ``offsets`` being the map's)."""
    if not offsets:
        return score
    group, table, k = _place(box, offsets, sample, sizes, hw)
    if neighbours is not None:
        if context is None:
            raise ValueError("tile_norm: neighbours needs each tile's context (model.predict(x, context=True))")
        return score - neighbours.offset(group, k, context, exclude=sample.path)
    loo = own.offset(group, k, sample.path, maps) if own is not None else None
    return score - (table[k] if loo is None else loo)


def _place(box, offsets: dict, sample, sizes: dict | None, hw) -> tuple:
    """(group, its offsets table, the tile's key) of a tile at ``box`` of ``sample``; BadInputError, naming the
    image and the fix, when the run has no offset for it (`corrected`)."""
    # a run of one group scores images without one (a new batch) with its offsets, not another group's images; a run
    # of one ungrouped category (group '') scores every image: a batch's layout group (DIR/bottle/test) is a folder
    only = next(iter(offsets)) if len(offsets) == 1 else None
    group = sample.group if sample.group in offsets else (only if only is not None and (not sample.group or only == "")
                                                          else None)
    table = offsets.get(group) if group is not None else None
    if table is None and len(offsets) == 1:
        raise BadInputError(f"no position offsets for group {sample.group!r}: the run's normals came from group "
                            f"{next(iter(offsets))!r} only", path=sample.path,
                            fix="score that group's images with this run (or drop --group for a new batch of them), "
                                "or train a run on this group")
    if table is None:
        raise BadInputError(f"no position offsets for group {sample.group!r}: the run's normals came from groups "
                            f"{sorted(offsets)}", path=sample.path,
                            fix="give the images' group (`predict --group G`, `extract --batch --group G`, a batch "
                                "laid out as DIR/<group>/..., or a --split-csv with a group column), or "
                                "`uninet-feat calibrate --run RUN --tile-norm none`")
    if sizes and group in sizes and hw is not None:
        hw = [int(v) for v in hw]
        if hw not in sizes[group]:
            shown = " or ".join(f"{w}x{h}" for h, w in sizes[group])
            raise BadInputError(f"the image is {hw[1]}x{hw[0]} px; the run's position offsets were measured on "
                                f"{shown} images", path=sample.path,
                                fix="score images of the training images' size, or `uninet-feat calibrate --run RUN "
                                    "--tile-norm none`")
    k = key(box)
    if hw is not None and key(box, hw) in table:   # a group of several training sizes: offsets per size (`key`)
        k = key(box, hw)
    if k not in table:
        raise BadInputError(f"a tile at y,x = {k} has no position offset: the run's normals were tiled at "
                            f"{len(table)} other places", path=sample.path,
                            fix="score images of the training images' size, or `uninet-feat calibrate --run RUN "
                                "--tile-norm none`")
    return group, table, k


def check_places(offsets: dict | None, sizes: dict | None, ds) -> None:
    """Refuse, before any image is scored, the images whose tiles have no position offset (another size than the
    training normals', a group without offsets), all in one error: `corrected` refused the first when the scoring
    loop reached it, after the batches before it were scored, and with a file list that changed when it was taken
    out, predict's saved parts were all scored again (an audit, session 53). ``ds``: a tiled `ImageDataset`."""
    if not offsets:
        return
    bad, seen = [], set()
    for i, grid, k in ds.tile_index:
        if i in seen:
            continue
        try:
            _place(grid.box(k), offsets, ds.samples[i], sizes, (grid.h, grid.w))
        except BadInputError as e:
            seen.add(i)
            bad.append(e)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise BadInputError(f"{len(bad)} image(s) cannot be scored against the run's position offsets:\n"
                            + "\n".join(f"  {e.path}: {e.reason}" for e in bad[:3]) + more, fix=bad[0].fix)


def tile_map_shift(cfg: dict, score: float, corrected_score: float, box, sample, context=None, hw=None) -> float:
    """What a tile's pixel map is less under ``tile_norm: position`` / ``neighbours`` (``cfg``: the model's), so that
    the stitched map shows what the score is (a defect unusual for its place, not an edge hot on every strip):
    the offset its ``score`` got (``score - corrected_score``) when the map is in the score's units
    (`scoring.map_in_score_units`); else its place's offset measured on the map itself (``cfg["tile_map_offsets"]``,
    under neighbours of the same nearest tiles' map scores, `Neighbours.for_maps`; by `corrected`, with its
    checks); 0 for a map of other units whose calibration did not measure those (written before them:
    `calibration.apply_calibration` warns), since a score offset is not a number of the map's scale."""
    from .scoring import map_in_score_units
    if not cfg.get("tile_offsets"):
        return 0.0
    if map_in_score_units(cfg):
        return float(score) - float(corrected_score)
    table = cfg.get("tile_map_offsets")
    if not table:
        return 0.0
    near = cfg.get("tile_neighbours")
    near = near.for_maps() if near is not None else None   # None: a tile file without map scores, the medians
    return -corrected(0.0, box, table, sample, context if near is not None else None, near, cfg.get("tile_sizes"), hw,
                      cfg.get("tile_own"), maps=True)
