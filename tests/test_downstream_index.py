"""FAISS index wrapper, coreset and kNN scorer: exactness, recall, persistence, errors. Small and fast."""
import json

import faiss
import numpy as np
import pytest

from uninet_feat.downstream import (KNNScorer, build_index, coreset_subsample, load_index, save_index,
                                    search)
from uninet_feat.downstream import index as index_mod
from uninet_feat.errors import BadInputError


def clustered(n, d=32, n_clusters=20, rank=6, noise=0.05, seed=0):
    """Cluster centres + a low-rank spread inside each cluster + small noise (feature-like data)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)) * 4
    basis = rng.standard_normal((n_clusters, rank, d))
    lab = rng.integers(n_clusters, size=n)
    z = rng.standard_normal((n, rank))
    x = centres[lab] + np.einsum("nr,nrd->nd", z, basis[lab]) + noise * rng.standard_normal((n, d))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(4200, seed=0)
    return x[:4000], x[4000:]


@pytest.fixture(scope="module")
def indices(data):
    base, _ = data
    return {k: build_index(base, k, m_pq=8) if k == "ivfpq" else build_index(base, k) for k in index_mod.KINDS}


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_matches_brute_force(data, metric):
    base, q = data
    dist, lab = search(build_index(base, "flat", metric=metric), q, 5)
    if metric == "l2":
        ref = np.sqrt(((q[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1))
        order = np.argsort(ref, 1)[:, :5]
    else:
        ref = q.astype(np.float64) @ base.T
        order = np.argsort(-ref, 1)[:, :5]
    np.testing.assert_array_equal(lab, order)
    np.testing.assert_allclose(dist, np.take_along_axis(ref, order, 1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", index_mod.KINDS)
def test_save_load_identical(indices, data, tmp_path, kind):
    _, q = data
    path = tmp_path / f"{kind}.faiss"
    save_index(indices[kind], path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    d0, l0 = search(indices[kind], q, 3)
    d1, l1 = search(load_index(path), q, 3)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(d0, d1)


@pytest.mark.parametrize("kind,bound", [("hnsw", 0.95), ("ivfpq", 0.6)])
def test_approximate_recall_at_1(indices, data, kind, bound):
    _, q = data
    _, ref = search(indices["flat"], q, 1)
    _, got = search(indices[kind], q, 1)
    assert (got[:, 0] == ref[:, 0]).mean() > bound


def test_auto_sizes_and_bad_pq():
    assert index_mod.auto_nlist(1_000_000) == 4000 and index_mod.auto_nlist(1000) == 25
    assert index_mod.auto_nlist(10) == 1
    for d in (8, 64, 128, 256, 1536, 100, 7, 152, 739, 1478):
        d_pad, m = index_mod.pq_layout(d)
        assert d_pad >= d and d_pad % m == 0 and m <= max(1, d // 4) and m in index_mod._GPU_PQ_M
        assert m == index_mod.auto_m_pq(d) and (d_pad == d or m >= 8)
    assert index_mod.pq_layout(256) == (256, 64) and index_mod.pq_layout(152) == (152, 8)   # divisors kept
    assert index_mod.pq_layout(739) == (768, 64)   # Lite0's image vector: prime, m was 1 (a 1-byte code)
    assert index_mod.factory_string("ivfpq", 739, 5000) == "Pad768,IVF128,PQ64x8np"
    assert index_mod.pq_layout(10, m_pq=3) == (12, 3)   # a given m that does not divide d pads d too
    with pytest.raises(BadInputError, match="m_pq must be >= 1"):
        build_index(np.zeros((300, 10), np.float32), "ivfpq", m_pq=0)
    with pytest.raises(BadInputError, match="ivfpq needs at least"):
        build_index(np.zeros((100, 8), np.float32), "ivfpq")


@pytest.mark.parametrize("kind,bad", [("ivfpq", {"nlist": 0}), ("hnsw", {"hnsw_m": 0}), ("hnsw", {"ef_search": 0}),
                                      ("ivfpq", {"nprobe": 0}), ("ivfpq", {"nbits": 0}), ("ivfpq", {"nbits": 17}),
                                      ("hnsw", {"ef_search": 2.5}), ("ivfpq", {"nlist": True})])
def test_index_counts_below_one_are_refused_before_faiss_sees_them(kind, bad):
    """nlist 0 crashed the interpreter (segfault), hnsw_m 0 aborted it, ef_search 0 gave wrong neighbours without a
    word and nprobe 0 a bare faiss RuntimeError at search time (an audit, session 52)."""
    x = np.random.default_rng(0).standard_normal((400, 32)).astype(np.float32)
    name = next(iter(bad))
    with pytest.raises(BadInputError, match=rf"{name} must be"):
        build_index(x, kind, device="cpu", **bad)
    index = build_index(x, kind, device="cpu")
    if name in ("nprobe", "ef_search"):   # as a search setting of a built index too
        with pytest.raises(BadInputError, match=rf"{name} must be"):
            index_mod.set_search_params(index, **bad)
    assert search(index, x[:3], 1)[1][:, 0].tolist() == [0, 1, 2]



@pytest.mark.parametrize("kind,bad", [("ivfpq", {"nlist": 0}), ("ivfflat", {"nlist": 0}), ("ivfpq", {"nbits": 0}),
                                      ("ivfpq", {"nbits": 17}), ("ivfpq", {"nlist": 2.5}), ("ivfpq", {"nprobe": 0})])
def test_the_sharded_build_refuses_the_counts_build_index_refuses(kind, bad):
    """`merge.train_empty_index` skipped `build_index`'s checks: nlist 0 segfaulted (ivfpq) or gave a bare numpy
    error (ivfflat), nbits 0 built a meaningless index and nlist 2.5 was truncated (an audit, session 53)."""
    from uninet_feat.downstream.merge import train_empty_index
    x = np.random.default_rng(0).standard_normal((400, 32)).astype(np.float32)
    with pytest.raises(BadInputError, match=rf"{next(iter(bad))} must be"):
        train_empty_index([x[:200], x[200:]], kind, **bad)

def test_ivfpq_over_a_width_with_no_useful_divisor_finds_neighbours_as_an_even_width_does():
    """A store's image vector is 4 * channels + 35 columns wide, always odd: auto sizing gave IVF-PQ a code of 1-3
    bytes (m = 1 for 739 dims), whose 10 hits held the true nearest neighbour for 28 % of queries (99.9 % padded,
    `benchmarks.bench_index --d 739`). Such a width is now zero-padded to a multiple of a useful m, and merges
    shard by shard as any index."""
    from uninet_feat.downstream.merge import build_sharded_index
    x = clustered(4200, d=75, seed=3)   # 75 = 3 * 5 * 5: divisors 1 and 3 only among the GPU code sizes
    base, q = x[:4000], x[4000:]
    index = build_index(base, "ivfpq", device="cpu")
    assert isinstance(index, faiss.IndexPreTransform) and index.d == 75
    _, exact = search(build_index(base, "flat"), q, 10)
    _, got = search(index, q, 1)
    assert np.mean([g in e for g, e in zip(got[:, 0], exact)]) > 0.95   # 0.88 with m = 3
    merged = build_sharded_index([base[:2500], base[2500:]], "ivfpq")
    np.testing.assert_array_equal(search(merged, q, 3)[1], search(index, q, 3)[1])


def test_bad_vectors_named():
    x = np.ones((10, 4), np.float32)
    x[[2, 7], 1] = [np.nan, np.inf]
    with pytest.raises(BadInputError, match=r"2 of 10 vectors contain NaN or Inf \(rows \[2, 7\]"):
        build_index(x)
    ok = build_index(np.ones((10, 4), np.float32))
    with pytest.raises(BadInputError, match="queries have dimension 3"):
        search(ok, np.ones((1, 3), np.float32))


def test_load_errors(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_index(tmp_path / "nope.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index at all")
    with pytest.raises(BadInputError, match="not a readable FAISS index"):
        load_index(bad)


def test_gpu_branch_without_gpu(monkeypatch):
    x = np.ones((10, 4), np.float32)
    with pytest.raises(BadInputError, match="no GPU"):
        build_index(x, device="cuda")
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda ix: moved.append(ix) or ix)
    build_index(x, "flat")
    build_index(x, "hnsw")        # no GPU HNSW in faiss: stays on CPU
    build_index(x, "flat", device="cpu")
    assert len(moved) == 1


def covering_radius(x, idx):
    d, _ = search(build_index(x[idx]), x, 1)
    return d.max()


def test_coreset_spread_and_deterministic():
    x = clustered(3000, d=48, rank=2, seed=1)
    a = coreset_subsample(x, ratio=0.05, seed=3, proj_dim=16, device="cpu")  # projected 48 -> 16 dims
    assert len(a) == 150 and len(np.unique(a)) == 150
    np.testing.assert_array_equal(a, coreset_subsample(x, ratio=0.05, seed=3, proj_dim=16, device="cpu"))
    rand = min(covering_radius(x, np.random.default_rng(s).choice(len(x), 150, replace=False)) for s in range(3))
    assert covering_radius(x, a) < 0.7 * rand
    assert covering_radius(x, coreset_subsample(x, n=150, proj_dim=None, device="cpu")) < 0.6 * rand
    assert len(coreset_subsample(x, n=5000)) == 3000


def test_knn_flags_outlier_patch_and_persists(tmp_path):
    rng = np.random.default_rng(0)
    h = w = 6
    normal = clustered(12 * h * w, d=16, n_clusters=5, seed=2).reshape(12, h * w, 16)
    test = clustered(3 * h * w, d=16, n_clusters=5, seed=2).reshape(3, h * w, 16)  # same distribution
    test[1, 2 * w + 4] += 25 * rng.standard_normal(16).astype(np.float32)      # outlier at row 2, col 4
    sc = KNNScorer("flat", k=3, coreset_ratio=0.5, seed=0, device="cpu").fit(normal)
    maps, img = sc.score_maps(test, (h, w), 48)
    assert maps.shape == (3, 48, 48) and img.shape == (3,)
    assert int(np.argmax(img)) == 1
    r, c = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert (r // 8, c // 8) == (2, 4)
    sc.save(tmp_path / "knn")
    meta = json.loads((tmp_path / "knn" / "knn.json").read_text())
    # where the coreset ran: its picks are the seed's on that kind of device ("auto" resolved)
    assert meta["n_memory"] == sc.index.ntotal and meta["coreset_device"] == "cpu"
    again = KNNScorer.load(tmp_path / "knn", device="cpu")
    assert again.coreset_device == "cpu"
    assert KNNScorer("flat", k=3, coreset_ratio=None, device="auto").fit(normal).coreset_device is None
    np.testing.assert_array_equal(again.score_patches(test), sc.score_patches(test))
    np.testing.assert_array_equal(KNNScorer("flat", k=3, coreset_ratio=0.5, seed=0, device="cpu").fit(normal)
                                  .score_patches(test), sc.score_patches(test))
    with pytest.raises(BadInputError, match=r"no knn.json.*uninet-feat index --out DIR"):
        KNNScorer.load(tmp_path)


def test_knn_scores_refuse_what_would_score_inf_or_backwards():
    """k above the bank, IVF lists probed too few, or an inner-product index: refused with the fix, never an
    inf (or a similarity, larger for more normal) passed on as an anomaly score."""
    from uninet_feat.downstream.index import build_index, set_search_params
    from uninet_feat.downstream.knn import knn_scores
    bank, q = clustered(600, d=16, n_clusters=5, seed=3), clustered(4, d=16, n_clusters=5, seed=4)
    flat = build_index(bank[:3], kind="flat", device="cpu")
    with pytest.raises(BadInputError, match=r"k = 5 nearest neighbours asked of an index of 3 vectors"):
        knn_scores(flat, q, k=5)
    assert np.isfinite(knn_scores(flat, q, k=3)).all()
    ivf = build_index(bank, kind="ivfpq", nlist=16, m_pq=4, device="cpu")
    set_search_params(ivf, nprobe=1)
    with pytest.raises(BadInputError, match=r"queries found fewer than k = 100 neighbours .*nprobe"):
        knn_scores(ivf, q, k=100)
    with pytest.raises(BadInputError, match="need an l2 index"):
        knn_scores(build_index(bank, kind="flat", metric="ip", device="cpu"), q, k=1)


def test_knn_json_pins_its_index_file(tmp_path):
    """knn.json records index.faiss's sha256: another index in its place (a kill between the two writes of a
    re-index, a copied file) is refused instead of scoring with the wrong bank; a save removes a stale ids.json."""
    a = KNNScorer("flat", k=1, coreset_ratio=1.0, device="cpu").fit(clustered(200, d=8, seed=1))
    b = KNNScorer("flat", k=1, coreset_ratio=1.0, device="cpu").fit(clustered(200, d=8, seed=2))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ids.json").write_text("[]")
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert not (tmp_path / "a" / "ids.json").exists()
    q = clustered(5, d=8, seed=3)
    np.testing.assert_array_equal(KNNScorer.load(tmp_path / "a", device="cpu").score_patches(q), a.score_patches(q))
    (tmp_path / "a" / "index.faiss").write_bytes((tmp_path / "b" / "index.faiss").read_bytes())
    with pytest.raises(BadInputError, match="index.faiss is not the index knn.json was written with"):
        KNNScorer.load(tmp_path / "a", device="cpu")


def test_a_coreset_that_will_take_long_on_the_cpu_says_so_first(monkeypatch):
    """Greedy k-center is quadratic in the bank at a fixed ratio (a scaling audit: 10 h for 100,000 images at
    64 px): before it starts, a warning with the estimated time and the ways out; a quick one stays quiet."""
    import warnings
    from uninet_feat.downstream import coreset
    x = np.random.default_rng(0).random((2000, 16), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = coreset.coreset_subsample(x, ratio=0.1, device="cpu")
    monkeypatch.setattr(coreset, "CPU_RATE", 1e3)   # as if this CPU were a million times slower
    said = r"coreset of 200 of 2,000 vectors will take about \d+ min.*--coreset .0.01"
    with pytest.warns(UserWarning, match=said):
        slow = coreset.coreset_subsample(x, ratio=0.1, device="cpu")
    assert np.array_equal(quiet, slow)


def test_a_killed_coreset_selection_resumes_from_its_last_save_to_the_same_picks(tmp_path, monkeypatch):
    """`coreset_subsample(state=F)` saves its picks as it goes: killed after its second save and run again, it
    starts from the 128 picks saved and ends with the uninterrupted selection; a state of other settings is not
    reused; a finished selection leaves no state."""
    from uninet_feat.downstream import coreset as cs
    x = np.random.default_rng(0).standard_normal((3000, 40)).astype(np.float32)
    straight = cs.coreset_subsample(x, n=300, seed=3, proj_dim=16, device="cpu")
    monkeypatch.setattr(cs, "STATE_SECONDS", 0.0)   # save at every 64th pick
    state, real_save, real_resume = tmp_path / "state.npz", cs._save_state, cs._resume
    saves, starts = [], []

    def save_then_die(*a):
        real_save(*a)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(cs, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cs.coreset_subsample(x, n=300, seed=3, proj_dim=16, device="cpu", state=state)
    monkeypatch.setattr(cs, "_save_state", real_save)
    monkeypatch.setattr(cs, "_resume", lambda *a: starts.append(real_resume(*a)[0]) or real_resume(*a))
    np.testing.assert_array_equal(cs.coreset_subsample(x, n=300, seed=3, proj_dim=16, device="cpu", state=state),
                                  straight)
    assert starts == [128] and not state.exists()
    with pytest.raises(KeyboardInterrupt):   # killed again, then asked for another seed: the state is not its own
        monkeypatch.setattr(cs, "_save_state", save_then_die)
        saves.clear()
        cs.coreset_subsample(x, n=300, seed=3, proj_dim=16, device="cpu", state=state)
    monkeypatch.setattr(cs, "_save_state", real_save)
    other = cs.coreset_subsample(x, n=300, seed=4, proj_dim=16, device="cpu", state=state)
    np.testing.assert_array_equal(other, cs.coreset_subsample(x, n=300, seed=4, proj_dim=16, device="cpu"))
    assert starts[-1] == 0


def test_an_hnsw_scorer_that_cannot_reach_k_neighbours_is_refused_when_built_and_says_why():
    """k equal to the bank's size was accepted and saved, then every score failed, blaming an IVF index and
    suggesting 'a flat or HNSW index' for an HNSW one."""
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    assert KNNScorer(kind="hnsw", k=150, coreset_ratio=None, device="cpu").fit(x).score_patches(x[:3]).shape == (3,)
    with pytest.raises(BadInputError, match=r"an HNSW graph search reaches fewer than k of its 200 vectors.*"
                                            r"a smaller --k, or an exact index"):
        KNNScorer(kind="hnsw", k=200, coreset_ratio=None, device="cpu").fit(x)
    assert KNNScorer(k=200, coreset_ratio=None, device="cpu").fit(x).score_patches(x[:3]).shape == (3,)   # flat


def _no_gpu(monkeypatch, torch_gpus=0, faiss_gpus=0):
    """As if torch and faiss saw these many GPUs, whatever this machine has."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: torch_gpus)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: faiss_gpus)


