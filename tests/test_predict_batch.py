"""predict on a new batch: a plain folder of images (any depth) or one image file, scored unlabelled."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uninet_feat.config import load_config
from uninet_feat.data import discover, discover_batch
from uninet_feat.errors import BadInputError
from uninet_feat.train import train
from uninet_feat.predict import predict_cmd

from _tiny import register_tiny, tiny_run, write_texture_set

register_tiny()


def _png(p, seed=0):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)[0]


def test_predict_scores_a_plain_folder_and_a_single_file(run, tmp_path):
    flat = tmp_path / "flat"
    imgs = [_png(flat / "a.png", 1), _png(flat / "b.jpg", 2)]
    with pytest.raises(BadInputError, match="ROOT/good"):       # train/evaluate keep their layouts
        discover(flat)
    imgs.append(_png(flat / "2024-05-01" / "c.png", 3))
    res = predict_cmd(run, flat, tmp_path / "p", threshold=-1e9, quiet=True)
    assert sorted(r["path"] for r in res["rows"]) == sorted(map(str, imgs))
    assert all(r["label"] == "" and r["flagged"] for r in res["rows"]) and res["n_images"] == 3
    assert len(list((tmp_path / "p" / "overlays").iterdir())) == 3
    one = predict_cmd(run, imgs[2], tmp_path / "q", threshold=-1e9, quiet=True)
    assert [(r["path"], r["label"]) for r in one["rows"]] == [(str(imgs[2]), "")]
    assert one["rows"][0]["wdm_score"] == pytest.approx(
        next(r for r in res["rows"] if r["path"] == str(imgs[2]))["wdm_score"], rel=1e-5)
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["n_images"] == 1



def test_predict_again_into_the_same_folder_keeps_no_stale_overlays(run, tmp_path):
    """A re-run into a used --out: overlays only of the images this run flags, and the same CSV columns whether
    or not anything is flagged."""
    import csv
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(3)]
    predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=-1e9, quiet=True)
    (tmp_path / "p" / "overlays" / "mine.txt").write_text("a user's file")
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=1e9, quiet=True)   # nothing flagged now
    assert res["n_flagged"] == 0 and [p.name for p in (tmp_path / "p" / "overlays").iterdir()] == ["mine.txt"]
    with open(tmp_path / "p" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(imgs) and all(r["overlay"] == "" and r["flagged"] == "False" for r in rows)


def test_summary_json_is_written_last_so_a_predict_stopped_in_its_overlays_does_not_look_finished(run, tmp_path,
                                                                                                   monkeypatch):
    """summary.json was written before the overlays: a predict killed while drawing them left a summary counting
    the flagged images beside rows naming no overlay (an audit, session 53). It is now the finished predict's mark."""
    import uninet_feat.predict as pr
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(3)]

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pr, "_write_overlays", killed)
    with pytest.raises(KeyboardInterrupt):
        predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=-1e9, quiet=True)
    assert not (tmp_path / "p" / "summary.json").exists()
    monkeypatch.undo()
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=-1e9, quiet=True)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["n_flagged"] == len(imgs) == res["n_flagged"]
    assert all(Path(r["overlay"]).is_file() for r in res["rows"])


def test_a_stopped_predicts_overlays_and_masks_are_not_scored_by_the_next_one(run, tmp_path, monkeypatch):
    """A predict into D/pred stopped while drawing overlays (summary.json, written last, absent) left overlays/ and
    maps/ that the next predict of D scored as new images, and `calibrate --normals D` would take as normals (an
    audit, session 53). The folder is known by the config.yaml a predict writes before its first output."""
    from uninet_feat.cli import main
    import uninet_feat.predict as pr
    imgs = [_png(tmp_path / "D" / f"{i}.png", i) for i in range(3)]

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pr, "_write_overlays", lambda ex, samples, rows, folder, *a, **k: (
        folder.mkdir(parents=True, exist_ok=True), _png(folder / "0_overlay.png", 9), stopped()))
    assert main(["predict", "--run", str(run), "--data", str(tmp_path / "D"), "--out", str(tmp_path / "D" / "pred"),
                 "--save-maps", "--threshold", "-1e9", "--quiet"]) == 130
    assert not (tmp_path / "D" / "pred" / "summary.json").exists()
    assert list((tmp_path / "D" / "pred" / "maps").glob("*_mask.png"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"image\(s\) in predict output folder"):
        res = predict_cmd(run, tmp_path / "D", tmp_path / "D" / "pred2", threshold=-1e9, quiet=True)
    assert sorted(r["path"] for r in res["rows"]) == sorted(map(str, imgs))


def test_overlays_of_a_run_without_a_map_range_are_detectors_and_leave_normal_regions_clear(tmp_path):
    """A run without validation normals coloured its overlays from 0 to the flagged maps' largest value: a WDM map is
    2.5-4 on normal pixels, so 97-99 % of every overlay was tinted, and predict's pooled scale differed from
    `Detector.overlay`'s (an audit, session 53). Each overlay is now on its own map's median .. max, in both."""
    from PIL import Image
    from uninet_feat.detector import Detector
    tex = write_texture_set(tmp_path / "t", n_train=6, n_good=1, n_bad=1, size=32)
    train(load_config(None, {"data": str(tex)}, base={"backbone": "tiny", "weights": "random", "image_size": 32,
                                                      "epochs": 1, "batch_size": 2, "channels_last": False,
                                                      "val_fraction": 0.0}), tmp_path / "run", quiet=True)
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(3)]
    with pytest.warns(UserWarning, match="no validation-normal map range, so each overlay is coloured from its own"):
        res = predict_cmd(tmp_path / "run", tmp_path / "b", tmp_path / "p", threshold=-1e9, quiet=True)
    det = Detector(tmp_path / "run", threshold=-1e9)
    for r, d in zip(sorted(res["rows"], key=lambda r: r["path"]), det.score(imgs)):
        got = np.asarray(Image.open(r["overlay"]).convert("RGB"))
        want = det.overlay(d)
        diff = np.abs(got.astype(int) - want).max(-1)
        assert diff.max() == 0, (int((diff > 0).sum()), int(diff.max()), got.shape)   # the same pixels
        plain = np.asarray(Image.open(r["path"]).convert("RGB"))
        tinted = (np.abs(got.astype(int) - plain).max(-1) > 20).mean()
        assert tinted < 0.5, tinted   # the lower half of the map (below its median) shows the image as it is

