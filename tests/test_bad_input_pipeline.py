"""Bad input at the pipeline level: each case gives a clear error naming the file and the fix."""
import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from uninet_feat.checkpoint import build_from_checkpoint, save_checkpoint
from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.io import atomic_write_text
from uninet_feat.model import UniNet
from uninet_feat.runs import load_samples, train_val_samples

from _tiny import TinyBackbone, register_tiny, write_texture_set

register_tiny()


def test_folder_without_normal_images(tmp_path):
    from PIL import Image
    (tmp_path / "hole").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "hole" / "a.png")
    cfg = load_config(None, {"data": str(tmp_path)})
    with pytest.raises(BadInputError, match="no normal training images"):
        train_val_samples(load_samples(cfg), cfg)


def test_empty_folder_via_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no images" in err and str(tmp_path / "empty") in err


def test_command_line_warnings_are_one_line_for_users(tmp_path):
    """From the command line a warning reads "warning: ...", without the module path and the source line that
    Python's default display adds (they are for developers, and repeated them under every warning)."""
    import subprocess
    import sys
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "-m", "uninet_feat", "train", "--data", str(tmp_path / "empty"),
                        "--out", str(tmp_path / "run"), "--val-every", "3", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no images" in p.stderr
    assert "warning: --val-every has no effect" in p.stderr
    assert "warnings.warn" not in p.stderr and "UserWarning" not in p.stderr and ".py:" not in p.stderr


def test_unknown_config_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochz: 3\n")
    with pytest.raises(BadInputError, match="unknown config keys.*epochz"):
        load_config(p)


def test_checkpoint_from_another_backbone(tmp_path):
    m = UniNet(TinyBackbone((8, 16, 32)))
    p = save_checkpoint(tmp_path / "m.pt", m, {**load_config(None), "backbone": "tiny"})
    ck = torch.load(p, weights_only=True)
    ck["backbone"]["channels"] = [4, 8, 16]  # config says another backbone than the weights
    torch.save(ck, p)
    with pytest.raises(BadInputError, match="does not match"):
        build_from_checkpoint(p)


def test_checkpoint_from_newer_version(tmp_path):
    m = UniNet(TinyBackbone())
    p = save_checkpoint(tmp_path / "m.pt", m, load_config(None))
    ck = torch.load(p, weights_only=True)
    ck["format_version"] = 99
    torch.save(ck, p)
    with pytest.raises(BadInputError, match="newer"):
        build_from_checkpoint(p)


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    import os
    real = os.replace

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(BadInputError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.setattr(os, "replace", real)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def test_nan_input_stops_training_with_a_message(tmp_path):
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 1, "batch_size": 2, "lr": 1e30,
                                                       "channels_last": False, "val_fraction": 0.0})
    with pytest.raises(BadInputError, match="loss became"):
        train(cfg, tmp_path / "run", quiet=True)


def test_epoch_meter_keeps_the_float_sums_of_before_and_the_first_nonfinite_loss():
    from uninet_feat.train import _EpochMeter
    g = torch.Generator().manual_seed(0)
    steps = [{"loss": torch.rand((), generator=g) * 7, "cos": torch.rand((), generator=g), "margin_abnormal": 0.0}
             for _ in range(9)]
    meter = _EpochMeter()
    for i, terms in enumerate(steps):
        meter.add(terms, i)
    assert meter.bad() is None
    for k in steps[0]:   # the log's means of before: Python floats summed in step order, to the last bit
        expect = 0.0
        for terms in steps:
            expect += float(terms[k])
        assert meter.means(9)[k] == expect / 9
    meter.add({"loss": torch.tensor(float("inf"))}, 9)
    meter.add({"loss": torch.tensor(float("nan"))}, 10)
    assert meter.bad() == (9, float("inf"))   # the earliest bad step, not the last


