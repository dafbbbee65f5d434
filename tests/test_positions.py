"""tile_norm: position — tile scores less the training normals' median at each place (positions.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from uninet_feat.checkpoint import build_from_checkpoint
from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.evaluate import evaluate
from uninet_feat.extract import Extractor
from uninet_feat.runs import eval_batches, load_samples, make_dataset, train_val_samples
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1, "batch_size": 4,
        "val_fraction": 0.3, "channels_last": False, "seed": 5, "tile": 64}


def _cfg(data, **kw):
    return load_config(None, {"data": str(data), **kw}, base=BASE)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pos")
    data = write_texture_set(root / "wide", n_train=8, n_good=2, n_bad=2, wide=True)   # 64 x 192: three tiles
    for p in (data / "train" / "good").glob("*.png"):   # a left edge unlike the rest on every strip
        a = np.asarray(Image.open(p)).copy()
        a[:, :64] = a[:, :64] // 3
        Image.fromarray(a).save(p)
    train(_cfg(data, tile_norm="position"), root / "run", quiet=True)
    return data, root / "run"


def _plain_tile_scores(model, samples, cfg):
    """{path: {(y, x): WDM score}} without any offset (the model as built, no calibration applied)."""
    out = {}
    model.eval()
    with torch.no_grad():
        for batch, x in eval_batches(make_dataset(samples, cfg, model.source), cfg):
            _, s = model.predict(x)
            for i, box, v in zip(batch["index"].tolist(), batch["tile"].tolist(), s.tolist()):
                out.setdefault(str(samples[i].path), {})[(box[0], box[1])] = v
    return out


def test_offsets_are_the_training_normals_medians_and_scores_use_them(run):
    data, r = run
    cal = json.loads((r / "calibration.json").read_text())
    rec = cal["tile_offsets"]
    (group, table), = rec["offsets"].items()   # one group: this data has no group column
    model, ck = build_from_checkpoint(r / "model.pt")
    cfg = dict(ck["config"])
    fit, val = train_val_samples(load_samples(cfg), cfg)
    plain = _plain_tile_scores(model, fit + val, cfg)
    assert rec["n_images"] == {group: 8} and len(fit) + len(val) == 8 and len(val) >= 1
    assert set(table) == {"0,0", "0,64", "0,128"}
    for k, v in table.items():
        y, x = map(int, k.split(","))
        assert v == pytest.approx(np.median([p[(y, x)] for p in plain.values()]), abs=1e-6)
    assert 0 <= rec["position_r2"] <= 1
    # evaluate: each image's score is its highest corrected tile score
    rep = evaluate(r, quiet=True)
    test = [s for s in load_samples(cfg) if s.split == "test"]
    tiles = _plain_tile_scores(model, test, cfg)
    want = {p: max(v - table[f"{y},{x}"] for (y, x), v in t.items()) for p, t in tiles.items()}
    got = {row["path"]: float(row["score"]) for row in rep["_rows"]}
    assert got == pytest.approx(want, abs=1e-4)
    plain_max = {p: max(t.values()) for p, t in tiles.items()}
    assert got != pytest.approx(plain_max, abs=1e-4)
    # the validation scores behind the threshold are corrected too, each against the median of the *other* normals'
    # tiles at its places: its own tile was in the saved median and pulled its score (and the threshold) low
    vt = _plain_tile_scores(model, val, cfg)
    vwant = {p: max(v - np.median([o[(y, x)] for q, o in plain.items() if q != p]) for (y, x), v in t.items())
             for p, t in vt.items()}
    assert dict(zip(cal["val_paths"], cal["val_scores"])) == pytest.approx(vwant, abs=1e-4)
    with_own = {p: max(v - table[f"{y},{x}"] for (y, x), v in t.items()) for p, t in vt.items()}
    assert vwant != pytest.approx(with_own, abs=1e-4)
    # predict: its wdm_score is evaluate's score
    import csv
    assert main(["predict", "--run", str(r), "--data", str(data / "test"), "--quiet",
                 "--out", str(r.parent / "pred")]) == 0
    with open(r.parent / "pred" / "predictions.csv") as fh:
        pred = {row["path"]: float(row["wdm_score"]) for row in csv.DictReader(fh)}
    assert pred == pytest.approx(got, abs=1e-4)
    # extract: the per-tile scores it exports are the corrected ones
    ex = Extractor(run=r).extract(test)
    for i, box, s in zip(ex["index"], ex["tile"], ex["scores"]):
        p = str(ex["samples"][i].path)
        assert s == pytest.approx(tiles[p][(box[0], box[1])] - table[f"{box[0]},{box[1]}"], abs=1e-4)


def test_evaluate_checkpoint_takes_its_own_offsets(run):
    """`evaluate --checkpoint` of another model file: its offsets come from its own scores of the training
    normals (calibration.json's are model.pt's). checkpoint.pt here is the last epoch, model.pt's weights, so
    its scores and threshold must equal model.pt's corrected ones, not the plain highest tile."""
    data, r = run
    want = evaluate(r, quiet=True)
    got = evaluate(r, quiet=True, checkpoint=r / "checkpoint.pt")
    assert {x["path"]: float(x["score"]) for x in got["_rows"]} == pytest.approx(
        {x["path"]: float(x["score"]) for x in want["_rows"]}, abs=1e-4)
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-4)


def test_images_without_offsets_are_refused_before_any_is_scored_all_in_one_error(run, tmp_path, monkeypatch):
    """A wider image at the end of a batch was refused only when the scoring pass reached it: predict had saved its
    earlier parts, and the same command without that image scored them all again (its file list is in every part's
    fingerprint; an audit, session 53). Now every such image is named before the first batch, no part written."""
    import shutil
    import uninet_feat.extract as ex
    from uninet_feat.predict import predict_cmd
    data, r = run
    monkeypatch.setattr(ex, "PART_ITEMS", 3)   # a part of one image: parts would be saved before the last image
    batch = tmp_path / "batch"
    batch.mkdir()
    good = sorted((data / "test" / "good").glob("*.png"))
    for i in range(4):
        shutil.copy(good[i % len(good)], batch / f"a{i}.png")
    src = np.asarray(Image.open(good[0]))
    for name in ("z_wide.png", "z_wider.png"):
        Image.fromarray(np.concatenate([src, src[:, :64 if name == "z_wide.png" else 128]], 1)).save(batch / name)
    calls = []
    real = ex.Extractor._forward_with_text
    monkeypatch.setattr(ex.Extractor, "_forward_with_text", lambda self, x: (calls.append(1), real(self, x))[1])
    with pytest.raises(BadInputError, match=r"2 image\(s\) cannot be scored against the run's position offsets") as e:
        predict_cmd(r, batch, tmp_path / "p", quiet=True, overlays=False)
    assert "z_wide.png: the image is 256x64 px" in str(e.value) and "z_wider.png: the image is 320x64 px" in str(e.value)
    assert not calls and not list((tmp_path / "p").rglob("*.npz"))   # nothing scored, no part to lose
    for name in ("z_wide.png", "z_wider.png"):
        (batch / name).unlink()
    predict_cmd(r, batch, tmp_path / "p", quiet=True, overlays=False)
    assert calls and len(json.loads((tmp_path / "p" / "predictions.json").read_text())) == 4

