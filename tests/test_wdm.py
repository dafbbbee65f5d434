"""Anomaly maps + WDM: batched torch == per-image scipy spec; Triton (interpreter, CPU) == torch; k corner cases.

TRITON_INTERPRET must be set before the kernel module is imported (it is read when @triton.jit decorates),
hence the setdefault at the very top. Triton sizes stay small: the interpreter runs every tile in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402

from uninet_feat import scoring  # noqa: E402
from uninet_feat.kernels import wdm  # noqa: E402


def _feats(n, sizes, c=8, seed=0, spread=True):
    """K = 2 * len(sizes) pairs; per-image noise levels differ so the maxima, hence k, differ per image."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1) if spread else torch.ones(n, 1, 1, 1)
    ts = [torch.randn(n, c, h, w, generator=g) for h, w in sizes * 2]
    ss = [t + amp * torch.randn(t.shape, generator=g) for t in ts]
    return ts, ss


def _maps(n, sizes, seed=0):
    return scoring.anomaly_maps(*_feats(n, sizes, seed=seed), backend="torch")


def _triton_mod():
    pytest.importorskip("triton")
    mod = importlib.import_module("uninet_feat.kernels.wdm_triton")
    if not mod.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("no CUDA and TRITON_INTERPRET was not 1 when the kernel module was imported")
    return mod


def _dev():
    return "cpu" if _triton_mod().INTERPRETED else "cuda"


# ---------------------------------------------------------------------------------------------- torch vs spec
def test_anomaly_maps_are_one_minus_cosine():
    ts, ss = _feats(2, [(5, 6), (3, 3)])
    ts[0][0, :, 0, 0] = 0  # zero vector: eps keeps it finite, cos = 0
    maps = scoring.anomaly_maps(ts, ss, backend="torch")
    assert len(maps) == 4
    for m, t, s in zip(maps, ts, ss):
        torch.testing.assert_close(m, 1 - F.cosine_similarity(t, s, dim=1, eps=1e-8))
    assert maps[0][0, 0, 0] == 1
    bf = scoring.anomaly_maps([t.bfloat16() for t in ts], [s.bfloat16() for s in ss], backend="torch")
    assert bf[0].dtype == torch.float32


@pytest.mark.parametrize("n, sizes, out", [
    (4, [(24, 40), (12, 20), (6, 10)], (96, 160)),  # odd aspect, the UniNet 4/8/16 stride ladder
    (3, [(16, 16), (8, 8), (4, 4)], (64, 64)),
    (3, [(5, 4), (3, 3), (1, 1)], (10, 7)),  # output smaller than the blur radius; a 1x1 map
    (2, [(2, 3)], (1, 9)),  # single output row (align_corners scale 0)
])
def test_batched_matches_scipy_reference(n, sizes, out):
    maps = _maps(n, sizes)
    pix, score = scoring.wdm_score(maps, out, backend="torch")
    ref_pix, ref_score, ref_k = scoring.wdm_score_reference(maps, out)
    k, _ = scoring.wdm_weights(maps, 0.01, 3e-5, out)
    assert pix.shape == (n, *out) and score.shape == (n,)
    np.testing.assert_array_equal(k.numpy(), ref_k)
    np.testing.assert_allclose(pix.numpy(), ref_pix, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score.numpy(), ref_score, atol=1e-5, rtol=0)
    if out == (96, 160):
        assert len(set(ref_k.tolist())) == n  # really one k per image, in one batched call
    torch.testing.assert_close(scoring.anomaly_map(maps, out, backend="torch"), pix)


def test_smoothed_pixel_map_is_the_blurred_map_the_score_comes_from():
    """``smoothed=True``: same scores; the pixel map is scipy's σ=4 blur of the raw sum (per image)."""
    ts, ss = _feats(3, [(8, 8), (4, 4)])
    maps = scoring.anomaly_maps(ts, ss)
    raw, s_raw = scoring.wdm_score(maps, (32, 32))
    smooth, s_smooth = scoring.wdm_score(maps, (32, 32), smoothed=True)
    torch.testing.assert_close(s_smooth, s_raw)
    ref = np.stack([ndimage.gaussian_filter(r.double().numpy(), 4.0, truncate=4.0, mode="reflect") for r in raw])
    np.testing.assert_allclose(smooth.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert smooth.std() < raw.std()


def test_anomaly_map_wdm_from_features_matches_maps_path():
    ts, ss = _feats(3, [(8, 12), (4, 6)])
    pix, score = wdm.anomaly_map_wdm(ts, ss, (32, 48), backend="torch")
    ref_pix, ref_score, _ = scoring.wdm_score_reference(scoring.anomaly_maps(ts, ss, backend="torch"), (32, 48))
    np.testing.assert_allclose(pix.numpy(), ref_pix, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score.numpy(), ref_score, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(5, 7), (40, 3), (1, 1), (2, 50), (17, 33), (64, 64)])
