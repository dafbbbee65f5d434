"""The kNN and combined scorers beside WDM: flagging by them, their thresholds, the kNN heatmap."""
import json
from pathlib import Path

import numpy as np
import pytest

from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.extract import Extractor

from _tiny import register_tiny, run_with_plain_index, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run with 5 validation normals and a plain-feature index that holds them out."""
    root = tmp_path_factory.mktemp("sc")
    data = write_texture_set(root / "data", n_train=10, n_good=3, n_bad=4)
    run, knn, _, _ = run_with_plain_index(root, data)
    return data, run, knn


def _validation_scores(run, knn):
    """Each validation normal's kNN, WDM and combined score, computed here from the pieces."""
    from uninet_feat.normals import validation_normals
    from uninet_feat.downstream import KNNScorer
    cfg = load_config(run / "config.yaml")
    val = validation_normals(cfg)
    res = Extractor(run=run, patches="source").extract(val)
    k = KNNScorer.load(knn).score_patches(res["patches"].astype(np.float32)).max(1)
    w = res["scores"]
    wv = np.array(json.loads((run / "calibration.json").read_text())["val_scores"])
    np.testing.assert_allclose(np.sort(w), wv, rtol=1e-5)   # the same model on the same images
    z = lambda v, ref: (v - ref.mean()) / ref.std()  # noqa: E731
    return {"knn": k, "wdm": w, "combined": z(k, k) + z(w, wv)}


