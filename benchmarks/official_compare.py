"""The official UniNet code vs this package: training step and inference, each side in its own process.

    python -m benchmarks.official_compare --official-path /tmp/official_uninet \
        --image-size 256 --batch-size 8 --steps 3 --threads 2 [--infer-images 16] [--device cpu] \
        [--channels-last] [--grad-checkpointing] [--step-in-backward]

Official side (imported from ``--official-path``, never from this repository): WideResNet-50-2 teacher with
random init (``pretrained=False``, nothing is downloaded), their bottleneck, decoder, DFS, loss and their
two AdamW optimisers, stepped exactly as ``train_unsupervisedAD.py`` does; inference as ``eval.py`` does
(batch 1 under ``no_grad``, 1 − cos maps collected, then ``mechanism.weighted_decision_mechanism`` over
all images). Our side: ``benchmarks.train_step`` / ``benchmarks.inference`` with the same network
(wide_resnet50_2 random, MEM official, DFS learned, chunked kernels), inference at batch 1 and ``--batch-size``.
Ratios: ``train_time_ratio`` = official / ours step time (>1: ours faster), ``train_memory_ratio`` =
official / ours peak RSS (>1: ours smaller), ``inference_speedup_b*`` = ours / official images per second.

The official code hard-codes CUDA in DFS (``.to("cuda")``); see benchmarks/README.md for the one-line
CPU patch of the exported copy.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import uninet_feat  # noqa: F401  (before timm/torchvision)
import torch
import torch.nn.functional as F

from benchmarks import _measure as M


def _official(args):
    """Build the official modules as train_unsupervisedAD.train() does, minus the ImageNet download."""
    if args.official_path not in sys.path:
        sys.path.insert(0, args.official_path)
    from UniNet_lib.DFS import DomainRelated_Feature_Selection
    from UniNet_lib.de_resnet import de_wide_resnet50_2
    from UniNet_lib.model import UniNet
    from UniNet_lib.resnet import wide_resnet50_2

    # main.py defaults; a class name outside their T=0.1 list keeps T = 2 (our default temperature too)
    c = SimpleNamespace(_class_="benchmark", T=2.0, lr_s=5e-3, lr_t=1e-6, alpha=0.01, beta=3e-5)
    torch.manual_seed(args.seed)
    source, bn = wide_resnet50_2(c, pretrained=False)
    source.layer4 = None
    source.fc = None
    student = de_wide_resnet50_2(pretrained=False)
    try:
        dfs = DomainRelated_Feature_Selection()
    except (AssertionError, RuntimeError) as e:
        raise SystemExit(f"official DFS needs CUDA ({e}); patch the exported copy for CPU as benchmarks/README.md "
                         f"shows") from e
    for k in ("theta1", "theta2", "theta3"):  # unregistered tensors (as in the official code): move by hand
        setattr(dfs, k, getattr(dfs, k).to(args.device))
    source, bn, student, dfs = [m.to(args.device) for m in (source, bn, student, dfs)]
    target = copy.deepcopy(source)
    params = list(student.parameters()) + list(bn.parameters()) + list(dfs.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr_s, betas=(0.9, 0.999), weight_decay=1e-5)
    opt1 = torch.optim.AdamW(list(target.parameters()), lr=c.lr_t, betas=(0.9, 0.999), weight_decay=1e-5)
    model = UniNet(c, source, target, bn, student, DFS=dfs)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return c, model, opt, opt1


def _input(args, n):
    x = torch.randn(n, 3, args.image_size, args.image_size, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def official_train(args) -> dict:
    _, model, opt, opt1 = _official(args)
    model.train_or_eval(type="train")
    img = _input(args, args.batch_size)
    rss_model = M.current_rss_mb()

    def step():  # the body of their training loop
        with M.autocast(args.device, args.dtype):
            loss = model(img, stop_gradient=False)
        opt.zero_grad()
        opt1.zero_grad()
        loss.backward()
        opt.step()
        opt1.step()
        loss.item()

    return M.train_step_report("official_train_step", step, args, rss_model, opt, opt1)


def official_inference(args) -> dict:
    """eval.py's evaluation_indusAD timing path: per-batch forward + 1 − cos maps, then their WDM once."""
    c, model, _, _ = _official(args)
    from UniNet_lib.mechanism import weighted_decision_mechanism  # importable once _official set the path
    model.train_or_eval(type="eval")
    n_batches = max(1, args.infer_images // args.batch_size)
    imgs = [_input(args, args.batch_size) for _ in range(n_batches + 1)]
    M.reset_cuda_peak(args.device)
    with torch.no_grad():
        model(imgs.pop())  # warm-up, not scored
        M.sync(args.device)
        outputs, fwd = [[] for _ in range(6)], []
        t0 = time.perf_counter()
        for img in imgs:
            t1 = time.perf_counter()
            with M.autocast(args.device, args.dtype):
                t_tf, de_features = model(img)
            for l, (t, s) in enumerate(zip(t_tf, de_features)):
                outputs[l].append((1 - F.cosine_similarity(t, s)).float())
            M.sync(args.device)
            fwd.append(time.perf_counter() - t1)
        t2 = time.perf_counter()
        weighted_decision_mechanism(n_batches, outputs, c.alpha, c.beta, out_size=args.image_size)
        t3 = time.perf_counter()
    n = n_batches * args.batch_size
    return {"benchmark": "official_inference", "images_per_s": round(n / (t3 - t0), 3), "images": n,
            "median_batch_s": round(M.summary(fwd)["median_s"], 4), "wdm_total_s": round(t3 - t2, 4),
            **M.memory(args.device)}


def _common(args, batch_size):
    out = ["--image-size", args.image_size, "--batch-size", batch_size, "--device", args.device,
           "--dtype", args.dtype, "--seed", args.seed]
    out += ["--threads", args.threads] if args.threads else []
    return out + (["--channels-last"] if args.channels_last else [])


def compare(args) -> dict:
    # DFS learned: the official network's (its DFS is in their loss), so both sides compute the same network
    ours_net = ["--backbone", "wide_resnet50_2", "--weights", "random", "--mem", "official", "--dfs", "learned"]
    me = ["--official-path", args.official_path]
    steps = ["--steps", args.steps, "--warmup", args.warmup]
    b = args.batch_size
    res = {"official_train": M.run_json("benchmarks.official_compare",
                                        me + ["--role", "official-train", *_common(args, b), *steps]),
           "ours_train": M.run_json("benchmarks.train_step", ours_net + ["--kernels", "chunked", *_common(args, b),
                                                                          *steps])}
    variants = {}   # extra measurements of our training step: name -> train_step flags
    if args.grad_checkpointing:
        variants["ckpt"] = ["--grad-checkpointing"]
    if args.step_in_backward:
        variants["lowmem"] = ["--grad-checkpointing", "--step-in-backward"]
    for name, flags in variants.items():
        res[f"ours_train_{name}"] = M.run_json("benchmarks.train_step", ours_net + [
            "--kernels", "chunked", *flags, *_common(args, b), *steps])
    if not args.skip_inference:
        res["official_infer_b1"] = M.run_json("benchmarks.official_compare", me + [
            "--role", "official-infer", *_common(args, 1), "--infer-images", args.infer_images])
        for bs in sorted({1, b}):
            res[f"ours_infer_b{bs}"] = M.run_json("benchmarks.inference", ours_net + [
                *_common(args, bs), "--iters", max(1, args.infer_images // bs)])

    def ratio(a, key_a, z, key_z):
        try:
            return round(res[a][key_a] / res[z][key_z], 3)
        except (KeyError, ZeroDivisionError):
            return None

    res["ratios"] = {
        "train_time_ratio": ratio("official_train", "median_step_s", "ours_train", "median_step_s"),
        "train_memory_ratio": ratio("official_train", "peak_rss_mb", "ours_train", "peak_rss_mb"),
    }
    for name in variants:
        res["ratios"][f"train_time_ratio_{name}"] = ratio("official_train", "median_step_s", f"ours_train_{name}",
                                                          "median_step_s")
        res["ratios"][f"train_memory_ratio_{name}"] = ratio("official_train", "peak_rss_mb", f"ours_train_{name}",
                                                            "peak_rss_mb")
    if args.device.startswith("cuda"):
        res["ratios"]["train_cuda_memory_ratio"] = ratio("official_train", "cuda_peak_mb", "ours_train",
                                                         "cuda_peak_mb")
    if not args.skip_inference:
        for bs in sorted({1, b}):
            res["ratios"][f"inference_speedup_b{bs}"] = ratio(f"ours_infer_b{bs}", "images_per_s",
                                                              "official_infer_b1", "images_per_s")
    res["config"] = {k: v for k, v in vars(args).items() if k != "role"}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-path", required=True, help="an exported (CPU-patched) copy of the official repo")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--infer-images", type=int, default=16, help="images scored per inference measurement")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(M.DTYPES), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="also measure our training step with activation checkpointing (ours_train_ckpt)")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="also measure it with checkpointing and AdamW stepped inside backward (ours_train_lowmem)")
    ap.add_argument("--role", choices=["compare", "official-train", "official-infer"], default="compare",
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    need = Path(args.official_path) / "UniNet_lib" / "model.py"
    if args.role == "compare" and not need.is_file():   # before minutes of measuring our side alone
        ap.error(f"{need} not found: --official-path must be the official repository's root (the folder holding "
                 "UniNet_lib/), exported and CPU-patched as benchmarks/README.md says")
    M.set_threads(args.threads)
    run = {"compare": compare, "official-train": official_train, "official-infer": official_inference}[args.role]
    return M.emit(run(args))


if __name__ == "__main__":
    main()
