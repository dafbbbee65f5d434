"""Decoding any image or mask file into one predictable array, or a `BadInputError` that says why not.

Inspection data arrives in every PIL mode (grey strips saved as ``LA``, palette PNGs, 16-bit camera
frames, CMYK JPEGs) and sometimes broken. Everything downstream assumes float32 RGB in [0, 1], so
the whole zoo is funnelled here, and a bad file fails *here*, by name, instead of as a shape error
deep inside a training epoch.

Rules (why):
- PIL must fully decode (``.load()``); truncated files are errors. ``ImageFile.LOAD_TRUNCATED_IMAGES``
  is never set: a half-grey image silently trained on as "normal" is worse than a crash.
- Alpha is dropped, not composited: the colour under a transparent pixel is still the captured one.
- Integer data is scaled by its container's full range (``/65535`` for 16-bit), not by its max,
  so an image's brightness does not depend on its content.
- EXIF orientation is applied, to images and masks alike: cameras store portrait JPEGs sideways with a tag,
  viewers show them upright, and masks are drawn on what the viewer shows. A mask (PNG) without the tag is used
  as stored. Sizes from the header (`read_size`) follow it too, the same turn (`_decode`: PIL turns a TIFF
  itself as it decodes it, and reports its size upright before).
- 16-bit *RGB* PNGs and TIFFs are reduced to 8 bits by PIL itself (it has no 16-bit RGB mode: each value's
  high byte / 255); the values stay correctly scaled, only precision is lost. 8- or 12-bit data in such a file
  keeps at most 16 levels and reads nearly black: warned (`few_bits_colour_note`).
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadInputError

MIN_SIDE = 8  # smaller images cannot feed a backbone with stride 8+, and are usually thumbnails/mistakes
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_FIX = ("re-export or remove the file (or pass --skip-bad, skip_bad=True in the library, to skip unreadable "
        "images)")


PIXEL_LIMIT_ENV = "UNINET_MAX_IMAGE_PIXELS"


def _apply_pixel_limit() -> None:
    """PIL's decompression-bomb limit (about 179 Mpx; refused past twice that) from ``UNINET_MAX_IMAGE_PIXELS``
    when it is set: a number of pixels, or ``none`` for no limit. Why: a wafer or line-scan frame of 400 Mpx, which
    a tiled run can score, was refused with a fix ("raise PIL.Image.MAX_IMAGE_PIXELS") no command could apply."""
    value = os.environ.get(PIXEL_LIMIT_ENV)
    if value is None:
        return
    v = value.strip().lower()
    if v in ("none", "0"):
        Image.MAX_IMAGE_PIXELS = None
        return
    try:
        n = int(float(v))
    except ValueError:
        n = -1
    if n < 1:
        raise BadInputError(f"{PIXEL_LIMIT_ENV}={value!r} is not a number of pixels",
                            fix=f"e.g. {PIXEL_LIMIT_ENV}=500000000 (500 Mpx), or none for no limit")
    Image.MAX_IMAGE_PIXELS = n


def _open(path, decode: bool = True) -> Image.Image:
    """Open (and by default fully decode) ``path``; every failure becomes a BadInputError."""
    _apply_pixel_limit()
    p = Path(path)
    if not p.is_file():
        raise BadInputError("file not found" if not p.exists() else "not a file", path=p,
                            fix="check the path (and the CSV/folder it came from)")
    if p.stat().st_size == 0:
        raise BadInputError("file is empty (0 bytes)", path=p, fix=_FIX)
    img = None
    try:
        img = Image.open(p)
        _check_planar_deep_tiff(img, p)
        if decode:
            # PIL reduces 16-bit colour to 8 bits while decoding; what the file held is known only before
            img.uninet_deep_colour = img.mode in ("RGB", "RGBA") and any(
                ";16" in str(getattr(t, "args", "")) for t in (img.tile or ()))
            _decode(img, p)
    except BadInputError:   # `_decode`'s own (a ValueError): said as it is
        if img is not None:
            img.close()
        raise
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as e:
        if img is not None:
            img.close()
        if isinstance(e, Image.DecompressionBombError):
            raise BadInputError(f"image too large for PIL's safety limit ({e})", path=p,
                                fix=f"if the file is trusted, raise the limit: {PIXEL_LIMIT_ENV}=N (pixels, or none) "
                                    "in the environment, e.g. `UNINET_MAX_IMAGE_PIXELS=1000000000 uninet-feat ...`; "
                                    "from Python, PIL.Image.MAX_IMAGE_PIXELS") from None
        # UnidentifiedImageError (not an image) is an OSError; truncation is an OSError or EOFError
        what = "truncated or corrupt image" if "truncat" in str(e).lower() or isinstance(e, EOFError) \
            else "cannot decode image"
        raise BadInputError(f"{what} ({type(e).__name__}: {e})", path=p, fix=_FIX) from None
    return img


def _check_planar_deep_tiff(img: Image.Image, path) -> None:
    """Refuse a TIFF of more than 8 bits a sample stored plane by plane (PlanarConfiguration 2, tifffile's default
    for a (3, H, W) array): PIL decodes each 16-bit plane as 8-bit bytes, and the image came out as noise with no
    error (an audit, session 52)."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None or tags.get(284) != 2:
        return
    bits = tags.get(258, (8,))
    if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
        raise BadInputError(f"a {max(bits)}-bit TIFF stored plane by plane (PlanarConfiguration 2), which PIL "
                            "cannot decode: it would read as noise", path=path,
                            fix="save it with interleaved samples (e.g. tifffile.imwrite(out, tifffile.imread(f), "
                                "planarconfig='contig'), or ImageMagick: convert f -interlace none out.tif), or "
                                "as a 16-bit PNG")


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 = as stored) of a file opened, not yet decoded, read from its header; an
    unreadable EXIF block counts as 1, since the pixels are still fine and a broken tag is no reason to refuse them.
    A PNG's comes from what precedes its pixel data (an eXIf chunk, XMP): PIL's PNG ``getexif()`` decodes the whole
    image to look for an eXIf chunk after them when none comes before (18 ms instead of 0.05 ms for a 1500 x 1500
    PNG, in `read_size`, which promises no decode). One after the pixel data (rare: most writers put it first) is
    found by stepping over the file's chunk headers (`_png_late_exif`: seeks, no decompression), as before."""
    try:
        exif = Image.Image.getexif(img) if img.format == "PNG" else img.getexif()
        o = int(exif.get(0x0112, 1))
        if img.format == "PNG" and 0x0112 not in exif and "exif" not in img.info:
            late = _png_late_exif(getattr(img, "filename", None))
            if late is not None:
                found = Image.Exif()
                found.load(b"Exif\x00\x00" + late)
                o = int(found.get(0x0112, 1))
    except Exception:  # Pillow raises assorted types on malformed EXIF
        return 1
    return o if 1 <= o <= 8 else 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_late_exif(path) -> bytes | None:
    """The payload of a PNG file's eXIf chunk, found by reading each chunk's 8-byte header and seeking past its
    data (a few hundred small reads for a large image, no decompression); None when it has none."""
    if not isinstance(path, (str, os.PathLike)) or not path:
        return None
    with open(path, "rb") as f:
        return next((f.read(n) for kind, n in _png_chunks(f) if kind == b"eXIf"), None)


