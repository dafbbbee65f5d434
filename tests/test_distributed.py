"""torchrun training (DDP + global BN) equals one process; sharded extraction; sharded FAISS merge.

The torchrun tests launch ``python -m torch.distributed.run --standalone --nproc-per-node 2`` on this
file (its ``__main__`` block is the worker), CPU/gloo, TinyBackbone at 64 px, a few steps. Every
launch has a timeout and its process group is killed on the way out.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _tiny import register_tiny, write_texture_set  # noqa: E402
from uninet_feat import featstore  # noqa: E402

register_tiny()
# global batch 4 = 2 ranks x 2 images (unequal slices are checked at the gradient level: _gradcheck)
BASE = {"backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 2, "batch_size": 4,
        "val_fraction": 0.2, "channels_last": False, "seed": 7, "dfs": "learned"}  # learned: φ trained too
LAUNCH_TIMEOUT = 420


# ----------------------------------------------------------------------------- worker (under torchrun)
def _float64() -> None:
    """Test-only: train the model in float64 (inputs cast on the way in).

    UniNet's loss is badly conditioned at a random init: in float32, merely swapping ATen's BatchNorm
    for the same statistics summed in another order moves one step's gradients by ~1% (measured,
    one process). In float64 that noise is ~1e-14, so the equality test sees the implementation,
    not rounding. The distributed code path is the same in both precisions.
    """
    import uninet_feat.train as T
    from uninet_feat.model.uninet import UniNet
    make = T.make_model
    T.make_model = lambda cfg, *saved: make(cfg, *saved).double()
    fwd = UniNet.forward
    UniNet.forward = lambda self, x, *a: fwd(self, x.to(self.bottleneck.parameters().__next__().dtype), *a)


def _gradcheck(dd, batch: int, report: str) -> None:
    """One step, float64: DDP + global BN gradients on rank slices vs the full batch in one process."""
    from uninet_feat.config import load_config
    from uninet_feat.distributed import rank_slice
    from uninet_feat.runs import make_model
    cfg = load_config(None, {"data": "-"}, base=BASE)
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(0)
    ref = make_model(cfg).double().train()
    ref.loss(ref(x))["loss"].backward()
    torch.manual_seed(0)
    model = make_model(cfg).double().train()
    step = dd.wrap(model)
    terms, local = dd.loss(step, x[rank_slice(list(range(batch)), dd.rank, dd.world_size)], None, None, None, batch)
    local.backward()
    rel, g_ref = {}, dict(ref.named_parameters())
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if not p.requires_grad:  # the frozen source teacher
            continue
        if p.grad is None:  # a trainable parameter DDP never reduced
            rel[part] = float("inf")
            continue
        scale = max(float(q.grad.abs().max()) for n, q in g_ref.items() if n.startswith(part) and q.grad is not None)
        rel[part] = max(rel.get(part, 0.0), float((p.grad - g_ref[name].grad).abs().max()) / scale)
    bufs = max(float((b - dict(ref.named_buffers())[n]).abs().max()) for n, b in model.named_buffers())
    losses = [float(terms["loss"]), float(ref.loss(ref(x))["loss"])]
    Path(f"{report}.{dd.rank}").write_text(json.dumps({"rel_grad": rel, "buffers": bufs, "loss": losses}))


def _worker(jobs_file: str) -> None:
    """Runs the jobs in order; under torchrun the process group is set up once for all of them."""
    from uninet_feat.config import load_config
    from uninet_feat.distributed import init_from_env
    from uninet_feat.train import train
    from uninet_feat.workflows import extract_cmd
    dd = init_from_env()
    for job in json.loads(Path(jobs_file).read_text()):
        if job.get("float64"):
            _float64()
        if job["do"] == "gradcheck":
            _gradcheck(dd, job["batch"], job["report"])
        elif job["do"] == "train":
            cfg = load_config(None, job["cfg"], base=BASE)
            train(cfg, job["out"], resume=job.get("resume", False), quiet=True)
        elif job["do"] == "extract":
            res = extract_cmd(job["data"], job["out"], run=job["run"], patches=True, shard_size=job["shard_size"],
                              quiet=True, validate=True)
            Path(job["report"] + f".{os.environ.get('RANK', 0)}").write_text(json.dumps(res))
    dd.close()


def launch(jobs, tmp_path, nproc=2, env_extra=None) -> float:
    """Run ``jobs`` in ``nproc`` processes (torchrun) or one plain process (``nproc=0``), with ``env_extra`` set;
    returns the wall time. The whole process group is killed on timeout."""
    jf = tmp_path / f"jobs-{time.monotonic_ns()}.json"
    jf.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    run = [sys.executable]
    if nproc:
        run += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    t0 = time.time()
    p = subprocess.Popen(run + [str(Path(__file__).resolve()), str(jf)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT}s")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out.decode(errors="replace")[-6000:]
    return time.time() - t0


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    return write_texture_set(tmp_path_factory.mktemp("tex"), n_train=10)


@pytest.fixture(scope="module")
def runs(texture, tmp_path_factory):
    """The same 2-epoch float64 run: one plain process; torchrun 2 ranks (after a one-step gradient check)
    for 1 epoch, then --resume to 2 epochs (that launch also extracts features with 2 ranks)."""
    tmp = tmp_path_factory.mktemp("dist")
    single, multi = tmp / "single", tmp / "multi"
    cfg = {"data": str(texture)}
    t_single = launch([{"do": "train", "cfg": cfg, "out": str(single), "float64": True}], tmp, nproc=0)
    t_multi = launch([{"do": "gradcheck", "batch": 3, "report": str(tmp / "grad")},
                      {"do": "train", "cfg": {**cfg, "epochs": 1}, "out": str(multi), "float64": True}], tmp)
    t_resume = launch([{"do": "train", "cfg": cfg, "out": str(multi), "resume": True, "float64": True},
                       {"do": "extract", "data": str(texture), "run": str(multi), "out": str(tmp / "feat2"),
                        "shard_size": 3, "report": str(tmp / "report")}], tmp)
    print(f"\n[timing] wall incl. process start: 1 process 2 epochs {t_single:.1f}s; "
          f"torchrun 2 ranks gradcheck + 1 epoch "
          f"{t_multi:.1f}s, resume to 2 epochs + 2-rank extract {t_resume:.1f}s")
    return {"single": single, "multi": multi, "tmp": tmp, "data": texture}


# ----------------------------------------------------------------------------- data sharding
@pytest.mark.parametrize("n,batch,world", [(8, 4, 2), (8, 3, 2), (10, 4, 3), (3, 4, 2)])
def test_rank_slices_are_the_single_process_batches(n, batch, world):
    from uninet_feat.distributed import shard_batches

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"index": i, "image": torch.full((1,), float(i))}

    drop = n > batch
    ref = [b["index"].tolist() for b in torch.utils.data.DataLoader(
        DS(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(5), drop_last=drop)]
    per_rank = [list(shard_batches(DS(), batch, torch.Generator().manual_seed(5), drop, r, world))
                for r in range(world)]
    assert all(len(p) == len(ref) for p in per_rank)
    for j, b in enumerate(ref):
        parts = [p[j] for p in per_rank]
        assert sum((q["index"].tolist() for q in parts), []) == b
        assert all(q["global_batch_size"] == len(b) for q in parts)
        assert max(len(q["index"]) for q in parts) - min(len(q["index"]) for q in parts) <= 1


def test_init_from_env_is_a_noop_without_torchrun(monkeypatch):
    from uninet_feat.distributed import init_from_env
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dd = init_from_env()
    assert not dd.enabled and dd.is_main and dd.wrap(torch.nn.Linear(1, 1)) is None
    dd.barrier()
    dd.close()


# ----------------------------------------------------------------------------- (a) DDP training
def test_ddp_training_equals_single_process(runs):
    from uninet_feat.checkpoint import read_checkpoint
    a = read_checkpoint(runs["single"] / "model.pt")
    b = read_checkpoint(runs["multi"] / "model.pt")
    assert b["epoch"] == 2
    worst = 0.0
    for k, v in a["state_dict"].items():
        w = b["state_dict"][k]
        assert v.shape == w.shape, k
        if v.is_floating_point():
            worst = max(worst, float((v - w).abs().max()))
            assert torch.allclose(v, w, rtol=1e-6, atol=1e-7), (k, float((v - w).abs().max()))
        else:
            assert torch.equal(v, w), k  # num_batches_tracked: same number of BN updates
    print(f"\n[ddp] max |single - 2 ranks| over all weights and BN buffers (float64): {worst:.2e}")
    la = [json.loads(line) for line in (runs["single"] / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (runs["multi"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [1, 2] and [r["steps"] for r in la] == [r["steps"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("loss", "cos", "sc", "margin"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-8), key
    for name in ("config.yaml", "env.json", "checkpoint.pt", "calibration.json"):
        assert (runs["multi"] / name).exists(), name
    assert not list(runs["multi"].glob(".*.tmp"))


def test_ddp_training_with_edits_in_worker_processes_equals_edits_drawn_in_place(texture, tmp_path):
    """UNINET_EDITS=processes under torchrun: each rank spawns its own edit worker, and a batch's edits are seeded by
    (epoch, step, rank), so 2 ranks train the model the in-place edits train, to the bit (a worker that drew rank
    0's edits for every rank, or lost a step, would not)."""
    from uninet_feat.checkpoint import read_checkpoint
    cfg = {"data": str(texture), "epochs": 1, "denoise": 1.0, "val_fraction": 0.0}
    runs = {mode: tmp_path / mode.split(":")[0] for mode in ("inplace", "processes:1", "thread")}
    times = {mode: launch([{"do": "train", "cfg": cfg, "out": str(out)}], tmp_path, env_extra={"UNINET_EDITS": mode})
             for mode, out in runs.items()}
    print(f"\n[timing] torchrun 2 ranks, 1 epoch with edits: {times}")
    ref = read_checkpoint(runs["inplace"] / "model.pt")["state_dict"]
    for mode in ("processes:1", "thread"):
        got = read_checkpoint(runs[mode] / "model.pt")["state_dict"]
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), mode
    clean = launch([{"do": "train", "cfg": {**cfg, "denoise": 0.0}, "out": str(tmp_path / "clean")}], tmp_path)
    other = read_checkpoint(tmp_path / "clean" / "model.pt")["state_dict"]
    assert not all(torch.equal(other[k], ref[k]) for k in ref), "the edits changed nothing: the test would prove nothing"


