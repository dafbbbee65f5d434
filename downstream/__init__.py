"""Downstream of exported features: FAISS indices, PatchCore-style kNN scoring, LightGBM heads.

Flat public surface (like faiss's and LightGBM's sklearn API):

* ``build_index``, ``search``, ``save_index``, ``load_index`` - faiss flat / IVF-PQ / HNSW
* ``coreset_subsample`` - greedy k-center memory-bank subsampling
* ``KNNScorer``, ``knn_scores`` - patch kNN anomaly maps and image scores
* ``train_head`` → ``HeadResult`` (``.head`` is a ``Head``), ``Head.load``
* ``cluster_vectors``, ``label_agreement`` - candidate defect types without labels (k-means, k by silhouette)

The names are imported on first use (PEP 562): ``from uninet_feat.downstream import KNNScorer`` loads faiss
but not LightGBM and scikit-learn (about 1.5 s of imports on 2 CPU cores), and ``predict`` without ``--head``
or ``--knn`` loads neither.
"""
from __future__ import annotations

import importlib

_WHERE = {"coreset_subsample": "coreset", "Head": "head", "HeadResult": "head", "train_head": "head",
          "build_index": "index", "load_index": "index", "save_index": "index", "search": "index",
          "KNNScorer": "knn", "knn_scores": "knn", "cluster_vectors": "cluster", "label_agreement": "cluster"}

__all__ = ["build_index", "search", "save_index", "load_index", "coreset_subsample", "KNNScorer", "knn_scores",
           "train_head", "Head", "HeadResult", "cluster_vectors", "label_agreement"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
