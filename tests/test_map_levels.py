"""The pixel map's levels and range units: label-free calibration choices (`calibrate --map-levels --map-norm`),
the image score unchanged."""
import json

import numpy as np
import pytest
import torch

from uninet_feat.calibration import map_ranges, parse_map_levels, parse_map_norm, pick_pixel_map
from uninet_feat.errors import BadInputError
from uninet_feat.model import UniNet
from uninet_feat.scoring import anomaly_map, gaussian_blur_scipy, level_pixel_map, pixel_map_kind

from _tiny import TinyBackbone, level3_run, register_tiny, write_texture_set

register_tiny()


def _maps(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, s, s, generator=g) for s in (16, 8, 4)] * 2   # [S1, S2, S3, T1, T2, T3]


def test_level_pixel_map_sums_both_pairs_of_the_chosen_levels():
    maps = _maps()
    raw = level_pixel_map(maps, [2, 3], (32, 32), smoothed=False)
    np.testing.assert_allclose(raw, anomaly_map([maps[1], maps[2], maps[4], maps[5]], (32, 32)), rtol=1e-6)
    np.testing.assert_allclose(level_pixel_map(maps, [1, 2, 3], (32, 32), smoothed=True),
                               gaussian_blur_scipy(anomaly_map(maps, (32, 32))), rtol=1e-5)
    with pytest.raises(ValueError, match="1..3"):
        level_pixel_map(maps, [4], (32, 32))


