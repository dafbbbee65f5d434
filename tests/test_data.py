"""layouts.py, tiling.py, dataset.py: sample discovery, tile/stitch round trips, dataset items."""
import numpy as np
import pytest
import torch
from PIL import Image

from uninet_feat.data import (ImageDataset, Sample, discover, extract_tiles, load_image, load_mask, select,
                              split_train_val, stitch, tile_grid)
from uninet_feat.errors import BadInputError


def _mask(p, size, box=None):
    arr = np.zeros(size, np.uint8)
    if box:
        y0, y1, x0, x1 = box
        arr[y0:y1, x0:x1] = 255
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(p)
    return p


def _mode(p):
    with Image.open(p) as im:
        return im.mode


# ---------------------------------------------------------------- layouts

def test_mvtec_layout(tmp_path, write_image):
    for i in range(3):
        write_image(f"train/good/{i:03d}.png")
    write_image("test/good/000.png")
    write_image("test/crack/000.png")
    write_image("test/crack/001.png")
    _mask(tmp_path / "ground_truth/crack/000_mask.png", (16, 24))
    s = discover(tmp_path)
    assert len(s) == 6 and [x.path for x in s] == sorted((x.path for x in s), key=str)
    assert sum(x.split == "train" for x in s) == 3
    cracks = select(s, split="test")
    assert [(x.label, x.is_normal) for x in cracks] == [("crack", False), ("crack", False), ("good", True)]
    assert cracks[0].mask == tmp_path / "ground_truth/crack/000_mask.png" and cracks[1].mask is None
    assert all(x.group == "" for x in s)


def test_mvtec_nested_categories(tmp_path, write_image):
    for cat in ("bottle", "cable"):
        write_image(f"{cat}/train/good/a.png")
        write_image(f"{cat}/test/bad/b.png")
    s = discover(tmp_path)
    assert {x.group for x in s} == {"bottle", "cable"} and len(s) == 4
    assert len(select(s, group="cable")) == 2 and len(select(s, split="train", group=["bottle", "x"])) == 1


def test_plain_layouts_and_masks_beside(tmp_path, write_image):
    write_image("good/a.jpg")
    write_image("scratch/b.jpg")
    _mask(tmp_path / "scratch/b.png", (16, 24))  # magnetic-tile style: mask beside the jpg
    write_image("hole/c.png")
    _mask(tmp_path / "hole/c_mask.png", (16, 24))
    s = discover(tmp_path)
    assert [(x.path.name, x.label, x.split, x.group) for x in s] == [
        ("a.jpg", "good", "", ""), ("c.png", "hole", "", ""), ("b.jpg", "scratch", "", "")]
    assert s[1].mask.name == "c_mask.png" and s[2].mask.name == "b.png" and s[0].mask is None


def test_plain_nested_groups_and_ground_truth_mirror(tmp_path, write_image):
    write_image("fab_0/good/a.png")
    write_image("fab_0/d01/b.png")
    write_image("fab_1/good/c.png")
    _mask(tmp_path / "fab_0/ground_truth/d01/b_mask.png", (16, 24))
    s = discover(tmp_path)
    assert [(x.group, x.label) for x in s] == [("fab_0", "d01"), ("fab_0", "good"), ("fab_1", "good")]
    assert s[0].mask == tmp_path / "fab_0/ground_truth/d01/b_mask.png"


def test_label_folders_are_read_recursively(tmp_path, write_image):
    """Subfolders of a label folder are storage (e.g. by date): their images keep the folder's label."""
    write_image("good/a.png")
    write_image("good/extra/b.png")
    write_image("good/extra/deeper/c.png")
    write_image("good/masks/a.png")            # a mask folder is never read as images
    write_image("hole/d.png")
    s = discover(tmp_path)
    assert [(x.path.relative_to(tmp_path).as_posix(), x.label, x.group) for x in s] == [
        ("good/a.png", "good", ""), ("good/extra/b.png", "good", ""), ("good/extra/deeper/c.png", "good", ""),
        ("hole/d.png", "hole", "")]


