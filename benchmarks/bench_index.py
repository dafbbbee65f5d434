"""Flat vs IVF-PQ vs HNSW on clustered synthetic vectors: recall@1 against flat, query time per 1k
queries, build time, serialized size. Prints one JSON object.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_index [--n 200000 --d 128 --nq 1000]

Data: ``clusters`` Gaussian centres, each with its own random ``rank``-dimensional spread plus
small isotropic noise - closer to exported CNN features (low intrinsic dimension, clustered by
texture) than i.i.d. Gaussians, on which every approximate index looks bad.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np

from uninet_feat.downstream import build_index, search


def clustered(n, d, clusters, rank, noise, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 4
    lab = rng.integers(clusters, size=n)
    x = np.empty((n, d), np.float32)
    for c in range(clusters):  # per cluster: no (n, rank, d) temporary
        idx = np.flatnonzero(lab == c)
        basis = rng.standard_normal((rank, d))
        x[idx] = centres[c] + rng.standard_normal((len(idx), rank)) @ basis + noise * rng.standard_normal((len(idx), d))
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--kinds", default="flat,ivfpq,hnsw")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    x = clustered(a.n + a.nq, a.d, a.clusters, a.rank, a.noise, a.seed)
    base, q = x[:a.n], x[a.n:]
    out = dict(n=a.n, d=a.d, nq=a.nq, clusters=a.clusters, rank=a.rank, noise=a.noise, faiss=faiss.__version__,
               threads=faiss.omp_get_max_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"), results={})
    ref = None
    for kind in a.kinds.split(","):
        t0 = time.perf_counter()
        index = build_index(base, kind, device="cpu", seed=a.seed)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, lab = search(index, q, 10)
        query_s = time.perf_counter() - t0
        if kind == "flat":
            ref = lab[:, 0]
        r = dict(build_s=round(build_s, 3), query_ms_per_1k=round(1000 * query_s * 1000 / a.nq, 2),
                 bytes=int(faiss.serialize_index(index).nbytes))
        if ref is not None:
            r["recall@1"] = float((lab[:, 0] == ref).mean())
            r["recall_1@10"] = float((lab == ref[:, None]).any(1).mean())
        if kind == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            r.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe), m_pq=int(faiss.downcast_index(ivf).pq.M))
        elif kind == "hnsw":
            r.update(M=32, efSearch=int(faiss.downcast_index(index).hnsw.efSearch))
        out["results"][kind] = r
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