def test_discover_batch_labels(tmp_path):
    _png(tmp_path / "dated" / "day1" / "a.png")
    _png(tmp_path / "dated" / "day2" / "b.png")
    assert [(s.label, s.is_normal, s.split) for s in discover_batch(tmp_path / "dated")] == [("", False, "")] * 2
    _png(tmp_path / "lab" / "good" / "a.png")
    _png(tmp_path / "lab" / "hole" / "b.png")
    _png(tmp_path / "lab" / "new.png")
    assert [(s.path.name, s.label) for s in discover_batch(tmp_path / "lab")] == [
        ("a.png", "good"), ("b.png", "hole"), ("new.png", "")]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadInputError, match="not an image file"):
        discover_batch(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images found"):
        discover_batch(tmp_path / "empty")


def test_a_png_beside_a_same_named_image_in_a_batch_is_its_mask_and_said_so(tmp_path):
    """x.png beside x.jpg is x.jpg's mask (the magnetic-tile layout), for images directly in the batch folder as
    well as in label folders; since in new batches it may be a second image instead, predict says which files
    it did not score."""
    _png(tmp_path / "b" / "x.jpg", 1)
    _png(tmp_path / "b" / "x.png", 2)
    _png(tmp_path / "b" / "y.png", 3)
    with pytest.warns(UserWarning, match=r"1 PNG file\(s\) beside a same-named image \(x.png\).*not scored"):
        got = discover_batch(tmp_path / "b")
    assert [(s.path.name, s.mask.name if s.mask else None) for s in got] == [("x.jpg", "x.png"), ("y.png", None)]
    from uninet_feat.data import layouts
    layouts._WARNED.clear()   # with a run's mask pattern x.png is no mask, and still not scored: said too
    with pytest.warns(UserWarning, match=r"\(x.png\) are taken for that image's mask, not scored"):
        got = discover_batch(tmp_path / "b", "{stem}_gt.png")
    assert [(s.path.name, s.mask) for s in got] == [("x.jpg", None), ("y.png", None)]
    from uninet_feat.workflows import zero_shot_cmd   # zero-shot reads no masks: x.png (another size) is no error
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(tmp_path / "b" / "x.png")
    res = zero_shot_cmd(tmp_path / "b", tmp_path / "zs", "clip:tiny", "random", image_size=32, quiet=True)
    assert res["n_images"] == 2 and res["skipped"] == []


def test_colour_images_scored_by_a_grey_trained_run_are_named(run, tmp_path):
    """A run trained on grey images scored colour ones silently (the model never saw colour)."""
    import warnings
    from PIL import Image
    grey = tmp_path / "b" / "grey.png"
    grey.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(grey)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are (colour|grey)")   # grey on grey: nothing to say
        predict_cmd(run, grey, tmp_path / "p", overlays=False, quiet=True)
    g = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)   # grey pictures in colour files:
    Image.fromarray(np.stack([g, g, g, np.full_like(g, 255)], -1)).save(tmp_path / "b" / "grey_rgba.png")
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "b" / "grey_rgb.jpg", quality=90)   # not named
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are (colour|grey)")
        predict_cmd(run, tmp_path / "b", tmp_path / "p2", overlays=False, quiet=True)
    _png(tmp_path / "b" / "colour.png", 1)
    with pytest.warns(UserWarning, match=r"1 of 4 images are colour \(.*colour.png\); the run was trained on grey"):
        predict_cmd(run, tmp_path / "b", tmp_path / "q", overlays=False, quiet=True)
    from uninet_feat.data.layouts import Sample
    from uninet_feat.predict import _warn_other_colour_kind
    many = [tmp_path / "c" / f"a_{i:02d}.png" for i in range(20)]   # grey pictures in RGB files, then colour
    many[0].parent.mkdir()
    for p in many:
        Image.fromarray(np.stack([g, g, g], -1)).save(p)
    many += [_png(tmp_path / "c" / f"z_{i}.png", i) for i in range(3)]   # past the first 16 looked into
    with pytest.warns(UserWarning, match=r"\d of 23 images are colour \(.*z_\d.png.*more colour file\(s\) were not "
                                         r"looked into"):
        _warn_other_colour_kind(run, [Sample(p) for p in many])


def test_long_and_colliding_names_get_outputs_that_fit_and_cannot_be_another_images(run, tmp_path):
    """A 230-character name failed predict ('File name too long': the output name plus the temp file's passed the
    file system's 255 bytes) after half the overlays; a collision's `_2` could be another image's own name."""
    from uninet_feat.predict import NAME_BYTES, _overlay_names
    long = _png(tmp_path / "b" / ("L" * 230 + ".png"), 1)
    imgs = [_png(tmp_path / "b" / "c" / "x y.png", 2), _png(tmp_path / "b" / "c" / "x_y.png", 3),
            _png(tmp_path / "b" / "c" / "x_y_2.png", 4)]
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=-1e9, save_maps=True, quiet=True)
    assert res["n_images"] == 4 and all(Path(r["overlay"]).is_file() and Path(r["map"]).is_file() for r in res["rows"])
    names = {Path(r["path"]).name: Path(r["overlay"]).name for r in res["rows"]}
    assert len(set(names.values())) == 4 and len(names[long.name].encode()) <= NAME_BYTES
    assert names["x_y_2.png"] == "c__x_y_2_overlay.png"   # the rule's name stays its own image's
    assert {names["x y.png"], names["x_y.png"]} - {"c__x_y_overlay.png"} == {
        n for n in (names["x y.png"], names["x_y.png"]) if "~" in n}
    assert _overlay_names(map(str, imgs), tmp_path / "b") == _overlay_names(map(str, imgs), tmp_path / "b")