def test_dated_subfolders_under_label_folders_train(tmp_path, write_image):
    """ROOT/good/day1, ROOT/good/day2, ROOT/hole/day1: labels good and hole, not a group `good`."""
    from uninet_feat.config import load_config
    from uninet_feat.runs import load_samples, train_val_samples
    for i in range(6):
        write_image(f"good/day{1 + i % 2}/{i}.png")
    write_image("hole/day1/x.png")
    s = discover(tmp_path)
    assert {(x.label, x.group) for x in s} == {("good", ""), ("hole", "")} and len(s) == 7
    assert [x.label for x in s if x.path.parent.name == "day1"].count("hole") == 1
    cfg = load_config(None, {"data": str(tmp_path), "val_fraction": 0})
    fit, _ = train_val_samples(load_samples(cfg), cfg)
    assert fit and all(x.label == "good" for x in fit)


def test_groups_keep_their_label_folders_nested(tmp_path, write_image):
    write_image("fab_0/good/day1/a.png")
    write_image("fab_0/hole/b.png")
    write_image("fab_1/hole/day3/c.png")       # a group with defects only is still a group
    s = discover(tmp_path)
    assert [(x.group, x.label) for x in s] == [("fab_0", "good"), ("fab_0", "hole"), ("fab_1", "hole")]


def test_mixed_label_and_group_folders_refused(tmp_path, write_image):
    write_image("good/a.png")
    write_image("fab_0/good/b.png")
    with pytest.raises(BadInputError, match="fab_0 holds a `good` folder") as e:
        discover(tmp_path)
    assert "fix:" in str(e.value)


def test_unused_images_are_named_in_one_warning(tmp_path, write_image, recwarn):
    write_image("good/a.png")
    write_image("loose.png")
    s = discover(tmp_path)
    assert [x.path.name for x in s] == ["a.png"]
    msgs = [str(w.message) for w in recwarn.list]
    assert msgs == [f"{tmp_path}: 1 image(s) directly in this folder are not used "
                    "(move them into a label folder such as good/)"]
    discover(tmp_path)
    assert len(recwarn.list) == 1               # once per folder


def test_mvtec_nested_and_unused_folders(tmp_path, write_image, recwarn):
    write_image("train/good/day1/a.png")
    write_image("train/b.png")                 # loose in the split folder
    write_image("test/crack/c.png")
    write_image("extra/d.png")                 # beside the split folders
    _mask(tmp_path / "ground_truth/crack/c_mask.png", (16, 24))
    s = discover(tmp_path)
    assert [(x.path.name, x.split, x.label) for x in s] == [("c.png", "test", "crack"), ("a.png", "train", "good")]
    assert s[0].mask == tmp_path / "ground_truth/crack/c_mask.png"
    warned = sorted(str(w.message).split(":")[0] for w in recwarn.list)
    assert warned == [str(tmp_path / "extra"), str(tmp_path / "train")]


def test_mask_pattern_override(tmp_path, write_image):
    write_image("bad/x.png")
    _mask(tmp_path / "bad/x_mask.png", (16, 24))
    _mask(tmp_path / "masks/bad/x.gt.png", (16, 24))
    s = discover(tmp_path, mask_pattern="../masks/{label}/{stem}.gt.png")
    assert len(s) == 1 and s[0].mask.resolve() == (tmp_path / "masks/bad/x.gt.png").resolve()


def test_normal_labels():
    assert all(Sample("x", label=l).is_normal for l in ("good", "GOOD", "Normal", "ok", "Free"))
    assert not any(Sample("x", label=l).is_normal for l in ("crack", "not_good", "", "defect"))


def test_csv_layout(tmp_path, write_image):
    write_image("imgs/a.png")
    write_image("imgs/b.png")
    _mask(tmp_path / "gt/b.png", (16, 24))
    csv = tmp_path / "split.csv"
    csv.write_text("path,split,label,mask,fabric\nimgs/b.png,test,hole,gt/b.png,f1\nimgs/a.png,train,OK,,f0\n")
    s = discover(tmp_path, split_csv=csv)
    assert [(x.path.name, x.split, x.label, x.group, x.is_normal) for x in s] == [
        ("a.png", "train", "OK", "f0", True), ("b.png", "test", "hole", "f1", False)]
    assert s[0].mask is None and s[1].mask == tmp_path / "gt/b.png"


