"""kNN and combined scoring where image, map and split differ from the plain case: images larger than the run's
image size, a tiled run beside an untiled index over images of several sizes, and a store without the run's split."""
import csv
import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from uninet_feat.cli import main
from uninet_feat.extract import Extractor

from _tiny import register_tiny, run_with_plain_index, write_texture_set

register_tiny()


def _tiny_weights(path):
    import torch
    from uninet_feat.backbones import create_backbone
    torch.save(create_backbone("tiny", weights="random").state_dict(), path)
    return path


def _train(data, out, weights, **cfg):
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    train(load_config(None, {"data": str(data), **cfg}, base={
        "backbone": "tiny", "weights": str(weights), "image_size": 64, "epochs": 1, "batch_size": 2,
        "channels_last": False, "val_fraction": 0.5}), out, quiet=True)
    return out


def _plain_store(data, weights, out, *extra):
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size", "64",
                 "--patches", "--out", str(out), "--quiet", *extra]) == 0
    return out


def test_combined_overlays_of_images_larger_than_the_run_resize_the_whole_knn_map(tmp_path):
    """An untiled run at 64 px on 128 px images: its WDM maps are 64x64, and the kNN map was cut to their size (the
    image's top-left quarter) instead of the whole image's map resized to it, in the overlays and in their colour
    scale (the validation normals' combined pixels)."""
    from uninet_feat.normals import validation_normals
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.data.layouts import discover_batch
    from uninet_feat.downstream import KNNScorer
    from uninet_feat.downstream.knn import upsample_scores
    from uninet_feat.evaluate import score_samples
    from uninet_feat.overlay import heatmap_overlay
    data = write_texture_set(tmp_path / "data", n_train=10, n_good=3, n_bad=4, size=128)
    run, knn, weights, _ = run_with_plain_index(tmp_path, data)
    out = tmp_path / "p"
    assert main(["predict", "--run", str(run), "--data", str(data), "--knn", str(knn), "--heatmap", "combined",
                 "--threshold=-1e9", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "predictions.json").read_text())
    model, ck = build_from_checkpoint(run / "model.pt")
    cfg, bank = dict(ck["config"]), KNNScorer.load(knn)
    wr = json.loads((run / "calibration.json").read_text())["map_range"]
    plain = Extractor(backbone="tiny", weights=str(weights), image_size=64, patches=True)
    val = validation_normals(cfg)
    kr = np.quantile(bank.score_patches(plain.extract(val)["patches"].astype(np.float32)), [0.5, 0.999])

    def combined(samples):   # the whole image's kNN grid at the WDM map's size, both in range units
        res, kres = score_samples(model, samples, cfg, keep_maps=True), plain.extract(samples)
        assert res["maps"][0].shape == (64, 64) and kres["tile"][0].tolist() == [0, 0, 128, 128]
        k = upsample_scores(bank.score_patches(kres["patches"].astype(np.float32)), kres["patch_grid"], (64, 64))
        return [(w - wr[0]) / (wr[1] - wr[0]) + (k[i] - kr[0]) / (kr[1] - kr[0]) for i, w in enumerate(res["maps"])]
    v = np.concatenate([m.ravel() for m in combined(val)])
    assert summary["heatmap_range"] == pytest.approx([np.quantile(v, 0.5), np.quantile(v, 0.999)], rel=1e-4)
    samples = discover_batch(data)
    maps = combined(samples)
    lo, hi = summary["heatmap_range"]
    for row in [r for r in rows if r["label"] == "spot"]:
        m = maps[[str(x.path) for x in samples].index(row["path"])]
        got = np.asarray(Image.open(row["overlay"]).convert("RGB")).astype(int)
        assert np.abs(got - heatmap_overlay(row["path"], m, vmin=lo, vmax=hi).astype(int)).max() <= 1


