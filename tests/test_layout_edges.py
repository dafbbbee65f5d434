"""layouts.py on folders as they arrive from other machines: Windows case, mask subfolders, a macOS zip's
__MACOSX, a dataset's own validation split, CSVs with stray commas or half-filled columns. Each case used to
change which images are train, test, normal or defect with no word, or ended in a traceback."""
import warnings

import numpy as np
import pytest
from PIL import Image

from uninet_feat.config import load_config
from uninet_feat.data import discover
from uninet_feat.errors import BadInputError
from uninet_feat.runs import assign_splits, train_val_samples


def _mask(p, size=(16, 24)):
    p.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size, np.uint8)
    arr[2:6, 3:9] = 255
    Image.fromarray(arr).save(p)
    return p


def _cfg(root, **kw):
    return load_config(None, {"data": str(root), **kw})


def test_capitalised_split_folders_keep_their_split(tmp_path, write_image):
    """Train/ and Test/ (Windows): read as the split they name, not as two groups whose normals a hash then
    re-splits (test normals went into training)."""
    for i in range(5):
        write_image(f"Train/good/{i}.png")
        write_image(f"Test/good/t{i}.png")
    write_image("Test/crack/c0.png")
    _mask(tmp_path / "Ground_Truth/crack/c0_mask.png")
    s = assign_splits(discover(tmp_path), tmp_path)
    assert {x.path.parent.parent.name: x.split for x in s} == {"Train": "train", "Test": "test"}
    assert {x.group for x in s} == {""}
    crack = next(x for x in s if x.label == "crack")
    assert crack.mask == tmp_path / "Ground_Truth/crack/c0_mask.png"


def test_masks_mirror_the_images_subfolders_and_one_mask_never_serves_two_images(tmp_path, write_image):
    for day in ("day1", "day2"):
        write_image(f"train/good/{day}/a.png")
        write_image(f"test/crack/{day}/0001.png")
        _mask(tmp_path / f"ground_truth/crack/{day}/0001_mask.png")
    s = [x for x in discover(tmp_path) if x.label == "crack"]
    assert [x.mask.relative_to(tmp_path).as_posix() for x in s] == [
        "ground_truth/crack/day1/0001_mask.png", "ground_truth/crack/day2/0001_mask.png"]
    flat = tmp_path / "flat"
    for day in ("day1", "day2"):
        write_image(f"flat/train/good/{day}/a.png")
        write_image(f"flat/test/crack/{day}/0001.png")
    _mask(flat / "ground_truth/crack/0001_mask.png")
    with pytest.raises(BadInputError, match=r"0001_mask.png was found as the mask of both .*day1/0001.png and "
                                            r".*day2/0001.png") as e:
        discover(flat)
    assert "ground_truth/<label>/<subfolder>/<stem>_mask.png" in str(e.value)


def test_a_mask_folder_inside_a_split_folder_is_not_a_defect_label(tmp_path, write_image):
    write_image("train/good/a.png")
    write_image("test/crack/c.png")
    _mask(tmp_path / "test/ground_truth/crack/c_mask.png")
    with pytest.warns(UserWarning, match="not read as images: a mask folder belongs beside test/"):
        s = discover(tmp_path)
    assert sorted(x.label for x in s) == ["crack", "good"]


def test_a_group_with_a_layout_one_level_down_is_refused(tmp_path, write_image):
    """lineA/good beside lineA/cam2/{good,crack}: cam2's normals would be test defects of label cam2."""
    write_image("lineA/good/a.png")
    write_image("lineA/cam2/good/b.png")
    write_image("lineA/cam2/crack/c.png")
    write_image("lineB/good/d.png")
    with pytest.raises(BadInputError, match="cam2 holds a `good` folder.*lineA/good makes .*lineA a group of label "
                                            "folders.*its `good` images defects"):
        discover(tmp_path)


