"""`export-model`: a run as one ONNX file that scores decoded images as predict scores their files."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.data import load_image
from uninet_feat.deploy import export_model
from uninet_feat.detector import Detector
from uninet_feat.errors import BadInputError
from uninet_feat.train import train

from _tiny import register_tiny, stand_in_exporter, write_texture_set

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
register_tiny()
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.3, "channels_last": False, "seed": 3}


def _run_onnx(folder, paths):
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"image": load_image(p).transpose(2, 0, 1)[None].astype(np.float32)}) for p in paths]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_plain")
    data = write_texture_set(root / "set", n_train=8, n_good=3, n_bad=3)
    train(load_config(None, {"data": str(data)}, base=BASE), root / "run", quiet=True)
    odd = root / "odd"   # other sizes and modes than the training images': the graph resizes them itself
    odd.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 70)) * 255).astype(np.uint8)).save(odd / "grey_90x70.png")
    Image.fromarray((rng.random((50, 120, 3)) * 255).astype(np.uint8)).save(odd / "rgb_50x120.png")
    Image.fromarray((rng.random((64, 64)) * 65535).astype(np.uint16)).save(odd / "grey16.png")
    return data, root / "run", odd


@pytest.fixture(scope="module")
def exported(plain, tmp_path_factory):
    """The plain run exported once by the command (each export takes torch ~20 s): tests read it, or copy it as
    the previous export of a folder."""
    out = tmp_path_factory.mktemp("deploy_exported") / "m"
    assert main(["export-model", "--run", str(plain[1]), "--out", str(out), "--quiet"]) == 0
    return out


def _previous(exported, out):
    """``out``: a copy of the shared export, as if an earlier export-model had written it."""
    import shutil
    shutil.copytree(exported, out)
    return out


def test_exported_untiled_run_scores_files_as_predict_does(plain, exported, tmp_path):
    data, run, odd = plain
    meta = json.loads((exported / "model.json").read_text())
    cal = json.loads((run / "calibration.json").read_text())
    assert meta["threshold"] == cal["threshold"] and meta["check"]["max_abs_diff_score"] < 1e-4
    assert {p.name for p in exported.iterdir()} >= {"model.onnx", "model.json", "config.yaml", "env.json",
                                                     "run_config.yaml"}
    paths = sorted((data / "test").rglob("*.png")) + sorted(odd.iterdir())
    got = _run_onnx(exported, paths)
    want = Detector(run).score(paths)
    for p, (m, s, full), d in zip(paths, got, want):
        assert abs(float(s[0]) - d.score) < 1e-4 * max(1.0, abs(d.score)), p.name
        assert (float(s[0]) > meta["threshold"]) == bool(d.flagged), p.name
        assert m.shape == (1, 64, 64)   # the model's size
        np.testing.assert_allclose(full[0], d.map, atol=1e-4)   # and at the file's size, as predict gives it out
        assert (full[0] > meta["pixel_threshold"]).mean() == pytest.approx(d.mask.mean(), abs=2e-3), p.name


def test_exported_tiled_run_holds_tiles_offsets_and_stitching(tmp_path):
    data = write_texture_set(tmp_path / "wide", n_train=8, n_good=2, n_bad=2, wide=True)   # 64 x 192 strips
    for p in (data / "train" / "good").glob("*.png"):   # a left edge unlike the rest: offsets matter
        a = np.asarray(Image.open(p)).copy()
        a[:, :48] = a[:, :48] // 3
        Image.fromarray(a).save(p)
    cfg = load_config(None, {"data": str(data), "tile": 48, "tile_overlap": 16, "image_size": 32,
                             "tile_norm": "position"}, base=BASE)   # tiles resized 48 → 32 and their maps back
    train(cfg, tmp_path / "run", quiet=True)
    assert main(["export-model", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    t = meta["tiling"]
    assert t["tile"] == [48, 48] and t["overlap"] == 16 and len(t["offsets"]) == len(t["origins_yx"]) > 3
    assert max(abs(v) for v in t["offsets"]) > 0   # the darker edge's places have their own offsets
    paths = sorted((data / "test").rglob("*.png"))
    got = _run_onnx(tmp_path / "m", paths)
    want = Detector(tmp_path / "run").score(paths)
    for p, (m, s, tiles), d in zip(paths, got, want):
        assert abs(float(s[0]) - d.score) < 1e-4 * max(1.0, abs(d.score)), p.name
        assert m.shape == (1, 64, 192) and tiles.shape == (1, len(t["origins_yx"]))
        np.testing.assert_allclose(m[0], d.map, atol=1e-4)   # stitched, offsets taken off, at the strip's size
    # images of another size than the offsets were measured on are refused, naming the sizes
    with pytest.raises(BadInputError, match="offsets were measured on 192x64"):
        export_model(tmp_path / "run", tmp_path / "m2", input_size=(256, 64))


def test_export_refusals_name_the_fix(plain, exported, tmp_path, monkeypatch, capsys):
    _, run, _ = plain
    with pytest.raises(BadInputError, match="opset 18 or later"):
        export_model(run, tmp_path / "a", opset=17)
    with pytest.raises(SystemExit):   # argparse: not WxH
        main(["export-model", "--run", str(run), "--out", str(tmp_path / "a"), "--input-size", "4096", "--quiet"])
    assert main(["export-model", "--run", str(run), "--out", str(tmp_path / "a"), "--opset", "17", "--quiet"]) != 0
    assert "opset 18 or later" in capsys.readouterr().err   # the command says it, without a traceback
    # the exporter stands in from here: what is tested is what export-model does with the file it writes
    stand_in_exporter(monkeypatch, exported / "model.onnx")   # an opset-18 file, whatever opset is asked
    with pytest.raises(BadInputError, match="wrote opset"):   # past what onnx converts, torch keeps 18 silently
        export_model(run, tmp_path / "o", opset=99)
    assert not (tmp_path / "o" / "model.onnx").exists()
    from uninet_feat.featstore import file_sha256
    import uninet_feat.deploy as deploy
    _previous(exported, tmp_path / "b")   # a good export, then a refused one into the same folder
    import torch
    x = torch.rand(1, 3, 64, 64)
    got = ort.InferenceSession(str(tmp_path / "b" / "model.onnx")).run(None, {"image": x.numpy()})
    assert deploy.check_onnx(tmp_path / "b" / "model.onnx", x, got)["max_abs_diff_score"] == 0
    with pytest.raises(BadInputError, match="maps differ"):   # the heatmap is checked too, not only the score
        deploy.check_onnx(tmp_path / "b" / "model.onnx", x, [got[0] + 0.5, got[1], got[2]])
    with pytest.raises(BadInputError, match="map_images differ"):   # and the map at the image's size (unchecked)
        deploy.check_onnx(tmp_path / "b" / "model.onnx", x, [got[0], got[1], got[2] + 0.5])
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)   # every difference too large: the file must not stay
    with pytest.raises(BadInputError, match="differ from the run's"):
        export_model(run, tmp_path / "c")
    assert not (tmp_path / "c" / "model.onnx").exists()
    with pytest.raises(BadInputError, match="differ from the run's"):
        export_model(run, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "model.json").read_text())   # the previous pair, whole and matching
    assert meta["onnx_sha256"] == file_sha256(tmp_path / "b" / "model.onnx")
    assert not [p.name for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]
    # and its records: a refused export-model wrote its own config.yaml / env.json beside the previous export's
    # model.onnx and model.json (an audit, session 52), so `--config OUT/config.yaml` re-ran another command
    records = {n: (tmp_path / "b" / n).read_bytes() for n in ("config.yaml", "env.json", "model.json")}
    assert main(["export-model", "--run", str(run), "--out", str(tmp_path / "b"), "--max-fpr", "0.2", "--quiet"]) == 2
    assert {n: (tmp_path / "b" / n).read_bytes() for n in records} == records


def test_a_clip_backbone_run_exports_too(tmp_path):
    """The VLM variant (a CLIP ViT as the teachers' backbone) goes through the same graph."""
    import torch
    from uninet_feat.backbones import create_backbone
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=2)
    torch.manual_seed(0)
    torch.save(create_backbone("clip:tiny", weights="random").visual.state_dict(), tmp_path / "w.pt")
    assert main(["train", "--data", str(data), "--backbone", "clip:tiny", "--weights", str(tmp_path / "w.pt"),
                 "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    export_model(tmp_path / "run", tmp_path / "m")
    paths = sorted((data / "test").rglob("*.png"))
    for (_, s, _), d in zip(_run_onnx(tmp_path / "m", paths), Detector(tmp_path / "run").score(paths)):
        assert abs(float(s[0]) - d.score) < 1e-4 * max(1.0, abs(d.score))


def test_the_documented_onnx_runtime_snippet_scores_as_detector(plain, exported, capsys):
    """docs/usage.md's scoring block (ONNX Runtime, numpy and Pillow only) gives Detector's scores and flags."""
    import re
    from pathlib import Path
    data, run, odd = plain
    text = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    block = re.search(r"Scoring with nothing but ONNX Runtime.*?```python\n(.*?)```", text, re.S).group(1)
    paths = sorted((data / "test").rglob("*.png")) + sorted(odd.iterdir())
    capsys.readouterr()
    exec(compile("\n".join(line[2:] for line in block.splitlines()), "usage.md", "exec"),
         {"MODEL_DIR": str(exported), "paths": paths})
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(paths)
    for (p, score, flagged, marked), d in zip(printed, Detector(run).score(paths)):
        assert p == str(d.path) and abs(float(score) - d.score) < 1e-4 * max(1.0, abs(d.score))
        assert (flagged == "True") == bool(d.flagged)
        assert abs(int(marked) - int(d.mask.sum())) <= max(2, 0.002 * d.mask.size)   # the mask at the image's size


def test_a_tiled_run_without_offsets_is_exported_for_its_normals_size(tmp_path, monkeypatch):
    """A tiled run with `tile_norm: none` records its normals' sizes at calibration, so export-model needs no
    --input-size for them (it used to); a run whose normals came in two sizes asks for one."""
    stand_in_exporter(monkeypatch)   # the size model.json gives, not the graph, is tested
    data = write_texture_set(tmp_path / "wide", n_train=6, n_good=1, n_bad=1, wide=True)   # 64 x 192 strips
    cfg = load_config(None, {"data": str(data), "tile": 64}, base=BASE)
    train(cfg, tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["image_sizes"] == [[64, 192]]
    meta = export_model(tmp_path / "run", tmp_path / "m", check=False)
    assert meta["input"]["shape"] == ["N", 3, 64, 192] and meta["tiling"]["offsets"] is None
    Image.open(next((data / "train" / "good").glob("*.png"))).crop((0, 0, 128, 64)).save(
        data / "train" / "good" / "short.png")
    train(cfg, tmp_path / "run2", quiet=True)
    with pytest.raises(BadInputError, match="its training normals came in 2 sizes"):
        export_model(tmp_path / "run2", tmp_path / "m2", check=False)


def test_a_border_pad_run_exports_with_its_mirrored_context(plain, tmp_path):
    """``train --border-pad P`` mirrors P pixels around every input inside UniNet.forward and crops every level back:
    the exported graph must hold that pad (an ONNX reflect pad, for images of any size) and score as predict does,
    not as the same weights would without their context."""
    data, _, odd = plain
    train(load_config(None, {"data": str(data), "border_pad": 16}, base=BASE), tmp_path / "run", quiet=True)
    assert main(["export-model", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["check"]["max_abs_diff_score"] < 1e-4
    assert "border_pad: 16" in (tmp_path / "m" / "run_config.yaml").read_text()
    paths = sorted((data / "test").rglob("*.png")) + sorted(odd.iterdir())   # other sizes and modes too
    got = _run_onnx(tmp_path / "m", paths)
    det = Detector(tmp_path / "run")
    assert det.model.border_pad == 16
    want = det.score(paths)
    for p, (m, s, full), d in zip(paths, got, want):
        assert abs(float(s[0]) - d.score) < 1e-4 * max(1.0, abs(d.score)), p.name
        assert m.shape == (1, 64, 64)
        np.testing.assert_allclose(full[0], d.map, atol=1e-4)
    det.model.border_pad = 0   # the same weights without their mirrored context score otherwise: the pad is in it
    plain_scores = [d.score for d in det.score(paths, maps=False)]
    assert max(abs(float(s[0]) - v) for (_, s, _), v in zip(got, plain_scores)) > 1e-3


def test_an_exported_tiled_run_with_a_map_of_other_units_takes_the_maps_own_offsets_off_its_map(tmp_path):
    """A tiled run whose pixel map is level 3 in range units: its tiles' maps are less the offsets measured on that
    map (`positions.tile_map_shift`), not the score's; the ONNX map is predict's (Detector's)."""
    data = write_texture_set(tmp_path / "wide", n_train=8, n_good=2, n_bad=2, wide=True)
    for p in (data / "train" / "good").glob("*.png"):
        a = np.asarray(Image.open(p)).copy()
        a[:, :64] = a[:, :64] // 3
        Image.fromarray(a).save(p)
    cfg = load_config(None, {"data": str(data), "tile": 64, "tile_norm": "position"}, base=BASE)
    train(cfg, tmp_path / "run", quiet=True)
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--map-levels", "3", "--map-norm", "range",
                 "--quiet"]) == 0
    assert main(["export-model", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    t = json.loads((tmp_path / "m" / "model.json").read_text())["tiling"]
    assert t["map_offsets"] != pytest.approx(t["offsets"], abs=1e-3)
    paths = sorted((data / "test").rglob("*.png"))
    for p, (m, s, _), d in zip(paths, _run_onnx(tmp_path / "m", paths), Detector(tmp_path / "run").score(paths)):
        assert abs(float(s[0]) - d.score) < 1e-4 * max(1.0, abs(d.score)), p.name
        np.testing.assert_allclose(m[0], d.map, atol=1e-4)


def test_an_interrupted_export_keeps_the_folders_model_json_beside_its_model_onnx(plain, exported, tmp_path,
                                                                                  monkeypatch):
    """The run's model.pt was hashed and its pixel threshold read after the new model.onnx had replaced the old and
    model.json had been removed: an export stopped there left a model.onnx without its model.json. Both are read
    before now, so a stop leaves the previous pair as it was."""
    _, run, _ = plain
    out = _previous(exported, tmp_path / "m")
    stand_in_exporter(monkeypatch)   # where the stop falls, not the graph, is tested
    before = {n: (out / n).read_bytes() for n in ("model.onnx", "model.json", "run_config.yaml")}

    def stopped(*a, **k):
        raise KeyboardInterrupt("stopped")
    monkeypatch.setattr("uninet_feat.predict.default_pixel_threshold", stopped)
    with pytest.raises(KeyboardInterrupt):
        export_model(run, out, opset=18, check=False)
    assert {n: (out / n).read_bytes() for n in before} == before


def test_a_model_json_that_cannot_be_written_leaves_the_previous_pair(plain, exported, tmp_path, monkeypatch):
    """model.json was written after the new model.onnx was in place and the old model.json removed: a full disk
    there left a model.onnx without its model.json, though the error said the previous file was intact. It is
    now written in full first, and the two are put in place back to back."""
    import uninet_feat.io as uio
    _, run, _ = plain
    out = _previous(exported, tmp_path / "m")
    wrote = stand_in_exporter(monkeypatch)   # a new model.onnx unlike the previous one
    before = {n: (out / n).read_bytes() for n in ("model.onnx", "model.json")}
    real = uio.staged

    def full(path, writer):
        if Path(path).name == "model.json":
            raise BadInputError("disk full while writing; the previous version of this file is intact", path=path)
        return real(path, writer)
    monkeypatch.setattr(uio, "staged", full)
    with pytest.raises(BadInputError, match="disk full"):
        export_model(run, out, opset=18, check=False)
    assert wrote and {n: (out / n).read_bytes() for n in before} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]   # no temp file left behind


def test_an_export_stopped_before_its_run_config_leaves_none_not_the_previous_runs(plain, exported, tmp_path,
                                                                                  monkeypatch):
    """run_config.yaml was copied after the new model.json was in place: a stop between the two left the previous
    export's run settings beside another run's model. The old one now goes with the old model.json."""
    import shutil
    _, run, _ = plain
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (other / "config.yaml").write_text((run / "config.yaml").read_text() + "# the other run\n")
    out = _previous(exported, tmp_path / "m")
    stand_in_exporter(monkeypatch)
    assert (out / "run_config.yaml").read_text() == (run / "config.yaml").read_text()

    def stopped(*a, **k):
        raise KeyboardInterrupt("stopped")
    monkeypatch.setattr("uninet_feat.deploy.shutil.copyfile", stopped)
    with pytest.raises(KeyboardInterrupt):
        export_model(other, out, check=False)
    assert json.loads((out / "model.json").read_text())["run"] == str(other.resolve())
    assert not (out / "run_config.yaml").exists()
