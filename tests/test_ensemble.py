"""Seed ensembles (`uninet_feat.ensemble`): the runs' scores averaged and flagged above their thresholds' mean,
maps in each run's range units averaged; what is refused or warned about."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _tiny import register_tiny, tiny_train_args, write_texture_set
from uninet_feat import metrics
from uninet_feat.calibration import apply_calibration
from uninet_feat.checkpoint import build_from_checkpoint
from uninet_feat.cli import main
from uninet_feat.ensemble import evaluate_ensemble
from uninet_feat.errors import BadInputError
from uninet_feat.evaluate import score_samples
from uninet_feat.overlay import calibrated_range
from uninet_feat.runs import load_samples
from uninet_feat.scoring import pixel_map_kind

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


def _maps_in_range_units(run):
    """A run's test maps in its own validation-normal range units, straight from the model (the reference)."""
    model, ckpt = build_from_checkpoint(run / "model.pt")
    apply_calibration(model, run, run / "model.pt")
    test = [s for s in load_samples(dict(ckpt["config"])) if s.split == "test"]
    res = score_samples(model, test, dict(ckpt["config"]), keep_maps=True)
    lo, hi = calibrated_range(run, pixel_map_kind(model.cfg))
    return [(m - lo) / (hi - lo) for m in res["maps"]], res["masks"]


