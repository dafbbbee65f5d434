"""Masks that are not the image: one that cannot be used costs only itself (and nothing where no mask is read), a
mask is never also an image, and an MVTec-style train/ image never takes a test image's mask."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from _tiny import register_tiny, tiny_train_args
from uninet_feat.cli import main
from uninet_feat.data import discover, discover_batch
from uninet_feat.errors import BadInputError


def _save(p, a):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(p)
    return p


def _normals_with_masks(root, bad: str, n=10, defects="test"):
    """``root/split.csv``: n 32-px normals (train, the last two val) with all-black masks, the ``bad`` one's 16 px
    (a mask that cannot be used), and two defects with masks in the split ``defects``."""
    rng = np.random.default_rng(0)
    rows = ["path,split,label,mask"]
    for i in range(n):
        _save(root / f"good/{i:02d}.png", (rng.random((32, 32)) * 255).astype(np.uint8))
        _save(root / f"good/{i:02d}_m.png", np.zeros((16, 16) if f"{i:02d}" == bad else (32, 32), np.uint8))
        rows.append(f"good/{i:02d}.png,{'train' if i < n - 2 else 'val'},good,good/{i:02d}_m.png")
    for i in range(2):
        _save(root / f"bad/{i}.png", (rng.random((32, 32)) * 255).astype(np.uint8))
        _save(root / f"bad/{i}_m.png", np.full((32, 32), 255, np.uint8))
        rows.append(f"bad/{i}.png,{defects},crack,bad/{i}_m.png")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root / "split.csv"


def _train(data, csv, out, *extra):
    return main(tiny_train_args(data) + ["--image-size", "32", "--split-csv", str(csv), "--out", str(out), *extra])


def test_an_unsupervised_run_reads_no_mask_of_its_normals(tmp_path):
    """A training normal's mask of the wrong size stopped an unsupervised train, which never reads it; with
    --skip-bad a validation normal with one was dropped as an image (one validation normal fewer, silently)."""
    register_tiny()
    csv = _normals_with_masks(tmp_path / "a", bad="00")   # a training normal's mask
    assert _train(tmp_path / "a", csv, tmp_path / "r1") == 0
    assert main(["calibrate", "--run", str(tmp_path / "r1"), "--quiet"]) == 0   # calibrate reads none either
    csv = _normals_with_masks(tmp_path / "b", bad="08")   # a validation normal's mask
    assert _train(tmp_path / "b", csv, tmp_path / "r2") == 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _train(tmp_path / "b", csv, tmp_path / "r3", "--skip-bad") == 0
    assert not [x for x in w if "skipping" in str(x.message)]   # not read, so nothing to skip
    cal = json.loads((tmp_path / "r3/calibration.json").read_text())
    assert cal["n_val_normals"] == 2 and cal["skipped"] == []
    assert sorted(cal["val_paths"]) == [str(tmp_path / "b/good/08.png"), str(tmp_path / "b/good/09.png")]


def test_a_supervised_run_reads_no_mask_of_its_validation_normals(tmp_path):
    """Only the training rows' masks are a supervised run's targets: a validation normal's mask that cannot be used
    stopped the run, and with --skip-bad cost the validation normal."""
    register_tiny()
    csv = _normals_with_masks(tmp_path, bad="08", defects="train")
    for out, extra in (("r1", []), ("r2", ["--skip-bad"])):
        assert _train(tmp_path, csv, tmp_path / out, "--supervised", *extra) == 0
        cal = json.loads((tmp_path / out / "calibration.json").read_text())
        assert cal["n_val_normals"] == 2 and cal.get("skipped", []) == []


@pytest.mark.parametrize("layout", ["plain", "mvtec"])
def test_masks_a_pattern_puts_beside_their_images_are_not_images_too(tmp_path, layout):
    """mask_pattern `{stem}_gt.png`: `_images` leaves out only `*_mask.*`, so each mask was read as an image too (a
    training normal, a test defect), silently."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    root = tmp_path / layout
    dirs = {"plain": ("good", "crack"), "mvtec": ("train/good", "test/crack")}[layout]
    for d, v in zip(dirs, (0, 255)):
        _save(root / d / "000.png", np.full((16, 16), 120, np.uint8))
        _save(root / d / "000_gt.png", np.full((16, 16), v, np.uint8))
    with pytest.warns(UserWarning, match=r"2 file\(s\) found as images are other images' masks \(e.g. .*_gt.png\)"):
        s = discover(root, mask_pattern="{stem}_gt.png")
    assert [(x.path.relative_to(root).as_posix(), x.mask.name) for x in s] == [
        (f"{d}/000.png", "000_gt.png") for d in sorted(dirs)]
    layouts._WARNED.clear()
    with pytest.warns(UserWarning, match=r"1 file\(s\) found as images are other images' masks"):
        batch = discover_batch(root / dirs[1], mask_pattern="{stem}_gt.png")   # predict: a batch of new images
    assert [x.path.name for x in batch] == ["000.png"]
    other = tmp_path / "other" / layout   # masks in a folder of their own: nothing left out, no word
    for d in dirs:
        _save(other / d / "000.png", np.full((16, 16), 120, np.uint8))
        _save(other / "masks" / d.split("/")[-1] / "000.png", np.zeros((16, 16), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = discover(other, mask_pattern="../../masks/{label}/{stem}.png" if layout == "mvtec" else
                     "../masks/{label}/{stem}.png")
    assert len(s) == 2 and all(x.mask is not None and x.mask.is_file() for x in s)


def test_mvtec_train_images_do_not_take_the_test_images_masks(tmp_path):
    """MVTec numbering restarts per folder: train/crack/000.png and test/crack/000.png (or train/good/000.png and
    test/good/000.png) both looked up ground_truth/<label>/000_mask.png, so the layout was refused as one mask for
    two images (its fix, mirroring subfolders, could not help), or a train image took a test image's mask."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    img = np.full((16, 16), 128, np.uint8)
    for d in ("train/good", "train/crack", "test/good", "test/crack"):
        _save(tmp_path / d / "000.png", img)
    _save(tmp_path / "ground_truth/crack/000_mask.png", np.full((16, 16), 255, np.uint8))
    _save(tmp_path / "ground_truth/good/000_mask.png", np.zeros((16, 16), np.uint8))

    def masks():
        return {x.path.relative_to(tmp_path).as_posix(): x.mask and x.mask.relative_to(tmp_path).as_posix()
                for x in discover(tmp_path)}
    assert masks() == {"test/crack/000.png": "ground_truth/crack/000_mask.png",
                       "test/good/000.png": "ground_truth/good/000_mask.png",
                       "train/crack/000.png": None, "train/good/000.png": None}
    _save(tmp_path / "ground_truth/train/crack/000_mask.png", np.full((16, 16), 255, np.uint8))   # the train one's
    assert masks()["train/crack/000.png"] == "ground_truth/train/crack/000_mask.png"
    (tmp_path / "ground_truth/train/crack/000_mask.png").unlink()
    _save(tmp_path / "train/crack/005.png", img)   # its mask where only test images' are looked for: said so
    _save(tmp_path / "ground_truth/crack/005_mask.png", np.full((16, 16), 255, np.uint8))
    layouts._WARNED.clear()
    with pytest.warns(UserWarning, match=r"1 file\(s\) match no image \(e.g. crack/005_mask.png\).*a train/ "
                                         r"image's in ground_truth/train/<label>/"):
        assert masks()["train/crack/005.png"] is None


@pytest.mark.parametrize("layout, folder", [
    (("train/good/a.png", "test/crack/c.png", "masks/crack/c_mask.png"), "masks"),
    (("train/good/a.png", "test/crack/c.png", "gt/crack/c_mask.png"), "gt"),
    (("good/a.png", "crack/c.png", "masks/crack/c_mask.png"), "masks"),
    (("fab0/good/a.png", "fab0/crack/c.png", "fab0/gt/crack/c_mask.png"), "fab0/gt"),
    (("fab0/good/a.png", "fab0/crack/c.png", "ground_truth/fab0/crack/c_mask.png"), "ground_truth"),
    (("good/a.png", "crack/c.png", "crack/mask/c.png"), "crack/mask"),
    (("cat/train/good/a.png", "cat/test/crack/c.png", "cat/masks/crack/c_mask.png"), "cat/masks"),
])
def test_masks_in_a_folder_nothing_reads_are_named(tmp_path, layout, folder):
    """Masks in masks/, mask/, gt/ (or a ground_truth/ where none is looked for: a group layout's root) were never
    read, and nothing said so: evaluate then left the pixel metrics out silently. Named, with where masks are read;
    a mask_pattern may read such a folder, so with one nothing is said."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    for f in layout:
        _save(tmp_path / f, np.full((16, 16), 255 if f == layout[-1] else 120, np.uint8))
    with pytest.warns(UserWarning, match=f"{tmp_path / folder}: its masks are not read: masks are read only from "
                                         r"ground_truth/<label>/ \(beside the label or split folders\), beside their "
                                         r"images \(<stem>_mask.png\), by mask_pattern, or from a CSV's mask column"):
        s = discover(tmp_path)
    assert len(s) == 2 and all(x.mask is None for x in s)
    layouts._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discover(tmp_path, mask_pattern="{stem}_gt.png")


def test_a_gif_mask_in_ground_truth_is_named_as_unmatched(tmp_path):
    """A .gif mask in ground_truth/ was neither used nor counted among the files that match no image."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    for f in ("train/good/a.png", "test/crack/c.png"):
        _save(tmp_path / f, np.full((16, 16), 120, np.uint8))
    _save(tmp_path / "ground_truth/crack/c_mask.gif", np.full((16, 16), 255, np.uint8))
    with pytest.warns(UserWarning, match=r"1 file\(s\) match no image \(e.g. crack/c_mask.gif\); 0 of 1 defect "
                                         r"images have a mask.*convert them to PNG"):
        s = discover(tmp_path)
    assert [(x.label, x.mask) for x in s] == [("crack", None), ("good", None)]


def test_a_csv_refuses_its_split_under_another_name_and_a_mask_listed_as_an_image(tmp_path):
    """Without a column named `split` the split is drawn by path hash: a CSV whose splits were under `set` had
    220 of magnetic tile's test normals trained on, silently. And a CSV listing a folder as `ls` gives it (x.jpg
    and its mask x.png) made each mask an image too, trained on or scored; folder layouts leave those out."""
    for n in ("a", "b", "c"):
        _save(tmp_path / f"{n}.jpg", np.full((16, 16), 120, np.uint8))
    _save(tmp_path / "b.png", np.zeros((16, 16), np.uint8))   # b.jpg's mask by the beside-the-image convention
    csv = tmp_path / "m.csv"
    csv.write_text("path,set,label\na.jpg,train,good\nb.jpg,test,good\nc.jpg,Test,crack\n")
    with pytest.raises(BadInputError, match=r"no `split` column, and its `set` column holds splits .* test images "
                                            r"trained on \(fix: name the `set` column `split`"):
        discover(tmp_path, split_csv=csv)
    csv.write_text("path,note,label\na.jpg,train,good\nb.jpg,scratched,good\nc.jpg,,crack\n")   # not splits
    assert [s.split for s in discover(tmp_path, split_csv=csv)] == ["", "", ""]   # drawn later, as before
    csv.write_text("path,split,label\na.jpg,train,good\nb.jpg,test,good\nb.png,test,good\nc.jpg,test,crack\n")
    with pytest.raises(BadInputError, match=r"line 4: b.png is the mask of line 3 \(b.jpg\): a mask is not an image"):
        discover(tmp_path, split_csv=csv)
    csv.write_text("path,split,label,mask\na.jpg,train,good,\nc.jpg,test,crack,b.png\nb.png,test,good,\n")
    with pytest.raises(BadInputError, match=r"line 4: b.png is the mask of line 3 \(c.jpg\)"):   # a mask column's
        discover(tmp_path, split_csv=csv)


def test_extract_and_calibrate_normals_take_the_runs_mask_pattern(tmp_path):
    """`extract --run` and `calibrate --normals DIR` discovered the data without the run's mask_pattern, so masks
    named by it (x_gt.png) were stored as defect images and calibrated on as normals."""
    register_tiny()
    data = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(8):
        _save(data / "good" / f"{i:03d}.png", rng.integers(90, 110, (32, 32), dtype=np.uint8))
    for i in range(2):
        a, m = rng.integers(90, 110, (32, 32), dtype=np.uint8), np.zeros((32, 32), np.uint8)
        a[8:16, 8:16], m[8:16, 8:16] = 255, 255
        _save(data / "crack" / f"{i:03d}.png", a)
        _save(data / "crack" / f"{i:03d}_gt.png", m)
    normals = tmp_path / "normals"
    for i in range(3):
        _save(normals / f"n{i}.png", rng.integers(90, 110, (32, 32), dtype=np.uint8))
        _save(normals / f"n{i}_gt.png", np.zeros((32, 32), np.uint8))
    (tmp_path / "cfg.yaml").write_text('mask_pattern: "{stem}_gt.png"\n')
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(tiny_train_args(data) + ["--image-size", "32", "--config", str(tmp_path / "cfg.yaml"),
                                             "--out", str(run)]) == 0
        assert main(["extract", "--data", str(data), "--run", str(run), "--out", str(tmp_path / "f"), "--quiet"]) == 0
        assert main(["calibrate", "--run", str(run), "--normals", str(normals), "--quiet"]) == 0
    items = json.loads((tmp_path / "f" / "manifest.json").read_text())["items"]
    assert len(items) == 10 and not [it for it in items if "_gt" in it["path"]]
    cal = json.loads((run / "calibration.json").read_text())
    assert sorted(p.rsplit("/", 1)[-1] for p in cal["val_paths"]) == ["n0.png", "n1.png", "n2.png"]


def test_supervised_training_keeps_thin_defects_that_a_nearest_resize_empties(tmp_path, monkeypatch):
    """A 1-px defect line on a 300-px image, trained at 64 px: nearest-exact kept no pixel of 6 of 8 such masks, so
    those labelled defects trained as normal images, their defect copied by the student (an audit, session 52).
    Training masks now mark a resized pixel defect when any pixel it covers is; evaluation keeps nearest-exact."""
    import numpy as np
    from PIL import Image
    from uninet_feat.data import ImageDataset, Sample
    img = np.full((300, 300, 3), 128, np.uint8)
    mask = np.zeros((300, 300), np.uint8)
    mask[:, 151] = 255   # column 151: between the columns nearest-exact keeps at 300 -> 64
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    s = [Sample(tmp_path / "x.png", label="scratch", mask=tmp_path / "x_mask.png")]
    assert ImageDataset(s, image_size=64)[0]["mask"].sum() == 0
    kept = ImageDataset(s, image_size=64, mask_resize="any")[0]["mask"]
    assert kept.sum() == 64 and set(np.unique(kept.numpy())) == {0.0, 1.0}
    assert kept[0, :, 32].sum() == 64   # the column the line's pixels fall into: 151 * 64 / 300 = 32.2
    seen = []
    import uninet_feat.train as train_mod
    real = train_mod.make_dataset
    monkeypatch.setattr(train_mod, "make_dataset", lambda *a, **k: seen.append(k.get("mask_resize")) or real(*a, **k))
    from uninet_feat.config import load_config
    from _tiny import register_tiny, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=2)
    base = {"backbone": "tiny", "weights": "random", "image_size": 32, "epochs": 1, "batch_size": 2,
            "channels_last": False}
    train_mod.train(load_config(None, {"data": str(data)}, base=base), tmp_path / "one", quiet=True)
    rows = ["path,split,label"] + [f"{p.relative_to(data)},train,good" for p in sorted((data / "train" / "good").glob("*.png"))] \
        + [f"{p.relative_to(data)},train,spot" for p in sorted((data / "test").glob("*/*.png")) if p.parent.name != "good"]
    (tmp_path / "sup.csv").write_text("\n".join(rows) + "\n")
    train_mod.train(load_config(None, {"data": str(data), "split_csv": str(tmp_path / "sup.csv"), "supervised": True},
                                base=base), tmp_path / "sup", quiet=True)
    assert seen[0] == "nearest" and seen[-1] == "any"
