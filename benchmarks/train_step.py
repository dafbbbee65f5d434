"""Time one full UniNet training step: forward, loss, backward and both AdamW steps (as in ``uninet_feat.train``).

    python -m benchmarks.train_step --backbone wide_resnet50_2 --weights random --image-size 256 \
        --batch-size 8 --steps 5 --warmup 1 --threads 2 [--kernels chunked|naive|triton] \
        [--mem official|multiscale] [--dfs off|learned|fixed] [--device cpu|cuda] [--dtype fp32|bf16] [--channels-last]
        [--grad-checkpointing] [--step-in-backward]

Prints one JSON line: median step seconds, images/s, peak RSS (and CUDA peak) and the configuration.
Inputs are random tensors; peak RSS covers the whole process (model build included), so compare runs
that each had their own process.
"""
from __future__ import annotations

import argparse

import uninet_feat  # noqa: F401  (before timm/torchvision)
import torch

from benchmarks import _measure as M
from uninet_feat.backbones import create_backbone
from uninet_feat.config import DEFAULT_CONFIG
from uninet_feat.kernels import similarity_backend
from uninet_feat.model import UniNet
from uninet_feat.model.uninet import DEFAULTS
from uninet_feat.optim import make_optimizers


def build(args):
    """(model, input batch) on the device, in the requested memory format."""
    torch.manual_seed(args.seed)
    model = UniNet(create_backbone(args.backbone, weights=args.weights), mem=args.mem,
                   dfs=getattr(args, "dfs", DEFAULTS["dfs"])).to(args.device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def _level1_backend(model, x, kernels) -> str:
    """The similarity_lse backend of the first level's loss: auto depends on its shape (the loss's rows are fp32),
    known from the model's channels and strides without a forward pass."""
    hw = -(-x.shape[2] // model.strides[0]) * -(-x.shape[3] // model.strides[0])
    rows = torch.empty(x.shape[0], hw, model.channels[0], device=x.device)
    return similarity_backend(rows, rows, kernels)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    M.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--kernels", default=None, help="similarity_lse backend: chunked, naive, triton (default: env/auto)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="as `train --grad-checkpointing`")
    ap.add_argument("--step-in-backward", action="store_true", help="as `train --step-in-backward`")
    args = ap.parse_args(argv)
    threads = M.set_threads(args.threads)
    model, x = build(args)
    model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt_s, opt_t = make_optimizers(model, DEFAULT_CONFIG, in_backward=args.step_in_backward)
    rss_model = M.current_rss_mb()

    def step():
        with M.autocast(args.device, args.dtype):
            loss = model.loss(model(x), backend=args.kernels)["loss"]
        opt_s.zero_grad(set_to_none=True)
        opt_t.zero_grad(set_to_none=True)
        with model.backward_guard():
            loss.backward()
        opt_s.step()
        opt_t.step()

    return M.emit({
        **M.train_step_report("train_step", step, args, rss_model, opt_s, opt_t),
        "config": {**{k: v for k, v in vars(args).items() if k not in ("steps",)},
                   "kernels_resolved": _level1_backend(model, x, args.kernels), "threads": threads,
                   "torch": torch.__version__},
    })


if __name__ == "__main__":
    main()