def test_ensemble_averages_scores_flags_above_the_mean_threshold_and_averages_maps_in_range_units(seeds, tmp_path):
    runs = [str(seeds / "a"), str(seeds / "b")]
    rep = evaluate_ensemble(runs, json_path=tmp_path / "e.json", csv_path=tmp_path / "e.csv", quiet=True)
    per, thr = [], []
    for r in runs:   # each run alone, as `uninet-feat evaluate` scores it
        assert main(["evaluate", "--run", r, "--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json"),
                     "--quiet"]) == 0
        thr.append(json.loads((tmp_path / "r.json").read_text())["threshold"])
        per.append({row["path"]: float(row["score"]) for row in _rows(tmp_path / "r.csv")})
    rows = _rows(tmp_path / "e.csv")
    want = np.array([(per[0][row["path"]] + per[1][row["path"]]) / 2 for row in rows])
    assert np.allclose([float(row["score"]) for row in rows], want, rtol=1e-5)
    assert np.allclose([float(row["score_1"]) for row in rows], [per[1][row["path"]] for row in rows], rtol=1e-5)
    assert per[0] != per[1] and thr[0] != thr[1]              # the seeds really differ
    cut = (thr[0] + thr[1]) / 2
    assert rep["threshold"] == pytest.approx(cut, rel=1e-9)
    labels = np.array([int(row["is_defect"]) for row in rows])
    assert rep["image_auroc"] == pytest.approx(metrics.image_auroc(labels, want), abs=1e-6)
    assert [row["flagged"] for row in rows] == [str(bool(v)) for v in want > cut]   # as predict writes it
    assert rep["at_threshold"]["false_positive_rate"] == pytest.approx(float((want[labels == 0] > cut).mean()))
    assert rep["at_threshold"]["recall_defect"] == pytest.approx(float((want[labels == 1] > cut).mean()))
    assert json.loads((tmp_path / "e.json").read_text())["runs"] == runs
    (ma, masks), (mb, _) = _maps_in_range_units(seeds / "a"), _maps_in_range_units(seeds / "b")
    mean = [(x + y) / 2 for x, y in zip(ma, mb)]
    assert rep["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, mean), abs=1e-6)
    assert rep["aupro"] == pytest.approx(metrics.aupro(masks, mean), abs=1e-6)
    assert rep["pixel_auroc"] != pytest.approx(metrics.pixel_auroc(masks, [x + y for x, y in zip(
        ma, [m * 100 for m in mb])]), abs=1e-9)                   # the units matter: a raw sum ranks pixels otherwise


def test_ensemble_csv_has_each_defective_images_own_pixel_auroc_as_evaluates(seeds, tmp_path):
    """`evaluate`'s CSV has each defective image's own pixel AUROC (``pixel_auroc``: which defects the heatmap
    misses); the ensemble's had none. It is the image's AUROC of the mean map in range units, empty for a normal
    image, exact within the pixel budget and from the binned maps past it."""
    runs = [str(seeds / "a"), str(seeds / "b")]
    evaluate_ensemble(runs, csv_path=tmp_path / "e.csv", quiet=True)
    rows = _rows(tmp_path / "e.csv")
    (ma, masks), (mb, _) = _maps_in_range_units(seeds / "a"), _maps_in_range_units(seeds / "b")
    want = metrics.image_pixel_aurocs(masks, [(x + y) / 2 for x, y in zip(ma, mb)])
    test = [s for s in load_samples(dict(build_from_checkpoint(seeds / "a" / "model.pt")[1]["config"]))
            if s.split == "test"]
    by_path = {str(s.path): v for s, v in zip(test, want)}
    assert sorted(by_path) == sorted(r["path"] for r in rows)
    defects = [r for r in rows if r["is_defect"] == "1"]
    assert defects and all(r["pixel_auroc"] == "" for r in rows if r["is_defect"] == "0")
    for r in defects:
        assert float(r["pixel_auroc"]) == pytest.approx(by_path[r["path"]], abs=1e-5), r["path"]
    evaluate_ensemble(runs, csv_path=tmp_path / "b.csv", quiet=True, pixel_budget=1)   # binned as it is scored
    binned = {r["path"]: r["pixel_auroc"] for r in _rows(tmp_path / "b.csv")}
    for r in defects:
        assert float(binned[r["path"]]) == pytest.approx(float(r["pixel_auroc"]), abs=1e-3)


def test_ensemble_maps_go_a_few_images_at_a_time_and_past_the_budget_binned(seeds, monkeypatch):
    """No image's mean map waits for the last run: every run scores a chunk before the next chunk; past the pixel
    budget the mean maps are binned as they come (evaluate's `_PixelSink`), with the exact figures within 1e-3."""
    import uninet_feat.ensemble as ens
    runs = [str(seeds / "a"), str(seeds / "b")]
    whole = evaluate_ensemble(runs, quiet=True)
    monkeypatch.setattr(ens, "ENSEMBLE_CHUNK", 3)
    chunked = evaluate_ensemble(runs, quiet=True)
    assert whole["pixel_metrics"] == chunked["pixel_metrics"] == "exact"
    for k in ("image_auroc", "pixel_auroc", "aupro"):   # other images share a batch: maps move by ~1e-6 (usage.md)
        assert chunked[k] == pytest.approx(whole[k], abs=1e-5)
    binned = evaluate_ensemble(runs, quiet=True, pixel_budget=1)
    assert binned["pixel_metrics"].startswith("binned")
    for k in ("pixel_auroc", "aupro"):
        assert binned[k] == pytest.approx(whole[k], abs=1e-3)


def test_ensemble_refuses_other_test_sets_one_run_and_no_threshold(seeds, tmp_path):
    with pytest.raises(BadInputError, match="scored other test images"):
        evaluate_ensemble([seeds / "a", seeds / "c"], quiet=True)
    with pytest.raises(BadInputError, match="at least two runs"):
        evaluate_ensemble([seeds / "a"], quiet=True)
    bare = tmp_path / "bare"
    shutil.copytree(seeds / "b", bare)
    (bare / "calibration.json").unlink()
    with pytest.raises(BadInputError, match="no threshold"):
        evaluate_ensemble([seeds / "a", bare], quiet=True)
    assert main(["ensemble", "--runs", str(seeds / "a"), str(seeds / "c"), "--quiet"]) == 2   # a clear CLI error
    with pytest.raises(BadInputError, match="the same run is given twice"):
        evaluate_ensemble([seeds / "a", seeds / "b", seeds / "a" / ".." / "a"], quiet=True)
    twin = tmp_path / "twin"   # a copy of one run: the same model.pt, averaged with itself
    shutil.copytree(seeds / "b", twin)
    with pytest.warns(UserWarning, match="two of these runs hold the same model.pt"):
        evaluate_ensemble([seeds / "b", twin], quiet=True)


def test_ensemble_without_masks_reports_the_same_image_metrics_and_no_pixel_ones(seeds, tmp_path):
    runs = [seeds / "a", seeds / "b"]
    with_masks = evaluate_ensemble(runs, quiet=True)
    tex = seeds / "tex"
    rows = ["path,split,label"] + [f"{p.relative_to(tex)},{split},{p.parent.name}" for split, sub in
                                   (("train", "train"), ("test", "test")) for p in sorted((tex / sub).glob("*/*.png"))]
    (tmp_path / "nomask.csv").write_text("\n".join(rows) + "\n")
    rep = evaluate_ensemble(runs, data=str(tex), split_csv=str(tmp_path / "nomask.csv"), quiet=True)
    assert "pixel_auroc" not in rep and "aupro" not in rep and "pixel_auroc" in with_masks
    assert rep["image_auroc"] == pytest.approx(with_masks["image_auroc"], abs=1e-9)


def test_a_split_without_test_images_is_refused_naming_it(seeds, tmp_path):
    from uninet_feat.evaluate import evaluate
    tex = seeds / "tex"
    csv_path = tmp_path / "train_only.csv"
    csv_path.write_text("path,split,label\n" + "".join(f"{p.relative_to(tex)},train,good\n"
                                                        for p in sorted((tex / "train" / "good").glob("*.png"))))
    for call in (lambda: evaluate(seeds / "a", str(tex), str(csv_path), quiet=True),
                 lambda: evaluate_ensemble([seeds / "a", seeds / "b"], str(tex), str(csv_path), quiet=True)):
        with pytest.raises(BadInputError, match="no test images") as e:
            call()
        assert "train_only.csv" in str(e.value)



def test_predict_with_an_ensemble_flags_on_the_mean_score_above_the_mean_threshold_and_draws_its_map(seeds,
                                                                                                    tmp_path):
    from uninet_feat.predict import predict_cmd
    a, b, data = seeds / "a", seeds / "b", seeds / "tex" / "test"
    own, thr = [], []
    for r in (a, b):   # each run alone, as `predict` scores it
        thr.append(json.loads((r / "calibration.json").read_text())["threshold"])
        own.append({x["path"]: x["wdm_score"] for x in predict_cmd(r, data, tmp_path / r.name,
                                                                   overlays=False, quiet=True)["rows"]})
    want = {p: (own[0][p] + own[1][p]) / 2 for p in own[0]}
    res = predict_cmd(a, data, tmp_path / "e", ensemble=[b], overlays=False, quiet=True)
    assert res["flag_by"] == "ensemble" and res["ensemble_runs"] == [str(a), str(b)]
    assert res["threshold"] == pytest.approx((thr[0] + thr[1]) / 2, rel=1e-9)
    for row in res["rows"]:
        assert row["ensemble_score"] == pytest.approx(want[row["path"]], rel=1e-5)
        assert row["ensemble_score_1"] == pytest.approx(own[1][row["path"]], rel=1e-5)
        assert row["flagged"] == (want[row["path"]] > res["threshold"])
    cut = float(np.median(list(want.values())))   # a given threshold is in the same units; half the images flagged
    assert main(["predict", "--run", str(a), "--ensemble", str(b), "--data", str(data), "--threshold", str(cut),
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    rows = _rows(tmp_path / "cli" / "predictions.csv")
    assert [r["flagged"] == "True" for r in rows] == [want[r["path"]] > cut for r in rows]
    assert any(r["flagged"] == "True" for r in rows)
    assert all(Path(r["overlay"]).is_file() for r in rows if r["flagged"] == "True")


def test_predict_ensemble_flagged_by_wdm_warns_of_a_runs_few_normals_once(seeds, tmp_path):
    """`predict --ensemble B --flag-by wdm` resolves the first run's threshold for the flag and again as an ensemble
    member: its few-normals warning came twice, once without the run's name and once with it. Once per run now."""
    import warnings
    a, b, data = seeds / "a", seeds / "b", seeds / "tex" / "test"
    with warnings.catch_warnings(record=True) as seen:
        assert main(["predict", "--run", str(a), "--ensemble", str(b), "--flag-by", "wdm", "--data", str(data),
                     "--no-overlays", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    few = [str(w.message) for w in seen if "0.99 quantile of only" in str(w.message)]
    assert sorted(m.split(": ", 1)[0] for m in few) == sorted([str(a), str(b)]), few


def test_ensemble_maps_are_the_mean_of_the_runs_maps_in_range_units(seeds):
    from uninet_feat.ensemble import load_members, mean_maps
    members = load_members([seeds / "a", seeds / "b"])
    test = [s for s in load_samples(members[0].cfg) if s.split == "test"]
    got = {}
    mean_maps(members, test, lambda s, m: got.setdefault(str(s.path), m), chunk=3)   # chunks that split the set
    (ma, _), (mb, _) = _maps_in_range_units(seeds / "a"), _maps_in_range_units(seeds / "b")
    assert list(got) == [str(s.path) for s in test]
    for s, x, y in zip(test, ma, mb):
        assert np.allclose(got[str(s.path)], (x + y) / 2, atol=1e-5)


def test_predict_ensemble_refuses_max_fpr_missing_runs_and_other_image_sizes(seeds, tmp_path):
    import torch
    from uninet_feat.ensemble import load_members
    from uninet_feat.predict import predict_cmd
    a, b, data = seeds / "a", seeds / "b", seeds / "tex" / "test"
    with pytest.raises(BadInputError, match="--max-fpr"):
        predict_cmd(a, data, tmp_path / "p", ensemble=[b], max_fpr=0.1, quiet=True)
    with pytest.raises(BadInputError, match="need more runs"):
        predict_cmd(a, data, tmp_path / "p", heatmap="ensemble", quiet=True)
    assert not (tmp_path / "p").exists()                          # refused before anything was written
    other = tmp_path / "b96"
    shutil.copytree(b, other)
    ckpt = torch.load(other / "model.pt", weights_only=True)
    ckpt["config"]["image_size"] = 96
    torch.save(ckpt, other / "model.pt")
    cal = json.loads((other / "calibration.json").read_text())
    cal.pop("model_sha256")   # as a calibration.json from before session 22: no model to check it against
    (other / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(BadInputError, match="image_size 96 vs 64"):
        load_members([a, other])


def test_members_of_another_score_scale_are_named_in_a_warning(seeds, tmp_path):
    import warnings
    from uninet_feat.ensemble import load_members
    a, b = seeds / "a", seeds / "b"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_members([a, b])
    assert not [w for w in seen if "typical score" in str(w.message)]   # two seeds of one config: no warning
    big = tmp_path / "b_x2"
    shutil.copytree(b, big)
    cal = json.loads((big / "calibration.json").read_text())
    cal["val_scores"] = [2 * v for v in cal["val_scores"]]   # as if its scores were twice as large
    (big / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match="b_x2.*typical score.*by more than 25%"):
        load_members([a, big])


def test_normal_level_is_the_median_tile_offset_of_a_position_normed_run_else_of_validation_scores(seeds):
    from types import SimpleNamespace
    from uninet_feat.ensemble import normal_level
    cal = json.loads((seeds / "a" / "calibration.json").read_text())
    tiled = SimpleNamespace(cfg={"tile_offsets": {"g1": {"0,0": 1.0, "0,256": 3.0}, "g2": {"0,0": 10.0}}})
    assert normal_level(tiled, cal) == 3.0                    # median over every group's positions, not val_scores
    plain = SimpleNamespace(cfg={"tile_offsets": None})
    assert normal_level(plain, cal) == pytest.approx(float(np.median(cal["val_scores"])))
    assert normal_level(plain, None) is None


def test_runs_that_score_tiles_differently_are_named_in_a_warning(seeds, monkeypatch):
    """A position-corrected run averaged with a plain one mixes two kinds of score: said, with the fix."""
    from uninet_feat import calibration
    from uninet_feat.ensemble import load_members
    real = calibration.applied_tile_norm
    monkeypatch.setattr(calibration, "applied_tile_norm",
                        lambda m: "position" if m is first_model[0] else real(m))
    first_model = []
    import uninet_feat.ensemble as ens
    orig = ens.load_member
    def spy(*a, **k):
        m = orig(*a, **k)
        if not first_model:
            first_model.append(m.model)
        return m
    monkeypatch.setattr(ens, "load_member", spy)
    with pytest.warns(UserWarning, match=r"score tiles differently \(.*: position, .*: none\)"):
        load_members([seeds / "a", seeds / "b"])


def test_runs_that_take_image_scores_from_other_maps_are_named_in_a_warning(seeds, tmp_path):
    """One run's score from its level-3 map (`image_score: map`) beside the WDM of all maps: not one scale."""
    import shutil
    import warnings as w
    from uninet_feat.ensemble import load_members
    shutil.copytree(seeds / "b", tmp_path / "b")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        load_members([seeds / "a", tmp_path / "b"])
    assert not [c for c in caught if "from different maps" in str(c.message)]
    assert main(["calibrate", "--run", str(tmp_path / "b"), "--map-levels", "3", "--image-score", "map",
                 "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"image scores from different maps \(.*: wdm, .*: map: smoothed, levels 3\)"):
        load_members([seeds / "a", tmp_path / "b"])


def test_a_members_few_normals_warning_names_its_run(seeds):
    """Each member's default threshold rests on its own validation normals; the warning that they are too few did
    not say of which run, and under the CLI's "default" filter the second run's (the same text) was not shown."""
    import warnings
    from uninet_feat.thresholds import thresholds_by_group
    from uninet_feat.ensemble import load_members
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")   # as the CLI sets it: each distinct message once
        load_members([seeds / "a", seeds / "b"])
    few = [str(w.message) for w in seen if "0.99 quantile of only" in str(w.message)]
    assert [m.split(": ", 1)[0] for m in few] == [str(seeds / "a"), str(seeds / "b")], few
    with pytest.warns(UserWarning, match=r"^runs/x: one threshold for all 2 groups"):   # a run of several groups
        thresholds_by_group([0.1, 0.2, 0.3], ["g1", "g1", "g2"], run="runs/x")


def test_a_member_without_a_map_range_is_named_in_the_image_metrics_only_warning(seeds, tmp_path):
    """Which run lacks the range decides which one to calibrate; the warning said only "a run's"."""
    bare = tmp_path / "b_bare"
    shutil.copytree(seeds / "b", bare)
    cal = json.loads((bare / "calibration.json").read_text())
    cal.pop("map_range")
    (bare / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match="no map range") as seen:
        rep = evaluate_ensemble([seeds / "a", bare], quiet=True)
    text = next(str(w.message) for w in seen if "no map range" in str(w.message))
    assert text.startswith(f"{bare}: ") and f"calibrate --run {bare}" in text and str(seeds / "a") not in text
    assert "pixel_auroc" not in rep and "image_auroc" in rep


def test_ensemble_skip_bad_leaves_out_only_a_mask_that_cannot_be_used_as_evaluate(seeds, tmp_path, capsys):
    """As `evaluate` (`test_bad_input_pipeline.py::test_a_mask_of_the_wrong_size_stops_evaluate_only`): a mask of
    another size or a truncated one stops the ensemble by name; with --skip-bad only the mask is left out (warned)
    and its image keeps its score. The ensemble never called `drop_unusable_masks`, so the dataset's check left
    each such image out of the image metrics too."""
    from PIL import Image
    tex = tmp_path / "tex"
    shutil.copytree(seeds / "tex", tex)
    masks = sorted((tex / "ground_truth").rglob("*_mask.png"))
    Image.open(masks[0]).resize((50, 60)).save(masks[0])                      # another size
    noise = np.random.default_rng(0).integers(0, 2, (64, 64)).astype(np.uint8) * 255
    Image.fromarray(noise).save(masks[1])                                      # truncated: its header whole
    masks[1].write_bytes(masks[1].read_bytes()[: masks[1].stat().st_size // 2])
    runs = [str(seeds / "a"), str(seeds / "b")]
    whole = evaluate_ensemble(runs, data=str(seeds / "tex"), quiet=True)   # every mask usable
    capsys.readouterr()
    assert main(["ensemble", "--runs", *runs, "--data", str(tex), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "have masks that cannot be used" in err and masks[0].name in err and "50x60" in err, err
    assert masks[1].name in err and "unreadable mask" in err, err
    with pytest.warns(UserWarning, match="skipping the mask") as seen:
        rep = evaluate_ensemble(runs, data=str(tex), csv_path=tmp_path / "e.csv", quiet=True, skip_bad=True)
    said = sorted(str(w.message) for w in seen if str(w.message).startswith("skipping"))
    assert [s.split(" of ")[0] for s in said] == [f"skipping the mask {m}" for m in masks[:2]], said
    assert rep["n_test"] == whole["n_test"] and rep["n_defect"] == whole["n_defect"]   # no image left out
    assert rep["pixel_metrics_without"] == 2 and "pixel_auroc" in rep
    assert rep["image_auroc"] == pytest.approx(whole["image_auroc"], abs=1e-9)
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "e.csv") if r["is_defect"] == "1"}
    left = {m.name.replace("_mask", "") for m in masks[:2]}
    assert all((rows[n]["pixel_auroc"] == "") == (n in left) for n in rows)   # out of the pixel metrics only


def test_ensemble_names_images_of_the_other_colour_kind_as_evaluate(seeds, tmp_path):
    """Runs trained on grey images, scored on colour copies of their test images: `evaluate` warned (the model never
    saw colour, its scores there carry no meaning) and `ensemble` scored them silently; it now calls the same helper,
    so the warning is evaluate's, word for word. Grey data gives neither command anything to say."""
    import warnings
    from PIL import Image
    from uninet_feat.evaluate import evaluate
    tex = tmp_path / "tex"
    shutil.copytree(seeds / "tex", tex)
    for p in sorted((tex / "test").rglob("*.png")):   # a colour camera: the same picture, tinted
        g = np.asarray(Image.open(p).convert("L"), dtype=np.float32)
        Image.fromarray(np.stack([g, g * 0.8, g * 0.6], -1).astype(np.uint8)).save(p)
    runs = [str(seeds / "a"), str(seeds / "b")]

    def said(call):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        return sorted({str(w.message) for w in seen if "trained on grey" in str(w.message)})
    ens = said(lambda: evaluate_ensemble(runs, data=str(tex), quiet=True))
    one = said(lambda: evaluate(runs[0], str(tex), quiet=True))
    assert ens == one and len(ens) == 1 and "images are colour" in ens[0], (ens, one)
    assert said(lambda: evaluate_ensemble(runs, data=str(seeds / "tex"), quiet=True)) == []


def test_ensemble_says_when_a_members_threshold_was_set_on_test_images(seeds, tmp_path):
    """`evaluate` warns and counts test images among the normals a run's threshold was set on (`calibrate
    --normals test/good`); the ensemble reported recall and false-positive rate at such thresholds without a word."""
    a = tmp_path / "a"
    shutil.copytree(seeds / "a", a)
    good = seeds / "tex" / "test" / "good"
    assert main(["calibrate", "--run", str(a), "--normals", str(good), "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"test image\(s\) are among the normals the run's threshold was set on"
                                         r".*the pixel figures rest on those normals too, the pixel map's range units"):
        rep = evaluate_ensemble([a, seeds / "b"], quiet=True)   # its maps are in each run's range units, always
    assert rep["threshold_set_on_test_images"] == {str(a): len(list(good.glob("*.png")))}
    assert "threshold_set_on_test_images" not in evaluate_ensemble([seeds / "a", seeds / "b"], quiet=True)


def test_ensemble_on_another_split_counts_each_runs_trained_test_images(seeds, tmp_path):
    """As evaluate: another split's test images that a run trained on are warned and counted, per run."""
    from uninet_feat.config import load_config
    from uninet_feat.runs import train_val_samples
    cfg = load_config(seeds / "a" / "config.yaml")
    samples = load_samples(cfg)
    fit = train_val_samples(samples, cfg)[0][:2]
    with open(tmp_path / "other.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label"])
        w.writerows([str(s.path), "test" if s in fit else s.split, s.label] for s in samples)
    with pytest.warns(UserWarning, match="images the run trained on"):
        rep = evaluate_ensemble([seeds / "a", seeds / "b"], split_csv=str(tmp_path / "other.csv"), quiet=True)
    assert rep["test_images_trained_on"][str(seeds / "a")] == 2
    assert "test_images_trained_on" not in evaluate_ensemble([seeds / "a", seeds / "b"], quiet=True)


def test_predict_ensemble_names_a_run_trained_on_other_data(seeds, tmp_path):
    """`predict --ensemble` averaged a run of other data (another model's units, not another seed's) silently;
    evaluate's ensemble refuses it only through its other test images."""
    import warnings
    from uninet_feat.predict import predict_cmd
    data = seeds / "tex" / "test"
    with pytest.warns(UserWarning, match=r"c was trained on other data than .*a \(data .*other.* vs .*tex"):
        predict_cmd(seeds / "a", data, tmp_path / "c", ensemble=[seeds / "c"], overlays=False, quiet=True)
    with warnings.catch_warnings(record=True) as rec:   # two seeds of one config and data: nothing said
        warnings.simplefilter("always")
        predict_cmd(seeds / "a", data, tmp_path / "b", ensemble=[seeds / "b"], overlays=False, quiet=True)
    assert not [w for w in rec if "other data" in str(w.message)]


def test_runs_of_other_settings_are_named_in_a_warning(seeds, tmp_path):
    """Only image size and tiling were compared: runs of another recipe (epochs, lr, width, ...) were averaged as if
    they were seeds of one config, unsaid unless their score scales differed by 25 %."""
    import warnings
    assert main(tiny_train_args(seeds / "tex") + ["--epochs", "1", "--seed", "2", "--lr", "0.0005",
                                                  "--out", str(tmp_path / "d")]) == 0
    with pytest.warns(UserWarning, match=r"d was trained with other settings than .*a \(epochs 1 vs 2, lr 0.0005 vs"):
        evaluate_ensemble([seeds / "a", tmp_path / "d"], quiet=True)
    with warnings.catch_warnings(record=True) as rec:   # two seeds of one config: nothing said
        warnings.simplefilter("always")
        evaluate_ensemble([seeds / "a", seeds / "b"], quiet=True)
    assert not [w for w in rec if "other settings" in str(w.message)]


def test_the_runs_thresholds_reported_are_those_the_ensembles_threshold_is_the_mean_of(tmp_path):
    """With --group G the ensemble flags above the mean of the runs' G thresholds, and `run_thresholds` gave their
    pooled ones, whose mean is another cut."""
    from uninet_feat.config import load_config
    from uninet_feat.predict import predict_cmd
    from uninet_feat.train import train
    data = tmp_path / "d"
    for i, g in enumerate(("lineA", "lineB")):
        write_texture_set(data / g, n_train=50, n_good=2, n_bad=2, size=32, seed=i)
    runs = []
    for seed in (2, 5):
        runs.append(tmp_path / f"r{seed}")
        train(load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 32,
                                 "epochs": 1, "batch_size": 4, "val_fraction": 0.5, "channels_last": False,
                                 "seed": seed}), runs[-1], quiet=True)
    from uninet_feat.thresholds import group_thresholds
    by = [group_thresholds(r) for r in runs]
    assert all(by) and by[0]["lineA"] != by[1]["lineA"]
    rep = evaluate_ensemble(runs, group="lineA", quiet=True)
    assert rep["run_thresholds"] == pytest.approx({str(r): b["lineA"] for r, b in zip(runs, by)})
    assert rep["threshold"] == pytest.approx(np.mean(list(rep["run_thresholds"].values())))
    rep = evaluate_ensemble(runs, quiet=True)   # flagged per group: each run's group thresholds beside
    assert rep["run_group_thresholds"] == {str(r): pytest.approx(b) for r, b in zip(runs, by)}
    res = predict_cmd(runs[0], data / "lineA" / "test", tmp_path / "p", ensemble=[runs[1]], group="lineA",
                      overlays=False, quiet=True)
    assert res["ensemble_run_thresholds"] == pytest.approx([b["lineA"] for b in by])
