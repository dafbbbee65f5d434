"""Measurement plumbing shared by the benchmark scripts: threads, timing, peak memory, subprocess runs.

Peak RSS (``ru_maxrss``) is a per-process high-water mark, so implementations compared side by side
must each run in their own process: ``run_json`` starts ``python -m <module> ...`` and parses the
JSON object its last stdout line prints.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (and OMP/MKL for child processes); returns the count in use."""
    if n:
        torch.set_num_threads(int(n))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(int(n))
    return torch.get_num_threads()


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, n: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn()`` for ``n`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_cuda_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def memory(device: str) -> dict:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if str(device).startswith("cuda"):
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def train_step_report(name: str, step, args, rss_model: float, opt_student, opt_target) -> dict:
    """Time ``step()`` (``args.steps`` after ``args.warmup``) and report it as both train benchmarks do."""
    reset_cuda_peak(args.device)
    times = time_calls(step, args.steps, args.warmup, args.device)
    med = summary(times)["median_s"]
    return {"benchmark": name, "median_step_s": round(med, 4), "images_per_s": round(args.batch_size / med, 3),
            "steps": args.steps, "step_times_s": [round(t, 4) for t in times],
            "rss_after_build_mb": round(rss_model, 1), "trainable_params": param_counts(opt_student, opt_target),
            **memory(args.device)}


def param_counts(opt_student, opt_target) -> dict:
    """Parameters each optimiser updates: a check that two implementations train the same network."""
    count = lambda opt: sum(p.numel() for g in opt.param_groups for p in g["params"])  # noqa: E731
    return {"student": count(opt_student), "target": count(opt_target)}


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str, dtype: str):
    """Autocast context for ``dtype`` ('fp32' → no-op)."""
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=DTYPES[dtype])


def add_common_args(ap) -> None:
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--weights", default="random", help="random (no download), imagenet or a file")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--mem", choices=["official", "multiscale"], default="official")
    from uninet_feat.model.dfs import MODES
    from uninet_feat.model.uninet import DEFAULTS
    ap.add_argument("--dfs", choices=MODES, default=DEFAULTS["dfs"],
                    help=f"DFS in the loss: learned (the official network's), fixed or off (default: the model's, "
                         f"{DEFAULTS['dfs']})")
    ap.add_argument("--seed", type=int, default=0)


def emit(result: dict) -> dict:
    """Print the result as one JSON line (the last stdout line is what ``run_json`` parses)."""
    print(json.dumps(result), flush=True)
    return result


def run_json(module: str, args: list, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``python -m module *args`` in a fresh process (its own peak RSS); return its JSON result.

    A failure comes back as ``{"error": ..., "stderr_tail": ...}`` so one broken side does not lose the other.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s", "cmd": " ".join(cmd)}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit code {p.returncode}", "cmd": " ".join(cmd), "stderr_tail": p.stderr[-2000:]}
    return json.loads(lines[-1])
