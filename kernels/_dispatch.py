"""Choosing a backend for a fused op: explicit argument > env ``UNINET_KERNELS`` > auto.

Names: ``auto``, ``triton``, ``torch`` (alias ``chunked``), ``naive``. Auto picks Triton only for CUDA tensors
when triton imports, and the chunked torch path otherwise, so CPU training never needs triton. Triton on CPU
tensors works only in interpreter mode (``TRITON_INTERPRET=1`` set before the kernel module is imported); that
is for tests, so it must be asked for explicitly.
"""
from __future__ import annotations

import functools
import importlib
import os

ENV_VAR = "UNINET_KERNELS"
_NAMES = {"auto": "auto", "triton": "triton", "torch": "chunked", "chunked": "chunked", "naive": "naive"}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works. Cached: the answer cannot change within a process."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything else at import
        return False
    return True


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET=1 is set (Triton then runs kernels in numpy on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def requested_backend(backend: str | None = None) -> str:
    """The asked-for name ('auto', 'triton', 'chunked', 'naive') before auto is resolved."""
    raw = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = _NAMES.get(str(raw).strip().lower() or "auto")
    if name is None:
        source = "argument backend" if backend is not None else f"env {ENV_VAR}"
        raise ValueError(f"{source}={raw!r} is not a kernel backend; use one of {sorted(_NAMES)}")
    return name


def resolve_backend(tensor, backend: str | None = None) -> str:
    """Return ``'triton'``, ``'chunked'`` or ``'naive'`` for an op on ``tensor``.

    Raises ValueError for an unknown name and RuntimeError when Triton is forced but cannot run here.
    """
    name = requested_backend(backend)
    source = "argument backend" if backend is not None else f"env {ENV_VAR}"
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "chunked"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{source} asks for the triton backend but triton cannot be imported; "
                f"install triton (pip install triton) or set {ENV_VAR}=torch")
        if not tensor.is_cuda and not interpreter_requested():
            raise RuntimeError(
                f"{source} asks for the triton backend on a {tensor.device} tensor; Triton needs a CUDA tensor, "
                f"or TRITON_INTERPRET=1 set before the first kernel import (tests only); or set {ENV_VAR}=torch")
    return name
