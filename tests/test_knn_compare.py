"""benchmarks.knn_compare on tiled images: a strip's score is its highest tile score, for every scorer."""
import json

import numpy as np
import pytest

from benchmarks import knn_compare
from uninet_feat.config import load_config
from uninet_feat.downstream import KNNScorer
from uninet_feat.evaluate import evaluate
from uninet_feat.extract import Extractor
from uninet_feat.runs import load_samples, train_val_samples
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kc")
    data = write_texture_set(root / "wide", n_train=8, n_good=3, n_bad=3, wide=True)
    cfg = load_config(None, {"data": str(data), "tile": 64}, base={
        "backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.25, "channels_last": False, "seed": 3})
    train(cfg, root / "run", quiet=True)
    return data, root / "run", cfg


def test_tiled_scores_are_the_highest_tile_and_wdm_equals_evaluate(tiled_run, tmp_path):
    data, run, cfg = tiled_run
    res = knn_compare.main(["--data", str(data), "--run", str(run), "--tile", "64", "--image-size", "64",
                            "--coreset", "1.0", "--json", str(tmp_path / "k.json")])
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["scores"] == res["scores"]
    # the file says what it compared: the run, k, the run's backbone and weights (it held figures only)
    assert saved["setup"]["run"] == str(run) and saved["setup"]["k"] == 1 and saved["setup"]["coreset"] == 1.0
    assert saved["setup"]["backbone"] == "tiny" and saved["setup"]["run_weights"] == "random"
    test = [s for s in load_samples(cfg) if s.split == "test"]
    assert res["scores"]["path"] == [str(s.path) for s in test]

    # WDM: the same strip scores as `evaluate` (highest tile, tile_score max)
    rows = {r["path"]: float(r["score"]) for r in evaluate(run, quiet=True)["_rows"]}
    np.testing.assert_allclose(res["scores"]["wdm"], [rows[str(s.path)] for s in test], rtol=1e-5)

    # kNN: recomputed tile by tile, the strip takes the max over its three tiles
    samples = load_samples(cfg)
    fit, val = train_val_samples(samples, cfg)
    ex = Extractor(run=run, image_size=64, patches=True, tile=64)
    knn = KNNScorer(kind="flat", k=1, coreset_ratio=1.0).fit(ex.extract(fit)["patches"].astype(np.float32))
    te = ex.extract(test)
    tile_scores = knn.score_patches(te["patches"].astype(np.float32)).max(1)
    assert len(tile_scores) == 3 * len(test)
    expect = [tile_scores[te["index"] == i].max() for i in range(len(test))]
    np.testing.assert_allclose(res["scores"]["knn"], expect, rtol=1e-5)

    # combined: z-scores on the validation normals' strip scores, never on test labels
    va = ex.extract(val)
    vk = np.array([knn.score_patches(va["patches"][va["index"] == i].astype(np.float32)).max()
                   for i in range(len(val))])
    vw = np.array([va["scores"][va["index"] == i].max() for i in range(len(val))])
    z = lambda v, ref: (np.asarray(v) - ref.mean()) / (ref.std() + 1e-12)  # noqa: E731
    np.testing.assert_allclose(res["scores"]["combined"], z(res["scores"]["knn"], vk) + z(res["scores"]["wdm"], vw),
                               rtol=1e-5, atol=1e-6)
    assert res["combined"]["image_auroc"] == pytest.approx(
        knn_compare.metrics.image_auroc([0 if s.is_normal else 1 for s in test], res["scores"]["combined"]))


def test_per_image_takes_the_max_over_an_images_items():
    from uninet_feat.scorers import per_sample_max
    out = per_sample_max([0.1, 0.9, 0.3, 0.2, -5.0], [0, 0, 1, 1, 3], 4)
    np.testing.assert_array_equal(out, [0.9, 0.3, np.nan, -5.0])   # NaN: a sample without items (skipped)


def test_index_kinds_share_one_memory_bank_and_flat_is_the_reference(tmp_path):
    data = write_texture_set(tmp_path / "set", n_train=8, n_good=3, n_bad=3)
    res = knn_compare.main(["--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                            "--coreset", "1.0", "--index-kinds", "flat,ivfpq,hnsw"])
    kinds = res["index_kinds"]
    assert list(kinds) == ["flat", "ivfpq", "hnsw"]
    assert kinds["flat"]["recall@1"] == 1.0
    for key in ("image_auroc", "pixel_auroc", "aupro"):   # flat over the same bank = the main kNN figures
        assert kinds["flat"][key] == pytest.approx(res["knn"][key])
    assert kinds["flat"]["n_queries"] == 6 * 8 * 8       # every patch of the 6 test images (8×8 grid at 64 px)
    assert 0.0 <= kinds["ivfpq"]["recall@1"] < 1.0       # 8-byte PQ codes lose exact ties on 2,048 vectors
    assert kinds["ivfpq"]["bytes"] < kinds["flat"]["bytes"]   # codes + codebooks vs raw float32 vectors
    assert 0.0 <= kinds["hnsw"]["recall@1"] <= 1.0 and kinds["hnsw"]["bytes"] > kinds["flat"]["bytes"]


def test_index_kinds_must_start_with_flat():
    with pytest.raises(SystemExit):
        knn_compare.main(["--data", "x", "--index-kinds", "hnsw,flat"])


def test_plain_knn_features_beside_the_runs_wdm(tiled_run, tmp_path):
    """--knn-features plain: the kNN sees the ImageNet-style backbone's patches (its scores change), WDM
    still comes from the run (unchanged), and the combined score is built from the two as before."""
    data, run, _ = tiled_run
    args = ["--data", str(data), "--run", str(run), "--tile", "64", "--image-size", "64", "--coreset", "1.0",
            "--weights", "random"]
    adapted = knn_compare.main(args)
    plain = knn_compare.main(args + ["--knn-features", "plain"])
    assert plain["knn_features"] == "plain" and adapted["knn_features"] == "run"
    np.testing.assert_allclose(plain["scores"]["wdm"], adapted["scores"]["wdm"], rtol=1e-6)
    assert not np.allclose(plain["scores"]["knn"], adapted["scores"]["knn"])
    comb, k, w = (np.asarray(plain["scores"][n]) for n in ("combined", "knn", "wdm"))
    assert np.corrcoef(comb, k)[0, 1] > 0 and np.corrcoef(comb, w)[0, 1] > 0


def test_plain_knn_of_a_tiled_run_takes_the_runs_tiling_and_size(tiled_run, monkeypatch):
    """--knn-features plain without --tile/--image-size: the plain extractor tiles and sizes as the run does
    (it made whole-strip features at 256 px, so the bank and test set differed from the run's)."""
    data, run, _ = tiled_run
    made, real = [], knn_compare.Extractor

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(("run" if k.get("run") else "plain", self.cfg["image_size"], self.cfg.get("tile")))

    monkeypatch.setattr(knn_compare, "Extractor", Spy)
    args = ["--data", str(data), "--run", str(run), "--coreset", "1.0", "--weights", "random",
            "--knn-features", "plain"]
    res = knn_compare.main(args)
    assert made == [("run", 64, 64), ("plain", 64, 64)]
    assert res["image_size"] == 64 and res["tile"] == 64
    explicit = knn_compare.main(args + ["--tile", "64", "--image-size", "64"])   # the run's values: the same
    np.testing.assert_allclose(res["scores"]["knn"], explicit["scores"]["knn"], rtol=1e-6)
    assert res["n_memory"] == explicit["n_memory"] == 3 * 64 * 6   # 6 training strips × 3 tiles × 8×8 patches


@pytest.mark.parametrize("flags", [["--tile", "32"], ["--image-size", "32"], ["--group", "B"]])
def test_a_flag_that_contradicts_the_run_is_refused(tiled_run, flags):
    data, run, _ = tiled_run
    with pytest.raises(SystemExit):
        knn_compare.main(["--data", str(data), "--run", str(run), "--coreset", "1.0", *flags])


def test_a_runs_group_is_the_knn_bank_and_test_set(tmp_path):
    """A run trained on group A, without --group: the kNN bank holds A's training normals and the test set is A's,
    the images `evaluate` scores (it took both groups)."""
    data = tmp_path / "data"
    write_texture_set(data / "A", n_train=8, n_good=3, n_bad=3)
    write_texture_set(data / "B", n_train=8, n_good=3, n_bad=3, seed=5)
    cfg = load_config(None, {"data": str(data), "group": "A"}, base={
        "backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.25, "channels_last": False})
    train(cfg, tmp_path / "run", quiet=True)
    ev = evaluate(tmp_path / "run", quiet=True)
    res = knn_compare.main(["--data", str(data), "--run", str(tmp_path / "run"), "--coreset", "1.0"])
    assert res["scores"]["path"] == [r["path"] for r in ev["_rows"]]
    fit, _ = train_val_samples(load_samples(cfg), cfg)
    assert all(s.group == "A" for s in fit) and res["n_memory"] == len(fit) * 8 * 8
    rows = {r["path"]: float(r["score"]) for r in ev["_rows"]}
    np.testing.assert_allclose(res["scores"]["wdm"], [rows[p] for p in res["scores"]["path"]], rtol=1e-5)


def test_an_older_runs_split_keys_are_the_legacy_ones():
    keys = knn_compare._split_keys({"val_fraction": 0.1, "seed": 0, "mask_pattern": None, "group": "A"})
    assert keys["split_hash"] == "path" and keys["val_split"] == "drawn" and keys["group"] == "A"


def test_without_a_run_the_input_size_defaults_as_before(tmp_path):
    data = write_texture_set(tmp_path / "set", n_train=4, n_good=2, n_bad=2, size=32)
    res = knn_compare.main(["--data", str(data), "--backbone", "tiny", "--weights", "random", "--coreset", "1.0"])
    cfg = load_config(None, {"data": str(data)})
    fit, _ = train_val_samples(load_samples(cfg), cfg)
    assert res["image_size"] == 256 and res["n_memory"] == len(fit) * 32 * 32   # 256 px: a 32×32 patch grid
    assert res["setup"]["backbone"] == "tiny" and res["setup"]["weights"] == "random" and res["setup"]["run"] is None


def test_a_runs_split_csv_is_the_knn_bank_and_test_set_and_another_is_refused(tmp_path):
    """A run trained with a split CSV that moves the test normals into training: without --split-csv the benchmark
    drew the layout's split, scoring as test normals images the run trained on, without a word; a run without
    validation normals gave a traceback after all the scoring (an audit, session 53)."""
    import csv
    data = write_texture_set(tmp_path / "data", n_train=6, n_good=3, n_bad=3)
    rows = [[str(p.relative_to(data)), "train", "good"] for p in sorted((data / "test/good").glob("*.png"))]
    rows += [[str(p.relative_to(data)), "test", "good"] for p in sorted((data / "train/good").glob("*.png"))[:3]]
    rows += [[str(p.relative_to(data)), "train", "good"] for p in sorted((data / "train/good").glob("*.png"))[3:]]
    rows += [[str(p.relative_to(data)), "test", "spot"] for p in sorted((data / "test/spot").glob("*.png"))]
    with open(tmp_path / "split.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "label"]] + rows)
    base = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 2,
            "val_fraction": 0.34, "channels_last": False}
    cfg = load_config(None, {"data": str(data), "split_csv": str(tmp_path / "split.csv")}, base=base)
    train(cfg, tmp_path / "run", quiet=True)
    ev = evaluate(tmp_path / "run", quiet=True)
    res = knn_compare.main(["--data", str(data), "--run", str(tmp_path / "run"), "--coreset", "1.0"])
    assert res["scores"]["path"] == [r["path"] for r in ev["_rows"]]   # the run's own test images
    with open(tmp_path / "other.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "label"]] + rows[:3])
    with pytest.raises(SystemExit):
        knn_compare.main(["--data", str(data), "--run", str(tmp_path / "run"), "--split-csv",
                          str(tmp_path / "other.csv")])
    import shutil   # the data moved with its CSV (and the run's CSV gone): the moved copy is the run's split
    moved = tmp_path / "moved"
    shutil.copytree(data, moved / "data")
    shutil.copy(tmp_path / "split.csv", moved / "split.csv")
    (tmp_path / "split.csv").rename(tmp_path / "gone.csv")
    res2 = knn_compare.main(["--data", str(moved / "data"), "--split-csv", str(moved / "split.csv"), "--run",
                             str(tmp_path / "run"), "--coreset", "1.0"])
    assert [p.replace(str(moved / "data"), str(data)) for p in res2["scores"]["path"]] == res["scores"]["path"]
    (tmp_path / "gone.csv").rename(tmp_path / "split.csv")
    train({**cfg, "val_fraction": 0.0}, tmp_path / "noval", quiet=True)
    with pytest.raises(SystemExit):
        knn_compare.main(["--data", str(data), "--run", str(tmp_path / "noval"), "--coreset", "1.0"])