@pytest.mark.parametrize("flag_by", ["knn", "combined"])
def test_predict_flags_by_the_knn_or_combined_score_at_its_own_validation_threshold(setup, tmp_path, flag_by):
    data, run, knn = setup
    val = _validation_scores(run, knn)[flag_by]
    base = ["predict", "--run", str(run), "--data", str(data), "--knn", str(knn), "--flag-by", flag_by,
            "--no-overlays", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "p")]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert summary["flag_by"] == flag_by and f"validation normals' {flag_by} scores" in summary["threshold_rule"]
    # abs: a combined (z-scored) threshold may lie near 0, where float32 sums of other batchings differ by ~4e-7
    assert summary["threshold"] == pytest.approx(np.quantile(val, 0.99), rel=1e-4, abs=1e-5)
    assert [r["flagged"] for r in rows] == [r[f"{flag_by}_score"] > summary["threshold"] for r in rows]
    assert summary["n_flagged"] == sum(r["flagged"] for r in rows)
    # --max-fpr 0.2 of 5 validation normals: at most one above the threshold, i.e. the second highest score
    assert main(base + ["--max-fpr", "0.2", "--out", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["threshold"] == pytest.approx(np.sort(val)[-2], rel=1e-4, abs=1e-5)
    assert main(base + ["--threshold=-1e9", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["n_flagged"] == len(rows)


def test_flag_by_knn_needs_an_index_and_valid_normals(setup, tmp_path, capsys):
    data, run, knn = setup
    base = ["predict", "--run", str(run), "--data", str(data), "--quiet"]
    for extra in (["--flag-by", "knn"], ["--flag-by", "combined"], ["--heatmap", "knn"], ["--heatmap", "combined"]):
        assert main(base + extra + ["--out", str(tmp_path / "p")]) == 2
        assert "--knn DIR" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    # an index whose bank holds the validation normals cannot z-score or threshold on them
    assert main(["index", "--features", str(knn.parent / "plain"), "--coreset", "1.0", "--out", str(tmp_path / "all")]) == 0
    with pytest.warns(UserWarning, match="held out"):
        assert main(base + ["--knn", str(tmp_path / "all"), "--flag-by", "knn", "--out", str(tmp_path / "p")]) == 2
    assert "needs the run's validation normals" in capsys.readouterr().err
    # with --threshold: the kNN score is compared with it; a combined score does not exist (a KeyError after scoring)
    given = base + ["--knn", str(tmp_path / "all"), "--threshold", "0.5", "--no-overlays"]
    with pytest.warns(UserWarning, match="held out"):
        assert main(given + ["--flag-by", "combined", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "flagging by the combined score needs the run's validation normals" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "predictions.csv").exists()
    with pytest.warns(UserWarning, match="held out"):
        assert main(given + ["--flag-by", "knn", "--out", str(tmp_path / "k")]) == 0
    rows = json.loads((tmp_path / "k" / "predictions.json").read_text())
    assert [r["flagged"] for r in rows] == [r["knn_score"] > 0.5 for r in rows]
    # refused after scoring into that folder: its parts under .partial are scratch, so the folder keeps the records of
    # the outputs it holds (the refused command's config.yaml and env.json replaced them; an audit, session 52)
    records = {n: (tmp_path / "k" / n).read_bytes() for n in ("config.yaml", "env.json", "summary.json")}
    with pytest.warns(UserWarning, match="held out"):
        assert main(given + ["--flag-by", "combined", "--out", str(tmp_path / "k")]) == 2
    assert {n: (tmp_path / "k" / n).read_bytes() for n in records} == records


def test_predict_removes_its_earlier_overlays_and_maps_and_no_file_of_the_users(setup, tmp_path):
    """A predict into --out removed every *_overlay.png in OUT/overlays and every *.npy / *_mask.png in OUT/maps, the
    user's own masks and arrays too; now the files an earlier predict's predictions.csv names, and those under the
    names this run writes."""
    data, run, _ = setup
    out = tmp_path / "p"
    mine = [out / "maps" / "part17.npy", out / "maps" / "part17_mask.png", out / "overlays" / "shift2_overlay.png"]
    for f in mine:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"the user's")
    base = ["predict", "--run", str(run), "--data", str(data), "--quiet", "--out", str(out)]
    assert main(base + ["--threshold=-1e9", "--save-maps"]) == 0   # every image flagged: an overlay and a map each
    first = json.loads((out / "predictions.json").read_text())
    written = [Path(r[c]) for r in first for c in ("overlay", "map")]
    assert all(f.is_file() for f in written) and all(f.read_bytes() == b"the user's" for f in mine)
    assert main(base + ["--threshold=1e9"]) == 0   # a re-run: nothing flagged, no maps
    assert not any(f.exists() for f in written) and all(f.read_bytes() == b"the user's" for f in mine)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["shift2_overlay.png"]


def _predict_every_image(setup, out, heatmap):
    """predict with every image flagged and ``heatmap`` overlays: (rows, summary), every row with its overlay."""
    data, run, knn = setup
    assert main(["predict", "--run", str(run), "--data", str(data), "--knn", str(knn), "--threshold=-1e9",
                 "--heatmap", heatmap, "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "predictions.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heatmap"] == heatmap and all(r["overlay"] for r in rows)
    return rows, summary


def test_knn_heatmap_overlays_show_the_patch_distances_at_native_size(setup, tmp_path):
    from PIL import Image
    from uninet_feat.downstream import KNNScorer
    from uninet_feat.downstream.knn import upsample_scores
    from uninet_feat.overlay import heatmap_overlay
    from uninet_feat.scorers import knn_map
    data, run, knn = setup
    rows, summary = _predict_every_image(setup, tmp_path / "p", "knn")
    row = next(r for r in rows if r["label"] == "spot")   # (a training image is in the bank: distance 0)
    from uninet_feat.data.layouts import discover_batch   # predict's images in its batches: bitwise the same scores
    samples = discover_batch(data)
    i = [str(x.path) for x in samples].index(row["path"])
    res = Extractor(run=run, patches="source").extract(samples)
    s = KNNScorer.load(knn).score_patches(res["patches"].astype(np.float32))
    m = knn_map(s, res, i)
    np.testing.assert_allclose(m, upsample_scores(s[list(res["index"]).index(i)][None], res["patch_grid"],
                                                  (64, 64))[0], rtol=1e-6)
    from uninet_feat.normals import validation_normals# colour scale: the validation normals' patch scores
    vres = Extractor(run=run, patches="source").extract(validation_normals(load_config(run / "config.yaml")))
    vs = KNNScorer.load(knn).score_patches(vres["patches"].astype(np.float32)).ravel()
    lo, hi = np.quantile(vs, 0.5), np.quantile(vs, 0.999)
    got = np.asarray(Image.open(row["overlay"]).convert("RGB"))
    np.testing.assert_array_equal(got, heatmap_overlay(row["path"], m, vmin=lo, vmax=hi))
    assert not np.array_equal(got, heatmap_overlay(row["path"], m, vmin=0, vmax=float(m.max())))


def test_combined_heatmap_overlays_sum_both_maps_in_range_units(setup, tmp_path):
    """`--heatmap combined` draws WDM's map plus the kNN map (at the WDM map's size), each in its own
    validation-normal range units, coloured median .. 0.999 quantile of that combined map on the validation normals."""
    from PIL import Image
    from uninet_feat.normals import validation_normals
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.data.layouts import discover_batch
    from uninet_feat.downstream import KNNScorer
    from uninet_feat.downstream.knn import upsample_scores
    from uninet_feat.evaluate import score_samples
    from uninet_feat.overlay import heatmap_overlay
    data, run, knn = setup
    rows, summary = _predict_every_image(setup, tmp_path / "p", "combined")
    model, ck = build_from_checkpoint(run / "model.pt")
    cfg, bank = dict(ck["config"]), KNNScorer.load(knn)
    wr = json.loads((run / "calibration.json").read_text())["map_range"]

    def combined(samples):   # each sample's combined map, from the pieces
        res = score_samples(model, samples, cfg, keep_maps=True)
        kres = Extractor(run=run, patches="source").extract(samples)
        k = upsample_scores(bank.score_patches(kres["patches"].astype(np.float32)), kres["patch_grid"],
                            res["maps"][0].shape)
        kr = np.quantile(bank.score_patches(vres["patches"].astype(np.float32)), [0.5, 0.999])
        return [(w - wr[0]) / (wr[1] - wr[0]) + (k[i] - kr[0]) / (kr[1] - kr[0]) for i, w in enumerate(res["maps"])]
    val = validation_normals(cfg)
    vres = Extractor(run=run, patches="source").extract(val)
    v = np.concatenate([m.ravel() for m in combined(val)])
    lo, hi = np.quantile(v, 0.5), np.quantile(v, 0.999)
    assert summary["heatmap_range"] == pytest.approx([lo, hi], rel=1e-4)
    samples = discover_batch(data)
    maps = combined(samples)
    own_range = []
    for row in rows[:3]:
        m = maps[[str(x.path) for x in samples].index(row["path"])]
        got = np.asarray(Image.open(row["overlay"]).convert("RGB")).astype(int)
        want = heatmap_overlay(row["path"], m, vmin=lo, vmax=hi).astype(int)
        assert np.abs(got - want).max() <= 1       # float rounding of the colour index at most
        own_range.append(np.abs(got - heatmap_overlay(row["path"], m, vmin=0, vmax=float(m.max()))).max())
    # not drawn on each map's own range: over the three overlays (one alone may have a range close to the calibrated
    # one: a full-suite run at 1 thread drew one within a colour step)
    assert max(own_range) > 1


def test_knn_map_stitches_tiles_into_the_native_image():
    from uninet_feat.downstream.knn import upsample_scores
    from uninet_feat.scorers import knn_map
    rng = np.random.default_rng(0)
    s = rng.random((4, 6)).astype(np.float32)   # 4 items on a 2x3 patch grid
    res = {"index": np.array([1, 1, 0, 1]), "patch_grid": (2, 3),
           "tile": np.array([[0, 0, 8, 12], [0, 12, 8, 12], [0, 0, 10, 15], [0, 24, 8, 12]])}
    m = knn_map(s, res, 1)   # three side-by-side tiles of a 8x36 strip
    assert m.shape == (8, 36)
    for j, x in ((0, 0), (1, 12), (3, 24)):
        np.testing.assert_allclose(m[:, x:x + 12], upsample_scores(s[j][None], (2, 3), (8, 12))[0], rtol=1e-6)
    np.testing.assert_allclose(knn_map(s, res, 0), upsample_scores(s[2][None], (2, 3), (10, 15))[0], rtol=1e-6)
    # at a WDM map's size: an untiled image's grid goes straight to it; a tiled one is stitched at native size
    np.testing.assert_allclose(knn_map(s, res, 0, (20, 30)), upsample_scores(s[2][None], (2, 3), (20, 30))[0], rtol=1e-6)
    np.testing.assert_array_equal(knn_map(s, res, 1, (8, 36)), m)
    assert knn_map(s, res, 2) is None   # a sample the extraction skipped has no map


def test_evaluate_reports_each_scorers_operating_point(setup):
    from uninet_feat.evaluate import evaluate
    data, run, knn = setup
    rep = evaluate(run, knn=knn, quiet=True)
    val = _validation_scores(run, knn)
    y = np.array([r["is_defect"] for r in rep["_rows"]])
    for name in ("knn", "combined"):
        sc = rep["scorers"][name]
        assert sc["threshold"] == pytest.approx(np.quantile(val[name], 0.99), rel=1e-4)
        pred = np.array([float(r[f"{name}_score"]) for r in rep["_rows"]]) > sc["threshold"]
        assert sc["at_threshold"]["recall_defect"] == pytest.approx(pred[y == 1].mean())
        assert sc["at_threshold"]["false_positive_rate"] == pytest.approx(pred[y == 0].mean())
    with pytest.raises(BadInputError, match="--checkpoint"):
        evaluate(run, knn=knn, checkpoint=run / "checkpoint.pt", quiet=True)


def test_combined_map_is_both_maps_in_units_of_their_validation_range():
    from uninet_feat.scorers import combined_map, range_units
    w, k = np.array([[1.0, 2.0, 5.0]]), np.array([[10.0, 30.0, 10.0]])
    np.testing.assert_allclose(range_units(w, (1.0, 3.0)), [[0.0, 0.5, 2.0]])
    np.testing.assert_allclose(combined_map(w, k, (1.0, 3.0), (10.0, 20.0)), [[0.0, 2.5, 2.0]])


def test_evaluate_reports_the_combined_pixel_map(setup):
    """The combined map's pixel metrics are those of WDM's and the kNN's test maps, each scaled by its own
    validation-normal range (calibration.json's map_range, the index's patch scores), summed."""
    from uninet_feat import metrics
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.downstream import KNNScorer
    from uninet_feat.downstream.knn import upsample_scores
    from uninet_feat.evaluate import evaluate, score_samples
    from uninet_feat.runs import load_samples
    from uninet_feat.scorers import combined_map, knn_setup, reference
    data, run, knn = setup
    rep = evaluate(run, knn=knn, quiet=True)
    model, ck = build_from_checkpoint(run / "model.pt")
    cfg = dict(ck["config"])
    test = [s for s in load_samples(cfg) if s.split == "test"]
    res = score_samples(model, test, cfg, keep_maps=True)
    kres = Extractor(run=run, patches="source").extract(test)
    kmaps = upsample_scores(KNNScorer.load(knn).score_patches(kres["patches"].astype(np.float32)),
                            kres["patch_grid"], res["maps"][0].shape)
    ex = Extractor(run=run)
    scorer, kex = knn_setup(knn, ex)
    ref = reference(run, cfg, scorer, kex or ex, ex)
    wr = json.loads((run / "calibration.json").read_text())["map_range"]
    comb = [combined_map(w, kmaps[i], wr, ref.knn_range) for i, w in enumerate(res["maps"])]
    sc = rep["scorers"]["combined"]
    assert sc["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(res["masks"], comb), abs=1e-6)
    assert sc["aupro"] == pytest.approx(metrics.aupro(res["masks"], comb), abs=1e-6)


def test_calibration_names_each_validation_normal_beside_its_score(setup):
    """calibration.json's val_paths[i] is the validation normal that scored val_scores[i] (ascending), so the
    normal that sets a threshold can be looked at."""
    from pathlib import Path
    from uninet_feat.normals import validation_normals
    data, run, knn = setup
    cal = json.loads((run / "calibration.json").read_text())
    val = validation_normals(load_config(run / "config.yaml"))
    res = Extractor(run=run).extract(val)
    own = {str(Path(val[i].path).resolve()): float(v) for i, v in zip(res["index"], res["scores"])}
    assert sorted(cal["val_paths"]) == sorted(own) and len(own) == 5
    assert cal["val_scores"] == sorted(cal["val_scores"])
    assert [own[p] for p in cal["val_paths"]] == pytest.approx(cal["val_scores"], rel=1e-5)


def test_combined_scores_of_a_tile_score_mean_run_match_their_threshold(tmp_path):
    """A tiled run with ``tile_score: mean``: the combined threshold came from validation normals' WDM scores by
    their highest tile while predict's rows took the mean, so each normal's row and its part in the threshold
    differed (2.96 against 1.12) and fewer images were flagged than the rule says."""
    from uninet_feat.predict import predict_cmd
    from uninet_feat.scorers import knn_setup, reference
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "wide", n_train=8, n_good=2, n_bad=2, wide=True)
    run = tmp_path / "mean"
    train(load_config(None, {"data": str(data), "tile": 64, "tile_score": "mean"},
                      base={"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
                            "val_fraction": 0.4, "channels_last": False, "seed": 7}), run, quiet=True)
    assert main(["extract", "--run", str(run), "--data", str(data), "--patches", "--quiet",
                 "--out", str(tmp_path / "f")]) == 0
    assert main(["index", "--features", str(tmp_path / "f"), "--coreset", "1", "--out", str(tmp_path / "k")]) == 0
    ex = Extractor(run=run)
    scorer, kex = knn_setup(tmp_path / "k", ex)
    ref = reference(run, ex.cfg, scorer, kex or ex, ex, paired=True)
    cal = json.loads((run / "calibration.json").read_text())
    assert np.allclose(sorted(ref.wdm_paired), cal["val_scores"], rtol=1e-6)   # the rule calibration used
    res = predict_cmd(run, data / "train" / "good", tmp_path / "p", knn=tmp_path / "k", flag_by="combined",
                      overlays=False, quiet=True)
    rows = {r["path"]: r for r in res["rows"]}
    got = [rows[str(s.path)]["combined_score"] for s in ref.val]
    # the reference holds calibration's WDM scores, predict's rows its own pass's: equal to float32 precision
    assert np.allclose(got, ref.combined, rtol=1e-5, atol=1e-4)


def test_a_border_pad_run_queries_a_plain_index_with_the_plain_backbones_patches(tmp_path):
    """A run trained with ``border_pad`` feeds its source teacher the mirrored input, so that teacher's patches are
    not the plain backbone's near the border even when it is the same backbone and weights file: the kNN queries of
    an index over plain patches must then come from the plain backbone (as the index's patches did), not from the
    run's pass (``patches="source"``), else every border patch is far from the bank."""
    import torch
    from uninet_feat.backbones import create_backbone
    from uninet_feat.scorers import knn_setup
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "data", n_train=6, n_good=2, n_bad=2)
    weights, run, f, knn = tmp_path / "tiny.pt", tmp_path / "run", tmp_path / "plain", tmp_path / "knn"
    torch.save(create_backbone("tiny", weights="random").state_dict(), weights)
    train(load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": str(weights), "image_size": 64,
                                                       "epochs": 1, "batch_size": 2, "channels_last": False,
                                                       "val_fraction": 0.5, "border_pad": 16}), run, quiet=True)
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--image-size",
                 "64", "--patches", "--out", str(f), "--quiet"]) == 0
    assert main(["index", "--features", str(f), "--coreset", "1.0", "--out", str(knn)]) == 0
    samples = sorted((data / "test").rglob("*.png"))
    ex = Extractor(run=run)
    _, kex = knn_setup(knn, ex)
    got = (kex or ex).extract(samples)["patches"]
    plain = Extractor(backbone="tiny", weights=str(weights), image_size=64, patches=True).extract(samples)["patches"]
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)