def test_csv_missing_file_names_line(tmp_path, write_image):
    write_image("a.png")
    csv = tmp_path / "m.csv"
    csv.write_text("path,split,label\na.png,train,good\ngone.png,test,good\n")
    with pytest.raises(BadInputError) as e:
        discover(tmp_path, split_csv=csv)
    assert "line 3" in str(e.value) and "gone.png" in str(e.value) and "m.csv" in str(e.value)
    csv.write_text("path,split,label\na.png,train,good\na.png,test,good\n")
    with pytest.raises(BadInputError, match="already listed on line 2"):
        discover(tmp_path, split_csv=csv)
    csv.write_text("file,label\na.png,good\n")
    with pytest.raises(BadInputError, match="lacks the `path` column"):
        discover(tmp_path, split_csv=csv)
    (tmp_path / "sub").mkdir()   # the same file spelled another way: one image in train and test
    csv.write_text("path,split,label\na.png,train,good\nsub/../a.png,test,good\n")
    with pytest.raises(BadInputError, match=r"line 3: sub/../a.png is the same file as line 2 \(a.png\)"):
        discover(tmp_path, split_csv=csv)
    csv.write_text("path,split,label\na.png,test,\n")   # an empty label made a normal image a defect
    with pytest.raises(BadInputError, match=r"line 2: a.png has no label .*`good` for normal images"):
        discover(tmp_path, split_csv=csv)


def test_a_symlink_to_a_folder_above_or_to_another_label_is_not_a_second_copy(tmp_path, write_image):
    """good/up -> .. would make crack/x.png a normal image too (training normal and test defect at once): not
    followed, with a warning; a symlink into another label's folder makes one file two samples: refused."""
    import os
    for i in range(3):
        write_image(f"good/{i}.png")
    write_image("crack/x.png")
    os.symlink("..", tmp_path / "good" / "up")
    with pytest.warns(UserWarning, match="a folder above it: not followed"):
        got = discover(tmp_path)
    assert sorted((s.path.relative_to(tmp_path).as_posix(), s.label) for s in got) == [
        ("crack/x.png", "crack"), ("good/0.png", "good"), ("good/1.png", "good"), ("good/2.png", "good")]
    os.unlink(tmp_path / "good" / "up")
    os.symlink(tmp_path / "crack", tmp_path / "good" / "more")
    with pytest.raises(BadInputError, match=r"crack/x.png and .*good/more/x.png are the same file"):
        discover(tmp_path)


def test_empty_folder(tmp_path, write_image):
    (tmp_path / "good").mkdir()
    with pytest.raises(BadInputError, match="no images found under .*expected layouts"):
        discover(tmp_path)
    write_image("loose.png")
    with pytest.raises(BadInputError, match="ROOT/good"):
        discover(tmp_path)
    with pytest.raises(BadInputError, match="not found"):
        discover(tmp_path / "nope")


def test_split_train_val(tmp_path):
    s = [Sample(tmp_path / f"{i:02d}.png", "train", "good") for i in range(20)]
    s += [Sample(tmp_path / "d.png", "train", "crack"), Sample(tmp_path / "t.png", "test", "good")]
    rest, val = split_train_val(s, 0.25, seed=3)
    assert len(val) == 5 and all(v.split == "train" and v.is_normal for v in val)
    assert len(rest) == 17 and not set(map(id, rest)) & set(map(id, val))
    assert [v.path for v in split_train_val(s, 0.25, seed=3)[1]] == [v.path for v in val]
    assert [v.path for v in split_train_val(s, 0.25, seed=4)[1]] != [v.path for v in val]
    assert split_train_val(s, 0.0, 0)[1] == [] and len(split_train_val(s[:2], 0.9, 0)[1]) == 1
    with pytest.raises(BadInputError):
        split_train_val(s, 1.0, 0)


