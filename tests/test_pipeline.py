"""Train → checkpoint → evaluate on a tiny backbone: reproducibility, resume, tiling, supervision."""
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from uninet_feat.checkpoint import build_from_checkpoint, read_checkpoint
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.evaluate import evaluate
from uninet_feat.train import train

from _tiny import register_tiny, write_supervised_manifest, write_texture_set

register_tiny()
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 2, "batch_size": 4,
        "val_fraction": 0.2, "channels_last": False, "seed": 7}


def _cfg(data, **kw):
    return load_config(None, {"data": str(data), **kw}, base=BASE)


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    return write_texture_set(tmp_path_factory.mktemp("tex"))


@pytest.fixture(scope="module")
def trained(texture, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    train(_cfg(texture), run, quiet=True)
    return run


def test_run_folder_has_everything(trained):
    for name in ("config.yaml", "env.json", "model.pt", "checkpoint.pt", "train_log.jsonl", "calibration.json"):
        assert (trained / name).exists(), name
    log = [json.loads(l) for l in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    cal = json.loads((trained / "calibration.json").read_text())
    assert cal["n_val_normals"] == 2 and cal["threshold"] >= cal["quantiles"]["0.5"]


def test_overlay_colour_scale_comes_from_validation_normals(trained, texture):
    """Overlays are coloured from the validation normals' median pixel to their 0.999 quantile: a pixel is left
    as it was below `CLEAR_BELOW` of that scale and coloured well above it, whatever the map's own min..max.
    (It compared how much of a test normal each scale coloured: a 2-epoch model's map decided that, not the scale,
    and it failed at one thread.)"""
    from uninet_feat.checkpoint import build_from_checkpoint
    from uninet_feat.evaluate import score_samples
    from uninet_feat.overlay import CLEAR_BELOW, display_range, heatmap_overlay
    from uninet_feat.runs import load_samples
    cal = json.loads((trained / "calibration.json").read_text())
    lo, hi = cal["map_range"]
    assert lo < hi and display_range(trained) == (lo, hi)
    model, ck = build_from_checkpoint(trained / "model.pt")
    normal = [s for s in load_samples(ck["config"]) if s.split == "test" and s.is_normal][:1]
    m = score_samples(model, normal, ck["config"], keep_maps=True)["maps"][0]
    grey = np.full(m.shape + (3,), 128, np.uint8)
    for (a, b), kw in (((lo, hi), {"vmin": lo, "vmax": hi}), ((float(m.min()), float(m.max())), {})):
        t = (m - a) / (b - a)   # where each pixel sits on the scale the overlay is drawn with
        changed = (heatmap_overlay(grey, m, alpha=1.0, **kw) != 128).any(-1)
        assert not changed[t < CLEAR_BELOW].any() and changed[t > CLEAR_BELOW + 0.2].all(), kw
        assert (t > CLEAR_BELOW + 0.2).any()
    # no calibration: the map's median .. its largest value (from 0, every pixel of a WDM map was near the top)
    assert display_range(texture, [m]) == pytest.approx((float(np.median(m.astype(np.float64))), float(m.max())))


def test_evaluate_reports_pixel_metrics(trained, tmp_path):
    rep = evaluate(trained, json_path=tmp_path / "m.json", csv_path=tmp_path / "s.csv", quiet=True,
                   report_path=tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64" in html and f"{rep['image_auroc']:.4f}" in html
    assert "(the same colour scale for every image)" in html and "caller" not in html
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= rep[k] <= 1.0
    assert rep["n_test"] == 8 and rep["n_defect"] == 4
    assert json.loads((tmp_path / "m.json").read_text())["image_auroc"] == rep["image_auroc"]
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 9
    from uninet_feat import metrics   # the figure's spread over test sets like this one: 4 normals, 4 defects
    import csv
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    y, sc = np.array([int(r["is_defect"]) for r in rows]), np.array([float(r["score"]) for r in rows])
    assert rep["image_auroc_interval"] == metrics.interval(metrics.image_auroc_bootstrap(y, sc))
    lo, hi = rep["image_auroc_interval"]
    assert lo <= rep["image_auroc"] <= hi and "95 % interval" in html
    for k in ("pixel_auroc", "aupro"):   # images resampled, binned scores: near, not always around, a tiny set's figure
        lo, hi = rep[f"{k}_interval"]
        assert 0 <= lo <= hi <= 1 and lo - 0.01 <= rep[k] <= hi + 0.01


def test_pixel_map_choice_changes_maps_not_scores(trained, tmp_path):
    """`--pixel-map raw` (official) vs the default smoothed map: identical image scores, different pixel maps."""
    smooth = evaluate(trained, quiet=True, csv_path=tmp_path / "a.csv")
    raw = evaluate(trained, quiet=True, csv_path=tmp_path / "b.csv", overrides={"pixel_map": "raw"})
    import csv
    scores = lambda p: [{k: v for k, v in r.items() if k != "pixel_auroc"}   # noqa: E731 (each map's own AUROC)
                        for r in csv.DictReader(open(p))]
    assert scores(tmp_path / "a.csv") == scores(tmp_path / "b.csv")
    assert smooth["image_auroc"] == raw["image_auroc"] and smooth["pixel_auroc"] != raw["pixel_auroc"]
    from uninet_feat.checkpoint import build_from_checkpoint
    m, _ = build_from_checkpoint(trained / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    p_s, s_s = m.eval().predict(x)
    m.cfg["pixel_map"] = "raw"
    p_r, s_r = m.predict(x)
    assert torch.equal(s_s, s_r) and p_s.std() < p_r.std()


def test_same_seed_same_scores(texture, trained, tmp_path):
    run2 = tmp_path / "r2"
    train(_cfg(texture), run2, quiet=True)
    a = evaluate(trained, quiet=True)["_rows"]
    b = evaluate(run2, quiet=True)["_rows"]
    assert [r["score"] for r in a] == [r["score"] for r in b]


def test_resume_matches_uninterrupted(texture, trained, tmp_path):
    run = tmp_path / "killed"
    train(_cfg(texture, epochs=1), run, quiet=True)
    (run / "model.pt").unlink()  # as if killed after epoch 1's checkpoint
    train(_cfg(texture, epochs=2), run, resume=True, quiet=True)
    a = read_checkpoint(trained / "model.pt")["state_dict"]
    b = read_checkpoint(run / "model.pt")["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert read_checkpoint(run / "model.pt")["config"] == read_checkpoint(trained / "model.pt")["config"]


def test_resuming_a_finished_run_leaves_its_model_untouched(texture, trained, tmp_path):
    """A pipeline that retries `train --resume` must not rewrite model.pt: indices and heads name its sha256."""
    import shutil

    from uninet_feat.featstore import file_sha256
    run = tmp_path / "done"
    shutil.copytree(trained, run)
    before = {p.name: (p.stat().st_mtime_ns, file_sha256(p)) for p in run.iterdir() if p.is_file()}
    with pytest.warns(UserWarning, match="nothing to do, model.pt is left as it is"):
        assert train(_cfg(texture), run, resume=True, quiet=True) == run / "model.pt"
    assert {p.name: (p.stat().st_mtime_ns, file_sha256(p)) for p in run.iterdir() if p.is_file()} == before
    (run / "calibration.json").unlink()         # killed before calibrating: resume calibrates again
    train(_cfg(texture), run, resume=True, quiet=True)
    assert file_sha256(run / "model.pt") == before["model.pt"][1]
    assert json.loads((run / "calibration.json").read_text()) == json.loads((trained / "calibration.json").read_text())
    (run / "calibration.json").write_text("{not json")   # damaged: calibrated again, not a JSON traceback
    train(_cfg(texture), run, resume=True, quiet=True)
    assert json.loads((run / "calibration.json").read_text()) == json.loads((trained / "calibration.json").read_text())


def test_a_finished_run_recalibrated_by_resume_is_left_as_it_is_by_every_later_resume(trained, tmp_path):
    """`train --resume --map-levels X` of a finished run rewrites model.pt (a new calibration) but trains no epoch,
    so checkpoint.pt keeps the old value: later plain resumes compared with it and rewrote model.pt each time (a
    new sha256: indexes and heads built on it refused). A run older than map_levels did so on every resume."""
    import shutil

    from uninet_feat.cli import main
    from uninet_feat.featstore import file_sha256
    run, old = tmp_path / "r", tmp_path / "old"
    shutil.copytree(trained, run)
    shutil.copytree(trained, old)
    assert main(["train", "--out", str(run), "--resume", "--map-levels", "2,3", "--quiet"]) == 0
    assert read_checkpoint(run / "model.pt")["config"]["map_levels"] == "2,3"
    sha = file_sha256(run / "model.pt")
    for _ in range(2):
        with pytest.warns(UserWarning, match="nothing to do"):
            assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert file_sha256(run / "model.pt") == sha
    for name in ("checkpoint.pt", "model.pt"):   # saved before map_levels / map_norm existed
        ck = torch.load(old / name, weights_only=True)
        ck["config"] = {k: v for k, v in ck["config"].items() if k not in ("map_levels", "map_norm")}
        torch.save(ck, old / name)
    sha = file_sha256(old / "model.pt")
    main(["train", "--out", str(old), "--resume", "--quiet"])   # calibrates (calibration.json named the old bytes)
    with pytest.warns(UserWarning, match="nothing to do"):
        assert main(["train", "--out", str(old), "--resume", "--quiet"]) == 0
    assert file_sha256(old / "model.pt") == sha


def test_a_model_file_copied_in_as_checkpoint_pt_is_named_not_a_key_error(texture, trained, tmp_path):
    """model.pt, best.pt or a kept epoch copied in as checkpoint.pt has no optimiser states (a KeyError after the
    model was built); weights that do not fit the config's model were a torch traceback."""
    import shutil
    run = tmp_path / "r"
    run.mkdir()
    shutil.copyfile(trained / "model.pt", run / "checkpoint.pt")
    with pytest.raises(BadInputError, match="a model file, not a resumable checkpoint: it lacks opt_student, "
                                            "opt_target") as e:
        train(_cfg(texture), run, resume=True, quiet=True)
    assert e.value.path == str(run / "checkpoint.pt") and "checkpoint.pt" in e.value.fix
    shutil.rmtree(run)
    shutil.copytree(trained, run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["state_dict"].pop(next(k for k in ck["state_dict"] if k.startswith("student.")))
    ck["epoch"] = 1   # not finished: the model is built
    torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(BadInputError, match=r"checkpoint.pt does not match the model its own config builds \("
                                            r".*Missing key"):
        train(_cfg(texture), run, resume=True, quiet=True)


def test_an_edited_config_yaml_is_refused_on_resume_not_silently_written_over(texture, trained, tmp_path):
    """A resume trains on checkpoint.pt's options (only the resumable keys come from the command), so an edit of
    RUN/config.yaml was ignored and then written over; now it is refused naming both files, the edit kept.
    The resumable keys (epochs here) may differ."""
    import shutil

    import yaml
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    (run / "model.pt").unlink()   # as if killed after the last checkpoint
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edited = yaml.safe_dump({**cfg, "lr": 0.5, "batch_size": 2, "epochs": 3})
    (run / "config.yaml").write_text(edited)
    with pytest.raises(BadInputError, match=r"batch_size, lr in config.yaml differ from the run's checkpoint.pt "
                                            r"\(batch_size=4, lr=0.005\)") as e:
        train(_cfg(texture), run, resume=True, quiet=True)
    assert e.value.path == str(run / "config.yaml") and (run / "config.yaml").read_text() == edited
    assert "or checkpoint.pt is another run's" in str(e.value) and "checkpoint.pt back" in str(e.value)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "epochs": 3}))
    train(_cfg(texture), run, resume=True, quiet=True)
    assert read_checkpoint(run / "model.pt")["epoch"] == 2



def test_a_library_resume_with_settings_it_cannot_change_is_refused_as_the_cli_refuses_them(texture, trained,
                                                                                            tmp_path, monkeypatch,
                                                                                            capsys):
    """`train(cfg, out, resume=True)` trains on checkpoint.pt's options and took only the resumable keys from
    ``cfg``: a library caller's other backbone, image_size or width was silently dropped (the old run trained on).
    Now refused by the check `train --resume` uses too (one code path), naming the keys, both values and the fix,
    before anything is written; the run's own config, with resumable keys changed and the data spelled relative,
    resumes. A run without config.yaml (resumed from checkpoint.pt's resolved student_relu) too."""
    import shutil

    from uninet_feat.cli import main
    from uninet_feat.featstore import file_sha256
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    (run / "model.pt").unlink()   # as if killed after the last checkpoint
    before = {p.name: file_sha256(p) for p in run.iterdir() if p.is_file()}
    for change, said in (({"image_size": 128}, "image_size cannot change when a run is resumed (it was trained with "
                                               "image_size=64; asked: image_size=128)"),
                         ({"width": 0.5}, "width=1.0; asked: width=0.5"),
                         ({"backbone": "resnet18"}, "backbone='tiny'; asked: backbone='resnet18'"),
                         ({"levels": [0, 1, 2], "decoder_depths": [1, 1, 1]}, "decoder_depths, levels cannot change"),
                         ({"select": "synthetic"}, "select='last'; asked: select='synthetic'")):
        with pytest.raises(BadInputError, match=re.escape(said)) as e:
            train(_cfg(texture, **change), run, resume=True, quiet=True)
        assert e.value.path == str(run / "checkpoint.pt") and "load_config(" in e.value.fix, change
        assert {p.name: file_sha256(p) for p in run.iterdir() if p.is_file()} == before, change
    assert main(["train", "--out", str(run), "--resume", "--image-size", "128", "--quiet"]) == 2   # the same words
    assert "image_size cannot change when a run is resumed (it was trained with image_size=64" in capsys.readouterr().err
    monkeypatch.chdir(texture.parent)
    resumed = train(load_config(run / "config.yaml", {"data": texture.name, "device": "cpu"}), run, resume=True,
                    quiet=True)
    assert read_checkpoint(resumed)["epoch"] == 2
    (run / "model.pt").unlink()
    (run / "config.yaml").unlink()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0 and (run / "model.pt").is_file()


def test_a_run_from_before_mean_and_std_resumed_with_them_is_refused(texture, trained, tmp_path):
    """A run saved before `mean`/`std` were config keys has none in its config: the comparison of resume settings
    passes over keys an older run lacks, so `--mean` on its resume was dropped silently (it trained on with the
    backbone's normalisation). Such a run had the backbone's own (None), and is compared so; without them it resumes."""
    import shutil

    import yaml
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    (run / "model.pt").unlink()
    state = read_checkpoint(run / "checkpoint.pt")
    for k in ("mean", "std"):
        state["config"].pop(k, None)
    torch.save(state, run / "checkpoint.pt")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in saved.items() if k not in ("mean", "std")}))
    with pytest.raises(BadInputError, match=r"mean, std cannot change when a run is resumed \(it was trained with "
                                            r"mean=None, std=None"):
        train(_cfg(texture, mean=[0.5] * 3, std=[0.5] * 3), run, resume=True, quiet=True)
    assert read_checkpoint(train(_cfg(texture), run, resume=True, quiet=True))["epoch"] == 2

