"""Benchmark scripts that must measure what they say: the network official_compare compares (DFS), the images
onnx_check times, the plain features aitex_heads compares with, the files cluster_synthetic writes, and what
extract_throughput subtracts and leaves behind."""
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tiny import register_tiny, write_texture_set
from uninet_feat.config import load_config
from uninet_feat.train import train

register_tiny()


def _train(data, out, **cfg):
    base = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
            "channels_last": False, "val_fraction": 0.25}
    train(load_config(None, {"data": str(data), **cfg}, base=base), out, quiet=True)
    return out


# --- train_step / official_compare: --dfs -------------------------------------------------------------------

def test_train_step_dfs_learned_adds_the_dfs_thetas_and_is_recorded(capsys):
    import argparse

    from benchmarks import _measure as M
    from benchmarks import train_step
    from uninet_feat.config import DEFAULT_CONFIG
    from uninet_feat.optim import make_optimizers

    def built(*flags):
        ap = argparse.ArgumentParser()
        M.add_common_args(ap)
        model, _ = train_step.build(ap.parse_args(["--backbone", "tiny", "--image-size", "32", "--batch-size", "1",
                                                   *flags]))
        return model, M.param_counts(*make_optimizers(model, DEFAULT_CONFIG))

    off, n_off = built()
    on, n_on = built("--dfs", "learned")
    assert off.cfg["dfs"] == "off" and on.cfg["dfs"] == "learned"    # default: the model's own
    thetas = sum(p.numel() for p in on.dfs.parameters())
    assert thetas > 0 and n_on["student"] - n_off["student"] == thetas and n_on["target"] == n_off["target"]
    res = train_step.main(["--backbone", "tiny", "--image-size", "32", "--batch-size", "2", "--steps", "1",
                           "--warmup", "0", "--dfs", "learned"])
    assert res["config"]["dfs"] == "learned" and res["trainable_params"] == n_on


def test_train_step_with_a_config_times_its_model_and_its_denoising_step(tmp_path, capsys):
    """--config builds the model train builds (width, border pad) and runs the denoising step (the clean rows through
    the teachers too); the edits are timed apart; a flag given beside it wins."""
    from benchmarks import _measure as M
    from benchmarks import train_step
    from uninet_feat.config import load_config
    from uninet_feat.optim import make_optimizers
    from uninet_feat.runs import make_model
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("backbone: tiny\nweights: random\nimage_size: 64\nbatch_size: 3\nwidth: 2\nborder_pad: 16\n"
                        "denoise: 1.0\nchannels_last: false\n")
    res = train_step.main(["--config", str(cfg_path), "--steps", "2", "--warmup", "0"])
    want = M.param_counts(*make_optimizers(make_model(load_config(cfg_path)), load_config(cfg_path)))
    bare = train_step.main(["--backbone", "tiny", "--image-size", "64", "--batch-size", "3", "--steps", "1",
                            "--warmup", "0"])
    assert res["trainable_params"] == want != bare["trainable_params"]   # the config's width, not the bare model's
    c = res["config"]
    assert (c["image_size"], c["batch_size"], c["width"], c["border_pad"], c["denoise"]) == (64, 3, 2, 16, 1.0)
    assert res["damaged_rows"] == 3 and res["edits_median_s"] > 0 and "edits_median_s" not in bare
    assert train_step.main(["--config", str(cfg_path), "--image-size", "32", "--steps", "1",
                            "--warmup", "0"])["config"]["image_size"] == 32


def test_official_compare_runs_our_side_with_learned_dfs(tmp_path, monkeypatch, capsys):
    from benchmarks import official_compare
    (tmp_path / "UniNet_lib").mkdir()
    (tmp_path / "UniNet_lib" / "model.py").write_text("")
    calls = []
    monkeypatch.setattr(official_compare.M, "run_json", lambda module, args, **kw: calls.append((module, args)) or {})
    official_compare.main(["--official-path", str(tmp_path), "--grad-checkpointing", "--image-size", "32"])
    ours = [[str(x) for x in args] for module, args in calls if module != "benchmarks.official_compare"]
    assert len(ours) == 4   # ours_train, ours_train_ckpt, ours_infer_b1, ours_infer_b8
    for args in ours:
        assert args[args.index("--dfs") + 1] == "learned"


# --- onnx_check: both paths over the same images ---------------------------------------------------------------