def test_real_magnetic_tile_csv(shared_data):
    s = discover(shared_data, split_csv=shared_data / "splits/magnetic_tile.csv")
    assert len(s) == 1344
    assert sum(x.split == "train" and x.is_normal for x in s) == 678
    assert sum(x.split == "test" and x.is_normal for x in s) == 274
    defects = [x for x in s if not x.is_normal]
    assert len(defects) == 392 and all(x.mask is not None and x.split == "test" for x in defects)
    d = next(x for x in defects if x.path.name == "exp1_num_108719.jpg")
    with pytest.warns(UserWarning, match="exp1_num_108719.png: mask is not binary"):  # real masks are anti-aliased
        m = load_mask(d.mask, size=load_image(d.path).shape[:2])
    assert m.sum() == 122  # 98 pixels at 255 + 24 anti-aliased ones (values 1..254)
    it = ImageDataset([d], image_size=64)[0]  # second non-binary mask: counted, not warned again
    from uninet_feat.data.images import nonbinary_masks
    assert len(nonbinary_masks()) == 2
    assert it["image"].shape == (3, 64, 64) and it["label"] == 1 and 0 < it["mask"].sum() < 64 * 64


def test_real_aitex(shared_data):
    s = discover(shared_data, split_csv=shared_data / "splits/aitex.csv")
    assert sorted({x.group for x in s}) == ["fabric_00", "fabric_01", "fabric_03", "fabric_04"]
    assert len(s) == 141 and sum(x.split == "train" for x in s) == 57
    folders = discover(shared_data / "aitex")  # plain nested layout: same images, groups from folders
    assert [x.path for x in folders] == [x.path for x in s]
    assert [(x.group, x.label) for x in folders] == [(x.group, x.label) for x in s]
    la = next(x.path for x in s if _mode(x.path) == "LA")
    a = load_image(la)
    assert a.shape == (256, 4096, 3) and np.array_equal(a[..., 0], a[..., 2])
    ds = ImageDataset(s[:2], image_size=256, tile=256)
    assert len(ds) == 32 and [k for _, _, k in ds.tile_index] == list(range(16)) * 2
    assert ds[31]["tile"].tolist() == [0, 4096 - 256, 256, 256] and ds[31]["index"] == 1


# ---------------------------------------------------------------- tiling

@pytest.mark.parametrize("h,w,t,ov", [(37, 53, 16, 0), (37, 53, 16, 5), (64, 64, 16, 0), (16, 16, 16, 0),
                                      (5, 7, 16, 0), (5, 40, 16, 4), (300, 20, 32, 8)])
def test_tiling_round_trip(h, w, t, ov):
    g = tile_grid(h, w, t, ov)
    img = np.random.default_rng(h * w).random((h, w, 3), dtype=np.float32)
    tiles = extract_tiles(img, g)
    assert tiles.shape == (g.n, t, t, 3)
    cover = np.zeros((h, w), int)
    for y, x in g.origins:
        assert y + t <= max(h, t) and x + t <= max(w, t)  # never beyond the border unless padded
        cover[y:y + t, x:x + t] += 1
    assert cover.min() >= 1
    assert max(y for y, _ in g.origins) == max(0, h - t) and max(x for _, x in g.origins) == max(0, w - t)
    assert g.pad == (max(0, t - h), max(0, t - w))
    for reduce in ("mean", "max"):
        np.testing.assert_array_equal(stitch(tiles, g, reduce), img)
    np.testing.assert_array_equal(stitch(tiles[..., 1], g), img[..., 1])
    ttiles = extract_tiles(torch.from_numpy(img).permute(2, 0, 1), g)
    assert ttiles.shape == (g.n, 3, t, t)
    np.testing.assert_array_equal(ttiles.permute(0, 2, 3, 1).numpy(), tiles)


def test_tiling_padding_is_reflection():
    img = np.arange(5, dtype=np.float32)[:, None].repeat(3, 1)  # 5 x 3
    t = extract_tiles(img, tile_grid(5, 3, 8))[0]
    np.testing.assert_array_equal(t[:, 0], [0, 1, 2, 3, 4, 3, 2, 1])
    np.testing.assert_array_equal(t[0], [0, 0, 0, 0, 0, 0, 0, 0])


def test_strip_tiles_and_overlap_reduce():
    assert tile_grid(256, 4096, 256).n == 16 and tile_grid(4096, 256, 256).n == 16
    g = tile_grid(8, 12, 8, overlap=4)
    assert g.origins == [(0, 0), (0, 4)]
    maps = np.stack([np.full((8, 8), 1.0), np.full((8, 8), 3.0)])
    mean, mx = stitch(maps, g, "mean"), stitch(maps, g, "max")
    assert mean[0, 0] == 1 and mean[0, 6] == 2 and mean[0, 11] == 3
    assert mx[0, 0] == 1 and mx[0, 6] == 3
    with pytest.raises(BadInputError):
        tile_grid(10, 10, 8, overlap=8)
    with pytest.raises(ValueError):
        stitch(maps[:1], g)


