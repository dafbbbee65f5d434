"""What README.md and docs/usage.md promise of the command line, checked where an audit found the code did
otherwise (session 31): flags that were ignored, and misuse that gave no clear message."""
import csv
import json
import os

from uninet_feat.cli import main

from _tiny import register_tiny, tiny_train_args, write_texture_set

register_tiny()


def _run(tmp_path, **texture):
    data = write_texture_set(tmp_path / "data", **texture)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--out", str(run), "--threads", "1"]) == 0
    return data, run


def test_split_csv_without_data_is_read_over_the_runs_data_not_ignored(tmp_path, capsys):
    """`evaluate --run RUN --split-csv CSV` (the docs: --data is the root a --split-csv is relative to, by default
    the run's data) scored the run's own test split and said nothing: the CSV was dropped unless --data came too."""
    data, run = _run(tmp_path, n_train=6, n_good=3, n_bad=3)
    rows = [("test/good/000.png", "test", "good"), ("test/spot/000.png", "test", "spot")]
    rows += [(f"train/good/{p.name}", "train", "good") for p in sorted((data / "train/good").glob("*.png"))]
    sub = tmp_path / "sub.csv"
    with open(sub, "w", newline="") as f:
        csv.writer(f).writerows([("path", "split", "label"), *rows])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--split-csv", str(sub), "--quiet", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rep["n_test"], rep["n_defect"]) == (2, 1)   # the CSV's two test images, not the run's six


def test_index_refuses_a_run_that_is_not_a_run_folder(tmp_path, capsys):
    """`index --run TYPO` built the index anyway, with a warning that it could not hold out the validation normals
    (meant for a run whose data moved), so predict then gave no combined score."""
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    feats = tmp_path / "feats"
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--patches", "--out", str(feats), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "--features", str(feats), "--coreset", "1", "--run", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "knn")]) == 2
    assert f"{tmp_path / 'nope'}: no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "knn" / "knn.json").exists()


def test_zero_shot_with_a_cnn_backbone_says_it_needs_a_clip_one(tmp_path, capsys):
    """`zero-shot --backbone tf_efficientnet_lite0` loaded the CNN and then said "TextScorer needs a clip: backbone,
    a UniNet built on one, or an open_clip model; got TimmCNN": a class name, no flag and no fix."""
    data = write_texture_set(tmp_path / "data", n_train=2, n_good=1, n_bad=1)
    assert main(["zero-shot", "--data", str(data), "--backbone", "tiny", "--weights", "random",
                 "--out", str(tmp_path / "z"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--backbone tiny is not a clip: backbone" in err and "fix: --backbone clip:ViT-B-16" in err
    assert "TextScorer" not in err and not (tmp_path / "z").exists()


def test_run_naming_a_file_other_than_model_pt_is_refused(tmp_path, capsys):
    """`--run RUN/model.pt` is the run (the help says so), but `--run RUN/checkpoint.pt` was taken as RUN too, so
    evaluate scored model.pt, not the file named; `--run notes.txt` said "`.`: model.pt not found". `--runs` and
    `predict --ensemble` now take a model.pt as `--run` does (they said "no such run folder")."""
    data, run = _run(tmp_path, n_train=4, n_good=1, n_bad=1)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run / "checkpoint.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.pt'}: --run takes a run folder (or its model.pt), not this file" in err
    assert "evaluate --checkpoint FILE" in err
    assert main(["predict", "--run", str(run / "config.yaml"), "--data", str(data), "--out", str(tmp_path / "p")]) == 2
    assert f"{run / 'config.yaml'}: --run takes a run folder" in capsys.readouterr().err
    assert main(["ensemble", "--runs", str(run / "model.pt"), str(run / "train_log.jsonl"), "--quiet"]) == 2
    assert f"{run / 'train_log.jsonl'}: --runs takes a run folder" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run / "model.pt"), "--quiet", "--threads", "1"]) == 0