def test_a_relative_out_gives_rows_that_name_outputs_by_absolute_path(run, tmp_path, monkeypatch):
    """The rows' overlay / map / mask paths were relative to the shell's folder (`../out/pred/maps/...`), so the
    CSV named nothing once read from another folder; its image paths were already absolute."""
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(2)]
    monkeypatch.chdir(tmp_path)
    res = predict_cmd(run, "b", "p", threshold=-1e9, quiet=True, save_maps=True, pixel_threshold=0.5)
    monkeypatch.chdir("/")
    for r in res["rows"]:
        for key in ("overlay", "map", "defect_mask"):
            assert Path(r[key]).is_absolute() and Path(r[key]).is_file(), (key, r[key])
    assert sorted(r["path"] for r in res["rows"]) == sorted(map(str, imgs))


def test_a_detector_scores_in_memory_as_predict_does(run, tmp_path):
    """`Detector(run).score(paths)`: predict's scores, flags, maps (at each image's size) and masks, in memory,
    with the model loaded once."""
    from PIL import Image
    from uninet_feat.detector import Detector
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(3)]
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (24, 56, 3), dtype=np.uint8)).save(
        tmp_path / "b" / "wide.png")
    imgs.append(tmp_path / "b" / "wide.png")
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", quiet=True, overlays=False, save_maps=True)
    rows = {r["path"]: r for r in res["rows"]}
    det = Detector(run)
    assert det.threshold == pytest.approx(res["threshold"]) and det.pixel_threshold == pytest.approx(
        res["pixel_threshold"])
    found = det.score(imgs)
    assert [d.path for d in found] == [str(p) for p in imgs]
    for d in found:
        row = rows[d.path]
        assert d.score == pytest.approx(row["wdm_score"], rel=1e-5) and d.flagged == row["flagged"]
        saved = np.load(row["map"]).astype(np.float32)
        assert d.map.shape == saved.shape == Image.open(d.path).size[::-1]
        np.testing.assert_allclose(d.map, saved, atol=5e-3, rtol=2e-3)   # predict saves float16
        saved_mask = np.asarray(Image.open(row["defect_mask"])) > 0
        assert d.mask.shape == saved_mask.shape and (d.mask == saved_mask).mean() > 0.99
    quick = Detector(run, threshold=-1e9).score(imgs[:1], maps=False)
    assert quick[0].flagged is True and quick[0].map is None and quick[0].mask is None
    assert quick[0].score == pytest.approx(found[0].score, rel=1e-6)


def test_overlays_and_saved_maps_are_the_same_past_the_held_maps_budget(run, tmp_path, monkeypatch):
    """Overlays and --save-maps are drawn from the scoring pass's maps up to a memory budget (`_HeldMaps`), and
    from a second pass past it: the two give the same files."""
    from uninet_feat import predict as P
    for i in range(5):
        _png(tmp_path / "b" / f"{i}.png", i)
    full = predict_cmd(run, tmp_path / "b", tmp_path / "full", threshold=-1e9, quiet=True, save_maps=True)
    monkeypatch.setattr(P, "HELD_MAP_BYTES", 2 * 32 * 32 * 4)   # two maps of the run's 32-px input
    part = predict_cmd(run, tmp_path / "b", tmp_path / "part", threshold=-1e9, quiet=True, save_maps=True)
    for a, b in zip(full["rows"], part["rows"]):
        assert a["wdm_score"] == b["wdm_score"] and a["defect_fraction"] == b["defect_fraction"]
        np.testing.assert_array_equal(np.load(a["map"]), np.load(b["map"]))
        assert Path(a["overlay"]).read_bytes() == Path(b["overlay"]).read_bytes()


def test_a_detector_streams_long_lists_and_predict_rows_carry_split_and_group(run, tmp_path):
    """`Detector.iter_score` holds one chunk's maps at a time, with `score`'s results; predict's rows say each
    image's split and group, so a category folder's train and test normals are told apart without their paths."""
    import yaml
    from uninet_feat.detector import Detector
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(5)]
    det = Detector(run)
    whole = det.score(imgs)
    streamed = list(det.iter_score(imgs, chunk=2))
    assert [d.path for d in streamed] == [d.path for d in whole]
    for a, b in zip(whole, streamed):
        assert a.score == pytest.approx(b.score, rel=1e-5) and a.flagged == b.flagged
        np.testing.assert_allclose(a.map, b.map, rtol=1e-4, atol=1e-5)
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    rows = predict_cmd(run, data, tmp_path / "p", quiet=True, overlays=False)["rows"]
    assert {r["split"] for r in rows} == {"train", "test"} and all(r["group"] == "" for r in rows)
    assert all(r["split"] == "train" for r in rows if "/train/" in r["path"])


def test_a_detector_leaves_the_host_process_as_it_was(run, tmp_path):
    """An embedding process: the Detector set torch's threads for the whole process to the run's recorded count
    (46 ms an image became 992 ms on shared cores), took a path string for a list of characters, stopped a call at
    one corrupt file with no library way round, and a CLI call in the same process left `auto` as the library's
    device."""
    import torch
    from uninet_feat import runs
    from uninet_feat.cli import main
    from uninet_feat.detector import Detector
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        det = Detector(run)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    img = _png(tmp_path / "b" / "a.png", 1)
    one, = det.score(str(img))
    assert one.path == str(img) and det.score(img)[0].score == one.score
    bad = tmp_path / "b" / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(BadInputError, match="bad.png"):
        det.score([img, bad])
    with pytest.warns(UserWarning, match="bad.png"):
        got = Detector(run, skip_bad=True).score([img, bad])
    assert got[0].score == pytest.approx(one.score, rel=1e-6) and got[1].score != got[1].score
    assert got[1].flagged is None and got[1].map is None
    with pytest.raises(BadInputError, match="pixel_threshold must be a finite number"):
        Detector(run, pixel_threshold=float("nan"))
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    assert runs._default_device == "cpu"