def test_the_knn_map_of_a_padded_tile_is_cut_to_the_image_not_squeezed_onto_it():
    """A 64x50 image in one mirrored 80x80 tile: the padding's heat (rows 72-79) was stretched over the image's
    last rows, and tiles of another size than the WDM map's broke the combined map."""
    from uninet_feat.scorers import knn_map
    grid = np.zeros((10, 10), np.float32)
    grid[9] = 1.0   # hot only in the tile's last patch row: rows 72-79, past the image
    res = {"index": np.array([0]), "tile": np.array([[0, 0, 80, 80]]), "patch_grid": (10, 10)}
    m = knn_map(grid.reshape(1, -1), res, 0, size=(64, 50))
    assert m.shape == (64, 50) and m.max() < 0.05   # bilinear reach of row 9's heat ends near row 68
    assert np.array_equal(knn_map(grid.reshape(1, -1), res, 0, shape=(64, 50)), m)   # shape alone: the same
    wide = knn_map(grid.reshape(1, -1), res, 0, shape=(32, 25), size=(64, 50))   # cut first, then resized
    assert wide.shape == (32, 25) and wide.max() < 0.05
    two = {"index": np.array([0, 0]), "tile": np.array([[0, 0, 80, 80], [0, 80, 80, 80]]), "patch_grid": (10, 10)}
    assert knn_map(np.zeros((2, 100), np.float32), two, 0, shape=(64, 150)).shape == (64, 150)


