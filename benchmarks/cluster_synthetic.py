"""Which columns `uninet-feat cluster` should cluster, chosen without labels: synthetic defect kinds.

    python -m benchmarks.cluster_synthetic --run RUN [--kinds all] [--seed 0] --out DIR

Each of the run's validation normals (held out of training), resized to the run's input size, gets one
synthetic defect of every kind (`selection.synthetic_defect`, blended as for the run's label-free choices);
the copies are extracted with the run (`DIR/data/<kind>/`, the normals themselves in `DIR/data/good/`) and
clustered with each column choice (`clusters.cluster_matrix`, and schema 2's spot features), each column
weighted alike or each block of columns alike (`downstream.cluster.cluster_vectors`'s ``blocks``), at k = the
number of kinds and at k auto. The adjusted Rand index against the kinds says which columns group defects by
what they are rather than by the image they are on; no real defect label is read. Writes
``DIR/cluster_synthetic.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import uninet_feat  # noqa: F401
from uninet_feat.calibration import with_calibration_normals
from uninet_feat.normals import validation_normals
from uninet_feat.checkpoint import read_checkpoint
from uninet_feat.clusters import _DESCRIPTOR_V2, block_of, cluster_matrix
from uninet_feat.data.images import load_image
from uninet_feat.downstream.cluster import cluster_vectors, label_agreement
from uninet_feat.errors import BadInputError
from uninet_feat.featstore import FeatureStore, head_columns
from uninet_feat.runs import run_path
from uninet_feat.selection import parse_kinds, synthetic_defect

# (columns, balance): "spots" is schema 2's descriptor set, the spots' own features in place of their differences
CHOICES = (("descriptors", "columns"), ("descriptors", "blocks"), ("spots", "columns"), ("all", "columns"),
           ("all", "blocks"))


def matrix(X, names, columns):
    if columns != "spots":
        return cluster_matrix(X, names, columns)
    cols = [j for j, n in enumerate(names) if _DESCRIPTOR_V2.match(n)]
    return X[:, cols], [block_of(names[j]) for j in cols]


def make_set(run, out: Path, kinds, seed: int) -> Path:
    """The synthetic set's folder (label folders, one per kind, and good/)."""
    path = run_path(run, "model.pt")
    cfg = with_calibration_normals(dict(read_checkpoint(path)["config"]), path.parent)
    size = int(cfg["image_size"])
    rng = np.random.default_rng([seed, 0xC1A55])
    data = out / "data"
    for i, s in enumerate(validation_normals(cfg)):
        full = Image.fromarray(np.round(load_image(s.path, min_side=1) * 255).astype(np.uint8))   # 16-bit scaled
        img = np.asarray(full.resize((size, size), Image.Resampling.LANCZOS))
        name = f"{i:05d}_{Path(s.path).stem}.png"   # numbered: normals of other folders share names (000.png)
        (data / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / "good" / name)
        for kind in kinds:
            try:
                bad, _ = synthetic_defect(img, rng, kinds=(kind,))
            except BadInputError:   # no visible edit of this kind on this image
                continue
            (data / kind).mkdir(exist_ok=True)
            Image.fromarray(bad).save(data / kind / name)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--kinds", default="all", help="synthetic kinds: fabric, all (default) or a list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    kinds = parse_kinds(a.kinds)
    import shutil   # an earlier run's set (other kinds, seed or run) would be clustered with this one's
    for old in (out / "data", out / "features"):
        shutil.rmtree(old, ignore_errors=True)
    data = make_set(a.run, out, kinds, a.seed)
    found = sorted(p.name for p in data.iterdir() if p.is_dir() and p.name != "good")
    if not set(found) <= set(kinds):
        raise SystemExit(f"{data}: kinds {found} found, {list(kinds)} asked")
    from uninet_feat.cli import main as cli
    if cli(["extract", "--run", a.run, "--data", str(data), "--out", str(out / "features"), "--quiet"]) != 0:
        return 1
    store = FeatureStore(out / "features")
    X, recs = store.image_table()
    keep = [j for j, r in enumerate(recs) if not r["is_normal"]]
    truth = [recs[j]["label"] for j in keep]
    names = head_columns(store.manifest["vector_names"])
    res = {"run": a.run, "kinds": list(kinds), "n_images": len(keep), "seed": a.seed, "columns": {}}
    print(f"{len(keep)} synthetic defects of {len(set(truth))} kinds on {len(keep) // len(set(truth))}+ images")
    print(f"{'columns':12} {'balance':8} {'ARI at k=' + str(len(set(truth))):>12} {'NMI':>6} {'k auto':>7} "
          f"{'ARI auto':>9}")
    for c, bal in CHOICES:
        M, blocks = matrix(X[keep], names, c)
        blocks = blocks if bal == "blocks" else None
        fixed = label_agreement(cluster_vectors(M, k=len(set(truth)), seed=a.seed, blocks=blocks), truth,
                                seed=a.seed)
        auto_c = cluster_vectors(M, seed=a.seed, blocks=blocks)
        auto = label_agreement(auto_c, truth, seed=a.seed)
        res["columns"][f"{c}/{bal}"] = {"k_true": fixed, "k_auto": auto_c.k, "auto": auto}
        print(f"{c:12} {bal:8} {fixed['ari']:12.3f} {fixed['nmi']:6.3f} {auto_c.k:7d} {auto['ari']:9.3f}")
    from uninet_feat.io import atomic_write_text
    atomic_write_text(out / "cluster_synthetic.json", json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