def test_a_device_either_half_of_the_knn_scorer_cannot_use_is_refused_before_the_coreset(monkeypatch):
    """The coreset (torch) and the index (faiss) read ``device`` differently: 'gpu' crashed torch with a raw
    RuntimeError, 'cuda' on a CPU-only torch gave an AssertionError, and 'cuda:0' was refused by faiss only after
    the coreset (an hour on a CPU). Every name is now checked against both halves before any coreset work."""
    from uninet_feat.downstream import knn
    x = clustered(400, d=8, seed=1)
    real = knn.coreset_subsample
    monkeypatch.setattr(knn, "coreset_subsample", lambda *a, **k: pytest.fail("coreset ran before the refusal"))
    _no_gpu(monkeypatch)
    for device, said in [("gpu", "faiss sees no GPU"), ("cuda", "faiss sees no GPU"), ("cuda:0", "faiss sees no GPU"),
                         ("tpu", "unknown device 'tpu'"), ("", "unknown device ''")]:
        with pytest.raises(BadInputError, match=said):
            KNNScorer("flat", k=1, coreset_ratio=0.5, device=device).fit(x)
    _no_gpu(monkeypatch, torch_gpus=1)   # torch has a GPU, faiss-cpu has none: refused before the coreset
    with pytest.raises(BadInputError, match="'cuda:0' asked for, but faiss sees no GPU"):
        KNNScorer("flat", k=1, coreset_ratio=0.5, device="cuda:0").fit(x)
    _no_gpu(monkeypatch, faiss_gpus=1)   # the other way round
    with pytest.raises(BadInputError, match="'gpu' asked for, but torch sees no GPU"):
        KNNScorer("flat", k=1, coreset_ratio=0.5, device="gpu").fit(x)
    _no_gpu(monkeypatch)
    monkeypatch.setattr(knn, "coreset_subsample", real)
    q = clustered(5, d=8, seed=2)
    want = KNNScorer("flat", k=1, coreset_ratio=0.5, device="cpu").fit(x).score_patches(q)
    np.testing.assert_array_equal(KNNScorer("flat", k=1, coreset_ratio=0.5, device="auto").fit(x).score_patches(q),
                                  want)