def test_a_head_trained_before_a_calibrate_is_refused_by_predict(monkeypatch, tmp_path):
    """A head trained on a store, then `calibrate` (same model.pt): predict used it on features whose hot-region and
    score columns changed, since head.json recorded the model's sha256 and not the store's calibration keys."""
    import types
    from uninet_feat import workflows
    from uninet_feat.downstream import Head
    from uninet_feat.featstore import file_sha256
    from uninet_feat.scorers import check_built_from
    run = tmp_path / "run"
    run.mkdir()
    (run / "calibration.json").write_text('{"threshold": 1.0}')
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((24, 4)) + np.repeat([0.0, 3.0], 12)[:, None]).astype("f4")
    recs = [{"path": f"/d/{i}.png", "label": "good" if i < 12 else "hole", "is_normal": i < 12, "split": "test",
             "group": ""} for i in range(24)]

    class Store:
        manifest = {"vector_names": ["a", "b"], "source": {"run": str(run), "model_sha256": "m"},
                    "calibration_sha256": file_sha256(run / "calibration.json"),
                    "settings": {"image_size": 32, "tile": None}}

        def __init__(self, path):
            pass

        def image_table(self):
            return X, recs
    monkeypatch.setattr(workflows, "FeatureStore", Store)
    workflows.train_head_cmd("F", tmp_path / "h", task="binary", folds=2, threads=1)
    source = Head.load(tmp_path / "h").source
    ex = types.SimpleNamespace(run_dir=run, model=types.SimpleNamespace(cfg={}), source={"model_sha256": "m"},
                               cfg={"image_size": 32, "tile": None})
    check_built_from(source, tmp_path / "h" / "head.json", ex, "head")   # the calibration it was trained with
    (run / "calibration.json").write_text('{"threshold": 2.0}')           # `calibrate` again
    with pytest.raises(BadInputError, match="trained on features of .*model.pt made with another calibration") as e:
        check_built_from(source, tmp_path / "h" / "head.json", ex, "head")
    assert "train the head again on features extracted with this calibration" in e.value.fix
    older = {k: v for k, v in source.items() if k != "calibration_sha256"}   # a head from before: taken as it is
    check_built_from(older, tmp_path / "h" / "head.json", ex, "head")