def test_a_tiled_run_with_an_untiled_index_pairs_each_knn_map_with_its_own_images_map(tmp_path):
    """A tiled run's WDM maps are each image's native size; with an untiled plain index and test images of two
    widths, evaluate's exact pixel path resized every kNN map to the first image's size and crashed (broadcast),
    while the binned path, each map at its own size, worked: both now give the same figures."""
    from uninet_feat.evaluate import evaluate
    data = write_texture_set(tmp_path / "data", n_train=8, n_good=3, n_bad=3, wide=True)   # 64x192
    img = np.asarray(Image.open(data / "test/spot/000.png"), dtype=np.float32)[:, :128].copy()   # and a 64x128
    mask = np.zeros((64, 128), np.uint8)
    img[20:34, 90:104], mask[20:34, 90:104] = 255, 255
    Image.fromarray(img.astype(np.uint8)).save(data / "test/spot/009.png")
    Image.fromarray(mask).save(data / "ground_truth/spot/009_mask.png")
    weights = _tiny_weights(tmp_path / "tiny.pt")
    run = _train(data, tmp_path / "run", weights, tile=64)
    _plain_store(data, weights, tmp_path / "plain")
    assert main(["index", "--features", str(tmp_path / "plain"), "--coreset", "1.0", "--run", str(run),
                 "--out", str(tmp_path / "knn")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = evaluate(run, quiet=True, knn=tmp_path / "knn")["scorers"]
        binned = evaluate(run, quiet=True, knn=tmp_path / "knn", pixel_budget=0)["scorers"]
    for name in ("knn", "combined"):
        assert exact[name]["pixel_auroc"] == pytest.approx(binned[name]["pixel_auroc"], abs=1e-3)
    assert exact["knn"]["aupro"] == pytest.approx(binned["knn"]["aupro"], abs=1e-3)


@pytest.fixture(scope="module")
def label_folders(tmp_path_factory):
    """A run on a label-folder set (good/, spot/: its test normals a hashed share of good/) and a plain store of
    that set made with `extract --batch`, which marks every image split ''."""
    root = tmp_path_factory.mktemp("lf")
    src = write_texture_set(root / "src", n_train=20, n_good=0, n_bad=4)
    data = root / "data"
    for folder, to in (("train/good", "good"), ("test/spot", "spot")):
        (data / to).mkdir(parents=True)
        for p in (src / folder).glob("*.png"):
            shutil.copy(p, data / to / p.name)
    weights = _tiny_weights(root / "tiny.pt")
    run = _train(data, root / "run", weights, val_fraction=0.3)
    return root, data, run, _plain_store(data, weights, root / "plain", "--batch")


def _test_normals(run):
    from uninet_feat.config import load_config
    from uninet_feat.runs import load_test_samples
    from uninet_feat.scorers import abs_path
    return {abs_path(s.path) for s in load_test_samples(load_config(run / "config.yaml")) if s.label == "good"}


def test_index_with_a_run_leaves_its_test_images_out_of_the_bank(label_folders):
    from uninet_feat.evaluate import evaluate
    root, data, run, store = label_folders
    normals = _test_normals(run)
    assert normals   # the split has test normals, which the --batch store does not mark
    with pytest.warns(UserWarning, match=f"{len(normals)} of the run's test images in these features"):
        assert main(["index", "--features", str(store), "--coreset", "1.0", "--run", str(run),
                     "--out", str(root / "knn")]) == 0
    source = json.loads((root / "knn" / "knn.json").read_text())["source"]
    assert source["held_out_test"]["run"] == str(run) and source["held_out_test"]["n"] >= len(normals)
    assert source["bank_images"] and not normals & set(source["bank_images"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = evaluate(run, quiet=True, knn=root / "knn", csv_path=root / "ev.csv")
    assert not [x for x in w if "memory bank" in str(x.message)] and rep["scorers"]["knn_test_images_in_bank"] == 0
    rows = list(csv.DictReader(open(root / "ev.csv")))
    assert min(float(r["knn_score"]) for r in rows if r["is_defect"] == "0") > 1e-3   # not scored against itself


def test_index_counts_the_held_out_test_images_not_their_tiles(label_folders, tmp_path):
    """knn.json's held_out_test.n counted a tiled store's tiles (4 per image here) where held_out_val.n counts
    images."""
    from uninet_feat.config import load_config
    from uninet_feat.runs import load_test_samples
    root, data, run, _ = label_folders
    tiled = _plain_store(data, _tiny_weights(tmp_path / "tiny.pt"), tmp_path / "tiled", "--batch", "--tile", "32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the store holds the run's test images: warned, left out
        assert main(["index", "--features", str(tiled), "--coreset", "1.0", "--run", str(run),
                     "--out", str(tmp_path / "knn")]) == 0
    source = json.loads((tmp_path / "knn" / "knn.json").read_text())["source"]
    n_test = len(load_test_samples(load_config(run / "config.yaml")))
    assert n_test and source["held_out_test"]["n"] == n_test


def test_evaluate_warns_of_test_images_in_the_bank(label_folders):
    """An index built without --run from that store keeps the test normals: evaluate --knn says so (by path)."""
    from uninet_feat.evaluate import evaluate
    root, data, run, store = label_folders
    assert main(["index", "--features", str(store), "--coreset", "1.0", "--out", str(root / "knn_all")]) == 0
    n = len(_test_normals(run))
    with pytest.warns(UserWarning, match=f"{n} of the {n + 4} test images are in the kNN index's memory bank"):
        rep = evaluate(run, quiet=True, knn=root / "knn_all")
    assert rep["scorers"]["knn_test_images_in_bank"] == n


def test_index_and_train_head_name_the_store_and_images_whose_features_are_nan(tmp_path, capsys):
    """A damaged weights file (one NaN) gives NaN features; index and train-head refused them as '4 of 4 normal
    patch vectors contain NaN (rows [0, 1, ...])', naming no store, image or fix."""
    import torch
    from uninet_feat.backbones import create_backbone
    data = write_texture_set(tmp_path / "tex", n_train=4, n_good=3, n_bad=3, size=32)
    sd = create_backbone("tiny", weights="random").state_dict()
    next(v for v in sd.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(tmp_path / "nan.pt"),
                 "--image-size", "32", "--patches", "--out", str(tmp_path / "f"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "--features", str(tmp_path / "f"), "--coreset", "1", "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'f'}: the features of 4 image(s) contain NaN or Inf (first: {data}/train/good/000.png" in err
    assert f"check --weights {tmp_path / 'nan.pt'}, then extract again" in err
    # an image-level index named row numbers only ("1 of 10 vectors contain NaN or Inf (rows [0, ...])")
    assert main(["index", "--features", str(tmp_path / "f"), "--level", "image", "--out", str(tmp_path / "i")]) == 2
    assert f"{tmp_path / 'f'}: the features of 10 image(s) contain NaN or Inf (first: " in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train-head", "--features", str(tmp_path / "f"), "--folds", "2",
                     "--out", str(tmp_path / "h")]) == 2
    assert "the features of 10 image(s) contain NaN or Inf (first: " in capsys.readouterr().err


def test_extract_validate_takes_the_images_skip_bad_left_out_for_no_missing_ones(tmp_path):
    """extract --validate --skip-bad refused its own finished store: the unreadable image it had left out was among
    the expected paths, so the check found it 'missing'."""
    from uninet_feat.workflows import extract_cmd
    data = write_texture_set(tmp_path / "tex", n_train=4, n_good=2, n_bad=2, size=32)
    (data / "test" / "good" / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = extract_cmd(str(data), str(tmp_path / "f"), backbone="tiny", weights="random", image_size=32,
                          quiet=True, skip_bad=True, validate=True)
    assert res["skipped"] == [str(data / "test" / "good" / "broken.png")]
    assert res["validation"]["ok"] and res["validation"]["n_images"] == 8


def test_a_kill_while_the_index_is_built_keeps_the_finished_coreset_for_the_next_run(tmp_path, monkeypatch):
    """The selection's state was removed as soon as the picks were made, so a kill while the index was built or
    written (minutes for IVF-PQ or HNSW on a real bank) made the next `index` run select again from pick 0 (47 min
    at 256 px here). `index` now keeps the finished state until knn.json is saved."""
    from uninet_feat import workflows
    from uninet_feat.downstream import coreset as cs
    from uninet_feat.downstream import KNNScorer, knn
    from uninet_feat.featstore import FeatureStore
    store = tmp_path / "f"
    data = write_texture_set(tmp_path / "tex", n_train=6, n_good=1, n_bad=1, size=32)
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                 "--patches", "--out", str(store), "--quiet"]) == 0
    real_build, real_resume, starts = knn.build_index, cs._resume, []

    def killed(*a, **kw):
        raise KeyboardInterrupt
    from uninet_feat.cli import main as cli
    assert cli(["index", "--features", str(store), "--coreset", "0.25", "--out", str(tmp_path / "k")]) == 0
    monkeypatch.setattr(knn, "build_index", killed)
    assert cli(["index", "--features", str(store), "--coreset", "0.5", "--device", "cpu", "--out",
                str(tmp_path / "k")]) == 130   # stopped as by Ctrl-C
    assert (tmp_path / "k" / ".partial" / "coreset_state.npz").exists()
    # the state is scratch: its saves did not put this command's config.yaml beside the earlier index (they did
    # until session 53)
    assert "coreset: 0.25" in (tmp_path / "k" / "config.yaml").read_text()
    monkeypatch.setattr(knn, "build_index", real_build)
    monkeypatch.setattr(cs, "_resume", lambda *a: (lambda r: starts.append(r[0]) or r)(real_resume(*a)))
    workflows.index_cmd(store, tmp_path / "k", coreset=0.5, device="cpu")
    n_bank = KNNScorer.load(tmp_path / "k").index.ntotal
    assert starts == [n_bank] and not (tmp_path / "k" / ".partial").exists()   # nothing picked again
    n_normal = sum(it["is_normal"] and it["split"] == "train" for it in FeatureStore(store).items)
    assert n_bank < n_normal * 64 and n_bank > 0


def test_the_few_normals_warning_of_the_knn_and_combined_thresholds_is_wdms_said_once(tmp_path, recwarn):
    """`evaluate --knn` resolves three thresholds on the same validation normals; the kNN's and the combined's built
    their record without the run's val_fraction, so besides WDM's right fix they advised `train --val-fraction 0.3`
    to a run at 0.5, twice more (an audit, session 53). Now one warning, the run's fix."""
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=2, n_bad=2)
    run, knn, _, _ = run_with_plain_index(tmp_path, data)
    recwarn.clear()
    assert main(["evaluate", "--run", str(run), "--knn", str(knn), "--json", str(tmp_path / "m.json"),
                 "--quiet"]) == 0
    few = [str(w.message) for w in recwarn if "the default threshold is the 0.99 quantile" in str(w.message)]
    assert len(few) == 1, few
    assert "--val-fraction is 0.5 already" in few[0] and "e.g. 0.3" not in few[0]