def test_devices_map_to_torch_and_faiss_alike(monkeypatch):
    """cuda:N is GPU N for both torch and faiss; gpu and cuda are all of faiss's GPUs and torch's current one; a GPU
    either does not have, or one asked for directly of coreset_subsample on a CPU-only torch, is refused by name."""
    import torch
    from uninet_feat.downstream.coreset import torch_device
    x = np.ones((10, 4), np.float32)
    _no_gpu(monkeypatch)
    for device in ("cuda", "gpu", "cuda:0"):
        with pytest.raises(BadInputError, match="torch sees no GPU"):
            coreset_subsample(x, n=2, device=device)
    _no_gpu(monkeypatch, torch_gpus=2, faiss_gpus=2)
    assert [torch_device(d) for d in ("cuda:1", "gpu", "cuda", "cpu")] == [
        torch.device("cuda:1"), torch.device("cuda"), torch.device("cuda"), torch.device("cpu")]
    with pytest.raises(BadInputError, match="torch sees 2 GPU"):
        torch_device("cuda:2")
    moved = []
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda ix: moved.append("all") or ix)
    monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", lambda ix, gpus: moved.append(gpus) or ix)
    for device in ("cuda:1", "gpu", "cuda", "auto", "cpu"):
        build_index(x, "flat", device=device)
    assert moved == [[1], "all", "all", "all"]
    with pytest.raises(BadInputError, match="faiss sees 2 GPU"):
        build_index(x, "flat", device="cuda:2")