def test_refuses_to_overwrite_a_run(texture, trained):
    with pytest.raises(BadInputError, match="already holds a run"):
        train(_cfg(texture), trained, quiet=True)


def test_checkpoint_round_trip(trained):
    m1, _ = build_from_checkpoint(trained / "model.pt")
    m2, _ = build_from_checkpoint(trained / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    p1, s1 = m1.eval().predict(x)
    p2, s2 = m2.eval().predict(x)
    assert torch.equal(p1, p2) and torch.equal(s1, s2)
    assert torch.load(trained / "model.pt", weights_only=True)["format"] == "uninet-feat/checkpoint"


def test_a_checkpoint_with_nan_weights_is_refused_by_name(trained, tmp_path):
    """NaN weights gave NaN scores, and NaN is never above a threshold: predict passed every image as good."""
    ckpt = read_checkpoint(trained / "model.pt")
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and "student" in k)
    ckpt["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(BadInputError, match=f"NaN or infinite weights in 1 tensor.*{key}"):
        build_from_checkpoint(tmp_path / "model.pt")


def test_checkpoint_keeps_the_resolved_student_ends(trained, tmp_path):
    """The resolved `student_relu` travels in the checkpoint (not re-probed); older checkpoints, written
    before the option existed, always ended in a ReLU and still load that way."""
    payload = torch.load(trained / "model.pt", weights_only=True)
    assert payload["student_relu"] == [True, True, True]          # TinyBackbone is post-ReLU
    payload["student_relu"] = [True, False, True]
    torch.save(payload, tmp_path / "m.pt")
    m, _ = build_from_checkpoint(tmp_path / "m.pt")
    assert m.cfg["student_relu"] == (True, False, True)
    assert isinstance(m.student.stages[1][-1].act, torch.nn.Identity)   # stages run coarse → fine
    del payload["student_relu"]
    torch.save(payload, tmp_path / "legacy.pt")
    assert build_from_checkpoint(tmp_path / "legacy.pt")[0].cfg["student_relu"] == (True, True, True)


class Evil:
    """Any non-tensor Python object forces a pickle-based checkpoint."""


def test_pickle_checkpoint_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "uninet-feat/checkpoint", "obj": Evil()}, p, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(BadInputError, match="pickle"):
        read_checkpoint(p)
    q = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, q)
    with pytest.raises(BadInputError, match="not a uninet-feat checkpoint"):
        read_checkpoint(q)
    r = tmp_path / "trunc.pt"
    r.write_bytes((tmp_path / "plain.pt").read_bytes()[:50])
    noise, text = tmp_path / "noise.bin", tmp_path / "notes.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    text.write_text("not a model\n")
    for f in (r, noise, text):   # torch.load calls any of these "pickle"; they are not checkpoints at all
        with pytest.raises(BadInputError, match="not a torch checkpoint: not in torch's zip format") as e:
            read_checkpoint(f)
        assert "pickle" not in str(e.value).replace(str(tmp_path), "")


