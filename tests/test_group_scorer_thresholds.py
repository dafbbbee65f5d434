"""A run of several groups flags by the kNN, combined and ensemble scores at each group's own threshold, as by WDM
(`thresholds.thresholds_by_group`): those scores of the validation normals also sit at another level per group."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from uninet_feat.backbones import create_backbone
from uninet_feat.thresholds import thresholds_by_group
from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.ensemble import evaluate_ensemble
from uninet_feat.evaluate import evaluate
from uninet_feat.predict import predict_cmd
from uninet_feat.scorers import Reference, flag_threshold
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()


def _edit_images(folder, edit) -> None:
    for p in sorted([*folder.glob("train/*/*.png"), *folder.glob("test/*/*.png")]):   # not the masks
        a = np.asarray(Image.open(p), dtype=np.float64) / 255
        Image.fromarray((np.clip(edit(a), 0, 1) * 255).astype("uint8")).save(p)


def _train(data, out, weights, seed):
    train(load_config(None, {"data": str(data), "backbone": "tiny", "weights": str(weights), "image_size": 32,
                             "epochs": 1, "batch_size": 4, "val_fraction": 0.5, "channels_last": False,
                             "seed": seed}), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    """Two groups with about 25 validation normals each: lineB's images noisier (its normals' kNN and combined scores
    higher), lineA's test set with spots of graded faintness (some between lineA's threshold and the pooled one).
    A run on both and a plain-feature index that holds its validation normals out."""
    root = tmp_path_factory.mktemp("gk")
    data = root / "data"
    for i, g in enumerate(("lineA", "lineB")):
        write_texture_set(data / g, n_train=50, n_good=3, n_bad=3, size=32, seed=i)
    good = np.asarray(Image.open(data / "lineA/test/good/000.png"), dtype=np.float64) / 255
    mask = np.zeros(good.shape, dtype=np.uint8)
    mask[9:23, 9:23] = 255
    for d in ("test/faint", "ground_truth/faint"):
        (data / "lineA" / d).mkdir()
    for j, amp in enumerate(np.linspace(0.1, 0.8, 15)):
        a = good.copy()
        a[9:23, 9:23] += amp
        Image.fromarray((np.clip(a, 0, 1) * 255).astype("uint8")).save(data / f"lineA/test/faint/{j:03d}.png")
        Image.fromarray(mask).save(data / f"lineA/ground_truth/faint/{j:03d}_mask.png")
    rng = np.random.default_rng(0)
    _edit_images(data / "lineB", lambda a: a + rng.normal(0, 0.1, a.shape))
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save(create_backbone("tiny", weights="random").state_dict(), weights)
    run = _train(data, root / "run", weights, 2)
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size", "32",
                 "--patches", "--out", str(root / "plain"), "--quiet"]) == 0
    assert main(["index", "--features", str(root / "plain"), "--coreset", "1.0", "--run", str(run),
                 "--out", str(root / "knn")]) == 0
    return root, data, run, root / "knn"


def _z_rule(rows, run, name) -> dict:
    """Each group's threshold by the z-rule, from the validation normals' ``name`` scores in predict's ``rows``."""
    val = set(json.loads((run / "calibration.json").read_text())["val_paths"])
    s = np.array([r[f"{name}_score"] for r in rows if r["path"] in val])
    g = np.array([r["group"] for r in rows if r["path"] in val])
    assert min((g == k).sum() for k in ("lineA", "lineB")) >= 19   # FEW_NORMALS
    level = {k: (np.median(s[g == k]), np.std(s[g == k], ddof=1)) for k in ("lineA", "lineB")}
    z = np.concatenate([(s[g == k] - m) / sd for k, (m, sd) in level.items()])
    return {k: m + sd * np.quantile(z, 0.99) for k, (m, sd) in level.items()}


@pytest.mark.parametrize("flag_by", ["knn", "combined"])
def test_knn_and_combined_flags_are_per_group(lines, tmp_path, flag_by):
    root, data, run, knn = lines
    res = predict_cmd(run, data, tmp_path / "p", knn=knn, flag_by=flag_by, quiet=True, overlays=False)
    want = _z_rule(res["rows"], run, flag_by)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["group_thresholds_score"] == flag_by and f"{flag_by} scores" in summary["threshold_rule"]
    assert summary["group_thresholds"] == pytest.approx(want, rel=1e-4)
    assert want["lineA"] < res["threshold"]   # the pooled one: about the noisier lineB's top normal
    assert all(r["flagged"] == (r[f"{flag_by}_score"] > want[r["group"]]) for r in res["rows"])
    # a lineA defect its own threshold flags and the pooled one passes
    assert any(r["flagged"] and r[f"{flag_by}_score"] <= res["threshold"]
               for r in res["rows"] if r["group"] == "lineA" and r["label"] == "faint")
    one = predict_cmd(run, data / "lineA" / "test", tmp_path / "q", knn=knn, flag_by=flag_by, quiet=True,
                      overlays=False, group="lineA")
    assert one["threshold"] == pytest.approx(want["lineA"], rel=1e-4) and "group_thresholds" not in one
    assert flag_by in one["threshold_rule"] and one["threshold_rule"].endswith(": lineA")