def test_quiet_help_says_what_each_command_prints():
    """Every command's --quiet said "print the result as JSON": only evaluate and ensemble switch to JSON with it;
    extract, predict, calibrate, export-model and zero-shot print JSON either way, and demo prints nothing."""
    from uninet_feat.cli import build_parser
    helps = {n: sp.options["quiet"].help for n, sp in build_parser().commands.items() if "quiet" in sp.options}
    assert {n for n, h in helps.items() if "print the result as JSON" in h} == {"evaluate", "ensemble"}
    for n in ("extract", "predict", "calibrate", "export-model", "zero-shot"):
        assert "printed as JSON either way" in helps[n], n
    assert "summary" in helps["demo"] and "JSON" not in helps["demo"]


def test_an_ivfpq_index_of_too_few_patches_names_the_flag_that_works(tmp_path, capsys):
    """`index --kind ivfpq` over a small bank said "use kind=flat ..., or lower nbits/nlist": no such flags exist."""
    data = write_texture_set(tmp_path / "data", n_train=2, n_good=1, n_bad=1)
    feats = tmp_path / "feats"
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--patches", "--out", str(feats), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "--features", str(feats), "--kind", "ivfpq", "--out", str(tmp_path / "knn")]) == 2
    assert "(fix: `index --kind flat` (or hnsw)" in capsys.readouterr().err