def test_ddp_gradients_equal_full_batch_gradients_with_unequal_slices(runs):
    """Global batch 3 over 2 ranks (1 + 2 images): the weighted loss and global BN give the full-batch
    gradient of every trainable part, DFS φ included (float64; the loss's own fp32 core limits it)."""
    for r in (0, 1):
        rep = json.loads((runs["tmp"] / f"grad.{r}").read_text())
        assert set(rep["rel_grad"]) == {"target", "bottleneck", "student", "dfs"}
        assert max(rep["rel_grad"].values()) < 1e-6, rep
        assert rep["buffers"] < 1e-12 and rep["loss"][0] == pytest.approx(rep["loss"][1], rel=1e-6)


def test_ddp_trains_a_clip_backbone_whose_tower_has_parameters_no_level_reaches():
    """A CLIP tower's ln_post and proj (and, levels 0-2 of 4 blocks, its last block) get no gradient: DDP without
    find_unused_parameters stopped at the second step ("Expected to have finished reduction in the prior
    iteration"); torchrun training of any clip: backbone did. ``wrap`` freezes exactly those while wrapped and
    ``close`` thaws them. One in-process gloo rank stands in for torchrun (DDP's check is each rank's own)."""
    import torch.distributed as dist

    from uninet_feat.backbones import create_backbone
    from uninet_feat.distributed import DistEnv
    from uninet_feat.model.uninet import UniNet
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = UniNet(create_backbone("clip:tiny", levels=(0, 1, 2))).train()
        names = [n for n, _ in model.target.named_parameters()]
        want = {n for n in names if n.startswith(("visual.ln_post.", "visual.transformer.resblocks.3."))}
        want |= {"visual.proj"}
        dd = DistEnv(rank=0, world_size=2, backend="gloo")   # a "world" of 2, so `wrap` wraps; the group has 1 rank
        step = dd.wrap(model)
        for i in range(3):
            step(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)))["loss"].backward()
        frozen = {n for n, p in model.target.named_parameters() if not p.requires_grad}
        assert frozen == want
        assert all((p.grad is None) == (n in want) for n, p in model.target.named_parameters())
        dd.close()
        assert all(p.requires_grad for p in model.target.parameters())
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- (b) sharded extraction
def test_two_rank_extraction_equals_one_rank(runs):
    from uninet_feat.featstore import FeatureStore
    from uninet_feat.workflows import extract_cmd
    one, two = runs["tmp"] / "feat1", runs["tmp"] / "feat2"
    res1 = extract_cmd(runs["data"], one, run=runs["multi"], patches=True, shard_size=3, quiet=True, validate=True)
    reports = [json.loads((runs["tmp"] / f"report.{r}").read_text()) for r in (0, 1)]
    assert {r["shard"] for r in reports} == {"0/2", "1/2"} and all(r["complete"] for r in reports)
    assert reports[0]["validation"]["ok"] and "validation" not in reports[1]  # rank 0 validates
    assert res1["complete"] and res1["n_shards"] == reports[0]["n_shards"] == 6
    assert json.loads((one / "manifest.json").read_text()) == json.loads((two / "manifest.json").read_text())
    s1, s2 = FeatureStore(one), FeatureStore(two)
    for key in ("vectors", "scores", "patches"):
        # same rows, same values; the ranks may run with another thread count, so allow float rounding
        np.testing.assert_allclose(s1.array(key).astype(np.float32), s2.array(key).astype(np.float32),
                                   rtol=1e-5, atol=1e-6, err_msg=key)


