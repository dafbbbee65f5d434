"""How well does label-free epoch selection track the test metrics? A report; it chooses nothing.

    python -m benchmarks.selection_curve --run RUN [--json out.json]

``RUN`` was trained with ``--select synthetic --keep-every N``: its log holds the synthetic-validation
score of every validated epoch and ``epochs/epoch_NNN.pt`` the kept models. For each kept epoch (and
``model.pt``, the selected one) this evaluates the test split exactly as ``uninet-feat evaluate`` does,
and prints one row per epoch plus the Spearman rank correlation, across the kept epochs, between the
synthetic score and each test metric. The test figures judge the selection rule after the fact; no
setting of the rule or of the run may be chosen from them. Each row names its pixel map and image score: model.pt
is scored with its calibrated ones, a kept epoch with the method's (every level raw, the WDM), as `evaluate
--checkpoint` scores it, so compare pixel figures between `selected` and a kept row only where the two agree.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import uninet_feat  # noqa: F401
from uninet_feat.evaluate import evaluate

METRICS = ("image_auroc", "pixel_auroc", "aupro", "mean_image_auroc")   # the mean over groups: multi-class runs


def curve(run: Path, threads: int | None = None) -> dict:
    log = {r["epoch"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}
    kept = sorted((run / "epochs").glob("epoch_*.pt"))
    if not kept:
        raise SystemExit(f"{run}/epochs holds no kept models: train with --keep-every N")
    rows = []
    for path in kept + [run / "model.pt"]:
        rep = evaluate(run, checkpoint=path, quiet=True, overrides={"threads": threads})
        e = rep["epoch"]
        # each row names its pixel map: model.pt is scored with its calibrated one (map_levels: auto...), a kept
        # epoch with every level raw (as `evaluate --checkpoint`), so the same weights differ in pixel figures
        # between `selected` and a kept row (an audit, session 53)
        rows.append({"model": path.name, "epoch": e, "synthetic": log.get(e, {}).get("val_synthetic_score"),
                     **{m: rep.get(m) for m in METRICS}, "pixel_map": rep.get("pixel_map"),
                     "image_score": rep.get("image_score")})
        if "per_group" in rep:
            rows[-1]["per_group_image_auroc"] = {g: v.get("image_auroc") for g, v in rep["per_group"].items()}
        print(json.dumps(rows[-1]), flush=True)
    both = [r for r in rows[:-1] if r["synthetic"] is not None]
    corr = {}
    for m in METRICS:
        pairs = [(r["synthetic"], r[m]) for r in both if r[m] is not None]
        if len(pairs) >= 3:
            corr[m] = float(spearmanr(*np.array(pairs).T).statistic)
    last = max(rows[:-1], key=lambda r: r["epoch"])
    out = {"run": str(run), "rows": rows, "selected": rows[-1], "last_kept": last, "spearman_synthetic_vs_test": corr}
    if not corr:   # said, not an empty {} with no reason
        out["spearman_note"] = (f"needs >= 3 kept epochs with a synthetic score, got {len(both)}: train with "
                                "--select synthetic --keep-every N over more epochs")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res = curve(args.run, args.threads)
    if args.json:
        from uninet_feat.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
