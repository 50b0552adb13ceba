#!/usr/bin/env bash
# Issue 8 GPU check, one run on a GPU (device machine, repository root):
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --skip flex --concurrency 1,8,32,64]
# Needs: python3 with torch (2.11 + Triton 3.6 there), transformers, safetensors, tokenizers, pillow, numpy, tqdm;
# llguidance is not on that image: carry its wheel as .whl/ (see below) and name ".whl" in the run's carry list.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1
# Writes benchmarks/results/gpu_check_<device>_<preset>_<time>.json (rewritten after every section) and copies it
# to $OUT when that is set. Budget: 3.5 min on an H200 with everything but flex (measured before hf_baseline gained its
# batched run: 64 requests on padded batches, not yet timed on a GPU; --skip hf_batched drops it) (flex compiles last;
# --skip flex saves a few minutes). How each figure is clocked: the JSON's `methodology` field, docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import llguidance" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "llguidance is missing and no wheel was carried in .whl/ (see the header of $0)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD/core:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
$PY benchmarks/gpu_check.py "$@"
status=$?
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/gpu_check_*.json "$OUT"/ 2>/dev/null || true
fi
exit $status
