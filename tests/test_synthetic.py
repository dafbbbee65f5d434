"""Procedural woven fabric: determinism, weave structure, defect masks, MVTec layout, atomic writes.

Small images (96-160 px) keep the file fast on a shared CPU.
"""
import csv
import hashlib
import os
import time

import numpy as np
import pytest
from PIL import Image

from uninet_feat.data import synthetic as syn
from uninet_feat.errors import BadInputError


def _ac(img, dy, dx):
    """Normalised autocorrelation of ``img`` at the lag (dy, dx)."""
    g = img.astype(float) - img.mean()
    h, w = g.shape
    a = g[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    b = g[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
    return float((a * b).mean() / g.var())


def _period(img, axis):
    """Dominant period (px) of the mean profile along ``axis`` (0: down the rows)."""
    prof = img.astype(float).mean(axis=1 - axis)
    spec = np.abs(np.fft.rfft(prof - prof.mean()))
    per = len(prof) / np.maximum(np.arange(len(spec)), 1e-9)
    spec[(per < 3) | (per > 32)] = 0
    return float(per[spec.argmax()])


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("color", [False, True])
def test_render_shape_dtype_determinism(color):
    a = syn.render_fabric((96, 128), "twill", np.random.default_rng(3), color=color)
    b = syn.render_fabric((96, 128), "twill", np.random.default_rng(3), color=color)
    c = syn.render_fabric((96, 128), "twill", np.random.default_rng(4), color=color)
    assert a.dtype == np.uint8 and a.shape == ((96, 128, 3) if color else (96, 128))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 20 < a.mean() < 235 and a.std() > 10  # neither blank nor saturated


def test_render_is_fast():
    prm = syn.fabric_params("plain", np.random.default_rng(0), 256)
    syn.render_fabric(256, "plain", np.random.default_rng(0), **prm)
    times = []
    for k in range(3):
        t = time.perf_counter()
        syn.render_fabric(256, "plain", np.random.default_rng(k), **prm)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.1  # ~15 ms on one free core; loose bound for a loaded shared machine


@pytest.mark.parametrize("weave", syn.WEAVES)
def test_weave_has_yarn_pitch_periodicity(weave):
    for seed in range(3):
        img = syn.render_fabric(160, weave, np.random.default_rng(seed), pitch=(8.0, 10.0))
        assert abs(_period(img, 0) - 8.0) < 0.8  # weft pitch, down the rows
        assert abs(_period(img, 1) - 10.0) < 0.8  # warp pitch, across the columns


def _peak(img, fy, fx):
    """Power at the spatial frequency (fy, fx) cycles/px (best of a 3x3 bin window) over the median power."""
    g = img.astype(float) - img.mean()
    power = np.abs(np.fft.fft2(g)) ** 2
    h, w = g.shape
    iy, ix = round(fy * h), round(fx * w)
    win = power[np.ix_([(iy + d) % h for d in (-1, 0, 1)], [(ix + d) % w for d in (-1, 0, 1)])]
    return win.max() / np.median(power)


def test_weaves_differ_in_interlacing():
    for seed in range(3):
        im = {w: syn.render_fabric(160, w, np.random.default_rng(seed), pitch=(8.0, 10.0), rotation=0)
              for w in syn.WEAVES}
        plain, twill, pat = im["plain"], im["twill"], im["patterned"]
        # plain: over/under alternates every thread, a checkerboard of warp and weft floats: strong spectral
        # peaks at half the yarn frequency on both diagonals, and diagonal neighbours alike
        peaks = _peak(plain, 1 / 16, 1 / 20), _peak(plain, 1 / 16, -1 / 20)
        assert min(peaks) > 1000 and 0.5 < peaks[0] / peaks[1] < 2
        assert _ac(plain, 8, 10) > _ac(plain, 0, 10) + 0.05
        # twill: floats line up along one diagonal only
        assert abs(_ac(twill, 8, 10) - _ac(twill, 8, -10)) > 0.15
        assert max(_ac(twill, 8, 10), _ac(twill, 8, -10)) > _ac(twill, 0, 10) + 0.1
        # patterned: a repeat of many threads, neither a two-thread period nor one diagonal
        assert _ac(pat, 0, 20) < _ac(pat, 0, 10) and _ac(pat, 8, 10) < _ac(pat, 0, 10) + 0.05


@pytest.mark.parametrize("kind", syn.DEFECTS)
def test_defect_mask_holds_every_changed_pixel_and_the_edit_is_visible_in_it(kind):
    for weave in syn.WEAVES:
        for seed in range(3):
            rng = np.random.default_rng([seed, 7])
            clean = syn.render_fabric(128, weave, rng, color=(seed == 2))
            img, mask = syn.add_defect(clean, kind, rng)
            assert img.shape == clean.shape and img.dtype == np.uint8 and mask.shape == (128, 128)
            assert mask.dtype == bool
            area = mask.mean()
            assert 0.0005 < area < 0.15, (weave, seed, area)
            diff = np.abs(img.astype(int) - clean.astype(int))
            diff = diff.max(-1) if diff.ndim == 3 else diff
            assert diff[~mask].max() == 0  # nothing outside the mask changes
            assert diff[mask].mean() > 8, (weave, seed, diff[mask].mean())  # visible inside it


def test_every_defect_fits_small_images():
    """A model input of 4-32 px (select: synthetic, denoise and map_levels: auto edit it): broken_yarn's gap could
    be longer than the image and its loose strand wander off it, and numpy raised "negative dimensions are not
    allowed" (about 1 draw in 3 at 4 px, 1 in 12 at 16-32 px)."""
    import warnings
    for h, w in ((1, 30), (2, 2), (4, 4), (5, 9), (8, 8), (12, 6), (16, 16), (20, 32), (32, 32), (32, 12)):
        for color in (False, True):
            clean = syn.render_fabric((max(h, 8), max(w, 8)), "plain", np.random.default_rng(h + w), color=color)
            clean = clean[:h, :w]
            for kind in syn.DEFECTS:
                for seed in range(25 if kind == "broken_yarn" else 6):
                    with warnings.catch_warnings():   # 1-2 px tall: an oil line's snap took the mean of no rows
                        warnings.simplefilter("error")
                        img, mask = syn.add_defect(clean, kind, np.random.default_rng(seed))
                    assert img.shape == clean.shape and img.dtype == np.uint8
                    assert mask.shape == (h, w) and mask.dtype == bool


def test_add_defect_deterministic_and_rejects_unknown_kind():
    clean = syn.render_fabric(96, "plain", np.random.default_rng(0))
    a = syn.add_defect(clean, "hole", np.random.default_rng(1))
    b = syn.add_defect(clean, "hole", np.random.default_rng(1))
    c = syn.add_defect(clean, "hole", np.random.default_rng(2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError):
        syn.add_defect(clean, "scratch", np.random.default_rng(0))
    with pytest.raises(ValueError):
        syn.render_fabric(64, "satin", np.random.default_rng(0))


def test_dataset_layout_and_manifest(tmp_path):
    n_def = len(syn.DEFECTS) + 1
    s = syn.make_fabric_dataset(tmp_path, n_train=3, n_test_good=2, n_test_defect=n_def, size=64, seed=0)
    assert s["n_images"] == 3 * (3 + 2 + n_def)
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "label", "mask", "group"]
    assert len(rows) == s["n_images"] and len({r["path"] for r in rows}) == len(rows)
    raw = (tmp_path / "manifest.csv").read_bytes()   # CSV lines end in \r\n, as every CSV the commands write
    assert raw.count(b"\r\n") == len(rows) + 1 == raw.count(b"\n")
    for weave in syn.WEAVES:
        assert len(list((tmp_path / weave / "train" / "good").glob("*.png"))) == 3
        assert len(list((tmp_path / weave / "test" / "good").glob("*.png"))) == 2
        defect_rows = [r for r in rows if r["group"] == weave and r["label"] != "good"]
        assert len(defect_rows) == n_def and {r["label"] for r in defect_rows} == set(syn.DEFECTS)
    for r in rows:
        img = np.asarray(Image.open(tmp_path / r["path"]))
        assert img.shape == (64, 64) and r["path"].startswith(f"{r['group']}/{r['split']}/{r['label']}/")
        if r["label"] == "good":
            assert r["mask"] == ""
        else:
            stem = r["path"].rsplit("/", 1)[1][:-4]
            assert r["mask"] == f"{r['group']}/ground_truth/{r['label']}/{stem}_mask.png"
            m = np.asarray(Image.open(tmp_path / r["mask"]))
            assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255} and m.any()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left no temp


def test_dataset_deterministic_per_seed(tmp_path):
    kw = dict(n_train=2, n_test_good=1, n_test_defect=2, size=48, weaves=("plain", "patterned"))
    syn.make_fabric_dataset(tmp_path / "a", seed=5, **kw)
    syn.make_fabric_dataset(tmp_path / "b", seed=5, **kw)
    syn.make_fabric_dataset(tmp_path / "c", seed=6, **kw)
    a, b, c = (_tree_digest(tmp_path / k) for k in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_one_weave_shares_structure_but_images_vary(tmp_path):
    syn.make_fabric_dataset(tmp_path, n_train=3, n_test_good=0, n_test_defect=0, size=160,
                            weaves=("twill",), seed=1)
    ims = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "twill" / "train" / "good").glob("*.png"))]
    assert not np.array_equal(ims[0], ims[1])
    periods = [(_period(im, 0), _period(im, 1)) for im in ims]
    assert np.ptp([p[0] for p in periods]) < 0.8 and np.ptp([p[1] for p in periods]) < 0.8


