"""One model for several groups flags each image by its own group's threshold (`thresholds.group_thresholds`):
the groups' normal scores sit at other levels, and one pooled threshold passes the lower groups' defects."""
import json
from pathlib import Path

import numpy as np
import pytest

from uninet_feat.thresholds import group_thresholds, resolve_thresholds, threshold_at_fpr
from uninet_feat.config import load_config
from uninet_feat.detector import Detector
from uninet_feat.evaluate import evaluate
from uninet_feat.predict import predict_cmd
from uninet_feat.train import train

from _tiny import register_tiny, stand_in_exporter, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    for i, g in enumerate(("lineA", "lineB")):   # MVTec-style categories: root/<group>/train/good, ...
        write_texture_set(root / g, n_train=50, n_good=3, n_bad=2, size=32, seed=i)
    cfg = load_config(None, {"data": str(root), "backbone": "tiny", "weights": "random", "image_size": 32,
                             "epochs": 1, "batch_size": 4, "val_fraction": 0.5, "channels_last": False, "seed": 2})
    train(cfg, root / "run", quiet=True)
    return root, root / "run"


def test_each_group_gets_the_threshold_of_its_own_validation_normals(run, tmp_path):
    root, r = run
    cal = json.loads((r / "calibration.json").read_text())
    s, g = np.array(cal["val_scores"]), np.array(cal["val_groups"])
    assert sorted(set(g)) == ["lineA", "lineB"] and min((g == k).sum() for k in set(g)) >= 19   # FEW_NORMALS
    level = {k: (np.median(s[g == k]), np.std(s[g == k], ddof=1)) for k in ("lineA", "lineB")}
    z = np.concatenate([(s[g == k] - m) / sd for k, (m, sd) in level.items()])   # every normal in its group's units
    want = {k: m + sd * np.quantile(z, 0.99) for k, (m, sd) in level.items()}
    assert cal["group_thresholds"] == pytest.approx(want) and want["lineA"] != pytest.approx(want["lineB"])
    assert group_thresholds(r) == pytest.approx(want)
    for k, t in want.items():   # each group's normals above its threshold: as many as the pooled z-rule lets through
        assert (s[g == k] > t).sum() <= max(1, int(0.01 * len(s)) + 1)
    half = threshold_at_fpr(z, 0.5)
    assert group_thresholds(r, max_fpr=0.5) == pytest.approx({k: m + sd * half for k, (m, sd) in level.items()})
    assert group_thresholds(r, threshold=1.0) is None and resolve_thresholds(r, threshold=1.0)[2] is None
    # evaluate: every test image's flag at its group's threshold
    rep = evaluate(r, csv_path=tmp_path / "s.csv", quiet=True)
    assert rep["group_thresholds"] == pytest.approx(want)
    for row in rep["_rows"]:
        assert row["flagged"] == (float(row["score"]) > want[row["group"]])
    flagged = np.array([row["flagged"] for row in rep["_rows"]])
    defect = np.array([row["is_defect"] == 1 for row in rep["_rows"]])
    assert rep["at_threshold"]["recall_defect"] == pytest.approx(flagged[defect].mean())
    # predict: the rows of a grouped layout by their group; --group G (and a Detector of G) by G's alone
    res = predict_cmd(r, root, tmp_path / "p", quiet=True, overlays=False)
    assert res["group_thresholds"] == pytest.approx(want)
    assert all(row["flagged"] == (row["wdm_score"] > want[row["group"]]) for row in res["rows"])
    one = predict_cmd(r, root / "lineB" / "test", tmp_path / "q", quiet=True, overlays=False, group="lineB")
    assert one["threshold"] == pytest.approx(want["lineB"]) and "group_thresholds" not in one
    assert Detector(r, group="lineA").threshold == pytest.approx(want["lineA"])


def _edited_copy(run, dest, edit) -> dict:
    """A copy of ``run`` at ``dest`` whose calibration.json ``edit(cal)`` changed in place; returns the new one."""
    import shutil
    shutil.copytree(run, dest)
    cal = json.loads((dest / "calibration.json").read_text())
    edit(cal)
    (dest / "calibration.json").write_text(json.dumps(cal))
    return cal


def test_a_calibration_without_groups_keeps_one_threshold(run, tmp_path):
    def old(cal):   # as written before session 28
        del cal["val_groups"], cal["group_thresholds"]
    cal = _edited_copy(run[1], tmp_path / "old", old)
    t, _, by = resolve_thresholds(tmp_path / "old")
    assert by is None and t == cal["threshold"]


