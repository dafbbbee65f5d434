"""images.py: every PIL mode decodes to float32 RGB in [0, 1]; every broken file is a BadInputError by name."""
import warnings

import numpy as np
import pytest
from PIL import Image

from uninet_feat.data import ImageDataset, Sample, check_image, load_image, load_mask
from uninet_feat.errors import BadInputError


def _save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def _check(a, h=8, w=12):
    assert a.shape == (h, w, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1


def test_grey_modes_repeat_to_three_channels(tmp_path):
    g = np.full((8, 12), 51, np.uint8)
    for mode in ("L", "LA"):
        img = Image.fromarray(g).convert(mode)
        if mode == "LA":
            img.putalpha(0)  # fully transparent: the grey value must survive (alpha dropped, not composited)
        a = load_image(_save(tmp_path, f"{mode}.png", img))
        _check(a)
        np.testing.assert_allclose(a, 0.2, atol=1e-6)


def test_rgba_alpha_dropped_not_composited(tmp_path):
    img = Image.new("RGBA", (12, 8), (255, 128, 0, 0))
    a = load_image(_save(tmp_path, "rgba.png", img))
    _check(a)
    np.testing.assert_allclose(a[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_rgb_values_exact(tmp_path, write_image):
    arr = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    a = load_image(write_image("rgb.png", array=arr))
    np.testing.assert_array_equal(a, arr.astype(np.float32) / 255)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (12, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.info["transparency"] = 1
    a = load_image(_save(tmp_path, "p.png", img, transparency=1))
    _check(a)
    np.testing.assert_allclose(a[3, 3], [10 / 255, 200 / 255, 30 / 255], atol=1e-6)


def test_cmyk(tmp_path):
    for name in ("c.tif", "c.jpg"):
        a = load_image(_save(tmp_path, name, Image.new("CMYK", (12, 8), (0, 0, 0, 0))))
        _check(a)
        assert a.min() > 0.95  # no ink = white


def test_one_bit(tmp_path):
    arr = np.zeros((8, 12), bool)
    arr[:, 6:] = True
    a = load_image(_save(tmp_path, "b.png", Image.fromarray(arr)))
    _check(a)
    assert a[0, 0, 0] == 0 and a[0, 11, 2] == 1


def test_16bit_png_scaled_by_full_range(tmp_path):
    arr = np.tile(np.array([0, 32768, 65535, 255], np.uint16), (8, 3))
    p = _save(tmp_path, "g16.png", Image.fromarray(arr))
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    a = load_image(p)
    _check(a)
    np.testing.assert_allclose(a[0, :4, 0], [0, 32768 / 65535, 1.0, 255 / 65535], rtol=1e-6)


def test_16bit_png_of_12bit_values_is_read_at_full_scale_with_a_note(tmp_path):
    """12-bit camera data in a 16-bit file reads 16x darker; it is still scaled by 65535 (a dark 16-bit image
    looks the same), and said once per process."""
    arr = np.tile(np.array([0, 1000, 4095, 2048], np.uint16), (8, 3))
    p = _save(tmp_path, "g12.png", Image.fromarray(arr))
    with pytest.warns(UserWarning, match=r"g12.png: a 16-bit image whose values stay below 4096 \(max 4095, 12 bits\)"):
        a = load_image(p)
    np.testing.assert_allclose(a[0, :4, 0], [0, 1000 / 65535, 4095 / 65535, 2048 / 65535], rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(p)                                        # once per process
        from uninet_feat.data import images
        images._FEW_BITS.clear()
        load_image(_save(tmp_path, "g16.png", Image.fromarray(np.full((8, 12), 5000, np.uint16))))   # uses 16 bits


def _png16(path, a):
    """A 16-bit RGB (or RGBA) PNG written by hand: PIL cannot write one."""
    import struct
    import zlib
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16bit_colour_is_read_at_8_bits_and_12bit_data_in_it_is_warned(tmp_path):
    """PIL reads 16-bit colour as each value's high byte: full-range data keeps its scale (8-bit precision);
    12-bit colour data in a 16-bit file keeps at most 16 levels and reads nearly black, which is said once."""
    from uninet_feat.data import images
    rng = np.random.default_rng(0)
    full = rng.integers(0, 65536, (8, 12, 3)).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # full-range 16-bit colour: no note
        a = load_image(_png16(tmp_path / "c16.png", full))
    np.testing.assert_array_equal(a, (full >> 8).astype(np.float32) / 255)
    images._FEW_BITS_COLOUR.clear()
    twelve = rng.integers(0, 4096, (8, 12, 3)).astype(np.uint16)
    with pytest.warns(UserWarning, match=r"c12.png: a 16-bit colour image whose values stay below 4096"):
        a = load_image(_png16(tmp_path / "c12.png", twelve))
    assert a.max() < 16 / 255 + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "c12.png")                     # once per process
        load_image(_save(tmp_path, "dark8.png", Image.fromarray((twelve >> 8).astype(np.uint8))))   # 8-bit: no note
    images._FEW_BITS_COLOUR.clear()
    eight = rng.integers(0, 256, (8, 12, 3)).astype(np.uint16)   # 8-bit data in a 16-bit file: read all black
    with pytest.warns(UserWarning, match=r"c8.png: a 16-bit colour image whose values stay below 4096 .*max 0 of"):
        assert load_image(_png16(tmp_path / "c8.png", eight)).max() == 0
    images._FEW_BITS_COLOUR.clear()


def test_16bit_data_in_a_32bit_tiff_is_read_at_its_containers_scale_with_a_note(tmp_path):
    """It read near black (max 1.5e-5) without a word: the note was for 16-bit containers only (session 52)."""
    tifffile = pytest.importorskip("tifffile")
    from uninet_feat.data import images
    images._FEW_BITS.clear()
    arr = np.tile(np.array([0, 1000, 65535], np.uint32), (8, 4))
    tifffile.imwrite(tmp_path / "u32.tif", arr)
    with pytest.warns(UserWarning, match=r"u32.tif: a 32-bit image whose values stay below 268435456 \(max 65535, "
                                         r"16 bits\): if it holds 16-bit camera data it is read 65536x darker"):
        a = load_image(tmp_path / "u32.tif")
    np.testing.assert_allclose(a[0, :3, 0], [0, 1000 / (2 ** 32 - 1), 65535 / (2 ** 32 - 1)], rtol=1e-6)
    images._FEW_BITS.clear()


def test_a_deep_tiff_stored_plane_by_plane_is_refused_not_read_as_noise(tmp_path):
    """PIL decodes each 16-bit plane of a PlanarConfiguration-2 TIFF (tifffile's default for a (3, H, W) array) as
    8-bit bytes: the image passed every check and trained as noise (an audit, session 52)."""
    tifffile = pytest.importorskip("tifffile")
    planes = (np.random.default_rng(2).random((3, 40, 60)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar16.tif", planes, planarconfig="separate")
    for read in (load_image, check_image, load_mask):
        with pytest.raises(BadInputError, match=r"planar16.tif: a 16-bit TIFF stored plane by plane") as e:
            read(tmp_path / "planar16.tif")
        assert "planarconfig='contig'" in e.value.fix
    tifffile.imwrite(tmp_path / "contig16.tif", np.moveaxis(planes, 0, 2), planarconfig="contig")
    np.testing.assert_array_equal(load_image(tmp_path / "contig16.tif"),
                                  (np.moveaxis(planes, 0, 2) >> 8).astype(np.float32) / 255)
    tifffile.imwrite(tmp_path / "planar8.tif", (planes >> 8).astype(np.uint8), planarconfig="separate")
    np.testing.assert_array_equal(load_image(tmp_path / "planar8.tif"),   # 8 bits a plane: PIL reads it right
                                  np.moveaxis(planes >> 8, 0, 2).astype(np.float32) / 255)


def test_32bit_int_tiff_scaled_by_tag(tmp_path):
    arr = np.tile(np.array([0, 2 ** 30, 2 ** 31 - 1], np.int32), (8, 4))
    a = load_image(_save(tmp_path, "i32.tif", Image.fromarray(arr)))
    _check(a)
    np.testing.assert_allclose(a[0, :3, 1], [0, 0.5, 1.0], rtol=1e-6)


def test_float_images(tmp_path):
    arr = np.full((8, 12), 0.25, np.float32)
    np.testing.assert_allclose(load_image(_save(tmp_path, "f.tif", Image.fromarray(arr))), 0.25)
    arr[2, 2] = np.nan
    with pytest.raises(BadInputError, match="NaN or Inf"):
        load_image(_save(tmp_path, "nan.tif", Image.fromarray(arr)))
    arr[2, 2] = np.inf
    with pytest.raises(BadInputError, match="NaN or Inf"):
        load_image(_save(tmp_path, "inf.tif", Image.fromarray(arr)))
    arr = np.linspace(0, 1000, 96, dtype=np.float32).reshape(8, 12)
    with pytest.warns(UserWarning, match="outside"):
        a = load_image(_save(tmp_path, "big.tif", Image.fromarray(arr)))
    assert a.min() == 0 and a.max() == 1


def _good_bytes(tmp_path, fmt):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = _save(tmp_path, f"full.{fmt}", Image.fromarray(arr))
    return p.read_bytes()


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_files(tmp_path, fmt):
    data = _good_bytes(tmp_path, fmt)
    p = tmp_path / f"cut.{fmt}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError) as e:
        load_image(p)
    assert "cut." in str(e.value) and e.value.path == str(p) and e.value.fix
    with pytest.raises(BadInputError):
        check_image(p)  # the cheap check catches it too


def _png_by_hand(path, a, rows=None, interlace=False, cut=None):
    """An 8-bit grey (H, W) or RGB (H, W, 3) PNG with right checksums: ``rows`` of it compressed (a stream that ends
    early), ``cut`` bytes of its compressed stream kept (one that stops mid-way), Adam7 ``interlace``."""
    import struct
    import zlib
    h, w = a.shape[:2]
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)) \
        if interlace else ((0, 0, 1, 1),)
    raw = b"".join(b"\x00" + row.tobytes() for x0, y0, dx, dy in passes
                   for row in a[y0::dy, x0::dx][:rows] if a[y0::dy, x0::dx].size)
    data = zlib.compress(raw)[:cut]

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2 if a.ndim == 3 else 0,
                                                                       0, 0, int(interlace)))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_png_whose_pixel_stream_stops_or_ends_early_is_refused_up_front(tmp_path):
    """Right checksums and an IEND, so verify() passed both: a stream that stops mid-way stopped training at its
    decode (even under --skip-bad), one that ends after half the rows decoded with no error, the rest black (an
    audit, session 52). Interlaced files and the real data's PNGs pass (1,485 of them, session 52)."""
    import zlib
    from uninet_feat.data.images import check_mask
    a = np.random.default_rng(3).integers(0, 256, (64, 48), dtype=np.uint8)
    whole = len(zlib.compress(b"".join(b"\x00" + r.tobytes() for r in a)))
    for name, kw, why in (("half_rows.png", {"rows": 32}, r"holds 1568 of the 3136 bytes its 48x64 header needs"),
                          ("stops.png", {"cut": whole // 2}, r"pixel data stops before its end")):
        p = _png_by_hand(tmp_path / name, a, **kw)
        for check in (check_image, check_mask):
            with pytest.raises(BadInputError, match=why):
                check(p)
    for shape in ((64, 48), (5, 3), (3, 5), (1, 1), (17, 9, 3)):
        b = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
        for interlace in (False, True):
            p = _png_by_hand(tmp_path / f"ok_{'x'.join(map(str, shape))}_{interlace}.png", b, interlace=interlace)
            assert check_image(p, min_side=1) == shape[:2]
            got = load_image(p, min_side=1)
            np.testing.assert_array_equal(got[..., 0] if b.ndim == 2 else got, b.astype(np.float32) / 255)
    for mode, kw in (("1", {}), ("P", {"bits": 4}), ("I;16", {}), ("LA", {}), ("RGBA", {})):
        img = Image.fromarray(a).convert("RGBA" if mode == "RGBA" else "LA" if mode == "LA" else "L")
        img = img.convert(mode) if mode in ("1", "P") else \
            Image.fromarray(a.astype(np.uint16) * 257) if mode == "I;16" else img
        img.save(tmp_path / f"m_{mode.replace(';', '')}.png", **kw)
        assert check_image(tmp_path / f"m_{mode.replace(';', '')}.png") == (64, 48), mode


def test_corrupt_png_body(tmp_path):
    data = bytearray(_good_bytes(tmp_path, "png"))
    data[200:260] = b"\x00" * 60  # damage compressed data, keep the header
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="bad.png"):
        load_image(p)
    with pytest.raises(BadInputError):
        check_image(p)


def test_zero_byte_non_image_missing(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.jpg").write_text("not an image at all")
    with pytest.raises(BadInputError, match="cannot decode"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(BadInputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_too_small(tmp_path, write_image):
    p = write_image("one.png", size=(1, 1))
    with pytest.raises(BadInputError, match="1x1 px"):
        load_image(p)
    with pytest.raises(BadInputError, match="minimum side"):
        check_image(p)
    assert load_image(write_image("four.png", size=(4, 6)), min_side=4).shape == (4, 6, 3)


def test_check_image_accepts_good_files(tmp_path, write_image):
    assert check_image(write_image("ok.png", size=(9, 20))) == (9, 20)
    assert check_image(write_image("ok.jpg", size=(9, 20))) == (9, 20)


def test_mask_binary_and_colour(tmp_path):
    arr = np.zeros((8, 12), np.uint8)
    arr[2:4, 3:5] = 255
    p = _save(tmp_path, "m.png", Image.fromarray(arr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a binary mask must not warn
        m = load_mask(p, size=(8, 12))
    assert m.dtype == np.bool_ and m.shape == (8, 12) and m.sum() == 4 and m[2, 3]
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[5, 5, 0] = 255  # red only
    assert load_mask(_save(tmp_path, "rgb.png", Image.fromarray(rgb))).sum() == 1


def test_mask_non_binary_warns_and_binarises(tmp_path):
    arr = np.zeros((8, 12), np.uint8)
    arr[1, 1], arr[2, 2] = 1, 255
    p = _save(tmp_path, "soft_mask.png", Image.fromarray(arr))
    with pytest.warns(UserWarning, match="soft_mask.png"):
        m = load_mask(p)
    assert m.sum() == 2 and m[1, 1]


def test_mask_wrong_size(tmp_path):
    p = _save(tmp_path, "m.png", Image.new("L", (10, 8)))
    with pytest.raises(BadInputError) as e:
        load_mask(p, size=(8, 12), image_path="img.jpg")
    msg = str(e.value)
    assert "10x8" in msg and "12x8" in msg and "img.jpg" in msg and "m.png" in msg and e.value.fix


def test_dataset_skip_bad(tmp_path, write_image):
    good = [write_image(f"g{i}.png", size=(16, 16)) for i in range(3)]
    data = good[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    samples = [Sample(p) for p in [good[0], tmp_path / "cut.png", good[1], tmp_path / "empty.jpg", good[2]]]
    with pytest.warns(UserWarning) as rec:
        ds = ImageDataset(samples, image_size=16, skip_bad=True)
    text = " ".join(str(r.message) for r in rec)
    assert "cut.png" in text and "empty.jpg" in text
    assert len(ds) == 3 and ds.kept == [0, 2, 4] and [i for i, _ in ds.skipped] == [1, 3]
    assert [ds[j]["index"] for j in range(3)] == [0, 2, 4]  # indices stay those of the list given
    with pytest.raises(BadInputError) as e:   # without skip_bad: both named at construction, in one error
        ImageDataset(samples, image_size=16)
    msg = str(e.value)
    assert msg.startswith("2 of 5 images are unreadable:") and "--skip-bad" in e.value.fix
    assert f"{tmp_path / 'cut.png'}: " in msg and f"{tmp_path / 'empty.jpg'}: file is empty" in msg


def test_dataset_names_every_unreadable_image_in_one_error(tmp_path, write_image):
    """Without skip_bad the up-front check collects every failure: a count of the whole, the first 20 by
    name with their reasons (a file's own fix beside it when it is not the usual one), then "and N more"."""
    good = [write_image(f"g{i}.png", size=(16, 16)) for i in range(3)]
    broken = []
    for i in range(23):
        broken.append(tmp_path / f"bad{i:02d}.png")
        broken[-1].write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    mask = write_image("m.png", size=(8, 8))
    samples = ([Sample(p) for p in good[:2]] + [Sample(tmp_path / "gone.png")] + [Sample(p) for p in broken]
               + [Sample(good[2], "defect", "spot", mask)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing is warned about: it is all in the error
        with pytest.raises(BadInputError) as e:
            ImageDataset(samples, image_size=16)
    lines = str(e.value).splitlines()
    assert lines[0] == "25 of 27 images cannot be used (24 unreadable, 1 with a mask that cannot be used):"
    assert lines[1] == f"  {tmp_path / 'gone.png'}: file not found (fix: check the path (and the CSV/folder it came " \
                       "from))"
    assert [ln.split(":")[0].strip() for ln in lines[2:21]] == [str(p) for p in broken[:19]]
    assert "corrupt image" in lines[2] and "(fix:" not in lines[2]   # the usual fix is said once, below
    assert lines[21] == "  and 5 more" and lines[22].startswith("(fix: re-export or remove them")
    assert "--skip-bad" in lines[22] and len(lines) == 23
    # the mask of the wrong size is among the 5 not named; with fewer files it is listed with its own fix
    with pytest.raises(BadInputError) as e:
        ImageDataset(samples[:2] + samples[-1:], image_size=16)
    assert "1 of 3 images has a mask that cannot be used" in str(e.value) and "m.png: mask is 8x8 px" in str(e.value)
    assert "(fix: resize the mask" in str(e.value)
    with pytest.warns(UserWarning):
        ds = ImageDataset(samples, image_size=16, skip_bad=True)
    assert ds.kept == [0, 1] and len(ds.skipped) == 25


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_a_mask_drawn_on_a_turned_images_stored_pixels_is_told_to_turn_not_resize(tmp_path):
    """The mask fits the JPEG's stored 96x48 pixels, the image reads upright 48x96: the error advised resizing the
    mask to 48x96, which squashes it (an audit, session 52). A mask of another size altogether still gets that fix."""
    p = _save(tmp_path, "phone.jpg", Image.fromarray(np.zeros((48, 96, 3), np.uint8)), exif=_exif(6), quality=95)
    stored = _save(tmp_path, "stored_mask.png", Image.fromarray(np.zeros((48, 96), np.uint8)))
    with pytest.raises(BadInputError, match=r"stored turned \(EXIF orientation 6\)") as e:
        load_mask(stored, size=(96, 48), image_path=p)
    assert "do not resize" in e.value.fix and "exif_transpose" in e.value.fix
    other = _save(tmp_path, "other_mask.png", Image.fromarray(np.zeros((40, 40), np.uint8)))
    with pytest.raises(BadInputError, match="resize the mask to 48x96"):
        load_mask(other, size=(96, 48), image_path=p)
    plain = _save(tmp_path, "plain.jpg", Image.fromarray(np.zeros((48, 96, 3), np.uint8)), quality=95)
    with pytest.raises(BadInputError, match="resize the mask to 96x48"):   # no tag: sizes swapped, but no turn
        load_mask(_save(tmp_path, "tall_mask.png", Image.fromarray(np.zeros((96, 48), np.uint8))), size=(48, 96),
                  image_path=plain)


def test_exif_orientation_applied_to_images_and_their_sizes(tmp_path):
    """A phone-style JPEG stored 96x48 with orientation 6 is shown 48x96 (turned 90 degrees clockwise): it is
    read that way, so a mask drawn on the displayed image fits it."""
    from uninet_feat.data.images import read_size
    from uninet_feat.report import _aspect
    stored = np.zeros((48, 96, 3), np.uint8)
    stored[:, :48] = 255                           # left half white → top half once turned clockwise
    p = _save(tmp_path, "phone.jpg", Image.fromarray(stored), exif=_exif(6), quality=95)
    a = load_image(p)
    assert a.shape == (96, 48, 3)
    assert a[:40].mean() > 0.9 and a[56:].mean() < 0.1
    assert read_size(p) == (96, 48) and check_image(p) == (96, 48) and _aspect(p) == 0.5
    drawn = np.zeros((96, 48), np.uint8)
    drawn[:10, :10] = 255
    m = _save(tmp_path, "phone_mask.png", Image.fromarray(drawn))
    assert load_mask(m, size=a.shape[:2]).sum() == 100
    it = ImageDataset([Sample(p, label="hole", mask=m)], image_size=32)[0]
    assert it["image"].shape == (3, 32, 32) and it["mask"][0, :3, :3].min() == 1 and it["mask"][0, 8:].max() == 0
    plain = _save(tmp_path, "plain.jpg", Image.fromarray(stored), quality=95)
    assert load_image(plain).shape == (48, 96, 3) and read_size(plain) == (48, 96)


def test_exif_orientation_on_a_mask_too(tmp_path):
    """A mask carries no EXIF as a rule and is used as stored; one that does carry the tag is turned too."""
    drawn = np.zeros((48, 96), np.uint8)
    drawn[:, :10] = 255                            # left strip → top strip once turned clockwise
    m = _save(tmp_path, "m.png", Image.fromarray(drawn), exif=_exif(6))
    got = load_mask(m, size=(96, 48))
    assert got[:10].all() and not got[10:].any()


def test_exif_orientation_of_a_png_is_read_without_decoding_it(tmp_path, monkeypatch):
    """PIL's PNG getexif() decodes the whole image when no eXIf chunk precedes the pixel data, so `read_size` (and
    the up-front `check_image`) decoded every PNG: 18 ms instead of 0.05 ms for a 1500 x 1500 one, "before decoding
    any" not kept. A PNG's orientation is read from before its pixel data, by `read_size` and `load_image` alike:
    a tagged PNG still reads upright at its upright size; one whose eXIf follows the pixel data too (found by its
    chunk headers, as PIL's decode found it before), by both."""
    from PIL import ImageFile, PngImagePlugin
    from uninet_feat.data.images import read_size
    yy, xx = np.mgrid[0:1500, 0:1000]
    stored = ((xx + 3 * yy) % 256).astype(np.uint8)
    stored[:, :100] = 255                          # left strip → top strip once turned clockwise
    plain = _save(tmp_path, "plain.png", Image.fromarray(stored))
    turned = _save(tmp_path, "turned.png", Image.fromarray(stored), exif=_exif(6))
    data = turned.read_bytes()   # the same file with its eXIf chunk moved after the pixel data
    at = data.index(b"eXIf") - 4
    chunk = data[at:at + 12 + int.from_bytes(data[at:at + 4], "big")]
    rest = data[:at] + data[at + len(chunk):]
    (tmp_path / "late.png").write_bytes(rest[:-12] + chunk + rest[-12:])
    decodes = []
    for cls in (ImageFile.ImageFile, PngImagePlugin.PngImageFile):
        monkeypatch.setattr(cls, "load", lambda self, *a, **k: decodes.append(self.filename))
    assert read_size(plain) == (1500, 1000) and read_size(turned) == (1000, 1500)
    assert check_image(plain) == (1500, 1000) and check_image(turned) == (1000, 1500)
    assert read_size(tmp_path / "late.png") == (1000, 1500)
    assert decodes == []
    monkeypatch.undo()
    up = load_image(turned)
    assert up.shape == (1000, 1500, 3) and up[:100].min() == 1.0 and up[100:].min() < 1.0
    assert np.array_equal(load_image(tmp_path / "late.png"), up)


def _turned(a: np.ndarray, turn: int) -> np.ndarray:
    """The stored pixels ``a`` as shown with EXIF orientation ``turn`` (3: half turn; 6: a quarter clockwise; 8:
    a quarter anticlockwise)."""
    return {3: np.rot90(a, 2), 6: np.rot90(a, -1), 8: np.rot90(a, 1)}[turn]


@pytest.mark.parametrize("mode, compression", [("RGB", "tiff_lzw"), ("RGB", None), ("L", None), ("L", "tiff_deflate"),
                                               ("I;16", None), ("I;16", "tiff_adobe_deflate"), ("RGBA", None)])
def test_exif_orientation_of_tiffs_as_pil_decodes_them(tmp_path, mode, compression):
    """PIL turns a TIFF upright as it decodes it, and gives its size upright before (PIL 11 on): `read_size` turned
    that size a second time (a quarter turn: the stored size), so a mask drawn on the upright picture was refused
    and a tiled set stopped mid-training ("header says ..."). An uncompressed L, I;16 or RGBA one came out of PIL's
    memory map scrambled. `read_size`, `load_image`, `load_mask` and `picture_8bit` now agree on the upright size
    and pixels, compressed or not, for a half turn and both quarter turns."""
    from uninet_feat.data.images import picture_8bit, read_size
    yy, xx = np.mgrid[0:40, 0:24]                  # stored 24 wide, 40 high
    rgb = np.stack([xx * 10 + 1, yy * 6, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)
    stored = {"RGB": rgb, "L": rgb[..., 0], "RGBA": np.dstack([rgb, 255 - rgb[..., :1]]),
              "I;16": (xx * 2500 + yy * 17 + 1).astype(np.uint16)}[mode].copy()
    stored[:10, :6] = 0                            # a corner of no defect, for the mask
    full = 65535.0 if mode == "I;16" else 255.0
    for turn in (3, 6, 8):
        p = _save(tmp_path, f"t{turn}.tif", Image.fromarray(stored), exif=_exif(turn),
                  **({"compression": compression} if compression else {}))
        up = _turned(stored, turn)
        h, w = up.shape[:2]
        want = up[..., :3] if up.ndim == 3 else np.repeat(up[..., None], 3, axis=2)
        assert read_size(p) == check_image(p) == (h, w), turn
        got = load_image(p)
        assert got.shape == (h, w, 3), turn
        np.testing.assert_array_equal(got, want.astype(np.float32) / np.float32(full), err_msg=str(turn))
        defect = (stored.reshape(40, 24, -1)[..., :3].max(axis=2) > 0)   # a binary mask in the same form
        tagged = np.where(defect, np.array(full, stored.dtype), np.array(0, stored.dtype))
        tagged = np.repeat(tagged[..., None], stored.shape[2], axis=2) if stored.ndim == 3 else tagged
        m = _save(tmp_path, f"t{turn}_m.tif", Image.fromarray(tagged), exif=_exif(turn),
                  **({"compression": compression} if compression else {}))
        np.testing.assert_array_equal(load_mask(m, size=(h, w)), _turned(defect, turn), err_msg=str(turn))
        eight = (want.astype(np.uint32) * 255 + 32767) // 65535 if mode == "I;16" else want
        for box in (None, (200, 200)):   # overlays; a report thumbnail (it fits the box: not resized)
            np.testing.assert_array_equal(np.asarray(picture_8bit(p, box)), eight, err_msg=f"{turn} {box}")
        drawn = np.zeros((h, w), np.uint8)   # a mask drawn on the upright picture fits it, tiled too
        drawn[:4, :4] = 255
        m = _save(tmp_path, f"t{turn}_mask.png", Image.fromarray(drawn))
        ds = ImageDataset([Sample(p, "test", "crack", m)], image_size=16, tile=16)
        assert ds[0]["mask"][0, :4, :4].min() == 1 and all(ds[j]["tile"][2] == 16 for j in range(len(ds)))


def test_a_picture_beside_its_image_is_refused_as_a_mask_not_taken_as_all_defect(tmp_path, capsys):
    """A camera that saves each frame as x.jpg and x.png: the PNG is x.jpg's "mask" by the beside rule, and was read
    as 100 % defect. A picture (non-zero almost everywhere, many values) is named by the commands that use masks,
    before their work, and left out with --skip-bad; a real mask with anti-aliased edges (many values, zero
    background) and one that covers the whole image are masks; an unsupervised run never looks (its training
    normals' masks are not used: it trained on such data before, and must still)."""
    from uninet_feat.cli import main
    from uninet_feat.data.images import picture_as_mask
    rng = np.random.default_rng(0)
    for kind, a in (("colour", rng.integers(1, 256, (40, 48, 3), dtype=np.uint8)),
                    ("grey", rng.integers(1, 256, (40, 48), dtype=np.uint8))):
        Image.fromarray(a).save(tmp_path / f"{kind}.png")
        why = picture_as_mask(tmp_path / f"{kind}.png")
        assert "a picture, not a defect mask: 100% of its pixels are non-zero" in why
    soft = np.zeros((40, 48), np.uint8)
    soft[5:30, 5:40] = np.linspace(1, 255, 35).astype(np.uint8)   # 35 values, but mostly background
    Image.fromarray(soft).save(tmp_path / "soft.png")
    Image.fromarray(np.full((40, 48), 255, np.uint8)).save(tmp_path / "all.png")
    assert picture_as_mask(tmp_path / "soft.png") is None and picture_as_mask(tmp_path / "all.png") is None
    data = tmp_path / "set"
    for lab, n in (("good", 8), ("stain", 2)):
        (data / lab).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(1, 256, (40, 48, 3), dtype=np.uint8)).save(data / lab / f"{i}.jpg")
    for p in [data / "stain" / "0.jpg"] + sorted((data / "good").glob("*.jpg")):   # the same frames, twice
        Image.open(p).save(p.with_suffix(".png"))
    from _tiny import register_tiny, tiny_train_args
    register_tiny()
    assert main(tiny_train_args(data) + ["--out", str(tmp_path / "run")]) == 0   # unsupervised: masks unused
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "images have a picture where their mask should be" in err and "stain/0.png (the mask of" in err
    assert "--skip-bad" in err
    with pytest.warns(UserWarning, match="skipping the mask .*0.png .*a picture"):
        assert main(["evaluate", "--run", str(tmp_path / "run"), "--skip-bad", "--json",
                     str(tmp_path / "m.json"), "--quiet"]) == 0
    # a supervised run reads its training defects' masks (its normals' it does not, since session 37): refused
    rows = ["path,split,label"] + [f"good/{i}.jpg,train,good" for i in range(8)] + ["stain/0.jpg,train,stain",
                                                                                    "stain/1.jpg,test,stain"]
    (tmp_path / "sup.csv").write_text("\n".join(rows) + "\n")
    assert main(tiny_train_args(data) + ["--split-csv", str(tmp_path / "sup.csv"), "--supervised", "--out",
                                         str(tmp_path / "sup")]) == 2
    err = capsys.readouterr().err
    assert "1 of 8 images have a picture where their mask should be" in err and "stain/0.png (the mask of" in err

def test_a_mask_with_a_transparency_colour_key_is_read_as_its_alpha_channel(tmp_path):
    """A defect painted on a transparent layer whose hidden colour is white: saved as RGBA it read 12 defect
    pixels (session 37), but a palette export's tRNS, or an L / RGB PNG's colour key, read the hidden white as
    defect everywhere (100 % defect, silently)."""
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[5:8, 5:9] = (255, 0, 0, 255)
    layer = Image.fromarray(rgba, "RGBA")
    pal = _save(tmp_path, "pal.png", layer.quantize(colors=2))   # what palette-optimising exports write
    assert Image.open(pal).mode == "P" and "transparency" in Image.open(pal).info
    grey = np.full((20, 30), 255, np.uint8)
    grey[5:8, 5:9] = 128
    key_l = _save(tmp_path, "key_l.png", Image.fromarray(grey), transparency=255)
    key_rgb = _save(tmp_path, "key_rgb.png", Image.fromarray(rgba[..., :3]), transparency=(255, 255, 255))
    for p in (_save(tmp_path, "rgba.png", layer), pal, key_l, key_rgb):
        m = load_mask(p)
        assert m.sum() == 12 and m[5:8, 5:9].all(), p.name
    opaque = _save(tmp_path, "opaque_key.png", Image.fromarray(grey), transparency=7)   # a key no pixel has
    assert load_mask(opaque).all()   # nothing transparent: the colours are the mask, as before


def test_the_non_binary_mask_log_is_bounded(tmp_path, monkeypatch):
    """Every load of a non-binary mask (each epoch loads them again) added its path: a list without bound."""
    from uninet_feat.data import images
    monkeypatch.setattr(images, "_NONBINARY_KEPT", 3)
    arr = np.zeros((8, 12), np.uint8)
    arr[1, 1], arr[2, 2] = 1, 255
    p = _save(tmp_path, "soft_mask.png", Image.fromarray(arr))
    with pytest.warns(UserWarning, match="soft_mask.png"):
        for _ in range(5):
            assert load_mask(p).sum() == 2
    assert images.nonbinary_masks() == [str(p)] * 3


def test_an_image_past_pils_pixel_limit_names_a_limit_a_command_can_raise(tmp_path, monkeypatch):
    """A 400 Mpx wafer frame was refused with "raise PIL.Image.MAX_IMAGE_PIXELS", which no command or config could
    do. The limit is now read from UNINET_MAX_IMAGE_PIXELS (a pixel count, or none), and the error names it."""
    from uninet_feat.data import images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # restored after the test
    p = tmp_path / "big.png"
    Image.new("L", (100, 60)).save(p)
    monkeypatch.setenv("UNINET_MAX_IMAGE_PIXELS", "2000")   # refused past twice the limit
    with pytest.raises(BadInputError, match=r"big.png: image too large for PIL's safety limit .*"
                                            r"UNINET_MAX_IMAGE_PIXELS=N \(pixels, or none\)"):
        images.load_image(p)
    monkeypatch.setenv("UNINET_MAX_IMAGE_PIXELS", "6000")
    assert images.load_image(p).shape[:2] == (60, 100)
    monkeypatch.setenv("UNINET_MAX_IMAGE_PIXELS", "none")
    assert images.load_image(p).shape[:2] == (60, 100) and Image.MAX_IMAGE_PIXELS is None
    monkeypatch.setenv("UNINET_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(BadInputError, match=r"UNINET_MAX_IMAGE_PIXELS='lots' is not a number of pixels"):
        images.load_image(p)