def _png_chunks(f):
    """(type, length) of each chunk of the PNG file open as ``f``, with ``f`` at the chunk's data, up to IEND; none
    when ``f`` is no PNG. The next chunk is found from its offset, whatever the caller read of this one; a file cut
    inside a chunk header ends the chunks (verify() names it)."""
    if f.read(8) != _PNG_SIGNATURE:
        return
    while len(head := f.read(8)) == 8:
        n, kind = struct.unpack(">I4s", head)
        start = f.tell()
        yield kind, n
        if kind == b"IEND":
            return
        f.seek(start + n + 4)   # past the data and its CRC


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_pixels_short(path) -> str | None:
    """Why a PNG's pixel data is incomplete, or None: its IDAT stream inflated (no unfiltering, no image kept; a
    few ms for a 1-Mpx strip, a decode takes ~30) and compared with the bytes its header asks for. verify() checks
    only the chunk checksums, so a file whose writer stopped mid-stream and still closed it (IEND, right CRCs) passed
    `check_image`, then stopped training at its decode, even under --skip-bad; one whose stream ended early
    decoded with no error, its missing rows black (an audit, session 52)."""
    inflate, got, want, ended = zlib.decompressobj(), 0, None, False
    with open(path, "rb") as f:
        for kind, n in _png_chunks(f):
            ended = kind == b"IEND"
            if kind == b"IHDR":
                w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
                bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
                want = 0
                for x0, y0, dx, dy in (_ADAM7 if interlace else ((0, 0, 1, 1),)):
                    pw, ph = -(-(w - x0) // dx) if w > x0 else 0, -(-(h - y0) // dy) if h > y0 else 0
                    want += ph * (1 + -(-pw * bits // 8)) if pw and ph else 0
            elif kind == b"IDAT":
                data = f.read(n)
                while data and not inflate.eof:
                    try:
                        got += len(inflate.decompress(data, 1 << 20))
                    except zlib.error as e:
                        return f"its pixel data does not inflate ({e})"
                    data = inflate.unconsumed_tail
    if want is None or not ended:   # not a PNG, or cut before IEND: verify() names those
        return None
    if not inflate.eof:
        return f"its pixel data stops before its end ({got} of {want} bytes inflated)"
    if got < want:
        return f"its pixel data holds {got} of the {want} bytes its {w}x{h} header needs (rows missing)"
    return None


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of the pixels as the file stores them, before any turn: a TIFF's from its tags, since PIL (11 and
    later) gives a TIFF with a quarter turn (orientation 5..8) its upright size already at open, older PIL the
    stored one."""
    tag = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tag is not None and 256 in tag and 257 in tag:
        return int(tag[256]), int(tag[257])
    return img.size


def _decode(img: Image.Image, path) -> None:
    """``img.load()``, then ``img.uninet_turn``: the EXIF turn left to apply to its pixels (1: none), so that they
    come out upright at `read_size`'s size. PIL turns a TIFF upright as it decodes it (its orientation tag dropped
    since PIL 10.1) and no other format: a TIFF still tagged and of its stored size after the decode (an older PIL)
    is turned here, any other TIFF is upright. PIL 11 to 13 at least memory-map an uncompressed L, P, I;16, RGBA or
    CMYK TIFF at its upright size, which scrambles one with a quarter turn (its rows re-cut at the other width):
    such a file is decoded from its stream instead (PIL maps only a file with a ``filename``). Decoded at another
    size than its header's turned one: a BadInputError, not pixels of another shape than `read_size` promised."""
    turn, (w, h) = orientation(img), _stored_size(img)
    tiff = img.format == "TIFF"
    if tiff and turn >= 5:
        img.filename = ""
    img.load()
    if tiff:
        still = 0x0112 in getattr(img, "tag_v2", {})
        want = (h, w) if turn >= 5 else (w, h)
        turn = turn if turn >= 5 and still and img.size == (w, h) != want else 1
        got = img.size[::-1] if turn >= 5 else img.size
        if got != want:
            raise BadInputError(f"decoded at {got[0]}x{got[1]} px, not the {want[0]}x{want[1]} px its header gives "
                                "with its orientation tag", path=path,
                                fix="re-save it upright, without an orientation tag")
    img.uninet_turn = turn


def oriented(img: Image.Image) -> Image.Image:
    """A decoded ``img`` (`_decode`) as a viewer shows it: the turn its decode left applied; ``img`` itself when
    none is."""
    turn = getattr(img, "uninet_turn", 1)
    return img.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) as a viewer shows it, from the header of a file opened, not decoded (no decode: `orientation`):
    orientations 5..8 swap the stored width and height (`_stored_size`)."""
    w, h = _stored_size(img)
    return (h, w) if orientation(img) >= 5 else (w, h)


GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def colour_kind(path) -> str | None:
    """'grey' or 'colour' from the file's header (PIL mode; no decode), None when it cannot be opened. A grey
    picture saved as RGB reads as colour: the header cannot tell, and the model input is the same then."""
    try:
        with Image.open(path) as img:
            return "grey" if img.mode in GREY_MODES else "colour"
    except (OSError, ValueError):
        return None


def colour_kinds(paths) -> dict[str, list[str]]:
    """{"grey": [...], "colour": [...]}: ``paths`` by `colour_kind` (headers only; unreadable ones left out)."""
    out: dict[str, list[str]] = {"grey": [], "colour": []}
    for p in paths:
        k = colour_kind(p)
        if k is not None:
            out[k].append(str(p))
    return out


def grey_content(path, tolerance: int = 3) -> bool | None:
    """Whether a colour file holds a grey picture (every pixel's channels within ``tolerance`` of 255 of each other,
    JPEG's chroma rounding allowed), from a reduced decode; None when it cannot be read. What `colour_kind`'s
    header cannot tell: a grey tile saved as RGB or RGBA."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (img.width // 4 or 1, img.height // 4 or 1))   # JPEG: decoded at a quarter, cheap
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    except (OSError, ValueError):
        return None
    return bool((rgb.max(2) - rgb.min(2)).max() <= tolerance)


def _to_array(img: Image.Image, path, meta: Image.Image | None = None) -> np.ndarray:
    """Any PIL mode → float32 (H, W, C) with C in {1, 3}, in [0, 1]. ``meta``: the file as opened, whose
    format and TIFF tags give the full scale of a 32-bit-int image when ``img`` is a rotated copy."""
    mode = img.mode
    if mode == "1":
        a = np.asarray(img, dtype=np.float32)
    elif mode in ("L", "LA", "La"):
        a = np.asarray(img.getchannel(0), dtype=np.float32) / 255.0
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        a = np.asarray(img, dtype=np.float32)[..., :3] / 255.0
    elif mode in ("P", "PA"):
        # RGBA keeps PIL from warning about palette transparency; the alpha is then dropped.
        a = np.asarray(img.convert("RGBA"), dtype=np.float32)[..., :3] / 255.0
    elif mode.startswith("I;16"):
        raw = np.asarray(img)
        _few_bits_note(path, raw, 65535.0)
        a = raw.astype(np.float32) / 65535.0
    elif mode == "I":
        a = np.asarray(img)
        tag = getattr(meta or img, "tag_v2", None)
        if a.dtype == np.int32 and tag is not None and _tag_first(tag, 258) == 32 and _tag_first(tag, 339, 1) == 1:
            a = a.view(np.uint32)   # an unsigned 32-bit TIFF: PIL's int32 wraps values from 2^31 to negative ones
        a = a.astype(np.float64)
        if a.size and a.min() < 0:
            raise BadInputError("signed integer image with negative values", path=path,
                                fix="save it as unsigned 8- or 16-bit")
        full = _int_max(meta or img, a)
        _few_bits_note(path, a, full)
        a = (a / full).astype(np.float32)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise BadInputError("float image contains NaN or Inf", path=path,
                                fix="replace non-finite pixels before saving")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if lo < 0 or hi > 1:  # no container range for floats: rescale, but say so
            warnings.warn(f"{path}: float image outside [0, 1] (min {lo:g}, max {hi:g}); rescaled min-max")
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:  # CMYK, YCbCr, LAB, HSV, ...: PIL knows the conversion
        try:
            a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        except (ValueError, OSError) as e:
            raise BadInputError(f"unsupported image mode {mode!r} ({e})", path=path,
                                fix="convert the file to 8-bit RGB or grey PNG") from None
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(a, dtype=np.float32)


_FEW_BITS: list[str] = []   # the one image the note named (said once per process)


def _few_bits_note(path, raw: np.ndarray, full: float) -> None:
    """Warn (once per process) when an integer image of 16 or more bits keeps its values 4 bits or more below its
    container's full scale: 8- or 12-bit camera data in a 16-bit file (or 16-bit data in a 32-bit TIFF, which read
    near black without a word until session 52) is read 16x or more darker than it looks, since it is scaled by
    the container's full scale, as it must be for data of that depth. A dark image triggers it too, so it is a
    note, not a rescale."""
    bits = int(round(np.log2(full + 1)))
    if not _FEW_BITS and bits >= 16 and raw.size and 0 < int(raw.max()) < (full + 1) / 16:
        _FEW_BITS.append(str(path))
        fits = int(np.ceil(np.log2(int(raw.max()) + 1)))
        warnings.warn(f"{path}: a {bits}-bit image whose values stay below {int((full + 1) / 16)} (max "
                      f"{int(raw.max())}, {fits} bits): if it holds {fits}-bit camera data it is read "
                      f"{(full + 1) / 2 ** fits:.0f}x darker than full scale (scaled by {int(full)}). Fine if all "
                      "images are stored alike; else store them at one bit depth (said once per run)")


_FEW_BITS_COLOUR: list[str] = []   # the one 16-bit colour image the note named (said once per process)


def few_bits_colour_note(path, a8: np.ndarray) -> None:
    """Warn (once per process) when a 16-bit colour image, which PIL reads at 8 bits (the high byte of each value),
    keeps every value below 16 of 255: 8- or 12-bit camera data stored in a 16-bit file then reads as a nearly black
    image with at most 16 levels per channel (8-bit data: all 0, black), the rest of its bits lost (16-bit grey
    keeps them: `_few_bits_note`)."""
    if not _FEW_BITS_COLOUR and a8.size and int(a8[..., :3].max()) < 16:   # 0: 8-bit data, read all black
        _FEW_BITS_COLOUR.append(str(path))
        warnings.warn(f"{path}: a 16-bit colour image whose values stay below 4096 (read at 8 bits: max "
                      f"{int(a8[..., :3].max())} of 255): if it holds 8- or 12-bit camera data, PIL keeps only the "
                      "high byte of each value, so it reads nearly black with at most 16 levels per channel. Fix: "
                      "store such frames as 8-bit colour, or scale them to the full 16-bit range (said once per run)")


def _tag_first(tag, key: int, default=None):
    """A TIFF tag's (first) value as an int, or ``default``."""
    if key not in tag:
        return default
    v = tag[key]
    return int(v[0] if isinstance(v, tuple) else v)


def _int_max(img: Image.Image, a: np.ndarray) -> float:
    """Full-scale value of a 32-bit-int PIL image: from the TIFF tags when present (bits, signedness),
    else 65535 (old PIL opens 16-bit PNGs as mode I; a max that fits 16 bits is taken as 16-bit data)."""
    tag = getattr(img, "tag_v2", None)
    if tag is not None and 258 in tag:
        first = lambda v: int(v[0] if isinstance(v, tuple) else v)  # noqa: E731
        bits, signed = first(tag[258]), 339 in tag and first(tag[339]) == 2
        return float(2 ** (bits - 1 if signed else bits) - 1)
    if img.format == "PNG" or (a.size and a.max() <= 65535):
        return 65535.0
    return float(2 ** 32 - 1)


def load_image(path, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode ``path`` to float32 (H, W, 3) in [0, 1]; grey is repeated to three channels.

    Raises BadInputError for missing/empty/corrupt/truncated files, non-images, NaN/Inf, and
    images whose shorter side is below ``min_side`` pixels.
    """
    with _open(path) as img:
        w, h = img.size
        if min(h, w) < min_side:
            raise BadInputError(f"image is {w}x{h} px, smaller than the minimum side of {min_side} px", path=path,
                                fix=f"remove it (or --skip-bad to leave it out): images need at least {min_side} px a side")
        if getattr(img, "uninet_deep_colour", False) and not _FEW_BITS_COLOUR:   # said once: no copy after
            few_bits_colour_note(path, np.asarray(img))
        a = _to_array(oriented(img), path, meta=img)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a


# PIL mode of a file → the 8-bit mode `load_image` reads it as (alpha dropped, a palette expanded)
_EIGHT_BIT = {"1": "L", "L": "L", "LA": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB", "RGBA": "RGB", "RGBX": "RGB",
              "CMYK": "RGB", "YCbCr": "RGB"}
_GREY16 = ("I;16", "I;16L", "I;16B")
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}   # EXIF orientation → the turn that shows it upright (as ImageOps')


def picture_8bit(path, box: tuple[int, int] | None = None) -> Image.Image | None:
    """The image file ``path`` as an 8-bit RGB picture, read as `load_image` reads it (upright, 16-bit grey scaled
    by its full range) without its float array, which takes 12 bytes a pixel, and the 8-bit conversion after it 24
    more (GBs for a 20000 × 20000 image, for a report thumbnail or an overlay): the file is decoded in its own 8- or
    16-bit mode. ``box`` (W, H): fitted into it, a JPEG decoded at 1/2 to 1/8 of its size (PIL's ``draft``), then
    reduced by PIL (report thumbnails). None for the modes whose scale needs `load_image`'s rules (32-bit integer
    and float TIFFs): the caller decodes those. Without ``box`` an unreadable file is a BadInputError, as in
    `load_image`."""
    if box is None:   # the header's mode first: a 32-bit or float file is then decoded once, by the caller
        with _open(path, decode=False) as head:
            if head.mode not in _GREY16 and head.mode not in _EIGHT_BIT:
                return None
    with (_open(path) if box is None else Image.open(path)) as img:
        if img.mode not in _GREY16 and img.mode not in _EIGHT_BIT:
            return None
        if box is not None:
            turn = orientation(img)
            fit = (box[1], box[0]) if turn >= 5 else box   # in the stored image's axes
            img.draft(None, (2 * fit[0], 2 * fit[1]))   # JPEG only: decoded at the smallest scale above twice it
            _decode(img, path)   # PIL turns a TIFF upright as it decodes it: the turn left is `_decode`'s
        turn = img.uninet_turn
        if img.mode in _GREY16:
            small = _grey16_to_8(img)
        else:
            want = _EIGHT_BIT[img.mode]
            small = img if img.mode == want else (img.convert("RGBA") if img.mode in ("P", "PA") else img).convert(want)
        if box is not None:
            small.thumbnail((box[1], box[0]) if turn >= 5 else box, Image.Resampling.LANCZOS)
        small = small.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else small
        return small.convert("RGB") if small.mode != "RGB" or small is img else small


def _grey16_to_8(img: Image.Image, strip: int = 2 ** 20) -> Image.Image:
    """A 16-bit grey image as 8-bit grey, value v → round(v / 65535 · 255) as `load_image` and the overlays scale
    it (PIL's own conversion clips at 255: a 16-bit frame came out white), about ``strip`` pixels at a time so that
    no full-size wider array is made: the file's pixels once (2 bytes each) and the 8-bit image."""
    w, h = img.size
    a = np.frombuffer(img.tobytes(), ">u2" if img.mode == "I;16B" else "<u2").reshape(h, w)
    out, rows = np.empty((h, w), np.uint8), max(1, strip // max(w, 1))
    for y in range(0, h, rows):
        out[y:y + rows] = (a[y:y + rows].astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(out)


def _stored_turned(path) -> int:
    """The EXIF orientation (5..8) of an image stored with a quarter turn, else 0 (unreadable too)."""
    try:
        with _open(path, decode=False) as img:
            o = orientation(img)
    except (BadInputError, OSError):
        return 0
    return o if o >= 5 else 0


def load_mask(path, size: tuple[int, int] | None = None, image_path=None) -> np.ndarray:
    """Decode a defect mask to bool (H, W): any non-zero pixel (in any colour channel) is defect.

    A mask with more than two distinct values (anti-aliased edges, JPEG-saved masks) is still
    binarised at > 0 but warns, since that usually means a lossy export. ``size=(H, W)`` is the
    image's size; a mismatch is an error rather than a silent resize, because it usually means
    the mask belongs to a different image.
    """
    raw = _mask_channels(path)
    if raw.ndim == 3:
        raw = raw.max(axis=2) if raw.dtype != bool else raw.any(axis=2)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise BadInputError("mask contains NaN or Inf", path=path, fix="re-export the mask as 8-bit PNG")
    h, w = raw.shape
    if size is not None and (h, w) != tuple(size):
        img_txt = f"image {image_path}" if image_path else "its image"
        turn = _stored_turned(image_path) if image_path and (w, h) == tuple(size) else 0
        if turn:   # drawn on the pixels as stored: resizing it as advised would squash it (an audit, session 52)
            raise BadInputError(f"mask is {w}x{h} px but {img_txt} is {size[1]}x{size[0]} px: the image is stored "
                                f"turned (EXIF orientation {turn}) and shown upright, and the mask fits its stored "
                                "pixels", path=path,
                                fix="turn the mask as the tag turns the image (e.g. PIL's ImageOps.exif_transpose "
                                    "on the image and the same transpose on the mask), or save the image upright "
                                    "without the tag; do not resize it")
        raise BadInputError(f"mask is {w}x{h} px but {img_txt} is {size[1]}x{size[0]} px", path=path,
                            fix=f"resize the mask to {size[1]}x{size[0]} with nearest-neighbour, "
                                "or check that the mask belongs to this image")
    if len(np.unique(raw)) > 2:
        if len(_NONBINARY) < _NONBINARY_KEPT:   # each epoch loads its masks again: a list without bound
            _NONBINARY.append(str(path))
        if len(_NONBINARY) == 1:  # once per process: anti-aliased mask sets would otherwise flood the log
            warnings.warn(f"{path}: mask is not binary ({len(np.unique(raw))} distinct values); "
                          "every non-zero pixel is taken as defect (said once; further such masks are taken the "
                          "same way)")
    return raw > 0


_NONBINARY: list[str] = []
_NONBINARY_KEPT = 10_000


def nonbinary_masks() -> list[str]:
    """Paths of the non-binary masks loaded so far in this process, one per load (the first `_NONBINARY_KEPT`)."""
    return list(_NONBINARY)


PICTURE_COVER, PICTURE_VALUES = 0.99, 16   # a "mask" non-zero almost everywhere with this many values is a picture


def _mask_channels(path) -> np.ndarray:
    """A mask file's pixels, upright, alpha dropped: (H, W) or (H, W, C), before any channel is merged. Where the
    alpha channel is 0 in some pixels and not in others, the transparent ones are background (zero): annotation
    tools export a defect painted on a transparent layer, whose hidden colour may be white (read as 100 % defect).
    A transparency colour key (a palette PNG's tRNS, as palette-optimising exports write that layer, or an L / RGB
    PNG's) is such an alpha channel too. A layer whose painted pixels are all black (a black brush) and cover at most
    half of it is read by its alpha: its colours were all zero, an empty mask."""
    with _open(path) as stored:
        img = oriented(stored)
        if "transparency" in img.info and img.mode in ("1", "L", "P", "RGB"):
            img = img.convert("LA" if img.mode in ("1", "L") else "RGBA")
        if img.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
            a = np.asarray(img.convert("RGBA" if img.mode in ("RGBA", "RGBa", "PA") else "LA"))
            colour, alpha = a[..., :-1], a[..., -1]
            clear = alpha == 0
            if clear.any() and not clear.all():   # a constant alpha says nothing: the colours are the mask
                # a black brush: the painted (opaque) pixels are the defect; not an opaque black background with
                # transparent holes, which would make most of the image a defect
                if not colour[~clear].any() and clear.mean() >= 0.5:
                    return np.where(clear, 0, 255).astype(np.uint8)
                colour = np.where(clear[..., None], 0, colour).astype(colour.dtype)
            return colour
        if img.mode in ("P", "CMYK", "YCbCr"):
            return np.asarray(img.convert("RGB"))
        return np.asarray(img)


def picture_as_mask(path) -> str | None:
    """Why the mask file ``path`` is a picture and not a defect mask, or None: non-zero in over 99 % of its pixels
    with more than 16 distinct values (or colours). Why: ``x.png`` beside ``x.jpg`` is x.jpg's mask (the
    magnetic-tile convention), so a camera that saves each frame twice gave every image a "mask" of 100 % defect,
    silently. No magnetic-tile mask comes near (at most 50 % of an image); an anti-aliased mask has many values
    but a zero background. Checked by the commands that use masks, before their work (`dataset.picture_masks`)."""
    raw = _mask_channels(path)
    nonzero = raw.any(axis=2) if raw.ndim == 3 else raw != 0
    if raw.dtype == bool or not nonzero.size or nonzero.mean() <= PICTURE_COVER:
        return None
    values = np.unique(raw.reshape(-1, raw.shape[2]), axis=0) if raw.ndim == 3 else np.unique(raw)
    if len(values) <= PICTURE_VALUES:
        return None
    return (f"a picture, not a defect mask: {nonzero.mean():.0%} of its pixels are non-zero, in {len(values)} "
            "distinct values")


def read_size(path) -> tuple[int, int]:
    """(H, W) as `load_image` returns it, from the file header only (no decode): cheap enough for tiling
    thousands of strips."""
    with _open(path, decode=False) as img:
        w, h = oriented_size(img)
    return h, w


def check_image(path, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Cheap up-front validation → (H, W), raising BadInputError like `load_image` would.

    Reads the header and verifies the file without decoding pixels (PNG: every chunk CRC, truncation
    included, and its pixel stream inflated to the length its header needs). JPEGs are checked for the
    end-of-image marker; one that lacks it (truncated, or trailing bytes) is fully decoded to decide. Not
    caught: a JPEG cut and given its end marker back (PIL decodes it, its lost part grey, without an error).
    """
    return _verified(path, min_side, lambda p: load_image(p, min_side))


def _verified(path, min_side: int, decode) -> tuple[int, int]:
    """`check_image`'s checks, ``decode(path)`` deciding where verify() cannot (a JPEG without its end marker,
    formats other than PNG) → (H, W) as `read_size` gives it."""
    p = Path(path)
    with _open(p, decode=False) as img:
        (w, h), fmt = img.size, img.format     # verify() must come right after open
        if min(h, w) < min_side:
            raise BadInputError(f"image is {w}x{h} px, smaller than the minimum side of {min_side} px", path=p,
                                fix=f"remove it (or --skip-bad to leave it out): images need at least {min_side} px a side")
        try:
            img.verify()
        except Exception as e:  # verify raises assorted types depending on the plugin
            raise BadInputError(f"corrupt image ({type(e).__name__}: {e})", path=p, fix=_FIX) from None
    if fmt == "JPEG":
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 2))
            tail = f.read(2)
        if tail != b"\xff\xd9":
            decode(p)
    elif fmt == "PNG":
        short = _png_pixels_short(p)
        if short:
            raise BadInputError(f"truncated or corrupt image: {short}", path=p, fix=_FIX)
    else:  # verify() is shallow for most other formats: decode to be sure
        decode(p)
    return read_size(p)   # as load_image returns it (EXIF orientation); a header read, cheap


MASK_FIX = "re-export the mask (black normal, white defect; PNG), or remove it to score its image without pixel metrics"


def check_mask(path) -> tuple[int, int]:
    """`check_image` for a defect mask → its (H, W) as `load_mask` returns it: header and verify (PNG checksums, a
    JPEG's end marker), a decode where those cannot decide (without `load_image`'s float conversion and its
    rules). Why: a truncated mask with a whole header passed the size check and stopped scoring (or training) at
    its decode. The BadInputError says "unreadable mask", with a mask's fix."""
    try:
        return _verified(path, 1, lambda p: _open(p).close())   # a mask's size is its image's: no minimum
    except BadInputError as e:
        raise BadInputError(f"unreadable mask: {e.reason}", path=path,
                            fix=MASK_FIX if e.fix == _FIX else e.fix) from None