def test_gaussian_blur_matches_scipy(shape):
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1)) * 3
    got = scoring.gaussian_blur_scipy(x, backend="torch")
    ref = np.stack([ndimage.gaussian_filter(a, 4.0, truncate=4.0, mode="reflect") for a in x.double().numpy()])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=0)
    got = scoring.gaussian_blur_scipy(x, sigma=1.5, truncate=3.0, backend="torch")
    ref = np.stack([ndimage.gaussian_filter(a, 1.5, truncate=3.0) for a in x.double().numpy()])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=0)


def test_reflect_index_is_half_sample_symmetric():
    assert wdm.reflect_index(4, 4).tolist() == [3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]
    assert wdm.reflect_index(1, 2).tolist() == [0, 0, 0, 0, 0]
    # narrower than the radius it keeps reflecting (period 2n): check every offset against scipy itself
    for n, r in [(2, 5), (3, 16), (5, 16)]:
        x = np.arange(n, dtype=float) * 10
        idx = wdm.reflect_index(n, r).numpy()
        for d in range(-r, r + 1):
            onehot = np.zeros(2 * r + 1)
            onehot[d + r] = 1  # correlate1d: out[i] = sum_j w[j] x[i + j - r] = x[i + d]
            got = ndimage.correlate1d(x, onehot, mode="reflect")
            np.testing.assert_array_equal(got, x[idx[np.arange(n) + d + r]])
    assert wdm.gaussian_radius(4.0, 4.0) == 16 and wdm.gaussian_taps(4.0, 4.0).numel() == 33


@pytest.mark.parametrize("full_sort", [True, False])
def test_topk_mean_per_image_k(full_sort):
    s = torch.rand(4, 6, 5, generator=torch.Generator().manual_seed(2))
    s[1] = 0.5  # all ties
    k = torch.tensor([1, 7, 30, 13])
    got = wdm.topk_mean(s, k, full_sort)
    ref = [np.partition(a.ravel(), -int(kk))[-int(kk):].mean() for a, kk in zip(s.double().numpy(), k)]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6, rtol=0)


def test_no_host_sync_meta_tensors():
    """Meta tensors have no data, so any .item()/bool()/numpy() on values would raise: the path is sync-free."""
    maps = [torch.empty(2, h, h, device="meta") for h in (8, 4, 2)]
    pix, score = scoring.wdm_score(maps, (32, 32), backend="torch")
    assert pix.shape == (2, 32, 32) and score.shape == (2,) and score.device.type == "meta"


# ---------------------------------------------------------------------------------------------- k selection
def _const_maps(maxima, hw=(4, 4)):
    """Maps whose native maxima are exactly ``maxima`` (N, K): one peak pixel over a lower background."""
    maxima = torch.as_tensor(maxima, dtype=torch.float32)
    out = []
    for k in range(maxima.shape[1]):
        m = torch.full((maxima.shape[0], *hw), -1.0)
        m[:, 1, 2] = maxima[:, k]
        out.append(m)
    return out


