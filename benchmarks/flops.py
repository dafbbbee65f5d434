"""Arithmetic per image vs what this machine can do: how fast could UniNet run here at best?

    python -m benchmarks.flops --backbone wide_resnet50_2 --image-size 256 --threads 2 \
        [--step-s 25.3 --batch-size 8] [--infer-img-s 1.22]

Counts floating-point operations with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matmuls, forward and backward) for one inference image (``predict``) and one training image (forward,
loss, backward), measures this machine's fp32 matmul rate (a square GEMM, the best case for a CPU), and
prints one JSON line: GFLOP per image, GEMM GFLOP/s, the implied lower bounds (seconds per training step
of ``--batch-size`` images, images/s of inference) and, given measured times, the fraction of the GEMM
rate they reach. A run already near that rate cannot get much faster from fusing kernels; only less
arithmetic (smaller network, lower resolution, int8) can.
"""
from __future__ import annotations

import argparse
import time

import uninet_feat  # noqa: F401  (before timm/torchvision)
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import _measure as M
from benchmarks.train_step import build


def gemm_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    M.add_common_args(ap)
    ap.add_argument("--step-s", type=float, help="a measured training-step time (seconds) to compare")
    ap.add_argument("--infer-img-s", type=float, help="a measured inference rate (images/s) to compare")
    args = ap.parse_args(argv)
    threads = M.set_threads(args.threads)
    batch = args.batch_size
    args.batch_size = 1
    model, x = build(args)

    def train_image():
        model.train()
        model.loss(model(x))["loss"].backward()

    def infer_image():
        model.eval()
        with torch.no_grad():
            model.predict(x)

    train_gf, infer_gf = count(train_image) / 1e9, count(infer_image) / 1e9
    peak = gemm_gflops()
    out = {"benchmark": "flops", "train_gflop_per_image": round(train_gf, 1),
           "infer_gflop_per_image": round(infer_gf, 1), "gemm_gflops": round(peak, 1),
           "train_step_lower_bound_s": round(train_gf * batch / peak, 2),
           "infer_upper_bound_img_s": round(peak / infer_gf, 3)}
    if args.step_s:
        out["train_fraction_of_gemm"] = round(train_gf * batch / args.step_s / peak, 3)
    if args.infer_img_s:
        out["infer_fraction_of_gemm"] = round(infer_gf * args.infer_img_s / peak, 3)
    out["config"] = {**vars(args), "batch_size": batch, "threads": threads, "torch": torch.__version__}
    return M.emit(out)


if __name__ == "__main__":
    main()
