"""An exported model (`uninet-feat export-model`) against its run, on real test images.

    python -m benchmarks.onnx_check --run RUN --model EXPORT_DIR [--data ROOT --split-csv CSV] [--limit N]

Each test image is decoded as model.json says (`load_image`), fed to ONNX Runtime one at a time (sizes vary),
and compared with `evaluate`'s torch scores and maps of the same images. Prints: the largest score and map
differences, the image AUROC from each, the images whose flag (score > model.json's threshold) differs, and
images per second of each path over the same images (ONNX Runtime with the threads torch has, decode included;
torch's batched scoring pass, loading included). A tiled export takes one input size: test images of another
size are left out of both paths (listed in ``left_out_other_size``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import uninet_feat  # noqa: F401


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True, help="folder written by `uninet-feat export-model --out`")
    ap.add_argument("--data")
    ap.add_argument("--split-csv", dest="split_csv")
    ap.add_argument("--limit", type=int, help="only the first N test images")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import onnxruntime as ort

    from uninet_feat import metrics
    from uninet_feat.calibration import load_run
    from uninet_feat.data import load_image
    from uninet_feat.data.images import read_size
    from uninet_feat.deploy import INPUT
    from uninet_feat.evaluate import score_samples
    from uninet_feat.runs import load_test_samples

    model, _, cfg = load_run(a.run, a.data, a.split_csv)
    test = load_test_samples(cfg)[: a.limit]
    info = json.loads((Path(a.model) / "model.json").read_text())
    fixed = info["input"]["shape"][2:] if info.get("tiling") else None   # a tiled model takes one size
    # both paths score, and are timed on, the same images: those the exported model takes (header sizes only)
    fits = [not fixed or list(read_size(s.path)) == list(fixed) for s in test]
    other = [str(s.path) for s, ok in zip(test, fits) if not ok]
    test = [s for s, ok in zip(test, fits) if ok]
    if not test:
        raise SystemExit(f"none of the test images has the exported model's input size {fixed}")
    t0 = time.perf_counter()
    res = score_samples(model, test, cfg, keep_maps=True)
    torch_s = time.perf_counter() - t0

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(Path(a.model) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    scores, ref, labels, d_map = [], [], [], 0.0
    t0 = time.perf_counter()
    for s, m, r in zip(res["samples"], res["maps"], res["scores"]):
        x = load_image(s.path).transpose(2, 0, 1)[None]
        ref.append(r)
        labels.append(0 if s.is_normal else 1)
        got = sess.run(None, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})
        scores.append(float(got[1][0]))
        d_map = max(d_map, float(np.abs(got[0][0] - m).max()))
    onnx_s = time.perf_counter() - t0
    scores, ref, labels = np.array(scores), np.array(ref), np.array(labels)
    thr = info.get("threshold")
    out = {"images": len(scores), "max_abs_diff_score": float(np.abs(scores - ref).max()),
           "max_abs_diff_map": d_map, "score_range": [float(ref.min()), float(ref.max())],
           "image_auroc_onnx": metrics.image_auroc(labels, scores) if 0 < labels.sum() < labels.size else None,
           "image_auroc_torch": metrics.image_auroc(labels, ref) if 0 < labels.sum() < labels.size else None,
           "flags_differ": None if thr is None else int(((scores > thr) != (ref > thr)).sum()),
           "images_per_s_onnx": len(scores) / onnx_s, "images_per_s_torch": len(res["scores"]) / torch_s,
           "threads": torch.get_num_threads(), "left_out_other_size": other}
    print(json.dumps(out, indent=2))
    if a.json:
        from uninet_feat.io import atomic_write_text
        atomic_write_text(a.json, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
