"""`calibrate --normals DIR`: a run's thresholds from normal images of the user's own instead of the held-out
split (more of them, or today's production), never from images it trained on, and said when they are test images."""
import json
import shutil
import warnings

import numpy as np
import pytest

from uninet_feat.thresholds import threshold_at_fpr
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
    is a copy candidate of every normal given: each must be hashed once, not once per normal (n_val x n_train); and
    since session 52 only its first 64 KiB unless a normal's match them."""
    from PIL import Image
    from uninet_feat import featstore
    from uninet_feat import normals as run_normals
    from uninet_feat.config import load_config
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
    calls, heads = [], []
    real, real_head = featstore.file_sha256, run_normals._head_sha256
    monkeypatch.setattr(featstore, "file_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(run_normals, "_head_sha256", lambda p: heads.append(p) or real_head(p))
    val = run_normals.given_normals(given, cfg)
    run_normals.check_given_normals(val, cfg, given)
    n_fit = len(list((bmp / "train" / "good").iterdir())) - 2   # less the held-out validation normals
    assert len(heads) == n_fit + len(val)   # each training image once, each given normal once
    assert calls == []   # no head alike: no file read whole
    import shutil   # a given normal that is a copy of a training image: those two read whole, once each
    fit_file = sorted(p for p in (bmp / "train" / "good").iterdir() if str(p) not in {str(s.path) for s in val})[0]
    calls.clear()
    from uninet_feat.normals import same_files
    assert same_files([*(s.path for s in val), shutil.copy(fit_file, tmp_path / "copy.bmp")],
                      sorted((bmp / "train" / "good").iterdir())) == [str(tmp_path / "copy.bmp")]
    assert sorted(map(str, calls)) == sorted([str(fit_file), str(tmp_path / "copy.bmp")])


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


def _split(data, path, val_rows, train_rows=None):
    """A split CSV over ``data``: ``val_rows`` as `val` normals, ``train_rows`` (default: every train/good image) as
    `train` ones and the test images as `test` rows, less those among ``val_rows``."""
    val_rows = [str(p.relative_to(data)) for p in val_rows]
    train_rows = [str(p.relative_to(data)) for p in (train_rows or sorted((data / "train" / "good").glob("*.png")))]
    rows = [f"{p},val,good" for p in val_rows] + [f"{p},train,good" for p in train_rows if p not in val_rows]
    rows += [f"{p.relative_to(data)},test,{p.parent.name}" for p in sorted((data / "test").glob("*/*.png"))
             if str(p.relative_to(data)) not in val_rows]
    path.write_text("\n".join(["path,split,label"] + rows) + "\n")
    return path


def test_a_split_csv_whose_validation_rows_are_the_runs_test_images_is_warned_and_counted(trained, tmp_path):
    """`calibrate --split-csv B.csv` whose `val` rows are the test normals of the run's own split set the threshold
    on test images: calibration.json recorded nothing and `evaluate` neither warned nor counted them (it compared
    only `--normals` folders with the test set)."""
    data, run, _ = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    other = _split(data, tmp_path / "other.csv", sorted((data / "test" / "good").glob("*.png")))
    with pytest.warns(UserWarning, match=r"3 of the 3 validation normals .*other.csv draws are test images of the "
                                         r"run's own split"):
        assert main(["calibrate", "--run", str(work), "--split-csv", str(other), "--quiet"]) == 0
    cal = json.loads((work / "calibration.json").read_text())
    assert sorted(cal["val_paths"]) == sorted(str(p.resolve()) for p in (data / "test" / "good").glob("*.png"))
    with pytest.warns(UserWarning, match=r"3 test image\(s\) are among the normals the run's threshold was set on "
                                         r"\(the validation normals it was calibrated with: its own split, or the val rows of a split CSV") as got:
        assert main(["evaluate", "--run", str(work), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["threshold_set_on_test_images"] == 3
    assert any("without --split-csv" in str(w.message) for w in got)
    # the run's own held-out split: no test image among its normals, nothing said
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert main(["evaluate", "--run", str(run), "--json", str(tmp_path / "o.json"), "--quiet"]) == 0
    assert "threshold_set_on_test_images" not in json.loads((tmp_path / "o.json").read_text())
    assert not [w for w in got if "test image(s) are among" in str(w.message)]


def test_a_split_csv_drawing_training_images_is_refused_also_when_the_data_moved(tmp_path, capsys):
    """`calibrate --data NEW --split-csv NEW/B.csv` after the run's data moved: the trained-on check read the run's
    split at its old place, could not, and passed silently (B drew 3 images the run trained on); now it reads it
    under --data, and says so when the run's own data cannot be read at all."""
    data = write_texture_set(tmp_path / "d", n_train=10, n_good=2, n_bad=2, size=32)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--image-size", "32", "--val-fraction", "0.3", "--seed", "1",
                                         "--out", str(run)]) == 0
    before = json.loads((run / "calibration.json").read_text())
    held_out = set(before["val_paths"])
    fit = [p for p in sorted((data / "train" / "good").glob("*.png")) if str(p.resolve()) not in held_out]
    _split(data, data / "b.csv", fit[:3])
    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--data", str(moved), "--split-csv", str(moved / "b.csv"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3 of the 3 validation normals this split draws are images the run was trained on" in err
    assert json.loads((run / "calibration.json").read_text()) == before
    # without --data the run's split is not readable: said, not passed over (B's rows absolute: it still reads)
    absolute = tmp_path / "abs.csv"
    val = [moved / p.relative_to(data) for p in fit[:3]]   # trained on: what the check would refuse
    absolute.write_text("\n".join(["path,split,label"] + [f"{p},val,good" for p in val] + [
        f"{p},train,good" for p in sorted((moved / "train" / "good").glob("*.png")) if p not in val]) + "\n")
    with pytest.warns(UserWarning, match="could not check that the validation normals .*abs.csv draws are not "
                                         "images the run was trained on"):
        assert main(["calibrate", "--run", str(run), "--split-csv", str(absolute), "--quiet"]) == 0


def test_given_normals_keep_their_layouts_group_and_other_groups_are_refused(tmp_path):
    """A run of group A took every given normal for group A's, so a folder laid out by group (N/A/good, N/B/good) let
    group B's normals set A's threshold; a run of a list of groups (`group: [A, B]`) took the list itself for each
    image's group (a TypeError in calibrate). Now: group-less images are the run's one group's, a layout's group is
    kept, a group the run was not trained on is refused, and group-less images for a list are refused."""
    from uninet_feat.normals import given_normals
    from uninet_feat.errors import BadInputError
    by_group = tmp_path / "n"
    for g in "AB":
        write_texture_set(by_group / g, n_train=2, n_good=0, n_bad=0, size=32)
    flat = by_group / "A" / "train" / "good"
    with pytest.raises(BadInputError, match=r"2 of the 4 images here are of group\(s\) B by their layout") as e:
        given_normals(by_group, {"group": "A"})
    assert "group A's normals only" in str(e.value) and str(by_group / "A") in str(e.value)
    assert {s.group for s in given_normals(by_group / "A", {"group": "A"})} == {"A"}
    assert {s.group for s in given_normals(flat, {"group": "A"})} == {"A"}   # a flat folder: the run's group
    got = given_normals(by_group, {"group": ["A", "B"]})
    assert sorted(s.group for s in got) == ["A", "A", "B", "B"]
    with pytest.raises(BadInputError, match=r"group\(s\) B .* trained on group\(s\) A, C only"):
        given_normals(by_group, {"group": ["A", "C"]})
    with pytest.raises(BadInputError, match="trained on groups A, B, and images here are of no group") as e:
        given_normals(flat, {"group": ["A", "B"]})
    assert "laid out by group" in str(e.value)


def test_a_run_of_a_list_of_groups_calibrates_on_normals_laid_out_by_group(tmp_path):
    """`calibrate --normals DIR` of a run trained on `group: [A, B]` crashed (unhashable type: 'list')."""
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    data = tmp_path / "d"
    for i, g in enumerate("ABC"):
        write_texture_set(data / g, n_train=6, n_good=1, n_bad=1, size=32, seed=i)
    run = tmp_path / "run"
    train(load_config(None, {"data": str(data), "group": ["A", "B"], "backbone": "tiny", "weights": "random",
                             "image_size": 32, "epochs": 1, "batch_size": 4, "val_fraction": 0.3,
                             "channels_last": False}), run, quiet=True)
    normals = tmp_path / "n"
    for i, g in enumerate("AB"):
        write_texture_set(normals / g, n_train=2, n_good=0, n_bad=0, size=32, seed=7 + i)
    assert main(["calibrate", "--run", str(run), "--normals", str(normals), "--quiet"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    assert sorted(cal["val_groups"]) == ["A", "A", "B", "B"] and cal["trained_groups"] == ["A", "B"]


def test_the_warning_says_the_pixel_figures_rest_on_test_normals_in_range_units(trained, tmp_path):
    """A run whose pixel map is in range units takes them on its calibration normals: calibrated on test normals,
    its pixel figures move too, and the warning said "the pixel figures do not use it"."""
    data, run, _ = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert main(["calibrate", "--run", str(work), "--normals", str(data / "test" / "good"), "--map-norm", "range",
                 "--quiet"]) == 0
    with pytest.warns(UserWarning, match=r"3 test image\(s\) are among the normals") as got:
        assert main(["evaluate", "--run", str(work), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    said = [str(w.message) for w in got if "test image(s) are among" in str(w.message)]
    assert "the pixel figures rest on those normals too, the pixel map's range units" in said[0]
    assert "the pixel figures do not use it" not in said[0]


def test_the_warning_says_the_image_figures_rest_on_test_normals_when_the_score_is_such_a_maps(trained, tmp_path):
    """`image_score: map` on a pixel map in range units taken on test normals: AUROC and AP rest on them too, and
    the warning said "AUROC and AP do not use it"; with the WDM they do not."""
    data, run, _ = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    said = {}
    for kind in ("map", "wdm"):
        assert main(["calibrate", "--run", str(work), "--normals", str(data / "test" / "good"), "--map-norm", "range",
                     "--image-score", kind, "--quiet"]) == 0
        with pytest.warns(UserWarning, match=r"test image\(s\) are among the normals") as got:
            assert main(["evaluate", "--run", str(work), "--quiet"]) == 0
        said[kind] = next(str(w.message) for w in got if "test image(s) are among" in str(w.message))
    assert "AUROC and AP rest on those normals too" in said["map"] and "do not use it" not in said["map"]
    assert "AUROC and AP do not use it; the pixel figures rest on those normals too" in said["wdm"]


def test_calibrating_a_run_whose_training_folder_grew_is_refused(tmp_path, capsys):
    """`calibrate --run RUN` draws the run's validation split anew from its data folder; a normal added since
    reshuffles that draw, so images the run trained on became validation normals (the threshold set on them). The
    split model.pt recorded is compared: another is refused, naming the counts; moved to --data, the same split
    is taken."""
    from PIL import Image
    data = write_texture_set(tmp_path / "d", n_train=10, n_good=2, n_bad=2, size=32)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--image-size", "32", "--val-fraction", "0.3", "--seed", "1",
                                         "--out", str(run)]) == 0
    before = (run / "calibration.json").read_bytes()
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert main(["calibrate", "--run", str(run), "--data", str(moved), "--quiet"]) == 0   # the same split, elsewhere
    np.testing.assert_allclose(json.loads((run / "calibration.json").read_text())["val_scores"],
                               json.loads(before)["val_scores"], rtol=1e-5)   # the same normals (threads aside)
    Image.open(data / "train" / "good" / "000.png").transpose(Image.FLIP_LEFT_RIGHT).save(
        data / "train" / "good" / "zz_new.png")
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "differ from those the run trained on" in err and "restore the data folder as it was" in err


def test_evaluate_on_another_split_says_how_many_test_images_the_run_trained_on(tmp_path):
    """evaluate scored the run's own training images as test normals of another split CSV without a word (a real
    AITEX split: image AUROC 0.29 -> 0.64, false-positive rate 0.67 -> 0); calibrate refuses as much for
    validation normals. Now warned, and counted in the JSON; on the run's own split only a byte copy of a training
    image filed among the test images can be one, said by train and evaluate (an audit, session 52)."""
    import csv
    import warnings
    from uninet_feat.config import load_config
    from uninet_feat.evaluate import evaluate
    from uninet_feat.runs import load_samples, train_val_samples
    from uninet_feat.train import train
    from _tiny import register_tiny, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=2, n_bad=2)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 4, "val_fraction": 0.25,
                                                       "channels_last": False, "seed": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, tmp_path / "run", quiet=True)
    samples = load_samples(cfg)
    fit = train_val_samples(samples, cfg)[0]
    rows = [{"path": str(s.path), "split": "test" if s in fit[:3] or s.split == "test" else s.split,
             "label": s.label} for s in samples]
    with open(tmp_path / "other.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "split", "label"])
        w.writeheader()
        w.writerows(rows)
    with pytest.warns(UserWarning, match="3 of the 7 test images are images the run trained on"):
        res = evaluate(tmp_path / "run", split_csv=str(tmp_path / "other.csv"), quiet=True)
    assert res["test_images_trained_on"] == 3
    assert "test_images_trained_on" not in evaluate(tmp_path / "run", quiet=True)
    import shutil   # a training image copied into the run's own test folder, under another name
    shutil.copytree(data, tmp_path / "d2")
    own = train_val_samples(load_samples({**cfg, "data": str(tmp_path / "d2")}), cfg)[0][0].path
    shutil.copy(own, tmp_path / "d2" / "test" / "good" / "copy_of_a_training_image.png")
    cfg2 = {**cfg, "data": str(tmp_path / "d2")}
    with pytest.warns(UserWarning, match=r"1 test image\(s\) are byte copies of training or validation images"):
        train(cfg2, tmp_path / "run2", quiet=True)
    with pytest.warns(UserWarning, match=r"1 of the 5 test images are images the run trained on \(byte copies of its "
                                         r"training images\) \(e.g. .*copy_of_a_training_image.png\).*remove the copies"):
        assert evaluate(tmp_path / "run2", quiet=True)["test_images_trained_on"] == 1


def test_given_normals_of_a_run_of_every_group_of_its_data_are_checked_against_those_groups(tmp_path):
    """A run trained on every group of its data (no `group:`) took a flat folder's images as group None (a TypeError
    sorting the groups) and another group's (DIR/lineZ/...) as a group of their own, alone setting the threshold;
    a run of one ungrouped category took an MVTec layout's category folder (DIR/bottle/train/good) for a second group
    (then 'no position offsets for group bottle' when tiled)."""
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    from uninet_feat.normals import given_normals
    two = tmp_path / "two"
    for i, g in enumerate(("lineA", "lineB")):
        write_texture_set(two / g, n_train=3, n_good=0, n_bad=0, size=32, seed=i)
    cfg = load_config(None, {"data": str(two), "backbone": "tiny", "weights": "random"})
    n = tmp_path / "n"
    for g in ("lineZ", "lineA"):
        write_texture_set(n / g, n_train=2, n_good=0, n_bad=0, size=32, seed=7)
    with pytest.raises(BadInputError, match=r"2 of the 4 images here are of group\(s\) lineZ .* trained on group\(s\) "
                                            r"lineA, lineB only"):
        given_normals(n, cfg)
    with pytest.raises(BadInputError, match="trained on groups lineA, lineB, and images here are of no group"):
        given_normals(n / "lineA" / "train" / "good", cfg)
    shutil.rmtree(n / "lineZ")
    assert sorted(s.group for s in given_normals(n, cfg)) == ["lineA", "lineA"]
    one = write_texture_set(tmp_path / "one", n_train=3, n_good=0, n_bad=0, size=32)
    cfg = load_config(None, {"data": str(one), "backbone": "tiny", "weights": "random"})
    bottle = tmp_path / "b"
    write_texture_set(bottle / "bottle", n_train=2, n_good=0, n_bad=0, size=32, seed=8)
    assert [s.group for s in given_normals(bottle, cfg)] == ["", ""]


def test_another_epochs_threshold_comes_from_the_runs_own_split_not_a_given_csvs(tmp_path):
    """`evaluate --checkpoint X --split-csv OTHER` drew X's validation normals from OTHER's training rows, some of
    them images the run trained on; model.pt's threshold came from the run's own. Both use the run's own now."""
    import csv
    from uninet_feat import calibration as C
    from uninet_feat.evaluate import evaluate
    from uninet_feat.runs import load_samples, train_val_samples
    data = write_texture_set(tmp_path / "d", n_train=16, n_good=3, n_bad=2, size=32)
    files = sorted((data / "train" / "good").glob("*.png"))
    rows = [{"path": str(p.relative_to(data)), "split": "train", "label": "good"} for p in files[:10]]
    rows += [{"path": str(p.relative_to(data)), "split": "test", "label": p.parent.name}
             for p in sorted((data / "test").rglob("*.png"))]
    own, other = tmp_path / "own.csv", tmp_path / "other.csv"
    for path, part in ((own, rows), (other, rows + [dict(rows[0], path=str(p.relative_to(data))) for p in files[10:]])):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "split", "label"])
            w.writeheader()
            w.writerows(part)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--image-size", "32", "--split-csv", str(own), "--val-fraction", "0.3",
                                         "--keep-every", "1", "--out", str(run)]) == 0
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    fit, val = train_val_samples(load_samples(cfg), cfg)
    seen, real = [], C.calibration

    def spy(model, v, c, quiet=True):
        seen.append(sorted(str(s.path) for s in v))
        return real(model, v, c, quiet)
    import unittest.mock
    with unittest.mock.patch.object(C, "calibration", spy), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(run, split_csv=str(other), checkpoint=str(run / "epochs" / "epoch_001.pt"), quiet=True)
    assert seen == [sorted(str(s.path) for s in val)]


