"""Import guard for PyPI's torchvision beside a CPU-only torch build.

torchvision 0.28's CUDA-built `_C.so` fails to load beside the CPU torch 2.13.0 build, so the
`torchvision::nms`/`qnms` schemas are never defined and `import torchvision` raises "operator
torchvision::nms does not exist" while registering their fake kernels. timm and open_clip import
torchvision, so before they do we try torchvision's own extension first and, only when it cannot
load, define the two schemas ourselves (detection ops stay unavailable; UniNet never uses them).
A working torchvision (CUDA torch, or a matching CPU build) is left untouched.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None
_DONE = False


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._get_schema(qualname, "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> None:
    global _LIB, _DONE
    if _DONE:
        return
    _DONE = True
    if all(_has_schema(f"torchvision::{n}") for n in _SCHEMAS):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for so in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(so)
        except (OSError, RuntimeError):
            pass
    missing = [n for n in _SCHEMAS if not _has_schema(f"torchvision::{n}")]
    if missing:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
        for n in missing:
            _LIB.define(_SCHEMAS[n])


GUARD_PTH = "uninet_feat_guard.pth"
# a .pth line that starts with "import" is run at interpreter start; without the package (uninstalled) it does nothing
GUARD_LINE = "import importlib.util as u; u.find_spec('uninet_feat') and __import__('uninet_feat')\n"


def install_startup_guard(site_packages: str | None = None) -> str:
    """Write ``uninet_feat_guard.pth`` into ``site_packages`` (default: this interpreter's), so that every Python
    of that environment installs the torchvision guard at start (`uninet_feat._TorchvisionGuard`) and
    ``import timm`` / ``open_clip`` / ``torchvision`` works before ``import uninet_feat``. Returns its path."""
    import sysconfig
    from pathlib import Path
    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / GUARD_PTH
    path.write_text(GUARD_LINE)
    return str(path)
