"""The VLM variant through the CLI: train, extract and predict with `--backbone clip:tiny`, and a local weights file."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from uninet_feat.backbones import create_backbone
from uninet_feat.cli import main
from uninet_feat.errors import BadInputError
from uninet_feat.predict import predict_cmd
from uninet_feat.featstore import FeatureStore

from _tiny import write_texture_set


def test_clip_backbone_through_the_cli(tmp_path):
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=2)
    torch.manual_seed(0)
    weights = tmp_path / "clip_tiny.pt"
    torch.save(create_backbone("clip:tiny", weights="random").visual.state_dict(), weights)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert cfg["backbone"] == "clip:tiny" and cfg["weights"] == str(weights)
    feats = tmp_path / "f"
    assert main(["extract", "--data", str(data), "--run", str(run), "--patches", "--out", str(feats), "--quiet"]) == 0
    store = FeatureStore(feats)
    assert store.vectors.shape[0] == 8 and np.isfinite(store.vectors).all() and np.isfinite(store.scores).all()
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "p"),
                 "--no-overlays"]) == 0
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(rows) == 8 and all(np.isfinite(r["wdm_score"]) for r in rows)


def _full_clip_file(path):
    """A tiny open_clip model with both towers (image + text), saved as a local checkpoint file."""
    from uninet_feat.backbones.clip import build_clip_model
    torch.manual_seed(1)
    torch.save(build_clip_model("tiny").state_dict(), path)
    return path


def test_text_columns_in_extract_train_head_predict_and_zero_shot(tmp_path):
    """`--text` appends the zero-shot columns; they come from the original CLIP file's text tower and the
    (frozen) image tower, so a run's store and a plain-backbone store agree; the zero-shot command gives
    the same image scores; a head trained on them needs `predict --text`."""
    from uninet_feat.backbones.clip import build_clip_model
    from uninet_feat.vlm import FEATURE_NAMES, TextScorer
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=3, n_bad=3)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    assert main(["extract", "--data", str(data), "--run", str(run), "--text", "--out", str(tmp_path / "fr"),
                 "--quiet"]) == 0
    assert main(["extract", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--text", "--out", str(tmp_path / "fp"), "--quiet"]) == 0
    fr, fp = FeatureStore(tmp_path / "fr"), FeatureStore(tmp_path / "fp")
    assert fr.manifest["vector_names"][-4:] == list(FEATURE_NAMES) == fp.manifest["vector_names"][-4:]
    assert fr.manifest["source"]["text"]["defect"][0].endswith("fabric.")
    np.testing.assert_allclose(fr.vectors[:, -4:], fp.vectors[:, -4:], rtol=1e-5, atol=1e-6)
    # the same numbers as a TextScorer built by hand on the file's model
    ts = TextScorer(create_backbone("clip:tiny", weights=str(weights)).eval(), text_model=build_clip_model(
        "tiny", str(weights)))
    other = TextScorer(create_backbone("clip:tiny", weights=str(weights)).eval(), text_model=build_clip_model("tiny"))
    assert not torch.allclose(ts.text_embeddings, other.text_embeddings)  # the file's text tower matters
    paths = [it["path"] for it in fp.items]
    from uninet_feat.extract import Extractor
    x = Extractor(backbone="clip:tiny", weights=str(weights), image_size=64)._dataset(paths)[1]
    batch = torch.stack([x[i]["image"] for i in range(len(paths))])
    np.testing.assert_allclose(fp.vectors[:, -4:], ts.features(batch).numpy(), rtol=1e-5, atol=1e-6)

    zs = tmp_path / "zs"
    assert main(["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--out", str(zs), "--quiet"]) == 0
    rows = json.loads((zs / "scores.json").read_text())
    by_path = {r["path"]: r["clip_image_score"] for r in rows}
    np.testing.assert_allclose([by_path[p] for p in paths], fp.vectors[:, -4], rtol=1e-5)
    assert {(r["label"] == "good", r["is_defect"]) for r in rows} == {(True, 0), (False, 1)}   # as evaluate's CSV
    metrics = json.loads((zs / "metrics.json").read_text())
    assert 0.0 <= metrics["clip_image_score"]["image_auroc"] <= 1.0 and (zs / "config.yaml").exists()
    one = paths[0]   # one image, as its help says (it was refused as "not a folder"): scored, no metrics
    assert main(["zero-shot", "--data", os.path.relpath(one), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--out", str(tmp_path / "zs1"), "--quiet"]) == 0   # no --image-size: the model's native 64
    got = json.loads((tmp_path / "zs1" / "scores.json").read_text())
    assert [(r["path"], r["is_defect"]) for r in got] == [
        (one, "")]   # absolute, as the other commands write paths (it was as typed); unlabelled: neither 1 nor 0
    assert got[0]["clip_image_score"] == pytest.approx(by_path[one], rel=1e-5)   # at 64 px, as asked above
    assert "image_size: 64\n" in (tmp_path / "zs1" / "config.yaml").read_text()   # was 224 for every model

    head = tmp_path / "head"
    assert main(["train-head", "--features", str(tmp_path / "fr"), "--folds", "2", "--out", str(head)]) == 0
    assert main(["predict", "--run", str(run), "--data", str(data), "--head", str(head), "--no-overlays",
                 "--out", str(tmp_path / "p0")]) == 2            # head needs the text columns
    assert main(["predict", "--run", str(run), "--data", str(data), "--head", str(head), "--text", "--no-overlays",
                 "--out", str(tmp_path / "p1")]) == 0
    preds = json.loads((tmp_path / "p1" / "predictions.json").read_text())
    assert len(preds) == 12 and all("head_prediction" in r for r in preds)
    assert all(np.isfinite(r["clip_image_score"]) for r in preds)   # --text's columns are written too
    other = tmp_path / "other.yaml"   # other prompts: other clip_* columns than the head was trained on
    other.write_text("defect: ['a photo of a cracked {}.']\n")
    assert main(["predict", "--run", str(run), "--data", str(data), "--head", str(head), "--text", str(other),
                 "--no-overlays", "--out", str(tmp_path / "p2")]) == 2
    torch.manual_seed(2)   # the CLIP file replaced by another one: its text tower gives other columns, unnoticed
    torch.save(build_clip_model("tiny").state_dict(), weights)
    with pytest.raises(BadInputError, match=r"text columns came from a CLIP file with sha256 .*replaced or edited"):
        predict_cmd(run, data, tmp_path / "p3", heads=[head], text=True, overlays=False, quiet=True)


def test_zero_shot_skip_bad(tmp_path, capsys):
    """zero-shot stops on an unreadable image with its name and the fix; with --skip-bad it scores the others,
    warns with the name and lists it as `skipped` (printed result and metrics.json)."""
    import pytest
    import yaml
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=2, n_bad=2)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    broken = data / "test" / "good" / "truncated.png"
    good = (data / "test" / "good" / "000.png").read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    argv = ["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
            "--image-size", "64", "--quiet", "--out", str(tmp_path / "zs")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 of 7 images is unreadable" in err and str(broken) in err and "--skip-bad" in err, err
    with pytest.warns(UserWarning, match="truncated.png"):
        assert main(argv + ["--skip-bad"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["skipped"] == [str(broken)] and res["n_images"] == 6
    rows = json.loads((tmp_path / "zs" / "scores.json").read_text())
    assert str(broken) not in {r["path"] for r in rows} and len(rows) == 6
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text())["skipped"] == [str(broken)]
    assert yaml.safe_load((tmp_path / "zs" / "config.yaml").read_text())["skip_bad"] is True


def test_zero_shot_of_an_unlabelled_batch_leaves_no_earlier_metrics(tmp_path):
    """metrics.json is written only when the labels hold both classes; a labelled run and then an unlabelled batch
    into the same --out kept the first run's metrics beside the second run's scores."""
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=2, n_bad=2)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    zs = tmp_path / "zs"
    argv = ["zero-shot", "--backbone", "clip:tiny", "--weights", str(weights), "--image-size", "64", "--quiet",
            "--out", str(zs)]
    assert main(argv + ["--data", str(data)]) == 0 and (zs / "metrics.json").is_file()
    good = data / "test" / "good"   # a plain folder: unlabelled, no metrics; a predict's overlays there left out
    (good / "pred" / "overlays").mkdir(parents=True)
    for name in ("predictions.csv", "summary.json"):
        (good / "pred" / name).write_text("")
    shutil.copy(sorted(good.glob("*.png"))[0], good / "pred" / "overlays" / "a_overlay.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) in predict output folder"):
        assert main(argv + ["--data", str(good)]) == 0
    assert len(json.loads((zs / "scores.json").read_text())) == 2 and not (zs / "metrics.json").exists()


def test_text_columns_need_a_clip_backbone(tmp_path, capsys):
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=1, n_bad=1)
    assert main(["extract", "--data", str(data), "--backbone", "resnet18", "--weights", "random", "--text",
                 "--image-size", "64", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "clip: backbone" in capsys.readouterr().err


def test_prompts_command_writes_an_editable_file(tmp_path):
    from uninet_feat.vlm import load_prompts
    assert main(["prompts", "--object", "tile", "--out", str(tmp_path / "p" / "prompts.yaml")]) == 0
    p = load_prompts(tmp_path / "p" / "prompts.yaml")
    assert "a photo of a flawless tile." in p["normal"] and all("fabric" not in s for s in p["defect"])
    assert main(["prompts", "--out", str(tmp_path / "p")]) == 2   # a folder: said so (it named a temp file)
    # a new folder named with its slash: refused, not written as a file named "new" (Path drops the slash)
    assert main(["prompts", "--out", str(tmp_path / "new") + "/"]) == 2 and not (tmp_path / "new").exists()


def test_zero_shot_and_extract_refuse_sizes_that_do_not_fit(tmp_path, capsys):
    """--image-size 0 or -3 was a ZeroDivisionError / torch traceback in zero-shot (extract took 0 as the
    default, silently); a size off the patch grid named TextScorer's tensors. Now one line with the fix."""
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=1, n_bad=1)
    zs = ["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", "random", "--quiet",
          "--out", str(tmp_path / "zs")]
    ex = ["extract", "--data", str(data), "--backbone", "clip:tiny", "--weights", "random", "--quiet",
          "--out", str(tmp_path / "f")]
    for argv, said in ((zs + ["--image-size", "0"], "image_size must be an integer >= 8, got 0"),
                       (zs + ["--image-size", "-3"], "image_size must be an integer >= 8, got -3"),
                       (zs + ["--image-size", "50"], "image size 50 is not a multiple of 16, the patch grid of "
                                                     "clip:tiny (fix: --image-size 48 or 64)"),
                       (ex + ["--image-size", "0"], "image_size must be an integer >= 8, got 0")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "zs").exists() and not (tmp_path / "f").exists()


