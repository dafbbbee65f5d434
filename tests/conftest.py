"""Shared test fixtures. Keep small: helpers that several test files need."""
import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test module (or
# uninet_feat) imports a kernel: without it a plain `pytest tests` on a machine without a GPU fails the kernel
# tests with "Cannot call @triton.jit'd outside of the scope of a kernel". Set TRITON_INTERPRET=0 on a CUDA
# machine to test the compiled kernels instead of the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import uninet_feat  # noqa: F401  (must precede torchvision/timm imports)

SHARED_DATA = Path(os.environ.get("UNINET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The read-only real data folder (aitex, magnetic_tile, splits); skips the test when absent."""
    if not (SHARED_DATA / "splits").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def write_image(tmp_path):
    """write_image("a/b.png", size=(H, W), mode="RGB", array=None, **save_kw) -> Path under tmp_path.

    Without ``array`` the pixels are random but fixed per file name (reproducible).
    """
    def write(rel, size=(16, 24), mode="RGB", array=None, **save_kw):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if array is None:
            rng = np.random.default_rng(zlib.crc32(str(rel).encode()))
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        img = Image.fromarray(np.asarray(array))
        (img if mode is None or img.mode == mode else img.convert(mode)).save(p, **save_kw)
        return p
    return write


@pytest.fixture(autouse=True)
def _reset_nonbinary_mask_log():
    """Non-binary masks and few-bit 16-bit images warn once per process; each test starts with a fresh count."""
    from uninet_feat.data import images
    images._NONBINARY.clear()
    images._FEW_BITS.clear()
    yield


@pytest.fixture(autouse=True)
def _restore_backbone_registry():
    """Backbones a test registers are gone after it, so no test depends on which ran before (two files both
    register a "broken" factory)."""
    from uninet_feat.backbones import registry
    exact, prefix = dict(registry._EXACT), dict(registry._PREFIX)
    yield
    registry._EXACT.clear()
    registry._EXACT.update(exact)
    registry._PREFIX.clear()
    registry._PREFIX.update(prefix)