# ---------------------------------------------------------------- dataset

def test_dataset_whole_images(tmp_path, write_image):
    a = write_image("good/a.png", array=np.full((20, 30, 3), 255, np.uint8))
    b = write_image("bad/b.png", size=(40, 24))
    _mask(tmp_path / "bad/b_mask.png", (40, 24), (0, 21, 0, 24))  # 21: not on a 2.5x cell edge
    s = discover(tmp_path)
    ds = ImageDataset(s, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert len(ds) == 2
    by_path = {str(x.path): i for i, x in enumerate(s)}
    it = ds[by_path[str(a)]]
    assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
    assert torch.allclose(it["image"], torch.ones(1))  # (1 - 0.5) / 0.5
    assert it["mask"].shape == (1, 16, 16) and it["mask"].sum() == 0 and it["label"] == 0
    assert it["tile"].tolist() == [0, 0, 20, 30]
    it = ds[by_path[str(b)]]
    assert it["label"] == 1 and it["index"] == by_path[str(b)] and it["tile"].tolist() == [0, 0, 40, 24]
    assert set(it["mask"].unique().tolist()) == {0.0, 1.0}
    assert it["mask"][0, :8].min() == 1 and it["mask"][0, 8:].max() == 0  # top half defect
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["tile"].shape == (2, 4)
    assert ImageDataset(s, image_size=(8, 12))[0]["image"].shape == (3, 8, 12)


def test_untiled_elongated_images_are_warned_about_with_the_tile_to_use(tmp_path, write_image):
    """A 4096x256 strip resized whole to the square input is squashed 16x; the warning names the file, the
    factor and the tile size that keeps native resolution, once per process for images of that size and input
    size (training and validation sets). Tiled, square or mildly oblong sets say nothing."""
    import warnings
    from uninet_feat.data import dataset
    dataset._SQUASH_WARNED.clear()
    strip = write_image("good/strip.png", size=(16, 256))        # (h, w): 16:1, like an AITEX strip
    write_image("good/oblong.png", size=(20, 40))                 # 2:1, as magnetic tiles are at most
    s = discover(tmp_path)
    with pytest.warns(UserWarning, match="resized out of shape") as rec:
        ImageDataset(s, image_size=16)
    (msg,) = [str(w.message) for w in rec if "out of shape" in str(w.message)]
    assert "1 of 2 images" in msg and str(strip) in msg and "squashed 16x" in msg and "--tile 16" in msg
    assert not _warned(lambda: ImageDataset(s[:1] if s[0].path == strip else s[1:], image_size=16))   # said once
    assert "squashed 4x" in next(str(w.message) for w in _warned(lambda: ImageDataset(s, image_size=(16, 64))))
    for quiet in (lambda: ImageDataset(s, image_size=16, tile=16),       # tiled: native resolution
                  lambda: ImageDataset([x for x in s if x.path == strip], image_size=(8, 128)),   # its own shape
                  lambda: ImageDataset([x for x in s if x.path != strip], image_size=16)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*resized out of shape")
            quiet()


def _warned(make):
    import warnings
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make()
    return [w for w in rec if "out of shape" in str(w.message)]


def test_dataset_tiles_stitch_back(tmp_path, write_image):
    p0 = write_image("good/strip.png", size=(20, 70))
    p1 = write_image("good/small.png", size=(10, 12))
    _mask(tmp_path / "good/strip_mask.png", (20, 70), (0, 20, 60, 70))
    s = [Sample(p0, "test", "good", tmp_path / "good/strip_mask.png"), Sample(p1, "test", "good")]
    ds = ImageDataset(s, image_size=16, tile=16, overlap=4, mean=(0, 0, 0), std=(1, 1, 1))
    g0, g1 = tile_grid(20, 70, 16, 4), tile_grid(10, 12, 16)
    assert len(ds) == g0.n + g1.n == len(ds.tile_index)
    assert [(i, k) for i, _, k in ds.tile_index] == [(0, k) for k in range(g0.n)] + [(1, 0)]
    per = {0: [], 1: []}
    masks = []
    for j in range(len(ds)):
        it = ds[j]
        i, g, k = ds.tile_index[j]
        assert it["index"] == i and it["tile"].tolist() == list(g.box(k))
        per[i].append(it["image"].permute(1, 2, 0).numpy())
        if i == 0:
            masks.append(it["mask"][0].numpy())
    for i, p in ((0, p0), (1, p1)):
        np.testing.assert_array_equal(stitch(np.stack(per[i]), ds.tile_index[[x[0] for x in ds.tile_index].index(i)][1]),
                                      load_image(p))
    m = stitch(np.stack(masks), g0)
    assert m[:, 60:].min() == 1 and m[:, :60].max() == 0
    resized = ImageDataset(s, image_size=8, tile=16)
    assert resized[0]["image"].shape == (3, 8, 8) and resized[0]["tile"].tolist() == [0, 0, 16, 16]


def test_the_training_image_cache_is_bounded_and_returns_the_same_items(tmp_path):
    """The cache kept every decoded training item (16·S² bytes each: 75 GB for 72,000 images at 256 px). Now it
    stops at its byte budget, warns once, and decodes the rest each time; every item equals the uncached one, and
    the all-zero masks of normal images are one tensor, not one each."""
    import torch
    from uninet_feat.config import load_config
    from uninet_feat.runs import CachedDataset, load_samples, make_dataset
    from _tiny import TinyBackbone, write_texture_set
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1, size=32)
    cfg = load_config(None, {"data": str(data), "image_size": 32})
    ds = make_dataset([s for s in load_samples(cfg) if s.split == "train"], cfg, TinyBackbone())
    one = sum(v.numel() * v.element_size() for v in ds[0].values() if torch.is_tensor(v)) - 4 * 32 * 32   # no mask
    cached = CachedDataset(ds, max_bytes=int(2.5 * one))
    with pytest.warns(UserWarning, match=r"2 of 6 are kept, the others are decoded again each epoch"):
        first = [cached[i] for i in range(len(ds))]
    assert len(cached.cache) == 2 and cached.nbytes <= cached.max_bytes
    for i in range(len(ds)):   # twice: from the cache or decoded again, the same values
        want = ds[i]
        for got in (first[i], cached[i]):
            assert all(torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k] for k in want)
    assert first[0]["mask"] is first[1]["mask"] and not first[0]["mask"].any()