def test_an_image_of_another_size_is_named_and_none_turns_it_off(run, tmp_path):
    data, r = run
    import shutil
    c = tmp_path / "copy"
    shutil.copytree(r, c)
    narrow = data / "test" / "good" / "tall.png"   # 128 x 192: its second row of tiles has no place in the offsets
    Image.fromarray(np.tile(np.asarray(Image.open(data / "test" / "good" / "000.png")), (2, 1))).save(narrow)
    try:
        with pytest.raises(BadInputError, match="the image is 192x128 px; the run's position offsets were measured "
                                                "on 192x64 images") as e:
            evaluate(c, quiet=True)
        assert "tall.png" in str(e.value)
    finally:
        narrow.unlink()
    low = data / "test" / "good" / "low.png"   # 32 px high: its mirror-padded tiles sit at the training places, so
    Image.open(data / "test" / "good" / "000.png").crop((0, 0, 192, 32)).save(low)   # it passed with their offsets
    try:
        with pytest.raises(BadInputError, match="the image is 192x32 px"):
            evaluate(c, quiet=True)
    finally:
        low.unlink()
    assert main(["calibrate", "--run", str(c), "--tile-norm", "none", "--quiet"]) == 0
    assert "tile_offsets" not in json.loads((c / "calibration.json").read_text())
    model, ck = build_from_checkpoint(c / "model.pt")
    test = [s for s in load_samples(dict(ck["config"])) if s.split == "test"]
    tiles = _plain_tile_scores(model, test, dict(ck["config"]))
    got = {row["path"]: float(row["score"]) for row in evaluate(c, quiet=True)["_rows"]}
    assert got == pytest.approx({p: max(t.values()) for p, t in tiles.items()}, abs=1e-4)
    assert main(["calibrate", "--run", str(c), "--quiet"]) == 0   # keeps the run's choice: still none
    assert "tile_offsets" not in json.loads((c / "calibration.json").read_text())
    assert main(["calibrate", "--run", str(c), "--tile-norm", "position", "--quiet"]) == 0
    assert json.loads((c / "calibration.json").read_text())["tile_offsets"] == \
        json.loads((r / "calibration.json").read_text())["tile_offsets"]


def test_a_run_missing_the_calibration_its_config_needs_is_refused_until_calibrated(run, tmp_path, capsys):
    """A training stopped after its last epoch but before calibrating (session 21's AITEX fabric_00 seed 6) left
    model.pt without calibration.json; evaluate then scored plain highest tiles as if they were the config's
    position-corrected ones. Every scoring command now refuses such a run and names the fix, which restores the
    run's own scores."""
    import shutil
    data, r = run
    want = {x["path"]: float(x["score"]) for x in evaluate(r, quiet=True)["_rows"]}
    c = tmp_path / "copy"
    shutil.copytree(r, c)
    (c / "calibration.json").unlink()
    for score in (lambda: evaluate(c, quiet=True), lambda: Extractor(c)):
        with pytest.raises(BadInputError, match="calibration.json is missing") as e:
            score()
        assert "tile_norm: position" in str(e.value) and "uninet-feat calibrate --run" in str(e.value)
    assert main(["predict", "--run", str(c), "--data", str(data / "test" / "good"), "--out", str(tmp_path / "p")]) == 2
    assert "calibration.json is missing" in capsys.readouterr().err and not (tmp_path / "p" / "predictions.csv").exists()
    (c / "calibration.json").write_text("{not json")
    with pytest.raises(BadInputError, match="calibration.json is unreadable"):
        evaluate(c, quiet=True)
    (c / "calibration.json").unlink()
    got = evaluate(c, quiet=True, checkpoint=c / "checkpoint.pt")   # another model file takes its own offsets
    assert {x["path"]: float(x["score"]) for x in got["_rows"]} == pytest.approx(want, abs=1e-4)
    assert main(["calibrate", "--run", str(c), "--quiet"]) == 0       # the fix: the config's tile_norm again
    assert json.loads((c / "calibration.json").read_text())["tile_offsets"] == \
        json.loads((r / "calibration.json").read_text())["tile_offsets"]
    assert {x["path"]: float(x["score"]) for x in evaluate(c, quiet=True)["_rows"]} == pytest.approx(want, abs=1e-6)
    (c / "calibration.json").unlink()                                   # the other fix: resume the finished run
    assert main(["train", "--out", str(c), "--resume", "--quiet"]) == 0
    assert {x["path"]: float(x["score"]) for x in evaluate(c, quiet=True)["_rows"]} == pytest.approx(want, abs=1e-6)


def test_a_calibration_of_another_model_pt_is_refused_until_recalibrated(run, tmp_path):
    """calibration.json names the model.pt it was made for (sha256). A training resumed to more epochs writes a
    new model.pt and then calibrates it; stopped in between, it would leave the old model's offsets, threshold and
    pixel map beside the new model, which were applied silently before session 22."""
    import shutil
    from uninet_feat.checkpoint import save_checkpoint
    data, r = run
    c = tmp_path / "copy"
    shutil.copytree(r, c)
    model, ck = build_from_checkpoint(c / "model.pt")
    with torch.no_grad():   # "the next epoch": other weights in model.pt, the old calibration.json beside it
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(c / "model.pt", model, dict(ck["config"]), epoch=ck["epoch"] + 1)
    with pytest.raises(BadInputError, match="belongs to another model.pt") as e:
        evaluate(c, quiet=True)
    assert "uninet-feat calibrate --run" in str(e.value)
    assert main(["calibrate", "--run", str(c), "--quiet"]) == 0
    fresh = build_from_checkpoint(c / "model.pt")[0]
    test = [s for s in load_samples(dict(ck["config"])) if s.split == "test"]
    offsets = json.loads((c / "calibration.json").read_text())["tile_offsets"]["offsets"]
    (table,) = offsets.values()
    plain = _plain_tile_scores(fresh, test, dict(ck["config"]))   # the new model's own offsets are applied now
    want = {p: max(v - table[f"{y},{x}"] for (y, x), v in t.items()) for p, t in plain.items()}
    got = {x["path"]: float(x["score"]) for x in evaluate(c, quiet=True)["_rows"]}
    assert got == pytest.approx(want, abs=1e-5)
    assert offsets != json.loads((r / "calibration.json").read_text())["tile_offsets"]["offsets"]


