"""Thresholds come from the validation normals (or the user), never from test labels."""
import json
import warnings

import numpy as np
import pytest

from uninet_feat.thresholds import NO_THRESHOLD, pass_chance, resolve_threshold, threshold_at_fpr
from uninet_feat.errors import BadInputError


def test_threshold_at_fpr_bounds_the_validation_false_positives():
    rng = np.random.default_rng(0)
    for n in (1, 7, 68, 500):
        s = rng.normal(size=n).round(1)          # rounding makes ties
        for fpr in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.99):
            t = threshold_at_fpr(s, fpr)
            assert (s > t).mean() <= fpr + 1e-12
            lower = s[s < t]                     # the next lower threshold would break the bound
            if len(lower):
                assert (s > lower.max()).mean() > fpr
    assert threshold_at_fpr([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.25) == 8.0
    assert threshold_at_fpr([1, 2, 3], 0.0) == 3.0


def _run(tmp_path, **cal):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "calibration.json").write_text(json.dumps({"threshold": 0.9, "threshold_rule": "r", **cal}))
    return tmp_path


def test_resolve_threshold_rules(tmp_path):
    run = _run(tmp_path / "a", val_scores=[0.1, 0.2, 0.3, 0.4])
    with pytest.warns(UserWarning, match="only 4 validation normals"):
        assert resolve_threshold(run) == (0.9, "r")
    assert resolve_threshold(run, threshold=2.5)[0] == 2.5
    assert resolve_threshold(run, max_fpr=0.25)[0] == 0.3
    with pytest.warns(UserWarning, match="lowest false-positive rate"):
        assert resolve_threshold(run, max_fpr=0.1)[0] == 0.4
    with pytest.raises(BadInputError, match="not both"):
        resolve_threshold(run, threshold=1.0, max_fpr=0.1)
    with pytest.raises(BadInputError, match=r"\[0, 1\)"):
        resolve_threshold(run, max_fpr=1.5)
    with pytest.raises(BadInputError, match="finite"):
        resolve_threshold(run, threshold=float("nan"))
    old = _run(tmp_path / "old")                  # written before val_scores were kept
    with pytest.raises(BadInputError, match="no validation-normal scores") as e:
        resolve_threshold(old, max_fpr=0.05)
    assert "calibration.json" in str(e.value) and "uninet-feat calibrate" in str(e.value)
    with pytest.warns(UserWarning, match=r"no threshold, so no image is flagged .*--threshold VALUE"):
        assert resolve_threshold(tmp_path / "none") == (None, NO_THRESHOLD)   # val_fraction 0: said, not silent


def test_default_threshold_warns_when_it_rests_on_too_few_validation_normals(tmp_path):
    """With n validation normals the 0.99 quantile is about their maximum, passed by a new normal with probability
    >= 1/(n+1): one AITEX validation strip made it 50 %, and a run flagged all its test normals."""
    few = _run(tmp_path / "few", val_scores=[0.5], n_val_normals=1)
    with pytest.warns(UserWarning,
                      match=r"only 1 validation normal, .*probability 50 % \(at least 1/2\).*--val-fraction"):
        assert resolve_threshold(few) == (0.9, "r")
    # 19 made it under 5 % in the message; the 0.99 quantile lies below the highest score: 5.9 % (simulated below)
    nineteen = _run(tmp_path / "19", val_scores=list(np.linspace(0, 1, 19)), n_val_normals=19)
    with pytest.warns(UserWarning, match=r"only 19 validation normals, .*probability 6 % \(at least 1/20\)"):
        resolve_threshold(nineteen)
    rng = np.random.default_rng(0)
    for n in (1, 19, 23, 24):
        s, new = rng.random((100_000, n)), rng.random(100_000)
        assert (new > np.quantile(s, 0.99, axis=1)).mean() == pytest.approx(pass_chance(n), abs=0.003)
    assert pass_chance(23) > 0.05 > pass_chance(24)
    tenth = _run(tmp_path / "tenth", val_scores=[0.1] * 10, n_val_normals=10, val_fraction=0.1)
    with pytest.warns(UserWarning, match=r"`train --val-fraction 0.24`, now 0.1: 24 or more"):
        resolve_threshold(tenth)                     # the fix names a larger share, not one the run already uses
    half = _run(tmp_path / "half", val_scores=[0.1] * 4, n_val_normals=4, val_fraction=0.5)
    with pytest.warns(UserWarning, match=r"add normal images to train on \(--val-fraction is 0.5 already; 24 validation normals at that "
                                         r"share need about 48 normal images in all\)"):
        resolve_threshold(half)
    # the data's own validation folder: --val-fraction does not draw it, more images there is the fix
    own = _run(tmp_path / "own", val_scores=[0.1] * 3, n_val_normals=3, val_fraction=0.1, val_from_data=3)
    with pytest.warns(UserWarning, match=r"put more normal images into the data's validation split") as got:
        resolve_threshold(own)
    assert "val-fraction" not in str(got[0].message)
    enough = _run(tmp_path / "24", val_scores=list(np.linspace(0, 1, 24)), n_val_normals=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_threshold(enough)
        resolve_threshold(few, threshold=1.0)      # a given threshold does not rest on them
    with warnings.catch_warnings(record=True) as seen:   # the CLI's "default" filter: once per command, not
        warnings.simplefilter("default")                # once per scorer (`evaluate --knn` resolves three)
        resolve_threshold(few)
        resolve_threshold(".", cal={"threshold": 0.9, "val_scores": [0.5]})
        resolve_threshold(".", cal={"threshold": 0.9, "val_scores": [0.5]})
    assert [str(w.message).count("only 1 validation normal,") for w in seen] == [1]


def test_train_val_fraction_flag_sets_the_validation_share(tmp_path, capsys):
    """`train --val-fraction`: the held-out share is the flag's (saved in config.yaml), the warning says when the
    default threshold rests on too few normals, and a share outside [0, 1) is refused before training."""
    import yaml
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=1, n_bad=1)
    args = tiny_train_args(data)
    with pytest.warns(UserWarning, match="only 4 validation normals"):
        assert main(args + ["--val-fraction", "0.5", "--out", str(tmp_path / "r")]) == 0
    cal = json.loads((tmp_path / "r" / "calibration.json").read_text())
    assert cal["n_val_normals"] == 4 and len(cal["val_paths"]) == 4
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["val_fraction"] == 0.5
    assert main(args + ["--val-fraction", "1.0", "--out", str(tmp_path / "bad")]) == 2
    assert "val_fraction must be a number >= 0 and < 1, got 1.0" in capsys.readouterr().err