def test_the_cache_budget_is_shared_by_the_processes_of_one_machine(monkeypatch):
    """Each torchrun process keeps its own cache: with 4 on a machine each took a quarter of the memory, all of
    it together (a review finding)."""
    from uninet_feat.runs import memory_budget
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one = memory_budget()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert memory_budget() == pytest.approx(one / 4, abs=1)


def test_a_csv_from_windows_excel_is_named_not_a_traceback(tmp_path, write_image):
    """A cp1252 CSV (Excel's plain "CSV") was a UnicodeDecodeError traceback; backslash paths were 'not found'
    with no word on the separator (a file-system audit)."""
    write_image("good/b.png")
    write_image("good/café.png")
    latin = tmp_path / "lat.csv"
    latin.write_bytes("path,split,label\r\ngood/b.png,train,good\r\ngood/café.png,train,good\r\n".encode("cp1252"))
    with pytest.raises(BadInputError, match=r"line 3 is not UTF-8 \(byte 0xe9\)") as e:
        discover(tmp_path, split_csv=latin)
    assert "CSV UTF-8" in e.value.fix
    utf8 = tmp_path / "u.csv"   # the same rows saved as UTF-8 read fine
    utf8.write_bytes(latin.read_bytes().decode("cp1252").encode("utf-8"))
    assert sorted(s.path.name for s in discover(tmp_path, split_csv=utf8)) == ["b.png", "café.png"]
    win = tmp_path / "win.csv"
    win.write_text("path,split,label\ngood\\b.png,train,good\n")
    with pytest.raises(BadInputError, match="not found") as e:
        discover(tmp_path, split_csv=win)
    assert "write them with `/`" in e.value.fix


