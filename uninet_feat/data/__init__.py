"""Data layer: decoding files, finding samples in folder layouts, tiling large images, torch datasets.

Public API (see each module for the why):
- images:  `load_image`, `load_mask`, `read_size`, `check_image`
- layouts: `Sample`, `discover`, `discover_batch` (images to score, unlabelled), `select`, `split_train_val`
- tiling:  `TileGrid`, `tile_grid`, `extract_tile`, `extract_tiles`, `stitch`
- dataset: `ImageDataset`
"""
from .dataset import ImageDataset
from .images import check_image, load_image, load_mask, read_size
from .layouts import Sample, discover, discover_batch, select, split_train_val
from .tiling import TileGrid, extract_tile, extract_tiles, stitch, tile_grid

__all__ = ["ImageDataset", "Sample", "TileGrid", "check_image", "discover", "discover_batch", "extract_tile",
           "extract_tiles", "load_image", "load_mask", "read_size", "select", "split_train_val", "stitch", "tile_grid"]