def test_k_selection_corner_cases():
    hw = 256 * 256
    maxima = [[0.5] * 6,  # all equal -> all kept: w = 0.01 * 0.5
              [2.0, 0.1, 0.1, 0.1, 0.1, 0.1],  # one dominant map -> only it kept: w = 0.02
              [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # two above the mean of q
              [1e-4] * 5 + [2e-4],  # beta floor: 0.01 * 2e-4 < 3e-5
              [2.0] * 6]  # the largest k at 256x256 for maps in [0, 2]
    k, w = scoring.wdm_weights(_const_maps(maxima), 0.01, 3e-5, (256, 256))
    np.testing.assert_allclose(w.numpy(), [0.005, 0.02, 0.01, 3e-5, 0.02], rtol=1e-6)
    assert k.dtype == torch.int64
    assert k.tolist() == [int(hw * 0.005), int(hw * 0.02), int(hw * 0.01), 1, 1310]
    _, _, ref_k = scoring.wdm_score_reference(_const_maps(maxima), (256, 256))
    assert ref_k.tolist() == k.tolist()


def test_k_is_clamped_to_the_image():
    maps = _const_maps([[2.0] * 3, [0.0] * 3])
    k, _ = scoring.wdm_weights(maps, 1.0, 3e-5, (8, 8))  # w = 2 -> 128 > 64 pixels
    assert k.tolist() == [64, 1]  # and floor(64 * 3e-5) = 0 -> 1


# ---------------------------------------------------------------------------------------------- Triton vs torch
@pytest.mark.parametrize("c, channels_last, dtype", [(8, False, torch.float32), (40, True, torch.float32),
                                                     (16, False, torch.bfloat16)])
def test_triton_cos_maps_and_maxima(c, channels_last, dtype):
    tr = _triton_mod()
    ts, ss = _feats(2, [(6, 10), (3, 5), (1, 1)], c=c)
    conv = (lambda x: x.to(_dev(), dtype).contiguous(memory_format=torch.channels_last)) if channels_last \
        else (lambda x: x.to(_dev(), dtype))
    ts, ss = [conv(t) for t in ts], [conv(s) for s in ss]
    maps, maxima, flat, sizes = tr.cos_maps(ts, ss, block_p=32, block_c=16)
    ref = scoring.anomaly_maps(ts, ss, backend="torch")
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(maxima, wdm.map_maxima(ref), atol=1e-5, rtol=0)
    assert flat.shape == (2, 2 * (60 + 15 + 1)) and len(sizes) == 6


@pytest.mark.parametrize("sizes, out", [([(6, 10), (3, 5), (1, 1)], (12, 20)), ([(4, 4), (2, 3)], (1, 9)),
                                        ([(5, 3)], (9, 7))])
def test_triton_upsample_sum(sizes, out):
    tr = _triton_mod()
    maps = [m.to(_dev()) for m in _maps(2, sizes)]
    torch.testing.assert_close(tr.upsample_sum_maps(maps, out), wdm.upsample_sum(maps, out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(5, 7), (40, 3), (20, 24)])
def test_triton_blur(shape):
    tr = _triton_mod()
    x = (torch.rand(2, *shape, generator=torch.Generator().manual_seed(3)) * 3).to(_dev())
    torch.testing.assert_close(tr.gaussian_blur(x, block=256), wdm.gaussian_blur(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(tr.gaussian_blur(x, 1.5, 3.0), wdm.gaussian_blur(x, 1.5, 3.0), atol=1e-5, rtol=0)


def test_triton_end_to_end_matches_torch(monkeypatch):
    _triton_mod()
    ts, ss = _feats(3, [(8, 12), (4, 6), (2, 3)])
    ts, ss = [t.to(_dev()) for t in ts], [s.to(_dev()) for s in ss]
    ref_pix, ref_score = wdm.anomaly_map_wdm(ts, ss, (32, 48), backend="torch")
    pix, score = wdm.anomaly_map_wdm(ts, ss, (32, 48), backend="triton")
    torch.testing.assert_close(pix, ref_pix, atol=1e-5, rtol=0)
    torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=0)
    monkeypatch.setenv("UNINET_KERNELS", "triton")  # the public maps-level API, forced through the env
    pix2, score2 = scoring.wdm_score(scoring.anomaly_maps(ts, ss), (32, 48))
    torch.testing.assert_close(pix2, ref_pix, atol=1e-5, rtol=0)
    torch.testing.assert_close(score2, ref_score, atol=1e-5, rtol=0)


def test_backend_resolution(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("UNINET_KERNELS", "torch")
    assert wdm.resolve(x) == "torch"
    monkeypatch.setenv("UNINET_KERNELS", "auto")
    assert wdm.resolve(x) == "torch"  # CPU tensors never pick Triton on their own
    if _triton_mod().INTERPRETED:
        monkeypatch.setenv("UNINET_KERNELS", "triton")
        assert wdm.resolve(x) == "triton"
    with pytest.raises(ValueError):
        wdm.resolve(x, "cuda-magic")


@pytest.mark.parametrize("smoothed", [False, True])
def test_bad_maps_are_refused_with_their_shapes(smoothed):
    """No maps, maps of different batch sizes or a map with no pixels: a ValueError naming the shapes, not an
    IndexError or a torch.stack message; an empty batch is fine and scores nothing."""
    for maps, match in (([], "none"), ([torch.rand(2, 4, 4), torch.rand(3, 4, 4)], r"\(3, 4, 4\)"),
                        ([torch.rand(2, 0, 4)] * 2, r"\(2, 0, 4\)")):
        with pytest.raises(ValueError, match=match):
            scoring.wdm_score(maps, 8, smoothed=smoothed)
    a, s = scoring.wdm_score([torch.rand(0, 4, 4)] * 2, 8, smoothed=smoothed)
    assert a.shape == (0, 8, 8) and s.shape == (0,)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_feature_pairs_of_other_batch_sizes_or_no_pixels_are_refused_on_every_path(backend):
    """The Triton path sized its buffers from the first pair's N and never checked the others: a smaller later
    N read past the buffer (garbage, NaN scores), a larger one dropped images, an empty level scored."""
    if backend == "triton":
        _triton_mod()
    for sizes, n2 in (([(4, 4), (2, 2)], 2), ([(4, 4), (2, 2)], 4), ([(4, 4), (0, 4)], 3)):
        ts, ss = _feats(3, sizes)
        ts[1], ss[1] = ts[1][:1].expand(n2, -1, -1, -1).clone(), ss[1][:1].expand(n2, -1, -1, -1).clone()
        with pytest.raises(ValueError, match="same N and h, w >= 1"):
            wdm.anomaly_map_wdm([t.to(_dev()) for t in ts], [s.to(_dev()) for s in ss], 8, backend=backend)


def test_maps_on_two_devices_are_refused_before_any_kernel():
    """A pair on another device than the first was read by the Triton path through the first one's pointers."""
    ts, ss = _feats(2, [(4, 4), (2, 2)])
    ss[1] = ss[1].to("meta")
    with pytest.raises(ValueError, match="on one device"):
        wdm.anomaly_map_wdm(ts, ss, 8, backend="torch")