def test_macos_zip_folders_and_case_of_a_same_named_mask(tmp_path, write_image):
    write_image("good/a.png")
    write_image("__MACOSX/good/._a.png")        # resource forks unzipped beside the data
    write_image("__MACOSX/good/b.png")
    write_image("crack/IMG1.jpg")
    _mask(tmp_path / "crack/img1.png")          # the magnetic-tile convention, in another case
    write_image("crack/x.png")
    _mask(tmp_path / "crack/x_mask.bmp")        # a mask in another lossless type
    s = discover(tmp_path)
    assert [(x.path.name, x.mask and x.mask.name) for x in s] == [
        ("IMG1.jpg", "img1.png"), ("x.png", "x_mask.bmp"), ("a.png", None)]


def test_a_plain_layouts_ground_truth_names_its_unmatched_masks(tmp_path, write_image):
    write_image("good/a.png")
    write_image("crack/x.png")
    _mask(tmp_path / "ground_truth/crack/x_gt.png")
    with pytest.warns(UserWarning, match=r"1 file\(s\) match no image \(e.g. crack/x_gt.png\); 0 of 1 defect"):
        discover(tmp_path)


def test_the_datas_own_validation_split_is_the_validation_set(tmp_path, write_image):
    """MVTec AD 2's validation/ (and CSV `val` rows) were read and then used nowhere; validation came from the
    training normals anyway."""
    for i in range(6):
        write_image(f"train/good/{i}.png")
    for i in range(3):
        write_image(f"validation/good/v{i}.png")
    write_image("validation/crack/vc.png")
    write_image("test/good/t.png")
    write_image("test/crack/c.png")
    samples = discover(tmp_path)
    with pytest.warns(UserWarning, match="1 defective validation image"):
        fit, val = train_val_samples(samples, _cfg(tmp_path))
    assert sorted(x.path.name for x in val) == ["v0.png", "v1.png", "v2.png"]
    assert sorted(x.path.name for x in fit) == [f"{i}.png" for i in range(6)]
    with pytest.warns(UserWarning, match="val_fraction is 0, so the data's 4 validation image"):
        fit, val = train_val_samples(samples, _cfg(tmp_path, val_fraction=0.0))
    assert val == [] and len(fit) == 6


def _csv(tmp_path, write_image, text, encoding="utf-8"):
    for name in ("a.png", "b.png", "c.png"):
        write_image(name)
    p = tmp_path / "split.csv"
    p.write_text(text, encoding=encoding)
    return p


def test_a_csv_row_with_more_fields_than_its_header_is_named(tmp_path, write_image):
    p = _csv(tmp_path, write_image, "path,split,label\na.png,train,good\nb.png,test,crack,\n")
    with pytest.raises(BadInputError, match=r"line 3 has 4 fields, the header 3") as e:
        discover(tmp_path, p)
    assert "quote a path that holds a comma" in str(e.value)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_separated_csv_is_read_as_its_header_separates(tmp_path, write_image, sep):
    """Excel in German or French locales saves "CSV" with semicolons: the header was one column named
    'path;split;label', and the error said the `path` column was missing."""
    rows = ["path,split,label", '"a;1.png",train,good', "b.png,train,good", "c.png,test,crack"]
    write_image("a;1.png")
    p = _csv(tmp_path, write_image, "\n".join(r.replace(",", sep) for r in rows) + "\n")
    got = {x.path.name: (x.split, x.label) for x in discover(tmp_path, p)}
    assert got == {"a;1.png": ("train", "good"), "b.png": ("train", "good"), "c.png": ("test", "crack")}
    p.write_text(p.read_text() + f"c.png{sep}test{sep}crack{sep}\n")
    with pytest.raises(BadInputError, match=r"line 5 has 4 fields") as e:
        discover(tmp_path, p)
    assert "semicolon" in str(e.value) if sep == ";" else "tab" in str(e.value)


