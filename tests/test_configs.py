"""The shipped configs (`configs/*.yaml`) load and every option in them parses, so `train --config` cannot fail
on a typo after the data has been read."""
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
                "dfs", "temperature", "width", "val_fraction"):
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