def test_bad_tile_norm_settings_are_refused_before_training(tmp_path):
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    untiled = {**_cfg(data, tile_norm="position"), "tile": None}
    with pytest.raises(BadInputError, match="tile is not set"):
        train(untiled, tmp_path / "a", quiet=True)
    with pytest.raises(BadInputError, match="tile_norm: neighbours .* tile is not set"):
        train({**untiled, "tile_norm": "neighbours"}, tmp_path / "a", quiet=True)
    with pytest.raises(BadInputError, match="tile_norm must be one of none, position, neighbours"):
        train(_cfg(data, tile_norm="edge"), tmp_path / "b", quiet=True)
    with pytest.raises(BadInputError, match="val_fraction leaves none") as e:   # no calibration.json could hold them
        train(_cfg(data, tile_norm="position", val_fraction=0), tmp_path / "c", quiet=True)
    assert "tile_norm: none" in str(e.value)
    assert not any((tmp_path / x / "checkpoint.pt").exists() for x in "abc")


def test_evaluate_checkpoint_of_one_group_of_a_multi_group_run(tmp_path):
    """`evaluate --checkpoint C --group A` of a run of two groups: C's offsets were taken from group A's normals
    alone, and scoring the run's validation normals (both groups') then failed on B's first one."""
    for g, seed in (("A", 0), ("B", 1)):
        write_texture_set(tmp_path / "data" / g, n_train=8, n_good=2, n_bad=2, wide=True, seed=seed)
    r = tmp_path / "run"
    train(_cfg(tmp_path / "data", tile_norm="position", keep_every=1), r, quiet=True)
    want = evaluate(r, group="A", quiet=True)
    got = evaluate(r, group="A", quiet=True, checkpoint=r / "epochs" / "epoch_001.pt")   # model.pt's weights
    assert len(got["_rows"]) == 4 and {x["group"] for x in got["_rows"]} == {"A"}
    assert {x["path"]: float(x["score"]) for x in got["_rows"]} == pytest.approx(
        {x["path"]: float(x["score"]) for x in want["_rows"]}, abs=1e-4)
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-4)


def test_offsets_are_per_group_and_an_unknown_group_is_named(run):
    from dataclasses import replace
    from uninet_feat.positions import corrected, tile_offsets
    data, r = run
    model, ck = build_from_checkpoint(r / "model.pt")
    cfg = dict(ck["config"])
    samples = load_samples(cfg)
    a = [replace(s, group="A") for s in samples if s.split == "train"]      # dark left edges
    b = [replace(s, group="B") for s in samples if s.split == "test"]       # untouched, defects too
    rec = tile_offsets(model, a + b, cfg)
    assert set(rec["offsets"]) == {"A", "B"} and rec["n_images"] == {"A": len(a), "B": len(b)}
    plain_a, plain_b = _plain_tile_scores(model, a, cfg), _plain_tile_scores(model, b, cfg)
    for g, plain in (("A", plain_a), ("B", plain_b)):
        for k, v in rec["offsets"][g].items():
            y, x = map(int, k.split(","))
            assert v == pytest.approx(np.median([p[(y, x)] for p in plain.values()]), abs=1e-6)
    assert rec["offsets"]["A"] != pytest.approx(rec["offsets"]["B"], abs=1e-3)
    box = [0, 64, 64, 64]
    assert corrected(1.0, box, rec["offsets"], b[0]) == pytest.approx(1.0 - rec["offsets"]["B"]["0,64"])
    with pytest.raises(BadInputError, match="no position offsets for group 'C'") as e:
        corrected(1.0, box, rec["offsets"], replace(b[0], group="C"))
    assert b[0].path.name in str(e.value)
    one = {"A": rec["offsets"]["A"]}   # a run of one group scores an image without a group (a new batch)
    assert corrected(1.0, box, one, replace(b[0], group="")) == pytest.approx(1.0 - one["A"]["0,64"])
    # a run of one ungrouped category: a batch's layout group (DIR/bottle/test/good) is a folder, not another group
    ungrouped = {"": one["A"]}
    assert corrected(1.0, box, ungrouped, replace(b[0], group="bottle")) == pytest.approx(1.0 - one["A"]["0,64"])
    with pytest.raises(BadInputError, match="from group 'A' only"):   # but not another group's with A's offsets
        corrected(1.0, box, one, replace(b[0], group="B"))


def test_a_run_of_one_group_refuses_to_be_evaluated_on_another(tmp_path):
    """`evaluate --group lineB` of a run trained on lineA alone scored lineB with lineA's model and threshold,
    silently; the run's own group is evaluated as before."""
    from uninet_feat.evaluate import evaluate
    root = tmp_path / "g"
    for i, g in enumerate(("lineA", "lineB")):   # MVTec-style with categories: root/<group>/train/good, ...
        write_texture_set(root / g, n_train=6, n_good=2, n_bad=2, seed=i)
    train(_cfg(root, tile=None, group="lineA"), tmp_path / "r", quiet=True)
    with pytest.raises(BadInputError, match="trained on group 'lineA' only") as e:
        evaluate(tmp_path / "r", group="lineB", quiet=True)
    assert "train --group lineB" in str(e.value)
    assert evaluate(tmp_path / "r", group="lineA", quiet=True)["n_test"] == 4


def test_predict_group_picks_a_multi_group_runs_offsets(run, tmp_path):
    import csv
    import shutil
    data, r = run
    c = tmp_path / "two"
    shutil.copytree(r, c)
    cal = json.loads((c / "calibration.json").read_text())
    (table,) = cal["tile_offsets"]["offsets"].values()
    shifted = {k: v + 0.5 * i for i, (k, v) in enumerate(sorted(table.items()))}
    cal["tile_offsets"]["offsets"] = {"A": table, "B": shifted}   # as a run over two groups would keep them
    (c / "calibration.json").write_text(json.dumps(cal))
    args = ["predict", "--run", str(c), "--data", str(data / "test"), "--quiet", "--no-overlays"]
    assert main(args + ["--out", str(tmp_path / "p0")]) == 2                     # group-less images: refused
    assert main(args + ["--group", "B", "--out", str(tmp_path / "pb")]) == 0
    model, ck = build_from_checkpoint(c / "model.pt")
    test = [s for s in load_samples(dict(ck["config"])) if s.split == "test"]
    tiles = _plain_tile_scores(model, test, dict(ck["config"]))
    want = {p: max(v - shifted[f"{y},{x}"] for (y, x), v in t.items()) for p, t in tiles.items()}
    with open(tmp_path / "pb" / "predictions.csv") as fh:
        got = {row["path"]: float(row["wdm_score"]) for row in csv.DictReader(fh)}
    assert got == pytest.approx(want, abs=1e-4)


def _tiles_with_context(model, samples, cfg):
    """[(path, "y,x", plain WDM score, context vector)] of every tile (no offsets applied)."""
    out = []
    model.eval()
    with torch.no_grad():
        for batch, x in eval_batches(make_dataset(samples, cfg, model.source), cfg):
            _, s, c = model.predict(x, context=True)
            for j, (i, box) in enumerate(zip(batch["index"].tolist(), batch["tile"].tolist())):
                out.append((str(samples[i].path), f"{box[0]},{box[1]}", float(s[j]), c[j].double().numpy()))
    return out


