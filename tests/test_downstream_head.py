"""LightGBM head: CV accuracy on separable synthetic defects, persistence, threshold hygiene, errors."""
import json

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from uninet_feat.downstream import Head, train_head
from uninet_feat.downstream.head import f1_max_threshold
from uninet_feat.errors import BadInputError

FAST = dict(n_estimators=200, learning_rate=0.1)


def defects(n_per=40, d=12, seed=0, names=("hole", "stain", "thread")):
    """Class-dependent Gaussian means on a few informative features, unit noise everywhere."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((len(names), d)) * 1.5
    means[:, 6:] = 0  # half the features are pure noise
    y = np.repeat(np.array(names), n_per)
    x = means[np.repeat(np.arange(len(names)), n_per)] + rng.standard_normal((len(y), d))
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def multiclass():
    x, y = defects()
    return x, y, train_head(x, y, n_splits=4, seed=0, params=FAST, n_jobs=1)


def test_multiclass_cv_beats_chance(multiclass):
    x, y, res = multiclass
    assert res.task == "multiclass" and res.classes == ["hole", "stain", "thread"] and res.n_splits == 4
    assert res.oof["accuracy"] > 0.8 and res.oof["macro_f1"] > 0.8      # chance is 0.33
    assert len(res.folds) == 4 and all(f["n_test"] == 30 for f in res.folds)
    assert np.array(res.oof["confusion"]).sum() == len(y)
    assert set(res.oof["per_class"]) == set(res.classes)
    assert res.n_estimators == max(1, int(np.median([f["best_iteration"] for f in res.folds])))
    json.dumps(res.summary())
    assert set(res.head.predict(x)) <= set(res.classes)


def test_accuracy_interval_is_wilsons_and_reported_out_of_fold(multiclass):
    """The out-of-fold accuracy comes with its Wilson 95 % interval (by the textbook formula here), which
    contains it and narrows as rows grow: 28 of 56 right (AITEX's defect types) spans about 0.37-0.63."""
    from uninet_feat.downstream.head import accuracy_interval
    x, y, res = multiclass
    right = int(round(res.oof["accuracy"] * len(y)))
    z, n, p = 1.959963984540054, len(y), right / len(y)
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert res.oof["accuracy_interval"] == pytest.approx([mid - half, mid + half], abs=1e-9)
    lo, hi = res.oof["accuracy_interval"]
    assert lo < res.oof["accuracy"] < hi and all(len(f["accuracy_interval"]) == 2 for f in res.folds)
    lo, hi = accuracy_interval(28, 56)
    assert 0.36 < lo < 0.38 and 0.62 < hi < 0.64
    assert np.diff(accuracy_interval(280, 560))[0] < 0.4 * np.diff(accuracy_interval(28, 56))[0]


def test_save_load_identical(multiclass, tmp_path):
    x, _, res = multiclass
    res.head.save(tmp_path / "head")
    loaded = Head.load(tmp_path / "head")
    np.testing.assert_array_equal(loaded.predict_proba(x), res.head.predict_proba(x))
    np.testing.assert_array_equal(loaded.predict(x), res.head.predict(x))
    assert loaded.classes == res.head.classes and loaded.feature_names == res.head.feature_names
    (tmp_path / "head" / "model.txt").write_text((tmp_path / "head" / "model.txt").read_text() + "\n")
    with pytest.raises(BadInputError, match="does not match"):
        Head.load(tmp_path / "head")
    with pytest.raises(BadInputError, match="missing head.json"):
        Head.load(tmp_path / "nothing")


def test_deterministic(multiclass):
    x, y, res = multiclass
    again = train_head(x, y, n_splits=4, seed=0, params=FAST, n_jobs=1)
    np.testing.assert_array_equal(again.oof_proba, res.oof_proba)
    np.testing.assert_array_equal(again.head.predict_proba(x), res.head.predict_proba(x))


def binary(seed=0):
    x, y = defects(n_per=45, seed=seed, names=("defect", "good"))
    x += np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32) * 1.5  # overlap
    return x, y


