"""The checks to run first on a machine with a CUDA GPU: `--device` was built and tested without one.

    python -m benchmarks.gpu_check [--out DIR] [--epochs 3] [--size 128] [--json FILE] [--steps tests,train,...]

Needs a CUDA build of torch in the environment (this project's `make setup` installs the CPU build).
`benchmarks/gpu_session.sh` runs it with the kernel benchmarks and timings as one call on a lent machine.
Steps (``--steps``: any of tests, train, evaluate, predict, knn; default all; the CPU-trained run that evaluate,
predict and knn use is always trained), each printed with its figures; a failing command is recorded and the later
steps still run; the exit status is 1 when a check fails:

1. the kernel tests with ``TRITON_INTERPRET=0`` (compiled Triton kernels on CUDA tensors against their torch
   references) and tests/test_device.py;
2. one synthetic fabric run trained on the CPU, scored by ``evaluate`` on the CPU and on the GPU: the same model
   must give the same image scores (to 1e-3 relative) and metrics (to 1e-3) on both devices;
3. the same run trained on the GPU: it must finish and its model.pt must score on the CPU, with finite figures;
   its image AUROC beside the CPU-trained run's is printed, not checked (3 epochs and 20 test images: the thread
   count alone moves it by 0.17 on the CPU, session 39). It is trained twice with the same seed and the two
   models' scores are compared (printed, not checked: some CUDA backward passes have no deterministic form);
4. ``predict`` and ``extract --patches`` of the CPU-trained run on the GPU against the CPU (scores to 1e-3, feature
   vectors to 1e-2 relative);
   the GPU side of steps 2, 4 and 5 runs with ``NVIDIA_TF32_OVERRIDE=0``: cuDNN's default TF32 convolutions (10-bit
   mantissa) moved scores by up to 5e-4 relative in an emulation, too near the 1e-3 limit to tell a bug;
5. the kNN path: ``index`` of the CPU-extracted patches built with ``--device cpu`` and ``--device auto`` (the
   coreset on the GPU; the FAISS index there too with faiss-gpu, on the CPU with faiss-cpu, where ``--device cuda``
   is refused by design), and ``predict --knn`` with the CPU-built index on both devices (``knn_score`` to 1e-3
   relative); the GPU-built index's scores beside the CPU-built one's are printed, not checked (the coreset's
   picks follow the device's float sums);
6. seconds per training epoch on each device (from train_log.jsonl) and seconds per command on each.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "uninet_feat"]
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}   # IEEE fp32 in cuDNN / cuBLAS: device comparisons, not TF32's rounding


class Checks:
    """The figures and failures of one session; `run` records a failed command instead of stopping."""

    def __init__(self):
        self.fails: list[str] = []
        self.figures: dict = {"seconds": {}}

    def run(self, name: str, args, env=None) -> bool:
        print("$", " ".join(map(str, args)), flush=True)
        t = time.perf_counter()
        r = subprocess.run([str(a) for a in args], env={**os.environ, **(env or {})})
        self.figures["seconds"][name] = round(time.perf_counter() - t, 2)
        if r.returncode:
            print(f"{name}: exit status {r.returncode}: FAIL", flush=True)
            self.fails.append(name)
        return r.returncode == 0

    def close(self, name: str, a: dict | None, b: dict | None, rtol: float | None) -> float:
        """Largest relative difference of two {path: score} tables; a check when ``rtol`` is given."""
        if not a or not b:
            print(f"{name}: a side is missing: {'FAIL' if rtol else 'not compared'}")
            if rtol:
                self.fails.append(name)
            return float("nan")
        common = sorted(set(a) & set(b))
        x, y = np.array([a[k] for k in common]), np.array([b[k] for k in common])
        worst = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-6))) if common else float("nan")
        ok = len(common) == len(a) == len(b) and worst <= (rtol if rtol else np.inf)
        verdict = ("ok" if ok else "FAIL") if rtol else "not checked"
        print(f"{name}: {len(common)} images, largest relative difference {worst:.2e}"
              f"{f' (limit {rtol:g})' if rtol else ''}: {verdict}", flush=True)
        if rtol and not ok:
            self.fails.append(name)
        self.figures[name] = worst
        return worst


def _scores(csv_path, key=None) -> dict | None:
    if not Path(csv_path).is_file():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    key = key or ("score" if "score" in rows[0] else "wdm_score")
    return {r["path"]: float(r[key]) for r in rows}


def _json(path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the figures, seconds and failures here")
    ap.add_argument("--steps", default="tests,train,evaluate,predict,knn",
                    help="comma-separated: tests, train (the GPU-trained runs), evaluate, predict, knn")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              "these checks need one", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    c = Checks()
    steps = set(a.steps.split(","))
    if steps - {"tests", "train", "evaluate", "predict", "knn"}:
        ap.error(f"unknown steps {sorted(steps - {'tests', 'train', 'evaluate', 'predict', 'knn'})}")
    if "tests" in steps:
        c.run("kernel and device tests on the GPU", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "tests/test_kernel_similarity.py", "tests/test_wdm.py", "tests/test_device.py"],
              {"TRITON_INTERPRET": "0"})
    data = out / "fabric"
    from uninet_feat.data.synthetic import make_fabric_dataset
    make_fabric_dataset(data, n_train=40, n_test_good=10, n_test_defect=10, size=a.size, weaves=("twill",))
    data = data / "twill"
    train = [*CLI, "train", "--data", data, "--image-size", a.size, "--epochs", a.epochs, "--quiet"]
    for run, dev in (("run_cpu", "cpu"), ("run_gpu", "cuda"), ("run_gpu2", "cuda"))[:3 if "train" in steps else 1]:
        c.run(f"train {run}", train + ["--out", out / run, "--device", dev])
    if "evaluate" in steps:
        evaluate_steps(c, out, "train" in steps)
    if "predict" in steps:
        predict_steps(c, out, data)
    if "knn" in steps:
        knn_steps(c, out, data)
    for run in ("run_cpu", "run_gpu", "run_gpu2"):
        log = out / run / "train_log.jsonl"
        secs = [json.loads(line)["seconds"] for line in log.read_text().splitlines()] if log.is_file() else []
        c.figures[f"{run} seconds per epoch"] = secs
        print(f"{run}: seconds per epoch {secs}")
    print("seconds per command:", json.dumps(c.figures["seconds"]))
    c.figures["fails"] = c.fails
    if a.json:
        Path(a.json).write_text(json.dumps(c.figures, indent=1, default=float))
    print("FAILED: " + ", ".join(c.fails) if c.fails else "all GPU checks passed")
    return 1 if c.fails else 0


def evaluate_steps(c: Checks, out: Path, gpu_runs: bool) -> None:
    """Steps 2 and 3: each run scored on each device."""
    pairs = (("run_cpu", "cpu"), ("run_cpu", "cuda"), ("run_gpu", "cpu"), ("run_gpu", "cuda"), ("run_gpu2", "cuda"))
    ev = {}
    for run, dev in pairs[:5 if gpu_runs else 2]:
        tag = f"{run}_{dev}"
        c.run(f"evaluate {tag}", [*CLI, "evaluate", "--run", out / run, "--device", dev, "--json",
              out / f"{tag}.json", "--csv", out / f"{tag}.csv", "--quiet"], NO_TF32)
        ev[tag] = _json(out / f"{tag}.json")
    c.close("CPU-trained run, evaluate on GPU vs CPU", _scores(out / "run_cpu_cpu.csv"),
            _scores(out / "run_cpu_cuda.csv"), 1e-3)
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        cpu, gpu = ev["run_cpu_cpu"].get(k, np.nan), ev["run_cpu_cuda"].get(k, np.nan)
        print(f"  {k}: CPU {cpu:.4f}, GPU {gpu:.4f}")
        if not abs(cpu - gpu) <= 1e-3:
            c.fails.append(f"evaluate {k}")
    c.figures["evaluate"] = {t: {k: e.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")} for t, e in ev.items()}
    if not gpu_runs:
        return
    c.close("GPU-trained run, evaluate on GPU vs CPU", _scores(out / "run_gpu_cpu.csv"),
            _scores(out / "run_gpu_cuda.csv"), 1e-3)
    got = [ev["run_gpu_cpu"].get(k, np.nan) for k in ("image_auroc", "pixel_auroc", "aupro")]
    ok = bool(np.isfinite(got).all())
    print(f"GPU-trained run: image AUROC {got[0]:.4f} (scored on the CPU) against "
          f"{ev['run_cpu_cpu'].get('image_auroc', np.nan):.4f} for the CPU-trained one (not checked: two CPU runs "
          f"differing only in thread count differ by up to 0.17 here); figures finite: {'ok' if ok else 'FAIL'}")
    if not ok:
        c.fails.append("GPU-trained run's figures")
    c.close("GPU seed reproducibility: run_gpu2 vs run_gpu, both scored on the GPU", _scores(out / "run_gpu_cuda.csv"),
            _scores(out / "run_gpu2_cuda.csv"), None)


def predict_steps(c: Checks, out: Path, data: Path) -> None:
    """Step 4: predict and extract --patches of the CPU-trained run on each device."""
    for dev in ("cpu", "cuda"):
        env = NO_TF32 if dev == "cuda" else None
        c.run(f"predict {dev}", [*CLI, "predict", "--run", out / "run_cpu", "--data", data / "test", "--out",
              out / f"pred_{dev}", "--device", dev, "--no-overlays", "--quiet"], env)
        c.run(f"extract {dev}", [*CLI, "extract", "--run", out / "run_cpu", "--data", data, "--patches", "--out",
              out / f"feat_{dev}", "--device", dev, "--quiet"], env)
    c.close("predict on GPU vs CPU", _scores(out / "pred_cpu" / "predictions.csv"),
            _scores(out / "pred_cuda" / "predictions.csv"), 1e-3)
    try:
        from uninet_feat.featstore import FeatureStore
        va, vb = (FeatureStore(out / f"feat_{d}").vectors for d in ("cpu", "cuda"))
        rel = float(np.max(np.abs(va - vb)) / max(float(np.max(np.abs(va))), 1e-6))
    except Exception as e:   # a store a failed extract left unreadable: recorded, the kNN steps still run
        print(f"extract stores not comparable: {e!r}")
        va, rel = np.zeros(0), float("nan")
    print(f"extract on GPU vs CPU: vectors {va.shape}, largest difference / largest value {rel:.2e} (limit 1e-2): "
          f"{'ok' if rel <= 1e-2 else 'FAIL'}")
    c.figures["extract on GPU vs CPU"] = rel
    if not rel <= 1e-2:
        c.fails.append("extract")


def knn_steps(c: Checks, out: Path, data: Path) -> None:
    """Step 5: index built with --device cpu and auto; predict --knn on each device."""
    if not (out / "feat_cpu").is_dir():
        c.run("extract cpu", [*CLI, "extract", "--run", out / "run_cpu", "--data", data, "--patches", "--out",
              out / "feat_cpu", "--device", "cpu", "--quiet"])
    for dev in ("cpu", "auto"):
        c.run(f"index {dev}", [*CLI, "index", "--features", out / "feat_cpu", "--out", out / f"idx_{dev}",
              "--device", dev], NO_TF32 if dev != "cpu" else None)
    coreset = _json(out / "idx_auto" / "knn.json").get("coreset_device")
    print(f"index --device auto ran its coreset on {coreset}: {'ok' if str(coreset).startswith('cuda') else 'FAIL'}")
    c.figures["coreset_device"] = coreset
    if not str(coreset).startswith("cuda"):
        c.fails.append("index --device auto's coreset on the GPU")
    for dev, idx in (("cpu", "idx_cpu"), ("cuda", "idx_cpu"), ("cpu", "idx_auto")):
        c.run(f"predict --knn {idx} on {dev}", [*CLI, "predict", "--run", out / "run_cpu", "--data", data / "test",
              "--knn", out / idx, "--out", out / f"knn_{idx}_{dev}", "--device", dev, "--no-overlays", "--quiet"],
              NO_TF32 if dev == "cuda" else None)
    knn = {k: _scores(out / k / "predictions.csv", "knn_score")
           for k in ("knn_idx_cpu_cpu", "knn_idx_cpu_cuda", "knn_idx_auto_cpu")}
    c.close("predict --knn on GPU vs CPU (one index)", knn["knn_idx_cpu_cpu"], knn["knn_idx_cpu_cuda"], 1e-3)
    c.close("index built on GPU vs CPU (kNN scores, both on the CPU)", knn["knn_idx_cpu_cpu"],
            knn["knn_idx_auto_cpu"], None)


if __name__ == "__main__":
    raise SystemExit(main())