def test_validate_store_finds_problems(runs, tmp_path):
    from uninet_feat.distributed import validate_store
    from uninet_feat.errors import BadInputError
    src = runs["tmp"] / "feat2"
    paths = {it["path"] for it in json.loads((src / "manifest.json").read_text())["items"]}
    rep = validate_store(src, expected_paths=paths)
    assert rep["ok"] and rep["rows"] == rep["n_items"] == 18 and rep["n_shards"] == 6

    def broken(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    def edit_shard(d, k, edit):   # a shard's arrays changed by ``edit`` (a dict of arrays -> the new dict)
        with np.load(d / f"shard-{k:05d}.npz") as z:
            arrays = {q: z[q] for q in z.files}
        np.savez(d / f"shard-{k:05d}.npz", **edit(arrays))

    d = broken("missing")
    (d / "shard-00003.npz").unlink()
    with pytest.raises(BadInputError, match="1 of 6 shards missing"):
        validate_store(d)
    d = broken("rows")
    edit_shard(d, 1, lambda a: {k: v if k == "fingerprint" else v[:2] for k, v in a.items()})
    with pytest.raises(BadInputError, match=r"shard-00001.npz: vectors \(2,"):
        validate_store(d)
    d = broken("foreign")   # a --shard process started with other settings (featstore.check_writer's race)
    with np.load(d / "shard-00002.npz") as z:
        arrays = {k: z[k] for k in z.files}
    featstore.write_shard(d, 2, arrays, fingerprint="another extraction's")
    with pytest.raises(BadInputError, match=r"1 shard\(s\) written by an extraction with other settings"):
        validate_store(d)
    d = broken("dup")
    m = json.loads((d / "manifest.json").read_text())
    m["items"][1] = dict(m["items"][0])
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadInputError, match="1 duplicate items"):
        validate_store(d)
    with pytest.raises(BadInputError, match="1 expected images missing"):
        validate_store(src, expected_paths=[it["path"] for it in m["items"]] + ["/nowhere/x.png"])
    # what index / train-head / a resume refuse or redo passed here (an audit, session 53)
    d = broken("unfinished")
    (d / "complete").unlink()
    with pytest.raises(BadInputError, match="no `complete` marker"):
        validate_store(d)
    d = broken("nan")

    def nan_first(a):
        a["vectors"] = a["vectors"].copy()
        a["vectors"][0, 0] = np.nan
        return a
    edit_shard(d, 1, nan_first)
    with pytest.raises(BadInputError, match=r"1 vector\(s\) hold NaN or Inf"):
        validate_store(d)
    d = broken("grid")   # patch rows of two widths (only a damaged store has them): index stacked them, a traceback
    for k, width in ((0, 8), (2, 7)):
        edit_shard(d, k, lambda a, w=width: {**a, "patches": np.zeros((len(a["vectors"]), 4, w), np.float16)})
    with pytest.raises(BadInputError, match=r"shard-00002.npz: patches of shape \(4, 7\) per row, the first shard's "
                                            r"\(4, 8\)"):
        validate_store(d)
    d = broken("changed")
    m2 = json.loads((d / "manifest.json").read_text())
    first = next(iter(m2["files"]))
    m2["files"][first] = [0, 0, 0]   # as if the image had been replaced since
    (d / "manifest.json").write_text(json.dumps(m2))
    with pytest.raises(BadInputError, match=r"1 image\(s\) changed since their features were extracted"):
        validate_store(d)
    for name, other in (("list", []), ("other_tool", {"items": ["a.png"], "n_items": 1}),
                        ("count", {**m, "n_items": "many"})):   # tracebacks before (AttributeError, ValueError)
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(other))
        with pytest.raises(BadInputError, match="not a feature store's|n_items 'many' is not a count"):
            validate_store(d)


