"""Fused math for UniNet with torch references. Backends are chosen in ``_dispatch`` (env UNINET_KERNELS).

Triton is imported lazily, only when the triton backend runs, so this package imports without it.
"""
from ._dispatch import resolve_backend, triton_available
from .similarity_lse import similarity_backend, similarity_lse, similarity_lse_chunked, similarity_lse_naive
from .wdm import anomaly_map_wdm

__all__ = [
    "resolve_backend", "triton_available",
    "similarity_backend", "similarity_lse", "similarity_lse_chunked", "similarity_lse_naive",
    "anomaly_map_wdm",
]