def test_binary_threshold_never_sees_test_labels():
    x, y = binary()
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y))
    res = train_head(x, y, cv=folds, params=FAST, n_jobs=1)
    assert res.classes == ["good", "defect"]            # "good" is recognised as the negative class
    assert 0 < res.oof["auroc"] <= 1 and np.array(res.oof["confusion"]).shape == (2, 2)
    ts = [f["threshold"] for f in res.folds]
    assert res.head.threshold == pytest.approx(np.mean(ts))
    # each out-of-fold prediction uses its own fold's threshold
    pred = (res.oof_proba[:, 1] >= np.array(ts)[res.fold_of]).astype(int)
    assert res.oof["accuracy"] == pytest.approx((pred == (y == "defect")).mean())
    # relabelling fold 0's test rows changes nothing that fold 0 derives: model, threshold
    y2 = y.copy()
    te = folds[0][1]
    y2[te] = np.where(y[te] == "good", "defect", "good")
    res2 = train_head(x, y2, cv=folds, params=FAST, n_jobs=1)
    assert res2.folds[0]["threshold"] == res.folds[0]["threshold"]
    np.testing.assert_array_equal(res2.oof_proba[te], res.oof_proba[te])
    assert res2.folds[0]["accuracy"] == pytest.approx(1 - res.folds[0]["accuracy"])


@pytest.mark.parametrize("normal", ["free", " Free", "OK", "pass"])
def test_a_binary_head_takes_every_normal_folder_name_as_the_negative_class(normal):
    """The data layer reads `free` (and good / normal / ok, any case) as normal; a binary head must too, else
    "broken" < "free" makes the normals the positive class and its threshold one on P(normal)."""
    from uninet_feat.downstream.head import _labels
    codes, classes, task, _ = _labels(["broken", normal, normal, "broken"], "binary", None)
    assert task == "binary" and classes == [normal, "broken"] and list(codes) == [1, 0, 0, 1]