def test_text_columns_of_a_border_pad_run_are_the_plain_image_towers(tmp_path):
    """A run trained with ``--border-pad`` feeds its source teacher the mirrored input: its tower pass is not the
    image's, so extract's text columns must not reuse it (they would score the mirrored image, and a run's store
    would no longer agree with a plain-backbone store of the same CLIP file)."""
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--border-pad", "16", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["extract", "--data", str(data), "--run", str(run), "--text", "--out", str(tmp_path / "fr"),
                 "--quiet"]) == 0
    assert main(["extract", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--text", "--out", str(tmp_path / "fp"), "--quiet"]) == 0
    fr, fp = FeatureStore(tmp_path / "fr"), FeatureStore(tmp_path / "fp")
    np.testing.assert_allclose(fr.vectors[:, -4:], fp.vectors[:, -4:], rtol=1e-5, atol=1e-6)


def test_mean_and_std_of_a_weights_file_are_given_checked_recorded_and_scored_with(tmp_path, capsys):
    """A CLIP file trained with another normalisation than the backbone's default (0.5 / 0.5, as some open_clip
    checkpoints and many fine-tunes) had no way in: `--mean R G B --std R G B` gives it to `train` (recorded in the
    run's config.yaml, and in model.pt as the backbone's own, so evaluate, predict, extract --run and Detector score
    with it), to `extract` without --run (the store's source) and to `zero-shot` (its config.yaml, re-run with
    --config). Values that cannot normalise, one of the two alone, a backbone that ignores them, another pair on
    --resume and --mean beside --run are refused before any folder is written."""
    import yaml
    from uninet_feat.checkpoint import read_checkpoint
    from uninet_feat.detector import Detector
    from uninet_feat.extract import Extractor
    from _tiny import register_tiny
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    base = ["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights), "--image-size", "64",
            "--epochs", "1", "--batch-size", "2", "--quiet"]
    for extra, said in ((["--mean", "0.5", "0.5", "0.5"], "mean is given without std"),
                        (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], "std must be 3 numbers"),
                        (["--mean", "127", "127", "127", "--std", "60", "60", "60"], r"each in [0, 1]")):
        capsys.readouterr()
        assert main(base + extra + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert said in err and "--mean R G B --std R G B" in err, err
    assert main(["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--epochs", "1", "--quiet", "--out", str(tmp_path / "bad")] + norm) == 2
    assert "backbone tiny does not take an input normalisation" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    assert main(base + norm + ["--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["mean"], cfg["std"]) == ([0.5] * 3, [0.25] * 3)
    bb = read_checkpoint(run / "model.pt")["backbone"]
    assert (bb["mean"], bb["std"]) == ([0.5] * 3, [0.25] * 3)
    assert Extractor(run).backbone.std == (0.25,) * 3 and Detector(run).model.source.mean == (0.5,) * 3
    capsys.readouterr()
    assert main(base + ["--mean", "0.4", "0.4", "0.4", "--std", "0.25", "0.25", "0.25", "--out", str(run),
                        "--resume"]) == 2
    assert "mean" in capsys.readouterr().err
    assert main(["extract", "--data", str(data), "--run", str(run), "--out", str(tmp_path / "fr"), "--quiet"]
                + norm) == 2
    assert "a run scores with the one it was trained with" in capsys.readouterr().err
    assert main(["extract", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--out", str(tmp_path / "fp"), "--quiet"] + norm) == 0
    assert FeatureStore(tmp_path / "fp").manifest["source"]["backbone"]["std"] == [0.25] * 3
    zs = tmp_path / "zs"
    assert main(["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--quiet", "--out", str(zs)] + norm) == 0
    saved = yaml.safe_load((zs / "config.yaml").read_text())
    assert (saved["mean"], saved["std"]) == ([0.5] * 3, [0.25] * 3)
    first = json.loads((zs / "scores.json").read_text())
    assert saved["out"] == str(zs.resolve()) and saved["device"] in (None, "auto")   # as asked, not as resolved
    assert main(["zero-shot", "--config", str(zs / "config.yaml"), "--quiet"]) == 0   # the same again, --out from it
    assert json.loads((zs / "scores.json").read_text()) == first
    assert main(["zero-shot", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(weights),
                 "--image-size", "64", "--quiet", "--out", str(tmp_path / "zs2")]) == 0   # CLIP's own: other scores
    assert json.loads((tmp_path / "zs2" / "scores.json").read_text()) != first


def test_a_resumed_clip_run_keeps_the_normalisation_and_activation_it_trained_with(tmp_path, monkeypatch):
    """A clip: backbone now reads a local file's mean/std and QuickGELU from its name (open_clip's tags). A run
    started before (OpenAI's mean/std, GELU for `.../tiny.openai.bin`) and resumed after rebuilt its backbone from
    the file name, so its last epochs trained on other inputs and activations (no parameter tells them apart) and
    model.pt recorded the new ones. Resumed, it keeps the checkpoint's. And an open_clip_config.json's preprocess_cfg
    kept in a registered config no longer breaks the text tower's build (a TypeError in open_clip's CLIP)."""
    import open_clip
    from uninet_feat.backbones import clip as C
    from uninet_feat.checkpoint import read_checkpoint
    tiny = dict(C._CONFIGS["tiny"])
    tags = {"openai": {"quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3, "hf_hub": "timm/tiny.openai/"}}
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: dict(tiny) if n == "Tiny-OC" else None)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda n: list(tags) if n == "Tiny-OC" else [])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda n, t: tags.get(t, {}) if n == "Tiny-OC" else {})
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    weights = tmp_path / "tiny.openai.bin"
    torch.save(C.build_clip_model("tiny").state_dict(), weights)
    run = tmp_path / "run"
    base = ["train", "--data", str(data), "--backbone", "clip:Tiny-OC", "--weights", str(weights), "--image-size",
            "64", "--batch-size", "2", "--quiet", "--out", str(run)]
    with monkeypatch.context() as old:   # the version before: nothing read from the file's name
        old.setattr(C, "file_quick_gelu", lambda *a: False)
        old.setattr(C, "file_normalisation", lambda *a: (C.OPENAI_MEAN, C.OPENAI_STD, "OpenAI's"))
        assert main(base + ["--epochs", "1"]) == 0
    was = read_checkpoint(run / "model.pt")["backbone"]
    assert was["quick_gelu"] is False and tuple(was["mean"]) == tuple(C.OPENAI_MEAN)
    (run / "model.pt").unlink()   # killed before the end of a longer schedule
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    now = read_checkpoint(run / "model.pt")["backbone"]
    assert (now["quick_gelu"], now["mean"], now["std"]) == (was["quick_gelu"], was["mean"], was["std"])
    assert create_backbone("clip:Tiny-OC", weights=str(weights)).quick_gelu is True   # a new run reads the name
    C.register_clip_config("tiny-pre", {"model_cfg": tiny, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    assert C.build_clip_model("tiny-pre").visual is not None


def test_zero_shot_of_a_predict_output_folder_alone_is_refused_by_name(tmp_path, capsys):
    """Every image of a predict's output folder is left out of a batch; zero-shot then scored an empty list and
    died in numpy (`concatenate`); refused naming the folder, as predict is."""
    out = tmp_path / "pred"
    (out / "overlays").mkdir(parents=True)
    for name in ("predictions.csv", "summary.json"):
        (out / name).write_text("")
    data = write_texture_set(tmp_path / "d", n_train=1, n_good=1, n_bad=0)
    shutil.copy(sorted((data / "test" / "good").glob("*.png"))[0], out / "overlays" / "a_overlay.png")
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    assert main(["zero-shot", "--backbone", "clip:tiny", "--weights", str(weights), "--image-size", "64", "--quiet",
                 "--data", str(out), "--out", str(tmp_path / "zs")]) == 2
    assert "every image under --data is a predict output" in capsys.readouterr().err


def test_a_plain_clip_index_whose_backbone_rebuilds_otherwise_is_refused():
    """A plain-feature kNN index is queried through a backbone rebuilt from its name and weights; a clip: file whose
    name now gives it QuickGELU or open_clip's mean/std (an index built before) made other query patches than the
    indexed ones, silently. Its recorded mean/std are passed; an activation that differs is refused by name."""
    from pathlib import Path
    from uninet_feat.scorers import _plain_knn_extractor
    record = create_backbone("clip:tiny", mean=(0.5,) * 3, std=(0.25,) * 3).config()
    source = {"backbone": record, "weights": "random", "settings": {"image_size": 64}}
    ex = _plain_knn_extractor(source, Path("knn.json"), False)
    assert (ex.backbone.mean, ex.backbone.std) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(BadInputError, match="quick_gelu=True"):
        _plain_knn_extractor({**source, "backbone": {**record, "quick_gelu": True}}, Path("knn.json"), False)


def _flat_set(root, n_good=6, n_bad=3):
    """``root/good/*.png`` and ``root/hole/*.png``: a folder of label folders (its split drawn by path hash)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, n in (("good", n_good), ("hole", n_bad)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_zero_shot_metrics_say_which_images_they_are_over_or_why_there_are_none(tmp_path):
    """metrics.json is the test split's (as evaluate's), and `metrics_on` now says so and counts its images
    (`n_images` counts every scored one, the training normals too); a folder of label folders whose normals the
    path hash all put in the train split got no metrics.json and no word: now a warning says why and the fix."""
    from uninet_feat.runs import samples_of
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    argv = ["zero-shot", "--backbone", "clip:tiny", "--weights", str(weights), "--image-size", "64", "--quiet"]
    data = write_texture_set(tmp_path / "d", n_train=2, n_good=2, n_bad=3)
    assert main(argv + ["--data", str(data), "--out", str(tmp_path / "zs")]) == 0
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["metrics_on"] == {"split": "test", "n_normal": 2, "n_defect": 3} and m["n_images"] == 7
    flat = _flat_set(tmp_path / "flat")
    assert {s.split for s in samples_of(flat) if s.is_normal} == {"train"}   # the case: no test normal
    with pytest.warns(UserWarning, match=r"no metrics.json: the labels hold normal and defective images, but the "
                                         r"test split, .* holds 0 normal and 3 defective.*train split.*Fix: "
                                         r"--split-csv"):
        assert main(argv + ["--data", str(flat), "--out", str(tmp_path / "zs")]) == 0
    assert not (tmp_path / "zs" / "metrics.json").exists()


def test_a_config_prompts_mapping_is_read_as_a_prompt_file(tmp_path, capsys):
    """zero-shot --config with a `prompts:` mapping read only its normal/defect lists: `object`, `templates` and
    unknown keys (`normals:`) were ignored silently. Now checked and expanded as a prompt file; the sentences a
    run's config.yaml records re-run unchanged."""
    import yaml
    data = write_texture_set(tmp_path / "d", n_train=1, n_good=1, n_bad=1)
    weights = _full_clip_file(tmp_path / "clip_full.pt")
    base = {"data": str(data), "backbone": "clip:tiny", "weights": str(weights), "image_size": 64, "quiet": True}

    def run(prompts, name):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "prompts": prompts}))
        return main(["zero-shot", "--config", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)])
    assert run({"object": "leather", "templates": ["a photo of {}."], "normal": ["flawless {}"],
                "defect": ["{} with a hole", "torn {}"]}, "a") == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["prompts"] == {"normal": ["a photo of flawless leather."],
                                "defect": ["a photo of leather with a hole.", "a photo of torn leather."]}
    capsys.readouterr()
    assert main(["zero-shot", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["prompts"] == saved["prompts"]
    assert (json.loads((tmp_path / "b" / "scores.json").read_text())
            == json.loads((tmp_path / "a" / "scores.json").read_text()))
    assert run({"normals": ["flawless leather"], "defect": ["torn leather"]}, "c") == 2
    err = capsys.readouterr().err
    assert "`prompts:` mapping" in err and "unknown: ['normals']" in err and "fix:" in err
    assert run({"object": "", "defect": ["torn {}"]}, "e") == 2
    assert "'object' must be a non-empty word" in capsys.readouterr().err


def test_the_prompts_command_keeps_an_existing_file_and_checks_the_object(tmp_path, capsys):
    """`prompts --out` overwrote an existing (perhaps edited) file silently, and wrote `--object ""` (refused
    only when the file was used)."""
    p = tmp_path / "prompts.yaml"
    assert main(["prompts", "--object", "tile", "--out", str(p)]) == 0
    assert main(["prompts", "--object", "tile", "--out", str(p)]) == 0   # the same text again: no harm
    edited = p.read_text().replace("object: tile", "object: slate")
    p.write_text(edited)
    capsys.readouterr()
    assert main(["prompts", "--object", "tile", "--out", str(p)]) == 2 and p.read_text() == edited
    err = capsys.readouterr().err
    assert "exists" in err and "another --out, or delete the file" in err
    for obj in ("", "  "):
        assert main(["prompts", "--object", obj, "--out", str(tmp_path / "e.yaml")]) == 2
        assert "fix:" in capsys.readouterr().err and not (tmp_path / "e.yaml").exists()
