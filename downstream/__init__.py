"""Downstream of exported features: FAISS indices, PatchCore-style kNN scoring, LightGBM heads.

Flat public surface (like faiss's and LightGBM's sklearn API):

* ``build_index``, ``search``, ``save_index``, ``load_index`` - faiss flat / IVF-PQ / HNSW
* ``coreset_subsample`` - greedy k-center memory-bank subsampling
* ``KNNScorer``, ``knn_scores`` - patch kNN anomaly maps and image scores
* ``train_head`` → ``HeadResult`` (``.head`` is a ``Head``), ``Head.load``
"""
from .coreset import coreset_subsample
from .head import Head, HeadResult, train_head
from .index import build_index, load_index, save_index, search
from .knn import KNNScorer, knn_scores

__all__ = ["build_index", "search", "save_index", "load_index", "coreset_subsample", "KNNScorer", "knn_scores",
           "train_head", "Head", "HeadResult"]