def test_score_maps_image_score_is_the_highest_patch_score_as_predict_gives():
    """score_maps took the max of the bilinearly upsampled map, which lowers an isolated hot patch (align_corners
    False: 13.455 for a patch scoring 14.993), so it disagreed with predict and evaluate --knn (`scorers.knn_scores`,
    the highest patch score)."""
    from uninet_feat.scorers import knn_scores
    rng = np.random.default_rng(0)
    h = w = 4
    normal = clustered(10 * h * w, d=16, n_clusters=5, seed=2).reshape(10, h * w, 16)
    test = clustered(2 * h * w, d=16, n_clusters=5, seed=2).reshape(2, h * w, 16)
    test[1, 1 * w + 2] += 25 * rng.standard_normal(16).astype(np.float32)   # one hot patch
    sc = KNNScorer("flat", k=1, coreset_ratio=None, device="cpu").fit(normal)
    maps, img = sc.score_maps(test, (h, w), 32)
    patch = sc.score_patches(test)
    np.testing.assert_array_equal(img, patch.max(1))
    res = {"patches": test, "index": np.arange(len(test))}
    np.testing.assert_array_equal(img, knn_scores(sc, None, [None] * len(test), res=res)[0])
    assert maps[1].max() < img[1] - 1   # the map's max is lower: the score it was