def test_combined_scores_of_a_neighbours_run_pair_the_calibrations_own_validation_scores(tmp_path):
    """tile_norm: neighbours: calibration scores each validation normal without its own tiles among its nearest,
    but a run loaded from disk keeps no tile sources, so the combined score's reference, scoring them again, had
    each one's own tiles among its nearest: its WDM score fell (0.058 to 0.005 in the reviewer's run) and the
    combined threshold with it (4 of 16 new normals flagged, not 2). It takes calibration.json's scores; a
    calibration written before ``val_paths`` is scored again, as before."""
    from uninet_feat.scorers import knn_setup, reference
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "wide", n_train=8, n_good=2, n_bad=0, wide=True, seed=3)
    run = tmp_path / "nb"
    train(load_config(None, {"data": str(data), "tile": 64, "tile_norm": "neighbours"},
                      base={"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
                            "val_fraction": 0.4, "channels_last": False, "seed": 5}), run, quiet=True)
    assert main(["extract", "--run", str(run), "--data", str(data), "--patches", "--quiet",
                 "--out", str(tmp_path / "f")]) == 0
    assert main(["index", "--features", str(tmp_path / "f"), "--coreset", "1", "--out", str(tmp_path / "k")]) == 0
    ex = Extractor(run=run)
    scorer, kex = knn_setup(tmp_path / "k", ex)
    cal = json.loads((run / "calibration.json").read_text())
    ref = reference(run, ex.cfg, scorer, kex or ex, ex, paired=True)
    assert ref.n >= 2 and np.allclose(sorted(ref.wdm_paired), cal["val_scores"], rtol=1e-6)
    again = {k: v for k, v in cal.items() if k != "val_paths"}   # an older calibration.json
    (run / "calibration.json").write_text(json.dumps(again))
    old = reference(run, ex.cfg, scorer, kex or ex, ex, paired=True)
    assert old.n == ref.n and np.isfinite(old.wdm_paired).all()
    assert not np.allclose(sorted(old.wdm_paired), cal["val_scores"], rtol=1e-3)   # own tiles among the nearest