def test_atomic_write_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)   # the rename inside uninet_feat.io.atomic_write
    with pytest.raises(OSError):
        syn._write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.png"]


def test_cli_main_and_bad_layout(tmp_path, capsys):
    assert syn.main(["--out", str(tmp_path / "d"), "--n-train", "1", "--n-test-good", "1", "--n-test-defect", "1",
                     "--size", "32", "--weaves", "plain", "--seed", "0"]) == 0
    assert (tmp_path / "d" / "manifest.csv").is_file() and '"n_images": 3' in capsys.readouterr().out
    with pytest.raises(BadInputError):
        syn.make_fabric_dataset(tmp_path / "e", layout="folder")
    with pytest.raises(BadInputError):
        syn.make_fabric_dataset(tmp_path / "e", weaves=("satin",))
    assert not (tmp_path / "e").exists()


def test_the_data_set_refuses_sizes_too_small_and_the_module_says_so_in_one_line(tmp_path, capsys):
    """--size 0 was a ZeroDivisionError; at 8-16 px some defective test images were byte-identical to their clean
    image with an all-zero mask (a defect label on a normal image); the module's own command printed tracebacks."""
    for size in (0, -3, 8):
        with pytest.raises(BadInputError, match="too small"):
            syn.make_fabric_dataset(tmp_path / "d", n_train=1, n_test_good=1, n_test_defect=1, size=size)
    assert syn.main(["--out", str(tmp_path / "e"), "--size", "0"]) == 2
    assert syn.main(["--out", str(tmp_path / "e"), "--weaves", "satin"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err
    syn.make_fabric_dataset(tmp_path / "s", n_train=1, n_test_good=1, n_test_defect=21, size=16, seed=0)
    for m in (tmp_path / "s").glob("*/ground_truth/*/*_mask.png"):
        assert np.asarray(Image.open(m)).any(), m   # every defect image's mask marks something changed


def test_kind_set_names_are_trimmed():
    """" all" (a shell variable, a quoted YAML value) was refused as an unknown kind 'all'."""
    from uninet_feat.selection import parse_kinds
    assert parse_kinds(" all") == parse_kinds("all") and parse_kinds("fabric ") == syn.DEFECTS