def test_bad_settings_and_shapes_are_named_before_any_work():
    """A bad kind or a metric reached the scorer only after the coreset (an hour on a CPU); proj_dim 0 made every
    coreset distance 0 (arbitrary picks); zero-width vectors made a flat index of distances 0; merge gave numpy's
    and faiss's own errors."""
    from uninet_feat.downstream import merge
    x = np.random.default_rng(0).standard_normal((300, 8)).astype("f4")
    with pytest.raises(BadInputError, match="unknown index kind 'ivf'"):
        KNNScorer(kind="ivf")
    with pytest.raises(BadInputError, match="metric is not an option"):
        KNNScorer(metric="ip")
    with pytest.raises(BadInputError, match="proj_dim must be a whole number >= 1"):
        coreset_subsample(x, n=5, proj_dim=0, device="cpu")
    with pytest.raises(BadInputError, match="no vectors to select"):
        coreset_subsample(x[:0], n=5, device="cpu")
    with pytest.raises(BadInputError, match="have no columns"):
        build_index(np.zeros((5, 0), "f4"))
    with pytest.raises(BadInputError, match="shard 1 has shape"):
        merge.train_empty_index([x, np.zeros((300, 16), "f4")], kind="ivfpq", nlist=4, m_pq=4, nbits=4)
    one = merge.train_empty_index([x], kind="ivfpq", nlist=4, m_pq=4, nbits=4)
    other = merge.train_empty_index([x[::-1] * 3], kind="ivfpq", nlist=4, m_pq=4, nbits=4, seed=1)
    with pytest.raises(BadInputError, match="faiss cannot merge these shards"):
        merge.merge_indices([merge.fill_shard(one, x[:10]), merge.fill_shard(other, x[10:20])])