def _train_with_a_poisoned_step(tmp_path, monkeypatch, at: int, poison):
    """Train 3 epochs of 4 steps (the tiny backbone) with ``poison(loss)`` in place of the loss of call ``at`` (1-based);
    returns (the error train raised, the number of loss calls)."""
    import uninet_feat.train as train_mod
    real, calls = UniNet.loss, []

    def loss(self, *a, **kw):
        terms = real(self, *a, **kw)
        calls.append(1)
        return {**terms, "loss": poison(terms["loss"])} if len(calls) == at else terms
    monkeypatch.setattr(UniNet, "loss", loss)
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=1, n_bad=1)
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "epochs": 3, "batch_size": 2, "channels_last": False,
                                                       "val_fraction": 0.0})
    with pytest.raises(BadInputError) as e:
        train_mod.train(cfg, tmp_path / "run", quiet=True)
    return e.value, len(calls)


def test_a_nonfinite_loss_seen_late_stops_before_its_epoch_is_saved(tmp_path, monkeypatch):
    """On a GPU the loss is looked at every CHECK_EVERY steps, not each step: a NaN is still named with its epoch and
    step, and the run keeps the last good epoch's checkpoint (forced here on the CPU)."""
    import uninet_feat.train as train_mod
    monkeypatch.setattr(train_mod, "_check_every", lambda device: train_mod.CHECK_EVERY)
    err, calls = _train_with_a_poisoned_step(tmp_path, monkeypatch, 6, lambda loss: loss * float("nan"))  # epoch 2 step 2
    assert re.search(r"loss became nan at epoch 2 \(step 2\)", str(err)), err
    assert calls == 8   # the epoch ran out before the look (4 steps < CHECK_EVERY)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 1


def test_weights_made_nonfinite_by_an_epochs_last_step_are_not_saved(tmp_path, monkeypatch):
    """A NaN gradient under a finite loss (here sqrt'(0) on the epoch's last step) makes the weights NaN while every
    loss of that epoch looked fine: checkpoint.pt then held NaN weights, the next epoch's first loss stopped the run,
    and the --resume its message advises continued from the NaN weights. The epoch is now refused before it is saved."""
    err, _ = _train_with_a_poisoned_step(tmp_path, monkeypatch, 8,   # epoch 2's last step: loss finite, gradient NaN
                                         lambda loss: loss + torch.sqrt((loss - loss.detach()).abs()))
    assert re.search(r"weights became non-finite in epoch 2 .*e\.g\. [a-z].*--resume", str(err)), err
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_weights_made_nonfinite_in_the_first_epoch_say_nothing_was_saved_to_resume(tmp_path, monkeypatch):
    """In epoch 1 there is no checkpoint.pt: the message said the last finished epoch was in it and advised --resume,
    which met "nothing to resume" (an audit, session 52)."""
    err, _ = _train_with_a_poisoned_step(tmp_path, monkeypatch, 4,   # epoch 1's last step
                                         lambda loss: loss + torch.sqrt((loss - loss.detach()).abs()))
    assert re.search(r"weights became non-finite in epoch 1 .*no epoch was finished before it", str(err)), err
    assert "--resume" not in err.fix.replace("saved to --resume from", "") and "run the command again" in err.fix
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_skip_bad_trains_around_a_corrupt_file(tmp_path):
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    (data / "train" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    base = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 2,
            "channels_last": False, "val_fraction": 0.0}
    with pytest.raises(BadInputError, match="broken.png"):
        train(load_config(None, {"data": str(data)}, base=base), tmp_path / "r1", quiet=True)
    with pytest.warns(UserWarning, match="broken.png"):
        train(load_config(None, {"data": str(data), "skip_bad": True}, base=base), tmp_path / "r2", quiet=True)
    assert (tmp_path / "r2" / "model.pt").exists()
    cfg = load_config(None, {"data": str(data), "skip_bad": True, "val_fraction": 0.8}, base=base)
    val = train_val_samples(load_samples(cfg), cfg)[1]
    assert any(s.path.name == "broken.png" for s in val)         # this seed's split holds it out
    with pytest.warns(UserWarning, match="broken.png"):
        train(cfg, tmp_path / "r3", quiet=True)
    cal = json.loads((tmp_path / "r3" / "calibration.json").read_text())
    assert [Path(p).name for p in cal["skipped"]] == ["broken.png"] and cal["n_val_normals"] == len(val) - 1