def test_a_detector_scores_camera_frames_as_the_same_pixels_in_files(run, tmp_path):
    """A line's software has frames in memory: numpy arrays (grey, colour, 16-bit) and PIL images score exactly as
    files of the same pixels; other arrays are refused with the forms that are read."""
    from PIL import Image
    from uninet_feat.detector import Detector
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    colour = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    deep = (rng.integers(0, 65536, (40, 48))).astype(np.uint16)
    files = []
    for name, a in (("g.png", grey), ("c.png", colour), ("d.png", deep)):
        Image.fromarray(a).save(tmp_path / name)
        files.append(tmp_path / name)
    det = Detector(run)
    from_files = det.score(files)
    frames = det.score([grey, colour, deep, Image.fromarray(colour)])
    assert [d.path for d in frames] == ["<image 0>", "<image 1>", "<image 2>", "<image 3>"]
    for a, b in zip(from_files + from_files[1:2], frames):   # other batches: equal up to float sums
        assert a.score == pytest.approx(b.score, rel=1e-5) and a.flagged == b.flagged
        np.testing.assert_allclose(a.map, b.map, rtol=1e-4, atol=1e-5)
    assert det.score(grey)[0].score == pytest.approx(from_files[0].score, rel=1e-5)   # one frame alone
    with pytest.raises(BadInputError, match="float32 array of shape"):
        det.score([grey.astype(np.float32)])


def test_detection_regions_and_overlay_are_predicts(run, tmp_path):
    """`Detection.regions()`: the mask's 8-connected regions with their boxes, areas and peaks, hottest first;
    `Detector.overlay`: the very pixels predict writes as the image's overlay, also for an in-memory frame."""
    from PIL import Image
    from uninet_feat.detector import Detection, Detector
    m = np.zeros((10, 12), np.float32)
    m[1:3, 2:5] = 2.0           # a 2x3 block
    m[6, 8] = m[7, 9] = 5.0     # two pixels touching at a corner: one region under 8-connectivity
    d = Detection("x", 1.0, True, m, m > 1.0)
    assert [(r.x, r.y, r.width, r.height, r.area, r.peak) for r in d.regions()] == [(8, 6, 2, 2, 2, 5.0),
                                                                                    (2, 1, 3, 2, 6, 2.0)]
    assert [r.area for r in d.regions(min_area=3)] == [6] and Detection("y", 1.0, False, m, None).regions() == []
    imgs = [_png(tmp_path / "b" / f"{i}.png", i) for i in range(3)]
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", quiet=True, threshold=-1e9)   # every image flagged
    det = Detector(run)
    found = det.score(imgs)
    from scipy import ndimage
    from uninet_feat.overlay import CONTOUR_COLOR
    outlined = 0
    for d, row in zip(found, sorted(res["rows"], key=lambda r: r["path"])):
        assert row["path"] == d.path
        ov = det.overlay(d)
        np.testing.assert_array_equal(ov, np.asarray(Image.open(row["overlay"])))
        assert sum(r.area for r in d.regions()) == int(d.mask.sum())
        blue = np.all(ov == CONTOUR_COLOR, axis=-1)   # the defect mask's outline, on its edge and nowhere else
        edge = ndimage.binary_dilation(d.mask, iterations=2) & ~ndimage.binary_erosion(d.mask, iterations=2)
        assert blue.any() == d.mask.any() and not (blue & ~edge).any()
        outlined += bool(blue.any())
    assert outlined   # (the tiny run's maps top its normals' range somewhere on these noise images)
    frame = np.asarray(Image.open(imgs[0]))
    (f,) = det.score(frame)
    np.testing.assert_array_equal(det.overlay(f, image=frame), det.overlay(found[0]))
    with pytest.raises(BadInputError, match="in-memory image"):
        det.overlay(f)


def test_a_detector_reads_colour_frames_of_any_form_as_their_files(run, tmp_path):
    """Colour frames score as the files they would be: a 16-bit colour array as a 16-bit colour file (its high
    byte, as PIL reads one), a PIL CMYK image (which PNG cannot hold) as its JPEG/TIFF, and a PIL image opened
    from an EXIF-rotated file upright, as that file."""
    from uninet_feat.detector import Detector
    rng = np.random.default_rng(5)
    colour = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    deep = colour.astype(np.uint16) * 256 + rng.integers(0, 256, colour.shape).astype(np.uint16)
    Image.fromarray(colour).save(tmp_path / "c.png")
    Image.fromarray(colour).convert("CMYK").save(tmp_path / "k.tif")
    sideways = Image.fromarray(np.rot90(colour, 1).copy())
    exif = sideways.getexif()
    exif[0x0112] = 6                                    # stored turned left: shown upright
    sideways.save(tmp_path / "r.png", exif=exif)
    det = Detector(run)
    c, k, r = det.score([tmp_path / "c.png", tmp_path / "k.tif", tmp_path / "r.png"])
    assert r.score == pytest.approx(c.score, rel=1e-6)  # the rotated file reads as the upright one
    frames = det.score([deep, Image.open(tmp_path / "k.tif"), Image.open(tmp_path / "r.png")])
    for a, b in zip((c, k, r), frames):
        assert a.score == pytest.approx(b.score, rel=1e-5) and a.map.shape == b.map.shape == (40, 48)
        np.testing.assert_allclose(a.map, b.map, rtol=1e-4, atol=1e-5)