def test_neighbours_offset_is_the_median_of_the_nearest_training_tiles_at_that_place(run, tmp_path):
    """tile_norm: neighbours against a plain re-computation: standardise the training tiles' contexts, take the
    3 most cosine-similar training tiles at the tile's place, subtract their median score; evaluate, predict,
    extract and `evaluate --checkpoint` all give those scores, and they differ from the position medians'."""
    import csv
    import shutil
    data, r = run
    c = tmp_path / "nb"
    shutil.copytree(r, c)
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--quiet"]) == 0
    rec = json.loads((c / "calibration.json").read_text())["tile_offsets"]
    assert rec["mode"] == "neighbours" and rec["k"] == 3 and (c / rec["file"]).is_file()
    model, ck = build_from_checkpoint(c / "model.pt")
    cfg = dict(ck["config"])
    fit, val = train_val_samples(load_samples(cfg), cfg)
    ref = _tiles_with_context(model, fit + val, cfg)
    C = np.stack([t[3] for t in ref])
    mu, sd = C.mean(0), C.std(0) + 1e-6

    def unit(v):
        z = (v - mu) / sd
        return z / np.linalg.norm(z, axis=-1, keepdims=True)
    U = unit(C)
    # the validation normals that set the threshold are among the reference tiles: each is scored without its own
    # (its own tile, cosine 1, was always one of its 3 nearest, and the threshold came out below new normals')
    cal = json.loads((c / "calibration.json").read_text())
    val_want = {}
    for path, k, score, ctx in _tiles_with_context(model, val, cfg):
        at = [i for i, t in enumerate(ref) if t[1] == k and t[0] != path]
        near = sorted(at, key=lambda i: -float(U[i] @ unit(ctx)))[:3]
        val_want[path] = max(val_want.get(path, -np.inf), score - float(np.median([ref[i][2] for i in near])))
    assert len(val_want) >= 2 and dict(zip(cal["val_paths"], cal["val_scores"])) == pytest.approx(val_want, abs=1e-4)
    test = [s for s in load_samples(cfg) if s.split == "test"]
    want, per_tile = {}, {}
    for path, k, score, ctx in _tiles_with_context(model, test, cfg):
        at = [i for i, t in enumerate(ref) if t[1] == k]
        near = sorted(at, key=lambda i: -float(U[i] @ unit(ctx)))[:3]
        per_tile[(path, k)] = score - float(np.median([ref[i][2] for i in near]))
        want[path] = max(want.get(path, -np.inf), per_tile[(path, k)])
    got = {row["path"]: float(row["score"]) for row in evaluate(c, quiet=True)["_rows"]}
    assert got == pytest.approx(want, abs=1e-4)
    position = {row["path"]: float(row["score"]) for row in evaluate(r, quiet=True)["_rows"]}
    assert got != pytest.approx(position, abs=1e-3)   # 8 training strips, 3 neighbours: not the median of all
    ck_scores = {x["path"]: float(x["score"]) for x in evaluate(c, quiet=True, checkpoint=c / "checkpoint.pt")["_rows"]}
    assert ck_scores == pytest.approx(got, abs=1e-4)   # checkpoint.pt = model.pt's weights: its own, equal, offsets
    assert main(["predict", "--run", str(c), "--data", str(data / "test"), "--quiet", "--no-overlays",
                 "--out", str(tmp_path / "pred")]) == 0
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        assert {row["path"]: float(row["wdm_score"]) for row in csv.DictReader(fh)} == pytest.approx(got, abs=1e-4)
    ex = Extractor(run=c).extract(test)
    for i, box, s in zip(ex["index"], ex["tile"], ex["scores"]):
        assert s == pytest.approx(per_tile[(str(ex["samples"][i].path), f"{box[0]},{box[1]}")], abs=1e-4)
    from uninet_feat.ensemble import load_members   # an ensemble member scores the same way
    assert load_members([c, r])[0].scores(test) == pytest.approx(got, abs=1e-4)
    # `calibrate` without --tile-norm keeps neighbours; a damaged tile file is named with its fix
    assert main(["calibrate", "--run", str(c), "--quiet"]) == 0
    assert json.loads((c / "calibration.json").read_text())["tile_offsets"]["mode"] == "neighbours"
    before = evaluate(c, quiet=True)
    (c / rec["file"]).write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="neighbours' tiles") as e:
        evaluate(c, quiet=True)
    assert "--tile-norm neighbours" in str(e.value)
    # and that fix works: calibrate read the lost file before writing it anew, and failed the same way
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--quiet"]) == 0
    assert evaluate(c, quiet=True)["image_auroc"] == pytest.approx(before["image_auroc"])
    assert main(["calibrate", "--run", str(c), "--tile-norm", "position", "--quiet"]) == 0
    after = json.loads((c / "calibration.json").read_text())["tile_offsets"]
    assert after["offsets"] and after.get("mode", "position") == "position"
    assert not (c / rec["file"]).exists()   # the neighbours' tiles no longer apply: not left beside (session 53)


def test_neighbours_offsets_by_hand_with_fewer_tiles_than_k_and_after_save_load(tmp_path):
    from uninet_feat.positions import K_NEIGHBOURS, Neighbours
    rng = np.random.default_rng(0)
    per = {("g", "0,0"): [(v, rng.standard_normal(4)) for v in (1.0, 2.0, 7.0)][:K_NEIGHBOURS],
           ("g", "0,64"): [(float(v), rng.standard_normal(4)) for v in range(10)]}
    nb = Neighbours.fit(per)
    q = rng.standard_normal(4)
    assert nb.offset("g", "0,0", q) == pytest.approx(2.0)   # no more tiles there than K: the position median
    allc = np.stack([c for items in per.values() for _, c in items])
    mu, sd = allc.mean(0), allc.std(0) + 1e-6
    z = lambda v: ((v - mu) / sd) / np.linalg.norm((v - mu) / sd)   # noqa: E731
    sims = [float(z(c) @ z(q)) for _, c in per[("g", "0,64")]]
    want = np.median([per[("g", "0,64")][i][0] for i in np.argsort(sims)[::-1][:K_NEIGHBOURS]])
    assert nb.offset("g", "0,64", q) == pytest.approx(want)
    nb.save(tmp_path / "n.npz")
    back = Neighbours.load(tmp_path / "n.npz")
    assert back.offset("g", "0,64", q) == nb.offset("g", "0,64", q) and back.offset("g", "0,0", q) == 2.0
    with np.load(tmp_path / "n.npz") as z:   # a file without the contexts: named, with its fix
        np.savez(tmp_path / "bad.npz", **{k: z[k] for k in z.files if not k.endswith("|context")})
    with pytest.raises(BadInputError, match="neighbours' tiles") as e:
        Neighbours.load(tmp_path / "bad.npz")
    assert "bad.npz" in str(e.value) and f"--run {tmp_path.resolve()} --tile-norm neighbours" in str(e.value)