def test_train_names_every_unreadable_image_before_training(tmp_path, capsys, monkeypatch):
    """Without --skip-bad, train checks the training AND validation normals before building the model, and one
    error counts and names every unreadable one with the fix (not the first it would have met)."""
    import uninet_feat.train as tr
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=1, n_bad=1)
    cfg = load_config(None, {"data": str(data)})
    fit, val = train_val_samples(load_samples(cfg), cfg)   # the split train makes (1 validation normal)
    bad = [fit[0].path, fit[3].path, val[0].path]   # a validation normal is read only after the last epoch
    for p in bad:
        p.write_bytes(p.read_bytes()[:100])
    monkeypatch.setattr(tr, "make_model", lambda cfg: pytest.fail("the model was built before the check"))
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 of 8 images are unreadable:") and err.count("Truncated File Read") == 3, err
    assert all(f"  {p}: corrupt image" in err for p in bad) and "--skip-bad" in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_small_set_warns_when_each_epoch_leaves_a_quarter_out(tmp_path):
    """6 training images at batch 4: one step per epoch, 2 left out; a warning says so and names the batch sizes
    that use them all (dividing 6, at least 2). The batching itself is unchanged (one step)."""
    import json
    import warnings
    from uninet_feat.train import dropped_items_note, train
    assert dropped_items_note(15, 8) == ("15 training images at batch size 8: each epoch runs 1 step and leaves 7 out "
                                         "(a different 7 each epoch); use --batch-size 5 or 15 to use them all")
    assert dropped_items_note(13, 8).endswith("use --batch-size 13 to use them all")   # prime: only all at once
    assert "2 steps and leaves 3 out" in dropped_items_note(11, 4, "tiles")
    assert "(a different one each epoch); use --batch-size 3 to" in dropped_items_note(3, 2)
    for n, b in ((31, 8), (16, 8), (8, 8), (3, 8), (9, 1)):   # under a quarter left out, or none
        assert dropped_items_note(n, b) is None
    base = {"backbone": "tiny", "weights": "random", "image_size": 32, "epochs": 1, "batch_size": 4,
            "channels_last": False, "val_fraction": 0.0}
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1, size=32)
    with pytest.warns(UserWarning, match=r"6 training images at batch size 4: each epoch runs 1 step and leaves 2 "
                                         r"out .*use --batch-size 3 or 6 to use them all"):
        train(load_config(None, {"data": str(data)}, base=base), tmp_path / "r6", quiet=True)
    assert json.loads((tmp_path / "r6" / "train_log.jsonl").read_text())["steps"] == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training images at batch size")
        train(load_config(None, {"data": str(data), "batch_size": 3}, base=base), tmp_path / "r3", quiet=True)


