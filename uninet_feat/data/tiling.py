"""Tiling large images (e.g. 4096×256 fabric strips) into fixed-size tiles, and stitching per-tile maps back.

Why tiles rather than a resize: a defect a few pixels wide on a 4096-px strip vanishes when the
strip is squeezed to 256 px. Tiles keep native resolution.

Placement: tiles step by ``tile - overlap``; the last tile of each axis is shifted back so that it
ends exactly at the border. So tiles never hang over the edge and nothing is padded — except when
the image is *smaller* than a tile along an axis. Then the image is padded at the bottom/right by
mirror reflection (``grid.pad``), tile coordinates stay in original pixels (a tile's extent then
runs past the border by the pad), and `stitch` crops the padding off again. Padding is chosen
over resizing so that pixel scales stay identical between small and large images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one ``h × w`` image lie: top-left ``origins`` (y, x) of ``tile=(th, tw)`` tiles."""

    h: int
    w: int
    tile: tuple[int, int]
    origins: list[tuple[int, int]] = field(default_factory=list)
    overlap: int = 0
    pad: tuple[int, int] = (0, 0)  # (bottom, right) reflection padding, non-zero only when h or w < tile

    @property
    def n(self) -> int:
        return len(self.origins)

    def __len__(self) -> int:
        return len(self.origins)

    @property
    def canvas(self) -> tuple[int, int]:
        """Size of the (possibly padded) image the tiles are cut from."""
        return self.h + self.pad[0], self.w + self.pad[1]

    def box(self, k: int) -> tuple[int, int, int, int]:
        """Tile ``k`` as (y, x, h, w) in original pixel coordinates."""
        y, x = self.origins[k]
        return y, x, self.tile[0], self.tile[1]

    def valid_box(self, k: int) -> tuple[int, int, int, int]:
        """`box` less the mirrored padding: the part of tile ``k`` that is the image (all of it unless the image is
        smaller than a tile)."""
        y, x = self.origins[k]
        return y, x, min(self.tile[0], self.h - y), min(self.tile[1], self.w - x)


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def tile_grid(h: int, w: int, tile, overlap: int = 0) -> TileGrid:
    """Grid of ``tile`` (int or (th, tw)) tiles covering an ``h × w`` image, row-major order."""
    th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    if th < 1 or tw < 1 or h < 1 or w < 1:
        raise BadInputError(f"bad tiling: image {h}x{w}, tile {th}x{tw}", fix="use positive sizes")
    if not 0 <= overlap < min(th, tw):
        raise BadInputError(f"tile overlap {overlap} must be in [0, {min(th, tw)})",
                            fix="use an overlap smaller than the tile, e.g. tile // 4")
    ys, xs = _starts(h, th, th - overlap), _starts(w, tw, tw - overlap)
    return TileGrid(h, w, (th, tw), [(y, x) for y in ys for x in xs], overlap,
                    (max(0, th - h), max(0, tw - w)))


def _reflect(n_out: int, n: int) -> np.ndarray:
    """Indices 0..n_out-1 folded into 0..n-1 by mirror reflection (edge pixel not repeated)."""
    i = np.arange(n_out)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = i % period
    return np.where(i < n, i, period - i)


def extract_tile(img, grid: TileGrid, k: int):
    """Tile ``k`` of ``img``: numpy (H, W[, C]) → (th, tw[, C]); torch (C, H, W) → (C, th, tw)."""
    is_np = isinstance(img, np.ndarray)
    hw = tuple(img.shape[:2] if is_np else img.shape[-2:])
    if hw != (grid.h, grid.w):
        raise ValueError(f"image is {hw[0]}x{hw[1]} but the grid was built for {grid.h}x{grid.w}")
    y, x, th, tw = grid.box(k)
    if grid.pad == (0, 0):
        return img[y:y + th, x:x + tw] if is_np else img[..., y:y + th, x:x + tw]
    rows, cols = _reflect(y + th, grid.h)[y:], _reflect(x + tw, grid.w)[x:]
    if is_np:
        return img[np.ix_(rows, cols)]
    import torch
    return img.index_select(-2, torch.as_tensor(rows)).index_select(-1, torch.as_tensor(cols))


def extract_tiles(img, grid: TileGrid):
    """All of ``grid``'s tiles: numpy (H, W[, C]) → (n, th, tw[, C]); torch (C, H, W) → (n, C, th, tw)."""
    tiles = [extract_tile(img, grid, k) for k in range(grid.n)]
    if isinstance(img, np.ndarray):
        return np.stack(tiles)
    import torch
    return torch.stack(tiles)


def stitch(maps, grid: TileGrid, reduce: str = "mean") -> np.ndarray:
    """Per-tile maps (n, th, tw[, C]) → one (H, W[, C]) float32 map; overlaps are averaged or max-ed.

    Accumulates in float64, so stitching tiles cut from an image gives the image back exactly.
    """
    maps = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps)
    th, tw = grid.tile
    if maps.shape[0] != grid.n or maps.shape[1:3] != (th, tw):
        raise ValueError(f"maps of shape {maps.shape} do not fit a grid of {grid.n} tiles of {th}x{tw}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    ch, cw = grid.canvas
    extra = maps.shape[3:]
    if reduce == "mean":
        acc, cnt = np.zeros((ch, cw) + extra), np.zeros((ch, cw) + (1,) * len(extra))
        for m, (y, x) in zip(maps, grid.origins):
            acc[y:y + th, x:x + tw] += m
            cnt[y:y + th, x:x + tw] += 1
        out = acc / cnt
    else:
        out = np.full((ch, cw) + extra, -np.inf)
        for m, (y, x) in zip(maps, grid.origins):
            np.maximum(out[y:y + th, x:x + tw], m, out=out[y:y + th, x:x + tw])
    return out[:grid.h, :grid.w].astype(np.float32)


TILE_SCORES = ("max", "mean")


def tile_score_reducer(rule: str = "max"):
    """How an image's score comes from its tiles' scores (config ``tile_score``): the highest tile (a defect
    in any tile makes the image defective; the default) or their mean. One function, so that calibration,
    evaluate and predict score an image the same way and a threshold keeps its meaning."""
    if rule not in TILE_SCORES:   # a run trained before the word was checked: any word but max meant the mean
        import warnings            # (new configs are refused in config.load_config)
        warnings.warn(f"tile_score {rule!r} is not max or mean; this run was trained and calibrated when any other "
                      "word meant the mean, so it is scored by the mean of its tiles", stacklevel=2)
    return np.max if rule == "max" else np.mean