def test_knn_setup_keeps_the_index_on_the_cpu_beside_a_cuda_model_when_faiss_has_no_gpu(monkeypatch, tmp_path):
    """knn_setup loaded the index on the run model's device (cuda:0), which faiss-cpu (the default install) refused:
    predict / evaluate --knn failed on every CUDA machine. It goes to the CPU then, as `index --device auto` does."""
    import types

    import torch
    from uninet_feat import scorers
    x, q = clustered(50, d=8, seed=1), clustered(5, d=8, seed=2)
    want = KNNScorer("flat", k=1, coreset_ratio=None, device="cpu").fit(x)
    want.save(tmp_path)
    _no_gpu(monkeypatch, torch_gpus=1)   # torch sees a GPU, faiss none
    ex = types.SimpleNamespace(device=torch.device("cuda", 0), run_dir=tmp_path)
    with pytest.warns(UserWarning, match="records no source model"):
        scorer, kex = scorers.knn_setup(tmp_path, ex)
    assert kex is None and scorer.device == "cpu"
    np.testing.assert_array_equal(scorer.score_patches(q), want.score_patches(q))


def test_a_k_above_the_memory_bank_is_refused_at_fit_not_lowered_unsaid(monkeypatch):
    """k above the bank's size was lowered to it when scoring while knn.json recorded k: refused at fit, before any
    coreset, naming both; an index whose k its bank cannot give is refused when it scores."""
    from uninet_feat.downstream import knn
    x = clustered(40, d=8, seed=1)
    with pytest.raises(BadInputError, match=r"k = 5 nearest neighbours asked of a memory bank of 3 normal patches"
                                            r" \(fix: a smaller --k \(at most 3\), or a larger bank"):
        KNNScorer("flat", k=5, coreset_ratio=None, device="cpu").fit(x[:3])
    real = knn.coreset_subsample
    monkeypatch.setattr(knn, "coreset_subsample", lambda *a, **k: pytest.fail("coreset ran before the refusal"))
    with pytest.raises(BadInputError, match=r"bank of 4 normal patches \(a coreset of 0.1 of 40\).*--coreset"):
        KNNScorer("flat", k=5, coreset_ratio=0.1, device="cpu").fit(x)   # ceil(0.1 * 40) = 4
    monkeypatch.setattr(knn, "coreset_subsample", real)
    assert KNNScorer("flat", k=4, coreset_ratio=0.1, device="cpu").fit(x).index.ntotal == 4
    s = KNNScorer("flat", k=5, coreset_ratio=None, device="cpu")
    s.index = build_index(x[:3], "flat", device="cpu")   # e.g. one saved before the refusal
    with pytest.raises(BadInputError, match="k = 5 nearest neighbours asked of an index of 3 vectors"):
        s.score_patches(x[:2])
