"""Defect descriptors (descriptors.py): hot-region shape, map-attended pooling, the spot's place in the image."""
import math

import numpy as np
import pytest
import torch

from uninet_feat.config import load_config
from uninet_feat.data import Sample
from uninet_feat.descriptors import SHAPE_NAMES, hot_region_shape, image_place, map_pool
from uninet_feat.extract import Extractor
from uninet_feat.runs import load_samples
from uninet_feat.train import train

from _tiny import register_tiny, write_texture_set

register_tiny()


def _shape(m):
    return dict(zip(SHAPE_NAMES, hot_region_shape(torch.as_tensor(m, dtype=torch.float32)[None])[0].tolist()))


def _reference(m: np.ndarray) -> list[float]:
    """The descriptors one image at a time, with numpy and an explicit eigen-decomposition."""
    h, w = m.shape
    med, mx = np.sort(m.ravel())[(m.size - 1) // 2], m.max()   # torch's median: the lower middle value
    region = m >= med + 0.5 * (mx - med)
    wt = np.where(region, m - med, 0.0)
    if mx <= m.min():                   # flat: the whole tile, evenly
        region, wt = np.ones_like(region), np.ones_like(m)
    elif wt.sum() <= 0:                 # max == median, not flat: the plateau at the top, evenly
        wt = region.astype(float)
    wt = wt / wt.sum()
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    cy, cx = (wt * Y).sum(), (wt * X).sum()
    cov = np.array([[(wt * (X - cx) ** 2).sum(), (wt * (X - cx) * (Y - cy)).sum()],
                    [(wt * (X - cx) * (Y - cy)).sum(), (wt * (Y - cy) ** 2).sum()]])
    lam, vec = np.linalg.eigh(cov)
    phi = math.atan2(vec[1, 1], vec[0, 1])   # the major axis, from the x axis
    r, c = np.where(region.any(1))[0], np.where(region.any(0))[0]
    return [region.mean(), cy, cx, (r[-1] - r[0] + 1) / h, (c[-1] - c[0] + 1) / w,
            1 - lam[0] / lam[1] if lam[1] > 0 else 0.0, math.cos(2 * phi), math.sin(2 * phi)]


def test_shape_matches_a_per_image_reference_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (5, 24, 40))
    maps[1, 3:6, 10:30] += 6            # a horizontal streak
    maps[2, 2:22, 17:19] += 6           # a vertical one
    maps = maps.astype(np.float32).astype(np.float64)   # the values both sides see
    got = hot_region_shape(torch.tensor(maps, dtype=torch.float32)).numpy()
    for m, g in zip(maps, got):
        np.testing.assert_allclose(g, _reference(m), atol=1e-6)


def test_streaks_blobs_and_flat_maps_read_as_expected():
    m = np.zeros((32, 64))
    m[10:12, 8:56] = 1.0                # horizontal streak, right of the centre line
    s = _shape(m)
    assert s["hot_cos2phi"] > 0.99 and s["hot_elongation"] > 0.95
    assert s["hot_bbox_w"] == pytest.approx(48 / 64) and s["hot_bbox_h"] == pytest.approx(2 / 32)
    assert s["hot_cy"] == pytest.approx(11 / 32) and s["hot_cx"] == pytest.approx(0.5)
    v = _shape(m.T)                     # the same streak turned: vertical
    assert v["hot_cos2phi"] < -0.99 and v["hot_elongation"] > 0.95
    b = np.zeros((32, 32))
    b[20:24, 4:8] = 1.0                 # a small round blob
    s = _shape(b)
    assert s["hot_area"] == pytest.approx(16 / 1024) and s["hot_elongation"] < 0.01
    assert (s["hot_cy"], s["hot_cx"]) == (pytest.approx(22 / 32), pytest.approx(6 / 32))
    f = _shape(np.full((8, 8), 3.0))    # flat: the whole tile, evenly; no NaN
    assert f["hot_area"] == 1.0 and f["hot_elongation"] == pytest.approx(0, abs=1e-6)
    assert all(math.isfinite(x) for x in f.values())
    # scale-free: a map and the same map in other units give the same shape
    np.testing.assert_allclose(hot_region_shape(torch.tensor(b[None] * 7 + 2, dtype=torch.float32)),
                               hot_region_shape(torch.tensor(b[None], dtype=torch.float32)), atol=1e-6)


def test_a_plateau_at_the_top_over_half_the_tile_is_the_region_not_the_whole_tile():
    """max == median (the top value over half the pixels or more) was taken for a flat map: the whole tile, its
    centroid the tile's centre, whatever the map."""
    m = np.zeros((8, 8))
    m[:5] = 1.0                         # the top 5 rows of 8 at the maximum: 62.5 % of the tile
    s = _shape(m)
    assert s["hot_area"] == pytest.approx(5 / 8) and s["hot_bbox_h"] == pytest.approx(5 / 8)
    assert s["hot_cy"] == pytest.approx(2.5 / 8) and s["hot_cx"] == pytest.approx(0.5)
    np.testing.assert_allclose(list(s.values()), _reference(m), atol=1e-6)
    f = _shape(np.full((8, 8), 2.0))    # a flat map is still the whole tile
    assert f["hot_area"] == 1.0 and f["hot_cy"] == pytest.approx(0.5)


