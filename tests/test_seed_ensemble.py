"""`benchmarks.seed_ensemble`: seeds per group trained (kept when finished, resumed when killed) and scored as
one ensemble per group, with each run's own AUROC as `evaluate` gives it."""
import json

import pytest

from _tiny import register_tiny, write_texture_set
from benchmarks.seed_ensemble import main as seed_ensemble
from uninet_feat.cli import main

register_tiny()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    data = root / "data"
    write_texture_set(data / "A")            # two categories, MVTec-style: groups A and B
    write_texture_set(data / "B", seed=3)
    cfg = root / "tiny.yaml"
    cfg.write_text("backbone: tiny\nweights: random\nimage_size: 64\nepochs: 1\nbatch_size: 2\n")
    argv = ["--config", str(cfg), "--data", str(data), "--groups", "A", "B", "--seeds", "3", "4",
            "--out", str(root / "out")]
    return root, argv, seed_ensemble(argv)


def test_each_groups_seeds_are_trained_and_scored_alone_and_together(recipe, tmp_path):
    root, _, summary = recipe
    assert set(summary["groups"]) == {"A", "B"}
    for g in ("A", "B"):
        own = []
        for s in (3, 4):
            run = root / "out" / f"{g}_s{s}"
            assert json.loads((run / "env.json").read_text()) and (run / "model.pt").exists()
            assert main(["evaluate", "--run", str(run), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
            own.append(json.loads((tmp_path / "m.json").read_text())["image_auroc"])
        assert summary["groups"][g]["runs"] == pytest.approx(own, abs=1e-9)
        ens = json.loads((root / "out" / f"{g}_ensemble.json").read_text())
        assert summary["groups"][g]["ensemble"] == ens["image_auroc"] and ens["runs"][1].endswith(f"{g}_s4")
    assert summary["mean_ensemble"] == pytest.approx((summary["groups"]["A"]["ensemble"]
                                                      + summary["groups"]["B"]["ensemble"]) / 2)


def test_a_rerun_keeps_finished_runs_and_resumes_a_killed_one(recipe):
    root, argv, summary = recipe
    kept = root / "out" / "A_s3" / "model.pt"
    before = kept.stat().st_mtime_ns
    killed = root / "out" / "B_s4"
    (killed / "model.pt").unlink()            # killed after its last epoch's checkpoint, before its model
    (killed / "calibration.json").unlink()
    again = seed_ensemble(argv)
    assert kept.stat().st_mtime_ns == before                      # not retrained
    assert (killed / "model.pt").exists() and (killed / "calibration.json").exists()
    for g in ("A", "B"):                                          # the resumed run scores as before
        assert again["groups"][g]["runs"] == pytest.approx(summary["groups"][g]["runs"], abs=1e-9)
        assert again["groups"][g]["ensemble"] == pytest.approx(summary["groups"][g]["ensemble"], abs=1e-9)
    assert json.loads((root / "out" / "summary.json").read_text())["mean_ensemble"] == pytest.approx(
        summary["mean_ensemble"], abs=1e-9)


def test_a_rerun_with_other_train_args_is_not_scored_on_the_old_runs(recipe, capsys):
    """`--train-args --image-size 32` on a folder of finished 64-px runs scored the old runs without a word (an
    audit, session 53): each run goes through `train --resume`, which refuses settings it cannot honour; a seed named
    twice is refused before any training."""
    root, argv, _ = recipe
    with pytest.raises(SystemExit, match="training .*A_s3 failed"):
        seed_ensemble(argv + ["--train-args", "--image-size", "32"])
    assert "image_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        seed_ensemble([a if a != "4" else "3" for a in argv])   # --seeds 3 3
    assert "names a seed twice" in capsys.readouterr().err
    assert json.loads((root / "out" / "summary.json").read_text())["train_args"] == []
