"""Greedy k-center coreset (PatchCore's memory-bank subsampling).

Why: a kNN memory bank of every normal patch is redundant; k-center greedy keeps the patches that
cover the feature space (it minimises the covering radius within a factor 2), so a 1-10 % bank
scores almost like the full one. Distances are computed after an optional seeded Gaussian random
projection (Johnson-Lindenstrauss: distances are roughly preserved) because each greedy step is a
pass over all n vectors.

Memory: the (projected) float32 matrix plus one n-vector of running minimum distances; the
projection is applied in chunks so a 10^6 × 256 float64/torch input never doubles in size.
Cost: O(n_selected · n · proj_dim); use a GPU (``device='auto'`` picks it) for 10^5+ picks.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError
from ..io import atomic_write
from .index import as_matrix, parse_device

# greedy k-center throughput (multiply-adds/s) on this project's 2-core CPU, for the warning that a coreset will take
# long, not for anything it computes: 4.4e9 for 16,000 picks over 160,000 random 80-d vectors (46 s), 1.6e9 for
# 15,616 over 156,160 magnetic-tile patches projected to 128-d (200 s), 1.7e9 for 62,464 over 624,640 (47 min,
# session 20): the larger figure of the real banks, so that the estimate errs long
CPU_RATE = 2e9


def torch_device(device) -> torch.device:
    """``device`` as `parse_device` reads it, for torch; refuses a GPU torch does not have (a CPU-only build
    fails with a bare AssertionError only once a tensor is moved)."""
    kind, n = parse_device(device)
    have = torch.cuda.device_count() if kind != "cpu" and torch.cuda.is_available() else 0
    if kind == "cpu" or (kind == "auto" and have == 0):
        return torch.device("cpu")
    if have == 0:
        raise BadInputError(f"device={device!r} asked for, but torch sees no GPU (a CPU-only torch build, or no "
                            "CUDA driver)", fix="use device='auto' (the CPU where torch has no GPU) or 'cpu'")
    if n is not None and n >= have:
        raise BadInputError(f"device={device!r} asked for, but torch sees {have} GPU(s)",
                            fix=f"use cuda:0 to cuda:{have - 1}")
    return torch.device("cuda" if n is None else f"cuda:{n}")


def _project(vectors, proj_dim, seed, dev, chunk) -> torch.Tensor:
    """(n, d) → (n, min(d, proj_dim)) float32 on ``dev``, one chunk of rows at a time."""
    n, d = vectors.shape
    if proj_dim is None or proj_dim >= d:
        return torch.as_tensor(as_matrix(vectors)).to(dev)
    rng = np.random.default_rng(seed)
    w = torch.as_tensor((rng.standard_normal((d, proj_dim)) / np.sqrt(proj_dim)).astype(np.float32), device=dev)
    out = torch.empty((n, proj_dim), dtype=torch.float32, device=dev)
    for s in range(0, n, chunk):
        out[s:s + chunk] = torch.as_tensor(as_matrix(vectors[s:s + chunk])).to(dev) @ w
    return out


@torch.no_grad()
def coreset_subsample(vectors, ratio: float | None = 0.1, n: int | None = None, seed: int = 0,
                      proj_dim: int | None = 128, device: str = "auto", chunk: int = 65536,
                      state=None, keep_state: bool = False) -> np.ndarray:
    """Indices (int64, in selection order) of a greedy k-center coreset of ``vectors`` (N, d).

    Keeps ``n`` points if given, else ``ceil(ratio * N)``. The first centre is drawn with ``seed``;
    each next one is the point farthest from all chosen so far (ties: lowest index), so the
    result is deterministic for a given seed and device. ``vectors`` may be numpy, a memmap or a
    torch tensor; it is read chunk by chunk. ``device``: auto, cpu, cuda, cuda:N or gpu (`torch_device`).

    ``state``: a file where the picks so far and the running distances are saved every `STATE_SECONDS`, so that a
    killed selection (an hour on a CPU for 10^5+ picks) resumes from its last save, to the same result, when run
    again on the same vectors and settings (`_resume`); removed when the selection is done, or with ``keep_state``
    saved finished, for the caller to remove once what it builds from the picks is saved (a kill while the index
    is built or written then costs no selection again).
    """
    dev = torch_device(device)   # first: a bad device is refused whatever the vectors
    if not hasattr(vectors, "ndim"):   # a list of rows, as build_index and train_head take
        vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise BadInputError(f"vectors must be (N, d), got shape {tuple(vectors.shape)}")
    if proj_dim is not None and (isinstance(proj_dim, bool) or int(proj_dim) != proj_dim or proj_dim < 1):
        raise BadInputError(f"proj_dim must be a whole number >= 1 or None, got {proj_dim!r}",   # 0: every distance 0
                            fix="e.g. proj_dim=128 (the default), or None to keep every dimension")
    total = vectors.shape[0]
    if total == 0:
        raise BadInputError("no vectors to select a coreset from", fix="pass the normal patches (N >= 1 rows)")
    if n is None:
        if ratio is None or not 0 < ratio <= 1:
            raise BadInputError(f"coreset ratio must be in (0, 1], got {ratio}")
        n = int(np.ceil(ratio * total))
    n = int(n)
    if n < 1:
        raise BadInputError(f"coreset size must be >= 1, got {n}")
    if n >= total:
        return np.arange(total, dtype=np.int64)
    x = _project(vectors, proj_dim, seed, dev, chunk)
    work = float(n) * total * x.shape[1]   # each pick is one pass over all N points: quadratic in N at a fixed ratio
    if dev.type == "cpu" and work / CPU_RATE > 300:
        warnings.warn(f"the coreset of {n:,} of {total:,} vectors will take about {work / CPU_RATE / 60:.0f} min on "
                      f"this CPU (greedy k-center: each pick passes over all {total:,}; measured about "
                      f"{CPU_RATE:.0e} multiply-adds/s here). Fix: a smaller --coreset (0.01), a GPU, or "
                      "--coreset 1 --kind ivfpq (no coreset, compressed)", stacklevel=2)
    sq = (x * x).sum(1)
    chosen = torch.empty(n, dtype=torch.long, device=dev)
    last = torch.as_tensor(int(np.random.default_rng(seed).integers(total)), device=dev)
    mind = torch.full((total,), float("inf"), device=dev)
    start, key, saved = 0, None, time.monotonic()
    if state is not None:
        key = _state_key(x, n, seed, dev)
        start, last, mind = _resume(Path(state), key, chosen, last, mind)
    for i in range(start, n):  # no .item() in the loop: on GPU the whole loop stays asynchronous
        chosen[i] = last
        c = x[last]
        mind = torch.minimum(mind, (sq - 2 * (x @ c) + sq[last]).clamp_min_(0))
        mind.index_fill_(0, last.view(1), -1.0)  # never re-pick a centre, even with duplicates
        last = torch.argmax(mind)
        if state is not None and i % 64 == 63 and time.monotonic() - saved > STATE_SECONDS:
            _save_state(Path(state), key, chosen[:i + 1], last, mind)
            saved = time.monotonic()
    if state is not None and keep_state:
        if start < n:   # else it was read back finished
            _save_state(Path(state), key, chosen, last, mind)
    elif state is not None:
        Path(state).unlink(missing_ok=True)
    return chosen.cpu().numpy()


STATE_SECONDS = 60.0   # a resumable selection saves its picks at most this often (a kill loses at most this much)


def _state_key(x: torch.Tensor, n: int, seed: int, dev) -> str:
    """What a saved selection must match: the projected vectors (a digest of their bytes), n, seed and device."""
    import hashlib
    h = hashlib.sha256(f"{tuple(x.shape)} {n} {seed} {dev.type}".encode())
    for s in range(0, x.shape[0], 1 << 16):
        h.update(x[s:s + (1 << 16)].cpu().numpy().tobytes())
    return h.hexdigest()


def _save_state(path: Path, key: str, chosen, last, mind) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), chosen=chosen.cpu().numpy(), last=last.cpu().numpy(),
                     mind=mind.cpu().numpy())
    atomic_write(path, write)


def _resume(path: Path, key: str, chosen, last, mind):
    """(first pick to make, next centre, running distances): from ``path`` when it holds this selection, else the
    start; a state of other vectors or settings, or an unreadable one, is ignored (and replaced at the next save)."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return 0, last, mind
            done = z["chosen"]
            chosen[:len(done)] = torch.as_tensor(done, device=chosen.device)
            return (len(done), torch.as_tensor(z["last"], device=chosen.device),
                    torch.as_tensor(z["mind"], device=mind.device))
    except Exception:   # missing, truncated, another format: start over
        return 0, last, mind
