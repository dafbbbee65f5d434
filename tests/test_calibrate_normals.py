"""`calibrate --normals DIR`: a run's thresholds from normal images of the user's own instead of the held-out
split (more of them, or today's production), never from images it trained on, and said when they are test images."""
import json
import shutil

import numpy as np
import pytest

from uninet_feat.calibration import threshold_at_fpr
from uninet_feat.cli import main
from uninet_feat.predict import predict_cmd

from _tiny import register_tiny, tiny_train_args, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    data = write_texture_set(root / "d", n_train=12, n_good=3, n_bad=2, size=32)
    run = root / "run"
    assert main(tiny_train_args(data) + ["--image-size", "32", "--val-fraction", "0.2", "--seed", "5",
                                         "--out", str(run)]) == 0
    extra = write_texture_set(root / "more", n_train=25, n_good=0, n_bad=0, size=32, seed=9)   # unseen normals
    return data, run, extra / "train" / "good"


def test_calibrating_on_given_normals_sets_every_threshold_from_them_until_split_is_asked(trained, tmp_path):
    data, run, normals = trained
    before = json.loads((run / "calibration.json").read_text())
    assert main(["calibrate", "--run", str(run), "--normals", str(normals), "--quiet"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    files = sorted(str(p.resolve()) for p in normals.iterdir())
    assert cal["n_val_normals"] == len(files) == 25 != before["n_val_normals"]
    assert sorted(cal["val_paths"]) == files and cal["calibration_normals"] == str(normals.resolve())
    assert str(normals.resolve()) in cal["threshold_rule"]
    # those very images, scored by predict, give the threshold and the --max-fpr thresholds
    rows = predict_cmd(run, normals, tmp_path / "p", quiet=True, overlays=False)["rows"]
    s = np.array([r["wdm_score"] for r in rows])
    assert cal["threshold"] == pytest.approx(float(np.quantile(s, 0.99)), rel=1e-5)
    assert sorted(cal["val_scores"]) == pytest.approx(sorted(s), rel=1e-5)
    res = predict_cmd(run, normals, tmp_path / "q", quiet=True, overlays=False, max_fpr=0.2)
    assert res["threshold"] == pytest.approx(threshold_at_fpr(cal["val_scores"], 0.2))
    assert sum(r["flagged"] for r in res["rows"]) <= 0.2 * 25
    # a later calibrate keeps them; `split` goes back to the held-out validation split
    assert main(["calibrate", "--run", str(run), "--quiet"]) == 0
    assert json.loads((run / "calibration.json").read_text())["n_val_normals"] == 25
    assert main(["calibrate", "--run", str(run), "--normals", "split", "--quiet"]) == 0
    back = json.loads((run / "calibration.json").read_text())
    assert "calibration_normals" not in back and back["val_paths"] == before["val_paths"]
    assert back["threshold"] == pytest.approx(before["threshold"], rel=1e-6)


def test_normals_the_run_trained_on_are_refused_even_as_copies(trained, tmp_path, capsys):
    data, run, normals = trained
    before = (run / "calibration.json").read_text()
    held_out = set(json.loads(before)["val_paths"])
    mixed = tmp_path / "mixed"
    shutil.copytree(normals, mixed)
    trained_on = next(p for p in sorted((data / "train" / "good").iterdir()) if str(p.resolve()) not in held_out)
    shutil.copy(trained_on, mixed / "copy_of_a_training_image.png")
    assert main(["calibrate", "--run", str(run), "--normals", str(mixed), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "1 of these normals are images the run was trained on" in err and "copy_of_a_training_image.png" in err
    assert main(["calibrate", "--run", str(run), "--normals", str(data / "train" / "good"), "--quiet"]) != 0
    assert "images the run was trained on" in capsys.readouterr().err   # the training folder itself, by path
    assert (run / "calibration.json").read_text() == before   # refused before anything was written


def test_evaluate_says_when_the_threshold_was_set_on_test_images(trained, tmp_path):
    data, run, _ = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    test_normals = data / "test" / "good"
    assert main(["calibrate", "--run", str(work), "--normals", str(test_normals), "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"3 test image\(s\) are among the normals the run's threshold was set on"):
        assert main(["evaluate", "--run", str(work), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["threshold_set_on_test_images"] == 3
    copies = tmp_path / "copies"   # `cp test/good/* DIR`: the same pictures under other paths
    shutil.copytree(test_normals, copies)
    assert main(["calibrate", "--run", str(work), "--normals", str(copies), "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"3 test image\(s\) are among the normals"):
        assert main(["evaluate", "--run", str(work), "--json", str(tmp_path / "c.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["threshold_set_on_test_images"] == 3
    # another checkpoint's threshold, set on the same normals: said too, and its rule names them (it said "the
    # validation normals" and was not counted); a given --threshold is set on no normals: not counted
    with pytest.warns(UserWarning, match=r"3 test image\(s\) are among the normals"):
        assert main(["evaluate", "--run", str(work), "--checkpoint", str(work / "checkpoint.pt"), "--json",
                     str(tmp_path / "k.json"), "--quiet"]) == 0
    k = json.loads((tmp_path / "k.json").read_text())
    assert k["threshold_set_on_test_images"] == 3 and f"of the normals in {copies}" in k["threshold_rule"]
    assert "checkpoint.pt" in k["threshold_rule"]
    assert main(["evaluate", "--run", str(work), "--threshold", "0.5", "--json", str(tmp_path / "t.json"),
                 "--quiet"]) == 0
    assert "threshold_set_on_test_images" not in json.loads((tmp_path / "t.json").read_text())


def test_normals_of_a_defect_folder_or_with_defect_masks_are_refused(trained, tmp_path, capsys):
    """`--normals data/test` (a labelled layout: good/ and a defect folder) took every image for a normal, defects
    too, and raised the threshold above them; a defect mask beside an image says the same. All-zero masks (magnetic
    tile's MT_Free) are normals'."""
    from PIL import Image
    data, run, normals = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    before = (work / "calibration.json").read_text()
    assert main(["calibrate", "--run", str(work), "--normals", str(data / "test"), "--quiet"]) != 0
    assert "2 of the 5 images here are defect images by their layout" in capsys.readouterr().err
    masked = tmp_path / "masked"
    shutil.copytree(normals, masked)
    blank = np.zeros((32, 32), np.uint8)
    Image.fromarray(blank).save(masked / "000_mask.png")   # a normal's mask: nothing marked
    assert main(["calibrate", "--run", str(work), "--normals", str(masked), "--quiet"]) == 0
    blank[3:9, 3:9] = 255
    Image.fromarray(blank).save(masked / "001_mask.png")
    assert main(["calibrate", "--run", str(work), "--normals", str(masked), "--quiet"]) != 0
    assert "a defect mask beside it" in capsys.readouterr().err
    assert main(["calibrate", "--run", str(work), "--normals", "split", "--quiet"]) == 0
    assert json.loads((work / "calibration.json").read_text())["val_paths"] == json.loads(before)["val_paths"]



def test_gone_normals_are_named_and_a_resumed_training_keeps_them(trained, tmp_path, capsys):
    """The normals folder moved: commands that score them name it as the run's calibration normals with the ways
    back; `train --resume` (longer) calibrates its new model.pt on them again, not silently on the split."""
    data, run, normals = trained
    work, mine = tmp_path / "run", tmp_path / "normals"
    shutil.copytree(run, work)
    shutil.copytree(normals, mine)
    assert main(["calibrate", "--run", str(work), "--normals", str(mine), "--quiet"]) == 0
    assert main(["train", "--out", str(work), "--resume", "--epochs", "2", "--quiet"]) == 0
    cal = json.loads((work / "calibration.json").read_text())
    assert cal["calibration_normals"] == str(mine.resolve()) and cal["n_val_normals"] == 25
    mine.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["calibrate", "--run", str(work), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "calibrated on (`calibrate --normals`) are gone" in err and "--normals split" in err
    assert main(["calibrate", "--run", str(work), "--normals", str(tmp_path / "moved"), "--quiet"]) == 0


def test_copies_are_found_hashing_each_training_image_once(trained, tmp_path, monkeypatch):
    """Fixed-size image files (BMP, uncompressed TIFF: a line's camera) all have one size, so every training image
    is a copy candidate of every normal given: each must be hashed once, not once per normal (n_val x n_train)."""
    from PIL import Image
    from uninet_feat import calibration, featstore
    from uninet_feat.config import load_config
    from uninet_feat.data.layouts import discover_batch
    data, run, normals = trained
    bmp = tmp_path / "data"
    for p in data.rglob("*.png"):   # the run's data as BMP: every file 32x32 grey, one size
        out = bmp / p.relative_to(data).with_suffix(".bmp" if "ground_truth" not in p.parts else ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).save(out)
    given = tmp_path / "given"
    given.mkdir()
    for p in sorted(normals.iterdir()):
        Image.open(p).save(given / (p.stem + ".bmp"))
    cfg = {**load_config(run / "config.yaml"), "data": str(bmp)}
    calls = []
    real = featstore.file_sha256
    monkeypatch.setattr(featstore, "file_sha256", lambda p: calls.append(p) or real(p))
    val = calibration.given_normals(given, cfg)
    calibration.check_given_normals(val, cfg, given)
    n_fit = len(list((bmp / "train" / "good").iterdir())) - 2   # less the held-out validation normals
    assert len(calls) == n_fit + len(val)   # each training image once, each given normal once


def test_the_few_normals_warning_of_given_normals_names_their_folder_not_the_split(trained, tmp_path):
    """A run calibrated on 3 given normals: predict's few-normals fix named --val-fraction and training images (the
    calibration.json keeps the run's val_fraction), which would not change the threshold at all."""
    data, run, normals = trained
    work, few = tmp_path / "run", tmp_path / "few"
    shutil.copytree(run, work)
    few.mkdir()
    for p in sorted(normals.iterdir())[:3]:
        shutil.copy(p, few / p.name)
    with pytest.warns(UserWarning, match="only 3 validation normals") as got:
        assert main(["calibrate", "--run", str(work), "--normals", str(few), "--quiet"]) == 0
        predict_cmd(work, data / "test", tmp_path / "p", quiet=True, overlays=False)
    said = [str(w.message) for w in got if "only 3 validation normals" in str(w.message)]
    assert len(said) == 2 and all(f"into {few.resolve()}" in m and "val-fraction" not in m for m in said)


def _predict_output_inside(folder, n=3):
    """A predict output folder (predictions.csv, summary.json, overlays/ of ``n`` heatmap images) inside ``folder``,
    as `predict --data folder --out folder/pred` leaves it (allowed: a folder of unlabelled images)."""
    out = folder / "pred"
    (out / "overlays").mkdir(parents=True)
    (out / "predictions.csv").write_text("path\n")
    (out / "summary.json").write_text("{}")
    for p in sorted(folder.glob("*.png"))[:n]:
        shutil.copy(p, out / "overlays" / f"{p.stem}_overlay.png")


def test_a_predicts_overlays_inside_the_normals_folder_are_not_taken_for_normals(trained, tmp_path):
    """`predict --data N --out N/pred` is allowed for a folder of unlabelled images, and predict itself leaves its
    outputs out of a later batch; `calibrate --normals N` took the overlays (heatmaps) for normal images and set
    the threshold on them too. Left out, warned, as predict does."""
    data, run, normals = trained
    folder = tmp_path / "normals"
    shutil.copytree(normals, folder)
    _predict_output_inside(folder)
    r = tmp_path / "run"
    shutil.copytree(run, r)
    with pytest.warns(UserWarning, match=r"3 image\(s\) in predict output folder"):
        assert main(["calibrate", "--run", str(r), "--normals", str(folder), "--quiet"]) == 0
    cal = json.loads((r / "calibration.json").read_text())
    assert cal["n_val_normals"] == 25 and not any("/pred/" in p for p in cal["val_paths"])


def test_another_split_csv_that_draws_training_images_as_validation_normals_is_refused(tmp_path, capsys):
    """`calibrate --split-csv B.csv` with more training rows than the run's A.csv drew some of the images the run
    trained on as validation normals (3 of 6 here), a threshold below what new normals score, without a word."""
    data = write_texture_set(tmp_path / "d", n_train=20, n_good=2, n_bad=2, size=32)
    rows = sorted((data / "train" / "good").glob("*.png"))
    test = [f"{p.relative_to(data)},test,{p.parent.name}" for p in sorted((data / "test").glob("*/*.png"))]

    def split(name, train_rows):
        f = tmp_path / name
        f.write_text("\n".join(["path,split,label"] + [f"{p.relative_to(data)},train,good" for p in train_rows]
                               + test) + "\n")
        return f
    a, b = split("a.csv", rows[:10]), split("b.csv", rows)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--split-csv", str(a), "--image-size", "32", "--val-fraction", "0.3",
                                         "--seed", "1", "--out", str(run)]) == 0
    before = (run / "calibration.json").read_text()
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--split-csv", str(b), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "validation normals this split draws are images the run was trained on" in err and str(b) in err
    assert "--normals DIR" in err and (run / "calibration.json").read_text() == before
    assert main(["calibrate", "--run", str(run), "--split-csv", str(a), "--quiet"]) == 0   # its own split: the same
    assert json.loads((run / "calibration.json").read_text())["val_paths"] == json.loads(before)["val_paths"]