def test_map_pool_picks_the_hot_spot_and_a_flat_map_gives_the_mean():
    x = torch.randn(2, 5, 4, 4)
    amap = torch.zeros(2, 8, 8)
    amap[0, 4:6, 2:4] = 3.0             # upsampled grid cell (2, 1) of image 0
    amap[0] += 0.01 * torch.rand(8, 8)  # noise below the median hardly moves it
    p = map_pool(x, amap)
    assert torch.allclose(p[0], x[0, :, 2, 1], atol=0.05)
    assert torch.allclose(p[1], x[1].mean((1, 2)), atol=1e-6)


def test_image_place_converts_tile_fractions():
    assert image_place(0.5, 0.5, (0, 3840, 256, 256), (256, 4096)) == (0.5, (3840 + 128) / 4096)
    assert image_place(0.5, 1.0, (0, 0, 64, 64), (40, 64)) == (0.8, 1.0)   # a padded tile, clipped at 1


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("desc")
    data = write_texture_set(root / "wide", n_train=4, n_good=1, n_bad=2, wide=True)   # 64 x 192: three tiles
    cfg = load_config(None, {"data": str(data)}, base={"backbone": "tiny", "weights": "random", "image_size": 64,
                                                       "tile": 64, "epochs": 1, "batch_size": 4,
                                                       "channels_last": False})
    train(cfg, root / "run", quiet=True)
    return root / "run", load_samples(cfg)


def test_extracted_tiles_carry_shape_and_place_in_the_image(wide_run):
    run, samples = wide_run
    ex = Extractor(run=run)
    r = ex.extract(samples)
    names = ex.vector_names
    assert r["vectors"].shape[1] == len(names) and names[-2:] == ["spot_y_image", "spot_x_image"]
    col = {n: r["vectors"][:, names.index(n)] for n in ("hot_cy", "hot_cx", "spot_y_image", "spot_x_image")}
    for j, box in enumerate(r["tile"]):
        y, x = image_place(col["hot_cy"][j], col["hot_cx"][j], box, (64, 192))
        assert col["spot_y_image"][j] == pytest.approx(y, abs=1e-5)
        assert col["spot_x_image"][j] == pytest.approx(x, abs=1e-5)
    assert set(r["tile"][:, 1].tolist()) == {0, 64, 128}
    # each tile's place lies inside its own third of the strip
    x0 = r["tile"][:, 1] / 192
    assert ((col["spot_x_image"] >= x0) & (col["spot_x_image"] <= x0 + 64 / 192)).all()


def test_predict_stretches_the_spot_of_a_tile_past_the_image_back_to_the_images_part(wide_run, tmp_path):
    """A tile that runs past a short image has its spot measured on the image's part of the map (40 x 64 of a 64-px
    tile, squashed square), but predict read every tiled row as square: a 45-degree streak came out at 58."""
    from PIL import Image
    from uninet_feat.descriptors import spot_summary
    from uninet_feat.predict import predict_cmd
    run, _ = wide_run
    batch = tmp_path / "short"
    batch.mkdir()
    rng = np.random.default_rng(0)
    img = np.full((40, 96), 128, np.uint8) + rng.integers(0, 20, (40, 96)).astype(np.uint8)
    for k in range(24):   # a bright diagonal streak
        img[8 + k, 20 + k:23 + k] = 255
    Image.fromarray(img).save(batch / "a.png")
    row = predict_cmd(run, str(batch), tmp_path / "p", overlays=False, quiet=True)["rows"][0]
    ex = Extractor(run=run)
    samples = [Sample(batch / "a.png", "", "", None, "")]
    r = ex.extract(samples)
    top = int(np.argmax(r["scores"]))
    y, x, th, tw = (int(v) for v in r["tile"][top])
    part = (min(th, 40 - y), min(tw, 96 - x))
    assert part == (40, 64)
    want = spot_summary(r["vectors"][top], ex.vector_names, part)
    square = spot_summary(r["vectors"][top], ex.vector_names, None)
    assert row["spot_angle_deg"] == pytest.approx(want["spot_angle_deg"], abs=0.06)
    assert row["spot_elongation"] == pytest.approx(want["spot_elongation"], abs=1e-4)
    assert abs(want["spot_angle_deg"] - square["spot_angle_deg"]) > 1 or \
        abs(want["spot_elongation"] - square["spot_elongation"]) > 1e-3   # the stretch is not a no-op here