def test_the_stitched_map_of_a_position_normed_run_is_each_tile_less_its_offset(run):
    """The map shows what the score is: each tile's map less the offset its score got, so an edge hot on every
    strip no longer sets the heatmap (and predict --save-maps' defect mask) while the score looks past it; its
    kind is named, so colour scales and pixel thresholds of plain maps are not reused for it."""
    from uninet_feat.calibration import load_run
    from uninet_feat.evaluate import score_samples
    from uninet_feat.positions import key
    from uninet_feat.scoring import pixel_map_kind
    data, r = run
    model, _, cfg = load_run(r)
    table = next(iter(model.cfg["tile_offsets"].values()))
    assert pixel_map_kind(model.cfg).endswith("tile offsets")
    test = [s for s in load_samples(cfg) if s.split == "test"][:3]
    normed = score_samples(model, test, cfg)["maps"]
    model.cfg["tile_offsets"] = None
    plain = score_samples(model, test, cfg)["maps"]
    tile = cfg["tile"]
    for a, b in zip(normed, plain):
        for y in range(0, a.shape[0], tile):
            for x in range(0, a.shape[1], tile):
                d = b[y:y + tile, x:x + tile] - a[y:y + tile, x:x + tile]
                np.testing.assert_allclose(d, table[key((y, x))], atol=1e-5)


def test_evaluate_and_predict_state_the_tile_scoring_the_calibration_applies(run, tmp_path):
    """`calibrate --tile-norm none` changes how tiles are scored without touching config.yaml: evaluate's JSON and
    report config, and predict's summary, state the mode applied, not the config's."""
    import shutil
    from uninet_feat.predict import predict_cmd
    data, r = run
    c = tmp_path / "c"
    shutil.copytree(r, c)
    assert evaluate(c, quiet=True)["tile_norm"] == "position"
    assert main(["calibrate", "--run", str(c), "--tile-norm", "none", "--quiet"]) == 0
    assert evaluate(c, quiet=True, report_path=tmp_path / "r.html")["tile_norm"] == "none"
    assert "&quot;tile_norm&quot;: &quot;none&quot;" in (tmp_path / "r.html").read_text()   # HTML-escaped
    assert predict_cmd(c, data / "test", tmp_path / "p", overlays=False, quiet=True)["tile_norm"] == "none"


def test_clusters_csv_score_of_a_position_normed_run_is_predicts_score(run, tmp_path):
    """docs/usage.md said cluster's `score` is the store's raw highest tile score, not predict's under `tile_norm:
    position`; extract stores the position-corrected tile scores, so under `tile_score: max` it is predict's."""
    import csv
    data, r = run
    assert main(["extract", "--run", str(r), "--data", str(data / "test"), "--batch",
                 "--out", str(tmp_path / "f")]) == 0
    assert main(["predict", "--run", str(r), "--data", str(data / "test"), "--quiet", "--no-overlays",
                 "--out", str(tmp_path / "p")]) == 0
    with open(tmp_path / "p" / "predictions.csv") as fh:
        pred = {row["path"]: float(row["wdm_score"]) for row in csv.DictReader(fh)}
    (tmp_path / "flagged.csv").write_text("path,flagged\n" + "".join(f"{p},True\n" for p in pred))
    assert main(["cluster", "--features", str(tmp_path / "f"), "--flagged", str(tmp_path / "flagged.csv"),
                 "--columns", "all", "--k", "2", "--no-sheet", "--out", str(tmp_path / "c")]) == 0
    with open(tmp_path / "c" / "clusters.csv") as fh:
        got = {row["path"]: float(row["score"]) for row in csv.DictReader(fh)}
    assert len(got) == len(pred) == 4 and got == pytest.approx(pred, abs=1e-4)
    model, ck = build_from_checkpoint(r / "model.pt")
    cfg = dict(ck["config"])
    raw = _plain_tile_scores(model, [s for s in load_samples(cfg) if s.split == "test"], cfg)
    assert got != pytest.approx({p: max(t.values()) for p, t in raw.items()}, abs=1e-4)   # not the raw tile score


def test_position_offsets_are_taken_from_normals_only_in_a_supervised_run(tmp_path, monkeypatch):
    """A supervised run's training split holds labelled defects: the offsets (medians of the training normals'
    tile scores at each place) were taken over them too, raising every place where a defect lay."""
    import types

    import uninet_feat.positions as positions
    from uninet_feat.calibration import _position_offsets
    from _tiny import write_supervised_manifest
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=2, n_bad=4)
    cfg = _cfg(data, split_csv=str(write_supervised_manifest(data, n_train_defects=2)), supervised=True,
               tile_norm="position")
    fit, val = train_val_samples(load_samples(cfg), cfg)
    assert any(not s.is_normal for s in fit)   # the case: labelled defects among the training images
    seen = []
    monkeypatch.setattr(positions, "tile_offsets",
                        lambda model, samples, cfg, neighbours=False, own=False:
                        seen.extend(samples) or {"offsets": {}})
    _position_offsets(types.SimpleNamespace(cfg={}), cfg, "position")
    assert sorted(s.path for s in seen) == sorted(s.path for s in fit + val if s.is_normal)


class _PixelModel(torch.nn.Module):
    """A stand-in for a trained model: a tile's WDM score is its top-left pixel (0-255, exact), so the offsets
    and scores below are known numbers, and ``context`` a vector the neighbours' offset can be fitted on."""
    source = type("Src", (), {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})

    def __init__(self):
        super().__init__()
        self.cfg = {}

    def predict(self, x, context=False):
        s = torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255)
        pix = torch.zeros(len(x), x.shape[-2], x.shape[-1])
        return (pix, s, torch.stack([s, torch.ones_like(s)], 1)) if context else (pix, s)


def _strips(root, widths_values, group=""):
    """One 64 px high RGB strip per [(width, [value of each 64 px column tile])], as training normals."""
    from uninet_feat.data.layouts import Sample
    out = []
    for n, (w, vals) in enumerate(widths_values):
        a = np.zeros((64, w, 3), np.uint8)
        for c, v in enumerate(vals):
            a[:, 64 * c:64 * c + 64] = v
        p = root / f"{group or 'g'}_{w}_{n:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        out.append(Sample(p, split="train", group=group))
    return out


TILED = {"image_size": 64, "tile": 64, "tile_overlap": 0, "eval_batch_size": 4}