def test_range_units_put_each_map_on_its_own_normal_scale_before_the_sum():
    maps = _maps()
    norm = [[0.1 * k, 0.5 + 0.3 * k] for k in range(6)]
    by_hand = [(m - lo) / (hi - lo) for m, (lo, hi) in zip(maps, norm)]
    np.testing.assert_allclose(level_pixel_map(maps, None, (32, 32), smoothed=False, norm=norm),
                               anomaly_map(by_hand, (32, 32)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(level_pixel_map(maps, [3], (32, 32), smoothed=True, norm=norm),
                               gaussian_blur_scipy(anomaly_map([by_hand[2], by_hand[5]], (32, 32))),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="6 maps"):
        level_pixel_map(maps, None, (32, 32), norm=norm[:3])


def test_map_levels_change_the_pixel_map_not_the_image_score():
    torch.manual_seed(0)
    model = UniNet(TinyBackbone()).eval()
    x = torch.randn(2, 3, 64, 64)
    pix_all, s_all = model.predict(x)
    model.cfg["map_levels"] = [3]
    pix3, s3 = model.predict(x)
    torch.testing.assert_close(s3, s_all)
    assert not torch.allclose(pix3, pix_all)
    out = model(x)
    from uninet_feat.scoring import anomaly_maps
    am = anomaly_maps(out.teachers, out.students)
    torch.testing.assert_close(pix3, gaussian_blur_scipy(anomaly_map([am[2], am[5]], (64, 64))))
    assert pixel_map_kind(model.cfg) == "smoothed, levels 3"
    model.cfg["map_levels"] = None
    assert pixel_map_kind(model.cfg) == "smoothed"
    model.cfg["map_norm"] = [[0.0, 2.0]] * 6    # range units: every map halved, so the whole map is halved
    pix_n, s_n = model.predict(x)
    torch.testing.assert_close(s_n, s_all)
    torch.testing.assert_close(pix_n, pix_all / 2)
    assert pixel_map_kind(model.cfg) == "smoothed, range units"


def test_pick_pixel_map_keeps_the_base_unless_another_map_is_clearly_better():
    s = {(k, "none"): v for k, v in {(1,): 0.80, (2,): 0.95, (3,): 0.90, (1, 2): 0.90, (1, 3): 0.91, (2, 3): 0.962,
                                     (1, 2, 3): 0.958}.items()}
    base = ((1, 2, 3), "none")
    assert pick_pixel_map(s, base) == base                      # 0.962 vs 0.958: within the margin
    assert pick_pixel_map({**s, ((2, 3), "none"): 0.97}, base) == ((2, 3), "none")
    assert pick_pixel_map({**s, ((2,), "none"): 0.97, ((2, 3), "none"): 0.97}, base) == ((2, 3), "none")  # more levels
    assert pick_pixel_map({**s, base: float("nan")}, base) == ((2, 3), "none")
    ranged = {**s, ((2, 3), "range"): 0.962, ((1, 2, 3), "range"): 0.97}
    assert pick_pixel_map(ranged, base) == ((1, 2, 3), "range")
    assert pick_pixel_map({**ranged, ((1, 2, 3), "none"): 0.97}, base) == base   # a tie goes to the raw maps
    assert pick_pixel_map({((2, 3), "range"): 0.90, ((2, 3), "none"): 0.80}, ((2, 3), "range")) == ((2, 3), "range")
    # near-ties among the better candidates go to the one nearest the method (the session-11 magnetic-tile run)
    near = {**s, ((2,), "none"): 0.9700, ((2,), "range"): 0.9723, ((1, 2, 3), "range"): 0.9685, base: 0.9624}
    assert pick_pixel_map(near, base) == ((1, 2, 3), "range")
    assert pick_pixel_map({**near, ((1, 2, 3), "range"): 0.9650}, base) == ((2,), "none")   # raw before range
    # 0.969 is not more than the margin above a 0.965 base: only 0.9723 is
    assert pick_pixel_map({**near, base: 0.9650, ((1, 2, 3), "range"): 0.9690}, base) == ((2,), "range")
    assert parse_map_levels("all", 3) is None and parse_map_levels("3,2", 3) == [2, 3]
    assert parse_map_levels([1, 2, 3], 3) is None
    for bad in ("0,1", "4", "x", []):
        with pytest.raises(BadInputError, match="map levels"):
            parse_map_levels(bad, 3)
    # a config's one level (`map_levels: 3`) was a TypeError; a text, bool or fraction in a list a ValueError, or
    # read as another level (2.5 as 2); a refused text was reported as "got None"
    assert parse_map_levels(3, 3) == [3] and parse_map_levels([3, "2"], 3) == [2, 3]
    for bad in (2.5, [2.5], [2, "x"], True, [True], {"a": 1}):
        with pytest.raises(BadInputError, match="map levels"):
            parse_map_levels(bad, 3)
    with pytest.raises(BadInputError, match="got 'abc'"):
        parse_map_levels("abc", 3)
    assert [parse_map_norm(v) for v in ("none", "range", "auto")] == ["none", "range", "auto"]
    with pytest.raises(BadInputError, match="map_norm"):
        parse_map_norm("zscore")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return level3_run(tmp_path_factory, "ml", n_good=2)


def test_calibrate_auto_records_its_choice_and_evaluate_applies_it(run, capsys):
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.cli import main
    from uninet_feat.evaluate import evaluate, score_samples
    from uninet_feat.runs import load_samples
    data, r = run
    cal = json.loads((r / "calibration.json").read_text())   # train's map_levels: [3]
    assert cal["map_levels"] == [3] and cal["map_range_pixel_map"] == "smoothed, levels 3"
    assert main(["calibrate", "--run", str(r), "--map-levels", "auto", "--quiet"]) == 0
    cal = json.loads((r / "calibration.json").read_text())
    choice = cal["pixel_map_choice"]
    scores = {(tuple(int(v) for v in k.split(",")), "none"): v for k, v in choice["synthetic_pixel_auroc"].items()}
    assert len(scores) == 7 and choice["norm"] == "none" and cal["map_norm"] is None
    best = pick_pixel_map(scores, ((1, 2, 3), "none"))[0]
    assert cal["map_levels"] == choice["levels"] == (None if best == (1, 2, 3) else list(best))
    assert choice["synthetic_kinds"] == ["hole", "broken_yarn", "slub", "knot", "stain", "missing_pick", "oil_line"]
    # --synthetic-kinds: the choice is made on those defects, and says so
    assert main(["calibrate", "--run", str(r), "--map-levels", "auto", "--synthetic-kinds", "texture_patch",
                 "--quiet"]) == 0
    patch = json.loads((r / "calibration.json").read_text())["pixel_map_choice"]
    assert patch["synthetic_kinds"] == ["texture_patch"]
    assert patch["synthetic_pixel_auroc"] != choice["synthetic_pixel_auroc"]
    before = (r / "calibration.json").read_text()
    capsys.readouterr()
    assert main(["calibrate", "--run", str(r), "--map-levels", "auto", "--synthetic-kinds", "scratch", "--quiet"]) != 0
    assert "unknown synthetic defect kinds ['scratch']" in capsys.readouterr().err
    assert (r / "calibration.json").read_text() == before
    # evaluate scores model.pt with the calibrated levels: its maps are those of a model given them by hand
    main(["calibrate", "--run", str(r), "--map-levels", "2,3", "--quiet"])
    assert json.loads((r / "calibration.json").read_text())["map_levels"] == [2, 3]
    rep = evaluate(r, quiet=True)
    assert rep["pixel_map"] == "smoothed, levels 2,3"
    model, ck = build_from_checkpoint(r / "model.pt")
    test = [s for s in load_samples(dict(ck["config"])) if s.split == "test"]
    model.cfg["map_levels"] = [2, 3]
    res = score_samples(model, test, dict(ck["config"]), keep_maps=True)
    from uninet_feat import metrics
    assert rep["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(res["masks"], res["maps"]), abs=1e-9)
    model.cfg["map_levels"] = None
    res_all = score_samples(model, test, dict(ck["config"]), keep_maps=True)
    assert not np.allclose(res["maps"][0], res_all["maps"][0])
    np.testing.assert_allclose(res["scores"], res_all["scores"])   # image scores: all levels either way
    # another epoch's model keeps all levels (the choice was made for model.pt)
    other = evaluate(r, checkpoint=r / "checkpoint.pt", quiet=True)
    assert other["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(res_all["masks"], res_all["maps"]), abs=1e-9)
    # predict's overlays show the calibrated map, on its calibrated colour scale
    from uninet_feat.overlay import calibrated_range
    assert main(["predict", "--run", str(r), "--data", str(data), "--threshold=-1e9", "--quiet",
                 "--out", str(r.parent / "pred")]) == 0
    assert json.loads((r.parent / "pred" / "summary.json").read_text())["wdm_pixel_map"] == "smoothed, levels 2,3"
    assert calibrated_range(r, "smoothed, levels 2,3") is not None and calibrated_range(r, "smoothed") is None
    assert main(["calibrate", "--run", str(r), "--map-levels", "all", "--quiet"]) == 0
    assert json.loads((r / "calibration.json").read_text())["map_levels"] is None


def test_map_norm_units_come_from_the_validation_normals_and_evaluate_applies_them(run):
    from uninet_feat import metrics
    from uninet_feat.normals import validation_normals
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.cli import main
    from uninet_feat.evaluate import evaluate, score_samples
    from uninet_feat.runs import load_samples, make_dataset
    from uninet_feat.scoring import anomaly_maps
    data, r = run
    assert main(["calibrate", "--run", str(r), "--map-levels", "auto", "--map-norm", "auto", "--quiet"]) == 0
    cal = json.loads((r / "calibration.json").read_text())
    choice, scores = cal["pixel_map_choice"], {}
    for k, v in choice["synthetic_pixel_auroc"].items():
        levels, _, norm = k.partition(" ")
        scores[(tuple(int(x) for x in levels.split(",")), norm or "none")] = v
    assert len(scores) == 14   # 7 subsets x raw / range units
    levels, norm = pick_pixel_map(scores, ((1, 2, 3), "none"))
    assert choice["norm"] == norm and (cal["map_norm"] is not None) == (norm == "range")
    # fixed choices: the units are each map's median and 0.999 quantile over the validation normals' pixels
    assert main(["calibrate", "--run", str(r), "--map-levels", "all", "--map-norm", "range", "--quiet"]) == 0
    cal = json.loads((r / "calibration.json").read_text())
    assert "pixel_map_choice" not in cal and cal["map_range_pixel_map"] == "smoothed, range units"
    model, ck = build_from_checkpoint(r / "model.pt")
    cfg = dict(ck["config"])
    ds = make_dataset(validation_normals(cfg), cfg, model.source)
    with torch.no_grad():
        out = model.eval()(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    by_hand = [[float(np.median(m)), float(np.quantile(m, 0.999))]
               for m in (a.numpy() for a in anomaly_maps(out.teachers, out.students))]
    np.testing.assert_allclose(cal["map_norm"], by_hand, rtol=1e-5)
    np.testing.assert_allclose(map_ranges(model, validation_normals(cfg), cfg), by_hand, rtol=1e-5)
    rep = evaluate(r, quiet=True)
    test = [s for s in load_samples(cfg) if s.split == "test"]
    model.cfg["map_norm"] = by_hand
    res = score_samples(model, test, cfg, keep_maps=True)
    assert rep["pixel_map"] == "smoothed, range units"
    assert rep["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(res["masks"], res["maps"]), abs=1e-6)
    assert rep["image_auroc"] == pytest.approx(metrics.image_auroc([int(not s.is_normal) for s in test],
                                                                   res["scores"]), abs=1e-9)
    assert main(["calibrate", "--run", str(r), "--map-norm", "none", "--quiet"]) == 0
    assert json.loads((r / "calibration.json").read_text())["map_norm"] is None


def test_map_levels_auto_without_validation_normals_is_refused_before_training(tmp_path):
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "image_size": 64, "epochs": 1,
                                                       "batch_size": 2, "val_fraction": 0.0, "map_levels": "auto"})
    with pytest.raises(BadInputError, match="val_fraction"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(BadInputError, match="map levels"):
        train({**cfg, "val_fraction": 0.5, "map_levels": "5"}, tmp_path / "run2", quiet=True)
    with pytest.raises(BadInputError, match="val_fraction"):
        train({**cfg, "map_levels": "all", "map_norm": "auto"}, tmp_path / "run3", quiet=True)
    with pytest.raises(BadInputError, match="map_norm"):
        train({**cfg, "val_fraction": 0.5, "map_levels": "all", "map_norm": "zscore"}, tmp_path / "run4", quiet=True)
    assert not any((tmp_path / f"run{i}" / "checkpoint.pt").exists() for i in (2, 3, 4))


def test_recalibrating_a_stale_calibration_takes_the_runs_map_choice_not_the_earlier_models(run, tmp_path):
    """A resumed training stopped between its new model.pt and calibrating it leaves the earlier model's
    calibration.json; load_run refuses it and names `calibrate --run RUN`. That fix kept the stale file's pixel map
    (levels chosen for the earlier model, `auto` never made again): the run's config chooses again, as training."""
    import shutil
    from uninet_feat.calibration import recalibrate
    data, r = run
    stale = tmp_path / "run"
    shutil.copytree(r, stale)
    cal = json.loads((stale / "calibration.json").read_text())   # (earlier tests may have recalibrated `run`)
    cal.update(map_levels=[1], model_sha256="0" * 64)   # another model.pt's file, its levels 1; the config's: 3
    cal.pop("calibrate_choices", None)   # what earlier tests told `calibrate` (kept since session 53): none here
    (stale / "calibration.json").write_text(json.dumps(cal))
    assert recalibrate(stale)["map_levels"] == [3]
    cal.update(model_sha256="0" * 64, calibrate_choices={"map_levels": "2"})   # `calibrate --map-levels 2` before:
    (stale / "calibration.json").write_text(json.dumps(cal))                     # made again for the new model.pt
    assert recalibrate(stale)["map_levels"] == [2]
    cal = json.loads((stale / "calibration.json").read_text())
    assert {k: v for k, v in cal["calibrate_choices"].items() if k != "_over"} == {"map_levels": "2"}
    cal.pop("calibrate_choices")
    cal = json.loads((stale / "calibration.json").read_text())
    cal["map_levels"] = [1]   # not stale (this model.pt's): `calibrate --run` keeps the run's current choice
    (stale / "calibration.json").write_text(json.dumps(cal))
    assert recalibrate(stale)["map_levels"] == [1]