def test_predict_rows_describe_the_top_tiles_spot(wide_run, tmp_path):
    from uninet_feat.predict import predict_cmd
    run, samples = wide_run
    rows = predict_cmd(run, str(samples[0].path.parents[2]), tmp_path / "p", overlays=False, quiet=True)["rows"]
    r = Extractor(run=run).extract(samples)
    names = Extractor(run=run).vector_names
    for row in rows:
        items = [j for j, i in enumerate(r["index"]) if str(samples[i].path) == row["path"]]
        top = items[int(np.argmax(r["scores"][items]))]
        v = dict(zip(names, r["vectors"][top]))
        assert row["spot_x"] == pytest.approx(v["spot_x_image"], abs=1e-5)
        assert row["spot_area"] == pytest.approx(v["hot_area"], abs=1e-5)
        angle = 0.5 * math.degrees(math.atan2(v["hot_sin2phi"], v["hot_cos2phi"]))
        assert row["spot_angle_deg"] == pytest.approx(angle, abs=0.06) and -90 <= angle <= 90
    assert len(rows) == len(samples)


def test_spot_differences_are_the_spot_less_the_tiles_own_mean(wide_run):
    """`l*_spotdiff_*` (schema 3) = each level's map-attended target-teacher features less the plain mean of the same
    features over the tile, recomputed here from the model's own forward pass."""
    import torch
    run, samples = wide_run
    ex = Extractor(run=run)
    r = ex.extract(samples)
    _, ds = ex._dataset(samples)
    assert len(ds) == len(r["vectors"])
    x = torch.stack([ds[j]["image"] for j in range(len(ds))])
    with torch.no_grad():
        out = ex.model.eval()(x)
    L = out.n_levels
    mean = torch.cat([out.teachers[L + l].float().mean((2, 3)) for l in range(L)], 1).numpy()
    names = ex.vector_names
    att = r["vectors"][:, [j for j, n in enumerate(names) if "_mapattn_" in n]]
    diff = r["vectors"][:, [j for j, n in enumerate(names) if "_spotdiff_" in n]]
    assert diff.shape == att.shape == mean.shape
    assert diff == pytest.approx(att - mean, abs=1e-4)
    assert np.abs(mean).max() > 1e-2   # the difference is not the spot itself


def test_a_spots_angle_and_elongation_are_the_images_not_the_squashed_inputs():
    """A 64x192 image is squashed to the model's square input: a 45-degree streak there runs at 71.6 degrees, and a
    round spot of the input is a wide ellipse in the image."""
    import math

    from uninet_feat.descriptors import spot_summary
    names = ["spot_y_image", "spot_x_image", "hot_area", "hot_elongation", "hot_cos2phi", "hot_sin2phi"]

    def row(elong, phi_deg):
        phi = math.radians(2 * phi_deg)
        return [0.5, 0.5, 0.01, elong, math.cos(phi), math.sin(phi)]
    squashed = math.degrees(math.atan2(1 / 64, 1 / 192))   # the image's 45-degree line on the input: 71.57
    assert spot_summary(row(1.0, squashed), names)["spot_angle_deg"] == pytest.approx(71.6)
    got = spot_summary(row(1.0, squashed), names, (64, 192))
    assert got["spot_angle_deg"] == pytest.approx(45.0) and got["spot_elongation"] == pytest.approx(1.0)
    round_spot = spot_summary(row(0.0, 0.0), names, (64, 192))
    assert round_spot["spot_angle_deg"] == pytest.approx(0.0)
    assert round_spot["spot_elongation"] == pytest.approx(1 - (64 / 192) ** 2)
    assert spot_summary(row(0.3, 20.0), names, (80, 80)) == spot_summary(row(0.3, 20.0), names)   # square: as it was


def test_an_image_smaller_than_a_tile_has_its_spot_where_its_own_map_is_hot(wide_run, tmp_path):
    """An image smaller than the tile is mirrored to fill it; its hot spot was measured on the whole padded tile
    and placed through the full tile box, so spot_y / spot_x fell towards, and were clipped at, the image's
    bottom / right edge. They are now the hot region of the image's own part of the map."""
    from PIL import Image
    from uninet_feat.predict import predict_cmd
    run, _ = wide_run
    rng = np.random.default_rng(5)
    for name, (h, w) in (("a.png", (24, 40)), ("b.png", (40, 20))):
        img = (120 + rng.normal(0, 6, (h, w))).clip(0, 255).astype(np.uint8)
        img[4:10, 3:9] = 250   # a bright spot near the top left
        (tmp_path / "b").mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / "b" / name)
    rows = predict_cmd(run, tmp_path / "b", tmp_path / "p", overlays=False, save_maps=True, threshold=-1e9,
                       quiet=True)["rows"]
    for row in rows:
        m = torch.from_numpy(np.load(row["map"]).astype(np.float32))[None]
        own = dict(zip(SHAPE_NAMES, hot_region_shape(m)[0].tolist()))
        assert row["spot_y"] == pytest.approx(own["hot_cy"], abs=0.08)
        assert row["spot_x"] == pytest.approx(own["hot_cx"], abs=0.08)
        assert row["spot_y"] < 1 and row["spot_x"] < 1
