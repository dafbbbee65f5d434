"""Label-free model selection: the validation normals against synthetic defects made from them.

Why: a user with no labelled defects still has to decide when training stops, and the official code
decides it on the test set (method §8). Longer training is not always better — a student that
reconstructs more also reconstructs defects (measured: the multi-class AITEX model fell from 0.897 to
0.659 strip AUROC between 4 and 20 epochs while its training loss kept falling). With ``select:
synthetic`` the run scores, every ``val_every`` epochs, its held-out validation normals (items: whole
images or tiles, at model resolution) next to ``synthetic_copies`` defective copies of each, made by
`data.synthetic.add_defect` (holes, broken yarns, slubs, knots, stains, missing picks, oil lines; with
``synthetic_kinds: all`` also `data.surface.texture_patch`, for non-fabric surfaces) with their exact
masks, and keeps the epoch with the best mean of image AUROC and pixel AUROC on that set.

Only the held-out validation normals and procedural edits are used: no test image or label. The set is drawn once
from its own seeded generator, so it is the same at every epoch and after a resume, and it takes
nothing from the torch generators (the training run itself is unchanged by validating).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import metrics
from .data.surface import SURFACE_DEFECTS, add_surface_defect
from .data.synthetic import DEFECTS, add_defect
from .errors import BadInputError

MIN_CHANGED = 16   # a drawn defect that visibly changes fewer pixels than this is drawn again
VISIBLE = 3        # grey levels (of 255): a mask pixel counts as defect only where the edit shows
STRENGTH = (0.2, 0.6)   # each edit is blended in at a random strength in this range (see synthetic_defect)


def _to_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    return (((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)).permute(1, 2, 0).numpy()


KIND_SETS = {"fabric": DEFECTS, "all": DEFECTS + SURFACE_DEFECTS}


def parse_kinds(kinds, key: str = "synthetic_kinds") -> tuple[str, ...]:
    """The config's ``synthetic_kinds`` (or ``denoise_kinds``: ``key``, named in errors) as a tuple of defect names:
    None or "fabric" (the fabric faults, the default), "all" (those and ``texture_patch``), or names as a list or
    comma-separated string. Anything else is refused: YAML's `off` (false) or a number was a TypeError traceback."""
    if kinds is None:
        return DEFECTS
    fix = f"{key}: fabric, all, or names from {DEFECTS + SURFACE_DEFECTS}"
    if isinstance(kinds, str):
        kinds = KIND_SETS.get(kinds.strip()) or [k.strip() for k in kinds.split(",") if k.strip()]   # " all"
    elif not isinstance(kinds, (list, tuple)) or not all(isinstance(k, str) for k in kinds):
        raise BadInputError(f"{key} must be fabric, all, or defect names (a list or comma-separated), got "
                            f"{kinds!r}", fix=fix)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in DEFECTS + SURFACE_DEFECTS]
    if bad or not kinds:
        raise BadInputError(f"unknown synthetic defect kinds {bad or '(none given)'}", fix=fix)
    return kinds


def warn_choices_on_trained_kinds(cfg: dict, map_levels, map_norm, denoising: bool, image_score=None) -> None:
    """Warn when a label-free choice (``select: synthetic``, ``map_levels`` / ``map_norm`` / ``image_score: auto``) is
    made on the synthetic defect kinds the denoising student is trained to undo: the choice then rewards the student
    for suppressing exactly those, the opposite of what it is meant to measure (a student that learns to reconstruct
    defects). `configs/magnetic_tile.yaml` keeps the two apart (texture_patch against the fabric kinds). Called by
    training and by `calibrate --map-levels/--map-norm/--image-score auto` (which made the same choice unwarned)."""
    choices = [n for n, on in (("select: synthetic", cfg.get("select") == "synthetic"),
                               ("map_levels: auto", map_levels == "auto"), ("map_norm: auto", map_norm == "auto"),
                               ("image_score: auto", image_score == "auto")) if on]
    if not (denoising and choices):
        return
    both = sorted(set(parse_kinds(cfg.get("synthetic_kinds"))) & set(parse_kinds(cfg.get("denoise_kinds"))))
    if both:
        warnings.warn(f"{' and '.join(choices)} choose on synthetic defects of kinds the denoising student is trained "
                      f"on ({', '.join(both)}), which favours it for undoing those kinds (fix: synthetic_kinds: "
                      "texture_patch with the default denoise_kinds, or other disjoint lists)")


