"""The checks to run first on a machine with a CUDA GPU: `--device` was built and tested without one.

    python -m benchmarks.gpu_check [--out DIR] [--epochs 3] [--size 128]

Needs a CUDA build of torch in the environment (this project's `make setup` installs the CPU build). Steps, each
printed with its figures; the exit status is 1 when a check fails:

1. the kernel tests with ``TRITON_INTERPRET=0`` (compiled Triton kernels on CUDA tensors against their torch
   references) and tests/test_device.py;
2. one synthetic fabric run trained on the CPU, scored by ``evaluate`` on the CPU and on the GPU: the same model
   must give the same image scores (to 1e-3 relative) and metrics (to 1e-3) on both devices;
3. the same run trained on the GPU: it must finish and its model.pt must score on the CPU, with finite figures;
   its image AUROC beside the CPU-trained run's is printed, not checked (3 epochs and 20 test images: the thread
   count alone moves it by 0.17 on the CPU, session 39);
4. ``predict`` and ``extract --patches`` of the CPU-trained run on the GPU against the CPU (scores to 1e-3, feature
   vectors to 1e-2 relative);
   the GPU side of steps 2 and 4 runs with ``NVIDIA_TF32_OVERRIDE=0``: cuDNN's default TF32 convolutions (10-bit
   mantissa) moved scores by up to 5e-4 relative in an emulation, too near the 1e-3 limit to tell a bug;
5. seconds per training epoch on each device (from train_log.jsonl).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "uninet_feat"]
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}   # IEEE fp32 in cuDNN / cuBLAS: device comparisons, not TF32's rounding


def _run(args, env=None) -> None:
    print("$", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, env={**os.environ, **(env or {})})


def _scores(csv_path) -> dict:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    key = "score" if "score" in rows[0] else "wdm_score"
    return {r["path"]: float(r[key]) for r in rows}


def _close(name: str, a: dict, b: dict, rtol: float, fails: list) -> None:
    common = sorted(set(a) & set(b))
    x, y = np.array([a[k] for k in common]), np.array([b[k] for k in common])
    worst = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-6))) if common else float("nan")
    ok = len(common) == len(a) == len(b) and worst <= rtol
    print(f"{name}: {len(common)} images, largest relative difference {worst:.2e} (limit {rtol:g}): "
          f"{'ok' if ok else 'FAIL'}")
    if not ok:
        fails.append(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "these checks need one", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    fails: list[str] = []
    tests = ["tests/test_kernel_similarity.py", "tests/test_wdm.py", "tests/test_device.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    print(f"kernel and device tests on the GPU: {'ok' if r.returncode == 0 else 'FAIL'}")
    if r.returncode:
        fails.append("tests")
    data = out / "fabric"
    from uninet_feat.data.synthetic import make_fabric_dataset
    make_fabric_dataset(data, n_train=40, n_test_good=10, n_test_defect=10, size=a.size, weaves=("twill",))
    data = data / "twill"
    train = [*CLI, "train", "--data", data, "--image-size", a.size, "--epochs", a.epochs, "--quiet"]
    _run(train + ["--out", out / "run_cpu", "--device", "cpu"])
    _run(train + ["--out", out / "run_gpu", "--device", "cuda"])
    figures = {}
    for run in ("run_cpu", "run_gpu"):
        for dev in ("cpu", "cuda"):
            tag = f"{run}_{dev}"
            _run([*CLI, "evaluate", "--run", out / run, "--device", dev, "--json", out / f"{tag}.json",
                  "--csv", out / f"{tag}.csv", "--quiet"], env=NO_TF32)
            figures[tag] = json.loads((out / f"{tag}.json").read_text())
    _close("CPU-trained run, evaluate on GPU vs CPU", _scores(out / "run_cpu_cpu.csv"),
           _scores(out / "run_cpu_cuda.csv"), 1e-3, fails)
    _close("GPU-trained run, evaluate on GPU vs CPU", _scores(out / "run_gpu_cpu.csv"),
           _scores(out / "run_gpu_cuda.csv"), 1e-3, fails)
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        d = abs(figures["run_cpu_cpu"][k] - figures["run_cpu_cuda"][k])
        print(f"  {k}: CPU {figures['run_cpu_cpu'][k]:.4f}, GPU {figures['run_cpu_cuda'][k]:.4f}")
        if d > 1e-3:
            fails.append(f"evaluate {k}")
    got = [figures["run_gpu_cpu"].get(k, float("nan")) for k in ("image_auroc", "pixel_auroc", "aupro")]
    ok = bool(np.isfinite(got).all())
    print(f"GPU-trained run: image AUROC {got[0]:.4f} (scored on the CPU) against "
          f"{figures['run_cpu_cpu']['image_auroc']:.4f} for the CPU-trained one (not checked: two CPU runs differing "
          f"only in thread count differ by up to 0.17 here); figures finite: {'ok' if ok else 'FAIL'}")
    if not ok:
        fails.append("GPU-trained run's figures")
    test = data / "test"
    for dev in ("cpu", "cuda"):
        _run([*CLI, "predict", "--run", out / "run_cpu", "--data", test, "--out", out / f"pred_{dev}",
              "--device", dev, "--no-overlays", "--quiet"], env=NO_TF32)
        _run([*CLI, "extract", "--run", out / "run_cpu", "--data", data, "--patches", "--out", out / f"feat_{dev}",
              "--device", dev, "--quiet"], env=NO_TF32)
    _close("predict on GPU vs CPU", _scores(out / "pred_cpu" / "predictions.csv"),
           _scores(out / "pred_cuda" / "predictions.csv"), 1e-3, fails)
    from uninet_feat.featstore import FeatureStore
    va, vb = (FeatureStore(out / f"feat_{d}").vectors for d in ("cpu", "cuda"))
    rel = float(np.max(np.abs(va - vb)) / max(float(np.max(np.abs(va))), 1e-6))
    print(f"extract on GPU vs CPU: vectors {va.shape}, largest difference / largest value {rel:.2e} (limit 1e-2): "
          f"{'ok' if rel <= 1e-2 else 'FAIL'}")
    if rel > 1e-2:
        fails.append("extract")
    for run in ("run_cpu", "run_gpu"):
        secs = [json.loads(line)["seconds"] for line in (out / run / "train_log.jsonl").read_text().splitlines()]
        print(f"{run}: seconds per epoch {secs}")
    print("FAILED: " + ", ".join(fails) if fails else "all GPU checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
