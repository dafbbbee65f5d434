"""FAISS indices over exported feature vectors: build, search, save, load.

Everything goes through faiss's own ``index_factory`` strings and ``ParameterSpace`` so an index
built here is an ordinary faiss index that any faiss user can read. The wrapper adds only what
faiss leaves to the caller: sizing nlist / PQ from the data, a deterministic training subsample,
the CPU/GPU branch (faiss GPU wheels do not fall back to CPU on their own), atomic files, and
clear errors for bad vectors and bad files.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import faiss
import numpy as np

from ..errors import BadInputError
from ..io import atomic_write

KINDS = ("flat", "ivfpq", "hnsw")
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
# Bytes per code that faiss's GPU IVFPQ supports; picking m from these keeps GPU moves working.
_GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 48, 56, 64, 96)


def as_matrix(x, what: str = "vectors", d: int | None = None) -> np.ndarray:
    """C-contiguous float32 (n, d) copy-if-needed of ``x`` (numpy or torch); rejects NaN/Inf rows.

    Features from our extractor never contain NaN/Inf, so any such row means an upstream bug or a
    corrupt file; failing here beats a silently wrong neighbour or split.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise BadInputError(f"{what} must be a 2-D array (n, d), got shape {x.shape}")
    if x.shape[1] == 0:   # faiss takes d = 0 and finds every vector at distance 0
        raise BadInputError(f"{what} have no columns (shape {x.shape})", fix="pass (n, d) vectors with d >= 1")
    if d is not None and x.shape[1] != d:
        raise BadInputError(f"{what} have dimension {x.shape[1]}, expected {d}",
                            fix="use vectors from the same extractor/export as the index or head")
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if bad.size:
        raise BadInputError(
            f"{bad.size} of {len(x)} {what} contain NaN or Inf (rows {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''})", fix="re-export the features; check the model checkpoint")
    return x


