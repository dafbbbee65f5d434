"""Masks are verified up front as images are (`images.check_mask`), not only by the size in their header."""
import warnings

import numpy as np
import pytest
from PIL import Image

from uninet_feat.data import ImageDataset, Sample, read_size
from uninet_feat.data.dataset import check_samples, drop_unusable_masks, picture_masks
from uninet_feat.errors import BadInputError


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_a_truncated_mask_is_refused_before_any_work_and_only_it_is_left_out_with_skip_bad(tmp_path, ext):
    """A mask cut to half its bytes keeps a whole header: it passed `check_samples` (which compared the header's
    size), `picture_masks` and `drop_unusable_masks` (--skip-bad), then stopped scoring at its decode ("truncated
    or corrupt image"). It is refused up front, by name, with a mask's fix; --skip-bad leaves out only the mask."""
    rng = np.random.default_rng(0)
    images = []
    for name in ("a", "b"):
        images.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images[-1])
    drawn = np.zeros((64, 64), np.uint8)
    drawn[10:30, 5:50] = 255
    drawn[40:] = rng.integers(0, 2, (24, 64)) * 255   # enough bytes that half of them end inside the pixel data
    mask = tmp_path / f"a_mask.{ext}"
    Image.fromarray(drawn).save(mask)
    mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])
    samples = [Sample(images[0], "test", "crack", mask), Sample(images[1], "test", "good")]
    assert read_size(mask) == (64, 64)   # its header is whole: the size check alone passed it

    for check in (lambda: check_samples(samples), lambda: ImageDataset(samples, image_size=32)):
        with pytest.raises(BadInputError) as e:
            check()
        msg = str(e.value)
        assert msg.startswith("1 of 2 images has a mask that cannot be used:")   # not "unreadable" images
        assert f"  {mask}: unreadable mask: " in msg and "(fix: re-export the mask" in msg, msg

    with pytest.warns(UserWarning, match=f"skipping {mask}: unreadable mask"):
        ds = ImageDataset(samples, image_size=32, skip_bad=True)   # the library: the sample is left out, warned
    assert ds.kept == [1] and [ds[j]["index"] for j in range(len(ds))] == [1]

    assert picture_masks(samples) == samples   # left to the checks above, not called a picture
    with pytest.warns(UserWarning) as rec:   # --skip-bad in evaluate / supervised train: only the mask
        kept = drop_unusable_masks(samples)
    assert [s.mask for s in kept] == [None, None] and [s.path for s in kept] == images
    said = [str(r.message) for r in rec]
    assert len(said) == 1 and said[0].startswith(f"skipping the mask {mask} of {images[0]} (unreadable mask: ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageDataset(kept, image_size=32)   # scores both images, the first out of the pixel metrics
        assert [ds[j]["mask"].sum().item() for j in range(len(ds))] == [0, 0]
