"""Time one full UniNet training step: forward, loss, backward and both AdamW steps (as in ``uninet_feat.train``).

    python -m benchmarks.train_step --backbone wide_resnet50_2 --weights random --image-size 256 \
        --batch-size 8 --steps 5 --warmup 1 --threads 2 [--kernels chunked|naive|triton] \
        [--mem official|multiscale] [--dfs off|learned|fixed] [--device cpu|cuda] [--dtype fp32|bf16] [--channels-last]
        [--grad-checkpointing] [--step-in-backward]
    python -m benchmarks.train_step --config configs/magnetic_tile.yaml [--image-size 256] --device cuda --steps 20

Prints one JSON line: median step seconds, images/s, peak RSS (and CUDA peak) and the configuration.
Inputs are random tensors; peak RSS covers the whole process (model build included), so compare runs
that each had their own process.

``--config``: the model a `train --config` file builds (its width, border pad, decoder depths, MEM, DFS, input
size, batch size, channels_last) instead of the bare defaults, and with its ``denoise`` the step `train` runs: the
teachers also see the clean images of the damaged rows. The denoising edits themselves are CPU work drawn beside the
step; they are timed apart (``edits_median_s``, this process's threads). Why: session 49 timed the bare model at
35 ms a step on an H200 where magnetic tile's config took 180 ms (session 50). Flags given beside it win; weights
stay ``--weights`` (random: timing needs no download).
"""
from __future__ import annotations

import argparse
import itertools

import uninet_feat  # noqa: F401  (before timm/torchvision)
import torch

from benchmarks import _measure as M
from uninet_feat.backbones import create_backbone
from uninet_feat.config import DEFAULT_CONFIG
from uninet_feat.denoise import Damager, parse_denoise
from uninet_feat.kernels import similarity_backend
from uninet_feat.model import UniNet
from uninet_feat.model.uninet import DEFAULTS
from uninet_feat.optim import make_optimizers


CONFIG_FLAGS = ("backbone", "image_size", "batch_size", "mem", "dfs", "channels_last")   # a --config sets these too


def resolve(args, bare: dict) -> dict | None:
    """The train config of ``--config`` with the flags given beside it (None without one); the `CONFIG_FLAGS` left
    unset (None) take the config's values, else ``bare`` (the flags' own defaults), so the report says what was
    timed."""
    given = {k: getattr(args, k, None) for k in CONFIG_FLAGS}
    cfg = None
    if getattr(args, "config", None):
        from uninet_feat.config import load_config
        cfg = load_config(args.config, {**{k: v for k, v in given.items() if v is not None}, "weights": args.weights})
    for k in CONFIG_FLAGS:
        if given[k] is None:
            setattr(args, k, cfg[k] if cfg else bare[k])
    return cfg


def build(args, cfg: dict | None = None):
    """(model, input batch) on the device, in the requested memory format; ``cfg``: a train config's model."""
    torch.manual_seed(args.seed)
    if cfg is not None:
        from uninet_feat.runs import make_model
        model = make_model(cfg).to(args.device)
    else:
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
    ap.add_argument("--config", help="a train --config YAML: its model, size, batch and denoising step (see above)")
    bare = {k: ap.get_default(k) for k in CONFIG_FLAGS}
    ap.set_defaults(**dict.fromkeys(CONFIG_FLAGS))
    args = ap.parse_args(argv)
    cfg = resolve(args, bare)
    threads = M.set_threads(args.threads)
    model, x = build(args, cfg)
    clean = index = damage = None
    if cfg is not None and parse_denoise(cfg.get("denoise")) > 0:
        damage = Damager(cfg["denoise"], cfg.get("denoise_kinds"), model.source.mean, model.source.std, cfg["seed"])
        x_cpu = x.cpu().contiguous()
        damaged, clean, index = damage(x_cpu, 0, 0)
        x = damaged.to(args.device).contiguous(memory_format=torch.channels_last if args.channels_last
                                               else torch.contiguous_format)
        if clean is not None:
            clean, index = clean.to(args.device), index.to(args.device)
    model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt_s, opt_t = make_optimizers(model, cfg or DEFAULT_CONFIG, in_backward=args.step_in_backward)
    rss_model = M.current_rss_mb()

    def step():
        with M.autocast(args.device, args.dtype):
            loss = model.loss(model(x, clean, index), backend=args.kernels)["loss"]
        opt_s.zero_grad(set_to_none=True)
        opt_t.zero_grad(set_to_none=True)
        with model.backward_guard():
            loss.backward()
        opt_s.step()
        opt_t.step()

    edits = {}
    if damage is not None:
        calls = itertools.count(1)   # each timed call another step's edits
        times = M.time_calls(lambda: damage(x_cpu, 0, next(calls)), args.steps, 1)
        edits = {"edits_median_s": round(M.summary(times)["median_s"], 4),
                 "damaged_rows": 0 if index is None else int(index.numel())}
    return M.emit({
        **M.train_step_report("train_step", step, args, rss_model, opt_s, opt_t), **edits,
        "config": {**{k: v for k, v in vars(args).items() if k not in ("steps",)},
                   **({"width": cfg["width"], "border_pad": cfg.get("border_pad"), "denoise": cfg.get("denoise")}
                      if cfg else {}),
                   "kernels_resolved": _level1_backend(model, x, args.kernels), "threads": threads,
                   "torch": torch.__version__},
    })


if __name__ == "__main__":
    main()
