"""uninet-feat: UniNet (CVPR 2025) trained as a domain-adapted feature extractor."""
import sys as _sys


class _TorchvisionGuard:
    """Runs `_compat.ensure_torchvision_importable` just before torchvision is first imported, by whoever.

    Why a finder and not a call here: timm, open_clip or a user's script may import torchvision before
    uninet_feat, and PyPI's torchvision then fails beside the CPU torch build. `make setup` imports this package
    at interpreter start (a one-line ``uninet_feat_guard.pth``), which only installs this finder: torch is not
    imported until torchvision is."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if self in _sys.meta_path:
                _sys.meta_path.remove(self)
            from ._compat import ensure_torchvision_importable
            ensure_torchvision_importable()
        return None   # the regular finders import it


if "torchvision" not in _sys.modules and not any(isinstance(f, _TorchvisionGuard) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _TorchvisionGuard())

__version__ = "0.1.0"
