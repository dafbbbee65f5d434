"""PatchCore-style kNN anomaly scoring on exported patch vectors.

A patch is anomalous when it is far from every normal patch seen in training: the score of a
patch is its mean Euclidean distance to the k nearest patches of a (coreset-subsampled) memory
bank of normal patches. The map is the patch grid of scores upsampled bilinearly to the image
size, and the image score is the highest patch score (one bad patch makes a bad image), not the
map's maximum: bilinear upsampling lowers an isolated hot patch, and predict / evaluate score by
the patches (`scorers.knn_scores`). PatchCore's optional neighbourhood reweighting of the image
score is not applied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInputError
from ..io import atomic_write_text
from .coreset import coreset_subsample, torch_device
from .index import KINDS, as_matrix, build_index, faiss_gpus, load_index, save_index, search

_FORMAT = "uninet-feat-knn/1"


def knn_scores(index, queries, k: int = 1) -> np.ndarray:
    """(n,) mean Euclidean distance of each query (n, d) to its k nearest vectors in an l2 index.

    Refuses an inner-product index (its similarities grow as a query looks *more* normal) and a query with
    fewer than k neighbours found (k above the bank's size, or an IVF index probing too few lists), whose score
    would be inf: a wrong anomaly score must not look like a very high one."""
    if index.metric_type != faiss.METRIC_L2:
        raise BadInputError("kNN anomaly scores need an l2 index (distances); this one is inner-product "
                            "(similarities: larger = more normal)", fix="build it with metric='l2'")
    if k > index.ntotal:
        raise BadInputError(f"k = {k} nearest neighbours asked of an index of {index.ntotal} vectors",
                            fix=f"k <= {index.ntotal}, or a larger memory bank")
    dist, labels = search(index, queries, k)
    short = (labels < 0).any(1)
    if short.any():
        said = f"{int(short.sum())} of {len(short)} queries found fewer than k = {k} neighbours"
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):   # was told "an IVF index ... or an HNSW one"
            raise BadInputError(f"{said} (an HNSW graph search reaches fewer than k of its {index.ntotal} vectors "
                                "when k is near their count)", fix="a smaller --k, or an exact index (`uninet-feat "
                                "index --kind flat`)")
        raise BadInputError(f"{said} (an IVF index searched too few of its lists)", fix="search more lists "
                            "(`set_search_params(index, nprobe=N)`, or build_index's nprobe), or a flat or HNSW index "
                            "(`uninet-feat index --kind flat`)")
    return dist.mean(1)


def _flat(vectors, what):
    """(n_images, h*w, d) or (n, d) → (n*, d); also returns the leading shape to restore."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    v = np.asarray(vectors)
    if v.ndim == 3:
        return as_matrix(v.reshape(-1, v.shape[-1]), what), v.shape[:2]
    if v.ndim == 2:
        return as_matrix(v, what), (v.shape[0],)
    raise BadInputError(f"{what} must be (n_images, h*w, d) or (n, d), got shape {v.shape}")


def upsample_scores(scores, grid_hw, out_size) -> np.ndarray:
    """(n, h*w) patch scores → (n, H, W) float32 maps, bilinear from the patch grid (PatchCore's map)."""
    h, w = map(int, grid_hw)
    size = (int(out_size), int(out_size)) if np.isscalar(out_size) else tuple(map(int, out_size))
    return F.interpolate(torch.from_numpy(np.asarray(scores, dtype=np.float32)).view(-1, 1, h, w), size=size,
                         mode="bilinear", align_corners=False)[:, 0].numpy()


class KNNScorer:
    """Memory bank of normal patches + faiss index; ``fit`` then ``score_patches`` / ``score_maps``.

    ``coreset_ratio`` (None or 1 = keep all) subsamples the bank with greedy k-center
    (``coreset_subsample``); ``index_kw`` go to ``build_index`` (e.g. nlist, m_pq, ef_search).
    Deterministic for a given seed with kind='flat' or 'ivfpq'. ``device``: auto, cpu, cuda, cuda:N or gpu,
    checked here against both torch (the coreset) and faiss (the index), so that a device one of them cannot use
    is refused before the coreset (an hour on a CPU for a large bank), not after it.
    """

    def __init__(self, kind="flat", k=1, coreset_ratio=0.1, seed=0, device="auto", proj_dim=128, **index_kw):
        if int(k) < 1:
            raise BadInputError(f"k must be >= 1, got {k}", fix="e.g. --k 1 (the nearest normal patch)")
        if coreset_ratio is not None and not 0 < float(coreset_ratio) <= 1:   # None: keep all
            raise BadInputError(f"the coreset ratio must be in (0, 1], got {coreset_ratio}",
                                fix="e.g. --coreset 0.1 (10 % of the normal patches), or 1 for all of them")
        if kind not in KINDS:   # now, not after the coreset (an hour on a CPU)
            raise BadInputError(f"unknown index kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
        if "metric" in index_kw:
            raise BadInputError("the kNN scorer's index is L2 (PatchCore's distance); metric is not an option here",
                                fix="leave metric out, or use build_index(..., metric='ip') for an index of its own")
        faiss_gpus(device)
        if coreset_ratio is not None and float(coreset_ratio) < 1:
            torch_device(device)
        self.kind, self.k, self.coreset_ratio, self.seed = kind, int(k), coreset_ratio, seed
        self.device, self.proj_dim, self.index_kw = device, proj_dim, index_kw
        self.index = None
        self.n_normal = 0
        self.coreset_device = None   # where the coreset ran ("cpu", "cuda:0"): its picks are the seed's on that kind
        self.source = None   # the feature store's source it was built from (set by save / load)

    def fit(self, normal_patches, state=None, keep_state: bool = False) -> "KNNScorer":
        """``state``: a file that makes the coreset selection resumable (`coreset_subsample`; ``keep_state``: left
        finished for the caller to remove once the scorer is saved)."""
        x, _ = _flat(normal_patches, "normal patch vectors")
        self.n_normal = len(x)
        coreset = self.coreset_ratio is not None and float(self.coreset_ratio) < 1
        bank = int(np.ceil(float(self.coreset_ratio) * len(x))) if coreset else len(x)   # coreset_subsample's size
        if self.k > bank:   # before the coreset; scoring took min(k, bank) unsaid, while knn.json recorded k
            raise BadInputError(f"k = {self.k} nearest neighbours asked of a memory bank of {bank} normal patches"
                                + (f" (a coreset of {self.coreset_ratio} of {len(x)})" if coreset else ""),
                                fix=f"a smaller --k (at most {bank}), or a larger bank: more normal images"
                                    + (", or a larger --coreset" if coreset else ""))
        self.coreset_device = str(torch_device(self.device)) if coreset else None
        if coreset:
            x = x[np.sort(coreset_subsample(x, ratio=self.coreset_ratio, seed=self.seed,
                                            proj_dim=self.proj_dim, device=self.device, state=state,
                                            keep_state=keep_state))]
        self.index = build_index(x, kind=self.kind, metric="l2", device=self.device, seed=self.seed,
                                 **self.index_kw)
        if self.kind != "flat":   # an approximate search that misses neighbours is refused now, not at scoring
            knn_scores(self.index, x[np.linspace(0, len(x) - 1, min(len(x), 64)).astype(int)], self.k)
        return self

    def _need_fit(self):
        if self.index is None:
            raise BadInputError("KNNScorer is not fitted", fix="call fit(normal_patches) or KNNScorer.load(dir)")

    def score_patches(self, test_patches) -> np.ndarray:
        """(n, h*w, d) → (n, h*w) patch scores; (n, d) → (n,)."""
        self._need_fit()
        x, lead = _flat(test_patches, "test patch vectors")
        return knn_scores(self.index, x, self.k).reshape(lead)

    def score_maps(self, test_patches, grid_hw, out_size):
        """(maps (n, H, W) float32 bilinear-upsampled from the (h, w) patch grid, image scores = highest patch
        score): the image score `predict` and `evaluate --knn` give, which the map's max is not (see the top)."""
        h, w = map(int, grid_hw)
        s = self.score_patches(test_patches)
        if s.ndim != 2 or s.shape[1] != h * w:
            raise BadInputError(f"test patches have shape {s.shape} scores, expected (n, {h}*{w})",
                                fix="pass grid_hw matching the exported patch grid")
        maps = upsample_scores(s, (h, w), out_size)
        return maps, s.max(1)

    def save(self, directory, source: dict | None = None) -> Path:
        """``index.faiss`` + ``knn.json`` in ``directory`` (each written atomically).

        ``source``: the feature store's source (run, ``model_sha256``), recorded so that predict can refuse
        an index built from another model's patches (kept from the last ``save`` when not given)."""
        from ..featstore import file_sha256
        self._need_fit()
        d = Path(directory)
        for old in ("knn.json", "ids.json"):   # first: a kill before the new knn.json leaves no stale one beside
            (d / old).unlink(missing_ok=True)   # the new index (nor an image index's ids.json)
        save_index(self.index, d / "index.faiss")
        meta = dict(format=_FORMAT, kind=self.kind, k=self.k, coreset_ratio=self.coreset_ratio, seed=self.seed,
                    proj_dim=self.proj_dim, coreset_device=self.coreset_device, index_kw=self.index_kw,
                    n_normal=self.n_normal,
                    n_memory=int(self.index.ntotal), dim=int(self.index.d),
                    index_sha256=file_sha256(d / "index.faiss"))
        self.source = source if source is not None else self.source
        if self.source is not None:
            meta["source"] = self.source
        atomic_write_text(d / "knn.json", json.dumps(meta, indent=1))
        return d

    @classmethod
    def load(cls, directory, device="auto") -> "KNNScorer":
        d = Path(directory)
        try:
            meta = json.loads((d / "knn.json").read_text())
        except FileNotFoundError as e:
            raise BadInputError("no knn.json here", path=d,
                                fix="pass a folder written by `uninet-feat index --out DIR` (at --level patch)") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInputError("knn.json is corrupt", path=d / "knn.json", fix="save the scorer again") from e
        if meta.get("format") != _FORMAT:
            raise BadInputError(f"unknown kNN format {meta.get('format')!r}", path=d / "knn.json",
                                fix="build the scorer again with this version (`uninet-feat index --level patch`)")
        self = cls(meta["kind"], meta["k"], meta["coreset_ratio"], meta["seed"], device, meta.get("proj_dim", 128),
                   **meta.get("index_kw", {}))
        want = meta.get("index_sha256")   # None: saved before the index was pinned
        if want is not None and (d / "index.faiss").is_file():
            from ..featstore import file_sha256
            if file_sha256(d / "index.faiss") != want:
                raise BadInputError("index.faiss is not the index knn.json was written with (a kill between the "
                                    "two writes, or another index copied in)", path=d,
                                    fix="build it again: `uninet-feat index --features F --out DIR`")
        self.index = load_index(os.fspath(d / "index.faiss"), device=device)
        self.n_normal = meta.get("n_normal", 0)
        self.coreset_device = meta.get("coreset_device")   # None also when saved before session 45
        self.source = meta.get("source")   # None: saved before sources were recorded, or not from a store
        return self
