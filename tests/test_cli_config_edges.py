"""--config files against the flags they stand for (session 37 review): values argparse never saw were taken
unchecked, blank YAML values and numbers for names were tracebacks, a typed flag did not beat its exclusive partner
from the file, `--conf` was silently ignored and a quoted `~/c.yaml` was not found."""
import re

import pytest

from uninet_feat.cli import _apply_config, _user_paths, build_parser, main
from uninet_feat.errors import BadInputError

from _tiny import register_tiny, tiny_train_args, write_texture_set

register_tiny()


def _parse(argv):
    """The namespace `main` would dispatch: the --config applied, then the command line parsed."""
    ap = build_parser()
    _apply_config(ap, argv)
    return ap.parse_args(argv)


def _refused(tmp_path, capsys, argv, body, *said):
    """``argv`` with a --config holding ``body``: exit 2, one error line naming the file and saying ``said``."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    capsys.readouterr()
    assert main(argv + ["--config", str(cfg)]) == 2, body
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error"))
    assert str(cfg) in line and "Traceback" not in err, err
    for s in said:
        assert s in line, (s, line)


def test_config_values_are_checked_against_the_flags_choices_and_types(tmp_path, capsys):
    """`pixel-map: smooth` scored the raw map and `level: patches` built an image index: argparse checks
    choices (and types) only on the command line. Now refused, naming the file and the allowed values."""
    run, feats = str(tmp_path / "run"), str(tmp_path / "feats")
    _refused(tmp_path, capsys, ["evaluate", "--run", run, "--quiet"], "pixel-map: smooth\n",
             "smoothed, raw", "'smooth'")
    _refused(tmp_path, capsys, ["index", "--features", feats, "--out", str(tmp_path / "ix")], "level: patches\n",
             "patch, image")
    assert not (tmp_path / "ix").exists()
    _refused(tmp_path, capsys, ["evaluate", "--run", run], "pixel-budget: 2.5\n", "pixel_budget")   # not cut to 2
    _refused(tmp_path, capsys, ["evaluate", "--run", run], "threshold: yes\n", "threshold")        # not 1.0
    _refused(tmp_path, capsys, ["predict", "--run", run, "--data", run, "--out", str(tmp_path / "p")],
             "flag-by: [wdm, knnn]\n", "flag_by")
    # what a flag takes is still taken, as argparse converts it
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("k: 3\nseed: 2\ngroup: 2024\n")
    args = _parse(["cluster", "--features", feats, "--out", str(tmp_path / "cl"), "--config", str(cfg)])
    assert (args.k, args.seed, args.group) == (3, 2, "2024")   # group: a name, as --group 2024 gives
    cfg.write_text("k: auto\n")
    assert _parse(["cluster", "--features", feats, "--out", "o", "--config", str(cfg)]).k == "auto"
    cfg.write_text("input_size: [64, 32]\n")   # export-model's saved config re-runs
    assert _parse(["export-model", "--run", run, "--out", "o", "--config", str(cfg)]).input_size == [64, 32]


def test_blank_and_mistyped_run_options_are_refused_by_load_config(tmp_path):
    """A blank `lr:` (null) passed the number checks ("None values are always allowed") and was a TypeError, some
    only after training (`eval_batch_size:` while calibrating; `val_fraction:` silently held out nothing);
    `group: 2024` (a YAML number) a TypeError in runs.load_samples; `synthetic_kinds: off`, `denoise_kinds: 3`
    and `mask_pattern: 5` tracebacks too."""
    from uninet_feat.config import check_numbers, load_config
    f = tmp_path / "c.yaml"

    def refused(body, said):
        f.write_text(body + "\n")
        with pytest.raises(BadInputError, match=re.escape(said)) as e:
            load_config(f)
        assert e.value.path == str(f), body

    for key in ("lr", "epochs", "seed", "width", "temperature", "lam", "batch_size", "image_size", "weight_decay",
                "eval_batch_size", "val_fraction", "margin"):
        refused(f"{key}:", f"{key} has no value")
    refused("synthetic_kinds: off", "synthetic_kinds must be fabric, all, or defect names")
    refused("denoise_kinds: 3", "denoise_kinds must be fabric, all, or defect names")
    refused("mask_pattern: 5", "mask_pattern must be text")
    refused("group: yes", "group must be a name")
    f.write_text("tile:\nthreads:\n")   # None is their default: still taken
    assert load_config(f)["tile"] is None
    f.write_text("group: 2024\n")
    assert load_config(f)["group"] == "2024"
    f.write_text("group: [2024, b]\n")
    assert load_config(f)["group"] == ["2024", "b"]
    check_numbers({"image_size": None, "tile": None})   # the commands' partial checks: None is "not given"


def test_kinds_of_another_type_are_a_bad_input_error():
    from uninet_feat.denoise import Damager
    from uninet_feat.selection import parse_kinds
    for v in (False, 3, {"hole": 1}, ["hole", 3]):
        with pytest.raises(BadInputError, match="synthetic_kinds must be"):
            parse_kinds(v)
    with pytest.raises(BadInputError, match="denoise_kinds must be"):
        Damager(0.5, 3, (0.5,) * 3, (0.5,) * 3, 0)


def test_a_blank_value_stops_train_before_the_run_folder(tmp_path, capsys):
    """`eval_batch_size:` trained the whole run, then crashed calibrating it (exit 1, a half-made run folder)."""
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    out = tmp_path / "run"
    _refused(tmp_path, capsys, tiny_train_args(data) + ["--out", str(out)], "eval_batch_size:\n",
             "eval_batch_size has no value")
    assert not out.exists()


def test_a_typed_threshold_flag_beats_its_exclusive_partner_from_the_config(tmp_path):
    """`predict --config OUT/config.yaml --max-fpr 0.5` of a run saved with --threshold 3 said "give --threshold
    or --max-fpr, not both": the config's value is a default, which a flag overrides, its partner included."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("threshold: 3\nmax_fpr: null\n")
    base = ["evaluate", "--run", "r", "--config", str(cfg)]
    args = _parse(base + ["--max-fpr", "0.5"])
    assert (args.threshold, args.max_fpr) == (None, 0.5)
    args = _parse(base + ["--max-fpr=0.25"])
    assert (args.threshold, args.max_fpr) == (None, 0.25)
    assert (_parse(base).threshold, _parse(base).max_fpr) == (3.0, None)   # no flag: the config's
    args = _parse(base + ["--threshold", "4"])
    assert (args.threshold, args.max_fpr) == (4.0, None)


