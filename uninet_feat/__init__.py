"""uninet-feat: UniNet (CVPR 2025) trained as a domain-adapted feature extractor."""
from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