def test_map_range_exact_when_small_and_close_when_strided():
    from uninet_feat.overlay import map_range
    rng = np.random.default_rng(0)
    maps = [rng.gamma(2.0, 1.0, (300, 400)).astype(np.float32) for _ in range(3)]
    flat = np.concatenate([m.ravel() for m in maps])
    exact = [float(np.quantile(flat, 0.5)), float(np.quantile(flat, 0.999))]
    assert map_range(maps) == exact
    strided = map_range(maps, max_pixels=40_000)          # every 9th pixel
    assert strided != exact and np.allclose(strided, exact, rtol=0.03)
    from uninet_feat.overlay import MapRangeSample       # the streamed form calibrate uses
    for cap in (1 << 22, 40_000):
        acc = MapRangeSample(len(maps), max_pixels=cap)
        for m in maps:
            acc.add(m)
        assert acc.result() == map_range(maps, max_pixels=cap)


def test_calibration_refuses_validation_scores_that_are_not_finite(monkeypatch, tmp_path):
    """A NaN validation score (a diverged model) sorted last and became the 0.99 quantile: a NaN threshold that
    flags nothing, written to calibration.json without a word."""
    from uninet_feat import evaluate
    from uninet_feat.calibration import calibration
    from uninet_feat.data.layouts import Sample
    val = [Sample(tmp_path / f"{n}.png", "train", "good", None, "") for n in ("a", "b", "c")]
    monkeypatch.setattr(evaluate, "score_samples",
                        lambda model, samples, cfg, **kw: {"samples": samples, "scores": [0.1, float("nan"), 0.2],
                                                           "skipped": []})
    with pytest.raises(BadInputError, match=r"1 validation normal\(s\) scored NaN or infinite") as e:
        calibration(None, val, {})
    assert str(tmp_path / "b.png") in str(e.value) and "lower --lr" in str(e.value)


def test_recalibrating_a_channels_last_tiled_run_gives_trainings_calibration_to_the_last_bit(tmp_path):
    """`calibrate --run` (and a resume killed after model.pt) scored the validation normals with the model in
    the contiguous layout, training and evaluate in channels_last: a tiled run's threshold and place offsets moved
    in the 7th digit, so evaluate's figures after a resume were not the uninterrupted run's."""
    import shutil
    from uninet_feat.calibration import recalibrate
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    from _tiny import register_tiny, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "wide", n_train=8, n_good=1, n_bad=1, wide=True)
    cfg = load_config(None, {"data": str(data), "tile": 32, "tile_norm": "position"}, base={
        "backbone": "tiny", "weights": "random", "image_size": 32, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.3, "channels_last": True, "seed": 3})
    train(cfg, tmp_path / "run", quiet=True)
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    recalibrate(tmp_path / "again")
    a, b = (json.loads((tmp_path / r / "calibration.json").read_text()) for r in ("run", "again"))
    assert a["threshold"] == b["threshold"] and a["val_scores"] == b["val_scores"]
    assert a.get("tile_offsets") == b.get("tile_offsets")
