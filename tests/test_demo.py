"""The built-in demo end to end (`make demo` runs it with 8 epochs): its outputs, and a re-run into its folder."""
import json

import pytest
import yaml

from uninet_feat.demo import run_demo


def test_demo_writes_its_outputs_and_a_rerun_reuses_its_run_saying_so(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out, epochs=1, quiet=True)
    for name in ("metrics.json", "scores.csv", "report.html", "run/model.pt", "knn/knn.json",
                 "head_defect_type/head.json"):
        assert (out / name).exists(), name
    for sub, command in (("", "demo"), ("features", "extract"), ("knn", "index"), ("head_defect_type", "train-head")):
        assert (out / sub / "env.json").exists(), sub   # every output folder says how it was made
        assert yaml.safe_load((out / sub / "config.yaml").read_text())["command"] == command, sub
    calibration = json.loads((out / "run" / "calibration.json").read_text())
    for key in ("pixel_map_choice", "image_score_choice"):   # both made after training, on synthetic defects
        assert calibration[key]["synthetic_kinds"] and "rule" in calibration[key], key
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_score"] == calibration["image_score"] or \
        metrics["image_score"].startswith(calibration["image_score"] + ":")
    assert 0 <= metrics["image_auroc"] <= 1 and first["image_auroc"] == metrics["image_auroc"]
    assert "pixel_auroc" in metrics and "aupro" in metrics   # the synthetic weaves have masks
    with pytest.warns(UserWarning, match=r"finished demo run of 1 epochs, reused as it is: --epochs 2"):
        again = run_demo(out, epochs=2, quiet=True)
    assert again["image_auroc"] == first["image_auroc"]
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1   # the run's, not the 2 asked
    from uninet_feat.calibration import recalibrate
    recalibrate(out / "run", map_levels=[3])   # calibrate on the demo's run, as docs suggest: its features then differ
    third = run_demo(out, quiet=True)          # refused at extract before: the store held another calibration's
    assert third["features_of"]["calibration.json"] != again["features_of"]["calibration.json"]
    assert third["features_of"]["model.pt"] == again["features_of"]["model.pt"]

