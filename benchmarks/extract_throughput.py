"""Extraction throughput and peak memory against the number of images: memory must not grow with count.

    python -m benchmarks.extract_throughput --data ../shared/data --split-csv ../shared/data/splits/magnetic_tile.csv \
        [--run RUN | --backbone tf_efficientnet_lite0] --counts 250 1000 [--image-size 256] [--patches] --threads 2

For each count, a fresh process extracts the first N images of the data (cycling through them when the
data has fewer) into a temporary feature store with ``Extractor.extract_to`` — what ``uninet-feat extract``
runs — and reports images/s (wall clock of the whole extraction: decoding, resizing, model, writing
shards), its peak RSS, and its RSS after every shard. Flat memory across counts is the streaming claim:
one shard is in memory at a time, so the per-shard RSS levels off after the first shards (allocator
warm-up) and the peak of N and 4N images agree. Without ``--data`` it writes 180 synthetic fabric images first (60 of each of the three weaves)
(once, into a temporary folder that is deleted at the end). ``peak_rss_growth_mb``: the peak RSS of the largest
count minus that of the smallest (counts are run smallest first, whatever their order on the command line).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import uninet_feat  # noqa: F401
from benchmarks import _measure as M


def _synthetic(folder) -> str:
    """180 synthetic fabric images (256 px; 60 per weave) under ``folder``, the data without ``--data``; returns their root."""
    from uninet_feat.data.synthetic import make_fabric_dataset
    root = Path(folder) / "fabric"
    make_fabric_dataset(root, n_train=60, n_test_good=0, n_test_defect=0, size=256, seed=0)
    return str(root)


def _paths(a) -> list[Path]:
    from uninet_feat.config import load_config
    from uninet_feat.runs import load_samples
    if a.data:
        samples = load_samples(load_config(None, {"data": a.data, "split_csv": a.split_csv}))
        return [s.path for s in samples]
    return sorted(Path(a.synthetic).rglob("*.png"))


def child(a) -> dict:
    if not a.data and not a.synthetic:   # a child started by hand: its own synthetic set, deleted after
        with tempfile.TemporaryDirectory() as d:
            a.synthetic = _synthetic(d)
            return child(a)
    from uninet_feat.extract import Extractor
    M.set_threads(a.threads)
    paths = list(itertools.islice(itertools.cycle(_paths(a)), a.child))
    ex = Extractor(run=a.run, backbone=a.backbone, image_size=a.image_size, patches=a.patches,
                   batch_size=a.batch_size)
    rss_built, per_shard = M.current_rss_mb(), []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        store = ex.extract_to(paths, Path(d) / "f", shard_size=a.shard_size,
                              on_shard=lambda k: per_shard.append(round(M.current_rss_mb())))
        dt = time.perf_counter() - t0
        dim, on_disk = store.vectors.shape[1], sum(p.stat().st_size for p in (Path(d) / "f").iterdir())
    return {"n_images": len(paths), "seconds": round(dt, 2), "images_per_s": round(len(paths) / dt, 2),
            "peak_rss_mb": round(M.peak_rss_mb(), 1), "rss_after_build_mb": round(rss_built, 1),
            "rss_after_shard_mb": per_shard, "vector_dim": int(dim), "store_mb": round(on_disk / 2**20, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--split-csv")
    ap.add_argument("--run")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--patches", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--counts", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic", help=argparse.SUPPRESS)   # the parent's synthetic set, for its children
    a = ap.parse_args(argv)
    if a.child:
        return M.emit(child(a))
    fwd = []
    for k in ("data", "split_csv", "run", "backbone", "image_size", "threads"):
        v = getattr(a, k)
        if v is not None:
            fwd += [f"--{k.replace('_', '-')}", v]
    fwd += ["--batch-size", a.batch_size, "--shard-size", a.shard_size] + (["--patches"] if a.patches else [])
    counts = sorted(set(a.counts))   # smallest to largest: peak_rss_growth_mb is largest minus smallest
    with tempfile.TemporaryDirectory() as d:   # without --data: one synthetic set for every child, deleted after
        if not a.data:
            fwd += ["--synthetic", _synthetic(d)]
        runs = {str(n): M.run_json("benchmarks.extract_throughput", fwd + ["--child", n]) for n in counts}
    ok = [r for r in runs.values() if "error" not in r]
    out = {"config": {k: getattr(a, k) for k in ("data", "split_csv", "run", "backbone", "image_size", "patches",
                                                  "batch_size", "shard_size", "threads")}, "runs": runs}
    if len(ok) >= 2:   # the largest count that ran minus the smallest
        out["peak_rss_growth_mb"] = round(ok[-1]["peak_rss_mb"] - ok[0]["peak_rss_mb"], 1)
    return M.emit(out)


if __name__ == "__main__":
    main()