def test_abbreviated_flags_are_refused_not_silently_dropped(tmp_path, capsys):
    """argparse took `--conf F` as --config, which `_apply_config` did not look for: the file was ignored."""
    for argv in (["index", "--features", "F", "--out", "O", "--conf", "c.yaml"],
                 ["train", "--out", "O", "--conf", "c.yaml"], ["evaluate", "--run", "R", "--thresh", "3"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_a_quoted_tilde_config_is_expanded(tmp_path, monkeypatch, capsys):
    """`--config '~/c.yaml'` was looked up in a folder named ~, as no other path flag is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("level: image\n")
    assert _parse(["index", "--features", "F", "--out", "O", "--config", "~/c.yaml"]).level == "image"
    args = build_parser().parse_args(["train", "--out", "O", "--config", "~/c.yaml"])
    _user_paths(args)
    assert args.config == str(tmp_path / "c.yaml")
    (tmp_path / "t.yaml").write_text("epochs: 0\n")   # train reads the file: its own check speaks, not "cannot read"
    assert main(["train", "--out", str(tmp_path / "run"), "--config", "~/t.yaml"]) == 2
    assert f"{tmp_path / 't.yaml'}: epochs must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['supervised: "false"', "channels_last: 'no'", "skip_bad:", "cache_images: 0"])
def test_on_off_options_must_be_booleans(tmp_path, line):
    """A quoted `supervised: "false"` is the text "false", which Python took as true: a supervised run, silently."""
    from uninet_feat.config import load_config
    f = tmp_path / "c.yaml"
    f.write_text(line + "\n")
    key = line.split(":")[0]
    with pytest.raises(BadInputError, match=f"{key} must be true or false") as e:
        load_config(f)
    assert str(f) in str(e.value) and "unquoted" in str(e.value)
    f.write_text(f"{key}: false\n")
    assert load_config(f)[key] is False


def test_a_train_switch_turns_off_a_config_files_true(tmp_path):
    """`--supervised`, `--skip-bad`, `--grad-checkpointing`, `--step-in-backward` could only turn on what a --config
    file set; `--no-X` now turns off its `X: true`."""
    import yaml
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1)
    f = tmp_path / "c.yaml"
    f.write_text("skip_bad: true\ngrad_checkpointing: true\n")
    assert main(tiny_train_args(data) + ["--config", str(f), "--no-skip-bad", "--out", str(tmp_path / "r")]) == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["skip_bad"] is False and saved["grad_checkpointing"] is True


def test_an_unknown_key_names_the_key_it_is_closest_to(tmp_path, capsys):
    """The fix listed all ~60 keys; a typo's intended key is now named."""
    from uninet_feat.config import load_config
    f = tmp_path / "c.yaml"
    f.write_text("lr_taget: 1e-4\nzzz: 1\n")
    with pytest.raises(BadInputError, match=r"unknown config keys \['lr_taget', 'zzz'\] \(did you mean "
                                            r"lr_taget -> lr_target\?\)"):
        load_config(f)
    g = tmp_path / "i.yaml"
    g.write_text("featurs: x\n")
    assert main(["index", "--config", str(g), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean featurs -> features?" in capsys.readouterr().err


def test_a_blank_required_flag_in_a_config_is_refused_naming_the_key(tmp_path, capsys):
    """`run:` (YAML null) made --run not required and None reached the command: a TypeError traceback, exit 1."""
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    _refused(tmp_path, capsys, ["predict", "--data", data, "--out", str(tmp_path / "p")], "run:\n",
             "run has no value", "--run")
    _refused(tmp_path, capsys, ["predict", "--run", run, "--data", data], "out:\n", "out has no value")
    _refused(tmp_path, capsys, ["index", "--out", str(tmp_path / "i")], "features:\n", "features has no value")
    _refused(tmp_path, capsys, ["extract", "--run", run, "--out", str(tmp_path / "e")], "data:\n", "data has no value")
    assert not any((tmp_path / d).exists() for d in ("p", "i", "e"))
    cfg = tmp_path / "ok.yaml"   # the flag typed now gives the value: the blank is not in the way
    cfg.write_text("run:\n")
    assert _parse(["predict", "--config", str(cfg), "--run", run, "--data", data, "--out", "o"]).run == run


def test_a_list_or_mapping_for_a_one_value_flag_is_refused(tmp_path, capsys):
    """`data: [a, b]`, `data: {a: 1}` or `head: {a: 1}` reached the command as they were: a TypeError traceback."""
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    predict = ["predict", "--run", run, "--out", str(tmp_path / "p")]
    _refused(tmp_path, capsys, predict, f"data: [{data}, {data}2]\n", "data takes one value", "--data")
    _refused(tmp_path, capsys, predict, "data: {a: 1}\n", "data takes one value")
    _refused(tmp_path, capsys, predict + ["--data", data], "head: {a: 1}\n", "head takes a list of single values")
    _refused(tmp_path, capsys, predict + ["--data", data], "text: [a, b]\n", "text takes one value")
    _refused(tmp_path, capsys, ["export-model", "--run", run, "--out", str(tmp_path / "x")], "input_size: [64]\n",
             "input_size")
    cfg = tmp_path / "ok.yaml"   # what a command saves is still taken: export-model's [W, H], zero-shot's sentences
    cfg.write_text("prompts: {normal: [a photo of fabric], defect: [a photo of torn fabric]}\n")
    args = _parse(["zero-shot", "--data", data, "--backbone", "clip:x", "--weights", "w", "--out", "o",
                   "--config", str(cfg)])
    assert args.prompts == {"normal": ["a photo of fabric"], "defect": ["a photo of torn fabric"]}


def test_a_single_value_for_a_many_value_flag_is_a_list_of_one(tmp_path):
    """`ensemble: RUN2` in a predict config and `runs: RUN` in an ensemble one were taken letter by letter."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ensemble: /runs/seed2\n")
    assert _parse(["predict", "--run", "r", "--data", "d", "--out", "o", "--config", str(cfg)]).ensemble == \
        ["/runs/seed2"]
    cfg.write_text("runs: /runs/seed1\n")
    assert _parse(["ensemble", "--config", str(cfg)]).runs == ["/runs/seed1"]
    cfg.write_text("runs: [/runs/seed1, /runs/seed2]\n")
    assert _parse(["ensemble", "--config", str(cfg)]).runs == ["/runs/seed1", "/runs/seed2"]


@pytest.mark.parametrize("line", ['overlays: "false"', "skip-bad: 'no'", "quiet: 1", "overlays:"])
def test_on_off_flags_in_a_config_must_be_booleans(tmp_path, capsys, line):
    """A quoted `overlays: "false"` is the text "false", which Python took as true (as train's `supervised`, whose
    check this is); a blank `overlays:` (null) turned the overlays off."""
    key = line.split(":")[0].replace("-", "_")
    argv = ["predict", "--run", str(tmp_path / "r"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "p")]
    _refused(tmp_path, capsys, argv, line + "\n", f"{key} must be true or false", "unquoted")
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"{key}: false\n")
    assert getattr(_parse(argv + ["--config", str(cfg)]), key) is False
    cfg.write_text("quick_gelu:\n")   # null: its default, "what the weights say"
    assert _parse(["zero-shot", "--data", "d", "--backbone", "clip:x", "--weights", "w", "--out", "o",
                   "--config", str(cfg)]).quick_gelu is None


def test_a_config_of_another_command_and_a_non_finite_threshold_say_the_fix(tmp_path, capsys):
    """"this config was written for another command" and "--threshold must be a finite number, got nan" had no fix;
    a nan threshold from a config was found only once the run was loaded."""
    _refused(tmp_path, capsys, ["index", "--out", str(tmp_path / "i")], "command: predict\n",
             "written for another command", "fix: use it with `uninet-feat predict --config")
    argv = ["predict", "--run", str(tmp_path / "r"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "p")]
    _refused(tmp_path, capsys, argv, "threshold: .nan\n", "not a finite number", "fix:")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv + ["--threshold", "inf"])
    assert e.value.code == 2
    assert "'inf' is not a finite number, e.g. 0.5" in capsys.readouterr().err


def test_a_yaml_boolean_for_a_text_flag_a_zero_shot_train_setting_and_the_last_config_file(tmp_path, capsys):
    """Three ways a --config's value was lost unsaid: YAML reads `group: off` as false, which the command took as
    "no group" and scored every group; zero-shot dropped train settings such as `tile_score: mean` that change its
    scores; and of two --config files the first was read while argparse (and train) keep the last."""
    base = ["evaluate", "--run", str(tmp_path / "r")]
    _refused(tmp_path, capsys, base, "group: off\n", "group: YAML read this value as false", "quote it")
    assert _parse(base + ["--config", str(_written(tmp_path / "q.yaml", "group: 'off'\n"))]).group == "off"
    assert _parse(base + ["--config", str(_written(tmp_path / "n.yaml", "group: 2024\n"))]).group == "2024"
    zs = ["zero-shot", "--data", str(tmp_path), "--backbone", "clip:tiny", "--weights", "random",
          "--out", str(tmp_path / "z")]
    _refused(tmp_path, capsys, zs, "tile_score: mean\n", "tile_score: 'mean': zero-shot takes no such setting")
    assert _parse(zs + ["--config", str(_written(tmp_path / "z.yaml", "tile_score: max\nseed: 1203\n"))])
    a, b = _written(tmp_path / "a.yaml", "threshold: 0.5\n"), _written(tmp_path / "b.yaml", "threshold: 0.9\n")
    args = _parse(["predict", "--run", "r", "--data", "d", "--out", "o", "--config", str(a), "--config", str(b)])
    assert args.config == str(b) and args.threshold == 0.9


def _written(path, text):
    path.write_text(text)
    return path


def test_train_names_the_command_whose_config_it_was_given(tmp_path, capsys):
    """`train --config PRED/config.yaml` listed "unknown config keys ['command', 'out', 'run']" where the other
    commands say which command the file is for."""
    pred = _written(tmp_path / "p.yaml", "command: predict\nrun: r\nout: o\nthreshold: 0.5\n")
    zs = _written(tmp_path / "z.yaml", "backbone: clip:tiny\npatch_mode: tokens\nprompts: {normal: [a]}\n")
    for cfg, name in ((pred, "predict"), (zs, "zero-shot")):
        capsys.readouterr()
        assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"written for another command, not `train` (it is `{name}`'s)" in err
        assert f"uninet-feat {name} --config {cfg}" in err
    assert not (tmp_path / "r").exists()


def test_a_negative_value_in_exponent_form_is_taken_as_the_flags_value(tmp_path, capsys):
    """`--threshold -1e-3` stopped at argparse's "expected one argument" (it takes -0.001 but not -1e-3 as a value),
    while a position-corrected threshold near 0 is printed so by summary.json (an audit, session 52)."""
    from uninet_feat.cli import _joined_exponent_values
    argv = ["predict", "--run", str(tmp_path / "r"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--threshold", "-1e-3"]
    assert _parse(_joined_exponent_values(argv)).threshold == -0.001
    assert _joined_exponent_values(["x", "--mean", "0.1", "-2e-1"])[-1] == "-2e-1"   # only a flag's first value
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse's refusal
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "expected one argument" not in err and str(tmp_path / "r") in err


def test_output_files_that_are_inputs_or_each_other_are_refused_before_any_work(tmp_path, capsys):
    """`evaluate --run R --report R/model.pt` replaced the model with the report; `--csv split.csv` (meaning
    --split-csv) the run's manifest with the scores, after which evaluate scored another test set; `--json F --csv F`
    kept one of the two (an audit, session 52). Refused before anything is read or written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"PK model")
    split = tmp_path / "split.csv"
    split.write_text("path,split,label\n")
    (run / "config.yaml").write_text(f"split_csv: {split}\n")
    before = {p: p.read_bytes() for p in (run / "model.pt", split, run / "config.yaml")}
    base = ["evaluate", "--run", str(run), "--quiet"]
    for extra, said in ((["--report", str(run / "model.pt")], "--report would write over the run's model.pt"),
                        (["--csv", str(split)], "--csv would write over the run's split CSV"),
                        (["--json", str(run / "epochs" / "e.json")], "one of the run's kept epochs"),
                        (["--json", str(tmp_path / "m"), "--csv", str(tmp_path / "m")], "--json and --csv name one file"),
                        (["--split-csv", str(tmp_path / "s2.csv"), "--json", str(tmp_path / "s2.csv")],
                         "--json would write over --split-csv")):
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        assert said in capsys.readouterr().err, (extra, said)
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "m").exists()


def test_a_key_given_twice_in_a_config_or_prompt_file_is_refused_with_its_line(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys silently: a second `epochs:` replaced the one a user read, a second
    `normal:` prompt list the first (an audit, session 52)."""
    from uninet_feat.config import load_config
    from uninet_feat.vlm import load_prompts
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 100\nimage_size: 128\nepochs: 2\n")
    with pytest.raises(BadInputError, match=r"(?s)the key 'epochs' is given twice.*line 3"):
        load_config(cfg)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path), "--config", str(cfg)]) == 2
    assert "the key 'epochs' is given twice" in capsys.readouterr().err
    p = tmp_path / "p.yaml"
    p.write_text("normal: [a clean fabric]\ndefect: [a torn fabric]\nnormal: [a flawless fabric]\n")
    with pytest.raises(BadInputError, match=r"the key 'normal' is given twice"):
        load_prompts(p)
    cfg.write_text("epochs: 2\nimage_size: 128\n")   # the same file without the twin: read as before
    assert load_config(cfg)["epochs"] == 2