def test_a_csv_row_with_a_label_but_no_path_is_named_not_dropped(tmp_path, write_image):
    p = _csv(tmp_path, write_image, "path,split,label\na.png,train,good\n,test,crack\n,,\nc.png,test,crack\n")
    with pytest.raises(BadInputError, match=r"line 3 has no path \(,test,crack\)"):
        discover(tmp_path, p)
    p.write_text("path,split,label\na.png,train,good\n,,\nc.png,test,crack\n")   # an empty row is no row
    assert [x.path.name for x in discover(tmp_path, p)] == ["a.png", "c.png"]


def test_a_csv_with_some_splits_left_blank_is_refused(tmp_path, write_image):
    p = _csv(tmp_path, write_image, "path,split,label\na.png,train,good\nb.png,,good\nc.png,test,crack\n")
    with pytest.raises(BadInputError, match=r"1 row\(s\) have no split \(lines 3\)"):
        discover(tmp_path, p)
    p.write_text("path,split,label\na.png,,good\nb.png,,good\nc.png,,crack\n")   # none given: a drawn split
    assert {x.split for x in discover(tmp_path, p)} == {""}


def test_a_utf16_csv_is_named_as_such(tmp_path, write_image):
    p = _csv(tmp_path, write_image, "path,split,label\na.png,train,good\n", encoding="utf-16")
    with pytest.raises(BadInputError, match="saved as UTF-16") as e:
        discover(tmp_path, p)
    assert "iconv -f utf-16" in str(e.value)