def auto_nlist(n: int) -> int:
    """~4·sqrt(n) inverted lists, but never more than n/39: faiss k-means wants >= 39 points per list."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def auto_nprobe(nlist: int) -> int:
    """~sqrt(nlist) lists probed (at least 8): each query scans ~1/sqrt(nlist) of the codes. On the
    clustered benchmark, recall@1 stops improving well below this; PQ error is the ceiling."""
    return max(min(nlist, 8), int(round(math.sqrt(nlist))))


def auto_m_pq(d: int) -> int:
    """PQ sub-quantiser count: the largest m that divides d, is <= d/4 (>= 4 dims per sub-vector)
    and is a code size faiss GPU supports (capped at 64 bytes per vector). A width with no such divisor
    of 8 or more (739, a prime, has only 1) is padded instead: `pq_layout`."""
    return pq_layout(d)[1]


def pq_layout(d: int, m_pq: int | None = None) -> tuple[int, int]:
    """(padded width, m) of an IVF-PQ index over d-dim vectors. The largest GPU code size m <= d/4 (at most
    64 bytes) that divides d; where that leaves fewer than 8 bytes while 8 or more are allowed, d is padded with
    zeros (faiss's ``Pad`` pre-transform) to a multiple of the largest allowed m. Why: the image vectors exported
    here are 4·channels + 35 scalar columns wide, always odd (739 for Lite0), and got m = 1 or 2: a 1-byte code
    for 739 dims, whose 10 hits held the true nearest neighbour for 28 % of queries, 99.9 % padded
    (`benchmarks.bench_index --d 739`). A given ``m_pq`` that does not divide d is padded to a multiple of it."""
    if m_pq is not None:
        m = int(m_pq)
        if m < 1:
            raise BadInputError(f"m_pq must be >= 1, got {m_pq}", fix="e.g. m_pq=8, or leave it unset")
        return -(-d // m) * m, m
    cap = max(1, min(64, d // 4))
    allowed = [m for m in _GPU_PQ_M if m <= cap]
    divisor = max(m for m in allowed if d % m == 0)
    if divisor >= min(8, max(allowed)):
        return d, divisor
    m = max(allowed)
    return -(-d // m) * m, m


def factory_string(kind: str, d: int, n: int, nlist=None, m_pq=None, nbits=8, hnsw_m=32) -> str:
    """The faiss ``index_factory`` description for ``kind`` sized for n vectors of dimension d."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{int(hnsw_m)},Flat"
    if kind == "ivfpq":
        d_pad, m = pq_layout(d, m_pq)
        # "np": no polysemous training - index_factory turns it on by default and it only helps
        # polysemous Hamming filtering (which we never use), at ~10x the training time.
        pad = f"Pad{d_pad}," if d_pad > d else ""
        return f"{pad}IVF{auto_nlist(n) if nlist is None else int(nlist)},PQ{m}x{int(nbits)}np"
    raise BadInputError(f"unknown index kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")


def _gpu_count() -> int:
    """0 on faiss-cpu builds (which may lack the symbol altogether) and on machines without a GPU."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "index_cpu_to_all_gpus") else 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime counts as "no GPU"
        return 0


_DEVICES = "auto, cpu, cuda, cuda:N or gpu"


def parse_device(device) -> tuple[str, int | None]:
    """``device`` → ('auto' | 'cpu' | 'gpu', GPU number or None for any / all).

    One reading for both halves of a kNN scorer: torch (the coreset) and faiss (the index) took different names
    ('gpu' only faiss, 'cuda:0' only torch), and a name one half refused failed only after the other half's work."""
    if device in ("auto", "cpu"):
        return device, None
    if device in ("cuda", "gpu"):
        return "gpu", None
    m = re.fullmatch(r"cuda:(\d+)", device) if isinstance(device, str) else None
    if m is None:
        raise BadInputError(f"unknown device {device!r}", fix=f"use {_DEVICES}")
    return "gpu", int(m.group(1))


def faiss_gpus(device) -> list[int] | None:
    """The GPUs faiss puts an index on for ``device``: None for the CPU, else their numbers (all of them for
    auto, cuda and gpu). Refuses a GPU faiss does not have, so that a caller can check before any long work."""
    kind, n = parse_device(device)
    have = 0 if kind == "cpu" else _gpu_count()
    if have == 0:
        if kind == "gpu":
            raise BadInputError(f"device={device!r} asked for, but faiss sees no GPU (a faiss-cpu build?)",
                                fix="install faiss-gpu-cu12, or use device='auto' (the CPU where faiss has no GPU) "
                                    "or 'cpu'")
        return None
    if n is not None and n >= have:
        raise BadInputError(f"device={device!r} asked for, but faiss sees {have} GPU(s)",
                            fix=f"use cuda:0 to cuda:{have - 1}, or cuda for all of them")
    return list(range(have)) if n is None else [n]


def _to_device(index, device: str, kind: str):
    gpus = faiss_gpus(device)
    if gpus is None:
        return index
    if kind == "hnsw":  # faiss has no GPU HNSW; its graph search is CPU-only.
        return index
    try:
        if parse_device(device)[1] is None:
            return faiss.index_cpu_to_all_gpus(index)
        return faiss.index_cpu_to_gpus_list(index, gpus=gpus)
    except Exception as e:  # e.g. a PQ code size the GPU kernels lack
        if device != "auto":
            raise BadInputError(f"faiss could not move this index to the GPU: {e}",
                                fix="use --device cpu, or --device auto to fall back to the CPU") from e
        warnings.warn(f"faiss GPU move failed ({e}); searching on CPU")
        return index


def _check_counts(**given) -> None:
    """Refuse a count below 1 (or not a whole number), and ``nbits`` past 16, before faiss sees it: nlist 0 crashed
    the interpreter (segfault), hnsw_m 0 aborted it on an assertion, ef_search 0 returned wrong neighbours silently
    and nprobe 0 a bare RuntimeError at search time (an audit, session 52)."""
    for name, v in given.items():
        if v is None:
            continue
        if isinstance(v, bool) or not float(v).is_integer() or int(v) < 1:
            raise BadInputError(f"{name} must be a whole number of at least 1, got {v!r}",
                                fix=f"give {name} >= 1, or leave it out for the default")
        if name == "nbits" and int(v) > 16:   # faiss's PQ codes hold at most 16 bits a sub-quantiser
            raise BadInputError(f"nbits must be at most 16, got {v}", fix="use nbits 8 (the default) or fewer")


def set_search_params(index, nprobe=None, ef_search=None):
    """Set nprobe (IVF) / efSearch (HNSW) through faiss's ParameterSpace (CPU or GPU variant)."""
    _check_counts(nprobe=nprobe, ef_search=ef_search)
    ps = faiss.GpuParameterSpace() if is_gpu_index(index) else faiss.ParameterSpace()
    if nprobe is not None:
        ps.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search is not None:
        ps.set_index_parameter(index, "efSearch", int(ef_search))
    return index


def build_index(vectors, kind="flat", metric="l2", nlist=None, m_pq=None, nbits=8, hnsw_m=32,
                ef_search=64, nprobe=None, device="auto", seed=0):
    """Build and fill a faiss index over ``vectors`` (n, d) float32.

    * ``flat``: exact search. ``hnsw``: graph, no training (built single-threaded only if you need
      bit-identical graphs across runs: faiss adds HNSW nodes in parallel). ``ivfpq``: compressed,
      m_pq bytes per vector; nlist defaults to ~4·sqrt(n) (<= n/39), m_pq to ``auto_m_pq(d)``,
      nprobe to ``auto_nprobe(nlist)``.
    * IVF/PQ k-means trains on a subsample of at most 64·nlist (>= 2^nbits·39) rows drawn with
      ``seed``, so builds are reproducible and training cost does not grow with n.
    * GPU: when faiss sees a GPU and ``device`` is auto, cuda or gpu (cuda:N: GPU N only), flat and
      IVFPQ move to all GPUs (trained on CPU, filled on GPU); HNSW stays on CPU.
    """
    faiss_gpus(device)   # a bad device is refused before the training, not after
    _check_counts(nlist=nlist, nbits=nbits, hnsw_m=hnsw_m, ef_search=ef_search, nprobe=nprobe)
    x = as_matrix(vectors)
    n, d = x.shape
    if n == 0:
        raise BadInputError("cannot build an index from zero vectors")
    if metric not in METRICS:
        raise BadInputError(f"unknown metric {metric!r}", fix="use l2 or ip")
    desc = factory_string(kind, d, n, nlist, m_pq, nbits, hnsw_m)
    index = faiss.index_factory(d, desc, METRICS[metric])
    if kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        if n < 2 ** nbits or n < ivf.nlist:
            raise BadInputError(f"ivfpq needs at least max(2^nbits={2 ** nbits}, nlist={ivf.nlist}) vectors, got {n}",
                                fix="`index --kind flat` (or hnsw) for a set this small; in the library kind='flat', "
                                    "or a lower nbits / nlist")
        ivf.cp.seed = seed
        pq = faiss.downcast_index(ivf).pq   # the IVF-PQ under a Pad pre-transform too
        pq.cp.seed = seed
        # faiss prints a line per PQ sub-quantiser when fewer than 39 rows per centroid train it (any bank under
        # 9,984 rows), 8-16 lines a build; the threshold only sets that warning, the training is the same
        pq.cp.min_points_per_centroid = 1
        ivf.cp.min_points_per_centroid = 1
        n_train = min(n, max(64 * ivf.nlist, 39 * 2 ** nbits))
        sub = x if n_train == n else x[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
        index.train(sub)
        set_search_params(index, nprobe=auto_nprobe(ivf.nlist) if nprobe is None else nprobe)
    elif kind == "hnsw":
        set_search_params(index, ef_search=ef_search)
    index = _to_device(index, device, kind)
    index.add(x)
    return index


def is_gpu_index(index) -> bool:
    """True for GpuIndex* and for the replica/shard wrappers ``index_cpu_to_all_gpus`` returns."""
    name = type(index).__name__
    if name.startswith("Gpu"):
        return True
    if isinstance(index, (faiss.IndexReplicas, faiss.IndexShards)) and index.count() > 0:
        return type(faiss.downcast_index(index.at(0))).__name__.startswith("Gpu")
    return False


def search(index, queries, k: int = 1):
    """(distances, labels), both (nq, k), nearest first.

    For metric l2 the distances are plain Euclidean distances (sqrt of faiss's squared L2,
    approximate for IVFPQ); for ip they are inner-product similarities (larger = closer).
    Where fewer than k neighbours exist (k > ntotal, or IVF lists probed too few) the label is -1
    and the distance inf (l2) / -inf (ip).
    """
    q = as_matrix(queries, "queries", d=index.d)
    if index.ntotal == 0:
        raise BadInputError("the index is empty", fix="build it from at least one vector")
    if k < 1:
        raise BadInputError(f"k must be >= 1, got {k}", fix="e.g. k=1")
    dist, labels = index.search(q, int(k))
    missing = labels < 0
    if index.metric_type == faiss.METRIC_L2:
        dist = np.sqrt(np.maximum(dist, 0))
        dist[missing] = np.inf
    else:
        dist[missing] = -np.inf
    return dist, labels


def save_index(index, path) -> None:
    """Write atomically (temp file in the same folder, then os.replace); GPU indices go to CPU first."""
    if is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def load_index(path, device="cpu"):
    """Read an index written by ``save_index`` (or any faiss ``write_index``); optional GPU move."""
    path = os.fspath(path)
    faiss_gpus(device)
    if not os.path.isfile(path):
        raise BadInputError("index file not found", path=path,
                            fix="build and save the index first (check the path)")
    try:
        index = faiss.read_index(path)
    except Exception as e:  # faiss raises RuntimeError with a C++ message for corrupt files
        raise BadInputError(f"not a readable FAISS index ({str(e).strip().splitlines()[-1][:200]})",
                            path=path, fix="the file is corrupt or truncated: rebuild the index") from e
    kind = "hnsw" if isinstance(faiss.downcast_index(index), faiss.IndexHNSW) else "other"
    return _to_device(index, device, kind)