def test_offsets_of_training_images_of_two_widths_are_kept_per_width(tmp_path):
    """Strips 256 and 192 px wide, both bright at their right edge: the tile at x 128 is the 192-wide strips'
    edge and an interior tile of the 256-wide ones. One median over both (136 here) was neither, so the narrow
    strips' edge still scored 89 over normal; each width now has its own offsets, in every consumer."""
    from types import SimpleNamespace
    from uninet_feat.data.tiling import tile_grid
    from uninet_feat.deploy import _tile_offsets
    from uninet_feat.evaluate import score_samples
    from uninet_feat.positions import corrected, tile_offsets
    wide = [(256, [40 + 10 * i, 41 + 10 * i, 42 + 10 * i, 200 + 10 * i]) for i in range(3)]
    narrow = [(192, [40 + 10 * i, 41 + 10 * i, 210 + 10 * i]) for i in range(3)]
    train_ = _strips(tmp_path / "train", wide + narrow)
    model = _PixelModel()
    rec = tile_offsets(model, train_, TILED)
    table = rec["offsets"][""]
    assert table == {"256x64:0,0": 50, "256x64:0,64": 51, "256x64:0,128": 52, "256x64:0,192": 210,
                     "192x64:0,0": 50, "192x64:0,64": 51, "192x64:0,128": 220}   # not one "0,128": 136
    assert rec["image_sizes"] == {"": [[64, 192], [64, 256]]} and "WxH:y,x" in rec["rule"]
    test = _strips(tmp_path / "test", [(256, [55, 55, 55, 215]), (192, [55, 55, 225])])
    model.cfg.update(tile_offsets=rec["offsets"], tile_sizes=rec["image_sizes"])
    got = score_samples(model, test, TILED, keep_maps=False)["scores"]   # evaluate / predict / ensemble
    assert got == [5.0, 5.0]   # each strip less its own width's offsets: 215 - 210, 225 - 220
    sample = test[1]
    for (h, w), x, want in (((64, 192), 128, 220), ((64, 256), 128, 52), ((64, 256), 192, 210)):
        assert corrected(0.0, [0, x, 64, 64], rec["offsets"], sample, sizes=rec["image_sizes"], hw=(h, w)) == -want
    with pytest.raises(BadInputError, match="the image is 128x64 px"):   # a third width is still refused
        corrected(0.0, [0, 0, 64, 64], rec["offsets"], sample, sizes=rec["image_sizes"], hw=(64, 128))
    # export-model bakes the offsets of the size it is built for
    m = SimpleNamespace(cfg=model.cfg)
    assert _tile_offsets(m, tile_grid(64, 192, 64), None, tmp_path)[0] == [50, 51, 220]
    assert _tile_offsets(m, tile_grid(64, 256, 64), None, tmp_path)[0] == [50, 51, 52, 210]
    # tile_norm: neighbours keeps its training tiles under the same keys
    nrec = tile_offsets(model, train_, TILED, neighbours=True)
    assert nrec["offsets"] == rec["offsets"] and set(nrec["neighbours"].groups[""]["keys"].tolist()) == set(table)
    ctx = np.array([225.0, 1.0])
    assert corrected(225.0, [0, 128, 64, 64], nrec["offsets"], sample, ctx, nrec["neighbours"], nrec["image_sizes"],
                     (64, 192)) == 5.0


# tile_offsets' record of `test_a_run_of_one_size_per_group_keeps_its_offsets_record_byte_for_byte`, as written
# by positions.py before offsets were kept per image size (the committed file, run on the same strips)
ONE_SIZE_RECORD = (
    '{"offsets": {"A": {"0,0": 50.5, "0,64": 82.5, "0,128": 204.5}, "B": {"0,0": 69.0, "0,64": 34.0, "0,128": 68.0, '
    '"0,192": 161.0}}, "n_images": {"A": 4, "B": 3}, "position_r2": 0.9903154771292224, "rule": "tile score minus '
    'the median WDM score of the run\'s training normals\' tiles at the same position (top-left corner); the image '
    'score is the highest corrected tile score", "image_sizes": {"A": [[64, 192]], "B": [[64, 256]]}}')


def test_a_run_of_one_size_per_group_keeps_its_offsets_record_byte_for_byte(tmp_path):
    """Groups whose training images share one size (AITEX strips; here group A 192 px wide, B 256) keep plain
    "y,x" keys and the very record written before, so existing runs' calibration.json score as they did."""
    from uninet_feat.positions import RULE, corrected, tile_offsets
    a = _strips(tmp_path, [(192, [40 + 7 * i, 90 - 5 * i, 200 + 3 * i]) for i in range(4)], group="A")
    b = _strips(tmp_path, [(256, [60 + 9 * i, 33 + i, 70 - 2 * i, 150 + 11 * i]) for i in range(3)], group="B")
    model = _PixelModel()
    rec = tile_offsets(model, a + b, TILED)
    # byte for byte but the rule's text, which since session 48 also states the validation normals' leave-one-out
    old = json.loads(ONE_SIZE_RECORD)
    assert json.dumps({**rec, "rule": old["rule"]}) == ONE_SIZE_RECORD
    assert rec["rule"] == RULE and "leave-one-out" in RULE
    nrec = tile_offsets(model, a + b, TILED, neighbours=True)
    assert {g: set(t["keys"].tolist()) for g, t in nrec["neighbours"].groups.items()} == \
        {g: set(t) for g, t in rec["offsets"].items()}
    for s, w in ((a[0], 192), (b[0], 256)):
        for x in range(0, w, 64):
            assert corrected(1.0, [0, x, 64, 64], rec["offsets"], s, sizes=rec["image_sizes"], hw=(64, w)) == \
                1.0 - rec["offsets"][s.group][f"0,{x}"]


def _map_scores_by_hand(model, samples, cfg):
    """{(path, "y,x"): the tile's pixel map's own WDM score}: the mean of the top k of its σ=4 blurred map of the
    model's levels and units, k the tile's WDM k, as numpy sorts it."""
    from uninet_feat.scoring import anomaly_maps, level_pixel_map, wdm_weights
    out = {}
    model.eval()
    with torch.no_grad():
        for batch, x in eval_batches(make_dataset(samples, cfg, model.source), cfg):
            o = model(x)
            maps = anomaly_maps(o.teachers, o.students)
            size = tuple(x.shape[-2:])
            k, _ = wdm_weights(maps, model.cfg["alpha"], model.cfg["beta"], size)
            s = level_pixel_map(maps, model.cfg["map_levels"], size, True, norm=model.cfg["map_norm"]).numpy()
            for j, (i, box) in enumerate(zip(batch["index"].tolist(), batch["tile"].tolist())):
                top = np.sort(s[j].ravel())[::-1][:int(k[j])]
                out[(str(samples[i].path), f"{box[0]},{box[1]}")] = float(top.mean())
    return out


