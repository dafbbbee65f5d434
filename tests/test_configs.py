"""The shipped configs (`configs/*.yaml`) load and every option in them parses, so `train --config` cannot fail
on a typo after the data has been read."""
import re
from pathlib import Path

import pytest

from uninet_feat.calibration import parse_map_norm
from uninet_feat.config import load_config
from uninet_feat.denoise import parse_denoise
from uninet_feat.positions import parse_tile_norm
from uninet_feat.selection import parse_kinds

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"magnetic_tile.yaml", "aitex.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_options_parse(path):
    cfg = load_config(path)   # unknown keys are refused here
    parse_kinds(cfg["synthetic_kinds"])
    parse_kinds(cfg["denoise_kinds"])
    parse_denoise(cfg["denoise"])
    parse_map_norm(cfg["map_norm"])
    parse_tile_norm(cfg["tile_norm"], cfg["tile"])
    assert cfg["data"] and cfg["split_csv"] and int(cfg["epochs"]) > 0


def test_magnetic_tile_config_draws_training_edits_apart_from_its_choices():
    """Its label-free choices are made on a kind that the denoising student never trains on."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "magnetic_tile.yaml")
    assert parse_denoise(cfg["denoise"]) > 0
    assert not set(parse_kinds(cfg["synthetic_kinds"])) & set(parse_kinds(cfg["denoise_kinds"]))


def test_train_help_states_the_defaults_the_config_really_has():
    """`train --help` writes defaults by hand (the CLI imports no torch to print help); they must not drift."""
    import re
    from uninet_feat.cli import build_parser
    from uninet_feat.config import DEFAULT_CONFIG
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help or "" for a in train._actions}
    for key in ("backbone", "weights", "image_size", "epochs", "batch_size", "lr", "lr_target", "seed", "mem",
                "dfs", "temperature", "width", "val_fraction", "val_every"):
        said = re.search(r"default:? ([\w.+-]+?)[,;)]", helps[key])
        assert said, f"--{key} help names no default: {helps[key]!r}"
        want = DEFAULT_CONFIG[key]
        got = said.group(1)
        assert (float(got) == float(want)) if isinstance(want, (int, float)) else got == want, (key, got, want)


def test_version_flag_prints_the_package_version(capsys):
    from uninet_feat import __version__
    from uninet_feat.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"uninet-feat {__version__}"


def test_environment_names_the_commit_of_a_checkout_and_nothing_outside_one(tmp_path, monkeypatch):
    """env.json traces a run to its code: the checkout's HEAD, and whether tracked files differed from it."""
    import subprocess
    import uninet_feat.config as config
    repo = Path(config.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        pytest.skip("the package does not run from a git checkout here")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = config.environment(3)
    assert env["git_commit"] == head and isinstance(env["git_dirty"], bool) and env["seed"] == 3
    monkeypatch.setattr(config, "__file__", str(tmp_path / "pkg" / "config.py"))   # an installed wheel: no .git
    assert "git_commit" not in config.environment(3)


def test_every_flag_of_every_command_says_what_it_is():
    """`uninet-feat COMMAND --help` leaves no flag unexplained; a flag with a default says it."""
    from uninet_feat.cli import build_parser
    ap = build_parser()
    for name, p in ap.commands.items():
        for a in p._actions:
            if a.option_strings and a.option_strings[0] != "-h":
                assert a.help and a.help.strip(), (name, a.option_strings)
                if a.default not in (None, False, [], "==SUPPRESS==") and a.nargs != 0:
                    assert "default" in a.help, (name, a.option_strings, a.help)
                if a.nargs == 0:   # a switch: "(default True)" of --no-overlays read as "off by default"
                    assert "(default" not in a.help, (name, a.option_strings, a.help)


def test_shared_help_texts_fit_each_command():
    """A help text shared by several commands says nothing one of them does not do: --data takes a folder
    (only predict takes one image, with its own text); zero-shot has no --run and its --image-size defaults
    to the model's native size (since session 52; 224 before, for every model); extract's names its default
    without --run."""
    import inspect
    import re
    from uninet_feat.cli import build_parser
    from uninet_feat.config import DEFAULT_CONFIG
    from uninet_feat.workflows import zero_shot_cmd
    ap = build_parser()
    helps = {name: {a.option_strings[0]: a.help or "" for a in p._actions if a.option_strings}
             for name, p in ap.commands.items()}
    for name in ("evaluate", "ensemble", "extract", "zero-shot"):
        assert "one image" not in helps[name]["--data"], name
    zs = helps["zero-shot"]["--image-size"]
    assert "--run" not in zs and "default: the model's native size" in zs
    assert inspect.signature(zero_shot_cmd).parameters["image_size"].default is None
    assert f"{DEFAULT_CONFIG['image_size']} without" in helps["extract"]["--image-size"]


def test_out_of_range_model_and_extract_options_are_one_line_errors(tmp_path, capsys):
    """--seed -1 or >= 2**32, --width 0, --temperature 0 (a ZeroDivisionError in the first step, after the run
    folder was written), --shard-size 0 and --shard abc: one line with the range and an example, before any
    folder is written; two levels with three decoder depths: the model options named with the fix."""
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    train = tiny_train_args(data)
    cases = {("--seed", "-1"): "seed must be an integer >= 0 and <= 4294967295, got -1",
             ("--seed", str(2 ** 32)): "seed must be an integer >= 0 and <= 4294967295",
             ("--width", "0"): "width must be a number > 0, got 0.0",
             ("--temperature", "0"): "temperature must be a number > 0, got 0.0"}
    for k, (flag, want) in enumerate(cases.items()):
        out = tmp_path / f"r{k}"
        assert main(train + [*flag, "--out", str(out)]) == 2, flag
        err = capsys.readouterr().err
        assert want in err and "fix:" in err and "Traceback" not in err, (flag, err)
        assert not out.exists(), flag
    extract = ["extract", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
               "--quiet", "--out", str(tmp_path / "f")]
    for flag, want in ((["--shard-size", "0"], "--shard-size must be an integer >= 1, got 0"),
                       (["--shard", "abc"], "--shard abc must be i/n with 0 <= i < n")):
        assert main(extract + flag) == 2
        err = capsys.readouterr().err
        assert want in err and "fix:" in err, err
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    from uninet_feat.runs import make_model
    with pytest.raises(BadInputError, match=r"do not fit backbone resnet18 at levels \[1, 2, 3\]: decoder depths"):
        make_model(load_config(None, base={"backbone": "resnet18", "weights": "random", "decoder_depths": [3, 4]}))


def test_a_weights_file_is_saved_by_absolute_path_and_a_name_as_it_is(tmp_path, monkeypatch):
    """A clip: run reads its text tower from its weights file again (extract --text, predict --text): a
    relative path saved as typed failed from any other folder."""
    from uninet_feat.runs import absolute_data_paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    got = absolute_data_paths({"data": "d", "weights": "w.pt"})
    assert got["weights"] == str(tmp_path / "w.pt") and got["data"] == str(tmp_path / "d")
    assert absolute_data_paths({"weights": "imagenet"})["weights"] == "imagenet"
    assert absolute_data_paths({"weights": "openai"})["weights"] == "openai"


def test_every_numeric_option_is_read_as_a_number_and_checked(tmp_path):
    """YAML 1.1 reads `1e-5` as a string: weight_decay, alpha and beta were left strings (a TypeError in AdamW, or a
    string beta saved into model.pt that crashed calibration); now read as numbers and checked like the others."""
    from uninet_feat.config import load_config
    f = tmp_path / "c.yaml"
    f.write_text("weight_decay: 1e-5\nalpha: 1e-2\nbeta: 3e-5\ndenoise: 5e-1\nsynthetic_copies: 3\n")
    cfg = load_config(f)
    assert (cfg["weight_decay"], cfg["alpha"], cfg["beta"], cfg["denoise"]) == (1e-5, 1e-2, 3e-5, 0.5)
    for line, said in (("weight_decay: -1e-5", "weight_decay must be a number >= 0, got -1e-05"),
                       ("alpha: 0.6", "alpha must be a number >= 0 and <= 0.5, got 0.6"),
                       ("beta: 2", "beta must be a number >= 0 and <= 1, got 2"),
                       ("beta: abc", "beta must be a number >= 0 and <= 1, got 'abc'"),
                       ("synthetic_copies: 0", "synthetic_copies must be an integer >= 1, got 0"),
                       ("denoise: 1.5", "denoise must be a number >= 0 and <= 1, got 1.5")):
        e = _refused(f, line, said)
        assert e.fix.startswith("e.g. `"), line


def _refused(f, line: str, said: str):
    """The BadInputError of a config file holding ``line`` alone: it says ``said`` and names the file."""
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    f.write_text(line + "\n")
    with pytest.raises(BadInputError, match=re.escape(said)) as e:
        load_config(f)
    assert e.value.path == str(f), line
    return e.value


def test_model_choices_are_refused_with_their_own_fix(tmp_path):
    """dfs, mem, pixel_map and bottleneck_stride values the model does not have were a ValueError from building the
    model answered with the fix for decoder depths; now refused by load_config, naming the config file, each with
    its allowed values. A model ValueError of another kind no longer gets the decoder-depths fix either."""
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    from uninet_feat.runs import make_model
    from _tiny import register_tiny
    register_tiny()
    f = tmp_path / "c.yaml"
    for line, said in (("dfs: on", "dfs must be one of learned, fixed, off, got True"),
                       ("mem: repvgg", "mem must be one of official, multiscale, got 'repvgg'"),
                       ("pixel_map: blurred", "pixel_map must be one of smoothed, raw, got 'blurred'"),
                       ("bottleneck_stride: 4", "bottleneck_stride must be one of 1, 2, got 4")):
        fix = _refused(f, line, said).fix
        assert "decoder_depths" not in fix, line
        if line.startswith("dfs"):   # off is this package's default, not the method's (which runs theta = 1)
            assert '"off" (the default' in fix and "fixed (the official code's theta = 1)" in fix
    assert load_config(None, {"dfs": "learned", "bottleneck_stride": 1})["dfs"] == "learned"
    with pytest.raises(BadInputError, match="student_relu needs one entry per level") as e:
        make_model(load_config(None, base={"backbone": "tiny", "weights": "random", "student_relu": [True]}))
    assert "decoder_depths" not in e.value.fix and "student_relu" in e.value.fix


def test_levels_and_decoder_depths_are_checked_before_the_data_is_read(tmp_path):
    """levels and decoder_depths were taken as given: a depth of 0 built a student stage that passed on the wrong
    channels (a RuntimeError in the first step, after the run folder was written), 2.5 or a single number was a
    TypeError, `decoder_depths: 3,4,6` (a YAML string) was read as its five characters, levels [1.5, 2, 3] or
    [true, 2, 3] silently meant level 1, and two levels with the default three depths was caught only at the model.
    Now each is refused by load_config, naming the setting and the file, with an example. Other level counts are
    the user's choice (the bottleneck and the student are sized from the backbone's levels) and train."""
    from uninet_feat.errors import BadInputError
    from uninet_feat.runs import make_model
    f = tmp_path / "c.yaml"
    for line, said in (("decoder_depths: [0, 4, 6]", "decoder_depths must be a list of whole numbers >= 1"),
                       ("decoder_depths: [-1, 4, 6]", "got [-1, 4, 6]"),
                       ("decoder_depths: [2.5, 4, 6]", "got [2.5, 4, 6]"),
                       ("decoder_depths: 3", "got 3"),
                       ("decoder_depths: [true, 4, 6]", "got [True, 4, 6]"),
                       ("decoder_depths: three", "got 'three'"),
                       ("decoder_depths: null", "got None"),
                       ("decoder_depths: []", "got []"),
                       ("levels: [3, 2, 1]", "levels must be increasing whole numbers >= 0"),
                       ("levels: [1, 1, 2]", "got [1, 1, 2]"),
                       ("levels: [-1, 0, 1]", "got [-1, 0, 1]"),
                       ("levels: [1.5, 2, 3]", "got [1.5, 2, 3]"),
                       ("levels: [true, 2, 3]", "got [True, 2, 3]"),
                       ("levels: 3", "got 3"),
                       ("levels: a,b,c", "got 'a,b,c'"),
                       ("levels: []", "got []"),
                       ("levels: [1, 2]", "levels [1, 2] picks 2 feature levels, but decoder_depths [3, 4, 6] has 3 "
                                          "entries"),
                       ("levels: 1,2,3,4", "levels [1, 2, 3, 4] picks 4 feature levels, but decoder_depths [3, 4, 6]"),
                       ("levels: [1, 2, 3]\ndecoder_depths: [3, 4]", "decoder_depths [3, 4] has 2 entries")):
        e = _refused(f, line, said)
        key = "levels" if line.startswith("levels") else "decoder_depths"
        assert key in e.fix and "e.g. `" in e.fix, line
    assert "decoder_depths: [3, 4]" in _refused(f, "levels: [1, 2]", "picks 2").fix
    f.write_text("decoder_depths: 3,4,6\nlevels: 1,2,3\n")   # YAML's plain form, as --levels 1,2,3 gives it
    cfg = load_config(f)
    assert cfg["decoder_depths"] == [3, 4, 6] and cfg["levels"] == "1,2,3"
    import numpy as np   # numpy's integers (a library config built with numpy) are whole numbers too
    assert load_config(None, {"levels": tuple(np.arange(1, 4)), "decoder_depths": list(np.array([3, 4, 6]))})
    for levels, depths in (([2, 3], [4, 6]), ([1, 2, 3, 4], [2, 3, 4, 6])):   # any count, one depth per level
        model = make_model(load_config(None, base={"backbone": "resnet18", "weights": "random", "levels": levels,
                                                   "decoder_depths": depths}))
        assert len(model.channels) == len(levels) and len(model.student.stages) == len(depths)
    with pytest.raises(BadInputError, match=r"levels \[1, 2, 9\] must be increasing indices into the 5 feature"):
        make_model(load_config(None, base={"backbone": "resnet18", "weights": "random", "levels": [1, 2, 9]}))


def test_wrong_levels_or_depths_leave_no_run_folder(tmp_path, capsys):
    """`train --levels` with a depth count that does not fit, or a depth of 0 in --config: one line with the fix, no
    folder written (a depth of 0 wrote config.yaml and env.json before the first step's RuntimeError)."""
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    (tmp_path / "c.yaml").write_text("decoder_depths: [0, 4, 6]\n")
    for k, (extra, said) in enumerate(((["--levels", "1,2"], "levels [1, 2] picks 2 feature levels"),
                                       (["--config", str(tmp_path / "c.yaml")], "decoder_depths must be a list"))):
        out = tmp_path / f"r{k}"
        assert main(tiny_train_args(data) + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert said in err and "fix:" in err and "Traceback" not in err, err
        assert not out.exists()


def test_the_configs_train_at_their_figures_thread_count_unless_told(monkeypatch, tmp_path):
    """Another thread count sums floats in another order and trains another model from the same seed (session 46:
    the AITEX config's first epoch differs between 1 and 2 threads), so the configs pin the count their figures were
    trained at, for the plain command to re-make them; `--threads` still overrides it."""
    import uninet_feat.train as tr
    from uninet_feat.cli import main
    from uninet_feat.errors import BadInputError
    seen = []

    def record(cfg, out, **kw):   # the resolved config that would train; nothing trains
        seen.append(cfg["threads"])
        raise BadInputError("recorded")
    monkeypatch.setattr(tr, "train", record)
    for path in CONFIGS:
        for extra, want in (([], 2), (["--threads", "1"], 1)):
            n = len(seen)
            main(["train", "--config", str(path), "--out", str(tmp_path / f"r{n}"), "--quiet", *extra])
            assert len(seen) == n + 1 and seen[-1] == want, (path.name, extra, seen)


def test_aitex_config_holds_out_enough_strips_per_fabric_for_its_threshold(shared_data):
    """Each fabric's threshold rests on at least 4 validation strips, not the 1 that the default share leaves of
    its 14 training normals: a new normal strip passes the 0.99 quantile of n normals with chance `pass_chance(n)`,
    50 % at 1, 21 % at 4."""
    from uninet_feat.config import DEFAULT_CONFIG
    from uninet_feat.runs import load_samples, train_val_samples
    from uninet_feat.thresholds import pass_chance
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "aitex.yaml",
                      {"data": str(shared_data), "split_csv": str(shared_data / "splits" / "aitex.csv")})
    for fabric in ("fabric_00", "fabric_01", "fabric_03", "fabric_04"):
        samples = load_samples({**cfg, "group": fabric})
        fit, val = train_val_samples(samples, cfg)
        assert len(val) >= 4 and pass_chance(len(val)) < 0.25, (fabric, len(val))
        assert len(fit) >= 9 and not {s.path for s in fit} & {s.path for s in val}, fabric
        _, one = train_val_samples(samples, {**cfg, "val_fraction": DEFAULT_CONFIG["val_fraction"]})
        assert len(one) < len(val)   # the default share would leave fewer (1 of 14)