def test_groups_with_few_validation_normals_share_one_threshold_and_say_so(run, tmp_path):
    def few(cal):
        keep = [i for i, g in enumerate(cal["val_groups"]) if g == "lineA" or i % 5 == 0]   # lineB keeps about 4
        for k in ("val_scores", "val_paths", "val_groups"):
            cal[k] = [cal[k][i] for i in keep]
    cal = _edited_copy(run[1], tmp_path / "few", few)
    with pytest.warns(UserWarning, match=r"one threshold for all 2 groups: .*lineB has \d"):
        t, _, by = resolve_thresholds(tmp_path / "few")
    assert by is None and t == cal["threshold"]


def test_normals_given_by_group_calibrate_each_group(run, tmp_path):
    """`calibrate --normals DIR` of a run of several groups: a folder laid out by group keeps its groups."""
    import shutil
    from uninet_feat.cli import main
    _, r = run
    work = tmp_path / "run"
    shutil.copytree(r, work)
    more = tmp_path / "more"
    for i, g in enumerate(("lineA", "lineB")):
        write_texture_set(more / g, n_train=20, n_good=0, n_bad=0, size=32, seed=10 + i)
    assert main(["calibrate", "--run", str(work), "--normals", str(more), "--quiet"]) == 0
    cal = json.loads((work / "calibration.json").read_text())
    assert sorted(cal["val_groups"]) == ["lineA"] * 20 + ["lineB"] * 20
    assert set(cal["group_thresholds"]) == {"lineA", "lineB"}


def test_a_group_with_no_validation_normal_is_a_group_of_too_few(run, tmp_path):
    """The split is not made per group: a small group the run trained on can be left no validation normal, and its
    images were flagged at the pooled threshold, unwarned, while the others had their own."""
    import shutil
    _, r = run
    cal = json.loads((r / "calibration.json").read_text())
    assert cal["trained_groups"] == ["lineA", "lineB"]
    none = tmp_path / "none"
    shutil.copytree(r, none)
    cal["trained_groups"] = ["lineA", "lineB", "lineC"]   # lineC trained on, none of it among the validation normals
    (none / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match=r"one threshold for all 3 groups: .*lineC has 0"):
        t, _, by = resolve_thresholds(none)
    assert by is None and t == cal["threshold"]


def test_images_of_no_group_of_the_run_are_warned_at_the_pooled_threshold(run, tmp_path):
    import shutil
    root, r = run
    with pytest.warns(UserWarning, match=r"group 'lineZ' are flagged at the pooled threshold"):
        d = Detector(r, group="lineZ")   # a misspelt group
    assert d.threshold == json.loads((r / "calibration.json").read_text())["threshold"]
    flat = tmp_path / "flat"   # a plain folder: its images have no group
    flat.mkdir()
    for p in sorted((root / "lineA" / "test" / "spot").glob("*.png")):
        shutil.copy(p, flat / p.name)
    with pytest.warns(UserWarning, match=r"group '' \(2\) are flagged at the pooled threshold"):
        predict_cmd(r, flat, tmp_path / "p", quiet=True, overlays=False)
    # laid out as the warning advises, DIR/<group>/...: each image takes its folder's group and threshold (they kept
    # group '' and the pooled threshold; an audit, session 52); a folder of no group of the run stays ''
    by = tmp_path / "by_group"
    for g in ("lineA", "lineB", "lineQ"):
        (by / g).mkdir(parents=True)
        for p in sorted((root / ("lineA" if g == "lineQ" else g) / "test" / "spot").glob("*.png")):
            shutil.copy(p, by / g / p.name)
    with pytest.warns(UserWarning, match=r"group '' \(2\) are flagged at the pooled threshold"):
        res = predict_cmd(r, by, tmp_path / "q", quiet=True, overlays=False)
    rows = json.loads((tmp_path / "q" / "predictions.json").read_text())
    assert sorted((Path(x["path"]).parent.name, x["group"]) for x in rows) == \
        [("lineA", "lineA")] * 2 + [("lineB", "lineB")] * 2 + [("lineQ", "")] * 2
    cal = json.loads((r / "calibration.json").read_text())
    assert all(x["flagged"] == (x["wdm_score"] > cal["group_thresholds"].get(x["group"], cal["threshold"]))
               for x in rows) and res["n_images"] == 6