def test_a_pil_tiff_with_a_quarter_turn_reads_as_its_file_not_scrambled(tmp_path):
    """PIL decodes an uncompressed L (P, I;16, RGBA, CMYK) TIFF with orientation 5-8 through a memory map at its
    upright size, which re-cuts its rows; `ImageOps.exif_transpose` on an image from Image.open decoded it so, and
    a Detector scored those scrambled pixels. An image not yet decoded is read as `load_image` reads its file; one
    decoded already keeps PIL's turn (an RGB TIFF: upright, not turned again; a JPEG: none, so it is turned) and
    one scrambled by that map is refused by name."""
    from uninet_feat.data.images import load_image
    from uninet_feat.detector import _frame_file
    yy, xx = np.mgrid[0:40, 0:24]                                # stored 24 wide, 40 high: shown 40 x 24
    stored = np.stack([xx * 10 + 1, yy * 6, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    grey, rgb, jpg = tmp_path / "l.tif", tmp_path / "rgb.tif", tmp_path / "t.jpg"
    Image.fromarray(stored).convert("L").save(grey, exif=exif)   # uncompressed, PIL's default
    Image.fromarray(stored).save(rgb, exif=exif)
    Image.fromarray(stored).save(jpg, exif=exif, quality=95)
    want = load_image(grey)
    assert want.shape == (24, 40, 3)
    opened = Image.open(grey)
    f, name = _frame_file(opened, tmp_path / "frame.png", 0)
    np.testing.assert_array_equal(load_image(f), want)
    assert name == "<image 0>" and opened.filename == str(grey)   # the caller's image keeps its file name

    def decoded(p):
        im = Image.open(p)
        im.load()
        return im
    with pytest.raises(BadInputError, match=r"<image 1> was decoded by PIL at 24x40 px, not the 40x24 px"):
        _frame_file(decoded(grey), tmp_path / "g.png", 1)      # PIL's map scrambled it: not scored
    for p in (rgb, jpg):   # PIL turned the RGB TIFF as it decoded it, and no JPEG
        f, _ = _frame_file(decoded(p), tmp_path / f"{p.suffix[1:]}.png", 2)
        np.testing.assert_array_equal(load_image(f), load_image(p))


def test_the_kinds_a_run_was_trained_on_are_recorded_and_named_once_by_a_detector(run, tmp_path):
    """calibration.json counts the training normals' grey and colour files; a run trained on both kinds is warned
    about at training and then names neither kind as foreign (it named one from its validation normals alone); a
    Detector names colour frames of a grey run once, not on every call."""
    import warnings
    from uninet_feat.detector import Detector
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["image_kinds"]["colour"] == 0 and cal["image_kinds"]["grey"] >= 6
    det = Detector(run)
    frame = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"1 of 1 images are colour \(<image 0>\).*trained on grey"):
        det.score(frame)   # named as the result is, not by its temporary file
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are (colour|grey)")
        det.score([frame, frame])   # said once per Detector
    tex = write_texture_set(tmp_path / "mixed", n_train=8, n_good=1, n_bad=1, size=32)
    for p in sorted((tex / "train" / "good").glob("*.png"))[:3]:   # a second camera's colour frames (tinted:
        _tint(p)                                                   # grey pictures saved as RGB count as grey)
    with pytest.warns(UserWarning, match=r"training normals mix grey and colour files: 3 colour \(.*\) among 5 grey"):
        train(load_config(None, {"data": str(tex), "backbone": "tiny", "weights": "random", "image_size": 32,
                                 "epochs": 1, "batch_size": 4, "channels_last": False, "val_fraction": 0.3}),
              tmp_path / "r", quiet=True)
    assert json.loads((tmp_path / "r" / "calibration.json").read_text())["image_kinds"] == {"grey": 5, "colour": 3}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are (colour|grey)")
        Detector(tmp_path / "r").score([frame, sorted((tex / "test").rglob("*.png"))[0]])


def _tint(p, out=None):
    """A grey picture made a colour one (a colour camera's frame of the same texture)."""
    g = np.asarray(Image.open(p).convert("L"), np.float32)
    Image.fromarray(np.stack([g, 0.8 * g, 0.55 * g], -1).astype(np.uint8)).save(out or p)


def _grey_rgb(p, out=None):
    """The same frame from a camera switched to grey output, saved as RGB (R = G = B)."""
    Image.open(p).convert("L").convert("RGB").save(out or p)


def test_grey_pictures_saved_as_rgb_are_named_for_a_colour_trained_run(tmp_path):
    """Only a grey-trained run looked into its colour files: a colour line whose camera switched to grey output,
    saved as RGB, was scored silently by its colour run (session 27's audit). A colour run now names such pictures
    at predict, in a Detector and at evaluate; a run whose colour files held grey pictures counts as grey."""
    import shutil
    import warnings
    from uninet_feat.detector import Detector
    from uninet_feat.evaluate import evaluate
    from uninet_feat.predict import trained_colour_kind
    tex = write_texture_set(tmp_path / "tex", n_train=6, n_good=2, n_bad=2, size=32)
    for p in tex.rglob("*.png"):
        if "ground_truth" not in p.parts:
            _tint(p)
    run = tmp_path / "colour_run"
    train(load_config(None, {"data": str(tex), "backbone": "tiny", "weights": "random", "image_size": 32,
                             "epochs": 1, "batch_size": 4, "channels_last": False, "val_fraction": 0.3}),
          run, quiet=True)
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["image_kinds"] == {"grey": 0, "colour": 6} and cal["colour_files_looked"] == {"looked": 6, "grey": 0}
    assert trained_colour_kind(run) == "colour"
    batch = tmp_path / "batch"
    batch.mkdir()
    for i, p in enumerate(sorted((tex / "test" / "good").glob("*.png"))):
        shutil.copy(p, batch / f"colour_{i}.png")
        _grey_rgb(p, batch / f"switched_{i}.png")
    with pytest.warns(UserWarning, match=r"2 of the 4 colour files looked into \(of 4 images\) hold grey pictures, "
                                         r"every pixel's R = G = B \(.*switched_0.png, .*switched_1.png\): a camera "
                                         r"set to grey output\?.*trained on colour images.*Fix: set the camera back"):
        predict_cmd(run, batch, tmp_path / "p", overlays=False, quiet=True)
    with warnings.catch_warnings():   # colour pictures only: nothing to say
        warnings.filterwarnings("error", message=".*(grey pictures|images are grey)")
        predict_cmd(run, batch / "colour_0.png", tmp_path / "p2", overlays=False, quiet=True)
        Detector(run).score(np.asarray(Image.open(batch / "colour_1.png")))
    frame = np.asarray(Image.open(batch / "switched_1.png"))
    with pytest.warns(UserWarning, match=r"1 of the 1 colour files looked into .* \(<image 0>\)"):
        Detector(run).score(frame)
    moved = tmp_path / "grey_line"
    shutil.copytree(tex, moved)
    for p in (moved / "test").rglob("*.png"):
        _grey_rgb(p)
    with pytest.warns(UserWarning, match=r"4 of the 4 colour files looked into \(of 4 images\) hold grey pictures"):
        evaluate(run, data=str(moved), quiet=True)
    # a run trained on grey pictures saved as RGB is a grey run: its own kind of picture is not named
    cal.update(colour_files_looked={"looked": 6, "grey": 6})
    (run / "calibration.json").write_text(json.dumps(cal))
    assert trained_colour_kind(run) == "grey"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(grey pictures|images are (grey|colour))")
        Detector(run).score(frame)
    cal.update(colour_files_looked={"looked": 6, "grey": 2})   # both kinds: neither named
    (run / "calibration.json").write_text(json.dumps(cal))
    assert trained_colour_kind(run) is None
    del cal["colour_files_looked"]   # a run from before the record: some validation normals are decoded
    cal["val_paths"] = [str(batch / "switched_0.png"), str(batch / "switched_1.png")]
    (run / "calibration.json").write_text(json.dumps(cal))
    assert trained_colour_kind(run) == "grey"


def test_a_detector_looks_at_colour_kinds_of_its_first_images_only_and_names_unscorable_pil_modes(run, monkeypatch):
    """The colour-kind look is for a wrong camera or run, which shows at once: a line's frames are not decoded
    twice for it for ever. A PIL image of a mode no lossless container holds is a one-line error with the fix."""
    import warnings
    import uninet_feat.detector as detector
    monkeypatch.setattr(detector, "KIND_LOOKS", 2)
    det = detector.Detector(run)
    grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    colour = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are (colour|grey)")
        det.score([grey, grey])       # the two looks spent on grey frames, as the run's
        det.score(colour)             # past them: not looked at
    with pytest.warns(UserWarning, match="1 of 1 images are colour"):
        detector.Detector(run).score(colour)
    with pytest.raises(BadInputError, match="mode HSV cannot be scored.*convert"):
        det.score(Image.fromarray(colour).convert("HSV"))


def test_a_killed_predict_run_again_reuses_the_parts_it_finished(run, tmp_path, monkeypatch):
    """predict saves its scoring pass part by part under OUT/.partial: a kill mid-batch, then the same command,
    scores only the parts not yet saved and writes what an uninterrupted predict writes; an image replaced since
    the kill, or another model, starts the pass over; a finished predict leaves no parts behind."""
    import uninet_feat.extract as extract
    monkeypatch.setattr(extract, "PART_ITEMS", 2)
    for i in range(7):
        _png(tmp_path / "b" / f"{i}.png", i)
    straight = predict_cmd(run, tmp_path / "b", tmp_path / "s", threshold=0.0, quiet=True)
    calls, real = [], extract.Extractor._run

    def counted(self, ds, indices, *a, **kw):
        calls.append(list(indices))
        if kill_after is not None and len(calls) > kill_after:
            raise KeyboardInterrupt   # what a kill leaves: the parts saved so far
        return real(self, ds, indices, *a, **kw)
    monkeypatch.setattr(extract.Extractor, "_run", counted)
    kill_after = 2
    with pytest.raises(KeyboardInterrupt):
        predict_cmd(run, tmp_path / "b", tmp_path / "k", threshold=0.0, quiet=True)
    assert sorted(p.name for p in (tmp_path / "k" / ".partial" / "run").glob("part-*.npz")) == \
        ["part-00000.npz", "part-00001.npz"]
    calls.clear()
    kill_after = None
    again = predict_cmd(run, tmp_path / "b", tmp_path / "k", threshold=0.0, quiet=True)
    assert calls == [[4, 5], [6]] and again["resumed_items"] == 4      # only the two parts not saved
    key = lambda r: (r["path"], r["flagged"])
    assert sorted(map(key, again["rows"])) == sorted(map(key, straight["rows"]))
    assert {r["path"]: r["wdm_score"] for r in again["rows"]} == \
        pytest.approx({r["path"]: r["wdm_score"] for r in straight["rows"]}, rel=1e-6)
    assert not (tmp_path / "k" / ".partial").exists() and "resumed_items" not in straight
    # killed again, then one image replaced: its part (and every other) is scored anew, none reused
    kill_after = 2
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        predict_cmd(run, tmp_path / "b", tmp_path / "k", threshold=0.0, quiet=True)
    _png(tmp_path / "b" / "1.png", 99)
    kill_after, calls[:] = None, []
    fresh = predict_cmd(run, tmp_path / "b", tmp_path / "k", threshold=0.0, quiet=True)
    assert len(calls) == 4 and "resumed_items" not in fresh
    one = predict_cmd(run, tmp_path / "b" / "1.png", tmp_path / "one", threshold=0.0, quiet=True)
    assert next(r["wdm_score"] for r in fresh["rows"] if r["path"].endswith("1.png")) == \
        pytest.approx(one["rows"][0]["wdm_score"], rel=1e-5)


def test_predict_leaves_out_predict_outputs_only_and_scores_real_images_under_out(run, tmp_path, monkeypatch):
    """predict dropped every image whose path was under --out: `--data batch --out batch/day1` skipped day1's own
    images, `--data batch --out .` refused all ("choose an --out outside --data"), and an earlier predict's output
    folder inside --data had its overlays and masks scored as batch images. Now only predict outputs are left out
    (overlays/, maps/, .partial/ of this --out or of a folder holding an earlier predict's), with the count."""
    batch = tmp_path / "batch"
    imgs = sorted(str(_png(batch / day / f"{i}.png", 10 * k + i)) for k, day in enumerate(("day1", "day2"))
                  for i in range(2))
    res = predict_cmd(run, batch, batch / "day1", threshold=-1e9, save_maps=True, quiet=True)
    assert sorted(r["path"] for r in res["rows"]) == imgs   # day1's own images are scored
    with pytest.warns(UserWarning, match=r"image\(s\) in predict output folder\(s\) .*day1/(maps|overlays)"):
        again = predict_cmd(run, batch, batch / "day1", threshold=-1e9, save_maps=True, quiet=True)
    assert sorted(r["path"] for r in again["rows"]) == imgs   # its overlays and masks are not
    with pytest.warns(UserWarning, match=r"image\(s\) in predict output folder"):   # an earlier predict's outputs
        other = predict_cmd(run, batch, batch / "pred2", threshold=-1e9, quiet=True)
    assert sorted(r["path"] for r in other["rows"]) == imgs
    monkeypatch.chdir(batch)   # --out . with --data below it: outside --data, nothing to leave out
    here = predict_cmd(run, "day2", ".", overlays=False, quiet=True)
    assert sorted(r["path"] for r in here["rows"]) == imgs[2:]
    with pytest.raises(BadInputError, match="every image under --data is a predict output"):
        predict_cmd(run, batch / "day1" / "overlays", batch / "p3", quiet=True)


def test_predict_refuses_an_out_inside_a_labelled_data_set_or_the_runs_data(run, tmp_path, capsys):
    """predict writes images into --out (overlays/*_overlay.png, maps/*_mask.png), and `train`, `evaluate` and
    `calibrate` read every image of a labelled folder by its layout (only predict and `extract --batch` leave
    predict outputs out): `--data D/test --out D/test/pred` made the overlays test images of a defect label `pred`,
    and `--out D` of labels `overlays` and `maps`, scored silently by the next `evaluate --data D`. Such an --out,
    or one inside the run's own training data, is refused before anything is scored or written; a batch of
    unlabelled images may hold --out (predict leaves its outputs out), and --data may lie inside --out."""
    import shutil
    from uninet_feat.cli import main
    from uninet_feat.config import load_config as cfg_of
    lab = tmp_path / "lab"
    shutil.copytree(cfg_of(run / "config.yaml")["data"], lab)
    _png(lab / "test" / "pred" / "overlays" / "000_overlay.png")   # what such an --out held: a defect image now
    assert {s.label for s in discover(lab) if "overlays" in str(s.path)} == {"pred"}
    shutil.rmtree(lab / "test" / "pred")
    for data, out, said in ((lab / "test", lab / "test" / "pred", "lies inside the data set"),
                            (lab, lab, "is the data set"), (lab / "test", lab, "is the data set"),
                            (lab / "test" / "spot", cfg_of(run / "config.yaml")["data"] + "/pred",
                             f"{run} was trained on it")):
        capsys.readouterr()
        assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--threshold=-1e9",
                     "--quiet"]) == 2, (data, out)
        err = capsys.readouterr().err
        assert said in err and "would be read as images of that data set" in err and "_predict" in err, err
        assert not (Path(out) / "overlays").exists() and not (Path(out) / "predictions.csv").exists()
    with pytest.raises(BadInputError, match="--data is a labelled data set"):
        predict_cmd(run, lab / "test", lab / "test" / "good" / "p", quiet=True)
    batch = tmp_path / "o" / "batch"   # --data inside --out: the outputs lie beside the batch, not in it
    imgs = [_png(batch / f"{i}.png", i) for i in range(2)]
    res = predict_cmd(run, batch, tmp_path / "o", threshold=-1e9, quiet=True)
    assert sorted(r["path"] for r in res["rows"]) == sorted(map(str, imgs))
    res = predict_cmd(run, batch, batch / "p", threshold=-1e9, quiet=True)   # a plain batch: as before
    assert sorted(r["path"] for r in res["rows"]) == sorted(map(str, imgs))