def test_validate_store_compares_absolute_paths(texture, tmp_path, monkeypatch):
    """The store records absolute paths; relative expected paths (a relative --data) are made absolute
    against the current folder before the comparison. A missing image is still reported."""
    from uninet_feat.distributed import validate_store
    from uninet_feat.errors import BadInputError
    from uninet_feat.workflows import extract_cmd
    monkeypatch.chdir(texture.parent)
    rel = Path(texture.name)
    res = extract_cmd(rel, tmp_path / "feat", backbone="tiny", weights="random", image_size=64, shard_size=8,
                      quiet=True, validate=True)
    assert res["validation"]["ok"] and res["validation"]["n_images"] == res["n_items"]
    paths = {it["path"] for it in json.loads((tmp_path / "feat" / "manifest.json").read_text())["items"]}
    relative = sorted(os.path.relpath(p) for p in paths)
    assert not any(os.path.isabs(p) for p in relative)
    assert validate_store(tmp_path / "feat", expected_paths=relative)["ok"]
    with pytest.raises(BadInputError, match="1 expected images missing") as e:
        validate_store(tmp_path / "feat", expected_paths=relative + [str(rel / "test" / "good" / "nowhere.png")])
    assert "unexpected" not in str(e.value) and "shards are all there" in str(e.value)