def test_a_pixel_map_of_other_units_is_shifted_by_offsets_measured_on_it_not_the_scores(run, tmp_path):
    """The position offsets are in the image score's units (all levels' maps, raw); a run whose pixel map is some
    levels in range units had each tile's map shifted by them all the same: on this run the edge tile's score offset
    is 0.6 above the middle's while its map (level 3, range units) is about 0.1 above, so the edge was pushed far
    below the rest. Calibration now also measures the offsets on the map (the median of each place's map scores,
    `scoring.level_map_score`), and each tile's map is less those; the score is unchanged, and the map's kind is
    named apart, so a colour scale or pixel threshold taken on the old maps is not reused."""
    import shutil
    from uninet_feat.calibration import load_run
    from uninet_feat.evaluate import score_samples
    from uninet_feat.positions import key
    from uninet_feat.scoring import pixel_map_kind
    data, r = run
    c = tmp_path / "c"
    shutil.copytree(r, c)
    assert main(["calibrate", "--run", str(c), "--map-levels", "3", "--map-norm", "range", "--quiet"]) == 0
    cal = json.loads((c / "calibration.json").read_text())
    rec = cal["tile_offsets"]
    (group, table), = rec["offsets"].items()
    assert rec["offsets"] == json.loads((r / "calibration.json").read_text())["tile_offsets"]["offsets"]
    model, _, cfg = load_run(c)
    assert model.cfg["map_levels"] == [3] and model.cfg["map_norm"]
    fit, val = train_val_samples(load_samples(cfg), cfg)
    by_hand = _map_scores_by_hand(model, fit + val, cfg)
    maps_table = {k: float(np.median([s for (_, kk), s in by_hand.items() if kk == k])) for k in table}
    # the score offsets are not numbers of the map's scale (shifted by them, the map moved by several units), so
    # the map shifts checked below tell the two apart
    assert min(abs(table[k] - maps_table[k]) for k in table) > 0.1
    test = [s for s in load_samples(cfg) if s.split == "test"][:3]
    normed = score_samples(model, test, cfg)
    offsets = model.cfg["tile_offsets"]
    model.cfg["tile_offsets"] = None
    plain = score_samples(model, test, cfg)
    model.cfg["tile_offsets"] = offsets
    tile = cfg["tile"]
    for a, b in zip(normed["maps"], plain["maps"]):
        for y in range(0, a.shape[0], tile):
            for x in range(0, a.shape[1], tile):
                np.testing.assert_allclose(b[y:y + tile, x:x + tile] - a[y:y + tile, x:x + tile],
                                           maps_table[key((y, x))], atol=1e-5)
    assert normed["scores"] != pytest.approx(plain["scores"], abs=1e-4)   # the scores still take the score offsets
    assert rec["map_offsets"] == {group: pytest.approx(maps_table, abs=1e-5)}
    assert pixel_map_kind(model.cfg) == "smoothed, levels 3, range units, tile offsets in map units"
    assert cal["map_range_pixel_map"] == pixel_map_kind(model.cfg)
    # a calibration.json written before the map offsets: its maps are left as they are (said), named as plain maps
    del cal["tile_offsets"]["map_offsets"]
    (c / "calibration.json").write_text(json.dumps(cal))
    with pytest.warns(UserWarning, match=r"pixel map \(levels 3, range units\) is not in the image score's units.*"
                                         r"uninet-feat calibrate --run"):
        model, _, cfg = load_run(c)
    assert pixel_map_kind(model.cfg) == "smoothed, levels 3, range units"
    old = score_samples(model, test, cfg)
    for a, b in zip(old["maps"], plain["maps"]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert old["scores"] == pytest.approx(normed["scores"], abs=1e-6)
    from uninet_feat.overlay import calibrated_range
    assert calibrated_range(c, pixel_map_kind(model.cfg)) is None   # taken on maps shifted by score offsets


def test_a_map_of_the_scores_units_keeps_the_score_offsets_and_its_own_score_is_the_wdm_score(run):
    """All levels raw (the default): the map is in the score's units, so no map offsets are measured and each
    tile's map is less its score's offset, as before; the map's own score is then the WDM score itself."""
    from uninet_feat.calibration import load_run
    from uninet_feat.scoring import anomaly_maps, level_map_score, map_in_score_units
    data, r = run
    assert "map_offsets" not in json.loads((r / "calibration.json").read_text())["tile_offsets"]
    model, _, cfg = load_run(r)
    assert map_in_score_units(model.cfg) and model.cfg["tile_map_offsets"] is None
    x = next(iter(eval_batches(make_dataset(load_samples(cfg)[:2], cfg, model.source), cfg)))[1]
    with torch.no_grad():
        o = model.eval()(x)
        maps = anomaly_maps(o.teachers, o.students)
        _, s = model.score_maps(maps, tuple(x.shape[-2:]))
        ms = level_map_score(maps, None, tuple(x.shape[-2:]), None, model.cfg["alpha"], model.cfg["beta"])
    np.testing.assert_allclose(ms.numpy(), s.numpy(), rtol=1e-5)
    for cfg_ in ({"map_levels": [2, 3]}, {"map_norm": [[0, 1]] * 6}):
        assert not map_in_score_units(cfg_)


def test_neighbours_with_a_map_of_other_units_shift_it_by_the_same_nearest_tiles_map_scores(run, tmp_path):
    """Under neighbours a tile's score offset is the median of its nearest training tiles' scores; its map, of
    other units, is less the median of the same tiles' map scores (kept beside their scores in the tile file)."""
    import shutil
    from uninet_feat.calibration import load_run
    from uninet_feat.evaluate import score_samples
    from uninet_feat.positions import Neighbours, corrected, tile_map_shift
    data, r = run
    c = tmp_path / "nb"
    shutil.copytree(r, c)
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--map-levels", "3", "--map-norm",
                 "range", "--quiet"]) == 0
    rec = json.loads((c / "calibration.json").read_text())["tile_offsets"]
    near = Neighbours.load(c / rec["file"])
    (t,) = near.groups.values()
    model, _, cfg = load_run(c)
    fit, val = train_val_samples(load_samples(cfg), cfg)
    by_hand = _map_scores_by_hand(model, fit + val, cfg)
    assert sorted(t["map_scores"].tolist()) == pytest.approx(sorted(by_hand.values()), abs=1e-5)
    test = [s for s in load_samples(cfg) if s.split == "test"][:2]
    normed = score_samples(model, test, cfg)["maps"]
    ctx = {}
    with torch.no_grad():
        for batch, x in eval_batches(make_dataset(test, cfg, model.source), cfg):
            _, s, cx = model.predict(x, context=True)
            for i, box, v, cv in zip(batch["index"].tolist(), batch["tile"].tolist(), s.tolist(), cx.numpy()):
                ctx[(i, box[1])] = (box, v, cv)
    offsets = model.cfg["tile_offsets"]
    model.cfg["tile_offsets"] = None
    plain = score_samples(model, test, cfg)["maps"]
    model.cfg["tile_offsets"] = offsets
    maps_near = near.for_maps()
    for i, (a, b) in enumerate(zip(normed, plain)):
        for x in range(0, a.shape[1], cfg["tile"]):
            box, v, cv = ctx[(i, x)]
            want = maps_near.offset(next(iter(offsets)), f"0,{x}", cv)
            assert want != pytest.approx(v - corrected(v, box, offsets, test[i], cv, near), abs=1e-3)
            assert tile_map_shift(model.cfg, v, corrected(v, box, offsets, test[i], cv, near), box, test[i], cv,
                                  (64, 192)) == pytest.approx(want)
            np.testing.assert_allclose(b[:, x:x + 64] - a[:, x:x + 64], want, atol=1e-5)