def test_an_older_runs_relative_data_path_is_not_taken_for_where_predict_runs(tmp_path, monkeypatch):
    """A run saves its data folder absolute; an older one kept it as typed (`--data data`), relative to a folder
    no longer known. Resolved against predict's working folder it refused an --out that has nothing to do with the
    run's data (or missed the real one): such a path is not compared."""
    from uninet_feat.predict import _refuse_out_in_a_data_set
    batch = tmp_path / "data" / "batch"
    batch.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    _refuse_out_in_a_data_set(tmp_path / "data" / "out", batch, None, [], {"data": "data"}, tmp_path / "run")
    with pytest.raises(BadInputError, match="was trained on it"):
        _refuse_out_in_a_data_set(tmp_path / "data" / "out", batch, None, [], {"data": str(tmp_path / "data")},
                                  tmp_path / "run")


def test_a_binary_heads_confidence_is_the_probability_of_the_class_it_predicts(run, tmp_path):
    """`<head>_confidence` was p.max(): a binary head predicts by its own threshold, not 0.5, so a row predicted
    defect with P(defect) < 0.5 was given P(good) as the confidence of 'defect'. With every row predicted positive
    (threshold 0), then negative (threshold above 1), the two confidences of an image sum to 1."""
    from uninet_feat.downstream import train_head
    from uninet_feat.extract import Extractor
    from uninet_feat.featstore import head_columns
    ex = Extractor(run=run)
    names = head_columns(ex.vector_names)
    rng = np.random.default_rng(0)
    y = np.repeat(["good", "defect"], 20)
    X = rng.standard_normal((40, len(names))).astype(np.float32) + 3 * (y == "defect")[:, None]
    head = train_head(X, y, n_splits=2, seed=0, feature_names=names, n_jobs=1, params=dict(n_estimators=20)).head
    source = {**ex.source, "settings": {"image_size": ex.cfg["image_size"], "tile": None}}
    conf = {}
    for t in (0.0, 1.5):
        head.threshold = t
        head.save(tmp_path / "h", source=source)
        rows = predict_cmd(run, Path(load_config(run / "config.yaml")["data"]) / "test", tmp_path / "p",
                           heads=[tmp_path / "h"], overlays=False, quiet=True, threshold=0.0)["rows"]   # WDM's
        assert {r["h_prediction"] for r in rows} == {head.classes[1] if t == 0 else head.classes[0]}
        conf[t] = np.array([r["h_confidence"] for r in rows])
    assert (np.abs(conf[0.0] - 0.5) > 0.05).all()   # p.max() would give 0.5 + |p - 0.5| to both
    np.testing.assert_allclose(conf[0.0] + conf[1.5], 1, atol=1e-6)