# ----------------------------------------------------------------------------- (c) sharded FAISS
def _clustered(n, d=32, k=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)) * 4
    return (c[rng.integers(k, size=n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def vec():
    x = _clustered(2600)
    return x[:2400], x[2400:], [x[:900], x[900:1400], x[1400:2400]]


@pytest.mark.parametrize("as_shards", [False, True])
def test_merged_flat_equals_single_flat(vec, as_shards):
    from uninet_feat.downstream import build_index, search
    from uninet_feat.downstream.merge import build_sharded_index
    base, q, shards = vec
    merged = build_sharded_index(shards, "flat", as_shards=as_shards)
    assert merged.ntotal == len(base)
    d0, l0 = search(build_index(base, "flat", device="cpu"), q, 5)
    d1, l1 = search(merged, q, 5)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(d0, d1)


@pytest.mark.parametrize("kind", ["ivfflat", "ivfpq"])
def test_merged_ivf_equals_single_index(vec, kind):
    from uninet_feat.downstream import build_index, search
    from uninet_feat.downstream.merge import build_sharded_index, fill_shard, train_empty_index
    base, q, shards = vec
    merged = build_sharded_index(shards, kind, nlist=16, m_pq=8, nbits=5, nprobe=4)
    if kind == "ivfpq":  # same sample, same seeds: the very index build_index trains on all vectors
        single = build_index(base, "ivfpq", nlist=16, m_pq=8, nbits=5, nprobe=4, device="cpu")
    else:
        single = fill_shard(train_empty_index([base], kind, nlist=16, nprobe=4), base)
    assert merged.ntotal == single.ntotal == len(base)
    d0, l0 = search(single, q, 10)
    d1, l1 = search(merged, q, 10)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(d0, d1)


def test_merge_with_global_ids_and_errors(vec):
    import faiss

    from uninet_feat.downstream import search
    from uninet_feat.downstream.merge import build_sharded_index, merge_indices
    from uninet_feat.errors import BadInputError
    base, q, shards = vec
    ids = [1000 + 2 * np.arange(len(s)) + k for k, s in enumerate(shards)]  # arbitrary global ids
    merged = build_sharded_index(shards, "ivfflat", ids=ids, nlist=16, nprobe=16)
    ref = build_sharded_index(shards, "ivfflat", nlist=16, nprobe=16)
    all_ids = np.concatenate(ids)
    (_, l0), (_, l1) = search(ref, q, 3), search(merged, q, 3)
    np.testing.assert_array_equal(all_ids[l0], l1)
    flat = build_sharded_index(shards, "flat", ids=ids)
    np.testing.assert_array_equal(search(flat, q, 3)[1], all_ids[search(ref, q, 3)[1]])
    with pytest.raises(BadInputError, match="HNSW"):
        build_sharded_index(shards, "hnsw")
    with pytest.raises(BadInputError, match="differ in type"):
        merge_indices([faiss.IndexFlatL2(32), faiss.IndexFlatIP(32)])


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_a_global_batch_smaller_than_the_process_count_is_refused_before_any_work(tmp_path, monkeypatch):
    """Under torchrun each rank takes a slice of every global batch: --batch-size 1 over 2 processes crashed
    in the first step (an IndexError), after config.yaml was written."""
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    from uninet_feat.train import train
    from _tiny import register_tiny, write_texture_set
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=1, n_bad=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 64,
                             "batch_size": 1, "epochs": 1})
    with pytest.raises(BadInputError, match=r"--batch-size 1 is the global batch, split over 2 processes"):
        train(cfg, tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
