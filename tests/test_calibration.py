"""Thresholds come from the validation normals (or the user), never from test labels."""
import json

import numpy as np
import pytest

from uninet_feat.calibration import resolve_threshold, threshold_at_fpr
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
    assert resolve_threshold(tmp_path / "none") == (None, "none: no calibration")


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