def test_skip_bad_in_predict_extract_and_evaluate(tmp_path, capsys):
    """A truncated test image stops predict / extract / evaluate with its name; with --skip-bad each command
    finishes, warns with the name and lists it as `skipped` in its output."""
    import json
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    good = (data / "test" / "good" / "000.png").read_bytes()
    broken = data / "test" / "good" / "truncated.png"
    broken.write_bytes(good[: len(good) // 2])
    commands = {"predict": ["predict", "--run", str(run), "--data", str(data), "--no-overlays", "--quiet"],
                "extract": ["extract", "--run", str(run), "--data", str(data), "--quiet"],
                "evaluate": ["evaluate", "--run", str(run), "--quiet"]}
    for name, argv in commands.items():
        out = ["--json", str(tmp_path / "m.json")] if name == "evaluate" else ["--out", str(tmp_path / name)]
        capsys.readouterr()
        assert main(argv + out) == 2, name
        err = capsys.readouterr().err
        assert "truncated.png" in err and "--skip-bad" in err, err
        with pytest.warns(UserWarning, match="truncated.png") as seen:
            assert main(argv + out + ["--skip-bad"]) == 0, name
        said = [str(w.message) for w in seen if "truncated.png" in str(w.message)]
        assert not any("pass --skip-bad" in m for m in said), said   # it was passed
    assert json.loads((tmp_path / "predict" / "summary.json").read_text())["skipped"] == [str(broken)]
    rows = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert str(broken) not in {r["path"] for r in rows} and len(rows) == 4 + 2 + 2
    assert json.loads((tmp_path / "extract" / "manifest.json").read_text())["skipped"] == [str(broken)]
    assert json.loads((tmp_path / "m.json").read_text())["skipped"] == [str(broken)]


def test_a_mask_of_the_wrong_size_stops_evaluate_only(tmp_path, capsys):
    """predict and extract read no mask, so a defect whose mask has another size is scored like any image;
    evaluate, which needs it, names the mask and the fix."""
    from PIL import Image
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    mask = sorted((data / "ground_truth").rglob("*_mask.png"))[0]
    Image.open(mask).resize((50, 60)).save(mask)
    assert main(["predict", "--run", str(run), "--data", str(data), "--threshold=-1e9", "--save-maps", "--quiet",
                 "--out", str(tmp_path / "p")]) == 0   # every image flagged: overlays and maps read no mask either
    assert len(list((tmp_path / "p" / "overlays").iterdir())) == len(list((tmp_path / "p" / "maps").glob("*.npy")))
    assert main(["extract", "--run", str(run), "--data", str(data), "--quiet", "--out", str(tmp_path / "f")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert mask.name in err and "50x60" in err and "fix:" in err, err
    # --skip-bad leaves out the mask only (it left the readable image out of the image metrics too)
    with pytest.warns(UserWarning, match=f"skipping the mask .*{mask.name}"):
        assert main(["evaluate", "--run", str(run), "--skip-bad", "--json", str(tmp_path / "e.json"),
                     "--quiet"]) == 0
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["n_test"] == 3 and rep["pixel_metrics_without"] == 1 and not rep["skipped"]


def test_a_run_folder_that_does_not_exist_is_named_as_such(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: no such run folder" in err and "uninet-feat train" in err


def test_cli_small_input_mistakes_get_one_line_errors(tmp_path, capsys):
    """Unwritable outputs and conflicting flags: exit 2 with one line naming the path/flags (no traceback);
    `--run RUN/model.pt` is taken as the run folder."""
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run / "model.pt"), "--quiet", "--json", "/proc/nope/m.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/proc/nope/m.json" in err and "Traceback" not in err, err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["predict", "--run", str(run), "--data", str(data), "--quiet", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err, err
    assert main(["train-head", "--features", str(tmp_path), "--task", "binary", "--defects-only",
                 "--out", str(tmp_path / "h")]) == 2
    assert "--task multiclass" in capsys.readouterr().err


def test_interrupt_message_says_how_each_command_continues(tmp_path, capsys, monkeypatch):
    import uninet_feat.workflows as wf

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(wf, "extract_cmd", interrupted)
    assert main(["extract", "--data", str(tmp_path), "--out", str(tmp_path / "f")]) == 130
    err = capsys.readouterr().err
    assert "re-run the same command" in err and "--resume" not in err


def test_numeric_options_out_of_range_are_refused_before_any_work(tmp_path, capsys):
    """A batch size of 0 was a ZeroDivisionError, a negative one a torch traceback, 0 epochs an untrained model."""
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1, size=32)
    for flags, said in ((["--batch-size", "0"], "batch_size must be an integer >= 1, got 0 (fix: e.g. `batch_size: 8` "
                                                "in a config file, or --batch-size 8)"),
                        (["--batch-size", "-3"], "batch_size must be an integer >= 1"),
                        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
                        (["--val-fraction", "1"], "val_fraction must be a number >= 0 and < 1"),
                        (["--image-size", "40"], "image_size 40 must be a multiple of 32 for this backbone (tiny: its bottleneck "
                                                  "works at stride 32) (fix: --image-size 32 or 64")):
        rc = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--backbone", "tiny",
                   "--weights", "random", *flags, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and "fix: " in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "r").exists()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 5e-3\ntile: 64\ntile_overlap: 64\n")   # YAML reads 5e-3 as a string
    with pytest.raises(BadInputError, match=r"tile_overlap must be an integer >= 0 and < tile \(64\)") as e:
        load_config(cfg_file)
    assert e.value.fix == "e.g. `tile_overlap: 0` in a config file"   # it said `tile-overlap 0`: no such flag or key
    cfg_file.write_text("lr: 5e-3\n")
    assert load_config(cfg_file)["lr"] == 0.005


def test_train_says_its_split_and_warns_of_test_images_evaluate_would_refuse(tmp_path, capsys):
    """Training reads no test image, so a bad one surfaced only at evaluate, after the last epoch."""
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=2)
    broken = data / "test" / "good" / "truncated.png"
    broken.write_bytes((data / "test" / "good" / "000.png").read_bytes()[:60])
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"evaluate will refuse test images") as seen:
        assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                     "--epochs", "1", "--batch-size", "2", "--out", str(run)]) == 0
    assert any(str(broken) in str(w.message) for w in seen) and (run / "model.pt").exists()
    assert ("3 training images, 1 validation normals (threshold, label-free choices), 5 test images (2 with "
            "defects) left for evaluate") in capsys.readouterr().out


