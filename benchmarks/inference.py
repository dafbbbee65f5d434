"""Time UniNet inference: ``model.predict(x)`` → pixel maps + WDM scores, in eval and inference mode.

    python -m benchmarks.inference --backbone wide_resnet50_2 --image-size 256 --batch-size 1|8 \
        --iters 20 --threads 2 [--device cpu|cuda] [--dtype fp32|bf16] [--channels-last] [--mem multiscale]
        [--dfs off|learned|fixed]

The model is prepared as a saved run is (``eval()`` + ``reparameterize()``, a no-op for ``--mem official``).
Prints one JSON line: images/s, median seconds per batch, peak RSS (and CUDA peak).
"""
from __future__ import annotations

import argparse

import uninet_feat  # noqa: F401  (before timm/torchvision)
import torch

from benchmarks import _measure as M
from benchmarks.train_step import build


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    M.add_common_args(ap)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    threads = M.set_threads(args.threads)
    model, x = build(args)
    model.eval().reparameterize()

    def batch():
        with torch.inference_mode(), M.autocast(args.device, args.dtype):
            pix, score = model.predict(x)
        return pix, score

    M.reset_cuda_peak(args.device)
    times = M.time_calls(batch, args.iters, args.warmup, args.device)
    med = M.summary(times)["median_s"]
    return M.emit({
        "benchmark": "inference", "images_per_s": round(args.batch_size / med, 3), "median_batch_s": round(med, 4),
        "iters": args.iters, **M.memory(args.device),
        "config": {**{k: v for k, v in vars(args).items() if k != "iters"}, "threads": threads,
                   "torch": torch.__version__},
    })


if __name__ == "__main__":
    main()
