"""Defect types without labels: k-means over the defect descriptors of flagged images, k by silhouette.

Why: a line's engineer has hundreds of flagged images and no defect-type labels. Naming a handful of
clusters, each shown by its most typical images, is minutes of work where labelling every image is hours,
and the named clusters become labels for a LightGBM head (``train-head --labels``).

How: the rows are standardised (trees would not need it, distances do), reduced by PCA to at most
``n_components`` dimensions (the descriptors hold hundreds of correlated channels; k-means in that space
follows their noise), and clustered by k-means (``n_init=10``). With ``k="auto"`` each k from 2 to ``k_max``
is tried and the one with the highest silhouette is kept: a choice made without labels. Each cluster's
*exemplar* is its row closest to its centre, the image to look at first.

``label_agreement`` measures a clustering against labels when a data set has them (figures only: nothing here
is chosen on them), including what naming only the k exemplars would give, beside k random images labelled and
their labels passed to each row's nearest labelled neighbour in the same space.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError

MIN_ROWS = 4   # two clusters of two


@dataclass
class Clustering:
    labels: np.ndarray          # (n,) cluster of each row, 0 = the largest cluster
    distance: np.ndarray        # (n,) distance to its cluster's centre (PCA space)
    exemplars: list             # per cluster: row indices, closest to the centre first
    k: int
    silhouettes: dict = field(default_factory=dict)   # {k: mean silhouette} of every k tried
    embedding: np.ndarray | None = None                 # (n, d) the standardised PCA space
    explained_variance: float = float("nan")            # share of the standardised variance the PCA keeps


def _embed(X: np.ndarray, n_components: int, seed: int, blocks=None) -> tuple[np.ndarray, float]:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    Z = StandardScaler().fit_transform(X.astype(np.float64))
    live = Z.std(0) > 0   # a constant column carries nothing (and scales to 0 anyway)
    if blocks is not None:   # each block's columns share one unit of variance
        b = np.asarray(blocks)
        size = {k: int((live & (b == k)).sum()) for k in set(b.tolist())}
        Z = Z / np.sqrt(np.array([max(size[k], 1) for k in b]))
    Z = Z[:, live]
    if Z.shape[1] == 0:
        raise BadInputError("every descriptor column is the same in all rows: nothing tells the images apart",
                            fix="cluster more varied images, or pass --columns all")
    d = int(min(n_components, Z.shape[0] - 1, Z.shape[1]))
    pca = PCA(n_components=d, random_state=seed).fit(Z)
    return pca.transform(Z), float(pca.explained_variance_ratio_.sum())


def cluster_vectors(X, k="auto", k_max: int = 10, seed: int = 0, n_components: int = 16, blocks=None) -> Clustering:
    """Cluster the rows of ``X`` (n, d): ``k`` an int, or ``"auto"`` (silhouette over 2..min(k_max, n // 2)).
    ``blocks`` (a name per column): each block is given the same total variance, so that 176 channels of one kind
    of feature do not outweigh 8 numbers of another (the hot region's shape) in the PCA."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    X = np.asarray(X)
    if X.ndim != 2:   # a single vector is not "too few images"
        raise BadInputError(f"the vectors to cluster must be a 2-D array (one row per image), not one of shape "
                            f"{X.shape}", fix="pass an (images, columns) array, one row per image")
    if len(X) < MIN_ROWS:
        raise BadInputError(f"{len(X)} image(s) to cluster; at least {MIN_ROWS} are needed",
                            fix="cluster more images (e.g. a lower --threshold in predict flags more)")
    bad = np.flatnonzero(~np.isfinite(X).all(1))
    if len(bad):
        raise BadInputError(f"{len(bad)} row(s) hold NaN or infinite values (first: row {bad[0]})",
                            fix="re-extract those images; a NaN vector comes from a NaN image or model")
    if blocks is not None and len(blocks) != X.shape[1]:
        raise ValueError(f"{len(blocks)} block names for {X.shape[1]} columns")
    Z, kept = _embed(X, n_components, seed, blocks)
    # identical points (an image copied under another name, or rows that differ only in what the PCA drops) are
    # one point: k-means can make no more clusters, and an empty one broke the renumbering (IndexError). Counted
    # in Z, where k-means runs, rounded so that the PCA's float noise does not tell copies apart.
    distinct = len(np.unique(np.round(Z / max(float(np.abs(Z).max()), 1e-300), 9), axis=0))
    collapsed = distinct < len(np.unique(X, axis=0))
    hi = min(int(k_max), len(X) // 2, distinct)
    if k == "auto":
        if hi < 2:
            raise BadInputError(f"--max-k {k_max} leaves no k of 2 or more to try", fix="--max-k 2 or more")
        tried = range(2, hi + 1)
    else:
        k = int(k)
        if not 2 <= k <= len(X) - 1:
            raise BadInputError(f"--k {k} for {len(X)} images: k must be from 2 to {len(X) - 1}",
                                fix="a smaller --k, or --k auto")
        if k > distinct:
            why = (f"points in the {Z.shape[1]}-dimensional PCA space (rows that differ only in what it drops "
                   "coincide)" if collapsed else "(the others repeat one of them exactly: the same image under two "
                   "names?)")
            raise BadInputError(f"--k {k} for {len(X)} images of which only {distinct} distinct {why}",
                                fix=f"--k {distinct} or less, or --k auto")
        tried = [k]
    sil, fits = {}, {}
    for kk in tried:
        km = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(Z)
        fits[kk] = km
        sil[kk] = float(silhouette_score(Z, km.labels_)) if len(set(km.labels_)) > 1 else -1.0
    best = max(sil, key=lambda kk: (sil[kk], -kk))   # ties: the fewer clusters
    km = fits[best]
    # renumber by size (largest first; ties by the smallest row index), so cluster ids do not follow k-means' seed
    sizes = np.bincount(km.labels_, minlength=best)
    first = [int(np.flatnonzero(km.labels_ == c)[0]) for c in range(best)]
    order = sorted(range(best), key=lambda c: (-sizes[c], first[c]))
    relabel = np.empty(best, int)
    relabel[order] = np.arange(best)
    labels = relabel[km.labels_]
    centres = km.cluster_centers_[order]
    dist = np.linalg.norm(Z - centres[labels], axis=1)
    exemplars = [[int(i) for i in sorted(np.flatnonzero(labels == c), key=lambda i: (dist[i], i))]
                 for c in range(best)]
    return Clustering(labels, dist, exemplars, best, sil, Z, kept)


def label_agreement(clustering: Clustering, truth, n_random: int = 20, seed: int = 0) -> dict:
    """How well the clusters match known labels: adjusted Rand index, normalised mutual information, purity
    (each cluster counted as its commonest label), and the accuracy of two ways to spend k labels: naming each
    cluster by its exemplar's label, or labelling k random images and giving every row its nearest labelled
    row's label (mean over ``n_random`` draws)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    truth = np.asarray(truth).astype(str)
    pred, Z, k = clustering.labels, clustering.embedding, clustering.k
    purity = sum(np.unique(truth[pred == c], return_counts=True)[1].max() for c in range(k)) / len(truth)
    named = np.array([truth[clustering.exemplars[c][0]] for c in range(k)])[pred]
    rng = np.random.default_rng(seed)
    rand_acc = []
    for _ in range(n_random):
        pick = rng.choice(len(truth), size=k, replace=False)
        near = np.argmin(((Z[:, None, :] - Z[pick][None]) ** 2).sum(-1), axis=1)
        rand_acc.append(float((truth[pick][near] == truth).mean()))
    return {"n": int(len(truth)), "n_labels": int(len(set(truth))), "ari": float(adjusted_rand_score(truth, pred)),
            "nmi": float(normalized_mutual_info_score(truth, pred)), "purity": float(purity),
            "exemplar_named_accuracy": float((named == truth).mean()),
            "random_k_labelled_accuracy": float(np.mean(rand_acc)),
            "majority_label_accuracy": float(np.unique(truth, return_counts=True)[1].max() / len(truth))}