def test_masks_with_upper_case_extensions_are_found(tmp_path, write_image):
    """K.PNG beside K.JPG and ground_truth/.../x_mask.PNG were not found (only lower-case .png was tried), so those
    defect images left the pixel metrics although their masks were there (a file-system audit)."""
    from uninet_feat.data import discover_batch
    write_image("train/good/a.png")
    write_image("test/good/b.png")
    for name in ("test/hole/K.JPG", "test/hole/x.png"):
        write_image(name)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "test" / "hole" / "K.PNG")
    (tmp_path / "ground_truth" / "hole").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "ground_truth" / "hole" / "x_mask.PNG")
    masks = {s.path.name: s.mask.name if s.mask else None for s in discover(tmp_path) if s.label == "hole"}
    assert masks == {"K.JPG": "K.PNG", "x.png": "x_mask.PNG"}
    batch = tmp_path / "batch"
    write_image("batch/p.JPG")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(batch / "p.PNG")
    with pytest.warns(UserWarning, match=r"\(p.PNG\) are taken for that image's mask"):
        assert [s.path.name for s in discover_batch(batch)] == ["p.JPG"]


def test_masks_are_found_past_a_symlink_loop_and_in_a_label_folder_of_another_case(tmp_path, write_image):
    """A looping symlink in ground_truth/crack/ made the case-insensitive lookup give up on the whole folder, and
    test/Crack beside ground_truth/crack found no mask: both reported "no mask, add their masks" (an MVTec audit)."""
    write_image("train/good/a.png")
    write_image("test/Crack/x.JPG")
    write_image("test/hole/y.png")
    _mask(tmp_path / "ground_truth/crack/x_mask.PNG", (16, 24))
    _mask(tmp_path / "ground_truth/hole/Y_MASK.png", (16, 24))
    gt = tmp_path / "ground_truth" / "hole"
    (gt / "loopA").symlink_to(gt / "loopB")
    (gt / "loopB").symlink_to(gt / "loopA")
    masks = {s.path.name: s.mask.name if s.mask else None for s in discover(tmp_path) if not s.is_normal}
    assert masks == {"x.JPG": "x_mask.PNG", "y.png": "Y_MASK.png"}


def test_mask_folders_are_looked_up_once_per_discovery_and_again_in_the_next(tmp_path, write_image, monkeypatch):
    """The case-insensitive lookup stat-ed ground_truth/<label> (and, when it is missing or named in another case,
    ground_truth/ itself) once per image: 10 % of discovering 12,000 images. Now once per folder in a discovery
    call, so twice the images stat those folders as often; and a new call looks again (a folder renamed between
    two calls is followed)."""
    import os
    from pathlib import Path
    from uninet_feat.data import discover_batch
    gt = tmp_path / "ground_truth"

    def add(images):
        for i in images:
            write_image(f"test/good/g{i}.png")
            write_image(f"test/crack/c{i}.png")
            _mask(gt / f"Crack/c{i}_mask.png", (16, 24))

    looked, real = [], os.stat

    def counting(p, *a, **k):
        if Path(p) == gt or Path(p).parent == gt:   # ground_truth/ and the label folders in it
            looked.append(Path(p).name)
        return real(p, *a, **k)

    def stats(find):
        looked.clear()
        monkeypatch.setattr(os, "stat", counting)
        try:
            samples = find(tmp_path)
        finally:
            monkeypatch.setattr(os, "stat", real)
        return len(looked), samples

    write_image("train/good/a.png")
    add(range(3))
    few, _ = stats(discover)
    add(range(3, 12))
    many, samples = stats(discover)
    assert {s.path.name: s.mask.name for s in samples if s.mask} == {f"c{i}.png": f"c{i}_mask.png" for i in range(12)}
    assert few == many and looked.count("crack") == 1, looked   # was 3 stats more per image here
    assert stats(discover_batch)[0] <= many and looked.count("crack") == 1
    (gt / "Crack").rename(gt / "CRACK")
    assert {s.mask.parent.name for s in discover(tmp_path) if s.mask} == {"CRACK"}


