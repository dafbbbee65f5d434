"""`image_score`: the method's WDM of all maps, or the same top-k mean of the run's chosen pixel map (`map`), or a
label-free choice between the two (`auto`, on synthetic defects of the validation normals)."""
import csv
import json

import numpy as np
import pytest
import torch

from uninet_feat import metrics
from uninet_feat.calibration import PIXEL_MAP_MARGIN, choose_image_score, needs_calibration, parse_image_score
from uninet_feat.errors import BadInputError
from uninet_feat.model import UniNet
from uninet_feat.scoring import (anomaly_maps, gaussian_blur_scipy, level_pixel_map, map_in_score_units,
                                 map_topk_score, wdm_score)

from _tiny import TinyBackbone, level3_run, register_tiny

register_tiny()


def test_the_map_score_is_the_wdm_topk_of_the_pixel_map_and_needs_a_chosen_map():
    torch.manual_seed(0)
    model = UniNet(TinyBackbone()).eval()
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    am = anomaly_maps(out.teachers, out.students)
    _, wdm = wdm_score(am, (64, 64))
    model.cfg["map_levels"] = [3]
    for kind in ("wdm", "auto", None):   # "auto" only ever reaches a model as a config word: the method's score
        model.cfg["image_score"] = kind
        torch.testing.assert_close(model.predict(x)[1], wdm)
    model.cfg["image_score"] = "map"
    pix, score = model.predict(x)
    s3 = level_pixel_map(am, [3], (64, 64), smoothed=True)
    torch.testing.assert_close(pix, s3)
    torch.testing.assert_close(score, map_topk_score(am, s3))
    assert not torch.allclose(score, wdm)
    # the WDM's k: images whose top-k of the level-3 map differ from its maximum and from its mean
    assert (score < s3.flatten(1).max(1).values).all() and (score > s3.flatten(1).mean(1)).all()
    model.cfg["pixel_map"] = "raw"   # the map shown is unblurred; the score is still of the blurred map
    pix_raw, score_raw = model.predict(x)
    torch.testing.assert_close(gaussian_blur_scipy(pix_raw), s3)
    torch.testing.assert_close(score_raw, score)
    model.cfg.update(pixel_map="smoothed", map_levels=None)   # all levels, raw: the map's score is the WDM
    torch.testing.assert_close(model.predict(x)[1], wdm)
    assert map_in_score_units({"map_levels": [3], "image_score": "map"})
    assert not map_in_score_units({"map_levels": [3], "image_score": "wdm"})


def test_choose_image_score_takes_the_map_only_when_clearly_better(monkeypatch):
    from uninet_feat.selection import SyntheticValidation
    model = UniNet(TinyBackbone()).eval()
    seen = []   # a NaN score (non-finite maps) never wins, as in the pixel-map choice

    def fake(wdm, mp):
        def image_auroc_of(self, m, batch_size=8, channels_last=False, maps=None):
            seen.append(1)
            return {"wdm": wdm, "map": mp}
        monkeypatch.setattr(_Set, "image_auroc_of", image_auroc_of, raising=False)
    monkeypatch.setattr(SyntheticValidation, "from_config", classmethod(lambda cls, ds, cfg: _Set()))
    monkeypatch.setattr("uninet_feat.runs.make_dataset", lambda val, cfg, src: None)
    cfg = {"synthetic_kinds": "texture_patch"}
    assert choose_image_score(model, ["v"], cfg)["image_score"] == "wdm" and not seen   # all levels raw: not scored
    model.cfg["map_levels"] = [2, 3]
    for wdm, mp, want in ((0.80, 0.80 + 2 * PIXEL_MAP_MARGIN, "map"), (0.80, 0.80 + PIXEL_MAP_MARGIN / 2, "wdm"),
                          (0.90, 0.85, "wdm"), (0.80, float("nan"), "wdm"), (float("nan"), 0.9, "map")):
        fake(wdm, mp)
        got = choose_image_score(model, ["v"], cfg)
        assert got["image_score"] == want, (wdm, mp)
        assert got["synthetic_kinds"] == ["texture_patch"] and got["synthetic_image_auroc"]["wdm"] is wdm
    with pytest.raises(BadInputError, match="validation normals"):
        choose_image_score(model, [], cfg)
    assert [parse_image_score(v) for v in ("wdm", "map", "auto")] == ["wdm", "map", "auto"]
    with pytest.raises(BadInputError, match="image_score must be"):
        parse_image_score("max")
    assert needs_calibration({"image_score": "auto"}) == ["image_score: auto"]
    assert needs_calibration({"image_score": "map"}) == ["image_score: map"] and needs_calibration({}) == []