def test_predict_and_the_detector_give_a_position_normed_run_the_same_scores_to_the_last_bit(run, tmp_path):
    """predict rounded the corrected tile scores to float32 where Detector (and the calibration that sets a
    --max-fpr threshold: one validation normal's score) kept float64; with the tiles' mean as the image score the
    two differed, and the normal that set the threshold was flagged by predict and not by the Detector."""
    from pathlib import Path

    from uninet_feat.detector import Detector
    from uninet_feat.predict import predict_cmd
    data, _ = run
    r = tmp_path / "mean"
    train(_cfg(data, tile_norm="position", tile_score="mean"), r, quiet=True)
    res = predict_cmd(str(r), str(data / "test"), str(tmp_path / "p"), quiet=True, overlays=False, max_fpr=0.5)
    got = {str(Path(row["path"]).resolve()): (row["wdm_score"], row["flagged"]) for row in res["rows"]}
    det = {str(Path(d.path).resolve()): (d.score, d.flagged)
           for d in Detector(r, max_fpr=0.5).score(sorted(got), maps=False)}
    assert got == det   # exact, not approx


def test_a_neighbours_file_of_another_calibration_beside_calibration_json_is_refused(run, tmp_path):
    """`calibrate` writes tile_neighbours.npz, then calibration.json: killed between the two, the new training tiles
    sat beside the old offsets and threshold and were used silently. calibration.json records their digest now; a
    file without it (written before) is taken as it is."""
    import shutil
    from uninet_feat.positions import Neighbours
    data, r = run
    c = tmp_path / "nb"
    shutil.copytree(r, c)
    assert main(["calibrate", "--run", str(c), "--tile-norm", "neighbours", "--quiet"]) == 0
    cal = json.loads((c / "calibration.json").read_text())
    near = Neighbours.load(c / cal["tile_offsets"]["file"])
    assert cal["tile_offsets"]["tile_neighbours_sha256"] == near.digest()
    evaluate(c, quiet=True)   # its own pair: accepted
    for t in near.groups.values():   # another calibration's tiles, as a kill before calibration.json leaves them
        t["scores"] = t["scores"] + 0.5
    near.save(c / cal["tile_offsets"]["file"])
    with pytest.raises(BadInputError, match="tile_neighbours.npz is not the one its calibration.json was made") as e:
        evaluate(c, quiet=True)
    assert f"uninet-feat calibrate --run {c}" in str(e.value)
    old = {**cal, "tile_offsets": {k: v for k, v in cal["tile_offsets"].items() if k != "tile_neighbours_sha256"}}
    (c / "calibration.json").write_text(json.dumps(old))   # from before the digest: not checked
    evaluate(c, quiet=True)
    (c / "calibration.json").write_text(json.dumps(cal))
    assert main(["calibrate", "--run", str(c), "--quiet"]) == 0   # the fix: a pair again
    evaluate(c, quiet=True)


def test_a_size_held_by_fewer_than_3_training_normals_of_a_multi_size_group_is_warned_of(tmp_path):
    """A group of two widths with one 192 px training strip: that width's offsets are that one strip's own tiles,
    so an image of that width scores about 0 by construction (the strip itself exactly 0). Silent before; now a
    warning names the group, the size and its count. The offsets stay as they were."""
    import warnings
    from uninet_feat.positions import tile_offsets
    wide = [(256, [40 + 10 * i, 41 + 10 * i, 42 + 10 * i, 200 + 10 * i]) for i in range(3)]
    narrow = [(192, [40 + 10 * i, 41 + 10 * i, 210 + 10 * i]) for i in range(3)]
    model = _PixelModel()
    for n in (1, 2):
        strips = _strips(tmp_path / str(n), wide + narrow[:n], group="A")
        with pytest.warns(UserWarning, match=rf"group 'A' has only {n} training normal\(s\) 192x64 px") as w:
            rec = tile_offsets(model, strips, TILED)
        assert len([x for x in w if "training normal(s)" in str(x.message)]) == 1   # not the 256 px strips
        assert rec["offsets"]["A"]["192x64:0,128"] == np.median([210 + 10 * i for i in range(n)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 3 of each width, or one width only: nothing to warn of
        tile_offsets(model, _strips(tmp_path / "3", wide + narrow, group="A"), TILED)
        tile_offsets(model, _strips(tmp_path / "w", narrow[:1], group="A"), TILED)


def test_a_normal_among_the_offsets_normals_is_taken_against_the_others_median(tmp_path):
    """`OwnTiles`: the calibration that measured the offsets scores its validation normals, which are among them,
    against the median of the other normals' tiles at each place (the score's and the map's own); any other image
    (a test or new one) and a place's only normal take the saved median."""
    import types

    from uninet_feat.positions import OwnTiles, corrected
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    per = {("", "0,0"): [1.0, 2.0, 3.0, 10.0], ("", "0,64"): [5.0]}
    maps = {("", "0,0"): [0.1, 0.2, 0.3, 0.9], ("", "0,64"): [0.5]}
    src = {("", "0,0"): paths, ("", "0,64"): paths[:1]}
    own = OwnTiles(per, src, maps)
    table = {"": {"0,0": 2.5, "0,64": 5.0}}
    map_table = {"": {"0,0": 0.25, "0,64": 0.5}}

    def at(p, group=""):
        return types.SimpleNamespace(path=p, group=group)
    box = (0, 0, 64, 64)
    assert corrected(4.0, box, table, at(paths[0]), own=own) == pytest.approx(4.0 - 3.0)   # others: 2, 3, 10
    assert corrected(4.0, box, table, at(paths[3]), own=own) == pytest.approx(4.0 - 2.0)   # others: 1, 2, 3
    assert corrected(4.0, box, table, at(tmp_path / "new.png"), own=own) == pytest.approx(4.0 - 2.5)
    assert corrected(4.0, box, table, at(paths[0])) == pytest.approx(4.0 - 2.5)   # loaded from disk: no own tiles
    assert corrected(4.0, (0, 64, 64, 64), table, at(paths[0]), own=own) == pytest.approx(4.0 - 5.0)   # alone there
    assert corrected(0.0, box, map_table, at(paths[3]), own=own, maps=True) == pytest.approx(-0.2)
    assert corrected(0.0, box, map_table, at(paths[3]), own=OwnTiles(per, src), maps=True) == pytest.approx(-0.25)
