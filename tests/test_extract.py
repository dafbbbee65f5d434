"""Feature export: schema round trip, resume after a crash, plain vs adapted, CLI downstream chain."""
import json
from pathlib import Path

import numpy as np
import pytest

from uninet_feat import featstore
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.extract import Extractor
from uninet_feat.featstore import FeatureStore
from uninet_feat.train import train
from uninet_feat.runs import load_samples

from _tiny import register_tiny, register_tiny_norm, run_with_plain_index, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex")
    data = write_texture_set(root / "data", n_train=6, n_good=3, n_bad=3)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 4, "channels_last": False})
    train(cfg, root / "run", quiet=True)
    return data, root / "run", load_samples(cfg)


def test_store_round_trip_and_schema(setup, tmp_path):
    data, run, samples = setup
    ex = Extractor(run=run, patches=True)
    mem = ex.extract(samples)
    store = ex.extract_to(samples, tmp_path / "f", shard_size=4)
    assert store is not None and store.manifest["schema"] == featstore.SCHEMA
    assert store.manifest["n_shards"] == 3 and len(store.items) == len(samples)
    np.testing.assert_allclose(store.vectors, mem["vectors"], rtol=1e-5, atol=1e-6)  # batch make-up differs
    assert store.vectors.shape[1] == len(store.manifest["vector_names"])
    assert store.array("patches").shape[:2] == (len(samples), 8 * 8)  # level-2 grid: 64 px / stride 8
    assert np.isfinite(store.scores).all()
    X, recs = store.image_table()
    assert X.shape == (len(samples), 2 * store.vectors.shape[1]) and recs[0]["path"] == str(samples[0].path)
    from uninet_feat.downstream import KNNScorer   # kNN scored batch by batch: the same scores, no patch kept
    scorer = KNNScorer(coreset_ratio=None).fit(store.rows("patches", np.ones(len(samples), bool))[:4])
    batched = Extractor(run=run, patches=True).extract(samples, patch_fn=scorer.score_patches)
    assert "patches" not in batched and batched["patch_scores"].shape == (len(samples), 8 * 8)
    np.testing.assert_array_equal(batched["patch_scores"], scorer.score_patches(mem["patches"].astype(np.float32)))
    keep = np.arange(len(samples)) % 3 != 1   # rows read shard by shard (3 shards) = the whole array's rows
    got = store.rows("patches", keep)
    assert got.dtype == np.float32 and np.array_equal(got, store.array("patches")[keep].astype(np.float32))
    for n in (len(samples) + 1, len(samples) - 1):   # one short passed unseen when the last shard held one row
        with pytest.raises(BadInputError, match="row flags for the store's"):
            store.rows("patches", np.ones(n, bool))


def test_resume_after_crash_equals_uninterrupted(setup, tmp_path, monkeypatch):
    data, run, samples = setup
    ex = Extractor(run=run)
    full = ex.extract_to(samples, tmp_path / "full", shard_size=3)
    calls = {"n": 0}
    real = featstore.write_shard

    def crashing(folder, i, arrays, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real(folder, i, arrays, **kw)

    monkeypatch.setattr("uninet_feat.extract.write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        ex.extract_to(samples, tmp_path / "part", shard_size=3)
    assert not (tmp_path / "part" / "complete").exists()
    with pytest.raises(BadInputError, match="did not finish"):
        FeatureStore(tmp_path / "part")
    monkeypatch.setattr("uninet_feat.extract.write_shard", real)
    done = sorted(p.name for p in (tmp_path / "part").glob("shard-*.npz"))
    assert len(done) == 2
    seen = []
    resumed = ex.extract_to(samples, tmp_path / "part", shard_size=3, on_shard=seen.append)
    np.testing.assert_array_equal(resumed.vectors, full.vectors)
    assert seen == [2, 3]  # only the shards the crash left undone, each reported once it is on disk


def test_a_resumed_extract_redoes_the_shards_of_images_replaced_since(tmp_path, monkeypatch):
    """The resume fingerprint names images by path alone, so an image replaced between a kill and the resume kept
    the old image's features (predict's parts compare each file's size and modification time, and start over). A
    resumed extract, or one re-run into a finished store, redoes the shards of the images changed since, named in a
    warning, and keeps the others: the store equals a fresh one of the files as they are now."""
    import os
    import re
    import warnings
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = [tmp_path / "img" / f"{i}.png" for i in range(6)]
    paths[0].parent.mkdir()

    def draw(p):   # a new picture, and a later mtime whatever the clock's resolution
        was = p.stat().st_mtime_ns if p.exists() else 0
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        if was:
            os.utime(p, ns=(was + 10**9, was + 10**9))
    for p in paths:
        draw(p)
    ex = Extractor(backbone="tiny", weights="random", image_size=32)   # one instance: one random backbone
    real, written = featstore.write_shard, []

    def killed_after_two(folder, i, arrays, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(i)
        real(folder, i, arrays, **kw)
    monkeypatch.setattr("uninet_feat.extract.write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ex.extract_to(paths, tmp_path / "f", shard_size=2)
    monkeypatch.setattr("uninet_feat.extract.write_shard", real)
    first = (tmp_path / "f" / "shard-00000.npz").stat().st_mtime_ns
    draw(paths[2])   # shard 1's first image replaced between the kill and the resume
    seen = []
    with pytest.warns(UserWarning, match=rf"1 image\(s\) changed since .*{re.escape(str(paths[2]))}; "
                                         r"shard-00001\.npz extracted again"):
        store = ex.extract_to(paths, tmp_path / "f", shard_size=2, on_shard=seen.append)
    assert seen == [1, 2] and (tmp_path / "f" / "shard-00000.npz").stat().st_mtime_ns == first   # the rest kept
    np.testing.assert_array_equal(store.vectors, ex.extract_to(paths, tmp_path / "fresh", shard_size=2).vectors)
    draw(paths[5])   # a finished store re-run: its shard redone too, and the store complete again
    seen.clear()
    with pytest.warns(UserWarning, match=r"shard-00002\.npz extracted again"):
        store = ex.extract_to(paths, tmp_path / "f", shard_size=2, on_shard=seen.append)
    assert seen == [2] and store is not None
    np.testing.assert_array_equal(store.vectors, ex.extract_to(paths, tmp_path / "fresh2", shard_size=2).vectors)
    with warnings.catch_warnings():   # nothing changed: nothing redone, nothing said
        warnings.simplefilter("error")
        seen.clear()
        assert ex.extract_to(paths, tmp_path / "f", shard_size=2, on_shard=seen.append) is not None and seen == []


def test_an_image_replaced_with_cp_p_has_its_shard_extracted_again(tmp_path):
    """`cp -p` writes another picture of the same size over an image and keeps its old mtime: size and mtime alone
    (the stamp before session 38) kept the old picture's features. The inode's change time moves, and the stamp
    holds it; a store recorded with the older [size, mtime] stamps is still compared on those (no re-extraction)."""
    import json
    import os
    import shutil
    import time
    from PIL import Image
    rng = np.random.default_rng(1)
    paths = [tmp_path / "img" / f"{i}.png" for i in range(4)]
    paths[0].parent.mkdir()
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    ex = Extractor(backbone="tiny", weights="random", image_size=32)
    ex.extract_to(paths, tmp_path / "f", shard_size=2)
    other = tmp_path / "other.png"   # same size in bytes: another random picture of the same shape, as a PNG
    while True:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(other)
        if other.stat().st_size == paths[3].stat().st_size:
            break
    before = paths[3].stat()
    time.sleep(0.05)   # past the file system's coarse clock tick
    shutil.copy2(other, paths[3])   # what `cp -p` does: the bytes, then the source's times
    os.utime(paths[3], ns=(before.st_atime_ns, before.st_mtime_ns))   # and the replaced file's own mtime
    assert (paths[3].stat().st_size, paths[3].stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    seen = []
    with pytest.warns(UserWarning, match=r"shard-00001\.npz extracted again"):
        store = ex.extract_to(paths, tmp_path / "f", shard_size=2, on_shard=seen.append)
    assert seen == [1]
    np.testing.assert_array_equal(store.vectors, ex.extract_to(paths, tmp_path / "fresh", shard_size=2).vectors)
    mpath = tmp_path / "f" / "manifest.json"   # a store of the older stamp: compared on size and mtime alone
    m = json.loads(mpath.read_text())
    m["files"] = {p: v[:2] for p, v in m["files"].items()}
    mpath.write_text(json.dumps(m))
    seen.clear()
    assert ex.extract_to(paths, tmp_path / "f", shard_size=2, on_shard=seen.append) is not None and seen == []


def test_resume_with_other_model_refused(setup, tmp_path):
    data, run, samples = setup
    Extractor(run=run).extract_to(samples, tmp_path / "f", shard_size=4)
    with pytest.raises(BadInputError, match="another model"):
        Extractor(backbone="tiny", weights="random").extract_to(samples, tmp_path / "f", shard_size=4)


def test_a_finished_store_rerun_with_other_labels_or_splits_records_the_new_ones(setup, tmp_path):
    """The same images' features, relabelled or re-split (a changed CSV): the store keeps its shards but its
    manifest takes the new labels and splits (said in a warning), so train-head and index read the new ones; a
    stale split kept test images in a kNN bank."""
    from dataclasses import replace
    data, run, samples = setup
    Extractor(run=run).extract_to(samples, tmp_path / "f", shard_size=4)
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "f").glob("shard-*.npz"))
    moved = [replace(s, split="test") if s.split == "train" else s for s in samples]
    relabelled = [replace(s, label="crack") if s.label == "spot" else s for s in moved]
    n = sum(a != b for a, b in zip(samples, relabelled))
    with pytest.warns(UserWarning, match=rf"{n} image\(s\) have another label, split or group"):
        store = Extractor(run=run).extract_to(relabelled, tmp_path / "f", shard_size=4)
    assert [(i["label"], i["split"]) for i in store.items] == [(s.label, s.split) for s in relabelled]
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "f").glob("shard-*.npz")) == before   # not redone


def test_plain_backbone_features_have_no_map_stats(setup):
    data, run, samples = setup
    plain = Extractor(backbone="tiny", weights="random").extract(samples[:2])
    adapted = Extractor(run=run).extract(samples[:2])
    assert plain["vectors"].shape[1] == 8 + 16 + 32
    # per level teacher + student pools and 2 x 4 map statistics, the WDM score, per level the map-attended
    # teacher pool and its difference from the tile's mean, 8 hot-region shape descriptors and the spot's place (2)
    assert adapted["vectors"].shape[1] == 2 * (8 + 16 + 32) + 3 * 8 + 1 + 2 * (8 + 16 + 32) + 8 + 2
    assert np.isnan(plain["scores"]).all() and np.isfinite(adapted["scores"]).all()


def test_tiles_aggregate_to_the_top_tile_and_the_mean_or_without_scores_the_max():
    from uninet_feat.featstore import aggregate_tiles
    v = np.array([[1, 5], [3, 2], [0, 0], [7, 1], [2, 9]], np.float32)
    X, order = aggregate_tiles(v, np.array([0.1, 0.9, np.nan, np.nan, np.nan]), ["a", "a", "b", "b", "b"])
    assert [k for k, _ in order] == ["a", "b"] and [list(i) for _, i in order] == [[0, 1], [2, 3, 4]]
    np.testing.assert_allclose(X[0], [3, 2, 2, 3.5])          # image a: its top tile (score 0.9), the mean
    np.testing.assert_allclose(X[1], [7, 9, 3, 10 / 3])       # image b, no scores: the elementwise max, the mean


def test_sharded_extraction_fills_one_store(setup, tmp_path):
    data, run, samples = setup
    ex = Extractor(run=run)
    one = ex.extract_to(samples, tmp_path / "one", shard_size=2)
    assert ex.extract_to(samples, tmp_path / "two", shard_size=2, shard=(0, 2)) is None
    two = ex.extract_to(samples, tmp_path / "two", shard_size=2, shard=(1, 2))
    np.testing.assert_array_equal(one.vectors, two.vectors)


def test_cli_chain_extract_index_head_predict(setup, tmp_path, capsys):
    from uninet_feat.cli import main
    data, run, samples = setup
    f = tmp_path / "feats"
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["index", "--features", str(f), "--out", str(tmp_path / "knn"), "--coreset", "0.5"]) == 0
    assert main(["train-head", "--features", str(f), "--task", "binary", "--folds", "2",
                 "--out", str(tmp_path / "head")]) == 0
    assert main(["predict", "--run", str(run), "--data", str(data), "--knn", str(tmp_path / "knn"),
                 "--head", str(tmp_path / "head"), "--out", str(tmp_path / "pred"), "--no-overlays"]) == 0
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(rows) == len(samples)
    assert {"wdm_score", "knn_score", "flagged", "head_prediction", "head_confidence"} <= set(rows[0])
    # kNN: training normals are in the memory bank, so they score lower than the defects on average
    ks = {r["path"]: r["knn_score"] for r in rows}
    normal_train = np.mean([ks[str(s.path)] for s in samples if s.split == "train"])
    defect = np.mean([ks[str(s.path)] for s in samples if not s.is_normal])
    assert defect > normal_train