class _Set:
    skipped = 0

    def level_maps(self, model, batch_size=8, channels_last=False):
        return []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return level3_run(tmp_path_factory, "is", n_good=3, image_score="auto")


def _scores(csv_path):
    with open(csv_path, newline="") as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f)}


def test_auto_is_decided_on_the_synthetic_set_and_every_command_scores_with_the_choice(run, tmp_path):
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.cli import main
    from uninet_feat.evaluate import score_samples
    from uninet_feat.normals import validation_normals
    from uninet_feat.runs import load_samples, make_dataset
    from uninet_feat.selection import SyntheticValidation
    data, r = run
    cal = json.loads((r / "calibration.json").read_text())
    choice = cal["image_score_choice"]
    auc = choice["synthetic_image_auroc"]
    assert cal["image_score"] == choice["image_score"] == ("map" if auc["map"] > auc["wdm"] + PIXEL_MAP_MARGIN
                                                           else "wdm")
    # the recorded figures are those of the model's own two scores on that set
    model, ck = build_from_checkpoint(r / "model.pt")
    cfg = dict(ck["config"])
    model.cfg["map_levels"] = [3]
    sv = SyntheticValidation.from_config(make_dataset(validation_normals(cfg), cfg, model.source), cfg)
    x = torch.cat(list(sv._inputs(64, False)))
    for kind in ("wdm", "map"):
        model.cfg["image_score"] = kind
        assert auc[kind] == pytest.approx(metrics.image_auroc(sv.labels, model.predict(x)[1].numpy()), abs=1e-12)
    # `calibrate --image-score map`: evaluate's scores and the threshold are the map's, a CSV row for each image
    assert main(["calibrate", "--run", str(r), "--image-score", "map", "--quiet"]) == 0
    cal_map = json.loads((r / "calibration.json").read_text())
    assert cal_map["image_score"] == "map" and "image_score_choice" not in cal_map
    assert main(["evaluate", "--run", str(r), "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "m.csv"),
                 "--quiet"]) == 0
    test = [s for s in load_samples(cfg) if s.split == "test"]
    model.cfg["image_score"] = "map"
    want = score_samples(model, test, cfg, keep_maps=False)
    got = _scores(tmp_path / "m.csv")
    np.testing.assert_allclose([got[str(s.path)] for s in want["samples"]], want["scores"], rtol=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["image_score"] == "map: smoothed, levels 3"
    assert main(["calibrate", "--run", str(r), "--image-score", "wdm", "--quiet"]) == 0
    cal_wdm = json.loads((r / "calibration.json").read_text())
    assert cal_wdm["threshold"] != cal_map["threshold"]   # each score's own validation-normal quantile
    assert main(["evaluate", "--run", str(r), "--csv", str(tmp_path / "w.csv"), "--quiet"]) == 0
    model.cfg["image_score"] = "wdm"
    wdm = score_samples(model, test, cfg, keep_maps=False)
    np.testing.assert_allclose([_scores(tmp_path / "w.csv")[str(s.path)] for s in wdm["samples"]], wdm["scores"],
                               rtol=1e-6)
    assert not np.allclose(wdm["scores"], want["scores"])
    # a calibration.json written before image_score existed scores with the WDM
    main(["calibrate", "--run", str(r), "--image-score", "map", "--quiet"])
    old = json.loads((r / "calibration.json").read_text())
    old.pop("image_score")
    (r / "calibration.json").write_text(json.dumps(old))
    assert main(["evaluate", "--run", str(r), "--csv", str(tmp_path / "o.csv"), "--quiet"]) == 0
    np.testing.assert_allclose([_scores(tmp_path / "o.csv")[str(s.path)] for s in wdm["samples"]], wdm["scores"],
                               rtol=1e-6)
    # `train --resume --image-score map` on the finished run calibrates again with it, training nothing (model.pt
    # is written again for its config, with the same weights)
    before = torch.load(r / "model.pt", weights_only=True)
    assert before["config"]["image_score"] == "auto"
    assert main(["train", "--out", str(r), "--resume", "--image-score", "map", "--quiet"]) == 0
    assert json.loads((r / "calibration.json").read_text())["image_score"] == "map"
    after = torch.load(r / "model.pt", weights_only=True)
    assert after["config"]["image_score"] == "map" and after["epoch"] == before["epoch"]
    weights = [k for k, v in before.items() if isinstance(v, dict) and all(torch.is_tensor(t) for t in v.values())]
    assert weights and all(torch.equal(before[k][n], after[k][n]) for k in weights for n in before[k])
    # the library's Detector and the exported ONNX model score with it too
    from uninet_feat.detector import Detector
    paths = [s.path for s in want["samples"]]
    np.testing.assert_allclose([d.score for d in Detector(r).score(paths)], want["scores"], rtol=1e-5)
    assert main(["export-model", "--run", str(r), "--out", str(tmp_path / "x"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "x" / "model.json").read_text())
    assert meta["check"]["max_abs_diff_score"] < 1e-4 and "image_score: map" in meta["outputs"]["score"]


def test_calibrating_a_run_without_calibration_json_takes_its_configs_image_score(run, tmp_path):
    """A first training stopped after model.pt and before calibrating: `calibrate --run RUN` (the fix evaluate names)
    chose the method's WDM and all levels, silently not the config's `image_score` / `map_levels`."""
    import shutil
    from uninet_feat.cli import main
    data, r = run
    copy = tmp_path / "run"
    shutil.copytree(r, copy)
    assert main(["calibrate", "--run", str(copy), "--image-score", "map", "--map-levels", "3", "--quiet"]) == 0
    (copy / "calibration.json").unlink()
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 2   # refused: its config needs the calibration
    assert main(["calibrate", "--run", str(copy), "--quiet"]) == 0
    cal = json.loads((copy / "calibration.json").read_text())
    cfg = torch.load(copy / "model.pt", weights_only=True)["config"]
    assert cfg["image_score"] in ("auto", "map") and cal["map_levels"] == [3]
    assert cal["image_score"] == ("map" if cfg["image_score"] == "map" else cal["image_score_choice"]["image_score"])
    assert "image_score_choice" in cal or cfg["image_score"] == "map"


def test_both_label_free_choices_share_one_synthetic_set_and_one_model_pass(run, tmp_path, monkeypatch):
    """`calibrate --map-levels auto --image-score auto` built the synthetic set and ran the model over it twice;
    the shared pass must give each choice the figures its own pass gives."""
    import shutil
    from uninet_feat.calibration import recalibrate
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.normals import validation_normals
    from uninet_feat.runs import make_dataset
    from uninet_feat.selection import SyntheticValidation
    copy = tmp_path / "run"
    shutil.copytree(run[1], copy)
    built, passes = [], []
    make, level_maps = SyntheticValidation.from_config.__func__, SyntheticValidation.level_maps
    monkeypatch.setattr(SyntheticValidation, "from_config",
                        classmethod(lambda cls, ds, cfg: built.append(1) or make(cls, ds, cfg)))
    monkeypatch.setattr(SyntheticValidation, "level_maps",
                        lambda self, *a, **k: passes.append(1) or level_maps(self, *a, **k))
    # range units: a pixel map other than the WDM's whatever the levels, so that the image score is chosen too
    cal = recalibrate(copy, map_levels="auto", map_norm="range", image_score="auto", warn_kinds=False)
    assert len(built) == len(passes) == 1
    assert "synthetic_image_auroc" in cal["image_score_choice"]
    # each figure recorded equals the same choice's own set and pass, made afresh
    model, ck = build_from_checkpoint(copy / "model.pt")
    cfg = dict(ck["config"])
    monkeypatch.undo()
    sv = SyntheticValidation.from_config(make_dataset(validation_normals(cfg), cfg, model.source), cfg)
    ranges = cal["map_norm"]
    pix = sv.pixel_auroc_of(model, {"3 range": ([3], ranges), "1,2,3 range": (None, ranges)})
    assert {k: cal["pixel_map_choice"]["synthetic_pixel_auroc"][k] for k in pix} == pytest.approx(pix, abs=1e-12)
    model.cfg.update(map_levels=cal["map_levels"], map_norm=ranges)
    assert cal["image_score_choice"]["synthetic_image_auroc"] == pytest.approx(sv.image_auroc_of(model), abs=1e-12)