def test_evaluate_reports_knn_and_combined_at_each_groups_threshold(lines, tmp_path):
    _, data, run, knn = lines
    pred = predict_cmd(run, data, tmp_path / "p", knn=knn, flag_by="combined", quiet=True, overlays=False)
    rep = evaluate(run, knn=knn, quiet=True)
    y = np.array([r["is_defect"] for r in rep["_rows"]])
    g = [r["group"] for r in rep["_rows"]]
    for name in ("knn", "combined"):
        sc = rep["scorers"][name]
        assert sc["group_thresholds"] == pytest.approx(_z_rule(pred["rows"], run, name), rel=1e-4)
        t = np.array([sc["group_thresholds"][k] for k in g])
        flagged = np.array([float(r[f"{name}_score"]) for r in rep["_rows"]]) > t
        assert sc["at_threshold"]["recall_defect"] == pytest.approx(flagged[y == 1].mean())
        assert sc["at_threshold"]["false_positive_rate"] == pytest.approx(flagged[y == 0].mean())
    one = evaluate(run, knn=knn, group="lineA", quiet=True)["scorers"]["knn"]
    assert one["threshold"] == pytest.approx(rep["scorers"]["knn"]["group_thresholds"]["lineA"])
    assert "group_thresholds" not in one


def test_flag_threshold_shares_the_wdm_rule_and_its_gate():
    """The same function as WDM's (`thresholds_by_group`); a group of too few validation normals: pooled, warned."""
    rng = np.random.default_rng(0)
    knn = np.concatenate([rng.normal(1, 0.1, 25), rng.normal(3, 0.5, 25)])
    groups = ["a"] * 25 + ["b"] * 25
    ref = Reference(50, knn, knn, (0.0, 1.0), groups=groups)
    t, rule, by = flag_threshold("knn", ref)
    assert by == pytest.approx(thresholds_by_group(knn, groups)) and by["a"] < t < by["b"]
    assert t == pytest.approx(np.quantile(knn, 0.99)) and "knn scores in their group's units" in rule
    few = Reference(29, knn[:29], knn, (0.0, 1.0), groups=groups[:29])   # b: 4
    with pytest.warns(UserWarning, match=r"one threshold for all 2 groups: .*b has 4"):
        t, _, by = flag_threshold("knn", few)
    assert by is None and t == pytest.approx(np.quantile(knn[:29], 0.99))
    alone = Reference(25, knn[:25], knn, (0.0, 1.0), groups=groups[:25], trained_groups=("a", "c"))
    with pytest.warns(UserWarning, match=r"c has 0"):   # a trained group the split left no validation normal
        assert flag_threshold("knn", alone)[2] is None
    assert flag_threshold("knn", ref, threshold=0.5) == (0.5, "given (--threshold)", None)


def test_knn_flags_of_too_few_or_unknown_groups_are_pooled_and_warned(lines, tmp_path):
    root, data, run, knn = lines
    few = tmp_path / "few"
    shutil.copytree(run, few)
    cal = json.loads((few / "calibration.json").read_text())
    cal["trained_groups"] = ["lineA", "lineB", "lineC"]   # lineC trained on, none of it among the validation normals
    (few / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match=r"one threshold for all 3 groups: .*lineC has 0"):
        res = predict_cmd(few, data / "lineA" / "test", tmp_path / "p", knn=knn, flag_by="knn", quiet=True,
                          overlays=False)
    assert "group_thresholds" not in res and all(r["flagged"] == (r["knn_score"] > res["threshold"])
                                                 for r in res["rows"])
    flat = tmp_path / "flat"   # a plain folder: its images have no group
    flat.mkdir()
    for p in sorted((data / "lineA" / "test" / "faint").glob("*.png")):
        shutil.copy(p, flat / p.name)
    with pytest.warns(UserWarning, match=r"group '' \(15\) are flagged at the pooled threshold"):
        res = predict_cmd(run, flat, tmp_path / "q", knn=knn, flag_by="knn", quiet=True, overlays=False)
    assert all(r["flagged"] == (r["knn_score"] > res["threshold"]) for r in res["rows"])


@pytest.fixture(scope="module")
def second(lines):
    root, data, _, _ = lines
    return _train(data, root / "run_b", root / "tiny.pt", 3)


def test_ensemble_flags_at_the_mean_of_the_runs_group_thresholds(lines, second, tmp_path):
    _, data, run, _ = lines
    own = [json.loads((r / "calibration.json").read_text()) for r in (run, second)]
    want = {g: (own[0]["group_thresholds"][g] + own[1]["group_thresholds"][g]) / 2 for g in ("lineA", "lineB")}
    res = predict_cmd(run, data, tmp_path / "p", ensemble=[second], quiet=True, overlays=False)
    assert res["group_thresholds"] == pytest.approx(want) and res["group_thresholds_score"] == "ensemble"
    assert res["threshold"] == pytest.approx((own[0]["threshold"] + own[1]["threshold"]) / 2)
    assert all(r["flagged"] == (r["ensemble_score"] > want[r["group"]]) for r in res["rows"])
    one = predict_cmd(run, data / "lineB" / "test", tmp_path / "q", ensemble=[second], quiet=True, overlays=False,
                      group="lineB")
    assert one["threshold"] == pytest.approx(want["lineB"]) and "group_thresholds" not in one
    rep = evaluate_ensemble([run, second], quiet=True, csv_path=tmp_path / "e.csv")
    assert rep["group_thresholds"] == pytest.approx(want)
    import csv
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert all((r["flagged"] == "True") == (float(r["score"]) > want[r["group"]]) for r in rows)
    # a run without thresholds per group (too few validation normals of a group): the pooled mean, warned
    few = tmp_path / "few"
    shutil.copytree(second, few)
    cal = dict(own[1], trained_groups=["lineA", "lineB", "lineC"])
    (few / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match=r"lineC has 0"):
        res = predict_cmd(run, data / "lineB" / "test", tmp_path / "r", ensemble=[few], quiet=True, overlays=False)
    assert "group_thresholds" not in res
    assert res["threshold"] == pytest.approx((own[0]["threshold"] + own[1]["threshold"]) / 2)