def test_predict_scores_tiles_by_the_runs_tile_score_rule(tmp_path):
    """A run with ``tile_score: mean``: predict gives each image the score calibration gave it (it took the highest
    tile, so the validation normals that set the threshold scored higher than their threshold meant); other words
    are refused (any other word meant the mean)."""
    from uninet_feat.predict import predict_cmd
    data = write_texture_set(tmp_path / "wide", n_train=6, n_good=1, n_bad=1, wide=True)
    run = tmp_path / "mean"
    train(_cfg(data, tile=64, tile_score="mean", epochs=1, val_fraction=0.4), run, quiet=True)
    cal = json.loads((run / "calibration.json").read_text())
    res = predict_cmd(run, data / "train" / "good", tmp_path / "p", overlays=False, quiet=True)
    got = {r["path"]: r["wdm_score"] for r in res["rows"]}
    assert len(cal["val_paths"]) >= 2
    for p, s in zip(cal["val_paths"], cal["val_scores"]):
        assert got[p] == pytest.approx(s, rel=1e-5)
    # a feature store's image table (the cluster sheet's scores) reduces the tiles as predict does (it took the max)
    from uninet_feat.extract import Extractor
    store = Extractor(run=run).extract_to(sorted((data / "train" / "good").glob("*.png")), tmp_path / "f")
    tiles = np.asarray(store.scores).reshape(len(got), -1)
    assert (tiles.max(1) - tiles.mean(1) > 1e-4).all()   # the two rules differ here
    for rec in store.image_table()[1]:
        assert rec["score"] == pytest.approx(got[rec["path"]], rel=1e-4)
    with pytest.raises(BadInputError, match="tile_score must be one of max, mean, got 'maximum'"):
        _cfg(data, tile=64, tile_score="maximum")
    from uninet_feat.data.tiling import tile_score_reducer   # a run saved before the check keeps its mean
    with pytest.warns(UserWarning, match="when any other word meant the mean"):
        assert tile_score_reducer("average") is np.mean