def test_damaged_run_files_are_named_with_their_fix(tmp_path, capsys):
    """A damaged calibration.json (predict, evaluate), config.yaml (train --resume) or feature manifest gives
    one line naming the file and the fix, not a JSON / YAML traceback."""
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1)
    run = tmp_path / "run"
    args = ["--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
            "--batch-size", "2", "--quiet"]
    assert main(["train", *args, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["extract", "--run", str(run), "--data", str(data), "--quiet", "--out", str(tmp_path / "f")]) == 0
    (run / "calibration.json").write_text('{"bad":')
    capsys.readouterr()
    for cmd in (["predict", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "p"), "--quiet"],
                ["evaluate", "--run", str(run), "--quiet"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert f"{run / 'calibration.json'}: cannot read this JSON file" in err, err
        assert f"uninet-feat calibrate --run {run}" in err and "Traceback" not in err
    (run / "config.yaml").write_text("garbage: [")
    assert main(["train", *args, "--epochs", "2", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: cannot read this YAML file" in err and "checkpoint.pt" in err
    (tmp_path / "f" / "manifest.json").write_text("{")
    assert main(["index", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "k")]) == 2
    assert f"{tmp_path / 'f' / 'manifest.json'}: cannot read this JSON file" in capsys.readouterr().err


def test_cli_paths_and_odd_files_are_handled_before_any_work(tmp_path, capsys, monkeypatch, write_image):
    """`--json` naming a folder is refused before evaluating (it failed at the end, naming a temp file); `~`
    in a path flag is the home folder; `index --coreset 2` is refused like 0; a .gif or a broken symlink named
    .png beside the images is said, not dropped silently."""
    import os
    assert main(["evaluate", "--run", str(tmp_path), "--json", str(tmp_path)]) == 2
    assert f"{tmp_path}: --json names a folder, not a file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")   # a folder it cannot write in: refused before the scoring too
    assert main(["evaluate", "--run", str(tmp_path), "--csv", str(tmp_path / "notes.txt" / "out" / "s.csv")]) == 2
    assert f"--csv cannot be written: {tmp_path / 'notes.txt'} is not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["evaluate", "--run", str(tmp_path), "--json", str(ro / "m.json")]) == 2
        assert "is read-only" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["evaluate", "--run", "~/nope", "--quiet"]) == 2
    assert f"{tmp_path / 'nope'}: no such run folder" in capsys.readouterr().err
    from uninet_feat.downstream import KNNScorer
    with pytest.raises(BadInputError, match=r"coreset ratio must be in \(0, 1\], got 2"):
        KNNScorer(coreset_ratio=2)
    for i in range(2):
        write_image(f"line/good/{i}.png")
    write_image("line/good/anim.gif")
    os.symlink(tmp_path / "gone.png", tmp_path / "line" / "good" / "link.png")
    from uninet_feat.data.layouts import discover
    with pytest.warns(UserWarning, match=r"2 file\(s\) not read \(anim.gif, link.png\)"):
        assert len(discover(tmp_path / "line")) == 2


def test_a_mask_that_does_not_fit_is_not_called_an_unreadable_image(tmp_path):
    """A mask of another size was listed as "1 of N images is unreadable", although the image reads."""
    from PIL import Image
    from uninet_feat.data.dataset import check_samples
    from uninet_feat.data.layouts import Sample
    img, bad_img = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(img)
    bad_img.write_bytes(b"not a png")
    mask = tmp_path / "a_mask.png"
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(mask)
    with pytest.raises(BadInputError, match=r"1 of 1 images has a mask that cannot be used:\n.*mask is 60x40 px"):
        check_samples([Sample(img, "test", "crack", mask)])
    with pytest.raises(BadInputError, match=r"2 of 2 images cannot be used \(1 unreadable, 1 with a mask"):
        check_samples([Sample(img, "test", "crack", mask), Sample(bad_img, "test", "good")])


def test_train_names_bad_test_images_in_the_same_error_as_bad_training_ones(tmp_path, capsys):
    """A corrupt training image was named alone; the corrupt test image came up one run later."""
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=6, n_good=1, n_bad=1)
    (data / "train" / "good" / "zz.png").write_bytes(b"\x89PNG truncated")
    (data / "test" / "good" / "zz.png").write_bytes(b"\x89PNG truncated")
    args = ["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
            "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train/good/zz.png" in err and "test/good/zz.png" in err and "which evaluate would refuse" in err
    (data / "train" / "good" / "zz.png").unlink()
    (data / "test" / "good" / "zz.png").unlink()
    assert main(args) == 0   # what a first train prints: the split, then the test labels and their masks
    out = capsys.readouterr().out
    assert "test labels: good 1, spot 1; masks for 1 of 1 defect images" in out


def test_a_defect_mask_with_no_defect_pixel_is_named_by_evaluate(tmp_path):
    """An all-zero mask of a defect image entered the pixel metrics silently (its pixels as normal ones)."""
    from PIL import Image
    from uninet_feat.evaluate import evaluate
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    rep = evaluate(run, quiet=True)
    assert "defect_masks_without_defect_pixels" not in rep
    mask = sorted((data / "ground_truth").rglob("*_mask.png"))[0]
    Image.fromarray(np.zeros(Image.open(mask).size[::-1], np.uint8)).save(mask)
    with pytest.warns(UserWarning, match=r"1 defect image\(s\) have a mask with no defect pixel"):
        rep = evaluate(run, quiet=True)
    assert rep["defect_masks_without_defect_pixels"] == 1 and "pixel_auroc" in rep
    for k in ("pixel_auroc_vs_normal_images", "aupro_vs_normal_images"):   # 1 normal image: was [nan, nan], [0, x]
        lo, hi = rep[f"{k}_interval"]
        assert 0 < lo <= rep[k] + 0.01 and rep[k] - 0.01 <= hi <= 1, (k, lo, rep[k], hi)


def test_a_test_set_of_defect_images_only_one_masked_whole_gets_finite_intervals_and_strict_json(tmp_path):
    """No normal test image and a mask covering its image whole: a bootstrap draw of that image alone has no normal
    pixel; evaluate printed an interval "nan-nan", an AUPRO interval from 0.000, and wrote NaN into the JSON, which
    strict JSON readers refuse (an audit, session 52)."""
    import json
    from PIL import Image
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=2)
    for p in (data / "test" / "good").glob("*.png"):
        p.unlink()
    mask = sorted((data / "ground_truth").rglob("*_mask.png"))[0]
    Image.fromarray(np.full(Image.open(mask).size[::-1], 255, np.uint8)).save(mask)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    assert main(["evaluate", "--run", str(run), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    def refuse(c):
        raise ValueError(c)
    rep = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert rep["pixel_undefined_draws"] > 0
    for k in ("pixel_auroc", "aupro"):
        lo, hi = rep[f"{k}_interval"]
        assert 0 <= lo <= hi <= 1


def test_defects_smaller_than_a_pixel_of_the_evaluated_size_are_named(tmp_path):
    """A defect mask that the resize to image_size empties is not a wrong mask: evaluate says which it is."""
    from PIL import Image
    from uninet_feat.evaluate import evaluate
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=2, size=64)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    mask = sorted((data / "ground_truth").rglob("*_mask.png"))[0]
    dot = np.zeros(Image.open(mask).size[::-1], np.uint8)
    dot[10, 10] = 255   # one pixel at 64 px; nearest-exact to 32 px keeps the odd rows and columns only
    Image.fromarray(dot).save(mask)
    with pytest.warns(UserWarning, match=r"1 defect mask\(s\) lose every defect pixel .*image_size 32"):
        rep = evaluate(run, quiet=True)
    assert rep["defect_masks_lost_at_image_size"] == 1 and "defect_masks_without_defect_pixels" not in rep


def test_a_batch_of_one_with_a_one_by_one_bottleneck_is_refused_before_the_run_folder(tmp_path):
    """--batch-size 1 (or one training image) at an input whose bottleneck grid is 1x1: BatchNorm raised a torch
    traceback mid-epoch after config.yaml was written (an audit, session 52)."""
    from uninet_feat.train import train
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    base = {"backbone": "tiny", "weights": "random", "epochs": 1, "channels_last": False, "val_fraction": 0.0}
    with pytest.raises(BadInputError, match=r"batch of one image at image_size 32: the bottleneck's grid is 1x1") as e:
        train(load_config(None, {"data": str(data)}, base={**base, "image_size": 32, "batch_size": 1}),
              tmp_path / "r", quiet=True)
    assert "--image-size 64" in e.value.fix and not (tmp_path / "r").exists()
    train(load_config(None, {"data": str(data)}, base={**base, "image_size": 64, "batch_size": 1}), tmp_path / "ok",
          quiet=True)
    assert (tmp_path / "ok" / "model.pt").exists()


def test_a_tiny_temperature_that_overflows_the_loss_is_named_in_the_fix(tmp_path):
    """At -T 1e-40, L_SC's logits cos / T overflow whatever the images and --lr; the fix told the user to check the
    inputs or lower --lr (an audit, session 52). It now names the temperature; at the method's T it does not."""
    from uninet_feat.errors import BadInputError
    from uninet_feat.train import _lower, train
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    cfg = load_config(None, {"data": str(data), "temperature": 1e-40},
                      base={"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 2,
                            "channels_last": False, "val_fraction": 0.0})
    with pytest.raises(BadInputError) as e:
        train(cfg, tmp_path / "run", quiet=True)
    assert "raise -T (temperature 1e-40" in e.value.fix and "--lr" not in e.value.fix, e.value.fix
    assert _lower({"temperature": 2.0}) == "lower --lr" and _lower({"temperature": 0.1}) == "lower --lr"