def test_an_images_overlay_map_and_mask_share_one_name_when_names_collide(run, tmp_path):
    """`a/b.png` and `a__b.png` both give the name `a__b`: the overlays' names were chosen among the flagged images
    only and the maps' among all, so with only `a__b.png` flagged its overlay was `a__b_overlay.png` while its map
    was `a__b~<hash>.npy` and `a__b.npy` the other image's."""
    from uninet_feat.detector import Detector
    one, two = _png(tmp_path / "x" / "1.png", 1), _png(tmp_path / "x" / "2.png", 2)
    s1, s2 = (d.score for d in Detector(run).score([one, two], maps=False))
    hi, lo = (one, two) if s1 > s2 else (two, one)
    (tmp_path / "b" / "a").mkdir(parents=True)
    lo.rename(tmp_path / "b" / "a" / "b.png")
    hi.rename(tmp_path / "b" / "a__b.png")   # the one flagged: the second of the two in path order
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", threshold=(s1 + s2) / 2, quiet=True, save_maps=True,
                      pixel_threshold=0.5)
    rows = {Path(r["path"]).relative_to(tmp_path / "b").as_posix(): r for r in res["rows"]}
    assert rows["a__b.png"]["flagged"] and not rows["a/b.png"]["flagged"]
    stem = Path(rows["a__b.png"]["overlay"]).name.removesuffix("_overlay.png")
    assert Path(rows["a__b.png"]["map"]).name == f"{stem}.npy"
    assert Path(rows["a__b.png"]["defect_mask"]).name == f"{stem}_mask.png"
    assert Path(rows["a/b.png"]["map"]).name == "a__b.npy" and stem != "a__b"