def test_tiled_training_and_stitched_scores(tmp_path):
    data = write_texture_set(tmp_path / "wide", n_train=4, n_good=2, n_bad=2, wide=True)
    run = tmp_path / "tiled"
    train(_cfg(data, tile=64, epochs=1), run, quiet=True)
    rep = evaluate(run, quiet=True)
    assert rep["n_test"] == 4 and len(rep["_rows"]) == 4
    from uninet_feat.evaluate import score_samples
    model, ckpt = build_from_checkpoint(run / "model.pt")
    from uninet_feat.runs import load_samples
    test = [s for s in load_samples(ckpt["config"]) if s.split == "test"]
    res = score_samples(model, test, ckpt["config"], keep_maps=True)
    assert res["maps"][0].shape == (64, 192)  # three 64-px tiles stitched back to full size
    # masks exist, so tiled evaluation reports pixel metrics on the stitched full-size maps against the
    # full-size masks read from their files (one extra image of another size: lists, not a stack)
    import numpy as np
    from PIL import Image
    from uninet_feat import metrics
    from uninet_feat.data import load_mask
    img = np.asarray(Image.open(data / "test/spot/000.png"))[:, :128].copy()
    m = np.zeros(img.shape, np.uint8)
    m[20:30, 70:90] = 255
    img[20:30, 70:90] = 255
    Image.fromarray(img).save(data / "test/spot/narrow.png")
    Image.fromarray(m).save(data / "ground_truth/spot/narrow_mask.png")
    rep = evaluate(run, quiet=True)
    test = [s for s in load_samples(ckpt["config"]) if s.split == "test"]
    streamed = []
    res = score_samples(model, test, ckpt["config"], on_map=lambda s, a, k: streamed.append((s.path, a, k)))
    assert res["maps"] is None and len(streamed) == len(test) == 5
    full = score_samples(model, test, ckpt["config"], keep_maps=True)
    for (p, a, k), s, a2, k2 in zip(streamed, full["samples"], full["maps"], full["masks"]):
        assert p == s.path and np.array_equal(a, a2) and np.array_equal(k, k2) and a.shape == k.shape
        want = load_mask(s.mask, size=a.shape, image_path=s.path) if s.mask else np.zeros(a.shape, bool)
        assert np.array_equal(k, want)
    assert {a.shape for _, a, _ in streamed} == {(64, 192), (64, 128)}
    assert rep["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(full["masks"], full["maps"]))
    assert rep["aupro"] == pytest.approx(metrics.aupro(full["masks"], full["maps"]))


def test_supervised_training_uses_masks(tmp_path):
    data = write_texture_set(tmp_path / "sup", n_train=6, n_good=2, n_bad=6)
    write_supervised_manifest(data)   # 4 defects (with masks) in the training split
    run = tmp_path / "sup_run"
    train(_cfg(data, split_csv=str(data / "m.csv"), supervised=True, epochs=1, val_fraction=0.0), run, quiet=True)
    log = json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
    assert log["margin_abnormal"] >= 0 and np.isfinite(log["loss"])
    assert "margin_abnormal" in log


def _relabelled_manifest(texture, path, label_of):
    """A CSV manifest of the texture set whose i-th defect gets ``label_of(i) = (label, with_mask)``."""
    rows = ["path,split,label,mask"] + [f"{p.relative_to(texture)},train,good," for p in
                                        sorted((texture / "train" / "good").glob("*.png"))]
    rows += [f"{p.relative_to(texture)},test,good," for p in sorted((texture / "test" / "good").glob("*.png"))]
    for i, p in enumerate(sorted((texture / "test" / "spot").glob("*.png"))):
        label, with_mask = label_of(i)
        mask = (texture / "ground_truth" / "spot" / f"{p.stem}_mask.png").relative_to(texture) if with_mask else ""
        rows.append(f"{p.relative_to(texture)},test,{label},{mask}")
    path.write_text("\n".join(rows) + "\n")


def test_evaluate_breaks_metrics_down_per_defect_label(trained, texture, tmp_path, capsys):
    """Two defect labels in a manifest: each is scored against all test normals, the image AUROC per
    label equals the one recomputed from the score CSV, and the labels' defect-pixel shares sum to 1."""
    from uninet_feat import metrics
    _relabelled_manifest(texture, tmp_path / "split.csv", lambda i: ("crack" if i < 2 else "hole", True))
    rep = evaluate(trained, data=str(texture), split_csv=str(tmp_path / "split.csv"), quiet=True,
                   csv_path=tmp_path / "s.csv", report_path=tmp_path / "r.html")
    per = rep["per_label"]
    html = (tmp_path / "r.html").read_text()
    assert "Per defect label" in html and f"{per['hole']['pixel_auroc']:.4f}" in html
    assert sorted(per) == ["crack", "hole"] and per["crack"]["n"] == per["hole"]["n"] == 2
    assert abs(per["crack"]["defect_pixel_share"] + per["hole"]["defect_pixel_share"] - 1) < 1e-9
    from uninet_feat.evaluate import print_report
    capsys.readouterr()
    print_report(rep)   # the console table: each label's share of the defect pixels and within-image AUROC
    out = capsys.readouterr().out
    assert "defect px" in out and "within image" in out
    for name in ("crack", "hole"):
        row = next(line for line in out.splitlines() if f"label {name}" in line)
        assert f"{per[name]['defect_pixel_share']:.2f}" in row and f"{per[name]['within_image_auroc']:.4f}" in row
    import csv
    got = list(csv.DictReader(open(tmp_path / "s.csv")))
    own = [float(r["pixel_auroc"]) for r in got if r["pixel_auroc"]]   # each defective image's own pixel AUROC
    assert len(own) == rep["within_image_n"] >= 1 and all(r["pixel_auroc"] == "" for r in got if r["label"] == "good")
    assert np.mean(own) == pytest.approx(rep["within_image_auroc"], abs=1e-5)
    assert "Defects the heatmap misses" in html
    for name in ("crack", "hole"):
        sub = [r for r in got if r["label"] in ("good", name)]
        y = np.array([int(r["is_defect"]) for r in sub])
        assert per[name]["image_auroc"] == metrics.image_auroc(y, np.array([float(r["score"]) for r in sub]))
        assert 0 <= per[name]["pixel_auroc"] <= 1 and 0 <= per[name]["aupro"] <= 1


def test_defect_images_without_masks_stay_out_of_pixel_metrics(trained, texture, tmp_path):
    """Two defect labels, one without masks: its images are not counted as all-normal pixels, so the
    pooled P-AUROC / AUPRO equal those of the normals plus the masked label alone (they were lower)."""
    _relabelled_manifest(texture, tmp_path / "split.csv", lambda i: ("hole", True) if i < 2 else ("stain", False))
    with pytest.warns(UserWarning, match="2 defect image.*no mask"):
        rep = evaluate(trained, data=str(texture), split_csv=str(tmp_path / "split.csv"), quiet=True)
    assert rep["pixel_metrics_without"] == 2
    assert rep["pixel_auroc"] == pytest.approx(rep["per_label"]["hole"]["pixel_auroc"])
    assert rep["aupro"] == pytest.approx(rep["per_label"]["hole"]["aupro"])
    assert "pixel_auroc" not in rep["per_label"]["stain"]   # no masked defect pixels: no pixel metrics


def test_per_label_takes_lists_or_arrays():
    """`evaluate` passes lists of maps/masks, the benchmarks pass stacked arrays: same breakdown."""
    from types import SimpleNamespace
    from uninet_feat.evaluate import per_label_metrics
    rng = np.random.default_rng(0)
    test = [SimpleNamespace(label=l, is_normal=l == "good", group="") for l in ["good"] * 4 + ["a"] * 3 + ["b"] * 3]
    labels = np.array([0 if s.is_normal else 1 for s in test])
    masks = np.zeros((10, 16, 16), bool)
    masks[4:7, 2:6, 2:6] = True
    masks[7:, :, 8:] = True
    maps = rng.random((10, 16, 16)) + masks * rng.random((10, 1, 1))
    scores = maps.reshape(10, -1).max(1)
    a = per_label_metrics(test, labels, scores, {"maps": maps, "masks": masks}, True, ["a", "b"])
    b = per_label_metrics(test, labels, scores, {"maps": list(maps), "masks": list(masks)}, True, ["a", "b"])
    assert a == b
    assert a["a"]["defect_pixel_share"] == 48 / (48 + 384) and a["b"]["n"] == 3


def test_per_label_compares_a_label_with_the_normals_of_its_own_groups():
    """Group A's normals score high, group B's low; label x occurs in B only: its AUROC is against B's normals
    (0.5 here, scores tied with them), not A's (which would make it look perfect the other way round). A label
    whose group has no test normal gets no image metrics, and the evaluate-level mean says which groups it
    covers."""
    from types import SimpleNamespace
    from uninet_feat.evaluate import group_metrics, per_label_metrics
    groups = ["A"] * 4 + ["B"] * 4 + ["B"] * 2 + ["C"] * 2
    kinds = ["good"] * 8 + ["x"] * 2 + ["y"] * 2
    test = [SimpleNamespace(label=k, is_normal=k == "good", group=g) for k, g in zip(kinds, groups)]
    labels = np.array([0 if s.is_normal else 1 for s in test])
    scores = np.array([9.0] * 4 + [1.0, 2.0, 3.0, 4.0] + [2.5, 2.5] + [5.0, 6.0])
    with pytest.warns(UserWarning, match="group C's test set has only defective images"):
        g = group_metrics(groups, labels, scores, {}, False)
    assert g["mean_image_auroc_groups"] == ["B"] and g["mean_image_auroc"] == 0.5 and g["per_group"]["C"] == {}
    per = per_label_metrics(test, labels, scores, {}, False, ["x", "y"])
    assert per["x"]["image_auroc"] == 0.5 and per["x"]["n"] == 2
    assert "image_auroc" not in per["y"]


def test_a_test_set_of_defective_images_only_keeps_its_pixel_metrics():
    """No normal image, so no image AUROC; but the defective images' own normal pixels make P-AUROC, AUPRO and the
    within-image AUROC defined (`evaluate --group G` on a group whose test images are all defective): they are
    reported."""
    from uninet_feat import metrics
    from uninet_feat.evaluate import _metrics
    rng = np.random.default_rng(0)
    masks = [np.zeros((16, 16), bool) for _ in range(4)]
    for k, m in enumerate(masks):
        m[k:k + 5, 2 * k:2 * k + 4] = True
    maps = [(rng.random((16, 16)) + 0.6 * m).astype(np.float32) for m in masks]
    labels, scores = np.ones(4, int), np.array([m.max() for m in maps])
    with pytest.warns(UserWarning, match="only defective images; its image metrics are skipped"):
        out = _metrics(labels, scores, {"maps": maps, "masks": masks}, True)
    assert "image_auroc" not in out and "f1_max" not in out
    assert out["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps))
    assert out["aupro"] == pytest.approx(metrics.aupro(masks, maps))
    assert 0.7 < out["pixel_auroc"] < 1 and out["within_image_n"] == 4
    lo, hi = out["pixel_auroc_interval"]
    assert lo <= out["pixel_auroc"] <= hi


def test_grad_checkpointing_trains_the_same_model(texture, tmp_path):
    """`--grad-checkpointing` recomputes the target teacher (timm) and the student in backward: the run's
    weights and BN running statistics equal a run without it; without restoring the statistics after
    backward they would not (the recomputed forward updates them a second time)."""
    from uninet_feat.backbones import create_backbone
    from uninet_feat.model import UniNet
    kw = dict(backbone="tf_efficientnet_lite0", weights="random", epochs=1, image_size=64)
    a = build_from_checkpoint(train(_cfg(texture, **kw), tmp_path / "a", quiet=True))[0].state_dict()
    b = build_from_checkpoint(train(_cfg(texture, grad_checkpointing=True, **kw), tmp_path / "b",
                                    quiet=True))[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(0)
    m = UniNet(create_backbone("tf_efficientnet_lite0", weights="random")).train()
    assert m.set_grad_checkpointing(True) == ["target", "bottleneck", "student"]
    x = torch.randn(2, 3, 64, 64)
    loss = m.loss(m(x))["loss"]
    after_forward = m.running_stats()
    loss.backward()
    moved = [k for k, v in m.running_stats().items() if "running_mean" in k and not torch.equal(v, after_forward[k])]
    assert {k.split(".")[0] for k in moved} >= {"target", "bottleneck", "student"}
    m.load_running_stats(after_forward)
    assert all(torch.equal(v, after_forward[k]) for k, v in m.running_stats().items())
    loss = m.loss(m(x))["loss"]
    after_forward = m.running_stats()
    with m.backward_guard():   # what train() does
        loss.backward()
    assert all(torch.equal(v, after_forward[k]) for k, v in m.running_stats().items())


def test_operating_point_flags_from_validation_normals(trained, texture, tmp_path):
    """`--max-fpr` picks the threshold on the run's validation-normal scores (kept in calibration.json);
    `--threshold` is taken as given; evaluate's flags and recall follow the chosen threshold."""
    from uninet_feat.cli import main
    cal = json.loads((trained / "calibration.json").read_text())
    assert len(cal["val_scores"]) == cal["n_val_normals"]
    rep = evaluate(trained, quiet=True, overrides={"max_fpr": 0.0}, csv_path=tmp_path / "s.csv")
    assert rep["threshold"] == max(cal["val_scores"]) and "--max-fpr" in rep["threshold_rule"]
    rows = rep["_rows"]
    assert [r["flagged"] for r in rows] == [float(r["score"]) > rep["threshold"] for r in rows]
    low = evaluate(trained, quiet=True, overrides={"threshold": -1e9})
    assert low["at_threshold"]["recall_defect"] == 1.0 and low["at_threshold"]["false_positive_rate"] == 1.0
    assert main(["predict", "--run", str(trained), "--data", str(texture), "--out",
                 str(tmp_path / "p"), "--threshold=-1e9", "--no-overlays", "--quiet"]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["threshold"] == -1e9 and summary["n_flagged"] == summary["n_images"] > 0


def test_predict_overlays_one_per_flagged_image_named_by_folder(trained, texture, tmp_path, monkeypatch):
    """Every flagged image gets its own overlay (test/good/000.png and test/spot/000.png share a name),
    linked from its row; with the run's calibration the colours are its range, without it each map's median..max."""
    import csv
    import shutil
    from PIL import Image
    from uninet_feat import overlay
    from uninet_feat.predict import predict_cmd
    res = predict_cmd(trained, texture, tmp_path / "p", threshold=-1e9, quiet=True)
    files = sorted((tmp_path / "p" / "overlays").iterdir())
    assert len(files) == res["n_images"] == res["n_flagged"] > 0
    assert {"test__good__000_overlay.png", "test__spot__000_overlay.png"} <= {f.name for f in files}
    on_disk = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert sorted(r["overlay"] for r in on_disk) == sorted(str(f) for f in files)
    for r in on_disk:
        assert Image.open(r["overlay"]).size[0] >= 64 and Path(r["overlay"]).stem.endswith(Path(r["path"]).stem + "_overlay")
    # colours: calibration range when present (streamed), the maps' 0..max when the run has none
    seen = []
    real = overlay.heatmap_overlay
    monkeypatch.setattr(overlay, "heatmap_overlay", lambda *a, **k: seen.append((k["vmin"], k["vmax"])) or real(*a, **k))
    predict_cmd(trained, texture / "test", tmp_path / "q", threshold=-1e9, quiet=True)
    assert set(seen) == {tuple(json.loads((trained / "calibration.json").read_text())["map_range"])}
    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    (bare / "calibration.json").unlink()
    seen.clear()
    with pytest.warns(UserWarning, match="no validation-normal map range"):
        predict_cmd(bare, texture / "test", tmp_path / "r", threshold=-1e9, quiet=True)
    # without it each overlay on its own map's median .. max (0 .. the flagged maps' max until session 53)
    assert len(seen) == len(list((tmp_path / "r/overlays").iterdir())) == len(set(seen))
    assert all(0 < lo < hi for lo, hi in seen)


def test_predict_save_maps_writes_each_images_map_and_mask_at_its_own_size(trained, texture, tmp_path):
    """--save-maps: every image's map at its own size (float16; a 96x80 copy too), equal to evaluate's map; its
    mask is the map above the validation normals' 0.999 pixel quantile (or --pixel-threshold); a re-run without
    the flag leaves no stale maps; --pixel-threshold alone is refused."""
    import csv
    import shutil
    from PIL import Image
    from uninet_feat.evaluate import score_samples
    from uninet_feat.calibration import load_run
    from uninet_feat.predict import predict_cmd
    from uninet_feat.runs import samples_of
    data = tmp_path / "d"
    shutil.copytree(texture / "test", data / "test")
    Image.open(data / "test/spot/000.png").resize((80, 96)).save(data / "test/spot/odd.png")
    res = predict_cmd(trained, data, tmp_path / "p", save_maps=True, overlays=False, quiet=True)
    cal = json.loads((trained / "calibration.json").read_text())
    assert res["pixel_threshold"] == cal["map_range"][1] and "0.999 quantile" in res["pixel_threshold_rule"]
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p" / "predictions.csv"))}
    assert len(rows) == res["n_images"] == len(list((tmp_path / "p" / "maps").glob("*.npy"))) == 9
    model, _, cfg = load_run(trained)
    want = {str(s.path): m for s, m in zip(*(lambda r: (r["samples"], r["maps"]))(
        score_samples(model, samples_of(str(data), None), cfg)))}
    for path, r in rows.items():
        m, mask = np.load(r["map"]), np.asarray(Image.open(r["defect_mask"])) > 0
        assert m.dtype == np.float16 and m.shape == mask.shape == np.asarray(Image.open(path)).shape[:2]
        t, m32 = np.float32(res["pixel_threshold"]), m.astype(np.float32)   # the mask is the float32 map's: the
        off = mask != (m32 > t)   # saved float16 values differ from it only where their rounding crosses t
        assert np.all(np.abs(m32[off] - t) <= 1e-3 * max(1.0, abs(float(t)))) and off.mean() < 0.01
        assert float(r["defect_fraction"]) == pytest.approx(mask.mean(), abs=1e-3)
        if want[path].shape == m.shape:   # 64x64 images: the model's own map, as evaluate scores it
            np.testing.assert_allclose(m.astype(np.float32), want[path], rtol=2e-3, atol=1e-3)
    assert rows[str(data / "test/spot/odd.png")]["map"].endswith("test__spot__odd.npy")
    low = predict_cmd(trained, data, tmp_path / "p", save_maps=True, pixel_threshold=-1e9, overlays=False, quiet=True)
    assert all(r["defect_fraction"] == 1.0 for r in low["rows"]) and low["pixel_threshold_rule"].startswith("given")
    predict_cmd(trained, data, tmp_path / "p", overlays=False, quiet=True)
    assert not list((tmp_path / "p" / "maps").iterdir())
    with pytest.raises(BadInputError, match="--pixel-threshold sets the defect masks of --save-maps"):
        predict_cmd(trained, data, tmp_path / "q", pixel_threshold=1.0, quiet=True)
    batch = tmp_path / "batch"   # a plain batch folder with --out inside it: a re-run does not score the
    shutil.copytree(data / "test" / "spot", batch)   # overlays and maps the first run wrote there
    for _ in range(2):
        again = predict_cmd(trained, batch, batch / "out", save_maps=True, threshold=-1e9, quiet=True)
        assert again["n_images"] == 5 and not any("/out/" in r["path"] for r in again["rows"])


def test_calibrate_rewrites_the_same_calibration(trained, tmp_path):
    """`uninet-feat calibrate` re-scores the same seeded validation split: an older calibration.json
    without `val_scores` comes back identical to the one training wrote."""
    import shutil
    from uninet_feat.cli import main
    run = tmp_path / "r"
    shutil.copytree(trained, run)
    before = json.loads((run / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({k: v for k, v in before.items() if k != "val_scores"}))
    assert main(["calibrate", "--run", str(run), "--quiet"]) == 0
    after = json.loads((run / "calibration.json").read_text())
    assert after["val_scores"] == pytest.approx(before["val_scores"], rel=1e-5)
    assert after["threshold"] == pytest.approx(before["threshold"], rel=1e-5)


def test_a_run_without_validation_normals_says_that_it_flags_nothing(texture, tmp_path):
    """val_fraction 0 leaves no threshold: train says so, and predict / evaluate leave the flag empty with a
    warning naming the fix, instead of a column of False that reads as "every part is good"."""
    import csv

    from uninet_feat.predict import predict_cmd
    run = tmp_path / "r"
    with pytest.warns(UserWarning, match="no validation normals: the run will have no threshold"):
        train(_cfg(texture, epochs=1, val_fraction=0.0), run, quiet=True)
    with pytest.warns(UserWarning, match=r"no threshold, so no image is flagged .*--threshold VALUE"):
        rep = predict_cmd(run, str(texture / "test"), tmp_path / "p", quiet=True)
    assert rep["n_flagged"] is None and {r["flagged"] for r in rep["rows"]} == {None}
    with open(tmp_path / "p" / "predictions.csv") as f:
        assert {r["flagged"] for r in csv.DictReader(f)} == {""}
    given = predict_cmd(run, str(texture / "test"), tmp_path / "q", quiet=True, threshold=-1.0)
    assert given["n_flagged"] == len(given["rows"]) > 0     # a given threshold flags as usual
    with pytest.warns(UserWarning, match="no threshold"):
        ev = evaluate(run, quiet=True, csv_path=tmp_path / "s.csv")
    assert ev["threshold"] is None and "at_threshold" not in ev
    with open(tmp_path / "s.csv") as f:
        assert {r["flagged"] for r in csv.DictReader(f)} == {""}


def test_the_thread_count_a_run_trained_with_is_recorded_and_a_resume_with_another_warns(texture, tmp_path):
    """Threads change float sums, so a seed reproduces a run only at its thread count: config.yaml records
    the count used when none was given, and resuming with another warns."""
    import yaml
    run = tmp_path / "r"
    train(_cfg(texture, epochs=1), run, quiet=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())["threads"]
    assert saved == torch.get_num_threads() >= 1
    other = saved + 1
    with pytest.warns(UserWarning, match=rf"trained with {saved} threads, --threads {other} now"):
        train(_cfg(texture, epochs=2, threads=other), run, resume=True, quiet=True)
    torch.set_num_threads(saved)


def test_a_multiscale_run_scores_with_its_mem_folded_into_one_conv(texture, tmp_path):
    """--mem multiscale is the paper's 3x3 + 7x7 MEM, re-parameterised for inference: a finished run is scored
    with one 7x7 conv per block (before, only the inference benchmark folded it), with the unfolded scores."""
    from uninet_feat.calibration import load_run
    from uninet_feat.model.mem import RepConv
    run = tmp_path / "ms"
    train(_cfg(texture, mem="multiscale", epochs=1), run, quiet=True)
    model, _, cfg = load_run(run)
    assert not any(isinstance(m, RepConv) and hasattr(m, "large") for m in model.modules())
    assert any(isinstance(m, RepConv) and hasattr(m, "fused") for m in model.modules())
    unfolded, _ = build_from_checkpoint(run / "model.pt")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.predict(x)[1], unfolded.eval().predict(x)[1], atol=1e-4, rtol=1e-4)


def test_supervised_runs_say_what_makes_supervision_do_less(tmp_path):
    """--supervised with no training defect (label folders put all in test), an empty defect mask (trained as a
    normal image), or T = 2 (p_ii < 0.5 always, so the abnormal margin is 0): each said before training."""
    from PIL import Image
    data = write_texture_set(tmp_path / "sup", n_train=6, n_good=2, n_bad=6)
    with pytest.warns(UserWarning, match="training split holds no defective image"):
        train(_cfg(data, supervised=True, epochs=1), tmp_path / "none", quiet=True)
    write_supervised_manifest(data)
    first = sorted((data / "ground_truth/spot").glob("*_mask.png"))[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(first)
    with pytest.warns(UserWarning) as seen:
        train(_cfg(data, split_csv=str(data / "m.csv"), supervised=True, epochs=1, val_fraction=0.0),
              tmp_path / "sup", quiet=True)
    said = " ".join(str(w.message) for w in seen)
    assert "1 defective training image(s) have a mask with no defect pixel" in said
    assert "the abnormal margin cannot act" in said and "-T 0.1" in said


def test_evaluate_names_what_it_measured_and_never_leaves_an_earlier_report_beside_new_figures(trained, tmp_path,
                                                                                              monkeypatch):
    """evaluate wrote --csv, then --json, then the report, each over an earlier evaluation's file, and the JSON named
    neither run nor model: killed while drawing the report (seconds on real data), the folder held this run's
    figures beside another run's report, with nothing to tell them apart (an audit, session 53)."""
    import uninet_feat.evaluate as ev
    from uninet_feat.featstore import file_sha256
    j, c, r = tmp_path / "m.json", tmp_path / "s.csv", tmp_path / "r.html"
    evaluate(trained, json_path=j, csv_path=c, report_path=r, quiet=True)
    src = json.loads(j.read_text())["source"]
    assert src["run"] == str(trained.resolve()) and src["model_sha256"] == file_sha256(trained / "model.pt")
    assert src["model"] == str((trained / "model.pt").resolve()) and src["knn"] is None

    def killed(*a, **k):   # stands in for a kill while the report is drawn
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "write_html_report", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained, json_path=j, csv_path=c, report_path=r, quiet=True,
                 checkpoint=trained / "checkpoint.pt")
    assert j.exists() and c.exists() and not r.exists()   # the new figures, and no earlier report beside them
    assert json.loads(j.read_text())["source"]["model"] == str((trained / "checkpoint.pt").resolve())