def test_evaluate_refuses_a_thread_count_below_one(tmp_path, capsys):
    """`evaluate --threads -1` ended in torch's RuntimeError traceback, and `--threads 0` silently used torch's
    count instead of the run's (the help: "default: the run's")."""
    _, run = _run(tmp_path, n_train=4, n_good=1, n_bad=1)
    capsys.readouterr()
    for n in ("-1", "0"):
        assert main(["evaluate", "--run", str(run), "--threads", n, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"threads must be an integer >= 1, got {n}" in err and "--threads 2" in err and "Traceback" not in err


def test_a_flat_normals_folder_calibrates_a_run_of_one_group_as_that_group(tmp_path, recwarn):
    """A run trained on one category of an MVTec-style root (group `cat`), calibrated with `--normals DIR` on a flat
    folder, counted those normals as a second group of no name: "one threshold for all 2 groups: ...,  has 4, cat has
    0" at every evaluate, since calibration.json recorded per-group fields for a one-group run."""
    import shutil
    data = write_texture_set(tmp_path / "data" / "cat", n_train=6, n_good=4, n_bad=1)
    run = tmp_path / "run"
    assert main(tiny_train_args(tmp_path / "data") + ["--out", str(run), "--threads", "1"]) == 0
    normals = tmp_path / "normals"
    shutil.copytree(data / "test" / "good", normals)
    recwarn.clear()
    assert main(["calibrate", "--run", str(run), "--normals", str(normals), "--quiet"]) == 0
    assert not [w for w in recwarn if "groups" in str(w.message)]
    cal = json.loads((run / "calibration.json").read_text())
    assert "val_groups" not in cal and cal["n_val_normals"] == 4


def test_a_negative_pixel_budget_is_refused_and_zero_bins_every_map(tmp_path, capsys):
    """`--pixel-budget -5` was taken as 0 (every map binned) without a word; 0 is the documented flat-memory
    setting: its figures are the binned ones, and equal the exact ones within the bins' resolution."""
    _, run = _run(tmp_path, n_train=4, n_good=2, n_bad=2)
    capsys.readouterr()
    for cmd in (["evaluate", "--run", str(run)], ["ensemble", "--runs", str(run)]):
        assert main(cmd + ["--pixel-budget", "-5", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--pixel-budget must be an integer >= 0" in err and "got -5" in err and "Traceback" not in err
    reps = []
    for budget in ("0", str(1 << 28)):
        assert main(["evaluate", "--run", str(run), "--pixel-budget", budget, "--quiet", "--threads", "1"]) == 0
        reps.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert reps[0]["pixel_metrics"] != reps[1]["pixel_metrics"]          # binned, then exact
    assert abs(reps[0]["pixel_auroc"] - reps[1]["pixel_auroc"]) < 0.01


def test_an_out_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    """`predict --out preds.csv` (an existing file) scored every image, then failed at mkdir with a
    FileExistsError traceback; a path below a file failed the same way. Refused first, naming the file."""
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    f = tmp_path / "preds.csv"
    f.write_text("kept\n")
    for out, says in ((f, f"--out {tmp_path / 'preds'}"), (f / "sub", "whose folders are not files")):
        for cmd in (["predict", "--run", str(tmp_path / "norun"), "--data", str(data)],
                    tiny_train_args(data)):
            capsys.readouterr()
            assert main(cmd + ["--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert "--out must be a folder" in err and says in err and "Traceback" not in err
    assert f.read_text() == "kept\n" and not (tmp_path / "norun").exists()


def test_calibrate_data_keeps_the_runs_split_csv(tmp_path, capsys):
    """`calibrate --run RUN --data ROOT` (the docs: where the training data is now) dropped the run's split CSV,
    so the data's own layout drew the validation normals: other images, training ones among them, and other
    thresholds. The CSV is kept, found below the new root when the data moved with it, and refused by name when
    it is gone."""
    import shutil
    data = write_texture_set(tmp_path / "data", n_train=10, n_good=3, n_bad=3)
    rows = [("path", "split", "label")]
    for p in sorted(data.rglob("*.png")):
        rel = p.relative_to(data).as_posix()
        if not rel.startswith("ground_truth"):   # the CSV trains on test/good too: not the layout's split
            rows.append((rel, "test" if "/spot/" in rel else "train", "spot" if "/spot/" in rel else "good"))
    with open(data / "split.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    run = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--split-csv", str(data / "split.csv"), "--val-fraction", "0.3",
                                         "--threads", "1", "--out", str(run)]) == 0
    first = json.loads((run / "calibration.json").read_text())["val_scores"]
    assert main(["calibrate", "--run", str(run), "--data", str(data), "--quiet"]) == 0
    assert json.loads((run / "calibration.json").read_text())["val_scores"] == first
    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))   # the data and its CSV moved together
    assert main(["calibrate", "--run", str(run), "--data", str(moved), "--quiet"]) == 0
    assert json.loads((run / "calibration.json").read_text())["val_scores"] == first
    import pytest
    with pytest.warns(UserWarning, match=r"trained with the split CSV .*read by its own layout.*--split-csv"):
        assert main(["evaluate", "--run", str(run), "--data", str(moved), "--quiet", "--threads", "1"]) == 0
    (moved / "split.csv").unlink()
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--data", str(moved), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"split CSV {data / 'split.csv'}, which is gone" in err and "pass --split-csv" in err


def test_an_out_that_is_an_input_folder_or_holds_a_run_is_refused_before_any_work(tmp_path, capsys):
    """`predict --run R --out R` or `export-model --run R --out R` replaced R's config.yaml and env.json (its
    training record) with the command's: `evaluate --checkpoint` then refused R's own checkpoints and
    `train --resume` continued from predict's config. Such an --out, another input folder, or a folder that holds
    a run or another command's outputs is refused before any work; a re-run into its own --out is not."""
    import yaml
    from uninet_feat import cli
    from uninet_feat.errors import BadInputError
    import pytest
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"not read")
    (run / "config.yaml").write_text(yaml.safe_dump({"backbone": "tiny", "epochs": 1}))
    killed = tmp_path / "killed"   # a run killed in its first epoch: a model config, no model yet
    killed.mkdir()
    (killed / "config.yaml").write_text(yaml.safe_dump({"backbone": "tiny", "epochs": 3, "data": "d"}))
    outputs = {}
    for name, record in (("feats", {"command": "extract"}), ("knn", {"command": "index"}),
                         ("head", {"command": "train-head"}), ("pred", {"command": "predict"}),
                         ("zs", {"backbone": "clip:tiny", "epochs": 10, "patch_mode": "tokens"})):
        outputs[name] = tmp_path / name
        outputs[name].mkdir()
        (outputs[name] / "config.yaml").write_text(yaml.safe_dump(record))
    data = tmp_path / "data"
    data.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    refused = [
        (["predict", "--run", str(run), "--data", str(data), "--out", str(run)], "is the --run folder"),
        (["export-model", "--run", str(run / "model.pt"), "--out", str(run)], "is the --run folder"),
        (["predict", "--run", str(killed), "--data", str(data), "--ensemble", str(run), "--out", str(run)],
         "is the --ensemble folder"),
        (["predict", "--run", str(killed), "--data", str(data), "--knn", str(outputs["knn"]),
          "--out", str(outputs["knn"])], "is the --knn folder"),
        (["predict", "--run", str(killed), "--data", str(data), "--head", str(outputs["pred"]),
          "--head", str(outputs["head"]), "--out", str(outputs["head"] / ".")], "is the --head folder"),
        (["index", "--features", str(outputs["feats"]), "--out", str(outputs["feats"])], "is the --features folder"),
        (["extract", "--data", str(data), "--out", str(run)], "holds a trained run (model.pt)"),
        (["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", "w", "--out", str(killed)],
         "outputs of `train`"),
        (["cluster", "--features", str(outputs["feats"]), "--out", str(outputs["pred"])], "outputs of `predict`"),
        (["predict", "--run", str(killed), "--data", str(data), "--out", str(outputs["zs"])], "outputs of `zero-shot`"),
    ]
    for argv, says in refused:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "fix: give --out a folder of its own" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before   # nothing written
    ap = cli.build_parser()
    for argv in (["predict", "--run", str(run), "--data", str(data), "--out", str(outputs["pred"])],   # its own
                 ["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", "w",
                  "--out", str(outputs["zs"])],
                 ["predict", "--run", str(run), "--data", str(data), "--out", str(run / "predictions")],
                 ["train", "--out", str(run)]):   # train refuses a used run folder itself, or resumes it
        cli._user_paths(ap.parse_args(argv))
    with pytest.raises(BadInputError, match="is the --run folder"):   # the check is _user_paths', for main's callers
        cli._user_paths(ap.parse_args(["predict", "--run", str(run), "--data", str(data), "--out", str(run)]))


def test_runs_and_normals_expand_the_home_folder_and_split_stays_a_word(tmp_path, monkeypatch):
    """docs/bad_input.md promises `~` in any path flag; `ensemble --runs` and `calibrate --normals` kept it
    literally (a quoted '~/r1', or one from a --config YAML)."""
    from uninet_feat import cli
    monkeypatch.setenv("HOME", str(tmp_path))
    ap = cli.build_parser()
    a = ap.parse_args(["ensemble", "--runs", "~/r1", "~/r2"])
    cli._user_paths(a)
    assert a.runs == [str(tmp_path / "r1"), str(tmp_path / "r2")]
    a = ap.parse_args(["calibrate", "--run", "~/r", "--normals", "~/line_normals"])
    cli._user_paths(a)
    assert a.normals == str(tmp_path / "line_normals")
    a = ap.parse_args(["calibrate", "--run", "~/r", "--normals", "split"])
    cli._user_paths(a)
    assert a.normals == "split" and cli._absolute("normals", "split") == "split"
    assert cli._absolute("normals", "n") == os.path.abspath("n")


def test_repeated_flags_replace_a_configs_list(tmp_path):
    """`predict --config C --head B` scored with C's heads and B: a repeatable flag (action append) added to the
    config's list, though flags override the config."""
    import yaml
    from uninet_feat import cli
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": "r", "data": "d", "out": "o", "head": ["/h/A"]}))
    for flags, want in (([], ["/h/A"]), (["--head", "/h/B"], ["/h/B"]),
                        (["--head", "/h/B", "--head", "/h/C"], ["/h/B", "/h/C"]), ([], ["/h/A"])):
        argv = ["predict", "--config", str(cfg), *flags]
        ap = cli.build_parser()
        cli._apply_config(ap, argv)
        assert ap.parse_args(argv).head == want, flags
    cfg.write_text(yaml.safe_dump({"run": "r", "data": "d", "out": "o", "head": "/h/A"}))   # one, not a list
    ap = cli.build_parser()
    cli._apply_config(ap, ["predict", "--config", str(cfg)])
    assert ap.parse_args(["predict", "--config", str(cfg)]).head == ["/h/A"]
    ap = cli.build_parser()   # without a config: the flags alone, and no flag none
    assert ap.parse_args(["predict", "--run", "r", "--data", "d", "--out", "o"]).head == []
    appends = [a.dest for sp in ap.commands.values() for a in sp._actions if isinstance(a, cli._AppendOverDefault)]
    assert appends == ["head"]   # every repeatable flag is one (argparse's own append keeps the config's list)


def _usage_onnx_decode(tmp_path):
    """The `decode` of docs/usage.md's ONNX Runtime block, run as the block is (test_deploy.py runs it whole), with
    a stand-in for onnxruntime and no path to score."""
    import re
    import sys
    import types
    from pathlib import Path
    text = (Path(__file__).parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    block = re.search(r"Scoring with nothing but ONNX Runtime.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "model.json").write_text("{}")
    ort = types.ModuleType("onnxruntime")
    ort.InferenceSession = lambda path: None
    saved = sys.modules.get("onnxruntime")
    sys.modules["onnxruntime"] = ort
    try:
        space = {"MODEL_DIR": str(tmp_path), "paths": []}
        exec(compile("\n".join(line[2:] for line in block.splitlines()), "usage.md", "exec"), space)
    finally:
        if saved is None:
            del sys.modules["onnxruntime"]
        else:
            sys.modules["onnxruntime"] = saved
    return space["decode"]


def test_the_onnx_snippets_decode_reads_every_file_as_load_image(tmp_path):
    """docs/usage.md's deployment snippet turned the file as opened with `ImageOps.exif_transpose`, which read an
    uncompressed TIFF with a quarter-turn orientation tag through PIL's memory map: its rows re-cut, at its stored
    size (docs/bad_input.md's EXIF row), where `load_image` reads it upright. It decodes from memory now and turns
    what PIL left: the pixels of `load_image`, for JPEG, PNG, WebP and TIFF (compressed or not) in every mode the
    snippet names, for every orientation."""
    import numpy as np
    from PIL import Image
    from uninet_feat.data import load_image
    decode = _usage_onnx_decode(tmp_path)
    yy, xx = np.mgrid[0:40, 0:24]
    rgb = np.stack([xx * 10 + 1, yy * 6, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)
    pictures = {"RGB": Image.fromarray(rgb), "L": Image.fromarray(rgb[..., 0]),
                "RGBA": Image.fromarray(np.dstack([rgb, 255 - rgb[..., :1]])), "P": Image.fromarray(rgb).convert("P"),
                "I;16": Image.fromarray((xx * 2500 + yy * 17 + 1).astype(np.uint16))}
    files = 0
    for (mode, img), turn in ((m, t) for m in pictures.items() for t in (1, 2, 3, 5, 6, 8)):
        exif = Image.Exif()
        exif[0x0112] = turn
        kinds = [("tif", {}), ("tif", {"compression": "tiff_lzw"}), ("png", {})]
        if mode in ("RGB", "L"):
            kinds += [("jpg", {"quality": 95}), ("webp", {"lossless": True})]
        for k, (ext, kw) in enumerate(kinds):
            p = tmp_path / f"{mode.replace(';', '')}_{turn}_{k}.{ext}"
            img.save(p, exif=exif, **kw)
            want = load_image(p)
            got = decode(p)
            assert got.shape == (1, 3, *want.shape[:2]), (p.name, got.shape, want.shape)
            np.testing.assert_array_equal(got[0].transpose(1, 2, 0), want, err_msg=p.name)
            files += 1
    assert files == 5 * 6 * 3 + 2 * 6 * 2


def test_ctrl_c_before_the_first_checkpoint_does_not_say_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C in train's first epoch said "re-run with --resume to continue", and that resume was refused: no
    checkpoint.pt yet. It says so and that the same command starts over; once checkpoint.pt is there, --resume."""
    import uninet_feat.train

    def interrupted(cfg, out, **kw):
        os.makedirs(out, exist_ok=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(uninet_feat.train, "train", interrupted)
    out = tmp_path / "run"
    argv = tiny_train_args(tmp_path / "data") + ["--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "--resume to continue" not in err and "re-run the same command (without --resume) to start over" in err
    (out / "checkpoint.pt").write_bytes(b"")
    assert main(argv) == 130
    assert "re-run with --resume to continue" in capsys.readouterr().err