def test_a_resumed_training_keeps_what_calibrate_was_told_unless_its_command_says_otherwise(tmp_path):
    """`calibrate --tile-norm none --map-levels 3 --image-score map`, then `train --resume --epochs 2`: the new
    model.pt was calibrated with config.yaml's choices (position offsets, every level, the WDM), undoing the
    calibration without a word (an audit, session 53). The choices are kept in calibration.json and made again; a
    choice that the resume's own command sets (--map-levels 2,3) wins."""
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=2, n_bad=2, size=32, wide=True)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--image-size", "32", "--tile", "32", "--tile-norm", "position",
                                         "--val-fraction", "0.5", "--out", str(run)]) == 0

    def choices():
        cal = json.loads((run / "calibration.json").read_text())
        return bool(cal.get("tile_offsets")), cal["map_levels"], cal["image_score"]
    assert choices() == (True, None, "wdm")   # None: every level
    assert main(["calibrate", "--run", str(run), "--tile-norm", "none", "--map-levels", "3", "--image-score", "map",
                 "--quiet"]) == 0
    assert choices() == (False, [3], "map")
    sha = json.loads((run / "calibration.json").read_text())["model_sha256"]
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run / "calibration.json").read_text())["model_sha256"] != sha   # a new model.pt, calibrated
    assert choices() == (False, [3], "map")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--map-levels", "2,3", "--quiet"]) == 0
    assert choices() == (False, [2, 3], "map")
    assert main(["calibrate", "--run", str(run), "--quiet"]) == 0   # nothing asked: the run's as it is
    assert choices() == (False, [2, 3], "map")
    # the resume's own flag wins also when it equals the run's config (a review, session 53: it was taken as unset)
    assert main(["calibrate", "--run", str(run), "--map-levels", "3", "--quiet"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4", "--map-levels", "2,3", "--quiet"]) == 0
    assert choices() == (False, [2, 3], "map")
    # a resume with a new --map-levels stopped before it calibrated, then retried without the flag: config.yaml's
    # new value, not what `calibrate` was told before it
    assert main(["calibrate", "--run", str(run), "--map-levels", "3", "--quiet"]) == 0
    import uninet_feat.train as train_mod

    def killed(*a, **k):
        raise KeyboardInterrupt
    real = train_mod.calibrate
    train_mod.calibrate = killed
    try:
        assert main(["train", "--out", str(run), "--resume", "--epochs", "5", "--map-levels", "1", "--quiet"]) == 130
    finally:
        train_mod.calibrate = real
    assert main(["train", "--out", str(run), "--resume", "--epochs", "5", "--quiet"]) == 0
    assert choices() == (False, [1], "map")


def test_a_bad_split_csv_is_named_and_one_beside_given_normals_is_said_unused(trained, tmp_path, capsys):
    """On a run calibrated with --normals, `calibrate --split-csv BAD.csv` blamed "the run's training images" with a
    fix about where the training data is now; and a good CSV's validation rows were silently not calibrated on, the
    given normals staying in force (an audit, session 53)."""
    data, run, normals = trained
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert main(["calibrate", "--run", str(work), "--normals", str(normals), "--quiet"]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("file,set,class\nx.png,train,good\n")
    capsys.readouterr()
    assert main(["calibrate", "--run", str(work), "--split-csv", str(bad), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "bad.csv: CSV header" in err and "training images" not in err
    good = _split(data, tmp_path / "good.csv", sorted((data / "train" / "good").glob("*.png"))[:2])
    with pytest.warns(UserWarning, match=r"good.csv: its validation rows are not calibrated on.*--normals split"):
        assert main(["calibrate", "--run", str(work), "--split-csv", str(good), "--quiet"]) == 0
    assert json.loads((work / "calibration.json").read_text())["n_val_normals"] == 25   # still the given normals