def synthetic_defect(img: np.ndarray, rng: np.random.Generator, tries: int = 8, kinds=DEFECTS, strength=STRENGTH):
    """(defective copy, bool mask of the visibly changed pixels) of a uint8 (H, W, 3) image; ``kinds``: the
    defects drawn from, each with equal chance (`parse_kinds`).

    Why blended: at full strength the edits are too easy to rank models — epoch-5 and epoch-100
    magnetic-tile models both scored 0.98-0.99 image AUROC on them (the first version; README) — so each
    edit is mixed in at a strength drawn from ``strength`` (default ``STRENGTH``; training edits of
    `denoise` use a wider range). The mask is `add_defect`'s mask cut to the pixels the result really
    changed: on fine textures an edit can leave parts of its region (or all of it) unchanged, and an
    invisible "defect" would be label noise. Pixels outside that mask are put back as they were: a kind
    blended with a soft edge (`texture_patch`: its mask is where the blend passes 0.5) changed pixels labelled
    normal by up to 21 grey levels (6 % of its changed pixels, session 34), label noise the other way.
    A grey picture (three equal channels: a grey line read as RGB) gets a fabric defect drawn on one channel and
    repeated: drawn on three, a stain or oil line came out tinted (up to 23 grey levels between channels), which no
    image of that line can show.
    """
    base = img.astype(np.float64)
    # grey within one level between channels: a grey image normalised with per-channel ImageNet statistics, resized
    # and put back to uint8 (`_to_uint8`) leaves a few pixels one level apart, and the exact test read it as colour,
    # its defects tinted again (an audit, session 53); such a picture is drawn on its mean channel
    grey = bool((img.max(-1).astype(np.int16) - img.min(-1)).max() <= 1)
    for _ in range(tries):
        kind = kinds[rng.integers(len(kinds))]
        if kind in SURFACE_DEFECTS:
            out, mask = add_surface_defect(img, kind, rng)
        else:
            out, mask = add_defect(np.round(base.mean(-1)).astype(np.uint8) if grey else img, kind, rng)
            out = np.repeat(out[..., None], 3, -1) if grey else out
        out = np.clip(base + rng.uniform(*strength) * (out - base) + 0.5, 0, 255).astype(np.uint8)
        mask = mask & (np.abs(out.astype(np.int16) - img.astype(np.int16)).max(-1) >= VISIBLE)
        if mask.sum() >= MIN_CHANGED:
            return np.where(mask[..., None], out, img), mask
    raise BadInputError(f"no visible synthetic defect in {tries} tries on a {img.shape[1]}x{img.shape[0]} "
                        "validation image (flat or saturated?)", fix="use select: last for this data")


