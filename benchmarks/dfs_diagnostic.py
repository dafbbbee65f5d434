"""Label-free check of DFS modes: does the raw student reproduce the teacher on held-out NORMAL images?

    python -m benchmarks.dfs_diagnostic --data ../shared/data --split-csv ../shared/data/splits/magnetic_tile.csv \
        --modes off learned fixed --epochs 8 --n-train 96 --image-size 128

DFS re-weights the student only in training (X' = X ⊙ softmax_hw(P) ⊙ (θ + g) is compared with the raw
teacher P), while inference compares the raw student X with P. If training moves X away from P's
direction, normal images keep a high 1 − cos at inference. This measures exactly that on validation
normals — no defect labels involved, so it may guide the choice of defaults.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import uninet_feat  # noqa: F401
from uninet_feat.backbones import create_backbone
from uninet_feat.config import load_config
from uninet_feat.data.dataset import ImageDataset
from uninet_feat.model import UniNet
from uninet_feat.runs import load_samples, train_val_samples


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--split-csv")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--modes", nargs="+", default=["off", "learned", "fixed"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=96)
    ap.add_argument("--image-size", type=int, default=128)
    a = ap.parse_args(argv)
    cfg = load_config(None, {"data": a.data, "split_csv": a.split_csv})
    fit, val = train_val_samples(load_samples(cfg), cfg)
    bb = create_backbone(a.backbone, weights="imagenet")
    load = lambda ss: torch.stack([d["image"] for d in ImageDataset(ss, a.image_size, mean=bb.mean, std=bb.std)])
    xs, xv = load(fit[: a.n_train]), load(val[:16])
    res = {}
    for mode in a.modes:
        torch.manual_seed(0)
        m = UniNet(create_backbone(a.backbone, weights="imagenet"), dfs=mode)
        g = m.trainable_groups()
        o1 = torch.optim.AdamW(g["student"], lr=5e-3, weight_decay=1e-5)
        o2 = torch.optim.AdamW(g["target"], lr=1e-6, weight_decay=1e-5)
        t0 = time.time()
        for _ in range(a.epochs):
            perm = torch.randperm(len(xs))
            for b in range(0, len(xs), 8):
                m.train()
                loss = m.loss(m(xs[perm[b:b + 8]]))
                o1.zero_grad(); o2.zero_grad(); loss["loss"].backward(); o1.step(); o2.step()
        m.eval()
        with torch.no_grad():
            out = m(xv)
            d = [float((1 - F.cosine_similarity(t, s, dim=1)).mean()) for t, s in zip(out.teachers, out.students)]
        res[mode] = {"val_normal_1_minus_cos_per_pair": [round(v, 3) for v in d], "mean": round(sum(d) / len(d), 3),
                     "train_cos_term": round(loss["cos"], 3), "seconds": round(time.time() - t0)}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