def test_onnx_check_times_torch_on_the_images_onnx_scores(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_check
    from uninet_feat import evaluate
    from uninet_feat.deploy import export_model
    data = write_texture_set(tmp_path / "set", n_train=8, n_good=2, n_bad=2, wide=True)   # 64x192 strips
    rng = np.random.default_rng(0)
    for i in range(3):   # normal test images of another size, which the tiled export does not take
        Image.fromarray(rng.integers(0, 255, (64, 128), dtype=np.uint8)).save(data / "test" / "good" / f"x{i}.png")
    run = _train(data, tmp_path / "run", tile=64)
    export_model(run, tmp_path / "exp")

    scored, real = [], evaluate.score_samples

    def spy(model, samples, cfg, **kw):
        scored.append(len(samples))
        return real(model, samples, cfg, **kw)

    class Clock:   # each reading one second after the last: each timed pass takes 1 s
        t = 0.0

        @classmethod
        def perf_counter(cls):
            cls.t += 1.0
            return cls.t

    monkeypatch.setattr(evaluate, "score_samples", spy)
    monkeypatch.setattr(onnx_check, "time", Clock)
    out = onnx_check.main(["--run", str(run), "--model", str(tmp_path / "exp")])
    assert out["images"] == 4 and len(out["left_out_other_size"]) == 3
    assert scored == [4]                                  # the torch pass scores the images ONNX scores...
    assert out["images_per_s_torch"] == pytest.approx(4.0)   # ...and its rate is theirs over its own time
    assert out["max_abs_diff_score"] < 1e-3


# --- aitex_heads: the plain side is each run's backbone, size and tiling ---------------------------------------

def test_aitex_heads_plain_features_follow_each_runs_config(tmp_path, monkeypatch, capsys):
    from benchmarks import aitex_heads as H
    data = write_texture_set(tmp_path / "set", n_train=8, n_good=2, n_bad=2, wide=True)
    rows = [[str(p.relative_to(data)), p.parts[-3], p.parent.name, "", "A"] for p in sorted(data.rglob("*.png"))
            if "ground_truth" not in p.parts]
    with open(data / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split", "label", "mask", "group"]] + rows)
    run = _train(data, tmp_path / "run", split_csv=str(data / "m.csv"), group="A", tile=64)
    made = []

    class Spy(H.Extractor):
        def __init__(self, *a, **k):
            made.append(k)
            if k.get("run"):   # the plain one is only recorded (never built: no download)
                super().__init__(*a, **k)

    class Stop(Exception):
        pass

    def table(ex, ss):
        if len(made) >= 2:
            raise Stop
        return np.zeros((len(ss), 2)), [str(s.path) for s in ss]

    monkeypatch.setattr(H, "Extractor", Spy)
    monkeypatch.setattr(H, "table", table)
    with pytest.raises(Stop):
        H.main(["--data", str(data), "--split-csv", str(data / "m.csv"), "--runs", str(run)])
    plain = [k for k in made if not k.get("run")]
    assert len(plain) == 1
    assert {k: plain[0][k] for k in ("backbone", "weights", "image_size", "tile")} == {
        "backbone": "tiny", "weights": "random", "image_size": 64, "tile": 64}


def test_aitex_heads_plain_weights_of_a_run_trained_from_a_file_are_imagenet():
    from benchmarks.aitex_heads import plain_settings
    cfg = {"backbone": "tiny", "weights": __file__, "image_size": 32, "tile": None}
    assert dict(plain_settings(cfg))["weights"] == "imagenet"
    assert dict(plain_settings({**cfg, "weights": "random"}))["weights"] == "random"


# --- cluster_synthetic: normals of two folders with the same file names ----------------------------------------

def test_cluster_synthetic_writes_every_validation_normal(tmp_path):
    from benchmarks import cluster_synthetic as C
    from uninet_feat.calibration import with_calibration_normals
    from uninet_feat.normals import validation_normals
    from uninet_feat.checkpoint import read_checkpoint
    from uninet_feat.selection import parse_kinds
    data = tmp_path / "data"
    write_texture_set(data / "A", n_train=8, n_good=1, n_bad=1, size=32)   # both: train/good/000.png ...
    write_texture_set(data / "B", n_train=8, n_good=1, n_bad=1, size=32, seed=5)
    run = _train(data, tmp_path / "run", image_size=32, val_fraction=0.5)
    val = validation_normals(with_calibration_normals(dict(read_checkpoint(run / "model.pt")["config"]), run))
    names = [Path(s.path).name for s in val]
    assert len(set(names)) < len(names)   # the case: same-named normals of different folders
    kinds = parse_kinds("texture_patch")
    d = C.make_set(run, tmp_path / "out", kinds, 0)
    assert len(list((d / "good").glob("*.png"))) == len(val)
    assert len(list((d / kinds[0]).glob("*.png"))) == len(val)


def test_cluster_synthetic_again_into_its_out_clusters_only_this_runs_kinds(tmp_path, capsys):
    """The set was written over the last one without clearing it: a kind no longer asked for stayed, and was
    extracted and clustered with the new ones (the JSON naming the asked kinds only)."""
    from benchmarks import cluster_synthetic as C
    data = write_texture_set(tmp_path / "data", n_train=16, n_good=1, n_bad=1, size=32)
    run = _train(data, tmp_path / "run", image_size=32, val_fraction=0.5)
    out = tmp_path / "out"
    assert C.main(["--run", str(run), "--kinds", "texture_patch,hole", "--out", str(out)]) == 0
    assert C.main(["--run", str(run), "--kinds", "texture_patch,stain", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["good", "stain", "texture_patch"]
    res = json.loads((out / "cluster_synthetic.json").read_text())
    n = sum(len(list((out / "data" / k).glob("*.png"))) for k in ("stain", "texture_patch"))
    assert res["kinds"] == ["texture_patch", "stain"] and res["n_images"] == n


# --- extract_throughput: growth from smallest to largest count; the synthetic set made once and deleted -----

def test_extract_throughput_growth_is_largest_minus_smallest_count(monkeypatch, capsys):
    from benchmarks import extract_throughput as E
    seen = []

    def fake(module, args, **kw):
        n = int(args[args.index("--child") + 1])
        seen.append(n)
        return {"peak_rss_mb": float(n)}

    monkeypatch.setattr(E.M, "run_json", fake)
    out = E.main(["--counts", "1000", "250", "4000", "--data", "x"])
    assert seen == [250, 1000, 4000] and list(out["runs"]) == ["250", "1000", "4000"]
    assert out["peak_rss_growth_mb"] == 3750.0


def test_extract_throughput_synthetic_data_is_made_once_and_removed(tmp_path, monkeypatch, capsys):
    from benchmarks import extract_throughput as E
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    made = []
    from uninet_feat.data import synthetic
    orig = synthetic.make_fabric_dataset
    monkeypatch.setattr(synthetic, "make_fabric_dataset", lambda root, **kw: made.append(root) or orig(root, **kw))

    def in_process(module, args, **kw):   # each child run here instead of in a fresh process
        return E.main([str(x) for x in args])

    monkeypatch.setattr(E.M, "run_json", in_process)
    out = E.main(["--backbone", "tiny", "--image-size", "32", "--counts", "2", "3", "--shard-size", "2"])
    assert [r["n_images"] for r in out["runs"].values()] == [2, 3]
    assert len(made) == 1                  # one synthetic set for both counts
    assert list(scratch.iterdir()) == []   # and nothing left behind


# --- gpu_check: its verdicts -----------------------------------------------------------------------------------

def test_gpu_check_fails_a_difference_past_its_limit_or_a_missing_side_and_goes_on_after_a_failed_command(
        tmp_path, capsys):
    """The device machine is lent minutes at a time: a verdict that passed a wrong figure, or a failed command that
    stopped the later steps (as the first session-49 call's refused `index --device cuda` would have), costs a lease."""
    import sys
    from benchmarks.gpu_check import Checks, _scores
    c = Checks()
    a = {"x.png": 1.0, "y.png": 2.0}
    assert c.close("near", a, {"x.png": 1.0 + 5e-4, "y.png": 2.0}, 1e-3) == pytest.approx(5e-4)
    assert c.fails == []
    c.close("far", a, {"x.png": 1.0, "y.png": 2.01}, 1e-3)
    c.close("one image fewer", a, {"x.png": 1.0}, 1e-3)
    c.close("missing", a, None, 1e-3)
    assert c.fails == ["far", "one image fewer", "missing"]
    c.close("printed only", a, {"x.png": 9.0, "y.png": 2.0}, None)   # not checked: printed, never a failure
    c.close("printed, missing", None, a, None)
    assert c.fails == ["far", "one image fewer", "missing"] and c.figures["printed only"] == pytest.approx(8.0)
    assert "not checked" in capsys.readouterr().out
    assert not c.run("a failing command", [sys.executable, "-c", "raise SystemExit(3)"])
    assert c.run("a command after it", [sys.executable, "-c", "pass"])
    assert c.fails[-1] == "a failing command" and set(c.figures["seconds"]) == {"a failing command",
                                                                              "a command after it"}
    p = tmp_path / "p.csv"
    p.write_text("path,wdm_score,knn_score\nx.png,1.5,0.25\n")
    assert _scores(p) == {"x.png": 1.5} and _scores(p, "knn_score") == {"x.png": 0.25}
    assert _scores(tmp_path / "none.csv") is None
