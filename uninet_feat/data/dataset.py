"""The torch Dataset every command uses: whole images resized, or native-resolution tiles of large images.

Each item is ``dict(image, mask, label, index, tile)``:
- ``image``  float (3, S, S) normalised with the backbone's mean/std;
- ``mask``   float (1, S, S), 1 = defect, zeros when the sample has no mask;
- ``label``  0 normal / 1 defect; ``index`` the position of the sample in the list given;
- ``tile``   int64 [y, x, h, w]: the region in ORIGINAL pixels the item shows (the full image when not
  tiled; a tile of an image smaller than the tile runs past its border, see `tiling`), so callers
  can put per-item maps back with `stitch` via ``dataset.tile_index``.

Construction checks every image up front (`check_samples`: headers and checksums, no decode): without
``skip_bad`` one error names all the unreadable ones; with it they are left out, each with a warning.

Resizing: images bilinear with antialias (so downscaling does not alias fabric texture into fake
defects); masks ``nearest-exact`` (stays binary and pixel-centre aligned; a defect thinner than the
scale factor can vanish, which is why thin defects on large images should be tiled, not resized).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInputError
from .images import (_FIX as IMAGE_FIX, MIN_SIDE, check_image, check_mask, load_image, load_mask,
                     picture_as_mask, read_size)
from .tiling import TileGrid, extract_tile, tile_grid


def _pair(v):
    if v is None:
        return None
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


MAX_LISTED = 20  # an error about unreadable images names this many, then counts the rest
SQUASH = 3.0     # an untiled image whose resize stretches one side this much more than the other is warned about


_SQUASH_WARNED: set = set()   # (image size, input size) pairs already warned about in this process


def squash_note(samples, sizes: dict, image_size, tile) -> tuple[str, tuple] | None:
    """(the warning, its key) for untiled images that resizing squashes (one side scaled ``SQUASH`` times more than
    the other), or None. Why: a 4096×256 fabric strip resized to 256×256 is squashed 16× along its length, so a
    defect a few pixels wide vanishes and the weave's texture changes; tiles keep the native resolution. The key
    (the example's size and the input size) lets a command that builds several datasets of such images (training
    and validation) say it once."""
    if tile is not None or image_size is None or not sizes:
        return None
    th, tw = image_size
    factor = {i: max((h / th) / (w / tw), (w / tw) / (h / th)) for i, (h, w) in sizes.items()}
    odd = [i for i, f in factor.items() if f >= SQUASH]
    if not odd:
        return None
    worst = max(odd, key=factor.get)
    h, w = sizes[worst]
    return (f"{len(odd)} of {len(sizes)} images are resized out of shape (e.g. {samples[worst].path}, {w}x{h} px, "
            f"resized to {tw}x{th}: squashed {factor[worst]:.0f}x along its long side), so small defects can vanish. "
            f"Fix: tile them at native resolution, e.g. `train --tile {min(h, w)}` (predict and evaluate score "
            "as their run was trained)"), ((h, w), (th, tw))


def check_samples(samples, min_side: int = MIN_SIDE, skip_bad: bool = False):
    """The cheap up-front check of every sample (`check_image`: header and verify, no decode; its mask the same
    way, `check_mask`, and its size) → ({index: (H, W)} of the usable ones, in order; [(index, error text)] of the
    others).

    Without ``skip_bad`` any failure raises ONE BadInputError that counts them and names each with its
    reason (the first `MAX_LISTED`), so a set with many bad files is fixed in one pass, not one file per run.
    With ``skip_bad`` each is left out with a warning; none usable is still an error."""
    samples = list(samples)
    sizes, bad = {}, []
    for i, s in enumerate(samples):
        try:
            hw = check_image(s.path, min_side)
        except BadInputError as e:
            bad.append((i, e))
            continue
        try:
            if s.mask is not None and check_mask(s.mask) != hw:
                load_mask(s.mask, size=hw, image_path=s.path)  # raises the detailed size error
            sizes[i] = hw
        except BadInputError as e:
            e.of_mask = True   # the image reads: its mask does not fit (said so, not "unreadable")
            bad.append((i, e))
    if bad and not skip_bad:
        raise _unreadable(bad, samples)
    for i, e in bad:   # --skip-bad was given: its own fix (pass --skip-bad) is not repeated
        own = f" (fix: {e.fix})" if e.fix and e.fix != IMAGE_FIX else ""
        warnings.warn(f"skipping {e.path or samples[i].path}: {e.reason}{own}")
    if skip_bad and samples and not sizes:
        raise BadInputError(f"none of the {len(samples)} images is readable",
                            fix="see the warnings above for each file")
    return sizes, [(i, str(e)) for i, e in bad]


def _without_mask(s, why: str):
    """``s`` without its mask, warned: what --skip-bad does to a mask it cannot use (the image stays scored)."""
    from dataclasses import replace
    warnings.warn(f"skipping the mask {s.mask} of {s.path} ({why}): the image stays, out of the pixel metrics")
    return replace(s, mask=None)


def picture_masks(samples, skip_bad: bool = False) -> list:
    """``samples`` after a look at their masks for pictures (`images.picture_as_mask`: a camera's second copy of
    the frame saved as ``x.png`` beside ``x.jpg`` reads as 100 % defect), by the commands that use masks (evaluate,
    ensemble, supervised training) before their work: one error naming them all, or with ``skip_bad`` each left
    out (warned; the image stays, out of the pixel metrics). Masks that cannot be read are left to the dataset's
    own check (`check_samples`, which verifies them as `check_image` does images) and, with ``skip_bad``, to
    `drop_unusable_masks` (evaluate, supervised training). Masks of images that no mask is used for (an
    unsupervised run's training normals) are not looked at."""
    out, bad = [], []
    for s in samples:
        try:
            why = picture_as_mask(s.mask) if s.mask is not None else None
        except (BadInputError, OSError, ValueError):
            why = None
        if why and skip_bad:
            s = _without_mask(s, why)
        elif why:
            bad.append((s, why))
        out.append(s)
    if bad:
        lines = [f"  {s.mask} (the mask of {s.path}): {why}" for s, why in bad[:MAX_LISTED]]
        lines += [f"  and {len(bad) - MAX_LISTED} more"] if len(bad) > MAX_LISTED else []
        raise BadInputError(f"{len(bad)} of {len(samples)} images have a picture where their mask should be:\n"
                            + "\n".join(lines),
                            fix="if they are second copies of their images, move or rename them (a PNG beside a "
                                "same-named image is read as its mask); else re-export the masks as black (normal) "
                                "and white (defect); or pass --skip-bad to leave these masks out with a warning each")
    return out


def drop_unusable_masks(samples) -> list:
    """``samples`` with each mask that cannot be read (verified as `check_samples` verifies it: a truncated mask
    has a whole header), or does not fit its image, left out (warned): what ``--skip-bad`` does to a mask, instead
    of leaving its readable image out too. The image keeps its label and score and leaves only the pixel metrics,
    as one without a mask. Images that cannot be read are kept as they are, for the dataset's own check."""
    out = []
    for s in samples:
        if s.mask is not None:
            try:
                hw = read_size(s.path)
            except (BadInputError, OSError, ValueError):
                out.append(s)
                continue
            try:
                why = None if check_mask(s.mask) == hw else f"its size is not the image's {hw[1]}x{hw[0]} px"
            except (BadInputError, OSError, ValueError) as e:
                why = getattr(e, "reason", None) or str(e)
            if why:
                s = _without_mask(s, why)
        out.append(s)
    return out


def _unreadable(bad, samples) -> BadInputError:
    """One error for all the failures ``bad`` [(index, BadInputError)] among ``samples``: each file with its
    reason (and its own fix when it is not the usual re-export/remove), at most `MAX_LISTED` of them."""
    lines = []
    for i, e in bad[:MAX_LISTED]:
        own = e.fix and e.fix != IMAGE_FIX
        lines.append(f"  {e.path or samples[i].path}: {e.reason}" + (f" (fix: {e.fix})" if own else ""))
    if len(bad) > MAX_LISTED:
        lines.append(f"  and {len(bad) - MAX_LISTED} more")
    n, masks = len(bad), sum(getattr(e, "of_mask", False) for _, e in bad)
    what = (f"{'is' if n == 1 else 'are'} unreadable" if not masks else
            f"{'has a mask' if n == 1 else 'have masks'} that cannot be used" if masks == n else
            f"cannot be used ({n - masks} unreadable, {masks} with a mask that cannot be used)")
    return BadInputError(f"{n} of {len(samples)} images {what}:\n" + "\n".join(lines),
                         fix="re-export or remove them (a mask: as its line says), or pass --skip-bad to leave them out with "
                             "a warning each (a mask that cannot be used: only the mask)")


class ImageDataset(torch.utils.data.Dataset):
    """Images (or tiles of images) of ``samples`` as normalised tensors; see the module docstring."""

    def __init__(self, samples, image_size=256, tile=None, overlap: int = 0,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), skip_bad: bool = False,
                 min_side: int = MIN_SIDE, mask_resize: str = "nearest"):
        """``mask_resize``: "nearest" (nearest-exact; the masks metrics are scored on) or "any" (a resized pixel is
        defect when any pixel of the mask it covers is: supervised training, where nearest-exact emptied thin
        defects' masks and their images trained as normal ones; an audit, session 52)."""
        if mask_resize not in ("nearest", "any"):
            raise ValueError(f"mask_resize must be 'nearest' or 'any', got {mask_resize!r}")
        self.mask_resize = mask_resize
        self.samples = list(samples)
        self.image_size, self.tile, self.overlap = _pair(image_size), _pair(tile), overlap
        self.min_side = min_side
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._tile_index = None
        self._cache = None  # (sample index, image, mask): consecutive tiles share one decode
        # every image is checked up front (header + verify, no decode), with or without skip_bad
        self._sizes, self.skipped = check_samples(self.samples, min_side, skip_bad)
        self.kept = list(self._sizes)  # indices into `samples` actually served
        note = squash_note(self.samples, self._sizes, self.image_size, self.tile)
        if note and note[1] not in _SQUASH_WARNED:
            _SQUASH_WARNED.add(note[1])
            warnings.warn(note[0])

    @property
    def tile_index(self) -> list[tuple[int, TileGrid, int]]:
        """Item → (sample index, TileGrid of that image, tile number). Built on first use from the checked sizes."""
        if self._tile_index is None:
            index = []
            for i in self.kept:
                h, w = self._sizes[i]
                grid = (TileGrid(h, w, (h, w), [(0, 0)]) if self.tile is None
                        else tile_grid(h, w, self.tile, self.overlap))
                index += [(i, grid, k) for k in range(grid.n)]
            self._tile_index = index
        return self._tile_index

    def __len__(self) -> int:
        return len(self.tile_index) if self.tile else len(self.kept)

    def _load(self, i: int):
        if self._cache is None or self._cache[0] != i:
            s = self.samples[i]
            img = load_image(s.path, self.min_side)
            mask = load_mask(s.mask, size=img.shape[:2], image_path=s.path) if s.mask is not None \
                else np.zeros(img.shape[:2], dtype=bool)
            self._cache = (i, img, mask)
        return self._cache[1], self._cache[2]

    def __getitem__(self, j: int) -> dict:
        if self.tile:
            i, grid, k = self.tile_index[j]
        else:
            i, grid, k = self.kept[j], None, 0
        img, mask = self._load(i)
        if grid is None:
            box = (0, 0) + img.shape[:2]
        else:
            if (grid.h, grid.w) != img.shape[:2]:
                raise BadInputError(f"header says {grid.w}x{grid.h} px but decoded {img.shape[1]}x{img.shape[0]}",
                                    path=self.samples[i].path, fix="re-export the file")
            img, mask = extract_tile(img, grid, k), extract_tile(mask, grid, k)
            box = grid.box(k)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        size = self.image_size
        if size is not None and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            m = (F.adaptive_max_pool2d(m[None], size) if self.mask_resize == "any" else
                 F.interpolate(m[None], size=size, mode="nearest-exact"))[0]
        return {"image": (x - self.mean) / self.std, "mask": m,
                "label": 0 if self.samples[i].is_normal else 1, "index": i,
                "tile": torch.tensor(box, dtype=torch.int64)}