class SyntheticValidation:
    """The fixed validation set: each item of ``dataset`` once as normal, ``copies`` times with a defect.

    An item that no kind can visibly change (a blank margin tile) keeps only its normal; ``skipped`` counts the
    copies left out, and only a set with no defect at all is refused."""

    def __init__(self, dataset, copies: int = 2, seed: int = 0, kinds=None):
        kinds = parse_kinds(kinds)
        if len(dataset) == 0 or copies < 1:
            raise BadInputError("synthetic validation needs validation normals and copies >= 1",
                                fix="keep val_fraction > 0 (and synthetic_copies >= 1), or use select: last")
        rng = np.random.default_rng([seed, 0x5E1EC7])
        self.mean, self.std = dataset.mean, dataset.std
        images, masks, self.skipped = [], [], 0
        for j in range(len(dataset)):
            img = _to_uint8(dataset[j]["image"], self.mean, self.std)
            images.append(img)
            masks.append(np.zeros(img.shape[:2], bool))
            for _ in range(copies):
                try:
                    out, m = synthetic_defect(img, rng, kinds=kinds)
                except BadInputError:   # a flat tile (e.g. AITEX's white margin) takes no visible edit of these
                    self.skipped += 1   # kinds: it stays in the set as a normal, without defective copies
                    continue
                images.append(out)
                masks.append(m)
        if self.skipped == copies * len(dataset):
            raise BadInputError(f"no visible synthetic defect of kinds {list(kinds)} on any of the {len(dataset)} "
                                "validation items (flat or saturated images?)",
                                fix="use other synthetic_kinds (e.g. fabric), or select: last")
        if self.skipped:
            warnings.warn(f"synthetic validation: {self.skipped} of {copies * len(dataset)} defective copies "
                          f"skipped: their items are flat or saturated for kinds {list(kinds)}")
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)   # uint8 (N, 3, H, W)
        self.masks = np.stack(masks)
        self.labels = self.masks.reshape(len(masks), -1).any(1).astype(np.int64)

    @classmethod
    def from_config(cls, dataset, cfg: dict) -> "SyntheticValidation":
        """The set a run's config asks for: ``synthetic_copies``, ``seed`` and ``synthetic_kinds``."""
        return cls(dataset, int(cfg.get("synthetic_copies", 2)), cfg["seed"], cfg.get("synthetic_kinds"))

    def __len__(self) -> int:
        return len(self.labels)

    def _inputs(self, batch_size: int, channels_last: bool, device=None):
        """The set's images in order, as normalised model input batches on ``device``."""
        for i in range(0, len(self), batch_size):
            x = (self.images[i:i + batch_size].float() / 255 - self.mean) / self.std
            x = x if device is None else x.to(device)
            yield x.contiguous(memory_format=torch.channels_last) if channels_last else x

    @torch.no_grad()
    def score(self, model, batch_size: int = 8, channels_last: bool = False) -> dict:
        """Image and pixel AUROC of ``model`` (put in eval mode) on the set, and their mean (``score``)."""
        from .runs import model_device
        model.eval()
        scores, maps = [], []
        for x in self._inputs(batch_size, channels_last, model_device(model)):
            pix, s = model.predict(x)
            scores.append(s.float().cpu().numpy())
            maps.append(pix.float().cpu().numpy())
        scores, maps = np.concatenate(scores), np.concatenate(maps)
        if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
            return {"image_auroc": float("nan"), "pixel_auroc": float("nan"), "score": float("nan")}
        img = metrics.image_auroc(self.labels, scores)
        pix = metrics.pixel_auroc(self.masks, maps)
        return {"image_auroc": img, "pixel_auroc": pix, "score": (img + pix) / 2}

    @torch.no_grad()
    def level_maps(self, model, batch_size: int = 8, channels_last: bool = False) -> list[list[torch.Tensor]]:
        """Each batch's 2L anomaly maps at their own (feature) resolution, kept on the CPU: the one model pass that
        the label-free choices of the pixel map and of the image score share (`calibration.calibrate`). Small: at
        magnetic tile's 128 px, 2.2 MB for its 204 images; the full-size maps are made per batch from them."""
        from .runs import model_device
        from .scoring import anomaly_maps
        model.eval()
        out = []
        for x in self._inputs(batch_size, channels_last, model_device(model)):
            o = model(x)
            out.append([m.cpu() for m in anomaly_maps(o.teachers, o.students)])
        return out

    def _batches(self, model, maps, batch_size: int, channels_last: bool):
        """(anomaly maps on the model's device, input size) per batch: of ``maps`` (`level_maps`) when given."""
        from .runs import model_device
        maps = self.level_maps(model, batch_size, channels_last) if maps is None else maps
        device, size = model_device(model), tuple(self.images.shape[-2:])
        for am in maps:
            yield [m.to(device) for m in am], size

    @torch.no_grad()
    def pixel_auroc_of(self, model, candidates: dict, batch_size: int = 8, channels_last: bool = False,
                       max_bytes: int = 1 << 30, maps=None) -> dict:
        """{key: pixel AUROC of that candidate pixel map} on the set, from one model pass for all of them
        (`calibration.choose_pixel_map`; ``maps``: that pass's `level_maps`, made here when None).
        ``candidates``: {key: (levels or None, norm or None)}, the pixel map `scoring.level_pixel_map` makes.

        The maps of every candidate are held until the end; when they would pass ``max_bytes`` (a large
        validation set), every s-th pixel in each direction is kept, the same pixels for every candidate
        and the masks, so that memory stays bounded and the AUROC is estimated on a regular grid."""
        from .scoring import level_pixel_map
        smoothed = model.cfg["pixel_map"] == "smoothed"
        step = pixel_step(self.masks.size * 4 * max(len(candidates), 1), max_bytes)
        out = {k: [] for k in candidates}
        for am, size in self._batches(model, maps, batch_size, channels_last):
            for k, (levels, norm) in candidates.items():
                m = level_pixel_map(am, levels, size, smoothed, norm=norm)
                out[k].append(m[:, ::step, ::step].float().cpu().numpy().copy())
        masks = self.masks[:, ::step, ::step]
        return {k: _finite_or_nan(metrics.pixel_auroc, masks, np.concatenate(m)) for k, m in out.items()}

    @torch.no_grad()
    def image_auroc_of(self, model, batch_size: int = 8, channels_last: bool = False, maps=None) -> dict:
        """{"wdm": image AUROC of the WDM of all maps, "map": of the same top-k mean of ``model``'s pixel map (its
        ``map_levels`` / ``map_norm``, `scoring.level_map_score`)} on the set (`calibration.choose_image_score`;
        ``maps`` as for `pixel_auroc_of`); NaN for a score that is not finite."""
        from .scoring import level_map_score, wdm_score
        a, b = model.cfg["alpha"], model.cfg["beta"]
        levels, norm = model.cfg.get("map_levels"), model.cfg.get("map_norm")
        out = {"wdm": [], "map": []}
        for am, size in self._batches(model, maps, batch_size, channels_last):
            out["wdm"].append(wdm_score(am, size, a, b)[1].float().cpu().numpy())
            out["map"].append(level_map_score(am, levels, size, norm, a, b).float().cpu().numpy())
        return {k: _finite_or_nan(metrics.image_auroc, self.labels, np.concatenate(v)) for k, v in out.items()}


def _finite_or_nan(metric, truth, pred) -> float:
    """``metric(truth, pred)``, NaN when a prediction is not finite (a diverged model ranks nothing)."""
    return metric(truth, pred) if np.isfinite(pred).all() else float("nan")


def pixel_step(nbytes: int, max_bytes: int) -> int:
    """The smallest pixel stride s (1 = every pixel) with nbytes / s^2 <= max_bytes."""
    step = 1
    while nbytes > max_bytes * step * step:
        step += 1
    return step