def test_every_command_takes_a_yaml_config_and_saves_its_resolved_one(setup, tmp_path, capsys, monkeypatch):
    """Non-train commands: `--config FILE` keys are flag names, flags override them, the resolved flags
    land in OUT/config.yaml (+ env.json) and that file re-runs the same command."""
    import yaml
    from uninet_feat.cli import main
    data, run, samples = setup
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(data), "run": str(run), "shard-size": 4, "quiet": True}))
    f = tmp_path / "f"
    assert main(["extract", "--config", str(cfg), "--shard-size", "5", "--out", str(f)]) == 0
    saved = yaml.safe_load((f / "config.yaml").read_text())
    assert saved["command"] == "extract" and saved["shard_size"] == 5 and saved["run"] == str(run)
    assert FeatureStore(f).manifest["settings"]["shard_size"] == 5 and (f / "env.json").exists()
    again = tmp_path / "f2"
    assert main(["extract", "--config", str(f / "config.yaml"), "--out", str(again)]) == 0
    np.testing.assert_array_equal(FeatureStore(again).vectors, FeatureStore(f).vectors)
    head_cfg = tmp_path / "head.yaml"
    head_cfg.write_text(yaml.safe_dump({"features": str(f), "folds": 2, "task": "binary"}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["train-head", "--config", str(head_cfg), "--out", str(tmp_path / "h")]) == 0
    saved = yaml.safe_load((tmp_path / "h" / "config.yaml").read_text())
    assert saved["folds"] == 2 and saved["threads"] == 1   # the count used, not null (session 53): LightGBM's model
    monkeypatch.setenv("OMP_NUM_THREADS", "2")               # text names it, and a rerun under another count differed
    assert main(["train-head", "--config", str(tmp_path / "h" / "config.yaml"), "--out", str(tmp_path / "h2")]) == 0
    assert (tmp_path / "h2" / "model.txt").read_bytes() == (tmp_path / "h" / "model.txt").read_bytes()
    capsys.readouterr()
    cfg.write_text(yaml.safe_dump({"data": str(data), "epochs": 3}))
    assert main(["extract", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "unknown keys ['epochs']" in capsys.readouterr().err
    assert main(["index", "--config", str(f / "config.yaml"), "--out", str(tmp_path / "i")]) == 2
    assert "another command" in capsys.readouterr().err


def test_no_images_is_a_clear_error(tmp_path):
    ex = Extractor(backbone="tiny", weights="random")
    for call in (lambda: ex.extract([]), lambda: ex.extract_to([], tmp_path / "f")):
        with pytest.raises(BadInputError, match="no images"):
            call()
    assert not (tmp_path / "f").exists()   # nothing half-written


def test_saved_config_of_every_command_reruns_it(setup, tmp_path, capsys):
    """OUT/config.yaml of extract, index, train-head and predict (threshold / max_fpr saved as null) is
    accepted by `--config`; a hand-written `max_fpr:` works for predict and evaluate."""
    import yaml
    from uninet_feat.cli import main
    data, run, samples = setup
    f, knn, head, pred = (tmp_path / n for n in ("f", "knn", "head", "pred"))
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["index", "--features", str(f), "--coreset", "0.5", "--out", str(knn)]) == 0
    assert main(["train-head", "--features", str(f), "--folds", "2", "--out", str(head)]) == 0
    assert main(["predict", "--run", str(run), "--data", str(data), "--knn", str(knn), "--head", str(head),
                 "--no-overlays", "--quiet", "--out", str(pred)]) == 0
    saved = yaml.safe_load((pred / "config.yaml").read_text())
    assert saved["threshold"] is None and saved["max_fpr"] is None
    for folder in (f, knn, head, pred):
        capsys.readouterr()
        again = tmp_path / f"{folder.name}_again"
        assert main([saved_command(folder), "--config", str(folder / "config.yaml"), "--out", str(again)]) == 0, \
            capsys.readouterr().err
    first = json.loads((pred / "predictions.json").read_text())
    assert json.loads((tmp_path / "pred_again" / "predictions.json").read_text()) == first
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump({"run": str(run), "data": str(data), "max_fpr": 0.5, "overlays": False}))
    assert main(["predict", "--config", str(hand), "--out", str(tmp_path / "p2"), "--quiet"]) == 0
    assert "0.5" in json.loads((tmp_path / "p2" / "summary.json").read_text())["threshold_rule"]
    hand.write_text(yaml.safe_dump({"run": str(run), "max_fpr": 0.5, "quiet": True}))
    assert main(["evaluate", "--config", str(hand), "--json", str(tmp_path / "m.json")]) == 0
    assert "0.5" in json.loads((tmp_path / "m.json").read_text())["threshold_rule"]


def test_a_saved_config_reruns_from_any_folder(setup, tmp_path, monkeypatch):
    """Paths typed relative to the working folder are saved absolute, as train saves its data paths."""
    import os

    import yaml
    from uninet_feat.cli import main
    data, run, samples = setup
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["extract", "--data", os.path.relpath(data), "--run", os.path.relpath(run), "--quiet",
                 "--weights", "imagenet", "--shard-size", "4", "--out", "f"]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "f" / "config.yaml").read_text())
    assert saved["data"] == str(data) and saved["run"] == str(run) and saved["out"] == str(tmp_path / "a" / "f")
    assert saved["weights"] == "imagenet"     # not a path
    monkeypatch.chdir(tmp_path / "b")
    assert main(["extract", "--config", str(tmp_path / "a" / "f" / "config.yaml"), "--out", "g"]) == 0
    np.testing.assert_array_equal(FeatureStore(tmp_path / "b" / "g").vectors, FeatureStore(tmp_path / "a" / "f").vectors)
    shards = sorted((tmp_path / "a" / "f").glob("shard-*.npz"))
    assert len(shards) > 1
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    shards[-1].unlink()                                    # as if killed: the saved config resumes the same store
    assert main(["extract", "--config", str(tmp_path / "a" / "f" / "config.yaml")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept and shards[-1].exists()
    # the store names its images absolutely: an index built from another folder holds the run's validation
    # normals out of its bank (relative paths matched none of them there, and the bank kept them)
    assert all(os.path.isabs(i["path"]) for i in FeatureStore(tmp_path / "a" / "f").items)
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "--data", os.path.relpath(data), "--run", os.path.relpath(run), "--patches", "--quiet",
                 "--out", "p"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert main(["index", "--features", str(tmp_path / "p"), "--run", str(run), "--out", "k"]) == 0
    held = json.loads((tmp_path / "b" / "k" / "knn.json").read_text())["source"]["held_out_val"]
    n_val = len(json.loads((run / "calibration.json").read_text())["val_paths"])
    assert held["n"] == n_val > 0


def saved_command(folder):
    import yaml
    return yaml.safe_load((folder / "config.yaml").read_text())["command"]


def test_predict_refuses_index_and_head_of_another_run(setup, tmp_path, capsys):
    """knn.json / head.json record the source model and its size and tiling; predict with another run's model, or
    at another size, refuses them, naming both files; files from before the record are accepted with a warning."""
    from uninet_feat.cli import main
    data, run, samples = setup
    other = tmp_path / "other"
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 4, "channels_last": False,
                                                       "seed": 99})
    train(cfg, other, quiet=True)
    f, knn, head = tmp_path / "f", tmp_path / "knn", tmp_path / "head"
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["index", "--features", str(f), "--coreset", "0.5", "--out", str(knn)]) == 0
    assert main(["train-head", "--features", str(f), "--folds", "2", "--out", str(head)]) == 0
    sha = featstore.file_sha256(run / "model.pt")
    for meta in (knn / "knn.json", head / "head.json"):
        assert json.loads(meta.read_text())["source"]["model_sha256"] == sha
    base = ["predict", "--data", str(data), "--no-overlays", "--quiet"]
    assert main(base + ["--run", str(run), "--knn", str(knn), "--head", str(head), "--out", str(tmp_path / "p")]) == 0
    for flag, folder, name in (("--knn", knn, "knn.json"), ("--head", head, "head.json")):
        capsys.readouterr()
        assert main(base + ["--run", str(other), flag, str(folder), "--out", str(tmp_path / "q")]) == 2
        err = capsys.readouterr().err
        assert str(folder / name) in err and str(other / "model.pt") in err and "rebuild" in err, err
    with pytest.warns(UserWarning, match="trained and calibrated at image_size 64, tile None; these features are "
                                         "made at image_size 32, tile None, which predict refuses"):
        assert main(["extract", "--data", str(data), "--run", str(run), "--image-size", "32", "--quiet",
                     "--out", str(tmp_path / "g")]) == 0   # said nothing: a bank of 32-px patches for a 64-px run
    for flag, folder, name in (("--knn", knn, "knn.json"), ("--head", head, "head.json")):   # of 32-px patches
        d = json.loads((folder / name).read_text())
        assert d["source"]["settings"]["image_size"] == 64
        d["source"]["settings"]["image_size"] = 32   # as a store made at another size before extract refused it
        (folder / name).write_text(json.dumps(d))
        assert main(base + ["--run", str(run), flag, str(folder), "--out", str(tmp_path / "q")]) == 2
        assert "at image_size 32, tile None; the run scores at image_size 64" in capsys.readouterr().err
    for meta in (knn / "knn.json", head / "head.json"):   # as written by an older version
        d = json.loads(meta.read_text())
        del d["source"]
        meta.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="records no source model"):
        assert main(base + ["--run", str(other), "--knn", str(knn), "--head", str(head),
                            "--out", str(tmp_path / "r")]) == 0