def test_masks_that_match_no_image_are_named(tmp_path, write_image):
    """Masks saved as .bmp (or named _gt.png, or in a label folder no test folder has) matched nothing, and with
    none matched the pixel metrics were left out without a word."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    write_image("train/good/a.png")
    write_image("test/crack/x.png")
    write_image("test/crack/z.png")
    _mask(tmp_path / "ground_truth/crack/z_mask.png", (16, 24))
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "ground_truth/crack/x_mask.bmp")
    _mask(tmp_path / "ground_truth/scratch/q_mask.png", (16, 24))
    with pytest.warns(UserWarning, match=r"2 file\(s\) match no image .*1 of 2 defect images have a mask") as w:
        s = discover(tmp_path)
    assert any("x_mask.bmp" in str(x.message) or "q_mask.png" in str(x.message) for x in w)
    assert [x.mask.name for x in s if x.mask] == ["z_mask.png"]
    layouts._WARNED.clear()
    _mask(tmp_path / "ground_truth/crack/x_mask.png", (16, 24))
    (tmp_path / "ground_truth/crack/x_mask.bmp").unlink()
    (tmp_path / "ground_truth/scratch/q_mask.png").unlink()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(x.mask is not None for x in discover(tmp_path)) == 2   # every mask used: no warning


def test_a_split_folder_given_as_data_is_named(tmp_path, write_image):
    """`--data category/train` was read as a label layout and re-split, its normals partly becoming a test set
    with no defect, with no word that the category folder was probably meant."""
    from uninet_feat.data import layouts
    layouts._WARNED.clear()
    write_image("cat/train/good/a.png")
    write_image("cat/train/good/b.png")
    write_image("cat/test/crack/c.png")
    with pytest.warns(UserWarning, match="one split folder of an MVTec-style category"):
        assert {s.split for s in discover(tmp_path / "cat" / "train")} == {""}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discover(tmp_path / "cat")


def test_an_unknown_group_names_the_groups_there(tmp_path, write_image):
    from uninet_feat.config import load_config
    from uninet_feat.runs import load_samples
    for cat in ("tile_a", "tile_b"):
        write_image(f"{cat}/train/good/a.png")
        write_image(f"{cat}/test/bad/b.png")
    with pytest.raises(BadInputError, match="groups here: tile_a, tile_b"):
        load_samples(load_config(None, {"data": str(tmp_path), "group": "tile_c"}))


def test_a_defect_painted_on_a_transparent_layer_is_the_mask_not_its_hidden_white(tmp_path):
    """An annotation tool's RGBA export: the defect opaque, the rest transparent white. Alpha was dropped, so the
    white read as 100 % defect. A constant alpha still leaves the colours as they are."""
    a = np.zeros((8, 10, 4), np.uint8)
    a[..., :3] = 255                      # hidden white everywhere
    a[2:4, 3:6, 3] = 255                  # the defect: the only opaque pixels
    Image.fromarray(a, "RGBA").save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png")
    assert m.sum() == 6 and m[2:4, 3:6].all()
    la = np.zeros((8, 10, 2), np.uint8)
    la[..., 0], la[5, 5, 1] = 200, 255     # grey + alpha, one opaque pixel
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert load_mask(tmp_path / "la.png").sum() == 1
    b = np.zeros((8, 10, 4), np.uint8)
    b[1:3, 1:3, 0], b[..., 3] = 255, 255   # fully opaque: the red square is the mask
    Image.fromarray(b, "RGBA").save(tmp_path / "o.png")
    assert load_mask(tmp_path / "o.png").sum() == 4
    # a black brush on a transparent layer read as an empty mask (its colours are all 0): its alpha is the mask
    k = np.zeros((8, 10, 4), np.uint8)
    k[2:4, 3:6, 3] = 255
    Image.fromarray(k, "RGBA").save(tmp_path / "k.png")
    assert load_mask(tmp_path / "k.png").sum() == 6 and load_mask(tmp_path / "k.png")[2:4, 3:6].all()
    Image.fromarray(k[..., 2:], "LA").save(tmp_path / "k_la.png")
    assert load_mask(tmp_path / "k_la.png").sum() == 6
    k[..., 3] = 255 - k[..., 3]   # an opaque black background with a transparent hole: no defect, as before
    Image.fromarray(k, "RGBA").save(tmp_path / "hole.png")
    assert not load_mask(tmp_path / "hole.png").any()