def test_f1_max_threshold():
    assert f1_max_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.225)
    assert f1_max_threshold(np.array([0, 1]), np.array([0.1, 0.9])) == pytest.approx(0.5)
    assert f1_max_threshold(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_errors_and_clamping():
    x, y = defects(n_per=10)
    y = y.astype(object)
    bad = x.copy()
    bad[[3, 17], 0] = np.nan
    with pytest.raises(BadInputError, match=r"2 of 30 feature rows contain NaN or Inf \(rows \[3, 17\]"):
        train_head(bad, y)
    y1 = y.copy()
    y1[0] = "scratch"
    with pytest.raises(BadInputError, match=r"fewer than 2 samples.*scratch \(1\)"):
        train_head(x, y1)
    with pytest.raises(BadInputError, match="exactly 2 classes"):
        train_head(x, y, task="binary")
    y3 = y.copy()
    y3[:3] = "scratch"                                   # a class of 3 rows does not cut the other classes' folds
    res = train_head(x, y3, n_splits=5, params=FAST, n_jobs=1)
    assert res.n_splits == 5 and res.small_classes == ["scratch"] and res.summary()["small_classes"] == ["scratch"]
    assert sorted(res.fold_of[:3]) == sorted(set(res.fold_of[:3]))   # its rows tested in 3 different folds
    assert all(f["n_train"] + f["n_val"] >= 24 for f in res.folds)      # each model trains on ~4/5 of the rows
    with pytest.raises(BadInputError, match="expected 12"):
        res.head.predict(x[:, :5])
    y3[:3] = ["scratch", "scratch", "hole"]              # 2 rows: tested in 2 folds, every fold model still sees it
    res = train_head(x, y3, params=FAST, n_jobs=1)
    assert res.n_splits == 5 and res.oof_proba.shape == (30, 4)
    assert np.allclose(res.oof_proba.sum(1), 1)
    with pytest.warns(UserWarning, match=r"12 folds asked, 10 used: the largest class has 10 rows"):
        res = train_head(x[:12], y[:12], n_splits=12, params=FAST, n_jobs=1)   # folds capped by the largest class
    assert res.n_splits == int(np.unique(y[:12], return_counts=True)[1].max())


def test_a_head_no_better_than_chance_is_said_with_its_baselines():
    """Features that carry nothing: the report gives the accuracy of always predicting the largest class and the
    balanced accuracy, and training warns that the head is no better than chance (a binary head's F1-max
    threshold can score far below the all-normal baseline, as an audit found: 0.38 against 0.79)."""
    rng = np.random.default_rng(0)
    y = np.array(["good"] * 60 + ["hole"] * 20)
    x = np.ones((80, 6), np.float32)                                      # nothing to split on
    with pytest.warns(UserWarning, match=r"no better than chance out of fold: balanced accuracy 0\.\d+ \(chance 0\.500\)"):
        res = train_head(x, y, n_splits=4, params=FAST, n_jobs=1)
    assert res.oof["majority_accuracy"] == 0.75 and res.oof["balanced_accuracy"] <= 0.5
    x_sep = np.where(y[:, None] == "hole", 3.0, 0.0) + rng.standard_normal((80, 6))                  # separable: no warning, high balance
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = train_head(x_sep, y, n_splits=4, params=FAST, n_jobs=1)
    assert good.oof["balanced_accuracy"] > 0.9 and good.oof["majority_accuracy"] == 0.75


def test_a_two_class_head_trained_as_multiclass_says_so_after_a_reload(tmp_path):
    """task="multiclass" with two classes: the head, its head.json and the result agree (the head said binary)."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (30, 4)), rng.normal(2, 1, (30, 4))]).astype(np.float32)
    y = ["hole"] * 30 + ["stain"] * 30
    res = train_head(X, y, task="multiclass", n_splits=3)
    assert res.task == res.head.task == "multiclass"
    res.head.save(tmp_path)
    again = Head.load(tmp_path)
    assert again.task == "multiclass" and list(again.predict(X)) == list(res.head.predict(X))
    assert list(res.head.predict(X)) == [res.head.classes[i] for i in res.head.predict_proba(X).argmax(1)]


def test_lightgbm_threads_follow_omp_num_threads_not_every_core(monkeypatch):
    """LightGBM's own default took every core whatever OMP_NUM_THREADS said: 6-12x slower than 1 thread on 2 shared
    cores (a 392-row head took 34 minutes). The threads used are recorded; nonsense is refused."""
    from uninet_feat.downstream.head import default_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    x, y = defects(n_per=12)
    assert train_head(x, y, n_splits=4, seed=0, params=FAST).head.n_jobs == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os
    assert default_threads() == len(os.sched_getaffinity(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BadInputError, match="threads must be an integer >= 1"):
            train_head(x, y, n_splits=4, params=FAST, n_jobs=bad)


def _fake_store(monkeypatch, labels, seed=0):
    """train_head_cmd on a store of the given image labels ('' = unlabelled, as `extract --batch` stores them)."""
    from uninet_feat import workflows
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(labels), 4)).astype("f4")
    for i, lab in enumerate(labels):
        X[i] += {"good": 0.0, "hole": 3.0, "stain": -3.0}.get(lab, 1.5)
    recs = [{"path": f"/d/{i}.png", "label": lab, "is_normal": lab == "good", "split": "test", "group": ""}
            for i, lab in enumerate(labels)]

    class Store:
        manifest = {"vector_names": ["a", "b"], "source": None}   # head columns: top tile + mean

        def __init__(self, path):
            pass

        def image_table(self):
            return X, recs
    monkeypatch.setattr(workflows, "FeatureStore", Store)
    return workflows.train_head_cmd


def test_train_head_leaves_unlabelled_images_out_of_both_classes(monkeypatch, tmp_path):
    """An image of unknown label was a positive of the binary head and a class '' of a multiclass one."""
    cmd = _fake_store(monkeypatch, ["good"] * 20 + ["hole"] * 10 + ["stain"] * 10 + [""] * 20)
    with pytest.warns(UserWarning, match=r"20 unlabelled image\(s\) .*/d/40.png"):
        rep = cmd("F", tmp_path / "b", task="binary", folds=2, threads=1)
    assert rep["n_rows"] == 40 and sorted(rep["classes"]) == ["defect", "good"]
    with pytest.warns(UserWarning, match="20 unlabelled"):
        rep = cmd("F", tmp_path / "m", task="multiclass", defects_only=True, folds=2, threads=1)
    assert rep["n_rows"] == 20 and sorted(rep["classes"]) == ["hole", "stain"]
    cmd = _fake_store(monkeypatch, [""] * 12)
    with pytest.raises(BadInputError, match="none of the store's 12 images has a label"):
        cmd("F", tmp_path / "n", task="binary", folds=2, threads=1)


def test_a_head_that_fails_to_save_leaves_no_old_report_beside_it(monkeypatch, tmp_path):
    from uninet_feat.downstream.head import Head
    cmd = _fake_store(monkeypatch, ["good"] * 12 + ["hole"] * 12)
    cmd("F", tmp_path, task="binary", folds=2, threads=1)
    assert (tmp_path / "cv_report.json").exists()

    def killed(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Head, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cmd("F", tmp_path, task="binary", folds=2, threads=1)
    assert not (tmp_path / "cv_report.json").exists()


def _labels_csv(path, rows):
    path.write_text("path,label\n" + "".join(f"{p},{v}\n" for p, v in rows))
    return path


def test_labels_naming_one_image_twice_give_it_one_row_and_refuse_two_labels(monkeypatch, tmp_path):
    """A labels CSV written on Windows naming one image twice (C:\\ and c:\\, which the store's matching finds to be
    one image) gave it two rows (one in a CV fold, its copy training it) or two labels at once."""
    import warnings
    labels = ["good"] * 10 + ["hole"] * 10
    cmd = _fake_store(monkeypatch, labels)
    rows = [(f"C:\\lines\\{i}.png", v) for i, v in enumerate(labels)]
    csv = _labels_csv(tmp_path / "l.csv", rows + [("c:\\lines\\0.png", "good")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the Windows paths matched by their path below the store's folder
        rep = cmd("F", tmp_path / "h", task="binary", labels=csv, folds=2, threads=1)
        assert rep["n_rows"] == 20
        _labels_csv(csv, rows + [("c:\\lines\\0.png", "stain")])
        with pytest.raises(BadInputError, match=r"line 22: c:\\lines\\0.png is label 'stain' here and 'good' on "
                                                r"line 2 \(C:\\lines\\0.png\): both are the store's image /d/0.png"):
            cmd("F", tmp_path / "h", task="multiclass", labels=csv, folds=2, threads=1)


def test_a_binary_head_on_labels_of_several_defect_types_is_normal_vs_defect(monkeypatch, tmp_path):
    """--task binary --labels naming normals and two defect types was refused ('binary head needs exactly 2
    classes'): the labels are read as without --labels, every defect type a defect."""
    labels = ["good"] * 10 + ["hole"] * 5 + ["stain"] * 5
    cmd = _fake_store(monkeypatch, labels)
    csv = _labels_csv(tmp_path / "l.csv", [(f"/d/{i}.png", v) for i, v in enumerate(labels)])
    rep = cmd("F", tmp_path / "h", task="binary", labels=csv, folds=2, threads=1)
    assert sorted(rep["classes"]) == ["defect", "good"] and rep["n_rows"] == 20


def test_classes_left_out_for_too_few_images_are_named_when_too_few_remain(monkeypatch, tmp_path):
    """Left with one class after the single-image ones were dropped, train-head said 'a head needs at least 2
    classes, got ['good']', naming neither the classes it had left out nor why."""
    cmd = _fake_store(monkeypatch, ["good"] * 10 + ["hole", "stain"])
    with pytest.raises(BadInputError, match=r"classes with fewer than 2 images are left out \(hole \(1\), stain "
                                            r"\(1\)\), and 1 class\(es\) remain \(good\)") as e:
        cmd("F", tmp_path / "h", task="multiclass", folds=2, threads=1)
    assert "label at least 2 images of each class" in e.value.fix


def test_train_head_names_the_images_whose_features_are_nan(monkeypatch, tmp_path):
    """NaN features (a damaged model) were refused as '2 of 20 feature rows contain NaN (rows [3, 12])': no store,
    no image, no fix."""
    from uninet_feat import workflows
    cmd = _fake_store(monkeypatch, ["good"] * 10 + ["hole"] * 10)
    X, _ = workflows.FeatureStore("F").image_table()
    X[[3, 12], 1] = np.nan
    with pytest.raises(BadInputError, match=r"^F: the features of 2 image\(s\) contain NaN or Inf \(first: /d/3.png, "
                                            r"/d/12.png\)") as e:
        cmd("F", tmp_path / "h", task="binary", folds=2, threads=1)
    assert "extract again" in e.value.fix