def test_predict_with_a_plain_feature_index_and_the_combined_score(setup, tmp_path):
    """An index over plain backbone patches (extract without --run) is queried with patches of that backbone,
    made by predict itself (not the run's adapted ones, which would be another feature space); each row's
    combined_score is the kNN and WDM scores z-scored on the run's validation normals and summed."""
    import torch
    from uninet_feat.backbones import create_backbone
    from uninet_feat.normals import validation_normals
    from uninet_feat.cli import main
    from uninet_feat.downstream import KNNScorer
    data, _, samples = setup
    run = tmp_path / "run"   # 3 validation normals to standardise by
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 2, "channels_last": False,
                                                       "val_fraction": 0.5}), run, quiet=True)
    weights = tmp_path / "tiny.pt"   # a fixed file: random init differs per call
    torch.save(create_backbone("tiny", weights="random").state_dict(), weights)
    f, knn, p = tmp_path / "plain", tmp_path / "knn", tmp_path / "p"
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size",
                 "64", "--patches", "--out", str(f), "--quiet"]) == 0
    base = ["predict", "--run", str(run), "--data", str(data), "--no-overlays", "--quiet"]
    assert main(["index", "--features", str(f), "--coreset", "1.0", "--out", str(tmp_path / "all")]) == 0
    with pytest.warns(UserWarning, match="validation normals of .* held out"):   # the bank holds them: no z-score
        assert main(base + ["--knn", str(tmp_path / "all"), "--out", str(tmp_path / "p0")]) == 0
    assert "combined_score" not in json.loads((tmp_path / "p0" / "predictions.json").read_text())[0]
    assert main(["index", "--features", str(f), "--coreset", "1.0", "--run", str(run), "--out", str(knn)]) == 0
    assert json.loads((knn / "knn.json").read_text())["source"]["held_out_val"]["n"] == 3
    import shutil   # features of a copy of the data: the validation normals' copies sit in the bank, scored
    shutil.copytree(data, tmp_path / "copy")   # about 0; index recorded them as held out and predict flagged all
    assert main(["extract", "--data", str(tmp_path / "copy"), "--backbone", "tiny", "--weights", str(weights),
                 "--image-size", "64", "--patches", "--out", str(tmp_path / "fc"), "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"3 of .* validation normals are in these features under other paths"):
        assert main(["index", "--features", str(tmp_path / "fc"), "--coreset", "1.0", "--run", str(run),
                     "--out", str(tmp_path / "kc")]) == 0
    assert json.loads((tmp_path / "kc" / "knn.json").read_text())["source"]["held_out_val"] is None
    with pytest.warns(UserWarning, match="validation normals of .* held out"):   # so predict gives no combined score
        assert main(base + ["--knn", str(tmp_path / "kc"), "--out", str(tmp_path / "pc")]) == 0
    assert "combined_score" not in json.loads((tmp_path / "pc" / "predictions.json").read_text())[0]
    assert main(base + ["--knn", str(knn), "--out", str(p)]) == 0
    rows = {r["path"]: r for r in json.loads((p / "predictions.json").read_text())}
    summary = json.loads((p / "summary.json").read_text())
    assert summary["knn_features"] == "plain backbone" and "validation normals" in summary["combined_rule"]

    scorer = KNNScorer.load(knn)
    plain = Extractor(backbone="tiny", weights=str(weights), image_size=64, patches=True)
    want = scorer.score_patches(plain.extract(samples)["patches"].astype(np.float32)).max(1)
    got = np.array([rows[str(s.path)]["knn_score"] for s in samples])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    adapted = Extractor(run=run, patches=True).extract(samples)["patches"]
    assert adapted.shape[-1] != scorer.index.d or not np.allclose(
        got, scorer.score_patches(adapted.astype(np.float32)).max(1))

    cfg = json.loads(json.dumps(load_config(run / "config.yaml")))
    val = validation_normals(cfg)
    kv = scorer.score_patches(plain.extract(val)["patches"].astype(np.float32)).max(1)
    wv = np.array(json.loads((run / "calibration.json").read_text())["val_scores"])
    for s in samples:
        r = rows[str(s.path)]
        z = (r["knn_score"] - kv.mean()) / kv.std() + (r["wdm_score"] - wv.mean()) / wv.std()
        assert r["combined_score"] == pytest.approx(z, rel=1e-4, abs=1e-6)


def test_a_plain_stores_weights_file_is_known_by_content_and_checked_by_predict(setup, tmp_path, monkeypatch,
                                                                                 capsys):
    """A plain store recorded --weights as typed: `./w.pt` or the saved config's absolute path could not resume a
    store made with `w.pt` (every finished shard lost), and an index of it failed from another folder; and predict
    never compared the file's sha256, so a replaced file gave other kNN scores without a word. Features extracted
    with --mean/--std made an index predict refused for ever (an audit, session 52)."""
    import torch
    from uninet_feat.backbones import create_backbone
    from uninet_feat.cli import main
    from uninet_feat.downstream import KNNScorer
    data, run, samples = setup
    register_tiny_norm()
    monkeypatch.chdir(tmp_path)
    torch.save(create_backbone("tiny", weights="random").state_dict(), tmp_path / "w.pt")
    args = ["extract", "--data", str(data), "--backbone", "tiny_norm", "--image-size", "64", "--patches", "--quiet"]
    norm = ["--mean", "0.4", "0.45", "0.5", "--std", "0.2", "0.25", "0.3"]
    assert main(args + ["--weights", "w.pt", "--shard-size", "4", "--out", "f"] + norm) == 0
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["source"]["weights"] == str(tmp_path / "w.pt")
    (tmp_path / "f" / "complete").unlink()   # an interrupted store: resumed however the file is spelled
    (tmp_path / "f" / "shard-00001.npz").unlink()
    capsys.readouterr()
    assert main(args + ["--weights", "./w.pt", "--shard-size", "4", "--out", "f"] + norm) == 0
    assert main(["extract", "--config", str(tmp_path / "f" / "config.yaml"), "--quiet"]) == 0
    assert (tmp_path / "f" / "complete").exists() and "another model" not in capsys.readouterr().err
    assert main(["index", "--features", "f", "--coreset", "1.0", "--run", str(run), "--out", "k"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # the index names the file by its absolute path
    pred = ["predict", "--run", str(run), "--data", str(data), "--no-overlays", "--quiet", "--knn", str(tmp_path / "k")]
    assert main(pred + ["--out", "p"]) == 0
    rows = {r["path"]: r["knn_score"] for r in json.loads((elsewhere / "p" / "predictions.json").read_text())}
    plain = Extractor(backbone="tiny_norm", weights=str(tmp_path / "w.pt"), image_size=64, patches=True,
                      mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3))
    want = KNNScorer.load(tmp_path / "k").score_patches(plain.extract(samples)["patches"].astype(np.float32)).max(1)
    np.testing.assert_allclose([rows[str(s.path)] for s in samples], want, rtol=1e-5)   # with the store's mean/std
    torch.save(create_backbone("tiny", weights="random").state_dict(), tmp_path / "w.pt")   # other weights there
    capsys.readouterr()
    assert main(pred + ["--out", "p2"]) == 2
    assert "replaced or edited" in capsys.readouterr().err and not (elsewhere / "p2" / "predictions.csv").exists()


def test_extract_refuses_backbone_flags_with_a_run(setup, tmp_path, capsys):
    """--backbone/--weights pick plain features; beside --run they were silently ignored."""
    from uninet_feat.cli import main
    data, run, _ = setup
    assert main(["extract", "--data", str(data), "--run", str(run), "--backbone", "resnet18",
                 "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "drop --backbone/--weights" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_image_level_index_holds_every_row_and_refuses_patch_options(setup, tmp_path, capsys):
    """An image index is a search index of all rows; --run/--coreset/--k shape a patch memory bank and were
    silently ignored at --level image."""
    from uninet_feat.cli import main
    from uninet_feat.downstream import load_index, search
    data, run, samples = setup
    f, out = tmp_path / "f", tmp_path / "img"
    assert main(["extract", "--data", str(data), "--run", str(run), "--out", str(f), "--quiet"]) == 0
    (out).mkdir()
    (out / "knn.json").write_text("{}")   # a patch index's, left from an earlier `index` into this folder
    assert main(["index", "--features", str(f), "--level", "image", "--out", str(out)]) == 0
    assert not (out / "knn.json").exists()   # it would describe the new image index as a kNN scorer
    X, recs = FeatureStore(f).image_table()
    ids = json.loads((out / "ids.json").read_text())
    assert ids == [r["path"] for r in recs] and len(ids) == len(samples)
    _, nn = search(load_index(out / "index.faiss"), X.astype(np.float32), k=1)
    assert nn[:, 0].tolist() == list(range(len(ids)))   # every row's nearest row is itself
    for extra in (["--run", str(run)], ["--coreset", "0.5"], ["--k", "3"]):
        assert main(["index", "--features", str(f), "--level", "image", *extra, "--out",
                     str(tmp_path / "x")]) == 2
        assert f"{extra[0]} " in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_plain_index_reuses_the_runs_source_teacher(setup, tmp_path, monkeypatch):
    """When the run's frozen source teacher is the index's backbone (same config, same named weights, same
    size), predict takes the plain patches from the run's own pass: no second backbone, the same scores."""
    from uninet_feat import scorers
    from uninet_feat.cli import main
    from uninet_feat.downstream import KNNScorer
    data, _, samples = setup
    run, knn, weights, _ = run_with_plain_index(tmp_path, data)
    p = tmp_path / "p"
    monkeypatch.setattr(scorers, "_plain_knn_extractor", lambda *a: pytest.fail("a second backbone pass"))
    assert main(["predict", "--run", str(run), "--data", str(data), "--knn", str(knn), "--no-overlays", "--quiet",
                 "--out", str(p)]) == 0
    rows = {r["path"]: r for r in json.loads((p / "predictions.json").read_text())}
    assert json.loads((p / "summary.json").read_text())["knn_features"] == "plain backbone"
    plain = Extractor(backbone="tiny", weights=str(weights), image_size=64, patches=True).extract(samples)
    want = KNNScorer.load(knn).score_patches(plain["patches"].astype(np.float32)).max(1)
    np.testing.assert_allclose([rows[str(s.path)]["knn_score"] for s in samples], want, rtol=1e-3, atol=1e-5)
    assert all(np.isfinite(r["combined_score"]) for r in rows.values())

    # evaluate --knn: the same per-image kNN / combined scores on the test split, and their image metrics
    from uninet_feat import metrics
    from uninet_feat.evaluate import evaluate
    rep = evaluate(run, knn=knn, quiet=True)
    test = [r for r in rep["_rows"]]
    y = np.array([r["is_defect"] for r in test])
    for name, key in (("knn", "knn_score"), ("combined", "combined_score")):
        got = np.array([float(r[key]) for r in test])
        np.testing.assert_allclose(got, [rows[r["path"]][key] for r in test], rtol=1e-4, atol=1e-5)
        assert rep["scorers"][name]["image_auroc"] == pytest.approx(metrics.image_auroc(y, got))
    # the kNN map's pixel metrics: patch distances upsampled to the image size, against the test masks
    from uninet_feat.data.dataset import ImageDataset
    test_s = [next(s for s in samples if str(s.path) == r["path"]) for r in test]
    kmaps, _ = KNNScorer.load(knn).score_maps(
        Extractor(backbone="tiny", weights=str(weights), image_size=64, patches=True).extract(test_s)["patches"]
        .astype(np.float32), (8, 8), (64, 64))
    ds = ImageDataset(test_s, image_size=64)
    masks = [ds[i]["mask"][0].numpy() > 0.5 for i in range(len(ds))]
    assert rep["scorers"]["knn"]["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, list(kmaps)), rel=1e-3)
    assert 0 <= rep["scorers"]["combined"]["pixel_auroc"] <= 1   # its value is checked in test_scorers
    with pytest.raises(BadInputError, match="--checkpoint"):
        evaluate(run, knn=knn, checkpoint=run / "checkpoint.pt", quiet=True)


def test_predict_reads_an_older_heads_columns_by_name_and_refuses_unknown_ones(setup, tmp_path):
    """A head trained on schema-2 features (no `l*_spotdiff_*`) of the same run predicts from the columns it was
    trained on, found by name among this version's; a head naming a column this version does not make is named,
    not misread."""
    from uninet_feat.cli import main
    from uninet_feat.downstream import Head, train_head
    from uninet_feat.featstore import FeatureStore, head_columns
    from uninet_feat.predict import predict_cmd
    data, run, samples = setup
    f, head = tmp_path / "feats", tmp_path / "head"
    assert main(["extract", "--data", str(data), "--run", str(run), "--out", str(f), "--quiet"]) == 0
    assert main(["train-head", "--features", str(f), "--task", "binary", "--folds", "2", "--out", str(head)]) == 0
    source = Head.load(head).source
    store = FeatureStore(f)
    X, recs = store.image_table()
    names = head_columns(store.manifest["vector_names"])
    old = [j for j, n in enumerate(names) if "spotdiff" not in n]   # the schema-2 layout
    assert 0 < len(old) < len(names)
    y = ["good" if r["is_normal"] else "defect" for r in recs]
    res = train_head(X[:, old], y, task="binary", n_splits=2, feature_names=[names[j] for j in old])
    res.head.save(tmp_path / "v2", source=source)
    rows = predict_cmd(run, data, tmp_path / "ok", heads=[str(tmp_path / "v2")], overlays=False, quiet=True)["rows"]
    want = dict(zip((r["path"] for r in recs), res.head.predict_proba(X[:, old]).max(1)))
    assert [r["v2_confidence"] for r in rows] == pytest.approx([want[r["path"]] for r in rows], abs=1e-6)
    meta = json.loads((head / "head.json").read_text())
    meta["feature_names"][3] = "l9_unknown_0"
    (head / "head.json").write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="1 of which this version does not make") as e:
        predict_cmd(run, data, tmp_path / "bad", heads=[str(head)], overlays=False, quiet=True)
    assert "head.json" in str(e.value) and "train-head" in str(e.value)


def test_file_sha256_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    """Scoring commands name model.pt by its sha256 twice; the second asks no read. Any new version — rewritten in
    place (other size or mtime) or replaced atomically (a new inode, as the checkpoints are written) — is read
    again and gets its own digest."""
    import hashlib
    import os
    from uninet_feat.io import atomic_write_bytes
    p = tmp_path / "model.pt"
    p.write_bytes(b"a" * 1000)
    first = featstore.file_sha256(p)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert featstore.file_sha256(p) == first and opened == []
    monkeypatch.undo()
    st = os.stat(p)
    p.write_bytes(b"b" * 1000)                            # same size, in place
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert featstore.file_sha256(p) == hashlib.sha256(b"b" * 1000).hexdigest()
    atomic_write_bytes(p, b"c" * 1000)
    assert featstore.file_sha256(p) == hashlib.sha256(b"c" * 1000).hexdigest()


def test_train_head_says_what_its_rows_cannot_support(setup, tmp_path):
    """A binary head on a run's features whose normals include the run's training images is warned about (it
    partly learns "seen in training"); --label-from group/label on rows without a group is refused, not turned
    into classes such as '/spot'."""
    from uninet_feat.workflows import train_head_cmd
    data, run, samples = setup
    f = tmp_path / "f"
    Extractor(run=run).extract_to(samples, f)
    with pytest.warns(UserWarning, match=r"\d+ normal rows are from the run's training split"):
        train_head_cmd(f, tmp_path / "h", task="binary", folds=2)
    test_only = [s for s in samples if s.split == "test"]
    Extractor(run=run).extract_to(test_only, tmp_path / "g")
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_head_cmd(tmp_path / "g", tmp_path / "h2", task="binary", folds=2)
    assert not any("training split" in str(w.message) for w in seen)
    with pytest.raises(BadInputError, match="needs a group for every row") as e:
        train_head_cmd(f, tmp_path / "h3", task="multiclass", label_from="group/label", folds=2)
    assert "--label-from label" in str(e.value)


def test_a_store_fingerprinted_the_old_way_still_resumes(setup, tmp_path):
    """Stores written before session 23 fingerprinted the run path as typed; a killed one still resumes."""
    from uninet_feat.extract import _fingerprint
    data, run, samples = setup
    f = tmp_path / "f"
    Extractor(run=run).extract_to(samples, f, shard_size=4)
    m = json.loads((f / "manifest.json").read_text())
    m["fingerprint"] = _fingerprint({**m["source"], "run": str(run)}, m["settings"], [i["path"] for i in m["items"]])
    (f / "manifest.json").write_text(json.dumps(m))
    last = sorted(f.glob("shard-*.npz"))[-1]
    last.unlink()
    Extractor(run=run).extract_to(samples, f, shard_size=4)
    assert last.exists()
    m["fingerprint"] = "something else"
    (f / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadInputError, match="another model, settings or image list"):
        Extractor(run=run).extract_to(samples, f, shard_size=4)
    m["schema_version"] = 2   # a store of this version's predecessor: its columns are fewer, said so
    (f / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadInputError, match="an older version .feature schema 2, now 3"):
        Extractor(run=run).extract_to(samples, f, shard_size=4)


def test_predict_refuses_two_heads_whose_columns_would_share_a_name(setup, tmp_path):
    """A head's columns are named by its folder: head/B and head2/B made one B_prediction column, one head's
    results lost without a word."""
    from uninet_feat.predict import predict_cmd
    data, run, samples = setup
    with pytest.raises(BadInputError, match=r"two --head folders are named 'B'.*rename one"):
        predict_cmd(run, data, tmp_path / "p", heads=[tmp_path / "head" / "B", tmp_path / "head2" / "B"], quiet=True)


def test_a_defect_type_head_types_flagged_images_only(setup, tmp_path):
    """A head trained with --defects-only knows defect types, not normal images: predict leaves its columns
    empty on images that are not flagged (it named a defect type for every normal strip)."""
    from uninet_feat.downstream import train_head
    from uninet_feat.predict import predict_cmd
    data, run, samples = setup
    store = Extractor(run=run).extract_to(samples, tmp_path / "f", shard_size=8)
    X, recs = store.image_table()
    rng = np.random.default_rng(0)
    res = train_head(X + rng.normal(0, 1e-3, X.shape), ["hole" if i % 2 else "stain" for i in range(len(X))],
                     task="multiclass", n_splits=2)
    res.head.save(tmp_path / "types", source={**store.manifest["source"], "defects_only": True})
    rows = predict_cmd(run, data, tmp_path / "p", heads=[tmp_path / "types"], overlays=False, quiet=True)["rows"]
    flagged = [r for r in rows if r["flagged"]]
    unflagged = [r for r in rows if r["flagged"] is False]
    assert flagged and unflagged
    assert all(r["types_prediction"] == "" and r["types_confidence"] is None for r in unflagged)
    assert all(r["types_prediction"] in ("hole", "stain") for r in flagged)


def _fake_pass(value):
    """A resumable pass's ``run``: every item's vector and score ``value``, and which items were run."""
    calls = []

    def run(idx):
        idx = list(idx)
        calls.append(idx)
        return {"vectors": np.full((len(idx), 3), value, np.float32), "index": np.array(idx),
                "scores": np.full(len(idx), value, np.float32)}
    return run, calls


def test_a_resumable_pass_scores_again_a_part_left_corrupt(tmp_path, monkeypatch):
    """A part whose bytes were cut or changed (a disk that failed, a copy that stopped) is scored again, not a crash
    of every later run (numpy raises zipfile.BadZipFile there, which is no OSError)."""
    import uninet_feat.extract as extract
    from uninet_feat.data.layouts import Sample
    monkeypatch.setattr(extract, "PART_ITEMS", 2)
    samples = [Sample(tmp_path / f"{i}.png") for i in range(6)]
    run, calls = _fake_pass(1.0)
    extract.resumable_pass(tmp_path / "p", {"a": 1}, samples, 6, run)
    part = tmp_path / "p" / "part-00001.npz"
    data = part.read_bytes()
    for broken in (data[:len(data) // 2], data[:120] + bytes([data[120] ^ 0xFF]) + data[121:]):
        part.write_bytes(broken)
        calls.clear()
        out = extract.resumable_pass(tmp_path / "p", {"a": 1}, samples, 6, run)
        assert calls == [[2, 3]] and out["resumed"] == 4 and out["scores"].tolist() == [1.0] * 6


def test_a_resumable_pass_never_takes_a_part_another_pass_wrote_into_its_folder(tmp_path, monkeypatch):
    """Two predicts into one --out: the second resets the folder to its own pass, but the first, still running,
    then saves its next part there; the second must score that part itself, not take the first one's."""
    import uninet_feat.extract as extract
    from uninet_feat.data.layouts import Sample
    monkeypatch.setattr(extract, "PART_ITEMS", 2)
    folder = tmp_path / "p"
    mine = [Sample(tmp_path / f"b{i}.png") for i in range(6)]
    others = [Sample(tmp_path / f"a{i}.png") for i in range(6)]
    run_a, _ = _fake_pass(7.0)
    extract.resumable_pass(folder, {"a": 1}, others, 6, run_a)   # the first predict's parts, all of them
    parts_a = {p.name: p.read_bytes() for p in folder.glob("part-*.npz")}
    run_b, calls = _fake_pass(1.0)

    def meanwhile(idx):   # while the second scores its part 0, the first saves its part 1 again
        if not calls:
            (folder / "part-00001.npz").write_bytes(parts_a["part-00001.npz"])
        return run_b(idx)
    out = extract.resumable_pass(folder, {"b": 1}, mine, 6, meanwhile)
    assert calls == [[0, 1], [2, 3], [4, 5]] and out["resumed"] == 0 and out["scores"].tolist() == [1.0] * 6


def _as_schema_2(f):
    """Rewrite a store as this version's predecessor wrote it: no `l*_spotdiff_*` columns, schema_version 2 (the
    fingerprint, which names the model, settings and images, is the same)."""
    m = json.loads((f / "manifest.json").read_text())
    keep = [j for j, n in enumerate(m["vector_names"]) if "_spotdiff_" not in n]
    for p in sorted(f.glob("shard-*.npz")):
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["vectors"] = arrays["vectors"][:, keep]
        featstore.write_shard(f, int(p.stem.split("-")[1]), arrays)
    m["vector_names"] = [m["vector_names"][j] for j in keep]
    m["schema_version"] = 2
    (f / "manifest.json").write_text(json.dumps(m))
    return m


def test_a_schema_2_store_is_not_resumed_with_this_versions_columns(setup, tmp_path):
    """The fingerprint names the model, settings and images, not the columns: a killed (or finished) schema-2
    extraction run again by this version matched it, kept the old shards (fewer columns) beside new ones and
    rewrote the manifest with this version's column names, so every column after `l*_mapattn_*` was misnamed."""
    data, run, samples = setup
    f = tmp_path / "f"
    Extractor(run=run).extract_to(samples, f, shard_size=4)
    _as_schema_2(f)
    (f / "complete").unlink()
    sorted(f.glob("shard-*.npz"))[-1].unlink()   # killed before its last shard
    with pytest.raises(BadInputError, match=r"older version .feature schema 2, now 3") as e:
        Extractor(run=run).extract_to(samples, f, shard_size=4)
    assert "new --out" in str(e.value)
    g = tmp_path / "g"   # a finished one, extracted again to get the new columns
    Extractor(run=run).extract_to(samples, g, shard_size=4)
    m = _as_schema_2(g)
    with pytest.raises(BadInputError, match=r"older version .feature schema 2, now 3"):
        Extractor(run=run).extract_to(samples, g, shard_size=4)
    assert json.loads((g / "manifest.json").read_text()) == m   # left as it was: still a readable schema-2 store
    assert FeatureStore(g).vectors.shape[1] == len(m["vector_names"])


def test_a_store_whose_shards_are_narrower_than_its_column_names_is_refused_when_opened(tmp_path, monkeypatch):
    """A schema-2 store resumed by a schema-3 extract (before that was refused) kept its 203-column shards under 259
    column names and still loaded, its columns misnamed; only validate_store said so. FeatureStore refuses it when
    opened, from the first shard's header (no shard data read), and any other shard of another width when read."""
    f = tmp_path / "f"
    items = [{"path": f"/x/{i}.png", "label": "good", "group": "", "split": "test", "is_normal": True, "tile": None}
             for i in range(6)]

    def store(widths, n_names):
        for i, w in enumerate(widths):
            featstore.write_shard(f, i, {"vectors": np.ones((3, w), np.float32), "scores": np.zeros(3, np.float32)})
        m = {"schema": featstore.SCHEMA, "schema_version": 3, "vector_names": [f"c{j}" for j in range(n_names)],
             "items": items, "n_items": 6, "n_shards": len(widths), "settings": {"shard_size": 3}}
        (f / "manifest.json").write_text(json.dumps(m))
        (f / "complete").write_text("")

    f.mkdir()
    store([203, 203], 259)
    real_load = np.load
    with monkeypatch.context() as mp:
        mp.setattr(np, "load", lambda *a, **k: pytest.fail("shard data read to check the width"))
        with pytest.raises(BadInputError, match="shard-00000.npz holds vectors of 203 columns, but the manifest "
                                                "names 259") as e:
            FeatureStore(f)
    assert np.load is real_load
    assert str(f) in str(e.value) and "extract again into a new folder" in str(e.value)
    store([259, 203], 259)   # the first shard fits: the other is refused when read, not concatenated
    s = FeatureStore(f)
    with pytest.raises(BadInputError, match="shard-00001.npz holds vectors of 203 columns"):
        s.image_table()
    store([259, 259], 259)
    assert FeatureStore(f).vectors.shape == (6, 259)


def test_a_head_of_unnamed_columns_of_another_width_is_refused_saying_so(tmp_path):
    """A head trained on unnamed columns (train_head without feature_names: f0, f1, ...) of another width than this
    run's was refused naming f0 as a column this version does not make, which read as a schema change; it says
    what it is: unnamed columns of width N against this run's M named ones, and to train the head again."""
    from uninet_feat.downstream import Head, train_head
    from uninet_feat.predict import _head_columns
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 5))
    y = np.array(["good", "defect"] * 12)
    train_head(X, y, task="binary", n_splits=2).head.save(tmp_path / "h")
    head = Head.load(tmp_path / "h")
    assert head.feature_names == [f"f{i}" for i in range(5)]
    cols = [f"top_c{j}" for j in range(4)] + [f"mean_c{j}" for j in range(4)]
    with pytest.raises(BadInputError, match=r"unnamed columns of width 5 .*this run makes 8 named columns") as e:
        _head_columns(head, cols, tmp_path / "h", "runs/r", {"data": "d"})
    assert "does not make" not in str(e.value) and "train the head again" in str(e.value)
    assert "head.json" in str(e.value) and "--run runs/r" in str(e.value)
    assert _head_columns(head, cols[:5], tmp_path / "h", "runs/r", {"data": "d"}) == list(range(5))   # same width: by position


@pytest.mark.parametrize("damage", ["truncated", "bytes flipped", "deleted"])
def test_a_damaged_or_missing_shard_of_a_finished_store_is_named_not_a_traceback(tmp_path, damage):
    """A truncated or corrupt shard raised zipfile's BadZipFile from train-head, index and cluster; a deleted one an
    IndexError from image_table (array returned the other shards' rows, shifted onto other items' records)."""
    f = tmp_path / "f"
    items = [{"path": f"/x/{i}.png", "label": "good", "group": "", "split": "train", "is_normal": True, "tile": None}
             for i in range(9)]
    for i in range(3):
        featstore.write_shard(f, i, {"vectors": np.full((3, 4), i, np.float32), "scores": np.zeros(3, np.float32),
                                     "patches": np.ones((3, 4, 2), np.float16)})
    (f / "manifest.json").write_text(json.dumps({
        "schema": featstore.SCHEMA, "schema_version": 3, "vector_names": [f"c{j}" for j in range(4)], "items": items,
        "n_items": 9, "n_shards": 3, "settings": {"shard_size": 3}}))
    (f / "complete").write_text("")
    shard = f / "shard-00001.npz"
    raw = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(raw[:len(raw) // 2])
    elif damage == "bytes flipped":   # inside the vectors' data: the zip opens, the read fails its CRC check
        at = raw.index(np.full(4, 1, np.float32).tobytes())
        shard.write_bytes(raw[:at] + b"\xff" * 8 + raw[at + 8:])
    else:
        shard.unlink()
    s = FeatureStore(f)
    named = str(shard) if damage != "deleted" else "missing: shard-00001.npz"
    fix = "delete shard-00001.npz, then re-run the same `uninet-feat extract`" if damage != "deleted" else \
        "re-run the same `uninet-feat extract` to finish or repair the store"
    reads = [s.image_table, lambda: s.array("vectors"), lambda: s.rows("vectors", np.ones(9, bool))]
    if damage != "bytes flipped":   # there only the vectors fail to read
        reads += [lambda: s.array("patches"), lambda: s.rows("patches", np.ones(9, bool))]
    for read in reads:
        with pytest.raises(BadInputError) as e:
            read()
        assert named in str(e.value) and fix in str(e.value) and str(f) in str(e.value)
    if damage == "deleted":
        assert "the shards hold 6 'patches' rows for 9 items" in str(e.value)


@pytest.fixture(scope="module")
def position_run(tmp_path_factory):
    """A tiled run (64 x 192 strips, three tiles) whose tiles are scored less their place's offset (tile_norm:
    position), and its test samples."""
    root = tmp_path_factory.mktemp("pos")
    data = write_texture_set(root / "wide", n_train=6, n_good=2, n_bad=2, wide=True)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "tile": 64, "tile_norm": "position", "epochs": 1,
                                                       "batch_size": 4, "val_fraction": 0.3, "channels_last": False,
                                                       "seed": 5})
    train(cfg, root / "run", quiet=True)
    return root / "run", [s for s in load_samples(cfg) if s.split == "test"]


def _copy_run(run, to, shift=None):
    """A copy of ``run``; ``shift``: {group: added to every position offset}, as another calibration would give."""
    import shutil
    shutil.copytree(run, to)
    if shift is not None:
        _shift_offsets(to, shift)
    return to


def _shift_offsets(run, shift):
    cal = json.loads((run / "calibration.json").read_text())
    (table,) = cal["tile_offsets"]["offsets"].values()
    cal["tile_offsets"]["offsets"] = {g: {k: v + d for k, v in table.items()} for g, d in shift.items()}
    (run / "calibration.json").write_text(json.dumps(cal))


def _mtimes(f):
    return {p.name: p.stat().st_mtime_ns for p in f.glob("shard-*.npz")}


def _killed_after_one_shard(run, samples, f, monkeypatch) -> dict:
    """An extract of ``run`` into ``f`` killed once its first shard of 3 is written; that shard's mtimes."""
    real = featstore.write_shard

    def killed_after_one(folder, i, arrays, **kw):
        if any(folder.glob("shard-*.npz")):
            raise KeyboardInterrupt("killed")
        real(folder, i, arrays, **kw)
    monkeypatch.setattr("uninet_feat.extract.write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        Extractor(run=run).extract_to(samples, f, shard_size=3)
    monkeypatch.setattr("uninet_feat.extract.write_shard", real)
    before = _mtimes(f)
    assert len(before) == 1
    return before


def _refused_then_resumed(run, samples, f, before, restore) -> list:
    """The killed store ``f`` of ``run``, whose calibration changed since (by 0.25 on every score), refused with the
    fix of a new --out; a new store scored 0.25 lower; after ``restore()`` (the calibration the store was started
    with) resumed, its first shard kept, to a fresh store's scores. The shards the resume wrote."""
    with pytest.raises(BadInputError, match="another calibration of the run") as e:
        Extractor(run=run).extract_to(samples, f, shard_size=3)
    assert "new --out" in str(e.value) and _mtimes(f) == before
    changed = Extractor(run=run).extract_to(samples, f.parent / "new", shard_size=3)   # the fix: a new --out
    restore()
    seen = []
    resumed = Extractor(run=run).extract_to(samples, f, shard_size=3, on_shard=seen.append)
    assert 0 not in seen and _mtimes(f)["shard-00000.npz"] == before["shard-00000.npz"]
    np.testing.assert_array_equal(resumed.scores, Extractor(run=run).extract_to(samples, f.parent / "fresh",
                                                                                 shard_size=3).scores)
    np.testing.assert_allclose(changed.scores, resumed.scores - 0.25, atol=1e-5)   # what a resume would have mixed
    return seen


def test_an_extract_after_the_runs_calibration_changed_is_refused_not_mixed(position_run, tmp_path, monkeypatch):
    """The store's fingerprint left out calibration.json (tile offsets, pixel-map levels / units): a `calibrate`
    between a kill and the resume, or before a re-run into a finished store, mixed scores of two calibrations.
    Refused as another model is (the fix: a new --out); an unchanged re-run (`make demo` again) does nothing and
    says nothing, and the calibration put back resumes the store to a fresh one's values."""
    import warnings
    run, samples = position_run
    c = _copy_run(run, tmp_path / "run")
    original = (c / "calibration.json").read_bytes()
    f = tmp_path / "f"
    before = _killed_after_one_shard(c, samples, f, monkeypatch)
    _shift_offsets(c, {"": 0.25})   # as `uninet-feat calibrate --run RUN` between the kill and the resume
    # the calibration the store was started with: resumed
    seen = _refused_then_resumed(c, samples, f, before, lambda: (c / "calibration.json").write_bytes(original))
    with warnings.catch_warnings():   # nothing changed: nothing redone, nothing said
        warnings.simplefilter("error")
        seen.clear()
        assert Extractor(run=c).extract_to(samples, f, shard_size=3, on_shard=seen.append) is not None
        assert seen == []
    _shift_offsets(c, {"": 0.25})   # a finished store re-run after a calibration: refused too
    with pytest.raises(BadInputError, match="another calibration of the run"):
        Extractor(run=c).extract_to(samples, f, shard_size=3)


def test_a_store_fingerprinted_before_the_calibration_was_still_reruns(position_run, tmp_path):
    """A store written before the calibration was fingerprinted (no ``calibration_sha256``) re-runs and resumes
    as before; its manifest then takes this version's fingerprint, so a later calibration is noticed."""
    from uninet_feat.extract import _fingerprint
    run, samples = position_run
    c, f = _copy_run(run, tmp_path / "run"), tmp_path / "f"
    Extractor(run=c).extract_to(samples, f, shard_size=3)
    m = json.loads((f / "manifest.json").read_text())
    m.pop("calibration_sha256", None)   # as the code before wrote it
    m["fingerprint"] = _fingerprint({k: v for k, v in m["source"].items() if k != "run"}, m["settings"],
                                    [i["path"] for i in m["items"]])
    (f / "manifest.json").write_text(json.dumps(m))
    last = sorted(f.glob("shard-*.npz"))[-1]
    last.unlink()
    assert Extractor(run=c).extract_to(samples, f, shard_size=3) is not None and last.exists()
    now = json.loads((f / "manifest.json").read_text())
    assert now["fingerprint"] != m["fingerprint"] and now["calibration_sha256"]
    _shift_offsets(c, {"": 0.25})
    with pytest.raises(BadInputError, match="another calibration of the run"):
        Extractor(run=c).extract_to(samples, f, shard_size=3)


def test_a_regrouped_image_of_a_position_scored_run_has_its_shard_redone(position_run, tmp_path):
    """Under tile_norm: position a tile's score is less its group's offset, so a store re-run with an image moved
    to another group (a changed CSV) kept a stale score under "its features are unchanged". Its shard is redone,
    named in a warning; the others are kept, and the store equals a fresh one."""
    from dataclasses import replace
    run, samples = position_run
    c = _copy_run(run, tmp_path / "run", shift={"A": 0.0, "B": 0.5})   # a run of two groups' offsets
    a = [replace(s, group="A") for s in samples]
    f = tmp_path / "f"
    first = Extractor(run=c).extract_to(a, f, shard_size=3).scores   # three tiles an image: one image a shard
    before = _mtimes(f)
    moved = [replace(s, group="B") if i == 1 else s for i, s in enumerate(a)]
    seen = []
    with pytest.warns(UserWarning, match=r"1 image\(s\) have another group .*shard-00001\.npz extracted again"):
        store = Extractor(run=c).extract_to(moved, f, shard_size=3, on_shard=seen.append)
    assert seen == [1] and {k: v for k, v in _mtimes(f).items() if k != "shard-00001.npz"} == \
        {k: v for k, v in before.items() if k != "shard-00001.npz"}
    assert [i["group"] for i in store.items][3:6] == ["B"] * 3
    fresh = Extractor(run=c).extract_to(moved, tmp_path / "fresh", shard_size=3)
    np.testing.assert_array_equal(store.scores, fresh.scores)
    np.testing.assert_allclose(store.scores[3:6], first[3:6] - 0.5, atol=1e-5)


def _without_tiles_digest(run):
    """The run's calibration.json as written before it recorded its tiles' digest (session 38): a tile file changed
    beside it is then taken as it is, and only a store's fingerprint tells the two calibrations apart."""
    cal = json.loads((run / "calibration.json").read_text())
    cal["tile_offsets"].pop("tile_neighbours_sha256")
    (run / "calibration.json").write_text(json.dumps(cal))


def test_an_extract_after_the_neighbours_tiles_changed_is_refused_not_mixed(position_run, tmp_path, monkeypatch):
    """Under tile_norm: neighbours a tile's score is less the median of its nearest training tiles', kept in
    tile_neighbours.npz beside calibration.json, which names that file but not its content: the store's
    fingerprint (calibration.json's sha256 alone) let a resume after the tiles changed mix two calibrations' scores.
    Refused as a changed calibration.json is; the same tiles written again (other zip bytes: a re-calibration that
    gives the same tiles) resume; a store fingerprinted the old way (calibration.json alone) still resumes."""
    from uninet_feat.cli import main
    from uninet_feat.extract import _fingerprint
    from uninet_feat.positions import Neighbours
    run, samples = position_run
    c = _copy_run(run, tmp_path / "run")
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--quiet"]) == 0
    _without_tiles_digest(c)   # a calibration.json of this run names its tiles' digest: another file is refused
    tiles = c / "tile_neighbours.npz"
    cal, original = (c / "calibration.json").read_bytes(), Neighbours.load(tiles)
    f = tmp_path / "f"
    before = _killed_after_one_shard(c, samples, f, monkeypatch)
    Neighbours({g: {**t, "scores": t["scores"] + 0.25} for g, t in original.groups.items()}).save(tiles)
    assert (c / "calibration.json").read_bytes() == cal   # calibration.json alone does not tell
    # the same tiles again, in a new file: resumed, its first shard kept
    _refused_then_resumed(c, samples, f, before, lambda: original.save(tiles))
    # a store written before the neighbours' tiles were fingerprinted: calibration.json's sha256 alone
    m = json.loads((f / "manifest.json").read_text())
    m.pop("tile_neighbours_sha256")
    m["fingerprint"] = _fingerprint({**{k: v for k, v in m["source"].items() if k != "run"},
                                     "calibration_sha256": m["calibration_sha256"]}, m["settings"],
                                    [i["path"] for i in m["items"]])
    (f / "manifest.json").write_text(json.dumps(m))
    last = sorted(f.glob("shard-*.npz"))[-1]
    last.unlink()
    assert Extractor(run=c).extract_to(samples, f, shard_size=3) is not None and last.exists()
    assert json.loads((f / "manifest.json").read_text())["tile_neighbours_sha256"]   # this version's, from now on


def test_a_predict_pass_resumed_after_the_neighbours_tiles_changed_scores_again(position_run, tmp_path):
    """predict's resumable parts carry the calibration's fingerprint too: parts scored against other neighbours'
    tiles are scored again, not joined to this calibration's."""
    from uninet_feat.cli import main
    from uninet_feat.positions import Neighbours
    run, samples = position_run
    c = _copy_run(run, tmp_path / "run")
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--quiet"]) == 0
    _without_tiles_digest(c)
    tiles = c / "tile_neighbours.npz"
    first = Extractor(run=c).extract(samples, parts=tmp_path / "parts")
    original = Neighbours.load(tiles)
    Neighbours({g: {**t, "scores": t["scores"] + 0.25} for g, t in original.groups.items()}).save(tiles)
    again = Extractor(run=c).extract(samples, parts=tmp_path / "parts")
    assert again["resumed"] == 0
    np.testing.assert_allclose(again["scores"], first["scores"] - 0.25, atol=1e-5)
    assert Extractor(run=c).extract(samples, parts=tmp_path / "parts")["resumed"] == len(first["scores"])


def test_an_untiled_stores_head_trains_on_the_top_half_only_and_predicts_as_with_both(setup, tmp_path):
    """Untiled, every image's mean over tiles is its one tile: the head took the same columns twice (twice the
    LightGBM time, each column's importance split in two). It now takes the top tile's alone, gives the same
    predictions as a head of both halves, and predict finds its columns by name."""
    from uninet_feat.cli import main
    from uninet_feat.downstream import Head, train_head
    from uninet_feat.featstore import FeatureStore, head_columns, without_twin_half
    from uninet_feat.predict import predict_cmd
    data, run, samples = setup
    f, head = tmp_path / "feats", tmp_path / "head"
    assert main(["extract", "--data", str(data), "--run", str(run), "--out", str(f), "--quiet"]) == 0
    assert main(["train-head", "--features", str(f), "--task", "binary", "--folds", "2", "--out", str(head)]) == 0
    store = FeatureStore(f)
    X, recs = store.image_table()
    names = head_columns(store.manifest["vector_names"])
    h = Head.load(head)
    assert h.feature_names == names[:len(names) // 2] and all(n.startswith("top_") for n in h.feature_names)
    assert json.loads((head / "cv_report.json").read_text())["n_columns"] == len(names) // 2
    y = ["good" if r["is_normal"] else "defect" for r in recs]
    both = train_head(X, y, task="binary", n_splits=2, feature_names=names, n_jobs=1).head
    assert h.predict_proba(X[:, :len(names) // 2]) == pytest.approx(both.predict_proba(X), abs=1e-9)
    rows = predict_cmd(run, data, tmp_path / "p", heads=[str(head)], overlays=False, quiet=True)["rows"]
    want = dict(zip((r["path"] for r in recs), h.predict_proba(X[:, :len(names) // 2]).max(1)))
    assert [r["head_confidence"] for r in rows] == pytest.approx([want[r["path"]] for r in rows], abs=1e-6)
    # a tiled image's mean differs from its top tile: both halves are kept
    tiled = np.concatenate([X[:, :len(names) // 2], X[:, :len(names) // 2] + 1.0], 1)
    kept, kept_names = without_twin_half(tiled, names)
    assert kept.shape == tiled.shape and kept_names == names


def test_a_batch_for_a_run_of_several_groups_takes_group_from_flag_or_folder(tmp_path, capsys):
    """A run of several groups scored by position offsets per group could not extract a new batch at all: the
    offsets need each image's group, and --group was refused with --batch (README step 5; an audit, session 52)."""
    import shutil
    from uninet_feat.cli import main
    root = tmp_path / "data"
    for i, g in enumerate(("g1", "g2")):
        write_texture_set(root / g, n_train=6, n_good=2, n_bad=2, wide=True, seed=i)
    cfg = load_config(None, {"data": str(root)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "tile": 64, "tile_norm": "position", "epochs": 1,
                                                       "batch_size": 4, "val_fraction": 0.3, "channels_last": False})
    train(cfg, tmp_path / "run", quiet=True)
    flat, by = tmp_path / "flat", tmp_path / "by"
    for g in ("g1", "g2"):
        for p in sorted((root / g / "test" / "good").glob("*.png")):
            (by / g).mkdir(parents=True, exist_ok=True)
            flat.mkdir(exist_ok=True)
            shutil.copy(p, by / g / p.name)
            shutil.copy(p, flat / f"{g}_{p.name}")
    base = ["extract", "--run", str(tmp_path / "run"), "--batch", "--quiet"]
    capsys.readouterr()
    assert main(base + ["--data", str(flat), "--out", str(tmp_path / "f0")]) == 2
    assert "extract --batch --group G" in capsys.readouterr().err
    assert main(base + ["--data", str(flat), "--group", "g1", "--out", str(tmp_path / "f1")]) == 0
    items = json.loads((tmp_path / "f1" / "manifest.json").read_text())["items"]
    assert {i["group"] for i in items} == {"g1"} and len({i["path"] for i in items}) == 4
    assert main(base + ["--data", str(by), "--out", str(tmp_path / "f2")]) == 0
    items = json.loads((tmp_path / "f2" / "manifest.json").read_text())["items"]
    assert {(Path(i["path"]).parent.name, i["group"]) for i in items} == {("g1", "g1"), ("g2", "g2")}


def test_the_rebuild_that_a_refusal_names_runs_as_written_and_keeps_the_heads_kind(setup, tmp_path, capsys):
    """A head or index built from another run's features is refused with the commands that rebuild it; they named
    `extract` without its required --data and `index` / `train-head` without --out, and rebuilt a defect-type head
    as a binary one (an audit, session 53). Each command of the fix is run here as written (F: a folder)."""
    import shlex
    import yaml
    import re
    from uninet_feat.cli import main
    import shutil
    data, run, _ = setup
    data = Path(shutil.copytree(data, tmp_path / "d"))   # two defect types (2 images each) for a defect-type head
    spots = sorted((data / "test" / "spot").glob("*.png"))
    (data / "test" / "stain").mkdir()
    for p in spots:
        shutil.copy(p, data / "test" / "stain" / p.name)
        shutil.copy(data / "ground_truth" / "spot" / f"{p.stem}_mask.png", data / "ground_truth" / "stain")
    other = tmp_path / "other"   # another model of the same data
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 4, "channels_last": False,
                                                       "seed": 9}), other, quiet=True)
    f, head, knn = tmp_path / "f", tmp_path / "head", tmp_path / "knn"
    assert main(["extract", "--run", str(other), "--data", str(data), "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["train-head", "--features", str(f), "--task", "multiclass", "--defects-only", "--folds", "2",
                 "--out", str(head)]) == 0
    assert main(["index", "--features", str(f), "--out", str(knn)]) == 0
    for flag, folder in (("--head", head), ("--knn", knn)):
        capsys.readouterr()
        assert main(["predict", "--run", str(run), "--data", str(data / "test"), flag, str(folder), "--out",
                     str(tmp_path / "p"), "--quiet", "--no-overlays"]) == 2
        fix = capsys.readouterr().err.split("(fix: ", 1)[1]
        commands = re.findall(r"`(uninet-feat [^`]+)`", fix)
        assert len(commands) == 2, fix
        for i, c in enumerate(commands):
            args = [str(tmp_path / f"F{flag}") if a == "F" else a for a in shlex.split(c)[1:]]
            assert main(args + ["--quiet"] * (i == 0)) == 0, c
        assert main(["predict", "--run", str(run), "--data", str(data / "test"), flag, str(folder), "--out",
                     str(tmp_path / "p"), "--quiet", "--no-overlays"]) == 0
    assert json.loads((head / "head.json").read_text())["task"] == "multiclass"
    assert yaml.safe_load((head / "config.yaml").read_text())["defects_only"] is True