def test_predicts_saved_mask_is_the_detectors_at_a_threshold_the_float16_map_rounds_across(run, tmp_path):
    """The saved mask thresholded the float16-rounded map while `Detector.mask` and the overlay's outline threshold
    the float32 map: a pixel between the two sides of the threshold was defect in one and not the other."""
    from uninet_feat.detector import Detector
    img = _png(tmp_path / "b" / "0.png", 5)
    m = Detector(run).score(img)[0].map.ravel()
    gap = m.astype(np.float16).astype(np.float32) - m   # float16 rounds these pixels up past a threshold between
    k = int(np.argmax(gap))
    assert gap[k] > 1e-5 * abs(m[k])   # far beyond the float32 noise of another batch
    t = float((m[k] + m[k].astype(np.float16).astype(np.float32)) / 2)
    res = predict_cmd(run, tmp_path / "b", tmp_path / "p", quiet=True, save_maps=True, pixel_threshold=t)
    saved = np.asarray(Image.open(res["rows"][0]["defect_mask"])) > 0
    np.testing.assert_array_equal(saved, Detector(run, pixel_threshold=t).score(img)[0].mask)
    assert not saved.ravel()[k]


def test_a_rerun_stopped_while_writing_maps_leaves_no_csv_or_summary_of_other_files(run, tmp_path, monkeypatch):
    """A re-run into a used --out deleted the old maps and overlays and wrote new maps before replacing
    predictions.csv and summary.json: a stop in between (a kill, a full disk) left the old ones naming files
    that were gone or held the new run's masks."""
    import uninet_feat.predict as P
    for i in range(3):
        _png(tmp_path / "b" / f"{i}.png", i)
    predict_cmd(run, tmp_path / "b", tmp_path / "p", quiet=True, save_maps=True, pixel_threshold=0.5,
                threshold=-1e9)
    real, n = P.atomic_write_bytes, []

    def full_disk(path, data):
        n.append(path)
        if len(n) == 2:
            raise OSError(28, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(P, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError):
        predict_cmd(run, tmp_path / "b", tmp_path / "p", quiet=True, save_maps=True, pixel_threshold=0.7)
    left = {p.name for p in (tmp_path / "p").iterdir()}
    assert not left & {"predictions.csv", "predictions.json", "summary.json"}, left
    assert len(list((tmp_path / "p" / "maps").glob("*_mask.png"))) == 1   # the new run's, stopped at its second


def test_a_missing_knn_index_or_ensemble_names_only_the_options_that_need_it(run, tmp_path):
    """`--heatmap knn` alone was told "--flag-by wdm / --heatmap knn need a kNN index", blaming the default
    --flag-by wdm; `--flag-by ensemble` alone likewise named --heatmap."""
    with pytest.raises(BadInputError, match=r"^--heatmap knn needs a kNN index") as e:
        predict_cmd(run, tmp_path, tmp_path / "p", heatmap="knn", quiet=True)
    assert "--flag-by" not in e.value.reason
    with pytest.raises(BadInputError, match=r"^--flag-by combined and --heatmap knn need a kNN index"):
        predict_cmd(run, tmp_path, tmp_path / "p", flag_by="combined", heatmap="knn", quiet=True)
    with pytest.raises(BadInputError, match=r"^--flag-by ensemble: an ensemble's .* need more runs") as e:
        predict_cmd(run, tmp_path, tmp_path / "p", flag_by="ensemble", quiet=True)
    assert "--heatmap" not in e.value.reason
    assert not (tmp_path / "p").exists()


def test_a_file_name_not_utf8_is_scored_and_a_reruns_results_survive_a_failure_to_name(run, tmp_path, monkeypatch):
    """Linux allows b"caf\\xe9.png": naming its overlay was a UnicodeEncodeError after all the scoring (even with
    --no-overlays), and a re-run had already deleted the last results in --out."""
    import os

    import uninet_feat.predict as pr
    d = tmp_path / "b"
    _png(d / "a.png", 1)
    odd = Path(os.fsdecode(os.fsencode(d) + b"/caf\xe9.png"))
    _png(odd, 2)
    res = predict_cmd(run, d, tmp_path / "p", threshold=-1e9, save_maps=True, quiet=True)
    over = {Path(r["path"]).name: Path(r["overlay"]) for r in res["rows"]}
    assert res["n_images"] == 2 and over[odd.name].is_file() and os.fsencode(over[odd.name].name) == b"caf\xe9_overlay.png"
    # a failure while naming (before any removal) leaves the finished run's results as they were
    before = (tmp_path / "p" / "predictions.csv").read_bytes()
    monkeypatch.setattr(pr, "_overlay_names", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        predict_cmd(run, d, tmp_path / "p", threshold=-1e9, quiet=True)
    assert (tmp_path / "p" / "predictions.csv").read_bytes() == before and (tmp_path / "p" / "summary.json").is_file()
