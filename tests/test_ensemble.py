"""Seed ensembles (`uninet_feat.ensemble`): threshold-scaled scores averaged over runs, and what is refused."""
import csv
import json

import numpy as np
import pytest

from _tiny import register_tiny, tiny_train_args, write_texture_set
from uninet_feat import metrics
from uninet_feat.cli import main
from uninet_feat.ensemble import ensemble_scores, evaluate_ensemble
from uninet_feat.errors import BadInputError

register_tiny()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Two runs of one config that differ only in their seed, and a run on other data."""
    root = tmp_path_factory.mktemp("ens")
    data, other = write_texture_set(root / "tex"), write_texture_set(root / "other", seed=5, n_good=3)
    for name, d, seed in (("a", data, 1), ("b", data, 2), ("c", other, 1)):
        assert main(tiny_train_args(d) + ["--epochs", "2", "--seed", str(seed), "--out", str(root / name)]) == 0
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ensemble_averages_each_runs_score_over_its_threshold(seeds, tmp_path):
    runs = [str(seeds / "a"), str(seeds / "b")]
    rep = evaluate_ensemble(runs, json_path=tmp_path / "e.json", csv_path=tmp_path / "e.csv", quiet=True)
    per = []
    for r in runs:   # each run alone, as `uninet-feat evaluate` scores it
        assert main(["evaluate", "--run", r, "--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json"),
                     "--quiet"]) == 0
        thr = json.loads((tmp_path / "r.json").read_text())["threshold"]
        per.append({row["path"]: float(row["score"]) / thr for row in _rows(tmp_path / "r.csv")})
    rows = _rows(tmp_path / "e.csv")
    want = np.array([(per[0][row["path"]] + per[1][row["path"]]) / 2 for row in rows])
    got = np.array([float(row["score"]) for row in rows])
    assert np.allclose(got, want, rtol=1e-5)
    assert per[0] != per[1]                                   # the seeds really differ
    labels = np.array([int(row["is_defect"]) for row in rows])
    assert rep["image_auroc"] == pytest.approx(metrics.image_auroc(labels, want), abs=1e-6)
    assert [int(row["flagged"]) for row in rows] == (want > 1).astype(int).tolist()
    assert rep["at_threshold"]["false_positive_rate"] == pytest.approx(float((want[labels == 0] > 1).mean()))
    assert json.loads((tmp_path / "e.json").read_text())["runs"] == runs
    assert set(rep["per_run_image_auroc"]) == set(runs)


def test_ensemble_refuses_other_test_sets_one_run_and_no_threshold(seeds):
    with pytest.raises(BadInputError, match="scored other test images"):
        evaluate_ensemble([seeds / "a", seeds / "c"], quiet=True)
    with pytest.raises(BadInputError, match="at least two runs"):
        ensemble_scores({"a": {}})
    row = {"path": "x.png", "group": "", "label": "good", "is_defect": 0, "score": "1.0"}
    with pytest.raises(BadInputError, match="no threshold"):
        ensemble_scores({"a": {"_rows": [row], "threshold": 2.0}, "b": {"_rows": [row], "threshold": None}})
    assert main(["ensemble", "--runs", str(seeds / "a"), str(seeds / "c"), "--quiet"]) == 2   # a clear CLI error