def test_evaluate_group_of_another_checkpoint_is_calibrated_on_the_runs_own_split(run):
    """`evaluate --group G --checkpoint X` of a run of several groups: X's threshold from the run's validation normals
    (all groups, G's own threshold picked), not from a new split of G's normals alone, half of them trained on."""
    _, r = run
    want = group_thresholds(r)
    rep = evaluate(r, group="lineA", checkpoint=r / "checkpoint.pt", quiet=True)   # after 1 epoch: model.pt's weights
    assert rep["threshold"] == pytest.approx(want["lineA"]) and "lineA" in rep["threshold_rule"]


def test_the_report_and_a_group_less_detector_say_which_threshold_applies(run, tmp_path):
    root, r = run
    rep = evaluate(r, report_path=tmp_path / "r.html", quiet=True)
    html = (tmp_path / "r.html").read_text()
    assert "Thresholds per group" in html and all(f"{g} {rep['group_thresholds'][g]:.6g}"[:12] in html
                                                  for g in ("lineA", "lineB"))
    with pytest.warns(UserWarning, match="flagged at the pooled threshold"):
        det = Detector(r)
    assert det.threshold == pytest.approx(rep["threshold"]) and set(det.group_thresholds) == {"lineA", "lineB"}


def test_export_model_group_puts_its_threshold_in_model_json_without_saying_it_changes_nothing(run, tmp_path,
                                                                                               monkeypatch, capsys):
    """`export-model --group G` of an untiled run of several groups writes G's own threshold into model.json, yet it
    warned "--group changes nothing"; that warning is for a run with neither place offsets nor group thresholds."""
    import warnings
    pytest.importorskip("onnxscript")
    from uninet_feat.cli import main
    stand_in_exporter(monkeypatch)   # model.json's threshold and the warnings are tested, not the graph
    root, r = run
    want = json.loads((r / "calibration.json").read_text())["group_thresholds"]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main(["export-model", "--run", str(r), "--group", "lineB", "--no-check", "--quiet",
                     "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["threshold"] == pytest.approx(want["lineB"]) and meta["group"] == "lineB"
    assert not [w for w in said if "changes nothing" in str(w.message)]
    # a misspelt group exported the pooled threshold, no group_thresholds, exit 0 (an audit, session 53): refused
    assert main(["export-model", "--run", str(r), "--group", "lineZ", "--no-check", "--quiet",
                 "--out", str(tmp_path / "mz")]) == 2
    assert "its groups are lineA, lineB" in capsys.readouterr().err and not (tmp_path / "mz").exists()

    def old(cal):   # one threshold for every group: then --group does change nothing
        del cal["val_groups"], cal["group_thresholds"]
    _edited_copy(r, tmp_path / "old", old)
    with pytest.warns(UserWarning, match="no per-group thresholds, so .*--group changes nothing"):
        assert main(["export-model", "--run", str(tmp_path / "old"), "--group", "lineB", "--no-check", "--quiet",
                     "--out", str(tmp_path / "m2")]) == 0


def test_a_group_threshold_under_max_fpr_never_flags_more_normals_than_the_bound():
    """The bound is checked in z, the threshold applied as median + std · q: back from z the product can round one
    ulp under the normal that set q, and `score > t` flagged it (found in session 34 on these 38 scores)."""
    from uninet_feat.thresholds import thresholds_by_group
    a = [-33.3, -8.6, -7.9, -7.1, 33.6, 4.0, 10.8, 0.2, -27.0, 5.2, 21.8, 3.5, -16.4, -36.6, 48.7, -23.6, -23.8,
         -39.4, 9.4]
    b = [100.5, 96.2, 99.1, 101.0, 98.0, 94.9, 98.6, 101.1, 95.1, 97.1, 102.9, 105.3, 103.9, 101.4, 105.7, 97.9,
         99.5, 98.9, 104.3]
    by = thresholds_by_group(a + b, ["a"] * 19 + ["b"] * 19, (), max_fpr=0.0)
    assert sum(x > by["a"] for x in a) == 0 and sum(x > by["b"] for x in b) == 0
    assert by["a"] == max(a)   # and no higher: the lowest threshold that keeps the bound
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = np.concatenate([rng.normal(0, 20, 19), rng.normal(100, 3, 19), rng.normal(-5, 1, 19)]).round(1)
        groups = ["a"] * 19 + ["b"] * 19 + ["c"] * 19
        for f in (0.0, 0.02, 0.05):
            by = thresholds_by_group(s, groups, (), max_fpr=f)
            assert sum(x > by[k] for x, k in zip(s, groups)) <= int(f * len(s) + 1e-9)