@pytest.mark.parametrize("pattern", ["{Stem}_mask.png", "{}_mask.png", "{stem:d}.png", "{stem"])
def test_a_mask_pattern_that_cannot_be_filled_is_refused_before_any_image(tmp_path, write_image, pattern):
    write_image("good/a.png")
    with pytest.raises(BadInputError, match="cannot be filled in") as e:
        discover(tmp_path, mask_pattern=pattern)
    assert "{stem} {name} {label} {group}" in str(e.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert discover(tmp_path, mask_pattern="../masks/{label}/{stem}.png")[0].mask is None


def test_a_csv_group_without_splits_beside_a_group_with_them_is_drawn_not_refused(tmp_path, write_image):
    """Blank splits are refused only within a group: group B left blank (to have its split drawn) beside group A
    with its own worked with --group A and --group B before, and without --group B's rows are drawn too."""
    from uninet_feat.runs import load_samples
    for name in "abcdefg":
        write_image(f"{name}.png")
    p = tmp_path / "g.csv"
    p.write_text("path,split,label,group\na.png,train,good,A\nb.png,train,good,A\nc.png,test,hole,A\n"
                 "d.png,,good,B\ne.png,,good,B\nf.png,,good,B\ng.png,,hole,B\n")
    a = load_samples(_cfg(tmp_path, split_csv=str(p), group="A"))
    assert [(x.path.name, x.split) for x in a] == [("a.png", "train"), ("b.png", "train"), ("c.png", "test")]
    b = load_samples(_cfg(tmp_path, split_csv=str(p), group="B"))
    both = load_samples(_cfg(tmp_path, split_csv=str(p)))
    assert all(x.split for x in both) and [x.split for x in both if x.group == "B"] == [x.split for x in b]
    assert next(x for x in b if x.label == "hole").split == "test"
    p.write_text("path,split,label,group\na.png,train,good,A\nb.png,,good,A\n")
    with pytest.raises(BadInputError, match=r"1 row\(s\) of group A have no split \(lines 3\)"):
        discover(tmp_path, p)


def test_masks_deduplicated_into_symlinks_to_one_file_are_each_images_own(tmp_path, write_image):
    """rdfind / jdupes turn identical all-black masks into links to one file: each image still has its own mask
    path, which is what the one-mask-per-image check compares."""
    write_image("train/good/a.png")
    _mask(tmp_path / "empty.png")
    for name in ("0", "1"):
        write_image(f"test/crack/{name}.png")
        (tmp_path / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"ground_truth/crack/{name}_mask.png").symlink_to(tmp_path / "empty.png")
    s = [x for x in discover(tmp_path) if x.label == "crack"]
    assert [x.mask.name for x in s] == ["0_mask.png", "1_mask.png"]


def test_a_group_without_its_own_validation_normals_draws_them_and_old_runs_keep_drawing(tmp_path, write_image):
    for cat in ("catA", "catB"):
        for i in range(10):
            write_image(f"{cat}/train/good/{i}.png")
        write_image(f"{cat}/test/crack/c.png")
    for i in range(3):
        write_image(f"catA/validation/good/v{i}.png")
    samples = discover(tmp_path)
    fit, val = train_val_samples(samples, _cfg(tmp_path))
    assert sorted(x.path.name for x in val if x.group == "catA") == ["v0.png", "v1.png", "v2.png"]
    assert len([x for x in val if x.group == "catB"]) == 1          # its drawn 10 % of its 10 training normals
    assert len(fit) == 20 - 1 and not {id(x) for x in fit} & {id(x) for x in val}
    old = {**_cfg(tmp_path), "val_split": None}   # a run's config from before the key: its drawn split
    fit_old, val_old = train_val_samples(samples, old)
    assert all(x.split == "train" for x in val_old) and len(val_old) == 2 and len(fit_old) == 18
    write_image("catB/validation/crack/vc.png")   # a validation split of defects only: warned, drawn instead
    from uninet_feat.runs import load_samples
    cfg_b = _cfg(tmp_path, group="catB")
    with pytest.warns(UserWarning, match="with none the validation normals are drawn"):
        _, val_b = train_val_samples(load_samples(cfg_b), cfg_b)
    assert len(val_b) == 1 and val_b[0].split == "train"


def test_a_predict_output_folder_inside_the_data_is_not_read_as_its_images(tmp_path, write_image):
    """`predict --data D/test/good --out D/test/good/pred` (a folder of unlabelled images: allowed) leaves
    overlays/ and maps/ there; the layout read `pred/overlays/x_overlay.png` as a test normal (a subfolder of good/),
    and a flat folder's `pred/` as a label folder, its overlays the only images. Left out, warned, as predict does;
    a folder named overlays/ that is not a predict's (no predictions.csv beside it) stays data."""
    for i in range(3):
        write_image(f"train/good/{i}.png")
        write_image(f"test/good/t{i}.png")
        write_image(f"test/good/overlays/o{i}.png")   # not a predict's: data
    out = tmp_path / "test/good/pred"
    write_image("test/good/pred/overlays/t0_overlay.png")
    write_image("test/good/pred/maps/t0_mask.png")
    (out / "predictions.csv").write_text("path\n")
    (out / "summary.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"2 image\(s\) in predict output folder"):   # the overlay and the mask
        s = discover(tmp_path)
    assert len(s) == 9 and not any("pred" in x.path.parts for x in s)
    with pytest.warns(UserWarning, match="predict output"), pytest.raises(BadInputError, match="no images found"):
        discover(tmp_path / "test/good/pred")   # only a predict's outputs: nothing to read by layout


def test_two_csv_rows_naming_one_mask_and_a_nul_in_a_path_are_named(tmp_path, write_image):
    """Folder layouts refused one mask for two images; a CSV accepted it (a copy-paste slip gives one image the
    other's defect pixels). A NUL in a path was a bare ValueError from os.path."""
    write_image("m.png", mode="L", array=np.zeros((16, 24), np.uint8))
    p = _csv(tmp_path, write_image, "path,split,label,mask\na.png,test,crack,m.png\nb.png,test,crack,m.png\n")
    with pytest.raises(BadInputError, match=r"line 3: m.png is already the mask of line 2 \(a.png\)"):
        discover(tmp_path, p)
    p.write_bytes(b"path,split,label\na.png\x00,train,good\n")
    with pytest.raises(BadInputError, match="line 2: a path holds a NUL character"):
        discover(tmp_path, p)


def test_an_image_named_like_a_mask_without_its_image_is_an_image(tmp_path, write_image):
    """Every `*_mask.*` was left out as a mask, with no image `x` beside it too: a product photo `gas_mask.jpg` was
    never trained on, and a batch holding only `face_mask.png` had "no images"."""
    from uninet_feat.data import discover_batch
    write_image("good/gas_mask.jpg")
    write_image("good/a.png")
    write_image("crack/c.png")
    _mask(tmp_path / "crack/C_MASK.png")   # beside its image c.png (any case): still c's mask, not an image
    s = discover(tmp_path)
    assert [(x.path.name, x.mask and x.mask.name) for x in s] == [
        ("c.png", "C_MASK.png"), ("a.png", None), ("gas_mask.jpg", None)]
    write_image("batch/face_mask.png")
    assert [x.path.name for x in discover_batch(tmp_path / "batch")] == ["face_mask.png"]


def test_a_csv_whose_found_masks_serve_two_images_is_refused(tmp_path, write_image):
    """Without a mask column, masks found by mask_pattern (or beside the image) were given to two images silently
    (`crack/day1/0001.png` and `day2/0001.png` both took `crack/masks/0001.png`); folder layouts refused it."""
    write_image("good/a.png")
    for day in ("day1", "day2"):
        write_image(f"crack/{day}/0001.png")
    _mask(tmp_path / "crack/masks/0001.png")
    p = tmp_path / "s.csv"
    p.write_text("path,split,label\ngood/a.png,train,good\ncrack/day1/0001.png,test,crack\n"
                 "crack/day2/0001.png,test,crack\n")
    with pytest.raises(BadInputError, match=r"line 4: .*0001.png was found as the mask of both crack/day1/0001.png "
                                            r"\(line 3\) and crack/day2/0001.png") as e:
        discover(tmp_path, p, mask_pattern="../masks/{stem}.png")
    assert "a `mask` column" in str(e.value)
    p.write_text("path,split,label\ngood/a.png,train,good\ncrack/day1/0001.png,test,crack\n")   # one image: fine
    assert discover(tmp_path, p, mask_pattern="../masks/{stem}.png")[0].mask.name == "0001.png"
    write_image("x.jpg")
    write_image("x.jpeg")
    _mask(tmp_path / "x.png")   # beside both: the default search found it for each
    p.write_text("path,split,label\nx.jpg,test,crack\nx.jpeg,test,crack\n")
    with pytest.raises(BadInputError, match=r"line 3: .*x.png was found as the mask of both x.jpg \(line 2\)"):
        discover(tmp_path, p)


def test_a_label_folder_by_its_loose_images_is_named_with_one(tmp_path, write_image):
    """fab0/good, fab0/crack and a stray fab0/loose.png: the error said fab0 made the layout one of labels (fab0
    named twice) and never why; it names loose.png and where to move it."""
    write_image("fab0/good/a.png")
    write_image("fab0/crack/c.png")
    write_image("fab0/loose.png")
    write_image("fab1/good/b.png")
    with pytest.raises(BadInputError, match=r"fab0 holds 1 image\(s\) directly \(e.g. loose.png\), so it counts as a "
                                            r"label folder") as e:
        discover(tmp_path)
    assert f"move them into {tmp_path / 'fab0'}/<label>/ (or remove them)" in str(e.value)
    (tmp_path / "fab0/loose.png").unlink()
    assert {(x.group, x.label) for x in discover(tmp_path)} == {("fab0", "good"), ("fab0", "crack"), ("fab1", "good")}


def test_loose_images_in_an_mvtec_category_folder_are_named(tmp_path, write_image):
    """bottle/extra.png beside bottle/train/ and bottle/test/ was dropped without a word."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    for cat in ("bottle", "cable"):
        write_image(f"{cat}/train/good/a.png")
        write_image(f"{cat}/test/crack/c.png")
    write_image("bottle/extra.png")
    with pytest.warns(UserWarning, match=r"bottle: 1 image\(s\) directly in this category folder are not used "
                                         r"\(move them into bottle/train/good/"):
        s = discover(tmp_path)
    assert len(s) == 4 and "extra.png" not in {x.path.name for x in s}


def test_each_group_draws_its_own_validation_share_and_older_runs_keep_one_draw(tmp_path, write_image):
    """val_split: group (new runs since session 49) draws val_fraction of each group's training normals; with one
    draw over all (data, drawn) a multi-class run left AITEX's fabric_00 2 of 17 validation strips. A one-group run
    draws what `data` drew, so one-class runs keep their split; a run recorded with data or drawn keeps its own."""
    from uninet_feat.data.layouts import split_train_val
    sizes = {"big": 40, "mid": 12, "small": 5}
    for cat, n in sizes.items():
        for i in range(n):
            write_image(f"{cat}/train/good/{i}.png")
        write_image(f"{cat}/test/crack/c.png")
    samples = discover(tmp_path)
    cfg = {**_cfg(tmp_path), "val_fraction": 0.25}
    assert cfg["val_split"] == "group"                      # the default of new runs
    fit, val = train_val_samples(samples, cfg)
    per = {g: sum(x.group == g for x in val) for g in sizes}
    assert per == {"big": 10, "mid": 3, "small": 1}          # round(0.25 n), at least one, at least one left to fit
    assert len(fit) + len(val) == sum(sizes.values()) and not {id(x) for x in fit} & {id(x) for x in val}
    assert all(x.split == "train" and x.is_normal for x in val)
    again = train_val_samples(discover(tmp_path), cfg)[1]     # seeded: the same images every time
    assert sorted(str(x.path) for x in again) == sorted(str(x.path) for x in val)
    for old in ("data", "drawn"):                          # one draw over all groups' normals, as those runs drew
        normals = [x for x in samples if x.split == "train" and x.is_normal]
        want = split_train_val(normals, 0.25, cfg["seed"])[1]
        got = train_val_samples(samples, {**cfg, "val_split": old})[1]
        assert sorted(str(x.path) for x in got) == sorted(str(x.path) for x in want)
        assert sum(x.group == "small" for x in got) != 1 or sum(x.group == "big" for x in got) != 10
    one = [x for x in samples if x.group == "mid"]           # a one-group run: the split `data` drew
    assert ({str(x.path) for x in train_val_samples(one, cfg)[1]}
            == {str(x.path) for x in train_val_samples(one, {**cfg, "val_split": "data"})[1]})


def test_a_group_whose_normals_all_drew_test_is_named_when_training_leaves_it_out(tmp_path, write_image, recwarn):
    """A group of few normals whose drawn split sent them all to test was left out of training without a word,
    and evaluate then scored its images with a model that never saw them (an audit, session 52)."""
    import hashlib
    from uninet_feat.cli import main
    from _tiny import register_tiny, tiny_train_args
    register_tiny()
    for g in ("lineA", "lineB"):
        for i in range(6):
            write_image(f"d/{g}/good/{i}.png", size=(32, 32))
        write_image(f"d/{g}/dent/0.png", size=(32, 32))
    drawn_test = [n for n in (f"c{i}.png" for i in range(200))
                  if int(hashlib.sha1(f"lineC/good/{n}".encode()).hexdigest()[:8], 16) % 5 == 0][:3]
    for n in drawn_test:
        write_image(f"d/lineC/good/{n}", size=(32, 32))
    write_image("d/lineC/dent/0.png", size=(32, 32))
    assert main(tiny_train_args(tmp_path / "d") + ["--image-size", "32", "--out", str(tmp_path / "run")]) == 0
    said = [str(w.message) for w in recwarn if "no training or validation normal" in str(w.message)]
    assert len(said) == 1 and "lineC (3 normal and 1 defective test images)" in said[0]
    assert "lineA" not in said[0] and "lineB" not in said[0]


def test_split_folders_inside_label_folders_give_the_split_without_unused_warnings(tmp_path, write_image):
    """good/train/, good/test/, hole/test/ (a split filed under each label): the MVTec probe warned that their
    images were not used, then the label layout used them all and drew the split by hash, sending some of the
    user's test normals into training (an audit, session 52). Runs trained before keep their drawn split."""
    from uninet_feat.runs import load_samples
    for i in range(8):
        write_image(f"d/good/train/{i}.png")
    for i in range(3):
        write_image(f"d/good/Test/{i}.png")
        write_image(f"d/hole/test/{i}.png")
    write_image("d/good/day1/x.png")   # no split folder: drawn as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # not one "not used" warning
        got = {x.path.relative_to(tmp_path / "d").as_posix(): (x.split, x.label)
               for x in load_samples(_cfg(tmp_path / "d"))}
    assert {k: v for k, v in got.items() if "day1" not in k} == \
        {**{f"good/train/{i}.png": ("train", "good") for i in range(8)},
         **{f"good/Test/{i}.png": ("test", "good") for i in range(3)},
         **{f"hole/test/{i}.png": ("test", "hole") for i in range(3)}}
    assert got["good/day1/x.png"][0] in ("train", "test")
    old = {"data": str(tmp_path / "d"), "split_hash": "relative"}   # a run config from before the key
    from uninet_feat.data.layouts import Sample
    was = load_samples(old)
    redrawn = assign_splits([Sample(x.path, "", x.label) for x in was], root=tmp_path / "d")
    assert [x.split for x in was] == [x.split for x in redrawn]   # every split drawn, as that run drew it
    assert {x.path.relative_to(tmp_path / "d").as_posix(): x.split for x in was} != {k: v[0] for k, v in got.items()}



def test_split_folders_under_label_folders_with_date_folders_below_keep_labels_and_splits(tmp_path, write_image):
    """good/train/2024-01-01/ (a split filed under each label, a folder per day below it): the MVTec probe read
    `good` and `hole` as categories and each date as a label, so every image was a defect of label "2024-01-01"
    and the label folders were groups (found in session 53). A normal-named folder makes ROOT a layout of labels."""
    from uninet_feat.runs import load_samples
    for day in ("2024-01-01", "2024-01-02"):
        for i in range(2):
            write_image(f"d/good/train/{day}/{i}.png")
            write_image(f"d/good/test/{day}/{i}.png")
            write_image(f"d/hole/test/{day}/{i}.png")
    got = {(x.split, x.label, x.group) for x in load_samples(_cfg(tmp_path / "d"))}
    assert got == {("train", "good", ""), ("test", "good", ""), ("test", "hole", "")}
    for i in range(2):   # a true MVTec layout of categories is still read as one
        write_image(f"m/bottle/train/good/{i}.png")
        write_image(f"m/bottle/test/crack/{i}.png")
    got = {(x.split, x.label, x.group) for x in load_samples(_cfg(tmp_path / "m"))}
    assert got == {("train", "good", "bottle"), ("test", "crack", "bottle")}

def test_a_list_of_groups_refuses_a_name_it_does_not_find_and_scores_each_of_its_own(tmp_path, write_image):
    """`group: [fabA, fabBB]` (a typo) trained on fabA alone without a word; and a run of `group: [fabA, fabB]`
    refused `evaluate/predict --group fabA`, comparing 'fabA' with the list's text (an audit, session 52)."""
    from uninet_feat.runs import load_samples, ready_to_score
    for g in ("fabA", "fabB"):
        for i in range(3):
            write_image(f"d/{g}/good/{i}.png")
    with pytest.raises(BadInputError, match=r"no images in group\(s\) \['fabBB'\]; groups here: fabA, fabB"):
        load_samples(_cfg(tmp_path / "d", group=["fabA", "fabBB"]))
    assert {s.group for s in load_samples(_cfg(tmp_path / "d", group=["fabA", "fabB"]))} == {"fabA", "fabB"}

    class Model:   # what ready_to_score reads of a model here
        cfg: dict = {}
    for own in (["fabA", "fabB"], ["fabA"], "fabA"):
        assert ready_to_score(Model(), {"group": own}, "fabA", threads=False) is not None
    with pytest.raises(BadInputError, match="trained on group"):
        ready_to_score(Model(), {"group": ["fabA", "fabB"]}, "fabC", threads=False)
